-- Serving: what each deploy stage decided, promoted or not, with the
-- figures it compared; `genpipe models show` prints the latest per version.
CREATE TABLE deploy_decisions (
    id               bigserial PRIMARY KEY,
    run_id           bigint NOT NULL REFERENCES runs(id),
    stage            text NOT NULL,
    model_version_id bigint NOT NULL REFERENCES model_versions(id),
    alias            text NOT NULL,
    promoted         boolean NOT NULL,
    reason           text NOT NULL,
    figures          jsonb NOT NULL DEFAULT '{}',
    created_at       timestamptz NOT NULL DEFAULT now(),
    -- one decision per stage of a run: a redelivered job records nothing twice
    UNIQUE (run_id, stage)
);
CREATE INDEX deploy_decisions_version_idx ON deploy_decisions (model_version_id, id);

-- A canary: the share of an alias's requests that go to a candidate
-- version while a deploy stage watches them. One per alias; the deploy
-- stage that set it promotes the candidate or removes the row.
CREATE TABLE model_canaries (
    model_id         bigint NOT NULL REFERENCES models(id),
    alias            text NOT NULL,
    model_version_id bigint NOT NULL REFERENCES model_versions(id),
    fraction         double precision NOT NULL CHECK (fraction > 0 AND fraction < 1),
    run_id           bigint REFERENCES runs(id),
    stage            text,
    started_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_id, alias)
);
