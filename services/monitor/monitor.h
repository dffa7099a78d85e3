/*
 * monitor.h: drift monitoring of served models (genpipe-monitor).
 *
 * The `monitor` stage kind configures it: with.model, with.histogram (the
 * reference token histogram; default: the one preprocess made for the
 * training run of the model's production version), window (requests, 500),
 * window_time ("5m"), thresholds psi_threshold (0.2), js_threshold (0.1),
 * perplexity_ratio (2.0: the window's mean loss against the version's
 * validation loss, as a perplexity ratio), embedding_threshold (0.1:
 * cosine distance of the window's mean final hidden state from the
 * validation set's), error_rate_threshold (0.05), bins (20), loss_sample
 * (64 prompts a window run through the model), min_alert_requests (30:
 * smaller windows are recorded but raise no alert), webhook (an http(s) URL
 * that gets each window's alerts, POSTed as JSON after the commit, retried).
 * The stage writes the
 * `monitors` row and succeeds at once (registered uncached).
 *
 * The service reads the monitors rows (every reload_ms) and, per model,
 * pulls genpipe.telemetry.<model> through the durable consumer
 * monitor-<model>. Events gather in one window per model version (fixed
 * memory: drift.h); a window closes at `window` requests or `window_time`
 * after its first event. Closing computes the drift figures, then in one
 * transaction writes the drift_windows row (unique by version and first
 * stream sequence: a window rebuilt from redelivered events is not
 * counted twice), one alerts row per figure over its threshold with an
 * Alert message through the outbox (genpipe.alerts.<model>); only then are
 * the window's events acknowledged (AckWait covers window_time). Gauges:
 * genpipe_drift_<figure>{model,version}.
 *
 * One replica per model: the consumer is shared, so two replicas would
 * each see part of the traffic (valid, smaller samples).
 */
#ifndef GP_MONITOR_H
#define GP_MONITOR_H

#include "artifact.h"
#include "bus.h"
#include "http.h"
#include "worker.h"

struct gp_monitor_config {
	struct gp_store *store;
	long long reload_ms;   /* monitors table check; default 2000 */
};

/* The monitor stage kind's handler (closure: struct gp_monitor_config). */
void gp_monitor_stage_handle(struct gp_job *job, void *closure);

struct gp_monitor;
/* Start the monitoring thread (its own database connection). */
gp_status gp_monitor_start(struct gp_monitor **out, const struct gp_monitor_config *cfg,
			   struct gp_bus *bus, const char *database_url, struct gp_metrics *metrics,
			   struct gp_err *err);
/* Stop it; open windows are left unacknowledged (redelivered later). */
void gp_monitor_stop(struct gp_monitor *m);

#endif
