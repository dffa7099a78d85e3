/*
 * genpipe drift NAME [--since DURATION] [--json]: the monitor's windows of
 * model NAME (all versions), oldest first, with each figure as a sparkline
 * and the alerts they raised.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "spec.h"

static const char *const figures[] = {"psi", "js", "perplexity_ratio", "embedding_distance",
				      "error_rate", "p99_ms", "cache_hit_rate"};
#define NFIG ((int)(sizeof figures / sizeof *figures))

static void sparkline(const char *name, const double *v, int n, double threshold)
{
	static const char *const bars[] = {"▁", "▂", "▃", "▄", "▅", "▆", "▇", "█"};
	double lo = INFINITY, hi = -INFINITY;
	int have = 0;
	for (int i = 0; i < n; i++)
		if (isfinite(v[i])) {
			lo = v[i] < lo ? v[i] : lo;
			hi = v[i] > hi ? v[i] : hi;
			have++;
		}
	if (!have)
		return;
	printf("  %-19s ", name);
	int from = n > 60 ? n - 60 : 0;
	for (int i = from; i < n; i++) {
		if (!isfinite(v[i])) {
			putchar(' ');
			continue;
		}
		int b = hi > lo ? (int)((v[i] - lo) / (hi - lo) * 7.999) : 0;
		fputs(bars[b < 0 ? 0 : b > 7 ? 7 : b], stdout);
	}
	printf("  %.4g .. %.4g", lo, hi);
	if (isfinite(threshold))
		printf(" (alert over %.4g)", threshold);
	putchar('\n');
}

int cmd_drift(int n, char **args)
{
	if (n != 1 || !gp_bus_token_ok(args[0])) {
		fprintf(stderr, "genpipe: drift NAME [--since DURATION] [--json]\n");
		return 2;
	}
	long long since = gp_spec_parse_duration(cli_since);
	if (since <= 0) {
		fprintf(stderr, "genpipe: --since \"%s\" is not a duration (e.g. 30m, 24h, 7d)\n",
			cli_since);
		return 2;
	}
	struct gp_db *db = cli_db();
	if (!db)
		return 1;
	char ms[32];
	snprintf(ms, sizeof ms, "%lld", since);
	const char *p[] = {args[0], ms};
	PGresult *r = NULL, *c = NULL;
	struct gp_err err = {0};
	int rc = 1;
	if (gp_db_exec(db, "read drift windows",
		       "SELECT to_char(w.window_end, 'YYYY-MM-DD HH24:MI:SS'), v.version, w.n_requests, "
		       "w.metrics::text, (SELECT coalesce(string_agg(a.metric, ',' ORDER BY a.id), '') "
		       "FROM alerts a WHERE a.drift_window_id = w.id), "
		       "(extract(epoch FROM w.window_end) * 1000)::bigint "
		       "FROM drift_windows w JOIN model_versions v ON v.id = w.model_version_id "
		       "JOIN models m ON m.id = v.model_id WHERE m.name = $1 AND w.window_end > "
		       "now() - $2::bigint * interval '1 millisecond' ORDER BY w.window_end, w.id",
		       2, p, &r, &err) ||
	    gp_db_exec(db, "read monitor",
		       "SELECT mo.config::text FROM monitors mo JOIN models m ON m.id = mo.model_id "
		       "WHERE m.name = $1", 1, p, &c, &err)) {
		fprintf(stderr, "genpipe: %s\n", err.msg);
		goto out;
	}
	int rows = PQntuples(r);
	cJSON *cfg = PQntuples(c) ? cJSON_Parse(PQgetvalue(c, 0, 0)) : NULL;
	if (cli_json) {
		cJSON *arr = cJSON_CreateArray();
		for (int i = 0; i < rows; i++) {
			cJSON *o = cJSON_CreateObject();
			cJSON_AddStringToObject(o, "window_end", PQgetvalue(r, i, 0));
			cJSON_AddNumberToObject(o, "version", atof(PQgetvalue(r, i, 1)));
			cJSON_AddNumberToObject(o, "requests", atof(PQgetvalue(r, i, 2)));
			cJSON *m = cJSON_Parse(PQgetvalue(r, i, 3));
			cJSON_AddItemToObject(o, "metrics", m ? m : cJSON_CreateObject());
			cJSON *al = cJSON_AddArrayToObject(o, "alerts");
			char buf[512];
			snprintf(buf, sizeof buf, "%s", PQgetvalue(r, i, 4));
			for (char *s = NULL, *t = strtok_r(buf, ",", &s); t; t = strtok_r(NULL, ",", &s))
				cJSON_AddItemToArray(al, cJSON_CreateString(t));
			cJSON_AddItemToArray(arr, o);
		}
		cJSON *o = cJSON_CreateObject();
		cJSON_AddStringToObject(o, "model", args[0]);
		cJSON_AddItemToObject(o, "monitor", cfg ? cfg : cJSON_CreateNull());
		cJSON_AddItemToObject(o, "windows", arr);
		cli_print_json(o);
		rc = 0;
		goto out;
	}
	if (!rows) {
		printf("no drift windows of %s in the last %s%s\n", args[0], cli_since,
		       cfg ? "" : " (no monitor is configured: a pipeline's monitor stage does that)");
		cJSON_Delete(cfg);
		rc = 0;
		goto out;
	}
	printf("%-19s  %7s  %8s  %7s  %7s  %7s  %7s  %6s  %8s  %s\n", "window end", "version",
	       "requests", "psi", "js", "ppl x", "embed", "err %", "p99 ms", "alerts");
	double *vals = calloc((size_t)rows * NFIG, sizeof(double));
	for (int i = 0; i < rows; i++) {
		cJSON *m = cJSON_Parse(PQgetvalue(r, i, 3));
		for (int f = 0; f < NFIG; f++) {
			const cJSON *x = cJSON_GetObjectItemCaseSensitive(m, figures[f]);
			vals[(size_t)f * rows + i] = cJSON_IsNumber(x) ? x->valuedouble : NAN;
		}
		int quiet = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(m, "too_few_to_alert"));
		cJSON_Delete(m);
		double *v = vals;
		printf("%-19s  %7s  %8s  %7.3f  %7.3f  %7.2f  %7.3f  %6.2f  %8.1f  %s\n",
		       PQgetvalue(r, i, 0), PQgetvalue(r, i, 1), PQgetvalue(r, i, 2), v[i],
		       v[rows + i], v[2 * rows + i], v[3 * rows + i], 100 * v[4 * rows + i],
		       v[5 * rows + i],
		       quiet ? "(too few requests to alert)" : PQgetvalue(r, i, 4));
	}
	printf("\n");
	const char *thr_keys[] = {"psi_threshold", "js_threshold", "perplexity_ratio",
				  "embedding_threshold", "error_rate_threshold", NULL, NULL};
	for (int f = 0; f < NFIG; f++) {
		const cJSON *t = thr_keys[f] ? cJSON_GetObjectItemCaseSensitive(cfg, thr_keys[f]) : NULL;
		sparkline(figures[f], vals + (size_t)f * rows, rows,
			  cJSON_IsNumber(t) ? t->valuedouble : NAN);
	}
	free(vals);
	cJSON_Delete(cfg);
	rc = 0;
out:
	PQclear(r);
	PQclear(c);
	gp_db_destroy(db);
	return rc;
}
