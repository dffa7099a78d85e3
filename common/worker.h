/*
 * worker.h: the loop every stage service runs, and the lease rules behind it.
 *
 * The attempt row in PostgreSQL is the truth; the JetStream message only
 * names it (DESIGN.md section 3):
 *   1. fetch a job message from the kind's durable consumer;
 *   2. undecodable or invalid -> row in dead_letters with the reason, Term;
 *   3. claim: UPDATE ... SET state='running', lease_token=<fresh random>
 *      WHERE id=$1 AND state='queued'; no row -> someone else owns it or it
 *      is finished: ack and drop;
 *   4. while the handler runs, the worker's heartbeat thread (one for the
 *      worker's life, idle between jobs; own connection) extends
 *      lease_deadline only while the row still carries our token, and sends
 *      AckProgress so JetStream does not redeliver; a failed extension sets
 *      the job's lease-lost flag;
 *   5. the result is written by a conditional UPDATE that requires our token,
 *      state='running' and an unexpired lease, together with an outbox
 *      StageResult; only then is the message acked. A late worker's result
 *      is refused and changes nothing.
 * Expired leases are reaped by gp_lease_reap(): the attempt becomes
 * 'expired' and attempt+1 is queued with a new id and a new message (or the
 * stage fails when max_attempts is reached).
 */
#ifndef GP_WORKER_H
#define GP_WORKER_H

#include "bus.h"
#include "db.h"
#include "http.h"
#include "wire.h"

struct gp_worker;
struct gp_job;

/* What a handler decided; set with gp_job_succeed / _fail / _release. */
enum gp_job_outcome {
	GP_JOB_NONE,
	GP_JOB_SUCCEEDED,
	GP_JOB_FAILED,           /* may be retried by the orchestrator */
	GP_JOB_FAILED_PERMANENT, /* bad parameters: retrying cannot help */
	GP_JOB_RELEASED,         /* give the lease back (drain, preemption) */
};

/* Run one job. Check gp_job_should_stop() at safe points. */
typedef void (*gp_job_fn)(struct gp_job *job, void *closure);

/* The version a kind registers when its results depend on state outside
 * its inputs (the registry, for deploy): the orchestrator never caches it. */
#define GP_KIND_UNCACHED "uncached"

struct gp_worker_config {
	const char *kind;        /* stage kind: DNS label */
	const char *worker_id;   /* unique per process; NULL: host-pid-random */
	long long lease_ms;      /* lease length granted at claim and each heartbeat */
	long long heartbeat_ms;  /* <= lease_ms / 3 recommended */
	long long ack_wait_ms;   /* the consumer's AckWait */
	gp_job_fn handler;
	void *closure;
	struct gp_metrics *metrics; /* may be NULL */
	const char *version;     /* code version, part of the cache key; NULL: genpipe's */
	int prefetch;            /* messages fetched at once (1..16; default 1). More
				  * saves round trips for short jobs; a prefetched
				  * message waits its turn while its AckWait runs. */
	long long quick_result_ms; /* results of attempts that ran shorter than this
				    * are committed without waiting for the WAL
				    * flush (a database crash may lose one; the
				    * attempt then runs again); 0: every result
				    * waits */
};

/* 1 when an attempt that ran duration_ms commits its result without waiting
 * for the WAL flush (see quick_result_ms). */
int gp_worker_quick_result(long long quick_result_ms, long long duration_ms);

/*
 * Create a worker: declares the kind's durable consumer, binds to it and
 * opens a second database connection for heartbeats (PGconn is not
 * thread-safe). db and bus are borrowed and must outlive the worker; the
 * worker uses db only from the thread that calls gp_worker_poll.
 * Caller owns; free with gp_worker_destroy (accepts NULL).
 */
gp_status gp_worker_create(struct gp_worker **out, const struct gp_worker_config *cfg,
			   struct gp_db *db, struct gp_bus *bus, const char *database_url,
			   struct gp_err *err);
void gp_worker_destroy(struct gp_worker *w);
const char *gp_worker_id(const struct gp_worker *w);

/*
 * Wait up to timeout_ms for one job and process it to the end (handler,
 * result, ack). *handled gets 1 when a message was taken (including dead
 * letters and lost claims). Errors are infrastructure failures; the message
 * stays unacked and will be redelivered.
 */
gp_status gp_worker_poll(struct gp_worker *w, long long timeout_ms, int *handled,
			 struct gp_err *err);

/* Loop gp_worker_poll until *stop becomes non-zero. */
gp_status gp_worker_run(struct gp_worker *w, volatile int *stop, struct gp_err *err);

/* Job accessors for handlers; all borrowed, valid during the handler call. */
const gp_stage_job *gp_job_msg(const struct gp_job *job);
const char *gp_job_lease_token(const struct gp_job *job);
/* 0 keep going; 1 the lease was lost (stop, the result will be refused);
 * 2 shutdown requested (checkpoint and gp_job_release). */
int gp_job_should_stop(const struct gp_job *job);
/* Publish a progress event (best effort: failures are logged and counted). */
void gp_job_progress(struct gp_job *job, double fraction, const char *message,
		     const char *metrics_json);
void gp_job_succeed(struct gp_job *job, const char *outputs_json, const char *metrics_json);
void gp_job_fail(struct gp_job *job, int permanent, const char *error);

/*
 * Worker-side reuse, for kinds whose inputs live outside genpipe (files,
 * URLs) and so are not in the orchestrator's cache key. The handler passes
 * a fingerprint of those inputs; the attempt records input_key =
 * sha256(kind, version, params, fingerprint) and gets the outputs of the
 * latest succeeded attempt with the same key (*outputs_json malloc'd, NULL
 * when there is none). A handler that can still use them (its artifacts
 * exist) calls gp_job_succeed_reused; the stage then shows as cached.
 */
gp_status gp_job_reuse_lookup(struct gp_job *job, const char *fingerprint, char **outputs_json,
			      long long *from_attempt, struct gp_err *err);
void gp_job_succeed_reused(struct gp_job *job, const char *outputs_json, long long from_attempt);
/* The database connection the worker runs on (for the handler's own
 * statements between the worker's; no transaction may be left open). */
struct gp_db *gp_job_db(const struct gp_job *job);
void gp_job_release(struct gp_job *job, const char *reason);

/* ---- attempts and leases (used by the orchestrator and tests) ---- */

struct gp_attempt_spec {
	long long run_id;
	const char *stage;
	const char *kind;
	int attempt;
	const char *params_json; /* NULL: {} */
	long long lease_ms;
	int max_attempts;
	long long timeout_ms;    /* 0: 24 h */
};

/*
 * Insert a queued attempt and its job message into the outbox. Must run in
 * the caller's transaction. *attempt_id may be NULL.
 */
gp_status gp_attempt_enqueue(struct gp_db *db, const struct gp_attempt_spec *spec,
			     long long *attempt_id, struct gp_err *err);

/*
 * The same for n attempts in two statements (attempts, then their job
 * messages); attempt_ids (may be NULL) gets the ids in the order of specs.
 * (run_id, stage) must be unique among the specs. direct (may be NULL)
 * gets a copy of each job message with its outbox id, for the caller to
 * publish after its commit (gp_outbox_publish_direct).
 */
struct gp_outbox_direct;
gp_status gp_attempts_enqueue(struct gp_db *db, const struct gp_attempt_spec *specs, int n,
			      long long *attempt_ids, struct gp_outbox_direct *direct,
			      struct gp_err *err);

/*
 * Expire up to max running attempts whose lease has passed and queue their
 * next attempt (or fail the stage when attempts are exhausted), each in one
 * transaction with its outbox message. *reaped gets the count.
 */
gp_status gp_lease_reap(struct gp_db *db, int max, int *reaped, struct gp_err *err);

/*
 * Publish again (a new outbox row, same attempt) the job message of up to
 * max attempts still queued after_ms after they were queued, then after
 * 2x, 4x, ... 64x that since their last copy. JetStream can lose an
 * acknowledged message in an OS crash; the claim by attempt id absorbs the
 * copies that do arrive. *n gets the count.
 */
gp_status gp_attempts_redispatch(struct gp_db *db, long long after_ms, int max, int *n,
				 struct gp_err *err);

/* Record a message that cannot be processed. Idempotent by (stream, seq). */
gp_status gp_dead_letter(struct gp_db *db, const char *stream, const char *consumer,
			 const char *subject, unsigned long long stream_seq, const void *payload,
			 size_t len, const char *reason, struct gp_err *err);

#endif
