/*
 * genpipe-infer: online inference (serve.h) and, in the same process, the
 * deploy and batch-infer stage kinds (stages.h), each on its own thread
 * and database connection.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu.h"
#include "log.h"
#include "serve.h"
#include "service.h"
#include "stages.h"

#define NOPTS (GP_SERVICE_NOPTS + GP_WORKER_NOPTS + GP_STORE_NOPTS + 15)

/* The batch-infer worker: its own thread and database connection. */
struct bworker {
	struct gp_worker *w;
	struct gp_db *db;
	pthread_t th;
	int rc;
};

static void *bworker_main(void *arg)
{
	struct bworker *b = arg;
	struct gp_err err = { 0 };
	if (gp_worker_run(b->w, gp_service_stop_flag(), &err)) {
		gp_error("batch-infer worker stopped: %s", err.msg);
		b->rc = 1;
	}
	return NULL;
}

int main(int argc, char **argv)
{
	struct gp_service svc = { .name = "infer" };
	long long lease = 0, hb = 0, quick = 0, slots = 0, queue = 0, max_prompt = 0, max_new = 0,
		  deadline = 0, max_deadline = 0, cache_mb = 0, memory_mb = 0, tqueue = 0,
		  poll_ms = 0;
	const char *data_dir = NULL, *store_uri = NULL, *model = NULL, *alias = NULL,
		   *sample = NULL, *device = NULL;
	int payloads = 1;
	struct gp_opt opts[NOPTS];
	gp_service_options(&svc, opts);
	gp_service_worker_options(opts + GP_SERVICE_NOPTS, &lease, &hb, &quick, "30000", "5000");
	gp_service_store_options(opts + GP_SERVICE_NOPTS + GP_WORKER_NOPTS, &data_dir, &store_uri);
	struct gp_opt *o = opts + GP_SERVICE_NOPTS + GP_WORKER_NOPTS + GP_STORE_NOPTS;
	o[0] = (struct gp_opt){ "model", "GENPIPE_INFER_MODEL", GP_OPT_STR, "*",
				"the model served (\"*\": every model, for development)", &model };
	o[1] = (struct gp_opt){ "alias", "GENPIPE_INFER_ALIAS", GP_OPT_STR, "production",
				"alias used when a request names none", &alias };
	o[2] = (struct gp_opt){ "slots", "GENPIPE_INFER_SLOTS", GP_OPT_INT, "32",
				"sequences decoded together", &slots };
	o[3] = (struct gp_opt){ "queue", "GENPIPE_INFER_QUEUE", GP_OPT_INT, "64",
				"requests waiting beyond the slots; more get \"busy\"", &queue };
	o[4] = (struct gp_opt){ "max-prompt-tokens", "GENPIPE_INFER_MAX_PROMPT_TOKENS", GP_OPT_INT,
				"0", "longest prompt (0: the model's context - 1)", &max_prompt };
	o[5] = (struct gp_opt){ "max-new-tokens", "GENPIPE_INFER_MAX_NEW_TOKENS", GP_OPT_INT, "512",
				"most tokens a request may ask for", &max_new };
	o[6] = (struct gp_opt){ "deadline-ms", "GENPIPE_INFER_DEADLINE_MS", GP_OPT_INT, "30000",
				"deadline of a request that gives none", &deadline };
	o[7] = (struct gp_opt){ "max-deadline-ms", "GENPIPE_INFER_MAX_DEADLINE_MS", GP_OPT_INT,
				"300000", "longest deadline a request may ask for", &max_deadline };
	o[8] = (struct gp_opt){ "cache-mb", "GENPIPE_INFER_CACHE_MB", GP_OPT_INT, "64",
				"response cache size (0: off)", &cache_mb };
	o[9] = (struct gp_opt){ "memory-mb", "GENPIPE_INFER_MEMORY_MB", GP_OPT_INT, "4096",
				"budget for loaded checkpoints", &memory_mb };
	o[10] = (struct gp_opt){ "telemetry-sample", "GENPIPE_INFER_TELEMETRY_SAMPLE", GP_OPT_STR,
				 "1", "share of successful requests logged (failures always are)",
				 &sample };
	o[11] = (struct gp_opt){ "log-payloads", "GENPIPE_INFER_LOG_PAYLOADS", GP_OPT_BOOL, "true",
				 "prompt and completion text in telemetry", &payloads };
	o[12] = (struct gp_opt){ "telemetry-queue", "GENPIPE_INFER_TELEMETRY_QUEUE", GP_OPT_INT,
				 "8192", "telemetry events buffered before dropping", &tqueue };
	o[13] = (struct gp_opt){ "registry-poll-ms", "GENPIPE_INFER_REGISTRY_POLL_MS", GP_OPT_INT,
				 "5000", "backstop check of the aliases served", &poll_ms };
	o[14] = (struct gp_opt){ "device", "GENPIPE_INFER_DEVICE", GP_OPT_STR, "auto",
				 "cpu, cuda (bf16 weights on the GPU) or auto (the GPU when one is "
				 "usable)", &device };
	int rc = gp_service_parse("infer", opts, NOPTS, argc, argv);
	if (rc >= 0)
		return rc;
	char *end = NULL;
	double share = strtod(sample, &end);
	if (*end || !(share >= 0 && share <= 1)) {
		fprintf(stderr, "genpipe-infer: --telemetry-sample \"%s\" is not a number in 0..1\n",
			sample);
		return 2;
	}
	if (slots < 1 || slots > 1024 || queue < 0 || max_new < 1 || deadline < 1 ||
	    max_deadline < deadline || cache_mb < 0 || memory_mb < 1 || poll_ms < 100) {
		fprintf(stderr, "genpipe-infer: a limit is out of range (slots 1..1024, queue >= 0, "
				"max-new-tokens >= 1, deadline-ms >= 1 and <= max-deadline-ms, "
				"memory-mb >= 1, registry-poll-ms >= 100)\n");
		return 2;
	}
	struct gp_err err = { 0 };
	int use_gpu = 0;
	if (gp_gpu_choose(device, &use_gpu, &err)) {
		fprintf(stderr, "genpipe-infer: --device: %s\n", err.msg);
		return 2;
	}
	struct gp_server_config cfg = {
		.model = model,
		.alias = alias,
		.engine = { .slots = (int)slots, .queue = queue ? (int)queue : -1,
			    .max_prompt_tokens = (int)max_prompt, .max_new_tokens = (int)max_new,
			    .default_deadline_ms = deadline, .max_deadline_ms = max_deadline,
			    .cache_bytes = (size_t)cache_mb << 20, .path = GP_MODEL_FAST,
			    .use_gpu = use_gpu },
		.memory_budget = (size_t)memory_mb << 20,
		.telemetry_sample = share,
		.log_payloads = payloads,
		.telemetry_queue = (int)tqueue,
		.registry_poll_ms = poll_ms,
		.telemetry_nats_url = svc.nats_url,
	};
	if (gp_store_open_in(&cfg.store, store_uri, data_dir, &err)) {
		gp_error("could not open the artifact store: %s", err.msg);
		return 1;
	}
	gp_service_signals();
	if (gp_service_start(&svc, GP_BUS_SEND_ASAP, 30000, &err)) {
		gp_error("could not start: %s", err.msg);
		gp_service_stop(&svc);
		gp_store_close(cfg.store);
		return 1;
	}
	struct gp_server *srv = NULL;
	struct gp_worker *w = NULL;
	struct gp_deploy_config dc = { .bus = svc.bus, .store = cfg.store };
	struct gp_worker_config wc = {
		.kind = "deploy", .lease_ms = lease, .heartbeat_ms = hb, .ack_wait_ms = lease,
		.quick_result_ms = quick,
		.handler = gp_deploy_handle, .closure = &dc, .metrics = svc.metrics,
		.version = GP_KIND_UNCACHED,
	};
	struct gp_batch_infer_config bc = { .store = cfg.store, .slots = (int)slots,
					    .use_gpu = use_gpu };
	struct gp_worker_config bwc = {
		.kind = "batch-infer", .lease_ms = lease, .heartbeat_ms = hb, .ack_wait_ms = lease,
		.quick_result_ms = quick,
		.handler = gp_batch_infer_handle, .closure = &bc, .metrics = svc.metrics,
	};
	struct bworker bw = { 0 };
	int bstarted = 0;
	rc = 0;
	if (gp_server_start(&srv, &cfg, svc.bus, svc.database_url, svc.metrics, &err) ||
	    gp_worker_create(&w, &wc, svc.db, svc.bus, svc.database_url, &err) ||
	    gp_db_connect(&bw.db, svc.database_url, 30000, &err) ||
	    gp_worker_create(&bw.w, &bwc, bw.db, svc.bus, svc.database_url, &err)) {
		gp_error("could not start: %s", err.msg);
		rc = 1;
	} else {
		bstarted = pthread_create(&bw.th, NULL, bworker_main, &bw) == 0;
		if (gp_worker_run(w, gp_service_stop_flag(), &err)) {
			gp_error("deploy worker stopped: %s", err.msg);
			rc = 1;
		}
	}
	gp_info("stopping");
	if (bstarted) {
		/* the deploy loop also ends when it fails: stop the other one too */
		*gp_service_stop_flag() = 1;
		pthread_join(bw.th, NULL);
		rc |= bw.rc;
	}
	gp_worker_destroy(bw.w);
	gp_db_destroy(bw.db);
	gp_worker_destroy(w);
	gp_server_stop(srv);
	gp_service_stop(&svc);
	gp_store_close(cfg.store);
	return rc;
}
