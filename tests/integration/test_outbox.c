/*
 * The outbox relay killed between publish and mark: each message takes
 * effect exactly once, inside JetStream's duplicate window (the re-publish
 * is reported as a duplicate and not stored) and after it (the copy is
 * stored, and the worker's claim absorbs it). Also: PubAck.Duplicate is
 * surfaced, and fetch keeps its own deadline.
 */
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

struct effects {
	struct gp_db *db;
};

/* The effect: one row per execution, no unique key, so a double shows. */
static void count_effect(struct gp_job *job, void *cls)
{
	struct effects *fx = cls;
	char id[24];
	snprintf(id, sizeof id, "%lld", (long long)gp_job_msg(job)->attempt_id);
	const char *p[] = { id };
	struct gp_err e = { 0 };
	if (gp_db_exec(fx->db, "effect", "INSERT INTO test_effects VALUES ($1::bigint)", 1, p, NULL,
		       &e)) {
		gp_job_fail(job, 0, e.msg);
		return;
	}
	gp_job_succeed(job, "{\"ok\":true}", NULL);
}

static void die_after_publish(int count, void *cls)
{
	(void)count;
	(void)cls;
	raise(SIGKILL);
}

/* A relay process that publishes a batch of n and kills itself (kill -9)
 * before marking it sent. */
static int relay_and_die(const struct gp_test_env *env, void *arg)
{
	struct gp_db *db = gp_test_db(env);
	struct gp_bus *bus = gp_test_bus(env, "dying-relay");
	struct gp_relay_hooks hooks = { .after_publish = die_after_publish };
	struct gp_err e = { 0 };
	int pub = 0;
	gp_outbox_relay_once(db, bus, *(int *)arg, &hooks, &pub, NULL, &e);
	return 3; /* not reached when the hook fires */
}

static long long pending(struct gp_bus *bus, const char *durable)
{
	jsConsumerInfo *ci = NULL;
	jsErrCode jerr = 0;
	if (js_GetConsumerInfo(&ci, gp_bus_js(bus), GP_STREAM_JOBS, durable, NULL, &jerr) != NATS_OK)
		return -1;
	long long n = (long long)ci->NumPending + ci->NumAckPending;
	jsConsumerInfo_Destroy(ci);
	return n;
}

static void enqueue(struct gp_db *db, long long run, const char *kind, int n)
{
	struct gp_err e = { 0 };
	REQUIRE_OK(gp_db_begin(db, &e), e);
	for (int i = 0; i < n; i++) {
		char stage[32];
		snprintf(stage, sizeof stage, "%s-%d", kind, i);
		struct gp_attempt_spec s = { .run_id = run, .stage = stage, .kind = kind,
					     .attempt = 1, .lease_ms = 10000, .max_attempts = 3 };
		REQUIRE_OK(gp_attempt_enqueue(db, &s, NULL, &e), e);
	}
	REQUIRE_OK(gp_db_commit(db, &e), e);
}

/* n attempts of kind relaya (stages PREFIX-i) in the open transaction, their
 * job messages kept in d for a direct publish. */
static gp_status direct_enqueue(struct gp_db *db, long long run, const char *prefix, int n,
				struct gp_outbox_direct *d, struct gp_err *e)
{
	struct gp_attempt_spec specs[8];
	char stages[8][32];
	for (int i = 0; i < n && i < 8; i++) {
		snprintf(stages[i], sizeof stages[i], "%s-%d", prefix, i);
		specs[i] = (struct gp_attempt_spec){ .run_id = run, .stage = stages[i],
						     .kind = "relaya", .attempt = 1,
						     .lease_ms = 10000, .max_attempts = 3 };
	}
	return gp_attempts_enqueue(db, specs, n < 8 ? n : 8, NULL, d, e);
}

/* Drain the consumer through a real worker; returns messages taken. */
static int drain(struct gp_worker *w)
{
	int taken = 0, handled = 1;
	struct gp_err e = { 0 };
	while (handled) {
		REQUIRE_OK(gp_worker_poll(w, 1500, &handled, &e), e);
		taken += handled;
	}
	return taken;
}

static int body(struct gp_test_env *env)
{
	struct gp_err e = { 0 };
	/* The dying relays, forked before this process touches NATS. */
	int three = 3, two = 2;
	struct gp_test_child relay1 = gp_test_fork_held(relay_and_die, env, &three);
	struct gp_test_child relay2 = gp_test_fork_held(relay_and_die, env, &two);
	struct gp_db *db = gp_test_db(env);
	struct gp_bus *bus = gp_test_bus(env, "test");
	struct effects fx = { .db = gp_test_db(env) };
	REQUIRE_OK(gp_db_run(db, "effects", "CREATE TABLE test_effects (attempt_id bigint)", &e), e);
	long long run = gp_test_make_run(db, "outbox-test");

	/* --- PubAck.Duplicate is reported, and the copy is not stored --- */
	int dup = -1;
	uint64_t seq1 = 0, seq2 = 0;
	REQUIRE_OK(gp_bus_publish(bus, GP_SUBJ_EVENTS "1", "x", 1, "dedup-1", 2000, &dup, &seq1, &e), e);
	CHECK(dup == 0);
	REQUIRE_OK(gp_bus_publish(bus, GP_SUBJ_EVENTS "1", "x", 1, "dedup-1", 2000, &dup, &seq2, &e), e);
	CHECK(dup == 1);
	CHECK(seq1 == seq2);

	/* --- inside the duplicate window --- */
	struct gp_worker_config wc = { .kind = "relaya", .lease_ms = 10000, .heartbeat_ms = 2000,
				       .ack_wait_ms = 10000, .handler = count_effect,
				       .closure = &fx };
	struct gp_worker *w = NULL;
	REQUIRE_OK(gp_worker_create(&w, &wc, db, bus, env->db_url, &e), e);

	/* fetch honours its own deadline on an empty consumer */
	long long t0 = gp_now_ms();
	int handled = 1;
	REQUIRE_OK(gp_worker_poll(w, 300, &handled, &e), e);
	long long dt = gp_now_ms() - t0;
	CHECK(handled == 0);
	CHECK(dt >= 290 && dt < 3000);

	enqueue(db, run, "relaya", 5);
	CHECK(gp_test_scalar(db, "SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 5);
	gp_test_release(&relay1);
	CHECK(gp_test_wait(&relay1) == 128 + SIGKILL);
	/* Killed before marking: nothing marked, three already in the stream. */
	CHECK(gp_test_scalar(db, "SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 5);
	CHECK(pending(bus, "jobs-relaya") == 3);
	int pub = 0, dups = 0;
	REQUIRE_OK(gp_outbox_relay_once(db, bus, 100, NULL, &pub, &dups, &e), e);
	CHECK(pub == 5);
	CHECK(dups == 3);
	CHECK(gp_test_scalar(db, "SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 0);
	CHECK(pending(bus, "jobs-relaya") == 5);
	CHECK(drain(w) == 5);
	CHECK(gp_test_scalar(db, "SELECT count(*) FROM test_effects") == 5);
	CHECK(gp_test_scalar(db, "SELECT count(DISTINCT attempt_id) FROM test_effects") == 5);
	CHECK(gp_test_scalar(db, "SELECT count(*) FROM stage_attempts WHERE kind = 'relaya' "
				 "AND state = 'succeeded'") == 5);

	/* --- a producer publishing its own messages after its commit --- */
	CHECK(gp_test_relay_all(db, bus) == 5); /* the five results above */
	struct gp_outbox_direct d = { 0 };
	/* rolled back: nothing may go out */
	REQUIRE_OK(gp_db_begin(db, &e), e);
	REQUIRE_OK(direct_enqueue(db, run, "gone", 2, &d, &e), e);
	CHECK(d.n == 2);
	gp_db_rollback(db);
	gp_outbox_direct_truncate(&d, 0);
	CHECK(d.n == 0);
	REQUIRE_OK(gp_outbox_publish_direct(db, bus, &d, &dups, &e), e);
	/* committed: published, marked, nothing left for the relay */
	REQUIRE_OK(gp_db_begin(db, &e), e);
	REQUIRE_OK(direct_enqueue(db, run, "direct", 4, &d, &e), e);
	REQUIRE_OK(gp_db_commit(db, &e), e);
	/* inside a transaction it refuses (and forgets the batch) */
	struct gp_outbox_direct d2 = { 0 };
	REQUIRE_OK(gp_outbox_direct_add(&d2, 1, "x", "y", 1, &e), e);
	REQUIRE_OK(gp_db_begin(db, &e), e);
	CHECK(gp_outbox_publish_direct(db, bus, &d2, &dups, &e) == GP_ERR_INTERNAL);
	CHECK(d2.n == 0);
	gp_db_rollback(db);
	gp_outbox_direct_free(&d2);
	REQUIRE_OK(gp_outbox_publish_direct(db, bus, &d, &dups, &e), e);
	CHECK(d.n == 0);
	CHECK(dups == 0);
	CHECK(gp_test_scalar(db, "SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 0);
	CHECK(pending(bus, "jobs-relaya") == 4);
	/* the relay got to the first row before the producer: the producer's
	 * copy carries the same id (a duplicate), and each message reaches its
	 * own attempt (a message under another row's id would claim twice) */
	REQUIRE_OK(gp_db_begin(db, &e), e);
	REQUIRE_OK(direct_enqueue(db, run, "raced", 3, &d, &e), e);
	REQUIRE_OK(gp_db_commit(db, &e), e);
	REQUIRE_OK(gp_outbox_relay_once(db, bus, 1, NULL, &pub, &dups, &e), e);
	CHECK(pub == 1);
	REQUIRE_OK(gp_outbox_publish_direct(db, bus, &d, &dups, &e), e);
	CHECK(dups == 1);
	CHECK(gp_test_scalar(db, "SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 0);
	CHECK(pending(bus, "jobs-relaya") == 7);
	CHECK(drain(w) == 7);
	CHECK(gp_test_scalar(db, "SELECT count(*) FROM test_effects") == 12);
	CHECK(gp_test_scalar(db, "SELECT count(DISTINCT attempt_id) FROM test_effects") == 12);
	CHECK(gp_test_scalar(db, "SELECT count(*) FROM stage_attempts WHERE kind = 'relaya' "
				 "AND state = 'succeeded'") == 12);
	CHECK(gp_test_scalar(db, "SELECT count(*) FROM stage_attempts WHERE stage LIKE 'gone-%'") ==
	      0);
	gp_outbox_direct_free(&d);
	gp_worker_destroy(w);

	/* --- after the window: the copy is stored; the claim absorbs it --- */
	int ns = 0;
	const struct gp_stream_def *defs = gp_bus_default_streams(&ns);
	struct gp_stream_def jobs = defs[0];
	jobs.dup_window_ms = 1000;
	/* A fresh stream: the server arms its id-purge timer with the window
	 * in force when the first id is stored, so an update would not do. */
	jsErrCode jerr = 0;
	REQUIRE(js_DeleteStream(gp_bus_js(bus), GP_STREAM_JOBS, NULL, &jerr) == NATS_OK);
	wc.kind = "relayb";
	REQUIRE_OK(gp_worker_create(&w, &wc, db, bus, env->db_url, &e), e);
	/* after the worker, whose declaration restores the default window */
	REQUIRE_OK(gp_bus_declare(bus, &jobs, 1, NULL, 0, &e), e);
	CHECK(gp_test_relay_all(db, bus) == 7); /* the direct part's results */
	enqueue(db, run, "relayb", 3);
	gp_test_release(&relay2);
	CHECK(gp_test_wait(&relay2) == 128 + SIGKILL);
	gp_sleep_ms(3500); /* the server purges ids on a timer: allow slack */
	REQUIRE_OK(gp_outbox_relay_once(db, bus, 100, NULL, &pub, &dups, &e), e);
	CHECK(pub == 3);
	CHECK(dups == 0);
	CHECK(pending(bus, "jobs-relayb") == 5); /* two copies made it in */
	CHECK(drain(w) == 5);
	CHECK(gp_test_scalar(db, "SELECT count(*) FROM test_effects e JOIN stage_attempts a "
				 "ON a.id = e.attempt_id WHERE a.kind = 'relayb'") == 3);
	CHECK(gp_test_scalar(db, "SELECT count(*) FROM stage_attempts WHERE kind = 'relayb' "
				 "AND state = 'succeeded'") == 3);
	CHECK(pending(bus, "jobs-relayb") == 0);
	gp_worker_destroy(w);

	gp_db_destroy(fx.db);
	gp_bus_destroy(bus);
	gp_db_destroy(db);
	return CHECK_RESULT();
}

int main(void)
{
	return gp_test_run(body);
}
