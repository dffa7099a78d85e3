/*
 * genpipe telemetry NAME [--limit N] [--json]: the latest served requests
 * of model NAME as the telemetry stream holds them (newest first), read
 * back by sequence from the stream's end; at most 20,000 messages are
 * examined.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"
#include "subjects.h"
#include "wire.h"

int cmd_telemetry(int n, char **args)
{
	if (n != 1 || !gp_bus_token_ok(args[0]) || cli_limit < 1) {
		fprintf(stderr, "genpipe: telemetry NAME [--limit N] [--json]\n");
		return 2;
	}
	const char *model = args[0];
	struct gp_bus *bus = cli_bus();
	if (!bus)
		return 1;
	jsCtx *js = gp_bus_js(bus);
	jsStreamInfo *si = NULL;
	jsErrCode jerr = 0;
	natsStatus s = js_GetStreamInfo(&si, js, GP_STREAM_TELEMETRY, NULL, &jerr);
	if (s != NATS_OK) {
		fprintf(stderr, "genpipe: telemetry: %s\n", natsStatus_GetText(s));
		gp_bus_destroy(bus);
		return 1;
	}
	uint64_t first = si->State.FirstSeq, last = si->State.LastSeq;
	jsStreamInfo_Destroy(si);
	char subject[128];
	snprintf(subject, sizeof subject, GP_SUBJ_TELEMETRY "%s", model);
	cJSON *arr = cli_json ? cJSON_CreateArray() : NULL;
	if (!cli_json)
		printf("%-19s  %-26s  %7s  %6s  %6s  %9s  %-5s  %s\n", "time", "request", "version",
		       "prompt", "output", "latency", "cache", "error");
	long long found = 0;
	for (uint64_t seq = last, seen = 0; seq >= first && seq > 0 && found < cli_limit &&
					    seen < 20000; seq--, seen++) {
		natsMsg *m = NULL;
		if (js_GetMsg(&m, js, GP_STREAM_TELEMETRY, seq, NULL, &jerr) != NATS_OK)
			continue;
		if (strcmp(natsMsg_GetSubject(m), subject)) {
			natsMsg_Destroy(m);
			continue;
		}
		gp_telemetry *t = NULL;
		struct gp_err err = {0};
		if (gp_wire_decode_telemetry(&t, (const uint8_t *)natsMsg_GetData(m),
					     (size_t)natsMsg_GetDataLength(m), &err)) {
			natsMsg_Destroy(m);
			continue;
		}
		found++;
		if (cli_json) {
			cJSON *o = cJSON_CreateObject();
			cJSON_AddNumberToObject(o, "seq", (double)seq);
			cJSON_AddStringToObject(o, "request_id", t->request_id);
			cJSON_AddNumberToObject(o, "model_version", (double)t->model_version);
			cJSON_AddNumberToObject(o, "prompt_tokens", (double)t->n_prompt_tokens);
			cJSON_AddNumberToObject(o, "output_tokens", t->output_tokens);
			cJSON_AddNumberToObject(o, "latency_ms", t->latency_ms);
			cJSON_AddBoolToObject(o, "cache_hit", t->cache_hit);
			cJSON_AddStringToObject(o, "error_code", t->error_code);
			cJSON_AddNumberToObject(o, "time_unix_ms", (double)t->time_unix_ms);
			cJSON_AddStringToObject(o, "prompt", t->prompt);
			cJSON_AddStringToObject(o, "completion", t->completion);
			cJSON_AddItemToArray(arr, o);
		} else {
			time_t ts = (time_t)(t->time_unix_ms / 1000);
			struct tm tm;
			char when[32];
			strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", gmtime_r(&ts, &tm));
			printf("%-19s  %-26s  %7lld  %6zu  %6u  %7.1fms  %-5s  %s\n", when,
			       t->request_id, (long long)t->model_version, t->n_prompt_tokens,
			       t->output_tokens, t->latency_ms, t->cache_hit ? "hit" : "-",
			       t->error_code);
		}
		gp_wire_free_telemetry(t);
		natsMsg_Destroy(m);
	}
	if (cli_json)
		cli_print_json(arr);
	else if (!found)
		printf("(no requests of %s in the stream)\n", model);
	gp_bus_destroy(bus);
	return 0;
}
