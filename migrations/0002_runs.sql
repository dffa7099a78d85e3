-- 0002_runs: the run engine's state.
--
-- run_stages holds one row per (run, stage): the engine's view of the DAG.
-- The stage's attempts live in stage_attempts; the latest attempt of a
-- stage is its current one. The orchestrator is woken by NOTIFY on
-- 'genpipe_runs' (payload: run id) when a run is created or an attempt
-- reaches a final state; NOTIFY is only a hint, a periodic sweep is the
-- guarantee.

ALTER TABLE runs ADD COLUMN pipeline_name text;
ALTER TABLE runs DROP CONSTRAINT runs_state_check;
ALTER TABLE runs ADD CONSTRAINT runs_state_check
    CHECK (state IN ('queued','running','succeeded','failed','cancelled'));
ALTER TABLE runs ADD COLUMN updated_at timestamptz NOT NULL DEFAULT now();
CREATE INDEX runs_pipeline_idx ON runs (pipeline_name, id DESC);

CREATE TABLE run_stages (
    run_id        bigint NOT NULL REFERENCES runs(id),
    stage         text NOT NULL,
    kind          text NOT NULL,
    position      integer NOT NULL,
    state         text NOT NULL DEFAULT 'pending'
                  CHECK (state IN ('pending','queued','retrying','succeeded','failed',
                                   'cancelled','cached','skipped')),
    attempt_base  integer NOT NULL DEFAULT 0, -- attempts before the last resume
    not_before    timestamptz,                -- retry backoff
    cache_key     text,
    cached_from   bigint REFERENCES runs(id),
    outputs       jsonb,
    error         text,
    queued_at     timestamptz,
    finished_at   timestamptz,
    PRIMARY KEY (run_id, stage)
);
CREATE INDEX run_stages_cache_idx ON run_stages (cache_key) WHERE state = 'succeeded';

-- Whether a failed attempt may be retried (false: bad parameters and the like).
ALTER TABLE stage_attempts ADD COLUMN retryable boolean NOT NULL DEFAULT true;
ALTER TABLE stage_attempts ADD COLUMN timeout_ms bigint NOT NULL DEFAULT 86400000;
-- Wall-clock stamps, not transaction start, so dispatch latency is measurable.
ALTER TABLE stage_attempts ALTER COLUMN queued_at SET DEFAULT clock_timestamp();
CREATE INDEX stage_attempts_run_idx ON stage_attempts (run_id, stage, attempt DESC);

-- The code version of each stage kind's service, part of the cache key.
CREATE TABLE stage_kinds (
    kind        text PRIMARY KEY,
    version     text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION stage_attempt_finished() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('genpipe_runs', NEW.run_id::text);
    RETURN NULL;
END $$;
CREATE TRIGGER stage_attempt_finished AFTER UPDATE OF state ON stage_attempts
    FOR EACH ROW WHEN (NEW.state NOT IN ('queued', 'running') AND OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION stage_attempt_finished();
