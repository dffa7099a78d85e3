/*
 * The data stages end to end on real servers with the real service
 * processes (orchestrator, ingest, preprocess): two corpora ingested,
 * preprocessed into a tokenizer, shards and histograms; a second run is
 * served entirely from the cache; changing one file reruns only the
 * ingest stage that reads it and the preprocess stage after it.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../check.h"
#include "../harness.h"

#include "artifact.h"
#include "bpe.h"
#include "dataset.h"
#include "shard.h"

static const struct gp_test_env *ENV;
static struct gp_db *db;

#define q(...) gp_test_q(db, __VA_ARGS__)
#define qs(...) gp_test_qs(db, __VA_ARGS__)

static void write_file(const char *rel, const char *text)
{
	char p[1024];
	snprintf(p, sizeof p, "%s/%s", ENV->dir, rel);
	FILE *f = fopen(p, "w");
	REQUIRE(f);
	fputs(text, f);
	fclose(f);
}

/* A corpus of short "fortunes" from a seeded generator. */
static void make_corpus(const char *rel, int files, int per_file, unsigned seed)
{
	static const char *w[] = { "the",    "wise",  "fool", "speaks", "only",  "when",
				   "silent", "river", "runs", "deep",   "and",   "every",
				   "cookie", "holds", "a",    "future", "bright", "tomorrow" };
	char p[1024];
	snprintf(p, sizeof p, "%s/%s", ENV->dir, rel);
	REQUIRE(mkdir(p, 0755) == 0);
	for (int f = 0; f < files; f++) {
		static char text[1 << 16];
		size_t n = 0;
		for (int d = 0; d < per_file; d++) {
			int words = 6 + (int)(seed % 9);
			for (int k = 0; k < words; k++) {
				seed = seed * 1103515245u + 12345u;
				n += (size_t)snprintf(text + n, sizeof text - n, "%s%s",
						      k ? " " : "", w[(seed >> 16) % 18]);
			}
			n += (size_t)snprintf(text + n, sizeof text - n, ".\n%%\n");
		}
		char name[256];
		snprintf(name, sizeof name, "%s/f%02d.txt", rel, f);
		write_file(name, text);
	}
}

static const char *stage_state(long long run, const char *stage)
{
	static char s[32];
	char *v = qs("SELECT state FROM run_stages WHERE run_id = %lld AND stage = '%s'", run,
		     stage);
	snprintf(s, sizeof s, "%s", v ? v : "(none)");
	free(v);
	return s;
}

static char *output(long long run, const char *stage, const char *key)
{
	return qs("SELECT outputs->>'%s' FROM run_stages WHERE run_id = %lld AND stage = '%s'", key,
		  run, stage);
}

static int body(struct gp_test_env *env)
{
	ENV = env;
	db = gp_test_db(env);
	char roots[600], store_uri[600];
	snprintf(roots, sizeof roots, "%s/corpus", env->dir);
	snprintf(store_uri, sizeof store_uri, "file://%s/artifacts", env->dir);
	REQUIRE(mkdir(roots, 0755) == 0);
	make_corpus("corpus/a", 6, 60, 1);
	make_corpus("corpus/b", 4, 60, 7);
	/* an exact duplicate, a near duplicate (one word changed) and invalid UTF-8 */
	write_file("corpus/a/dups.txt",
		   "the river runs deep and every cookie holds a future bright tomorrow when "
		   "silent\n%\n"
		   "the river runs deep and every cookie holds a future bright tomorrow when "
		   "silent\n%\n"
		   "the river runs deep and every cookie holds a future bright tomorrow when "
		   "quiet\n%\nbad \xff\xfe bytes\n%\n");
	gp_test_service(env, "genpipe-orchestrator", "--sweep-ms", "500", NULL);
	gp_test_service(env, "genpipe-ingest", "--roots", roots, "--data-dir", env->dir, NULL);
	gp_test_service(env, "genpipe-preprocess", "--data-dir", env->dir, NULL);
	/* the workers register their kinds' code versions (part of the cache
	 * key) as they start; a stage queued before that is not cacheable */
	for (int i = 0; i < 600 && q("SELECT count(*) FROM stage_kinds WHERE kind IN "
				     "('ingest', 'preprocess')") < 2; i++)
		usleep(50 * 1000);

	char yaml[4096];
	snprintf(yaml, sizeof yaml,
		 "apiVersion: genpipe/v1\nkind: Pipeline\nmetadata: {name: data}\nspec:\n"
		 "  stages:\n"
		 "    - name: ingest-a\n      kind: ingest\n"
		 "      with: {sources: [%s/corpus/a], split: \"%%\"}\n"
		 "    - name: ingest-b\n      kind: ingest\n"
		 "      with: {sources: [\"%s/corpus/b/*.txt\"], split: \"%%\"}\n"
		 "    - name: prep\n      kind: preprocess\n      needs: [ingest-a, ingest-b]\n"
		 "      with:\n"
		 "        datasets: [\"${stages.ingest-a.outputs.dataset}\", "
		 "\"${stages.ingest-b.outputs.dataset}\"]\n"
		 "        vocab_size: 400\n        val_fraction: 0.1\n"
		 "        dedup_threshold: 0.7\n",
		 env->dir, env->dir);

	/* 1. the first run does everything */
	long long r1 = gp_test_submit(db, yaml, NULL, 0);
	REQUIRE(gp_test_wait_run(db, r1, 60000) == 1);
	CHECK_STR(stage_state(r1, "ingest-a"), "succeeded");
	CHECK_STR(stage_state(r1, "prep"), "succeeded");
	long long docs_a = q("SELECT (outputs->>'documents')::bigint FROM run_stages "
			     "WHERE run_id = %lld AND stage = 'ingest-a'",
			     r1);
	CHECK(docs_a == 6 * 60 + 3); /* the exact duplicate is gone, bad bytes replaced */
	CHECK(q("SELECT (metrics->'dropped'->>'duplicate')::int FROM stage_attempts "
		"WHERE run_id = %lld AND stage = 'ingest-a'",
		r1) >= 1);
	CHECK(q("SELECT (metrics->>'utf8_replaced')::int FROM stage_attempts "
		"WHERE run_id = %lld AND stage = 'ingest-a'",
		r1) == 1);
	CHECK(q("SELECT (metrics->'dropped'->>'near_duplicate')::int FROM stage_attempts "
		"WHERE run_id = %lld AND stage = 'prep'",
		r1) >= 1);
	CHECK(q("SELECT (metrics->>'tokens_train')::bigint FROM stage_attempts "
		"WHERE run_id = %lld AND stage = 'prep'",
		r1) > 1000);
	/* every output artifact is registered with its run and stage */
	CHECK(q("SELECT count(*) FROM artifacts WHERE run_id = %lld AND stage = 'prep'", r1) == 5);
	CHECK(q("SELECT count(*) FROM artifacts WHERE run_id = %lld AND stage LIKE 'ingest-%%'",
		r1) == 4);
	/* the outputs read back: the tokenizer loads, the shards decode to the text */
	struct gp_store *store;
	struct gp_err e = { 0 };
	REQUIRE_OK(gp_store_open(&store, store_uri, &e), e);
	char h[65];
	char *tok = output(r1, "prep", "tokenizer"), *train = output(r1, "prep", "train_shards");
	REQUIRE(tok && train && !gp_artifact_ref_parse(tok, h));
	uint8_t *data;
	size_t len;
	REQUIRE_OK(gp_store_get(store, h, 1 << 24, &data, &len, &e), e);
	struct gp_bpe *bpe;
	REQUIRE_OK(gp_bpe_load(data, len, &bpe, &e), e);
	free(data);
	/* 18 distinct words run out of pairs seen twice before 400 */
	CHECK(gp_bpe_vocab_size(bpe) > 256 + 18 && gp_bpe_vocab_size(bpe) <= 400);
	CHECK(q("SELECT (outputs->>'vocab_size')::int FROM run_stages WHERE run_id = %lld AND "
		"stage = 'prep'",
		r1) == gp_bpe_vocab_size(bpe));
	REQUIRE(!gp_artifact_ref_parse(train, h));
	REQUIRE_OK(gp_store_get(store, h, 1 << 26, &data, &len, &e), e);
	const uint8_t *t;
	size_t n;
	REQUIRE_OK(gp_shard_parse(data, len, 400, &t, &n, &e), e);
	CHECK(gp_shard_token(t, 0) == gp_bpe_eot(bpe));
	uint16_t *ids = malloc(n * sizeof *ids);
	for (size_t i = 0; i < n; i++)
		ids[i] = gp_shard_token(t, i);
	uint8_t *text;
	size_t tl;
	REQUIRE_OK(gp_bpe_decode(bpe, ids, n, &text, &tl, &e), e);
	CHECK(memmem(text, tl, "the river runs deep", 19) != NULL ||
	      memmem(text, tl, "cookie", 6) != NULL);
	free(text);
	free(ids);
	free(data);
	gp_bpe_free(bpe);
	free(tok);
	free(train);
	char *ds1 = output(r1, "ingest-a", "dataset");

	/* 2. the same inputs: every stage comes from the cache */
	long long r2 = gp_test_submit(db, yaml, NULL, 0);
	REQUIRE(gp_test_wait_run(db, r2, 60000) == 1);
	CHECK_STR(stage_state(r2, "ingest-a"), "cached");
	CHECK_STR(stage_state(r2, "ingest-b"), "cached");
	CHECK_STR(stage_state(r2, "prep"), "cached");
	CHECK(q("SELECT count(*) FROM run_stages WHERE run_id = %lld AND cached_from = %lld", r2,
		r1) == 3);

	/* 3. one file of corpus b changes: ingest-b and prep run again, ingest-a does not */
	write_file("corpus/b/f01.txt", "a brand new fortune about the river.\n%\n");
	long long r3 = gp_test_submit(db, yaml, NULL, 0);
	REQUIRE(gp_test_wait_run(db, r3, 60000) == 1);
	CHECK_STR(stage_state(r3, "ingest-a"), "cached");
	CHECK_STR(stage_state(r3, "ingest-b"), "succeeded");
	CHECK_STR(stage_state(r3, "prep"), "succeeded");
	char *b1 = output(r1, "ingest-b", "dataset"), *b3 = output(r3, "ingest-b", "dataset");
	char *ds3 = output(r3, "ingest-a", "dataset");
	CHECK(b1 && b3 && strcmp(b1, b3) != 0); /* the dataset hash changed */
	CHECK(ds1 && ds3 && !strcmp(ds1, ds3));
	free(b1);
	free(b3);
	free(ds1);
	free(ds3);

	/* 4. the feedback source reads the corrections collected for a model */
	struct gp_err fe = { 0 };
	REQUIRE_OK(gp_db_run(db, "corrections",
			     "INSERT INTO feedback_corrections (model, request_id, prompt, correction) "
			     "VALUES ('tiny', 'r1', 'Q: the sky? ', 'A: blue'), "
			     "('tiny', 'r2', 'Q: grass? ', 'A: green'), "
			     "('other', 'r3', 'Q: x? ', 'A: y')",
			     &fe),
		   fe);
	const char *fb = "apiVersion: genpipe/v1\nkind: Pipeline\nmetadata: {name: fb}\n"
			 "spec:\n  stages:\n    - {name: i, kind: ingest, with: {sources: "
			 "[\"feedback:tiny\"]}}\n";
	long long f1 = gp_test_submit(db, fb, NULL, 0);
	REQUIRE(gp_test_wait_run(db, f1, 30000) == 1);
	CHECK(q("SELECT (outputs->>'documents')::int FROM run_stages WHERE run_id = %lld", f1) ==
	      2);
	long long f2 = gp_test_submit(db, fb, NULL, 0); /* no new corrections: reused */
	REQUIRE(gp_test_wait_run(db, f2, 30000) == 1);
	CHECK_STR(stage_state(f2, "i"), "cached");
	REQUIRE_OK(gp_db_run(db, "correction",
			     "INSERT INTO feedback_corrections (model, prompt, correction) "
			     "VALUES ('tiny', 'Q: snow? ', 'A: white')",
			     &fe),
		   fe);
	long long f3 = gp_test_submit(db, fb, NULL, 0); /* a new correction: read again */
	REQUIRE(gp_test_wait_run(db, f3, 30000) == 1);
	CHECK_STR(stage_state(f3, "i"), "succeeded");
	CHECK(q("SELECT (outputs->>'documents')::int FROM run_stages WHERE run_id = %lld", f3) ==
	      3);

	/* 4b. the drifted source reads the prompts served inside alerting windows */
	REQUIRE_OK(gp_db_run(db, "drift",
			     "INSERT INTO models (name) VALUES ('tiny') ON CONFLICT DO NOTHING; "
			     "INSERT INTO model_versions (model_id, version) SELECT id, 1 FROM models "
			     "WHERE name = 'tiny'; "
			     "INSERT INTO drift_windows (model_version_id, window_start, window_end, "
			     "n_requests, metrics, first_seq) SELECT v.id, now() - interval '10 min', "
			     "now() - interval '5 min', 2, '{}', 1 FROM model_versions v; "
			     "INSERT INTO drift_windows (model_version_id, window_start, window_end, "
			     "n_requests, metrics, first_seq) SELECT v.id, now() - interval '4 min', "
			     "now() - interval '3 min', 1, '{}', 2 FROM model_versions v; "
			     "INSERT INTO alerts (model_version_id, metric, value, threshold, severity, "
			     "message, drift_window_id) SELECT model_version_id, 'psi', 1, 0.2, 'warning', "
			     "'x', id FROM drift_windows WHERE first_seq = 1; "
			     "INSERT INTO inference_events (request_id, model, version, prompt, served_at) "
			     "VALUES ('d1', 'tiny', 1, '#include <stdio.h>', now() - interval '8 min'), "
			     "('d2', 'tiny', 1, 'int main(void)', now() - interval '6 min'), "
			     "('d3', 'tiny', 1, 'quiet window', now() - interval '210 s'), "
			     "('d4', 'tiny', 1, 'no window', now() - interval '1 hour'), "
			     "('d5', 'other', 1, 'other model', now() - interval '8 min')",
			     &fe),
		   fe);
	const char *dr = "apiVersion: genpipe/v1\nkind: Pipeline\nmetadata: {name: dr}\n"
			 "spec:\n  stages:\n    - {name: i, kind: ingest, with: {sources: "
			 "[\"drifted:tiny\"]}}\n";
	long long d1 = gp_test_submit(db, dr, NULL, 0);
	REQUIRE(gp_test_wait_run(db, d1, 30000) == 1);
	CHECK(q("SELECT (outputs->>'documents')::int FROM run_stages WHERE run_id = %lld", d1) ==
	      2);

	/* 5. a source outside the service's roots fails the stage with the reason */
	long long r4 = gp_test_submit(db, "apiVersion: genpipe/v1\nkind: Pipeline\nmetadata: {name: bad}\n"
			      "spec:\n  stages:\n    - {name: i, kind: ingest, with: {sources: "
			      "[/etc]}}\n", NULL, 0);
	CHECK(gp_test_wait_run(db, r4, 30000) == 0);
	char *err = qs("SELECT error FROM run_stages WHERE run_id = %lld AND stage = 'i'", r4);
	CHECK(err && strstr(err, "not under the service's allowed roots"));
	free(err);
	gp_store_close(store);
	return CHECK_RESULT();
}

int main(void)
{
	return gp_test_run(body);
}
