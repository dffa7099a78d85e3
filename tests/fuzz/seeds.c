/*
 * Writes valid encodings of every wire message into CORPUS/<message>/ so the
 * fuzzers start from real structure instead of discovering field tags.
 * Usage: fuzz_seeds CORPUS_DIR
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "wire.h"

static int put(const char *dir, const char *msg, const ProtobufCMessage *m)
{
	char path[1024];
	snprintf(path, sizeof path, "%s/%s", dir, msg);
	if (mkdir(path, 0755) != 0 && errno != EEXIST)
		return 1;
	snprintf(path, sizeof path, "%s/%s/seed-valid", dir, msg);
	uint8_t *b = NULL;
	size_t len = 0;
	struct gp_err e = { 0 };
	if (gp_wire_encode(m, &b, &len, &e))
		return 1;
	FILE *f = fopen(path, "wb");
	if (!f) {
		free(b);
		return 1;
	}
	size_t w = fwrite(b, 1, len, f);
	fclose(f);
	free(b);
	return w != len;
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: fuzz_seeds CORPUS_DIR\n");
		return 2;
	}
	const char *d = argv[1];
	int bad = 0;
	gp_stage_job j = GENPIPE__V1__STAGE_JOB__INIT;
	j.attempt_id = 1, j.run_id = 2, j.stage = "train", j.kind = "train", j.attempt = 1;
	j.params_json = "{\"steps\":10,\"lr\":0.001}";
	bad |= put(d, "stage_job", &j.base);
	gp_stage_event ev = GENPIPE__V1__STAGE_EVENT__INIT;
	ev.attempt_id = 1, ev.run_id = 2, ev.stage = "train", ev.progress = 0.5;
	ev.type = GENPIPE__V1__EVENT_TYPE__EVENT_PROGRESS, ev.metrics_json = "{\"loss\":3.2}";
	bad |= put(d, "stage_event", &ev.base);
	gp_stage_result r = GENPIPE__V1__STAGE_RESULT__INIT;
	r.attempt_id = 1, r.run_id = 2, r.stage = "train", r.attempt = 1;
	r.status = GENPIPE__V1__RESULT_STATUS__RESULT_SUCCEEDED, r.outputs_json = "{\"m\":\"x\"}";
	bad |= put(d, "stage_result", &r.base);
	Genpipe__V1__SamplingParams sp = GENPIPE__V1__SAMPLING_PARAMS__INIT;
	char *stops[] = { "\n\n" };
	sp.temperature = 0.8f, sp.top_p = 0.9f, sp.top_k = 40, sp.n_stop = 1, sp.stop = stops;
	gp_infer_request q = GENPIPE__V1__INFER_REQUEST__INIT;
	q.request_id = "req-1", q.model = "tiny", q.prompt = "Once upon", q.sampling = &sp;
	bad |= put(d, "infer_request", &q.base);
	gp_infer_response rs = GENPIPE__V1__INFER_RESPONSE__INIT;
	rs.request_id = "req-1", rs.text = "a time", rs.final = 1, rs.latency_ms = 3.5;
	bad |= put(d, "infer_response", &rs.base);
	uint32_t toks[] = { 10, 20, 30 };
	gp_telemetry t = GENPIPE__V1__TELEMETRY__INIT;
	t.request_id = "req-1", t.model = "tiny", t.n_prompt_tokens = 3, t.prompt_tokens = toks;
	bad |= put(d, "telemetry", &t.base);
	gp_feedback f = GENPIPE__V1__FEEDBACK__INIT;
	f.request_id = "req-1", f.rating = GENPIPE__V1__RATING__RATING_DOWN, f.correction = "better";
	bad |= put(d, "feedback", &f.base);
	gp_retrain_trigger rt = GENPIPE__V1__RETRAIN_TRIGGER__INIT;
	rt.trigger_id = 1, rt.pipeline = "demo", rt.rule = "negative-rate";
	bad |= put(d, "retrain_trigger", &rt.base);
	gp_alert a = GENPIPE__V1__ALERT__INIT;
	a.model = "tiny", a.metric = "psi", a.value = 0.3, a.threshold = 0.2;
	bad |= put(d, "alert", &a.base);
	if (bad)
		fprintf(stderr, "fuzz_seeds: could not write seeds under %s\n", d);
	return bad;
}
