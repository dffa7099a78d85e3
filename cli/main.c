/*
 * genpipe: the command-line interface.
 *
 *   genpipe dev up [--data-dir DIR]      start the local stack
 *   genpipe dev status [--json]          each process: pid, port, health
 *   genpipe dev logs NAME [--lines N]    a process's log
 *   genpipe dev down                     stop everything by pid, keep data
 *   genpipe migrate                      apply migrations to GENPIPE_DATABASE_URL
 *   genpipe version
 *
 * Exit codes: 0 ok, 1 failure, 2 usage error.
 */
#include <cjson/cJSON.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "config.h"
#include "db.h"
#include "gpu.h"
#include "log.h"
#include "spec.h"
#include "stack.h"

static const char *data_dir = ".genpipe";
static const char *migrations_dir = GENPIPE_SOURCE_MIGRATIONS;
static long long log_lines = 100;
static long long connect_ms = 30000;

const char *cli_data_dir;
const char *cli_database_url;
const char *cli_nats_url;
int cli_json;
int cli_no_run;
long long cli_limit = 20;
const char *cli_pipeline;
struct gp_opt_list cli_params;
long long cli_timeout_ms;
const char *cli_format;
const char *cli_artifacts;
struct cli_infer_opts cli_infer;
const char *cli_since;
const char *cli_rating, *cli_correction;
#define database_url cli_database_url
#define json_out cli_json

static const struct gp_opt common_opts[] = {
	{ "data-dir", "GENPIPE_DATA_DIR", GP_OPT_STR, ".genpipe",
	  "local stack data directory", &data_dir },
	{ "migrations-dir", "GENPIPE_MIGRATIONS_DIR", GP_OPT_STR, GENPIPE_SOURCE_MIGRATIONS,
	  "directory of NNNN_name.sql migrations", &migrations_dir },
	{ "database-url", "GENPIPE_DATABASE_URL", GP_OPT_STR, NULL,
	  "PostgreSQL URL (default: the local stack's)", &cli_database_url },
	{ "nats-url", "GENPIPE_NATS_URL", GP_OPT_STR, NULL,
	  "NATS URL (default: the local stack's)", &cli_nats_url },
	{ "param", NULL, GP_OPT_LIST, NULL, "NAME=VALUE for the run (submit; repeatable)",
	  &cli_params },
	{ "no-run", NULL, GP_OPT_BOOL, "false", "store the version without starting a run (submit)",
	  &cli_no_run },
	{ "pipeline", NULL, GP_OPT_STR, NULL, "only runs of this pipeline (runs list)",
	  &cli_pipeline },
	{ "limit", NULL, GP_OPT_INT, "20", "how many runs (runs list) or requests (telemetry) to list", &cli_limit },
	{ "format", NULL, GP_OPT_STR, "safetensors", "export format (models export)", &cli_format },
	{ "artifacts", "GENPIPE_ARTIFACTS", GP_OPT_STR, "",
	  "artifact store URI (default file://DATA_DIR/artifacts)", &cli_artifacts },
	{ "timeout-ms", NULL, GP_OPT_INT, "0", "give up watching after this long (runs watch)",
	  &cli_timeout_ms },
	{ "prompt", NULL, GP_OPT_STR, NULL, "prompt text (infer)", &cli_infer.prompt },
	{ "version", NULL, GP_OPT_INT, "0", "model version (infer; 0: through --alias)",
	  &cli_infer.version },
	{ "alias", NULL, GP_OPT_STR, "", "alias (infer; default: the service's, production)",
	  &cli_infer.alias },
	{ "max-tokens", NULL, GP_OPT_INT, "64", "tokens to generate at most (infer)",
	  &cli_infer.max_tokens },
	{ "temperature", NULL, GP_OPT_STR, "0", "sampling temperature; 0 is greedy (infer)",
	  &cli_infer.temperature },
	{ "top-k", NULL, GP_OPT_INT, "0", "sample among the k likeliest tokens; 0: all (infer)",
	  &cli_infer.top_k },
	{ "top-p", NULL, GP_OPT_STR, "1", "nucleus sampling mass (infer)", &cli_infer.top_p },
	{ "seed", NULL, GP_OPT_STR, "", "sampling seed; fixed seeds make answers cacheable (infer)",
	  &cli_infer.seed },
	{ "stop", NULL, GP_OPT_LIST, NULL, "stop sequence (infer; repeatable)", &cli_infer.stop },
	{ "stream", NULL, GP_OPT_BOOL, "false", "print tokens as they come (infer)",
	  &cli_infer.stream },
	{ "deadline-ms", NULL, GP_OPT_INT, "0", "give up after this long (infer; 0: the service's)",
	  &cli_infer.deadline_ms },
	{ "since", NULL, GP_OPT_STR, "24h", "how far back (drift)", &cli_since },
	{ "rating", NULL, GP_OPT_STR, NULL, "up or down (feedback)", &cli_rating },
	{ "correction", NULL, GP_OPT_STR, NULL, "the answer it should have given (feedback)",
	  &cli_correction },
	{ "json", NULL, GP_OPT_BOOL, "false", "machine-readable output", &json_out },
	{ "lines", NULL, GP_OPT_INT, "100", "lines of log to show (dev logs)", &log_lines },
	{ "connect-timeout-ms", "GENPIPE_CONNECT_TIMEOUT_MS", GP_OPT_INT, "30000",
	  "how long to retry the first database connection (migrate)", &connect_ms },
};
#define NOPTS ((int)(sizeof common_opts / sizeof common_opts[0]))

static const char usage_text[] =
	"genpipe COMMAND [options]\n\n"
	"commands:\n"
	"  dev up            start nats-server (JetStream), PostgreSQL and the services\n"
	"  dev status        show each process: pid, port, healthy or not\n"
	"  dev logs NAME     print the last --lines of NAME's log (nats, postgres, orchestrator, ...)\n"
	"  dev down          stop every process by its pid; data is kept\n"
	"  validate FILE...  check pipeline specs offline (exit 0 valid, 2 invalid, 1 unreadable)\n"
	"  submit FILE       store the spec as a version (same content: same version) and run it\n"
	"  pipelines list | show NAME[@V] | diff NAME@A NAME@B\n"
	"  runs list | show RUN | watch RUN | cancel RUN | retry RUN\n"
	"  models list | show NAME[:V|@ALIAS] | alias NAME ALIAS V | export NAME:V DIR\n"
	"  infer NAME --prompt TEXT  ask the model served as NAME (prints the request id)\n"
	"  telemetry NAME    the latest served requests of NAME (--limit N)\n"
	"  drift NAME        the monitor's drift windows of NAME (--since 24h)\n"
	"  feedback REQUEST_ID --rating up|down [--correction TEXT]\n"
	"  migrate           apply migrations to --database-url\n"
	"  version           print the version";

static void usage(FILE *f)
{
	gp_config_usage(common_opts, NOPTS, usage_text, f);
}

/* Absolute data dir: pid files and env must not depend on the cwd later. */
static const char *abs_dir(const char *d, char *buf, size_t len)
{
	if (d[0] == '/')
		return d;
	char cwd[PATH_MAX];
	if (!getcwd(cwd, sizeof cwd))
		return d;
	snprintf(buf, len, "%s/%s", cwd, d);
	return buf;
}

static void self_dir(char *out, size_t len)
{
	ssize_t n = readlink("/proc/self/exe", out, len - 1);
	if (n <= 0) {
		snprintf(out, len, ".");
		return;
	}
	out[n] = '\0';
	char *slash = strrchr(out, '/');
	if (slash)
		*slash = '\0';
}

struct gp_db *cli_db(void)
{
	char url[1024];
	struct gp_err err = { 0 };
	const char *u = cli_database_url;
	if (!u || !*u) {
		if (gp_stack_env(cli_data_dir, "GENPIPE_DATABASE_URL", url, sizeof url, &err)) {
			fprintf(stderr, "genpipe: no database: pass --database-url or set "
					"GENPIPE_DATABASE_URL (%s)\n",
				err.msg);
			return NULL;
		}
		u = url;
	}
	struct gp_db *db = NULL;
	if (gp_db_connect(&db, u, connect_ms, &err)) {
		fprintf(stderr, "genpipe: %s\n", err.msg);
		return NULL;
	}
	return db;
}

struct gp_bus *cli_bus(void)
{
	char url[512];
	struct gp_err err = { 0 };
	const char *u = cli_nats_url;
	if (!u || !*u) {
		if (gp_stack_env(cli_data_dir, "GENPIPE_NATS_URL", url, sizeof url, &err))
			return NULL;
		u = url;
	}
	struct gp_bus *bus = NULL;
	if (gp_bus_connect(&bus, u, "genpipe-cli", 0, 2000, &err)) {
		fprintf(stderr, "genpipe: progress unavailable: %s\n", err.msg);
		return NULL;
	}
	return bus;
}

void cli_print_json(cJSON *j)
{
	char *s = cJSON_Print(j);
	puts(s ? s : "null");
	free(s);
	cJSON_Delete(j);
}

static int cmd_status(const char *dir)
{
	struct gp_stack_proc *p = NULL;
	int n = 0;
	struct gp_err err = { 0 };
	if (gp_stack_status(dir, migrations_dir, &p, &n, &err)) {
		fprintf(stderr, "genpipe: %s\n", err.msg);
		return 1;
	}
	int all = 1;
	if (json_out) {
		cJSON *arr = cJSON_CreateArray();
		for (int i = 0; i < n; i++) {
			cJSON *o = cJSON_CreateObject();
			cJSON_AddStringToObject(o, "name", p[i].name);
			cJSON_AddNumberToObject(o, "pid", p[i].pid);
			cJSON_AddNumberToObject(o, "port", p[i].port);
			cJSON_AddBoolToObject(o, "running", p[i].alive);
			cJSON_AddBoolToObject(o, "healthy", p[i].healthy);
			cJSON_AddStringToObject(o, "detail", p[i].detail);
			cJSON_AddItemToArray(arr, o);
		}
		char *s = cJSON_Print(arr);
		puts(s);
		free(s);
		cJSON_Delete(arr);
	} else {
		printf("%-14s %8s %6s  %-9s %s\n", "NAME", "PID", "PORT", "STATE", "DETAIL");
	}
	for (int i = 0; i < n; i++) {
		all &= p[i].healthy;
		if (!json_out)
			printf("%-14s %8d %6d  %-9s %s\n", p[i].name, p[i].pid, p[i].port,
			       !p[i].alive ? "stopped" : p[i].healthy ? "healthy" : "unhealthy",
			       p[i].detail);
	}
	free(p);
	return all ? 0 : 1;
}

static int cmd_logs(const char *dir, const char *name)
{
	char path[PATH_MAX + 64];
	gp_stack_log_path(dir, name, path, sizeof path);
	FILE *f = fopen(path, "r");
	if (!f) {
		fprintf(stderr, "genpipe: no log for \"%s\" (%s: %s)\n", name, path, strerror(errno));
		return 1;
	}
	/* Keep the last N lines in a ring. */
	long long n = log_lines > 0 ? log_lines : 100;
	if (n > 100000)
		n = 100000;
	char **ring = calloc((size_t)n, sizeof *ring);
	long long count = 0;
	char *line = NULL;
	size_t cap = 0;
	while (ring && getline(&line, &cap, f) > 0) {
		free(ring[count % n]);
		ring[count % n] = strdup(line);
		count++;
	}
	free(line);
	fclose(f);
	long long start = count > n ? count - n : 0;
	for (long long i = start; ring && i < count; i++)
		fputs(ring[i % n] ? ring[i % n] : "", stdout);
	for (long long i = 0; ring && i < n; i++)
		free(ring[i]);
	free(ring);
	return 0;
}

/*
 * Read a spec file, at most GP_SPEC_MAX_BYTES + 1 bytes (enough to know it is
 * too big without reading a huge file). Caller frees *text.
 */
static int read_spec(const char *path, char **text, size_t *len)
{
	FILE *f = strcmp(path, "-") ? fopen(path, "rb") : stdin;
	if (!f) {
		fprintf(stderr, "%s: could not open: %s\n", path, strerror(errno));
		return -1;
	}
	size_t cap = GP_SPEC_MAX_BYTES + 2;
	char *buf = malloc(cap);
	if (!buf) {
		if (f != stdin)
			fclose(f);
		fprintf(stderr, "%s: out of memory\n", path);
		return -1;
	}
	size_t n = fread(buf, 1, cap - 1, f);
	int bad = ferror(f);
	if (f != stdin)
		fclose(f);
	if (bad) {
		free(buf);
		fprintf(stderr, "%s: could not read\n", path);
		return -1;
	}
	buf[n] = '\0';
	*text = buf;
	*len = n;
	return 0;
}

static void print_spec_errors(FILE *out, const char *path, const struct gp_spec_errors *errs)
{
	for (int i = 0; i < errs->n; i++) {
		if (errs->v[i].line > 0)
			fprintf(out, "%s:%d:%d: %s\n", path, errs->v[i].line, errs->v[i].col,
				errs->v[i].msg);
		else
			fprintf(out, "%s: %s\n", path, errs->v[i].msg);
	}
	if (errs->truncated)
		fprintf(out, "%s: more than %d errors; fix these first\n", path, GP_SPEC_MAX_ERRORS);
}

int cli_load_spec(const char *path, char **text, cJSON **doc)
{
	size_t len = 0;
	if (read_spec(path, text, &len) != 0)
		return 1;
	struct gp_spec_errors *errs = calloc(1, sizeof *errs);
	if (!errs) {
		free(*text);
		return 1;
	}
	gp_status st = gp_spec_parse(*text, len, doc, errs);
	if (st) {
		print_spec_errors(stderr, path, errs);
		free(errs);
		free(*text);
		*text = NULL;
		return st == GP_ERR_INVALID ? 2 : 1;
	}
	free(errs);
	return 0;
}

static int cmd_validate(int n, char **files)
{
	if (n == 0) {
		fprintf(stderr, "genpipe validate: no files given\n");
		return 2;
	}
	int worst = 0;
	cJSON *all = json_out ? cJSON_CreateArray() : NULL;
	for (int i = 0; i < n; i++) {
		char *text = NULL;
		size_t len = 0;
		if (read_spec(files[i], &text, &len) != 0) {
			worst = worst ? worst : 1;
			continue;
		}
		struct gp_spec_errors *errs = calloc(1, sizeof *errs);
		cJSON *doc = NULL;
		gp_status st = errs ? gp_spec_parse(text, len, &doc, errs) : GP_ERR_NOMEM;
		free(text);
		if (st == GP_ERR_NOMEM) {
			fprintf(stderr, "%s: out of memory\n", files[i]);
			free(errs);
			return 1;
		}
		if (st) {
			worst = 2;
			if (!json_out)
				print_spec_errors(stdout, files[i], errs);
		}
		if (json_out) {
			cJSON *o = cJSON_CreateObject();
			cJSON_AddStringToObject(o, "file", files[i]);
			cJSON_AddBoolToObject(o, "valid", st == GP_OK);
			cJSON *ea = cJSON_AddArrayToObject(o, "errors");
			for (int k = 0; st && k < errs->n; k++) {
				cJSON *e = cJSON_CreateObject();
				cJSON_AddNumberToObject(e, "line", errs->v[k].line);
				cJSON_AddNumberToObject(e, "column", errs->v[k].col);
				cJSON_AddStringToObject(e, "message", errs->v[k].msg);
				cJSON_AddItemToArray(ea, e);
			}
			if (doc) {
				char *canon = NULL;
				char hash[65];
				if (gp_spec_canonical(doc, &canon, hash, NULL) == GP_OK) {
					cJSON_AddStringToObject(o, "content_hash", hash);
					free(canon);
				}
				cJSON_AddItemToObject(o, "normalized", doc);
				doc = NULL;
			}
			cJSON_AddItemToArray(all, o);
		} else if (st == GP_OK) {
			printf("%s: valid\n", files[i]);
		}
		cJSON_Delete(doc);
		free(errs);
	}
	if (all) {
		char *s = cJSON_Print(all);
		puts(s ? s : "[]");
		free(s);
		cJSON_Delete(all);
	}
	return worst;
}

static int cmd_migrate(void)
{
	struct gp_err err = { 0 };
	struct gp_db *db = NULL;
	int applied = 0, total = 0;
	if (gp_db_connect(&db, database_url, connect_ms, &err) ||
	    gp_db_migrate(db, migrations_dir, &applied, &total, &err)) {
		fprintf(stderr, "genpipe: %s\n", err.msg);
		gp_db_destroy(db);
		return 1;
	}
	gp_db_destroy(db);
	printf("migrations: %d applied now, %d in total\n", applied, total);
	return 0;
}

int main(int argc, char **argv)
{
	int first = 0, help = 0;
	struct gp_err err = { 0 };
	gp_log_init("cli");
	if (gp_config_parse(common_opts, NOPTS, argc, argv, usage_text, stdout, &first, &help,
			    &err)) {
		fprintf(stderr, "genpipe: %s\n", err.msg);
		return 2;
	}
	if (help)
		return 0;
	int nargs = argc - first;
	char **args = argv + first;
	if (nargs == 0) {
		usage(stderr);
		return 2;
	}
	char dirbuf[PATH_MAX + 2];
	const char *dir = abs_dir(data_dir, dirbuf, sizeof dirbuf);
	cli_data_dir = dir;
	if (!strcmp(args[0], "version")) {
		printf("genpipe %s\n", GENPIPE_VERSION);
		const char *why = NULL;
		int n = gp_gpu_available(&why);
		if (!gp_gpu_built()) {
			printf("cuda: %s\n", why);
		} else if (n == 0) {
			printf("cuda: built in; no device usable (%s): the CPU path is used\n", why);
		} else {
			for (int i = 0; i < n; i++) {
				char name[256];
				size_t mem = 0;
				if (gp_gpu_describe(i, name, sizeof name, &mem) == 0)
					printf("cuda: device %d: %s, %.1f GiB\n", i, name,
					       (double)mem / (1 << 30));
			}
		}
		return 0;
	}
	if (!strcmp(args[0], "migrate") && nargs == 1)
		return cmd_migrate();
	if (!strcmp(args[0], "validate"))
		return cmd_validate(nargs - 1, args + 1);
	if (!strcmp(args[0], "submit"))
		return cmd_submit(nargs - 1, args + 1);
	if (!strcmp(args[0], "pipelines"))
		return cmd_pipelines(nargs - 1, args + 1);
	if (!strcmp(args[0], "runs"))
		return cmd_runs(nargs - 1, args + 1);
	if (!strcmp(args[0], "models"))
		return cmd_models(nargs - 1, args + 1);
	if (!strcmp(args[0], "infer"))
		return cmd_infer(nargs - 1, args + 1);
	if (!strcmp(args[0], "telemetry"))
		return cmd_telemetry(nargs - 1, args + 1);
	if (!strcmp(args[0], "drift"))
		return cmd_drift(nargs - 1, args + 1);
	if (!strcmp(args[0], "feedback"))
		return cmd_feedback(nargs - 1, args + 1);
	if (!strcmp(args[0], "dev") && nargs >= 2) {
		if (!strcmp(args[1], "up") && nargs == 2) {
			char bindir[PATH_MAX];
			self_dir(bindir, sizeof bindir);
			struct gp_stack_options o = {
				.data_dir = dir,
				.migrations_dir = migrations_dir,
				.bin_dir = bindir,
				.progress = stdout,
			};
			if (gp_stack_up(&o, &err)) {
				fprintf(stderr, "genpipe: dev up: %s\n", err.msg);
				return 1;
			}
			printf("stack is up; environment in %s/env\n", dir);
			return 0;
		}
		if (!strcmp(args[1], "down") && nargs == 2) {
			if (gp_stack_down(dir, stdout, &err)) {
				fprintf(stderr, "genpipe: dev down: %s\n", err.msg);
				return 1;
			}
			return 0;
		}
		if (!strcmp(args[1], "status") && nargs == 2)
			return cmd_status(dir);
		if (!strcmp(args[1], "logs") && nargs == 3)
			return cmd_logs(dir, args[2]);
	}
	fprintf(stderr, "genpipe: unknown command \"%s%s%s\"\n", args[0], nargs > 1 ? " " : "",
		nargs > 1 ? args[1] : "");
	usage(stderr);
	return 2;
}
