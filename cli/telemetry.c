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
#include "telemetry.h"

struct show {
	cJSON *arr;
	long long found;
};

static int show_one(const gp_telemetry *t, unsigned long long seq, void *closure)
{
	struct show *sh = closure;
	sh->found++;
	if (sh->arr) {
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
		cJSON_AddItemToArray(sh->arr, o);
	} else {
		time_t ts = (time_t)(t->time_unix_ms / 1000);
		struct tm tm;
		char when[32];
		strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", gmtime_r(&ts, &tm));
		printf("%-19s  %-26s  %7lld  %6zu  %6u  %7.1fms  %-5s  %s\n", when, t->request_id,
		       (long long)t->model_version, t->n_prompt_tokens, t->output_tokens,
		       t->latency_ms, t->cache_hit ? "hit" : "-", t->error_code);
	}
	return sh->found >= cli_limit;
}

int cmd_telemetry(int n, char **args)
{
	if (n != 1 || !gp_bus_token_ok(args[0]) || cli_limit < 1) {
		fprintf(stderr, "genpipe: telemetry NAME [--limit N] [--json]\n");
		return 2;
	}
	struct gp_bus *bus = cli_bus();
	if (!bus)
		return 1;
	struct show sh = {cli_json ? cJSON_CreateArray() : NULL, 0};
	if (!cli_json)
		printf("%-19s  %-26s  %7s  %6s  %6s  %9s  %-5s  %s\n", "time", "request", "version",
		       "prompt", "output", "latency", "cache", "error");
	struct gp_err err = {0};
	gp_status st = gp_telemetry_scan(bus, args[0], 0, 20000, show_one, &sh, &err);
	gp_bus_destroy(bus);
	if (st) {
		cJSON_Delete(sh.arr);
		fprintf(stderr, "genpipe: telemetry: %s\n", err.msg);
		return 1;
	}
	if (cli_json)
		cli_print_json(sh.arr);
	else if (!sh.found)
		printf("(no requests of %s in the stream)\n", args[0]);
	return 0;
}
