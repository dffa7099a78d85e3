/*
 * genpipe-ingest: serves the `ingest` stage kind (see ingest.h).
 */
#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>

#include "ingest.h"
#include "log.h"
#include "service.h"

int main(int argc, char **argv)
{
	struct gp_service svc = { .name = "ingest" };
	long long lease = 0, hb = 0;
	const char *data_dir = NULL, *store_uri = NULL, *roots = NULL;
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
	opts[GP_SERVICE_NOPTS + 3] = (struct gp_opt){ "artifacts", "GENPIPE_ARTIFACTS",
						      GP_OPT_STR, "",
						      "artifact store URI (default file://DATA_DIR/"
						      "artifacts)",
						      &store_uri };
	opts[GP_SERVICE_NOPTS + 4] = (struct gp_opt){ "roots", "GENPIPE_INGEST_ROOTS", GP_OPT_STR,
						      "/usr/share:/srv/genpipe",
						      "colon-separated directories sources may read "
						      "beneath (plus DATA_DIR/inbox)",
						      &roots };
	int first = 0, help = 0;
	struct gp_err err = { 0 };
	gp_log_init("ingest");
	if (gp_config_parse(opts, GP_SERVICE_NOPTS + 5, argc, argv, "genpipe-ingest [options]",
			    stdout, &first, &help, &err)) {
		fprintf(stderr, "genpipe-ingest: %s\n", err.msg);
		return 2;
	}
	if (help)
		return 0;
	if (first < argc) {
		fprintf(stderr, "genpipe-ingest: unexpected argument \"%s\"\n", argv[first]);
		return 2;
	}
	char uri[4200], allroots[8192];
	if (store_uri && *store_uri)
		snprintf(uri, sizeof uri, "%s", store_uri);
	else
		snprintf(uri, sizeof uri, "file://%s/artifacts", data_dir);
	snprintf(allroots, sizeof allroots, "%s:%s/inbox", roots, data_dir);
	struct gp_ingest_config cfg = { .roots = allroots };
	if (gp_store_open(&cfg.store, uri, &err)) {
		gp_error("could not open the artifact store: %s", err.msg);
		return 1;
	}
	curl_global_init(CURL_GLOBAL_DEFAULT);
	gp_service_signals();
	if (gp_service_start(&svc, 0, 30000, &err)) {
		gp_error("could not start: %s", err.msg);
		gp_store_close(cfg.store);
		return 1;
	}
	struct gp_worker_config wc = {
		.kind = "ingest",
		.lease_ms = lease,
		.heartbeat_ms = hb,
		.ack_wait_ms = lease,
		.handler = gp_ingest_handle,
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
	curl_global_cleanup();
	return rc;
}
