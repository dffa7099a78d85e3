/*
 * harness.h: integration tests against real servers.
 *
 * gp_test_run() makes a temporary directory, starts nats-server (JetStream)
 * and PostgreSQL in it on free loopback ports with the same code as
 * `genpipe dev up` (common/stack.c), applies the migrations, and runs the
 * test body in a forked child. Whatever the child does (passes, fails,
 * crashes), the parent stops both servers by pid and removes the directory.
 */
#ifndef GP_TEST_HARNESS_H
#define GP_TEST_HARNESS_H

#include <sys/types.h>

#include "bus.h"
#include "db.h"

struct gp_test_env {
	char dir[256];
	char nats_url[128];
	char db_url[512];
	char migrations_dir[512];
	char bin_dir[512];
};

int gp_test_run(int (*body)(struct gp_test_env *env));

/*
 * nats.c keeps global threads, so a process that has used it must not fork
 * children that use it again. A test that needs a second NATS process forks
 * it with gp_test_fork_held() before its first connection: the child blocks
 * until gp_test_release() and then runs fn and exits with its result.
 */
struct gp_test_child {
	int pid;
	int go_fd;
};
struct gp_test_child gp_test_fork_held(int (*fn)(const struct gp_test_env *env, void *arg),
				       const struct gp_test_env *env, void *arg);
void gp_test_release(struct gp_test_child *c);
/* Wait for the child; returns its exit status, or 128 + signal. */
int gp_test_wait(struct gp_test_child *c);

/*
 * Start the service binary PROG (from the build's bin directory) with the
 * test's NATS and database URLs, extra arguments (NULL-terminated) and its
 * output appended to DIR/logs/PROG.log; it dies with the test. exit(1) when
 * it cannot be started.
 */
pid_t gp_test_service(const struct gp_test_env *env, const char *prog, ...)
	__attribute__((sentinel));

/* Connect helpers that exit(1) with the reason on failure. */
struct gp_db *gp_test_db(const struct gp_test_env *env);
struct gp_bus *gp_test_bus(const struct gp_test_env *env, const char *name);

/* Create a pipeline, version and run row; returns the run id. */
long long gp_test_make_run(struct gp_db *db, const char *pipeline);

/* Publish everything in the outbox (in-process relay). Returns the count. */
int gp_test_relay_all(struct gp_db *db, struct gp_bus *bus);

/*
 * Parse and store a pipeline (as `genpipe submit` does) and create a run
 * with params overrides ("k=v", may be NULL); returns the run id. A spec
 * error is printed with its position and exits 1.
 */
long long gp_test_submit(struct gp_db *db, const char *yaml, const char *const *params,
			 int nparams);

/*
 * Wait up to ms for the run to end: 1 succeeded, 0 failed, 2 cancelled,
 * -1 still going (printed). A failed run's stage errors are printed.
 */
int gp_test_wait_run(struct gp_db *db, long long run, long long ms);

/* One integer from a query with no parameters (exit(1) on error). */
long long gp_test_scalar(struct gp_db *db, const char *sql);
/* The same with printf formatting. */
long long gp_test_q(struct gp_db *db, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* The first column of the first row as a malloc'd string (NULL: no row or
 * SQL NULL); exit(1) on error. */
char *gp_test_qs(struct gp_db *db, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Run the genpipe CLI at path cli against env's database with the
 * arguments fmt makes; its output (stdout and stderr, up to cap - 1 bytes)
 * in out, its exit status returned (128 when it did not exit). */
int gp_test_cli(const struct gp_test_env *env, const char *cli, char *out, size_t cap,
		const char *fmt, ...) __attribute__((format(printf, 5, 6)));

#endif
