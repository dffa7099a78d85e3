/*
 * genpipe-noop: serves the `noop` stage kind. Flags, connect, run, drain.
 */
#include <stdio.h>

#include "log.h"
#include "noop.h"
#include "service.h"

int main(int argc, char **argv)
{
	struct gp_service svc = { .name = "noop" };
	struct gp_noop_config ncfg = { 0 };
	long long lease = 0, hb = 0, prefetch = 0;
	struct gp_opt opts[GP_SERVICE_NOPTS + 4];
	gp_service_options(&svc, opts);
	opts[GP_SERVICE_NOPTS + 0] = (struct gp_opt){ "lease-ms", "GENPIPE_LEASE_MS", GP_OPT_INT,
						      "10000", "lease granted per claim and heartbeat",
						      &lease };
	opts[GP_SERVICE_NOPTS + 1] = (struct gp_opt){ "heartbeat-ms", "GENPIPE_HEARTBEAT_MS",
						      GP_OPT_INT, "2000", "heartbeat interval", &hb };
	opts[GP_SERVICE_NOPTS + 2] = (struct gp_opt){ "allow-crash", "GENPIPE_NOOP_ALLOW_CRASH",
						      GP_OPT_BOOL, "false",
						      "honour crash_attempts (tests only)",
						      &ncfg.allow_crash };
	opts[GP_SERVICE_NOPTS + 3] = (struct gp_opt){ "prefetch", "GENPIPE_PREFETCH", GP_OPT_INT,
						      "8", "job messages fetched at once (1..16)",
						      &prefetch };
	int first = 0, help = 0;
	struct gp_err err = { 0 };
	gp_log_init("noop");
	if (gp_config_parse(opts, GP_SERVICE_NOPTS + 4, argc, argv, "genpipe-noop [options]",
			    stdout, &first, &help, &err)) {
		fprintf(stderr, "genpipe-noop: %s\n", err.msg);
		return 2;
	}
	if (help)
		return 0;
	if (first < argc) {
		fprintf(stderr, "genpipe-noop: unexpected argument \"%s\"\n", argv[first]);
		return 2;
	}
	gp_service_signals();
	if (gp_service_start(&svc, 0, 30000, &err)) {
		gp_error("could not start: %s", err.msg);
		return 1;
	}
	struct gp_worker_config wc = {
		.kind = "noop",
		.lease_ms = lease,
		.heartbeat_ms = hb,
		.ack_wait_ms = lease,
		.handler = gp_noop_handle,
		.closure = &ncfg,
		.metrics = svc.metrics,
		.prefetch = (int)prefetch,
	};
	struct gp_worker *w = NULL;
	int rc = 0;
	if (gp_worker_create(&w, &wc, svc.db, svc.bus, svc.database_url, &err)) {
		gp_error("could not start: %s", err.msg);
		rc = 1;
	} else if (gp_worker_run(w, gp_service_stop_flag(), &err)) {
		gp_error("worker stopped: %s", err.msg);
		rc = 1;
	}
	gp_info("stopping");
	gp_worker_destroy(w);
	gp_service_stop(&svc);
	return rc;
}
