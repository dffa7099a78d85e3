-- The model registry as the train service fills it, and the training
-- checkpoints a resumed attempt starts from.

-- A train stage registers at most one version per run: the unique key makes
-- registration idempotent when an attempt dies between registering and
-- reporting success and the next attempt registers again.
ALTER TABLE model_versions
    ADD COLUMN stage               text,
    ADD COLUMN export_artifact_id  bigint REFERENCES artifacts(id),
    ADD COLUMN resource_class      text NOT NULL DEFAULT 'cpu',
    ADD COLUMN seconds             double precision NOT NULL DEFAULT 0 CHECK (seconds >= 0),
    ADD CONSTRAINT model_versions_run_stage_key UNIQUE (run_id, stage);

-- The latest checkpoint of a running train stage. Written only by the
-- attempt that holds the lease (the statement checks the token), so a
-- worker that lost its lease cannot point the next attempt at its file.
CREATE TABLE train_checkpoints (
    run_id      bigint NOT NULL REFERENCES runs(id),
    stage       text NOT NULL,
    step        bigint NOT NULL CHECK (step >= 0),
    path        text NOT NULL,
    attempt_id  bigint NOT NULL REFERENCES stage_attempts(id),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, stage)
);
