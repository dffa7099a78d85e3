/*
 * genpipe-infer on real servers, with the orchestrator relaying the outbox:
 *   1. answers, streaming, the response cache, and each request id in the
 *      telemetry stream (failures too);
 *   2. a table of abusive requests, each answered with a clear error within
 *      its deadline, the service still up afterwards;
 *   3. far more concurrent requests than slots + queue: the excess gets
 *      "busy" at once, the rest complete;
 *   4. moving the alias under load fails no request, and new requests
 *      reach the new version within 2 s (the registry message; the
 *      periodic backstop is set to a minute here);
 *   5. the deploy stage: a worse candidate is kept out with its reason, a
 *      better one is promoted, each decision recorded;
 *   6. the batch-infer stage: a dataset of prompts in, a completions
 *      artifact out, an over-long prompt an entry with its error;
 *   7. canaries: a sound candidate takes its share of live requests and is
 *      promoted; one whose checkpoint is gone fails its share and is rolled
 *      back, the stable version untouched;
 *   8. SIGTERM: the service exits 0; a replacement with a telemetry queue of
 *      one event serves a burst in full, drops telemetry and says so in
 *      /metrics; with a 3 MiB budget it unloads the least recently used
 *      version that no alias names to load another, and refuses one that
 *      can never fit; with --telemetry-sample 0 only failures are logged.
 * Also the CLI's infer and telemetry commands. The model versions (small,
 * random) are made here and put in the store.
 */
#include <cjson/cJSON.h>
#include <math.h>
#include <openssl/sha.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../check.h"
#include "../harness.h"

#include "artifact.h"
#include "bpe.h"
#include "dataset.h"
#include "http.h"
#include "model.h"
#include "registry.h"
#include "shard.h"
#include "stack.h"
#include "subjects.h"
#include "telemetry.h"
#include "wire.h"

static const struct gp_test_env *ENV;
static struct gp_db *db;
static char val_hash[65]; /* a validation shard every version records */
static struct gp_bus *bus;

#define q(...) gp_test_q(db, __VA_ARGS__)
#define qs(...) gp_test_qs(db, __VA_ARGS__)

static long long now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Put a checkpoint of a random model and register it as version v. */
static void make_version_w(struct gp_store *st, const char *tok_hash, int vocab, int v,
			   double val_loss, int width)
{
	struct gp_err e = {0};
	struct gp_model_config c = {.vocab = vocab, .padded_vocab = (vocab + 63) / 64 * 64,
				    .context = 64, .layers = 2, .heads = 2, .width = width};
	struct gp_model *m = NULL;
	REQUIRE_OK(gp_model_create(&m, &c, &e), e);
	gp_model_init(m, (uint64_t)v * 77);
	float *p = gp_model_params(m);
	for (size_t i = 0; i < gp_model_num_params(m); i++)
		p[i] *= 6.0f;
	struct gp_ckpt_meta meta = {.step = 1};
	uint8_t *img = NULL;
	size_t len = 0;
	REQUIRE_OK(gp_ckpt_encode(m, NULL, NULL, &meta, &img, &len, &e), e);
	char h[65];
	REQUIRE_OK(gp_store_put(st, img, len, h, &e), e);
	REQUIRE_OK(gp_artifact_register(db, st, h, "checkpoint", len, 0, NULL, NULL, &e), e);
	free(img);
	gp_model_destroy(m);
	char sql[1024];
	snprintf(sql, sizeof sql,
		 "INSERT INTO models (name) VALUES ('toy') ON CONFLICT DO NOTHING; "
		 "INSERT INTO model_versions (model_id, version, artifact_id, metrics, lineage) "
		 "SELECT m.id, %d, a.id, '{\"val_loss\": %g}', '{\"tokenizer\": \"sha256:%s\", "
		 "\"val_shards\": \"sha256:%s\"}' "
		 "FROM models m, artifacts a WHERE m.name = 'toy' AND a.content_hash = '%s'",
		 v, val_loss, tok_hash, val_hash, h);
	REQUIRE_OK(gp_db_run(db, "register version", sql, &e), e);
}

static void make_version(struct gp_store *st, const char *tok_hash, int vocab, int v,
			 double val_loss)
{
	make_version_w(st, tok_hash, vocab, v, val_loss, 32);
}

struct answer {
	int ok;                  /* a reply arrived and decoded */
	char code[32];
	char error[512];
	char text[4096];
	long long version;
	int cache_hit;
	int partials;
	char streamed[4096];
	long long ms;
};

static uint8_t *encode_req(const char *rid, const char *model, const char *prompt,
			   int max_tokens, float temp, int stream, long long version,
			   long long deadline_ms, size_t *len)
{
	Genpipe__V1__SamplingParams sp = GENPIPE__V1__SAMPLING_PARAMS__INIT;
	sp.max_tokens = (uint32_t)max_tokens;
	sp.temperature = temp;
	sp.top_p = 1;
	gp_infer_request r = GENPIPE__V1__INFER_REQUEST__INIT;
	r.request_id = (char *)rid;
	r.model = (char *)model;
	r.prompt = (char *)prompt;
	r.sampling = &sp;
	r.stream = stream;
	r.version = version;
	r.deadline_ms = deadline_ms;
	uint8_t *b = NULL;
	struct gp_err e = {0};
	/* encode without validation: abusive values must reach the service */
	r.base.descriptor = &genpipe__v1__infer_request__descriptor;
	r.schema_version = GP_WIRE_SCHEMA_VERSION;
	*len = protobuf_c_message_get_packed_size(&r.base);
	b = malloc(*len ? *len : 1);
	protobuf_c_message_pack(&r.base, b);
	(void)e;
	return b;
}

/* Send raw bytes to genpipe.infer.<model>; collect partials and the final reply. */
static struct answer send_raw(const char *model, const void *data, size_t len, long long wait_ms)
{
	struct answer a = {0};
	natsConnection *nc = gp_bus_conn(bus);
	natsInbox *inbox = NULL;
	natsSubscription *sub = NULL;
	char subject[128];
	snprintf(subject, sizeof subject, GP_SUBJ_INFER "%s", model);
	long long t0 = now_ms();
	natsStatus s = natsInbox_Create(&inbox);
	if (s == NATS_OK)
		s = natsConnection_SubscribeSync(&sub, nc, inbox);
	if (s == NATS_OK)
		s = natsConnection_PublishRequest(nc, subject, inbox, data, (int)len);
	if (s == NATS_OK)
		s = natsConnection_Flush(nc);
	while (s == NATS_OK) {
		natsMsg *m = NULL;
		long long left = wait_ms - (now_ms() - t0);
		if (left <= 0 || natsSubscription_NextMsg(&m, sub, left) != NATS_OK)
			break;
		gp_infer_response *r = NULL;
		struct gp_err e = {0};
		if (gp_wire_decode_infer_response(&r, (const uint8_t *)natsMsg_GetData(m),
						  (size_t)natsMsg_GetDataLength(m), &e)) {
			snprintf(a.error, sizeof a.error, "undecodable reply: %s", e.msg);
			natsMsg_Destroy(m);
			break;
		}
		natsMsg_Destroy(m);
		if (!r->final) {
			a.partials++;
			strncat(a.streamed, r->text, sizeof(a.streamed) - strlen(a.streamed) - 1);
			gp_wire_free_infer_response(r);
			continue;
		}
		a.ok = 1;
		snprintf(a.code, sizeof a.code, "%s", r->error_code);
		snprintf(a.error, sizeof a.error, "%s", r->error);
		snprintf(a.text, sizeof a.text, "%s", r->text);
		a.version = r->model_version;
		a.cache_hit = r->cache_hit;
		gp_wire_free_infer_response(r);
		break;
	}
	if (s != NATS_OK)
		snprintf(a.error, sizeof a.error, "nats: %s", natsStatus_GetText(s));
	a.ms = now_ms() - t0;
	natsSubscription_Destroy(sub);
	natsInbox_Destroy(inbox);
	return a;
}

static struct answer ask(const char *rid, const char *prompt, int max_tokens, float temp,
			 int stream, long long version)
{
	size_t len = 0;
	uint8_t *b = encode_req(rid, "toy", prompt, max_tokens, temp, stream, version, 0, &len);
	struct answer a = send_raw("toy", b, len, 10000);
	free(b);
	return a;
}

struct burst_result {
	int ok, busy, other;
	long long busy_ms; /* when the last "busy" arrived */
};

/* Publish n requests at once (ids PREFIX-i, temperature 1) and collect every reply. */
static struct burst_result burst(const char *prefix, int n, int max_tokens, long long deadline_ms)
{
	struct burst_result br = {0};
	struct gp_err e = {0};
	natsConnection *nc = gp_bus_conn(bus);
	natsSubscription *sub = NULL;
	char inbox[64];
	snprintf(inbox, sizeof inbox, "test.%s.*", prefix);
	REQUIRE(natsConnection_SubscribeSync(&sub, nc, inbox) == NATS_OK);
	long long t0 = now_ms();
	for (int i = 0; i < n; i++) {
		char rid[32], rep[64];
		snprintf(rid, sizeof rid, "%s-%d", prefix, i);
		snprintf(rep, sizeof rep, "test.%s.%d", prefix, i);
		size_t len = 0;
		uint8_t *req = encode_req(rid, "toy", "The quick", max_tokens, 1.0f, 0, 0, deadline_ms,
					  &len);
		natsConnection_PublishRequest(nc, GP_SUBJ_INFER "toy", rep, req, (int)len);
		free(req);
	}
	natsConnection_Flush(nc);
	for (int i = 0; i < n; i++) {
		natsMsg *m = NULL;
		if (natsSubscription_NextMsg(&m, sub, deadline_ms + 3000) != NATS_OK)
			break;
		gp_infer_response *r = NULL;
		if (!gp_wire_decode_infer_response(&r, (const uint8_t *)natsMsg_GetData(m),
						   (size_t)natsMsg_GetDataLength(m), &e)) {
			if (!*r->error_code) {
				br.ok++;
			} else if (!strcmp(r->error_code, "busy")) {
				br.busy++;
				br.busy_ms = now_ms() - t0;
			} else {
				br.other++;
				fprintf(stderr, "%s: %s %s\n", prefix, r->error_code, r->error);
			}
			gp_wire_free_infer_response(r);
		}
		natsMsg_Destroy(m);
	}
	natsSubscription_Destroy(sub);
	return br;
}

/* Ask until the service answers without error (up to 20 s). */
static struct answer wait_ready(const char *rid)
{
	struct answer a = {0};
	for (int i = 0; i < 200 && !(a.ok && !a.code[0]); i++) {
		a = ask(rid, "The quick", 4, 0, 0, 0);
		if (!a.ok)
			gp_sleep_ms(100);
	}
	return a;
}

/* The value of an unlabelled series in Prometheus text (-1: absent). */
static double metric_value(const char *body, const char *name)
{
	char key[160];
	snprintf(key, sizeof key, "\n%s ", name);
	const char *l = strstr(body, key);
	return l ? atof(l + strlen(key)) : -1;
}

/* Request ids of the latest telemetry events (error code after ':'). */
struct idbuf {
	char *out;
	size_t len, cap;
};

static int collect_id(const gp_telemetry *t, unsigned long long seq, void *closure)
{
	(void)seq;
	struct idbuf *b = closure;
	char line[300];
	int k = snprintf(line, sizeof line, "%s:%s;", t->request_id, t->error_code);
	if (b->len + (size_t)k + 1 < b->cap) {
		memcpy(b->out + b->len, line, (size_t)k + 1);
		b->len += (size_t)k;
	}
	return 0;
}

static char *telemetry_ids(void)
{
	struct gp_err e = {0};
	struct idbuf b = {calloc(1, 1 << 20), 0, 1 << 20};
	REQUIRE_OK(gp_telemetry_scan(bus, "toy", 0, 3000, collect_id, &b, &e), e);
	return b.out;
}

/* ---- load during an alias move ---- */

static atomic_int stop_load, load_failures, load_count;
static atomic_llong first_v2_ms;
static long long move_ms;

static void *load_main(void *arg)
{
	int id = (int)(long)arg, i = 0;
	while (!atomic_load(&stop_load)) {
		char rid[64], prompt[64];
		snprintf(rid, sizeof rid, "load-%d-%d", id, i);
		snprintf(prompt, sizeof prompt, "The quick %d", i++ % 50);
		struct answer a = ask(rid, prompt, 8, 0.0f, 0, 0);
		long long t = now_ms();
		atomic_fetch_add(&load_count, 1);
		if (!a.ok || a.code[0]) {
			fprintf(stderr, "load request %s failed: %s %s\n", rid, a.code, a.error);
			atomic_fetch_add(&load_failures, 1);
			continue;
		}
		long long expect = 0;
		if (a.version == 2)
			atomic_compare_exchange_strong(&first_v2_ms, &expect, t);
		/* after the switch has been seen, nothing goes back to version 1 */
		if (a.version == 1 && atomic_load(&first_v2_ms) && t > atomic_load(&first_v2_ms) + 500) {
			fprintf(stderr, "load request %s: version 1 after version 2 was served\n", rid);
			atomic_fetch_add(&load_failures, 1);
		}
	}
	return NULL;
}

static int body(struct gp_test_env *env)
{
	ENV = env;
	db = gp_test_db(env);
	bus = gp_test_bus(env, "test-infer");
	struct gp_err e = {0};
	char store_uri[600];
	snprintf(store_uri, sizeof store_uri, "file://%s/artifacts", env->dir);
	struct gp_store *st = NULL;
	REQUIRE_OK(gp_store_open(&st, store_uri, &e), e);
	struct gp_bpe_trainer *tr = NULL;
	REQUIRE_OK(gp_bpe_trainer_new(&tr, &e), e);
	const char *text = "The quick brown fox jumps over the lazy dog. A bird in the hand. ";
	for (int i = 0; i < 30; i++)
		REQUIRE_OK(gp_bpe_trainer_add(tr, text, strlen(text), &e), e);
	struct gp_bpe *tok = NULL;
	REQUIRE_OK(gp_bpe_train(tr, 300, 0, &tok, &e), e);
	gp_bpe_trainer_free(tr);
	uint8_t *tb = NULL;
	size_t tl = 0;
	REQUIRE_OK(gp_bpe_save(tok, &tb, &tl, &e), e);
	char th[65];
	REQUIRE_OK(gp_store_put(st, tb, tl, th, &e), e);
	int vocab = gp_bpe_vocab_size(tok);
	free(tb);
	{
		uint16_t *vids = NULL;
		size_t nv = 0, vcap = 0;
		for (int i = 0; i < 20; i++)
			REQUIRE_OK(gp_bpe_encode(tok, text, strlen(text), &vids, &nv, &vcap, &e), e);
		uint8_t *sb = NULL;
		size_t sl = 0;
		REQUIRE_OK(gp_shard_encode(vids, nv, &sb, &sl, &e), e);
		REQUIRE_OK(gp_store_put(st, sb, sl, val_hash, &e), e);
		free(sb);
		free(vids);
	}
	gp_bpe_free(tok);
	make_version(st, th, vocab, 1, 5.0);
	make_version(st, th, vocab, 2, 4.0);
	gp_store_close(st);
	REQUIRE_OK(gp_registry_move_alias(db, "toy", "production", 1, "test", NULL, NULL, &e), e);

	gp_test_service(env, "genpipe-orchestrator", "--sweep-ms", "200", NULL);
	pid_t infer = gp_test_service(env, "genpipe-infer", "--data-dir", env->dir, "--model", "toy",
				      "--slots", "4", "--queue", "4", "--max-new-tokens", "64",
				      "--registry-poll-ms", "60000", "--deadline-ms", "5000", NULL);
	struct answer a = wait_ready("warmup");
	REQUIRE(a.ok);
	CHECK_STR(a.code, "");
	CHECK(a.version == 1);

	/* 1. answers, cache, streaming */
	struct answer b = ask("req-plain", "The quick brown", 20, 0, 0, 0);
	CHECK(b.ok && !b.code[0] && !b.cache_hit);
	struct answer c = ask("req-again", "The quick brown", 20, 0, 0, 0);
	CHECK(c.ok && c.cache_hit);
	CHECK_STR(c.text, b.text);
	struct answer s = ask("req-stream", "A bird", 24, 0.7f, 1, 0);
	CHECK(s.ok && !s.code[0]);
	CHECK_STR(s.streamed, s.text);
	printf("plain: \"%s\" (%lld ms); cached: %lld ms; streamed %d parts\n", b.text, b.ms, c.ms,
	       s.partials);
	struct answer v2 = ask("req-v2", "The quick brown", 20, 0, 0, 2);
	CHECK(v2.ok && v2.version == 2 && !v2.cache_hit);

	/* the CLI: --json, streaming, and errors with their exit codes */
	{
		char cmd[2048], out[8192];
		snprintf(cmd, sizeof cmd,
			 "%s --nats-url %s infer toy --prompt 'The quick brown' --max-tokens 20 --json",
			 GENPIPE_CLI, env->nats_url);
		FILE *f = popen(cmd, "r");
		REQUIRE(f);
		size_t n = fread(out, 1, sizeof out - 1, f);
		out[n] = 0;
		CHECK(pclose(f) == 0);
		cJSON *j = cJSON_Parse(out);
		CHECK_STR(cJSON_GetStringValue(cJSON_GetObjectItem(j, "text")), b.text);
		const char *rid = cJSON_GetStringValue(cJSON_GetObjectItem(j, "request_id"));
		CHECK(rid && !strncmp(rid, "cli-", 4));
		CHECK(cJSON_IsTrue(cJSON_GetObjectItem(j, "cache_hit")));
		cJSON_Delete(j);
		snprintf(cmd, sizeof cmd,
			 "%s --nats-url %s infer toy --prompt 'A bird' --max-tokens 24 --temperature 0.7 "
			 "--seed 5 --stream 2>&1", GENPIPE_CLI, env->nats_url);
		f = popen(cmd, "r");
		REQUIRE(f);
		n = fread(out, 1, sizeof out - 1, f);
		out[n] = 0;
		CHECK(pclose(f) == 0);
		CHECK_CONTAINS(out, "request cli-");
		CHECK_CONTAINS(out, "version 1");
		snprintf(cmd, sizeof cmd,
			 "%s --nats-url %s infer toy --prompt hi --version 42 2>&1", GENPIPE_CLI,
			 env->nats_url);
		f = popen(cmd, "r");
		REQUIRE(f);
		n = fread(out, 1, sizeof out - 1, f);
		out[n] = 0;
		int rc = pclose(f);
		CHECK(WIFEXITED(rc) && WEXITSTATUS(rc) == 1);
		CHECK_CONTAINS(out, "not_found: model \"toy\" has no version 42");
		snprintf(cmd, sizeof cmd, "%s --nats-url %s infer toy --prompt hi --temperature -1 2>&1",
			 GENPIPE_CLI, env->nats_url);
		f = popen(cmd, "r");
		REQUIRE(f);
		n = fread(out, 1, sizeof out - 1, f);
		out[n] = 0;
		rc = pclose(f);
		CHECK(WIFEXITED(rc) && WEXITSTATUS(rc) == 2);
		CHECK_CONTAINS(out, "--temperature");
		snprintf(cmd, sizeof cmd, "%s --nats-url %s telemetry toy --limit 3 --json",
			 GENPIPE_CLI, env->nats_url);
		gp_sleep_ms(300);
		f = popen(cmd, "r");
		REQUIRE(f);
		n = fread(out, 1, sizeof out - 1, f);
		out[n] = 0;
		CHECK(pclose(f) == 0);
		j = cJSON_Parse(out);
		CHECK(cJSON_GetArraySize(j) == 3);
		cJSON_Delete(j);
	}

	/* 2. abusive requests: a clear error within the deadline each */
	struct {
		const char *what, *code, *contains;
		int max_tokens;
		float temp;
		long long version;
		size_t prompt_bytes;
		int garbage;
	} table[] = {
		{"max tokens 10^9", "bad_request", "max_tokens", 1000000000, 0, 0, 0, 0},
		{"negative temperature", "bad_request", "temperature", 8, -1.0f, 0, 0, 0},
		{"NaN temperature", "bad_request", "temperature", 8, NAN, 0, 0, 0},
		{"unknown version", "not_found", "no version 99", 8, 0, 99, 0, 0},
		{"600 KB prompt", "bad_request", "prompt", 8, 0, 0, 600000, 0},
		{"prompt over the context", "bad_request", "the limit is", 8, 0, 0, 4000, 0},
		{"malformed protobuf", "bad_request", "", 0, 0, 0, 0, 1},
	};
	char ids[16][32];
	for (size_t i = 0; i < sizeof table / sizeof *table; i++) {
		snprintf(ids[i], sizeof ids[i], "abuse-%zu", i);
		char *prompt = calloc(1, table[i].prompt_bytes + 16);
		for (size_t k = 0; k < table[i].prompt_bytes; k++)
			prompt[k] = "abcdefgh "[k % 9];
		if (!table[i].prompt_bytes)
			strcpy(prompt, "The quick");
		size_t len = 0;
		static const char junk[] = "\x0a\xff\xff\xff\xff\x0f garbage";
		uint8_t *req = NULL;
		if (table[i].garbage) {
			len = sizeof junk - 1;
			req = malloc(len);
			memcpy(req, junk, len);
		} else {
			req = encode_req(ids[i], "toy", prompt, table[i].max_tokens, table[i].temp, 0,
					 table[i].version, 2000, &len);
		}
		struct answer r = send_raw("toy", req, len, 3000);
		printf("%-24s -> %s: %s (%lld ms)\n", table[i].what, r.code, r.error, r.ms);
		CHECK(r.ok);
		CHECK_STR(r.code, table[i].code);
		CHECK_CONTAINS(r.error, table[i].contains);
		CHECK(r.ms < 2000);
		free(req);
		free(prompt);
	}
	/* 10 MB does not even leave the client: NATS's payload limit */
	{
		size_t big = 10u << 20;
		char *p = malloc(big);
		memset(p, 'a', big);
		long long t0 = now_ms();
		natsStatus ns = natsConnection_Publish(gp_bus_conn(bus), GP_SUBJ_INFER "toy", p,
						       (int)big);
		printf("10 MB prompt -> %s (%lld ms)\n", natsStatus_GetText(ns), now_ms() - t0);
		CHECK(ns == NATS_MAX_PAYLOAD);
		free(p);
	}
	CHECK(kill(infer, 0) == 0);

	/* 3. far more concurrent requests than slots + queue (8) */
	{
		struct burst_result br = burst("flood", 40, 64, 5000);
		printf("flood of 40: %d answered, %d busy (the last busy after %lld ms), %d other\n",
		       br.ok, br.busy, br.busy_ms, br.other);
		CHECK(br.ok + br.busy == 40 && br.other == 0);
		CHECK(br.ok >= 8 && br.busy >= 1);
	}
	a = ask("after-abuse", "The quick", 4, 0, 0, 0);
	CHECK(a.ok && !a.code[0]);
	CHECK(kill(infer, 0) == 0);

	/* telemetry: every request id above, failures included */
	gp_sleep_ms(500);
	char *tel = telemetry_ids();
	CHECK_CONTAINS(tel, "req-plain:;");
	CHECK_CONTAINS(tel, "req-again:;");
	CHECK_CONTAINS(tel, "req-stream:;");
	CHECK_CONTAINS(tel, "abuse-0:bad_request;");
	CHECK_CONTAINS(tel, "abuse-3:not_found;");
	CHECK_CONTAINS(tel, "flood-0:");
	CHECK_CONTAINS(tel, "malformed-");
	free(tel);

	/* 4. move the alias under load */
	pthread_t lt[3];
	long long t_start = now_ms();
	for (long i = 0; i < 3; i++)
		pthread_create(&lt[i], NULL, load_main, (void *)i);
	gp_sleep_ms(1000);
	move_ms = now_ms();
	REQUIRE_OK(gp_registry_move_alias(db, "toy", "production", 2, "test", NULL, NULL, &e), e);
	gp_sleep_ms(3000);
	atomic_store(&stop_load, 1);
	for (int i = 0; i < 3; i++)
		pthread_join(lt[i], NULL);
	long long switched = atomic_load(&first_v2_ms) ? atomic_load(&first_v2_ms) - move_ms : -1;
	printf("alias move under load: %d requests in %lld ms, %d failed; version 2 served %lld ms "
	       "after the move\n", atomic_load(&load_count), now_ms() - t_start,
	       atomic_load(&load_failures), switched);
	CHECK(atomic_load(&load_count) > 20);
	CHECK(atomic_load(&load_failures) == 0);
	CHECK(switched >= 0 && switched <= 2000);
	CHECK(q("SELECT count(*) FROM audit_log WHERE action = 'model.alias' AND object = "
		"'toy@production'") == 2);

	/* 5. the deploy stage */
	const char *yaml =
		"apiVersion: genpipe/v1\nkind: Pipeline\nmetadata: {name: ship}\nspec:\n"
		"  params: {v: {type: int, default: 1}}\n"
		"  stages:\n"
		"    - name: deploy\n      kind: deploy\n"
		"      with: {model: toy, version: \"${params.v}\", "
		"promote_if: \"val_loss < production.val_loss\"}\n";
	/* version 1 (val loss 5.0) against production's 2 (4.0): kept out */
	const char *p1[] = {"v=1"};
	long long r1 = gp_test_submit(db, yaml, p1, 1);
	REQUIRE(gp_test_wait_run(db, r1, 60000) == 1);
	CHECK(q("SELECT count(*) FROM deploy_decisions WHERE run_id = %lld AND NOT promoted", r1) == 1);
	char *reason = qs("SELECT reason FROM deploy_decisions WHERE run_id = %lld", r1);
	printf("deploy of version 1: %s\n", reason ? reason : "(none)");
	CHECK_CONTAINS(reason ? reason : "", "failed");
	free(reason);
	CHECK(q("SELECT v.version FROM model_aliases a JOIN model_versions v ON v.id = "
		"a.model_version_id WHERE a.alias = 'production'") == 2);
	/* version 3, better: promoted, and served */
	st = NULL;
	REQUIRE_OK(gp_store_open(&st, store_uri, &e), e);
	make_version(st, th, vocab, 3, 3.0);
	gp_store_close(st);
	const char *p3[] = {"v=3"};
	long long r3 = gp_test_submit(db, yaml, p3, 1);
	REQUIRE(gp_test_wait_run(db, r3, 60000) == 1);
	CHECK(q("SELECT count(*) FROM deploy_decisions WHERE run_id = %lld AND promoted", r3) == 1);
	CHECK(q("SELECT v.version FROM model_aliases a JOIN model_versions v ON v.id = "
		"a.model_version_id WHERE a.alias = 'production'") == 3);
	long long t0 = now_ms();
	for (;;) {
		a = ask("after-deploy", "A bird", 4, 0.5f, 0, 0);
		if ((a.ok && a.version == 3) || now_ms() - t0 > 5000)
			break;
		gp_sleep_ms(50);
	}
	CHECK(a.ok && a.version == 3);
	/* the same deploy again is not taken from the cache: it decides again */
	long long r4 = gp_test_submit(db, yaml, p3, 1);
	REQUIRE(gp_test_wait_run(db, r4, 60000) == 1);
	CHECK(q("SELECT count(*) FROM deploy_decisions WHERE run_id = %lld", r4) == 1);
	CHECK(q("SELECT count(*) FROM audit_log WHERE action = 'model.alias'") == 3);

	/* 6. batch-infer over a dataset of prompts */
	{
		const char *docs[] = {"The quick", "A bird in the hand", "lazy dog", NULL};
		struct gp_buf dsb = {0};
		uint8_t hdr[8], trl[12], sha[32] = {0};
		gp_dataset_header(hdr);
		REQUIRE_OK(gp_buf_append(&dsb, hdr, 8, &e), e);
		int nd = 0;
		for (; docs[nd]; nd++) {
			SHA256((const unsigned char *)docs[nd], strlen(docs[nd]), sha);
			REQUIRE_OK(gp_dataset_record(&dsb, "test", sha, docs[nd], strlen(docs[nd]), &e), e);
		}
		char longdoc[3000];
		for (int i = 0; i < 2999; i++)
			longdoc[i] = "abcdefg "[i % 8];
		longdoc[2999] = 0;
		SHA256((const unsigned char *)longdoc, strlen(longdoc), sha);
		REQUIRE_OK(gp_dataset_record(&dsb, "test", sha, longdoc, strlen(longdoc), &e), e);
		nd++;
		gp_dataset_trailer((uint64_t)nd, trl);
		REQUIRE_OK(gp_buf_append(&dsb, trl, 12, &e), e);
		st = NULL;
		REQUIRE_OK(gp_store_open(&st, store_uri, &e), e);
		char dh[65], mh[65], man[512];
		REQUIRE_OK(gp_store_put(st, dsb.p, dsb.len, dh, &e), e);
		snprintf(man, sizeof man,
			 "{\"format\": \"genpipe-dataset/1\", \"data\": \"sha256:%s\", "
			 "\"documents\": %d, \"bytes\": %zu, \"dropped\": {}, \"utf8_replaced\": 0, "
			 "\"sources\": []}", dh, nd, dsb.len);
		REQUIRE_OK(gp_store_put(st, man, strlen(man), mh, &e), e);
		free(dsb.p);
		char by[1024];
		snprintf(by, sizeof by,
			 "apiVersion: genpipe/v1\nkind: Pipeline\nmetadata: {name: score}\nspec:\n"
			 "  stages:\n"
			 "    - name: complete\n      kind: batch-infer\n"
			 "      with: {model: toy, version: 3, dataset: \"sha256:%s\", max_tokens: 6}\n",
			 mh);
		long long rb = gp_test_submit(db, by, NULL, 0);
		REQUIRE(gp_test_wait_run(db, rb, 60000) == 1);
		char *ref = qs("SELECT outputs->>'completions' FROM stage_attempts WHERE run_id = %lld "
			       "AND state = 'succeeded'", rb);
		REQUIRE(ref);
		CHECK(q("SELECT (outputs->>'count')::int FROM stage_attempts WHERE run_id = %lld AND "
			"state = 'succeeded'", rb) == nd);
		CHECK(q("SELECT (outputs->>'errors')::int FROM stage_attempts WHERE run_id = %lld AND "
			"state = 'succeeded'", rb) == 1);
		char hh[65];
		REQUIRE(gp_artifact_ref_parse(ref, hh) == 0);
		uint8_t *jl = NULL;
		size_t jlen = 0;
		REQUIRE_OK(gp_store_get(st, hh, 1 << 20, &jl, &jlen, &e), e);
		/* the artifact's bytes, no terminator: strtok needs one */
		char *jsonl = malloc(jlen + 1);
		REQUIRE(jsonl);
		memcpy(jsonl, jl, jlen);
		jsonl[jlen] = 0;
		free(jl);
		int lines = 0, good = 0;
		for (char *line = strtok(jsonl, "\n"); line; line = strtok(NULL, "\n")) {
			cJSON *o = cJSON_Parse(line);
			lines++;
			cJSON *idx = cJSON_GetObjectItem(o, "index");
			cJSON *pr = cJSON_GetObjectItem(o, "prompt");
			if (idx && idx->valueint < 3 && cJSON_IsString(pr) &&
			    !strcmp(pr->valuestring, docs[idx->valueint]) &&
			    cJSON_GetObjectItem(o, "finish") &&
			    cJSON_GetObjectItem(o, "output_tokens")->valueint >= 1)
				good++;
			if (idx && idx->valueint == 3)
				CHECK_CONTAINS(cJSON_GetStringValue(cJSON_GetObjectItem(o, "error")),
					       "the limit is");
			cJSON_Delete(o);
		}
		printf("batch-infer: %d lines, %d completed\n", lines, good);
		CHECK(lines == nd && good == 3);
		CHECK(q("SELECT count(*) FROM artifacts WHERE content_hash = '%s' AND kind = "
			"'completions' AND run_id = %lld", hh, rb) == 1);
		free(jsonl);
		free(ref);
		gp_store_close(st);
	}

	/* 7. canaries under live traffic */
	{
		st = NULL;
		REQUIRE_OK(gp_store_open(&st, store_uri, &e), e);
		make_version(st, th, vocab, 4, 2.5);
		make_version(st, th, vocab, 5, 2.0);
		/* version 5's checkpoint disappears from the store: it cannot load */
		char *h5 = qs("SELECT a.content_hash FROM artifacts a JOIN model_versions v ON "
			      "v.artifact_id = a.id WHERE v.version = 5");
		char p5[4096];
		REQUIRE(h5);
		REQUIRE_OK(gp_store_local_path(st, h5, p5, sizeof p5, &e), e);
		REQUIRE(unlink(p5) == 0);
		free(h5);
		gp_store_close(st);
		const char *cy =
			"apiVersion: genpipe/v1\nkind: Pipeline\nmetadata: {name: careful}\nspec:\n"
			"  params: {v: {type: int, default: 4}}\n"
			"  stages:\n"
			"    - name: deploy\n      kind: deploy\n"
			"      with: {model: toy, version: \"${params.v}\", "
			"promote_if: \"val_loss < production.val_loss\", "
			/* latency is not judged here (shared machines): errors are */
			"canary: {fraction: 0.5, duration: 3s, min_requests: 5, max_latency_ratio: 50}}\n";
		for (int round = 0; round < 2; round++) {
			const char *pv[] = {round ? "v=5" : "v=4"};
			long long cand = round ? 5 : 4, stable = round ? 4 : 3;
			long long run = gp_test_submit(db, cy, pv, 1);
			int seen_cand = 0, seen_stable = 0, failed = 0, i = 0;
			long long tc = now_ms();
			while (now_ms() - tc < 30000) {
				char *state = qs("SELECT state FROM runs WHERE id = %lld", run);
				int over = state && (!strcmp(state, "succeeded") || !strcmp(state, "failed"));
				free(state);
				if (over)
					break;
				char rid[64];
				snprintf(rid, sizeof rid, "canary-%d-%d", round, i++);
				struct answer r = ask(rid, "The quick", 4, 0.5f, i % 2, 0);
				if (r.ok && !r.code[0] && r.version == cand)
					seen_cand++;
				else if (r.ok && !r.code[0] && r.version == stable)
					seen_stable++;
				else
					failed++;
				gp_sleep_ms(10);
			}
			REQUIRE(gp_test_wait_run(db, run, 10000) == 1);
			char *why = qs("SELECT reason FROM deploy_decisions WHERE run_id = %lld", run);
			printf("canary of version %lld: %d requests to it, %d to version %lld, %d failed: "
			       "%s\n", cand, seen_cand, seen_stable, stable, failed, why ? why : "-");
			long long now_v = q("SELECT v.version FROM model_aliases a JOIN model_versions v "
					    "ON v.id = a.model_version_id WHERE a.alias = 'production'");
			if (round == 0) {
				CHECK(seen_cand >= 5 && seen_stable >= 5 && failed == 0);
				CHECK_CONTAINS(why ? why : "", "canary passed");
				CHECK(now_v == 4);
			} else {
				CHECK(failed >= 5 && seen_stable >= 5 && seen_cand == 0);
				CHECK_CONTAINS(why ? why : "", "rolled back: error rate");
				CHECK(now_v == 4);
			}
			free(why);
			CHECK(q("SELECT count(*) FROM model_canaries") == 0);
		}
		CHECK(q("SELECT count(*) FROM audit_log WHERE action = 'model.canary'") == 4);
		/* after the rollback every request is served by the stable version again */
		long long t1 = now_ms();
		int bad = 0;
		for (int i = 0; i < 40; i++) {
			char rid[64];
			snprintf(rid, sizeof rid, "after-canary-%d", i);
			struct answer r = ask(rid, "The quick", 4, 0.5f, 0, 0);
			bad += !(r.ok && !r.code[0] && r.version == 4);
		}
		printf("after the rollback: %d of 40 requests not served by version 4 (%lld ms)\n", bad,
		       now_ms() - t1);
		CHECK(bad == 0);
	}

	/* 7b. the gate on new data: figures per byte on both texts, both ways */
	{
		struct gp_buf dsb = {0};
		uint8_t hdr[8], trl[12], sha[32];
		const char *docs[] = {"A bird in the hand is worth two in the bush. ",
				      "The lazy dog sleeps. The quick fox runs. "};
		gp_dataset_header(hdr);
		REQUIRE_OK(gp_buf_append(&dsb, hdr, 8, &e), e);
		for (int i = 0; i < 2; i++) {
			SHA256((const unsigned char *)docs[i], strlen(docs[i]), sha);
			REQUIRE_OK(gp_dataset_record(&dsb, "new", sha, docs[i], strlen(docs[i]), &e), e);
		}
		gp_dataset_trailer(2, trl);
		REQUIRE_OK(gp_buf_append(&dsb, trl, 12, &e), e);
		st = NULL;
		REQUIRE_OK(gp_store_open(&st, store_uri, &e), e);
		char dh[65], gm[65], man[512];
		REQUIRE_OK(gp_store_put(st, dsb.p, dsb.len, dh, &e), e);
		snprintf(man, sizeof man,
			 "{\"format\": \"genpipe-dataset/1\", \"data\": \"sha256:%s\", "
			 "\"documents\": 2, \"bytes\": %zu, \"dropped\": {}, \"utf8_replaced\": 0, "
			 "\"sources\": []}", dh, dsb.len);
		REQUIRE_OK(gp_store_put(st, man, strlen(man), gm, &e), e);
		free(dsb.p);
		make_version(st, th, vocab, 9, 9);
		gp_store_close(st);
		const char *margins[] = {"-1000", "0.99"};
		const char *versions[] = {"9", "4"};
		for (int k = 0; k < 2; k++) {
			char gy[1024];
			snprintf(gy, sizeof gy,
				 "apiVersion: genpipe/v1\nkind: Pipeline\nmetadata: {name: gated}\nspec:\n"
				 "  stages:\n    - name: deploy\n      kind: deploy\n"
				 "      with: {model: toy, version: %s, gate: {data: \"sha256:%s\", "
				 "margin: %s, tolerance: 1000}}\n", versions[k], gm, margins[k]);
			long long gr = gp_test_submit(db, gy, NULL, 0);
			REQUIRE(gp_test_wait_run(db, gr, 60000) == 1);
			char *why = qs("SELECT reason FROM deploy_decisions WHERE run_id = %lld", gr);
			printf("gate %d: %s\n", k, why ? why : "-");
			CHECK_CONTAINS(why ? why : "", "new data: ");
			CHECK_CONTAINS(why ? why : "", k ? "failed" : "passed");
			CHECK(q("SELECT count(*) FROM deploy_decisions WHERE run_id = %lld AND figures ? "
				"'gate' AND promoted = %s", gr, k ? "false" : "true") == 1);
			free(why);
		}
		CHECK(q("SELECT v.version FROM model_aliases a JOIN model_versions v ON v.id = "
			"a.model_version_id WHERE a.alias = 'production'") == 9);
		REQUIRE_OK(gp_registry_move_alias(db, "toy", "production", 4, "test", NULL, NULL, &e), e);
		gp_sleep_ms(300);
	}

	/* 8. shutdown, and telemetry that cannot keep up is dropped and counted */
	{
		CHECK(kill(infer, SIGTERM) == 0);
		int ws = 0;
		CHECK(waitpid(infer, &ws, 0) == infer);
		CHECK(WIFEXITED(ws) && WEXITSTATUS(ws) == 0);
		int port = gp_stack_free_port();
		char ports[16];
		snprintf(ports, sizeof ports, "%d", port);
		st = NULL;
		REQUIRE_OK(gp_store_open(&st, store_uri, &e), e);
		make_version_w(st, th, vocab, 6, 9, 128);  /* 1.7 MiB each */
		make_version_w(st, th, vocab, 7, 9, 128);
		make_version_w(st, th, vocab, 8, 9, 256);  /* 6.4 MiB */
		gp_store_close(st);
		infer = gp_test_service(env, "genpipe-infer", "--data-dir", env->dir, "--model", "toy",
					"--slots", "8", "--queue", "64", "--telemetry-queue", "1",
					"--http-port", ports, "--memory-mb", "3", NULL);
		a = wait_ready("warmup-2");
		REQUIRE(a.ok && !a.code[0]);
		struct burst_result br = burst("burst", 40, 8, 10000);
		int answered = br.ok;
		gp_sleep_ms(300);
		char url[128];
		snprintf(url, sizeof url, "http://127.0.0.1:%d/metrics", port);
		long code = 0;
		char *body = NULL;
		REQUIRE_OK(gp_http_get(url, 5000, &code, &body, &e), e);
		double dropped = metric_value(body, "genpipe_infer_telemetry_dropped_total");
		double nsent = metric_value(body, "genpipe_infer_telemetry_sent_total");
		printf("burst of 40 with a telemetry queue of 1: %d answered, telemetry %g sent, %g "
		       "dropped\n", answered, nsent, dropped);
		CHECK(answered == 40);
		CHECK(dropped > 0 && nsent >= 1);
		CHECK(code == 200);
		free(body);

		/* the budget: 6 then 7 (6 goes: least recently used, no alias), 6 again */
		long long order[] = {6, 7, 6};
		for (int i = 0; i < 3; i++) {
			char rid[32];
			snprintf(rid, sizeof rid, "budget-%d", i);
			struct answer r = ask(rid, "The quick", 4, 0, 0, order[i]);
			CHECK(r.ok && !r.code[0] && r.version == order[i]);
		}
		struct answer big = ask("budget-big", "The quick", 4, 0, 0, 8);
		printf("version 8 under a 3 MiB budget: %s: %s\n", big.code, big.error);
		CHECK_STR(big.code, "unavailable");
		CHECK_CONTAINS(big.error, "memory budget");
		struct answer still = ask("budget-after", "The quick", 4, 0, 0, 0);
		CHECK(still.ok && !still.code[0] && still.version == 4);
		REQUIRE_OK(gp_http_get(url, 5000, &code, &body, &e), e);
		double loaded = metric_value(body, "genpipe_infer_loaded_bytes");
		double loads = metric_value(body, "genpipe_infer_loads_total");
		printf("budget: %g bytes mapped after %g loads\n", loaded, loads);
		CHECK(loaded > 0 && loaded <= 3 << 20);
		CHECK(loads == 4); /* 4 (the alias), 6, 7, 6 again; 8 is refused after mapping */
		free(body);

		/* --telemetry-sample 0: no success is logged, every failure still is */
		CHECK(kill(infer, SIGTERM) == 0);
		CHECK(waitpid(infer, &ws, 0) == infer && WIFEXITED(ws) && WEXITSTATUS(ws) == 0);
		port = gp_stack_free_port();
		snprintf(ports, sizeof ports, "%d", port);
		infer = gp_test_service(env, "genpipe-infer", "--data-dir", env->dir, "--model", "toy",
					"--telemetry-sample", "0", "--http-port", ports, NULL);
		a = wait_ready("sampled-warmup");
		REQUIRE(a.ok && !a.code[0]);
		for (int i = 0; i < 10; i++) {
			char rid[32];
			snprintf(rid, sizeof rid, "sampled-ok-%d", i);
			struct answer r = ask(rid, "The quick", 4, 0.5f, 0, 0);
			CHECK(r.ok && !r.code[0]);
		}
		struct answer f1 = ask("sampled-fail", "The quick", 4, 0, 0, 77);
		CHECK_STR(f1.code, "not_found");
		gp_sleep_ms(500);
		char *tel2 = telemetry_ids();
		CHECK_CONTAINS(tel2, "sampled-fail:not_found;");
		CHECK(!strstr(tel2, "sampled-ok-"));
		free(tel2);
	}
	gp_bus_destroy(bus);
	gp_db_destroy(db);
	return CHECK_RESULT();
}

int main(void)
{
	return gp_test_run(body);
}
