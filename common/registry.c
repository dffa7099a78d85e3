/*
 * registry.c: alias moves and version lookups (see registry.h).
 */
#include "registry.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "artifact.h"
#include "bpe.h"
#include "model.h"
#include "bus.h"
#include "outbox.h"
#include "subjects.h"
#include "wire.h"

/* A RegistryChange for genpipe.registry.<model>, into the open transaction's outbox. */
static gp_status put_change(struct gp_db *db, const char *model, const char *alias,
			    long long version, long long from, struct gp_err *err)
{
	gp_registry_change rc = GENPIPE__V1__REGISTRY_CHANGE__INIT;
	rc.model = (char *)model;
	rc.alias = (char *)alias;
	rc.version = version;
	rc.from_version = from;
	rc.time_unix_ms = gp_wall_ms();
	char subject[128];
	uint8_t *msg = NULL;
	size_t mlen = 0;
	snprintf(subject, sizeof(subject), GP_SUBJ_REGISTRY "%s", model);
	gp_status st = gp_wire_encode(&rc.base, &msg, &mlen, err);
	if (!st)
		st = gp_outbox_put(db, subject, msg, mlen, NULL, err);
	free(msg);
	return st;
}

/* An audit_log row about model@alias, in the open transaction. */
static gp_status audit(struct gp_db *db, const char *actor, const char *action,
		       const char *model, const char *alias, const char *detail, struct gp_err *err)
{
	char object[300];
	snprintf(object, sizeof(object), "%s@%s", model, alias);
	const char *ap[] = {actor ? actor : "genpipe", action, object, detail};
	return gp_db_exec(db, "audit registry change",
			  "INSERT INTO audit_log (actor, action, object, detail) "
			  "VALUES ($1, $2, $3, $4::jsonb)", 4, ap, NULL, err);
}

gp_status gp_registry_move_alias(struct gp_db *db, const char *model, const char *alias,
				 long long version, const char *actor, const char *extra_json,
				 long long *from, struct gp_err *err)
{
	if (!gp_bus_token_ok(model) || !gp_bus_token_ok(alias))
		return gp_err_set(err, GP_ERR_INVALID, "model \"%s\" and alias \"%s\" must be DNS labels",
				  model, alias);
	if (version <= 0)
		return gp_err_set(err, GP_ERR_INVALID, "version %lld is not positive", version);
	char ver[32];
	snprintf(ver, sizeof(ver), "%lld", version);
	PGresult *r = NULL;
	gp_status st = gp_db_begin(db, err);
	if (st)
		return st;
	const char *p[] = {model, ver, alias};
	st = gp_db_exec(db, "move alias",
			"WITH m AS (SELECT id FROM models WHERE name = $1), "
			"v AS (SELECT v.id, v.model_id FROM model_versions v JOIN m ON m.id = v.model_id "
			"WHERE v.version = $2::int), "
			"old AS (SELECT a.model_version_id, ov.version FROM model_aliases a JOIN m ON "
			"m.id = a.model_id JOIN model_versions ov ON ov.id = a.model_version_id "
			"WHERE a.alias = $3 FOR UPDATE OF a), "
			"up AS (INSERT INTO model_aliases (model_id, alias, model_version_id) "
			"SELECT model_id, $3, id FROM v ON CONFLICT (model_id, alias) DO UPDATE SET "
			"model_version_id = EXCLUDED.model_version_id, updated_at = now() RETURNING 1) "
			"SELECT (SELECT count(*) FROM m), (SELECT count(*) FROM v), "
			"(SELECT version FROM old), (SELECT count(*) FROM up)",
			3, p, &r, err);
	if (st)
		goto fail;
	if (atoi(PQgetvalue(r, 0, 0)) == 0) {
		st = gp_err_set(err, GP_ERR_NOT_FOUND, "no model \"%s\"", model);
		goto fail;
	}
	if (atoi(PQgetvalue(r, 0, 1)) == 0) {
		st = gp_err_set(err, GP_ERR_NOT_FOUND, "model \"%s\" has no version %lld", model,
				version);
		goto fail;
	}
	long long old = PQgetisnull(r, 0, 2) ? 0 : atoll(PQgetvalue(r, 0, 2));
	cJSON *d = extra_json ? cJSON_Parse(extra_json) : NULL;
	if (!d || !cJSON_IsObject(d)) {
		cJSON_Delete(d);
		d = cJSON_CreateObject();
	}
	cJSON_DeleteItemFromObject(d, "from");
	cJSON_DeleteItemFromObject(d, "to");
	if (old)
		cJSON_AddNumberToObject(d, "from", (double)old);
	else
		cJSON_AddNullToObject(d, "from");
	cJSON_AddNumberToObject(d, "to", (double)version);
	char *detail = cJSON_PrintUnformatted(d);
	cJSON_Delete(d);
	st = detail ? audit(db, actor, "model.alias", model, alias, detail, err)
		    : gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	free(detail);
	if (st || (st = put_change(db, model, alias, version, old, err)) ||
	    (st = gp_db_commit(db, err)))
		goto fail;
	PQclear(r);
	if (from)
		*from = old;
	return GP_OK;
fail:
	PQclear(r);
	gp_db_rollback(db);
	return st;
}

gp_status gp_registry_resolve(struct gp_db *db, const char *model, const char *alias,
			      long long version, struct gp_model_ref *out, struct gp_err *err)
{
	char ver[32];
	snprintf(ver, sizeof(ver), "%lld", version);
	const char *a = alias && *alias ? alias : "production";
	const char *p[] = {model, version > 0 ? ver : NULL, version > 0 ? NULL : a};
	PGresult *r = NULL;
	gp_status st = gp_db_exec(
		db, "resolve model",
		"SELECT (SELECT count(*) FROM models WHERE name = $1), v.version, v.id, "
		"coalesce(ar.content_hash, ''), coalesce(v.lineage->>'tokenizer', ''), "
		"v.metrics->>'val_loss', cv.version, c.fraction "
		"FROM (SELECT 1) one LEFT JOIN models m ON m.name = $1 "
		"LEFT JOIN model_versions v ON v.model_id = m.id AND "
		"(($2::int IS NOT NULL AND v.version = $2::int) OR ($2::int IS NULL AND v.id = "
		"(SELECT model_version_id FROM model_aliases al WHERE al.model_id = m.id AND "
		"al.alias = $3))) "
		"LEFT JOIN artifacts ar ON ar.id = v.artifact_id "
		"LEFT JOIN model_canaries c ON $2::int IS NULL AND c.model_id = m.id AND c.alias = $3 "
		"LEFT JOIN model_versions cv ON cv.id = c.model_version_id",
		3, p, &r, err);
	if (st)
		return st;
	if (atoi(PQgetvalue(r, 0, 0)) == 0)
		st = gp_err_set(err, GP_ERR_NOT_FOUND, "no model \"%s\"", model);
	else if (PQgetisnull(r, 0, 1) && version > 0)
		st = gp_err_set(err, GP_ERR_NOT_FOUND, "model \"%s\" has no version %lld", model,
				version);
	else if (PQgetisnull(r, 0, 1))
		st = gp_err_set(err, GP_ERR_NOT_FOUND, "model \"%s\" has no alias \"%s\"", model, a);
	else if (!*PQgetvalue(r, 0, 3) ||
		 gp_artifact_ref_parse(PQgetvalue(r, 0, 4), out->tokenizer))
		st = gp_err_set(err, GP_ERR_NOT_FOUND,
				"model \"%s\" version %s has no checkpoint or tokenizer recorded",
				model, PQgetvalue(r, 0, 1));
	if (!st) {
		out->version = atoll(PQgetvalue(r, 0, 1));
		out->version_id = atoll(PQgetvalue(r, 0, 2));
		snprintf(out->checkpoint, sizeof(out->checkpoint), "%s", PQgetvalue(r, 0, 3));
		out->val_loss = PQgetisnull(r, 0, 5) ? NAN : atof(PQgetvalue(r, 0, 5));
		out->canary_version = PQgetisnull(r, 0, 6) ? 0 : atoll(PQgetvalue(r, 0, 6));
		out->canary_fraction = PQgetisnull(r, 0, 7) ? 0 : atof(PQgetvalue(r, 0, 7));
	}
	PQclear(r);
	return st;
}

/* The alias's current version (for the RegistryChange), in the open transaction. */
static gp_status notify(struct gp_db *db, const char *model, const char *alias,
			struct gp_err *err)
{
	PGresult *r = NULL;
	const char *p[] = {model, alias};
	gp_status st = gp_db_exec(db, "read alias",
				  "SELECT v.version FROM models m JOIN model_aliases a ON "
				  "a.model_id = m.id AND a.alias = $2 JOIN model_versions v ON "
				  "v.id = a.model_version_id WHERE m.name = $1", 2, p, &r, err);
	if (st)
		return st;
	long long v = PQntuples(r) ? atoll(PQgetvalue(r, 0, 0)) : 0;
	PQclear(r);
	if (!v)
		return gp_err_set(err, GP_ERR_NOT_FOUND, "model \"%s\" has no alias \"%s\"", model,
				  alias);
	return put_change(db, model, alias, v, v, err);
}

gp_status gp_registry_set_canary(struct gp_db *db, const char *model, const char *alias,
				 long long version, double fraction, long long run_id,
				 const char *stage, long long *started_ms, struct gp_err *err)
{
	if (!(fraction > 0 && fraction < 1))
		return gp_err_set(err, GP_ERR_INVALID, "canary fraction %g is not in (0, 1)", fraction);
	char ver[32], frac[32], run[32], detail[300];
	snprintf(ver, sizeof(ver), "%lld", version);
	snprintf(frac, sizeof(frac), "%.17g", fraction);
	snprintf(run, sizeof(run), "%lld", run_id);
	snprintf(detail, sizeof(detail),
		 "{\"version\": %lld, \"fraction\": %g, \"run_id\": %lld, \"stage\": \"%s\"}",
		 version, fraction, run_id, stage);
	PGresult *r = NULL;
	gp_status st = gp_db_begin(db, err);
	if (st)
		return st;
	const char *p[] = {model, alias, ver, frac, run, stage};
	st = gp_db_exec(db, "set canary",
			"INSERT INTO model_canaries (model_id, alias, model_version_id, fraction, "
			"run_id, stage) SELECT m.id, $2, v.id, $4::float8, $5::bigint, $6 FROM models m "
			"JOIN model_versions v ON v.model_id = m.id AND v.version = $3::int "
			"WHERE m.name = $1 ON CONFLICT (model_id, alias) DO UPDATE SET "
			"model_version_id = EXCLUDED.model_version_id, fraction = EXCLUDED.fraction, "
			"started_at = CASE WHEN model_canaries.run_id IS NOT DISTINCT FROM "
			"EXCLUDED.run_id AND model_canaries.stage IS NOT DISTINCT FROM EXCLUDED.stage "
			"AND model_canaries.model_version_id = EXCLUDED.model_version_id "
			"THEN model_canaries.started_at ELSE now() END, "
			"run_id = EXCLUDED.run_id, stage = EXCLUDED.stage "
			"RETURNING (extract(epoch FROM started_at) * 1000)::bigint",
			6, p, &r, err);
	if (!st && PQntuples(r) == 0)
		st = gp_err_set(err, GP_ERR_NOT_FOUND, "model \"%s\" has no version %lld", model,
				version);
	if (!st && started_ms)
		*started_ms = atoll(PQgetvalue(r, 0, 0));
	PQclear(r);
	if (!st)
		st = audit(db, "deploy", "model.canary", model, alias, detail, err);
	if (!st)
		st = notify(db, model, alias, err);
	if (!st)
		st = gp_db_commit(db, err);
	if (st)
		gp_db_rollback(db);
	return st;
}

gp_status gp_registry_clear_canary(struct gp_db *db, const char *model, const char *alias,
				   const char *why, struct gp_err *err)
{
	PGresult *r = NULL;
	gp_status st = gp_db_begin(db, err);
	if (st)
		return st;
	const char *p[] = {model, alias};
	st = gp_db_exec(db, "clear canary",
			"DELETE FROM model_canaries c USING models m WHERE m.id = c.model_id AND "
			"m.name = $1 AND c.alias = $2 RETURNING 1", 2, p, &r, err);
	int had = !st && PQntuples(r) > 0;
	PQclear(r);
	if (had) {
		cJSON *d = cJSON_CreateObject();
		cJSON_AddBoolToObject(d, "cleared", 1);
		cJSON_AddStringToObject(d, "why", why ? why : "");
		char *dt = cJSON_PrintUnformatted(d);
		cJSON_Delete(d);
		st = dt ? audit(db, "deploy", "model.canary", model, alias, dt, err)
			: gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		free(dt);
		if (!st)
			st = notify(db, model, alias, err);
	}
	if (!st)
		st = gp_db_commit(db, err);
	if (st)
		gp_db_rollback(db);
	return st;
}

gp_status gp_registry_load(struct gp_store *store, const char *model,
			   const struct gp_model_ref *ref, struct gp_model **m, struct gp_bpe **tok,
			   struct gp_err *err)
{
	char path[4096];
	uint8_t *tb = NULL;
	size_t tl = 0;
	struct gp_model *mm = NULL;
	gp_status st = gp_store_local_path(store, ref->checkpoint, path, sizeof(path), err);
	if (!st)
		st = gp_ckpt_map(path, &mm, NULL, err);
	if (!st && tok && !(st = gp_store_get(store, ref->tokenizer, 64u << 20, &tb, &tl, err)))
		st = gp_bpe_load(tb, tl, tok, err);
	free(tb);
	if (st) {
		gp_model_destroy(mm);
		return gp_err_wrap(err, "%s version %lld", model, ref->version);
	}
	*m = mm;
	return GP_OK;
}

double gp_text_nats_per_byte(struct gp_model *m, struct gp_bpe *tok, const char *text,
			     size_t len, struct gp_err *err)
{
	uint16_t *ids = NULL;
	size_t n = 0, cap = 0;
	if (!len || gp_bpe_encode(tok, text, len, &ids, &n, &cap, err) || n < 2) {
		free(ids);
		return NAN;
	}
	int ctx = gp_model_config(m)->context;
	double total = 0;
	for (size_t off = 0; off + 1 < n; off += (size_t)ctx) {
		size_t T = n - off - 1 < (size_t)ctx ? n - off - 1 : (size_t)ctx;
		float loss = 0;
		if (gp_model_forward(m, ids + off, ids + off + 1, 1, (int)T, &loss, err)) {
			free(ids);
			return NAN;
		}
		total += (double)loss * (double)T;
	}
	free(ids);
	return total / (double)len;
}
