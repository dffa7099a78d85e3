/*
 * pipelines.c: genpipe submit, genpipe pipelines list|show|diff.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cli.h"
#include "run.h"
#include "spec.h"

int cmd_submit(int n, char **args)
{
	if (n != 1) {
		fprintf(stderr, "usage: genpipe submit FILE [--param NAME=VALUE]... [--no-run] "
				"[--json]\n");
		return 2;
	}
	char *text = NULL;
	cJSON *doc = NULL, *params = NULL;
	int rc = cli_load_spec(args[0], &text, &doc);
	if (rc)
		return rc;
	struct gp_err err = { 0 };
	/* Check the params before anything is stored. */
	params = gp_spec_resolve_params(doc, cli_params.v, cli_params.n, &err);
	if (!params) {
		fprintf(stderr, "genpipe: %s\n", err.msg);
		rc = 2;
		goto out;
	}
	struct gp_db *db = cli_db();
	if (!db) {
		rc = 1;
		goto out;
	}
	struct gp_version_ref v;
	const char *user = getenv("USER");
	long long run_id = 0;
	if (gp_pipeline_submit(db, text, doc, user ? user : "", &v, &err) ||
	    (!cli_no_run && gp_run_create(db, v.id, params, "manual", &run_id, &err))) {
		fprintf(stderr, "genpipe: submit %s: %s\n", args[0], err.msg);
		gp_db_destroy(db);
		rc = 1;
		goto out;
	}
	gp_db_destroy(db);
	const char *name = cJSON_GetStringValue(
		cJSON_GetObjectItem(cJSON_GetObjectItem(doc, "metadata"), "name"));
	if (cli_json) {
		cJSON *o = cJSON_CreateObject();
		cJSON_AddStringToObject(o, "pipeline", name);
		cJSON_AddNumberToObject(o, "version", v.version);
		cJSON_AddBoolToObject(o, "created", v.created);
		cJSON_AddStringToObject(o, "content_hash", v.hash);
		if (run_id)
			cJSON_AddNumberToObject(o, "run", (double)run_id);
		else
			cJSON_AddNullToObject(o, "run");
		cli_print_json(o);
	} else {
		printf("pipeline %s version %d (%s, %.12s)\n", name, v.version,
		       v.created ? "new" : "unchanged", v.hash);
		if (run_id)
			printf("run %lld queued; follow it with: genpipe runs watch %lld\n", run_id,
			       run_id);
	}
out:
	free(text);
	cJSON_Delete(doc);
	cJSON_Delete(params);
	return rc;
}

static int list_pipelines(struct gp_db *db)
{
	PGresult *r = NULL;
	struct gp_err err = { 0 };
	if (gp_db_exec(db, "list pipelines",
		       "SELECT p.name, max(v.version), count(v.id), "
		       "to_char(max(v.created_at), 'YYYY-MM-DD HH24:MI:SS'), "
		       "(SELECT count(*) FROM runs r WHERE r.pipeline_name = p.name) "
		       "FROM pipelines p JOIN pipeline_versions v ON v.pipeline_id = p.id "
		       "GROUP BY p.name ORDER BY p.name",
		       0, NULL, &r, &err)) {
		fprintf(stderr, "genpipe: %s\n", err.msg);
		return 1;
	}
	if (cli_json) {
		cJSON *a = cJSON_CreateArray();
		for (int i = 0; i < PQntuples(r); i++) {
			cJSON *o = cJSON_CreateObject();
			cJSON_AddStringToObject(o, "name", PQgetvalue(r, i, 0));
			cJSON_AddNumberToObject(o, "latest_version", atoi(PQgetvalue(r, i, 1)));
			cJSON_AddNumberToObject(o, "versions", atoi(PQgetvalue(r, i, 2)));
			cJSON_AddStringToObject(o, "updated", PQgetvalue(r, i, 3));
			cJSON_AddNumberToObject(o, "runs", atoi(PQgetvalue(r, i, 4)));
			cJSON_AddItemToArray(a, o);
		}
		cli_print_json(a);
	} else {
		printf("%-24s %7s %8s %6s  %s\n", "NAME", "LATEST", "VERSIONS", "RUNS", "UPDATED");
		for (int i = 0; i < PQntuples(r); i++)
			printf("%-24s %7s %8s %6s  %s\n", PQgetvalue(r, i, 0), PQgetvalue(r, i, 1),
			       PQgetvalue(r, i, 2), PQgetvalue(r, i, 4), PQgetvalue(r, i, 3));
	}
	PQclear(r);
	return 0;
}

static int show_pipeline(struct gp_db *db, const char *ref)
{
	struct gp_version_ref v;
	cJSON *spec = NULL;
	struct gp_err err = { 0 };
	if (gp_pipeline_find(db, ref, &v, &spec, &err)) {
		fprintf(stderr, "genpipe: %s\n", err.msg);
		return 1;
	}
	char id[24];
	snprintf(id, sizeof id, "%lld", v.id);
	const char *p[] = { id };
	PGresult *r = NULL;
	if (gp_db_exec(db, "show version",
		       "SELECT spec_text, author, to_char(created_at, 'YYYY-MM-DD HH24:MI:SS') "
		       "FROM pipeline_versions WHERE id = $1::bigint",
		       1, p, &r, &err)) {
		fprintf(stderr, "genpipe: %s\n", err.msg);
		cJSON_Delete(spec);
		return 1;
	}
	if (cli_json) {
		cJSON *o = cJSON_CreateObject();
		cJSON_AddNumberToObject(o, "version", v.version);
		cJSON_AddStringToObject(o, "content_hash", v.hash);
		cJSON_AddStringToObject(o, "author", PQgetvalue(r, 0, 1));
		cJSON_AddStringToObject(o, "created", PQgetvalue(r, 0, 2));
		cJSON_AddItemToObject(o, "spec", spec);
		spec = NULL;
		cJSON_AddStringToObject(o, "spec_text", PQgetvalue(r, 0, 0));
		cli_print_json(o);
	} else {
		printf("# version %d, content %.12s, by %s at %s\n", v.version, v.hash,
		       *PQgetvalue(r, 0, 1) ? PQgetvalue(r, 0, 1) : "unknown", PQgetvalue(r, 0, 2));
		fputs(PQgetvalue(r, 0, 0), stdout);
	}
	PQclear(r);
	cJSON_Delete(spec);
	return 0;
}

static int write_temp(const char *text, char *path, size_t len)
{
	snprintf(path, len, "/tmp/genpipe-diff-XXXXXX");
	int fd = mkstemp(path);
	if (fd < 0)
		return -1;
	size_t n = strlen(text);
	int ok = write(fd, text, n) == (ssize_t)n && write(fd, "\n", 1) == 1;
	close(fd);
	return ok ? 0 : -1;
}

/* Diff of the normalized specs (what the versions mean, not their layout). */
static int diff_pipelines(struct gp_db *db, const char *a, const char *b)
{
	struct gp_version_ref va, vb;
	cJSON *sa = NULL, *sb = NULL;
	struct gp_err err = { 0 };
	if (gp_pipeline_find(db, a, &va, &sa, &err) || gp_pipeline_find(db, b, &vb, &sb, &err)) {
		fprintf(stderr, "genpipe: %s\n", err.msg);
		cJSON_Delete(sa);
		return 2;
	}
	char *ta = cJSON_Print(sa), *tb = cJSON_Print(sb);
	char pa[64], pb[64];
	int rc = 2;
	if (cli_json) {
		/* both normal forms and whether they differ; scripts diff them */
		int same = ta && tb && !strcmp(ta, tb);
		cJSON *o = cJSON_CreateObject();
		cJSON_AddStringToObject(o, "a", a);
		cJSON_AddStringToObject(o, "b", b);
		cJSON_AddBoolToObject(o, "same", same);
		cJSON_AddItemToObject(o, "spec_a", sa);
		cJSON_AddItemToObject(o, "spec_b", sb);
		sa = sb = NULL;
		cli_print_json(o);
		free(ta);
		free(tb);
		return same ? 0 : 1;
	}
	if (ta && tb && write_temp(ta, pa, sizeof pa) == 0) {
		if (write_temp(tb, pb, sizeof pb) == 0) {
			char cmd[512];
			snprintf(cmd, sizeof cmd, "diff -u --label '%s' --label '%s' %s %s", a, b, pa,
				 pb);
			fflush(stdout);
			int ws = system(cmd);
			rc = WIFEXITED(ws) ? WEXITSTATUS(ws) : 2;
			if (rc == 0)
				printf("%s and %s have the same content\n", a, b);
			unlink(pb);
		}
		unlink(pa);
	}
	free(ta);
	free(tb);
	cJSON_Delete(sa);
	cJSON_Delete(sb);
	return rc;
}

int cmd_pipelines(int n, char **args)
{
	if (n < 1) {
		fprintf(stderr, "usage: genpipe pipelines list | show NAME[@VERSION] | diff NAME@A "
				"NAME@B\n");
		return 2;
	}
	/* Refuse what cannot be quoted safely into the diff command line. */
	for (int i = 1; i < n; i++)
		for (const char *c = args[i]; *c; c++)
			if (!(*c == '@' || *c == '-' || (*c >= 'a' && *c <= 'z') ||
			      (*c >= '0' && *c <= '9'))) {
				fprintf(stderr, "genpipe: \"%s\" is not NAME or NAME@VERSION\n",
					args[i]);
				return 2;
			}
	int rc;
	struct gp_db *db;
	if (!strcmp(args[0], "list") && n == 1) {
		if (!(db = cli_db()))
			return 1;
		rc = list_pipelines(db);
	} else if (!strcmp(args[0], "show") && n == 2) {
		if (!(db = cli_db()))
			return 1;
		rc = show_pipeline(db, args[1]);
	} else if (!strcmp(args[0], "diff") && n == 3) {
		if (!(db = cli_db()))
			return 1;
		rc = diff_pipelines(db, args[1], args[2]);
	} else {
		fprintf(stderr, "usage: genpipe pipelines list | show NAME[@VERSION] | diff NAME@A "
				"NAME@B\n");
		return 2;
	}
	gp_db_destroy(db);
	return rc;
}
