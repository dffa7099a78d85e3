/*
 * genpipe-monitor: drift monitoring of served models, and the `monitor`
 * stage kind that configures it (monitor.h).
 */
#include <stdio.h>

#include "log.h"
#include "monitor.h"
#include "service.h"

#define NOPTS (GP_SERVICE_NOPTS + GP_WORKER_NOPTS + GP_STORE_NOPTS + 1)

int main(int argc, char **argv)
{
	struct gp_service svc = { .name = "monitor" };
	long long lease = 0, hb = 0, quick = 0, reload = 0;
	const char *data_dir = NULL, *store_uri = NULL;
	struct gp_opt opts[NOPTS];
	gp_service_options(&svc, opts);
	gp_service_worker_options(opts + GP_SERVICE_NOPTS, &lease, &hb, &quick, "30000", "5000");
	gp_service_store_options(opts + GP_SERVICE_NOPTS + GP_WORKER_NOPTS, &data_dir, &store_uri);
	opts[NOPTS - 1] = (struct gp_opt){ "reload-ms", "GENPIPE_MONITOR_RELOAD_MS", GP_OPT_INT,
					   "2000", "how often the monitors table is read", &reload };
	int rc = gp_service_parse("monitor", opts, NOPTS, argc, argv);
	if (rc >= 0)
		return rc;
	if (reload < 100) {
		fprintf(stderr, "genpipe-monitor: --reload-ms must be at least 100\n");
		return 2;
	}
	struct gp_err err = { 0 };
	struct gp_monitor_config cfg = { .reload_ms = reload };
	if (gp_store_open_in(&cfg.store, store_uri, data_dir, &err)) {
		gp_error("could not open the artifact store: %s", err.msg);
		return 1;
	}
	gp_service_signals();
	if (gp_service_start(&svc, 0, 30000, &err)) {
		gp_error("could not start: %s", err.msg);
		gp_service_stop(&svc);
		gp_store_close(cfg.store);
		return 1;
	}
	struct gp_monitor *mon = NULL;
	struct gp_worker *w = NULL;
	struct gp_worker_config wc = {
		.kind = "monitor", .lease_ms = lease, .heartbeat_ms = hb, .ack_wait_ms = lease,
		.quick_result_ms = quick,
		.handler = gp_monitor_stage_handle, .closure = &cfg, .metrics = svc.metrics,
		.version = GP_KIND_UNCACHED,
	};
	rc = 0;
	if (gp_monitor_start(&mon, &cfg, svc.bus, svc.database_url, svc.metrics, &err) ||
	    gp_worker_create(&w, &wc, svc.db, svc.bus, svc.database_url, &err)) {
		gp_error("could not start: %s", err.msg);
		rc = 1;
	} else if (gp_worker_run(w, gp_service_stop_flag(), &err)) {
		gp_error("monitor worker stopped: %s", err.msg);
		rc = 1;
	}
	gp_info("stopping");
	gp_worker_destroy(w);
	gp_monitor_stop(mon);
	gp_service_stop(&svc);
	gp_store_close(cfg.store);
	return rc;
}
