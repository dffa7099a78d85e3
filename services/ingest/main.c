/*
 * genpipe-ingest: serves the `ingest` stage kind (see ingest.h).
 */
#include <curl/curl.h>
#include <stdio.h>

#include "ingest.h"
#include "log.h"
#include "service.h"

#define NOPTS (GP_SERVICE_NOPTS + GP_WORKER_NOPTS + GP_STORE_NOPTS + 1)

int main(int argc, char **argv)
{
	struct gp_service svc = { .name = "ingest" };
	long long lease = 0, hb = 0, quick = 0;
	const char *data_dir = NULL, *store_uri = NULL, *roots = NULL;
	struct gp_opt opts[NOPTS];
	gp_service_options(&svc, opts);
	gp_service_worker_options(opts + GP_SERVICE_NOPTS, &lease, &hb, &quick, "30000", "5000");
	gp_service_store_options(opts + GP_SERVICE_NOPTS + GP_WORKER_NOPTS, &data_dir, &store_uri);
	opts[NOPTS - 1] = (struct gp_opt){ "roots", "GENPIPE_INGEST_ROOTS", GP_OPT_STR,
					   "/usr/share:/srv/genpipe",
					   "colon-separated directories sources may read beneath "
					   "(plus DATA_DIR/inbox)",
					   &roots };
	int rc = gp_service_parse("ingest", opts, NOPTS, argc, argv);
	if (rc >= 0)
		return rc;
	struct gp_err err = { 0 };
	char allroots[8192];
	snprintf(allroots, sizeof allroots, "%s:%s/inbox", roots, data_dir);
	struct gp_ingest_config cfg = { .roots = allroots };
	if (gp_store_open_in(&cfg.store, store_uri, data_dir, &err)) {
		gp_error("could not open the artifact store: %s", err.msg);
		return 1;
	}
	curl_global_init(CURL_GLOBAL_DEFAULT);
	rc = gp_service_run_worker(&svc, (struct gp_worker_config){
							 .kind = "ingest",
							 .lease_ms = lease, .quick_result_ms = quick,
							 .heartbeat_ms = hb,
							 .handler = gp_ingest_handle,
							 .closure = &cfg,
						 });
	gp_store_close(cfg.store);
	curl_global_cleanup();
	return rc;
}
