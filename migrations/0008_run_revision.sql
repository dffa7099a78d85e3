-- A run's revision: bumped by every statement that writes its run_stages
-- rows, whoever runs it (an orchestrator's advance, cancel, retry, an
-- operator's SQL). An orchestrator keeps the stage rows of the runs it
-- advances in memory and re-reads them only when the revision is not the
-- one it left (services/orchestrator/engine.c); an advance otherwise reads
-- only its active stages' latest attempts.
ALTER TABLE runs ADD COLUMN revision bigint NOT NULL DEFAULT 0;

CREATE FUNCTION run_stages_bump_revision() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        UPDATE runs SET revision = revision + 1
        WHERE id IN (SELECT DISTINCT run_id FROM old_rows);
    ELSE
        UPDATE runs SET revision = revision + 1
        WHERE id IN (SELECT DISTINCT run_id FROM new_rows);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER run_stages_revision_ins AFTER INSERT ON run_stages
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION run_stages_bump_revision();
CREATE TRIGGER run_stages_revision_upd AFTER UPDATE ON run_stages
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION run_stages_bump_revision();
CREATE TRIGGER run_stages_revision_del AFTER DELETE ON run_stages
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION run_stages_bump_revision();

-- The stages an advance looks at every time.
CREATE INDEX run_stages_active_idx ON run_stages (run_id) WHERE state IN ('queued', 'retrying');
