/*
 * outbox.c: the transactional outbox and its relay (see outbox.h).
 */
#include "outbox.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

void gp_outbox_msg_id(long long id, char *buf, size_t len)
{
	snprintf(buf, len, "outbox-%lld", id);
}

gp_status gp_outbox_put(struct gp_db *db, const char *subject, const void *payload, size_t len,
			long long *id, struct gp_err *err)
{
	char *hex = gp_db_bytea_param(payload, len);
	if (!hex)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	const char *params[] = { subject, hex };
	PGresult *r = NULL;
	gp_status st = gp_db_exec(db, "insert outbox message",
				  "INSERT INTO outbox (subject, payload) VALUES ($1, $2::bytea) "
				  "RETURNING id",
				  2, params, &r, err);
	free(hex);
	if (st)
		return st;
	if (id)
		*id = atoll(PQgetvalue(r, 0, 0));
	PQclear(r);
	return GP_OK;
}

static gp_status mark_sent(struct gp_db *db, const long long *ids, int n, struct gp_err *err)
{
	if (n == 0)
		return GP_OK;
	/* Build a Postgres array literal {1,2,3}. */
	size_t cap = (size_t)n * 21 + 3;
	char *arr = malloc(cap);
	if (!arr)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	size_t len = 0;
	arr[len++] = '{';
	for (int i = 0; i < n; i++)
		len += (size_t)snprintf(arr + len, cap - len, "%s%lld", i ? "," : "", ids[i]);
	arr[len++] = '}';
	arr[len] = '\0';
	const char *params[] = { arr };
	gp_status st = gp_db_exec(db, "mark outbox rows sent",
				  "UPDATE outbox SET sent_at = now() WHERE id = ANY($1::bigint[])", 1,
				  params, NULL, err);
	free(arr);
	return st;
}

gp_status gp_outbox_relay_once(struct gp_db *db, struct gp_bus *bus, int max,
			       const struct gp_relay_hooks *hooks, int *published, int *duplicates,
			       struct gp_err *err)
{
	char maxs[16];
	snprintf(maxs, sizeof maxs, "%d", max > 0 ? max : 100);
	PGresult *r = NULL;
	long long *ids = NULL;
	struct gp_bus_out *out = NULL;
	unsigned char **payloads = NULL;
	char (*msgids)[32] = NULL;
	int n = 0, dups = 0, marked = 0;
	if (published)
		*published = 0;
	if (duplicates)
		*duplicates = 0;
	gp_status st = gp_db_begin(db, err);
	if (st)
		return st;
	/* The mark need not wait for the WAL flush: a mark lost in a crash only
	 * means the rows are published again with the same ids, which JetStream
	 * deduplicates (and consumers absorb after the window). */
	if ((st = gp_db_run(db, "relay commit mode", "SET LOCAL synchronous_commit TO off", err)))
		goto out;
	const char *params[] = { maxs };
	st = gp_db_exec(db, "read unsent outbox rows",
			"SELECT id, subject, payload FROM outbox WHERE sent_at IS NULL "
			"ORDER BY id LIMIT $1::integer FOR UPDATE SKIP LOCKED",
			1, params, &r, err);
	if (st)
		goto out;
	n = PQntuples(r);
	if (n == 0)
		goto out;
	ids = calloc((size_t)n, sizeof *ids);
	out = calloc((size_t)n, sizeof *out);
	payloads = calloc((size_t)n, sizeof *payloads);
	msgids = calloc((size_t)n, sizeof *msgids);
	if (!ids || !out || !payloads || !msgids) {
		st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		goto out;
	}
	for (int i = 0; i < n; i++) {
		ids[i] = atoll(PQgetvalue(r, i, 0));
		size_t blen = 0;
		payloads[i] = PQunescapeBytea((const unsigned char *)PQgetvalue(r, i, 2), &blen);
		if (!payloads[i]) {
			st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
			goto out;
		}
		gp_outbox_msg_id(ids[i], msgids[i], sizeof msgids[i]);
		out[i] = (struct gp_bus_out){ PQgetvalue(r, i, 1), payloads[i], (int)blen, msgids[i] };
	}
	if ((st = gp_bus_publish_batch(bus, out, n, 5000, &dups, err)))
		goto out;
	if (hooks && hooks->after_publish)
		hooks->after_publish(n, hooks->closure);
	if ((st = mark_sent(db, ids, n, err)))
		goto out;
	if ((st = gp_db_commit(db, err)))
		goto out;
	marked = n;
out:
	if (PQtransactionStatus(gp_db_conn(db)) != PQTRANS_IDLE) {
		if (st)
			gp_db_rollback(db);
		else if ((st = gp_db_commit(db, err)))
			gp_db_rollback(db);
	}
	for (int i = 0; payloads && i < n; i++)
		PQfreemem(payloads[i]);
	free(payloads);
	free(msgids);
	free(out);
	free(ids);
	PQclear(r);
	if (published)
		*published = marked;
	if (duplicates)
		*duplicates = dups;
	return st;
}

gp_status gp_outbox_listen(struct gp_db *db, struct gp_err *err)
{
	return gp_db_run(db, "listen for outbox notifications", "LISTEN genpipe_outbox", err);
}

