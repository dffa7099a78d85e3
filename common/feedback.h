/*
 * feedback.h: recording user feedback on a served request, shared by
 * genpipe-feedback (messages on genpipe.feedback.<model>) and the CLI
 * (`genpipe feedback`).
 *
 * Feedback names a request id; the request must be in the request log
 * (inference_events, filled from the telemetry stream by genpipe-feedback),
 * which gives the model, the version and the prompt. One transaction
 * writes the feedback row and, for a correction, a feedback_corrections
 * row (prompt and corrected answer: what a retraining run ingests through
 * the `feedback:MODEL` source).
 */
#ifndef GP_FEEDBACK_H
#define GP_FEEDBACK_H

#include "db.h"
#include "status.h"

enum gp_rating { GP_RATING_NONE, GP_RATING_UP, GP_RATING_DOWN };

/*
 * Record feedback. rating NONE needs a correction. stream_seq > 0 makes it
 * idempotent (a redelivered message: GP_OK, *recorded 0). GP_ERR_NOT_FOUND
 * with a message when the request is not in the log. *model (may be NULL,
 * 64 bytes) gets the request's model.
 */
gp_status gp_feedback_record(struct gp_db *db, const char *request_id, enum gp_rating rating,
			     const char *correction, const char *author, long long stream_seq,
			     char model[64], int *recorded, struct gp_err *err);

#endif
