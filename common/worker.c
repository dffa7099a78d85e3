/*
 * worker.c: claim, heartbeat, fenced result, reap (see worker.h).
 *
 * All lease arithmetic uses the database clock (now()), so workers with
 * skewed clocks still agree on who holds a lease.
 */
#include "worker.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "log.h"
#include "outbox.h"
#include "subjects.h"

struct gp_worker {
	char *kind;
	char version[64];
	char worker_id[128];
	long long lease_ms, heartbeat_ms, ack_wait_ms, quick_result_ms;
	gp_job_fn handler;
	void *closure;
	struct gp_db *db;
	struct gp_db *hb_db;
	struct gp_bus *bus;
	natsSubscription *sub;
	char durable[96], filter[128];
	int prefetch;
	natsMsgList buf; /* fetched, not yet processed */
	int next;
	volatile int stop;
	volatile int *ext_stop; /* the service's signal flag, set by gp_worker_run */
	struct gp_metric *m_ok, *m_failed, *m_released, *m_dead, *m_lost_claim, *m_refused,
		*m_hb_fail, *m_seconds, *m_events_dropped;
	/* The heartbeat thread lives as long as the worker (a thread per job
	 * cost about a fifth of a short job's CPU). hb_job is the running job
	 * (NULL: none); hb_gen changes with every start and end of a job, so
	 * that a job at the same address is a new one; hb_busy: a heartbeat
	 * is in flight with hb_job, which must outlive it. */
	pthread_t hb;
	int hb_started, hb_quit, hb_busy;
	unsigned long hb_gen;
	struct gp_job *hb_job;
	pthread_mutex_t hb_mu;
	pthread_cond_t hb_cv;
};

struct gp_job {
	struct gp_worker *w;
	gp_stage_job *msg;
	natsMsg *nm;
	char token[40];
	volatile int lease_lost;
	enum gp_job_outcome outcome;
	char *outputs, *metrics, *error;
	long long reused_from; /* attempt whose outputs this one reuses; 0: none */
	long long started_ms;
};

static void *heartbeat_main(void *arg);

static void random_hex(char *out, size_t bytes)
{
	unsigned char b[32];
	if (bytes > sizeof b)
		bytes = sizeof b;
	if (getrandom(b, bytes, 0) != (ssize_t)bytes) {
		/* getrandom on Linux does not fail for <= 256 bytes once seeded;
		 * fall back to something unique rather than abort. */
		long long t = gp_wall_ms() ^ ((long long)getpid() << 20);
		memcpy(b, &t, sizeof t < bytes ? sizeof t : bytes);
	}
	for (size_t i = 0; i < bytes; i++)
		sprintf(out + 2 * i, "%02x", b[i]);
}

int gp_worker_quick_result(long long quick_result_ms, long long duration_ms)
{
	return quick_result_ms > 0 && duration_ms >= 0 && duration_ms < quick_result_ms;
}

gp_status gp_worker_create(struct gp_worker **out, const struct gp_worker_config *cfg,
			   struct gp_db *db, struct gp_bus *bus, const char *database_url,
			   struct gp_err *err)
{
	if (!gp_bus_token_ok(cfg->kind))
		return gp_err_set(err, GP_ERR_INVALID, "stage kind \"%s\" is not a DNS label",
				  cfg->kind ? cfg->kind : "");
	if (cfg->lease_ms <= 0 || cfg->heartbeat_ms <= 0 || cfg->heartbeat_ms >= cfg->lease_ms)
		return gp_err_set(err, GP_ERR_INVALID,
				  "worker: heartbeat (%lld ms) must be positive and shorter than the "
				  "lease (%lld ms)",
				  cfg->heartbeat_ms, cfg->lease_ms);
	if (cfg->quick_result_ms < 0)
		return gp_err_set(err, GP_ERR_INVALID,
				  "worker: quick_result_ms (%lld) must not be negative",
				  cfg->quick_result_ms);
	struct gp_worker *w = calloc(1, sizeof *w);
	if (!w)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	gp_status st;
	w->kind = strdup(cfg->kind);
	snprintf(w->version, sizeof w->version, "%s", cfg->version ? cfg->version : GENPIPE_VERSION);
	if (!w->kind) {
		st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		goto fail;
	}
	if (cfg->worker_id) {
		snprintf(w->worker_id, sizeof w->worker_id, "%s", cfg->worker_id);
	} else {
		char host[64] = "host", rnd[9];
		gethostname(host, sizeof host - 1);
		random_hex(rnd, 4);
		snprintf(w->worker_id, sizeof w->worker_id, "%s-%d-%s", host, (int)getpid(), rnd);
	}
	w->lease_ms = cfg->lease_ms;
	w->heartbeat_ms = cfg->heartbeat_ms;
	w->ack_wait_ms = cfg->ack_wait_ms > 0 ? cfg->ack_wait_ms : cfg->lease_ms;
	w->quick_result_ms = cfg->quick_result_ms;
	w->handler = cfg->handler;
	w->prefetch = cfg->prefetch > 0 ? (cfg->prefetch > GP_BUS_FETCH_MAX ? GP_BUS_FETCH_MAX
									  : cfg->prefetch)
					: 1;
	w->closure = cfg->closure;
	w->db = db;
	w->bus = bus;
	struct gp_consumer_def cd = gp_bus_job_consumer(w->kind, w->durable, sizeof w->durable,
							 w->filter, sizeof w->filter, w->ack_wait_ms);
	int ns;
	const struct gp_stream_def *streams = gp_bus_default_streams(&ns);
	if ((st = gp_bus_declare(bus, streams, ns, &cd, 1, err)))
		goto fail;
	if ((st = gp_bus_pull_subscribe(bus, &cd, &w->sub, err)))
		goto fail;
	if ((st = gp_db_connect(&w->hb_db, database_url, 10000, err)))
		goto fail;
	{
		pthread_condattr_t ca;
		pthread_condattr_init(&ca);
		pthread_condattr_setclock(&ca, CLOCK_MONOTONIC); /* deadlines ignore clock steps */
		pthread_mutex_init(&w->hb_mu, NULL);
		pthread_cond_init(&w->hb_cv, &ca);
		pthread_condattr_destroy(&ca);
		if (pthread_create(&w->hb, NULL, heartbeat_main, w) != 0) {
			pthread_mutex_destroy(&w->hb_mu);
			pthread_cond_destroy(&w->hb_cv);
			st = gp_err_set(err, GP_ERR_INTERNAL, "could not start the heartbeat thread");
			goto fail;
		}
		w->hb_started = 1;
	}
	/* Register the kind's code version: a new version invalidates cached
	 * results of this kind. */
	{
		const char *p[] = { w->kind, cfg->version ? cfg->version : GENPIPE_VERSION };
		if ((st = gp_db_exec(db, "register stage kind",
				     "INSERT INTO stage_kinds (kind, version) VALUES ($1, $2) "
				     "ON CONFLICT (kind) DO UPDATE SET version = EXCLUDED.version, "
				     "updated_at = now()",
				     2, p, NULL, err)))
			goto fail;
	}
	struct gp_metrics *m = cfg->metrics;
	if (m) {
		char lab[160];
		snprintf(lab, sizeof lab, "kind=\"%s\",outcome=\"succeeded\"", w->kind);
		w->m_ok = gp_metrics_get(m, GP_COUNTER, "genpipe_jobs_total",
					 "Stage jobs finished by this worker", lab, NULL, 0);
		snprintf(lab, sizeof lab, "kind=\"%s\",outcome=\"failed\"", w->kind);
		w->m_failed = gp_metrics_get(m, GP_COUNTER, "genpipe_jobs_total",
					     "Stage jobs finished by this worker", lab, NULL, 0);
		snprintf(lab, sizeof lab, "kind=\"%s\",outcome=\"released\"", w->kind);
		w->m_released = gp_metrics_get(m, GP_COUNTER, "genpipe_jobs_total",
					       "Stage jobs finished by this worker", lab, NULL, 0);
		snprintf(lab, sizeof lab, "kind=\"%s\"", w->kind);
		w->m_dead = gp_metrics_get(m, GP_COUNTER, "genpipe_dead_letters_total",
					   "Messages terminated and recorded as dead letters", lab,
					   NULL, 0);
		w->m_lost_claim = gp_metrics_get(m, GP_COUNTER, "genpipe_claims_lost_total",
						 "Job messages dropped because the attempt was not "
						 "queued",
						 lab, NULL, 0);
		w->m_refused = gp_metrics_get(m, GP_COUNTER, "genpipe_results_refused_total",
					      "Results refused because the lease was lost", lab,
					      NULL, 0);
		w->m_hb_fail = gp_metrics_get(m, GP_COUNTER, "genpipe_heartbeat_failures_total",
					      "Heartbeats that could not extend the lease", lab,
					      NULL, 0);
		w->m_events_dropped = gp_metrics_get(m, GP_COUNTER,
						     "genpipe_progress_events_dropped_total",
						     "Progress events that could not be published",
						     lab, NULL, 0);
		static const double b[] = { 0.1, 0.5, 1, 5, 15, 60, 300, 1800, 7200 };
		w->m_seconds = gp_metrics_get(m, GP_HISTOGRAM, "genpipe_job_duration_seconds",
					      "Wall time of stage jobs", lab, b, 9);
	}
	*out = w;
	return GP_OK;
fail:
	gp_worker_destroy(w);
	return st;
}

void gp_worker_destroy(struct gp_worker *w)
{
	if (!w)
		return;
	/* Give back what was fetched but not started, so others take it now
	 * rather than after AckWait. */
	for (int i = w->next; i < w->buf.Count; i++)
		if (w->buf.Msgs[i])
			natsMsg_Nak(w->buf.Msgs[i], NULL);
	natsMsgList_Destroy(&w->buf);
	if (w->sub) {
		natsSubscription_Unsubscribe(w->sub);
		natsSubscription_Destroy(w->sub);
	}
	if (w->hb_started) {
		pthread_mutex_lock(&w->hb_mu);
		w->hb_quit = 1;
		pthread_cond_broadcast(&w->hb_cv);
		pthread_mutex_unlock(&w->hb_mu);
		pthread_join(w->hb, NULL);
		pthread_mutex_destroy(&w->hb_mu);
		pthread_cond_destroy(&w->hb_cv);
	}
	gp_db_destroy(w->hb_db);
	free(w->kind);
	free(w);
}

const char *gp_worker_id(const struct gp_worker *w)
{
	return w->worker_id;
}

const gp_stage_job *gp_job_msg(const struct gp_job *job)
{
	return job->msg;
}

struct gp_db *gp_job_db(const struct gp_job *job)
{
	return job->w->db;
}

const char *gp_job_lease_token(const struct gp_job *job)
{
	return job->token;
}

int gp_job_should_stop(const struct gp_job *job)
{
	if (job->lease_lost)
		return 1;
	if (job->w->stop || (job->w->ext_stop && *job->w->ext_stop))
		return 2;
	return 0;
}

static void set_str(char **dst, const char *s)
{
	free(*dst);
	*dst = s ? strdup(s) : NULL;
}

void gp_job_succeed(struct gp_job *job, const char *outputs_json, const char *metrics_json)
{
	job->outcome = GP_JOB_SUCCEEDED;
	set_str(&job->outputs, outputs_json);
	set_str(&job->metrics, metrics_json);
}

void gp_job_succeed_reused(struct gp_job *job, const char *outputs_json, long long from_attempt)
{
	gp_job_succeed(job, outputs_json, NULL);
	char m[64];
	snprintf(m, sizeof m, "{\"reused_attempt\":%lld}", from_attempt);
	set_str(&job->metrics, m);
	job->reused_from = from_attempt;
}

gp_status gp_job_reuse_lookup(struct gp_job *job, const char *fingerprint, char **outputs_json,
			      long long *from_attempt, struct gp_err *err)
{
	struct gp_worker *w = job->w;
	*outputs_json = NULL;
	*from_attempt = 0;
	const char *version = w->version;
	const char *params = job->msg->params_json ? job->msg->params_json : "";
	size_t kl = strlen(w->kind) + strlen(version) + strlen(params) + strlen(fingerprint) + 8;
	char *keytext = malloc(kl), key[65], id[24];
	if (!keytext)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	snprintf(keytext, kl, "%s\n%s\n%s\n%s", w->kind, version, params, fingerprint);
	gp_sha256_hex(keytext, strlen(keytext), key);
	free(keytext);
	snprintf(id, sizeof id, "%lld", (long long)job->msg->attempt_id);
	const char *p[] = { id, job->token, key, w->kind };
	PGresult *r = NULL;
	gp_status st = gp_db_exec(w->db, "look up reusable attempt",
				  "WITH k AS (UPDATE stage_attempts SET input_key = $3 "
				  "WHERE id = $1::bigint AND lease_token = $2) "
				  "SELECT coalesce(reused_from, id), outputs::text FROM stage_attempts "
				  "WHERE kind = $4 AND input_key = $3 AND state = 'succeeded' "
				  "AND outputs IS NOT NULL AND id <> $1::bigint "
				  "ORDER BY id DESC LIMIT 1",
				  4, p, &r, err);
	if (!st && PQntuples(r) == 1) {
		*from_attempt = atoll(PQgetvalue(r, 0, 0));
		*outputs_json = strdup(PQgetvalue(r, 0, 1));
		if (!*outputs_json)
			st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	}
	PQclear(r);
	return st;
}

void gp_job_fail(struct gp_job *job, int permanent, const char *error)
{
	job->outcome = permanent ? GP_JOB_FAILED_PERMANENT : GP_JOB_FAILED;
	set_str(&job->error, error ? error : "failed");
}

void gp_job_release(struct gp_job *job, const char *reason)
{
	job->outcome = GP_JOB_RELEASED;
	set_str(&job->error, reason ? reason : "released");
}

void gp_job_progress(struct gp_job *job, double fraction, const char *message,
		     const char *metrics_json)
{
	gp_stage_event ev = GENPIPE__V1__STAGE_EVENT__INIT;
	ev.attempt_id = job->msg->attempt_id;
	ev.run_id = job->msg->run_id;
	ev.stage = job->msg->stage;
	ev.type = GENPIPE__V1__EVENT_TYPE__EVENT_PROGRESS;
	ev.progress = fraction;
	ev.message = (char *)(message ? message : "");
	ev.metrics_json = (char *)(metrics_json ? metrics_json : "");
	ev.time_unix_ms = gp_wall_ms();
	ev.worker = job->w->worker_id;
	uint8_t *buf = NULL;
	size_t len = 0;
	struct gp_err err = { 0 };
	char subj[64];
	snprintf(subj, sizeof subj, GP_SUBJ_EVENTS "%lld", (long long)job->msg->run_id);
	/* Core publish: the events stream still records it, and progress must
	 * never hold up the work it reports on. */
	if (gp_wire_encode(&ev.base, &buf, &len, &err) ||
	    gp_bus_publish_core(job->w->bus, subj, buf, (int)len, &err)) {
		gp_metric_inc(job->w->m_events_dropped, 1);
		gp_warn("progress event for attempt %lld dropped: %s",
			(long long)job->msg->attempt_id, err.msg);
	}
	free(buf);
}

/* One heartbeat of job: extend its lease, or learn that it is lost. */
static void heartbeat(struct gp_worker *w, struct gp_job *job)
{
	char id[24], lease[24];
	snprintf(id, sizeof id, "%lld", (long long)job->msg->attempt_id);
	snprintf(lease, sizeof lease, "%lld", w->lease_ms);
	const char *p[] = { id, job->token, lease };
	PGresult *r = NULL;
	struct gp_err err = { 0 };
	gp_status st = gp_db_exec(w->hb_db, "extend lease",
				  "UPDATE stage_attempts SET lease_deadline = now() + $3::integer * "
				  "interval '1 millisecond', heartbeat_at = now() "
				  "WHERE id = $1::bigint AND lease_token = $2 AND state = 'running' "
				  "AND lease_deadline > now()",
				  3, p, &r, &err);
	if (st == GP_OK && atoi(PQcmdTuples(r)) == 1) {
		struct gp_err e2 = { 0 };
		if (gp_bus_in_progress(job->nm, &e2))
			gp_warn("attempt %s: in-progress ack failed: %s", id, e2.msg);
	} else if (st == GP_OK) {
		job->lease_lost = 1;
		gp_metric_inc(w->m_hb_fail, 1);
		gp_warn("attempt %s: lease lost (expired or taken over); stopping", id);
	} else {
		gp_metric_inc(w->m_hb_fail, 1);
		gp_warn("attempt %s: heartbeat failed: %s", id, err.msg);
		gp_db_ok(w->hb_db);
	}
	PQclear(r);
}

static void deadline_in(struct timespec *ts, long long ms)
{
	clock_gettime(CLOCK_MONOTONIC, ts);
	long long ns = ts->tv_nsec + (ms % 1000) * 1000000LL;
	ts->tv_sec += ms / 1000 + ns / 1000000000LL;
	ts->tv_nsec = ns % 1000000000LL;
}

static int reached(const struct timespec *t)
{
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	return now.tv_sec > t->tv_sec || (now.tv_sec == t->tv_sec && now.tv_nsec >= t->tv_nsec);
}

/* Every heartbeat_ms while a job runs (the first heartbeat_ms after it
 * starts); none after its lease is lost; idle between jobs. */
static void *heartbeat_main(void *arg)
{
	struct gp_worker *w = arg;
	pthread_mutex_lock(&w->hb_mu);
	while (!w->hb_quit) {
		if (!w->hb_job) {
			pthread_cond_wait(&w->hb_cv, &w->hb_mu);
			continue;
		}
		struct gp_job *job = w->hb_job;
		unsigned long gen = w->hb_gen;
		struct timespec due;
		deadline_in(&due, w->heartbeat_ms);
		while (!w->hb_quit && w->hb_gen == gen) {
			if (job->lease_lost) {
				pthread_cond_wait(&w->hb_cv, &w->hb_mu);
				continue;
			}
			pthread_cond_timedwait(&w->hb_cv, &w->hb_mu, &due);
			if (w->hb_quit || w->hb_gen != gen || !reached(&due))
				continue;
			w->hb_busy = 1;
			pthread_mutex_unlock(&w->hb_mu);
			heartbeat(w, job);
			pthread_mutex_lock(&w->hb_mu);
			w->hb_busy = 0;
			pthread_cond_broadcast(&w->hb_cv);
			deadline_in(&due, w->heartbeat_ms);
		}
	}
	pthread_mutex_unlock(&w->hb_mu);
	return NULL;
}

/* job starts (non-NULL) or ends (NULL, after which no heartbeat uses it). */
static void heartbeat_for(struct gp_worker *w, struct gp_job *job)
{
	pthread_mutex_lock(&w->hb_mu);
	w->hb_job = job;
	w->hb_gen++;
	pthread_cond_broadcast(&w->hb_cv);
	while (!job && w->hb_busy)
		pthread_cond_wait(&w->hb_cv, &w->hb_mu);
	pthread_mutex_unlock(&w->hb_mu);
}

gp_status gp_dead_letter(struct gp_db *db, const char *stream, const char *consumer,
			 const char *subject, unsigned long long stream_seq, const void *payload,
			 size_t len, const char *reason, struct gp_err *err)
{
	char *hex = gp_db_bytea_param(payload, len);
	if (!hex)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	char seq[24];
	snprintf(seq, sizeof seq, "%llu", stream_seq);
	const char *p[] = { stream, consumer, subject, seq, hex, reason };
	gp_status st = gp_db_exec(db, "record dead letter",
				  "INSERT INTO dead_letters (stream, consumer, subject, stream_seq, "
				  "payload, reason) VALUES ($1, $2, $3, $4::bigint, $5::bytea, $6) "
				  "ON CONFLICT (stream, stream_seq) DO NOTHING",
				  6, p, NULL, err);
	free(hex);
	return st;
}

static gp_status result_message(struct gp_db *db, long long attempt_id, long long run_id,
				const char *stage, int attempt, Genpipe__V1__ResultStatus status,
				const char *outputs, const char *metrics, const char *error,
				const char *worker, long long duration_ms, struct gp_err *err)
{
	gp_stage_result res = GENPIPE__V1__STAGE_RESULT__INIT;
	res.attempt_id = attempt_id;
	res.run_id = run_id;
	res.stage = (char *)stage;
	res.attempt = (uint32_t)attempt;
	res.status = status;
	res.outputs_json = (char *)(outputs ? outputs : "");
	res.metrics_json = (char *)(metrics ? metrics : "");
	res.error = (char *)(error ? error : "");
	res.worker = (char *)(worker ? worker : "");
	res.duration_ms = duration_ms;
	uint8_t *buf = NULL;
	size_t len = 0;
	gp_status st = gp_wire_encode(&res.base, &buf, &len, err);
	if (st)
		return st;
	char subj[64];
	snprintf(subj, sizeof subj, GP_SUBJ_RESULTS "%lld", run_id);
	st = gp_outbox_put(db, subj, buf, len, NULL, err);
	free(buf);
	return st;
}

/* The StageJob message of an attempt and its subject (96 bytes). */
static gp_status job_message(long long id, long long run_id, const char *stage, const char *kind,
			     int attempt, const char *params_json, long long timeout_ms,
			     uint8_t **buf, size_t *len, char *subject, struct gp_err *err)
{
	gp_stage_job job = GENPIPE__V1__STAGE_JOB__INIT;
	job.attempt_id = id;
	job.run_id = run_id;
	job.stage = (char *)stage;
	job.kind = (char *)kind;
	job.attempt = (uint32_t)attempt;
	job.params_json = (char *)params_json;
	job.timeout_ms = timeout_ms > 0 ? timeout_ms : 86400000LL;
	snprintf(subject, 96, GP_SUBJ_JOBS "%s", kind);
	return gp_wire_encode(&job.base, buf, len, err);
}

static int cmp_ll(const void *a, const void *b)
{
	long long x = *(const long long *)a, y = *(const long long *)b;
	return (x > y) - (x < y);
}

gp_status gp_attempts_enqueue(struct gp_db *db, const struct gp_attempt_spec *specs, int n,
			      long long *attempt_ids, struct gp_outbox_direct *direct,
			      struct gp_err *err)
{
	if (n <= 0)
		return GP_OK;
	struct gp_db_array a[8] = { 0 };
	for (int i = 0; i < n; i++) {
		const struct gp_attempt_spec *s = &specs[i];
		if (!gp_bus_token_ok(s->kind) || !gp_bus_token_ok(s->stage)) {
			gp_db_arrays_free(a, 8);
			return gp_err_set(err, GP_ERR_INVALID,
					  "enqueue: stage \"%s\" and kind \"%s\" must be DNS labels",
					  s->stage ? s->stage : "", s->kind ? s->kind : "");
		}
		gp_db_array_add_int(&a[0], s->run_id);
		gp_db_array_add(&a[1], s->stage);
		gp_db_array_add(&a[2], s->kind);
		gp_db_array_add_int(&a[3], s->attempt);
		gp_db_array_add(&a[4], s->params_json && *s->params_json ? s->params_json : "{}");
		gp_db_array_add_int(&a[5], s->lease_ms > 0 ? s->lease_ms : 30000);
		gp_db_array_add_int(&a[6], s->max_attempts > 0 ? s->max_attempts : 3);
		gp_db_array_add_int(&a[7], s->timeout_ms > 0 ? s->timeout_ms : 86400000LL);
	}
	const char *p[8];
	gp_status st = gp_db_arrays_text(a, 8, p, err);
	PGresult *r = NULL;
	/* one statement for the batch; rows come back by position (ordinality) */
	if (!st)
		st = gp_db_exec(db, "insert stage attempts",
				"INSERT INTO stage_attempts (run_id, stage, kind, attempt, params, "
				"lease_ms, max_attempts, timeout_ms) SELECT r, s, k, a, p::jsonb, l, m, t "
				"FROM unnest($1::bigint[], $2::text[], $3::text[], $4::integer[], "
				"$5::text[], $6::integer[], $7::integer[], $8::bigint[]) WITH ORDINALITY "
				"AS u(r, s, k, a, p, l, m, t, o) ORDER BY o "
				"RETURNING id, run_id, stage, params::text",
				8, p, &r, err);
	gp_db_arrays_free(a, 8);
	if (st)
		return st;
	if (PQntuples(r) != n) {
		PQclear(r);
		return gp_err_set(err, GP_ERR_INTERNAL, "enqueue: %d attempts written for %d",
				  PQntuples(r), n);
	}
	struct gp_db_array m[2] = { 0 }; /* the outbox rows' subjects and payloads */
	/* the job messages, kept for a direct publish, in row order */
	uint8_t **bufs = direct ? calloc((size_t)n, sizeof *bufs) : NULL;
	size_t *lens = direct ? calloc((size_t)n, sizeof *lens) : NULL;
	char (*subjects)[96] = direct ? calloc((size_t)n, sizeof *subjects) : NULL;
	if (direct && (!bufs || !lens || !subjects))
		st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	for (int i = 0; i < n && !st; i++) {
		/* match each row to its spec by (run, stage), unique in a batch */
		int j = -1;
		for (int k = 0; k < n && j < 0; k++)
			if (atoll(PQgetvalue(r, i, 1)) == specs[k].run_id &&
			    !strcmp(PQgetvalue(r, i, 2), specs[k].stage))
				j = k;
		if (j < 0) {
			st = gp_err_set(err, GP_ERR_INTERNAL, "enqueue: an attempt row matches no spec");
			break;
		}
		const struct gp_attempt_spec *s = &specs[j];
		long long id = atoll(PQgetvalue(r, i, 0));
		uint8_t *buf = NULL;
		size_t len = 0;
		char *hex = NULL;
		char subject[96];
		if (!(st = job_message(id, s->run_id, s->stage, s->kind, s->attempt,
				       PQgetvalue(r, i, 3), s->timeout_ms, &buf, &len, subject, err))) {
			if (!(hex = gp_db_bytea_param(buf, len)))
				st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
			gp_db_array_add(&m[0], subject);
			gp_db_array_add(&m[1], hex);
			if (direct) {
				memcpy(subjects[i], subject, sizeof subject);
				lens[i] = len;
				bufs[i] = buf;
				buf = NULL;
			}
		}
		free(hex);
		free(buf);
		if (attempt_ids)
			attempt_ids[j] = id;
	}
	PQclear(r);
	const char *op[2] = { NULL, NULL };
	if (!st)
		st = gp_db_arrays_text(m, 2, op, err);
	r = NULL;
	if (!st)
		st = gp_db_exec(db, "insert outbox messages",
				"INSERT INTO outbox (subject, payload) SELECT s, p FROM "
				"unnest($1::text[], $2::bytea[]) WITH ORDINALITY AS u(s, p, o) ORDER BY o "
				"RETURNING id",
				2, op, direct ? &r : NULL, err);
	gp_db_arrays_free(m, 2);
	if (!st && direct) {
		/* ids come from the sequence in row order (ORDER BY o): the
		 * ascending ids are the messages in order */
		long long *ids = calloc((size_t)n, sizeof *ids);
		if (!ids || PQntuples(r) != n)
			st = ids ? gp_err_set(err, GP_ERR_INTERNAL, "enqueue: %d outbox rows for %d",
					      PQntuples(r), n)
				 : gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		for (int i = 0; !st && i < n; i++)
			ids[i] = atoll(PQgetvalue(r, i, 0));
		if (!st)
			qsort(ids, (size_t)n, sizeof *ids, cmp_ll);
		for (int i = 0; !st && i < n; i++)
			st = gp_outbox_direct_add(direct, ids[i], subjects[i], bufs[i], lens[i], err);
		free(ids);
	}
	PQclear(r);
	for (int i = 0; bufs && i < n; i++)
		free(bufs[i]);
	free(bufs);
	free(lens);
	free(subjects);
	return st;
}

gp_status gp_attempt_enqueue(struct gp_db *db, const struct gp_attempt_spec *s,
			     long long *attempt_id, struct gp_err *err)
{
	return gp_attempts_enqueue(db, s, 1, attempt_id, NULL, err);
}

/*
 * Finish a locked attempt row's successor: queue attempt+1 or, when the
 * attempts are used up, publish the stage's failure. Runs in the caller's
 * transaction.
 */
static gp_status requeue(struct gp_db *db, PGresult *row, int i, int count_attempt,
			 const char *why, struct gp_err *err)
{
	long long id = atoll(PQgetvalue(row, i, 0));
	long long run_id = atoll(PQgetvalue(row, i, 1));
	const char *stage = PQgetvalue(row, i, 2);
	const char *kind = PQgetvalue(row, i, 3);
	int attempt = atoi(PQgetvalue(row, i, 4));
	const char *params = PQgetvalue(row, i, 5);
	long long lease_ms = atoll(PQgetvalue(row, i, 6));
	int max_attempts = atoi(PQgetvalue(row, i, 7));
	long long timeout_ms = atoll(PQgetvalue(row, i, 9));
	if (!count_attempt)
		max_attempts++;
	if (attempt >= max_attempts) {
		char msg[300];
		snprintf(msg, sizeof msg, "%s; %d of %d attempts used", why, attempt, max_attempts);
		return result_message(db, id, run_id, stage, attempt,
				      GENPIPE__V1__RESULT_STATUS__RESULT_FAILED, NULL, NULL, msg,
				      NULL, 0, err);
	}
	struct gp_attempt_spec s = {
		.run_id = run_id,
		.stage = stage,
		.kind = kind,
		.attempt = attempt + 1,
		.params_json = params,
		.lease_ms = lease_ms,
		.max_attempts = max_attempts,
		.timeout_ms = timeout_ms,
	};
	return gp_attempt_enqueue(db, &s, NULL, err);
}

/*
 * In one transaction: an UPDATE ... RETURNING that claims rows (FOR UPDATE
 * SKIP LOCKED), then row(db, result, i) for each, which writes what must
 * follow in the same transaction. *n gets the rows on success.
 */
static gp_status update_then_each(struct gp_db *db, const char *what, const char *sql, int np,
				  const char *const *p,
				  gp_status (*row)(struct gp_db *, PGresult *, int, struct gp_err *),
				  int *n_out, struct gp_err *err)
{
	PGresult *r = NULL;
	int n = 0;
	if (n_out)
		*n_out = 0;
	gp_status st = gp_db_begin(db, err);
	if (st)
		return st;
	if (!(st = gp_db_exec(db, what, sql, np, p, &r, err))) {
		n = PQntuples(r);
		for (int i = 0; i < n && !st; i++)
			st = row(db, r, i, err);
	}
	if (!st)
		st = gp_db_commit(db, err);
	if (st)
		gp_db_rollback(db);
	PQclear(r);
	if (!st && n_out)
		*n_out = n;
	return st;
}

static gp_status reap_row(struct gp_db *db, PGresult *r, int i, struct gp_err *err)
{
	gp_info("run %s stage %s attempt %s: lease of worker \"%s\" expired", PQgetvalue(r, i, 1),
		PQgetvalue(r, i, 2), PQgetvalue(r, i, 4), PQgetvalue(r, i, 8));
	return requeue(db, r, i, 1, "lease expired", err);
}

gp_status gp_lease_reap(struct gp_db *db, int max, int *reaped, struct gp_err *err)
{
	char maxs[16];
	snprintf(maxs, sizeof maxs, "%d", max > 0 ? max : 100);
	const char *p[] = { maxs };
	return update_then_each(
		db, "find expired leases",
		"UPDATE stage_attempts SET state = 'expired', finished_at = now(), "
		"error = 'lease expired: worker ' || coalesce(worker, '?') || "
		"' stopped heartbeating' "
		"WHERE id IN (SELECT id FROM stage_attempts WHERE state = 'running' "
		"AND lease_deadline < now() ORDER BY lease_deadline LIMIT $1::integer "
		"FOR UPDATE SKIP LOCKED) "
		"RETURNING id, run_id, stage, kind, attempt, params::text, lease_ms, "
		"max_attempts, worker, timeout_ms",
		1, p, reap_row, reaped, err);
}

/* The job message of a re-dispatched attempt, again, into the outbox. */
static gp_status redispatch_row(struct gp_db *db, PGresult *r, int i, struct gp_err *err)
{
	uint8_t *buf = NULL;
	size_t len = 0;
	char subject[96];
	gp_info("run %s stage %s attempt %s: still queued; job message published again (%s)",
		PQgetvalue(r, i, 1), PQgetvalue(r, i, 2), PQgetvalue(r, i, 4), PQgetvalue(r, i, 7));
	gp_status st = job_message(atoll(PQgetvalue(r, i, 0)), atoll(PQgetvalue(r, i, 1)),
				   PQgetvalue(r, i, 2), PQgetvalue(r, i, 3),
				   atoi(PQgetvalue(r, i, 4)), PQgetvalue(r, i, 5),
				   atoll(PQgetvalue(r, i, 6)), &buf, &len, subject, err);
	if (!st)
		st = gp_outbox_put(db, subject, buf, len, NULL, err);
	free(buf);
	return st;
}

gp_status gp_attempts_redispatch(struct gp_db *db, long long after_ms, int max, int *n,
				 struct gp_err *err)
{
	char afters[24], maxs[16];
	snprintf(afters, sizeof afters, "%lld", after_ms > 0 ? after_ms : 1);
	snprintf(maxs, sizeof maxs, "%d", max > 0 ? max : 100);
	const char *p[] = { afters, maxs };
	/* waited after_ms since queued, then 2x, 4x, ... (at most 64x) since the
	 * last time: a long queue costs a copy now and then, not one a sweep */
	return update_then_each(
		db, "find undelivered attempts",
		"UPDATE stage_attempts SET redispatched_at = now(), "
		"redispatches = redispatches + 1 "
		"WHERE id IN (SELECT id FROM stage_attempts WHERE state = 'queued' "
		"AND coalesce(redispatched_at, queued_at) < now() - "
		"make_interval(secs => $1::double precision / 1000 * "
		"power(2, least(redispatches, 6))) "
		"ORDER BY queued_at LIMIT $2::integer FOR UPDATE SKIP LOCKED) "
		"RETURNING id, run_id, stage, kind, attempt, params::text, timeout_ms, "
		"redispatches",
		2, p, redispatch_row, n, err);
}

/* Write the handler's outcome, fenced by the lease. *accepted = 0 when refused. */
static gp_status commit_result(struct gp_worker *w, struct gp_job *job, int *accepted,
			       struct gp_err *err)
{
	static const char *const states[] = {
		[GP_JOB_SUCCEEDED] = "succeeded",
		[GP_JOB_FAILED] = "failed",
		[GP_JOB_FAILED_PERMANENT] = "failed",
		[GP_JOB_RELEASED] = "released",
	};
	char id[24];
	snprintf(id, sizeof id, "%lld", (long long)job->msg->attempt_id);
	const char *outputs = job->outputs && *job->outputs ? job->outputs : NULL;
	const char *metrics = job->metrics && *job->metrics ? job->metrics : NULL;
	const char *retryable = job->outcome == GP_JOB_FAILED_PERMANENT ? "false" : "true";
	char reused[24];
	snprintf(reused, sizeof reused, "%lld", job->reused_from);
	const char *p[] = { id,	     job->token, states[job->outcome], outputs, metrics, job->error,
			    retryable, job->reused_from > 0 ? reused : NULL };
	PGresult *r = NULL;
	*accepted = 0;
	gp_status st;
	if (job->outcome != GP_JOB_RELEASED) {
		/* The common case in one statement (one round trip, one commit): the
		 * fenced UPDATE and, only when it matched, the outbox row. */
		Genpipe__V1__ResultStatus rs0 =
			job->outcome == GP_JOB_SUCCEEDED ? GENPIPE__V1__RESULT_STATUS__RESULT_SUCCEEDED
			: job->outcome == GP_JOB_FAILED_PERMANENT
				? GENPIPE__V1__RESULT_STATUS__RESULT_FAILED_PERMANENT
				: GENPIPE__V1__RESULT_STATUS__RESULT_FAILED;
		gp_stage_result res = GENPIPE__V1__STAGE_RESULT__INIT;
		res.attempt_id = job->msg->attempt_id;
		res.run_id = job->msg->run_id;
		res.stage = job->msg->stage;
		res.attempt = job->msg->attempt;
		res.status = rs0;
		res.outputs_json = (char *)(outputs ? outputs : "");
		res.metrics_json = (char *)(metrics ? metrics : "");
		res.error = job->error ? job->error : "";
		res.worker = w->worker_id;
		res.duration_ms = gp_now_ms() - job->started_ms;
		uint8_t *buf = NULL;
		size_t len = 0;
		if ((st = gp_wire_encode(&res.base, &buf, &len, err)))
			return st;
		char *hex = gp_db_bytea_param(buf, len);
		free(buf);
		if (!hex)
			return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		char subj[64];
		snprintf(subj, sizeof subj, GP_SUBJ_RESULTS "%lld", (long long)job->msg->run_id);
		int quick = gp_worker_quick_result(w->quick_result_ms, res.duration_ms);
		const char *p11[] = { id,	  job->token, states[job->outcome],
				      outputs,	  metrics,    job->error,
				      retryable, subj,	      hex,
				      p[7],	  quick ? "off" : "on" };
		/* A quick attempt's result does not wait for the WAL flush: a
		 * database crash in the next few hundred milliseconds may lose
		 * it, and the attempt runs again (lease expiry or re-dispatch), at
		 * the cost of a quick attempt. Anything later that depends on it
		 * (the advance's commit) flushes it first, being later in the WAL. */
		st = gp_db_exec(w->db, "record attempt result",
				"WITH u AS (UPDATE stage_attempts SET state = $3, finished_at = now(), "
				"outputs = $4::jsonb, metrics = $5::jsonb, error = $6, "
				"lease_deadline = NULL, retryable = $7::boolean, "
				"reused_from = $10::bigint "
				"WHERE id = $1::bigint AND lease_token = $2 AND state = 'running' "
				"AND lease_deadline > now() RETURNING id), "
				"sync AS (SELECT set_config('synchronous_commit', $11, true)) "
				"INSERT INTO outbox (subject, payload) SELECT $8, $9::bytea FROM u, sync "
				"RETURNING id",
				11, p11, &r, err);
		free(hex);
		if (!st)
			*accepted = PQntuples(r) == 1;
		PQclear(r);
		return st;
	}
	st = gp_db_begin(w->db, err);
	if (st)
		return st;
	st = gp_db_exec(w->db, "record attempt result",
			"UPDATE stage_attempts SET state = $3, finished_at = now(), "
			"outputs = $4::jsonb, metrics = $5::jsonb, error = $6, lease_deadline = NULL, "
			"retryable = $7::boolean, reused_from = $8::bigint "
			"WHERE id = $1::bigint AND lease_token = $2 AND state = 'running' "
			"AND lease_deadline > now() "
			"RETURNING id, run_id, stage, kind, attempt, params::text, lease_ms, "
			"max_attempts, (extract(epoch FROM now() - claimed_at) * 1000)::bigint, "
			"timeout_ms",
			8, p, &r, err);
	if (st)
		goto out;
	if (PQntuples(r) == 0)
		goto out; /* refused: not ours any more */
	Genpipe__V1__ResultStatus rs;
	switch (job->outcome) {
	case GP_JOB_SUCCEEDED:
		rs = GENPIPE__V1__RESULT_STATUS__RESULT_SUCCEEDED;
		break;
	case GP_JOB_FAILED_PERMANENT:
		rs = GENPIPE__V1__RESULT_STATUS__RESULT_FAILED_PERMANENT;
		break;
	case GP_JOB_RELEASED:
		rs = GENPIPE__V1__RESULT_STATUS__RESULT_RELEASED;
		break;
	default:
		rs = GENPIPE__V1__RESULT_STATUS__RESULT_FAILED;
	}
	st = result_message(w->db, job->msg->attempt_id, job->msg->run_id, job->msg->stage,
			    (int)job->msg->attempt, rs, outputs, metrics, job->error, w->worker_id,
			    atoll(PQgetvalue(r, 0, 8)), err);
	if (!st && job->outcome == GP_JOB_RELEASED)
		st = requeue(w->db, r, 0, 0, "released", err);
	if (st)
		goto out;
	*accepted = 1;
out:
	if (!st && *accepted)
		st = gp_db_commit(w->db, err);
	if (st || !*accepted)
		gp_db_rollback(w->db);
	PQclear(r);
	return st;
}

static gp_status dead_letter_msg(struct gp_worker *w, natsMsg *m, const char *reason,
				 struct gp_err *err)
{
	struct gp_msg_meta meta = { 0 };
	gp_status st = gp_bus_meta(m, &meta, err);
	if (st)
		return st;
	gp_warn("dead letter %s seq %llu: %s", meta.stream, (unsigned long long)meta.stream_seq,
		reason);
	st = gp_dead_letter(w->db, meta.stream, meta.consumer, natsMsg_GetSubject(m),
			    meta.stream_seq, natsMsg_GetData(m), (size_t)natsMsg_GetDataLength(m),
			    reason, err);
	if (st)
		return st;
	gp_metric_inc(w->m_dead, 1);
	/* Recorded first, then terminated: a crash in between redelivers and
	 * the insert is a no-op the second time. */
	return gp_bus_term(m, err);
}

/* Claim the attempt. *claimed = 1 when we own it; otherwise the message was
 * acked (lost claim) or dead-lettered. */
static gp_status claim(struct gp_worker *w, struct gp_job *job, int *claimed, struct gp_err *err)
{
	char id[24], run[24], att[16], lease[24];
	snprintf(id, sizeof id, "%lld", (long long)job->msg->attempt_id);
	snprintf(run, sizeof run, "%lld", (long long)job->msg->run_id);
	snprintf(att, sizeof att, "%u", job->msg->attempt);
	snprintf(lease, sizeof lease, "%lld", w->lease_ms);
	random_hex(job->token, 16);
	const char *p[] = { id, job->token, lease, w->worker_id, run, att, w->kind, job->msg->stage };
	PGresult *r = NULL;
	*claimed = 0;
	/* Every identifying field must match the row, not just the id: a message
	 * is only ever a pointer to the row it was written with. The claim does
	 * not wait for the WAL flush: lost in a database crash, the attempt is
	 * queued again and the unacked message comes back to claim it; our
	 * heartbeats and result are then refused by the lease token. */
	gp_status st = gp_db_exec(
		w->db, "claim attempt",
		"UPDATE stage_attempts SET state = 'running', lease_token = $2, "
		"lease_deadline = now() + $3::integer * interval '1 millisecond', worker = $4, "
		"claimed_at = clock_timestamp(), heartbeat_at = now() "
		"FROM (SELECT set_config('synchronous_commit', 'off', true)) AS async "
		"WHERE id = $1::bigint AND state = 'queued' AND run_id = $5::bigint "
		"AND attempt = $6::integer AND kind = $7 AND stage = $8 RETURNING id",
		8, p, &r, err);
	if (st)
		return st;
	if (PQntuples(r) == 1) {
		PQclear(r);
		*claimed = 1;
		return GP_OK;
	}
	PQclear(r);
	const char *p1[] = { id };
	if ((st = gp_db_exec(w->db, "look up attempt",
			     "SELECT state, run_id, attempt, kind, stage FROM stage_attempts "
			     "WHERE id = $1::bigint",
			     1, p1, &r, err)))
		return st;
	if (PQntuples(r) == 0 || atoll(PQgetvalue(r, 0, 1)) != job->msg->run_id ||
	    (unsigned)atoi(PQgetvalue(r, 0, 2)) != job->msg->attempt ||
	    strcmp(PQgetvalue(r, 0, 3), w->kind) != 0 ||
	    strcmp(PQgetvalue(r, 0, 4), job->msg->stage) != 0) {
		char reason[200];
		snprintf(reason, sizeof reason,
			 PQntuples(r) ? "job does not match attempt %s (run, stage, attempt or kind "
					"differ)"
				      : "unknown attempt %s",
			 id);
		PQclear(r);
		return dead_letter_msg(w, job->nm, reason, err);
	}
	gp_info("attempt %s is %s, not queued: dropping its message", id, PQgetvalue(r, 0, 0));
	PQclear(r);
	gp_metric_inc(w->m_lost_claim, 1);
	return gp_bus_ack(job->nm, err);
}

gp_status gp_worker_poll(struct gp_worker *w, long long timeout_ms, int *handled,
			 struct gp_err *err)
{
	*handled = 0;
	gp_status st;
	if (w->next >= w->buf.Count) {
		natsMsgList_Destroy(&w->buf);
		memset(&w->buf, 0, sizeof w->buf);
		w->next = 0;
		st = gp_bus_fetch(w->sub, w->prefetch, timeout_ms, &w->buf, err);
		if (st == GP_ERR_TIMEOUT)
			return GP_OK;
		if (st)
			return st;
	}
	*handled = 1;
	natsMsg *m = w->buf.Msgs[w->next];
	w->buf.Msgs[w->next++] = NULL; /* ours now */
	struct gp_job job = { .w = w, .nm = m };
	struct gp_err derr = { 0 };
	const uint8_t *data = (const uint8_t *)natsMsg_GetData(m);
	if (gp_wire_decode_stage_job(&job.msg, data, (size_t)natsMsg_GetDataLength(m), &derr)) {
		st = dead_letter_msg(w, m, derr.msg, err);
		goto out;
	}
	if (strcmp(job.msg->kind, w->kind) != 0) {
		char reason[160];
		snprintf(reason, sizeof reason, "job of kind \"%s\" on the \"%s\" consumer",
			 job.msg->kind, w->kind);
		st = dead_letter_msg(w, m, reason, err);
		goto out;
	}
	int claimed = 0;
	if ((st = claim(w, &job, &claimed, err)) || !claimed)
		goto out;
	gp_info("attempt %lld (%s/%s #%u) claimed by %s", (long long)job.msg->attempt_id,
		job.msg->stage, job.msg->kind, job.msg->attempt, w->worker_id);
	job.started_ms = gp_now_ms();
	heartbeat_for(w, &job);
	w->handler(&job, w->closure);
	heartbeat_for(w, NULL);
	gp_metric_observe(w->m_seconds, (double)(gp_now_ms() - job.started_ms) / 1000.0);
	if (job.outcome == GP_JOB_NONE)
		gp_job_fail(&job, 0, "handler returned without a result");
	int accepted = 0;
	if ((st = commit_result(w, &job, &accepted, err)))
		goto out;
	if (!accepted) {
		gp_metric_inc(w->m_refused, 1);
		gp_warn("attempt %lld: result refused, the lease is no longer ours",
			(long long)job.msg->attempt_id);
	} else {
		gp_metric_inc(job.outcome == GP_JOB_SUCCEEDED	 ? w->m_ok
			      : job.outcome == GP_JOB_RELEASED ? w->m_released
							       : w->m_failed,
			      1);
	}
	/* Either way the message has served its purpose: the database holds the
	 * outcome (or the reaper's new attempt has its own message). */
	st = gp_bus_ack(m, err);
out:
	gp_wire_free_stage_job(job.msg);
	free(job.outputs);
	free(job.metrics);
	free(job.error);
	natsMsg_Destroy(m);
	return st;
}

gp_status gp_worker_run(struct gp_worker *w, volatile int *stop, struct gp_err *err)
{
	w->ext_stop = stop;
	while (!*stop && !w->stop) {
		int handled = 0;
		gp_status st = gp_worker_poll(w, 1000, &handled, err);
		if (*stop)
			w->stop = 1;
		if (st == GP_ERR_UNAVAILABLE || st == GP_ERR_DB || st == GP_ERR_BUS) {
			gp_warn("worker %s: %s; retrying", w->worker_id, err ? err->msg : "");
			gp_db_ok(w->db);
			gp_sleep_ms(500);
			continue;
		}
		if (st)
			return st;
	}
	return GP_OK;
}
