/*
 * stages.c: the deploy stage kind (see stages.h).
 */
#include "stages.h"

#include <cjson/cJSON.h>
#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bus.h"
#include "log.h"
#include "params.h"
#include "registry.h"

static const char *skip(const char *p)
{
	while (*p == ' ' || *p == '\t')
		p++;
	return p;
}

static const char *ident(const char *p, char *out, size_t n)
{
	size_t k = 0;
	while ((isalnum((unsigned char)*p) || *p == '_' || *p == '-') && k + 1 < n)
		out[k++] = *p++;
	out[k] = 0;
	return p;
}

gp_status gp_gate_parse(const char *text, struct gp_gate *g, struct gp_err *err)
{
	memset(g, 0, sizeof(*g));
	const char *p = skip(text);
	if (!strcmp(p, "always") || !*p) {
		g->always = 1;
		return GP_OK;
	}
	p = skip(ident(p, g->metric, sizeof(g->metric)));
	if (!g->metric[0] || !isalpha((unsigned char)g->metric[0]))
		return gp_err_set(err, GP_ERR_INVALID,
				  "promote_if \"%s\": expected a metric name first (e.g. "
				  "\"val_loss < production.val_loss\")", text);
	if ((p[0] == '<' || p[0] == '>') && p[1] == '=') {
		memcpy(g->op, p, 2);
		p += 2;
	} else if (p[0] == '<' || p[0] == '>') {
		g->op[0] = p[0];
		p++;
	} else {
		return gp_err_set(err, GP_ERR_INVALID,
				  "promote_if \"%s\": expected <, <=, > or >= after \"%s\"", text,
				  g->metric);
	}
	p = skip(p);
	char *end = NULL;
	double v = strtod(p, &end);
	if (end != p && isfinite(v)) {
		g->number = v;
		p = skip(end);
	} else {
		p = ident(p, g->alias, sizeof(g->alias));
		if (!g->alias[0] || *p != '.')
			return gp_err_set(err, GP_ERR_INVALID,
					  "promote_if \"%s\": expected a number or ALIAS.METRIC after "
					  "\"%s\"", text, g->op);
		p = skip(ident(p + 1, g->other_metric, sizeof(g->other_metric)));
		if (!g->other_metric[0])
			return gp_err_set(err, GP_ERR_INVALID,
					  "promote_if \"%s\": a metric name must follow \"%s.\"", text,
					  g->alias);
		g->against_alias = 1;
	}
	if (*p)
		return gp_err_set(err, GP_ERR_INVALID, "promote_if \"%s\": unexpected \"%s\"", text, p);
	return GP_OK;
}

int gp_gate_eval(const struct gp_gate *g, double cand, double ref)
{
	if (g->always)
		return 1;
	if (!g->against_alias)
		ref = g->number;
	if (!isfinite(cand) || !isfinite(ref))
		return 0;
	if (!strcmp(g->op, "<"))
		return cand < ref;
	if (!strcmp(g->op, "<="))
		return cand <= ref;
	if (!strcmp(g->op, ">"))
		return cand > ref;
	return cand >= ref;
}

static double metric_of(const char *json, const char *name)
{
	cJSON *j = json ? cJSON_Parse(json) : NULL;
	cJSON *v = cJSON_GetObjectItemCaseSensitive(j, name);
	double d = cJSON_IsNumber(v) && v->valuedouble >= 0 ? v->valuedouble : NAN;
	cJSON_Delete(j);
	return d;
}

void gp_deploy_handle(struct gp_job *job, void *closure)
{
	(void)closure;
	const gp_stage_job *msg = gp_job_msg(job);
	struct gp_db *db = gp_job_db(job);
	struct gp_err err = {0};
	cJSON *params = cJSON_Parse(msg->params_json);
	const char *model = NULL, *alias = NULL, *gate_text = NULL;
	long long version = 0;
	PGresult *r = NULL;
	char *outputs = NULL, *figures_text = NULL;
	cJSON *out = NULL, *figures = NULL;
	struct gp_gate gate;
	if (!cJSON_IsObject(params)) {
		gp_job_fail(job, 1, "params are not a JSON object");
		goto done;
	}
	if (gp_param_string(params, "with", "model", NULL, 63, &model, &err) ||
	    gp_param_int(params, "with", "version", 0, 1, 1LL << 31, &version, &err) ||
	    gp_param_string(params, "with", "alias", "production", 63, &alias, &err) ||
	    gp_param_string(params, "with", "promote_if", "always", 256, &gate_text, &err) ||
	    gp_gate_parse(gate_text, &gate, &err)) {
		gp_job_fail(job, 1, err.msg);
		goto done;
	}
	if (!gp_bus_token_ok(model) || !gp_bus_token_ok(alias)) {
		gp_job_fail(job, 1, "with.model and with.alias must be DNS labels");
		goto done;
	}
	if (gate.against_alias && strcmp(gate.alias, alias)) {
		snprintf(err.msg, sizeof(err.msg),
			 "with.promote_if compares with \"%s\" but the stage moves \"%s\"", gate.alias,
			 alias);
		gp_job_fail(job, 1, err.msg);
		goto done;
	}
	char ver[32], run[32];
	snprintf(ver, sizeof(ver), "%lld", version);
	snprintf(run, sizeof(run), "%lld", (long long)msg->run_id);
	/* a decision already recorded (a redelivered job) is the answer */
	const char *dp[] = {run, msg->stage};
	if (gp_db_exec(db, "read deploy decision",
		       "SELECT promoted, reason, figures::text FROM deploy_decisions "
		       "WHERE run_id = $1::bigint AND stage = $2", 2, dp, &r, &err)) {
		gp_job_fail(job, 0, err.msg);
		goto done;
	}
	int have = PQntuples(r) > 0;
	PQclear(r);
	r = NULL;
	const char *p[] = {model, ver, alias};
	if (gp_db_exec(db, "read versions",
		       "SELECT v.id, v.metrics::text, cv.version, cv.metrics::text "
		       "FROM models m JOIN model_versions v ON v.model_id = m.id AND v.version = $2::int "
		       "LEFT JOIN model_aliases a ON a.model_id = m.id AND a.alias = $3 "
		       "LEFT JOIN model_versions cv ON cv.id = a.model_version_id WHERE m.name = $1",
		       3, p, &r, &err)) {
		gp_job_fail(job, 0, err.msg);
		goto done;
	}
	if (PQntuples(r) == 0) {
		snprintf(err.msg, sizeof(err.msg), "model \"%s\" has no version %lld", model, version);
		gp_job_fail(job, 1, err.msg);
		goto done;
	}
	long long vid = atoll(PQgetvalue(r, 0, 0));
	long long current = PQgetisnull(r, 0, 2) ? 0 : atoll(PQgetvalue(r, 0, 2));
	double cand = metric_of(PQgetvalue(r, 0, 1), gate.metric[0] ? gate.metric : "val_loss");
	double ref = current ? metric_of(PQgetvalue(r, 0, 3),
					 gate.against_alias ? gate.other_metric : "val_loss")
			     : NAN;
	int promote;
	char reason[512];
	if (!current) {
		promote = 1;
		snprintf(reason, sizeof(reason), "first version behind %s@%s", model, alias);
	} else if (current == version) {
		promote = 1;
		snprintf(reason, sizeof(reason), "%s@%s already names version %lld", model, alias,
			 version);
	} else {
		promote = gp_gate_eval(&gate, cand, ref);
		if (gate.always)
			snprintf(reason, sizeof(reason), "promote_if always");
		else
			snprintf(reason, sizeof(reason), "%s %.5g %s %s %.5g (%s): %s", gate.metric,
				 cand, gate.op, gate.against_alias ? "current" : "threshold",
				 gate.against_alias ? ref : gate.number, gate_text,
				 promote ? "passed" : "failed");
	}
	figures = cJSON_CreateObject();
	cJSON_AddNumberToObject(figures, "candidate_version", (double)version);
	if (current)
		cJSON_AddNumberToObject(figures, "current_version", (double)current);
	if (isfinite(cand))
		cJSON_AddNumberToObject(figures, "candidate", cand);
	if (isfinite(ref))
		cJSON_AddNumberToObject(figures, "current", ref);
	cJSON_AddStringToObject(figures, "gate", gate_text);
	figures_text = cJSON_PrintUnformatted(figures);
	if (promote && current != version && !have) {
		char extra[700];
		snprintf(extra, sizeof(extra), "{\"run_id\": %lld, \"stage\": \"%s\"}",
			 (long long)msg->run_id, msg->stage);
		long long from = 0;
		if (gp_registry_move_alias(db, model, alias, version, "deploy", extra, &from, &err)) {
			gp_job_fail(job, err.status != GP_ERR_NOT_FOUND ? 0 : 1, err.msg);
			goto done;
		}
	}
	char vids[32];
	snprintf(vids, sizeof(vids), "%lld", vid);
	const char *ip[] = {run, msg->stage, vids, alias, promote ? "true" : "false", reason,
			    figures_text ? figures_text : "{}"};
	if (gp_db_exec(db, "record deploy decision",
		       "INSERT INTO deploy_decisions (run_id, stage, model_version_id, alias, promoted, "
		       "reason, figures) VALUES ($1::bigint, $2, $3::bigint, $4, $5::boolean, $6, "
		       "$7::jsonb) ON CONFLICT (run_id, stage) DO NOTHING",
		       7, ip, NULL, &err)) {
		gp_job_fail(job, 0, err.msg);
		goto done;
	}
	gp_info("deploy %s:%lld -> %s: %s (%s)", model, version, alias,
		promote ? "promoted" : "kept", reason);
	out = cJSON_CreateObject();
	cJSON_AddBoolToObject(out, "promoted", promote);
	cJSON_AddNumberToObject(out, "version", (double)version);
	cJSON_AddNumberToObject(out, "previous", (double)current);
	cJSON_AddStringToObject(out, "alias", alias);
	cJSON_AddStringToObject(out, "reason", reason);
	outputs = cJSON_PrintUnformatted(out);
	gp_job_succeed(job, outputs, figures_text);
done:
	PQclear(r);
	cJSON_Delete(params);
	cJSON_Delete(out);
	cJSON_Delete(figures);
	free(outputs);
	free(figures_text);
}
