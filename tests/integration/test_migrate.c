/*
 * Migrations against a real PostgreSQL: concurrent runners apply each file
 * once; an edited applied file, a gap and a bad name are refused with the
 * file named; a failing file rolls back and is not recorded. Also the
 * connection's prepared statements and its queue of pipelined statements.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "../check.h"
#include "../harness.h"

static void put(const char *dir, const char *name, const char *sql)
{
	char p[1024];
	snprintf(p, sizeof p, "%s/%s", dir, name);
	FILE *f = fopen(p, "w");
	REQUIRE(f);
	fputs(sql, f);
	fclose(f);
}

static int body(struct gp_test_env *env)
{
	struct gp_err e = { 0 };
	struct gp_db *db = gp_test_db(env);

	/* The harness applied the project's migrations through the same runner. */
	CHECK(gp_test_scalar(db, "SELECT count(*) FROM schema_migrations") >= 1);
	CHECK(gp_test_scalar(db, "SELECT count(*) FROM information_schema.tables "
				 "WHERE table_name IN ('outbox','stage_attempts','dead_letters')") == 3);

	REQUIRE_OK(gp_db_run(db, "create db", "CREATE DATABASE mtest", &e), e);
	char url[600];
	snprintf(url, sizeof url, "%s", env->db_url);
	char *slash = strrchr(url, '/');
	REQUIRE(slash);
	strcpy(slash + 1, "mtest");

	char dir[400];
	snprintf(dir, sizeof dir, "%s/mig", env->dir);
	REQUIRE(mkdir(dir, 0755) == 0);
	put(dir, "0001_table.sql", "CREATE TABLE t (x integer);\n");
	put(dir, "0002_row.sql", "INSERT INTO t VALUES (1);\nSELECT pg_sleep(0.3);\n");
	put(dir, "README", "not a migration\n");

	/* Four processes at once. */
	enum { N = 4 };
	pid_t kids[N];
	for (int i = 0; i < N; i++) {
		kids[i] = fork();
		if (kids[i] == 0) {
			struct gp_db *d = NULL;
			struct gp_err ce = { 0 };
			int applied = 0, total = 0;
			if (gp_db_connect(&d, url, 10000, &ce) ||
			    gp_db_migrate(d, dir, &applied, &total, &ce)) {
				fprintf(stderr, "child %d: %s\n", i, ce.msg);
				_exit(1);
			}
			gp_db_destroy(d);
			_exit(total == 2 ? 10 + applied : 1);
		}
	}
	int applied_sum = 0;
	for (int i = 0; i < N; i++) {
		int ws = 0;
		waitpid(kids[i], &ws, 0);
		CHECK(WIFEXITED(ws) && WEXITSTATUS(ws) >= 10);
		applied_sum += WEXITSTATUS(ws) - 10;
	}
	CHECK(applied_sum == 2);
	struct gp_db *m = NULL;
	REQUIRE_OK(gp_db_connect(&m, url, 5000, &e), e);
	CHECK(gp_test_scalar(m, "SELECT count(*) FROM t") == 1);
	CHECK(gp_test_scalar(m, "SELECT count(*) FROM schema_migrations") == 2);

	/* Status without applying. */
	int applied = -1, pending = -1;
	REQUIRE_OK(gp_db_migration_status(m, dir, &applied, &pending, &e), e);
	CHECK(applied == 2 && pending == 0);

	/* An applied file that changed is refused. */
	put(dir, "0002_row.sql", "INSERT INTO t VALUES (2);\n");
	CHECK(gp_db_migrate(m, dir, NULL, NULL, &e) == GP_ERR_CONFLICT);
	CHECK_CONTAINS(e.msg, "0002_row.sql: migration was edited after it was applied");
	put(dir, "0002_row.sql", "INSERT INTO t VALUES (1);\nSELECT pg_sleep(0.3);\n");

	/* A gap in the numbering. */
	put(dir, "0004_gap.sql", "SELECT 1;\n");
	CHECK(gp_db_migrate(m, dir, NULL, NULL, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "0004_gap.sql: expected migration number 0003");
	char p[600];
	snprintf(p, sizeof p, "%s/0004_gap.sql", dir);
	unlink(p);

	/* A bad name. */
	put(dir, "3_short.sql", "SELECT 1;\n");
	CHECK(gp_db_migrate(m, dir, NULL, NULL, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "3_short.sql: migration file names must look like NNNN_name.sql");
	snprintf(p, sizeof p, "%s/3_short.sql", dir);
	unlink(p);

	/* A failing file rolls back as a whole and names its line. */
	put(dir, "0003_bad.sql", "INSERT INTO t VALUES (3);\n\nINSERT INTO nope VALUES (1);\n");
	CHECK(gp_db_migrate(m, dir, NULL, NULL, &e) == GP_ERR_DB);
	CHECK_CONTAINS(e.msg, "0003_bad.sql:3:");
	CHECK_CONTAINS(e.msg, "nope");
	CHECK(gp_test_scalar(m, "SELECT count(*) FROM t") == 1);
	CHECK(gp_test_scalar(m, "SELECT count(*) FROM schema_migrations") == 2);

	/* Fixed, it applies. */
	put(dir, "0003_bad.sql", "INSERT INTO t VALUES (3);\n");
	REQUIRE_OK(gp_db_migrate(m, dir, &applied, NULL, &e), e);
	CHECK(applied == 1);
	CHECK(gp_test_scalar(m, "SELECT count(*) FROM t") == 2);

	/* The audit log refuses changes. */
	REQUIRE_OK(gp_db_run(db, "audit", "INSERT INTO audit_log (actor, action, object) "
			     "VALUES ('t', 'create', 'x')", &e), e);
	CHECK(gp_db_run(db, "audit update", "UPDATE audit_log SET actor = 'u'", &e) != GP_OK);
	CHECK_CONTAINS(e.msg, "append-only");

	/* Prepared statements: many distinct ones stay bounded on the server and
	 * keep answering right after eviction; errors keep their reason, also
	 * inside a transaction. */
	for (int i = 0; i < 300; i++) {
		char sql[64];
		snprintf(sql, sizeof sql, "SELECT %d + 0", i);
		CHECK(gp_test_scalar(m, sql) == i);
	}
	CHECK(gp_test_scalar(m, "SELECT 0 + 0") == 0);
	CHECK(gp_test_scalar(m, "SELECT count(*) FROM pg_prepared_statements") <= 128);
	REQUIRE_OK(gp_db_begin(m, &e), e);
	CHECK(gp_db_exec(m, "probe", "SELECT x FROM no_such_table", 0, NULL, NULL, &e) ==
	      GP_ERR_NOT_FOUND);
	CHECK_CONTAINS(e.msg, "probe: relation \"no_such_table\" does not exist (SQLSTATE 42P01)");
	gp_db_rollback(m);
	CHECK(gp_db_exec(m, "syntax", "SELEKT 1", 0, NULL, NULL, &e) == GP_ERR_DB);
	CHECK_CONTAINS(e.msg, "syntax error");

	/* Queued statements go out with the next call, in order, in one round
	 * trip: parameters are copied, changed rows are counted, a failure
	 * names the queued statement and runs nothing after it, a failed commit
	 * ends the transaction, rollback drops the queue. */
	REQUIRE_OK(gp_db_run(m, "table", "CREATE TABLE q (k text PRIMARY KEY, v integer)", &e), e);
	long long changed = 0;
	char val[16] = "one";
	const char *p1[] = { val, "1" };
	REQUIRE_OK(gp_db_queue_begin(m, &e), e);
	REQUIRE_OK(gp_db_queue(m, "put one", "INSERT INTO q VALUES ($1, $2::integer)", 2, p1,
			       &changed, &e), e);
	snprintf(val, sizeof val, "changed"); /* the queue holds its own copy */
	const char *p2[] = { "none" };
	REQUIRE_OK(gp_db_queue(m, "touch nothing", "UPDATE q SET v = 0 WHERE k = $1", 1, p2,
			       &changed, &e), e);
	PGresult *r = NULL;
	REQUIRE_OK(gp_db_exec(m, "read", "SELECT k FROM q", 0, NULL, &r, &e), e);
	CHECK(PQntuples(r) == 1 && !strcmp(PQgetvalue(r, 0, 0), "one"));
	PQclear(r);
	CHECK(changed == 1); /* the insert, not the update that matched nothing */
	CHECK(PQtransactionStatus(gp_db_conn(m)) == PQTRANS_INTRANS);
	const char *p3[] = { "two", "2" };
	REQUIRE_OK(gp_db_queue(m, "put two", "INSERT INTO q VALUES ($1, $2::integer)", 2, p3,
			       &changed, &e), e);
	REQUIRE_OK(gp_db_commit(m, &e), e);
	CHECK(changed == 2);
	CHECK(gp_test_scalar(m, "SELECT count(*) FROM q") == 2);
	/* a failing queued statement: named, and what followed it did not run */
	REQUIRE_OK(gp_db_queue_begin(m, &e), e);
	REQUIRE_OK(gp_db_queue(m, "put one again", "INSERT INTO q VALUES ($1, $2::integer)", 2,
			       p3, NULL, &e), e);
	const char *p4[] = { "three", "3" };
	REQUIRE_OK(gp_db_queue(m, "put three", "INSERT INTO q VALUES ($1, $2::integer)", 2, p4,
			       &changed, &e), e);
	CHECK(gp_db_exec(m, "read", "SELECT 1", 0, NULL, NULL, &e) == GP_ERR_EXISTS);
	CHECK_CONTAINS(e.msg, "put one again: duplicate key");
	CHECK(changed == 2);
	gp_db_rollback(m);
	CHECK(gp_test_scalar(m, "SELECT count(*) FROM q") == 2);
	/* a commit whose queued write fails: the error, and the transaction is
	 * over (the connection goes on) */
	REQUIRE_OK(gp_db_queue_begin(m, &e), e);
	REQUIRE_OK(gp_db_queue(m, "put three", "INSERT INTO q VALUES ($1, $2::integer)", 2, p4,
			       NULL, &e), e);
	REQUIRE_OK(gp_db_queue(m, "bad number", "UPDATE q SET v = $1::integer", 1, p2, NULL, &e),
		   e);
	CHECK(gp_db_commit(m, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "bad number: invalid input syntax");
	CHECK(PQtransactionStatus(gp_db_conn(m)) == PQTRANS_IDLE);
	CHECK(gp_test_scalar(m, "SELECT count(*) FROM q") == 2);
	/* rollback drops what was never sent */
	REQUIRE_OK(gp_db_queue_begin(m, &e), e);
	REQUIRE_OK(gp_db_queue(m, "put three", "INSERT INTO q VALUES ($1, $2::integer)", 2, p4,
			       NULL, &e), e);
	gp_db_rollback(m);
	CHECK(gp_test_scalar(m, "SELECT count(*) FROM q") == 2);
	/* more than the queue holds goes out in turns */
	REQUIRE_OK(gp_db_queue_begin(m, &e), e);
	changed = 0;
	for (int i = 0; i < 40; i++) {
		char k[16];
		snprintf(k, sizeof k, "k%d", i);
		const char *pk[] = { k, "7" };
		REQUIRE_OK(gp_db_queue(m, "put many", "INSERT INTO q VALUES ($1, $2::integer)", 2,
				       pk, &changed, &e), e);
	}
	REQUIRE_OK(gp_db_commit(m, &e), e);
	CHECK(changed == 40);
	CHECK(gp_test_scalar(m, "SELECT count(*) FROM q WHERE v = 7") == 40);

	gp_db_destroy(m);
	gp_db_destroy(db);
	return CHECK_RESULT();
}

int main(void)
{
	return gp_test_run(body);
}
