/*
 * genpipe-noop: serves the `noop` stage kind. Flags, connect, run, drain.
 */
#include <stdio.h>

#include "log.h"
#include "noop.h"
#include "service.h"

#define NOPTS (GP_SERVICE_NOPTS + GP_WORKER_NOPTS + 2)

int main(int argc, char **argv)
{
	struct gp_service svc = { .name = "noop" };
	struct gp_noop_config ncfg = { 0 };
	long long lease = 0, hb = 0, quick = 0, prefetch = 0;
	struct gp_opt opts[NOPTS];
	gp_service_options(&svc, opts);
	gp_service_worker_options(opts + GP_SERVICE_NOPTS, &lease, &hb, &quick, "10000", "2000");
	struct gp_opt *own = opts + GP_SERVICE_NOPTS + GP_WORKER_NOPTS;
	own[0] = (struct gp_opt){ "allow-crash", "GENPIPE_NOOP_ALLOW_CRASH", GP_OPT_BOOL, "false",
				  "honour crash_attempts (tests only)", &ncfg.allow_crash };
	own[1] = (struct gp_opt){ "prefetch", "GENPIPE_PREFETCH", GP_OPT_INT, "8",
				  "job messages fetched at once (1..16)", &prefetch };
	int rc = gp_service_parse("noop", opts, NOPTS, argc, argv);
	if (rc >= 0)
		return rc;
	rc = gp_service_run_worker(&svc, (struct gp_worker_config){
						     .kind = "noop",
						     .lease_ms = lease, .quick_result_ms = quick,
						     .heartbeat_ms = hb,
						     .handler = gp_noop_handle,
						     .closure = &ncfg,
						     .prefetch = (int)prefetch,
					     });
	return rc;
}
