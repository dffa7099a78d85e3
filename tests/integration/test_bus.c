/*
 * common/bus against a real nats-server: request/reply through a queue group
 * of responders (SendAsap), errors for a request nobody serves, subject
 * tokens, stream declaration is idempotent, batch publishes count their own
 * acknowledgements (duplicates, late ones, a subject without a stream), and drain lets in-flight async
 * handlers finish before the connection closes.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../check.h"
#include "../harness.h"
#include "subjects.h"

struct responder {
	struct gp_bus *bus;
	int served;
	const char *name;
};

static void on_request(natsConnection *nc, natsSubscription *sub, natsMsg *m, void *cls)
{
	(void)nc;
	(void)sub;
	struct responder *r = cls;
	char out[128];
	int n = snprintf(out, sizeof out, "%s:%.*s", r->name, natsMsg_GetDataLength(m),
			 natsMsg_GetData(m));
	struct gp_err e = { 0 };
	if (gp_bus_respond(r->bus, m, out, n, &e) == GP_OK)
		__atomic_fetch_add(&r->served, 1, __ATOMIC_SEQ_CST);
	natsMsg_Destroy(m);
}

static int slow_done;

static void on_slow(natsConnection *nc, natsSubscription *sub, natsMsg *m, void *cls)
{
	(void)nc;
	(void)sub;
	(void)cls;
	gp_sleep_ms(150);
	__atomic_fetch_add(&slow_done, 1, __ATOMIC_SEQ_CST);
	natsMsg_Destroy(m);
}

static int body(struct gp_test_env *env)
{
	struct gp_err e = { 0 };
	struct responder r1 = { .name = "r1" }, r2 = { .name = "r2" };
	struct gp_bus *client = gp_test_bus(env, "client");
	REQUIRE_OK(gp_bus_connect(&r1.bus, env->nats_url, "r1", GP_BUS_SEND_ASAP, 5000, &e), e);
	REQUIRE_OK(gp_bus_connect(&r2.bus, env->nats_url, "r2", GP_BUS_SEND_ASAP, 5000, &e), e);
	CHECK(gp_bus_connected(client));
	const char *subj = GP_SUBJ_INFER "tiny";
	natsSubscription *s1 = NULL, *s2 = NULL;
	REQUIRE(natsConnection_QueueSubscribe(&s1, gp_bus_conn(r1.bus), subj, GP_QUEUE_INFER,
					      on_request, &r1) == NATS_OK);
	REQUIRE(natsConnection_QueueSubscribe(&s2, gp_bus_conn(r2.bus), subj, GP_QUEUE_INFER,
					      on_request, &r2) == NATS_OK);
	natsConnection_Flush(gp_bus_conn(r1.bus));
	natsConnection_Flush(gp_bus_conn(r2.bus));
	int ok = 0;
	for (int i = 0; i < 40; i++) {
		natsMsg *reply = NULL;
		char q[16];
		int n = snprintf(q, sizeof q, "q%d", i);
		if (gp_bus_request(client, subj, q, n, 2000, &reply, &e) == GP_OK) {
			const char *d = natsMsg_GetData(reply);
			char want[16];
			snprintf(want, sizeof want, ":q%d", i);
			ok += strstr(d, want) != NULL;
			natsMsg_Destroy(reply);
		}
	}
	CHECK(ok == 40);
	/* a responder counts after its reply is out: let the last count land */
	long long until = gp_now_ms() + 2000;
	while (__atomic_load_n(&r1.served, __ATOMIC_SEQ_CST) +
		       __atomic_load_n(&r2.served, __ATOMIC_SEQ_CST) < 40 &&
	       gp_now_ms() < until)
		gp_sleep_ms(5);
	CHECK(r1.served + r2.served == 40);
	CHECK(r1.served > 0 && r2.served > 0); /* the queue group shares the load */

	/* Nobody serves this subject: a clear, fast error. */
	natsMsg *reply = NULL;
	long long t0 = gp_now_ms();
	gp_status st = gp_bus_request(client, GP_SUBJ_INFER "nobody", "x", 1, 2000, &reply, &e);
	CHECK(st == GP_ERR_UNAVAILABLE || st == GP_ERR_TIMEOUT);
	CHECK_CONTAINS(e.msg, "request on genpipe.infer.nobody");
	CHECK(gp_now_ms() - t0 < 5000);

	/* A message without a reply subject cannot be answered. */
	natsMsg *m = NULL;
	REQUIRE(natsMsg_Create(&m, "x.y", NULL, "a", 1) == NATS_OK);
	CHECK(gp_bus_respond(client, m, "b", 1, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "has no reply subject");
	natsMsg_Destroy(m);

	/* Declaring twice changes nothing and fails nothing. */
	int ns = 0;
	const struct gp_stream_def *sd = gp_bus_default_streams(&ns);
	REQUIRE_OK(gp_bus_declare(client, sd, ns, NULL, 0, &e), e);
	REQUIRE_OK(gp_bus_declare(client, sd, ns, NULL, 0, &e), e);
	/* A bad stream definition is refused with its name. */
	struct gp_stream_def bad = { .name = "BAD.NAME", .subjects = { "bad.>", NULL } };
	CHECK(gp_bus_declare(client, &bad, 1, NULL, 0, &e) != GP_OK);
	CHECK_CONTAINS(e.msg, "declare stream BAD.NAME");

	/* Nak with a delay: redelivered after the delay, not before; in-progress
	 * keeps a message past AckWait; term ends it for good. */
	struct gp_stream_def ts = { .name = "TESTACKS", .subjects = { "test.acks.>", NULL } };
	struct gp_consumer_def tc = { .stream = "TESTACKS", .durable = "acks",
				      .filter = "test.acks.>", .ack_wait_ms = 1000,
				      .max_deliver = -1, .max_ack_pending = 100 };
	REQUIRE_OK(gp_bus_declare(client, &ts, 1, &tc, 1, &e), e);
	natsSubscription *ps = NULL;
	REQUIRE_OK(gp_bus_pull_subscribe(client, &tc, &ps, &e), e);
	REQUIRE_OK(gp_bus_publish(client, "test.acks.1", "n", 1, NULL, 2000, NULL, NULL, &e), e);
	natsMsgList l = { 0 };
	REQUIRE_OK(gp_bus_fetch(ps, 1, 2000, &l, &e), e);
	struct gp_msg_meta meta;
	REQUIRE_OK(gp_bus_meta(l.Msgs[0], &meta, &e), e);
	CHECK(meta.delivered == 1);
	CHECK_STR(meta.stream, "TESTACKS");
	REQUIRE_OK(gp_bus_nak(l.Msgs[0], 800, &e), e);
	natsMsgList_Destroy(&l);
	CHECK(gp_bus_fetch(ps, 1, 400, &l, &e) == GP_ERR_TIMEOUT);
	REQUIRE_OK(gp_bus_fetch(ps, 1, 3000, &l, &e), e);
	REQUIRE_OK(gp_bus_meta(l.Msgs[0], &meta, &e), e);
	CHECK(meta.delivered == 2);
	/* in progress past AckWait (1 s) */
	for (int i = 0; i < 4; i++) {
		gp_sleep_ms(400);
		REQUIRE_OK(gp_bus_in_progress(l.Msgs[0], &e), e);
	}
	natsMsgList l2 = { 0 };
	CHECK(gp_bus_fetch(ps, 1, 300, &l2, &e) == GP_ERR_TIMEOUT); /* not redelivered */
	natsMsgList_Destroy(&l2);
	REQUIRE_OK(gp_bus_term(l.Msgs[0], &e), e);
	natsMsgList_Destroy(&l);
	CHECK(gp_bus_fetch(ps, 1, 1500, &l, &e) == GP_ERR_TIMEOUT);
	natsSubscription_Destroy(ps);

	/* Batch publish: every message acknowledged, duplicates counted, a
	 * subject no stream takes is an error, and acknowledgements that come
	 * after their batch gave up are not counted for the next batch. */
	struct gp_stream_def bs = { .name = "TESTBATCH", .subjects = { "test.batch.>", NULL } };
	REQUIRE_OK(gp_bus_declare(client, &bs, 1, NULL, 0, &e), e);
	struct gp_bus_out bo[3] = {
		{ "test.batch.1", "a", 1, "b-1" },
		{ "test.batch.2", "b", 1, "b-2" },
		{ "test.batch.1", "c", 1, "b-3" },
	};
	int dups = -1;
	REQUIRE_OK(gp_bus_publish_batch(client, bo, 3, 2000, &dups, &e), e);
	CHECK(dups == 0);
	REQUIRE_OK(gp_bus_publish_batch(client, bo, 3, 2000, &dups, &e), e);
	CHECK(dups == 3);
	struct gp_bus_out nowhere = { "test.nostream.1", "x", 1, "n-1" };
	CHECK(gp_bus_publish_batch(client, &nowhere, 1, 2000, &dups, &e) == GP_ERR_BUS);
	CHECK_CONTAINS(e.msg, "no stream takes the subject");
	/* r2 sends at once, so with no time to wait the batch is out and its
	 * acknowledgements arrive late */
	struct gp_bus_out late[3] = {
		{ "test.batch.3", "a", 1, "l-1" },
		{ "test.batch.3", "b", 1, "l-2" },
		{ "test.batch.3", "c", 1, "l-3" },
	};
	CHECK(gp_bus_publish_batch(r2.bus, late, 3, 0, &dups, &e) == GP_ERR_BUS);
	CHECK_CONTAINS(e.msg, "0 of 3 acknowledged");
	gp_sleep_ms(100);
	struct gp_bus_out next[2] = {
		{ "test.batch.4", "a", 1, "x-1" },
		{ "test.batch.4", "b", 1, "x-2" },
	};
	REQUIRE_OK(gp_bus_publish_batch(r2.bus, next, 2, 2000, &dups, &e), e);
	CHECK(dups == 0);
	/* the late batch was stored: publishing it again is three duplicates */
	REQUIRE_OK(gp_bus_publish_batch(r2.bus, late, 3, 2000, &dups, &e), e);
	CHECK(dups == 3);
	REQUIRE_OK(gp_bus_publish_batch(client, next, 2, 2000, &dups, &e), e);
	CHECK(dups == 2);

	/* Drain: in-flight handlers finish before the connection closes. */
	natsSubscription *slow = NULL;
	REQUIRE(natsConnection_Subscribe(&slow, gp_bus_conn(r1.bus), "slow.work", on_slow, NULL) ==
		NATS_OK);
	natsConnection_Flush(gp_bus_conn(r1.bus));
	for (int i = 0; i < 4; i++)
		REQUIRE(natsConnection_PublishString(gp_bus_conn(client), "slow.work", "x") == NATS_OK);
	natsConnection_Flush(gp_bus_conn(client));
	gp_sleep_ms(50);
	REQUIRE_OK(gp_bus_drain(r1.bus, 5000, &e), e);
	CHECK(__atomic_load_n(&slow_done, __ATOMIC_SEQ_CST) == 4);
	CHECK(!gp_bus_connected(r1.bus));

	/* Connecting to nothing fails within the wait, naming the URL. */
	struct gp_bus *none = NULL;
	t0 = gp_now_ms();
	CHECK(gp_bus_connect(&none, "nats://127.0.0.1:1", "x", 0, 300, &e) == GP_ERR_UNAVAILABLE);
	CHECK_CONTAINS(e.msg, "nats://127.0.0.1:1");
	CHECK(gp_now_ms() - t0 < 5000);
	CHECK(none == NULL);

	natsSubscription_Destroy(slow);
	natsSubscription_Destroy(s1);
	natsSubscription_Destroy(s2);
	gp_bus_destroy(r1.bus);
	gp_bus_destroy(r2.bus);
	gp_bus_destroy(client);
	return CHECK_RESULT();
}

int main(void)
{
	return gp_test_run(body);
}
