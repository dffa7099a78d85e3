/*
 * orchestrator.h: the control loop of the orchestrator service.
 *
 * Three duties: relaying the outbox to NATS, reaping expired leases
 * (requeueing the next attempt), and advancing runs through their DAG
 * (engine.h). Several replicas may run at once: relay and reaper lock rows
 * with SKIP LOCKED, and a run is advanced under its row lock.
 */
#ifndef GP_ORCHESTRATOR_H
#define GP_ORCHESTRATOR_H

#include "bus.h"
#include "db.h"
#include "http.h"

struct gp_orchestrator;

struct gp_orchestrator_config {
	long long reap_interval_ms; /* how often to look for expired leases */
	long long relay_wait_ms;    /* longest sleep between relay passes */
	int relay_batch;
	long long sweep_ms;         /* how often unfinished runs are re-examined */
	long long redispatch_ms;    /* a job message still unclaimed after this is sent again */
};

/* db and bus are borrowed; metrics may be NULL. Caller owns the result. */
gp_status gp_orchestrator_create(struct gp_orchestrator **out,
				 const struct gp_orchestrator_config *cfg, struct gp_db *db,
				 struct gp_bus *bus, struct gp_metrics *metrics,
				 struct gp_err *err);
void gp_orchestrator_destroy(struct gp_orchestrator *o);

/* One turn: relay what is pending, reap if due, wait for more work (bounded).
 * Transient errors are logged and counted, not returned. */
void gp_orchestrator_step(struct gp_orchestrator *o);

/* Loop gp_orchestrator_step until *stop. */
void gp_orchestrator_run(struct gp_orchestrator *o, volatile int *stop);

#endif
