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
	long long lease = 0, hb = 0, prefetch = 0;
	struct gp_opt opts[NOPTS];
	gp_service_options(&svc, opts);
	gp_service_worker_options(opts + GP_SERVICE_NOPTS, &lease, &hb, "10000", "2000");
	struct gp_opt *own = opts + GP_SERVICE_NOPTS + GP_WORKER_NOPTS;
	own[0] = (struct gp_opt){ "allow-crash", "GENPIPE_NOOP_ALLOW_CRASH", GP_OPT_BOOL, "false",
				  "honour crash_attempts (tests only)", &ncfg.allow_crash };
	own[1] = (struct gp_opt){ "prefetch", "GENPIPE_PREFETCH", GP_OPT_INT, "8",
				  "job messages fetched at once (1..16)", &prefetch };
	int first = 0, help = 0;
	struct gp_err err = { 0 };
	gp_log_init("noop");
	if (gp_config_parse(opts, NOPTS, argc, argv, "genpipe-noop [options]", stdout, &first,
			    &help, &err)) {
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
	int rc = gp_service_run_worker(&svc, (struct gp_worker_config){
						     .kind = "noop",
						     .lease_ms = lease,
						     .heartbeat_ms = hb,
						     .handler = gp_noop_handle,
						     .closure = &ncfg,
						     .prefetch = (int)prefetch,
					     });
	gp_service_stop(&svc);
	return rc;
}
