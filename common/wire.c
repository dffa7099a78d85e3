/*
 * wire.c: protobuf-c with limits and validation (see wire.h).
 */
#include "wire.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "bus.h"

int gp_utf8_valid(const char *s, size_t n)
{
	const unsigned char *p = (const unsigned char *)s;
	size_t i = 0;
	while (i < n) {
		unsigned char c = p[i];
		size_t k;
		uint32_t cp;
		if (c < 0x80) {
			i++;
			continue;
		} else if ((c & 0xE0) == 0xC0) {
			k = 1;
			cp = c & 0x1F;
		} else if ((c & 0xF0) == 0xE0) {
			k = 2;
			cp = c & 0x0F;
		} else if ((c & 0xF8) == 0xF0) {
			k = 3;
			cp = c & 0x07;
		} else {
			return 0;
		}
		if (i + k >= n)
			return 0;
		for (size_t j = 1; j <= k; j++) {
			if ((p[i + j] & 0xC0) != 0x80)
				return 0;
			cp = (cp << 6) | (p[i + j] & 0x3F);
		}
		if ((k == 1 && cp < 0x80) || (k == 2 && cp < 0x800) || (k == 3 && cp < 0x10000) ||
		    cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
			return 0;
		i += k + 1;
	}
	return 1;
}

/* Field checks shared by the validators; each returns 0 and fills err on failure. */
static int check_text(const char *msgname, const char *field, const char *s, size_t max,
		      struct gp_err *err)
{
	size_t n = s ? strlen(s) : 0;
	if (n > max) {
		gp_err_set(err, GP_ERR_TOO_BIG, "%s: %s is %zu bytes (limit %zu)", msgname, field, n,
			   max);
		return 0;
	}
	if (!gp_utf8_valid(s ? s : "", n)) {
		gp_err_set(err, GP_ERR_INVALID, "%s: %s is not valid UTF-8", msgname, field);
		return 0;
	}
	return 1;
}

static int check_json(const char *msgname, const char *field, const char *s, struct gp_err *err)
{
	if (!s || !*s)
		return 1;
	if (!check_text(msgname, field, s, GP_WIRE_MAX_JSON, err))
		return 0;
	cJSON *j = cJSON_ParseWithLength(s, strlen(s));
	if (!j) {
		gp_err_set(err, GP_ERR_INVALID, "%s: %s is not valid JSON", msgname, field);
		return 0;
	}
	int ok = cJSON_IsObject(j);
	cJSON_Delete(j);
	if (!ok)
		gp_err_set(err, GP_ERR_INVALID, "%s: %s must be a JSON object", msgname, field);
	return ok;
}

static int check_token(const char *msgname, const char *field, const char *s, int required,
		       struct gp_err *err)
{
	if ((!s || !*s) && !required)
		return 1;
	if (!gp_bus_token_ok(s)) {
		gp_err_set(err, GP_ERR_INVALID,
			   "%s: %s \"%.64s\" is not a DNS label (a-z, 0-9, '-', at most 63)",
			   msgname, field, s ? s : "");
		return 0;
	}
	return 1;
}

static int check_id(const char *msgname, const char *field, long long v, struct gp_err *err)
{
	if (v <= 0) {
		gp_err_set(err, GP_ERR_INVALID, "%s: %s must be > 0 (got %lld)", msgname, field, v);
		return 0;
	}
	return 1;
}

static int check_request_id(const char *msgname, const char *s, struct gp_err *err)
{
	size_t n = s ? strlen(s) : 0;
	if (n == 0 || n > 128) {
		gp_err_set(err, GP_ERR_INVALID, "%s: request_id must be 1 to 128 bytes", msgname);
		return 0;
	}
	for (size_t i = 0; i < n; i++) {
		char c = s[i];
		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
		      c == '-' || c == '_' || c == '.')) {
			gp_err_set(err, GP_ERR_INVALID,
				   "%s: request_id may hold only letters, digits, '-', '_', '.'",
				   msgname);
			return 0;
		}
	}
	return 1;
}

static int check_finite(const char *msgname, const char *field, double v, struct gp_err *err)
{
	if (!isfinite(v)) {
		gp_err_set(err, GP_ERR_INVALID, "%s: %s is not a finite number", msgname, field);
		return 0;
	}
	return 1;
}

static int v_stage_job(const gp_stage_job *m, struct gp_err *e)
{
	const char *n = "stage job";
	return check_id(n, "attempt_id", m->attempt_id, e) && check_id(n, "run_id", m->run_id, e) &&
	       check_token(n, "stage", m->stage, 1, e) && check_token(n, "kind", m->kind, 1, e) &&
	       check_id(n, "attempt", m->attempt, e) && check_json(n, "params_json", m->params_json, e) &&
	       (m->timeout_ms >= 0 ||
		(gp_err_set(e, GP_ERR_INVALID, "%s: timeout_ms must be >= 0", n), 0));
}

static int v_stage_event(const gp_stage_event *m, struct gp_err *e)
{
	const char *n = "stage event";
	return check_id(n, "attempt_id", m->attempt_id, e) && check_id(n, "run_id", m->run_id, e) &&
	       check_token(n, "stage", m->stage, 1, e) &&
	       check_text(n, "message", m->message, GP_WIRE_MAX_TEXT, e) &&
	       check_json(n, "metrics_json", m->metrics_json, e) &&
	       check_finite(n, "progress", m->progress, e) &&
	       check_text(n, "worker", m->worker, 256, e);
}

static int v_stage_result(const gp_stage_result *m, struct gp_err *e)
{
	const char *n = "stage result";
	if (m->status == GENPIPE__V1__RESULT_STATUS__RESULT_UNSPECIFIED)
		return gp_err_set(e, GP_ERR_INVALID, "%s: status is missing", n), 0;
	return check_id(n, "attempt_id", m->attempt_id, e) && check_id(n, "run_id", m->run_id, e) &&
	       check_token(n, "stage", m->stage, 1, e) && check_id(n, "attempt", m->attempt, e) &&
	       check_json(n, "outputs_json", m->outputs_json, e) &&
	       check_json(n, "metrics_json", m->metrics_json, e) &&
	       check_text(n, "error", m->error, GP_WIRE_MAX_TEXT, e) &&
	       check_text(n, "worker", m->worker, 256, e);
}

static int v_infer_request(const gp_infer_request *m, struct gp_err *e)
{
	const char *n = "inference request";
	if (!check_request_id(n, m->request_id, e) || !check_token(n, "model", m->model, 1, e) ||
	    !check_token(n, "alias", m->alias, 0, e) ||
	    !check_text(n, "prompt", m->prompt, GP_WIRE_MAX_TEXT, e))
		return 0;
	if (m->version < 0)
		return gp_err_set(e, GP_ERR_INVALID, "%s: version must be >= 0", n), 0;
	if (m->deadline_ms < 0)
		return gp_err_set(e, GP_ERR_INVALID, "%s: deadline_ms must be >= 0", n), 0;
	if (m->sampling) {
		const Genpipe__V1__SamplingParams *s = m->sampling;
		if (!check_finite(n, "temperature", s->temperature, e) ||
		    !check_finite(n, "top_p", s->top_p, e))
			return 0;
		if (s->temperature < 0)
			return gp_err_set(e, GP_ERR_INVALID, "%s: temperature must be >= 0", n), 0;
		if (s->top_p < 0 || s->top_p > 1)
			return gp_err_set(e, GP_ERR_INVALID, "%s: top_p must be in [0, 1]", n), 0;
		if (s->n_stop > 16)
			return gp_err_set(e, GP_ERR_TOO_BIG, "%s: at most 16 stop sequences", n), 0;
		for (size_t i = 0; i < s->n_stop; i++)
			if (!check_text(n, "stop", s->stop[i], 256, e))
				return 0;
	}
	return 1;
}

static int v_infer_response(const gp_infer_response *m, struct gp_err *e)
{
	const char *n = "inference response";
	return check_request_id(n, m->request_id, e) &&
	       check_text(n, "text", m->text, GP_WIRE_MAX_TEXT, e) &&
	       check_text(n, "error_code", m->error_code, 64, e) &&
	       check_text(n, "error", m->error, 4096, e) &&
	       check_finite(n, "latency_ms", m->latency_ms, e);
}

static int v_telemetry(const gp_telemetry *m, struct gp_err *e)
{
	const char *n = "telemetry";
	if (m->n_prompt_tokens > 65536)
		return gp_err_set(e, GP_ERR_TOO_BIG, "%s: more than 65536 prompt tokens", n), 0;
	return check_request_id(n, m->request_id, e) && check_token(n, "model", m->model, 1, e) &&
	       check_finite(n, "latency_ms", m->latency_ms, e) &&
	       check_text(n, "error_code", m->error_code, 64, e) &&
	       check_text(n, "prompt", m->prompt, GP_WIRE_MAX_TEXT, e) &&
	       check_text(n, "completion", m->completion, GP_WIRE_MAX_TEXT, e);
}

static int v_feedback(const gp_feedback *m, struct gp_err *e)
{
	const char *n = "feedback";
	if (m->rating == GENPIPE__V1__RATING__RATING_UNSPECIFIED &&
	    (!m->correction || !*m->correction))
		return gp_err_set(e, GP_ERR_INVALID, "%s: needs a rating or a correction", n), 0;
	return check_request_id(n, m->request_id, e) &&
	       check_text(n, "correction", m->correction, 64 << 10, e) &&
	       check_text(n, "user", m->user, 256, e);
}

static int v_retrain_trigger(const gp_retrain_trigger *m, struct gp_err *e)
{
	const char *n = "retrain trigger";
	return check_id(n, "trigger_id", m->trigger_id, e) &&
	       check_token(n, "pipeline", m->pipeline, 1, e) &&
	       check_token(n, "model", m->model, 0, e) && check_text(n, "rule", m->rule, 256, e) &&
	       check_text(n, "reason", m->reason, 4096, e) &&
	       check_json(n, "evidence_json", m->evidence_json, e);
}

static int v_alert(const gp_alert *m, struct gp_err *e)
{
	const char *n = "alert";
	return check_token(n, "model", m->model, 1, e) && check_text(n, "metric", m->metric, 128, e) &&
	       check_finite(n, "value", m->value, e) && check_finite(n, "threshold", m->threshold, e) &&
	       check_text(n, "message", m->message, 4096, e);
}

/*
 * protobuf-c 1.4 accepts a field number 0 written as a non-minimal varint
 * and keeps it as an unknown field, but refuses the same field once it is
 * re-encoded minimally. Field number 0 is invalid protobuf: refuse it here,
 * in nested messages too, so that what we accept also round-trips.
 */
static int unknown_fields_ok(const ProtobufCMessage *m, int depth)
{
	if (!m || depth > 8)
		return m == NULL;
	for (unsigned i = 0; i < m->n_unknown_fields; i++)
		if (m->unknown_fields[i].tag == 0)
			return 0;
	const ProtobufCMessageDescriptor *d = m->descriptor;
	for (unsigned i = 0; i < d->n_fields; i++) {
		const ProtobufCFieldDescriptor *f = &d->fields[i];
		if (f->type != PROTOBUF_C_TYPE_MESSAGE)
			continue;
		const char *base = (const char *)m + f->offset;
		if (f->label == PROTOBUF_C_LABEL_REPEATED) {
			size_t n = *(const size_t *)((const char *)m + f->quantifier_offset);
			ProtobufCMessage *const *v = *(ProtobufCMessage *const *const *)base;
			for (size_t k = 0; k < n; k++)
				if (!unknown_fields_ok(v[k], depth + 1))
					return 0;
		} else {
			const ProtobufCMessage *sub = *(const ProtobufCMessage *const *)base;
			if (sub && !unknown_fields_ok(sub, depth + 1))
				return 0;
		}
	}
	return 1;
}

static int v_registry_change(const gp_registry_change *m, struct gp_err *e)
{
	const char *n = "registry change";
	if (m->version <= 0 || m->from_version < 0)
		return gp_err_set(e, GP_ERR_INVALID, "%s: version must be > 0", n), 0;
	return check_token(n, "model", m->model, 1, e) && check_token(n, "alias", m->alias, 1, e);
}

#define GP_WIRE_DEFINE(name, pbname, label)                                                  \
	gp_status gp_wire_decode_##name(gp_##name **out, const uint8_t *buf, size_t len,      \
					struct gp_err *err)                                   \
	{                                                                                     \
		if (len > GP_WIRE_MAX_BYTES)                                                  \
			return gp_err_set(err, GP_ERR_TOO_BIG, "%s: %zu bytes (limit %u)",    \
					  label, len, GP_WIRE_MAX_BYTES);                     \
		gp_##name *m = genpipe__v1__##pbname##__unpack(NULL, len, buf);               \
		if (!m)                                                                       \
			return gp_err_set(err, GP_ERR_INVALID, "%s: not a valid protobuf message", \
					  label);                                             \
		if (!unknown_fields_ok(&m->base, 0)) {                                        \
			genpipe__v1__##pbname##__free_unpacked(m, NULL);                      \
			return gp_err_set(err, GP_ERR_INVALID, "%s: field number 0 is not "   \
					  "allowed", label);                                  \
		}                                                                             \
		if (m->schema_version != GP_WIRE_SCHEMA_VERSION) {                            \
			gp_err_set(err, GP_ERR_INVALID, "%s: unsupported schema_version %u "  \
				   "(expected %d)", label, m->schema_version,                 \
				   GP_WIRE_SCHEMA_VERSION);                                   \
			genpipe__v1__##pbname##__free_unpacked(m, NULL);                      \
			return GP_ERR_INVALID;                                                \
		}                                                                             \
		if (!v_##name(m, err)) {                                                      \
			genpipe__v1__##pbname##__free_unpacked(m, NULL);                      \
			return err ? err->status : GP_ERR_INVALID;                            \
		}                                                                             \
		*out = m;                                                                     \
		return GP_OK;                                                                 \
	}                                                                                     \
	void gp_wire_free_##name(gp_##name *m)                                                \
	{                                                                                     \
		if (m)                                                                        \
			genpipe__v1__##pbname##__free_unpacked(m, NULL);                      \
	}

GP_WIRE_DEFINE(stage_job, stage_job, "stage job")
GP_WIRE_DEFINE(stage_event, stage_event, "stage event")
GP_WIRE_DEFINE(stage_result, stage_result, "stage result")
GP_WIRE_DEFINE(infer_request, infer_request, "inference request")
GP_WIRE_DEFINE(infer_response, infer_response, "inference response")
GP_WIRE_DEFINE(telemetry, telemetry, "telemetry")
GP_WIRE_DEFINE(feedback, feedback, "feedback")
GP_WIRE_DEFINE(retrain_trigger, retrain_trigger, "retrain trigger")
GP_WIRE_DEFINE(alert, alert, "alert")
GP_WIRE_DEFINE(registry_change, registry_change, "registry change")

gp_status gp_wire_encode(const ProtobufCMessage *msg, uint8_t **out, size_t *len,
			 struct gp_err *err)
{
	/* Every message has schema_version as field 1, a uint32 at a known
	 * offset; set it through the descriptor so callers cannot forget. */
	const ProtobufCFieldDescriptor *f = protobuf_c_message_descriptor_get_field(
		msg->descriptor, 1);
	if (f && f->type == PROTOBUF_C_TYPE_UINT32) {
		uint32_t *v = (uint32_t *)((char *)msg + f->offset);
		if (*v == 0)
			*v = GP_WIRE_SCHEMA_VERSION;
	}
	size_t n = protobuf_c_message_get_packed_size(msg);
	if (n > GP_WIRE_MAX_BYTES)
		return gp_err_set(err, GP_ERR_TOO_BIG, "%s: encoded size %zu over limit %u",
				  msg->descriptor->short_name, n, GP_WIRE_MAX_BYTES);
	uint8_t *p = malloc(n ? n : 1);
	if (!p)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	protobuf_c_message_pack(msg, p);
	*out = p;
	*len = n;
	return GP_OK;
}
