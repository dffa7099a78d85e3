/*
 * bus.c: nats.c wrapper. See bus.h for the version-specific rules.
 */
#include "bus.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "log.h"
#include "subjects.h"

struct gp_bus {
	natsConnection *nc;
	jsCtx *js;
	natsOptions *opts;
	int flags;
	/* Batch publishes: one reply subscription for the connection's life,
	 * read synchronously (no delivery thread per batch); replies are
	 * "<inbox>.<n>" with n counting up, so a late reply to an earlier batch
	 * that timed out is recognised and dropped. */
	pthread_mutex_t pub_mu;
	natsSubscription *acks;
	char ack_prefix[64];
	unsigned long long ack_next;
};

gp_status gp_bus_status(natsStatus s, jsErrCode jerr, const char *what, struct gp_err *err)
{
	if (s == NATS_OK)
		return GP_OK;
	gp_status st;
	switch (s) {
	case NATS_TIMEOUT:
		st = GP_ERR_TIMEOUT;
		break;
	case NATS_NO_SERVER:
	case NATS_CONNECTION_CLOSED:
	case NATS_CONNECTION_DISCONNECTED:
	case NATS_STALE_CONNECTION:
	case NATS_NO_RESPONDERS:
	case NATS_DRAINING:
		st = GP_ERR_UNAVAILABLE;
		break;
	case NATS_NO_MEMORY:
		st = GP_ERR_NOMEM;
		break;
	case NATS_NOT_FOUND:
		st = GP_ERR_NOT_FOUND;
		break;
	case NATS_INVALID_ARG:
	case NATS_INVALID_SUBJECT:
		st = GP_ERR_INVALID;
		break;
	case NATS_MAX_PAYLOAD:
		st = GP_ERR_TOO_BIG;
		break;
	default:
		st = GP_ERR_BUS;
	}
	const char *last = nats_GetLastError(NULL);
	if (jerr)
		return gp_err_set(err, st, "%s: %s (jetstream error %d)", what,
				  natsStatus_GetText(s), (int)jerr);
	return gp_err_set(err, st, "%s: %s%s%s", what, natsStatus_GetText(s),
			  last && *last ? ": " : "", last && *last ? last : "");
}

static void on_disconnect(natsConnection *nc, void *cls)
{
	(void)cls;
	/* Also called when we close the connection ourselves: not news. */
	if (natsConnection_IsClosed(nc) || natsConnection_IsDraining(nc))
		return;
	gp_warn("nats disconnected; reconnecting");
}

static void on_reconnect(natsConnection *nc, void *cls)
{
	(void)nc;
	(void)cls;
	gp_info("nats reconnected");
}

gp_status gp_bus_connect(struct gp_bus **out, const char *url, const char *name, int flags,
			 long long wait_ms, struct gp_err *err)
{
	if (!url || !*url)
		return gp_err_set(err, GP_ERR_INVALID, "no nats url (set GENPIPE_NATS_URL)");
	struct gp_bus *b = calloc(1, sizeof *b);
	if (!b)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	pthread_mutex_init(&b->pub_mu, NULL);
	b->flags = flags;
	natsStatus s = natsOptions_Create(&b->opts);
	if (s == NATS_OK)
		s = natsOptions_SetURL(b->opts, url); /* accepts a comma-separated list */
	if (s == NATS_OK && name)
		s = natsOptions_SetName(b->opts, name);
	if (s == NATS_OK)
		s = natsOptions_SetMaxReconnect(b->opts, -1);
	if (s == NATS_OK)
		s = natsOptions_SetReconnectWait(b->opts, 250);
	if (s == NATS_OK)
		s = natsOptions_SetReconnectJitter(b->opts, 100, 1000);
	if (s == NATS_OK)
		s = natsOptions_SetTimeout(b->opts, 2000);
	if (s == NATS_OK)
		s = natsOptions_SetDisconnectedCB(b->opts, on_disconnect, NULL);
	if (s == NATS_OK)
		s = natsOptions_SetReconnectedCB(b->opts, on_reconnect, NULL);
	if (s == NATS_OK && (flags & GP_BUS_SEND_ASAP))
		s = natsOptions_SetSendAsap(b->opts, true);
	if (s != NATS_OK) {
		gp_status st = gp_bus_status(s, 0, "configure nats connection", err);
		gp_bus_destroy(b);
		return st;
	}
	long long deadline = gp_now_ms() + wait_ms;
	long long backoff = 100;
	for (;;) {
		s = natsConnection_Connect(&b->nc, b->opts);
		if (s == NATS_OK)
			break;
		if (gp_now_ms() + backoff > deadline) {
			gp_status st = gp_bus_status(s, 0, "could not connect to nats", err);
			gp_err_wrap(err, "%s", url);
			gp_bus_destroy(b);
			return st;
		}
		gp_sleep_ms(backoff);
		backoff = backoff * 2 > 2000 ? 2000 : backoff * 2;
	}
	jsOptions jo;
	jsOptions_Init(&jo);
	jo.Wait = 5000;
	s = natsConnection_JetStream(&b->js, b->nc, &jo);
	if (s != NATS_OK) {
		gp_status st = gp_bus_status(s, 0, "create jetstream context", err);
		gp_bus_destroy(b);
		return st;
	}
	*out = b;
	return GP_OK;
}

void gp_bus_destroy(struct gp_bus *b)
{
	if (!b)
		return;
	jsCtx_Destroy(b->js);
	natsSubscription_Destroy(b->acks);
	if (b->nc) {
		natsConnection_Close(b->nc);
		natsConnection_Destroy(b->nc);
	}
	natsOptions_Destroy(b->opts);
	pthread_mutex_destroy(&b->pub_mu);
	free(b);
}

natsConnection *gp_bus_conn(struct gp_bus *b)
{
	return b->nc;
}

jsCtx *gp_bus_js(struct gp_bus *b)
{
	return b->js;
}

int gp_bus_connected(struct gp_bus *b)
{
	return b && b->nc && natsConnection_Status(b->nc) == NATS_CONN_STATUS_CONNECTED;
}

static const struct gp_stream_def default_streams[] = {
	/* Jobs: a work queue; a message lives until a worker acks it. The
	 * outbox is the durable copy, so a week is only a backstop. */
	{ GP_STREAM_JOBS, { GP_SUBJ_JOBS ">", NULL }, 1, 7LL * 24 * 3600 * 1000, -1, 0 },
	{ GP_STREAM_EVENTS, { GP_SUBJ_EVENTS ">", GP_SUBJ_RESULTS ">", NULL }, 0,
	  3LL * 24 * 3600 * 1000, 1LL << 30, 0 },
	{ GP_STREAM_TELEMETRY, { GP_SUBJ_TELEMETRY ">", NULL }, 0, 7LL * 24 * 3600 * 1000,
	  4LL << 30, 0 },
	{ GP_STREAM_FEEDBACK, { GP_SUBJ_FEEDBACK ">", NULL }, 0, 30LL * 24 * 3600 * 1000,
	  1LL << 30, 0 },
	{ GP_STREAM_ALERTS, { GP_SUBJ_ALERTS ">", NULL }, 0, 30LL * 24 * 3600 * 1000, 1LL << 28,
	  0 },
	{ GP_STREAM_CONTROL, { GP_SUBJ_TRIGGERS ">", GP_SUBJ_REGISTRY ">", NULL }, 0,
	  30LL * 24 * 3600 * 1000, 1LL << 28, 0 },
};

const struct gp_stream_def *gp_bus_default_streams(int *n)
{
	*n = (int)(sizeof default_streams / sizeof default_streams[0]);
	return default_streams;
}

int gp_bus_token_ok(const char *s)
{
	size_t n = s ? strlen(s) : 0;
	if (n == 0 || n > 63 || s[0] == '-' || s[n - 1] == '-')
		return 0;
	for (size_t i = 0; i < n; i++) {
		char c = s[i];
		if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-'))
			return 0;
	}
	return 1;
}

struct gp_consumer_def gp_bus_job_consumer(const char *kind, char *durable_buf, size_t dlen,
					   char *filter_buf, size_t flen, long long ack_wait_ms)
{
	snprintf(durable_buf, dlen, GP_CONSUMER_JOBS_PREFIX "%s", kind);
	snprintf(filter_buf, flen, GP_SUBJ_JOBS "%s", kind);
	struct gp_consumer_def c = {
		.stream = GP_STREAM_JOBS,
		.durable = durable_buf,
		.filter = filter_buf,
		.ack_wait_ms = ack_wait_ms,
		.max_deliver = -1,
		.max_ack_pending = 1000,
	};
	return c;
}

gp_status gp_bus_declare(struct gp_bus *b, const struct gp_stream_def *streams, int nstreams,
			 const struct gp_consumer_def *consumers, int nconsumers,
			 struct gp_err *err)
{
	for (int i = 0; i < nstreams; i++) {
		const struct gp_stream_def *d = &streams[i];
		jsStreamConfig cfg;
		jsStreamConfig_Init(&cfg);
		int ns = 0;
		while (ns < 4 && d->subjects[ns])
			ns++;
		cfg.Name = d->name;
		cfg.Subjects = (const char **)d->subjects;
		cfg.SubjectsLen = ns;
		cfg.Retention = d->work_queue ? js_WorkQueuePolicy : js_LimitsPolicy;
		cfg.Storage = js_FileStorage;
		cfg.MaxAge = d->max_age_ms * 1000000LL;
		cfg.MaxBytes = d->max_bytes > 0 ? d->max_bytes : -1;
		if (d->dup_window_ms > 0)
			cfg.Duplicates = d->dup_window_ms * 1000000LL;
		jsErrCode jerr = 0;
		jsStreamInfo *si = NULL;
		natsStatus s = js_AddStream(&si, b->js, &cfg, NULL, &jerr);
		if (s != NATS_OK && jerr == JSStreamNameExistErr) {
			jerr = 0;
			s = js_UpdateStream(&si, b->js, &cfg, NULL, &jerr);
		}
		jsStreamInfo_Destroy(si);
		if (s != NATS_OK) {
			char what[128];
			snprintf(what, sizeof what, "declare stream %s", d->name);
			return gp_bus_status(s, jerr, what, err);
		}
	}
	for (int i = 0; i < nconsumers; i++) {
		const struct gp_consumer_def *d = &consumers[i];
		jsConsumerConfig cc;
		jsConsumerConfig_Init(&cc);
		cc.Durable = d->durable;
		cc.FilterSubject = d->filter;
		cc.AckPolicy = js_AckExplicit;
		cc.DeliverPolicy = js_DeliverAll;
		cc.AckWait = d->ack_wait_ms * 1000000LL;
		cc.MaxDeliver = d->max_deliver;
		cc.MaxAckPending = d->max_ack_pending;
		cc.MaxWaiting = 512;
		jsErrCode jerr = 0;
		jsConsumerInfo *ci = NULL;
		natsStatus s = js_AddConsumer(&ci, b->js, d->stream, &cc, NULL, &jerr);
		if (s != NATS_OK && (jerr == JSConsumerNameExistErr || jerr == JSConsumerExistingActiveErr ||
				     jerr == 10148 /* consumer already exists */)) {
			jerr = 0;
			s = js_UpdateConsumer(&ci, b->js, d->stream, &cc, NULL, &jerr);
		}
		jsConsumerInfo_Destroy(ci);
		if (s != NATS_OK) {
			char what[160];
			snprintf(what, sizeof what, "declare consumer %s on %s", d->durable, d->stream);
			return gp_bus_status(s, jerr, what, err);
		}
	}
	return GP_OK;
}

gp_status gp_bus_publish(struct gp_bus *b, const char *subject, const void *data, int len,
			 const char *msg_id, long long timeout_ms, int *duplicate, uint64_t *seq,
			 struct gp_err *err)
{
	natsMsg *m = NULL;
	jsPubAck *pa = NULL;
	jsErrCode jerr = 0;
	natsStatus s = natsMsg_Create(&m, subject, NULL, data, len);
	if (s == NATS_OK && msg_id)
		s = natsMsgHeader_Set(m, GP_HDR_MSG_ID, msg_id);
	jsPubOptions po;
	jsPubOptions_Init(&po);
	po.MaxWait = timeout_ms;
	if (s == NATS_OK)
		s = js_PublishMsg(&pa, b->js, m, &po, &jerr);
	natsMsg_Destroy(m);
	if (s != NATS_OK) {
		char what[300];
		snprintf(what, sizeof what, "publish to %s", subject);
		return gp_bus_status(s, jerr, what, err);
	}
	if (duplicate)
		*duplicate = pa->Duplicate;
	if (seq)
		*seq = pa->Sequence;
	jsPubAck_Destroy(pa);
	return GP_OK;
}

/* One PubAck of a batch: *dup set on a duplicate; GP_OK when stored. (A
 * no-responders status never gets here: NextMsg reports it.) */
static gp_status pub_ack(natsMsg *m, int *dup, struct gp_err *err)
{
	cJSON *j = cJSON_ParseWithLength(natsMsg_GetData(m), (size_t)natsMsg_GetDataLength(m));
	const cJSON *e = cJSON_GetObjectItemCaseSensitive(j, "error");
	gp_status st = GP_OK;
	if (e) {
		const cJSON *code = cJSON_GetObjectItemCaseSensitive(e, "err_code");
		const cJSON *desc = cJSON_GetObjectItemCaseSensitive(e, "description");
		st = gp_err_set(err, GP_ERR_BUS, "batch publish: jetstream error %d: %s",
				cJSON_IsNumber(code) ? code->valueint : 0,
				cJSON_IsString(desc) ? desc->valuestring : "(no description)");
	} else if (!cJSON_IsString(cJSON_GetObjectItemCaseSensitive(j, "stream"))) {
		st = gp_err_set(err, GP_ERR_BUS, "batch publish: unreadable acknowledgement");
	} else {
		*dup = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(j, "duplicate"));
	}
	cJSON_Delete(j);
	return st;
}

gp_status gp_bus_publish_batch(struct gp_bus *b, const struct gp_bus_out *msgs, int n,
			       long long timeout_ms, int *duplicates, struct gp_err *err)
{
	if (duplicates)
		*duplicates = 0;
	if (n <= 0)
		return GP_OK;
	unsigned char *done = calloc((size_t)n, 1);
	if (!done)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	pthread_mutex_lock(&b->pub_mu);
	natsStatus s = NATS_OK;
	if (!b->acks) {
		natsInbox *inbox = NULL;
		char wild[80];
		s = natsInbox_Create(&inbox);
		if (s == NATS_OK) {
			snprintf(b->ack_prefix, sizeof b->ack_prefix, "%s", (const char *)inbox);
			snprintf(wild, sizeof wild, "%s.*", b->ack_prefix);
			s = natsConnection_SubscribeSync(&b->acks, b->nc, wild);
		}
		natsInbox_Destroy(inbox);
	}
	unsigned long long base = b->ack_next;
	b->ack_next += (unsigned long long)n;
	for (int i = 0; s == NATS_OK && i < n; i++) {
		char reply[96];
		snprintf(reply, sizeof reply, "%s.%llu", b->ack_prefix, base + (unsigned long long)i);
		natsMsg *m = NULL;
		s = natsMsg_Create(&m, msgs[i].subject, reply, msgs[i].data, msgs[i].len);
		if (s == NATS_OK && msgs[i].msg_id)
			s = natsMsgHeader_Set(m, GP_HDR_MSG_ID, msgs[i].msg_id);
		if (s == NATS_OK)
			s = natsConnection_PublishMsg(b->nc, m);
		natsMsg_Destroy(m);
	}
	long long deadline = gp_now_ms() + timeout_ms;
	/* Out now, not after the client's write coalescing delay of a
	 * millisecond (a PING round trip, which runs beside the
	 * acknowledgements); a send-at-once connection wrote them already. */
	if (s == NATS_OK && !(b->flags & GP_BUS_SEND_ASAP))
		s = natsConnection_FlushTimeout(b->nc, timeout_ms > 0 ? timeout_ms : 1);
	gp_status st = s == NATS_OK ? GP_OK : gp_bus_status(s, 0, "batch publish", err);
	int acked = 0, dups = 0;
	while (!st && acked < n) {
		long long left = deadline - gp_now_ms();
		natsMsg *m = NULL;
		s = left > 0 ? natsSubscription_NextMsg(&m, b->acks, left) : NATS_TIMEOUT;
		if (s == NATS_TIMEOUT) {
			st = gp_err_set(err, GP_ERR_BUS,
					"batch publish: %d of %d acknowledged within %lld ms", acked, n,
					timeout_ms);
			break;
		}
		if (s == NATS_NO_RESPONDERS) { /* the client reads the status, not which one */
			st = gp_err_set(err, GP_ERR_BUS,
					"batch publish: no stream takes the subject of a message of "
					"the batch (the first is %s)",
					msgs[0].subject);
			break;
		}
		if (s != NATS_OK) {
			st = gp_bus_status(s, 0, "batch publish: read acknowledgements", err);
			break;
		}
		const char *subj = natsMsg_GetSubject(m), *dot = strrchr(subj, '.');
		unsigned long long k = dot ? strtoull(dot + 1, NULL, 10) : 0;
		if (dot && k >= base && k < base + (unsigned long long)n && !done[k - base]) {
			int dup = 0;
			st = pub_ack(m, &dup, err);
			done[k - base] = 1;
			acked++;
			dups += dup;
		} /* else a late reply to an earlier batch */
		natsMsg_Destroy(m);
	}
	pthread_mutex_unlock(&b->pub_mu);
	free(done);
	if (duplicates)
		*duplicates = dups;
	return st;
}

gp_status gp_bus_publish_core(struct gp_bus *b, const char *subject, const void *data, int len,
			      struct gp_err *err)
{
	char what[300];
	snprintf(what, sizeof what, "publish to %s", subject);
	return gp_bus_status(natsConnection_Publish(b->nc, subject, data, len), 0, what, err);
}

gp_status gp_bus_pull_subscribe(struct gp_bus *b, const struct gp_consumer_def *c,
				natsSubscription **sub, struct gp_err *err)
{
	jsSubOptions so;
	jsSubOptions_Init(&so);
	so.Stream = c->stream;
	so.Consumer = c->durable;
	jsErrCode jerr = 0;
	natsStatus s = js_PullSubscribe(sub, b->js, c->filter, c->durable, NULL, &so, &jerr);
	if (s != NATS_OK) {
		char what[160];
		snprintf(what, sizeof what, "bind to consumer %s", c->durable);
		return gp_bus_status(s, jerr, what, err);
	}
	return GP_OK;
}

gp_status gp_bus_fetch(natsSubscription *sub, int batch, long long timeout_ms, natsMsgList *list,
		       struct gp_err *err)
{
	if (batch < 1)
		batch = 1;
	if (batch > GP_BUS_FETCH_MAX)
		batch = GP_BUS_FETCH_MAX;
	long long deadline = gp_now_ms() + timeout_ms;
	for (;;) {
		long long left = deadline - gp_now_ms();
		if (left <= 0)
			return gp_err_set(err, GP_ERR_TIMEOUT, "fetch: no message within %lld ms",
					  timeout_ms);
		long long t0 = gp_now_ms();
		jsErrCode jerr = 0;
		natsMsgList l = { 0 };
		natsStatus s = natsSubscription_Fetch(&l, sub, batch, left, &jerr);
		if (s == NATS_OK && l.Count > 0) {
			*list = l;
			return GP_OK;
		}
		natsMsgList_Destroy(&l);
		if (s != NATS_OK && s != NATS_TIMEOUT && s != NATS_NOT_FOUND)
			return gp_bus_status(s, jerr, "fetch", err);
		/* nats.c < 3.6 can return a timeout at once after a 408 status:
		 * do not spin on it. */
		if (gp_now_ms() - t0 < 5)
			gp_sleep_ms(left < 20 ? left : 20);
	}
}

gp_status gp_bus_ack(natsMsg *m, struct gp_err *err)
{
	/* Not AckSync: the outcome is already committed in PostgreSQL, and a lost
	 * ack only means a redelivery that the claim then drops. */
	return gp_bus_status(natsMsg_Ack(m, NULL), 0, "ack", err);
}

gp_status gp_bus_nak(natsMsg *m, long long delay_ms, struct gp_err *err)
{
	return gp_bus_status(natsMsg_NakWithDelay(m, delay_ms, NULL), 0, "nak", err);
}

gp_status gp_bus_in_progress(natsMsg *m, struct gp_err *err)
{
	return gp_bus_status(natsMsg_InProgress(m, NULL), 0, "in-progress ack", err);
}

gp_status gp_bus_term(natsMsg *m, struct gp_err *err)
{
	return gp_bus_status(natsMsg_Term(m, NULL), 0, "term", err);
}

gp_status gp_bus_meta(natsMsg *m, struct gp_msg_meta *meta, struct gp_err *err)
{
	jsMsgMetaData *md = NULL;
	natsStatus s = natsMsg_GetMetaData(&md, m);
	if (s != NATS_OK)
		return gp_bus_status(s, 0, "read message metadata", err);
	meta->stream_seq = md->Sequence.Stream;
	meta->delivered = md->NumDelivered;
	snprintf(meta->stream, sizeof meta->stream, "%s", md->Stream ? md->Stream : "");
	snprintf(meta->consumer, sizeof meta->consumer, "%s", md->Consumer ? md->Consumer : "");
	jsMsgMetaData_Destroy(md);
	return GP_OK;
}

gp_status gp_bus_request(struct gp_bus *b, const char *subject, const void *data, int len,
			 long long timeout_ms, natsMsg **reply, struct gp_err *err)
{
	char what[300];
	snprintf(what, sizeof what, "request on %s", subject);
	return gp_bus_status(natsConnection_Request(reply, b->nc, subject, data, len, timeout_ms), 0,
			     what, err);
}

gp_status gp_bus_respond(struct gp_bus *b, natsMsg *req, const void *data, int len,
			 struct gp_err *err)
{
	const char *r = natsMsg_GetReply(req);
	if (!r)
		return gp_err_set(err, GP_ERR_INVALID, "request on %s has no reply subject",
				  natsMsg_GetSubject(req));
	return gp_bus_status(natsConnection_Publish(b->nc, r, data, len), 0, "respond", err);
}

gp_status gp_bus_drain(struct gp_bus *b, long long timeout_ms, struct gp_err *err)
{
	natsStatus s = natsConnection_DrainTimeout(b->nc, timeout_ms);
	if (s != NATS_OK)
		return gp_bus_status(s, 0, "drain", err);
	long long deadline = gp_now_ms() + timeout_ms;
	while (!natsConnection_IsClosed(b->nc) && gp_now_ms() < deadline)
		gp_sleep_ms(10);
	return GP_OK;
}
