/*
 * db.c: libpq wrapper and the migration runner.
 *
 * Migrations: forward-only files named NNNN_name.sql. The runner takes a
 * session-level advisory lock (key GP_MIGRATE_LOCK) so that any number of
 * processes may run it at once: the first applies, the others wait and then
 * find nothing to do. Each file and its schema_migrations row commit together,
 * so a crash leaves either both or neither.
 */
#include "db.h"
#include "file.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define GP_MIGRATE_LOCK "7262696365"  /* arbitrary, stable advisory lock key */
#define GP_MIGRATION_MAX_BYTES (4 << 20)
#define GP_MIGRATION_MAX_FILES 10000

/*
 * Prepared statements, per connection: parsing and planning was over half
 * of PostgreSQL's CPU under load with PQexecParams. A statement's text is
 * prepared on first use under a generated name and reused; the least
 * recently used is deallocated when the table is full; everything is
 * forgotten when the connection is reset (the server forgot it too).
 */
#define GP_DB_STMTS 128

struct stmt {
	char *sql;
	unsigned long hash;
	unsigned long long used;
	int id;
};

/* A statement queued to go out with the connection's next round trip. */
struct queued {
	char *what, *sql;
	int n;
	char **params;
	long long *changed; /* incremented when it changed rows; may be NULL */
};

#define GP_DB_QUEUE 16

struct gp_db {
	PGconn *conn;
	struct stmt stmts[GP_DB_STMTS];
	int nstmts;
	int next_id;
	unsigned long long clock;
	struct queued q[GP_DB_QUEUE];
	int nq;
};

static unsigned long sql_hash(const char *s)
{
	unsigned long h = 5381;
	while (*s)
		h = h * 33 + (unsigned char)*s++;
	return h;
}

static void drop_queue(struct gp_db *db)
{
	for (int i = 0; i < db->nq; i++) {
		struct queued *q = &db->q[i];
		for (int k = 0; k < q->n; k++)
			free(q->params[k]);
		free(q->params);
		free(q->what);
		free(q->sql);
	}
	db->nq = 0;
}

static void forget_statements(struct gp_db *db)
{
	for (int i = 0; i < db->nstmts; i++)
		free(db->stmts[i].sql);
	db->nstmts = 0;
	drop_queue(db); /* a reset connection has no transaction to add to */
}

static void notice_quiet(void *arg, const char *msg)
{
	(void)arg;
	(void)msg;
}

gp_status gp_db_connect(struct gp_db **out, const char *url, long long wait_ms,
			struct gp_err *err)
{
	if (!url || !*url)
		return gp_err_set(err, GP_ERR_INVALID, "no database url (set GENPIPE_DATABASE_URL)");
	long long deadline = gp_now_ms() + wait_ms;
	long long backoff = 100;
	for (;;) {
		PGconn *c = PQconnectdb(url);
		if (c && PQstatus(c) == CONNECTION_OK) {
			struct gp_db *db = calloc(1, sizeof *db);
			if (!db) {
				PQfinish(c);
				return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
			}
			PQsetNoticeProcessor(c, notice_quiet, NULL);
			db->conn = c;
			*out = db;
			return GP_OK;
		}
		char msg[GP_ERR_MSG_MAX];
		snprintf(msg, sizeof msg, "%s", c ? PQerrorMessage(c) : "out of memory");
		size_t l = strlen(msg);
		while (l && (msg[l - 1] == '\n' || msg[l - 1] == ' '))
			msg[--l] = '\0';
		PQfinish(c);
		if (gp_now_ms() + backoff > deadline)
			return gp_err_set(err, GP_ERR_UNAVAILABLE, "could not connect to database: %s",
					  msg);
		gp_sleep_ms(backoff);
		backoff = backoff * 2 > 2000 ? 2000 : backoff * 2;
	}
}

void gp_db_destroy(struct gp_db *db)
{
	if (!db)
		return;
	forget_statements(db);
	PQfinish(db->conn);
	free(db);
}

PGconn *gp_db_conn(struct gp_db *db)
{
	return db->conn;
}

int gp_db_ok(struct gp_db *db)
{
	/* a pipeline left half read (a lost connection) is reset with it */
	if (PQstatus(db->conn) == CONNECTION_OK && PQpipelineStatus(db->conn) == PQ_PIPELINE_OFF)
		return 1;
	forget_statements(db);
	PQreset(db->conn);
	return PQstatus(db->conn) == CONNECTION_OK;
}

gp_status gp_db_status_from_sqlstate(const char *s)
{
	if (!s || strlen(s) != 5)
		return GP_ERR_DB;
	if (!strcmp(s, "23505"))
		return GP_ERR_EXISTS;
	if (!strcmp(s, "40001") || !strcmp(s, "40P01") || !strcmp(s, "55P03"))
		return GP_ERR_CONFLICT;
	if (!strcmp(s, "57014"))
		return GP_ERR_TIMEOUT;
	if (!strncmp(s, "08", 2) || !strcmp(s, "57P01") || !strcmp(s, "57P02") ||
	    !strcmp(s, "57P03"))
		return GP_ERR_UNAVAILABLE;
	if (!strcmp(s, "42P01") || !strcmp(s, "42703"))
		return GP_ERR_NOT_FOUND;
	if (!strncmp(s, "22", 2) || !strncmp(s, "23", 2))
		return GP_ERR_INVALID;
	if (!strcmp(s, "53200"))
		return GP_ERR_NOMEM;
	return GP_ERR_DB;
}

static gp_status result_status(struct gp_db *db, PGresult *r, const char *what, struct gp_err *err)
{
	ExecStatusType es = r ? PQresultStatus(r) : PGRES_FATAL_ERROR;
	if (es == PGRES_COMMAND_OK || es == PGRES_TUPLES_OK)
		return GP_OK;
	const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
	const char *primary = r ? PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY) : NULL;
	gp_status st = state ? gp_db_status_from_sqlstate(state) : GP_ERR_UNAVAILABLE;
	if (!state && PQstatus(db->conn) == CONNECTION_OK)
		st = GP_ERR_DB;
	char msg[GP_ERR_MSG_MAX];
	snprintf(msg, sizeof msg, "%s", primary ? primary : PQerrorMessage(db->conn));
	size_t l = strlen(msg);
	while (l && msg[l - 1] == '\n')
		msg[--l] = '\0';
	return gp_err_set(err, st, "%s: %s%s%s%s", what, msg, state ? " (SQLSTATE " : "",
			  state ? state : "", state ? ")" : "");
}

/* The prepared statement for sql, preparing it when new. NULL: use unnamed. */
static const char *statement(struct gp_db *db, const char *sql, int nparams, char *name,
			     size_t len, PGresult **failed)
{
	*failed = NULL;
	unsigned long h = sql_hash(sql);
	for (int i = 0; i < db->nstmts; i++) {
		if (db->stmts[i].hash == h && !strcmp(db->stmts[i].sql, sql)) {
			db->stmts[i].used = ++db->clock;
			snprintf(name, len, "gp%d", db->stmts[i].id);
			return name;
		}
	}
	/* Inside a failed transaction nothing can be prepared: let the plain
	 * execution report the real error. */
	if (PQtransactionStatus(db->conn) == PQTRANS_INERROR)
		return NULL;
	struct stmt *slot;
	if (db->nstmts < GP_DB_STMTS) {
		slot = &db->stmts[db->nstmts++];
	} else {
		slot = &db->stmts[0];
		for (int i = 1; i < GP_DB_STMTS; i++)
			if (db->stmts[i].used < slot->used)
				slot = &db->stmts[i];
		char old[32], dealloc[48];
		snprintf(old, sizeof old, "gp%d", slot->id);
		snprintf(dealloc, sizeof dealloc, "DEALLOCATE %s", old);
		PQclear(PQexec(db->conn, dealloc));
		free(slot->sql);
		slot->sql = NULL;
	}
	slot->sql = strdup(sql);
	if (!slot->sql) {
		*slot = db->stmts[--db->nstmts];
		return NULL;
	}
	slot->hash = h;
	slot->used = ++db->clock;
	slot->id = ++db->next_id;
	snprintf(name, len, "gp%d", slot->id);
	PGresult *r = PQprepare(db->conn, name, sql, nparams, NULL);
	if (PQresultStatus(r) != PGRES_COMMAND_OK) {
		/* The statement is wrong (a missing table, a syntax error): its
		 * preparation error is the error the caller should see. */
		free(slot->sql);
		*slot = db->stmts[--db->nstmts];
		*failed = r;
		return NULL;
	}
	PQclear(r);
	return name;
}

gp_status gp_db_queue(struct gp_db *db, const char *what, const char *sql, int nparams,
		      const char *const *params, long long *changed, struct gp_err *err)
{
	if (db->nq == GP_DB_QUEUE) {
		gp_status st = gp_db_flush(db, err);
		if (st)
			return st;
	}
	struct queued *q = &db->q[db->nq];
	memset(q, 0, sizeof *q);
	q->what = strdup(what);
	q->sql = strdup(sql);
	q->n = nparams;
	q->changed = changed;
	q->params = nparams ? calloc((size_t)nparams, sizeof *q->params) : NULL;
	int ok = q->what && q->sql && (!nparams || q->params);
	for (int i = 0; ok && i < nparams; i++)
		if (params[i] && !(q->params[i] = strdup(params[i])))
			ok = 0;
	db->nq++;
	if (!ok) {
		drop_queue(db);
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	}
	return GP_OK;
}

gp_status gp_db_queue_begin(struct gp_db *db, struct gp_err *err)
{
	return gp_db_queue(db, "begin transaction", "BEGIN", 0, NULL, NULL, err);
}

static int is_txn_control(const char *sql)
{
	return !strcmp(sql, "BEGIN") || !strcmp(sql, "COMMIT");
}

/*
 * The queued statements and then sql (when not NULL) in one round trip
 * (libpq's pipeline mode, one sync at the end). The first failure is the
 * error, named by its statement's `what`; what followed it was not run.
 * The queue is empty afterwards either way.
 */
static gp_status pipeline(struct gp_db *db, const char *what, const char *sql, int nparams,
			  const char *const *params, PGresult **res, struct gp_err *err)
{
	int n = db->nq + (sql ? 1 : 0);
	char names[GP_DB_QUEUE + 1][32];
	const char *stmt[GP_DB_QUEUE + 1];
	gp_status st = GP_OK;
	/* prepare first: nothing but sends may happen in pipeline mode */
	for (int i = 0; i < n && !st; i++) {
		const char *q = i < db->nq ? db->q[i].sql : sql;
		int np = i < db->nq ? db->q[i].n : nparams;
		PGresult *failed = NULL;
		stmt[i] = is_txn_control(q) ? NULL
					    : statement(db, q, np, names[i], sizeof names[i], &failed);
		if (failed) {
			st = result_status(db, failed, i < db->nq ? db->q[i].what : what, err);
			PQclear(failed);
		}
	}
	if (!st && !PQenterPipelineMode(db->conn))
		st = gp_err_set(err, GP_ERR_UNAVAILABLE, "%s: %s", what ? what : db->q[0].what,
				PQerrorMessage(db->conn));
	int sent = 0;
	for (int i = 0; i < n && !st; i++) {
		const char *q = i < db->nq ? db->q[i].sql : sql;
		int np = i < db->nq ? db->q[i].n : nparams;
		const char *const *pv = i < db->nq ? (const char *const *)db->q[i].params : params;
		int ok = stmt[i] ? PQsendQueryPrepared(db->conn, stmt[i], np, pv, NULL, NULL, 0)
				 : PQsendQueryParams(db->conn, q, np, NULL, pv, NULL, NULL, 0);
		if (!ok)
			st = gp_err_set(err, GP_ERR_UNAVAILABLE, "%s: %s",
					i < db->nq ? db->q[i].what : what, PQerrorMessage(db->conn));
		else
			sent++;
	}
	if (sent && !PQpipelineSync(db->conn) && !st)
		st = gp_err_set(err, GP_ERR_UNAVAILABLE, "pipeline sync: %s",
				PQerrorMessage(db->conn));
	for (int i = 0; i < sent; i++) {
		PGresult *r = PQgetResult(db->conn);
		if (!r) {
			if (!st)
				st = gp_err_set(err, GP_ERR_UNAVAILABLE, "%s: connection lost",
						i < db->nq ? db->q[i].what : what);
			break;
		}
		ExecStatusType es = PQresultStatus(r);
		if (es != PGRES_PIPELINE_ABORTED) {
			gp_status s1 = result_status(db, r, i < db->nq ? db->q[i].what : what,
						     st ? NULL : err);
			if (!st)
				st = s1;
			if (!s1 && i < db->nq && db->q[i].changed && atoll(PQcmdTuples(r)) > 0)
				(*db->q[i].changed)++;
		}
		if (!st && i == db->nq && res)
			*res = r;
		else
			PQclear(r);
		while ((r = PQgetResult(db->conn)) != NULL) /* the end of this statement */
			PQclear(r);
	}
	if (sent) { /* the sync's own result */
		PGresult *r = PQgetResult(db->conn);
		PQclear(r);
	}
	if (PQpipelineStatus(db->conn) != PQ_PIPELINE_OFF && !PQexitPipelineMode(db->conn) && !st)
		st = gp_err_set(err, GP_ERR_UNAVAILABLE, "leave pipeline mode: %s",
				PQerrorMessage(db->conn));
	if (st && res && *res) {
		PQclear(*res);
		*res = NULL;
	}
	drop_queue(db);
	return st;
}

gp_status gp_db_flush(struct gp_db *db, struct gp_err *err)
{
	return db->nq ? pipeline(db, NULL, NULL, 0, NULL, NULL, err) : GP_OK;
}

gp_status gp_db_exec(struct gp_db *db, const char *what, const char *sql, int nparams,
		     const char *const *params, PGresult **res, struct gp_err *err)
{
	if (db->nq) {
		if (res)
			*res = NULL;
		return pipeline(db, what, sql, nparams, params, res, err);
	}
	char name[32];
	PGresult *failed = NULL;
	const char *stmt = statement(db, sql, nparams, name, sizeof name, &failed);
	PGresult *r = failed ? failed
		      : stmt ? PQexecPrepared(db->conn, stmt, nparams, params, NULL, NULL, 0)
			     : PQexecParams(db->conn, sql, nparams, NULL, params, NULL, NULL, 0);
	gp_status st = result_status(db, r, what, err);
	if (st || !res)
		PQclear(r);
	else
		*res = r;
	return st;
}

gp_status gp_db_run(struct gp_db *db, const char *what, const char *sql, struct gp_err *err)
{
	return gp_db_script(db, what, sql, NULL, err);
}

gp_status gp_db_script(struct gp_db *db, const char *what, const char *sql, PGresult **res,
		       struct gp_err *err)
{
	gp_status st0 = gp_db_flush(db, err);
	if (st0)
		return st0;
	PGresult *r = PQexec(db->conn, sql);
	gp_status st = result_status(db, r, what, err);
	if (st || !res)
		PQclear(r);
	else
		*res = r;
	return st;
}

gp_status gp_db_begin(struct gp_db *db, struct gp_err *err)
{
	return gp_db_run(db, "begin transaction", "BEGIN", err);
}

gp_status gp_db_commit(struct gp_db *db, struct gp_err *err)
{
	if (!db->nq)
		return gp_db_run(db, "commit transaction", "COMMIT", err);
	gp_status st = pipeline(db, "commit transaction", "COMMIT", 0, NULL, NULL, err);
	if (st) /* as a failed COMMIT does: the transaction is over */
		gp_db_rollback(db);
	return st;
}

void gp_db_rollback(struct gp_db *db)
{
	drop_queue(db);
	if (PQtransactionStatus(db->conn) == PQTRANS_IDLE)
		return;
	PQclear(PQexec(db->conn, "ROLLBACK"));
}

char *gp_db_bytea_param(const void *data, size_t len)
{
	static const char hx[] = "0123456789abcdef";
	char *s = malloc(2 * len + 3);
	if (!s)
		return NULL;
	s[0] = '\\';
	s[1] = 'x';
	const unsigned char *b = data;
	for (size_t i = 0; i < len; i++) {
		s[2 + 2 * i] = hx[b[i] >> 4];
		s[3 + 2 * i] = hx[b[i] & 15];
	}
	s[2 + 2 * len] = '\0';
	return s;
}

static void array_put(struct gp_db_array *a, const char *s, size_t n)
{
	if (a->oom)
		return;
	if (a->len + n + 3 > a->cap) {
		size_t c = a->cap ? a->cap : 256;
		while (a->len + n + 3 > c)
			c *= 2;
		char *q = realloc(a->p, c);
		if (!q) {
			a->oom = 1;
			return;
		}
		a->p = q;
		a->cap = c;
	}
	memcpy(a->p + a->len, s, n);
	a->len += n;
}

void gp_db_array_add(struct gp_db_array *a, const char *elem)
{
	array_put(a, a->n++ ? "," : "{", 1);
	if (!elem) {
		array_put(a, "NULL", 4);
		return;
	}
	array_put(a, "\"", 1);
	for (const char *c = elem; *c; c++) {
		if (*c == '"' || *c == '\\')
			array_put(a, "\\", 1);
		array_put(a, c, 1);
	}
	array_put(a, "\"", 1);
}

void gp_db_array_add_int(struct gp_db_array *a, long long v)
{
	char b[24];
	int n = snprintf(b, sizeof b, "%lld", v);
	array_put(a, a->n++ ? "," : "{", 1);
	array_put(a, b, (size_t)n);
}

const char *gp_db_array_text(struct gp_db_array *a)
{
	if (!a->n)
		array_put(a, "{", 1);
	array_put(a, "}", 1);
	if (a->oom)
		return NULL;
	a->p[a->len] = '\0';
	return a->p;
}

void gp_db_array_free(struct gp_db_array *a)
{
	free(a->p);
	memset(a, 0, sizeof *a);
}

gp_status gp_db_arrays_text(struct gp_db_array *a, int n, const char **out, struct gp_err *err)
{
	gp_status st = GP_OK;
	for (int k = 0; k < n; k++)
		if (!(out[k] = gp_db_array_text(&a[k])))
			st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	return st;
}

void gp_db_arrays_free(struct gp_db_array *a, int n)
{
	for (int k = 0; k < n; k++)
		gp_db_array_free(&a[k]);
}

void gp_sha256_hex(const void *data, size_t len, char out[65])
{
	unsigned char md[32];
	unsigned int mdlen = 0;
	EVP_Digest(data, len, md, &mdlen, EVP_sha256(), NULL);
	for (int i = 0; i < 32; i++)
		sprintf(out + 2 * i, "%02x", md[i]);
	out[64] = '\0';
}

struct mfile {
	int version;
	char name[256];
};

static int mfile_cmp(const void *a, const void *b)
{
	return ((const struct mfile *)a)->version - ((const struct mfile *)b)->version;
}

/* List NNNN_name.sql files; other files are ignored, malformed .sql names are errors. */
static gp_status list_migrations(const char *dir, struct mfile **out, int *n, struct gp_err *err)
{
	DIR *d = opendir(dir);
	if (!d)
		return gp_err_set(err, GP_ERR_IO, "could not open migrations directory \"%s\": %s", dir,
				  strerror(errno));
	struct mfile *v = NULL;
	int cnt = 0, cap = 0;
	gp_status st = GP_OK;
	struct dirent *e;
	while ((e = readdir(d)) != NULL) {
		size_t l = strlen(e->d_name);
		if (l < 4 || strcmp(e->d_name + l - 4, ".sql") != 0)
			continue;
		if (l < 10 || !isdigit((unsigned char)e->d_name[0]) ||
		    !isdigit((unsigned char)e->d_name[1]) || !isdigit((unsigned char)e->d_name[2]) ||
		    !isdigit((unsigned char)e->d_name[3]) || e->d_name[4] != '_' ||
		    l >= sizeof v[0].name) {
			st = gp_err_set(err, GP_ERR_INVALID,
					"%s/%s: migration file names must look like NNNN_name.sql",
					dir, e->d_name);
			goto out;
		}
		if (cnt == cap) {
			cap = cap ? cap * 2 : 16;
			if (cap > GP_MIGRATION_MAX_FILES) {
				st = gp_err_set(err, GP_ERR_TOO_BIG, "%s: too many migration files", dir);
				goto out;
			}
			struct mfile *nv = realloc(v, sizeof *v * (size_t)cap);
			if (!nv) {
				st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
				goto out;
			}
			v = nv;
		}
		v[cnt].version = atoi(e->d_name);
		snprintf(v[cnt].name, sizeof v[cnt].name, "%s", e->d_name);
		cnt++;
	}
	qsort(v, (size_t)cnt, sizeof *v, mfile_cmp);
	for (int i = 0; i < cnt; i++) {
		if (v[i].version != i + 1) {
			st = gp_err_set(err, GP_ERR_INVALID,
					"%s/%s: expected migration number %04d (numbers start at 0001 "
					"and have no gaps or duplicates)",
					dir, v[i].name, i + 1);
			goto out;
		}
	}
out:
	closedir(d);
	if (st) {
		free(v);
		return st;
	}
	*out = v;
	*n = cnt;
	return GP_OK;
}

static const char create_table_sql[] =
	"CREATE TABLE IF NOT EXISTS schema_migrations ("
	" version integer PRIMARY KEY,"
	" name text NOT NULL,"
	" checksum text NOT NULL,"
	" applied_at timestamptz NOT NULL DEFAULT now())";

static gp_status run_migrations(struct gp_db *db, const char *dir, int apply, int *applied,
				int *total, int *pending, struct gp_err *err)
{
	struct mfile *files = NULL;
	int n = 0, applied_now = 0, unapplied = 0;
	char *sql = NULL;
	gp_status st = list_migrations(dir, &files, &n, err);
	if (st)
		return st;
	if (apply) {
		/* The lock is taken before the table exists so that concurrent first
		 * runs do not race on CREATE TABLE either. */
		if ((st = gp_db_run(db, "take migration lock",
				    "SELECT pg_advisory_lock(" GP_MIGRATE_LOCK ")", err)))
			goto out;
		if ((st = gp_db_run(db, "create schema_migrations", create_table_sql, err)))
			goto unlock;
	}
	for (int i = 0; i < n; i++) {
		char path[4096], ver[16], sum[65];
		size_t len = 0;
		snprintf(path, sizeof path, "%s/%s", dir, files[i].name);
		snprintf(ver, sizeof ver, "%d", files[i].version);
		if ((st = gp_file_read(path, GP_MIGRATION_MAX_BYTES, (uint8_t **)&sql, &len, err)))
			goto unlock;
		gp_sha256_hex(sql, len, sum);
		PGresult *r = NULL;
		const char *p1[] = { ver };
		st = gp_db_exec(db, "read schema_migrations",
				"SELECT checksum FROM schema_migrations WHERE version = $1::integer", 1,
				p1, &r, err);
		if (st == GP_ERR_NOT_FOUND && !apply) {
			/* No table yet: nothing applied. */
			unapplied = n;
			st = GP_OK;
			free(sql);
			sql = NULL;
			break;
		}
		if (st)
			goto unlock;
		if (PQntuples(r) == 1) {
			const char *have = PQgetvalue(r, 0, 0);
			if (strcmp(have, sum) != 0) {
				st = gp_err_set(err, GP_ERR_CONFLICT,
						"%s: migration was edited after it was applied "
						"(checksum %.12s, recorded %.12s); add a new migration "
						"instead",
						path, sum, have);
				PQclear(r);
				goto unlock;
			}
			PQclear(r);
			free(sql);
			sql = NULL;
			continue;
		}
		PQclear(r);
		unapplied++;
		if (!apply) {
			free(sql);
			sql = NULL;
			continue;
		}
		if ((st = gp_db_begin(db, err)))
			goto unlock;
		r = PQexec(db->conn, sql);
		if (PQresultStatus(r) != PGRES_COMMAND_OK && PQresultStatus(r) != PGRES_TUPLES_OK) {
			const char *pos = PQresultErrorField(r, PG_DIAG_STATEMENT_POSITION);
			int line = 1;
			if (pos) {
				long off = atol(pos);
				for (long k = 0; k < off - 1 && sql[k]; k++)
					line += sql[k] == '\n';
			}
			const char *m = PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY);
			st = gp_err_set(err, GP_ERR_DB, "%s:%d: %s", path, line,
					m ? m : PQerrorMessage(db->conn));
			PQclear(r);
			gp_db_rollback(db);
			goto unlock;
		}
		PQclear(r);
		const char *p3[] = { ver, files[i].name, sum };
		if ((st = gp_db_exec(db, "record migration",
				     "INSERT INTO schema_migrations (version, name, checksum) "
				     "VALUES ($1::integer, $2, $3)",
				     3, p3, NULL, err))) {
			gp_db_rollback(db);
			goto unlock;
		}
		if ((st = gp_db_commit(db, err))) {
			gp_db_rollback(db);
			goto unlock;
		}
		applied_now++;
		free(sql);
		sql = NULL;
	}
unlock:
	if (apply)
		PQclear(PQexec(db->conn, "SELECT pg_advisory_unlock(" GP_MIGRATE_LOCK ")"));
out:
	free(sql);
	free(files);
	if (!st) {
		if (applied)
			*applied = apply ? applied_now : n - unapplied;
		if (total)
			*total = n;
		if (pending)
			*pending = apply ? 0 : unapplied;
	}
	return st;
}

gp_status gp_db_migrate(struct gp_db *db, const char *dir, int *applied, int *total,
			struct gp_err *err)
{
	return run_migrations(db, dir, 1, applied, total, NULL, err);
}

gp_status gp_db_migration_status(struct gp_db *db, const char *dir, int *applied, int *pending,
				 struct gp_err *err)
{
	int total = 0;
	return run_migrations(db, dir, 0, applied, &total, pending, err);
}
