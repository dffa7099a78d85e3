/*
 * run.c: versions and runs (see run.h).
 */
#include "run.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "spec.h"

gp_status gp_pipeline_submit(struct gp_db *db, const char *text, const cJSON *doc,
			     const char *author, struct gp_version_ref *out, struct gp_err *err)
{
	char *canon = NULL;
	char hash[65];
	gp_status st = gp_spec_canonical(doc, &canon, hash, err);
	if (st)
		return st;
	const char *name = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(
		cJSON_GetObjectItemCaseSensitive(doc, "metadata"), "name"));
	char *labels = cJSON_PrintUnformatted(cJSON_GetObjectItemCaseSensitive(
		cJSON_GetObjectItemCaseSensitive(doc, "metadata"), "labels"));
	PGresult *r = NULL;
	if (!name || !labels) {
		st = gp_err_set(err, GP_ERR_INVALID, "spec has no metadata.name");
		goto out;
	}
	if ((st = gp_db_begin(db, err)))
		goto out;
	const char *p1[] = { name };
	/* Upsert and lock the pipeline row: version numbers are assigned under it. */
	if ((st = gp_db_exec(db, "create pipeline",
			     "INSERT INTO pipelines (name) VALUES ($1) ON CONFLICT (name) "
			     "DO UPDATE SET name = EXCLUDED.name RETURNING id",
			     1, p1, &r, err)))
		goto rollback;
	char pid[24];
	snprintf(pid, sizeof pid, "%s", PQgetvalue(r, 0, 0));
	PQclear(r);
	r = NULL;
	const char *p2[] = { pid, hash };
	if ((st = gp_db_exec(db, "find version",
			     "SELECT id, version FROM pipeline_versions WHERE pipeline_id = "
			     "$1::bigint AND content_hash = $2",
			     2, p2, &r, err)))
		goto rollback;
	if (PQntuples(r) == 1) {
		out->id = atoll(PQgetvalue(r, 0, 0));
		out->version = atoi(PQgetvalue(r, 0, 1));
		out->created = 0;
		snprintf(out->hash, sizeof out->hash, "%s", hash);
		PQclear(r);
		r = NULL;
		st = gp_db_commit(db, err);
		goto out;
	}
	PQclear(r);
	r = NULL;
	const char *p3[] = { pid, text, canon, hash, author ? author : "", labels };
	if ((st = gp_db_exec(db, "insert version",
			     "INSERT INTO pipeline_versions (pipeline_id, version, spec_text, "
			     "spec_json, content_hash, author, labels) "
			     "SELECT $1::bigint, coalesce(max(version), 0) + 1, $2, $3::jsonb, $4, $5, "
			     "$6::jsonb FROM pipeline_versions WHERE pipeline_id = $1::bigint "
			     "RETURNING id, version",
			     6, p3, &r, err)))
		goto rollback;
	out->id = atoll(PQgetvalue(r, 0, 0));
	out->version = atoi(PQgetvalue(r, 0, 1));
	out->created = 1;
	snprintf(out->hash, sizeof out->hash, "%s", hash);
	char obj[200], detail[200];
	snprintf(obj, sizeof obj, "pipeline/%s@%d", name, out->version);
	snprintf(detail, sizeof detail, "{\"content_hash\":\"%s\"}", hash);
	const char *p4[] = { author && *author ? author : "unknown", obj, detail };
	if ((st = gp_db_exec(db, "audit",
			     "INSERT INTO audit_log (actor, action, object, detail) "
			     "VALUES ($1, 'pipeline.version.create', $2, $3::jsonb)",
			     3, p4, NULL, err)))
		goto rollback;
	st = gp_db_commit(db, err);
	goto out;
rollback:
	gp_db_rollback(db);
out:
	PQclear(r);
	free(canon);
	free(labels);
	return st;
}

gp_status gp_run_insert(struct gp_db *db, long long pv_id, const cJSON *params,
			const char *trigger, long long *run_id, struct gp_err *err)
{
	char pv[24];
	snprintf(pv, sizeof pv, "%lld", pv_id);
	char *pj = cJSON_PrintUnformatted(params);
	if (!pj)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	PGresult *r = NULL;
	const char *p1[] = { pv, pj, trigger ? trigger : "manual" };
	gp_status st = gp_db_exec(db, "create run",
				  "INSERT INTO runs (pipeline_version_id, params, trigger, pipeline_name) "
				  "SELECT v.id, $2::jsonb, $3, p.name FROM pipeline_versions v "
				  "JOIN pipelines p ON p.id = v.pipeline_id WHERE v.id = $1::bigint "
				  "RETURNING id",
				  3, p1, &r, err);
	free(pj);
	if (st)
		return st;
	if (PQntuples(r) != 1) {
		PQclear(r);
		return gp_err_set(err, GP_ERR_NOT_FOUND, "pipeline version %lld does not exist", pv_id);
	}
	char rid[24];
	snprintf(rid, sizeof rid, "%s", PQgetvalue(r, 0, 0));
	PQclear(r);
	const char *p2[] = { rid, pv };
	if ((st = gp_db_exec(db, "create run stages",
			     "INSERT INTO run_stages (run_id, stage, kind, position) "
			     "SELECT $1::bigint, s.value->>'name', s.value->>'kind', s.ordinality "
			     "FROM pipeline_versions v, "
			     "jsonb_array_elements(v.spec_json->'spec'->'stages') WITH ORDINALITY s "
			     "WHERE v.id = $2::bigint",
			     2, p2, NULL, err)))
		return st;
	const char *p3[] = { rid };
	if ((st = gp_db_exec(db, "wake orchestrators", "SELECT pg_notify('genpipe_runs', $1)", 1,
			     p3, NULL, err)))
		return st;
	*run_id = atoll(rid);
	return GP_OK;
}

gp_status gp_run_create(struct gp_db *db, long long pv_id, const cJSON *params,
			const char *trigger, long long *run_id, struct gp_err *err)
{
	gp_status st = gp_db_begin(db, err);
	if (st)
		return st;
	long long id = 0;
	if ((st = gp_run_insert(db, pv_id, params, trigger, &id, err)) ||
	    (st = gp_db_commit(db, err))) {
		gp_db_rollback(db);
		return st;
	}
	*run_id = id;
	return GP_OK;
}

/*
 * A change of a whole run made under its row lock, allowed only from two
 * states: the statements (each taking the run id as $1) run in order in one
 * transaction.
 */
struct run_transition {
	const char *from[2];
	const char *refusal; /* "only a queued or running run can be cancelled" */
	const char *what[3];
	const char *sql[3];
};

static gp_status run_transition(struct gp_db *db, long long run_id,
				const struct run_transition *t, struct gp_err *err)
{
	char id[24];
	snprintf(id, sizeof id, "%lld", run_id);
	const char *p[] = { id };
	PGresult *r = NULL;
	gp_status st = gp_db_begin(db, err);
	if (st)
		return st;
	if ((st = gp_db_exec(db, "lock run", "SELECT state FROM runs WHERE id = $1::bigint FOR UPDATE",
			     1, p, &r, err)))
		goto rollback;
	if (PQntuples(r) != 1) {
		st = gp_err_set(err, GP_ERR_NOT_FOUND, "run %lld does not exist", run_id);
		goto rollback;
	}
	const char *state = PQgetvalue(r, 0, 0);
	if (strcmp(state, t->from[0]) != 0 && strcmp(state, t->from[1]) != 0) {
		st = gp_err_set(err, GP_ERR_CONFLICT, "run %lld is %s; %s", run_id, state, t->refusal);
		goto rollback;
	}
	for (int i = 0; i < 3 && t->sql[i]; i++)
		if ((st = gp_db_exec(db, t->what[i], t->sql[i], 1, p, NULL, err)))
			goto rollback;
	PQclear(r);
	return gp_db_commit(db, err);
rollback:
	PQclear(r);
	gp_db_rollback(db);
	return st;
}

static const struct run_transition cancel_run = {
	.from = { "queued", "running" },
	.refusal = "only a queued or running run can be cancelled",
	.what = { "cancel attempts", "cancel stages", "cancel run" },
	.sql = {
		"UPDATE stage_attempts SET state = 'cancelled', finished_at = now(), "
		"error = 'run cancelled', lease_deadline = NULL "
		"WHERE run_id = $1::bigint AND state IN ('queued', 'running')",
		"UPDATE run_stages SET state = 'cancelled', finished_at = now(), "
		"error = 'run cancelled' WHERE run_id = $1::bigint "
		"AND state IN ('pending', 'queued', 'retrying')",
		"UPDATE runs SET state = 'cancelled', finished_at = now(), "
		"updated_at = now(), error = 'cancelled' WHERE id = $1::bigint",
	},
};

static const struct run_transition retry_run = {
	.from = { "failed", "cancelled" },
	.refusal = "only a failed or cancelled run can be retried",
	.what = { "reset stages", "resume run", "wake orchestrators" },
	.sql = {
		"UPDATE run_stages rs SET state = 'pending', error = NULL, "
		"not_before = NULL, finished_at = NULL, outputs = NULL, "
		"attempt_base = coalesce((SELECT max(attempt) FROM stage_attempts a "
		"WHERE a.run_id = rs.run_id AND a.stage = rs.stage), 0) "
		"WHERE run_id = $1::bigint AND state NOT IN ('succeeded', 'cached')",
		"UPDATE runs SET state = 'running', finished_at = NULL, error = NULL, "
		"updated_at = now() WHERE id = $1::bigint",
		"SELECT pg_notify('genpipe_runs', $1)",
	},
};

gp_status gp_run_cancel(struct gp_db *db, long long run_id, struct gp_err *err)
{
	return run_transition(db, run_id, &cancel_run, err);
}

gp_status gp_run_retry(struct gp_db *db, long long run_id, struct gp_err *err)
{
	return run_transition(db, run_id, &retry_run, err);
}

gp_status gp_pipeline_find(struct gp_db *db, const char *ref, struct gp_version_ref *out,
			   cJSON **spec, struct gp_err *err)
{
	char name[128];
	const char *at = strchr(ref, '@');
	snprintf(name, sizeof name, "%.*s", (int)(at ? at - ref : (long)strlen(ref)), ref);
	char ver[16] = "0";
	if (at) {
		char *end;
		long v = strtol(at + 1, &end, 10);
		if (*end || v <= 0)
			return gp_err_set(err, GP_ERR_INVALID, "\"%s\": version must be a positive "
					  "integer (NAME@3)", ref);
		snprintf(ver, sizeof ver, "%ld", v);
	}
	const char *p[] = { name, ver };
	PGresult *r = NULL;
	gp_status st = gp_db_exec(db, "find pipeline version",
				  "SELECT v.id, v.version, v.content_hash, v.spec_json::text "
				  "FROM pipeline_versions v JOIN pipelines p ON p.id = v.pipeline_id "
				  "WHERE p.name = $1 AND ($2::integer = 0 OR v.version = $2::integer) "
				  "ORDER BY v.version DESC LIMIT 1",
				  2, p, &r, err);
	if (st)
		return st;
	if (PQntuples(r) == 0) {
		PQclear(r);
		return gp_err_set(err, GP_ERR_NOT_FOUND, at ? "pipeline %s has no version %s"
							    : "no pipeline named %s%s",
				  name, at ? ver : "");
	}
	out->id = atoll(PQgetvalue(r, 0, 0));
	out->version = atoi(PQgetvalue(r, 0, 1));
	out->created = 0;
	snprintf(out->hash, sizeof out->hash, "%s", PQgetvalue(r, 0, 2));
	if (spec) {
		*spec = cJSON_Parse(PQgetvalue(r, 0, 3));
		if (!*spec) {
			PQclear(r);
			return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		}
	}
	PQclear(r);
	return GP_OK;
}
