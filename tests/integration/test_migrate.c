/*
 * Migrations against a real PostgreSQL: concurrent runners apply each file
 * once; an edited applied file, a gap and a bad name are refused with the
 * file named; a failing file rolls back and is not recorded.
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

	gp_db_destroy(m);
	gp_db_destroy(db);
	return CHECK_RESULT();
}

int main(void)
{
	return gp_test_run(body);
}
