-- A queued attempt whose job message never reaches a worker (JetStream
-- fsyncs its file store about once a minute, so an OS crash can lose an
-- acknowledged message) is published again by the orchestrator after
-- --redispatch-ms, then after twice that, and so on: the claim by attempt
-- id makes any copy that does arrive harmless.
ALTER TABLE stage_attempts ADD COLUMN redispatched_at timestamptz;
ALTER TABLE stage_attempts ADD COLUMN redispatches integer NOT NULL DEFAULT 0;
CREATE INDEX stage_attempts_queued_idx ON stage_attempts (queued_at) WHERE state = 'queued';
