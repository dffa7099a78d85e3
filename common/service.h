/*
 * service.h: what every genpipe service binary shares: the standard flags,
 * signal handling, connections, and the health/metrics endpoint.
 *
 * Standard options (flag / environment / default):
 *   --nats-url      GENPIPE_NATS_URL      nats://127.0.0.1:4222
 *   --database-url  GENPIPE_DATABASE_URL  (none)
 *   --http-addr     GENPIPE_HTTP_ADDR     127.0.0.1
 *   --http-port     GENPIPE_HTTP_PORT     0 (any free port)
 *   --log-level     GENPIPE_LOG_LEVEL     info
 * A service appends its own options after these.
 *
 * /readyz answers 503 while NATS is disconnected, while PostgreSQL does not
 * answer `SELECT 1` within a second (on a connection of its own: a PGconn
 * is not shared between threads), or while draining.
 *
 * SIGTERM and SIGINT set the stop flag (gp_service_stopping()); services
 * drain in-flight work and exit 0.
 */
#ifndef GP_SERVICE_H
#define GP_SERVICE_H

#include "bus.h"
#include "config.h"
#include "db.h"
#include "http.h"
#include "worker.h"

struct gp_service {
	const char *name;       /* "orchestrator" */
	const char *nats_url;
	const char *database_url;
	const char *http_addr;
	long long http_port;
	const char *log_level;
	struct gp_metrics *metrics;
	struct gp_http *http;
	struct gp_db *db;
	struct gp_bus *bus;
	struct gp_metric *up;
	struct gp_db *probe_db;   /* readiness checks only (the HTTP thread's own) */
	void *probe_lock;         /* pthread_mutex_t *, for probe_db */
};

/* Number of standard options gp_service_options() writes. */
#define GP_SERVICE_NOPTS 5

/* Fill opts[0..GP_SERVICE_NOPTS) with the standard options bound to svc. */
void gp_service_options(struct gp_service *svc, struct gp_opt *opts);

/* Install SIGTERM/SIGINT handlers; ignore SIGPIPE. */
void gp_service_signals(void);
/* Non-zero once SIGTERM or SIGINT arrived. */
int gp_service_stopping(void);
/* The flag itself, for loops that take a pointer. */
volatile int *gp_service_stop_flag(void);

/*
 * Connect to PostgreSQL and NATS (each retried up to wait_ms), start the
 * HTTP endpoint, register the up gauge. bus_flags as for gp_bus_connect.
 * On failure everything started is released again.
 */
gp_status gp_service_start(struct gp_service *svc, int bus_flags, long long wait_ms,
			   struct gp_err *err);

/* Drain the bus, close everything. Accepts a partly started service. */
void gp_service_stop(struct gp_service *svc);

/* ---- stage services (a worker loop on one kind) ---- */

/* Options every stage service has: --lease-ms, --heartbeat-ms and
 * --quick-result-ms (gp_worker_config's quick_result_ms). */
#define GP_WORKER_NOPTS 3
void gp_service_worker_options(struct gp_opt *o, long long *lease_ms, long long *heartbeat_ms,
			       long long *quick_result_ms, const char *lease_default,
			       const char *heartbeat_default);

/* Options of services that use the artifact store: --data-dir and
 * --artifacts (empty: file://DATA_DIR/artifacts, see gp_store_open_in). */
#define GP_STORE_NOPTS 2
void gp_service_store_options(struct gp_opt *o, const char **data_dir, const char **store_uri);

/*
 * gp_log_init(name), then parse the command line into opts for
 * `genpipe-<name>`. Returns -1 to go on; otherwise the process's exit
 * code: 0 after --help, 2 on a usage error (printed with the reason).
 */
int gp_service_parse(const char *name, const struct gp_opt *opts, int nopts, int argc,
		     char **argv);

/*
 * A stage service's whole life after its options: install the signal
 * handlers, start (PostgreSQL and NATS, each waited for up to 30 s), run
 * the worker loop until SIGTERM (wc's db, bus and metrics fields are taken
 * from svc), stop. Returns the process exit code (0, or 1 with the reason
 * logged).
 */
int gp_service_run_worker(struct gp_service *svc, struct gp_worker_config wc);

#endif
