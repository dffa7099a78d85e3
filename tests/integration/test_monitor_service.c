/*
 * genpipe-monitor on real servers (with the orchestrator relaying alerts):
 * a monitor stage configures it for model "toy" with a reference token
 * histogram of corpus A (English sentences); telemetry of A-like prompts
 * gives windows with no alert; telemetry of B-like prompts (the system's
 * stdio.h) raises a PSI alert within three windows, recorded in alerts and
 * published on genpipe.alerts.toy. kill -9 of the monitor in the middle of
 * a window loses and doubles nothing (the events come back; windows are
 * unique by their first stream sequence). `genpipe drift` shows the
 * windows.
 */
#include <cjson/cJSON.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <microhttpd.h>
#include <pthread.h>

#include "../check.h"
#include "../harness.h"

#include "artifact.h"
#include "bpe.h"
#include "file.h"
#include "model.h"
#include "registry.h"
#include "stack.h"
#include "shard.h"
#include "subjects.h"
#include "wire.h"

static struct gp_db *db;
static struct gp_bus *bus;

#define q(...) gp_test_q(db, __VA_ARGS__)

static const char *corpus_a[] = {
	"You will meet a tall dark stranger. ",
	"A fool and his money are soon parted. ",
	"Love is patient, love is kind, and never in a hurry. ",
	"Never put off until tomorrow what you can do the day after tomorrow. ",
	"The best things in life are free, but the rest are expensive. ",
	"Q: Why did the chicken cross the road? A: To get to the other side. ",
	"He who laughs last thinks slowest. ",
	"Your lucky number has been disconnected. ",
};
#define NA ((int)(sizeof corpus_a / sizeof *corpus_a))

static char *b_text;    /* stdio.h */
static long long pub_version = 1; /* the version publish() says served */
static size_t b_len;

/* Publish one window's worth of telemetry: prompts from A or B. */
static void publish(struct gp_bpe *tok, int from_b, int n, int *seq)
{
	struct gp_err e = {0};
	for (int i = 0; i < n; i++, (*seq)++) {
		const char *p;
		size_t pl;
		char buf[400];
		if (from_b) {
			size_t off = ((size_t)*seq * 997) % (b_len - 300);
			memcpy(buf, b_text + off, 240);
			buf[240] = 0;
			p = buf;
			pl = 240;
		} else {
			p = corpus_a[*seq % NA];
			pl = strlen(p);
		}
		uint16_t *ids = NULL;
		size_t nid = 0, cap = 0;
		REQUIRE_OK(gp_bpe_encode(tok, p, pl, &ids, &nid, &cap, &e), e);
		uint32_t *u = malloc(nid * sizeof(uint32_t));
		for (size_t k = 0; k < nid; k++)
			u[k] = ids[k];
		char rid[32];
		snprintf(rid, sizeof rid, "t-%d", *seq);
		gp_telemetry t = GENPIPE__V1__TELEMETRY__INIT;
		t.request_id = rid;
		t.model = "toy";
		t.model_version = pub_version;
		t.prompt_tokens = u;
		t.n_prompt_tokens = nid;
		t.output_tokens = 10;
		t.latency_ms = 20 + *seq % 7;
		t.error_code = "";
		t.time_unix_ms = gp_wall_ms();
		uint8_t *b = NULL;
		size_t bl = 0;
		REQUIRE_OK(gp_wire_encode(&t.base, &b, &bl, &e), e);
		REQUIRE_OK(gp_bus_publish(bus, GP_SUBJ_TELEMETRY "toy", b, (int)bl, rid, 5000, NULL,
					  NULL, &e), e);
		free(b);
		free(u);
		free(ids);
	}
}

/* A webhook receiver: counts POSTs to /hook and keeps the last body; the
 * first one gets a 503, so that the monitor has to try again. */
static pthread_mutex_t hook_mu = PTHREAD_MUTEX_INITIALIZER;
static int hook_posts, hook_attempts;
static char hook_body[8192];

struct upload {
	char buf[8192];
	size_t len;
};

static enum MHD_Result hook_handler(void *cls, struct MHD_Connection *conn, const char *url,
				    const char *method, const char *version, const char *data,
				    size_t *size, void **con_cls)
{
	(void)cls;
	(void)version;
	if (strcmp(method, "POST") || strcmp(url, "/hook"))
		return MHD_NO;
	struct upload *u = *con_cls;
	if (!u) {
		*con_cls = calloc(1, sizeof(struct upload));
		return *con_cls ? MHD_YES : MHD_NO;
	}
	if (*size) {
		size_t n = *size < sizeof u->buf - 1 - u->len ? *size : sizeof u->buf - 1 - u->len;
		memcpy(u->buf + u->len, data, n);
		u->len += n;
		*size = 0;
		return MHD_YES;
	}
	pthread_mutex_lock(&hook_mu);
	int refuse = hook_attempts++ == 0;
	if (!refuse) {
		hook_posts++;
		memcpy(hook_body, u->buf, u->len + 1);
	}
	pthread_mutex_unlock(&hook_mu);
	free(u);
	*con_cls = NULL;
	struct MHD_Response *r = MHD_create_response_from_buffer(2, (void *)"ok",
								 MHD_RESPMEM_PERSISTENT);
	enum MHD_Result ret = MHD_queue_response(conn, refuse ? 503 : 200, r);
	MHD_destroy_response(r);
	return ret;
}

static int wait_windows(long long n, long long ms)
{
	for (long long t = 0; t < ms; t += 50) {
		if (q("SELECT count(*) FROM drift_windows") >= n)
			return 1;
		gp_sleep_ms(50);
	}
	return 0;
}

static int body(struct gp_test_env *env)
{
	db = gp_test_db(env);
	bus = gp_test_bus(env, "test-monitor");
	struct gp_err e = {0};
	uint8_t *raw = NULL;
	REQUIRE_OK(gp_file_read("/usr/include/stdio.h", 1 << 20, &raw, &b_len, &e), e);
	b_text = (char *)raw;
	REQUIRE(b_len > 2000);
	char uri[600];
	snprintf(uri, sizeof uri, "file://%s/artifacts", env->dir);
	struct gp_store *st = NULL;
	REQUIRE_OK(gp_store_open(&st, uri, &e), e);
	/* a tokenizer for both corpora; the reference histogram and the
	 * validation shard from A alone */
	struct gp_bpe_trainer *tr = NULL;
	REQUIRE_OK(gp_bpe_trainer_new(&tr, &e), e);
	for (int r = 0; r < 20; r++)
		for (int i = 0; i < NA; i++)
			REQUIRE_OK(gp_bpe_trainer_add(tr, corpus_a[i], strlen(corpus_a[i]), &e), e);
	REQUIRE_OK(gp_bpe_trainer_add(tr, b_text, b_len, &e), e);
	struct gp_bpe *tok = NULL;
	REQUIRE_OK(gp_bpe_train(tr, 512, 0, &tok, &e), e);
	gp_bpe_trainer_free(tr);
	int V = gp_bpe_vocab_size(tok);
	long long *counts = calloc((size_t)V, sizeof(long long)), total = 0;
	uint16_t *aids = NULL;
	size_t na = 0, acap = 0;
	for (int r = 0; r < 50; r++)
		for (int i = 0; i < NA; i++)
			REQUIRE_OK(gp_bpe_encode(tok, corpus_a[i], strlen(corpus_a[i]), &aids, &na, &acap,
						 &e), e);
	for (size_t i = 0; i < na; i++)
		counts[aids[i]]++, total++;
	size_t hcap = (size_t)V * 24 + 256, hl = 0;
	char *hist = malloc(hcap);
	hl += (size_t)snprintf(hist + hl, hcap - hl,
			       "{\"format\": \"genpipe-token-histogram/1\", \"vocab_size\": %d, "
			       "\"train\": {\"tokens\": %lld, \"counts\": [", V, total);
	for (int i = 0; i < V; i++)
		hl += (size_t)snprintf(hist + hl, hcap - hl, "%s%lld", i ? "," : "", counts[i]);
	hl += (size_t)snprintf(hist + hl, hcap - hl, "]}}");
	char hh[65], tkh[65], sh[65], ch[65];
	REQUIRE_OK(gp_store_put(st, hist, hl, hh, &e), e);
	uint8_t *tb = NULL, *sb = NULL, *cb = NULL;
	size_t tbl = 0, sbl = 0, cbl = 0;
	REQUIRE_OK(gp_bpe_save(tok, &tb, &tbl, &e), e);
	REQUIRE_OK(gp_store_put(st, tb, tbl, tkh, &e), e);
	REQUIRE_OK(gp_shard_encode(aids, na, &sb, &sbl, &e), e);
	REQUIRE_OK(gp_store_put(st, sb, sbl, sh, &e), e);
	struct gp_model_config c = {.vocab = V, .padded_vocab = (V + 63) / 64 * 64, .context = 64,
				    .layers = 2, .heads = 2, .width = 32};
	struct gp_model *m = NULL;
	REQUIRE_OK(gp_model_create(&m, &c, &e), e);
	gp_model_init(m, 3);
	struct gp_ckpt_meta meta = {0};
	REQUIRE_OK(gp_ckpt_encode(m, NULL, NULL, &meta, &cb, &cbl, &e), e);
	REQUIRE_OK(gp_store_put(st, cb, cbl, ch, &e), e);
	REQUIRE_OK(gp_artifact_register(db, st, ch, "checkpoint", cbl, 0, NULL, NULL, &e), e);
	/* the validation loss recorded for the version: what this random model
	 * scores on A, so that the perplexity ratio stays near 1 */
	float loss = 0;
	int T = na > 64 ? 64 : (int)na - 1;
	REQUIRE_OK(gp_model_forward(m, aids, aids + 1, 1, T, &loss, &e), e);
	gp_model_destroy(m);
	char sql[2048];
	snprintf(sql, sizeof sql,
		 "INSERT INTO models (name) VALUES ('toy'); "
		 "INSERT INTO model_versions (model_id, version, artifact_id, metrics, lineage) "
		 "SELECT m.id, 1, a.id, '{\"val_loss\": %.6f}', '{\"tokenizer\": \"sha256:%s\", "
		 "\"val_shards\": \"sha256:%s\"}' FROM models m, artifacts a WHERE m.name = 'toy' "
		 "AND a.content_hash = '%s'", loss, tkh, sh, ch);
	REQUIRE_OK(gp_db_run(db, "register", sql, &e), e);
	REQUIRE_OK(gp_registry_move_alias(db, "toy", "production", 1, "test", NULL, NULL, &e), e);

	gp_test_service(env, "genpipe-orchestrator", "--sweep-ms", "200", NULL);
	pid_t mon = gp_test_service(env, "genpipe-monitor", "--data-dir", env->dir, "--reload-ms",
				    "200", NULL);
	int hport = gp_stack_free_port();
	struct MHD_Daemon *hookd = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD, (uint16_t)hport,
						    NULL, NULL, hook_handler, NULL,
						    MHD_OPTION_END);
	REQUIRE(hookd);
	char yaml[1024];
	snprintf(yaml, sizeof yaml,
		 "apiVersion: genpipe/v1\nkind: Pipeline\nmetadata: {name: watch}\nspec:\n"
		 "  stages:\n"
		 "    - name: monitor\n      kind: monitor\n"
		 "      with: {model: toy, histogram: \"sha256:%s\", window: 50, window_time: 20s, "
		 "loss_sample: 8, webhook: \"http://127.0.0.1:%d/hook\"}\n", hh, hport);
	long long run = gp_test_submit(db, yaml, NULL, 0);
	REQUIRE(gp_test_wait_run(db, run, 60000) == 1);
	CHECK(q("SELECT count(*) FROM monitors") == 1);
	gp_sleep_ms(600); /* the monitor reads its configuration */

	/* A: three windows, no alert */
	int seq = 0;
	publish(tok, 0, 150, &seq);
	REQUIRE(wait_windows(3, 20000));
	CHECK(q("SELECT count(*) FROM alerts") == 0);
	char *psi_a = gp_test_qs(db, "SELECT string_agg(round((metrics->>'psi')::numeric, 4)::text, "
				     "' ' ORDER BY id) FROM drift_windows");
	printf("A windows: psi %s\n", psi_a);
	free(psi_a);
	CHECK(q("SELECT count(*) FROM drift_windows WHERE metrics ? 'perplexity_ratio' AND "
		"metrics ? 'embedding_distance' AND (metrics->>'perplexity_ratio')::float8 < 2") == 3);

	/* B: a PSI alert within three windows; kill -9 of the monitor halfway */
	publish(tok, 1, 75, &seq);
	gp_sleep_ms(500);
	CHECK(kill(mon, SIGKILL) == 0);
	waitpid(mon, NULL, 0);
	mon = gp_test_service(env, "genpipe-monitor", "--data-dir", env->dir, "--reload-ms", "200",
			      NULL);
	publish(tok, 1, 75, &seq);
	/* the events the killed monitor held come back after the consumer's
	 * AckWait (10 s); the open window closes on time (20 s) */
	for (int t = 0; t < 600 && q("SELECT coalesce(sum(n_requests), 0) FROM drift_windows") < 300;
	     t++)
		gp_sleep_ms(100);
	gp_sleep_ms(500);
	char *sizes = gp_test_qs(db, "SELECT string_agg(n_requests::text, ' ' ORDER BY id) FROM "
				     "drift_windows");
	printf("after kill -9: windows of %s requests\n", sizes);
	free(sizes);
	CHECK(q("SELECT sum(n_requests) FROM drift_windows") == 300);
	CHECK(q("SELECT count(*) FROM drift_windows") >= 6);
	CHECK(q("SELECT count(DISTINCT first_seq) FROM drift_windows") ==
	      q("SELECT count(*) FROM drift_windows"));
	char *psi_b = gp_test_qs(db, "SELECT string_agg(round((metrics->>'psi')::numeric, 4)::text, "
				     "' ' ORDER BY id) FROM drift_windows WHERE id > 3");
	printf("B windows: psi %s\n", psi_b);
	free(psi_b);
	CHECK(q("SELECT count(*) FROM drift_windows WHERE id > 3 AND (metrics->>'psi')::float8 > "
		"0.2") >= 1);
	long long psi_alerts = q("SELECT count(*) FROM alerts WHERE metric = 'psi'");
	CHECK(psi_alerts >= 1);
	CHECK(q("SELECT count(*) FROM alerts a JOIN drift_windows w ON w.id = a.drift_window_id "
		"WHERE w.id <= 3") == 0);
	/* the alert went out on the alerts stream through the outbox */
	struct gp_consumer_def cd = {GP_STREAM_ALERTS, "test-alerts", GP_SUBJ_ALERTS "toy", 30000,
				     -1, 100};
	REQUIRE_OK(gp_bus_declare(bus, NULL, 0, &cd, 1, &e), e);
	natsSubscription *sub = NULL;
	REQUIRE_OK(gp_bus_pull_subscribe(bus, &cd, &sub, &e), e);
	int got = 0;
	for (int tries = 0; tries < 20 && !got; tries++) {
		natsMsgList list = {0};
		if (gp_bus_fetch(sub, 16, 500, &list, &e))
			continue;
		for (int i = 0; i < list.Count; i++) {
			gp_alert *a = NULL;
			if (!gp_wire_decode_alert(&a, (const uint8_t *)natsMsg_GetData(list.Msgs[i]),
						  (size_t)natsMsg_GetDataLength(list.Msgs[i]), &e)) {
				got += !strcmp(a->metric, "psi") && a->value > a->threshold;
				gp_wire_free_alert(a);
			}
			gp_bus_ack(list.Msgs[i], &e);
		}
		natsMsgList_Destroy(&list);
	}
	natsSubscription_Destroy(sub);
	CHECK(got >= 1);
	/* and to the webhook */
	for (int t = 0; t < 100; t++) {
		pthread_mutex_lock(&hook_mu);
		int posts = hook_posts;
		pthread_mutex_unlock(&hook_mu);
		if (posts >= 1)
			break;
		gp_sleep_ms(100);
	}
	pthread_mutex_lock(&hook_mu);
	printf("webhook: %d posts in %d attempts, last: %.200s\n", hook_posts, hook_attempts,
	       hook_body);
	CHECK(hook_posts >= 1 && hook_attempts == hook_posts + 1); /* the 503 was tried again */
	CHECK_CONTAINS(hook_body, "\"metric\":\"psi\"");
	CHECK_CONTAINS(hook_body, "\"model\":\"toy\"");
	pthread_mutex_unlock(&hook_mu);

	/* a window closed on time with few requests raises no alert */
	snprintf(yaml, sizeof yaml,
		 "apiVersion: genpipe/v1\nkind: Pipeline\nmetadata: {name: watch}\nspec:\n"
		 "  stages:\n"
		 "    - name: monitor\n      kind: monitor\n"
		 "      with: {model: toy, histogram: \"sha256:%s\", window: 50, window_time: 1s, "
		 "loss_sample: 8, min_alert_requests: 30}\n", hh);
	long long run2 = gp_test_submit(db, yaml, NULL, 0);
	REQUIRE(gp_test_wait_run(db, run2, 60000) == 1);
	long long before_w = q("SELECT count(*) FROM drift_windows");
	long long before_a = q("SELECT count(*) FROM alerts");
	gp_sleep_ms(800);
	publish(tok, 1, 5, &seq);
	for (int t = 0; t < 100 && q("SELECT count(*) FROM drift_windows") == before_w; t++)
		gp_sleep_ms(100);
	CHECK(q("SELECT count(*) FROM drift_windows") == before_w + 1);
	CHECK(q("SELECT count(*) FROM drift_windows WHERE n_requests = 5 AND "
		"(metrics->>'psi')::float8 > 0.2 AND (metrics->>'too_few_to_alert')::boolean") == 1);
	CHECK(q("SELECT count(*) FROM alerts") == before_a);

	/* every new version gets a window, however many there were before (the
	 * monitor keeps eight places and reuses them) */
	REQUIRE_OK(gp_db_run(db, "versions",
			     "INSERT INTO model_versions (model_id, version, artifact_id, metrics, "
			     "lineage) SELECT model_id, g, artifact_id, metrics, lineage FROM "
			     "model_versions, generate_series(2, 12) g WHERE version = 1", &e), e);
	before_w = q("SELECT count(*) FROM drift_windows");
	for (pub_version = 2; pub_version <= 12; pub_version++)
		publish(tok, 0, 3, &seq);
	pub_version = 1;
	/* (a window may close early to free a place, so wait for the events) */
	for (int t = 0; t < 300 && q("SELECT coalesce(sum(n_requests), 0) FROM drift_windows w JOIN "
				     "model_versions v ON v.id = w.model_version_id WHERE v.version "
				     "BETWEEN 2 AND 12") < 33; t++)
		gp_sleep_ms(100);
	CHECK(q("SELECT count(DISTINCT v.version) FROM drift_windows w JOIN model_versions v ON "
		"v.id = w.model_version_id WHERE v.version BETWEEN 2 AND 12") == 11);
	CHECK(q("SELECT coalesce(sum(n_requests), 0) FROM drift_windows w JOIN model_versions v ON "
		"v.id = w.model_version_id WHERE v.version BETWEEN 2 AND 12") == 33);

	/* late acknowledgements: a monitor stopped past the consumer's AckWait
	 * (10 s) gets the events of its open window again; each counts once */
	snprintf(yaml, sizeof yaml,
		 "apiVersion: genpipe/v1\nkind: Pipeline\nmetadata: {name: watch}\nspec:\n"
		 "  stages:\n"
		 "    - name: monitor\n      kind: monitor\n"
		 "      with: {model: toy, histogram: \"sha256:%s\", window: 50, window_time: 60s, "
		 "loss_sample: 4}\n", hh);
	long long run3 = gp_test_submit(db, yaml, NULL, 0);
	REQUIRE(gp_test_wait_run(db, run3, 60000) == 1);
	gp_sleep_ms(1000); /* the monitor reads its new configuration */
	before_w = q("SELECT count(*) FROM drift_windows");
	pub_version = 2;
	publish(tok, 0, 20, &seq);
	gp_sleep_ms(1500); /* taken into the open window, not acknowledged */
	CHECK(kill(mon, SIGSTOP) == 0);
	gp_sleep_ms(12000);
	CHECK(kill(mon, SIGCONT) == 0);
	gp_sleep_ms(1500); /* the redelivered twenty arrive */
	publish(tok, 0, 30, &seq);
	pub_version = 1;
	for (int t = 0; t < 300 && q("SELECT count(*) FROM drift_windows") == before_w; t++)
		gp_sleep_ms(100);
	char *late = gp_test_qs(db, "SELECT string_agg(n_requests || ' over seqs ' || first_seq || "
				    "'..' || last_seq, ', ') FROM drift_windows WHERE id > (SELECT "
				    "max(id) FROM drift_windows) - 1");
	printf("after a stop past AckWait: window of %s\n", late);
	free(late);
	CHECK(q("SELECT count(*) FROM drift_windows") == before_w + 1);
	/* fifty distinct events in a row: no redelivered one counted twice */
	CHECK(q("SELECT count(*) FROM drift_windows WHERE id = (SELECT max(id) FROM "
		"drift_windows) AND n_requests = 50 AND last_seq - first_seq = 49") == 1);

	/* genpipe drift */
	char cmd[1024], out[16384];
	snprintf(cmd, sizeof cmd, "%s --database-url '%s' drift toy --json", GENPIPE_CLI,
		 env->db_url);
	FILE *f = popen(cmd, "r");
	REQUIRE(f);
	size_t n = fread(out, 1, sizeof out - 1, f);
	out[n] = 0;
	CHECK(pclose(f) == 0);
	cJSON *j = cJSON_Parse(out);
	CHECK(cJSON_GetArraySize(cJSON_GetObjectItem(j, "windows")) ==
	      q("SELECT count(*) FROM drift_windows"));
	cJSON_Delete(j);
	snprintf(cmd, sizeof cmd, "%s --database-url '%s' drift toy", GENPIPE_CLI, env->db_url);
	f = popen(cmd, "r");
	REQUIRE(f);
	n = fread(out, 1, sizeof out - 1, f);
	out[n] = 0;
	CHECK(pclose(f) == 0);
	printf("%s", out);
	CHECK_CONTAINS(out, "psi");
	CHECK_CONTAINS(out, "(alert over 0.2)");
	CHECK_CONTAINS(out, "(too few requests to alert)");
	CHECK_CONTAINS(out, "▁");
	MHD_stop_daemon(hookd);
	kill(mon, SIGTERM);
	int ws = 0;
	waitpid(mon, &ws, 0);
	CHECK(WIFEXITED(ws) && WEXITSTATUS(ws) == 0);
	free(counts);
	free(aids);
	free(hist);
	free(tb);
	free(sb);
	free(cb);
	free(raw);
	gp_bpe_free(tok);
	gp_store_close(st);
	gp_bus_destroy(bus);
	gp_db_destroy(db);
	return CHECK_RESULT();
}

int main(void)
{
	return gp_test_run(body);
}
