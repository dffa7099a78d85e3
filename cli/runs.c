/*
 * runs.c: genpipe runs list|show|watch|cancel|retry.
 *
 * watch reads states from PostgreSQL (the truth) every 250 ms and progress
 * from the stage events on genpipe.events.<run> (best effort: without NATS
 * it still shows states). On a terminal it redraws in place; otherwise it
 * prints a line per change.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "run.h"
#include "subjects.h"
#include "wire.h"

static const char stages_sql[] =
	"SELECT rs.stage, rs.kind, "
	"CASE WHEN rs.state = 'queued' AND a.state = 'running' THEN 'running' ELSE rs.state END, "
	"coalesce(a.attempt, 0), coalesce(rs.error, ''), "
	"coalesce(round(extract(epoch FROM coalesce(a.finished_at, clock_timestamp()) - "
	"a.claimed_at)::numeric, 1)::text, ''), coalesce(rs.outputs::text, ''), "
	"coalesce(a.worker, ''), coalesce(rs.cached_from::text, '') "
	"FROM run_stages rs LEFT JOIN LATERAL (SELECT * FROM stage_attempts x WHERE "
	"x.run_id = rs.run_id AND x.stage = rs.stage ORDER BY x.attempt DESC LIMIT 1) a ON true "
	"WHERE rs.run_id = $1::bigint ORDER BY rs.position";

static const char run_sql[] =
	"SELECT r.id, r.pipeline_name, v.version, r.state, r.trigger, "
	"to_char(r.created_at, 'YYYY-MM-DD HH24:MI:SS'), "
	"coalesce(round(extract(epoch FROM coalesce(r.finished_at, clock_timestamp()) - "
	"coalesce(r.started_at, r.created_at))::numeric, 1)::text, ''), coalesce(r.error, ''), "
	"r.params::text "
	"FROM runs r JOIN pipeline_versions v ON v.id = r.pipeline_version_id WHERE r.id = $1::bigint";

static int parse_run_id(const char *s, long long *id)
{
	char *end;
	long long v = strtoll(s, &end, 10);
	if (*end || v <= 0) {
		fprintf(stderr, "genpipe: \"%s\" is not a run id\n", s);
		return -1;
	}
	*id = v;
	return 0;
}

static int list_runs(struct gp_db *db)
{
	char lim[24];
	snprintf(lim, sizeof lim, "%lld", cli_limit > 0 ? cli_limit : 20);
	const char *p[] = { cli_pipeline, lim };
	PGresult *r = NULL;
	struct gp_err err = { 0 };
	if (gp_db_exec(db, "list runs",
		       "SELECT r.id, r.pipeline_name, v.version, r.state, r.trigger, "
		       "to_char(r.created_at, 'YYYY-MM-DD HH24:MI:SS'), "
		       "coalesce(round(extract(epoch FROM coalesce(r.finished_at, clock_timestamp()) "
		       "- coalesce(r.started_at, r.created_at))::numeric, 1)::text, ''), "
		       "(SELECT count(*) FILTER (WHERE state IN ('succeeded','cached')) || '/' || "
		       "count(*) FROM run_stages s WHERE s.run_id = r.id) "
		       "FROM runs r JOIN pipeline_versions v ON v.id = r.pipeline_version_id "
		       "WHERE $1::text IS NULL OR r.pipeline_name = $1 ORDER BY r.id DESC "
		       "LIMIT $2::integer",
		       2, p, &r, &err)) {
		fprintf(stderr, "genpipe: %s\n", err.msg);
		return 1;
	}
	if (cli_json) {
		cJSON *a = cJSON_CreateArray();
		for (int i = 0; i < PQntuples(r); i++) {
			cJSON *o = cJSON_CreateObject();
			cJSON_AddNumberToObject(o, "run", atof(PQgetvalue(r, i, 0)));
			cJSON_AddStringToObject(o, "pipeline", PQgetvalue(r, i, 1));
			cJSON_AddNumberToObject(o, "version", atoi(PQgetvalue(r, i, 2)));
			cJSON_AddStringToObject(o, "state", PQgetvalue(r, i, 3));
			cJSON_AddStringToObject(o, "trigger", PQgetvalue(r, i, 4));
			cJSON_AddStringToObject(o, "created", PQgetvalue(r, i, 5));
			cJSON_AddStringToObject(o, "stages_done", PQgetvalue(r, i, 7));
			cJSON_AddItemToArray(a, o);
		}
		cli_print_json(a);
	} else {
		printf("%6s  %-24s %-10s %-8s %-7s %-19s %8s\n", "RUN", "PIPELINE", "STATE",
		       "STAGES", "TRIGGER", "CREATED", "SECONDS");
		for (int i = 0; i < PQntuples(r); i++) {
			char pv[64];
			snprintf(pv, sizeof pv, "%s@%s", PQgetvalue(r, i, 1), PQgetvalue(r, i, 2));
			printf("%6s  %-24s %-10s %-8s %-7s %-19s %8s\n", PQgetvalue(r, i, 0), pv,
			       PQgetvalue(r, i, 3), PQgetvalue(r, i, 7), PQgetvalue(r, i, 4),
			       PQgetvalue(r, i, 5), PQgetvalue(r, i, 6));
		}
	}
	PQclear(r);
	return 0;
}

/* Print a metrics object flattened one level: k=v k.sub=v. */
static void print_metrics(const char *stage, const char *json)
{
	cJSON *m = cJSON_Parse(json);
	if (!cJSON_IsObject(m) || !m->child) {
		cJSON_Delete(m);
		return;
	}
	printf("  %-18s", stage);
	int col = 20;
	for (const cJSON *c = m->child; c; c = c->next) {
		const cJSON *sub = cJSON_IsObject(c) ? c->child : c;
		for (; sub; sub = cJSON_IsObject(c) ? sub->next : NULL) {
			char item[160];
			if (!cJSON_IsNumber(sub))
				continue;
			double v = sub->valuedouble;
			char num[48];
			if (v == (double)(long long)v)
				snprintf(num, sizeof num, "%lld", (long long)v);
			else
				snprintf(num, sizeof num, "%.3g", v);
			int n = snprintf(item, sizeof item, " %s%s%s=%s", c->string,
					 cJSON_IsObject(c) ? "." : "", cJSON_IsObject(c) ? sub->string : "",
					 num);
			if (col + n > 100) {
				printf("\n  %-18s", "");
				col = 20;
			}
			fputs(item, stdout);
			col += n;
			if (!cJSON_IsObject(c))
				break;
		}
	}
	putchar('\n');
	cJSON_Delete(m);
}

/* The artifacts a run's stages output, and each stage's counts: printed,
 * or added to o (--json). */
static int show_artifacts(struct gp_db *db, long long id, cJSON *o)
{
	char ids[24];
	snprintf(ids, sizeof ids, "%lld", id);
	const char *p[] = { ids };
	PGresult *a = NULL, *m = NULL;
	struct gp_err err = { 0 };
	if (gp_db_exec(db, "show artifacts",
		       "SELECT s.stage, o.key, a.kind, a.size_bytes, a.content_hash, "
		       "coalesce(a.run_id::text, '') FROM run_stages s "
		       "CROSS JOIN LATERAL jsonb_each_text(coalesce(s.outputs, '{}')) o "
		       "JOIN artifacts a ON 'sha256:' || a.content_hash = o.value "
		       "WHERE s.run_id = $1::bigint ORDER BY s.position, o.key",
		       1, p, &a, &err) ||
	    gp_db_exec(db, "show counts",
		       "SELECT s.stage, (SELECT x.metrics::text FROM stage_attempts x "
		       "WHERE x.run_id = coalesce(s.cached_from, s.run_id) AND x.stage = s.stage "
		       "AND x.state = 'succeeded' AND x.reused_from IS NULL "
		       "ORDER BY x.id DESC LIMIT 1) FROM run_stages s "
		       "WHERE s.run_id = $1::bigint ORDER BY s.position",
		       1, p, &m, &err)) {
		fprintf(stderr, "genpipe: %s\n", err.msg);
		PQclear(a);
		return 1;
	}
	if (o) {
		cJSON *arr = cJSON_AddArrayToObject(o, "artifacts");
		for (int i = 0; i < PQntuples(a); i++) {
			cJSON *x = cJSON_CreateObject();
			cJSON_AddStringToObject(x, "stage", PQgetvalue(a, i, 0));
			cJSON_AddStringToObject(x, "output", PQgetvalue(a, i, 1));
			cJSON_AddStringToObject(x, "kind", PQgetvalue(a, i, 2));
			cJSON_AddNumberToObject(x, "bytes", atof(PQgetvalue(a, i, 3)));
			cJSON_AddStringToObject(x, "sha256", PQgetvalue(a, i, 4));
			cJSON_AddItemToArray(arr, x);
		}
		cJSON *cnt = cJSON_AddObjectToObject(o, "counts");
		for (int i = 0; i < PQntuples(m); i++)
			if (!PQgetisnull(m, i, 1))
				cJSON_AddItemToObject(cnt, PQgetvalue(m, i, 0),
						      cJSON_Parse(PQgetvalue(m, i, 1)));
		PQclear(a);
		PQclear(m);
		return 0;
	}
	if (PQntuples(a)) {
		printf("\n%-20s %-14s %-10s %12s  %-16s %s\n", "ARTIFACT OF", "OUTPUT", "KIND",
		       "BYTES", "SHA256", "RUN");
		for (int i = 0; i < PQntuples(a); i++)
			printf("%-20s %-14s %-10s %12s  %.16s %s\n", PQgetvalue(a, i, 0),
			       PQgetvalue(a, i, 1), PQgetvalue(a, i, 2), PQgetvalue(a, i, 3),
			       PQgetvalue(a, i, 4), PQgetvalue(a, i, 5));
	}
	int header = 0;
	for (int i = 0; i < PQntuples(m); i++) {
		if (PQgetisnull(m, i, 1))
			continue;
		if (!header++)
			printf("\nCOUNTS\n");
		print_metrics(PQgetvalue(m, i, 0), PQgetvalue(m, i, 1));
	}
	PQclear(a);
	PQclear(m);
	return 0;
}

static int show_run(struct gp_db *db, long long id)
{
	char ids[24];
	snprintf(ids, sizeof ids, "%lld", id);
	const char *p[] = { ids };
	PGresult *r = NULL, *s = NULL;
	struct gp_err err = { 0 };
	if (gp_db_exec(db, "show run", run_sql, 1, p, &r, &err) ||
	    gp_db_exec(db, "show stages", stages_sql, 1, p, &s, &err)) {
		fprintf(stderr, "genpipe: %s\n", err.msg);
		PQclear(r);
		return 1;
	}
	if (PQntuples(r) != 1) {
		fprintf(stderr, "genpipe: run %lld does not exist\n", id);
		PQclear(r);
		PQclear(s);
		return 1;
	}
	if (cli_json) {
		cJSON *o = cJSON_CreateObject();
		cJSON_AddNumberToObject(o, "run", (double)id);
		cJSON_AddStringToObject(o, "pipeline", PQgetvalue(r, 0, 1));
		cJSON_AddNumberToObject(o, "version", atoi(PQgetvalue(r, 0, 2)));
		cJSON_AddStringToObject(o, "state", PQgetvalue(r, 0, 3));
		cJSON_AddStringToObject(o, "trigger", PQgetvalue(r, 0, 4));
		cJSON_AddStringToObject(o, "created", PQgetvalue(r, 0, 5));
		cJSON_AddStringToObject(o, "error", PQgetvalue(r, 0, 7));
		cJSON_AddItemToObject(o, "params", cJSON_Parse(PQgetvalue(r, 0, 8)));
		cJSON *a = cJSON_AddArrayToObject(o, "stages");
		for (int i = 0; i < PQntuples(s); i++) {
			cJSON *st = cJSON_CreateObject();
			cJSON_AddStringToObject(st, "stage", PQgetvalue(s, i, 0));
			cJSON_AddStringToObject(st, "kind", PQgetvalue(s, i, 1));
			cJSON_AddStringToObject(st, "state", PQgetvalue(s, i, 2));
			cJSON_AddNumberToObject(st, "attempts", atoi(PQgetvalue(s, i, 3)));
			cJSON_AddStringToObject(st, "error", PQgetvalue(s, i, 4));
			cJSON_AddItemToObject(st, "outputs", *PQgetvalue(s, i, 6)
								     ? cJSON_Parse(PQgetvalue(s, i, 6))
								     : cJSON_CreateNull());
			if (*PQgetvalue(s, i, 8))
				cJSON_AddNumberToObject(st, "cached_from", atof(PQgetvalue(s, i, 8)));
			cJSON_AddItemToArray(a, st);
		}
		if (show_artifacts(db, id, o)) {
			cJSON_Delete(o);
			PQclear(r);
			PQclear(s);
			return 1;
		}
		cli_print_json(o);
	} else {
		printf("run %lld: %s@%s %s (%s, created %s, %ss)\n", id, PQgetvalue(r, 0, 1),
		       PQgetvalue(r, 0, 2), PQgetvalue(r, 0, 3), PQgetvalue(r, 0, 4),
		       PQgetvalue(r, 0, 5), PQgetvalue(r, 0, 6));
		if (*PQgetvalue(r, 0, 7))
			printf("error: %s\n", PQgetvalue(r, 0, 7));
		printf("%-20s %-12s %-10s %8s %8s  %s\n", "STAGE", "KIND", "STATE", "ATTEMPTS",
		       "SECONDS", "DETAIL");
		for (int i = 0; i < PQntuples(s); i++) {
			char detail[300];
			if (*PQgetvalue(s, i, 8))
				snprintf(detail, sizeof detail, "cached from run %s",
					 PQgetvalue(s, i, 8));
			else
				snprintf(detail, sizeof detail, "%s", PQgetvalue(s, i, 4));
			printf("%-20s %-12s %-10s %8s %8s  %s\n", PQgetvalue(s, i, 0),
			       PQgetvalue(s, i, 1), PQgetvalue(s, i, 2), PQgetvalue(s, i, 3),
			       PQgetvalue(s, i, 5), detail);
		}
	}
	PQclear(r);
	PQclear(s);
	return cli_json ? 0 : show_artifacts(db, id, NULL);
}

/* Progress from stage events, per stage name. */
struct progress {
	char stage[64];
	double frac;
	long long first_ms;
	double first_frac;
	long long last_ms;
	char message[160]; /* the worker's own words: "step 120/500 loss 4.10 ..." */
};

struct watch {
	struct progress p[256];
	int n;
	pthread_mutex_t mu;
};

static void on_event(natsConnection *nc, natsSubscription *sub, natsMsg *m, void *cls)
{
	(void)nc;
	(void)sub;
	struct watch *w = cls;
	gp_stage_event *ev = NULL;
	if (gp_wire_decode_stage_event(&ev, (const uint8_t *)natsMsg_GetData(m),
				       (size_t)natsMsg_GetDataLength(m), NULL) == GP_OK &&
	    ev->type == GENPIPE__V1__EVENT_TYPE__EVENT_PROGRESS) {
		pthread_mutex_lock(&w->mu);
		int i = 0;
		while (i < w->n && strcmp(w->p[i].stage, ev->stage) != 0)
			i++;
		if (i == w->n && w->n < 256) {
			snprintf(w->p[i].stage, sizeof w->p[i].stage, "%s", ev->stage);
			w->p[i].first_ms = gp_now_ms();
			w->p[i].first_frac = ev->progress;
			w->n++;
		}
		if (i < w->n) {
			if (ev->progress < w->p[i].frac) { /* a new attempt restarted */
				w->p[i].first_ms = gp_now_ms();
				w->p[i].first_frac = ev->progress;
			}
			w->p[i].frac = ev->progress;
			w->p[i].last_ms = gp_now_ms();
			snprintf(w->p[i].message, sizeof w->p[i].message, "%s",
				 ev->message ? ev->message : "");
		}
		pthread_mutex_unlock(&w->mu);
	}
	gp_wire_free_stage_event(ev);
	natsMsg_Destroy(m);
}

static void bar(char *out, size_t len, double f)
{
	int width = 20, fill = (int)(f * width + 0.5);
	if (fill > width)
		fill = width;
	if (fill < 0)
		fill = 0;
	size_t k = 0;
	out[k++] = '[';
	for (int i = 0; i < width && k + 2 < len; i++)
		out[k++] = i < fill ? '#' : '.';
	out[k++] = ']';
	out[k] = '\0';
}

static int watch_run(struct gp_db *db, long long id)
{
	char ids[24], subj[64];
	snprintf(ids, sizeof ids, "%lld", id);
	snprintf(subj, sizeof subj, GP_SUBJ_EVENTS "%lld", id);
	const char *p[] = { ids };
	struct watch w = { .n = 0 };
	pthread_mutex_init(&w.mu, NULL);
	struct gp_bus *bus = cli_bus();
	natsSubscription *sub = NULL;
	if (bus && natsConnection_Subscribe(&sub, gp_bus_conn(bus), subj, on_event, &w) != NATS_OK)
		sub = NULL;
	int tty = isatty(STDOUT_FILENO) && !cli_json;
	int drawn = 0, rc = 1;
	char last[256][48];
	long long last_line_ms[256];
	memset(last, 0, sizeof last);
	memset(last_line_ms, 0, sizeof last_line_ms);
	long long deadline = cli_timeout_ms > 0 ? gp_now_ms() + cli_timeout_ms : 0;
	for (;;) {
		PGresult *r = NULL, *s = NULL;
		struct gp_err err = { 0 };
		if (gp_db_exec(db, "watch run", run_sql, 1, p, &r, &err) ||
		    gp_db_exec(db, "watch stages", stages_sql, 1, p, &s, &err)) {
			fprintf(stderr, "genpipe: %s\n", err.msg);
			PQclear(r);
			rc = 1;
			break;
		}
		if (PQntuples(r) != 1) {
			fprintf(stderr, "genpipe: run %lld does not exist\n", id);
			PQclear(r);
			PQclear(s);
			rc = 1;
			break;
		}
		const char *rstate = PQgetvalue(r, 0, 3);
		int done = !strcmp(rstate, "succeeded") || !strcmp(rstate, "failed") ||
			   !strcmp(rstate, "cancelled");
		if (tty && drawn)
			printf("\033[%dA", drawn);
		drawn = 0;
		if (tty) {
			printf("\033[2Krun %lld %s@%s: %s (%ss)\n", id, PQgetvalue(r, 0, 1),
			       PQgetvalue(r, 0, 2), rstate, PQgetvalue(r, 0, 6));
			drawn++;
		}
		for (int i = 0; i < PQntuples(s) && i < 256; i++) {
			const char *name = PQgetvalue(s, i, 0), *state = PQgetvalue(s, i, 2);
			double frac = -1, rate = 0;
			char msg[160] = "";
			pthread_mutex_lock(&w.mu);
			for (int k = 0; k < w.n; k++) {
				if (strcmp(w.p[k].stage, name))
					continue;
				frac = w.p[k].frac;
				snprintf(msg, sizeof msg, "%s", w.p[k].message);
				long long dt = w.p[k].last_ms - w.p[k].first_ms;
				if (dt > 0)
					rate = (w.p[k].frac - w.p[k].first_frac) * 1000.0 / (double)dt;
			}
			pthread_mutex_unlock(&w.mu);
			if (!strcmp(state, "succeeded") || !strcmp(state, "cached"))
				frac = 1;
			char b[32], eta[48] = "";
			bar(b, sizeof b, frac < 0 ? 0 : frac);
			if (!strcmp(state, "running") && rate > 0 && frac >= 0 && frac < 1)
				snprintf(eta, sizeof eta, "%5.1f%%/s eta %.0fs", rate * 100,
					 (1 - frac) / rate);
			char detail[200];
			snprintf(detail, sizeof detail, "%s", PQgetvalue(s, i, 4));
			if (tty) {
				char secs[24] = "      -";
				if (*PQgetvalue(s, i, 5))
					snprintf(secs, sizeof secs, "%6ss", PQgetvalue(s, i, 5));
				printf("\033[2K  %-20s %-10s %s %3.0f%% try %-2s %s %s %s\n", name,
				       state, b, frac < 0 ? 0 : frac * 100, PQgetvalue(s, i, 3),
				       secs, eta, strcmp(state, "failed") &&
				       strcmp(state, "retrying") ? (strcmp(state, "running") ? "" : msg)
								 : detail);
				drawn++;
			} else if (strcmp(last[i], state) != 0 && cli_json) {
				/* one JSON object per line and change, for scripts */
				cJSON *o = cJSON_CreateObject();
				cJSON_AddNumberToObject(o, "run", (double)id);
				cJSON_AddStringToObject(o, "stage", name);
				cJSON_AddStringToObject(o, "state", state);
				cJSON_AddNumberToObject(o, "attempt", atoi(PQgetvalue(s, i, 3)));
				if (*detail)
					cJSON_AddStringToObject(o, "detail", detail);
				char *t = cJSON_PrintUnformatted(o);
				puts(t ? t : "{}");
				free(t);
				cJSON_Delete(o);
				snprintf(last[i], sizeof last[i], "%s", state);
			} else if (strcmp(last[i], state) != 0) {
				printf("%s %s%s%s\n", name, state, *detail && (!strcmp(state, "failed") ||
				       !strcmp(state, "retrying")) ? ": " : "",
				       !strcmp(state, "failed") || !strcmp(state, "retrying") ? detail
											     : "");
				snprintf(last[i], sizeof last[i], "%s", state);
				last_line_ms[i] = gp_now_ms();
			} else if (!cli_json && !strcmp(state, "running") && *msg &&
				   gp_now_ms() - last_line_ms[i] >= 15000) {
				/* a log, not a screen: the worker's progress every 15 s */
				printf("%s %s %3.0f%% %s\n", name, b, frac < 0 ? 0 : frac * 100, msg);
				last_line_ms[i] = gp_now_ms();
			}
		}
		fflush(stdout);
		if (done) {
			if (cli_json)
				printf("{\"run\":%lld,\"state\":\"%s\",\"final\":true}\n", id, rstate);
			else if (!tty)
				printf("run %lld %s\n", id, rstate);
			if (*PQgetvalue(r, 0, 7) && strcmp(rstate, "succeeded") && !cli_json)
				printf("error: %s\n", PQgetvalue(r, 0, 7));
			rc = !strcmp(rstate, "succeeded") ? 0 : 1;
			PQclear(r);
			PQclear(s);
			break;
		}
		PQclear(r);
		PQclear(s);
		if (deadline && gp_now_ms() > deadline) {
			fprintf(stderr, "genpipe: run %lld not finished after %lld ms\n", id,
				cli_timeout_ms);
			rc = 1;
			break;
		}
		gp_sleep_ms(250);
	}
	if (sub) {
		natsSubscription_Unsubscribe(sub);
		natsSubscription_Destroy(sub);
	}
	gp_bus_destroy(bus);
	pthread_mutex_destroy(&w.mu);
	return rc;
}

int cmd_runs(int n, char **args)
{
	static const char usage[] = "usage: genpipe runs list [--pipeline NAME] [--limit N] | show "
				    "RUN | watch RUN [--timeout-ms N] | cancel RUN | retry RUN\n";
	if (n < 1) {
		fputs(usage, stderr);
		return 2;
	}
	long long id = 0;
	if (n == 2 && parse_run_id(args[1], &id))
		return 2;
	int known = (!strcmp(args[0], "list") && n == 1) ||
		    (n == 2 && (!strcmp(args[0], "show") || !strcmp(args[0], "watch") ||
				!strcmp(args[0], "cancel") || !strcmp(args[0], "retry")));
	if (!known) {
		fputs(usage, stderr);
		return 2;
	}
	struct gp_db *db = cli_db();
	if (!db)
		return 1;
	int rc = 0;
	struct gp_err err = { 0 };
	if (!strcmp(args[0], "list")) {
		rc = list_runs(db);
	} else if (!strcmp(args[0], "show")) {
		rc = show_run(db, id);
	} else if (!strcmp(args[0], "watch")) {
		rc = watch_run(db, id);
	} else if (!strcmp(args[0], "cancel")) {
		if (gp_run_cancel(db, id, &err)) {
			fprintf(stderr, "genpipe: %s\n", err.msg);
			rc = 1;
		} else {
			printf(cli_json ? "{\"run\":%lld,\"state\":\"cancelled\"}\n"
					: "run %lld cancelled\n",
			       id);
		}
	} else {
		if (gp_run_retry(db, id, &err)) {
			fprintf(stderr, "genpipe: %s\n", err.msg);
			rc = 1;
		} else {
			printf(cli_json ? "{\"run\":%lld,\"state\":\"running\"}\n"
					: "run %lld resumed: stages that did not succeed will run again\n",
			       id);
		}
	}
	gp_db_destroy(db);
	return rc;
}
