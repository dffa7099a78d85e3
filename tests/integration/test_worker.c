/*
 * The worker loop and its lease against real servers:
 * 1. a worker that heartbeats keeps its job past AckWait: no redelivery,
 *    a second worker polling the same consumer gets nothing;
 * 2. a worker that stops heartbeating (SIGSTOP) loses the job to another
 *    worker; the reaper queues attempt 2; the first worker's late result is
 *    refused and only the second one's is recorded;
 * 3. poison messages are terminated and recorded in dead_letters;
 * 4. a released job is requeued without using up an attempt;
 * 5. an expired lease on the last attempt fails the stage.
 */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../check.h"
#include "../harness.h"
#include "outbox.h"
#include "subjects.h"
#include "worker.h"

static void sleepy(struct gp_job *job, void *cls)
{
	long long ms = *(long long *)cls;
	for (long long t = 0; t < ms; t += 100)
		gp_sleep_ms(100);
	gp_job_progress(job, 1.0, "done", NULL);
	char out[64];
	snprintf(out, sizeof out, "{\"pid\":%d}", (int)getpid());
	gp_job_succeed(job, out, "{\"loss\":1.5}");
}

static long long enqueue1(struct gp_db *db, long long run, const char *stage, const char *kind,
			  int max_attempts)
{
	struct gp_err e = { 0 };
	long long id = 0;
	REQUIRE_OK(gp_db_begin(db, &e), e);
	struct gp_attempt_spec s = { .run_id = run, .stage = stage, .kind = kind, .attempt = 1,
				     .params_json = "{\"n\":1}", .lease_ms = 1500,
				     .max_attempts = max_attempts };
	REQUIRE_OK(gp_attempt_enqueue(db, &s, &id, &e), e);
	REQUIRE_OK(gp_db_commit(db, &e), e);
	return id;
}

static long long consumer_stat(struct gp_bus *bus, const char *durable, int which)
{
	jsConsumerInfo *ci = NULL;
	jsErrCode jerr = 0;
	if (js_GetConsumerInfo(&ci, gp_bus_js(bus), GP_STREAM_JOBS, durable, NULL, &jerr) != NATS_OK)
		return -1;
	long long v = which == 0 ? ci->NumRedelivered
		      : which == 1 ? ci->NumAckPending
				   : (long long)ci->NumPending;
	jsConsumerInfo_Destroy(ci);
	return v;
}

struct rival {
	const struct gp_test_env *env;
	long long until_ms;
	int taken;
};

static void never(struct gp_job *job, void *cls)
{
	(void)cls;
	gp_job_fail(job, 0, "rival must never get a job");
}

static void *rival_main(void *arg)
{
	struct rival *r = arg;
	struct gp_db *db = gp_test_db(r->env);
	struct gp_bus *bus = gp_test_bus(r->env, "rival");
	struct gp_worker_config wc = { .kind = "hb", .lease_ms = 3000, .heartbeat_ms = 300,
				       .ack_wait_ms = 1000, .handler = never };
	struct gp_worker *w = NULL;
	struct gp_err e = { 0 };
	REQUIRE_OK(gp_worker_create(&w, &wc, db, bus, r->env->db_url, &e), e);
	while (gp_now_ms() < r->until_ms) {
		int handled = 0;
		REQUIRE_OK(gp_worker_poll(w, 200, &handled, &e), e);
		r->taken += handled;
	}
	gp_worker_destroy(w);
	gp_bus_destroy(bus);
	gp_db_destroy(db);
	return NULL;
}

static void test_heartbeat_keeps_job(const struct gp_test_env *env, struct gp_db *db,
				     struct gp_bus *bus, long long run)
{
	struct gp_err e = { 0 };
	long long job_ms = 3500; /* 3.5 x AckWait */
	struct gp_worker_config wc = { .kind = "hb", .lease_ms = 3000, .heartbeat_ms = 300,
				       .ack_wait_ms = 1000, .handler = sleepy, .closure = &job_ms };
	struct gp_worker *w = NULL;
	REQUIRE_OK(gp_worker_create(&w, &wc, db, bus, env->db_url, &e), e);
	/* two jobs one after the other: the worker's one heartbeat thread
	 * must keep each (its job changes, at the same address) */
	for (int j = 0; j < 2; j++) {
		long long id = enqueue1(db, run, j ? "hb2" : "hb", "hb", 3);
		CHECK(gp_test_relay_all(db, bus) == 1);
		struct rival r = { .env = env, .until_ms = gp_now_ms() + 5000 };
		pthread_t t;
		REQUIRE(pthread_create(&t, NULL, rival_main, &r) == 0);
		int handled = 0;
		REQUIRE_OK(gp_worker_poll(w, 5000, &handled, &e), e);
		CHECK(handled == 1);
		pthread_join(t, NULL);
		CHECK(r.taken == 0);
		CHECK(consumer_stat(bus, "jobs-hb", 0) == 0); /* nothing redelivered */
		CHECK(consumer_stat(bus, "jobs-hb", 1) == 0); /* nothing unacked */
		char q[256];
		snprintf(q, sizeof q, "SELECT count(*) FROM stage_attempts WHERE id = %lld AND "
			 "state = 'succeeded' AND outputs->>'pid' = '%d' AND metrics->>'loss' = "
			 "'1.5' AND heartbeat_at > claimed_at", id, (int)getpid());
		CHECK(gp_test_scalar(db, q) == 1);
		/* the result message went to the outbox with the state change */
		CHECK(gp_test_scalar(db, "SELECT count(*) FROM outbox WHERE subject LIKE "
					 "'genpipe.results.%' AND sent_at IS NULL") == 1);
		gp_test_relay_all(db, bus);
	}
	gp_worker_destroy(w);
}

static long long state_of(struct gp_db *db, long long id, const char *state)
{
	char q[200];
	snprintf(q, sizeof q, "SELECT count(*) FROM stage_attempts WHERE id = %lld AND state = '%s'",
		 id, state);
	return gp_test_scalar(db, q);
}

/* Worker A: takes the lease job, is frozen, wakes up and reports late. */
static int worker_a(const struct gp_test_env *env, void *arg)
{
	(void)arg;
	struct gp_db *adb = gp_test_db(env);
	struct gp_bus *abus = gp_test_bus(env, "worker-a");
	long long ms = 2500;
	struct gp_worker_config wc = { .kind = "lease", .worker_id = "worker-a", .lease_ms = 1500,
				       .heartbeat_ms = 300, .ack_wait_ms = 1000, .handler = sleepy,
				       .closure = &ms };
	struct gp_worker *w = NULL;
	struct gp_err ae = { 0 };
	int handled = 0;
	if (gp_worker_create(&w, &wc, adb, abus, env->db_url, &ae) ||
	    gp_worker_poll(w, 10000, &handled, &ae)) {
		fprintf(stderr, "worker a: %s\n", ae.msg);
		return 2;
	}
	const char *q = "SELECT count(*) FROM stage_attempts WHERE stage = 'lease' AND attempt = 1 "
			"AND state = 'expired' AND outputs IS NULL";
	return handled == 1 && gp_test_scalar(adb, q) == 1 ? 0 : 3;
}

static void test_lost_lease(const struct gp_test_env *env, struct gp_db *db, struct gp_bus *bus,
			    long long run, struct gp_test_child *a)
{
	struct gp_err e = { 0 };
	long long id1 = enqueue1(db, run, "lease", "lease", 3);
	gp_test_release(a);
	/* Worker A must exist before the message goes out (consumer declared). */
	gp_sleep_ms(300);
	gp_test_relay_all(db, bus);
	long long deadline = gp_now_ms() + 10000;
	while (!state_of(db, id1, "running") && gp_now_ms() < deadline)
		gp_sleep_ms(20);
	REQUIRE(state_of(db, id1, "running"));
	kill(a->pid, SIGSTOP);
	gp_sleep_ms(2000); /* past the 1.5 s lease */
	int reaped = 0;
	REQUIRE_OK(gp_lease_reap(db, 100, &reaped, &e), e);
	CHECK(reaped == 1);
	CHECK(state_of(db, id1, "expired") == 1);
	CHECK(gp_test_relay_all(db, bus) == 1);

	long long ms = 200;
	struct gp_worker_config wc = { .kind = "lease", .worker_id = "worker-b", .lease_ms = 1500,
				       .heartbeat_ms = 300, .ack_wait_ms = 1000, .handler = sleepy,
				       .closure = &ms };
	struct gp_worker *b = NULL;
	REQUIRE_OK(gp_worker_create(&b, &wc, db, bus, env->db_url, &e), e);
	deadline = gp_now_ms() + 15000;
	const char *done_q = "SELECT count(*) FROM stage_attempts WHERE stage = 'lease' "
			     "AND attempt = 2 AND state = 'succeeded' AND worker = 'worker-b'";
	while (gp_test_scalar(db, done_q) == 0 && gp_now_ms() < deadline) {
		int handled = 0;
		REQUIRE_OK(gp_worker_poll(b, 500, &handled, &e), e);
	}
	CHECK(gp_test_scalar(db, done_q) == 1);
	kill(a->pid, SIGCONT);
	CHECK(gp_test_wait(a) == 0);
	/* Only B's result stands; A's late success changed nothing. */
	CHECK(state_of(db, id1, "expired") == 1);
	char q[300];
	snprintf(q, sizeof q, "SELECT count(*) FROM stage_attempts WHERE stage = 'lease' "
		 "AND state = 'succeeded' AND outputs->>'pid' = '%d'", (int)getpid());
	CHECK(gp_test_scalar(db, q) == 1);
	CHECK(gp_test_scalar(db, "SELECT count(*) FROM stage_attempts WHERE stage = 'lease'") == 2);
	/* No job left behind: A's late ack removed nothing of B's. */
	int handled = 1;
	REQUIRE_OK(gp_worker_poll(b, 1500, &handled, &e), e);
	CHECK(handled == 0);
	CHECK(consumer_stat(bus, "jobs-lease", 1) == 0);
	CHECK(consumer_stat(bus, "jobs-lease", 2) == 0);
	gp_test_relay_all(db, bus);
	gp_worker_destroy(b);
}

static void test_poison(const struct gp_test_env *env, struct gp_db *db, struct gp_bus *bus)
{
	struct gp_err e = { 0 };
	long long ms = 0;
	struct gp_worker_config wc = { .kind = "poison", .lease_ms = 3000, .heartbeat_ms = 500,
				       .ack_wait_ms = 1000, .handler = sleepy, .closure = &ms };
	struct gp_worker *w = NULL;
	REQUIRE_OK(gp_worker_create(&w, &wc, db, bus, env->db_url, &e), e);
	const char *subj = GP_SUBJ_JOBS "poison";
	REQUIRE_OK(gp_bus_publish(bus, subj, "\xff\xff\xff\xff\x0f", 5, NULL, 2000, NULL, NULL, &e), e);
	gp_stage_job j = GENPIPE__V1__STAGE_JOB__INIT;
	j.attempt_id = 0;
	j.run_id = 1;
	j.stage = "x";
	j.kind = "poison";
	j.attempt = 1;
	uint8_t *buf = NULL;
	size_t len = 0;
	REQUIRE_OK(gp_wire_encode(&j.base, &buf, &len, &e), e);
	REQUIRE_OK(gp_bus_publish(bus, subj, buf, (int)len, NULL, 2000, NULL, NULL, &e), e);
	free(buf);
	j.attempt_id = 987654;
	j.schema_version = 0;
	REQUIRE_OK(gp_wire_encode(&j.base, &buf, &len, &e), e);
	REQUIRE_OK(gp_bus_publish(bus, subj, buf, (int)len, NULL, 2000, NULL, NULL, &e), e);
	free(buf);
	j.attempt_id = 5;
	j.kind = "other";
	j.schema_version = 0;
	REQUIRE_OK(gp_wire_encode(&j.base, &buf, &len, &e), e);
	REQUIRE_OK(gp_bus_publish(bus, subj, buf, (int)len, NULL, 2000, NULL, NULL, &e), e);
	free(buf);
	/* a real queued attempt, but the message names another stage */
	long long run = gp_test_make_run(db, "poison-run");
	REQUIRE_OK(gp_db_begin(db, &e), e);
	long long real_id = 0;
	struct gp_attempt_spec as = { .run_id = run, .stage = "real", .kind = "poison", .attempt = 1 };
	REQUIRE_OK(gp_attempt_enqueue(db, &as, &real_id, &e), e);
	REQUIRE_OK(gp_db_commit(db, &e), e);
	REQUIRE_OK(gp_db_run(db, "drop its message", "DELETE FROM outbox", &e), e);
	j.attempt_id = real_id;
	j.run_id = run;
	j.kind = "poison";
	j.stage = "other-stage";
	j.schema_version = 0;
	REQUIRE_OK(gp_wire_encode(&j.base, &buf, &len, &e), e);
	REQUIRE_OK(gp_bus_publish(bus, subj, buf, (int)len, NULL, 2000, NULL, NULL, &e), e);
	free(buf);
	for (int i = 0; i < 5; i++) {
		int handled = 0;
		REQUIRE_OK(gp_worker_poll(w, 3000, &handled, &e), e);
		CHECK(handled == 1);
	}
	CHECK(gp_test_scalar(db, "SELECT count(*) FROM dead_letters WHERE subject = "
				 "'genpipe.jobs.poison'") == 5);
	char qq[200];
	snprintf(qq, sizeof qq, "SELECT count(*) FROM stage_attempts WHERE id = %lld AND "
		 "state = 'queued'", real_id);
	CHECK(gp_test_scalar(db, qq) == 1); /* untouched */
	CHECK(gp_test_scalar(db, "SELECT count(*) FROM dead_letters WHERE reason LIKE "
				 "'job does not match attempt %(run, stage, attempt or kind differ)'") == 1);
	CHECK(gp_test_scalar(db, "SELECT count(*) FROM dead_letters WHERE reason = "
				 "'stage job: not a valid protobuf message' AND payload = "
				 "'\\xffffffff0f'::bytea") == 1);
	CHECK(gp_test_scalar(db, "SELECT count(*) FROM dead_letters WHERE reason = "
				 "'stage job: attempt_id must be > 0 (got 0)'") == 1);
	CHECK(gp_test_scalar(db, "SELECT count(*) FROM dead_letters WHERE reason = "
				 "'unknown attempt 987654'") == 1);
	CHECK(gp_test_scalar(db, "SELECT count(*) FROM dead_letters WHERE reason LIKE "
				 "'job of kind \"other\" on the \"poison\" consumer'") == 1);
	/* Terminated, not redelivered after AckWait. */
	int handled = 1;
	REQUIRE_OK(gp_worker_poll(w, 2500, &handled, &e), e);
	CHECK(handled == 0);
	CHECK(consumer_stat(bus, "jobs-poison", 1) == 0);
	gp_worker_destroy(w);
}

static void releaser(struct gp_job *job, void *cls)
{
	(void)cls;
	gp_job_release(job, "draining");
}

static void test_release_and_exhaust(const struct gp_test_env *env, struct gp_db *db,
				     struct gp_bus *bus, long long run)
{
	struct gp_err e = { 0 };
	struct gp_worker_config wc = { .kind = "rel", .lease_ms = 3000, .heartbeat_ms = 500,
				       .ack_wait_ms = 3000, .handler = releaser };
	struct gp_worker *w = NULL;
	REQUIRE_OK(gp_worker_create(&w, &wc, db, bus, env->db_url, &e), e);
	long long id = enqueue1(db, run, "rel", "rel", 1);
	gp_test_relay_all(db, bus);
	int handled = 0;
	REQUIRE_OK(gp_worker_poll(w, 3000, &handled, &e), e);
	CHECK(handled == 1);
	CHECK(state_of(db, id, "released") == 1);
	/* attempt 2 exists although max_attempts was 1: a release is not a failure */
	CHECK(gp_test_scalar(db, "SELECT count(*) FROM stage_attempts WHERE stage = 'rel' AND "
				 "attempt = 2 AND state = 'queued' AND max_attempts = 2") == 1);
	gp_worker_destroy(w);

	/* Last attempt expires: the stage fails, nothing is requeued. */
	long long id2 = enqueue1(db, run, "last", "rel", 1);
	char q[300];
	snprintf(q, sizeof q, "UPDATE stage_attempts SET state = 'running', lease_token = 't', "
		 "worker = 'w', lease_deadline = now() - interval '1 second' WHERE id = %lld", id2);
	REQUIRE_OK(gp_db_run(db, "expire", q, &e), e);
	long long before = gp_test_scalar(db, "SELECT count(*) FROM outbox");
	int reaped = 0;
	REQUIRE_OK(gp_lease_reap(db, 100, &reaped, &e), e);
	CHECK(reaped == 1);
	CHECK(state_of(db, id2, "expired") == 1);
	CHECK(gp_test_scalar(db, "SELECT count(*) FROM stage_attempts WHERE stage = 'last'") == 1);
	CHECK(gp_test_scalar(db, "SELECT count(*) FROM outbox") == before + 1);
	PGresult *r = NULL;
	REQUIRE_OK(gp_db_exec(db, "result", "SELECT payload FROM outbox ORDER BY id DESC LIMIT 1",
			      0, NULL, &r, &e), e);
	size_t blen = 0;
	unsigned char *b = PQunescapeBytea((const unsigned char *)PQgetvalue(r, 0, 0), &blen);
	gp_stage_result *res = NULL;
	REQUIRE_OK(gp_wire_decode_stage_result(&res, b, blen, &e), e);
	CHECK(res->status == GENPIPE__V1__RESULT_STATUS__RESULT_FAILED);
	CHECK_CONTAINS(res->error, "lease expired; 1 of 1 attempts used");
	gp_wire_free_stage_result(res);
	PQfreemem(b);
	PQclear(r);
}

static long long redispatches(struct gp_db *db, long long id)
{
	char q[128];
	snprintf(q, sizeof q, "SELECT redispatches FROM stage_attempts WHERE id = %lld", id);
	return gp_test_scalar(db, q);
}

/* A job message lost by the server (an OS crash loses what JetStream had
 * not fsynced): the attempt stays queued, and the orchestrator's
 * re-dispatch publishes it again; a copy of a message that was not lost is
 * absorbed by the claim. */
static void test_redispatch(const struct gp_test_env *env, struct gp_db *db, struct gp_bus *bus,
			    long long run)
{
	struct gp_err e = { 0 };
	long long ms = 0;
	struct gp_worker_config wc = { .kind = "lost", .lease_ms = 5000, .heartbeat_ms = 1000,
				       .ack_wait_ms = 5000, .handler = sleepy, .closure = &ms };
	struct gp_worker *w = NULL;
	REQUIRE_OK(gp_worker_create(&w, &wc, db, bus, env->db_url, &e), e);
	long long id = enqueue1(db, run, "lost", "lost", 3);
	gp_test_relay_all(db, bus);
	CHECK(consumer_stat(bus, "jobs-lost", 2) == 1);
	jsOptions o;
	jsOptions_Init(&o);
	o.Stream.Purge.Subject = GP_SUBJ_JOBS "lost";
	jsErrCode jerr = 0;
	REQUIRE(js_PurgeStream(gp_bus_js(bus), GP_STREAM_JOBS, &o, &jerr) == NATS_OK);
	CHECK(consumer_stat(bus, "jobs-lost", 2) == 0);
	int handled = 0, n = -1;
	REQUIRE_OK(gp_worker_poll(w, 500, &handled, &e), e);
	CHECK(handled == 0); /* nothing arrives: without re-dispatch it waits forever */
	REQUIRE_OK(gp_attempts_redispatch(db, 60000, 100, &n, &e), e);
	CHECK(redispatches(db, id) == 0); /* not yet */
	REQUIRE_OK(gp_attempts_redispatch(db, 1, 100, &n, &e), e);
	CHECK(n >= 1 && redispatches(db, id) == 1);
	REQUIRE_OK(gp_attempts_redispatch(db, 1000, 100, &n, &e), e);
	CHECK(redispatches(db, id) == 1); /* backs off: 2 s from this copy */
	gp_test_relay_all(db, bus);
	REQUIRE_OK(gp_worker_poll(w, 3000, &handled, &e), e);
	CHECK(handled == 1);
	CHECK(state_of(db, id, "succeeded") == 1);

	/* a copy of a message that was not lost: two arrive, one claim wins */
	long long id2 = enqueue1(db, run, "dup", "lost", 3);
	gp_sleep_ms(5);
	REQUIRE_OK(gp_attempts_redispatch(db, 1, 100, &n, &e), e);
	CHECK(redispatches(db, id2) == 1);
	gp_test_relay_all(db, bus);
	CHECK(consumer_stat(bus, "jobs-lost", 2) == 2);
	int taken = 0;
	do {
		REQUIRE_OK(gp_worker_poll(w, 1500, &handled, &e), e);
		taken += handled;
	} while (handled);
	CHECK(taken >= 1);
	CHECK(state_of(db, id2, "succeeded") == 1);
	CHECK(gp_test_scalar(db, "SELECT count(*) FROM stage_attempts WHERE stage = 'dup'") == 1);
	CHECK(consumer_stat(bus, "jobs-lost", 2) == 0 && consumer_stat(bus, "jobs-lost", 1) == 0);
	/* finished attempts are never sent again */
	REQUIRE_OK(gp_attempts_redispatch(db, 1, 100, &n, &e), e);
	CHECK(redispatches(db, id) == 1 && redispatches(db, id2) == 1);
	gp_worker_destroy(w);
}

static int body(struct gp_test_env *env)
{
	struct gp_test_child a = gp_test_fork_held(worker_a, env, NULL);
	struct gp_db *db = gp_test_db(env);
	struct gp_bus *bus = gp_test_bus(env, "test");
	long long run = gp_test_make_run(db, "worker-test");
	/* a configuration that makes no sense is refused with the reason */
	struct gp_worker *bad = NULL;
	struct gp_err e = { 0 };
	struct gp_worker_config bc = { .kind = "hb", .lease_ms = 3000, .heartbeat_ms = 300,
				       .handler = never, .quick_result_ms = -1 };
	CHECK(gp_worker_create(&bad, &bc, db, bus, env->db_url, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "quick_result_ms (-1) must not be negative");
	CHECK(bad == NULL);
	test_lost_lease(env, db, bus, run, &a);
	test_heartbeat_keeps_job(env, db, bus, run);
	test_poison(env, db, bus);
	test_redispatch(env, db, bus, run);
	test_release_and_exhaust(env, db, bus, run);
	gp_bus_destroy(bus);
	gp_db_destroy(db);
	return CHECK_RESULT();
}

int main(void)
{
	return gp_test_run(body);
}
