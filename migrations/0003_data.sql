-- 0003_data: what the data stages need.
--
-- Worker-side reuse: a stage service whose inputs live outside genpipe
-- (files, URLs) fingerprints them; input_key = sha256(kind, code version,
-- parameters, fingerprint). An attempt that finds a succeeded attempt with
-- the same input_key reuses its outputs (reused_from) and the stage shows
-- as cached.
ALTER TABLE stage_attempts ADD COLUMN input_key text;
ALTER TABLE stage_attempts ADD COLUMN reused_from bigint REFERENCES stage_attempts(id);
CREATE INDEX stage_attempts_input_key_idx ON stage_attempts (kind, input_key, id DESC)
    WHERE state = 'succeeded' AND input_key IS NOT NULL;

CREATE INDEX artifacts_run_idx ON artifacts (run_id, stage);

-- Corrections collected for a model (the feedback service fills this table;
-- an ingest source `feedback:MODEL` reads it).
CREATE TABLE feedback_corrections (
    id          bigserial PRIMARY KEY,
    model       text NOT NULL,
    request_id  text,
    prompt      text NOT NULL DEFAULT '',
    correction  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX feedback_corrections_model_idx ON feedback_corrections (model, id);
