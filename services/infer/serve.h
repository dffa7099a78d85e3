/*
 * serve.h: online inference over NATS (request/reply).
 *
 * Requests arrive on genpipe.infer.<model> in the queue group
 * genpipe-infer, so replicas share the load. A request names a version or
 * an alias (default: the configured one, "production"); aliases are
 * resolved from PostgreSQL, cached, and updated when a RegistryChange
 * arrives on genpipe.registry.<model> (the new version is loaded first, so
 * requests never wait for it) and by a periodic check as a backstop.
 * Versions load by mapping their checkpoint (gp_ckpt_map); several stay
 * loaded within a memory budget, least recently used first out, never one
 * an alias names or a request is using.
 *
 * Every request ends in exactly one final InferResponse (streamed requests
 * get partial ones before it): malformed ones with "bad_request", unknown
 * models or versions with "not_found", refused ones with "busy". Each one,
 * failures included, goes to genpipe.telemetry.<model> (successes sampled
 * at the configured rate) through a bounded queue and its own thread: a
 * full queue or an unreachable stream drops events and counts them
 * (genpipe_infer_telemetry_dropped_total); serving never waits for it.
 */
#ifndef GP_INFER_SERVE_H
#define GP_INFER_SERVE_H

#include "artifact.h"
#include "bus.h"
#include "engine.h"
#include "http.h"

struct gp_server_config {
	const char *model;          /* a model name, or "*": every model (development) */
	const char *alias;          /* default alias; NULL: production */
	struct gp_store *store;     /* checkpoints and tokenizers */
	struct gp_engine_config engine;
	size_t memory_budget;       /* bytes of loaded checkpoints; 0: 4 GiB */
	double telemetry_sample;    /* share of successful requests logged, 0..1 */
	int log_payloads;           /* prompt and completion text in telemetry */
	int telemetry_queue;        /* events buffered; default 8192 */
	long long registry_poll_ms; /* backstop alias check; default 5000 */
	const char *telemetry_nats_url; /* its own connection (NULL: share the service's) */
};

struct gp_server;

gp_status gp_server_start(struct gp_server **out, const struct gp_server_config *cfg,
			  struct gp_bus *bus, const char *database_url, struct gp_metrics *metrics,
			  struct gp_err *err);
/* Unsubscribe, finish or fail what is in flight, flush telemetry, stop. */
void gp_server_stop(struct gp_server *s);

/* The engine (stats, tests). */
struct gp_engine *gp_server_engine(struct gp_server *s);

#endif
