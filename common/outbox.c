/*
 * outbox.c: the transactional outbox and its relay (see outbox.h).
 */
#include "outbox.h"

#include <limits.h>
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

/* Mark ids sent and commit, in one round trip (the ids are integers we
 * print). begin: open the transaction too, without waiting for the WAL
 * flush (see gp_outbox_relay_once). */
static gp_status mark_sent_commit(struct gp_db *db, const long long *ids, int n, int begin,
				  struct gp_err *err)
{
	size_t cap = (size_t)n * 21 + 200;
	char *sql = malloc(cap);
	if (!sql)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	size_t len = (size_t)snprintf(sql, cap,
				      "%sUPDATE outbox SET sent_at = now() WHERE id = ANY('{",
				      begin ? "BEGIN; SET LOCAL synchronous_commit TO off; " : "");
	for (int i = 0; i < n; i++)
		len += (size_t)snprintf(sql + len, cap - len, "%s%lld", i ? "," : "", ids[i]);
	snprintf(sql + len, cap - len, "}'::bigint[]) AND sent_at IS NULL; COMMIT");
	gp_status st = gp_db_script(db, "mark outbox rows sent", sql, NULL, err);
	free(sql);
	return st;
}

gp_status gp_outbox_relay_once(struct gp_db *db, struct gp_bus *bus, int max,
			       const struct gp_relay_hooks *hooks, int *published, int *duplicates,
			       struct gp_err *err)
{
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
	/* Two round trips a pass: begin + read, then mark + commit. The mark
	 * need not wait for the WAL flush: a mark lost in a crash only means the
	 * rows are published again with the same ids, which JetStream
	 * deduplicates (and consumers absorb after the window). */
	char sql[320];
	snprintf(sql, sizeof sql,
		 "BEGIN; SET LOCAL synchronous_commit TO off; "
		 "SELECT id, subject, payload FROM outbox WHERE sent_at IS NULL "
		 "ORDER BY id LIMIT %d FOR UPDATE SKIP LOCKED",
		 max > 0 ? max : 100);
	gp_status st = gp_db_script(db, "read unsent outbox rows", sql, &r, err);
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
	if ((st = mark_sent_commit(db, ids, n, 0, err)))
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

gp_status gp_outbox_direct_add(struct gp_outbox_direct *d, long long id, const char *subject,
			       const void *payload, size_t len, struct gp_err *err)
{
	if (len > INT_MAX)
		return gp_err_set(err, GP_ERR_TOO_BIG, "outbox message of %zu bytes", len);
	if (d->n == d->cap) {
		int cap = d->cap ? d->cap * 2 : 16;
		long long *ids = realloc(d->ids, (size_t)cap * sizeof *ids);
		if (ids)
			d->ids = ids;
		char **subjects = realloc(d->subjects, (size_t)cap * sizeof *subjects);
		if (subjects)
			d->subjects = subjects;
		unsigned char **payloads = realloc(d->payloads, (size_t)cap * sizeof *payloads);
		if (payloads)
			d->payloads = payloads;
		int *lens = realloc(d->lens, (size_t)cap * sizeof *lens);
		if (lens)
			d->lens = lens;
		if (!ids || !subjects || !payloads || !lens)
			return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		d->cap = cap;
	}
	char *s = strdup(subject);
	unsigned char *p = malloc(len ? len : 1);
	if (!s || !p) {
		free(s);
		free(p);
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	}
	memcpy(p, payload, len);
	d->ids[d->n] = id;
	d->subjects[d->n] = s;
	d->payloads[d->n] = p;
	d->lens[d->n] = (int)len;
	d->n++;
	return GP_OK;
}

void gp_outbox_direct_truncate(struct gp_outbox_direct *d, int n)
{
	if (n < 0)
		n = 0;
	while (d->n > n) {
		d->n--;
		free(d->subjects[d->n]);
		free(d->payloads[d->n]);
	}
}

void gp_outbox_direct_free(struct gp_outbox_direct *d)
{
	gp_outbox_direct_truncate(d, 0);
	free(d->ids);
	free(d->subjects);
	free(d->payloads);
	free(d->lens);
	memset(d, 0, sizeof *d);
}

gp_status gp_outbox_publish_direct(struct gp_db *db, struct gp_bus *bus,
				   struct gp_outbox_direct *d, int *duplicates,
				   struct gp_err *err)
{
	if (duplicates)
		*duplicates = 0;
	if (d->n == 0)
		return GP_OK;
	if (PQtransactionStatus(gp_db_conn(db)) != PQTRANS_IDLE) {
		gp_outbox_direct_truncate(d, 0);
		return gp_err_set(err, GP_ERR_INTERNAL,
				  "outbox: direct publish inside an open transaction");
	}
	struct gp_bus_out *out = calloc((size_t)d->n, sizeof *out);
	char (*msgids)[32] = calloc((size_t)d->n, sizeof *msgids);
	gp_status st = GP_OK;
	if (!out || !msgids)
		st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	for (int i = 0; !st && i < d->n; i++) {
		gp_outbox_msg_id(d->ids[i], msgids[i], sizeof msgids[i]);
		out[i] = (struct gp_bus_out){ d->subjects[i], d->payloads[i], d->lens[i], msgids[i] };
	}
	if (!st)
		st = gp_bus_publish_batch(bus, out, d->n, 5000, duplicates, err);
	if (!st && (st = mark_sent_commit(db, d->ids, d->n, 1, err)))
		gp_db_rollback(db);
	free(out);
	free(msgids);
	gp_outbox_direct_truncate(d, 0);
	return st;
}

gp_status gp_outbox_listen(struct gp_db *db, struct gp_err *err)
{
	return gp_db_run(db, "listen for outbox notifications", "LISTEN genpipe_outbox", err);
}

