-- Drift monitoring: what each model's monitor watches (written by the
-- monitor stage), and the keys that make its windows and alerts idempotent.

CREATE TABLE monitors (
    model_id    bigint PRIMARY KEY REFERENCES models(id),
    config      jsonb NOT NULL,       -- window, window_time_ms, thresholds, bins, loss_sample
    histogram   text NOT NULL,        -- artifact hash of the reference token histogram
    run_id      bigint REFERENCES runs(id),
    stage       text,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- A window is identified by the stream sequence of its first event: a
-- window rebuilt from redelivered telemetry after a crash is not counted twice.
ALTER TABLE drift_windows
    ADD COLUMN first_seq bigint,
    ADD COLUMN last_seq  bigint,
    ADD CONSTRAINT drift_windows_version_seq_key UNIQUE (model_version_id, first_seq);
CREATE INDEX drift_windows_end_idx ON drift_windows (window_end);

ALTER TABLE alerts
    ADD COLUMN drift_window_id bigint REFERENCES drift_windows(id);
CREATE INDEX alerts_version_idx ON alerts (model_version_id, created_at);
