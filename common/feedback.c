/*
 * feedback.c: one rating or correction, joined to its request (feedback.h).
 */
#include "feedback.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

gp_status gp_feedback_record(struct gp_db *db, const char *request_id, enum gp_rating rating,
			     const char *correction, const char *author, long long stream_seq,
			     char model[64], int *recorded, struct gp_err *err)
{
	if (recorded)
		*recorded = 0;
	if (rating == GP_RATING_NONE && (!correction || !*correction))
		return gp_err_set(err, GP_ERR_INVALID, "feedback needs a rating or a correction");
	if (correction && strlen(correction) > (64u << 10))
		return gp_err_set(err, GP_ERR_TOO_BIG, "a correction is at most 64 KiB");
	PGresult *r = NULL;
	gp_status st = gp_db_begin(db, err);
	if (st)
		return st;
	const char *p[] = {request_id};
	st = gp_db_exec(db, "find request",
			"SELECT e.model, e.model_version_id, coalesce(e.prompt, '') "
			"FROM inference_events e WHERE e.request_id = $1", 1, p, &r, err);
	if (!st && PQntuples(r) == 0)
		st = gp_err_set(err, GP_ERR_NOT_FOUND,
				"no request \"%s\" in the request log (a request appears there a "
				"moment after it was answered, if its telemetry was sampled)",
				request_id);
	if (st)
		goto fail;
	char mdl[64];
	snprintf(mdl, sizeof mdl, "%s", PQgetvalue(r, 0, 0));
	char seq[32];
	snprintf(seq, sizeof seq, "%lld", stream_seq);
	const char *fp[] = {request_id,
			    rating == GP_RATING_UP ? "up" : rating == GP_RATING_DOWN ? "down" : NULL,
			    correction && *correction ? correction : NULL,
			    author ? author : "",
			    mdl,
			    PQgetisnull(r, 0, 1) ? NULL : PQgetvalue(r, 0, 1),
			    stream_seq > 0 ? seq : NULL};
	PGresult *ins = NULL;
	st = gp_db_exec(db, "record feedback",
			"INSERT INTO feedback (request_id, rating, correction, author, model, "
			"model_version_id, stream_seq) VALUES ($1, $2, $3, $4, $5, $6::bigint, "
			"$7::bigint) ON CONFLICT (stream_seq) DO NOTHING RETURNING id",
			7, fp, &ins, err);
	int fresh = !st && PQntuples(ins) == 1;
	PQclear(ins);
	if (!st && fresh && correction && *correction) {
		const char *cp[] = {mdl, request_id, PQgetvalue(r, 0, 2), correction};
		st = gp_db_exec(db, "record correction",
				"INSERT INTO feedback_corrections (model, request_id, prompt, correction) "
				"VALUES ($1, $2, $3, $4)", 4, cp, NULL, err);
	}
	if (st)
		goto fail;
	if ((st = gp_db_commit(db, err)))
		goto fail;
	if (model)
		snprintf(model, 64, "%s", mdl);
	if (recorded)
		*recorded = fresh;
	PQclear(r);
	return GP_OK;
fail:
	PQclear(r);
	gp_db_rollback(db);
	return st;
}
