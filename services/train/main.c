/*
 * genpipe-train: serves the `train` stage kind (see train.h).
 */
#include <stdio.h>

#include "log.h"
#include "service.h"
#include "train.h"

#define NOPTS (GP_SERVICE_NOPTS + GP_WORKER_NOPTS + GP_STORE_NOPTS + 2)

int main(int argc, char **argv)
{
	struct gp_service svc = { .name = "train" };
	long long lease = 0, hb = 0, quick = 0;
	const char *data_dir = NULL, *store_uri = NULL, *ckpt_dir = NULL, *rclass = NULL;
	struct gp_opt opts[NOPTS];
	gp_service_options(&svc, opts);
	gp_service_worker_options(opts + GP_SERVICE_NOPTS, &lease, &hb, &quick, "30000", "5000");
	gp_service_store_options(opts + GP_SERVICE_NOPTS + GP_WORKER_NOPTS, &data_dir, &store_uri);
	opts[NOPTS - 2] = (struct gp_opt){ "checkpoint-dir", "GENPIPE_CHECKPOINT_DIR", GP_OPT_STR,
					   "", "where running stages keep checkpoints "
					   "(default DATA_DIR/checkpoints; shared by all replicas)",
					   &ckpt_dir };
	opts[NOPTS - 1] = (struct gp_opt){ "resource-class", "GENPIPE_RESOURCE_CLASS", GP_OPT_STR,
					   "cpu", "the class recorded with each model version "
					   "(cpu, gpu-small, gpu-large)", &rclass };
	int rc = gp_service_parse("train", opts, NOPTS, argc, argv);
	if (rc >= 0)
		return rc;
	struct gp_err err = { 0 };
	char ckpt_default[4096];
	if (!ckpt_dir || !*ckpt_dir) {
		snprintf(ckpt_default, sizeof ckpt_default, "%s/checkpoints", data_dir);
		ckpt_dir = ckpt_default;
	}
	struct gp_train_config cfg = { .checkpoint_dir = ckpt_dir, .resource_class = rclass };
	if (gp_store_open_in(&cfg.store, store_uri, data_dir, &err)) {
		gp_error("could not open the artifact store: %s", err.msg);
		return 1;
	}
	rc = gp_service_run_worker(&svc, (struct gp_worker_config){
							 .kind = "train",
							 .lease_ms = lease, .quick_result_ms = quick,
							 .heartbeat_ms = hb,
							 .handler = gp_train_handle,
							 .closure = &cfg,
						 });
	gp_store_close(cfg.store);
	return rc;
}
