/*
 * http.h: the small HTTP endpoints every service exposes, and the metrics
 * registry behind /metrics.
 *
 *   GET /healthz  200 "ok" while the process runs
 *   GET /readyz   200 "ready" when the service's ready callback says so,
 *                 503 with the reason otherwise (e.g. "database: connection lost")
 *   GET /metrics  Prometheus text exposition format 0.0.4
 *
 * Served by libmicrohttpd on its own thread, bound to the given address
 * (loopback by default). Metric updates are thread-safe (one mutex per
 * registry; updates are a few per message, far below contention).
 */
#ifndef GP_HTTP_H
#define GP_HTTP_H

#include <stddef.h>

#include "status.h"

struct gp_metrics;
struct gp_metric;
struct gp_http;

enum gp_metric_type { GP_COUNTER, GP_GAUGE, GP_HISTOGRAM };

/* Caller owns; free with gp_metrics_destroy (accepts NULL). */
struct gp_metrics *gp_metrics_create(void);
void gp_metrics_destroy(struct gp_metrics *reg);

/*
 * Get or create one series. name must match [a-zA-Z_:][a-zA-Z0-9_:]*;
 * labels is NULL or a label set without braces, e.g. `kind="train"`. Series
 * with the same name share one family (HELP, TYPE) and must share its type.
 * buckets/nbuckets: upper bounds, ascending, histograms only (the +Inf bucket
 * is implicit). Returns NULL on a programmer error (bad name, type clash).
 * The series is owned by the registry and valid until it is destroyed.
 */
struct gp_metric *gp_metrics_get(struct gp_metrics *reg, enum gp_metric_type type,
				 const char *name, const char *help, const char *labels,
				 const double *buckets, int nbuckets);

void gp_metric_inc(struct gp_metric *m, double v);     /* counter, gauge */
void gp_metric_set(struct gp_metric *m, double v);     /* gauge */
void gp_metric_observe(struct gp_metric *m, double v); /* histogram */

/* Render the exposition text. Caller owns *out (free()). */
gp_status gp_metrics_render(struct gp_metrics *reg, char **out, size_t *len, struct gp_err *err);

/* Ready callback: return 1 when ready, else 0 and write a reason into why. */
typedef int (*gp_ready_fn)(void *closure, char *why, size_t whylen);

/*
 * Start serving on addr:port (port 0 picks a free one; see gp_http_port).
 * reg is borrowed and must outlive the server. Caller owns the result; stop
 * and free with gp_http_destroy (accepts NULL).
 */
gp_status gp_http_create(struct gp_http **out, const char *addr, int port, struct gp_metrics *reg,
			 gp_ready_fn ready, void *closure, struct gp_err *err);
int gp_http_port(const struct gp_http *h);
void gp_http_destroy(struct gp_http *h);

/*
 * Minimal blocking GET for health checks and tests (libcurl). Caller owns
 * *body (free()). *code gets the HTTP status.
 */
gp_status gp_http_get(const char *url, long timeout_ms, long *code, char **body,
		      struct gp_err *err);

#endif
