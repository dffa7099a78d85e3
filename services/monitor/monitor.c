/*
 * monitor.c: the monitor stage and the drift windows (see monitor.h).
 */
#include "monitor.h"

#include <cjson/cJSON.h>
#include <curl/curl.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "db.h"
#include "drift.h"
#include "log.h"
#include "model.h"
#include "outbox.h"
#include "params.h"
#include "registry.h"
#include "shard.h"
#include "spec.h"
#include "subjects.h"
#include "wire.h"

#define MAX_MONITORS 64
#define MAX_VERSIONS 8
#define EMB_SEQS 8
/* AckWait of the telemetry consumers: open windows renew it (AckProgress)
 * every third of it, so a monitor that dies has its events back soon. */
#define ACK_WAIT_MS 10000
/* Alert webhooks waiting to be sent; past it they are dropped (counted). */
#define HOOK_QUEUE 256
#define HOOK_TRIES 4

/* ---- configuration ---- */

struct mcfg {
	long long window, window_ms, loss_sample, bins, min_alert;
	double psi, js, ppl_ratio, emb, err_rate;
	char webhook[512];   /* "" : none */
};

static gp_status parse_cfg(const cJSON *o, const char *prefix, struct mcfg *c, struct gp_err *err)
{
	const char *wt = "5m";
	gp_status st;
	/* a duration: text ("5m"), or milliseconds (the spec's normal form, the stored config) */
	const cJSON *wtj = cJSON_GetObjectItemCaseSensitive(o, "window_time");
	const cJSON *ms = cJSON_GetObjectItemCaseSensitive(o, "window_time_ms");
	if (cJSON_IsNumber(wtj))
		ms = wtj;
	else if (wtj && (st = gp_param_string(o, prefix, "window_time", "5m", 32, &wt, err)))
		return st;
	if ((st = gp_param_int(o, prefix, "window", 500, 10, 1000000, &c->window, err)) ||
	    (st = gp_param_number(o, prefix, "psi_threshold", 0.2, 0, 100, &c->psi, err)) ||
	    (st = gp_param_number(o, prefix, "js_threshold", 0.1, 0, 1, &c->js, err)) ||
	    (st = gp_param_number(o, prefix, "perplexity_ratio", 2.0, 1, 1e9, &c->ppl_ratio, err)) ||
	    (st = gp_param_number(o, prefix, "embedding_threshold", 0.2, 0, 2, &c->emb, err)) ||
	    (st = gp_param_number(o, prefix, "error_rate_threshold", 0.05, 0, 1, &c->err_rate,
				  err)) ||
	    (st = gp_param_int(o, prefix, "loss_sample", 64, 0, 4096, &c->loss_sample, err)) ||
	    (st = gp_param_int(o, prefix, "bins", 20, 2, GP_DRIFT_MAX_BINS, &c->bins, err)) ||
	    (st = gp_param_int(o, prefix, "min_alert_requests", 30, 1, 1000000, &c->min_alert, err)))
		return st;
	const char *hook = "";
	if ((st = gp_param_string(o, prefix, "webhook", "", 500, &hook, err)))
		return st;
	if (*hook && strncmp(hook, "http://", 7) && strncmp(hook, "https://", 8))
		return gp_err_set(err, GP_ERR_INVALID, "%s.webhook must be an http:// or https:// URL",
				  prefix);
	snprintf(c->webhook, sizeof c->webhook, "%s", hook);
	c->window_ms = cJSON_IsNumber(ms) ? (long long)ms->valuedouble : gp_spec_parse_duration(wt);
	if (c->window_ms < 100 || c->window_ms > 7LL * 24 * 3600 * 1000)
		return gp_err_set(err, GP_ERR_INVALID, "%s.window_time is not a duration from 100ms "
				  "to 7d", prefix);
	return GP_OK;
}

static cJSON *cfg_json(const struct mcfg *c)
{
	cJSON *o = cJSON_CreateObject();
	cJSON_AddNumberToObject(o, "window", (double)c->window);
	cJSON_AddNumberToObject(o, "window_time_ms", (double)c->window_ms);
	cJSON_AddNumberToObject(o, "psi_threshold", c->psi);
	cJSON_AddNumberToObject(o, "js_threshold", c->js);
	cJSON_AddNumberToObject(o, "perplexity_ratio", c->ppl_ratio);
	cJSON_AddNumberToObject(o, "embedding_threshold", c->emb);
	cJSON_AddNumberToObject(o, "error_rate_threshold", c->err_rate);
	cJSON_AddNumberToObject(o, "loss_sample", (double)c->loss_sample);
	cJSON_AddNumberToObject(o, "bins", (double)c->bins);
	cJSON_AddNumberToObject(o, "min_alert_requests", (double)c->min_alert);
	if (c->webhook[0])
		cJSON_AddStringToObject(o, "webhook", c->webhook);
	return o;
}

/* ---- the stage ---- */

void gp_monitor_stage_handle(struct gp_job *job, void *closure)
{
	struct gp_monitor_config *cfg = closure;
	const gp_stage_job *msg = gp_job_msg(job);
	struct gp_db *db = gp_job_db(job);
	struct gp_err err = {0};
	cJSON *params = cJSON_Parse(msg->params_json), *cj = NULL, *out = NULL;
	const char *model = NULL, *href = NULL;
	char *ctext = NULL, *otext = NULL, hash[65] = "";
	PGresult *r = NULL;
	struct mcfg c;
	if (!cJSON_IsObject(params)) {
		gp_job_fail(job, 1, "params are not a JSON object");
		goto done;
	}
	if (gp_param_string(params, "with", "model", NULL, 63, &model, &err) ||
	    gp_param_string(params, "with", "histogram", "", 80, &href, &err) ||
	    parse_cfg(params, "with", &c, &err)) {
		gp_job_fail(job, 1, err.msg);
		goto done;
	}
	if (!gp_bus_token_ok(model)) {
		gp_job_fail(job, 1, "with.model must be a DNS label");
		goto done;
	}
	if (*href && gp_artifact_ref_parse(href, hash)) {
		gp_job_fail(job, 1, "with.histogram must be an artifact reference (sha256:...)");
		goto done;
	}
	if (!*href) {
		/* the histogram preprocess made for the production version's training run */
		const char *p[] = {model};
		if (gp_db_exec(db, "find reference histogram",
			       "SELECT a.outputs->>'histogram' FROM models m "
			       "JOIN model_aliases al ON al.model_id = m.id AND al.alias = 'production' "
			       "JOIN model_versions v ON v.id = al.model_version_id "
			       "JOIN stage_attempts a ON a.run_id = v.run_id AND a.state = 'succeeded' "
			       "AND a.outputs ? 'histogram' WHERE m.name = $1 ORDER BY a.id DESC LIMIT 1",
			       1, p, &r, &err)) {
			gp_job_fail(job, 0, err.msg);
			goto done;
		}
		if (PQntuples(r) == 0 || gp_artifact_ref_parse(PQgetvalue(r, 0, 0), hash)) {
			snprintf(err.msg, sizeof(err.msg),
				 "with.histogram is not given and model \"%s\" has no production version "
				 "trained from a preprocess run with a histogram", model);
			gp_job_fail(job, 1, err.msg);
			goto done;
		}
	}
	/* the reference must be readable now, not when the first window closes */
	uint8_t *h = NULL;
	size_t hl = 0;
	struct gp_drift_ref ref;
	if (gp_store_get(cfg->store, hash, GP_DRIFT_MAX_REF_BYTES, &h, &hl, &err) ||
	    gp_drift_ref_parse((const char *)h, hl, "train", (int)c.bins, 0, 0, &ref, &err)) {
		free(h);
		gp_err_wrap(&err, "with.histogram");
		gp_job_fail(job, 1, err.msg);
		goto done;
	}
	free(h);
	gp_drift_ref_free(&ref);
	cj = cfg_json(&c);
	ctext = cJSON_PrintUnformatted(cj);
	char run[32];
	snprintf(run, sizeof(run), "%lld", (long long)msg->run_id);
	const char *ip[] = {model, ctext, hash, run, msg->stage};
	PQclear(r);
	r = NULL;
	if (gp_db_exec(db, "configure monitor",
		       "INSERT INTO monitors (model_id, config, histogram, run_id, stage) "
		       "SELECT id, $2::jsonb, $3, $4::bigint, $5 FROM models WHERE name = $1 "
		       "ON CONFLICT (model_id) DO UPDATE SET config = EXCLUDED.config, "
		       "histogram = EXCLUDED.histogram, run_id = EXCLUDED.run_id, "
		       "stage = EXCLUDED.stage, updated_at = now() RETURNING 1",
		       5, ip, &r, &err)) {
		gp_job_fail(job, 0, err.msg);
		goto done;
	}
	if (PQntuples(r) == 0) {
		snprintf(err.msg, sizeof(err.msg), "no model \"%s\"", model);
		gp_job_fail(job, 1, err.msg);
		goto done;
	}
	out = cJSON_CreateObject();
	cJSON_AddStringToObject(out, "model", model);
	char hr[80];
	snprintf(hr, sizeof(hr), "sha256:%s", hash);
	cJSON_AddStringToObject(out, "histogram", hr);
	otext = cJSON_PrintUnformatted(out);
	gp_job_succeed(job, otext, ctext);
done:
	PQclear(r);
	cJSON_Delete(params);
	cJSON_Delete(cj);
	cJSON_Delete(out);
	free(ctext);
	free(otext);
}

/* ---- the service ---- */

struct vwin {
	long long version, version_id;
	struct gp_drift_window w;
	natsMsg **pend;
	int npend, cappend;
	unsigned long long first_seq, last_seq;
	double opened_ms;
	double renewed_ms;   /* last AckProgress of the pending events */
	uint16_t **lp;       /* prompts kept for the loss, up to loss_sample */
	int *lpn, nlp;
	/* the version's model, loaded at the first window that needs it */
	struct gp_model *model;
	double val_loss;
	float *ref_emb;      /* mean final hidden state over validation chunks */
	int ref_len;         /* of this length (the window's mean prompt length) */
	double ref_loss;     /* the validation text's mean loss at that length */
	uint16_t *val;       /* validation tokens */
	size_t nval;
	int tried;
};

struct mon {
	char model[64];
	long long model_id;
	char updated[64];
	char histogram[65];
	struct mcfg c;
	struct gp_drift_ref ref;
	natsSubscription *sub;
	struct vwin v[MAX_VERSIONS];
	int nv;
};

struct gp_monitor {
	struct gp_monitor_config cfg;
	struct gp_bus *bus;
	struct gp_metrics *metrics;
	struct gp_db *db;
	pthread_t th;
	volatile int stop;
	struct mon *m[MAX_MONITORS];
	int n;
	double last_reload;
	struct gp_metric *m_events, *m_windows, *m_alerts, *m_bad, *m_hook_sent, *m_hook_failed;
	/* alert webhooks: a bounded queue and a thread of their own */
	pthread_t hook_th;
	pthread_mutex_t hmu;
	pthread_cond_t hcv;
	struct hook { char url[512]; char *body; } hq[HOOK_QUEUE];
	int hhead, hcount, hstop;
};

static void vwin_clear(struct vwin *v)
{
	for (int i = 0; i < v->npend; i++)
		natsMsg_Destroy(v->pend[i]);
	v->npend = 0;
	for (int i = 0; i < v->nlp; i++)
		free(v->lp[i]);
	v->nlp = 0;
	v->first_seq = v->last_seq = 0;
	v->opened_ms = 0;
	if (v->w.counts)
		gp_drift_window_reset(&v->w);
}

static void vwin_free(struct vwin *v)
{
	vwin_clear(v);
	free(v->pend);
	free(v->lp);
	free(v->lpn);
	gp_drift_window_free(&v->w);
	gp_model_destroy(v->model);
	free(v->ref_emb);
	free(v->val);
	memset(v, 0, sizeof(*v));
}

static void mon_free(struct mon *m)
{
	if (!m)
		return;
	for (int i = 0; i < m->nv; i++)
		vwin_free(&m->v[i]);
	if (m->sub)
		natsSubscription_Destroy(m->sub);
	gp_drift_ref_free(&m->ref);
	free(m);
}

/* The version's model, its validation loss and reference embedding (best effort). */
static void load_version(struct gp_monitor *g, struct mon *m, struct vwin *v)
{
	if (v->tried)
		return;
	v->tried = 1;
	v->val_loss = NAN;
	struct gp_err err = {0};
	struct gp_model_ref ref = {0};
	if (gp_registry_resolve(g->db, m->model, NULL, v->version, &ref, &err) ||
	    gp_registry_load(g->cfg.store, m->model, &ref, &v->model, NULL, &err)) {
		gp_warn("monitor %s: version %lld: no loss or embedding figures: %s", m->model,
			v->version, err.msg);
		return;
	}
	v->version_id = ref.version_id;
	v->val_loss = ref.val_loss;
	/* the reference embedding: validation windows through the model */
	char vid[32], hash[65];
	snprintf(vid, sizeof(vid), "%lld", ref.version_id);
	const char *p[] = {vid};
	PGresult *r = NULL;
	if (gp_db_exec(g->db, "read lineage",
		       "SELECT coalesce(lineage->>'val_shards', '') FROM model_versions WHERE id = "
		       "$1::bigint", 1, p, &r, &err) ||
	    PQntuples(r) == 0 || gp_artifact_ref_parse(PQgetvalue(r, 0, 0), hash)) {
		PQclear(r);
		return;
	}
	PQclear(r);
	uint8_t *sh = NULL;
	size_t shl = 0, n = 0;
	const uint8_t *raw = NULL;
	const struct gp_model_config *c = gp_model_config(v->model);
	if (gp_store_get(g->cfg.store, hash, (size_t)1 << 30, &sh, &shl, &err) ||
	    gp_shard_parse(sh, shl, c->vocab, &raw, &n, &err) || n < 2) {
		free(sh);
		return;
	}
	/* enough for the reference chunks, whatever their length */
	size_t keep = n < (size_t)EMB_SEQS * c->context ? n : (size_t)EMB_SEQS * c->context;
	if ((v->val = malloc(keep * sizeof(uint16_t)))) {
		for (size_t i = 0; i < keep; i++)
			v->val[i] = gp_shard_token(raw, i);
		v->nval = keep;
	}
	free(sh);
}

/*
 * The references for prompts of about len tokens: the mean final hidden
 * state and the mean loss over validation chunks of that length. Both
 * depend on the position (the first tokens of a text have little context
 * and a high loss), so a window of short prompts is held to short chunks.
 */
static void ref_embedding(struct vwin *v, int len)
{
	const struct gp_model_config *c = gp_model_config(v->model);
	if (len < 2)
		len = 2;
	if (len > c->context)
		len = c->context;
	if (v->ref_emb && v->ref_len == len)
		return;
	free(v->ref_emb);
	v->ref_emb = NULL;
	v->ref_loss = NAN;
	float *emb = calloc((size_t)c->width, sizeof(float));
	struct gp_err err = {0};
	double cnt = 0, loss_sum = 0;
	for (size_t off = 0;
	     emb && off + (size_t)len + 1 <= v->nval && cnt < (double)EMB_SEQS * c->context;
	     off += (size_t)len) {
		float loss = 0;
		if (gp_model_forward(v->model, v->val + off, v->val + off + 1, 1, len, &loss, &err))
			break;
		loss_sum += (double)loss * len;
		const float *h = gp_model_activation(v->model, GP_A_LNF);
		for (int t = 0; t < len; t++)
			for (int k = 0; k < c->width; k++)
				emb[k] += h[(size_t)t * c->width + k];
		cnt += len;
	}
	if (emb && cnt > 0) {
		for (int k = 0; k < c->width; k++)
			emb[k] /= (float)cnt;
		v->ref_emb = emb;
		v->ref_len = len;
		v->ref_loss = loss_sum / cnt;
	} else {
		free(emb);
	}
}

struct figure {
	const char *name;
	double value, threshold;
};

static void gauge(struct gp_monitor *g, const char *name, const char *help, const char *model,
		  long long version, double v)
{
	if (!isfinite(v))
		return;
	char labels[160];
	snprintf(labels, sizeof(labels), "model=\"%s\",version=\"%lld\"", model, version);
	struct gp_metric *m = gp_metrics_get(g->metrics, GP_GAUGE, name, help, labels, NULL, 0);
	if (m)
		gp_metric_set(m, v);
}

/* Close v: figures, the window row, alerts, then acknowledge its events. */
static void close_window(struct gp_monitor *g, struct mon *m, struct vwin *v)
{
	struct gp_err err = {0};
	if (!v->w.requests)
		return;
	load_version(g, m, v);
	/* the served model's loss and hidden state on a sample of the prompts */
	double emb_dist = NAN;
	if (v->model && v->nlp) {
		const struct gp_model_config *c = gp_model_config(v->model);
		float *emb = calloc((size_t)c->width, sizeof(float));
		double cnt = 0, lens = 0;
		for (int i = 0; i < v->nlp; i++)
			lens += v->lpn[i] - 1;
		if (v->nval)
			ref_embedding(v, (int)(lens / v->nlp + 0.5));
		for (int i = 0; i < v->nlp; i++) {
			int n = v->lpn[i];
			if (n > c->context + 1)
				n = c->context + 1;
			if (n < 2)
				continue;
			float loss = 0;
			if (gp_model_forward(v->model, v->lp[i], v->lp[i] + 1, 1, n - 1, &loss, &err))
				continue;
			v->w.loss_sum += loss * (n - 1);
			v->w.loss_n += n - 1;
			const float *h = gp_model_activation(v->model, GP_A_LNF);
			for (int t = 0; emb && t < n - 1; t++)
				for (int k = 0; k < c->width; k++)
					emb[k] += h[(size_t)t * c->width + k];
			cnt += n - 1;
		}
		if (emb && cnt > 0 && v->ref_emb) {
			double dot = 0, a = 0, b = 0;
			for (int k = 0; k < c->width; k++) {
				double x = emb[k] / cnt, y = v->ref_emb[k];
				dot += x * y;
				a += x * x;
				b += y * y;
			}
			if (a > 0 && b > 0)
				emb_dist = 1.0 - dot / sqrt(a * b);
		}
		free(emb);
	}
	struct gp_drift_result d;
	gp_drift_compute(&m->ref, &v->w, 0, &d);
	/* against the validation text at the prompts' length, else (no shard)
	 * against the version's recorded validation loss */
	double base = v->ref_emb && isfinite(v->ref_loss) ? v->ref_loss : v->val_loss;
	double ppl_ratio = isfinite(d.mean_loss) && isfinite(base) ? exp(d.mean_loss - base) : NAN;
	struct figure figs[] = {
		{"psi", d.psi, m->c.psi},
		{"js", d.js, m->c.js},
		{"perplexity_ratio", ppl_ratio, m->c.ppl_ratio},
		{"embedding_distance", emb_dist, m->c.emb},
		{"error_rate", d.error_rate, m->c.err_rate},
	};
	int nf = (int)(sizeof figs / sizeof *figs);
	cJSON *mj = cJSON_CreateObject();
	for (int i = 0; i < nf; i++)
		if (isfinite(figs[i].value))
			cJSON_AddNumberToObject(mj, figs[i].name, figs[i].value);
	cJSON_AddNumberToObject(mj, "rare_share", d.rare_share);
	if (isfinite(d.mean_loss))
		cJSON_AddNumberToObject(mj, "mean_loss", d.mean_loss);
	if (isfinite(v->val_loss))
		cJSON_AddNumberToObject(mj, "val_loss", v->val_loss);
	if (v->ref_emb && isfinite(v->ref_loss)) {
		cJSON_AddNumberToObject(mj, "ref_loss", v->ref_loss);
		cJSON_AddNumberToObject(mj, "ref_tokens", v->ref_len);
	}
	if (isfinite(d.p50_ms)) {
		cJSON_AddNumberToObject(mj, "p50_ms", d.p50_ms);
		cJSON_AddNumberToObject(mj, "p95_ms", d.p95_ms);
		cJSON_AddNumberToObject(mj, "p99_ms", d.p99_ms);
	}
	cJSON_AddNumberToObject(mj, "cache_hit_rate", d.cache_hit_rate);
	cJSON_AddNumberToObject(mj, "tokens", (double)d.tokens);
	cJSON_AddNumberToObject(mj, "out_of_vocab", (double)v->w.out_of_vocab);
	/* a window closed on time with a handful of requests is recorded, but
	 * its figures are too noisy to alert on */
	int quiet = v->w.requests < m->c.min_alert;
	if (quiet)
		cJSON_AddBoolToObject(mj, "too_few_to_alert", 1);
	char *mtext = cJSON_PrintUnformatted(mj);
	cJSON_Delete(mj);
	char ver[32], reqs[32], fs[32], ls[32], t0[32], t1[32];
	snprintf(ver, sizeof(ver), "%lld", v->version);
	snprintf(reqs, sizeof(reqs), "%lld", v->w.requests);
	snprintf(fs, sizeof(fs), "%llu", v->first_seq);
	snprintf(ls, sizeof(ls), "%llu", v->last_seq);
	snprintf(t0, sizeof(t0), "%lld", v->w.first_ms);
	snprintf(t1, sizeof(t1), "%lld", v->w.last_ms);
	const char *p[] = {m->model, ver, reqs, mtext ? mtext : "{}", fs, ls, t0, t1};
	PGresult *r = NULL;
	int alerts = 0;
	cJSON *hooks = cJSON_CreateArray(); /* what the webhook gets, after the commit */
	gp_status st = gp_db_begin(g->db, &err);
	if (!st)
		st = gp_db_exec(g->db, "record drift window",
				"INSERT INTO drift_windows (model_version_id, window_start, window_end, "
				"n_requests, metrics, first_seq, last_seq) SELECT v.id, "
				"to_timestamp($7::bigint / 1000.0), to_timestamp($8::bigint / 1000.0), "
				"$3::int, $4::jsonb, $5::bigint, $6::bigint FROM models mo JOIN "
				"model_versions v ON v.model_id = mo.id AND v.version = $2::int WHERE "
				"mo.name = $1 ON CONFLICT (model_version_id, first_seq) DO NOTHING "
				"RETURNING id, model_version_id",
				8, p, &r, &err);
	for (int i = 0; !st && !quiet && PQntuples(r) == 1 && i < nf; i++) {
		if (!isfinite(figs[i].value) || figs[i].value <= figs[i].threshold)
			continue;
		char val[40], thr[40], text[300];
		snprintf(val, sizeof(val), "%.17g", figs[i].value);
		snprintf(thr, sizeof(thr), "%.17g", figs[i].threshold);
		int critical = figs[i].value > 2 * figs[i].threshold;
		snprintf(text, sizeof(text), "%s:%lld %s %.4g over its threshold %.4g (%lld requests)",
			 m->model, v->version, figs[i].name, figs[i].value, figs[i].threshold,
			 v->w.requests);
		const char *ap[] = {PQgetvalue(r, 0, 1), figs[i].name, val, thr,
				    critical ? "critical" : "warning", text, PQgetvalue(r, 0, 0)};
		PGresult *ar = NULL;
		st = gp_db_exec(g->db, "record alert",
				"INSERT INTO alerts (model_version_id, metric, value, threshold, severity, "
				"message, drift_window_id) VALUES ($1::bigint, $2, $3::float8, $4::float8, "
				"$5, $6, $7::bigint) RETURNING id",
				7, ap, &ar, &err);
		if (st)
			break;
		gp_alert al = GENPIPE__V1__ALERT__INIT;
		al.alert_id = atoll(PQgetvalue(ar, 0, 0));
		al.model = m->model;
		al.model_version = v->version;
		al.metric = (char *)figs[i].name;
		al.value = figs[i].value;
		al.threshold = figs[i].threshold;
		al.severity = critical ? GENPIPE__V1__SEVERITY__SEVERITY_CRITICAL
				       : GENPIPE__V1__SEVERITY__SEVERITY_WARNING;
		al.message = text;
		al.time_unix_ms = gp_wall_ms();
		PQclear(ar);
		uint8_t *buf = NULL;
		size_t len = 0;
		char subject[128];
		snprintf(subject, sizeof(subject), GP_SUBJ_ALERTS "%s", m->model);
		if (!(st = gp_wire_encode(&al.base, &buf, &len, &err)))
			st = gp_outbox_put(g->db, subject, buf, len, NULL, &err);
		free(buf);
		alerts++;
		cJSON *h = cJSON_CreateObject();
		cJSON_AddNumberToObject(h, "alert_id", (double)al.alert_id);
		cJSON_AddStringToObject(h, "model", m->model);
		cJSON_AddNumberToObject(h, "version", (double)v->version);
		cJSON_AddStringToObject(h, "metric", figs[i].name);
		cJSON_AddNumberToObject(h, "value", figs[i].value);
		cJSON_AddNumberToObject(h, "threshold", figs[i].threshold);
		cJSON_AddStringToObject(h, "severity", critical ? "critical" : "warning");
		cJSON_AddStringToObject(h, "message", text);
		cJSON_AddItemToArray(hooks, h);
	}
	if (!st)
		st = gp_db_commit(g->db, &err);
	else
		gp_db_rollback(g->db);
	PQclear(r);
	free(mtext);
	if (st) {
		/* the events stay unacknowledged and come back */
		gp_warn("monitor %s: window of version %lld not recorded: %s", m->model, v->version,
			err.msg);
		cJSON_Delete(hooks);
		vwin_clear(v);
		return;
	}
	if (m->c.webhook[0] && cJSON_GetArraySize(hooks) > 0) {
		char *body = cJSON_PrintUnformatted(hooks);
		pthread_mutex_lock(&g->hmu);
		if (body && g->hcount < HOOK_QUEUE) {
			struct hook *h = &g->hq[(g->hhead + g->hcount++) % HOOK_QUEUE];
			snprintf(h->url, sizeof h->url, "%s", m->c.webhook);
			h->body = body;
			body = NULL;
			pthread_cond_signal(&g->hcv);
		}
		pthread_mutex_unlock(&g->hmu);
		if (body) {
			free(body);
			gp_metric_inc(g->m_hook_failed, 1);
		}
	}
	cJSON_Delete(hooks);
	for (int i = 0; i < v->npend; i++)
		gp_bus_ack(v->pend[i], &err);
	gp_metric_inc(g->m_windows, 1);
	gp_metric_inc(g->m_alerts, alerts);
	gauge(g, "genpipe_drift_psi", "PSI of the last window", m->model, v->version, d.psi);
	gauge(g, "genpipe_drift_js", "Jensen-Shannon of the last window", m->model, v->version, d.js);
	gauge(g, "genpipe_drift_perplexity_ratio", "Perplexity on live prompts over validation",
	      m->model, v->version, ppl_ratio);
	gauge(g, "genpipe_drift_embedding_distance", "Cosine distance of mean hidden states",
	      m->model, v->version, emb_dist);
	gauge(g, "genpipe_drift_error_rate", "Error rate of the last window", m->model, v->version,
	      d.error_rate);
	gauge(g, "genpipe_drift_p99_ms", "Latency p99 of the last window", m->model, v->version,
	      d.p99_ms);
	gp_info("monitor %s:%lld window of %lld requests: psi %.3f js %.3f ppl x%.2f%s", m->model,
		v->version, v->w.requests, d.psi, d.js, ppl_ratio, alerts ? " (alerts)" : "");
	vwin_clear(v);
}

/*
 * The window of a version, made on its first event. Every new version of a
 * model (each retraining) takes a place; when all are taken, the place of
 * a version with an empty window is reused, else the oldest open window is
 * closed early and its place reused.
 */
static struct vwin *version_window(struct gp_monitor *g, struct mon *m, long long version,
				   struct gp_err *err)
{
	for (int i = 0; i < m->nv; i++)
		if (m->v[i].version == version)
			return &m->v[i];
	struct vwin *v = &m->v[m->nv];
	if (m->nv == MAX_VERSIONS) {
		v = &m->v[0];
		for (int i = 1; i < m->nv; i++) {
			struct vwin *x = &m->v[i];
			if ((!x->w.requests && v->w.requests) ||
			    (!x->w.requests == !v->w.requests && x->opened_ms < v->opened_ms))
				v = x;
		}
		if (v->w.requests)
			close_window(g, m, v);
		vwin_free(v);
		m->nv--;
		*v = m->v[m->nv]; /* keep the places packed */
		v = &m->v[m->nv];
	}
	memset(v, 0, sizeof(*v));
	v->version = version;
	if (gp_drift_window_init(&v->w, m->ref.vocab, err))
		return NULL;
	v->lp = calloc((size_t)m->c.loss_sample + 1, sizeof(*v->lp));
	v->lpn = calloc((size_t)m->c.loss_sample + 1, sizeof(int));
	if (!v->lp || !v->lpn) {
		gp_drift_window_free(&v->w);
		free(v->lp);
		free(v->lpn);
		gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		return NULL;
	}
	m->nv++;
	return v;
}

/*
 * A redelivered event (its acknowledgement was late or lost) may already be
 * counted: 1 when it waits in an open window of its version, 2 when a
 * recorded window of its version spans its sequence number, else 0. Windows
 * of one version take its events in order, so a recorded window spans only
 * events it counted, unless several monitor replicas share the consumer;
 * then a redelivered event may be missed, never counted twice.
 */
static int already_counted(struct gp_monitor *g, struct mon *m, long long version,
			   uint64_t seq)
{
	for (int i = 0; i < m->nv; i++) {
		struct vwin *v = &m->v[i];
		if (v->version != version || !v->npend || seq < v->first_seq || seq > v->last_seq)
			continue;
		for (int p = 0; p < v->npend; p++) {
			struct gp_msg_meta pm = {0};
			struct gp_err e = {0};
			if (!gp_bus_meta(v->pend[p], &pm, &e) && pm.stream_seq == seq)
				return 1;
		}
	}
	char ver[32], sq[32];
	snprintf(ver, sizeof(ver), "%lld", version);
	snprintf(sq, sizeof(sq), "%llu", (unsigned long long)seq);
	const char *p[] = {m->model, ver, sq};
	PGresult *r = NULL;
	struct gp_err err = {0};
	if (gp_db_exec(g->db, "find a redelivered event's window",
		       "SELECT 1 FROM drift_windows w JOIN model_versions v ON v.id = "
		       "w.model_version_id JOIN models mo ON mo.id = v.model_id WHERE mo.name = $1 "
		       "AND v.version = $2::int AND $3::bigint BETWEEN w.first_seq AND w.last_seq "
		       "LIMIT 1",
		       3, p, &r, &err)) {
		gp_warn("monitor %s: %s", m->model, err.msg);
		return 0;
	}
	int found = PQntuples(r) > 0;
	PQclear(r);
	return found ? 2 : 0;
}

static void take(struct gp_monitor *g, struct mon *m, natsMsg *msg)
{
	struct gp_err err = {0};
	gp_telemetry *t = NULL;
	struct gp_msg_meta meta = {0};
	gp_bus_meta(msg, &meta, &err);
	if (gp_wire_decode_telemetry(&t, (const uint8_t *)natsMsg_GetData(msg),
				     (size_t)natsMsg_GetDataLength(msg), &err)) {
		gp_metric_inc(g->m_bad, 1);
		gp_dead_letter(g->db, GP_STREAM_TELEMETRY, meta.consumer, natsMsg_GetSubject(msg),
			       meta.stream_seq, natsMsg_GetData(msg), (size_t)natsMsg_GetDataLength(msg),
			       err.msg, &err);
		gp_bus_term(msg, &err);
		natsMsg_Destroy(msg);
		return;
	}
	if (t->model_version <= 0) {
		/* requests no version served (not found, malformed) have no window */
		gp_bus_ack(msg, &err);
		natsMsg_Destroy(msg);
		gp_wire_free_telemetry(t);
		return;
	}
	if (meta.delivered > 1) {
		int seen = already_counted(g, m, t->model_version, meta.stream_seq);
		if (seen) {
			/* in an open window (that window acknowledges it) or in a
			 * recorded one (acknowledged now): counted once only */
			if (seen == 2)
				gp_bus_ack(msg, &err);
			natsMsg_Destroy(msg);
			gp_wire_free_telemetry(t);
			return;
		}
	}
	struct vwin *v = version_window(g, m, t->model_version, &err);
	if (!v) {
		/* out of memory: unacknowledged, the event comes back */
		gp_warn("monitor %s: %s", m->model, err.msg);
		natsMsg_Destroy(msg);
		gp_wire_free_telemetry(t);
		return;
	}
	gp_metric_inc(g->m_events, 1);
	int error = t->error_code && *t->error_code;
	gp_drift_window_add(&v->w, t->prompt_tokens, t->n_prompt_tokens, t->latency_ms, error,
			    t->cache_hit, t->time_unix_ms);
	if (!error && v->nlp < m->c.loss_sample && t->n_prompt_tokens >= 2) {
		uint16_t *ids = malloc(t->n_prompt_tokens * sizeof(uint16_t));
		int ok = ids != NULL;
		for (size_t i = 0; ok && i < t->n_prompt_tokens; i++) {
			ok = t->prompt_tokens[i] < (uint32_t)m->ref.vocab;
			if (ok)
				ids[i] = (uint16_t)t->prompt_tokens[i];
		}
		if (ok) {
			v->lp[v->nlp] = ids;
			v->lpn[v->nlp++] = (int)t->n_prompt_tokens;
		} else {
			free(ids);
		}
	}
	if (!v->first_seq) {
		v->first_seq = meta.stream_seq;
		v->opened_ms = v->renewed_ms = gp_mono_ms();
	}
	v->last_seq = meta.stream_seq;
	if (v->npend == v->cappend) {
		int c = v->cappend ? 2 * v->cappend : 256;
		natsMsg **p = realloc(v->pend, (size_t)c * sizeof(*p));
		if (!p) {
			natsMsg_Destroy(msg); /* unacked: comes back */
			gp_wire_free_telemetry(t);
			return;
		}
		v->pend = p;
		v->cappend = c;
	}
	v->pend[v->npend++] = msg;
	gp_wire_free_telemetry(t);
	if (v->w.requests >= m->c.window)
		close_window(g, m, v);
}

/* (Re)read the monitors table; new or changed monitors get a consumer. */
static void reload(struct gp_monitor *g)
{
	struct gp_err err = {0};
	PGresult *r = NULL;
	if (gp_db_exec(g->db, "read monitors",
		       "SELECT m.name, mo.model_id, mo.config::text, mo.histogram, mo.updated_at::text "
		       "FROM monitors mo JOIN models m ON m.id = mo.model_id ORDER BY m.name",
		       0, NULL, &r, &err)) {
		gp_warn("monitor: %s", err.msg);
		return;
	}
	for (int i = 0; i < PQntuples(r); i++) {
		const char *name = PQgetvalue(r, i, 0), *upd = PQgetvalue(r, i, 4);
		int k;
		for (k = 0; k < g->n; k++)
			if (!strcmp(g->m[k]->model, name))
				break;
		if (k < g->n && !strcmp(g->m[k]->updated, upd))
			continue;
		struct mon *m = calloc(1, sizeof(*m));
		cJSON *cj = cJSON_Parse(PQgetvalue(r, i, 2));
		uint8_t *h = NULL;
		size_t hl = 0;
		if (!m || !gp_bus_token_ok(name) || parse_cfg(cj, "config", &m->c, &err) ||
		    gp_store_get(g->cfg.store, PQgetvalue(r, i, 3), GP_DRIFT_MAX_REF_BYTES, &h, &hl,
				 &err) ||
		    gp_drift_ref_parse((const char *)h, hl, "train", (int)m->c.bins, 0, 0, &m->ref,
				       &err)) {
			gp_warn("monitor %s: cannot watch it: %s", name, err.msg);
			cJSON_Delete(cj);
			free(h);
			mon_free(m);
			continue;
		}
		cJSON_Delete(cj);
		free(h);
		snprintf(m->model, sizeof(m->model), "%s", name);
		snprintf(m->updated, sizeof(m->updated), "%s", upd);
		snprintf(m->histogram, sizeof(m->histogram), "%s", PQgetvalue(r, i, 3));
		m->model_id = atoll(PQgetvalue(r, i, 1));
		char durable[96], filter[128];
		snprintf(durable, sizeof(durable), "monitor-%s", name);
		snprintf(filter, sizeof(filter), GP_SUBJ_TELEMETRY "%s", name);
		long long pending = m->c.window * 4 > 1000 ? m->c.window * 4 : 1000;
		struct gp_consumer_def cd = {GP_STREAM_TELEMETRY, durable, filter, ACK_WAIT_MS, -1,
					     pending};
		if (gp_bus_declare(g->bus, NULL, 0, &cd, 1, &err) ||
		    gp_bus_pull_subscribe(g->bus, &cd, &m->sub, &err)) {
			gp_warn("monitor %s: %s", name, err.msg);
			mon_free(m);
			continue;
		}
		if (k < g->n) {
			/* a changed configuration: the open windows are redelivered */
			mon_free(g->m[k]);
			g->m[k] = m;
		} else if (g->n < MAX_MONITORS) {
			g->m[g->n++] = m;
		} else {
			gp_warn("monitor: more than %d models; %s is not watched", MAX_MONITORS, name);
			mon_free(m);
			continue;
		}
		gp_info("monitor %s: windows of %lld requests or %lld ms, psi > %g, js > %g, "
			"perplexity x%g", name, m->c.window, m->c.window_ms, m->c.psi, m->c.js,
			m->c.ppl_ratio);
	}
	PQclear(r);
}

static size_t hook_discard(char *p, size_t size, size_t n, void *u)
{
	(void)p;
	(void)u;
	return size * n;
}

/* POST each queued alert batch; HOOK_TRIES tries, 0.5 s, 1 s, 2 s apart. */
static void *hook_main(void *arg)
{
	struct gp_monitor *g = arg;
	for (;;) {
		pthread_mutex_lock(&g->hmu);
		while (!g->hcount && !g->hstop)
			pthread_cond_wait(&g->hcv, &g->hmu);
		if (!g->hcount) {
			pthread_mutex_unlock(&g->hmu);
			return NULL;
		}
		struct hook h = g->hq[g->hhead];
		g->hhead = (g->hhead + 1) % HOOK_QUEUE;
		g->hcount--;
		pthread_mutex_unlock(&g->hmu);
		long code = 0;
		int ok = 0;
		for (int t = 0; t < HOOK_TRIES && !ok; t++) {
			if (t) {
				gp_sleep_ms(500LL << (t - 1));
				if (g->hstop)
					break;
			}
			CURL *c = curl_easy_init();
			if (!c)
				continue;
			struct curl_slist *hd = curl_slist_append(NULL, "Content-Type: application/json");
			curl_easy_setopt(c, CURLOPT_URL, h.url);
			curl_easy_setopt(c, CURLOPT_POSTFIELDS, h.body);
			curl_easy_setopt(c, CURLOPT_HTTPHEADER, hd);
			curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, 5000L);
			curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
			curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
			curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, hook_discard);
			CURLcode rc = curl_easy_perform(c);
			code = 0;
			curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
			ok = rc == CURLE_OK && code >= 200 && code < 300;
			curl_slist_free_all(hd);
			curl_easy_cleanup(c);
		}
		gp_metric_inc(ok ? g->m_hook_sent : g->m_hook_failed, 1);
		if (!ok)
			gp_warn("alert webhook %s: gave up (last status %ld)", h.url, code);
		free(h.body);
	}
}

/* Tell the server the open window's events are still being worked on. */
static void renew(struct vwin *v, struct gp_err *err)
{
	for (int p = 0; p < v->npend; p++)
		gp_bus_in_progress(v->pend[p], err);
	v->renewed_ms = gp_mono_ms();
}

static void renew_open(struct mon *m, struct gp_err *err)
{
	for (int k = 0; k < m->nv; k++)
		if (m->v[k].npend && gp_mono_ms() - m->v[k].renewed_ms >= ACK_WAIT_MS / 3.0)
			renew(&m->v[k], err);
}

static void *monitor_main(void *arg)
{
	struct gp_monitor *g = arg;
	while (!g->stop) {
		double now = gp_mono_ms();
		if (now - g->last_reload >= (double)g->cfg.reload_ms) {
			reload(g);
			g->last_reload = now;
		}
		if (!g->n) {
			gp_sleep_ms(100);
			continue;
		}
		long long wait = 200 / g->n > 10 ? 200 / g->n : 10;
		for (int i = 0; i < g->n && !g->stop; i++) {
			struct mon *m = g->m[i];
			natsMsgList list = {0};
			struct gp_err err = {0};
			if (!gp_bus_fetch(m->sub, GP_BUS_FETCH_MAX, wait, &list, &err)) {
				double fetched = gp_mono_ms();
				for (int k = 0; k < list.Count; k++) {
					take(g, m, list.Msgs[k]);
					list.Msgs[k] = NULL; /* owned by the window now */
					/* a window that closes loads its model and computes
					 * losses, seconds on a slow machine: the events of the
					 * batch not yet taken must not time out meanwhile */
					if (gp_mono_ms() - fetched >= ACK_WAIT_MS / 3.0) {
						for (int r = k + 1; r < list.Count; r++)
							gp_bus_in_progress(list.Msgs[r], &err);
						renew_open(m, &err);
						fetched = gp_mono_ms();
					}
				}
				natsMsgList_Destroy(&list);
			}
			/* windows that have been open long enough close on time; the
			 * others keep their events from being redelivered */
			for (int k = 0; k < m->nv; k++) {
				struct vwin *v = &m->v[k];
				if (!v->w.requests)
					continue;
				if (gp_mono_ms() - v->opened_ms >= (double)m->c.window_ms) {
					close_window(g, m, v);
				} else if (gp_mono_ms() - v->renewed_ms >= ACK_WAIT_MS / 3.0) {
					renew(v, &err);
				}
			}
		}
	}
	return NULL;
}

gp_status gp_monitor_start(struct gp_monitor **out, const struct gp_monitor_config *cfg,
			   struct gp_bus *bus, const char *database_url, struct gp_metrics *metrics,
			   struct gp_err *err)
{
	struct gp_monitor *g = calloc(1, sizeof(*g));
	if (!g)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	g->cfg = *cfg;
	if (g->cfg.reload_ms <= 0)
		g->cfg.reload_ms = 2000;
	g->bus = bus;
	g->metrics = metrics;
	g->m_events = gp_metrics_get(metrics, GP_COUNTER, "genpipe_monitor_events_total",
				     "Telemetry events taken into windows", NULL, NULL, 0);
	g->m_windows = gp_metrics_get(metrics, GP_COUNTER, "genpipe_monitor_windows_total",
				      "Drift windows recorded", NULL, NULL, 0);
	g->m_alerts = gp_metrics_get(metrics, GP_COUNTER, "genpipe_monitor_alerts_total",
				     "Alerts raised", NULL, NULL, 0);
	g->m_bad = gp_metrics_get(metrics, GP_COUNTER, "genpipe_monitor_bad_events_total",
				  "Telemetry events that could not be decoded (dead-lettered)", NULL,
				  NULL, 0);
	g->m_hook_sent = gp_metrics_get(metrics, GP_COUNTER, "genpipe_monitor_webhooks_sent_total",
					"Alert webhooks delivered", NULL, NULL, 0);
	g->m_hook_failed = gp_metrics_get(metrics, GP_COUNTER,
					  "genpipe_monitor_webhooks_failed_total",
					  "Alert webhooks given up on or dropped", NULL, NULL, 0);
	pthread_mutex_init(&g->hmu, NULL);
	pthread_cond_init(&g->hcv, NULL);
	gp_status st = gp_db_connect(&g->db, database_url, 30000, err);
	if (st || pthread_create(&g->hook_th, NULL, hook_main, g)) {
		gp_db_destroy(g->db);
		free(g);
		return st ? st : gp_err_set(err, GP_ERR_INTERNAL, "could not start the webhook thread");
	}
	if (pthread_create(&g->th, NULL, monitor_main, g)) {
		pthread_mutex_lock(&g->hmu);
		g->hstop = 1;
		pthread_cond_broadcast(&g->hcv);
		pthread_mutex_unlock(&g->hmu);
		pthread_join(g->hook_th, NULL);
		gp_db_destroy(g->db);
		free(g);
		return gp_err_set(err, GP_ERR_INTERNAL, "could not start the monitor thread");
	}
	*out = g;
	return GP_OK;
}

void gp_monitor_stop(struct gp_monitor *g)
{
	if (!g)
		return;
	g->stop = 1;
	pthread_join(g->th, NULL);
	pthread_mutex_lock(&g->hmu);
	g->hstop = 1;
	pthread_cond_broadcast(&g->hcv);
	pthread_mutex_unlock(&g->hmu);
	pthread_join(g->hook_th, NULL);
	for (int i = 0; i < g->hcount; i++)
		free(g->hq[(g->hhead + i) % HOOK_QUEUE].body);
	pthread_mutex_destroy(&g->hmu);
	pthread_cond_destroy(&g->hcv);
	for (int i = 0; i < g->n; i++)
		mon_free(g->m[i]);
	gp_db_destroy(g->db);
	free(g);
}
