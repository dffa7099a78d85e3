/*
 * genpipe-orchestrator: flags, connect, run, drain. Logic in orchestrator.c.
 */
#include <stdio.h>
#include <stdlib.h>

#include "log.h"
#include "orchestrator.h"
#include "service.h"

int main(int argc, char **argv)
{
	struct gp_service svc = { .name = "orchestrator" };
	struct gp_orchestrator_config cfg = { 0 };
	long long reap_ms = 0, relay_wait = 0, batch = 0, sweep_ms = 0, redispatch_ms = 0;
	struct gp_opt opts[GP_SERVICE_NOPTS + 5];
	gp_service_options(&svc, opts);
	opts[GP_SERVICE_NOPTS + 0] = (struct gp_opt){ "reap-interval-ms", "GENPIPE_REAP_INTERVAL_MS",
						      GP_OPT_INT, "1000",
						      "how often expired leases are reaped",
						      &reap_ms };
	opts[GP_SERVICE_NOPTS + 1] = (struct gp_opt){ "relay-wait-ms", "GENPIPE_RELAY_WAIT_MS",
						      GP_OPT_INT, "500",
						      "longest wait between outbox passes",
						      &relay_wait };
	opts[GP_SERVICE_NOPTS + 2] = (struct gp_opt){ "relay-batch", "GENPIPE_RELAY_BATCH",
						      GP_OPT_INT, "100",
						      "outbox rows published per transaction", &batch };
	opts[GP_SERVICE_NOPTS + 3] = (struct gp_opt){ "sweep-ms", "GENPIPE_SWEEP_MS", GP_OPT_INT,
						      "1000",
						      "how often unfinished runs are re-examined",
						      &sweep_ms };
	opts[GP_SERVICE_NOPTS + 4] = (struct gp_opt){ "redispatch-ms", "GENPIPE_REDISPATCH_MS",
						      GP_OPT_INT, "600000",
						      "publish a job message again when its attempt is "
						      "still queued after this (then 2x, 4x, ...)",
						      &redispatch_ms };
	int prc = gp_service_parse("orchestrator", opts, GP_SERVICE_NOPTS + 5, argc, argv);
	if (prc >= 0)
		return prc;
	struct gp_err err = { 0 };
	cfg.reap_interval_ms = reap_ms;
	cfg.relay_wait_ms = relay_wait;
	cfg.relay_batch = (int)batch;
	cfg.sweep_ms = sweep_ms;
	cfg.redispatch_ms = redispatch_ms;
	gp_service_signals();
	/* job messages go out at once, not after the client's write coalescing */
	if (gp_service_start(&svc, GP_BUS_SEND_ASAP, 30000, &err)) {
		gp_error("could not start: %s", err.msg);
		return 1;
	}
	struct gp_orchestrator *o = NULL;
	if (gp_orchestrator_create(&o, &cfg, svc.db, svc.bus, svc.metrics, &err)) {
		gp_error("could not start: %s", err.msg);
		gp_service_stop(&svc);
		return 1;
	}
	gp_orchestrator_run(o, gp_service_stop_flag());
	gp_info("stopping");
	gp_orchestrator_destroy(o);
	gp_service_stop(&svc);
	return 0;
}
