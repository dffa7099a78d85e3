/*
 * bench_stack.h: the private stack a benchmark runs against, shared by the
 * benchmark programs. The servers are started from a child process, so
 * that the benchmark itself holds no nats.c threads when it later spawns
 * services.
 */
#ifndef GP_BENCH_STACK_H
#define GP_BENCH_STACK_H

#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

#include "stack.h"

/* Start the stack in dir; fill the NATS and database URLs. 0 on success. */
static inline int bench_stack_up(const struct gp_stack_options *o, char *nats_url, size_t nlen,
				 char *db_url, size_t dlen, struct gp_err *e)
{
	fflush(NULL);
	pid_t up = fork();
	if (up == 0)
		_exit(gp_stack_up(o, e) ? (fprintf(stderr, "bench: %s\n", e->msg), 1) : 0);
	int ws = 0;
	waitpid(up, &ws, 0);
	if (!WIFEXITED(ws) || WEXITSTATUS(ws) != 0 ||
	    gp_stack_env(o->data_dir, "GENPIPE_NATS_URL", nats_url, nlen, e) ||
	    gp_stack_env(o->data_dir, "GENPIPE_DATABASE_URL", db_url, dlen, e))
		return -1;
	return 0;
}

#endif
