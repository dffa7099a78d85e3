/*
 * genpipe infer NAME --prompt TEXT [--version V | --alias A] [--max-tokens N]
 *   [--temperature T] [--top-k K] [--top-p P] [--seed S] [--stop S]...
 *   [--stream] [--deadline-ms MS] [--json]
 *
 * One request/reply on genpipe.infer.NAME. The completion goes to stdout;
 * the request id (the key to its telemetry and to feedback) and the
 * figures to stderr, or everything as one JSON object with --json.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "cli.h"
#include "subjects.h"
#include "wire.h"

static int number(const char *flag, const char *s, double lo, double hi, double *out)
{
	char *end = NULL;
	errno = 0;
	double v = strtod(s, &end);
	if (!*s || *end || errno || !(v >= lo && v <= hi)) {
		fprintf(stderr, "genpipe: --%s \"%s\" is not a number in %g..%g\n", flag, s, lo, hi);
		return -1;
	}
	*out = v;
	return 0;
}

static int print_result(const gp_infer_response *r, long long wall_ms, int streamed)
{
	int ok = !r->error_code || !*r->error_code;
	if (cli_json) {
		cJSON *o = cJSON_CreateObject();
		cJSON_AddStringToObject(o, "request_id", r->request_id);
		cJSON_AddNumberToObject(o, "model_version", (double)r->model_version);
		cJSON_AddStringToObject(o, "text", r->text ? r->text : "");
		cJSON_AddNumberToObject(o, "prompt_tokens", r->prompt_tokens);
		cJSON_AddNumberToObject(o, "output_tokens", r->output_tokens);
		cJSON_AddBoolToObject(o, "cache_hit", r->cache_hit);
		cJSON_AddStringToObject(o, "finish", r->finish ? r->finish : "");
		cJSON_AddNumberToObject(o, "latency_ms", r->latency_ms);
		cJSON_AddNumberToObject(o, "compute_ms", r->compute_ms);
		cJSON_AddNumberToObject(o, "round_trip_ms", (double)wall_ms);
		if (!ok) {
			cJSON_AddStringToObject(o, "error_code", r->error_code);
			cJSON_AddStringToObject(o, "error", r->error ? r->error : "");
		}
		cli_print_json(o);
	} else {
		if (!streamed)
			fputs(r->text ? r->text : "", stdout);
		putchar('\n');
		fflush(stdout);
		if (ok)
			fprintf(stderr, "request %s: version %lld, %u prompt + %u new tokens (%s), "
				"%.1f ms in the service, %lld ms round trip%s\n",
				r->request_id, (long long)r->model_version, r->prompt_tokens,
				r->output_tokens, r->finish ? r->finish : "", r->latency_ms, wall_ms,
				r->cache_hit ? ", from the cache" : "");
		else
			fprintf(stderr, "genpipe: infer: %s: %s (request %s)\n", r->error_code,
				r->error ? r->error : "", r->request_id);
	}
	return ok ? 0 : 1;
}

int cmd_infer(int n, char **args)
{
	struct cli_infer_opts *o = &cli_infer;
	if (n != 1 || !o->prompt) {
		fprintf(stderr, "genpipe: infer NAME --prompt TEXT [--version V | --alias A] "
				"[--max-tokens N] [--temperature T] [--top-k K] [--top-p P] "
				"[--seed S] [--stop S]... [--stream] [--deadline-ms MS] [--json]\n");
		return 2;
	}
	const char *model = args[0];
	if (!gp_bus_token_ok(model)) {
		fprintf(stderr, "genpipe: model \"%s\" is not a DNS label\n", model);
		return 2;
	}
	if (o->alias && *o->alias && !gp_bus_token_ok(o->alias)) {
		fprintf(stderr, "genpipe: alias \"%s\" is not a DNS label\n", o->alias);
		return 2;
	}
	double temp = 0, top_p = 1, seed = 0;
	if (number("temperature", o->temperature, 0, 100, &temp) ||
	    number("top-p", o->top_p, 0, 1, &top_p) ||
	    (*o->seed && number("seed", o->seed, 0, 9007199254740992.0, &seed)))
		return 2;
	if (o->max_tokens < 1 || o->max_tokens > 1000000 || o->top_k < 0 || o->top_k > 1000000 ||
	    o->version < 0 || o->deadline_ms < 0 || o->stop.n > 16) {
		fprintf(stderr, "genpipe: --max-tokens must be >= 1, --top-k, --version and "
				"--deadline-ms >= 0, at most 16 --stop\n");
		return 2;
	}
	uint8_t rnd[8] = {0};
	if (getrandom(rnd, sizeof(rnd), 0) != (ssize_t)sizeof(rnd))
		return 1;
	char rid[40];
	snprintf(rid, sizeof(rid), "cli-%02x%02x%02x%02x%02x%02x%02x%02x", rnd[0], rnd[1], rnd[2],
		 rnd[3], rnd[4], rnd[5], rnd[6], rnd[7]);
	Genpipe__V1__SamplingParams sp = GENPIPE__V1__SAMPLING_PARAMS__INIT;
	sp.max_tokens = (uint32_t)o->max_tokens;
	sp.temperature = (float)temp;
	sp.top_k = (uint32_t)o->top_k;
	sp.top_p = (float)top_p;
	sp.has_seed = *o->seed != 0;
	sp.seed = (uint64_t)seed;
	sp.stop = (char **)o->stop.v;
	sp.n_stop = (size_t)o->stop.n;
	gp_infer_request q = GENPIPE__V1__INFER_REQUEST__INIT;
	q.request_id = rid;
	q.model = (char *)model;
	q.alias = (char *)(o->alias ? o->alias : "");
	q.version = o->version;
	q.prompt = (char *)o->prompt;
	q.sampling = &sp;
	q.stream = o->stream && !cli_json;
	q.deadline_ms = o->deadline_ms;
	uint8_t *buf = NULL;
	size_t len = 0;
	struct gp_err err = {0};
	if (gp_wire_encode(&q.base, &buf, &len, &err)) {
		fprintf(stderr, "genpipe: %s\n", err.msg);
		return 1;
	}
	if (len > GP_WIRE_MAX_BYTES) {
		fprintf(stderr, "genpipe: the request is %zu bytes (limit %u)\n", len,
			GP_WIRE_MAX_BYTES);
		free(buf);
		return 2;
	}
	struct gp_bus *bus = cli_bus();
	if (!bus) {
		free(buf);
		return 1;
	}
	char subject[128];
	snprintf(subject, sizeof(subject), GP_SUBJ_INFER "%s", model);
	long long wait = (o->deadline_ms ? o->deadline_ms : 300000) + 5000;
	long long t0 = gp_now_ms();
	natsConnection *nc = gp_bus_conn(bus);
	natsInbox *inbox = NULL;
	natsSubscription *sub = NULL;
	natsStatus s = natsInbox_Create(&inbox);
	if (s == NATS_OK)
		s = natsConnection_SubscribeSync(&sub, nc, inbox);
	if (s == NATS_OK)
		s = natsConnection_PublishRequest(nc, subject, inbox, buf, (int)len);
	if (s == NATS_OK)
		s = natsConnection_Flush(nc);
	free(buf);
	int rc = 1, streamed = 0;
	while (s == NATS_OK) {
		natsMsg *m = NULL;
		long long left = wait - (gp_now_ms() - t0);
		s = left > 0 ? natsSubscription_NextMsg(&m, sub, left) : NATS_TIMEOUT;
		if (s != NATS_OK)
			break;
		if (natsMsg_IsNoResponders(m)) {
			natsMsg_Destroy(m);
			s = NATS_NO_RESPONDERS;
			break;
		}
		gp_infer_response *r = NULL;
		if (gp_wire_decode_infer_response(&r, (const uint8_t *)natsMsg_GetData(m),
						  (size_t)natsMsg_GetDataLength(m), &err)) {
			natsMsg_Destroy(m);
			fprintf(stderr, "genpipe: infer: a reply we cannot read: %s\n", err.msg);
			break;
		}
		natsMsg_Destroy(m);
		if (!r->final) {
			fputs(r->text ? r->text : "", stdout);
			fflush(stdout);
			streamed = 1;
			gp_wire_free_infer_response(r);
			continue;
		}
		rc = print_result(r, gp_now_ms() - t0, streamed);
		gp_wire_free_infer_response(r);
		break;
	}
	if (s == NATS_NO_RESPONDERS)
		fprintf(stderr, "genpipe: infer: no infer service serves \"%s\" (is genpipe-infer "
				"running?)\n", model);
	else if (s == NATS_TIMEOUT)
		fprintf(stderr, "genpipe: infer: no answer within %lld ms (request %s)\n", wait, rid);
	else if (s != NATS_OK)
		fprintf(stderr, "genpipe: infer: %s\n", natsStatus_GetText(s));
	natsSubscription_Destroy(sub);
	natsInbox_Destroy(inbox);
	gp_bus_destroy(bus);
	return rc;
}
