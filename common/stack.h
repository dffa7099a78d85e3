/*
 * stack.h: the local embedded stack (`genpipe dev up/down/status`) and the
 * servers integration tests start.
 *
 * Layout under the data directory DIR:
 *   DIR/env              GENPIPE_NATS_URL, GENPIPE_DATABASE_URL, ... (mode 0600)
 *   DIR/nats/            nats.conf and the JetStream store
 *   DIR/pg/data          the PostgreSQL cluster (initdb on first up)
 *   DIR/pg/password      the cluster's generated password (mode 0600)
 *   DIR/run/NAME.pid     pid of each process we started, NAME.port its port
 *   DIR/logs/NAME.log    its output
 * Processes are stopped by the pid we recorded, after checking that the pid
 * still runs the program we started (a recycled pid is left alone).
 * As root, PostgreSQL runs as the "postgres" user (or "nobody"); its
 * directories are chowned to it, and DIR must be traversable by it.
 *
 * Not thread-safe; one up/down at a time per DIR (an flock serializes them).
 */
#ifndef GP_STACK_H
#define GP_STACK_H

#include <stdio.h>

#include "status.h"

struct gp_stack_options {
	const char *data_dir;       /* required */
	const char *migrations_dir; /* required */
	const char *bin_dir;        /* where genpipe-* services live; NULL: start none */
	int fast;                   /* tests: fsync off, small JetStream store */
	FILE *progress;             /* human-readable progress, or NULL */
};

/* Start whatever is not running, apply migrations, write DIR/env, start
 * services that exist. A running stack is left as it is. */
gp_status gp_stack_up(const struct gp_stack_options *o, struct gp_err *err);

/* Stop every process recorded under DIR (services, nats, postgres) by pid.
 * Data is kept. Returns the first error but tries to stop everything. */
gp_status gp_stack_down(const char *data_dir, FILE *progress, struct gp_err *err);

struct gp_stack_proc {
	char name[64];
	int pid;         /* 0 when no pid file */
	int port;
	int alive;       /* the recorded pid runs the expected program */
	int healthy;
	char detail[256];
};

/*
 * Inspect the stack. *procs (caller frees with free()) gets one entry per
 * component that has ever been started under DIR. *n its count.
 */
gp_status gp_stack_status(const char *data_dir, const char *migrations_dir,
			  struct gp_stack_proc **procs, int *n, struct gp_err *err);

/* Read KEY from DIR/env into out. GP_ERR_NOT_FOUND when absent. */
gp_status gp_stack_env(const char *data_dir, const char *key, char *out, size_t len,
		       struct gp_err *err);

/*
 * Start argv[0] (an absolute path) with the extra environment entries env
 * ("NAME=VALUE", NULL-terminated; may be NULL), stdin from /dev/null and
 * stdout/stderr appended to logpath. With die_with_parent the child is
 * killed when the caller's process dies (tests and benchmarks: nothing they
 * start outlives them); without, it runs in a session of its own (dev up).
 * *pid gets the child; reap it with waitpid.
 */
gp_status gp_stack_spawn(char *const argv[], char *const env[], const char *logpath,
			 int die_with_parent, int *pid, struct gp_err *err);

/* A free TCP port on 127.0.0.1 (bind to 0, read, close). */
int gp_stack_free_port(void);

/* Path of the log file of NAME. */
void gp_stack_log_path(const char *data_dir, const char *name, char *out, size_t len);

#endif
