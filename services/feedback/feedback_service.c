/*
 * feedback_service.c: the request log and feedback intake (feedback_service.h).
 */
#include "feedback_service.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "feedback.h"
#include "log.h"
#include "subjects.h"
#include "wire.h"
#include "worker.h"

struct gp_feedback_service {
	struct gp_db *db;
	struct gp_bus *bus;
	natsSubscription *log_sub, *fb_sub;
	struct gp_metric *m_logged, *m_feedback, *m_dead;
};

gp_status gp_feedback_service_create(struct gp_feedback_service **out, struct gp_db *db,
				     struct gp_bus *bus, struct gp_metrics *metrics,
				     struct gp_err *err)
{
	struct gp_feedback_service *s = calloc(1, sizeof(*s));
	if (!s)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	s->db = db;
	s->bus = bus;
	struct gp_consumer_def cds[2] = {
		{GP_STREAM_TELEMETRY, "feedback-log", GP_SUBJ_TELEMETRY ">", 30000, -1, 4096},
		{GP_STREAM_FEEDBACK, "feedback", GP_SUBJ_FEEDBACK ">", 30000, GP_FEEDBACK_TRIES + 1,
		 1024},
	};
	int ns = 0;
	const struct gp_stream_def *streams = gp_bus_default_streams(&ns);
	gp_status st = gp_bus_declare(bus, streams, ns, cds, 2, err);
	if (!st)
		st = gp_bus_pull_subscribe(bus, &cds[0], &s->log_sub, err);
	if (!st)
		st = gp_bus_pull_subscribe(bus, &cds[1], &s->fb_sub, err);
	if (st) {
		gp_feedback_service_destroy(s);
		return st;
	}
	s->m_logged = gp_metrics_get(metrics, GP_COUNTER, "genpipe_feedback_requests_logged_total",
				     "Telemetry events written to the request log", NULL, NULL, 0);
	s->m_feedback = gp_metrics_get(metrics, GP_COUNTER, "genpipe_feedback_recorded_total",
				       "Ratings and corrections recorded", NULL, NULL, 0);
	s->m_dead = gp_metrics_get(metrics, GP_COUNTER, "genpipe_feedback_dead_letters_total",
				   "Messages refused (undecodable, unknown request id)", NULL, NULL, 0);
	*out = s;
	return GP_OK;
}

void gp_feedback_service_destroy(struct gp_feedback_service *s)
{
	if (!s)
		return;
	if (s->log_sub)
		natsSubscription_Destroy(s->log_sub);
	if (s->fb_sub)
		natsSubscription_Destroy(s->fb_sub);
	free(s);
}

static void dead(struct gp_feedback_service *s, natsMsg *m, const char *reason)
{
	struct gp_err err = {0};
	struct gp_msg_meta meta = {0};
	gp_bus_meta(m, &meta, &err);
	if (gp_dead_letter(s->db, meta.stream, meta.consumer, natsMsg_GetSubject(m),
			   meta.stream_seq, natsMsg_GetData(m), (size_t)natsMsg_GetDataLength(m), reason,
			   &err))
		return; /* not recorded: leave it to come back */
	gp_bus_term(m, &err);
	gp_metric_inc(s->m_dead, 1);
	gp_warn("dead letter (%s #%llu): %s", meta.stream, (unsigned long long)meta.stream_seq,
		reason);
}

/* One telemetry event into the request log, in the open transaction. */
static gp_status log_event(struct gp_feedback_service *s, const gp_telemetry *t,
			   struct gp_err *err)
{
	size_t cap = t->n_prompt_tokens * 11 + 3, n = 0;
	char *ids = malloc(cap);
	if (!ids)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	ids[n++] = '{';
	for (size_t i = 0; i < t->n_prompt_tokens; i++)
		n += (size_t)snprintf(ids + n, cap - n, "%s%u", i ? "," : "", t->prompt_tokens[i]);
	snprintf(ids + n, cap - n, "}");
	char ver[32], pt[32], ot[32], lat[40], at[32];
	snprintf(ver, sizeof ver, "%lld", (long long)t->model_version);
	snprintf(pt, sizeof pt, "%zu", t->n_prompt_tokens);
	snprintf(ot, sizeof ot, "%u", t->output_tokens);
	snprintf(lat, sizeof lat, "%.6f", t->latency_ms);
	snprintf(at, sizeof at, "%lld", (long long)t->time_unix_ms);
	const char *p[] = {t->request_id, t->model, ver, *t->prompt ? t->prompt : NULL,
			   *t->completion ? t->completion : NULL, pt, ot, lat,
			   t->cache_hit ? "true" : "false",
			   *t->error_code ? t->error_code : NULL, ids, at};
	gp_status st = gp_db_exec(
		s->db, "log request",
		"INSERT INTO inference_events (request_id, model, version, model_version_id, prompt, "
		"completion, prompt_tokens, output_tokens, latency_ms, cache_hit, error_code, "
		"prompt_ids, served_at) SELECT $1, $2, $3::int, (SELECT v.id FROM models m JOIN "
		"model_versions v ON v.model_id = m.id WHERE m.name = $2 AND v.version = $3::int), "
		"$4, $5, $6::int, $7::int, $8::float8, $9::boolean, $10, $11::int[], "
		"to_timestamp($12::bigint / 1000.0) ON CONFLICT (request_id) DO NOTHING",
		12, p, NULL, err);
	free(ids);
	return st;
}

static gp_status take_log(struct gp_feedback_service *s, long long wait_ms, struct gp_err *err)
{
	natsMsgList list = {0};
	gp_status st = gp_bus_fetch(s->log_sub, GP_BUS_FETCH_MAX, wait_ms, &list, err);
	if (st == GP_ERR_TIMEOUT)
		return GP_OK;
	if (st)
		return st;
	gp_telemetry *t[GP_BUS_FETCH_MAX] = {0};
	for (int i = 0; i < list.Count; i++) {
		struct gp_err e2 = {0};
		if (gp_wire_decode_telemetry(&t[i], (const uint8_t *)natsMsg_GetData(list.Msgs[i]),
					     (size_t)natsMsg_GetDataLength(list.Msgs[i]), &e2)) {
			dead(s, list.Msgs[i], e2.msg);
			t[i] = NULL;
		}
	}
	/* the batch in one transaction, then its acks */
	if (!(st = gp_db_begin(s->db, err))) {
		for (int i = 0; !st && i < list.Count; i++)
			if (t[i])
				st = log_event(s, t[i], err);
		if (!st)
			st = gp_db_commit(s->db, err);
		else
			gp_db_rollback(s->db);
	}
	int logged = 0;
	for (int i = 0; i < list.Count; i++) {
		if (t[i] && !st) {
			struct gp_err e2 = {0};
			gp_bus_ack(list.Msgs[i], &e2);
			logged++;
		}
		gp_wire_free_telemetry(t[i]);
	}
	gp_metric_inc(s->m_logged, logged);
	natsMsgList_Destroy(&list);
	return st;
}

static gp_status take_feedback(struct gp_feedback_service *s, long long wait_ms,
			       struct gp_err *err)
{
	natsMsgList list = {0};
	gp_status st = gp_bus_fetch(s->fb_sub, GP_BUS_FETCH_MAX, wait_ms, &list, err);
	if (st == GP_ERR_TIMEOUT)
		return GP_OK;
	if (st)
		return st;
	for (int i = 0; i < list.Count; i++) {
		natsMsg *m = list.Msgs[i];
		struct gp_err e2 = {0};
		struct gp_msg_meta meta = {0};
		gp_feedback *f = NULL;
		if (gp_bus_meta(m, &meta, &e2)) {
			continue;
		}
		if (gp_wire_decode_feedback(&f, (const uint8_t *)natsMsg_GetData(m),
					    (size_t)natsMsg_GetDataLength(m), &e2)) {
			dead(s, m, e2.msg);
			continue;
		}
		enum gp_rating rating = f->rating == GENPIPE__V1__RATING__RATING_UP     ? GP_RATING_UP
					: f->rating == GENPIPE__V1__RATING__RATING_DOWN ? GP_RATING_DOWN
											: GP_RATING_NONE;
		int recorded = 0;
		gp_status fs = gp_feedback_record(s->db, f->request_id, rating, f->correction, f->user,
						  (long long)meta.stream_seq, NULL, &recorded, &e2);
		if (!fs) {
			gp_bus_ack(m, &e2);
			gp_metric_inc(s->m_feedback, recorded);
		} else if (fs == GP_ERR_NOT_FOUND && meta.delivered < GP_FEEDBACK_TRIES) {
			gp_bus_nak(m, 1000, &e2); /* the request log may be catching up */
		} else if (fs == GP_ERR_NOT_FOUND || fs == GP_ERR_INVALID || fs == GP_ERR_TOO_BIG) {
			dead(s, m, e2.msg);
		} else {
			gp_warn("feedback on %s: %s (will be redelivered)", f->request_id, e2.msg);
		}
		gp_wire_free_feedback(f);
	}
	natsMsgList_Destroy(&list);
	return GP_OK;
}

gp_status gp_feedback_service_poll(struct gp_feedback_service *s, long long wait_ms,
				   struct gp_err *err)
{
	gp_status st = take_log(s, wait_ms / 2, err);
	if (st)
		return st;
	return take_feedback(s, wait_ms / 2, err);
}
