/*
 * genpipe-preprocess: serves the `preprocess` stage kind (see preprocess.h).
 */
#include <stdio.h>

#include "log.h"
#include "preprocess.h"
#include "service.h"

#define NOPTS (GP_SERVICE_NOPTS + GP_WORKER_NOPTS + GP_STORE_NOPTS + 1)

int main(int argc, char **argv)
{
	struct gp_service svc = { .name = "preprocess" };
	long long lease = 0, hb = 0, quick = 0, max_input = 0;
	const char *data_dir = NULL, *store_uri = NULL;
	struct gp_opt opts[NOPTS];
	gp_service_options(&svc, opts);
	gp_service_worker_options(opts + GP_SERVICE_NOPTS, &lease, &hb, &quick, "30000", "5000");
	gp_service_store_options(opts + GP_SERVICE_NOPTS + GP_WORKER_NOPTS, &data_dir, &store_uri);
	opts[NOPTS - 1] = (struct gp_opt){ "max-input-mb", "GENPIPE_PREPROCESS_MAX_INPUT_MB",
					   GP_OPT_INT, "4096",
					   "documents read per stage at most (MiB)", &max_input };
	int rc = gp_service_parse("preprocess", opts, NOPTS, argc, argv);
	if (rc >= 0)
		return rc;
	struct gp_err err = { 0 };
	if (max_input <= 0 || max_input > (1LL << 30)) {
		fprintf(stderr, "genpipe-preprocess: --max-input-mb %lld is not within 1..%lld\n",
			max_input, 1LL << 30);
		return 2;
	}
	struct gp_preprocess_config cfg = { .max_input = (size_t)max_input << 20 };
	if (gp_store_open_in(&cfg.store, store_uri, data_dir, &err)) {
		gp_error("could not open the artifact store: %s", err.msg);
		return 1;
	}
	rc = gp_service_run_worker(&svc, (struct gp_worker_config){
							 .kind = "preprocess",
							 .lease_ms = lease, .quick_result_ms = quick,
							 .heartbeat_ms = hb,
							 .handler = gp_preprocess_handle,
							 .closure = &cfg,
						 });
	gp_store_close(cfg.store);
	return rc;
}
