/*
 * test_trainer: the train stage's pure half: parameter checking, the
 * trainer's learning, and resumption that reaches the same weights as an
 * uninterrupted run (the fast path is deterministic).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../check.h"
#include "gpu.h"
#include "bytes.h"
#include "train.h"

#define REF "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

static void test_params(void)
{
	struct gp_err err = {0};
	struct gp_train_params p;
	const char *ok = "{\"model\": \"m1\", \"train_shards\": \"" REF "\", \"val_shards\": \"" REF
			 "\", \"tokenizer\": \"" REF "\", \"steps\": 100, \"config\": {\"layers\": 2}}";
	cJSON *j = cJSON_Parse(ok);
	REQUIRE_OK(gp_train_params_parse(j, &p, &err), err);
	CHECK(p.steps == 100 && p.config.layers == 2 && p.config.width == 256);
	CHECK(p.warmup == 5 && p.eval_interval == 10 && p.seq_len == 256);
	cJSON_Delete(j);
	struct {
		const char *patch_key, *patch_json, *want;
	} cases[] = {
		{"model", "\"Bad_Name\"", "with.model \"Bad_Name\" is not a DNS label"},
		{"model", "7", "with.model must be a string"},
		{"train_shards", "\"/etc/passwd\"", "with.train_shards \"/etc/passwd\" is not an artifact reference"},
		{"steps", "\"many\"", "with.steps must be an integer"},
		{"steps", "0", "with.steps must be an integer within 1..100000000"},
		{"steps", "1.5", "with.steps must be an integer"},
		{"lr", "-1", "with.lr must be a number within 0..10"},
		{"config", "{\"heads\": 3}", "with.config.heads 3 must divide with.config.width 256"},
		{"config", "{\"depth\": 3}", "with.config.depth is not a model setting"},
		{"config", "[1]", "with.config must be a mapping"},
		{"seq_len", "512", "with.seq_len must be an integer within 1..256"},
		{"device", "\"tpu\"", "with.device \"tpu\" is not auto, cpu or cuda"},
		{"batch", "4096", "needs about"},
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		cJSON *o = cJSON_Parse(ok);
		cJSON_DeleteItemFromObject(o, cases[i].patch_key);
		cJSON_AddItemToObject(o, cases[i].patch_key, cJSON_Parse(cases[i].patch_json));
		struct gp_err e = {0};
		CHECK(gp_train_params_parse(o, &p, &e) != GP_OK);
		CHECK_CONTAINS(e.msg, cases[i].want);
		cJSON_Delete(o);
	}
	cJSON *o = cJSON_Parse(ok);
	cJSON_DeleteItemFromObject(o, "tokenizer");
	CHECK(gp_train_params_parse(o, &p, &err) == GP_ERR_INVALID);
	CHECK_CONTAINS(err.msg, "with.tokenizer is required");
	cJSON_Delete(o);
}

/* A corpus with structure: a noisy cycle through the vocabulary. */
static uint16_t *corpus(size_t n, int vocab, uint64_t seed)
{
	uint16_t *t = malloc(n * sizeof(uint16_t));
	int cur = 0;
	for (size_t i = 0; i < n; i++) {
		uint64_t r = gp_mix64(seed + i);
		cur = (r % 10 == 0) ? (int)((r >> 8) % (uint64_t)vocab) : (cur + 1) % vocab;
		t[i] = (uint16_t)cur;
	}
	return t;
}

static struct gp_train_params small_params(void)
{
	struct gp_train_params p = {0};
	snprintf(p.model_name, sizeof(p.model_name), "t");
	p.config = (struct gp_model_config){.context = 32, .layers = 2, .heads = 2, .width = 32};
	gp_train_params_set_vocab(&p, 40);
	p.steps = 40;
	p.batch = 4;
	p.seq_len = 32;
	p.lr = 3e-3;
	p.min_lr_frac = 0.1;
	p.warmup = 4;
	p.weight_decay = 0.1;
	p.beta1 = 0.9;
	p.beta2 = 0.95;
	p.grad_clip = 1.0;
	p.eval_batches = 4;
	p.seed = 99;
	return p;
}

static void test_resume(void)
{
	struct gp_err err = {0};
	struct gp_train_params p = small_params();
	snprintf(p.device, sizeof(p.device), "cpu"); /* bitwise resumption is the CPU's */
	size_t nt = 20000, nv = 2000;
	uint16_t *tr = corpus(nt, 40, 1), *va = corpus(nv, 40, 2);
	double h = gp_unigram_entropy(tr, nt, 40);
	CHECK(h > 3.6 && h <= log(40) + 1e-9);

	/* uninterrupted */
	struct gp_trainer *a = NULL;
	REQUIRE_OK(gp_trainer_create(&a, &p, tr, nt, va, nv, &err), err);
	double v0 = 0, v1 = 0, v1b = 0;
	REQUIRE_OK(gp_trainer_eval(a, &v0, &err), err);
	float loss = 0, lr = 0, first = 0;
	for (int s = 0; s < p.steps; s++) {
		REQUIRE_OK(gp_trainer_step(a, &loss, &lr, &err), err);
		if (s == 0)
			first = loss;
	}
	REQUIRE_OK(gp_trainer_eval(a, &v1, &err), err);
	REQUIRE_OK(gp_trainer_eval(a, &v1b, &err), err);
	printf("trainer: loss %.3f -> %.3f, val %.3f -> %.3f, unigram entropy %.3f\n", first, loss,
	       v0, v1, h);
	CHECK(v1 == v1b); /* evaluation is deterministic and changes nothing */
	CHECK(v1 < 0.7 * h); /* learned the cycle: far below the unigram entropy */
	CHECK(gp_trainer_steps_done(a) == p.steps);
	CHECK(gp_trainer_tokens_seen(a) == (unsigned long long)p.steps * p.batch * p.seq_len);
	char sha_a[65];
	gp_trainer_params_sha256(a, sha_a);

	/* interrupted twice, each time resumed by a fresh trainer from the file */
	char dir[] = "/tmp/gp-trainer-XXXXXX";
	REQUIRE(mkdtemp(dir));
	char path[256];
	snprintf(path, sizeof(path), "%s/ckpt", dir);
	struct gp_trainer *b = NULL;
	REQUIRE_OK(gp_trainer_create(&b, &p, tr, nt, va, nv, &err), err);
	int stops[] = {7, 23};
	int done = 0;
	for (int k = 0; k < 2; k++) {
		while (done < stops[k]) {
			REQUIRE_OK(gp_trainer_step(b, &loss, &lr, &err), err);
			done++;
		}
		REQUIRE_OK(gp_trainer_save(b, path, &err), err);
		/* keep going a little past the checkpoint: that work is lost */
		for (int extra = 0; extra < 3; extra++)
			REQUIRE_OK(gp_trainer_step(b, &loss, &lr, &err), err);
		gp_trainer_destroy(b);
		REQUIRE_OK(gp_trainer_create(&b, &p, tr, nt, va, nv, &err), err);
		REQUIRE_OK(gp_trainer_resume(b, path, &err), err);
		CHECK(gp_trainer_steps_done(b) == stops[k]);
	}
	while (gp_trainer_steps_done(b) < p.steps)
		REQUIRE_OK(gp_trainer_step(b, &loss, &lr, &err), err);
	char sha_b[65];
	gp_trainer_params_sha256(b, sha_b);
	CHECK_STR(sha_b, sha_a);
	double vb = 0;
	REQUIRE_OK(gp_trainer_eval(b, &vb, &err), err);
	CHECK(vb == v1);

	/* a checkpoint from other hyperparameters is not resumed */
	struct gp_train_params q = p;
	q.lr = 1e-3;
	struct gp_trainer *c = NULL;
	REQUIRE_OK(gp_trainer_create(&c, &q, tr, nt, va, nv, &err), err);
	CHECK(gp_trainer_resume(c, path, &err) == GP_ERR_CONFLICT);
	CHECK_CONTAINS(err.msg, "other hyperparameters");
	snprintf(path, sizeof(path), "%s/none", dir);
	CHECK(gp_trainer_resume(c, path, &err) == GP_ERR_NOT_FOUND);
	gp_trainer_destroy(c);

	/* too little data is a clear error */
	CHECK(gp_trainer_create(&c, &p, tr, 10, va, nv, &err) == GP_ERR_INVALID);
	CHECK_CONTAINS(err.msg, "fewer than with.seq_len + 1");

	snprintf(path, sizeof(path), "%s/ckpt", dir);
	unlink(path);
	rmdir(dir);
	gp_trainer_destroy(a);
	gp_trainer_destroy(b);
	free(tr);
	free(va);
}

/* with.device cuda: refused with the reason where there is no GPU; where
 * there is one, the same training reaches the CPU's validation loss. */
static void test_device(void)
{
	struct gp_err err = {0};
	struct gp_train_params p = small_params();
	size_t nt = 20000, nv = 2000;
	uint16_t *tr = corpus(nt, 40, 1), *va = corpus(nv, 40, 2);
	struct gp_trainer *g = NULL, *c = NULL;
	snprintf(p.device, sizeof(p.device), "cuda");
	const char *why = NULL;
	if (gp_gpu_available(&why) <= 0) {
		CHECK(gp_trainer_create(&g, &p, tr, nt, va, nv, &err) == GP_ERR_UNAVAILABLE);
		CHECK_CONTAINS(err.msg, "with.device");
		CHECK(g == NULL);
		printf("with.device cuda here: %s\n", err.msg);
	} else {
		REQUIRE_OK(gp_trainer_create(&g, &p, tr, nt, va, nv, &err), err);
		CHECK_STR(gp_trainer_device(g), "cuda");
		snprintf(p.device, sizeof(p.device), "cpu");
		REQUIRE_OK(gp_trainer_create(&c, &p, tr, nt, va, nv, &err), err);
		CHECK_STR(gp_trainer_device(c), "cpu");
		float lg = 0, lc = 0, lr = 0, first = 0;
		for (int i = 0; i < 40; i++) {
			REQUIRE_OK(gp_trainer_step(g, &lg, &lr, &err), err);
			REQUIRE_OK(gp_trainer_step(c, &lc, &lr, &err), err);
			if (i == 0)
				first = lg;
		}
		double vg = 0, vc = 0;
		REQUIRE_OK(gp_trainer_eval(g, &vg, &err), err);
		REQUIRE_OK(gp_trainer_eval(c, &vc, &err), err);
		printf("40 steps: train loss gpu %.4f cpu %.4f, val gpu %.4f cpu %.4f\n", lg, lc, vg,
		       vc);
		CHECK(lg < first);
		CHECK(fabs(vg - vc) <= 0.05 * vc);
		/* a checkpoint made on the GPU resumes on the CPU */
		char path[] = "/tmp/gp-train-gpu-XXXXXX";
		int fd = mkstemp(path);
		REQUIRE(fd >= 0);
		close(fd);
		REQUIRE_OK(gp_trainer_save(g, path, &err), err);
		struct gp_trainer *r = NULL;
		REQUIRE_OK(gp_trainer_create(&r, &p, tr, nt, va, nv, &err), err);
		REQUIRE_OK(gp_trainer_resume(r, path, &err), err);
		double vr = 0;
		REQUIRE_OK(gp_trainer_eval(r, &vr, &err), err);
		CHECK(gp_trainer_steps_done(r) == 40);
		CHECK(fabs(vr - vg) <= 0.02 * vg);
		unlink(path);
		gp_trainer_destroy(r);
		gp_trainer_destroy(c);
		gp_trainer_destroy(g);
	}
	free(tr);
	free(va);
}

int main(void)
{
	test_params();
	test_resume();
	test_device();
	return CHECK_RESULT();
}
