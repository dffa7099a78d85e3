/*
 * triggers.c: judging and firing retraining triggers (triggers.h).
 */
#include "triggers.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "outbox.h"
#include "run.h"
#include "spec.h"
#include "subjects.h"
#include "wire.h"

gp_status gp_trigger_rule_from(const cJSON *t, int i, struct gp_trigger_rule *r,
			       struct gp_err *err)
{
	memset(r, 0, sizeof(*r));
	r->negative_rate = -1;
	r->threshold = NAN;
	const char *on = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(t, "on"));
	const char *name = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(t, "name"));
	const char *metric = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(t, "metric"));
	if (!on)
		return gp_err_set(err, GP_ERR_INVALID, "trigger %d has no \"on\"", i + 1);
	if (strcmp(on, "feedback") && strcmp(on, "drift"))
		return gp_err_set(err, GP_ERR_NOT_FOUND, "trigger %d is on %s, not judged here", i + 1,
				  on);
	r->on_drift = !strcmp(on, "drift");
	if (name)
		snprintf(r->name, sizeof r->name, "%s", name);
	else
		snprintf(r->name, sizeof r->name, "trigger-%d", i + 1);
	snprintf(r->metric, sizeof r->metric, "%s", metric ? metric : "psi");
	const cJSON *v;
	if (cJSON_IsNumber(v = cJSON_GetObjectItemCaseSensitive(t, "negative_rate")))
		r->negative_rate = v->valuedouble;
	if (cJSON_IsNumber(v = cJSON_GetObjectItemCaseSensitive(t, "window")))
		r->window = (long long)v->valuedouble;
	if (cJSON_IsNumber(v = cJSON_GetObjectItemCaseSensitive(t, "min_corrections")))
		r->min_corrections = (long long)v->valuedouble;
	if (cJSON_IsNumber(v = cJSON_GetObjectItemCaseSensitive(t, "threshold")))
		r->threshold = v->valuedouble;
	if (cJSON_IsNumber(v = cJSON_GetObjectItemCaseSensitive(t, "cooldown_ms")))
		r->cooldown_ms = (long long)v->valuedouble;
	if (cJSON_IsNumber(v = cJSON_GetObjectItemCaseSensitive(t, "max_per_day")))
		r->max_per_day = (long long)v->valuedouble;
	if (!r->on_drift && r->negative_rate < 0 && !r->min_corrections)
		return gp_err_set(err, GP_ERR_INVALID,
				  "feedback trigger %s needs negative_rate (with window) or "
				  "min_corrections", r->name);
	if (r->negative_rate >= 0 && !r->window)
		r->window = 100;
	return GP_OK;
}

int gp_trigger_decide(const struct gp_trigger_rule *r, const struct gp_trigger_facts *f,
		      char *reason, size_t rlen)
{
	if (f->active_run) {
		snprintf(reason, rlen, "a run it started is still going");
		return 0;
	}
	if (f->since_fired_ms >= 0 && f->since_fired_ms < r->cooldown_ms) {
		snprintf(reason, rlen, "cooling down (%lld of %lld ms)", f->since_fired_ms,
			 r->cooldown_ms);
		return 0;
	}
	if (r->max_per_day && f->fired_24h >= r->max_per_day) {
		snprintf(reason, rlen, "fired %lld times in 24 h (max_per_day %lld)", f->fired_24h,
			 r->max_per_day);
		return 0;
	}
	if (r->on_drift) {
		if (isfinite(f->alert_value) &&
		    (!isfinite(r->threshold) || f->alert_value >= r->threshold)) {
			if (isfinite(r->threshold))
				snprintf(reason, rlen, "drift alert: %s %.4g >= %.4g", r->metric,
					 f->alert_value, r->threshold);
			else
				snprintf(reason, rlen, "drift alert: %s %.4g", r->metric, f->alert_value);
			return 1;
		}
		snprintf(reason, rlen, "no %s alert over its threshold", r->metric);
		return 0;
	}
	if (r->negative_rate >= 0 && f->ratings >= r->window && f->ratings > 0) {
		double rate = (double)f->negatives / (double)f->ratings;
		if (rate >= r->negative_rate) {
			snprintf(reason, rlen, "%lld of the last %lld ratings negative (%.2f >= %.2f)",
				 f->negatives, f->ratings, rate, r->negative_rate);
			return 1;
		}
	}
	if (r->min_corrections && f->corrections >= r->min_corrections) {
		snprintf(reason, rlen, "%lld corrections (min_corrections %lld)", f->corrections,
			 r->min_corrections);
		return 1;
	}
	snprintf(reason, rlen, "%lld ratings (%lld negative), %lld corrections: below the rule",
		 f->ratings, f->negatives, f->corrections);
	return 0;
}

/* The model a pipeline's triggers watch by default. */
static const char *pipeline_model(const cJSON *spec)
{
	const cJSON *stages = cJSON_GetObjectItemCaseSensitive(
		cJSON_GetObjectItemCaseSensitive(spec, "spec"), "stages");
	const char *kinds[] = {"deploy", "train"};
	for (int k = 0; k < 2; k++) {
		const cJSON *s;
		cJSON_ArrayForEach(s, stages) {
			const char *kind = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(s, "kind"));
			const char *m = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(
				cJSON_GetObjectItemCaseSensitive(s, "with"), "model"));
			if (kind && m && !strcmp(kind, kinds[k]) && !strstr(m, "${"))
				return m;
		}
	}
	return NULL;
}

/* Count the facts of rule r for model since its last firing; in the caller's transaction. */
static gp_status facts(struct gp_db *db, long long pipeline_id, const char *model,
		       const struct gp_trigger_rule *r, struct gp_trigger_facts *f,
		       struct gp_err *err)
{
	char pid[32], win[32];
	snprintf(pid, sizeof pid, "%lld", pipeline_id);
	snprintf(win, sizeof win, "%lld", r->window > 0 ? r->window : 1);
	const char *p[] = {pid, r->name, model, win, r->metric};
	PGresult *q = NULL;
	gp_status st = gp_db_exec(
		db, "count trigger facts",
		"WITH last AS (SELECT max(created_at) AS at, count(*) FILTER (WHERE created_at > "
		"now() - interval '1 day') AS day FROM retrain_triggers WHERE pipeline_id = "
		"$1::bigint AND rule = $2), "
		"rated AS (SELECT rating FROM feedback, last WHERE model = $3 AND rating IS NOT NULL "
		"AND created_at > coalesce(last.at, '-infinity') ORDER BY id DESC LIMIT $4::int) "
		"SELECT (SELECT count(*) FROM rated), (SELECT count(*) FROM rated WHERE rating = "
		"'down'), (SELECT count(*) FROM feedback, last WHERE model = $3 AND correction IS NOT "
		"NULL AND created_at > coalesce(last.at, '-infinity')), "
		"(SELECT max(a.value) FROM alerts a JOIN model_versions v ON v.id = "
		"a.model_version_id JOIN models m ON m.id = v.model_id, last WHERE m.name = $3 AND "
		"a.metric = $5 AND a.created_at > coalesce(last.at, '-infinity')), "
		"coalesce((extract(epoch FROM now() - (SELECT at FROM last)) * 1000)::bigint, -1), "
		"(SELECT day FROM last), "
		"EXISTS (SELECT 1 FROM runs r JOIN pipeline_versions pv ON pv.id = "
		"r.pipeline_version_id WHERE pv.pipeline_id = $1::bigint AND r.state IN ('queued', "
		"'running') AND (r.trigger LIKE 'feedback:%' OR r.trigger LIKE 'drift:%'))",
		5, p, &q, err);
	if (st)
		return st;
	f->ratings = atoll(PQgetvalue(q, 0, 0));
	f->negatives = atoll(PQgetvalue(q, 0, 1));
	f->corrections = atoll(PQgetvalue(q, 0, 2));
	f->alert_value = PQgetisnull(q, 0, 3) ? NAN : atof(PQgetvalue(q, 0, 3));
	f->since_fired_ms = atoll(PQgetvalue(q, 0, 4));
	f->fired_24h = atoll(PQgetvalue(q, 0, 5));
	f->active_run = *PQgetvalue(q, 0, 6) == 't';
	PQclear(q);
	return GP_OK;
}

/* Fire rule r of pipeline (latest version pv): the run, the row, the message. */
static gp_status fire(struct gp_db *db, long long pipeline_id, const char *pipeline,
		      long long pv, const cJSON *spec, const char *model,
		      const struct gp_trigger_rule *r, int *fired, struct gp_err *err)
{
	char pid[32];
	snprintf(pid, sizeof pid, "%lld", pipeline_id);
	const char *lp[] = {pid};
	gp_status st = gp_db_begin(db, err);
	if (st)
		return st;
	struct gp_trigger_facts f;
	char reason[300];
	cJSON *params = NULL, *ev = NULL;
	char *evtext = NULL;
	uint8_t *msg = NULL;
	size_t mlen = 0;
	PGresult *res = NULL;
	if ((st = gp_db_exec(db, "lock pipeline", "SELECT 1 FROM pipelines WHERE id = $1::bigint "
			     "FOR UPDATE", 1, lp, NULL, err)) ||
	    (st = facts(db, pipeline_id, model, r, &f, err)))
		goto out;
	if (!gp_trigger_decide(r, &f, reason, sizeof reason))
		goto out; /* another judge fired it first, or the facts changed */
	struct gp_err e2 = {0};
	if (!(params = gp_spec_resolve_params(spec, NULL, 0, &e2))) {
		st = gp_err_set(err, GP_ERR_INVALID, "pipeline %s: %s", pipeline, e2.msg);
		goto out;
	}
	char trig[96];
	snprintf(trig, sizeof trig, "%s:%s", r->on_drift ? "drift" : "feedback", r->name);
	long long run = 0;
	if ((st = gp_run_insert(db, pv, params, trig, &run, err)))
		goto out;
	ev = cJSON_CreateObject();
	cJSON_AddStringToObject(ev, "model", model);
	cJSON_AddNumberToObject(ev, "ratings", (double)f.ratings);
	cJSON_AddNumberToObject(ev, "negatives", (double)f.negatives);
	cJSON_AddNumberToObject(ev, "corrections", (double)f.corrections);
	if (isfinite(f.alert_value))
		cJSON_AddNumberToObject(ev, "alert_value", f.alert_value);
	evtext = cJSON_PrintUnformatted(ev);
	char runs[32];
	snprintf(runs, sizeof runs, "%lld", run);
	const char *ip[] = {pid, r->name, reason, evtext ? evtext : "{}", runs};
	if ((st = gp_db_exec(db, "record trigger",
			     "INSERT INTO retrain_triggers (pipeline_id, rule, reason, evidence, run_id) "
			     "VALUES ($1::bigint, $2, $3, $4::jsonb, $5::bigint) RETURNING id",
			     5, ip, &res, err)))
		goto out;
	gp_retrain_trigger rt = GENPIPE__V1__RETRAIN_TRIGGER__INIT;
	rt.trigger_id = atoll(PQgetvalue(res, 0, 0));
	rt.pipeline = (char *)pipeline;
	rt.model = (char *)model;
	rt.rule = (char *)r->name;
	rt.reason = reason;
	rt.evidence_json = evtext ? evtext : "{}";
	rt.time_unix_ms = gp_wall_ms();
	char subject[128];
	snprintf(subject, sizeof subject, GP_SUBJ_TRIGGERS "%s", pipeline);
	if ((st = gp_wire_encode(&rt.base, &msg, &mlen, err)) ||
	    (st = gp_outbox_put(db, subject, msg, mlen, NULL, err)))
		goto out;
	if ((st = gp_db_commit(db, err)))
		goto out;
	gp_info("trigger %s of %s fired: %s; run %lld", r->name, pipeline, reason, run);
	(*fired)++;
	cJSON_Delete(params);
	cJSON_Delete(ev);
	free(evtext);
	free(msg);
	PQclear(res);
	return GP_OK;
out:
	gp_db_rollback(db);
	cJSON_Delete(params);
	cJSON_Delete(ev);
	free(evtext);
	free(msg);
	PQclear(res);
	return st;
}

gp_status gp_triggers_judge(struct gp_db *db, int *fired, struct gp_err *err)
{
	*fired = 0;
	PGresult *r = NULL;
	gp_status st = gp_db_exec(
		db, "read triggers",
		"SELECT p.id, p.name, v.id, v.spec_json::text FROM pipelines p JOIN LATERAL "
		"(SELECT id, spec_json FROM pipeline_versions WHERE pipeline_id = p.id "
		"ORDER BY version DESC LIMIT 1) v ON true "
		"WHERE jsonb_array_length(coalesce(v.spec_json->'spec'->'triggers', '[]')) > 0",
		0, NULL, &r, err);
	if (st)
		return st;
	for (int i = 0; i < PQntuples(r) && !st; i++) {
		cJSON *spec = cJSON_Parse(PQgetvalue(r, i, 3));
		const cJSON *trigs = cJSON_GetObjectItemCaseSensitive(
			cJSON_GetObjectItemCaseSensitive(spec, "spec"), "triggers");
		int k = 0;
		const cJSON *t;
		cJSON_ArrayForEach(t, trigs) {
			struct gp_trigger_rule rule;
			struct gp_err e2 = {0};
			int idx = k++;
			if (gp_trigger_rule_from(t, idx, &rule, &e2))
				continue; /* schedule triggers, or not judgeable: validate says why */
			const char *model = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(t, "model"));
			if (!model)
				model = pipeline_model(spec);
			if (!model)
				continue;
			struct gp_trigger_facts f;
			char reason[300];
			if ((st = facts(db, atoll(PQgetvalue(r, i, 0)), model, &rule, &f, err)))
				break;
			if (!gp_trigger_decide(&rule, &f, reason, sizeof reason))
				continue;
			if ((st = fire(db, atoll(PQgetvalue(r, i, 0)), PQgetvalue(r, i, 1),
				       atoll(PQgetvalue(r, i, 2)), spec, model, &rule, fired, err)))
				break;
		}
		cJSON_Delete(spec);
	}
	PQclear(r);
	return st;
}
