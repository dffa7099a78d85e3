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
	long long lease = 0, hb = 0;
	const char *data_dir = NULL, *store_uri = NULL, *roots = NULL;
	struct gp_opt opts[NOPTS];
	gp_service_options(&svc, opts);
	gp_service_worker_options(opts + GP_SERVICE_NOPTS, &lease, &hb, "30000", "5000");
	gp_service_store_options(opts + GP_SERVICE_NOPTS + GP_WORKER_NOPTS, &data_dir, &store_uri);
	opts[NOPTS - 1] = (struct gp_opt){ "roots", "GENPIPE_INGEST_ROOTS", GP_OPT_STR,
					   "/usr/share:/srv/genpipe",
					   "colon-separated directories sources may read beneath "
					   "(plus DATA_DIR/inbox)",
					   &roots };
	int first = 0, help = 0;
	struct gp_err err = { 0 };
	gp_log_init("ingest");
	if (gp_config_parse(opts, NOPTS, argc, argv, "genpipe-ingest [options]", stdout, &first,
			    &help, &err)) {
		fprintf(stderr, "genpipe-ingest: %s\n", err.msg);
		return 2;
	}
	if (help)
		return 0;
	if (first < argc) {
		fprintf(stderr, "genpipe-ingest: unexpected argument \"%s\"\n", argv[first]);
		return 2;
	}
	char allroots[8192];
	snprintf(allroots, sizeof allroots, "%s:%s/inbox", roots, data_dir);
	struct gp_ingest_config cfg = { .roots = allroots };
	if (gp_store_open_in(&cfg.store, store_uri, data_dir, &err)) {
		gp_error("could not open the artifact store: %s", err.msg);
		return 1;
	}
	curl_global_init(CURL_GLOBAL_DEFAULT);
	gp_service_signals();
	int rc = 1;
	if (gp_service_start(&svc, 0, 30000, &err))
		gp_error("could not start: %s", err.msg);
	else
		rc = gp_service_run_worker(&svc, (struct gp_worker_config){
							 .kind = "ingest",
							 .lease_ms = lease,
							 .heartbeat_ms = hb,
							 .handler = gp_ingest_handle,
							 .closure = &cfg,
						 });
	gp_service_stop(&svc);
	gp_store_close(cfg.store);
	curl_global_cleanup();
	return rc;
}
