/*
 * The orchestrator service as a process: it relays the outbox to JetStream,
 * serves /healthz, /readyz and /metrics (checked by promtool, Debian's
 * prometheus package), and exits 0 on SIGTERM. A registry holding every
 * metric type with labels passes promtool too.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../check.h"
#include "../harness.h"
#include "http.h"
#include "outbox.h"
#include "stack.h"
#include "subjects.h"
#include "worker.h"

static int promtool_ok(const char *text, const char *where)
{
	char path[] = "/tmp/gp-metrics-XXXXXX";
	int fd = mkstemp(path);
	REQUIRE(fd >= 0);
	size_t n = strlen(text);
	REQUIRE(write(fd, text, n) == (ssize_t)n);
	close(fd);
	char cmd[256];
	snprintf(cmd, sizeof cmd, "promtool check metrics < %s", path);
	int rc = system(cmd);
	unlink(path);
	if (rc != 0)
		fprintf(stderr, "promtool rejected %s:\n%s\n", where, text);
	return rc == 0;
}

static int body(struct gp_test_env *env)
{
	struct gp_err e = { 0 };
	int port = gp_stack_free_port();
	char portarg[32];
	snprintf(portarg, sizeof portarg, "%d", port);
	pid_t orch = gp_test_service(env, "genpipe-orchestrator", "--http-port", portarg,
				     "--reap-interval-ms", "200", "--redispatch-ms", "1500",
				     (char *)NULL);
	char url[128];
	long code = 0;
	char *text = NULL;
	long long deadline = gp_now_ms() + 15000;
	snprintf(url, sizeof url, "http://127.0.0.1:%d/readyz", port);
	while (gp_now_ms() < deadline) {
		if (gp_http_get(url, 1000, &code, &text, &e) == GP_OK && code == 200)
			break;
		free(text);
		text = NULL;
		gp_sleep_ms(100);
	}
	CHECK(code == 200);
	free(text);
	text = NULL;

	/* It relays: a job enqueued in PostgreSQL reaches the stream. */
	struct gp_db *db = gp_test_db(env);
	struct gp_bus *bus = gp_test_bus(env, "test");
	long long run = gp_test_make_run(db, "metrics-test");
	char durable[64], filter[64];
	struct gp_consumer_def cd = gp_bus_job_consumer("probe", durable, sizeof durable, filter,
							 sizeof filter, 5000);
	int ns = 0;
	const struct gp_stream_def *sd = gp_bus_default_streams(&ns);
	REQUIRE_OK(gp_bus_declare(bus, sd, ns, &cd, 1, &e), e);
	REQUIRE_OK(gp_db_begin(db, &e), e);
	struct gp_attempt_spec s = { .run_id = run, .stage = "p", .kind = "probe", .attempt = 1 };
	REQUIRE_OK(gp_attempt_enqueue(db, &s, NULL, &e), e);
	REQUIRE_OK(gp_db_commit(db, &e), e);
	natsSubscription *sub = NULL;
	REQUIRE_OK(gp_bus_pull_subscribe(bus, &cd, &sub, &e), e);
	natsMsgList list = { 0 };
	REQUIRE_OK(gp_bus_fetch(sub, 1, 5000, &list, &e), e);
	CHECK(list.Count == 1);
	CHECK_STR(natsMsg_GetSubject(list.Msgs[0]), GP_SUBJ_JOBS "probe");
	natsMsgList_Destroy(&list);
	natsSubscription_Destroy(sub);
	deadline = gp_now_ms() + 5000;
	while (gp_test_scalar(db, "SELECT count(*) FROM outbox WHERE sent_at IS NULL") != 0 &&
	       gp_now_ms() < deadline)
		gp_sleep_ms(50);
	CHECK(gp_test_scalar(db, "SELECT count(*) FROM outbox WHERE sent_at IS NULL") == 0);

	/* A row another relay held (and then let go of without a notification)
	 * is still relayed, by the next sweep. */
	kill(orch, SIGSTOP);
	long long held_id = 0;
	REQUIRE_OK(gp_outbox_put(db, GP_SUBJ_EVENTS "999", "held", 4, &held_id, &e), e);
	struct gp_db *holder = gp_test_db(env);
	char hq[160];
	snprintf(hq, sizeof hq, "SELECT id FROM outbox WHERE id = %lld FOR UPDATE", held_id);
	REQUIRE_OK(gp_db_begin(holder, &e), e);
	REQUIRE_OK(gp_db_run(holder, "hold", hq, &e), e);
	kill(orch, SIGCONT);
	gp_sleep_ms(300); /* it wakes, relays, skips the locked row */
	gp_db_rollback(holder);
	gp_db_destroy(holder);
	snprintf(hq, sizeof hq, "SELECT count(*) FROM outbox WHERE id = %lld AND sent_at IS NULL",
		 held_id);
	deadline = gp_now_ms() + 5000;
	while (gp_test_scalar(db, hq) != 0 && gp_now_ms() < deadline)
		gp_sleep_ms(50);
	CHECK(gp_test_scalar(db, hq) == 0);

	/* It reaps: an expired lease gets a new attempt. */
	REQUIRE_OK(gp_db_run(db, "expire",
			     "UPDATE stage_attempts SET state = 'running', lease_token = 'x', "
			     "lease_deadline = now() - interval '1 second' WHERE kind = 'probe'",
			     &e), e);
	deadline = gp_now_ms() + 5000;
	while (gp_test_scalar(db, "SELECT count(*) FROM stage_attempts WHERE kind = 'probe' "
				  "AND attempt = 2") == 0 && gp_now_ms() < deadline)
		gp_sleep_ms(50);
	CHECK(gp_test_scalar(db, "SELECT count(*) FROM stage_attempts WHERE kind = 'probe' "
				 "AND attempt = 2 AND state = 'queued'") == 1);
	/* No probe worker takes it: after --redispatch-ms its job message is
	 * published again (once, then backing off). */
	deadline = gp_now_ms() + 8000;
	while (gp_test_scalar(db, "SELECT redispatches FROM stage_attempts WHERE kind = 'probe' "
				  "AND attempt = 2") == 0 && gp_now_ms() < deadline)
		gp_sleep_ms(100);
	CHECK(gp_test_scalar(db, "SELECT redispatches FROM stage_attempts WHERE kind = 'probe' "
				 "AND attempt = 2") == 1);

	snprintf(url, sizeof url, "http://127.0.0.1:%d/metrics", port);
	deadline = gp_now_ms() + 5000;
	do {
		free(text);
		text = NULL;
		REQUIRE_OK(gp_http_get(url, 2000, &code, &text, &e), e);
	} while (!strstr(text, "genpipe_leases_reaped_total 1\n") && gp_now_ms() < deadline &&
		 (gp_sleep_ms(100), 1));
	CHECK(code == 200);
	CHECK_CONTAINS(text, "# TYPE genpipe_outbox_relayed_total counter");
	CHECK_CONTAINS(text, "# TYPE genpipe_outbox_direct_total counter");
	CHECK_CONTAINS(text, "genpipe_attempts_redispatched_total 1\n");
	CHECK_CONTAINS(text, "genpipe_leases_reaped_total 1\n");
	CHECK_CONTAINS(text, "genpipe_up 1\n");
	CHECK(promtool_ok(text, "the orchestrator's /metrics"));
	free(text);
	text = NULL;

	snprintf(url, sizeof url, "http://127.0.0.1:%d/healthz", port);
	REQUIRE_OK(gp_http_get(url, 2000, &code, &text, &e), e);
	CHECK(code == 200);
	CHECK_STR(text, "ok\n");
	free(text);
	text = NULL;
	snprintf(url, sizeof url, "http://127.0.0.1:%d/nope", port);
	REQUIRE_OK(gp_http_get(url, 2000, &code, &text, &e), e);
	CHECK(code == 404);
	free(text);

	/* Not ready while PostgreSQL is down; ready again when it is back. */
	text = NULL; /* freed above */
	{
		char ppath[600], pbuf[32] = "";
		snprintf(ppath, sizeof ppath, "%s/run/postgres.pid", env->dir);
		FILE *pf = fopen(ppath, "r");
		REQUIRE(pf && fgets(pbuf, sizeof pbuf, pf));
		fclose(pf);
		int pgpid = atoi(pbuf);
		REQUIRE(pgpid > 0);
		kill(pgpid, SIGINT); /* fast shutdown */
		snprintf(url, sizeof url, "http://127.0.0.1:%d/readyz", port);
		deadline = gp_now_ms() + 10000;
		code = 0;
		while (gp_now_ms() < deadline) {
			free(text);
			text = NULL;
			if (gp_http_get(url, 3000, &code, &text, &e) == GP_OK && code == 503)
				break;
			gp_sleep_ms(100);
		}
		CHECK(code == 503);
		CHECK_CONTAINS(text, "database");
		free(text);
		text = NULL;
		struct gp_stack_options so = { .data_dir = env->dir,
					       .migrations_dir = env->migrations_dir, .fast = 1 };
		REQUIRE_OK(gp_stack_up(&so, &e), e);
		deadline = gp_now_ms() + 10000;
		while (gp_now_ms() < deadline) {
			free(text);
			text = NULL;
			if (gp_http_get(url, 3000, &code, &text, &e) == GP_OK && code == 200)
				break;
			gp_sleep_ms(100);
		}
		CHECK(code == 200);
		free(text);
		text = NULL;
		/* our own connection died with the old server */
		gp_db_destroy(db);
		db = gp_test_db(env);
	}

	/* SIGTERM: drains and exits 0. */
	kill(orch, SIGTERM);
	int ws = 0;
	deadline = gp_now_ms() + 10000;
	int done = 0;
	while (gp_now_ms() < deadline && !(done = waitpid(orch, &ws, WNOHANG) == orch))
		gp_sleep_ms(50);
	CHECK(done && WIFEXITED(ws) && WEXITSTATUS(ws) == 0);
	if (!done) {
		kill(orch, SIGKILL);
		waitpid(orch, NULL, 0);
	}

	/* Every metric type, with labels, as a worker registers them. */
	struct gp_metrics *reg = gp_metrics_create();
	struct gp_worker_config wc = { .kind = "probe", .lease_ms = 3000, .heartbeat_ms = 500,
				       .ack_wait_ms = 3000, .handler = NULL, .metrics = reg };
	struct gp_worker *w = NULL;
	REQUIRE_OK(gp_worker_create(&w, &wc, db, bus, env->db_url, &e), e);
	static const double b[] = { 0.005, 0.05, 0.5 };
	struct gp_metric *h = gp_metrics_get(reg, GP_HISTOGRAM, "genpipe_test_latency_seconds",
					     "Latency", "model=\"a\"", b, 3);
	gp_metric_observe(h, 0.01);
	gp_metric_observe(h, 7);
	char *rendered = NULL;
	size_t len = 0;
	REQUIRE_OK(gp_metrics_render(reg, &rendered, &len, &e), e);
	CHECK_CONTAINS(rendered, "genpipe_job_duration_seconds_bucket{kind=\"probe\",le=\"0.1\"} 0");
	CHECK(promtool_ok(rendered, "a worker registry"));
	free(rendered);
	gp_worker_destroy(w);
	gp_metrics_destroy(reg);
	gp_bus_destroy(bus);
	gp_db_destroy(db);
	return CHECK_RESULT();
}

int main(void)
{
	return gp_test_run(body);
}
