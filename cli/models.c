/*
 * models.c: genpipe models list | show NAME[:VERSION|@ALIAS] |
 * alias NAME ALIAS VERSION | export NAME:VERSION --format safetensors DIR.
 *
 * The registry is PostgreSQL (model_versions, model_aliases); alias moves
 * are written with their audit_log row in one transaction. export reads the
 * version's checkpoint artifact from the store (--artifacts, else the data
 * directory's) and writes DIR/model.safetensors, DIR/config.json (Hugging
 * Face GPT-2 layout), DIR/tokenizer.gptk (docs/formats.md) and
 * DIR/genpipe.json (the version's metrics and lineage).
 */
#include <errno.h>
#include <pwd.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "artifact.h"
#include "bpe.h"
#include "cli.h"
#include "file.h"
#include "model.h"
#include "registry.h"

/* NAME, NAME:VERSION or NAME@ALIAS */
struct model_ref {
	char name[128], alias[128];
	int version;
};

static int parse_ref(const char *s, struct model_ref *r)
{
	memset(r, 0, sizeof(*r));
	const char *c = strchr(s, ':'), *a = strchr(s, '@');
	size_t n = c ? (size_t)(c - s) : a ? (size_t)(a - s) : strlen(s);
	if (n == 0 || n >= sizeof(r->name) || (c && a)) {
		fprintf(stderr, "genpipe: \"%s\" is not NAME, NAME:VERSION or NAME@ALIAS\n", s);
		return -1;
	}
	memcpy(r->name, s, n);
	if (c) {
		char *end;
		long v = strtol(c + 1, &end, 10);
		if (*end || v <= 0 || v > 1000000000) {
			fprintf(stderr, "genpipe: \"%s\": version must be a positive integer\n", s);
			return -1;
		}
		r->version = (int)v;
	}
	if (a) {
		if (!a[1] || strlen(a + 1) >= sizeof(r->alias)) {
			fprintf(stderr, "genpipe: \"%s\": empty or long alias\n", s);
			return -1;
		}
		snprintf(r->alias, sizeof(r->alias), "%s", a + 1);
	}
	return 0;
}

static int list_models(struct gp_db *db)
{
	PGresult *r = NULL;
	struct gp_err err = {0};
	if (gp_db_exec(db, "list models",
		       "SELECT m.name, count(v.id), coalesce(max(v.version), 0), "
		       "coalesce((SELECT string_agg(a.alias || '=' || av.version, ',' ORDER BY a.alias) "
		       "FROM model_aliases a JOIN model_versions av ON av.id = a.model_version_id "
		       "WHERE a.model_id = m.id), ''), "
		       "coalesce((SELECT lv.metrics->>'val_loss' FROM model_versions lv WHERE "
		       "lv.model_id = m.id ORDER BY lv.version DESC LIMIT 1), ''), "
		       "to_char(coalesce(max(v.created_at), m.created_at), 'YYYY-MM-DD HH24:MI:SS') "
		       "FROM models m LEFT JOIN model_versions v ON v.model_id = m.id "
		       "GROUP BY m.id ORDER BY m.name",
		       0, NULL, &r, &err)) {
		fprintf(stderr, "genpipe: %s\n", err.msg);
		return 1;
	}
	if (cli_json) {
		cJSON *a = cJSON_CreateArray();
		for (int i = 0; i < PQntuples(r); i++) {
			cJSON *o = cJSON_CreateObject();
			cJSON_AddStringToObject(o, "name", PQgetvalue(r, i, 0));
			cJSON_AddNumberToObject(o, "versions", atoi(PQgetvalue(r, i, 1)));
			cJSON_AddNumberToObject(o, "latest", atoi(PQgetvalue(r, i, 2)));
			cJSON *al = cJSON_AddObjectToObject(o, "aliases");
			char buf[1024];
			snprintf(buf, sizeof(buf), "%s", PQgetvalue(r, i, 3));
			for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok;
			     tok = strtok_r(NULL, ",", &save)) {
				char *eq = strchr(tok, '=');
				if (eq) {
					*eq = 0;
					cJSON_AddNumberToObject(al, tok, atoi(eq + 1));
				}
			}
			if (*PQgetvalue(r, i, 4))
				cJSON_AddNumberToObject(o, "latest_val_loss", atof(PQgetvalue(r, i, 4)));
			cJSON_AddStringToObject(o, "updated", PQgetvalue(r, i, 5));
			cJSON_AddItemToArray(a, o);
		}
		PQclear(r);
		cli_print_json(a);
		return 0;
	}
	printf("%-24s %8s %7s %-24s %9s  %s\n", "MODEL", "VERSIONS", "LATEST", "ALIASES",
	       "VAL LOSS", "UPDATED");
	for (int i = 0; i < PQntuples(r); i++) {
		const char *vl = PQgetvalue(r, i, 4);
		printf("%-24s %8s %7s %-24s %9.4s  %s\n", PQgetvalue(r, i, 0), PQgetvalue(r, i, 1),
		       PQgetvalue(r, i, 2), *PQgetvalue(r, i, 3) ? PQgetvalue(r, i, 3) : "-",
		       *vl ? vl : "-", PQgetvalue(r, i, 5));
	}
	PQclear(r);
	return 0;
}

/* Resolve a reference to one version row (columns below); NULL printed. */
static PGresult *find_version(struct gp_db *db, const struct model_ref *ref)
{
	char ver[16];
	snprintf(ver, sizeof(ver), "%d", ref->version);
	const char *p[] = {ref->name, ref->version ? ver : NULL, ref->alias[0] ? ref->alias : NULL};
	PGresult *r = NULL;
	struct gp_err err = {0};
	if (gp_db_exec(db, "find model version",
		       "SELECT v.version, coalesce(v.run_id::text, ''), coalesce(v.stage, ''), "
		       "to_char(v.created_at, 'YYYY-MM-DD HH24:MI:SS'), v.resource_class, v.seconds, "
		       "v.metrics::text, v.lineage::text, coalesce(c.content_hash, ''), "
		       "coalesce(e.content_hash, ''), coalesce((SELECT string_agg(a.alias, ',' ORDER BY "
		       "a.alias) FROM model_aliases a WHERE a.model_version_id = v.id), ''), v.id "
		       "FROM models m JOIN model_versions v ON v.model_id = m.id "
		       "LEFT JOIN artifacts c ON c.id = v.artifact_id "
		       "LEFT JOIN artifacts e ON e.id = v.export_artifact_id "
		       "WHERE m.name = $1 AND ($2::int IS NULL OR v.version = $2::int) AND "
		       "($3::text IS NULL OR v.id = (SELECT model_version_id FROM model_aliases a "
		       "WHERE a.model_id = m.id AND a.alias = $3)) "
		       "ORDER BY v.version DESC LIMIT 1",
		       3, p, &r, &err)) {
		fprintf(stderr, "genpipe: %s\n", err.msg);
		return NULL;
	}
	if (PQntuples(r) == 0) {
		if (ref->alias[0])
			fprintf(stderr, "genpipe: model \"%s\" has no alias \"%s\"\n", ref->name,
				ref->alias);
		else if (ref->version)
			fprintf(stderr, "genpipe: model \"%s\" has no version %d\n", ref->name,
				ref->version);
		else
			fprintf(stderr, "genpipe: no model \"%s\" (genpipe models list)\n", ref->name);
		PQclear(r);
		return NULL;
	}
	return r;
}

/* The deploy decisions about a version, newest first (NULL on error). */
static PGresult *decisions(struct gp_db *db, const char *version_id)
{
	PGresult *r = NULL;
	struct gp_err err = {0};
	const char *p[] = {version_id};
	if (gp_db_exec(db, "read deploy decisions",
		       "SELECT run_id, stage, alias, promoted, reason, "
		       "to_char(created_at, 'YYYY-MM-DD HH24:MI:SS'), figures::text "
		       "FROM deploy_decisions WHERE model_version_id = $1::bigint "
		       "ORDER BY id DESC LIMIT 10", 1, p, &r, &err)) {
		fprintf(stderr, "genpipe: %s\n", err.msg);
		return NULL;
	}
	return r;
}

static int show_model(struct gp_db *db, const char *arg)
{
	struct model_ref ref;
	if (parse_ref(arg, &ref))
		return 2;
	PGresult *r = find_version(db, &ref);
	if (!r)
		return 1;
	cJSON *metrics = cJSON_Parse(PQgetvalue(r, 0, 6)), *lineage = cJSON_Parse(PQgetvalue(r, 0, 7));
	if (cli_json) {
		cJSON *o = cJSON_CreateObject();
		cJSON_AddStringToObject(o, "model", ref.name);
		cJSON_AddNumberToObject(o, "version", atoi(PQgetvalue(r, 0, 0)));
		if (*PQgetvalue(r, 0, 1))
			cJSON_AddNumberToObject(o, "run", atof(PQgetvalue(r, 0, 1)));
		cJSON_AddStringToObject(o, "stage", PQgetvalue(r, 0, 2));
		cJSON_AddStringToObject(o, "created", PQgetvalue(r, 0, 3));
		cJSON_AddStringToObject(o, "resource_class", PQgetvalue(r, 0, 4));
		cJSON_AddNumberToObject(o, "seconds", atof(PQgetvalue(r, 0, 5)));
		cJSON *al = cJSON_AddArrayToObject(o, "aliases");
		char buf[1024];
		snprintf(buf, sizeof(buf), "%s", PQgetvalue(r, 0, 10));
		for (char *save = NULL, *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save))
			cJSON_AddItemToArray(al, cJSON_CreateString(t));
		char refb[80];
		if (*PQgetvalue(r, 0, 8)) {
			snprintf(refb, sizeof(refb), "sha256:%s", PQgetvalue(r, 0, 8));
			cJSON_AddStringToObject(o, "checkpoint", refb);
		}
		if (*PQgetvalue(r, 0, 9)) {
			snprintf(refb, sizeof(refb), "sha256:%s", PQgetvalue(r, 0, 9));
			cJSON_AddStringToObject(o, "safetensors", refb);
		}
		cJSON_AddItemToObject(o, "metrics", metrics ? metrics : cJSON_CreateObject());
		cJSON_AddItemToObject(o, "lineage", lineage ? lineage : cJSON_CreateObject());
		PGresult *d = decisions(db, PQgetvalue(r, 0, 11));
		cJSON *da = cJSON_AddArrayToObject(o, "deploy_decisions");
		for (int i = 0; d && i < PQntuples(d); i++) {
			cJSON *x = cJSON_CreateObject();
			cJSON_AddNumberToObject(x, "run", atof(PQgetvalue(d, i, 0)));
			cJSON_AddStringToObject(x, "stage", PQgetvalue(d, i, 1));
			cJSON_AddStringToObject(x, "alias", PQgetvalue(d, i, 2));
			cJSON_AddBoolToObject(x, "promoted", *PQgetvalue(d, i, 3) == 't');
			cJSON_AddStringToObject(x, "reason", PQgetvalue(d, i, 4));
			cJSON_AddStringToObject(x, "at", PQgetvalue(d, i, 5));
			cJSON *f = cJSON_Parse(PQgetvalue(d, i, 6));
			cJSON_AddItemToObject(x, "figures", f ? f : cJSON_CreateObject());
			cJSON_AddItemToArray(da, x);
		}
		PQclear(d);
		PQclear(r);
		cli_print_json(o);
		return 0;
	}
	printf("model      %s:%s%s%s\n", ref.name, PQgetvalue(r, 0, 0),
	       *PQgetvalue(r, 0, 10) ? "  aliases: " : "", PQgetvalue(r, 0, 10));
	printf("created    %s by run %s stage %s (%s, %.1f s)\n", PQgetvalue(r, 0, 3),
	       *PQgetvalue(r, 0, 1) ? PQgetvalue(r, 0, 1) : "-", PQgetvalue(r, 0, 2),
	       PQgetvalue(r, 0, 4), atof(PQgetvalue(r, 0, 5)));
	const cJSON *cfg = cJSON_GetObjectItem(lineage, "config");
	if (cfg)
		printf("shape      %d layers, %d heads, width %d, context %d, vocab %d; %.2fM parameters\n",
		       cJSON_GetObjectItem(cfg, "layers") ? cJSON_GetObjectItem(cfg, "layers")->valueint : 0,
		       cJSON_GetObjectItem(cfg, "heads") ? cJSON_GetObjectItem(cfg, "heads")->valueint : 0,
		       cJSON_GetObjectItem(cfg, "width") ? cJSON_GetObjectItem(cfg, "width")->valueint : 0,
		       cJSON_GetObjectItem(cfg, "context") ? cJSON_GetObjectItem(cfg, "context")->valueint : 0,
		       cJSON_GetObjectItem(cfg, "vocab") ? cJSON_GetObjectItem(cfg, "vocab")->valueint : 0,
		       cJSON_GetObjectItem(metrics, "parameters")
			       ? cJSON_GetObjectItem(metrics, "parameters")->valuedouble / 1e6 : 0);
	const cJSON *vl = cJSON_GetObjectItem(metrics, "val_loss"),
		    *h1 = cJSON_GetObjectItem(metrics, "unigram_entropy"),
		    *pp = cJSON_GetObjectItem(metrics, "val_perplexity"),
		    *tk = cJSON_GetObjectItem(metrics, "tokens_seen");
	if (vl)
		printf("val loss   %.4f nats/token (perplexity %.1f); unigram entropy of the corpus %.4f\n",
		       vl->valuedouble, pp ? pp->valuedouble : 0, h1 ? h1->valuedouble : 0);
	if (tk)
		printf("trained on %.0f tokens\n", tk->valuedouble);
	if (*PQgetvalue(r, 0, 8))
		printf("checkpoint sha256:%s\n", PQgetvalue(r, 0, 8));
	if (*PQgetvalue(r, 0, 9))
		printf("export     sha256:%s (safetensors)\n", PQgetvalue(r, 0, 9));
	const cJSON *l;
	const char *keys[] = {"train_shards", "val_shards", "tokenizer", "code_version"};
	for (int i = 0; i < 4; i++)
		if ((l = cJSON_GetObjectItem(lineage, keys[i])) && cJSON_IsString(l))
			printf("%-10.10s %s\n", keys[i], l->valuestring);
	const cJSON *samples = cJSON_GetObjectItem(metrics, "samples"), *s;
	if (cJSON_GetArraySize(samples) > 0) {
		printf("samples:\n");
		cJSON_ArrayForEach(s, samples) {
			if (!cJSON_IsString(s))
				continue;
			printf("  ---\n");
			for (const char *line = s->valuestring; *line;) {
				const char *nl = strchr(line, '\n');
				int len = nl ? (int)(nl - line) : (int)strlen(line);
				printf("  | %.*s\n", len, line);
				line += len + (nl ? 1 : 0);
			}
		}
	}
	PGresult *d = decisions(db, PQgetvalue(r, 0, 11));
	for (int i = 0; d && i < PQntuples(d); i++)
		printf("%s run %s stage %s: %s %s (%s)\n", i ? "          " : "deploys   ",
		       PQgetvalue(d, i, 0), PQgetvalue(d, i, 1),
		       *PQgetvalue(d, i, 3) == 't' ? "promoted to" : "kept out of", PQgetvalue(d, i, 2),
		       PQgetvalue(d, i, 4));
	PQclear(d);
	cJSON_Delete(metrics);
	cJSON_Delete(lineage);
	PQclear(r);
	return 0;
}

static const char *actor(void)
{
	const char *u = getenv("USER");
	if (u && *u)
		return u;
	struct passwd *pw = getpwuid(getuid());
	return pw ? pw->pw_name : "unknown";
}

static int alias_model(struct gp_db *db, const char *name, const char *alias, const char *ver)
{
	struct gp_err err = {0};
	char *end;
	long v = strtol(ver, &end, 10);
	if (*end || v <= 0) {
		fprintf(stderr, "genpipe: version \"%s\" is not a positive integer\n", ver);
		return 2;
	}
	if (!gp_bus_token_ok(alias)) {
		fprintf(stderr, "genpipe: alias \"%s\" is not a DNS label\n", alias);
		return 2;
	}
	long long from = 0;
	gp_status st = gp_registry_move_alias(db, name, alias, v, actor(), NULL, &from, &err);
	if (st) {
		fprintf(stderr, "genpipe: %s\n", err.msg);
		return 1;
	}
	if (cli_json) {
		cJSON *o = cJSON_CreateObject();
		cJSON_AddStringToObject(o, "model", name);
		cJSON_AddStringToObject(o, "alias", alias);
		if (from)
			cJSON_AddNumberToObject(o, "from", (double)from);
		else
			cJSON_AddNullToObject(o, "from");
		cJSON_AddNumberToObject(o, "to", (double)v);
		cli_print_json(o);
	} else if (from) {
		printf("%s@%s: version %lld -> %ld\n", name, alias, from, v);
	} else {
		printf("%s@%s: (new) -> %ld\n", name, alias, v);
	}
	return 0;
}

static int write_file(const char *dir, const char *name, const void *data, size_t len)
{
	char path[4096];
	struct gp_err err = {0};
	snprintf(path, sizeof(path), "%s/%s", dir, name);
	if (gp_file_write_atomic(path, data, len, 0644, &err)) {
		fprintf(stderr, "genpipe: %s\n", err.msg);
		return -1;
	}
	return 0;
}

static int export_model(struct gp_db *db, const char *arg, const char *dir)
{
	struct model_ref ref;
	if (parse_ref(arg, &ref))
		return 2;
	if (strcmp(cli_format, "safetensors")) {
		fprintf(stderr, "genpipe: --format %s: only safetensors is supported\n", cli_format);
		return 2;
	}
	PGresult *r = find_version(db, &ref);
	if (!r)
		return 1;
	int rc = 1;
	struct gp_err err = {0};
	struct gp_store *store = NULL;
	struct gp_model *m = NULL;
	struct gp_bpe *bpe = NULL;
	uint8_t *ck = NULL, *tk = NULL;
	size_t cl = 0, tl = 0;
	cJSON *lineage = cJSON_Parse(PQgetvalue(r, 0, 7));
	const cJSON *tref = cJSON_GetObjectItem(lineage, "tokenizer");
	char th[65];
	if (!*PQgetvalue(r, 0, 8) || !cJSON_IsString(tref) || gp_artifact_ref_parse(tref->valuestring, th)) {
		fprintf(stderr, "genpipe: %s:%s has no checkpoint or tokenizer recorded\n", ref.name,
			PQgetvalue(r, 0, 0));
		goto out;
	}
	if (gp_store_open_in(&store, cli_artifacts, cli_data_dir, &err) ||
	    gp_store_get(store, PQgetvalue(r, 0, 8), (size_t)64 << 30, &ck, &cl, &err) ||
	    gp_ckpt_decode(ck, cl, &m, NULL, NULL, NULL, &err) ||
	    gp_store_get(store, th, 64u << 20, &tk, &tl, &err) || gp_bpe_load(tk, tl, &bpe, &err)) {
		fprintf(stderr, "genpipe: export %s:%s: %s\n", ref.name, PQgetvalue(r, 0, 0), err.msg);
		goto out;
	}
	if (gp_model_export_safetensors(m, dir, gp_bpe_eot(bpe), &err)) {
		fprintf(stderr, "genpipe: export: %s\n", err.msg);
		goto out;
	}
	cJSON *info = cJSON_CreateObject();
	cJSON_AddStringToObject(info, "model", ref.name);
	cJSON_AddNumberToObject(info, "version", atoi(PQgetvalue(r, 0, 0)));
	cJSON_AddStringToObject(info, "tokenizer_format", "genpipe byte-level BPE (GPTK v1, docs/formats.md)");
	cJSON_AddItemToObject(info, "metrics", cJSON_Parse(PQgetvalue(r, 0, 6)));
	cJSON_AddItemToObject(info, "lineage", cJSON_Duplicate(lineage, 1));
	char *it = cJSON_Print(info);
	cJSON_Delete(info);
	if (!it || write_file(dir, "tokenizer.gptk", tk, tl) ||
	    write_file(dir, "genpipe.json", it, strlen(it))) {
		free(it);
		goto out;
	}
	free(it);
	if (cli_json) {
		cJSON *o = cJSON_CreateObject();
		cJSON_AddStringToObject(o, "dir", dir);
		cJSON *f = cJSON_AddArrayToObject(o, "files");
		const char *names[] = {"model.safetensors", "config.json", "tokenizer.gptk", "genpipe.json"};
		for (int i = 0; i < 4; i++)
			cJSON_AddItemToArray(f, cJSON_CreateString(names[i]));
		cli_print_json(o);
	} else {
		printf("exported %s:%s to %s: model.safetensors, config.json, tokenizer.gptk, genpipe.json\n",
		       ref.name, PQgetvalue(r, 0, 0), dir);
	}
	rc = 0;
out:
	cJSON_Delete(lineage);
	gp_model_destroy(m);
	gp_bpe_free(bpe);
	free(ck);
	free(tk);
	gp_store_close(store);
	PQclear(r);
	return rc;
}

int cmd_models(int n, char **args)
{
	if (n < 1) {
		fprintf(stderr, "genpipe: models list | show NAME[:V|@ALIAS] | alias NAME ALIAS V | "
				"export NAME:V --format safetensors DIR\n");
		return 2;
	}
	int want = !strcmp(args[0], "list") ? 1 : !strcmp(args[0], "show") ? 2
		   : !strcmp(args[0], "alias") ? 4 : !strcmp(args[0], "export") ? 3 : -1;
	if (want < 0 || n != want) {
		fprintf(stderr, "genpipe: models %s: wrong arguments\n", args[0]);
		return 2;
	}
	struct gp_db *db = cli_db();
	if (!db)
		return 1;
	int rc;
	if (want == 1)
		rc = list_models(db);
	else if (want == 2)
		rc = show_model(db, args[1]);
	else if (want == 4)
		rc = alias_model(db, args[1], args[2], args[3]);
	else
		rc = export_model(db, args[1], args[2]);
	gp_db_destroy(db);
	return rc;
}
