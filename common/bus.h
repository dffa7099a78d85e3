/*
 * bus.h: NATS and JetStream for every service (nats.c 3.4.1).
 *
 * What the installed versions force on us (DESIGN.md section 3) and how this
 * module answers:
 * - JetStream dedup ids stay in the window after an ack, so a re-publish
 *   with the same id is dropped: gp_bus_publish() reports PubAck.Duplicate
 *   to the caller instead of hiding it.
 * - nats.c 3.4.1's Fetch can return before (or after) its timeout:
 *   gp_bus_fetch() keeps its own monotonic deadline and loops, and caps the
 *   batch at GP_BUS_FETCH_MAX (the pre-3.9 heap overflow in re-sent pull
 *   requests grows with the batch).
 * - A late ack from a worker whose AckWait passed still deletes a work-queue
 *   message: acks here are transport hygiene only; fencing lives in
 *   PostgreSQL (worker.h).
 *
 * A struct gp_bus is safe to share between threads (nats.c connections are);
 * a subscription is used by one thread at a time.
 */
#ifndef GP_BUS_H
#define GP_BUS_H

#include <nats/nats.h>
#include <stdint.h>

#include "status.h"

#define GP_BUS_FETCH_MAX 16

struct gp_bus;

enum {
	GP_BUS_SEND_ASAP = 1 << 0, /* flush each publish at once (responders, workers, the orchestrator) */
};

/*
 * Connect to url (comma-separated list allowed) with unlimited reconnects and
 * backoff with jitter; the first connection is retried until wait_ms passes.
 * name shows in the server's connection list. Caller owns the result; free
 * with gp_bus_destroy (accepts NULL), which drains first when drain_ms > 0.
 */
gp_status gp_bus_connect(struct gp_bus **out, const char *url, const char *name, int flags,
			 long long wait_ms, struct gp_err *err);
void gp_bus_destroy(struct gp_bus *bus);

/* Borrowed; valid until gp_bus_destroy. */
natsConnection *gp_bus_conn(struct gp_bus *bus);
jsCtx *gp_bus_js(struct gp_bus *bus);
/* 1 while connected (not reconnecting or closed). */
int gp_bus_connected(struct gp_bus *bus);

/* One stream in a declaration table. */
struct gp_stream_def {
	const char *name;
	const char *subjects[4];  /* NULL-terminated when fewer than 4 */
	int work_queue;           /* 1: WorkQueue retention, else Limits */
	long long max_age_ms;     /* 0: unlimited */
	long long max_bytes;      /* 0 or -1: unlimited */
	long long dup_window_ms;  /* 0: server default (2 min) */
};

/* One durable pull consumer. */
struct gp_consumer_def {
	const char *stream;
	const char *durable;
	const char *filter;       /* filter subject */
	long long ack_wait_ms;
	long long max_deliver;    /* -1: unlimited */
	long long max_ack_pending;
};

/* The streams every deployment has (subjects.h); n gets the count. */
const struct gp_stream_def *gp_bus_default_streams(int *n);

/*
 * Create or update streams and consumers so that they match the tables.
 * Idempotent; safe to run from several processes at once.
 */
gp_status gp_bus_declare(struct gp_bus *bus, const struct gp_stream_def *streams, int nstreams,
			 const struct gp_consumer_def *consumers, int nconsumers,
			 struct gp_err *err);

/* The durable job consumer of one stage kind ("jobs-<kind>" on genpipe.jobs.<kind>). */
struct gp_consumer_def gp_bus_job_consumer(const char *kind, char *durable_buf, size_t dlen,
					   char *filter_buf, size_t flen, long long ack_wait_ms);

/* 1 when s is a DNS label (a-z, 0-9, '-', 1..63 chars, no leading/trailing '-'). */
int gp_bus_token_ok(const char *s);

/*
 * Publish to JetStream with Nats-Msg-Id = msg_id (may be NULL) and wait for
 * the PubAck (timeout_ms). *duplicate (may be NULL) is set when the server
 * says the id was already in its window: the message was NOT stored again.
 * *seq (may be NULL) gets the stream sequence.
 */
gp_status gp_bus_publish(struct gp_bus *bus, const char *subject, const void *data, int len,
			 const char *msg_id, long long timeout_ms, int *duplicate, uint64_t *seq,
			 struct gp_err *err);

/* One message of a batch publish. */
struct gp_bus_out {
	const char *subject;
	const void *data;
	int len;
	const char *msg_id;
};

/*
 * Publish n messages to JetStream pipelined (all published and flushed, then
 * wait for every PubAck within timeout_ms, read from one reply subscription
 * the bus keeps; batches from several threads take turns). GP_OK only when every message was
 * acknowledged; *duplicates (may be NULL) counts those the server already
 * had. On error some may have been stored: callers re-publish the batch with
 * the same ids and rely on deduplication.
 */
gp_status gp_bus_publish_batch(struct gp_bus *bus, const struct gp_bus_out *msgs, int n,
			       long long timeout_ms, int *duplicates, struct gp_err *err);

/* Core (not JetStream-acknowledged) publish: best-effort events. */
gp_status gp_bus_publish_core(struct gp_bus *bus, const char *subject, const void *data, int len,
			      struct gp_err *err);

/* Bind a pull subscription to an existing durable consumer. Caller owns *sub
 * (natsSubscription_Destroy). */
gp_status gp_bus_pull_subscribe(struct gp_bus *bus, const struct gp_consumer_def *c,
				natsSubscription **sub, struct gp_err *err);

/*
 * Fetch up to batch (capped at GP_BUS_FETCH_MAX) messages, returning within
 * timeout_ms by our clock. On GP_OK list->Count >= 1 and the caller owns the
 * list (natsMsgList_Destroy). GP_ERR_TIMEOUT when nothing arrived.
 */
gp_status gp_bus_fetch(natsSubscription *sub, int batch, long long timeout_ms, natsMsgList *list,
		       struct gp_err *err);

/* Acknowledgements; each converts natsStatus once. */
gp_status gp_bus_ack(natsMsg *m, struct gp_err *err);
gp_status gp_bus_nak(natsMsg *m, long long delay_ms, struct gp_err *err);
gp_status gp_bus_in_progress(natsMsg *m, struct gp_err *err);
gp_status gp_bus_term(natsMsg *m, struct gp_err *err);

/* Delivery metadata of a JetStream message. */
struct gp_msg_meta {
	uint64_t stream_seq;
	uint64_t delivered;      /* 1 on first delivery */
	char stream[64];
	char consumer[64];
};
gp_status gp_bus_meta(natsMsg *m, struct gp_msg_meta *meta, struct gp_err *err);

/* Core request/reply. Caller owns *reply (natsMsg_Destroy). */
gp_status gp_bus_request(struct gp_bus *bus, const char *subject, const void *data, int len,
			 long long timeout_ms, natsMsg **reply, struct gp_err *err);
gp_status gp_bus_respond(struct gp_bus *bus, natsMsg *req, const void *data, int len,
			 struct gp_err *err);

/* Drain subscriptions and pending publishes, then close; bounded by timeout_ms. */
gp_status gp_bus_drain(struct gp_bus *bus, long long timeout_ms, struct gp_err *err);

/* Convert a natsStatus (and JetStream error code, 0 if none) once. */
gp_status gp_bus_status(natsStatus s, jsErrCode jerr, const char *what, struct gp_err *err);

#endif
