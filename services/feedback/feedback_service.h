/*
 * feedback_service.h: genpipe-feedback, the request log and user feedback.
 *
 * Two durable consumers, one loop:
 *   feedback-log on genpipe.telemetry.> : every telemetry event becomes an
 *     inference_events row (idempotent by request id), the log feedback is
 *     joined to;
 *   feedback on genpipe.feedback.> : Feedback messages (rating and/or
 *     correction by request id) recorded with gp_feedback_record,
 *     idempotent by stream sequence. A request id not (yet) in the log is
 *     retried (NAK, 1 s) while the log may still be catching up, then
 *     dead-lettered with the reason; an invalid message at once.
 * Retraining triggers on feedback are *planned* (the issue that closes the
 * loop).
 */
#ifndef GP_FEEDBACK_SERVICE_H
#define GP_FEEDBACK_SERVICE_H

#include "bus.h"
#include "db.h"
#include "http.h"

/* Tries of a feedback message whose request id is not in the log. */
#define GP_FEEDBACK_TRIES 5

struct gp_feedback_service;
gp_status gp_feedback_service_create(struct gp_feedback_service **out, struct gp_db *db,
				     struct gp_bus *bus, struct gp_metrics *metrics,
				     struct gp_err *err);
/* Take what is there (up to one batch from each consumer), waiting up to wait_ms. */
gp_status gp_feedback_service_poll(struct gp_feedback_service *s, long long wait_ms,
				   struct gp_err *err);
void gp_feedback_service_destroy(struct gp_feedback_service *s);

#endif
