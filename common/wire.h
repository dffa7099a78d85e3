/*
 * wire.h: encode and decode the messages of schemas/genpipe.proto.
 *
 * Every decoder is a parser of outside bytes, so each one:
 * - refuses input over GP_WIRE_MAX_BYTES before protobuf-c sees it,
 * - refuses a schema_version it does not know (0 means "field missing"),
 * - validates the fields a receiver relies on (ids positive, subject tokens
 *   are DNS labels, JSON fields parse, lengths bounded),
 * and reports the first problem in err ("stage job: attempt_id must be > 0").
 * A message that fails here is dead-lettered by the receiver, never retried.
 *
 * Decoded messages are owned by the caller; free with the matching
 * gp_wire_free_* (accepts NULL). Fuzz harnesses: tests/fuzz/fuzz_wire.c.
 */
#ifndef GP_WIRE_H
#define GP_WIRE_H

#include <stddef.h>
#include <stdint.h>

#include "genpipe.pb-c.h"
#include "status.h"

#define GP_WIRE_SCHEMA_VERSION 1
#define GP_WIRE_MAX_BYTES (1u << 20)
#define GP_WIRE_MAX_JSON (256u << 10)
#define GP_WIRE_MAX_TEXT (256u << 10)

typedef Genpipe__V1__StageJob gp_stage_job;
typedef Genpipe__V1__StageEvent gp_stage_event;
typedef Genpipe__V1__StageResult gp_stage_result;
typedef Genpipe__V1__InferRequest gp_infer_request;
typedef Genpipe__V1__InferResponse gp_infer_response;
typedef Genpipe__V1__Telemetry gp_telemetry;
typedef Genpipe__V1__Feedback gp_feedback;
typedef Genpipe__V1__RetrainTrigger gp_retrain_trigger;
typedef Genpipe__V1__Alert gp_alert;
typedef Genpipe__V1__RegistryChange gp_registry_change;

#define GP_WIRE_DECLARE(name)                                                              \
	gp_status gp_wire_decode_##name(gp_##name **out, const uint8_t *buf, size_t len,    \
					struct gp_err *err);                                 \
	void gp_wire_free_##name(gp_##name *m);

GP_WIRE_DECLARE(stage_job)
GP_WIRE_DECLARE(stage_event)
GP_WIRE_DECLARE(stage_result)
GP_WIRE_DECLARE(infer_request)
GP_WIRE_DECLARE(infer_response)
GP_WIRE_DECLARE(telemetry)
GP_WIRE_DECLARE(feedback)
GP_WIRE_DECLARE(retrain_trigger)
GP_WIRE_DECLARE(alert)
GP_WIRE_DECLARE(registry_change)

/*
 * Serialize any generated message (sets schema_version to the current one
 * first when it is 0). Caller owns *out (free()).
 */
gp_status gp_wire_encode(const ProtobufCMessage *msg, uint8_t **out, size_t *len,
			 struct gp_err *err);

/* 1 when s (length n) is well-formed UTF-8. */
int gp_utf8_valid(const char *s, size_t n);

#endif
