/*
 * The run engine end to end on real servers, with real service processes:
 * genpipe-orchestrator and genpipe-noop (the test stage kind: sleeps, fails
 * on demand). Covers DAG order, parallel branches, retries with backoff,
 * timeouts, cancel, caching, resume, kill -9 of a worker mid-attempt,
 * kill -9 of nats-server during a 200-stage run, and kill -9 of both of two
 * orchestrators.
 */
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../check.h"
#include "../harness.h"

#include "run.h"
#include "stack.h"

static const struct gp_test_env *ENV;
static struct gp_db *db;

static pid_t orchestrator(void)
{
	return gp_test_service(ENV, "genpipe-orchestrator", "--sweep-ms", "500", "--reap-interval-ms", "200",
		     NULL);
}

static pid_t worker(void)
{
	return gp_test_service(ENV, "genpipe-noop", "--lease-ms", "1500", "--heartbeat-ms", "300", NULL);
}

static void stop(pid_t pid, int sig)
{
	if (pid <= 0)
		return;
	kill(pid, sig);
	long long deadline = gp_now_ms() + 10000;
	while (gp_now_ms() < deadline) {
		if (waitpid(pid, NULL, WNOHANG) == pid)
			return;
		gp_sleep_ms(20);
	}
	kill(pid, SIGKILL);
	waitpid(pid, NULL, 0);
}

static long long q(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static long long q(const char *fmt, ...)
{
	char sql[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(sql, sizeof sql, fmt, ap);
	va_end(ap);
	return gp_test_scalar(db, sql);
}

static int wait_for(long long ms, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int wait_for(long long ms, const char *fmt, ...)
{
	char sql[1024];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(sql, sizeof sql, fmt, ap);
	va_end(ap);
	long long deadline = gp_now_ms() + ms;
	while (gp_now_ms() < deadline) {
		if (gp_test_scalar(db, sql))
			return 1;
		gp_sleep_ms(20);
	}
	fprintf(stderr, "timed out waiting for: %s\n", sql);
	return 0;
}

#define HDR(name) "apiVersion: genpipe/v1\nkind: Pipeline\nmetadata: {name: " name "}\nspec:\n"

static void test_dag_parallel(void)
{
	long long run = gp_test_submit(db, HDR("dag") "  stages:\n"
					  "    - {name: a, kind: noop, with: {duration: 100ms, outputs: {v: 1}}}\n"
					  "    - {name: b, kind: noop, needs: a, with: {duration: 600ms}}\n"
					  "    - {name: c, kind: noop, needs: a, with: {duration: 600ms}}\n"
					  "    - {name: d, kind: noop, needs: [b, c], with: {message: "
					  "\"${stages.a.outputs.v}\"}}\n",
			       NULL, 0);
	CHECK(gp_test_wait_run(db, run, 20000) == 1);
#define T(stage, col) "(SELECT " col " FROM stage_attempts WHERE run_id = %lld AND stage = '" stage "')"
	/* order: a before b and c; d after both */
	CHECK(q("SELECT count(*) WHERE " T("a", "finished_at") " <= " T("b", "claimed_at") " AND "
		T("a", "finished_at") " <= " T("c", "claimed_at"), run, run, run, run) == 1);
	CHECK(q("SELECT count(*) WHERE " T("d", "claimed_at") " >= " T("b", "finished_at") " AND "
		T("d", "claimed_at") " >= " T("c", "finished_at"), run, run, run, run) == 1);
	/* parallel: b and c overlapped in time (two workers) */
	CHECK(q("SELECT count(*) WHERE " T("b", "claimed_at") " < " T("c", "finished_at") " AND "
		T("c", "claimed_at") " < " T("b", "finished_at"), run, run, run, run) == 1);
	/* d got a's output through the template */
	CHECK(q("SELECT count(*) FROM stage_attempts WHERE run_id = %lld AND stage = 'd' AND "
		"params->>'message' = '1'", run) == 1);
}

/*
 * The orchestrator keeps a run's stage rows between advances; a write to
 * them by anyone else (here an operator's SQL while the first stage runs)
 * bumps the run's revision, and the next advance reads them again: the
 * stage the operator skipped is not dispatched.
 */
static void test_outside_write(void)
{
	long long run = gp_test_submit(db, HDR("outside") "  stages:\n"
					      "    - {name: a, kind: noop, with: {duration: 1500ms}}\n"
					      "    - {name: b, kind: noop, needs: a}\n"
					      "    - {name: c, kind: noop, needs: a}\n",
				       NULL, 0);
	REQUIRE(wait_for(10000, "SELECT count(*) FROM stage_attempts WHERE run_id = %lld AND "
			 "stage = 'a' AND state = 'running'", run));
	long long before = q("SELECT revision FROM runs WHERE id = %lld", run);
	struct gp_err e = { 0 };
	char sql[256];
	snprintf(sql, sizeof sql, "UPDATE run_stages SET state = 'skipped', error = 'by hand', "
		 "finished_at = now() WHERE run_id = %lld AND stage = 'b'", run);
	REQUIRE_OK(gp_db_run(db, "skip by hand", sql, &e), e);
	CHECK(q("SELECT revision FROM runs WHERE id = %lld", run) == before + 1);
	CHECK(gp_test_wait_run(db, run, 20000) == 0); /* a skipped stage fails the run */
	CHECK(q("SELECT count(*) FROM stage_attempts WHERE run_id = %lld AND stage = 'b'", run) == 0);
	CHECK(q("SELECT count(*) FROM run_stages WHERE run_id = %lld AND stage = 'c' AND "
		"state = 'succeeded'", run) == 1);
}

static void test_retry_backoff_and_exhaustion(void)
{
	long long run = gp_test_submit(db, HDR("retry") "  stages:\n"
					    "    - name: flaky\n      kind: noop\n"
					    "      retry: {limit: 3, backoff: 300ms, max_backoff: 5s}\n"
					    "      with: {fail_attempts: 2}\n",
			       NULL, 0);
	CHECK(gp_test_wait_run(db, run, 20000) == 1);
	CHECK(q("SELECT count(*) FROM stage_attempts WHERE run_id = %lld", run) == 3);
	/* backoff doubles: >= 300 ms before attempt 2, >= 600 ms before attempt 3 */
	CHECK(q("SELECT count(*) FROM stage_attempts a2 JOIN stage_attempts a1 ON a1.run_id = "
		"a2.run_id AND a1.attempt = 1 WHERE a2.run_id = %lld AND a2.attempt = 2 AND "
		"a2.queued_at >= a1.finished_at + interval '300 ms'", run) == 1);
	CHECK(q("SELECT count(*) FROM stage_attempts a3 JOIN stage_attempts a2 ON a2.run_id = "
		"a3.run_id AND a2.attempt = 2 WHERE a3.run_id = %lld AND a3.attempt = 3 AND "
		"a3.queued_at >= a2.finished_at + interval '600 ms'", run) == 1);

	run = gp_test_submit(db, HDR("exhaust") "  stages:\n"
				    "    - {name: bad, kind: noop, retry: {limit: 1, backoff: 100ms}, "
				    "with: {fail_attempts: 5}}\n"
				    "    - {name: after, kind: noop, needs: bad}\n"
				    "    - {name: other, kind: noop}\n",
		     NULL, 0);
	CHECK(gp_test_wait_run(db, run, 20000) == 0);
	CHECK(q("SELECT count(*) FROM run_stages WHERE run_id = %lld AND stage = 'bad' AND "
		"state = 'failed' AND error LIKE '%%2 of 2 attempts used%%'", run) == 1);
	CHECK(q("SELECT count(*) FROM run_stages WHERE run_id = %lld AND stage = 'after' AND "
		"state = 'skipped'", run) == 1);
	CHECK(q("SELECT count(*) FROM run_stages WHERE run_id = %lld AND stage = 'other' AND "
		"state = 'succeeded'", run) == 1);
	CHECK(q("SELECT count(*) FROM stage_attempts WHERE run_id = %lld AND stage = 'after'", run) == 0);
	CHECK(q("SELECT count(*) FROM runs WHERE id = %lld AND error LIKE 'bad: %%'", run) == 1);

	/* Resume: only what did not succeed runs again. */
	struct gp_err e = { 0 };
	REQUIRE_OK(gp_run_retry(db, run, &e), e);
	CHECK(gp_test_wait_run(db, run, 20000) == 0); /* still fails: 5 failures wanted */
	CHECK(q("SELECT count(*) FROM stage_attempts WHERE run_id = %lld AND stage = 'bad'", run) == 4);
	CHECK(q("SELECT count(*) FROM stage_attempts WHERE run_id = %lld AND stage = 'other'", run) == 1);
	REQUIRE_OK(gp_run_retry(db, run, &e), e);
	CHECK(gp_test_wait_run(db, run, 20000) == 1); /* attempt 5 and 6: the 6th succeeds */
	CHECK(q("SELECT count(*) FROM stage_attempts WHERE run_id = %lld AND stage = 'bad'", run) == 6);
	CHECK(q("SELECT count(*) FROM stage_attempts WHERE run_id = %lld AND stage = 'other'", run) == 1);
	CHECK(q("SELECT count(*) FROM stage_attempts WHERE run_id = %lld AND stage = 'after' "
		"AND state = 'succeeded'", run) == 1);
	CHECK(gp_run_retry(db, run, &e) == GP_ERR_CONFLICT);
	CHECK_CONTAINS(e.msg, "only a failed or cancelled run can be retried");
}

static void test_timeout_and_cancel(void)
{
	long long run = gp_test_submit(db, HDR("slow") "  stages:\n"
					   "    - {name: s, kind: noop, timeout: 500ms, retry: {limit: 0}, "
					   "with: {duration: 20s}}\n",
			       NULL, 0);
	CHECK(gp_test_wait_run(db, run, 20000) == 0);
	CHECK(q("SELECT count(*) FROM stage_attempts WHERE run_id = %lld AND state = 'failed' "
		"AND error LIKE 'timed out after 500 ms'", run) == 1);
	/* the worker noticed (lease lost) and is free again: the next run proceeds */
	run = gp_test_submit(db, HDR("cancel") "  stages:\n"
				   "    - {name: long, kind: noop, with: {duration: 30s}}\n"
				   "    - {name: never, kind: noop, needs: long}\n",
		     NULL, 0);
	CHECK(wait_for(10000, "SELECT count(*) FROM stage_attempts WHERE run_id = %lld AND "
			      "state = 'running'", run));
	struct gp_err e = { 0 };
	REQUIRE_OK(gp_run_cancel(db, run, &e), e);
	CHECK(gp_test_wait_run(db, run, 1000) == 2);
	CHECK(q("SELECT count(*) FROM stage_attempts WHERE run_id = %lld AND state = 'cancelled'",
		run) == 1);
	CHECK(q("SELECT count(*) FROM run_stages WHERE run_id = %lld AND state = 'cancelled'", run) == 2);
	CHECK(gp_run_cancel(db, run, &e) == GP_ERR_CONFLICT);
	/* the worker lets go of the cancelled job within a few heartbeats */
	long long quick = gp_test_submit(db, HDR("quick") "  stages: [{name: q, kind: noop}]\n", NULL, 0);
	CHECK(gp_test_wait_run(db, quick, 5000) == 1);
	gp_sleep_ms(1500);
	CHECK(q("SELECT count(*) FROM stage_attempts WHERE run_id = %lld AND stage = 'never'", run) == 0);
}

static void test_parallelism(void)
{
	long long run = gp_test_submit(db, HDR("capped") "  parallelism: 1\n  stages:\n"
					     "    - {name: a, kind: noop, cache: false, with: {duration: 200ms}}\n"
					     "    - {name: b, kind: noop, cache: false, with: {duration: 200ms}}\n"
					     "    - {name: c, kind: noop, cache: false, with: {duration: 200ms}}\n"
					     "    - {name: d, kind: noop, cache: false, with: {duration: 200ms}}\n",
			       NULL, 0);
	CHECK(gp_test_wait_run(db, run, 20000) == 1);
	/* two workers, four independent stages, and still never two at once */
	CHECK(q("SELECT count(*) FROM stage_attempts x JOIN stage_attempts y ON x.run_id = y.run_id "
		"AND x.stage < y.stage WHERE x.run_id = %lld AND x.claimed_at < y.finished_at AND "
		"y.claimed_at < x.finished_at", run) == 0);
	CHECK(q("SELECT count(*) FROM stage_attempts WHERE run_id = %lld AND state = 'succeeded'",
		run) == 4);
}

static void test_cache(void)
{
	const char *y = HDR("cachey") "  params: {n: {type: int, default: 1}}\n  stages:\n"
				      "    - {name: a, kind: noop, with: {outputs: {n: \"${params.n}\"}}}\n"
				      "    - {name: b, kind: noop, needs: a, cache: false}\n";
	long long r1 = gp_test_submit(db, y, NULL, 0);
	CHECK(gp_test_wait_run(db, r1, 10000) == 1);
	long long r2 = gp_test_submit(db, y, NULL, 0);
	CHECK(gp_test_wait_run(db, r2, 10000) == 1);
	CHECK(q("SELECT count(*) FROM run_stages WHERE run_id = %lld AND stage = 'a' AND state = "
		"'cached' AND cached_from = %lld AND outputs->>'n' = '1'", r2, r1) == 1);
	CHECK(q("SELECT count(*) FROM run_stages WHERE run_id = %lld AND stage = 'b' AND state = "
		"'succeeded'", r2) == 1);
	const char *p2[] = { "n=2" };
	long long r3 = gp_test_submit(db, y, p2, 1);
	CHECK(gp_test_wait_run(db, r3, 10000) == 1);
	CHECK(q("SELECT count(*) FROM run_stages WHERE run_id = %lld AND stage = 'a' AND state = "
		"'succeeded' AND outputs->>'n' = '2'", r3) == 1);
	/* A new version of the kind's service invalidates the cache. */
	struct gp_err e = { 0 };
	REQUIRE_OK(gp_db_run(db, "bump", "UPDATE stage_kinds SET version = 'next' WHERE kind = 'noop'",
			     &e), e);
	long long r4 = gp_test_submit(db, y, NULL, 0);
	CHECK(gp_test_wait_run(db, r4, 10000) == 1);
	CHECK(q("SELECT count(*) FROM run_stages WHERE run_id = %lld AND stage = 'a' AND state = "
		"'succeeded'", r4) == 1);
}

static void test_worker_killed(pid_t *w1, pid_t *w2)
{
	/* Only one worker, so we know whom to kill. */
	stop(*w2, SIGTERM);
	*w2 = 0;
	long long run = gp_test_submit(db, HDR("killed") "  stages:\n"
					     "    - {name: k, kind: noop, cache: false, retry: {limit: 2}, "
					     "with: {duration: 2s}}\n",
			       NULL, 0);
	CHECK(wait_for(10000, "SELECT count(*) FROM stage_attempts WHERE run_id = %lld AND "
			      "state = 'running'", run));
	stop(*w1, SIGKILL);
	*w1 = worker();
	CHECK(gp_test_wait_run(db, run, 20000) == 1);
	CHECK(q("SELECT count(*) FROM stage_attempts WHERE run_id = %lld AND attempt = 1 AND "
		"state = 'expired'", run) == 1);
	CHECK(q("SELECT count(*) FROM stage_attempts WHERE run_id = %lld AND state = 'succeeded'",
		run) == 1);
	CHECK(q("SELECT count(*) FROM run_stages WHERE run_id = %lld AND outputs->>'attempt' = '2'",
		run) == 1);
	*w2 = worker();
}

/* The test stage kind exits abruptly mid-attempt when asked (crash_attempts,
 * honoured only with --allow-crash); the next attempt runs elsewhere. */
static void test_crash_attempts(pid_t *w1, pid_t *w2)
{
	stop(*w1, SIGTERM);
	stop(*w2, SIGTERM);
	pid_t crashy = gp_test_service(ENV, "genpipe-noop", "--lease-ms", "1500", "--heartbeat-ms", "300",
			     "--allow-crash", "--prefetch", "1", NULL);
	long long run = gp_test_submit(db, HDR("crashy") "  stages:\n"
					     "    - {name: c, kind: noop, cache: false, "
					     "with: {duration: 400ms, crash_attempts: 1}}\n",
			       NULL, 0);
	int ws = 0;
	long long deadline = gp_now_ms() + 15000;
	pid_t got = 0;
	while (gp_now_ms() < deadline && (got = waitpid(crashy, &ws, WNOHANG)) == 0)
		gp_sleep_ms(20);
	CHECK(got == crashy && WIFSIGNALED(ws) && WTERMSIG(ws) == SIGKILL);
	if (got != crashy)
		stop(crashy, SIGKILL);
	*w1 = worker();
	*w2 = worker();
	CHECK(gp_test_wait_run(db, run, 20000) == 1);
	CHECK(q("SELECT count(*) FROM stage_attempts WHERE run_id = %lld AND attempt = 1 AND "
		"state = 'expired'", run) == 1);
	CHECK(q("SELECT count(*) FROM stage_attempts WHERE run_id = %lld AND attempt = 2 AND "
		"state = 'succeeded'", run) == 1);
}

static const char *fan(int n)
{
	static char y[64 * 1024];
	int len = snprintf(y, sizeof y, HDR("fan%d") "  stages:\n    - {name: root, kind: noop, cache: false}\n", n);
	for (int i = 0; i < n; i++)
		len += snprintf(y + len, sizeof y - (size_t)len,
				"    - {name: s%d, kind: noop, needs: root, cache: false, "
				"with: {duration: 30ms}}\n", i);
	len += snprintf(y + len, sizeof y - (size_t)len,
			"    - name: sink\n      kind: noop\n      cache: false\n      needs: [");
	for (int i = 0; i < n; i++)
		len += snprintf(y + len, sizeof y - (size_t)len, "%ss%d", i ? ", " : "", i);
	snprintf(y + len, sizeof y - (size_t)len, "]\n");
	return y;
}

static void test_nats_killed(void)
{
	long long run = gp_test_submit(db, fan(200), NULL, 0);
	CHECK(wait_for(30000, "SELECT (count(*) >= 20)::int FROM run_stages WHERE run_id = %lld "
			      "AND state = 'succeeded'", run));
	/* killed mid-run */
	CHECK(q("SELECT count(*) FROM runs WHERE id = %lld AND state = 'running'", run) == 1);
	char path[600], buf[32] = "";
	snprintf(path, sizeof path, "%s/run/nats.pid", ENV->dir);
	FILE *f = fopen(path, "r");
	REQUIRE(f && fgets(buf, sizeof buf, f));
	fclose(f);
	int natspid = atoi(buf);
	REQUIRE(natspid > 0);
	kill(natspid, SIGKILL);
	gp_sleep_ms(1500);
	struct gp_stack_options o = { .data_dir = ENV->dir, .migrations_dir = ENV->migrations_dir,
				      .fast = 1 };
	struct gp_err e = { 0 };
	REQUIRE_OK(gp_stack_up(&o, &e), e);
	CHECK(gp_test_wait_run(db, run, 90000) == 1);
	CHECK(q("SELECT count(*) FROM run_stages WHERE run_id = %lld AND state = 'succeeded'",
		run) == 202);
	/* every stage exactly once: one succeeded attempt each, none twice */
	CHECK(q("SELECT count(*) FROM (SELECT stage FROM stage_attempts WHERE run_id = %lld AND "
		"state = 'succeeded' GROUP BY stage HAVING count(*) > 1) x", run) == 0);
	CHECK(q("SELECT count(DISTINCT stage) FROM stage_attempts WHERE run_id = %lld AND "
		"state = 'succeeded'", run) == 202);
}

/* PostgreSQL restarted mid-run: services reconnect, the run completes, no
 * stage runs twice. */
static void test_pg_restart(void)
{
	long long run = gp_test_submit(db, HDR("pgrestart") "  stages:\n"
					       "    - {name: a, kind: noop, cache: false, with: {duration: 200ms}}\n"
					       "    - {name: b, kind: noop, cache: false, needs: a, with: {duration: 200ms}}\n"
					       "    - {name: c, kind: noop, cache: false, needs: b, with: {duration: 200ms}}\n"
					       "    - {name: d, kind: noop, cache: false, needs: c, with: {duration: 200ms}}\n"
					       "    - {name: e, kind: noop, cache: false, needs: d, with: {duration: 200ms}}\n",
			       NULL, 0);
	CHECK(wait_for(30000, "SELECT count(*) FROM run_stages WHERE run_id = %lld AND stage = 'b' "
			      "AND state = 'succeeded'", run));
	char path[600], buf[32] = "";
	snprintf(path, sizeof path, "%s/run/postgres.pid", ENV->dir);
	FILE *f = fopen(path, "r");
	REQUIRE(f && fgets(buf, sizeof buf, f));
	fclose(f);
	kill(atoi(buf), SIGINT); /* fast shutdown: every session is cut */
	gp_db_destroy(db);
	db = NULL;
	gp_sleep_ms(1000);
	struct gp_stack_options o = { .data_dir = ENV->dir, .migrations_dir = ENV->migrations_dir,
				      .fast = 1 };
	struct gp_err e = { 0 };
	REQUIRE_OK(gp_stack_up(&o, &e), e);
	db = gp_test_db(ENV);
	CHECK(gp_test_wait_run(db, run, 60000) == 1);
	CHECK(q("SELECT count(*) FROM stage_attempts WHERE run_id = %lld AND state = 'succeeded'",
		run) == 5);
	CHECK(q("SELECT count(*) FROM (SELECT stage FROM stage_attempts WHERE run_id = %lld AND "
		"state = 'succeeded' GROUP BY stage HAVING count(*) > 1) x", run) == 0);
}

static void test_orchestrators_killed(pid_t *o1)
{
	pid_t o2 = orchestrator();
	long long run = gp_test_submit(db, HDR("orch") "  stages:\n"
					   "    - {name: a, kind: noop, cache: false, with: {duration: 300ms}}\n"
					   "    - {name: b, kind: noop, cache: false, needs: a, with: {duration: 300ms}}\n"
					   "    - {name: c, kind: noop, cache: false, needs: b, with: {duration: 300ms}}\n"
					   "    - {name: d, kind: noop, cache: false, needs: c, with: {duration: 300ms}}\n",
			       NULL, 0);
	CHECK(wait_for(30000, "SELECT count(*) FROM run_stages WHERE run_id = %lld AND stage = 'a' "
			      "AND state = 'succeeded'", run));
	stop(*o1, SIGKILL);
	CHECK(wait_for(30000, "SELECT count(*) FROM run_stages WHERE run_id = %lld AND stage = 'b' "
			      "AND state = 'succeeded'", run));
	stop(o2, SIGKILL);
	gp_sleep_ms(500);
	*o1 = orchestrator();
	CHECK(gp_test_wait_run(db, run, 20000) == 1);
	CHECK(q("SELECT count(*) FROM stage_attempts WHERE run_id = %lld", run) == 4);
}

static int body(struct gp_test_env *env)
{
	ENV = env;
	db = gp_test_db(env);
	pid_t o = orchestrator();
	pid_t w1 = worker(), w2 = worker();
	/* workers register their kind at start */
	CHECK(wait_for(10000, "SELECT count(*) FROM stage_kinds WHERE kind = 'noop'"));
	gp_sleep_ms(300);
	test_dag_parallel();
	test_outside_write();
	test_retry_backoff_and_exhaustion();
	test_timeout_and_cancel();
	test_cache();
	test_parallelism();
	test_worker_killed(&w1, &w2);
	test_crash_attempts(&w1, &w2);
	test_orchestrators_killed(&o);
	test_nats_killed();
	test_pg_restart();
	stop(w1, SIGTERM);
	stop(w2, SIGTERM);
	stop(o, SIGTERM);
	gp_db_destroy(db);
	return CHECK_RESULT();
}

int main(void)
{
	return gp_test_run(body);
}
