-- 0001_core: the system of record.
--
-- Forward-only: never edit this file once applied (the runner refuses);
-- add 0002_... instead. Tables follow DESIGN.md section 4. State changes and
-- the messages that must follow them are written in one transaction: the
-- message goes to outbox, and the relay publishes it.

CREATE TABLE pipelines (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE pipeline_versions (
    id           bigserial PRIMARY KEY,
    pipeline_id  bigint NOT NULL REFERENCES pipelines(id),
    version      integer NOT NULL CHECK (version > 0),
    spec_text    text NOT NULL,
    spec_json    jsonb NOT NULL,
    content_hash text NOT NULL,
    author       text NOT NULL DEFAULT '',
    labels       jsonb NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (pipeline_id, version),
    UNIQUE (pipeline_id, content_hash)
);

CREATE TABLE runs (
    id                  bigserial PRIMARY KEY,
    pipeline_version_id bigint NOT NULL REFERENCES pipeline_versions(id),
    trigger             text NOT NULL DEFAULT 'manual',
    params              jsonb NOT NULL DEFAULT '{}',
    state               text NOT NULL DEFAULT 'queued'
                        CHECK (state IN ('queued','running','succeeded','failed','cancelled')),
    cost_usd            numeric(14,6) NOT NULL DEFAULT 0,
    created_at          timestamptz NOT NULL DEFAULT now(),
    started_at          timestamptz,
    finished_at         timestamptz,
    error               text
);
CREATE INDEX runs_state_idx ON runs (state) WHERE state IN ('queued','running');

-- One row per attempt of a stage. The lease fences workers: only the row's
-- current lease_token may extend it or report a result, and only while
-- state = 'running' and the deadline has not passed.
CREATE TABLE stage_attempts (
    id             bigserial PRIMARY KEY,
    run_id         bigint NOT NULL REFERENCES runs(id),
    stage          text NOT NULL,
    kind           text NOT NULL,
    attempt        integer NOT NULL CHECK (attempt > 0),
    state          text NOT NULL DEFAULT 'queued'
                   CHECK (state IN ('queued','running','succeeded','failed','expired',
                                    'released','cancelled')),
    params         jsonb NOT NULL DEFAULT '{}',
    lease_token    text,
    lease_deadline timestamptz,
    lease_ms       integer NOT NULL DEFAULT 30000 CHECK (lease_ms > 0),
    max_attempts   integer NOT NULL DEFAULT 3 CHECK (max_attempts > 0),
    worker         text,
    queued_at      timestamptz NOT NULL DEFAULT now(),
    claimed_at     timestamptz,
    heartbeat_at   timestamptz,
    finished_at    timestamptz,
    outputs        jsonb,
    metrics        jsonb,
    error          text,
    UNIQUE (run_id, stage, attempt)
);
CREATE INDEX stage_attempts_lease_idx ON stage_attempts (lease_deadline) WHERE state = 'running';

CREATE TABLE artifacts (
    id           bigserial PRIMARY KEY,
    content_hash text NOT NULL UNIQUE,
    uri          text NOT NULL,
    kind         text NOT NULL,
    size_bytes   bigint NOT NULL CHECK (size_bytes >= 0),
    run_id       bigint REFERENCES runs(id),
    stage        text,
    meta         jsonb NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE models (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE model_versions (
    id              bigserial PRIMARY KEY,
    model_id        bigint NOT NULL REFERENCES models(id),
    version         integer NOT NULL CHECK (version > 0),
    artifact_id     bigint REFERENCES artifacts(id),
    base_version_id bigint REFERENCES model_versions(id),
    metrics         jsonb NOT NULL DEFAULT '{}',
    lineage         jsonb NOT NULL DEFAULT '{}',
    run_id          bigint REFERENCES runs(id),
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (model_id, version)
);

CREATE TABLE model_aliases (
    model_id         bigint NOT NULL REFERENCES models(id),
    alias            text NOT NULL,
    model_version_id bigint NOT NULL REFERENCES model_versions(id),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_id, alias)
);

CREATE TABLE inference_events (
    id               bigserial PRIMARY KEY,
    request_id       text NOT NULL UNIQUE,
    model_version_id bigint REFERENCES model_versions(id),
    prompt           text,
    completion       text,
    prompt_tokens    integer,
    output_tokens    integer,
    latency_ms       double precision,
    cache_hit        boolean NOT NULL DEFAULT false,
    error_code       text,
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE drift_windows (
    id               bigserial PRIMARY KEY,
    model_version_id bigint REFERENCES model_versions(id),
    window_start     timestamptz NOT NULL,
    window_end       timestamptz NOT NULL,
    n_requests       integer NOT NULL,
    metrics          jsonb NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE alerts (
    id               bigserial PRIMARY KEY,
    model_version_id bigint REFERENCES model_versions(id),
    metric           text NOT NULL,
    value            double precision NOT NULL,
    threshold        double precision NOT NULL,
    severity         text NOT NULL,
    message          text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE feedback (
    id          bigserial PRIMARY KEY,
    request_id  text NOT NULL,
    rating      text CHECK (rating IN ('up','down')),
    correction  text,
    author      text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX feedback_request_idx ON feedback (request_id);

CREATE TABLE retrain_triggers (
    id          bigserial PRIMARY KEY,
    pipeline_id bigint REFERENCES pipelines(id),
    rule        text NOT NULL,
    reason      text NOT NULL,
    evidence    jsonb NOT NULL DEFAULT '{}',
    run_id      bigint REFERENCES runs(id),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE cost_ledger (
    id          bigserial PRIMARY KEY,
    run_id      bigint REFERENCES runs(id),
    attempt_id  bigint REFERENCES stage_attempts(id),
    model_version_id bigint REFERENCES model_versions(id),
    resource_class text NOT NULL,
    seconds     double precision NOT NULL CHECK (seconds >= 0),
    unit_price  numeric(14,6) NOT NULL,
    amount_usd  numeric(14,6) NOT NULL,
    labels      jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Append-only: the trigger below refuses UPDATE and DELETE.
CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    actor       text NOT NULL,
    action      text NOT NULL,
    object      text NOT NULL,
    detail      jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END $$;
CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();

CREATE TABLE api_tokens (
    id          bigserial PRIMARY KEY,
    token_hash  text NOT NULL UNIQUE,
    team        text NOT NULL,
    scopes      text[] NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

-- Messages that must follow a committed state change. The relay publishes
-- unsent rows with Nats-Msg-Id = 'outbox-' || id and then sets sent_at.
CREATE TABLE outbox (
    id          bigserial PRIMARY KEY,
    subject     text NOT NULL,
    payload     bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    sent_at     timestamptz
);
CREATE INDEX outbox_unsent_idx ON outbox (id) WHERE sent_at IS NULL;
-- Wakes relays at commit so they need not poll fast.
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('genpipe_outbox', '');
    RETURN NULL;
END $$;
CREATE TRIGGER outbox_inserted AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();

-- Messages that could not be decoded or failed validation: terminated on
-- the bus, kept here with the reason.
CREATE TABLE dead_letters (
    id          bigserial PRIMARY KEY,
    stream      text NOT NULL,
    consumer    text NOT NULL,
    subject     text NOT NULL,
    stream_seq  bigint NOT NULL,
    payload     bytea NOT NULL,
    reason      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (stream, stream_seq)
);
