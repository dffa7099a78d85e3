/*
 * db.h: PostgreSQL access for every service (libpq).
 *
 * Parameterized queries only: there is no function here that takes SQL with
 * values spliced in. libpq errors are converted once, here, into gp_status by
 * SQLSTATE class; the message names the statement's purpose and carries the
 * server's primary message.
 *
 * A struct gp_db wraps one PGconn and is not thread-safe: use one per thread.
 */
#ifndef GP_DB_H
#define GP_DB_H

#include <libpq-fe.h>

#include "status.h"

struct gp_db;

/*
 * Connect to url (a libpq conninfo or postgresql:// URI), retrying with
 * exponential backoff (100 ms doubling to 2 s) until wait_ms has passed.
 * Caller owns the result; free with gp_db_destroy (accepts NULL).
 */
gp_status gp_db_connect(struct gp_db **out, const char *url, long long wait_ms,
			struct gp_err *err);
void gp_db_destroy(struct gp_db *db);

/* Borrowed; valid until gp_db_destroy. For code that needs raw libpq. */
PGconn *gp_db_conn(struct gp_db *db);

/* 1 when the connection is usable (resets a broken one once). */
int gp_db_ok(struct gp_db *db);

/*
 * Run one parameterized statement. params are text values (NULL entries are
 * SQL NULL). On success *res (when res is non-NULL) receives the result, which
 * the caller owns and frees with PQclear; with res NULL it is freed here.
 * `what` names the operation in error messages ("claim attempt 42").
 */
gp_status gp_db_exec(struct gp_db *db, const char *what, const char *sql, int nparams,
		     const char *const *params, PGresult **res, struct gp_err *err);

/* Simple statements without parameters (BEGIN, COMMIT, DDL). */
gp_status gp_db_run(struct gp_db *db, const char *what, const char *sql, struct gp_err *err);
/*
 * Several ';'-separated statements without parameters in one round trip
 * (the simple query protocol). *res gets the last statement's result; the
 * first failure stops the rest and is what is reported. Only for SQL built
 * from trusted text (integers the caller printed), never from outside bytes.
 */
gp_status gp_db_script(struct gp_db *db, const char *what, const char *sql, PGresult **res,
		       struct gp_err *err);

/*
 * Queue a statement to go out with the connection's next round trip (the
 * next gp_db_exec, gp_db_commit, gp_db_run, gp_db_script or gp_db_flush):
 * libpq's pipeline mode, the queue in order and then that call's own
 * statement, one sync. Parameters are copied. A queued statement's failure
 * is the error of the call that sent it (named by its `what`), and nothing
 * after it runs; *changed (may be NULL) is incremented when it changed rows.
 * gp_db_rollback drops the queue. For statements whose results the caller
 * needs only as a count: the writes at the end of a transaction, its BEGIN.
 */
gp_status gp_db_queue(struct gp_db *db, const char *what, const char *sql, int nparams,
		      const char *const *params, long long *changed, struct gp_err *err);
/* BEGIN, queued: it goes out with the transaction's first statement. */
gp_status gp_db_queue_begin(struct gp_db *db, struct gp_err *err);
/* Send what is queued now (a round trip; none when the queue is empty). */
gp_status gp_db_flush(struct gp_db *db, struct gp_err *err);

gp_status gp_db_begin(struct gp_db *db, struct gp_err *err);
gp_status gp_db_commit(struct gp_db *db, struct gp_err *err);
/* Never fails in a way the caller can act on; safe outside a transaction. */
void gp_db_rollback(struct gp_db *db);

/* Map a five-character SQLSTATE to a status (pure; used by gp_db_exec). */
gp_status gp_db_status_from_sqlstate(const char *sqlstate);

/*
 * Apply migrations/NNNN_name.sql files from dir in numeric order. Serialized
 * across processes by an advisory lock; each file runs in its own transaction
 * and is recorded in schema_migrations with its SHA-256. A recorded file whose
 * content changed, a gap in numbering or a bad file name stops everything with
 * an error naming the file. *applied (may be NULL) gets the number of files
 * applied by this call; *total the number of files found.
 */
gp_status gp_db_migrate(struct gp_db *db, const char *dir, int *applied, int *total,
			struct gp_err *err);

/*
 * Count applied migrations and files in dir, without applying anything.
 * *pending = files not yet recorded. Errors like gp_db_migrate.
 */
gp_status gp_db_migration_status(struct gp_db *db, const char *dir, int *applied, int *pending,
				 struct gp_err *err);

/*
 * A bytea parameter in PostgreSQL's hex text form ("\\x0a1b..."), so that
 * binary values pass through gp_db_exec's text parameters. Caller frees
 * (free()); NULL when out of memory.
 */
char *gp_db_bytea_param(const void *data, size_t len);

/*
 * A PostgreSQL array literal built element by element, so that one
 * statement carries many rows (a parameter $k::text[] read with unnest):
 * a NULL element stays SQL NULL, others are double-quoted with " and \
 * escaped. Zero-initialize; gp_db_array_text ends the literal (no element
 * after it) and is NULL after out of memory.
 */
struct gp_db_array {
	char *p;
	size_t len, cap;
	int n, oom;
};
void gp_db_array_add(struct gp_db_array *a, const char *elem);
void gp_db_array_add_int(struct gp_db_array *a, long long v);
const char *gp_db_array_text(struct gp_db_array *a);
void gp_db_array_free(struct gp_db_array *a);
/* The texts of n arrays into out[0..n) (statement parameters), or
 * GP_ERR_NOMEM; and freeing n arrays. */
gp_status gp_db_arrays_text(struct gp_db_array *a, int n, const char **out, struct gp_err *err);
void gp_db_arrays_free(struct gp_db_array *a, int n);

/* SHA-256 of a buffer as 64 lower-case hex digits plus NUL. */
void gp_sha256_hex(const void *data, size_t len, char out[65]);

#endif
