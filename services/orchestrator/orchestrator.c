/*
 * orchestrator.c: outbox relay and lease reaper loop (see orchestrator.h).
 *
 * The loop sleeps on PostgreSQL LISTEN (the outbox trigger notifies at
 * commit), so a message is relayed within a round trip of its commit, and a
 * missed notification costs at most relay_wait_ms.
 */
#include "orchestrator.h"

#include <stdlib.h>

#include "log.h"
#include "outbox.h"
#include "worker.h"

struct gp_orchestrator {
	struct gp_orchestrator_config cfg;
	struct gp_db *db;
	struct gp_bus *bus;
	long long next_reap_ms;
	int db_broken;
	struct gp_metric *m_relayed, *m_dups, *m_reaped, *m_errors;
};

gp_status gp_orchestrator_create(struct gp_orchestrator **out,
				 const struct gp_orchestrator_config *cfg, struct gp_db *db,
				 struct gp_bus *bus, struct gp_metrics *metrics,
				 struct gp_err *err)
{
	struct gp_orchestrator *o = calloc(1, sizeof *o);
	if (!o)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	o->cfg = *cfg;
	if (o->cfg.reap_interval_ms <= 0)
		o->cfg.reap_interval_ms = 1000;
	if (o->cfg.relay_wait_ms <= 0)
		o->cfg.relay_wait_ms = 500;
	if (o->cfg.relay_batch <= 0)
		o->cfg.relay_batch = 100;
	o->db = db;
	o->bus = bus;
	if (metrics) {
		o->m_relayed = gp_metrics_get(metrics, GP_COUNTER, "genpipe_outbox_relayed_total",
					      "Outbox messages published and marked sent", NULL,
					      NULL, 0);
		o->m_dups = gp_metrics_get(metrics, GP_COUNTER,
					   "genpipe_outbox_duplicates_total",
					   "Outbox re-publishes JetStream reported as duplicates",
					   NULL, NULL, 0);
		o->m_reaped = gp_metrics_get(metrics, GP_COUNTER, "genpipe_leases_reaped_total",
					     "Attempts whose lease expired", NULL, NULL, 0);
		o->m_errors = gp_metrics_get(metrics, GP_COUNTER,
					     "genpipe_orchestrator_errors_total",
					     "Failed relay or reap passes", NULL, NULL, 0);
	}
	gp_status st = gp_outbox_listen(db, err);
	if (st) {
		free(o);
		return st;
	}
	*out = o;
	return GP_OK;
}

void gp_orchestrator_destroy(struct gp_orchestrator *o)
{
	free(o);
}

void gp_orchestrator_step(struct gp_orchestrator *o)
{
	struct gp_err err = { 0 };
	if (o->db_broken) {
		if (!gp_db_ok(o->db) || gp_outbox_listen(o->db, &err)) {
			gp_sleep_ms(500);
			return;
		}
		o->db_broken = 0;
		gp_info("database connection restored");
	}
	int published = 0, dups = 0;
	gp_status st;
	do {
		st = gp_outbox_relay_once(o->db, o->bus, o->cfg.relay_batch, NULL, &published,
					  &dups, &err);
		gp_metric_inc(o->m_relayed, published);
		gp_metric_inc(o->m_dups, dups);
		if (published)
			gp_debug("relayed %d outbox messages (%d duplicates)", published, dups);
	} while (!st && published == o->cfg.relay_batch);
	if (st) {
		gp_metric_inc(o->m_errors, 1);
		gp_warn("outbox relay: %s", err.msg);
		if (st == GP_ERR_UNAVAILABLE || !gp_db_ok(o->db))
			o->db_broken = 1;
	}
	if (gp_now_ms() >= o->next_reap_ms) {
		int reaped = 0;
		if (gp_lease_reap(o->db, 100, &reaped, &err)) {
			gp_metric_inc(o->m_errors, 1);
			gp_warn("lease reaper: %s", err.msg);
		}
		gp_metric_inc(o->m_reaped, reaped);
		o->next_reap_ms = gp_now_ms() + o->cfg.reap_interval_ms;
		if (reaped)
			return; /* their new attempts are in the outbox: relay at once */
	}
	long long wait = o->next_reap_ms - gp_now_ms();
	if (wait > o->cfg.relay_wait_ms)
		wait = o->cfg.relay_wait_ms;
	if (wait > 0 && !o->db_broken)
		gp_outbox_wait(o->db, wait);
}

void gp_orchestrator_run(struct gp_orchestrator *o, volatile int *stop)
{
	while (!*stop)
		gp_orchestrator_step(o);
}
