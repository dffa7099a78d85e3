/*
 * orchestrator_bench: the orchestrator's own overhead on the local stack.
 *
 * Starts a private stack (nats-server with JetStream, PostgreSQL with fsync
 * on, as `genpipe dev up` runs it) in a temporary directory, one
 * genpipe-orchestrator and W genpipe-noop workers, and runs a fan-out/fan-in
 * pipeline of N no-op stages (root -> N parallel stages -> sink). Prints:
 *   dispatch latency p50/p99: attempt queued (row written with its job
 *     message) to claimed by a worker;
 *   stages per second: N+2 over the run's wall time, created to finished.
 * No other scheduler runs on this machine, so the peer figures printed
 * beside ours are the published ones the goal was set against (Argo about
 * 10 s of overhead a step, Airflow seconds), not measurements.
 *
 * A second pipeline, a chain of 50 stages, shows the per-step overhead on
 * its own (no queueing behind other stages): from one stage finishing to
 * the next being claimed.
 *
 * Each run of the fan-out is made twice: with no cap on parallelism (every
 * stage is queued the moment root finishes, so its dispatch latency is mostly
 * queueing behind the workers) and with spec.parallelism = PAR (stages are
 * queued as slots free up, so queued-to-claimed measures dispatch itself).
 *
 * usage: orchestrator_bench [STAGES (1000)] [WORKERS (6)] [RUNS (1)] [PAR (6)]
 * (parallelism at most the workers: no stage waits for a free worker, so
 * queued-to-claimed is the dispatch itself)
 * BENCH_KEEP=1 keeps the stack's directory (logs) afterwards, and with
 * BENCH_PG_LOG=1 its postgres.log has every statement's duration; building with
 * -DBENCH_FAST=1 runs PostgreSQL with fsync off, to see what fsync costs.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "db.h"
#include "http.h"
#include "run.h"
#include "spec.h"
#include "bench_stack.h"
#include "stack.h"

#ifndef BENCH_FAST
#define BENCH_FAST 0
#endif

static char dir[] = "/tmp/genpipe-bench-XXXXXX";
static char nats_url[256], db_url[600];

static pid_t spawn(const char *prog, const char *a1, const char *a2, const char *a3,
		   const char *a4)
{
	char bin[700], logp[700], e1[300], e2[700];
	snprintf(bin, sizeof bin, "%s/%s", GENPIPE_BIN_DIR, prog);
	snprintf(logp, sizeof logp, "%s/logs/%s.log", dir, prog);
	snprintf(e1, sizeof e1, "GENPIPE_NATS_URL=%s", nats_url);
	snprintf(e2, sizeof e2, "GENPIPE_DATABASE_URL=%s", db_url);
	char *envx[] = { e1, e2, "GENPIPE_LOG_LEVEL=warn", NULL };
	char *argv[] = { bin, (char *)a1, (char *)a2, (char *)a3, (char *)a4, NULL };
	int pid = 0;
	struct gp_err e = { 0 };
	fflush(NULL);
	if (gp_stack_spawn(argv, envx, logp, 1, &pid, &e)) {
		fprintf(stderr, "bench: %s\n", e.msg);
		exit(1);
	}
	return pid;
}

static double scalar(struct gp_db *db, const char *sql)
{
	PGresult *r = NULL;
	struct gp_err e = { 0 };
	if (gp_db_exec(db, "bench query", sql, 0, NULL, &r, &e) || PQntuples(r) != 1) {
		fprintf(stderr, "bench: %s\n", e.msg);
		exit(1);
	}
	double v = atof(PQgetvalue(r, 0, 0));
	PQclear(r);
	return v;
}

/* Value of an unlabelled series in Prometheus text. */
static double metric(const char *text, const char *name)
{
	char key[128];
	snprintf(key, sizeof key, "\n%s ", name);
	const char *l = strstr(text, key);
	return l ? atof(l + strlen(key)) : 0;
}

/* A command-line number within [lo, hi], or exit 2 naming the argument. */
static int arg(const char *s, const char *name, long lo, long hi)
{
	char *end = NULL;
	long v = strtol(s, &end, 10);
	if (!*s || *end || v < lo || v > hi) {
		fprintf(stderr, "orchestrator_bench: %s must be an integer from %ld to %ld, not \"%s\"\n",
			name, lo, hi, s);
		exit(2);
	}
	return (int)v;
}

int main(int argc, char **argv)
{
	int n = argc > 1 ? arg(argv[1], "STAGES", 1, 100000) : 1000;
	int workers = argc > 2 ? arg(argv[2], "WORKERS", 1, 64) : 6;
	int runs = argc > 3 ? arg(argv[3], "RUNS", 1, 100) : 1;
	int par = argc > 4 ? arg(argv[4], "PAR", 1, 100000) : 6;
	if (n < 1 || n > 5000 || workers < 1 || workers > 64 || runs < 1 || par < 1) {
		fprintf(stderr, "usage: orchestrator_bench [STAGES 1..5000] [WORKERS 1..64] [RUNS] "
				"[PARALLELISM]\n");
		return 2;
	}
	if (!mkdtemp(dir)) {
		perror("mkdtemp");
		return 1;
	}
	chmod(dir, 0711);
	struct gp_err e = { 0 };
	struct gp_stack_options o = { .data_dir = dir, .migrations_dir = GENPIPE_SOURCE_MIGRATIONS,
				      .fast = BENCH_FAST };
	int rc = 1;
	pid_t kids[70];
	int nk = 0;
	struct gp_db *db = NULL;
	char *yaml = NULL;
	cJSON *doc = NULL, *params = NULL;
	/* Servers from a child: this process forks workers and must not hold
	 * nats.c's threads. */
	if (bench_stack_up(&o, nats_url, sizeof nats_url, db_url, sizeof db_url, &e))
		goto out;
	int oport = gp_stack_free_port();
	char oports[16];
	snprintf(oports, sizeof oports, "%d", oport);
	kids[nk++] = spawn("genpipe-orchestrator", "--sweep-ms", "1000", "--http-port", oports);
	for (int i = 0; i < workers; i++)
		kids[nk++] = spawn("genpipe-noop", "--lease-ms", "30000", NULL, NULL);
	if (gp_db_connect(&db, db_url, 10000, &e))
		goto out;
	if (getenv("BENCH_PG_LOG")) {
		/* every statement with its duration, in the kept stack's postgres.log */
		if (gp_db_run(db, "log statements",
			      "ALTER SYSTEM SET log_min_duration_statement = 0", &e))
			goto out;
		scalar(db, "SELECT pg_reload_conf()::int");
	}
	while (scalar(db, "SELECT count(*) FROM stage_kinds WHERE kind = 'noop'") < 1)
		gp_sleep_ms(50);
	gp_sleep_ms(500);
	size_t cap = (size_t)n * 80 + 4096, len = 0;
	yaml = malloc(cap);
	len += (size_t)snprintf(yaml + len, cap - len,
				"apiVersion: genpipe/v1\nkind: Pipeline\nmetadata: {name: bench}\n"
				"spec:\n  parallelism: %d\n  stages:\n"
				"    - {name: root, kind: noop, cache: false}\n", par);
	for (int i = 0; i < n; i++)
		len += (size_t)snprintf(yaml + len, cap - len,
					"    - {name: s%d, kind: noop, needs: root, cache: false}\n", i);
	len += (size_t)snprintf(yaml + len, cap - len,
				"    - {name: sink, kind: noop, cache: false, needs: [");
	for (int i = 0; i < n; i++)
		len += (size_t)snprintf(yaml + len, cap - len, "%ss%d", i ? "," : "", i);
	len += (size_t)snprintf(yaml + len, cap - len, "]}\n");
	struct gp_spec_errors *errs = calloc(1, sizeof *errs);
	if (gp_spec_parse(yaml, len, &doc, errs)) {
		fprintf(stderr, "bench: spec: %s\n", errs->v[0].msg);
		goto out;
	}
	free(errs);
	struct gp_version_ref vcap, vfree;
	params = cJSON_CreateObject();
	if (gp_pipeline_submit(db, yaml, doc, "bench", &vcap, &e))
		goto out;
	/* the same pipeline without the cap */
	cJSON_ReplaceItemInObject(cJSON_GetObjectItem(doc, "spec"), "parallelism",
				  cJSON_CreateNumber(0));
	if (gp_pipeline_submit(db, yaml, doc, "bench", &vfree, &e))
		goto out;
	printf("orchestrator_bench: %d-stage fan-out/fan-in of no-op stages, %d noop workers, "
	       "PostgreSQL fsync on\n",
	       n, workers);
	printf("%-6s %-12s %10s %12s %12s %14s\n", "run", "parallelism", "stages", "dispatch p50",
	       "dispatch p99", "stages/s");
	for (int k = 0; k < 2 * runs; k++) {
		long long run = 0;
		int capped = k % 2;
		if (gp_run_create(db, capped ? vcap.id : vfree.id, params, "bench", &run, &e))
			goto out;
		char sql[400];
		long long deadline = gp_now_ms() + 600000;
		for (;;) {
			snprintf(sql, sizeof sql,
				 "SELECT count(*) FROM runs WHERE id = %lld AND state IN "
				 "('succeeded', 'failed')", run);
			if (scalar(db, sql) > 0)
				break;
			if (gp_now_ms() > deadline) {
				fprintf(stderr, "bench: run %lld did not finish\n", run);
				goto out;
			}
			gp_sleep_ms(20);
		}
		snprintf(sql, sizeof sql, "SELECT count(*) FROM runs WHERE id = %lld AND state = "
			 "'succeeded'", run);
		if (scalar(db, sql) != 1) {
			fprintf(stderr, "bench: run %lld failed\n", run);
			goto out;
		}
		char q50[300], q99[300], qs[300];
		snprintf(q50, sizeof q50, "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY "
			 "extract(epoch FROM claimed_at - queued_at) * 1000) FROM stage_attempts "
			 "WHERE run_id = %lld", run);
		snprintf(q99, sizeof q99, "SELECT percentile_cont(0.99) WITHIN GROUP (ORDER BY "
			 "extract(epoch FROM claimed_at - queued_at) * 1000) FROM stage_attempts "
			 "WHERE run_id = %lld", run);
		snprintf(qs, sizeof qs, "SELECT %d / extract(epoch FROM finished_at - created_at) "
			 "FROM runs WHERE id = %lld", n + 2, run);
		char pl[16];
		snprintf(pl, sizeof pl, "%d", par);
		printf("%-6lld %-12s %10d %9.1f ms %9.1f ms %14.0f\n", run, capped ? pl : "unbounded",
		       n + 2, scalar(db, q50), scalar(db, q99), scalar(db, qs));
	}
	/* The chain: per-step overhead. */
	{
		size_t l2 = 0, c2 = 64 * 80 + 1024;
		char *y2 = malloc(c2);
		l2 += (size_t)snprintf(y2 + l2, c2 - l2,
				       "apiVersion: genpipe/v1\nkind: Pipeline\nmetadata: {name: chain}\n"
				       "spec:\n  stages:\n    - {name: c0, kind: noop, cache: false}\n");
		for (int i = 1; i < 50; i++)
			l2 += (size_t)snprintf(y2 + l2, c2 - l2,
					       "    - {name: c%d, kind: noop, needs: c%d, cache: false}\n",
					       i, i - 1);
		struct gp_spec_errors *e2 = calloc(1, sizeof *e2);
		cJSON *d2 = NULL;
		struct gp_version_ref v2;
		long long run = 0;
		if (gp_spec_parse(y2, l2, &d2, e2) || gp_pipeline_submit(db, y2, d2, "bench", &v2, &e) ||
		    gp_run_create(db, v2.id, params, "bench", &run, &e)) {
			free(y2);
			free(e2);
			cJSON_Delete(d2);
			goto out;
		}
		free(y2);
		free(e2);
		cJSON_Delete(d2);
		char sql[600];
		snprintf(sql, sizeof sql, "SELECT count(*) FROM runs WHERE id = %lld AND state IN "
			 "('succeeded', 'failed')", run);
		while (scalar(db, sql) < 1)
			gp_sleep_ms(20);
		snprintf(sql, sizeof sql,
			 "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) FROM (SELECT "
			 "extract(epoch FROM b.claimed_at - a.finished_at) * 1000 AS ms FROM "
			 "stage_attempts a JOIN stage_attempts b ON b.run_id = a.run_id AND "
			 "b.stage = 'c' || (substr(a.stage, 2)::int + 1) WHERE a.run_id = %lld) x",
			 run);
		double hop50 = scalar(db, sql);
		snprintf(sql, sizeof sql,
			 "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM "
			 "claimed_at - queued_at) * 1000) FROM stage_attempts WHERE run_id = %lld", run);
		double disp50 = scalar(db, sql);
		printf("chain of 50: step overhead (finished -> next claimed) p50 %.1f ms, dispatch "
		       "(queued -> claimed) p50 %.1f ms\n",
		       hop50, disp50);
	}
	/* Where the orchestrator's time went, from its own metrics. */
	char url[64], *text = NULL;
	long code = 0;
	snprintf(url, sizeof url, "http://127.0.0.1:%d/metrics", oport);
	if (gp_http_get(url, 2000, &code, &text, &e) == GP_OK) {
		double adv = metric(text, "genpipe_run_advances_total");
		double sum = metric(text, "genpipe_run_advance_seconds_sum");
		double disp = metric(text, "genpipe_attempts_dispatched_total");
		printf("orchestrator: %.0f advances, mean %.1f ms (%.0f read every stage row, %.0f "
		       "only the active stages), %.0f attempts dispatched, %.0f job messages published "
		       "by the advance itself, %.0f relay passes for %.0f messages\n",
		       adv, adv > 0 ? sum * 1000 / adv : 0,
		       metric(text, "genpipe_run_stage_reads_total{read=\"all\"}"),
		       metric(text, "genpipe_run_stage_reads_total{read=\"active\"}"), disp,
		       metric(text, "genpipe_outbox_direct_total"),
		       metric(text, "genpipe_outbox_relay_passes_total"),
		       metric(text, "genpipe_outbox_relayed_total"));
		free(text);
	}
	printf("goal on this 2-core machine: dispatch p50 <= 5 ms, >= 500 stages/s\n");
	printf("published peers (not measured here): Argo Workflows ~10 s overhead per step; "
	       "Airflow seconds per task\n");
	rc = 0;
out:
	if (rc && e.msg[0])
		fprintf(stderr, "bench: %s\n", e.msg);
	free(yaml);
	cJSON_Delete(doc);
	cJSON_Delete(params);
	gp_db_destroy(db);
	for (int i = 0; i < nk; i++) {
		kill(kids[i], SIGTERM);
		waitpid(kids[i], NULL, 0);
	}
	gp_stack_down(dir, NULL, &e);
	char cmd[300];
	snprintf(cmd, sizeof cmd, getenv("BENCH_KEEP") ? "true %s" : "rm -rf %s", dir);
	if (system(cmd) != 0)
		fprintf(stderr, "bench: could not remove %s\n", dir);
	return rc;
}
