/*
 * test_preprocess: the preprocess stage's work on a temporary artifact
 * store (no servers): normalization, near-duplicate removal, the split, the
 * outputs, and parameter errors that name the parameter.
 */
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../check.h"
#include "dataset.h"
#include "preprocess.h"
#include "shard.h"

static void test_normalize(void)
{
	struct {
		const char *in, *ws, *ctl;
	} t[] = {
		{ "  a  b\t\tc  \n", "a b c", "  a  b\t\tc  \n" },
		{ "x \n\n\n\ny", "x\n\ny", "x \n\n\n\ny" },
		{ "bell\x07 and \x1b[0m", "bell\x07 and \x1b[0m", "bell and [0m" },
		{ "\n\n", "", "\n\n" },
	};
	for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
		char buf[64];
		size_t n = strlen(t[i].in);
		memcpy(buf, t[i].in, n);
		n = gp_normalize((unsigned char *)buf, n, 1, 0);
		buf[n] = '\0';
		CHECK_STR(buf, t[i].ws);
		n = strlen(t[i].in);
		memcpy(buf, t[i].in, n);
		n = gp_normalize((unsigned char *)buf, n, 0, 1);
		buf[n] = '\0';
		CHECK_STR(buf, t[i].ctl);
	}
}

/* Store a dataset of the given documents; returns the manifest reference. */
static void put_dataset(struct gp_store *s, const char *const *docs, int n, char ref[80])
{
	struct gp_err e = { 0 };
	struct gp_buf b = { 0 };
	uint8_t h[12], sha[32];
	gp_dataset_header(h);
	REQUIRE_OK(gp_buf_append(&b, h, 8, &e), e);
	for (int i = 0; i < n; i++) {
		unsigned int l = 0;
		EVP_Digest(docs[i], strlen(docs[i]), sha, &l, EVP_sha256(), NULL);
		REQUIRE_OK(gp_dataset_record(&b, "test", sha, docs[i], strlen(docs[i]), &e), e);
	}
	gp_dataset_trailer((uint64_t)n, h);
	REQUIRE_OK(gp_buf_append(&b, h, 12, &e), e);
	char data[65], man[65], mtext[400];
	REQUIRE_OK(gp_store_put(s, b.p, b.len, data, &e), e);
	free(b.p);
	snprintf(mtext, sizeof mtext,
		 "{\"format\":\"genpipe-dataset/1\",\"data\":\"sha256:%s\",\"documents\":%d,"
		 "\"bytes\":0,\"utf8_replaced\":0,\"dropped\":{\"duplicate\":2}}",
		 data, n);
	REQUIRE_OK(gp_store_put(s, mtext, strlen(mtext), man, &e), e);
	snprintf(ref, 80, "sha256:%s", man);
}

static long long stat_num(const cJSON *o, const char *a, const char *b)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, a);
	if (b)
		v = cJSON_GetObjectItemCaseSensitive(v, b);
	return cJSON_IsNumber(v) ? (long long)v->valuedouble : -1;
}

int main(void)
{
	test_normalize();
	char dir[] = "/tmp/gp-pp-XXXXXX", uri[64];
	REQUIRE(mkdtemp(dir));
	snprintf(uri, sizeof uri, "file://%s", dir);
	struct gp_err e = { 0 };
	struct gp_preprocess_config cfg = { .max_input = 1 << 26 };
	REQUIRE_OK(gp_store_open(&cfg.store, uri, &e), e);
	/* 40 distinct sentences, one exact copy after normalization, one near copy */
	static char text[42][160];
	const char *docs[42];
	for (int i = 0; i < 40; i++) {
		snprintf(text[i], sizeof text[i],
			 "document %d says the number %d is followed by %d and then by %d.", i,
			 i * 7919 % 1000, i * 104729 % 1000, i * 1299709 % 1000);
		docs[i] = text[i];
	}
	snprintf(text[40], sizeof text[40], "  %s  ", text[3]);     /* same after trimming */
	snprintf(text[41], sizeof text[41], "%s!", text[5]);         /* one byte more */
	docs[40] = text[40];
	docs[41] = text[41];
	char ref[80];
	put_dataset(cfg.store, docs, 42, ref);
	cJSON *p = cJSON_CreateObject();
	cJSON_AddStringToObject(p, "dataset", ref);
	cJSON_AddNumberToObject(p, "vocab_size", 300);
	cJSON_AddNumberToObject(p, "val_fraction", 0.2);
	cJSON *out = NULL, *stats = NULL;
	struct gp_pp_artifact arts[5];
	REQUIRE_OK(gp_preprocess_run(p, &cfg, NULL, NULL, &out, &stats, arts, &e), e);
	CHECK(stat_num(stats, "documents_in", NULL) == 42);
	CHECK(stat_num(stats, "dropped", "duplicate") == 1);
	CHECK(stat_num(stats, "dropped", "near_duplicate") == 1);
	CHECK(stat_num(stats, "ingest_dropped", "duplicate") == 2);
	CHECK(stat_num(stats, "documents", NULL) == 40);
	long long nval = stat_num(stats, "documents_val", NULL);
	CHECK(nval >= 1 && nval < 20);
	CHECK(stat_num(stats, "tokens_train", NULL) > 0 && stat_num(stats, "tokens_val", NULL) > 0);
	char h[65];
	const char *vs = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(out, "val_shards"));
	REQUIRE(!gp_artifact_ref_parse(vs, h));
	uint8_t *data;
	size_t len, n;
	const uint8_t *t;
	REQUIRE_OK(gp_store_get(cfg.store, h, 1 << 20, &data, &len, &e), e);
	REQUIRE_OK(gp_shard_parse(data, len, (int)stat_num(out, "vocab_size", NULL), &t, &n, &e),
		   e);
	CHECK((long long)n == stat_num(stats, "tokens_val", NULL));
	free(data);
	/* the same inputs give the same outputs (the orchestrator's cache relies on it) */
	cJSON *out2 = NULL, *stats2 = NULL;
	REQUIRE_OK(gp_preprocess_run(p, &cfg, NULL, NULL, &out2, &stats2, arts, &e), e);
	CHECK_STR(cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(out2, "train_shards")),
		  cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(out, "train_shards")));
	cJSON_Delete(out);
	cJSON_Delete(stats);
	cJSON_Delete(out2);
	cJSON_Delete(stats2);
	/* errors name the parameter */
	struct {
		const char *key;
		double v;
	} bad[] = { { "vocab_size", 100 }, { "val_fraction", 0.9 }, { "dedup_threshold", 2 },
		    { "shingle", 0 } };
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		cJSON *q = cJSON_Duplicate(p, 1);
		cJSON_DeleteItemFromObject(q, bad[i].key);
		cJSON_AddNumberToObject(q, bad[i].key, bad[i].v);
		CHECK(gp_preprocess_run(q, &cfg, NULL, NULL, &out, &stats, arts, &e) ==
		      GP_ERR_INVALID);
		char want[64];
		snprintf(want, sizeof want, "with.%s", bad[i].key);
		CHECK_CONTAINS(e.msg, want);
		cJSON_Delete(q);
	}
	cJSON *q = cJSON_CreateObject();
	cJSON_AddStringToObject(q, "vocab_size", "300");
	cJSON_AddStringToObject(q, "dataset", ref);
	CHECK(gp_preprocess_run(q, &cfg, NULL, NULL, &out, &stats, arts, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "with.vocab_size must be a number");
	cJSON_Delete(q);
	q = cJSON_CreateObject();
	cJSON_AddStringToObject(q, "dataset", "sha256:nothex");
	CHECK(gp_preprocess_run(q, &cfg, NULL, NULL, &out, &stats, arts, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "not a sha256: reference");
	cJSON_Delete(q);
	cJSON_Delete(p);
	gp_store_close(cfg.store);
	char cmd[128];
	snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
	CHECK(system(cmd) == 0);
	return CHECK_RESULT();
}
