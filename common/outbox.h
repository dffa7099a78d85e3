/*
 * outbox.h: messages that must follow a committed state change.
 *
 * Producer side: gp_outbox_put() inserts the message in the caller's open
 * transaction, so it exists if and only if the state change committed.
 * Relay side: gp_outbox_relay_once() publishes unsent rows in id order with
 * Nats-Msg-Id = "outbox-<id>", then marks them sent. A relay killed between
 * publish and mark re-publishes those rows on its next pass: inside the
 * stream's duplicate window JetStream drops the copy (PubAck.Duplicate),
 * after it the consumer's idempotent effect (claim by attempt id) absorbs it.
 * Several relays may run: rows are locked with SKIP LOCKED.
 */
#ifndef GP_OUTBOX_H
#define GP_OUTBOX_H

#include <stddef.h>

#include "bus.h"
#include "db.h"

/* Insert a message; must run inside the caller's transaction. *id may be NULL. */
gp_status gp_outbox_put(struct gp_db *db, const char *subject, const void *payload, size_t len,
			long long *id, struct gp_err *err);

struct gp_relay_hooks {
	/* Called once the batch is acknowledged, before anything is marked sent.
	 * Tests use it to kill the process at exactly that point. */
	void (*after_publish)(int count, void *closure);
	void *closure;
};

/*
 * Publish up to max unsent rows (pipelined, in id order) and mark them sent.
 * *published gets the count marked (duplicates included); *duplicates (may
 * be NULL) how many the server reported as already stored. When any publish
 * of the batch fails, nothing is marked and the whole batch is published
 * again next pass (deduplication absorbs what did go out).
 */
gp_status gp_outbox_relay_once(struct gp_db *db, struct gp_bus *bus, int max,
			       const struct gp_relay_hooks *hooks, int *published, int *duplicates,
			       struct gp_err *err);

/*
 * Messages a producer wrote to the outbox in its transaction and publishes
 * itself once that transaction has committed (gp_outbox_publish_direct),
 * sparing the relay a read and the message the relay's wake-up. Whatever
 * the producer does not get to mark sent (a crash, a failed publish) stays
 * unsent for the relay, under the same Nats-Msg-Id.
 */
struct gp_outbox_direct {
	int n, cap;
	long long *ids;
	char **subjects;
	unsigned char **payloads;
	int *lens;
};
/* Copy one message in. */
gp_status gp_outbox_direct_add(struct gp_outbox_direct *d, long long id, const char *subject,
			       const void *payload, size_t len, struct gp_err *err);
/* Forget the messages from index n on (a transaction that rolled back). */
void gp_outbox_direct_truncate(struct gp_outbox_direct *d, int n);
void gp_outbox_direct_free(struct gp_outbox_direct *d);
/*
 * Publish d's messages (committed rows; no transaction may be open) and
 * mark them sent, in one round trip after the acknowledgements; d is
 * emptied either way. On failure the rows stay unsent and the caller should
 * run the relay.
 */
gp_status gp_outbox_publish_direct(struct gp_db *db, struct gp_bus *bus,
				   struct gp_outbox_direct *d, int *duplicates,
				   struct gp_err *err);

/* LISTEN for the outbox trigger's notifications on this connection. */
gp_status gp_outbox_listen(struct gp_db *db, struct gp_err *err);

/* Message id used for an outbox row. buf needs 32 bytes. */
void gp_outbox_msg_id(long long id, char *buf, size_t len);

#endif
