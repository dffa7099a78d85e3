/*
 * noop.c: the noop stage handler (see noop.h).
 */
#include "noop.h"

#include <cjson/cJSON.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "spec.h"

/* An integer parameter; 0 when absent or not a number (never a NaN cast). */
static int json_int(const cJSON *o, const char *key)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
	if (!cJSON_IsNumber(v) || v->valuedouble < -1e9 || v->valuedouble > 1e9)
		return 0;
	return (int)v->valuedouble;
}

void gp_noop_handle(struct gp_job *job, void *closure)
{
	const struct gp_noop_config *cfg = closure;
	const gp_stage_job *m = gp_job_msg(job);
	cJSON *p = cJSON_Parse(m->params_json && *m->params_json ? m->params_json : "{}");
	if (!cJSON_IsObject(p)) {
		gp_job_fail(job, 1, "params are not a JSON object");
		cJSON_Delete(p);
		return;
	}
	long long duration = 0;
	const cJSON *d = cJSON_GetObjectItemCaseSensitive(p, "duration");
	if (cJSON_IsString(d)) {
		duration = gp_spec_parse_duration(d->valuestring);
		if (duration < 0) {
			char msg[160];
			snprintf(msg, sizeof msg, "duration \"%.60s\" is not a duration", d->valuestring);
			gp_job_fail(job, 1, msg);
			cJSON_Delete(p);
			return;
		}
	} else if (cJSON_IsNumber(d) && d->valuedouble >= 0 && d->valuedouble < 1e12) {
		duration = (long long)d->valuedouble;
	}
	int fail = json_int(p, "fail_attempts");
	int crash = json_int(p, "crash_attempts");
	const char *msg = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(p, "message"));
	long long start = gp_now_ms();
	long long next_progress = start;
	for (;;) {
		long long el = gp_now_ms() - start;
		if (cfg && cfg->allow_crash && crash > 0 && (int)m->attempt <= crash &&
		    el >= duration / 2) {
			gp_warn("noop: crashing during attempt %u as asked", m->attempt);
			raise(SIGKILL);
		}
		if (el >= duration)
			break;
		int stop = gp_job_should_stop(job);
		if (stop == 1) {
			gp_job_fail(job, 0, "lease lost");
			cJSON_Delete(p);
			return;
		}
		if (stop == 2) {
			gp_job_release(job, "worker shutting down");
			cJSON_Delete(p);
			return;
		}
		if (duration > 0 && gp_now_ms() >= next_progress) {
			gp_job_progress(job, duration ? (double)el / (double)duration : 1.0,
					msg ? msg : "working", NULL);
			next_progress = gp_now_ms() + 250;
		}
		long long left = duration - el;
		gp_sleep_ms(left < 50 ? left : 50);
	}
	if ((int)m->attempt <= fail) {
		char e[96];
		snprintf(e, sizeof e, "failing attempt %u of the first %d, as asked", m->attempt, fail);
		gp_job_fail(job, 0, e);
		cJSON_Delete(p);
		return;
	}
	cJSON *out = cJSON_Duplicate(cJSON_GetObjectItemCaseSensitive(p, "outputs"), 1);
	if (!cJSON_IsObject(out)) {
		cJSON_Delete(out);
		out = cJSON_CreateObject();
	}
	cJSON_AddNumberToObject(out, "attempt", m->attempt);
	char *o = cJSON_PrintUnformatted(out);
	char metrics[64];
	snprintf(metrics, sizeof metrics, "{\"duration_ms\":%lld}", gp_now_ms() - start);
	gp_job_succeed(job, o, metrics);
	free(o);
	cJSON_Delete(out);
	cJSON_Delete(p);
}
