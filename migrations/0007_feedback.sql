-- The request log feedback is joined to, and feedback that cannot be
-- counted twice.

-- Filled from the telemetry stream by genpipe-feedback (successes as
-- sampled by the infer service, failures always).
ALTER TABLE inference_events
    ADD COLUMN model        text,
    ADD COLUMN version      integer,
    ADD COLUMN prompt_ids   integer[],
    ADD COLUMN served_at    timestamptz;
CREATE INDEX inference_events_model_idx ON inference_events (model, served_at);

-- A rating or correction that came over NATS carries its stream sequence:
-- a redelivered message records nothing twice.
ALTER TABLE feedback
    ADD COLUMN model            text,
    ADD COLUMN model_version_id bigint REFERENCES model_versions(id),
    ADD COLUMN stream_seq       bigint UNIQUE;
CREATE INDEX feedback_model_idx ON feedback (model, created_at);
