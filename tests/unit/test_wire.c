/*
 * Unit tests of common/wire.c: every message round-trips, and each decoder
 * refuses what a receiver must not act on, with a message naming the field.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../check.h"
#include "wire.h"

static uint8_t *enc(const ProtobufCMessage *m, size_t *len)
{
	uint8_t *b = NULL;
	struct gp_err e = { 0 };
	REQUIRE_OK(gp_wire_encode(m, &b, len, &e), e);
	return b;
}

static void test_stage_job(void)
{
	gp_stage_job j = GENPIPE__V1__STAGE_JOB__INIT;
	j.attempt_id = 42;
	j.run_id = 7;
	j.stage = "train";
	j.kind = "train";
	j.attempt = 2;
	j.params_json = "{\"steps\":100}";
	size_t len;
	uint8_t *b = enc(&j.base, &len);
	CHECK(j.schema_version == GP_WIRE_SCHEMA_VERSION);
	gp_stage_job *d = NULL;
	struct gp_err e = { 0 };
	REQUIRE_OK(gp_wire_decode_stage_job(&d, b, len, &e), e);
	CHECK(d->attempt_id == 42 && d->run_id == 7 && d->attempt == 2);
	CHECK_STR(d->kind, "train");
	CHECK_STR(d->params_json, "{\"steps\":100}");
	gp_wire_free_stage_job(d);
	free(b);

	/* each invalid field */
	gp_stage_job k;
#define BAD(stmt, want)                                                            \
	do {                                                                      \
		k = j;                                                            \
		k.schema_version = 0;                                             \
		stmt;                                                             \
		uint8_t *bb = enc(&k.base, &len);                                 \
		gp_stage_job *dd = NULL;                                          \
		CHECK(gp_wire_decode_stage_job(&dd, bb, len, &e) != GP_OK);       \
		CHECK(dd == NULL);                                                \
		CHECK_CONTAINS(e.msg, want);                                      \
		free(bb);                                                         \
	} while (0)
	BAD(k.attempt_id = 0, "attempt_id must be > 0");
	BAD(k.run_id = -1, "run_id must be > 0");
	BAD(k.kind = "Train!", "kind \"Train!\" is not a DNS label");
	BAD(k.stage = "", "stage");
	BAD(k.attempt = 0, "attempt must be > 0");
	BAD(k.params_json = "{", "params_json is not valid JSON");
	BAD(k.params_json = "[1]", "params_json must be a JSON object");
	BAD(k.params_json = "{\"a\":\"\xff\"}", "params_json is not valid UTF-8");
	BAD(k.schema_version = 9, "unsupported schema_version 9");
#undef BAD
	/* not protobuf at all */
	const uint8_t junk[] = { 0xff, 0xff, 0xff, 0xff, 0x0f };
	gp_stage_job *dd = NULL;
	CHECK(gp_wire_decode_stage_job(&dd, junk, sizeof junk, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "stage job: not a valid protobuf message");
	/* field number 0 in a non-minimal varint: protobuf-c would keep it, we refuse */
	const uint8_t tag0[] = { 0x08, 0x01, 0x80, 0x00, 0x00 };
	CHECK(gp_wire_decode_stage_job(&dd, tag0, sizeof tag0, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "field number 0 is not allowed");
	/* empty message: schema_version missing */
	CHECK(gp_wire_decode_stage_job(&dd, junk, 0, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "unsupported schema_version 0");
	/* over the size limit, refused before parsing */
	uint8_t *huge = calloc(GP_WIRE_MAX_BYTES + 1, 1);
	REQUIRE(huge);
	CHECK(gp_wire_decode_stage_job(&dd, huge, GP_WIRE_MAX_BYTES + 1, &e) == GP_ERR_TOO_BIG);
	free(huge);
}

static void test_others(void)
{
	struct gp_err e = { 0 };
	size_t len;

	gp_stage_result r = GENPIPE__V1__STAGE_RESULT__INIT;
	r.attempt_id = 1;
	r.run_id = 1;
	r.stage = "prep";
	r.attempt = 1;
	r.status = GENPIPE__V1__RESULT_STATUS__RESULT_SUCCEEDED;
	r.outputs_json = "{\"dataset\":\"sha256:ab\"}";
	uint8_t *b = enc(&r.base, &len);
	gp_stage_result *rd = NULL;
	REQUIRE_OK(gp_wire_decode_stage_result(&rd, b, len, &e), e);
	CHECK(rd->status == GENPIPE__V1__RESULT_STATUS__RESULT_SUCCEEDED);
	gp_wire_free_stage_result(rd);
	free(b);
	r.status = GENPIPE__V1__RESULT_STATUS__RESULT_UNSPECIFIED;
	b = enc(&r.base, &len);
	CHECK(gp_wire_decode_stage_result(&rd, b, len, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "status is missing");
	free(b);

	Genpipe__V1__SamplingParams sp = GENPIPE__V1__SAMPLING_PARAMS__INIT;
	sp.temperature = 0.7f;
	sp.top_p = 0.9f;
	gp_infer_request q = GENPIPE__V1__INFER_REQUEST__INIT;
	q.request_id = "req-1";
	q.model = "tiny";
	q.prompt = "hello";
	q.sampling = &sp;
	b = enc(&q.base, &len);
	gp_infer_request *qd = NULL;
	REQUIRE_OK(gp_wire_decode_infer_request(&qd, b, len, &e), e);
	CHECK_STR(qd->prompt, "hello");
	CHECK(fabsf(qd->sampling->temperature - 0.7f) < 1e-6f);
	gp_wire_free_infer_request(qd);
	free(b);
	sp.top_p = 1.5f;
	b = enc(&q.base, &len);
	CHECK(gp_wire_decode_infer_request(&qd, b, len, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "top_p must be in [0, 1]");
	free(b);
	sp.top_p = 0.5f;
	sp.temperature = NAN;
	b = enc(&q.base, &len);
	CHECK(gp_wire_decode_infer_request(&qd, b, len, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "temperature is not a finite number");
	free(b);
	sp.temperature = 1;
	q.request_id = "bad id with spaces";
	b = enc(&q.base, &len);
	CHECK(gp_wire_decode_infer_request(&qd, b, len, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "request_id");
	free(b);

	gp_feedback f = GENPIPE__V1__FEEDBACK__INIT;
	f.request_id = "req-1";
	b = enc(&f.base, &len);
	gp_feedback *fd = NULL;
	CHECK(gp_wire_decode_feedback(&fd, b, len, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "needs a rating or a correction");
	free(b);
	f.rating = GENPIPE__V1__RATING__RATING_DOWN;
	b = enc(&f.base, &len);
	REQUIRE_OK(gp_wire_decode_feedback(&fd, b, len, &e), e);
	CHECK(fd->rating == GENPIPE__V1__RATING__RATING_DOWN);
	gp_wire_free_feedback(fd);
	free(b);

	uint32_t toks[3] = { 1, 2, 3 };
	gp_telemetry t = GENPIPE__V1__TELEMETRY__INIT;
	t.request_id = "r";
	t.model = "m";
	t.n_prompt_tokens = 3;
	t.prompt_tokens = toks;
	b = enc(&t.base, &len);
	gp_telemetry *td = NULL;
	REQUIRE_OK(gp_wire_decode_telemetry(&td, b, len, &e), e);
	CHECK(td->n_prompt_tokens == 3 && td->prompt_tokens[2] == 3);
	gp_wire_free_telemetry(td);
	free(b);

	gp_alert a = GENPIPE__V1__ALERT__INIT;
	a.model = "m";
	a.metric = "psi";
	a.value = 0.4;
	a.threshold = 0.2;
	b = enc(&a.base, &len);
	gp_alert *ad = NULL;
	REQUIRE_OK(gp_wire_decode_alert(&ad, b, len, &e), e);
	CHECK(ad->value == 0.4);
	gp_wire_free_alert(ad);
	free(b);

	gp_registry_change rc = GENPIPE__V1__REGISTRY_CHANGE__INIT;
	rc.model = "m";
	rc.alias = "production";
	rc.version = 3;
	b = enc(&rc.base, &len);
	gp_registry_change *rcd = NULL;
	REQUIRE_OK(gp_wire_decode_registry_change(&rcd, b, len, &e), e);
	CHECK(rcd->version == 3 && !strcmp(rcd->alias, "production"));
	gp_wire_free_registry_change(rcd);
	free(b);
	rc.version = 0;
	b = enc(&rc.base, &len);
	CHECK(gp_wire_decode_registry_change(&rcd, b, len, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "registry change: version");
	free(b);
	rc.version = 1;
	rc.alias = "Prod!";
	b = enc(&rc.base, &len);
	CHECK(gp_wire_decode_registry_change(&rcd, b, len, &e) == GP_ERR_INVALID);
	free(b);

	gp_retrain_trigger rt = GENPIPE__V1__RETRAIN_TRIGGER__INIT;
	rt.trigger_id = 3;
	rt.pipeline = "demo";
	rt.evidence_json = "{\"negative_rate\":0.5}";
	b = enc(&rt.base, &len);
	gp_retrain_trigger *rtd = NULL;
	REQUIRE_OK(gp_wire_decode_retrain_trigger(&rtd, b, len, &e), e);
	gp_wire_free_retrain_trigger(rtd);
	free(b);

	gp_stage_event ev = GENPIPE__V1__STAGE_EVENT__INIT;
	ev.attempt_id = 1;
	ev.run_id = 1;
	ev.stage = "train";
	ev.progress = INFINITY;
	b = enc(&ev.base, &len);
	gp_stage_event *evd = NULL;
	CHECK(gp_wire_decode_stage_event(&evd, b, len, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "progress is not a finite number");
	free(b);

	gp_infer_response rs = GENPIPE__V1__INFER_RESPONSE__INIT;
	rs.request_id = "r1";
	rs.text = "out";
	rs.final = 1;
	b = enc(&rs.base, &len);
	gp_infer_response *rsd = NULL;
	REQUIRE_OK(gp_wire_decode_infer_response(&rsd, b, len, &e), e);
	CHECK(rsd->final == 1);
	gp_wire_free_infer_response(rsd);
	free(b);
}

static void test_utf8(void)
{
	CHECK(gp_utf8_valid("plain", 5));
	CHECK(gp_utf8_valid("\xc3\xa9", 2));          /* é */
	CHECK(gp_utf8_valid("\xf0\x9f\x98\x80", 4));  /* emoji */
	CHECK(!gp_utf8_valid("\xc3", 1));             /* truncated */
	CHECK(!gp_utf8_valid("\xc0\xaf", 2));         /* overlong */
	CHECK(!gp_utf8_valid("\xed\xa0\x80", 3));     /* surrogate */
	CHECK(!gp_utf8_valid("\xf4\x90\x80\x80", 4)); /* > U+10FFFF */
	CHECK(!gp_utf8_valid("\x80", 1));
}

int main(void)
{
	test_stage_job();
	test_others();
	test_utf8();
	return CHECK_RESULT();
}
