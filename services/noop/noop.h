/*
 * noop.h: the `noop` stage kind: waits, optionally fails, and returns the
 * outputs it was given. It exists to exercise pipelines without data or a
 * GPU: DAG mechanics, retries, timeouts, caching, chaos drills and the
 * orchestrator benchmark. Parameters (all optional):
 *   duration        how long to work (duration text, e.g. 300ms)
 *   fail_attempts   fail attempts 1..N (retryable), succeed after
 *   crash_attempts  exit the process abruptly during attempts 1..N (only
 *                   when the service runs with --allow-crash: a test switch)
 *   outputs         object returned as the stage's outputs
 *   message         echoed in the progress events
 */
#ifndef GP_NOOP_H
#define GP_NOOP_H

#include "worker.h"

struct gp_noop_config {
	int allow_crash;
};

/* The worker handler; closure is a struct gp_noop_config *. */
void gp_noop_handle(struct gp_job *job, void *closure);

#endif
