/*
 * harness.c: see harness.h.
 */
#define _XOPEN_SOURCE 700
#include "harness.h"

#include <ftw.h>
#include <signal.h>
#include <stdarg.h>
#include <sys/prctl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "outbox.h"
#include "run.h"
#include "spec.h"
#include "stack.h"

static int rm_one(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
	(void)sb;
	(void)flag;
	(void)ftw;
	return remove(p);
}

static volatile sig_atomic_t stop_requested;

static void on_stop_signal(int sig)
{
	(void)sig;
	stop_requested = 1;
}

int gp_test_run(int (*body)(struct gp_test_env *env))
{
	struct gp_test_env env;
	memset(&env, 0, sizeof env);
	const char *tmp = getenv("TMPDIR");
	snprintf(env.dir, sizeof env.dir, "%s/genpipe-test-XXXXXX", tmp && *tmp ? tmp : "/tmp");
	if (!mkdtemp(env.dir)) {
		perror("mkdtemp");
		return 1;
	}
	/* As root, PostgreSQL runs as an unprivileged user who must be able to
	 * traverse this directory (contents stay private to their owners). */
	chmod(env.dir, 0711);
	snprintf(env.migrations_dir, sizeof env.migrations_dir, "%s", GENPIPE_SOURCE_MIGRATIONS);
	snprintf(env.bin_dir, sizeof env.bin_dir, "%s", GENPIPE_TEST_BIN_DIR);
	struct gp_stack_options o = {
		.data_dir = env.dir,
		.migrations_dir = env.migrations_dir,
		.bin_dir = NULL,
		.fast = 1,
		.progress = stderr,
	};
	struct gp_err err = { 0 };
	int rc = 1;
	/* Start the servers from a child so that this process never loads
	 * nats.c's threads and can fork the test body cleanly. */
	fflush(NULL);
	pid_t up = fork();
	if (up == 0) {
		if (gp_stack_up(&o, &err)) {
			fprintf(stderr, "harness: could not start servers: %s\n", err.msg);
			_exit(1);
		}
		_exit(0);
	}
	int uws = 0;
	while (waitpid(up, &uws, 0) < 0)
		;
	if (!WIFEXITED(uws) || WEXITSTATUS(uws) != 0)
		goto out;
	if (gp_stack_env(env.dir, "GENPIPE_NATS_URL", env.nats_url, sizeof env.nats_url, &err) ||
	    gp_stack_env(env.dir, "GENPIPE_DATABASE_URL", env.db_url, sizeof env.db_url, &err)) {
		fprintf(stderr, "harness: %s\n", err.msg);
		goto out;
	}
	fflush(NULL);
	pid_t c = fork();
	if (c == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		exit(body(&env)); /* exit, not _exit: LeakSanitizer checks the body */
	}
	/* Our own deadline, under ctest's, so that a hung body still ends with
	 * the servers stopped; SIGTERM/SIGINT to us end the body the same way. */
	signal(SIGTERM, on_stop_signal);
	signal(SIGINT, on_stop_signal);
	const char *lim = getenv("GENPIPE_TEST_TIMEOUT_S");
	long long deadline = gp_now_ms() + 1000LL * (lim && *lim ? atoll(lim) : 240);
	int ws = 0;
	for (;;) {
		pid_t w = waitpid(c, &ws, WNOHANG);
		if (w == c)
			break;
		if (stop_requested || gp_now_ms() > deadline) {
			fprintf(stderr, "harness: %s: killing the test body\n",
				stop_requested ? "interrupted" : "test body ran past its deadline");
			kill(c, SIGKILL);
			waitpid(c, &ws, 0);
			break;
		}
		gp_sleep_ms(20);
	}
	if (WIFEXITED(ws)) {
		rc = WEXITSTATUS(ws);
	} else {
		fprintf(stderr, "harness: test body killed by signal %d\n", WTERMSIG(ws));
		rc = 1;
	}
	/* The services the body started ran with the same sanitizers: a report
	 * in any of their logs fails the test even if the body did not notice. */
	if (rc == 0) {
		char cmd[700];
		snprintf(cmd, sizeof cmd,
			 "grep -l -E 'ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error:' "
			 "%s/logs/genpipe-*.log 2>/dev/null",
			 env.dir);
		if (system(cmd) == 0) {
			fprintf(stderr, "harness: sanitizer report in the service logs above\n");
			rc = 1;
		}
	}
out:
	gp_stack_down(env.dir, stderr, &err);
	if (rc != 0 || getenv("GENPIPE_TEST_KEEP")) {
		/* Keep the server logs of a failed run visible in the test output. */
		char cmd[600];
		snprintf(cmd, sizeof cmd, "tail -n 30 %s/logs/*.log 1>&2", env.dir);
		if (system(cmd) != 0)
			fprintf(stderr, "harness: no logs\n");
	}
	if (!getenv("GENPIPE_TEST_KEEP"))
		nftw(env.dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
	return rc;
}

struct gp_test_child gp_test_fork_held(int (*fn)(const struct gp_test_env *env, void *arg),
				       const struct gp_test_env *env, void *arg)
{
	int p[2];
	struct gp_test_child c = { -1, -1 };
	if (pipe(p) != 0) {
		perror("pipe");
		exit(1);
	}
	fflush(NULL);
	pid_t pid = fork();
	if (pid == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		close(p[1]);
		char b;
		if (read(p[0], &b, 1) != 1)
			_exit(4); /* parent gave up */
		close(p[0]);
		_exit(fn(env, arg));
	}
	close(p[0]);
	c.pid = pid;
	c.go_fd = p[1];
	return c;
}

void gp_test_release(struct gp_test_child *c)
{
	if (c->go_fd >= 0) {
		ssize_t w = write(c->go_fd, "g", 1);
		(void)w;
		close(c->go_fd);
		c->go_fd = -1;
	}
}

int gp_test_wait(struct gp_test_child *c)
{
	if (c->go_fd >= 0) {
		close(c->go_fd);
		c->go_fd = -1;
	}
	int ws = 0;
	while (waitpid(c->pid, &ws, 0) < 0)
		;
	return WIFEXITED(ws) ? WEXITSTATUS(ws) : 128 + WTERMSIG(ws);
}

pid_t gp_test_service(const struct gp_test_env *env, const char *prog, ...)
{
	char bin[700], logp[700], e1[300], e2[700];
	char *argv[20];
	snprintf(bin, sizeof bin, "%s/%s", env->bin_dir, prog);
	snprintf(logp, sizeof logp, "%s/logs/%s.log", env->dir, prog);
	snprintf(e1, sizeof e1, "GENPIPE_NATS_URL=%s", env->nats_url);
	snprintf(e2, sizeof e2, "GENPIPE_DATABASE_URL=%s", env->db_url);
	char *envx[] = { e1, e2, NULL };
	int n = 0;
	argv[n++] = bin;
	va_list ap;
	va_start(ap, prog);
	const char *a;
	while (n < 19 && (a = va_arg(ap, const char *)) != NULL)
		argv[n++] = (char *)a;
	va_end(ap);
	argv[n] = NULL;
	int pid = 0;
	struct gp_err err = { 0 };
	fflush(NULL);
	if (gp_stack_spawn(argv, envx, logp, 1, &pid, &err)) {
		fprintf(stderr, "test: %s\n", err.msg);
		exit(1);
	}
	return pid;
}

struct gp_db *gp_test_db(const struct gp_test_env *env)
{
	struct gp_db *db = NULL;
	struct gp_err err = { 0 };
	if (gp_db_connect(&db, env->db_url, 10000, &err)) {
		fprintf(stderr, "test: %s\n", err.msg);
		exit(1);
	}
	return db;
}

struct gp_bus *gp_test_bus(const struct gp_test_env *env, const char *name)
{
	struct gp_bus *bus = NULL;
	struct gp_err err = { 0 };
	if (gp_bus_connect(&bus, env->nats_url, name, 0, 10000, &err)) {
		fprintf(stderr, "test: %s\n", err.msg);
		exit(1);
	}
	return bus;
}

long long gp_test_scalar(struct gp_db *db, const char *sql)
{
	PGresult *r = NULL;
	struct gp_err err = { 0 };
	if (gp_db_exec(db, "test query", sql, 0, NULL, &r, &err) || PQntuples(r) != 1) {
		fprintf(stderr, "test: %s: %s\n", sql, err.msg);
		exit(1);
	}
	long long v = atoll(PQgetvalue(r, 0, 0));
	PQclear(r);
	return v;
}

long long gp_test_q(struct gp_db *db, const char *fmt, ...)
{
	char sql[2048];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(sql, sizeof sql, fmt, ap);
	va_end(ap);
	return gp_test_scalar(db, sql);
}

char *gp_test_qs(struct gp_db *db, const char *fmt, ...)
{
	char sql[2048];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(sql, sizeof sql, fmt, ap);
	va_end(ap);
	PGresult *r = NULL;
	struct gp_err err = { 0 };
	if (gp_db_exec(db, "test query", sql, 0, NULL, &r, &err)) {
		fprintf(stderr, "test: %s: %s\n", sql, err.msg);
		exit(1);
	}
	char *v = PQntuples(r) && !PQgetisnull(r, 0, 0) ? strdup(PQgetvalue(r, 0, 0)) : NULL;
	PQclear(r);
	return v;
}

long long gp_test_make_run(struct gp_db *db, const char *pipeline)
{
	const char *p[] = { pipeline };
	PGresult *r = NULL;
	struct gp_err err = { 0 };
	if (gp_db_exec(db, "make test run",
		       "WITH p AS (INSERT INTO pipelines (name) VALUES ($1) RETURNING id), "
		       "v AS (INSERT INTO pipeline_versions (pipeline_id, version, spec_text, "
		       "spec_json, content_hash) SELECT id, 1, 'test', '{}', 'h' FROM p "
		       "RETURNING id) "
		       "INSERT INTO runs (pipeline_version_id) SELECT id FROM v RETURNING id",
		       1, p, &r, &err)) {
		fprintf(stderr, "test: %s\n", err.msg);
		exit(1);
	}
	long long id = atoll(PQgetvalue(r, 0, 0));
	PQclear(r);
	return id;
}

int gp_test_relay_all(struct gp_db *db, struct gp_bus *bus)
{
	int total = 0, n = 0;
	struct gp_err err = { 0 };
	do {
		if (gp_outbox_relay_once(db, bus, 100, NULL, &n, NULL, &err)) {
			fprintf(stderr, "test: relay: %s\n", err.msg);
			exit(1);
		}
		total += n;
	} while (n > 0);
	return total;
}

long long gp_test_submit(struct gp_db *db, const char *yaml, const char *const *params,
			 int nparams)
{
	struct gp_spec_errors *errs = calloc(1, sizeof *errs);
	cJSON *doc = NULL;
	struct gp_err e = { 0 };
	if (!errs || gp_spec_parse(yaml, strlen(yaml), &doc, errs)) {
		for (int i = 0; errs && i < errs->n; i++)
			fprintf(stderr, "spec %d:%d: %s\n", errs->v[i].line, errs->v[i].col,
				errs->v[i].msg);
		exit(1);
	}
	free(errs);
	struct gp_version_ref v;
	long long run = 0;
	cJSON *p = NULL;
	if (gp_pipeline_submit(db, yaml, doc, "test", &v, &e) ||
	    !(p = gp_spec_resolve_params(doc, params, nparams, &e)) ||
	    gp_run_create(db, v.id, p, "test", &run, &e)) {
		fprintf(stderr, "submit: %s\n", e.msg);
		exit(1);
	}
	cJSON_Delete(p);
	cJSON_Delete(doc);
	return run;
}

int gp_test_wait_run(struct gp_db *db, long long run, long long ms)
{
	char sql[256];
	snprintf(sql, sizeof sql,
		 "SELECT CASE state WHEN 'succeeded' THEN 1 WHEN 'failed' THEN 0 "
		 "WHEN 'cancelled' THEN 2 ELSE -1 END FROM runs WHERE id = %lld",
		 run);
	long long deadline = gp_now_ms() + ms;
	for (;;) {
		long long st = gp_test_scalar(db, sql);
		if (st == 0) {
			PGresult *r = NULL;
			struct gp_err e = { 0 };
			char q[256];
			snprintf(q, sizeof q,
				 "SELECT string_agg(stage || ': ' || coalesce(error, ''), '; ') "
				 "FROM run_stages WHERE run_id = %lld AND state = 'failed'",
				 run);
			if (!gp_db_exec(db, "failed stages", q, 0, NULL, &r, &e) && PQntuples(r))
				fprintf(stderr, "run %lld failed: %s\n", run, PQgetvalue(r, 0, 0));
			PQclear(r);
		}
		if (st >= 0)
			return (int)st;
		if (gp_now_ms() >= deadline)
			break;
		gp_sleep_ms(50);
	}
	fprintf(stderr, "run %lld did not finish in %lld ms\n", run, ms);
	return -1;
}

int gp_test_cli(const struct gp_test_env *env, const char *cli, char *out, size_t cap,
		const char *fmt, ...)
{
	char args[1024], cmd[2048];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(args, sizeof args, fmt, ap);
	va_end(ap);
	snprintf(cmd, sizeof cmd, "%s --database-url '%s' %s 2>&1", cli, env->db_url, args);
	FILE *f = popen(cmd, "r");
	if (!f) {
		fprintf(stderr, "harness: cannot run %s\n", cli);
		exit(1);
	}
	size_t n = fread(out, 1, cap - 1, f);
	out[n] = 0;
	int rc = pclose(f);
	return WIFEXITED(rc) ? WEXITSTATUS(rc) : 128;
}
