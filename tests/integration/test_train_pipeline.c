/*
 * The train stage on real servers with the real service processes
 * (orchestrator, train):
 *   1. kill -9 of the train service three times at random steps: the run
 *      finishes from the last checkpoints (each new attempt resumes), and
 *      exactly one model version is registered;
 *   2. the same training uninterrupted (cache off) registers version 2 with
 *      the same weights (SHA-256 of the parameters) and validation loss;
 *   3. SIGTERM mid-run: the service checkpoints, releases its lease, exits
 *      0; a restarted service resumes and again reaches the same weights.
 * The data (tokenizer and shards) are made here and put in the store, so
 * the pipeline is the train stage alone.
 */
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "../check.h"
#include "../harness.h"

#include "artifact.h"
#include "bpe.h"
#include "bytes.h"
#include "shard.h"

static const struct gp_test_env *ENV;
static struct gp_db *db;

#define q(...) gp_test_q(db, __VA_ARGS__)
#define qs(...) gp_test_qs(db, __VA_ARGS__)

/* The step of the stage's latest recorded checkpoint (-1: none yet). */
static long long ckpt_step(long long run)
{
	char *s = qs("SELECT step FROM train_checkpoints WHERE run_id = %lld AND stage = 'train'",
		     run);
	long long v = s ? atoll(s) : -1;
	free(s);
	return v;
}

static int wait_step(long long run, long long step, long long ms)
{
	for (long long t = 0; t < ms; t += 5) {
		if (ckpt_step(run) >= step)
			return 1;
		gp_sleep_ms(5);
	}
	return 0;
}

static pid_t start_train(void)
{
	return gp_test_service(ENV, "genpipe-train", "--data-dir", ENV->dir, "--lease-ms", "1500",
			       "--heartbeat-ms", "300", NULL);
}

static void make_data(char tok_ref[80], char train_ref[80], char val_ref[80])
{
	struct gp_err e = {0};
	static const char *w[] = {"the", "wise", "fool", "speaks", "only", "when", "silent",
				  "river", "runs", "deep", "and", "every", "cookie", "holds"};
	size_t cap = 1 << 20, n = 0;
	char *text = malloc(cap);
	uint64_t s = 5;
	/* a Markov chain over the words (mostly one successor each): text a
	 * model can predict better than the unigram distribution does */
	int cur = 0;
	while (n + 64 < cap / 4) {
		int words = 5 + (int)(gp_mix64(s++) % 6);
		for (int k = 0; k < words; k++) {
			uint64_t r = gp_mix64(s++);
			cur = r % 5 == 0 ? (int)((r >> 8) % 14) : (cur * 3 + 1) % 14;
			n += (size_t)snprintf(text + n, cap - n, "%s%s", k ? " " : "", w[cur]);
		}
		n += (size_t)snprintf(text + n, cap - n, ".\n");
	}
	struct gp_bpe_trainer *tr = NULL;
	REQUIRE_OK(gp_bpe_trainer_new(&tr, &e), e);
	REQUIRE_OK(gp_bpe_trainer_add(tr, text, n, &e), e);
	struct gp_bpe *bpe = NULL;
	REQUIRE_OK(gp_bpe_train(tr, 320, 0, &bpe, &e), e);
	gp_bpe_trainer_free(tr);
	uint16_t *ids = NULL;
	size_t nid = 0, cid = 0;
	REQUIRE_OK(gp_bpe_encode(bpe, text, n, &ids, &nid, &cid, &e), e);
	char store_uri[600];
	snprintf(store_uri, sizeof store_uri, "file://%s/artifacts", ENV->dir);
	struct gp_store *st = NULL;
	REQUIRE_OK(gp_store_open(&st, store_uri, &e), e);
	uint8_t *buf = NULL;
	size_t len = 0;
	char h[65];
	REQUIRE_OK(gp_bpe_save(bpe, &buf, &len, &e), e);
	REQUIRE_OK(gp_store_put(st, buf, len, h, &e), e);
	snprintf(tok_ref, 80, "sha256:%s", h);
	free(buf);
	size_t nval = nid / 10;
	REQUIRE_OK(gp_shard_encode(ids, nid - nval, &buf, &len, &e), e);
	REQUIRE_OK(gp_store_put(st, buf, len, h, &e), e);
	snprintf(train_ref, 80, "sha256:%s", h);
	free(buf);
	REQUIRE_OK(gp_shard_encode(ids + nid - nval, nval, &buf, &len, &e), e);
	REQUIRE_OK(gp_store_put(st, buf, len, h, &e), e);
	snprintf(val_ref, 80, "sha256:%s", h);
	free(buf);
	free(ids);
	free(text);
	gp_bpe_free(bpe);
	gp_store_close(st);
}

/* Run the genpipe CLI against the test's servers; stdout malloc'd, *rc its exit status. */
static char *cli(int *rc, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static char *cli(int *rc, const char *fmt, ...)
{
	char args[2048], cmd[4096];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(args, sizeof args, fmt, ap);
	va_end(ap);
	snprintf(cmd, sizeof cmd, "%s/genpipe --database-url '%s' --data-dir '%s' %s 2>&1",
		 ENV->bin_dir, ENV->db_url, ENV->dir, args);
	FILE *f = popen(cmd, "r");
	REQUIRE(f);
	size_t cap = 1 << 16, n = 0;
	char *out = malloc(cap);
	size_t k;
	while ((k = fread(out + n, 1, cap - 1 - n, f)) > 0)
		n += k;
	out[n] = 0;
	int st = pclose(f);
	*rc = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
	return out;
}

static void test_cli(const char *sha1)
{
	int rc = 0;
	char *o = cli(&rc, "models list --json");
	cJSON *j = cJSON_Parse(o);
	CHECK(rc == 0 && cJSON_GetArraySize(j) == 1);
	cJSON *m = cJSON_GetArrayItem(j, 0);
	CHECK_STR(cJSON_GetStringValue(cJSON_GetObjectItem(m, "name")), "tiny");
	CHECK(cJSON_GetObjectItem(m, "versions") && cJSON_GetObjectItem(m, "versions")->valueint == 3);
	cJSON_Delete(j);
	free(o);
	/* aliases: set, move, audit rows, show by alias */
	o = cli(&rc, "models alias tiny production 1 --json");
	CHECK(rc == 0);
	CHECK_CONTAINS(o, "\"from\":\tnull");
	free(o);
	o = cli(&rc, "models alias tiny production 2");
	CHECK(rc == 0);
	CHECK_CONTAINS(o, "tiny@production: version 1 -> 2");
	free(o);
	CHECK(q("SELECT count(*) FROM audit_log WHERE action = 'model.alias' AND object = 'tiny@production'") == 2);
	o = cli(&rc, "models show tiny@production --json");
	j = cJSON_Parse(o);
	CHECK(rc == 0 && j && cJSON_GetObjectItem(j, "version")->valueint == 2);
	CHECK_STR(cJSON_GetStringValue(cJSON_GetObjectItem(cJSON_GetObjectItem(j, "metrics"), "params_sha256")), sha1);
	cJSON_Delete(j);
	free(o);
	o = cli(&rc, "models show tiny:1");
	CHECK(rc == 0);
	CHECK_CONTAINS(o, "model      tiny:1");
	CHECK_CONTAINS(o, "val loss");
	CHECK_CONTAINS(o, "samples:");
	free(o);
	/* errors */
	o = cli(&rc, "models show tiny:9");
	CHECK(rc == 1);
	CHECK_CONTAINS(o, "model \"tiny\" has no version 9");
	free(o);
	o = cli(&rc, "models show nope");
	CHECK(rc == 1);
	CHECK_CONTAINS(o, "no model \"nope\"");
	free(o);
	o = cli(&rc, "models alias tiny production 7");
	CHECK(rc == 1);
	CHECK_CONTAINS(o, "has no version 7");
	free(o);
	o = cli(&rc, "models alias tiny Bad_Alias 1");
	CHECK(rc == 2);
	free(o);
	CHECK(q("SELECT count(*) FROM audit_log WHERE action = 'model.alias'") == 2);
	/* export: the files load back as the same weights */
	char dir[600];
	snprintf(dir, sizeof dir, "%s/export", ENV->dir);
	o = cli(&rc, "models export tiny:3 --format safetensors %s", dir);
	CHECK(rc == 0);
	CHECK_CONTAINS(o, "model.safetensors, config.json, tokenizer.gptk, genpipe.json");
	free(o);
	const char *files[] = {"model.safetensors", "config.json", "tokenizer.gptk", "genpipe.json"};
	for (int i = 0; i < 4; i++) {
		char p[700];
		snprintf(p, sizeof p, "%s/%s", dir, files[i]);
		CHECK(access(p, R_OK) == 0);
	}
	/* the exported weights are byte for byte the version's safetensors artifact */
	{
		char p[700];
		snprintf(p, sizeof p, "%s/model.safetensors", dir);
		FILE *f = fopen(p, "rb");
		REQUIRE(f);
		fseek(f, 0, SEEK_END);
		long len = ftell(f);
		fseek(f, 0, SEEK_SET);
		uint8_t *b = malloc((size_t)len);
		REQUIRE(fread(b, 1, (size_t)len, f) == (size_t)len);
		fclose(f);
		char h[65];
		gp_sha256_hex(b, (size_t)len, h);
		free(b);
		char *want = qs("SELECT a.content_hash FROM model_versions v JOIN artifacts a ON "
				"a.id = v.export_artifact_id WHERE v.version = 3");
		CHECK_STR(h, want);
		free(want);
	}
	o = cli(&rc, "models export tiny:3 --format onnx %s", dir);
	CHECK(rc == 2);
	CHECK_CONTAINS(o, "only safetensors");
	free(o);
}

static long long submit(const char *name, const char *tok, const char *train, const char *val,
			int cache)
{
	char yaml[4096];
	snprintf(yaml, sizeof yaml,
		 "apiVersion: genpipe/v1\nkind: Pipeline\nmetadata: {name: %s}\nspec:\n"
		 "  stages:\n"
		 "    - name: train\n      kind: train\n"
		 "      retry: {limit: 8, backoff: 100ms, max_backoff: 200ms}\n"
		 "      cache: %s\n"
		 "      with:\n"
		 "        model: tiny\n        tokenizer: \"%s\"\n"
		 "        train_shards: \"%s\"\n        val_shards: \"%s\"\n"
		 "        config: {layers: 2, heads: 4, width: 128, context: 64}\n"
		 "        steps: 200\n        batch: 8\n        lr: 0.003\n"
		 "        checkpoint_interval: 5\n        eval_interval: 50\n        eval_batches: 4\n"
		 "        samples: 2\n        sample_tokens: 24\n",
		 name, cache ? "true" : "false", tok, train, val);
	return gp_test_submit(db, yaml, NULL, 0);
}

static int body(struct gp_test_env *env)
{
	ENV = env;
	db = gp_test_db(env);
	char tok[80], train[80], val[80];
	make_data(tok, train, val);
	gp_test_service(env, "genpipe-orchestrator", "--sweep-ms", "200", NULL);
	pid_t pid = start_train();

	/* 1. three kill -9 at random steps */
	long long r1 = submit("killed", tok, train, val, 1);
	srand((unsigned)time(NULL) ^ (unsigned)getpid());
	long long last = 0;
	for (int k = 0; k < 3; k++) {
		long long target = last + 10 + rand() % 30;
		REQUIRE(wait_step(r1, target, 60000));
		gp_sleep_ms(rand() % 40); /* somewhere between checkpoints */
		long long at = ckpt_step(r1);
		REQUIRE(kill(pid, SIGKILL) == 0);
		waitpid(pid, NULL, 0);
		printf("kill -9 %d after checkpoint step %lld\n", k + 1, at);
		CHECK(at < 200);
		last = at;
		pid = start_train();
	}
	REQUIRE(gp_test_wait_run(db, r1, 180000) == 1);
	CHECK(q("SELECT count(*) FROM model_versions WHERE run_id = %lld", r1) == 1);
	CHECK(q("SELECT count(*) FROM stage_attempts WHERE run_id = %lld AND state = 'expired'", r1) ==
	      3);
	long long resumed = q("SELECT (metrics->>'resumed_from_step')::bigint FROM stage_attempts "
			      "WHERE run_id = %lld AND state = 'succeeded'",
			      r1);
	printf("the last attempt resumed at step %lld\n", resumed);
	CHECK(resumed >= last && resumed > 0);
	char *sha1 = qs("SELECT metrics->>'params_sha256' FROM model_versions WHERE run_id = %lld", r1);
	char *loss1 = qs("SELECT metrics->>'val_loss' FROM model_versions WHERE run_id = %lld", r1);
	REQUIRE(sha1 && loss1);
	CHECK(q("SELECT version FROM model_versions WHERE run_id = %lld", r1) == 1);
	/* lineage, artifacts, audit */
	char *lin = qs("SELECT lineage->>'tokenizer' FROM model_versions WHERE run_id = %lld", r1);
	CHECK_STR(lin, tok);
	free(lin);
	CHECK(q("SELECT count(*) FROM model_versions v JOIN artifacts a ON a.id = v.artifact_id "
		"WHERE v.run_id = %lld AND a.kind = 'checkpoint'",
		r1) == 1);
	CHECK(q("SELECT count(*) FROM model_versions v JOIN artifacts a ON a.id = v.export_artifact_id "
		"WHERE v.run_id = %lld AND a.kind = 'safetensors'",
		r1) == 1);
	CHECK(q("SELECT count(*) FROM audit_log WHERE action = 'model.register' AND object = 'tiny:1'") ==
	      1);
	CHECK(q("SELECT ((metrics->>'val_loss')::float < 0.8 * (metrics->>'unigram_entropy')::float)::int "
		"FROM model_versions WHERE run_id = %lld",
		r1) == 1);
	CHECK(q("SELECT jsonb_array_length(metrics->'samples') FROM model_versions WHERE run_id = %lld",
		r1) == 2);
	CHECK(q("SELECT (outputs->>'model_version')::int FROM run_stages WHERE run_id = %lld", r1) == 1);

	/* 2. uninterrupted, the cache off: the same weights */
	long long r2 = submit("clean", tok, train, val, 0);
	REQUIRE(gp_test_wait_run(db, r2, 180000) == 1);
	char *sha2 = qs("SELECT metrics->>'params_sha256' FROM model_versions WHERE run_id = %lld", r2);
	char *loss2 = qs("SELECT metrics->>'val_loss' FROM model_versions WHERE run_id = %lld", r2);
	printf("interrupted: %s val %s\nuninterrupted: %s val %s\n", sha1, loss1, sha2 ? sha2 : "?",
	       loss2 ? loss2 : "?");
	CHECK_STR(sha2, sha1);
	CHECK_STR(loss2, loss1);
	CHECK(q("SELECT version FROM model_versions WHERE run_id = %lld", r2) == 2);
	CHECK(q("SELECT (metrics->>'resumed_from_step')::int FROM model_versions WHERE run_id = %lld",
		r2) == 0);

	/* 3. SIGTERM: checkpoint, release, exit 0; resume elsewhere */
	long long r3 = submit("preempted", tok, train, val, 0);
	REQUIRE(wait_step(r3, 30, 60000));
	REQUIRE(kill(pid, SIGTERM) == 0);
	int status = 0;
	waitpid(pid, &status, 0);
	CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
	CHECK(q("SELECT count(*) FROM stage_attempts WHERE run_id = %lld AND state = 'released' "
		"AND error LIKE 'preempted: checkpoint at step %%'",
		r3) == 1);
	long long at = ckpt_step(r3);
	pid = start_train();
	REQUIRE(gp_test_wait_run(db, r3, 180000) == 1);
	CHECK(q("SELECT (metrics->>'resumed_from_step')::bigint FROM model_versions WHERE run_id = %lld",
		r3) == at);
	char *sha3 = qs("SELECT metrics->>'params_sha256' FROM model_versions WHERE run_id = %lld", r3);
	CHECK_STR(sha3, sha1);
	CHECK(q("SELECT count(*) FROM model_versions v JOIN models m ON m.id = v.model_id "
		"WHERE m.name = 'tiny'") == 3);
	test_cli(sha1);
	free(sha1);
	free(sha2);
	free(sha3);
	free(loss1);
	free(loss2);
	return CHECK_RESULT();
}

int main(void)
{
	return gp_test_run(body);
}
