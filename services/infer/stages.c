/*
 * stages.c: the deploy stage kind (see stages.h).
 */
#include "stages.h"

#include <cjson/cJSON.h>
#include <ctype.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "artifact.h"
#include "bpe.h"
#include "bus.h"
#include "dataset.h"
#include "engine.h"
#include "model.h"
#include "shard.h"
#include "log.h"
#include "params.h"
#include "registry.h"
#include "utf8.h"
#include "spec.h"
#include "telemetry.h"

static const char *skip(const char *p)
{
	while (*p == ' ' || *p == '\t')
		p++;
	return p;
}

static const char *ident(const char *p, char *out, size_t n)
{
	size_t k = 0;
	while ((isalnum((unsigned char)*p) || *p == '_' || *p == '-') && k + 1 < n)
		out[k++] = *p++;
	out[k] = 0;
	return p;
}

gp_status gp_gate_parse(const char *text, struct gp_gate *g, struct gp_err *err)
{
	memset(g, 0, sizeof(*g));
	const char *p = skip(text);
	if (!strcmp(p, "always") || !*p) {
		g->always = 1;
		return GP_OK;
	}
	p = skip(ident(p, g->metric, sizeof(g->metric)));
	if (!g->metric[0] || !isalpha((unsigned char)g->metric[0]))
		return gp_err_set(err, GP_ERR_INVALID,
				  "promote_if \"%s\": expected a metric name first (e.g. "
				  "\"val_loss < production.val_loss\")", text);
	if ((p[0] == '<' || p[0] == '>') && p[1] == '=') {
		memcpy(g->op, p, 2);
		p += 2;
	} else if (p[0] == '<' || p[0] == '>') {
		g->op[0] = p[0];
		p++;
	} else {
		return gp_err_set(err, GP_ERR_INVALID,
				  "promote_if \"%s\": expected <, <=, > or >= after \"%s\"", text,
				  g->metric);
	}
	p = skip(p);
	char *end = NULL;
	double v = strtod(p, &end);
	if (end != p && isfinite(v)) {
		g->number = v;
		p = skip(end);
	} else {
		p = ident(p, g->alias, sizeof(g->alias));
		if (!g->alias[0] || *p != '.')
			return gp_err_set(err, GP_ERR_INVALID,
					  "promote_if \"%s\": expected a number or ALIAS.METRIC after "
					  "\"%s\"", text, g->op);
		p = skip(ident(p + 1, g->other_metric, sizeof(g->other_metric)));
		if (!g->other_metric[0])
			return gp_err_set(err, GP_ERR_INVALID,
					  "promote_if \"%s\": a metric name must follow \"%s.\"", text,
					  g->alias);
		g->against_alias = 1;
	}
	if (*p)
		return gp_err_set(err, GP_ERR_INVALID, "promote_if \"%s\": unexpected \"%s\"", text, p);
	return GP_OK;
}

int gp_gate_eval(const struct gp_gate *g, double cand, double ref)
{
	if (g->always)
		return 1;
	if (!g->against_alias)
		ref = g->number;
	if (!isfinite(cand) || !isfinite(ref))
		return 0;
	if (!strcmp(g->op, "<"))
		return cand < ref;
	if (!strcmp(g->op, "<="))
		return cand <= ref;
	if (!strcmp(g->op, ">"))
		return cand > ref;
	return cand >= ref;
}

static double metric_of(const char *json, const char *name)
{
	cJSON *j = json ? cJSON_Parse(json) : NULL;
	cJSON *v = cJSON_GetObjectItemCaseSensitive(j, name);
	double d = cJSON_IsNumber(v) && v->valuedouble >= 0 ? v->valuedouble : NAN;
	cJSON_Delete(j);
	return d;
}

/* ---- canary ---- */

struct canary_opts {
	double fraction;
	long long duration_ms;
	double max_error_rate;
	long long min_requests;
	double max_latency_ratio;
};

static gp_status canary_parse(const cJSON *c, struct canary_opts *o, struct gp_err *err)
{
	const char *dur = NULL;
	if (!cJSON_IsObject(c))
		return gp_err_set(err, GP_ERR_INVALID, "with.canary must be a map (fraction, duration, "
				  "max_error_rate, min_requests, max_latency_ratio)");
	gp_status st;
	if ((st = gp_param_number(c, "with.canary", "fraction", 0.1, 1e-6, 0.999999, &o->fraction,
				  err)) ||
	    (st = gp_param_string(c, "with.canary", "duration", "60s", 32, &dur, err)) ||
	    (st = gp_param_number(c, "with.canary", "max_error_rate", 0.01, 0, 1, &o->max_error_rate,
				  err)) ||
	    (st = gp_param_int(c, "with.canary", "min_requests", 1, 0, 1LL << 40, &o->min_requests,
			       err)) ||
	    (st = gp_param_number(c, "with.canary", "max_latency_ratio", 2.0, 1, 1e6,
				  &o->max_latency_ratio, err)))
		return st;
	o->duration_ms = gp_spec_parse_duration(dur);
	if (o->duration_ms < 0 || o->duration_ms > 24LL * 3600 * 1000)
		return gp_err_set(err, GP_ERR_INVALID, "with.canary.duration \"%s\" is not a duration "
				  "up to 24h", dur);
	return GP_OK;
}

#define CANARY_LAT_MAX 20000
struct version_stats {
	long long version, requests, errors;
	double lat[CANARY_LAT_MAX];
	int nlat;
};

struct canary_count {
	struct version_stats *cand, *stable;
};

static int canary_event(const gp_telemetry *t, unsigned long long seq, void *closure)
{
	(void)seq;
	struct canary_count *c = closure;
	struct version_stats *v = t->model_version == c->cand->version     ? c->cand
				  : t->model_version == c->stable->version ? c->stable
									   : NULL;
	if (!v)
		return 0;
	v->requests++;
	/* refusals for load (busy) are not the version's fault; anything else is */
	if (t->error_code && *t->error_code && strcmp(t->error_code, "busy") &&
	    strcmp(t->error_code, "bad_request"))
		v->errors++;
	else if (!t->cache_hit && v->nlat < CANARY_LAT_MAX && t->output_tokens > 0)
		v->lat[v->nlat++] = t->latency_ms / t->output_tokens;
	return 0;
}

static int cmp_d(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
	if (!n)
		return NAN;
	qsort(v, (size_t)n, sizeof(double), cmp_d);
	return v[n / 2];
}

/*
 * Run the canary: route o->fraction of the alias's requests to version,
 * wait o->duration_ms (heartbeats go on), then judge from the telemetry
 * stream. *promote and reason/figures get the verdict; 1 is returned when
 * the job must stop (lease lost or shutdown; the canary stays for the next
 * attempt, which resumes its window).
 */
static int canary_run(struct gp_job *job, struct gp_db *db, struct gp_bus *bus, const char *model,
		      const char *alias, long long version, long long current,
		      const struct canary_opts *o, int *promote, char *reason, size_t rlen,
		      cJSON *figures, struct gp_err *err)
{
	const gp_stage_job *msg = gp_job_msg(job);
	long long started = 0;
	if (gp_registry_set_canary(db, model, alias, version, o->fraction, msg->run_id, msg->stage,
				   &started, err))
		return -1;
	gp_info("canary %s:%lld on %.0f%% of %s@%s for %lld ms", model, version, 100 * o->fraction,
		model, alias, o->duration_ms);
	for (;;) {
		long long left = started + o->duration_ms - gp_wall_ms();
		if (left <= 0)
			break;
		int stop = gp_job_should_stop(job);
		if (stop) {
			if (stop == 2)
				gp_job_release(job, "shutting down during the canary");
			return 1;
		}
		char m[160];
		snprintf(m, sizeof(m), "canary %s:%lld on %.0f%% of requests, %lld s left", model,
			 version, 100 * o->fraction, (left + 999) / 1000);
		gp_job_progress(job, 1.0 - (double)left / (double)(o->duration_ms ? o->duration_ms : 1),
				m, NULL);
		gp_sleep_ms(left < 500 ? left : 500);
	}
	/* events of the window's last moments are still lingering in the service */
	gp_sleep_ms(300);
	struct version_stats *cand = calloc(1, sizeof(*cand)), *stable = calloc(1, sizeof(*stable));
	if (!cand || !stable) {
		free(cand);
		free(stable);
		gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		return -1;
	}
	cand->version = version;
	stable->version = current;
	struct canary_count cc = {cand, stable};
	if (gp_telemetry_scan(bus, model, started, 2000000, canary_event, &cc, err)) {
		free(cand);
		free(stable);
		return -1;
	}
	double cer = cand->requests ? (double)cand->errors / (double)cand->requests : 0;
	double ser = stable->requests ? (double)stable->errors / (double)stable->requests : 0;
	double cl = median(cand->lat, cand->nlat), sl = median(stable->lat, stable->nlat);
	cJSON *cj = cJSON_AddObjectToObject(figures, "canary");
	cJSON_AddNumberToObject(cj, "fraction", o->fraction);
	cJSON_AddNumberToObject(cj, "duration_ms", (double)o->duration_ms);
	cJSON_AddNumberToObject(cj, "candidate_requests", (double)cand->requests);
	cJSON_AddNumberToObject(cj, "candidate_errors", (double)cand->errors);
	cJSON_AddNumberToObject(cj, "stable_requests", (double)stable->requests);
	cJSON_AddNumberToObject(cj, "stable_errors", (double)stable->errors);
	if (isfinite(cl))
		cJSON_AddNumberToObject(cj, "candidate_ms_per_token_p50", cl);
	if (isfinite(sl))
		cJSON_AddNumberToObject(cj, "stable_ms_per_token_p50", sl);
	if (cand->requests < o->min_requests) {
		*promote = 0;
		snprintf(reason, rlen, "canary rolled back: %lld requests reached version %lld, fewer "
			 "than min_requests %lld", cand->requests, version, o->min_requests);
	} else if (cer > o->max_error_rate) {
		*promote = 0;
		snprintf(reason, rlen, "canary rolled back: error rate %.3f on version %lld (%lld of "
			 "%lld) over max_error_rate %.3f (stable version %lld: %.3f)", cer, version,
			 cand->errors, cand->requests, o->max_error_rate, current, ser);
	} else if (isfinite(cl) && isfinite(sl) && cand->nlat >= 5 && stable->nlat >= 5 &&
		   cl > o->max_latency_ratio * sl) {
		*promote = 0;
		snprintf(reason, rlen, "canary rolled back: %.2f ms a token on version %lld against "
			 "%.2f on version %lld, over max_latency_ratio %.2f", cl, version, sl, current,
			 o->max_latency_ratio);
	} else {
		*promote = 1;
		snprintf(reason, rlen, "canary passed: %lld requests to version %lld, error rate %.3f "
			 "(max %.3f), stable version %lld %lld requests, error rate %.3f",
			 cand->requests, version, cer, o->max_error_rate, current, stable->requests, ser);
	}
	free(cand);
	free(stable);
	return 0;
}

/* ---- the gate on new data ---- */

struct data_gate {
	char data[65];      /* dataset manifest hash */
	double margin, tolerance;
	long long max_bytes;
};

static gp_status data_gate_parse(const cJSON *g, struct data_gate *o, struct gp_err *err)
{
	const char *ref = NULL;
	gp_status st;
	if (!cJSON_IsObject(g))
		return gp_err_set(err, GP_ERR_INVALID,
				  "with.gate must be a map (data, margin, tolerance, max_bytes)");
	if ((st = gp_param_string(g, "with.gate", "data", NULL, 80, &ref, err)) ||
	    (st = gp_param_number(g, "with.gate", "margin", 0.1, -1e9, 1, &o->margin, err)) ||
	    (st = gp_param_number(g, "with.gate", "tolerance", 0.05, 0, 1e9, &o->tolerance, err)) ||
	    (st = gp_param_int(g, "with.gate", "max_bytes", 200000, 1000, 1LL << 30, &o->max_bytes,
			       err)))
		return st;
	if (gp_artifact_ref_parse(ref, o->data))
		return gp_err_set(err, GP_ERR_INVALID,
				  "with.gate.data must be a dataset reference (sha256:...)");
	return GP_OK;
}

struct gate_side {
	struct gp_model *model;
	struct gp_bpe *tok;
	char val[65];       /* its lineage's validation shard */
};

static gp_status gate_load(struct gp_db *db, struct gp_store *store, const char *model,
			   long long version, struct gate_side *g, struct gp_err *err)
{
	struct gp_model_ref ref = {0};
	char vs[32];
	gp_status st = gp_registry_resolve(db, model, NULL, version, &ref, err);
	if (!st)
		st = gp_registry_load(store, model, &ref, &g->model, &g->tok, err);
	if (st)
		return st;
	snprintf(vs, sizeof(vs), "%lld", ref.version_id);
	const char *p[] = {vs};
	PGresult *r = NULL;
	g->val[0] = 0;
	if (!gp_db_exec(db, "read lineage", "SELECT coalesce(lineage->>'val_shards', '') FROM "
			"model_versions WHERE id = $1::bigint", 1, p, &r, err) && PQntuples(r))
		gp_artifact_ref_parse(PQgetvalue(r, 0, 0), g->val);
	PQclear(r);
	return GP_OK;
}

/*
 * The gate on new data: the candidate must lower the loss per byte on the
 * new data (the feedback and drift set) by margin, relative to the current
 * version, and lose no more than tolerance on the current version's own
 * validation text. Loss per byte, not per token: the two versions may have
 * different tokenizers. *pass and reason/figures get the verdict.
 */
static gp_status data_gate_run(struct gp_db *db, struct gp_store *store, const char *model,
			       long long version, long long current, const struct data_gate *dg,
			       int *pass, char *reason, size_t rlen, cJSON *figures,
			       struct gp_err *err)
{
	struct gate_side cand = {0}, cur = {0};
	uint8_t *mtext = NULL, *data = NULL, *shard = NULL;
	size_t mlen = 0, dlen = 0, slen = 0;
	struct gp_manifest man = {0};
	struct gp_buf nd = {0};
	uint8_t *vt = NULL;
	size_t vl = 0;
	gp_status st = gate_load(db, store, model, version, &cand, err);
	if (!st)
		st = gate_load(db, store, model, current, &cur, err);
	if (!st && ((st = gp_store_get(store, dg->data, GP_MANIFEST_MAX, &mtext, &mlen, err)) ||
		    (st = gp_manifest_parse((const char *)mtext, mlen, &man, err)) ||
		    (st = gp_store_get(store, man.data, (size_t)1 << 30, &data, &dlen, err))))
		gp_err_wrap(err, "with.gate.data");
	/* the new data: its documents, one after another, up to max_bytes */
	struct gp_dataset_reader rd;
	if (!st && !(st = gp_dataset_open(&rd, data, dlen, err))) {
		for (int more = 1; !st && nd.len < (size_t)dg->max_bytes;) {
			struct gp_doc d;
			if ((st = gp_dataset_next(&rd, &d, &more, err)) || !more)
				break;
			size_t take = d.len < (size_t)dg->max_bytes - nd.len ? d.len
									    : (size_t)dg->max_bytes - nd.len;
			st = gp_buf_append(&nd, d.text, take, err);
		}
	}
	/* the current version's validation text, decoded from its shard */
	if (!st && !cur.val[0])
		st = gp_err_set(err, GP_ERR_NOT_FOUND,
				"%s version %lld records no validation shards to hold the candidate to",
				model, current);
	const uint8_t *raw = NULL;
	size_t nt = 0;
	if (!st && !(st = gp_store_get(store, cur.val, (size_t)1 << 30, &shard, &slen, err)) &&
	    !(st = gp_shard_parse(shard, slen, gp_model_config(cur.model)->vocab, &raw, &nt, err))) {
		size_t keep = nt < (size_t)dg->max_bytes / 2 ? nt : (size_t)dg->max_bytes / 2;
		uint16_t *ids = malloc((keep ? keep : 1) * sizeof(uint16_t));
		if (!ids) {
			st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		} else {
			for (size_t i = 0; i < keep; i++)
				ids[i] = gp_shard_token(raw, i);
			st = gp_bpe_decode(cur.tok, ids, keep, &vt, &vl, err);
			free(ids);
			if (!st && vl > (size_t)dg->max_bytes)
				vl = (size_t)dg->max_bytes;
		}
	}
	if (!st) {
		const char *ndt = (const char *)nd.p, *vtt = (const char *)vt;
		double cn = gp_text_nats_per_byte(cand.model, cand.tok, ndt, nd.len, err);
		double un = gp_text_nats_per_byte(cur.model, cur.tok, ndt, nd.len, err);
		double cv = gp_text_nats_per_byte(cand.model, cand.tok, vtt, vl, err);
		double uv = gp_text_nats_per_byte(cur.model, cur.tok, vtt, vl, err);
		if (!isfinite(cn) || !isfinite(un) || !isfinite(cv) || !isfinite(uv) || un <= 0 ||
		    uv <= 0) {
			st = gp_err_set(err, GP_ERR_INVALID,
					"the gate's texts are too short to measure (new data %zu bytes, "
					"validation %zu bytes)", nd.len, vl);
		} else {
			double gain = (un - cn) / un, change = (cv - uv) / uv;
			*pass = gain >= dg->margin && change <= dg->tolerance;
			snprintf(reason, rlen,
				 "new data: %.4f -> %.4f nats/byte (%+.1f%%, needs at least %.1f%% "
				 "better); original validation: %.4f -> %.4f (%+.1f%%, tolerance %.1f%%): "
				 "%s",
				 un, cn, -100 * gain, 100 * dg->margin, uv, cv, 100 * change,
				 100 * dg->tolerance, *pass ? "passed" : "failed");
			cJSON *gj = cJSON_AddObjectToObject(figures, "gate");
			cJSON_AddNumberToObject(gj, "new_data_bytes", (double)nd.len);
			cJSON_AddNumberToObject(gj, "validation_bytes", (double)vl);
			cJSON_AddNumberToObject(gj, "candidate_new", cn);
			cJSON_AddNumberToObject(gj, "current_new", un);
			cJSON_AddNumberToObject(gj, "candidate_validation", cv);
			cJSON_AddNumberToObject(gj, "current_validation", uv);
			cJSON_AddNumberToObject(gj, "margin", dg->margin);
			cJSON_AddNumberToObject(gj, "tolerance", dg->tolerance);
		}
	}
	gp_model_destroy(cand.model);
	gp_model_destroy(cur.model);
	gp_bpe_free(cand.tok);
	gp_bpe_free(cur.tok);
	gp_manifest_free(&man);
	free(mtext);
	free(data);
	free(shard);
	free(nd.p);
	free(vt);
	return st;
}

void gp_deploy_handle(struct gp_job *job, void *closure)
{
	struct gp_deploy_config *dc = closure;
	const gp_stage_job *msg = gp_job_msg(job);
	struct gp_db *db = gp_job_db(job);
	struct gp_err err = {0};
	cJSON *params = cJSON_Parse(msg->params_json);
	const char *model = NULL, *alias = NULL, *gate_text = NULL;
	long long version = 0;
	PGresult *r = NULL;
	char *outputs = NULL, *figures_text = NULL;
	cJSON *out = NULL, *figures = NULL;
	struct gp_gate gate;
	if (!cJSON_IsObject(params)) {
		gp_job_fail(job, 1, "params are not a JSON object");
		goto done;
	}
	if (gp_param_string(params, "with", "model", NULL, 63, &model, &err) ||
	    gp_param_int(params, "with", "version", 0, 1, 1LL << 31, &version, &err) ||
	    gp_param_string(params, "with", "alias", "production", 63, &alias, &err) ||
	    gp_param_string(params, "with", "promote_if", "always", 256, &gate_text, &err) ||
	    gp_gate_parse(gate_text, &gate, &err)) {
		gp_job_fail(job, 1, err.msg);
		goto done;
	}
	if (!gp_bus_token_ok(model) || !gp_bus_token_ok(alias)) {
		gp_job_fail(job, 1, "with.model and with.alias must be DNS labels");
		goto done;
	}
	struct canary_opts copts = {0};
	const cJSON *cjs = cJSON_GetObjectItemCaseSensitive(params, "canary");
	if (cjs && canary_parse(cjs, &copts, &err)) {
		gp_job_fail(job, 1, err.msg);
		goto done;
	}
	struct data_gate dgate = {0};
	const cJSON *gjs = cJSON_GetObjectItemCaseSensitive(params, "gate");
	if (gjs && data_gate_parse(gjs, &dgate, &err)) {
		gp_job_fail(job, 1, err.msg);
		goto done;
	}
	if (gate.against_alias && strcmp(gate.alias, alias)) {
		snprintf(err.msg, sizeof(err.msg),
			 "with.promote_if compares with \"%s\" but the stage moves \"%s\"", gate.alias,
			 alias);
		gp_job_fail(job, 1, err.msg);
		goto done;
	}
	char ver[32], run[32];
	snprintf(ver, sizeof(ver), "%lld", version);
	snprintf(run, sizeof(run), "%lld", (long long)msg->run_id);
	/* a decision already recorded (a redelivered job) is the answer */
	const char *dp[] = {run, msg->stage};
	if (gp_db_exec(db, "read deploy decision",
		       "SELECT promoted, reason, figures::text FROM deploy_decisions "
		       "WHERE run_id = $1::bigint AND stage = $2", 2, dp, &r, &err)) {
		gp_job_fail(job, 0, err.msg);
		goto done;
	}
	int have = PQntuples(r) > 0;
	PQclear(r);
	r = NULL;
	const char *p[] = {model, ver, alias};
	if (gp_db_exec(db, "read versions",
		       "SELECT v.id, v.metrics::text, cv.version, cv.metrics::text "
		       "FROM models m JOIN model_versions v ON v.model_id = m.id AND v.version = $2::int "
		       "LEFT JOIN model_aliases a ON a.model_id = m.id AND a.alias = $3 "
		       "LEFT JOIN model_versions cv ON cv.id = a.model_version_id WHERE m.name = $1",
		       3, p, &r, &err)) {
		gp_job_fail(job, 0, err.msg);
		goto done;
	}
	if (PQntuples(r) == 0) {
		snprintf(err.msg, sizeof(err.msg), "model \"%s\" has no version %lld", model, version);
		gp_job_fail(job, 1, err.msg);
		goto done;
	}
	long long vid = atoll(PQgetvalue(r, 0, 0));
	long long current = PQgetisnull(r, 0, 2) ? 0 : atoll(PQgetvalue(r, 0, 2));
	double cand = metric_of(PQgetvalue(r, 0, 1), gate.metric[0] ? gate.metric : "val_loss");
	double ref = current ? metric_of(PQgetvalue(r, 0, 3),
					 gate.against_alias ? gate.other_metric : "val_loss")
			     : NAN;
	int promote;
	char reason[1400];
	if (!current) {
		promote = 1;
		snprintf(reason, sizeof(reason), "first version behind %s@%s", model, alias);
	} else if (current == version) {
		promote = 1;
		snprintf(reason, sizeof(reason), "%s@%s already names version %lld", model, alias,
			 version);
	} else {
		promote = gp_gate_eval(&gate, cand, ref);
		if (gate.always)
			snprintf(reason, sizeof(reason), "promote_if always");
		else
			snprintf(reason, sizeof(reason), "%s %.5g %s %s %.5g (%s): %s", gate.metric,
				 cand, gate.op, gate.against_alias ? "current" : "threshold",
				 gate.against_alias ? ref : gate.number, gate_text,
				 promote ? "passed" : "failed");
	}
	figures = cJSON_CreateObject();
	cJSON_AddNumberToObject(figures, "candidate_version", (double)version);
	if (current)
		cJSON_AddNumberToObject(figures, "current_version", (double)current);
	if (isfinite(cand))
		cJSON_AddNumberToObject(figures, "candidate", cand);
	if (isfinite(ref))
		cJSON_AddNumberToObject(figures, "current", ref);
	cJSON_AddStringToObject(figures, "gate", gate_text);
	if (promote && gjs && current && current != version && !have) {
		char why[700];
		if (data_gate_run(db, dc->store, model, version, current, &dgate, &promote, why,
				  sizeof(why), figures, &err)) {
			gp_job_fail(job, err.status == GP_ERR_IO || err.status == GP_ERR_DB ||
						 err.status == GP_ERR_NOMEM ? 0 : 1,
				    err.msg);
			goto done;
		}
		size_t rl = strlen(reason);
		snprintf(reason + rl, sizeof(reason) - rl, "; %s", why);
	}
	if (promote && cjs && current && current != version && !have) {
		int rc = canary_run(job, db, dc->bus, model, alias, version, current, &copts, &promote,
				    reason, sizeof(reason), figures, &err);
		if (rc > 0)
			goto done;
		if (rc < 0) {
			gp_job_fail(job, err.status == GP_ERR_NOT_FOUND, err.msg);
			goto done;
		}
		if (!promote && gp_registry_clear_canary(db, model, alias, reason, &err)) {
			gp_job_fail(job, 0, err.msg);
			goto done;
		}
	}
	figures_text = cJSON_PrintUnformatted(figures);
	if (promote && current != version && !have) {
		char extra[700];
		snprintf(extra, sizeof(extra), "{\"run_id\": %lld, \"stage\": \"%s\"}",
			 (long long)msg->run_id, msg->stage);
		long long from = 0;
		if (gp_registry_move_alias(db, model, alias, version, "deploy", extra, &from, &err) ||
		    (cjs && gp_registry_clear_canary(db, model, alias, "promoted", &err))) {
			gp_job_fail(job, err.status != GP_ERR_NOT_FOUND ? 0 : 1, err.msg);
			goto done;
		}
	}
	char vids[32];
	snprintf(vids, sizeof(vids), "%lld", vid);
	const char *ip[] = {run, msg->stage, vids, alias, promote ? "true" : "false", reason,
			    figures_text ? figures_text : "{}"};
	if (gp_db_exec(db, "record deploy decision",
		       "INSERT INTO deploy_decisions (run_id, stage, model_version_id, alias, promoted, "
		       "reason, figures) VALUES ($1::bigint, $2, $3::bigint, $4, $5::boolean, $6, "
		       "$7::jsonb) ON CONFLICT (run_id, stage) DO NOTHING",
		       7, ip, NULL, &err)) {
		gp_job_fail(job, 0, err.msg);
		goto done;
	}
	gp_info("deploy %s:%lld -> %s: %s (%s)", model, version, alias,
		promote ? "promoted" : "kept", reason);
	out = cJSON_CreateObject();
	cJSON_AddBoolToObject(out, "promoted", promote);
	cJSON_AddNumberToObject(out, "version", (double)version);
	cJSON_AddNumberToObject(out, "previous", (double)current);
	cJSON_AddStringToObject(out, "alias", alias);
	cJSON_AddStringToObject(out, "reason", reason);
	outputs = cJSON_PrintUnformatted(out);
	gp_job_succeed(job, outputs, figures_text);
done:
	PQclear(r);
	cJSON_Delete(params);
	cJSON_Delete(out);
	cJSON_Delete(figures);
	free(outputs);
	free(figures_text);
}

/* ---- batch-infer ---- */

struct bslot {
	char *text;
	size_t len;
	int output_tokens;
	const char *finish;
	char error[200];
	int done;
};

struct bstate {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int finished;
	long long tokens;
};

struct bctx {
	struct bstate *b;
	struct bslot *slot;
};

static void batch_done(void *cl, const struct gp_gen_result *r)
{
	struct bctx *c = cl;
	struct bslot *s = c->slot;
	s->text = malloc(r->len + 1);
	if (s->text) {
		memcpy(s->text, r->text, r->len);
		s->text[r->len] = 0;
		s->len = r->len;
	}
	s->output_tokens = r->output_tokens;
	s->finish = r->error_code ? NULL : gp_finish_str(r->finish);
	if (r->error_code)
		snprintf(s->error, sizeof(s->error), "%s: %s", r->error_code, r->error ? r->error : "");
	pthread_mutex_lock(&c->b->mu);
	s->done = 1;
	c->b->finished++;
	c->b->tokens += r->output_tokens;
	pthread_cond_signal(&c->b->cv);
	pthread_mutex_unlock(&c->b->mu);
}

void gp_batch_infer_handle(struct gp_job *job, void *closure)
{
	struct gp_batch_infer_config *cfg = closure;
	const gp_stage_job *msg = gp_job_msg(job);
	struct gp_db *db = gp_job_db(job);
	struct gp_err err = {0};
	cJSON *params = cJSON_Parse(msg->params_json);
	const char *model = NULL, *alias = NULL, *dataset = NULL;
	long long version = 0, max_tokens = 0, top_k = 0, seed = 0, max_prompts = 0;
	double temperature = 0, top_p = 1;
	uint8_t *mtext = NULL, *data = NULL;
	size_t mlen = 0, dlen = 0;
	struct gp_manifest man = {0};
	struct gp_lm *lm = NULL;
	struct gp_engine *eng = NULL;
	struct bslot *slots = NULL;
	struct bctx *ctxs = NULL;
	char **prompts = NULL;
	size_t *plen = NULL;
	long long n = 0;
	struct gp_buf out = {0};
	char *outputs = NULL;
	struct bstate bs = {.finished = 0};
	pthread_mutex_init(&bs.mu, NULL);
	pthread_cond_init(&bs.cv, NULL);
	if (!cJSON_IsObject(params)) {
		gp_job_fail(job, 1, "params are not a JSON object");
		goto done;
	}
	char dhash[65];
	if (gp_param_string(params, "with", "model", NULL, 63, &model, &err) ||
	    gp_param_int(params, "with", "version", 0, 0, 1LL << 31, &version, &err) ||
	    gp_param_string(params, "with", "alias", "production", 63, &alias, &err) ||
	    gp_param_string(params, "with", "dataset", NULL, 80, &dataset, &err) ||
	    gp_param_int(params, "with", "max_tokens", 64, 1, 4096, &max_tokens, &err) ||
	    gp_param_number(params, "with", "temperature", 0, 0, 100, &temperature, &err) ||
	    gp_param_int(params, "with", "top_k", 0, 0, 1 << 20, &top_k, &err) ||
	    gp_param_number(params, "with", "top_p", 1, 0, 1, &top_p, &err) ||
	    gp_param_int(params, "with", "seed", 0, 0, 1LL << 53, &seed, &err) ||
	    gp_param_int(params, "with", "max_prompts", 10000, 1, 1000000, &max_prompts, &err)) {
		gp_job_fail(job, 1, err.msg);
		goto done;
	}
	if (!gp_bus_token_ok(model) || !gp_bus_token_ok(alias) ||
	    gp_artifact_ref_parse(dataset, dhash)) {
		gp_job_fail(job, 1, "with.model and with.alias must be DNS labels, with.dataset an "
				    "artifact reference (sha256:...)");
		goto done;
	}
	struct gp_model_ref ref = {0};
	struct gp_model *mm = NULL;
	struct gp_bpe *bt = NULL;
	gp_status st = gp_registry_resolve(db, model, alias, version, &ref, &err);
	if (!st)
		st = gp_registry_load(cfg->store, model, &ref, &mm, &bt, &err);
	if (!st && (st = gp_lm_wrap(&lm, model, ref.version, ref.version_id, mm, bt, &err))) {
		gp_model_destroy(mm);
		gp_bpe_free(bt);
	}
	if (st) {
		gp_job_fail(job, st == GP_ERR_NOT_FOUND || st == GP_ERR_INVALID, err.msg);
		goto done;
	}
	if ((st = gp_store_get(cfg->store, dhash, GP_MANIFEST_MAX, &mtext, &mlen, &err)) ||
	    (st = gp_manifest_parse((const char *)mtext, mlen, &man, &err)) ||
	    (st = gp_store_get(cfg->store, man.data, (size_t)1 << 30, &data, &dlen, &err))) {
		gp_err_wrap(&err, "with.dataset");
		gp_job_fail(job, st == GP_ERR_NOT_FOUND || st == GP_ERR_INVALID, err.msg);
		goto done;
	}
	struct gp_dataset_reader rd;
	if ((st = gp_dataset_open(&rd, data, dlen, &err))) {
		gp_job_fail(job, 1, err.msg);
		goto done;
	}
	long long cap = man.documents < max_prompts ? man.documents : max_prompts;
	prompts = calloc((size_t)cap + 1, sizeof(*prompts));
	plen = calloc((size_t)cap + 1, sizeof(*plen));
	slots = calloc((size_t)cap + 1, sizeof(*slots));
	ctxs = calloc((size_t)cap + 1, sizeof(*ctxs));
	if (!prompts || !plen || !slots || !ctxs) {
		gp_job_fail(job, 0, "out of memory");
		goto done;
	}
	for (int more = 1; n < cap;) {
		struct gp_doc d;
		if ((st = gp_dataset_next(&rd, &d, &more, &err))) {
			gp_job_fail(job, 1, err.msg);
			goto done;
		}
		if (!more)
			break;
		prompts[n] = (char *)d.text;
		plen[n] = d.len;
		n++;
	}
	struct gp_engine_config ec = {.slots = cfg->slots > 0 ? cfg->slots : 32,
				      .queue = (int)n + 1,
				      .max_new_tokens = (int)max_tokens,
				      .default_deadline_ms = 3600000,
				      .max_deadline_ms = 3600000,
				      .path = GP_MODEL_FAST,
				      .use_gpu = cfg->use_gpu};
	if ((st = gp_engine_create(&eng, &ec, &err))) {
		gp_job_fail(job, 0, err.msg);
		goto done;
	}
	long long t0 = gp_now_ms(), last = t0;
	for (long long i = 0; i < n; i++) {
		struct gp_gen_params p = {
			.prompt = prompts[i], .prompt_len = plen[i],
			.sample = {.temperature = (float)temperature, .top_k = (int)top_k,
				   .top_p = (float)top_p, .seed = (uint64_t)seed + (uint64_t)i},
			.has_seed = 1, .max_tokens = (int)max_tokens, .no_cache = 1,
		};
		const char *code = NULL;
		ctxs[i] = (struct bctx){&bs, &slots[i]};
		if (gp_engine_submit(eng, lm, &p, NULL, batch_done, &ctxs[i], &code, &err)) {
			/* a prompt the model cannot take is an entry, not a failed stage */
			snprintf(slots[i].error, sizeof(slots[i].error), "%s: %s", code, err.msg);
			pthread_mutex_lock(&bs.mu);
			slots[i].done = 1;
			bs.finished++;
			pthread_mutex_unlock(&bs.mu);
		}
	}
	for (;;) {
		pthread_mutex_lock(&bs.mu);
		struct timespec ts;
		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_sec += 1;
		if (bs.finished < n)
			pthread_cond_timedwait(&bs.cv, &bs.mu, &ts);
		int fin = bs.finished;
		long long toks = bs.tokens;
		pthread_mutex_unlock(&bs.mu);
		if (fin >= n)
			break;
		int stop = gp_job_should_stop(job);
		if (stop) {
			gp_engine_destroy(eng); /* ends the rest: every callback has run */
			eng = NULL;
			if (stop == 2)
				gp_job_release(job, "shutting down");
			goto done;
		}
		if (gp_now_ms() - last >= 1000) {
			last = gp_now_ms();
			char m[160];
			double secs = (double)(last - t0) / 1000;
			snprintf(m, sizeof(m), "%d of %lld prompts, %.0f tokens/s", fin, n,
				 secs > 0 ? (double)toks / secs : 0);
			gp_job_progress(job, n ? (double)fin / (double)n : 1, m, NULL);
		}
	}
	gp_engine_destroy(eng);
	eng = NULL;
	double secs = (double)(gp_now_ms() - t0) / 1000;
	long long errors = 0;
	for (long long i = 0; i < n; i++) {
		cJSON *o = cJSON_CreateObject();
		cJSON_AddNumberToObject(o, "index", (double)i);
		char *line = NULL, *pclean = gp_utf8_repaired(prompts[i], plen[i], NULL);
		if (pclean)
			cJSON_AddStringToObject(o, "prompt", pclean);
		free(pclean);
		cJSON_AddStringToObject(o, "completion", slots[i].text ? slots[i].text : "");
		cJSON_AddNumberToObject(o, "output_tokens", slots[i].output_tokens);
		if (slots[i].error[0]) {
			cJSON_AddStringToObject(o, "error", slots[i].error);
			errors++;
		} else {
			cJSON_AddStringToObject(o, "finish", slots[i].finish ? slots[i].finish : "");
		}
		line = cJSON_PrintUnformatted(o);
		cJSON_Delete(o);
		if (!line || gp_buf_append(&out, line, strlen(line), &err) ||
		    gp_buf_append(&out, "\n", 1, &err)) {
			free(line);
			gp_job_fail(job, 0, "out of memory");
			goto done;
		}
		free(line);
	}
	char oh[65];
	char meta[200];
	snprintf(meta, sizeof(meta), "{\"format\": \"jsonl\", \"records\": %lld, \"model\": \"%s\", "
		 "\"version\": %lld}", n, model, ref.version);
	if ((st = gp_store_put(cfg->store, out.p ? out.p : (uint8_t *)"", out.len, oh, &err)) ||
	    (st = gp_artifact_register(db, cfg->store, oh, "completions", out.len, msg->run_id,
				       msg->stage, meta, &err))) {
		gp_job_fail(job, 0, err.msg);
		goto done;
	}
	cJSON *oj = cJSON_CreateObject();
	char refb[80];
	snprintf(refb, sizeof(refb), "sha256:%s", oh);
	cJSON_AddStringToObject(oj, "completions", refb);
	cJSON_AddNumberToObject(oj, "count", (double)n);
	cJSON_AddNumberToObject(oj, "errors", (double)errors);
	cJSON_AddNumberToObject(oj, "model_version", (double)ref.version);
	outputs = cJSON_PrintUnformatted(oj);
	cJSON_Delete(oj);
	char mj[200];
	snprintf(mj, sizeof(mj), "{\"prompts\": %lld, \"errors\": %lld, \"tokens\": %lld, "
		 "\"tokens_per_second\": %.1f, \"seconds\": %.2f}", n, errors, bs.tokens,
		 secs > 0 ? (double)bs.tokens / secs : 0, secs);
	gp_job_succeed(job, outputs, mj);
done:
	gp_engine_destroy(eng);
	for (long long i = 0; slots && i < n; i++)
		free(slots[i].text);
	free(slots);
	free(ctxs);
	free(prompts);
	free(plen);
	free(out.p);
	free(outputs);
	free(mtext);
	free(data);
	gp_manifest_free(&man);
	gp_lm_unref(lm);
	cJSON_Delete(params);
	pthread_mutex_destroy(&bs.mu);
	pthread_cond_destroy(&bs.cv);
}
