/*
 * genpipe-preprocess: serves the `preprocess` stage kind (see preprocess.h).
 */
#include <stdio.h>

#include "log.h"
#include "preprocess.h"
#include "service.h"

int main(int argc, char **argv)
{
	struct gp_service svc = { .name = "preprocess" };
	long long lease = 0, hb = 0, max_input = 0;
	const char *data_dir = NULL, *store_uri = NULL;
	struct gp_opt opts[GP_SERVICE_NOPTS + 5];
	gp_service_options(&svc, opts);
	opts[GP_SERVICE_NOPTS + 0] = (struct gp_opt){ "lease-ms", "GENPIPE_LEASE_MS", GP_OPT_INT,
						      "30000", "lease granted per claim and heartbeat",
						      &lease };
	opts[GP_SERVICE_NOPTS + 1] = (struct gp_opt){ "heartbeat-ms", "GENPIPE_HEARTBEAT_MS",
						      GP_OPT_INT, "5000", "heartbeat interval", &hb };
	opts[GP_SERVICE_NOPTS + 2] = (struct gp_opt){ "data-dir", "GENPIPE_DATA_DIR", GP_OPT_STR,
						      "/var/lib/genpipe",
						      "data directory (artifacts under it by default)",
						      &data_dir };
	opts[GP_SERVICE_NOPTS + 3] = (struct gp_opt){ "artifacts", "GENPIPE_ARTIFACTS", GP_OPT_STR,
						      "",
						      "artifact store URI (default file://DATA_DIR/"
						      "artifacts)",
						      &store_uri };
	opts[GP_SERVICE_NOPTS + 4] = (struct gp_opt){ "max-input-mb", "GENPIPE_PREPROCESS_MAX_INPUT_MB",
						      GP_OPT_INT, "4096",
						      "documents read per stage at most (MiB)",
						      &max_input };
	int first = 0, help = 0;
	struct gp_err err = { 0 };
	gp_log_init("preprocess");
	if (gp_config_parse(opts, GP_SERVICE_NOPTS + 5, argc, argv,
			    "genpipe-preprocess [options]", stdout, &first, &help, &err)) {
		fprintf(stderr, "genpipe-preprocess: %s\n", err.msg);
		return 2;
	}
	if (help)
		return 0;
	if (first < argc || max_input <= 0) {
		fprintf(stderr, "genpipe-preprocess: %s\n",
			first < argc ? "unexpected argument" : "--max-input-mb must be positive");
		return 2;
	}
	char uri[4200];
	if (store_uri && *store_uri)
		snprintf(uri, sizeof uri, "%s", store_uri);
	else
		snprintf(uri, sizeof uri, "file://%s/artifacts", data_dir);
	struct gp_preprocess_config cfg = { .max_input = (size_t)max_input << 20 };
	if (gp_store_open(&cfg.store, uri, &err)) {
		gp_error("could not open the artifact store: %s", err.msg);
		return 1;
	}
	gp_service_signals();
	if (gp_service_start(&svc, 0, 30000, &err)) {
		gp_error("could not start: %s", err.msg);
		gp_store_close(cfg.store);
		return 1;
	}
	struct gp_worker_config wc = {
		.kind = "preprocess",
		.lease_ms = lease,
		.heartbeat_ms = hb,
		.ack_wait_ms = lease,
		.handler = gp_preprocess_handle,
		.closure = &cfg,
		.metrics = svc.metrics,
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
	gp_store_close(cfg.store);
	return rc;
}
