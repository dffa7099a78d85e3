/*
 * serve.c: the NATS side of online inference (see serve.h).
 */
#include "serve.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bpe.h"
#include "db.h"
#include "log.h"
#include "registry.h"
#include "subjects.h"
#include "wire.h"

#define MAX_LOADED 16
#define MAX_ALIASES 64
#define TELEMETRY_LINGER_MS 20

struct loaded {
	struct gp_lm *lm;
	double used_ms;
};

struct alias_entry {
	char model[64], alias[64];
	long long version;
	long long canary;     /* 0: none */
	double fraction;      /* of requests through the alias that go to the canary */
};

struct tevent {
	char subject[128];
	char msg_id[140];
	uint8_t *data;
	size_t len;
};

struct gp_server {
	struct gp_server_config cfg;
	struct gp_bus *bus;
	struct gp_bus *tbus;       /* telemetry: acks never queue behind replies */
	struct gp_bus *tbus_own;
	struct gp_metrics *metrics;
	struct gp_engine *engine;
	natsSubscription *sub, *reg_sub;
	/* lookups: one connection, one thread at a time */
	struct gp_db *db;
	pthread_mutex_t db_mu;
	/* loaded versions and the alias cache */
	pthread_mutex_t mu;
	struct loaded loaded[MAX_LOADED];
	int nloaded;
	struct alias_entry aliases[MAX_ALIASES];
	int naliases;
	pthread_mutex_t load_mu; /* one load at a time */
	/* telemetry */
	pthread_mutex_t tmu;
	pthread_cond_t tcv;
	struct tevent *ring;
	int rhead, rcount, rcap;
	int tstop;
	pthread_t tthread;
	/* the registry backstop */
	pthread_t pthread;
	pthread_mutex_t pmu;
	pthread_cond_t pcv;
	int pstop;
	atomic_long inflight;
	struct gp_metric *m_dropped, *m_sent, *m_malformed, *m_loads, *m_loaded_bytes,
		*m_latency;
};

struct rctx {
	struct gp_server *s;
	char *reply;
	char request_id[129];
	char model[64];
	long long version;
	char *prompt;
	double t0_ms;
};

/* ---- telemetry ---- */

static void telemetry_put(struct gp_server *s, const char *model, const char *request_id,
			  uint8_t *data, size_t len)
{
	pthread_mutex_lock(&s->tmu);
	if (s->rcount == s->rcap || s->tstop) {
		pthread_mutex_unlock(&s->tmu);
		free(data);
		gp_metric_inc(s->m_dropped, 1);
		return;
	}
	struct tevent *t = &s->ring[(s->rhead + s->rcount) % s->rcap];
	snprintf(t->subject, sizeof(t->subject), GP_SUBJ_TELEMETRY "%s", model);
	snprintf(t->msg_id, sizeof(t->msg_id), "%s", request_id);
	t->data = data;
	t->len = len;
	s->rcount++;
	if (s->rcount == 1 || s->rcount >= 64)
		pthread_cond_signal(&s->tcv);
	pthread_mutex_unlock(&s->tmu);
}

static void *telemetry_main(void *arg)
{
	struct gp_server *s = arg;
	enum { BATCH = 64 };
	struct tevent batch[BATCH];
	struct gp_bus_out out[BATCH];
	double last_warn = 0;
	for (;;) {
		pthread_mutex_lock(&s->tmu);
		while (!s->rcount && !s->tstop)
			pthread_cond_wait(&s->tcv, &s->tmu);
		if (!s->rcount && s->tstop) {
			pthread_mutex_unlock(&s->tmu);
			return NULL;
		}
		/* linger: the stream's work then happens beside the next request's
		 * compute, not beside the reply just sent; batches grow under load */
		if (s->rcount < BATCH && !s->tstop) {
			struct timespec ts;
			clock_gettime(CLOCK_REALTIME, &ts);
			ts.tv_nsec += TELEMETRY_LINGER_MS * 1000000L;
			if (ts.tv_nsec >= 1000000000L) {
				ts.tv_sec++;
				ts.tv_nsec -= 1000000000L;
			}
			while (s->rcount < BATCH && !s->tstop &&
			       pthread_cond_timedwait(&s->tcv, &s->tmu, &ts) == 0)
				;
		}
		int n = 0;
		while (s->rcount && n < BATCH) {
			batch[n++] = s->ring[s->rhead];
			s->rhead = (s->rhead + 1) % s->rcap;
			s->rcount--;
		}
		pthread_mutex_unlock(&s->tmu);
		for (int i = 0; i < n; i++)
			out[i] = (struct gp_bus_out){ batch[i].subject, batch[i].data,
						      (int)batch[i].len, batch[i].msg_id };
		struct gp_err err = {0};
		if (gp_bus_publish_batch(s->tbus, out, n, 5000, NULL, &err)) {
			gp_metric_inc(s->m_dropped, n);
			if (gp_mono_ms() - last_warn > 10000) {
				gp_warn("telemetry: %d events dropped: %s", n, err.msg);
				last_warn = gp_mono_ms();
			}
		} else {
			gp_metric_inc(s->m_sent, n);
		}
		for (int i = 0; i < n; i++)
			free(batch[i].data);
	}
}

/* A uniform number in [0, 1) from a request id and a salt: the same id,
 * the same decision (telemetry sampling, canary routing). */
static double id_unit(const char *salt, const char *request_id)
{
	uint64_t h = 1469598103934665603ULL;
	for (const char *p = salt; *p; p++)
		h = (h ^ (uint8_t)*p) * 1099511628211ULL;
	for (const char *p = request_id; *p; p++)
		h = (h ^ (uint8_t)*p) * 1099511628211ULL;
	h ^= h >> 33;
	h *= 0xff51afd7ed558ccdULL;
	h ^= h >> 33;
	return (double)(h >> 11) / 9007199254740992.0;
}

/* Successes are sampled by request id. */
static int sampled(const struct gp_server *s, const char *request_id)
{
	if (s->cfg.telemetry_sample >= 1.0)
		return 1;
	if (s->cfg.telemetry_sample <= 0)
		return 0;
	return id_unit("telemetry", request_id) < s->cfg.telemetry_sample;
}

static void telemetry(struct gp_server *s, const char *model, const char *request_id,
		      long long version, const uint16_t *prompt_ids, int prompt_tokens,
		      int output_tokens, double latency_ms, int cache_hit, const char *error_code,
		      const char *prompt, const char *completion)
{
	if (!error_code && !sampled(s, request_id))
		return;
	gp_telemetry t = GENPIPE__V1__TELEMETRY__INIT;
	uint32_t *ids = NULL;
	if (prompt_tokens > 0 && prompt_ids) {
		if (prompt_tokens > 65536)
			prompt_tokens = 65536;
		ids = malloc((size_t)prompt_tokens * sizeof(uint32_t));
		if (ids) {
			for (int i = 0; i < prompt_tokens; i++)
				ids[i] = prompt_ids[i];
			t.prompt_tokens = ids;
			t.n_prompt_tokens = (size_t)prompt_tokens;
		}
	}
	t.request_id = (char *)request_id;
	t.model = (char *)model;
	t.model_version = version;
	t.output_tokens = (uint32_t)(output_tokens > 0 ? output_tokens : 0);
	t.latency_ms = latency_ms;
	t.cache_hit = cache_hit;
	t.error_code = (char *)(error_code ? error_code : "");
	t.time_unix_ms = gp_wall_ms();
	if (s->cfg.log_payloads) {
		t.prompt = (char *)(prompt ? prompt : "");
		t.completion = (char *)(completion ? completion : "");
	}
	uint8_t *buf = NULL;
	size_t len = 0;
	struct gp_err err = {0};
	if (gp_wire_encode(&t.base, &buf, &len, &err))
		gp_metric_inc(s->m_dropped, 1);
	else
		telemetry_put(s, model, request_id, buf, len);
	free(ids);
}

/* ---- replies ---- */

static void reply(struct gp_server *s, const char *subject, const char *request_id,
		  long long version, const struct gp_gen_result *r, const char *code,
		  const char *error, int final, const char *text, size_t text_len)
{
	gp_infer_response m = GENPIPE__V1__INFER_RESPONSE__INIT;
	m.request_id = (char *)request_id;
	m.model_version = version;
	char *t = NULL;
	if (text) {
		t = malloc(text_len + 1);
		if (t) {
			memcpy(t, text, text_len);
			t[text_len] = 0;
		}
	}
	m.text = t ? t : (char *)"";
	m.error_code = (char *)(code ? code : "");
	m.error = (char *)(error ? error : "");
	m.final = final;
	if (r) {
		m.prompt_tokens = (uint32_t)r->prompt_tokens;
		m.output_tokens = (uint32_t)r->output_tokens;
		m.cache_hit = r->cache_hit;
		m.latency_ms = r->latency_ms;
		m.compute_ms = r->compute_ms;
		if (!code)
			m.finish = (char *)gp_finish_str(r->finish);
	}
	uint8_t *buf = NULL;
	size_t len = 0;
	struct gp_err err = {0};
	if (!gp_wire_encode(&m.base, &buf, &len, &err)) {
		natsStatus ns = natsConnection_Publish(gp_bus_conn(s->bus), subject, buf, (int)len);
		if (ns != NATS_OK)
			gp_warn("reply to %s: %s", request_id, natsStatus_GetText(ns));
	}
	free(buf);
	free(t);
}

static void count(struct gp_server *s, const char *model, long long version, const char *outcome)
{
	char labels[256];
	snprintf(labels, sizeof(labels), "model=\"%s\",version=\"%lld\",outcome=\"%s\"", model,
		 version, outcome);
	struct gp_metric *m = gp_metrics_get(s->metrics, GP_COUNTER, "genpipe_infer_requests_total",
					     "Requests by model version and outcome", labels, NULL, 0);
	if (m)
		gp_metric_inc(m, 1);
}

static void refuse(struct gp_server *s, const char *subject, const char *model,
		   const char *request_id, long long version, const char *code, const char *msg,
		   const char *prompt, double t0)
{
	reply(s, subject, request_id, version, NULL, code, msg, 1, NULL, 0);
	count(s, model, version, code);
	telemetry(s, model, request_id, version, NULL, 0, 0, gp_mono_ms() - t0, 0, code,
		  prompt, NULL);
}

static void on_partial(void *cl, const char *delta, size_t n)
{
	struct rctx *c = cl;
	reply(c->s, c->reply, c->request_id, c->version, NULL, NULL, NULL, 0, delta, n);
}

static void on_done(void *cl, const struct gp_gen_result *r)
{
	struct rctx *c = cl;
	struct gp_server *s = c->s;
	reply(s, c->reply, c->request_id, c->version, r, r->error_code, r->error, 1, r->text, r->len);
	count(s, c->model, c->version, r->error_code ? r->error_code : "ok");
	gp_metric_observe(s->m_latency, r->latency_ms / 1000.0);
	telemetry(s, c->model, c->request_id, c->version, r->prompt_ids, r->prompt_tokens,
		  r->output_tokens, gp_mono_ms() - c->t0_ms, r->cache_hit, r->error_code,
		  c->prompt, r->text);
	free(c->reply);
	free(c->prompt);
	free(c);
	atomic_fetch_sub(&s->inflight, 1);
}

/* ---- versions ---- */

static int alias_named(const struct gp_server *s, const struct gp_lm *lm)
{
	for (int i = 0; i < s->naliases; i++)
		if (!strcmp(s->aliases[i].model, lm->name) &&
		    (s->aliases[i].version == lm->version || s->aliases[i].canary == lm->version))
			return 1;
	return 0;
}

/* A referenced lm for model:version, loading it when needed. */
static gp_status get_version(struct gp_server *s, const char *model,
			     const struct gp_model_ref *ref, struct gp_lm **out,
			     struct gp_err *err)
{
	pthread_mutex_lock(&s->mu);
	for (int i = 0; i < s->nloaded; i++)
		if (s->loaded[i].lm->version_id == ref->version_id) {
			s->loaded[i].used_ms = gp_mono_ms();
			*out = gp_lm_ref(s->loaded[i].lm);
			pthread_mutex_unlock(&s->mu);
			return GP_OK;
		}
	pthread_mutex_unlock(&s->mu);
	pthread_mutex_lock(&s->load_mu);
	/* someone may have loaded it while we waited */
	pthread_mutex_lock(&s->mu);
	for (int i = 0; i < s->nloaded; i++)
		if (s->loaded[i].lm->version_id == ref->version_id) {
			*out = gp_lm_ref(s->loaded[i].lm);
			pthread_mutex_unlock(&s->mu);
			pthread_mutex_unlock(&s->load_mu);
			return GP_OK;
		}
	pthread_mutex_unlock(&s->mu);
	struct gp_lm *lm = NULL;
	struct gp_model *mm = NULL;
	struct gp_bpe *tok = NULL;
	double t0 = gp_mono_ms();
	gp_status st = gp_registry_load(s->cfg.store, model, ref, &mm, &tok, err);
	if (!st && (st = gp_lm_wrap(&lm, model, ref->version, ref->version_id, mm, tok, err))) {
		gp_model_destroy(mm);
		gp_bpe_free(tok);
	}
	if (st) {
		pthread_mutex_unlock(&s->load_mu);
		return st;
	}
	/* make room: least recently used first, never one in use or named by an alias */
	pthread_mutex_lock(&s->mu);
	size_t used = 0;
	for (int i = 0; i < s->nloaded; i++)
		used += s->loaded[i].lm->bytes;
	while (s->nloaded && (used + lm->bytes > s->cfg.memory_budget || s->nloaded == MAX_LOADED)) {
		int victim = -1;
		for (int i = 0; i < s->nloaded; i++) {
			struct gp_lm *o = s->loaded[i].lm;
			if (atomic_load((_Atomic int *)&o->refs) > 1 || alias_named(s, o))
				continue;
			if (victim < 0 || s->loaded[i].used_ms < s->loaded[victim].used_ms)
				victim = i;
		}
		if (victim < 0)
			break;
		struct gp_lm *o = s->loaded[victim].lm;
		used -= o->bytes;
		s->loaded[victim] = s->loaded[--s->nloaded];
		gp_info("unloaded %s version %lld to make room", o->name, o->version);
		gp_engine_cache_drop(s->engine, o->version_id);
		gp_lm_unref(o);
	}
	if (s->nloaded == MAX_LOADED || (s->nloaded && used + lm->bytes > s->cfg.memory_budget)) {
		pthread_mutex_unlock(&s->mu);
		pthread_mutex_unlock(&s->load_mu);
		size_t need = lm->bytes;
		gp_lm_unref(lm);
		return gp_err_set(err, GP_ERR_UNAVAILABLE,
				  "%s version %lld (%zu MiB) does not fit the memory budget of %zu MiB "
				  "beside the versions in use", model, ref->version, need >> 20,
				  s->cfg.memory_budget >> 20);
	}
	s->loaded[s->nloaded++] = (struct loaded){ lm, gp_mono_ms() };
	used += lm->bytes;
	gp_metric_set(s->m_loaded_bytes, (double)used);
	pthread_mutex_unlock(&s->mu);
	pthread_mutex_unlock(&s->load_mu);
	gp_metric_inc(s->m_loads, 1);
	gp_info("loaded %s version %lld (%zu MiB mapped) in %.1f ms", model, ref->version,
		lm->bytes >> 20, gp_mono_ms() - t0);
	*out = gp_lm_ref(lm);
	return GP_OK;
}

static gp_status resolve(struct gp_server *s, const char *model, const char *alias,
			 long long version, struct gp_model_ref *ref, struct gp_err *err)
{
	pthread_mutex_lock(&s->db_mu);
	gp_status st = gp_registry_resolve(s->db, model, alias, version, ref, err);
	pthread_mutex_unlock(&s->db_mu);
	return st;
}

/* Record what an alias names now (load first, so requests never wait). */
static void alias_set(struct gp_server *s, const char *model, const char *alias, long long version,
		      long long canary, double fraction)
{
	pthread_mutex_lock(&s->mu);
	int i;
	for (i = 0; i < s->naliases; i++)
		if (!strcmp(s->aliases[i].model, model) && !strcmp(s->aliases[i].alias, alias))
			break;
	if (i == s->naliases) {
		if (s->naliases == MAX_ALIASES)
			i = 0; /* forget the oldest */
		else
			s->naliases++;
		snprintf(s->aliases[i].model, sizeof(s->aliases[i].model), "%s", model);
		snprintf(s->aliases[i].alias, sizeof(s->aliases[i].alias), "%s", alias);
	}
	long long old = s->aliases[i].version, oldc = s->aliases[i].canary;
	s->aliases[i].version = version;
	s->aliases[i].canary = canary;
	s->aliases[i].fraction = fraction;
	pthread_mutex_unlock(&s->mu);
	if (old && old != version)
		gp_info("%s@%s: version %lld -> %lld", model, alias, old, version);
	if (canary != oldc)
		gp_info("%s@%s: canary %lld (%.0f%% of requests)", model, alias, canary,
			100 * fraction);
}

/* What the alias names; with request_id, the version this request goes to
 * (the canary for its share of ids). 0: not cached. */
static long long alias_get(struct gp_server *s, const char *model, const char *alias,
			   const char *request_id)
{
	long long v = 0, c = 0;
	double f = 0;
	pthread_mutex_lock(&s->mu);
	for (int i = 0; i < s->naliases; i++)
		if (!strcmp(s->aliases[i].model, model) && !strcmp(s->aliases[i].alias, alias)) {
			v = s->aliases[i].version;
			c = s->aliases[i].canary;
			f = s->aliases[i].fraction;
		}
	pthread_mutex_unlock(&s->mu);
	if (v && c && request_id && id_unit("canary", request_id) < f)
		return c;
	return v;
}

/* Resolve (through the alias cache) and load. */
static gp_status lookup(struct gp_server *s, const char *model, const char *alias,
			long long version, const char *request_id, struct gp_lm **out,
			long long *chosen, struct gp_err *err)
{
	struct gp_model_ref ref = {0};
	*chosen = version;
	if (!version) {
		version = alias_get(s, model, alias, request_id);
		if (!version) {
			gp_status st = resolve(s, model, alias, 0, &ref, err);
			if (st)
				return st;
			alias_set(s, model, alias, ref.version, ref.canary_version,
				  ref.canary_fraction);
			version = alias_get(s, model, alias, request_id);
		}
		*chosen = version; /* failures are the version's, in telemetry too */
	}
	/* a loaded version needs no database round trip */
	pthread_mutex_lock(&s->mu);
	for (int i = 0; i < s->nloaded; i++)
		if (!strcmp(s->loaded[i].lm->name, model) && s->loaded[i].lm->version == version) {
			s->loaded[i].used_ms = gp_mono_ms();
			*out = gp_lm_ref(s->loaded[i].lm);
			pthread_mutex_unlock(&s->mu);
			return GP_OK;
		}
	pthread_mutex_unlock(&s->mu);
	gp_status st = resolve(s, model, NULL, version, &ref, err);
	return st ? st : get_version(s, model, &ref, out, err);
}

/* Move our view of an alias: load the new version, then switch. */
static void alias_moved(struct gp_server *s, const char *model, const char *alias)
{
	struct gp_model_ref ref = {0}, cref = {0};
	struct gp_err err = {0};
	struct gp_lm *lm = NULL, *clm = NULL;
	if (resolve(s, model, alias, 0, &ref, &err) || get_version(s, model, &ref, &lm, &err)) {
		gp_warn("%s@%s: %s", model, alias, err.msg);
		return;
	}
	/* a canary that cannot load still gets its share: its requests fail,
	 * and the deploy stage watching it sees them fail */
	if (ref.canary_version &&
	    (resolve(s, model, NULL, ref.canary_version, &cref, &err) ||
	     get_version(s, model, &cref, &clm, &err)))
		gp_warn("%s@%s canary %lld: %s", model, alias, ref.canary_version, err.msg);
	alias_set(s, model, alias, ref.version, ref.canary_version, ref.canary_fraction);
	gp_lm_unref(lm);
	gp_lm_unref(clm);
}

static void on_registry(natsConnection *nc, natsSubscription *sub, natsMsg *msg, void *cl)
{
	(void)nc;
	(void)sub;
	struct gp_server *s = cl;
	gp_registry_change *rc = NULL;
	struct gp_err err = {0};
	if (gp_wire_decode_registry_change(&rc, (const uint8_t *)natsMsg_GetData(msg),
					   (size_t)natsMsg_GetDataLength(msg), &err)) {
		gp_warn("registry change: %s", err.msg);
	} else if (!strcmp(s->cfg.model, "*") || !strcmp(s->cfg.model, rc->model)) {
		/* only aliases someone asked for (or the default one) are kept */
		if (alias_get(s, rc->model, rc->alias, NULL) || !strcmp(rc->alias, s->cfg.alias))
			alias_moved(s, rc->model, rc->alias);
	}
	gp_wire_free_registry_change(rc);
	natsMsg_Destroy(msg);
}

static void *poll_main(void *arg)
{
	struct gp_server *s = arg;
	for (;;) {
		pthread_mutex_lock(&s->pmu);
		struct timespec ts;
		clock_gettime(CLOCK_REALTIME, &ts);
		long long ns = ts.tv_nsec + (s->cfg.registry_poll_ms % 1000) * 1000000LL;
		ts.tv_sec += s->cfg.registry_poll_ms / 1000 + ns / 1000000000LL;
		ts.tv_nsec = ns % 1000000000LL;
		while (!s->pstop && pthread_cond_timedwait(&s->pcv, &s->pmu, &ts) == 0)
			;
		int stop = s->pstop;
		pthread_mutex_unlock(&s->pmu);
		if (stop)
			return NULL;
		struct alias_entry copy[MAX_ALIASES];
		pthread_mutex_lock(&s->mu);
		int n = s->naliases;
		memcpy(copy, s->aliases, sizeof(copy));
		pthread_mutex_unlock(&s->mu);
		for (int i = 0; i < n; i++) {
			struct gp_model_ref ref = {0};
			struct gp_err err = {0};
			if (!resolve(s, copy[i].model, copy[i].alias, 0, &ref, &err) &&
			    (ref.version != copy[i].version || ref.canary_version != copy[i].canary ||
			     ref.canary_fraction != copy[i].fraction))
				alias_moved(s, copy[i].model, copy[i].alias);
		}
	}
}

/* ---- requests ---- */

static void on_request(natsConnection *nc, natsSubscription *sub, natsMsg *msg, void *cl)
{
	(void)nc;
	(void)sub;
	struct gp_server *s = cl;
	double t0 = gp_mono_ms();
	const char *rsubj = natsMsg_GetReply(msg);
	const char *subject = natsMsg_GetSubject(msg);
	const char *model_tok = subject + strlen(GP_SUBJ_INFER);
	struct gp_err err = {0};
	gp_infer_request *q = NULL;
	if (!rsubj || !*rsubj) {
		gp_metric_inc(s->m_malformed, 1);
		natsMsg_Destroy(msg);
		return;
	}
	if (gp_wire_decode_infer_request(&q, (const uint8_t *)natsMsg_GetData(msg),
					 (size_t)natsMsg_GetDataLength(msg), &err)) {
		/* no request id to trust: one of ours, so that the failure is logged too */
		char rid[64];
		snprintf(rid, sizeof(rid), "malformed-%llx-%llx", (unsigned long long)gp_now_ms(),
			 (unsigned long long)natsMsg_GetSequence(msg) ^ (unsigned long long)rand());
		gp_metric_inc(s->m_malformed, 1);
		refuse(s, rsubj, gp_bus_token_ok(model_tok) ? model_tok : "unknown", rid, 0,
		       "bad_request", err.msg, NULL, t0);
		natsMsg_Destroy(msg);
		return;
	}
	const char *alias = q->alias && *q->alias ? q->alias : s->cfg.alias;
	struct gp_lm *lm = NULL;
	if (strcmp(q->model, model_tok)) {
		refuse(s, rsubj, model_tok, q->request_id, 0, "bad_request",
		       "the request names another model than its subject", NULL, t0);
		goto out;
	}
	long long chosen = 0;
	gp_status st = lookup(s, q->model, alias, q->version, q->request_id, &lm, &chosen, &err);
	if (st) {
		refuse(s, rsubj, q->model, q->request_id, chosen,
		       st == GP_ERR_NOT_FOUND ? "not_found" : "unavailable", err.msg,
		       s->cfg.log_payloads ? q->prompt : NULL, t0);
		goto out;
	}
	const Genpipe__V1__SamplingParams *sp = q->sampling;
	struct gp_gen_params p = {
		.prompt = q->prompt ? q->prompt : "",
		.prompt_len = q->prompt ? strlen(q->prompt) : 0,
		.deadline_ms = q->deadline_ms,
	};
	if (sp) {
		if (sp->max_tokens > 1u << 30 || sp->top_k > 1u << 30) {
			refuse(s, rsubj, q->model, q->request_id, lm->version, "bad_request",
			       sp->max_tokens > 1u << 30 ? "max_tokens is far over the limit"
							 : "top_k is out of range",
			       NULL, t0);
			goto out;
		}
		p.max_tokens = (int)sp->max_tokens;
		p.sample.temperature = sp->temperature;
		p.sample.top_k = (int)sp->top_k;
		p.sample.top_p = sp->top_p > 0 ? sp->top_p : 1.0f;
		p.sample.seed = sp->seed;
		p.has_seed = sp->has_seed;
		p.stop = (const char *const *)sp->stop;
		p.n_stop = (int)sp->n_stop;
	} else {
		p.sample.top_p = 1.0f;
	}
	struct rctx *c = calloc(1, sizeof(*c));
	if (!c || !(c->reply = strdup(rsubj)) ||
	    (s->cfg.log_payloads && !(c->prompt = strdup(p.prompt)))) {
		if (c)
			free(c->reply);
		free(c);
		refuse(s, rsubj, q->model, q->request_id, lm->version, "internal", "out of memory",
		       NULL, t0);
		goto out;
	}
	c->s = s;
	snprintf(c->request_id, sizeof(c->request_id), "%s", q->request_id);
	snprintf(c->model, sizeof(c->model), "%s", q->model);
	c->version = lm->version;
	c->t0_ms = t0;
	const char *code = NULL;
	atomic_fetch_add(&s->inflight, 1);
	st = gp_engine_submit(s->engine, lm, &p, q->stream ? on_partial : NULL, on_done, c, &code,
			      &err);
	if (st) {
		atomic_fetch_sub(&s->inflight, 1);
		refuse(s, rsubj, q->model, q->request_id, lm->version, code ? code : "internal",
		       err.msg, c->prompt, t0);
		free(c->reply);
		free(c->prompt);
		free(c);
	}
out:
	gp_lm_unref(lm);
	gp_wire_free_infer_request(q);
	natsMsg_Destroy(msg);
}

/* ---- life ---- */

gp_status gp_server_start(struct gp_server **out, const struct gp_server_config *cfg,
			  struct gp_bus *bus, const char *database_url, struct gp_metrics *metrics,
			  struct gp_err *err)
{
	if (strcmp(cfg->model, "*") && !gp_bus_token_ok(cfg->model))
		return gp_err_set(err, GP_ERR_INVALID, "model \"%s\" is not a DNS label (or \"*\")",
				  cfg->model);
	struct gp_server *s = calloc(1, sizeof(*s));
	if (!s)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	s->cfg = *cfg;
	if (!s->cfg.alias || !*s->cfg.alias)
		s->cfg.alias = "production";
	if (!gp_bus_token_ok(s->cfg.alias)) {
		free(s);
		return gp_err_set(err, GP_ERR_INVALID, "alias \"%s\" is not a DNS label", cfg->alias);
	}
	if (!s->cfg.memory_budget)
		s->cfg.memory_budget = 4ull << 30;
	if (s->cfg.telemetry_queue <= 0)
		s->cfg.telemetry_queue = 8192;
	if (s->cfg.registry_poll_ms <= 0)
		s->cfg.registry_poll_ms = 5000;
	s->bus = bus;
	s->metrics = metrics;
	s->cfg.engine.metrics = metrics;
	pthread_mutex_init(&s->db_mu, NULL);
	pthread_mutex_init(&s->mu, NULL);
	pthread_mutex_init(&s->load_mu, NULL);
	pthread_mutex_init(&s->tmu, NULL);
	pthread_cond_init(&s->tcv, NULL);
	pthread_mutex_init(&s->pmu, NULL);
	pthread_cond_init(&s->pcv, NULL);
	static const double lat_buckets[] = {0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30};
	s->m_dropped = gp_metrics_get(metrics, GP_COUNTER, "genpipe_infer_telemetry_dropped_total",
				      "Telemetry events not sent (queue full or stream unreachable)",
				      NULL, NULL, 0);
	s->m_sent = gp_metrics_get(metrics, GP_COUNTER, "genpipe_infer_telemetry_sent_total",
				   "Telemetry events stored in the stream", NULL, NULL, 0);
	s->m_malformed = gp_metrics_get(metrics, GP_COUNTER, "genpipe_infer_malformed_total",
					"Requests that could not be decoded or had no reply subject",
					NULL, NULL, 0);
	s->m_loads = gp_metrics_get(metrics, GP_COUNTER, "genpipe_infer_loads_total",
				    "Model versions loaded", NULL, NULL, 0);
	s->m_loaded_bytes = gp_metrics_get(metrics, GP_GAUGE, "genpipe_infer_loaded_bytes",
					   "Bytes of checkpoints mapped", NULL, NULL, 0);
	s->m_latency = gp_metrics_get(metrics, GP_HISTOGRAM, "genpipe_infer_latency_seconds",
				      "Receipt to reply, inside the service", NULL, lat_buckets, 9);
	s->rcap = s->cfg.telemetry_queue;
	gp_status st = GP_OK;
	if (!(s->ring = calloc((size_t)s->rcap, sizeof(*s->ring))))
		st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	if (!st)
		st = gp_db_connect(&s->db, database_url, 30000, err);
	if (!st && s->cfg.telemetry_nats_url)
		st = gp_bus_connect(&s->tbus_own, s->cfg.telemetry_nats_url, "genpipe-infer-telemetry",
				    0, 30000, err);
	s->tbus = s->tbus_own ? s->tbus_own : bus;
	if (!st)
		st = gp_engine_create(&s->engine, &s->cfg.engine, err);
	if (st) {
		gp_db_destroy(s->db);
		gp_bus_destroy(s->tbus_own);
		free(s->ring);
		free(s);
		return st;
	}
	pthread_create(&s->tthread, NULL, telemetry_main, s);
	pthread_create(&s->pthread, NULL, poll_main, s);
	char subj[128], rsubj[128];
	snprintf(subj, sizeof(subj), GP_SUBJ_INFER "%s", s->cfg.model);
	snprintf(rsubj, sizeof(rsubj), GP_SUBJ_REGISTRY "%s", s->cfg.model);
	natsStatus ns = natsConnection_QueueSubscribe(&s->sub, gp_bus_conn(bus), subj,
						      GP_QUEUE_INFER, on_request, s);
	if (ns == NATS_OK)
		ns = natsConnection_Subscribe(&s->reg_sub, gp_bus_conn(bus), rsubj, on_registry, s);
	if (ns == NATS_OK)
		ns = natsConnection_Flush(gp_bus_conn(bus));
	if (ns != NATS_OK) {
		st = gp_bus_status(ns, 0, "subscribe to inference requests", err);
		gp_server_stop(s);
		return st;
	}
	/* the default alias of a named model is loaded before the first request */
	if (strcmp(s->cfg.model, "*")) {
		struct gp_lm *lm = NULL;
		struct gp_err e2 = {0};
		long long chosen = 0;
		if (lookup(s, s->cfg.model, s->cfg.alias, 0, NULL, &lm, &chosen, &e2))
			gp_info("%s@%s not served yet: %s", s->cfg.model, s->cfg.alias, e2.msg);
		gp_lm_unref(lm);
	}
	gp_info("serving %s on %s (queue group %s), alias %s", s->cfg.model, subj, GP_QUEUE_INFER,
		s->cfg.alias);
	*out = s;
	return GP_OK;
}

struct gp_engine *gp_server_engine(struct gp_server *s) { return s->engine; }

void gp_server_stop(struct gp_server *s)
{
	if (!s)
		return;
	if (s->sub) {
		natsSubscription_Unsubscribe(s->sub);
		natsSubscription_Destroy(s->sub);
	}
	if (s->reg_sub) {
		natsSubscription_Unsubscribe(s->reg_sub);
		natsSubscription_Destroy(s->reg_sub);
	}
	/* in-flight requests finish (or end with shutting_down) and reply */
	gp_engine_destroy(s->engine);
	pthread_mutex_lock(&s->pmu);
	s->pstop = 1;
	pthread_cond_broadcast(&s->pcv);
	pthread_mutex_unlock(&s->pmu);
	pthread_join(s->pthread, NULL);
	pthread_mutex_lock(&s->tmu);
	s->tstop = 1;
	pthread_cond_broadcast(&s->tcv);
	pthread_mutex_unlock(&s->tmu);
	pthread_join(s->tthread, NULL);
	for (int i = 0; i < s->nloaded; i++)
		gp_lm_unref(s->loaded[i].lm);
	gp_bus_destroy(s->tbus_own);
	gp_db_destroy(s->db);
	free(s->ring);
	pthread_mutex_destroy(&s->db_mu);
	pthread_mutex_destroy(&s->mu);
	pthread_mutex_destroy(&s->load_mu);
	pthread_mutex_destroy(&s->tmu);
	pthread_cond_destroy(&s->tcv);
	pthread_mutex_destroy(&s->pmu);
	pthread_cond_destroy(&s->pcv);
	free(s);
}
