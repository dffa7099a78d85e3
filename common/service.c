/*
 * service.c: shared service bootstrap (see service.h).
 */
#include "service.h"

#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

#include "log.h"

static volatile int stop_flag;

static void on_signal(int sig)
{
	(void)sig;
	stop_flag = 1;
}

void gp_service_signals(void)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_signal;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
}

int gp_service_stopping(void)
{
	return stop_flag;
}

volatile int *gp_service_stop_flag(void)
{
	return &stop_flag;
}

void gp_service_options(struct gp_service *svc, struct gp_opt *o)
{
	o[0] = (struct gp_opt){ "nats-url", "GENPIPE_NATS_URL", GP_OPT_STR, "nats://127.0.0.1:4222",
				"NATS server URL(s), comma-separated", &svc->nats_url };
	o[1] = (struct gp_opt){ "database-url", "GENPIPE_DATABASE_URL", GP_OPT_STR, NULL,
				"PostgreSQL connection URL", &svc->database_url };
	o[2] = (struct gp_opt){ "http-addr", "GENPIPE_HTTP_ADDR", GP_OPT_STR, "127.0.0.1",
				"address for /healthz, /readyz and /metrics", &svc->http_addr };
	o[3] = (struct gp_opt){ "http-port", "GENPIPE_HTTP_PORT", GP_OPT_INT, "0",
				"port for /healthz, /readyz and /metrics (0: any)", &svc->http_port };
	o[4] = (struct gp_opt){ "log-level", "GENPIPE_LOG_LEVEL", GP_OPT_STR, "info",
				"debug, info, warn or error", &svc->log_level };
}

static int ready(void *cls, char *why, size_t len)
{
	struct gp_service *s = cls;
	if (gp_service_stopping()) {
		snprintf(why, len, "draining");
		return 0;
	}
	if (!gp_bus_connected(s->bus)) {
		snprintf(why, len, "nats: not connected");
		return 0;
	}
	int ok = 1;
	if (s->probe_db && s->probe_lock) {
		pthread_mutex_lock(s->probe_lock);
		struct gp_err e = { 0 };
		/* A server restart leaves a dead connection that looks fine until
		 * used: on failure, reconnect once and ask again. */
		int good = gp_db_ok(s->probe_db) &&
			   gp_db_run(s->probe_db, "readiness probe", "SELECT 1", &e) == GP_OK;
		if (!good && gp_db_ok(s->probe_db))
			good = gp_db_run(s->probe_db, "readiness probe", "SELECT 1", &e) == GP_OK;
		if (!good) {
			snprintf(why, len, "database: %s", e.msg[0] ? e.msg : "connection lost");
			ok = 0;
		}
		pthread_mutex_unlock(s->probe_lock);
	}
	return ok;
}

gp_status gp_service_start(struct gp_service *svc, int bus_flags, long long wait_ms,
			   struct gp_err *err)
{
	int lvl = gp_log_parse_level(svc->log_level);
	if (lvl < 0)
		return gp_err_set(err, GP_ERR_INVALID, "invalid log level \"%s\"", svc->log_level);
	gp_log_set_level((enum gp_log_level)lvl);
	gp_status st;
	char cname[96];
	snprintf(cname, sizeof cname, "genpipe-%s", svc->name);
	svc->metrics = gp_metrics_create();
	if (!svc->metrics)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	svc->up = gp_metrics_get(svc->metrics, GP_GAUGE, "genpipe_up",
				 "1 while the service runs and is connected", NULL, NULL, 0);
	if ((st = gp_db_connect(&svc->db, svc->database_url, wait_ms, err)))
		goto fail;
	if ((st = gp_db_connect(&svc->probe_db, svc->database_url, wait_ms, err)))
		goto fail;
	/* A failing probe must answer quickly, not hang the HTTP thread. */
	gp_db_run(svc->probe_db, "probe timeout", "SET statement_timeout = 1000", NULL);
	svc->probe_lock = malloc(sizeof(pthread_mutex_t));
	if (!svc->probe_lock) {
		st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		goto fail;
	}
	pthread_mutex_init(svc->probe_lock, NULL);
	if ((st = gp_http_create(&svc->http, svc->http_addr, (int)svc->http_port, svc->metrics,
				 ready, svc, err)))
		goto fail;
	if ((st = gp_bus_connect(&svc->bus, svc->nats_url, cname, bus_flags, wait_ms, err)))
		goto fail;
	gp_metric_set(svc->up, 1);
	char port[16];
	snprintf(port, sizeof port, "%d", gp_http_port(svc->http));
	gp_log_kv(GP_LOG_INFO, "service started", "service", svc->name, "http_port", port, NULL);
	return GP_OK;
fail:
	gp_service_stop(svc);
	return st;
}

void gp_service_stop(struct gp_service *svc)
{
	if (svc->bus) {
		struct gp_err e = { 0 };
		if (gp_bus_drain(svc->bus, 5000, &e))
			gp_warn("drain: %s", e.msg);
	}
	/* The HTTP thread reads bus and probe connection: stop it first. */
	gp_http_destroy(svc->http);
	svc->http = NULL;
	gp_bus_destroy(svc->bus);
	svc->bus = NULL;
	gp_db_destroy(svc->db);
	svc->db = NULL;
	gp_db_destroy(svc->probe_db);
	svc->probe_db = NULL;
	if (svc->probe_lock) {
		pthread_mutex_destroy(svc->probe_lock);
		free(svc->probe_lock);
		svc->probe_lock = NULL;
	}
	gp_metrics_destroy(svc->metrics);
	svc->metrics = NULL;
}

void gp_service_worker_options(struct gp_opt *o, long long *lease_ms, long long *heartbeat_ms,
			       long long *quick_result_ms, const char *lease_default,
			       const char *heartbeat_default)
{
	o[0] = (struct gp_opt){ "lease-ms", "GENPIPE_LEASE_MS", GP_OPT_INT, lease_default,
				"lease granted per claim and heartbeat", lease_ms };
	o[1] = (struct gp_opt){ "heartbeat-ms", "GENPIPE_HEARTBEAT_MS", GP_OPT_INT,
				heartbeat_default, "heartbeat interval", heartbeat_ms };
	o[2] = (struct gp_opt){ "quick-result-ms", "GENPIPE_QUICK_RESULT_MS", GP_OPT_INT, "1000",
				"results of attempts shorter than this do not wait for the "
				"database's WAL flush (0: all wait)",
				quick_result_ms };
}

void gp_service_store_options(struct gp_opt *o, const char **data_dir, const char **store_uri)
{
	o[0] = (struct gp_opt){ "data-dir", "GENPIPE_DATA_DIR", GP_OPT_STR, "/var/lib/genpipe",
				"data directory (artifacts under it by default)", data_dir };
	o[1] = (struct gp_opt){ "artifacts", "GENPIPE_ARTIFACTS", GP_OPT_STR, "",
				"artifact store URI (default file://DATA_DIR/artifacts)",
				store_uri };
}

int gp_service_parse(const char *name, const struct gp_opt *opts, int nopts, int argc,
		     char **argv)
{
	char usage[128];
	int first = 0, help = 0;
	struct gp_err err = { 0 };
	gp_log_init(name);
	snprintf(usage, sizeof usage, "genpipe-%s [options]", name);
	if (gp_config_parse(opts, nopts, argc, argv, usage, stdout, &first, &help, &err)) {
		fprintf(stderr, "genpipe-%s: %s\n", name, err.msg);
		return 2;
	}
	if (help)
		return 0;
	if (first < argc) {
		fprintf(stderr, "genpipe-%s: unexpected argument \"%s\"\n", name, argv[first]);
		return 2;
	}
	return -1;
}

int gp_service_run_worker(struct gp_service *svc, struct gp_worker_config wc)
{
	struct gp_err err = { 0 };
	struct gp_worker *w = NULL;
	int rc = 0;
	gp_service_signals();
	/* Send at once: a pull request or an ack waiting for the client's write
	 * coalescing (a millisecond) is a millisecond on every stage. */
	if (gp_service_start(svc, GP_BUS_SEND_ASAP, 30000, &err)) {
		gp_error("could not start: %s", err.msg);
		gp_service_stop(svc);
		return 1;
	}
	wc.metrics = svc->metrics;
	if (wc.ack_wait_ms <= 0)
		wc.ack_wait_ms = wc.lease_ms;
	if (gp_worker_create(&w, &wc, svc->db, svc->bus, svc->database_url, &err)) {
		gp_error("could not start: %s", err.msg);
		rc = 1;
	} else if (gp_worker_run(w, gp_service_stop_flag(), &err)) {
		gp_error("worker stopped: %s", err.msg);
		rc = 1;
	}
	gp_info("stopping");
	gp_worker_destroy(w);
	gp_service_stop(svc);
	return rc;
}
