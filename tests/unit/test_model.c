/*
 * test_model: the GPT-2 library against its oracles.
 *   - gradient check: the double-precision backward against central finite
 *     differences, every parameter of a tiny model;
 *   - the float reference against the double one, and the fast path
 *     (OpenBLAS + OpenMP) against the float reference: logits, loss,
 *     gradients, an AdamW step;
 *   - KV-cache decoding against the full forward (both paths);
 *   - checkpoints: round trip bit for bit, and each kind of damage refused
 *     with its message; safetensors layout; sampling; the schedule;
 *     stop sequences.
 */
#include <cjson/cJSON.h>
#include <cblas.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#include "bpe.h"
#include "bytes.h"
#include "../check.h"
#include "cuda/gemm_plan.h"
#include "gpu.h"
#include "model.h"

static uint64_t rng = 12345;

static unsigned rnd(unsigned n)
{
	return (unsigned)(gp_mix64(rng++) % n);
}

static void random_tokens(uint16_t *t, int n, int V)
{
	for (int i = 0; i < n; i++)
		t[i] = (uint16_t)rnd((unsigned)V);
}

/* Perturb LayerNorm gains and biases away from 1 and 0 so that their
 * gradients are not special cases. */
static void perturb(struct gp_model *m)
{
	int ts[] = {GP_P_LN1W, GP_P_LN1B, GP_P_LN2W, GP_P_LN2B, GP_P_LNFW, GP_P_LNFB,
		    GP_P_QKVB, GP_P_ATTPROJB, GP_P_FCB, GP_P_FCPROJB};
	size_t sizes[GP_P_COUNT];
	gp_model_param_sizes(gp_model_config(m), sizes);
	for (size_t k = 0; k < sizeof(ts) / sizeof(ts[0]); k++) {
		float *p = gp_model_param_tensor(m, ts[k]);
		for (size_t i = 0; i < sizes[ts[k]]; i++)
			p[i] += 0.1f * ((float)rnd(2001) / 1000.0f - 1.0f);
	}
}

static void test_gradcheck(void)
{
	struct gp_err err = {0};
	struct gp_model_config c = {.vocab = 13, .padded_vocab = 16, .context = 6, .layers = 2,
				    .heads = 2, .width = 8};
	struct gp_model *m = NULL;
	REQUIRE_OK(gp_model_create(&m, &c, &err), err);
	gp_model_init(m, 7);
	/* larger weights than GPT-2's 0.02 so that every path carries signal */
	float *p = gp_model_params(m);
	for (size_t i = 0; i < gp_model_num_params(m); i++)
		p[i] *= 10.0f;
	perturb(m);
	int B = 2, T = 5;
	uint16_t in[10], tg[10];
	random_tokens(in, B * T, c.vocab);
	random_tokens(tg, B * T, c.vocab);
	struct gp_model64 *d = NULL;
	REQUIRE_OK(gp_model64_from(&d, m, &err), err);
	double loss = gp_model64_grad(d, in, tg, B, T);
	REQUIRE(isfinite(loss));
	size_t n = gp_model64_num_params(d);
	double *w = gp_model64_params(d);
	double *g = malloc(n * sizeof(double));
	memcpy(g, gp_model64_grads(d), n * sizeof(double));
	double worst = 0, h = 1e-6, gmax = 0;
	size_t worst_i = 0, nonzero = 0;
	for (size_t i = 0; i < n; i++) {
		double keep = w[i];
		w[i] = keep + h;
		double lp = gp_model64_loss(d, in, tg, B, T);
		w[i] = keep - h;
		double lm = gp_model64_loss(d, in, tg, B, T);
		w[i] = keep;
		double num = (lp - lm) / (2 * h);
		double e = fabs(num - g[i]) / (1e-6 + fabs(num) + fabs(g[i]));
		if (fabs(num - g[i]) > 1e-8 && e > worst) {
			worst = e;
			worst_i = i;
		}
		if (fabs(g[i]) > gmax)
			gmax = fabs(g[i]);
		nonzero += g[i] != 0;
	}
	printf("gradcheck: %zu parameters, %zu non-zero gradients, max |g| %.3g, worst relative error %.3g (param %zu)\n",
	       n, nonzero, gmax, worst, worst_i);
	CHECK(worst < 1e-5);
	CHECK(nonzero > n / 2);
	/* the vocabulary padding never gets a gradient */
	size_t pad0 = (size_t)c.vocab * c.width, pad1 = (size_t)c.padded_vocab * c.width;
	int pad_zero = 1;
	for (size_t i = pad0; i < pad1; i++)
		pad_zero &= g[i] == 0;
	CHECK(pad_zero);

	/* the float reference agrees with the double one */
	gp_model_set_path(m, GP_MODEL_REFERENCE);
	float fl = 0;
	REQUIRE_OK(gp_model_forward(m, in, tg, B, T, &fl, &err), err);
	gp_model_zero_grad(m);
	REQUIRE_OK(gp_model_backward(m, &err), err);
	CHECK(fabs(fl - loss) < 1e-5 * fabs(loss));
	const float *fg = gp_model_grads(m);
	double fworst = 0;
	for (size_t i = 0; i < n; i++) {
		double e = fabs(fg[i] - g[i]) / (1e-4 * gmax + fabs(g[i]));
		if (e > fworst)
			fworst = e;
	}
	printf("float reference vs double: loss %.9g vs %.9g, worst gradient error %.3g\n", fl, loss,
	       fworst);
	CHECK(fworst < 1e-2);
	free(g);
	gp_model64_destroy(d);
	gp_model_destroy(m);
}

static double max_rel(const float *a, const float *b, size_t n)
{
	double mx = 0, worst = 0;
	for (size_t i = 0; i < n; i++)
		if (fabs(b[i]) > mx)
			mx = fabs(b[i]);
	for (size_t i = 0; i < n; i++) {
		double e = fabs((double)a[i] - b[i]) / (mx > 0 ? mx : 1);
		if (e > worst)
			worst = e;
	}
	return worst;
}

/* The fast path against the float reference, tensor by tensor. */
static void test_fast_vs_reference(void)
{
	struct gp_err err = {0};
	struct gp_model_config c = {.vocab = 97, .padded_vocab = 128, .context = 32, .layers = 2,
				    .heads = 4, .width = 48};
	struct gp_model *ref = NULL, *fast = NULL;
	REQUIRE_OK(gp_model_create(&ref, &c, &err), err);
	REQUIRE_OK(gp_model_create(&fast, &c, &err), err);
	gp_model_init(ref, 99);
	perturb(ref);
	memcpy(gp_model_params(fast), gp_model_params(ref), gp_model_num_params(ref) * sizeof(float));
	gp_model_set_path(ref, GP_MODEL_REFERENCE);
	gp_model_set_path(fast, GP_MODEL_FAST);
	int B = 3, T = 29; /* T not a multiple of anything */
	uint16_t in[3 * 29], tg[3 * 29];
	random_tokens(in, B * T, c.vocab);
	random_tokens(tg, B * T, c.vocab);
	/* poison the fast path's activations: a stale value cannot pass */
	float lr = 0, lf = 0;
	REQUIRE_OK(gp_model_forward(fast, in, tg, B, T, &lf, &err), err);
	memset((void *)gp_model_logits(fast), 0xff, (size_t)B * T * c.padded_vocab * sizeof(float));
	REQUIRE_OK(gp_model_forward(ref, in, tg, B, T, &lr, &err), err);
	REQUIRE_OK(gp_model_forward(fast, in, tg, B, T, &lf, &err), err);
	double le = max_rel(gp_model_logits(fast), gp_model_logits(ref),
			    (size_t)B * T * c.padded_vocab);
	printf("fast vs reference: loss %.7f vs %.7f, logits max error %.3g\n", lf, lr, le);
	CHECK(fabs(lf - lr) < 1e-5 * lr);
	CHECK(le < 1e-5);
	gp_model_zero_grad(ref);
	gp_model_zero_grad(fast);
	REQUIRE_OK(gp_model_backward(ref, &err), err);
	REQUIRE_OK(gp_model_backward(fast, &err), err);
	size_t sizes[GP_P_COUNT];
	gp_model_param_sizes(&c, sizes);
	size_t off = 0;
	double gworst = 0;
	for (int t = 0; t < GP_P_COUNT; t++) {
		double e = max_rel(gp_model_grads(fast) + off, gp_model_grads(ref) + off, sizes[t]);
		if (e > gworst)
			gworst = e;
		CHECK(e < 1e-4);
		off += sizes[t];
	}
	printf("fast vs reference: worst gradient tensor error %.3g\n", gworst);
	/* gradients accumulate: a second backward doubles them */
	float norm1 = gp_model_clip_grad(fast, 0);
	REQUIRE_OK(gp_model_forward(fast, in, tg, B, T, &lf, &err), err);
	REQUIRE_OK(gp_model_backward(fast, &err), err);
	float norm2 = gp_model_clip_grad(fast, 0);
	CHECK(fabsf(norm2 - 2 * norm1) < 1e-4f * norm2);
	/* clipping scales to the limit */
	gp_model_clip_grad(fast, norm2 / 4);
	CHECK(fabsf(gp_model_clip_grad(fast, 0) - norm2 / 4) < 1e-4f * norm2);

	/* one AdamW step on each path from the same gradients */
	gp_model_zero_grad(ref);
	gp_model_zero_grad(fast);
	REQUIRE_OK(gp_model_forward(ref, in, tg, B, T, &lr, &err), err);
	REQUIRE_OK(gp_model_backward(ref, &err), err);
	REQUIRE_OK(gp_model_forward(fast, in, tg, B, T, &lf, &err), err);
	REQUIRE_OK(gp_model_backward(fast, &err), err);
	size_t n = gp_model_num_params(ref);
	float *m1 = calloc(n, 4), *v1 = calloc(n, 4), *m2 = calloc(n, 4), *v2 = calloc(n, 4);
	struct gp_adamw o = {.lr = 1e-3f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f,
			     .weight_decay = 0.1f};
	float *before = malloc(n * 4);
	memcpy(before, gp_model_params(ref), n * 4);
	gp_model_adamw(ref, m1, v1, &o, 1);
	gp_model_adamw(fast, m2, v2, &o, 1);
	CHECK(max_rel(gp_model_params(fast), gp_model_params(ref), n) < 1e-5);
	/* weight decay leaves the biases and gains alone: a bias with zero
	 * gradient does not move, a matrix entry with zero gradient shrinks */
	const float *bias_before = before + sizes[0] + sizes[1] + sizes[2];
	CHECK(gp_model_param_tensor(ref, GP_P_LN1B)[0] != bias_before[0] ||
	      gp_model_grads(ref)[sizes[0] + sizes[1] + sizes[2]] != 0);
	/* the padding rows of wte have zero gradient and get only decay: 0 stays 0 */
	CHECK(gp_model_param_tensor(ref, GP_P_WTE)[(size_t)c.vocab * c.width] == 0.0f);
	free(before);
	free(m1);
	free(v1);
	free(m2);
	free(v2);
	gp_model_destroy(ref);
	gp_model_destroy(fast);
}

/* AdamW on one repeated batch: the loss must fall (training works). */
static void test_overfit(void)
{
	struct gp_err err = {0};
	struct gp_model_config c = {.vocab = 50, .padded_vocab = 64, .context = 16, .layers = 2,
				    .heads = 2, .width = 32};
	struct gp_model *m = NULL;
	REQUIRE_OK(gp_model_create(&m, &c, &err), err);
	gp_model_init(m, 3);
	uint16_t seq[33];
	random_tokens(seq, 33, c.vocab);
	size_t n = gp_model_num_params(m);
	float *mo = calloc(n, 4), *ve = calloc(n, 4);
	struct gp_adamw o = {.lr = 3e-3f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f,
			     .weight_decay = 0.0f};
	float first = 0, last = 0;
	for (int s = 1; s <= 60; s++) {
		float l;
		REQUIRE_OK(gp_model_forward(m, seq, seq + 1, 2, 16, &l, &err), err);
		gp_model_zero_grad(m);
		REQUIRE_OK(gp_model_backward(m, &err), err);
		gp_model_clip_grad(m, 1.0f);
		gp_model_adamw(m, mo, ve, &o, s);
		if (s == 1)
			first = l;
		last = l;
	}
	printf("overfit: loss %.3f -> %.3f (ln V = %.3f)\n", first, last, log(c.vocab));
	CHECK(fabs(first - log(c.vocab)) < 0.2);
	CHECK(last < 0.5f);
	free(mo);
	free(ve);
	gp_model_destroy(m);
}

static void test_decode(enum gp_model_path path)
{
	struct gp_err err = {0};
	struct gp_model_config c = {.vocab = 61, .padded_vocab = 64, .context = 20, .layers = 3,
				    .heads = 2, .width = 16};
	struct gp_model *m = NULL;
	struct gp_kv *kv = NULL;
	REQUIRE_OK(gp_model_create(&m, &c, &err), err);
	REQUIRE_OK(gp_kv_create(&kv, &c, &err), err);
	gp_model_init(m, 5);
	float *p = gp_model_params(m);
	for (size_t i = 0; i < gp_model_num_params(m); i++)
		p[i] *= 20.0f; /* peaked logits */
	perturb(m);
	gp_model_set_path(m, path);
	uint16_t seq[20];
	random_tokens(seq, 20, c.vocab);
	REQUIRE_OK(gp_model_forward(m, seq, NULL, 1, 20, NULL, &err), err);
	const float *full = gp_model_logits(m);
	double worst = 0;
	int same = 1;
	for (int t = 0; t < 20; t++) {
		const float *l = NULL;
		REQUIRE_OK(gp_model_decode(m, kv, seq[t], &l, &err), err);
		double e = max_rel(l, full + (size_t)t * c.padded_vocab, (size_t)c.vocab);
		if (e > worst)
			worst = e;
		int a = 0, b = 0;
		for (int i = 1; i < c.vocab; i++) {
			if (l[i] > l[a])
				a = i;
			if (full[(size_t)t * c.padded_vocab + i] > full[(size_t)t * c.padded_vocab + b])
				b = i;
		}
		same &= a == b;
	}
	printf("decode (%s): KV-cache logits vs full forward, max error %.3g\n",
	       path == GP_MODEL_FAST ? "fast" : "reference", worst);
	/* sgemv and sgemm round differently; with weights scaled up for
	 * peaked logits the fast path differs by a few 1e-5 */
	CHECK(worst < (path == GP_MODEL_FAST ? 2e-4 : 1e-5));
	CHECK(same);
	const float *l = NULL;
	CHECK(gp_model_decode(m, kv, 1, &l, &err) == GP_ERR_TOO_BIG);
	gp_kv_reset(kv);
	CHECK(gp_model_decode(m, kv, (uint16_t)c.vocab, &l, &err) == GP_ERR_INVALID);
	gp_kv_destroy(kv);
	gp_model_destroy(m);
}

static void test_checkpoint(void)
{
	struct gp_err err = {0};
	struct gp_model_config c = {.vocab = 40, .padded_vocab = 48, .context = 8, .layers = 2,
				    .heads = 2, .width = 8};
	struct gp_model *m = NULL, *back = NULL;
	REQUIRE_OK(gp_model_create(&m, &c, &err), err);
	gp_model_init(m, 11);
	size_t n = gp_model_num_params(m);
	float *mo = malloc(n * 4), *ve = malloc(n * 4);
	for (size_t i = 0; i < n; i++) {
		mo[i] = (float)i * 1e-3f;
		ve[i] = (float)i * 1e-6f;
	}
	struct gp_ckpt_meta meta = {.step = 42, .tokens_seen = 1234567, .rng = {5, 6},
				    .train_fingerprint = 0xabcdef, .train_seconds = 3.5};
	uint8_t *img = NULL;
	size_t len = 0;
	REQUIRE_OK(gp_ckpt_encode(m, mo, ve, &meta, &img, &len, &err), err);
	CHECK(len == GP_CKPT_HEADER + 3 * n * 4);
	float *mo2 = NULL, *ve2 = NULL;
	struct gp_ckpt_meta m2 = {0};
	REQUIRE_OK(gp_ckpt_decode(img, len, &back, &mo2, &ve2, &m2, &err), err);
	CHECK(!memcmp(gp_model_params(back), gp_model_params(m), n * 4));
	CHECK(mo2 && !memcmp(mo2, mo, n * 4));
	CHECK(ve2 && !memcmp(ve2, ve, n * 4));
	CHECK(m2.step == 42 && m2.tokens_seen == 1234567 && m2.rng[0] == 5 && m2.rng[1] == 6 &&
	      m2.train_fingerprint == 0xabcdef && m2.train_seconds == 3.5);
	CHECK(!memcmp(gp_model_config(back), &c, sizeof(c)));
	gp_model_destroy(back);
	free(mo2);
	free(ve2);

	/* damage, each with its message */
	struct {
		size_t off;
		uint8_t val;
		const char *want;
	} cases[] = {
		{0, 'X', "bad magic"},
		{4, 9, "unsupported checkpoint version 8"},
		{8, 128, "header size"},
		{16, 41, "header checksum"}, /* any header byte: checksum */
		{200, 1, "reserved header byte 200"},
		{GP_CKPT_HEADER + 5, 0x55, "payload checksum"},
	};
	for (size_t k = 0; k < sizeof(cases) / sizeof(cases[0]); k++) {
		uint8_t *d = malloc(len);
		memcpy(d, img, len);
		d[cases[k].off] ^= cases[k].val;
		struct gp_model *x = NULL;
		struct gp_err e2 = {0};
		CHECK(gp_ckpt_decode(d, len, &x, NULL, NULL, NULL, &e2) == GP_ERR_INVALID);
		CHECK_CONTAINS(e2.msg, cases[k].want);
		CHECK(x == NULL);
		free(d);
	}
	struct gp_model *x = NULL;
	struct gp_err e3 = {0};
	CHECK(gp_ckpt_decode(img, len - 1, &x, NULL, NULL, NULL, &e3) == GP_ERR_INVALID);
	CHECK(gp_ckpt_decode(img, 100, &x, NULL, NULL, NULL, &e3) == GP_ERR_INVALID);
	CHECK_CONTAINS(e3.msg, "shorter than");

	/* a configuration out of range, with a correct header checksum */
	uint8_t *d = malloc(len);
	memcpy(d, img, len);
	gp_put_le32(d + 32, 3); /* heads 3 does not divide width 8 */
	/* recompute the header checksum the way the writer does */
	gp_put_le32(d + 100, (uint32_t)crc32(0L, d, 100));
	CHECK(gp_ckpt_decode(d, len, &x, NULL, NULL, NULL, &e3) == GP_ERR_INVALID);
	CHECK_CONTAINS(e3.msg, "heads 3 must divide width 8");
	free(d);

	/* a non-finite parameter is refused */
	gp_model_params(m)[7] = NAN;
	uint8_t *bad = NULL;
	size_t bl = 0;
	REQUIRE_OK(gp_ckpt_encode(m, NULL, NULL, &meta, &bad, &bl, &err), err);
	CHECK(bl == GP_CKPT_HEADER + n * 4);
	CHECK(gp_ckpt_decode(bad, bl, &x, NULL, NULL, NULL, &e3) == GP_ERR_INVALID);
	CHECK_CONTAINS(e3.msg, "parameter 7 is not finite");
	free(bad);
	gp_model_params(m)[7] = 0;

	/* the file form: atomic save, load names the file */
	char dir[] = "/tmp/gp-ckpt-XXXXXX";
	REQUIRE(mkdtemp(dir));
	char path[256];
	snprintf(path, sizeof(path), "%s/a.ckpt", dir);
	REQUIRE_OK(gp_ckpt_save(path, m, mo, ve, &meta, &err), err);
	REQUIRE_OK(gp_ckpt_load(path, &back, NULL, NULL, NULL, &err), err);
	CHECK(!memcmp(gp_model_params(back), gp_model_params(m), n * 4));
	gp_model_destroy(back);
	FILE *f = fopen(path, "r+b");
	REQUIRE(f);
	fseek(f, 1000, SEEK_SET);
	fputc(0x7f, f);
	fclose(f);
	CHECK(gp_ckpt_load(path, &back, NULL, NULL, NULL, &e3) == GP_ERR_INVALID);
	CHECK_CONTAINS(e3.msg, "a.ckpt");
	CHECK_CONTAINS(e3.msg, "damaged");
	snprintf(path, sizeof(path), "%s/missing.ckpt", dir);
	CHECK(gp_ckpt_load(path, &back, NULL, NULL, NULL, &e3) == GP_ERR_NOT_FOUND);
	snprintf(path, sizeof(path), "%s/a.ckpt", dir);
	unlink(path);
	rmdir(dir);
	free(img);
	free(mo);
	free(ve);
	gp_model_destroy(m);
}

static void test_safetensors(void)
{
	struct gp_err err = {0};
	struct gp_model_config c = {.vocab = 30, .padded_vocab = 32, .context = 8, .layers = 2,
				    .heads = 2, .width = 4};
	struct gp_model *m = NULL;
	REQUIRE_OK(gp_model_create(&m, &c, &err), err);
	gp_model_init(m, 1);
	perturb(m);
	uint8_t *b = NULL;
	size_t len = 0;
	REQUIRE_OK(gp_model_safetensors(m, &b, &len, &err), err);
	uint64_t hl = gp_get_le64(b);
	CHECK(hl % 8 == 0);
	REQUIRE(8 + hl <= len);
	cJSON *h = cJSON_ParseWithLength((const char *)b + 8, hl);
	REQUIRE(h);
	CHECK(cJSON_GetArraySize(h) == 1 + 4 + 12 * c.layers);
	const uint8_t *data = b + 8 + hl;
	size_t expect_off = 0;
	cJSON *e;
	cJSON_ArrayForEach(e, h) {
		if (!strcmp(e->string, "__metadata__"))
			continue;
		cJSON *offs = cJSON_GetObjectItem(e, "data_offsets");
		CHECK((size_t)cJSON_GetArrayItem(offs, 0)->valuedouble == expect_off);
		expect_off = (size_t)cJSON_GetArrayItem(offs, 1)->valuedouble;
		CHECK_STR(cJSON_GetObjectItem(e, "dtype")->valuestring, "F32");
	}
	CHECK(8 + hl + expect_off == len);
	/* wte keeps only the real vocabulary */
	cJSON *wte = cJSON_GetObjectItem(h, "wte.weight");
	CHECK(cJSON_GetArrayItem(cJSON_GetObjectItem(wte, "shape"), 0)->valueint == c.vocab);
	/* Conv1D layout: c_attn.weight is (in=C, out=3C) = our qkvw transposed */
	cJSON *ca = cJSON_GetObjectItem(h, "h.1.attn.c_attn.weight");
	REQUIRE(ca);
	cJSON *shape = cJSON_GetObjectItem(ca, "shape");
	CHECK(cJSON_GetArrayItem(shape, 0)->valueint == c.width);
	CHECK(cJSON_GetArrayItem(shape, 1)->valueint == 3 * c.width);
	size_t o0 = (size_t)cJSON_GetArrayItem(cJSON_GetObjectItem(ca, "data_offsets"), 0)->valuedouble;
	const float *qkvw = gp_model_param_tensor(m, GP_P_QKVW) + 3 * c.width * c.width;
	int ok = 1;
	for (int i = 0; i < c.width; i++)
		for (int o = 0; o < 3 * c.width; o++) {
			float v;
			memcpy(&v, data + o0 + ((size_t)i * 3 * c.width + o) * 4, 4);
			ok &= v == qkvw[(size_t)o * c.width + i];
		}
	CHECK(ok);
	cJSON *lnf = cJSON_GetObjectItem(h, "ln_f.bias");
	size_t lo = (size_t)cJSON_GetArrayItem(cJSON_GetObjectItem(lnf, "data_offsets"), 0)->valuedouble;
	CHECK(!memcmp(data + lo, gp_model_param_tensor(m, GP_P_LNFB), c.width * 4));
	cJSON_Delete(h);
	free(b);

	char dir[] = "/tmp/gp-st-XXXXXX";
	REQUIRE(mkdtemp(dir));
	REQUIRE_OK(gp_model_export_safetensors(m, dir, 29, &err), err);
	char path[256];
	snprintf(path, sizeof(path), "%s/config.json", dir);
	FILE *f = fopen(path, "r");
	REQUIRE(f);
	char buf[4096];
	size_t r = fread(buf, 1, sizeof(buf) - 1, f);
	buf[r] = 0;
	fclose(f);
	cJSON *cfg = cJSON_Parse(buf);
	REQUIRE(cfg);
	CHECK_STR(cJSON_GetObjectItem(cfg, "model_type")->valuestring, "gpt2");
	CHECK(cJSON_GetObjectItem(cfg, "n_layer")->valueint == 2);
	CHECK(cJSON_GetObjectItem(cfg, "vocab_size")->valueint == 30);
	CHECK(cJSON_GetObjectItem(cfg, "eos_token_id")->valueint == 29);
	cJSON_Delete(cfg);
	unlink(path);
	snprintf(path, sizeof(path), "%s/model.safetensors", dir);
	CHECK(access(path, R_OK) == 0);
	unlink(path);
	rmdir(dir);
	gp_model_destroy(m);
}

static void test_sampling(void)
{
	struct gp_err err = {0};
	float logits[5] = {1.0f, 3.0f, 2.0f, -1.0f, 2.9f}, p[5];
	int idx[5];
	uint64_t r = 1;
	struct gp_sample_opts greedy = {.temperature = 0};
	CHECK(gp_sample(logits, 5, &greedy, &r, p, idx) == 1);
	struct gp_sample_opts k1 = {.temperature = 1.0f, .top_k = 1};
	struct gp_sample_opts p1 = {.temperature = 1.0f, .top_p = 0.01f};
	int all1 = 1;
	for (int i = 0; i < 100; i++)
		all1 &= gp_sample(logits, 5, &k1, &r, p, idx) == 1 &&
			gp_sample(logits, 5, &p1, &r, p, idx) == 1;
	CHECK(all1);
	/* top_k 2 draws only the two best */
	struct gp_sample_opts k2 = {.temperature = 1.0f, .top_k = 2};
	int counts[5] = {0};
	for (int i = 0; i < 4000; i++)
		counts[gp_sample(logits, 5, &k2, &r, p, idx)]++;
	CHECK(counts[0] == 0 && counts[2] == 0 && counts[3] == 0);
	/* frequencies follow the softmax: p(1)/p(4) = e^0.1 = 1.105 */
	double ratio = (double)counts[1] / counts[4];
	CHECK(ratio > 0.95 && ratio < 1.3);
	/* full distribution at temperature 1 */
	struct gp_sample_opts t1 = {.temperature = 1.0f};
	int c2[5] = {0};
	for (int i = 0; i < 20000; i++)
		c2[gp_sample(logits, 5, &t1, &r, p, idx)]++;
	double z = 0;
	for (int i = 0; i < 5; i++)
		z += exp(logits[i]);
	int close = 1;
	for (int i = 0; i < 5; i++) {
		double want = exp(logits[i]) / z * 20000;
		close &= fabs(c2[i] - want) < 5 * sqrt(want) + 5;
	}
	CHECK(close);
	/* same seed, same draws */
	uint64_t a = 77, b = 77;
	int same = 1;
	for (int i = 0; i < 50; i++)
		same &= gp_sample(logits, 5, &t1, &a, p, idx) == gp_sample(logits, 5, &t1, &b, p, idx);
	CHECK(same);
	struct gp_sample_opts bad = {.temperature = NAN};
	CHECK(gp_sample_opts_check(&bad, &err) == GP_ERR_INVALID);
	CHECK_CONTAINS(err.msg, "temperature");
	bad = (struct gp_sample_opts){.temperature = -1};
	CHECK(gp_sample_opts_check(&bad, &err) == GP_ERR_INVALID);
	bad = (struct gp_sample_opts){.top_p = 1.5f};
	CHECK(gp_sample_opts_check(&bad, &err) == GP_ERR_INVALID);
	CHECK_CONTAINS(err.msg, "top_p");
	bad = (struct gp_sample_opts){.top_k = -2};
	CHECK(gp_sample_opts_check(&bad, &err) == GP_ERR_INVALID);

	/* schedule */
	CHECK(fabsf(gp_lr_cosine(0, 100, 10, 1.0f, 0.1f) - 0.1f) < 1e-6f);
	CHECK(fabsf(gp_lr_cosine(9, 100, 10, 1.0f, 0.1f) - 1.0f) < 1e-6f);
	CHECK(fabsf(gp_lr_cosine(10, 100, 10, 1.0f, 0.1f) - 1.0f) < 1e-6f);
	CHECK(fabsf(gp_lr_cosine(55, 100, 10, 1.0f, 0.1f) - 0.55f) < 1e-6f);
	CHECK(fabsf(gp_lr_cosine(100, 100, 10, 1.0f, 0.1f) - 0.1f) < 1e-6f);
}

static void test_generate(void)
{
	struct gp_err err = {0};
	struct gp_bpe_trainer *tr = NULL;
	REQUIRE_OK(gp_bpe_trainer_new(&tr, &err), err);
	const char *text = "the cat sat on the mat. the dog sat on the log. ";
	for (int i = 0; i < 20; i++)
		REQUIRE_OK(gp_bpe_trainer_add(tr, text, strlen(text), &err), err);
	struct gp_bpe *tok = NULL;
	REQUIRE_OK(gp_bpe_train(tr, 300, 0, &tok, &err), err);
	gp_bpe_trainer_free(tr);
	int V = gp_bpe_vocab_size(tok);
	struct gp_model_config c = {.vocab = V, .padded_vocab = (V + 63) / 64 * 64, .context = 64,
				    .layers = 2, .heads = 2, .width = 16};
	struct gp_model *m = NULL;
	struct gp_kv *kv = NULL;
	REQUIRE_OK(gp_model_create(&m, &c, &err), err);
	REQUIRE_OK(gp_kv_create(&kv, &c, &err), err);
	gp_model_init(m, 21);
	float *p = gp_model_params(m);
	for (size_t i = 0; i < gp_model_num_params(m); i++)
		p[i] *= 30.0f;
	struct gp_generate_opts o = {.sample = {.temperature = 0.8f, .seed = 4},
				     .max_new_tokens = 40};
	struct gp_generation g1 = {0}, g2 = {0}, g3 = {0};
	REQUIRE_OK(gp_model_generate(m, kv, tok, "the cat", 7, &o, NULL, NULL, &g1, &err), err);
	CHECK(g1.n_ids == 40 && g1.finish == GP_FINISH_LENGTH);
	CHECK(g1.prompt_tokens >= 1);
	REQUIRE_OK(gp_model_generate(m, kv, tok, "the cat", 7, &o, NULL, NULL, &g2, &err), err);
	CHECK(g1.len == g2.len && !memcmp(g1.text, g2.text, g1.len));
	/* a stop sequence taken from the middle of the text ends it there */
	REQUIRE(g1.len > 6);
	char stop[4];
	memcpy(stop, g1.text + g1.len / 2, 3);
	stop[3] = 0;
	const char *stops[] = {"\x01never", stop};
	o.stop = stops;
	o.n_stop = 2;
	REQUIRE_OK(gp_model_generate(m, kv, tok, "the cat", 7, &o, NULL, NULL, &g3, &err), err);
	char *first = memmem(g1.text, g1.len, stop, 3);
	REQUIRE(first);
	CHECK(g3.finish == GP_FINISH_STOP);
	CHECK(g3.len == (size_t)(first - g1.text) && !memcmp(g3.text, g1.text, g3.len));
	gp_generation_release(&g3);
	/* a prompt longer than the context is refused */
	char longp[2048];
	for (size_t i = 0; i < sizeof(longp); i++)
		longp[i] = "xyzq"[i % 4];
	CHECK(gp_model_generate(m, kv, tok, longp, sizeof(longp), &o, NULL, NULL, &g3, &err) ==
	      GP_ERR_TOO_BIG);
	CHECK_CONTAINS(err.msg, "context");
	o.sample.temperature = -1;
	CHECK(gp_model_generate(m, kv, tok, "a", 1, &o, NULL, NULL, &g3, &err) == GP_ERR_INVALID);
	gp_generation_release(&g1);
	gp_generation_release(&g2);
	gp_kv_destroy(kv);
	gp_model_destroy(m);
	gp_bpe_free(tok);
}

static void test_config(void)
{
	struct gp_err err = {0};
	struct gp_model_config ok = {.vocab = 50257, .padded_vocab = 50304, .context = 1024,
				     .layers = 12, .heads = 12, .width = 768};
	CHECK(gp_model_config_check(&ok, &err) == GP_OK);
	size_t s[GP_P_COUNT];
	/* llm.c's GPT-2 124M: 124,475,904 parameters with the padded vocabulary */
	CHECK(gp_model_param_sizes(&ok, s) == 124475904);
	struct gp_model_config bad = ok;
	bad.padded_vocab = 100;
	CHECK(gp_model_config_check(&bad, &err) == GP_ERR_INVALID);
	CHECK_CONTAINS(err.msg, "padded_vocab");
	bad = ok;
	bad.heads = 7;
	CHECK(gp_model_config_check(&bad, &err) == GP_ERR_INVALID);
	bad = ok;
	bad.context = 0;
	CHECK(gp_model_config_check(&bad, &err) == GP_ERR_INVALID);
	CHECK_CONTAINS(err.msg, "context");
	bad = ok;
	bad.width = 16384;
	bad.layers = 256;
	bad.heads = 16;
	CHECK(gp_model_config_check(&bad, &err) == GP_ERR_TOO_BIG);
}

/*
 * Batched steps against one-sequence decoding (the reference path's
 * gp_model_decode): three sequences of different lengths, prefilled in one
 * step with rows of several caches, then decoded together, with a fourth
 * joining halfway (continuous batching).
 */
static void test_step(enum gp_model_path path)
{
	struct gp_err err = {0};
	struct gp_model_config c = {.vocab = 61, .padded_vocab = 64, .context = 24, .layers = 3,
				    .heads = 2, .width = 16};
	struct gp_model *m = NULL;
	REQUIRE_OK(gp_model_create(&m, &c, &err), err);
	gp_model_init(m, 9);
	float *p = gp_model_params(m);
	for (size_t i = 0; i < gp_model_num_params(m); i++)
		p[i] *= 10.0f;
	perturb(m);
	enum { S = 4 };
	struct gp_kv *kv[S], *one[S];
	for (int s = 0; s < S; s++) {
		REQUIRE_OK(gp_kv_create(&kv[s], &c, &err), err);
		REQUIRE_OK(gp_kv_create(&one[s], &c, &err), err);
	}
	struct gp_batch *b = NULL;
	REQUIRE_OK(gp_batch_create(&b, &c, 32, &err), err);
	uint16_t seq[S][24];
	for (int s = 0; s < S; s++)
		random_tokens(seq[s], 24, c.vocab);
	int plen[S] = {5, 1, 9, 3};
	/* the oracle: each sequence alone through the reference decoder */
	static float want[S][24][64];
	gp_model_set_path(m, GP_MODEL_REFERENCE);
	for (int s = 0; s < S; s++)
		for (int t = 0; t < 20; t++) {
			const float *l = NULL;
			REQUIRE_OK(gp_model_decode(m, one[s], seq[s][t], &l, &err), err);
			memcpy(want[s][t], l, sizeof(want[s][t]));
		}
	gp_model_set_path(m, path);
	/* step 1: prefill sequences 0..2 (15 rows, logits at each prompt's end) */
	struct gp_step_row rows[32];
	int n = 0;
	for (int s = 0; s < 3; s++)
		for (int t = 0; t < plen[s]; t++)
			rows[n++] = (struct gp_step_row){kv[s], seq[s][t], t == plen[s] - 1};
	const float *l = NULL;
	int nl = 0;
	REQUIRE_OK(gp_model_step(m, b, rows, n, &l, &nl, &err), err);
	CHECK(nl == 3);
	double worst = 0;
	for (int s = 0; s < 3; s++) {
		double e = max_rel(l + (size_t)s * c.padded_vocab, want[s][plen[s] - 1], c.vocab);
		worst = e > worst ? e : worst;
	}
	/* then decode: one row per sequence; sequence 3 prefills at step 4 */
	int pos[S] = {5, 1, 9, 0};
	for (int step = 0; step < 8; step++) {
		n = 0;
		int active[S], na = 0;
		for (int s = 0; s < S; s++) {
			if (s == 3 && step < 3)
				continue;
			if (s == 3 && step == 3) {
				for (int t = 0; t < plen[3]; t++)
					rows[n++] = (struct gp_step_row){kv[3], seq[3][t], t == plen[3] - 1};
				pos[3] = plen[3];
				active[na++] = 3;
				continue;
			}
			rows[n++] = (struct gp_step_row){kv[s], seq[s][pos[s]], 1};
			pos[s]++;
			active[na++] = s;
		}
		REQUIRE_OK(gp_model_step(m, b, rows, n, &l, &nl, &err), err);
		REQUIRE(nl == na);
		for (int i = 0; i < na; i++) {
			int s = active[i];
			double e = max_rel(l + (size_t)i * c.padded_vocab, want[s][pos[s] - 1], c.vocab);
			worst = e > worst ? e : worst;
		}
	}
	for (int s = 0; s < S; s++)
		CHECK(gp_kv_len(kv[s]) == pos[s]);
	printf("step (%s): batched rows vs one-sequence reference decode, max error %.3g\n",
	       path == GP_MODEL_FAST ? "fast" : "reference", worst);
	CHECK(worst < (path == GP_MODEL_FAST ? 2e-4 : 1e-5));

	/* refusals change no cache */
	int before[S];
	for (int s = 0; s < S; s++)
		before[s] = gp_kv_len(kv[s]);
	struct gp_step_row bad[3] = {{kv[0], 1, 1}, {kv[1], 1, 1}, {kv[0], 2, 1}};
	CHECK(gp_model_step(m, b, bad, 3, &l, &nl, &err) == GP_ERR_INVALID);
	CHECK_CONTAINS(err.msg, "consecutive");
	bad[2] = (struct gp_step_row){kv[2], (uint16_t)c.vocab, 1};
	CHECK(gp_model_step(m, b, bad, 3, &l, &nl, &err) == GP_ERR_INVALID);
	CHECK_CONTAINS(err.msg, "vocabulary");
	struct gp_step_row full[32];
	for (int i = 0; i < 32; i++)
		full[i] = (struct gp_step_row){kv[1], 1, 0};
	CHECK(gp_model_step(m, b, full, 24, &l, &nl, &err) == GP_ERR_TOO_BIG);
	CHECK(gp_model_step(m, b, full, 33, &l, &nl, &err) == GP_ERR_INVALID);
	for (int s = 0; s < S; s++)
		CHECK(gp_kv_len(kv[s]) == before[s]);
	struct gp_model_config c2 = c;
	c2.context = 8;
	struct gp_kv *other = NULL;
	REQUIRE_OK(gp_kv_create(&other, &c2, &err), err);
	struct gp_step_row wrong = {other, 1, 1};
	CHECK(gp_model_step(m, b, &wrong, 1, &l, &nl, &err) == GP_ERR_INVALID);
	gp_kv_destroy(other);
	struct gp_batch *none = NULL;
	CHECK(gp_batch_create(&none, &c, 0, &err) == GP_ERR_INVALID);
	gp_batch_destroy(b);
	for (int s = 0; s < S; s++) {
		gp_kv_destroy(kv[s]);
		gp_kv_destroy(one[s]);
	}
	gp_model_destroy(m);
}

/* A mapped checkpoint serves the same logits as the loaded one; damage is refused. */
static void test_map(void)
{
	struct gp_err err = {0};
	struct gp_model_config c = {.vocab = 40, .padded_vocab = 48, .context = 8, .layers = 2,
				    .heads = 2, .width = 8};
	struct gp_model *m = NULL, *mapped = NULL;
	REQUIRE_OK(gp_model_create(&m, &c, &err), err);
	gp_model_init(m, 3);
	size_t n = gp_model_num_params(m);
	float *mo = calloc(n, 4), *ve = calloc(n, 4);
	char dir[] = "/tmp/gp-map-XXXXXX";
	REQUIRE(mkdtemp(dir));
	char path[256];
	snprintf(path, sizeof(path), "%s/a.ckpt", dir);
	struct gp_ckpt_meta meta = {.step = 7};
	REQUIRE_OK(gp_ckpt_save(path, m, mo, ve, &meta, &err), err);
	struct gp_ckpt_meta back = {0};
	REQUIRE_OK(gp_ckpt_map(path, &mapped, &back, &err), err);
	CHECK(back.step == 7);
	CHECK(gp_model_mapped_bytes(mapped) == GP_CKPT_HEADER + 3 * n * 4);
	CHECK(gp_model_mapped_bytes(m) == 0);
	CHECK(!memcmp(gp_model_params(mapped), gp_model_params(m), n * 4));
	CHECK(!memcmp(gp_model_config(mapped), &c, sizeof(c)));
	uint16_t in[8] = {1, 2, 3, 4, 5, 6, 7, 8};
	float l1 = 0, l2 = 0;
	REQUIRE_OK(gp_model_forward(m, in, in, 1, 8, &l1, &err), err);
	REQUIRE_OK(gp_model_forward(mapped, in, in, 1, 8, &l2, &err), err);
	CHECK(l1 == l2);
	CHECK(gp_model_backward(mapped, &err) == GP_ERR_INVALID);
	CHECK_CONTAINS(err.msg, "read-only");
	gp_model_destroy(mapped);
	FILE *f = fopen(path, "r+b");
	REQUIRE(f);
	fseek(f, 300, SEEK_SET);
	fputc(0x55, f);
	fclose(f);
	mapped = NULL;
	CHECK(gp_ckpt_map(path, &mapped, NULL, &err) == GP_ERR_INVALID);
	CHECK_CONTAINS(err.msg, "damaged");
	CHECK_CONTAINS(err.msg, "a.ckpt");
	CHECK(mapped == NULL);
	truncate(path, 100);
	CHECK(gp_ckpt_map(path, &mapped, NULL, &err) == GP_ERR_INVALID);
	unlink(path);
	CHECK(gp_ckpt_map(path, &mapped, NULL, &err) == GP_ERR_NOT_FOUND);
	rmdir(dir);
	free(mo);
	free(ve);
	gp_model_destroy(m);
}

#ifdef GENPIPE_HAVE_CUDA
#define GENPIPE_HAVE_CUDA_TEST 1
#else
#define GENPIPE_HAVE_CUDA_TEST 0
#endif

/* ---- the GPU's GEMM plans, run through column-major BLAS ---- */

static void plan_gemm(const struct gp_gemm *p, float alpha, const float *A, const float *B,
		      float beta, float *C, int batch)
{
	for (int i = 0; i < batch; i++)
		cblas_sgemm(CblasColMajor, p->ta ? CblasTrans : CblasNoTrans,
			    p->tb ? CblasTrans : CblasNoTrans, p->m, p->n, p->k, alpha,
			    A + i * p->sa, p->lda, B + i * p->sb, p->ldb, beta, C + i * p->sc,
			    p->ldc);
}

static float frand(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return (float)((*s >> 11) % 2001) / 1000.0f - 1.0f;
}

static float max_diff(const float *a, const float *b, size_t n)
{
	float m = 0;
	for (size_t i = 0; i < n; i++)
		m = fabsf(a[i] - b[i]) > m ? fabsf(a[i] - b[i]) : m;
	return m;
}

/*
 * The argument lists common/cuda/gpt.cu gives cuBLAS (gemm_plan.h), the
 * permutation between (B,T,C) and (B,NH,T,hs), and the order of the
 * attention's steps, executed with OpenBLAS in column-major mode and held to
 * plain row-major loops: what can be checked of the GPU path without a GPU.
 */
static void test_gemm_plans(void)
{
	uint64_t rs = 12345;
	enum { N = 5, C = 8, OC = 12, B = 2, T = 5, NH = 2, HS = C / NH };
	float inp[N * C], w[OC * C], dout[N * OC], out[N * OC], want[N * OC];
	float dinp[N * C], wdinp[N * C], dw[OC * C], wdw[OC * C];
	for (int i = 0; i < N * C; i++)
		inp[i] = frand(&rs);
	for (int i = 0; i < OC * C; i++) {
		w[i] = frand(&rs);
		dw[i] = wdw[i] = frand(&rs); /* dw accumulates */
	}
	for (int i = 0; i < N * OC; i++)
		dout[i] = frand(&rs);
	for (int n = 0; n < N; n++)
		for (int o = 0; o < OC; o++) {
			float a = 0;
			for (int c = 0; c < C; c++)
				a += inp[n * C + c] * w[o * C + c];
			want[n * OC + o] = a;
		}
	for (int n = 0; n < N; n++)
		for (int c = 0; c < C; c++) {
			float a = 0;
			for (int o = 0; o < OC; o++)
				a += dout[n * OC + o] * w[o * C + c];
			wdinp[n * C + c] = a;
		}
	for (int o = 0; o < OC; o++)
		for (int c = 0; c < C; c++)
			for (int n = 0; n < N; n++)
				wdw[o * C + c] += dout[n * OC + o] * inp[n * C + c];
	struct gp_gemm pf = gp_gemm_linear_fwd(N, C, OC), pi = gp_gemm_linear_dinp(N, C, OC),
		       pw = gp_gemm_linear_dw(N, C, OC);
	plan_gemm(&pf, 1, w, inp, 0, out, 1);
	plan_gemm(&pi, 1, w, dout, 0, dinp, 1);
	plan_gemm(&pw, 1, inp, dout, 1, dw, 1);
	CHECK(max_diff(out, want, N * OC) < 1e-5f);
	CHECK(max_diff(dinp, wdinp, N * C) < 1e-5f);
	CHECK(max_diff(dw, wdw, OC * C) < 1e-5f);

	/* attention: the GPU's sequence of steps against the loops */
	float qkv[B * T * 3 * C], dy_btc[B * T * C];
	for (int i = 0; i < B * T * 3 * C; i++)
		qkv[i] = frand(&rs);
	for (int i = 0; i < B * T * C; i++)
		dy_btc[i] = frand(&rs);
	float scale = 1.0f / sqrtf((float)HS);
	size_t n = (size_t)B * T * C;
	float q[B * T * C], k[B * T * C], v[B * T * C], pre[B * NH * T * T], att[B * NH * T * T],
	      y[B * T * C], atty[B * T * C];
	for (size_t i = 0; i < n; i++) { /* k_permute */
		size_t src = gp_bnth_to_btc(i, T, NH, HS, 3 * (size_t)C);
		q[i] = qkv[src];
		k[i] = qkv[src + C];
		v[i] = qkv[src + 2 * C];
	}
	struct gp_gemm ps = gp_gemm_att_scores(T, HS), pv = gp_gemm_att_values(T, HS);
	plan_gemm(&ps, scale, k, q, 0, pre, B * NH);
	for (int r = 0; r < B * NH * T; r++) { /* k_softmax_causal */
		int t = r % T;
		float mx = -INFINITY, sum = 0;
		for (int j = 0; j <= t; j++)
			mx = fmaxf(mx, pre[r * T + j]);
		for (int j = 0; j <= t; j++)
			sum += expf(pre[r * T + j] - mx);
		for (int j = 0; j < T; j++)
			att[r * T + j] = j <= t ? expf(pre[r * T + j] - mx) / sum : 0;
	}
	plan_gemm(&pv, 1, v, att, 0, y, B * NH);
	for (size_t i = 0; i < n; i++) /* k_unpermute */
		atty[gp_bnth_to_btc(i, T, NH, HS, C)] = y[i];
	/* the loops: softmax(q.k scaled, causal) . v per head, and the backward */
	float watty[B * T * C], watt[B * NH * T * T], wdqkv[B * T * 3 * C];
	memset(wdqkv, 0, sizeof wdqkv);
	for (int b = 0; b < B; b++)
		for (int h = 0; h < NH; h++)
			for (int t = 0; t < T; t++) {
				const float *qt = qkv + ((size_t)b * T + t) * 3 * C + h * HS;
				float *a = watt + (((size_t)b * NH + h) * T + t) * T, mx = -INFINITY,
				      sum = 0;
				for (int j = 0; j < T; j++) {
					float d = 0;
					for (int e = 0; e < HS; e++)
						d += qt[e] * qkv[((size_t)b * T + j) * 3 * C + C + h * HS + e];
					a[j] = d * scale;
					if (j <= t)
						mx = fmaxf(mx, a[j]);
				}
				for (int j = 0; j <= t; j++)
					sum += expf(a[j] - mx);
				for (int j = 0; j < T; j++)
					a[j] = j <= t ? expf(a[j] - mx) / sum : 0;
				for (int e = 0; e < HS; e++) {
					float acc = 0;
					for (int j = 0; j <= t; j++)
						acc += a[j] * qkv[((size_t)b * T + j) * 3 * C + 2 * C + h * HS + e];
					watty[((size_t)b * T + t) * C + h * HS + e] = acc;
				}
				/* backward of this row */
				const float *d = dy_btc + ((size_t)b * T + t) * C + h * HS;
				float da[T], dot = 0;
				for (int j = 0; j <= t; j++) {
					const float *vj = qkv + ((size_t)b * T + j) * 3 * C + 2 * C + h * HS;
					float *dvj = wdqkv + ((size_t)b * T + j) * 3 * C + 2 * C + h * HS;
					da[j] = 0;
					for (int e = 0; e < HS; e++) {
						da[j] += d[e] * vj[e];
						dvj[e] += a[j] * d[e];
					}
					dot += a[j] * da[j];
				}
				for (int j = 0; j <= t; j++) {
					float dp = a[j] * (da[j] - dot) * scale;
					const float *kj = qkv + ((size_t)b * T + j) * 3 * C + C + h * HS;
					float *dkj = wdqkv + ((size_t)b * T + j) * 3 * C + C + h * HS;
					float *dqt = wdqkv + ((size_t)b * T + t) * 3 * C + h * HS;
					for (int e = 0; e < HS; e++) {
						dqt[e] += dp * kj[e];
						dkj[e] += dp * qt[e];
					}
				}
			}
	CHECK(max_diff(att, watt, sizeof att / sizeof *att) < 1e-5f);
	CHECK(max_diff(atty, watty, n) < 1e-5f);
	/* the GPU's backward: unpermute^-1, datt, dv, softmax backward, dq, dk, permute^-1 */
	float dy[B * T * C], da[B * NH * T * T], dq[B * T * C], dk[B * T * C], dv[B * T * C],
	      dqkv[B * T * 3 * C];
	for (size_t i = 0; i < n; i++)
		dy[i] = dy_btc[gp_bnth_to_btc(i, T, NH, HS, C)];
	struct gp_gemm pda = gp_gemm_att_datt(T, HS), pdv = gp_gemm_att_dv(T, HS),
		       pdq = gp_gemm_att_dq(T, HS), pdk = gp_gemm_att_dk(T, HS);
	plan_gemm(&pda, 1, v, dy, 0, da, B * NH);
	plan_gemm(&pdv, 1, dy, att, 0, dv, B * NH);
	for (int r = 0; r < B * NH * T; r++) { /* k_softmax_causal_bwd, in place */
		int t = r % T;
		float dot = 0;
		for (int j = 0; j <= t; j++)
			dot += att[r * T + j] * da[r * T + j];
		for (int j = 0; j < T; j++)
			da[r * T + j] = j <= t ? att[r * T + j] * (da[r * T + j] - dot) * scale : 0;
	}
	plan_gemm(&pdq, 1, k, da, 0, dq, B * NH);
	plan_gemm(&pdk, 1, q, da, 0, dk, B * NH);
	for (size_t i = 0; i < n; i++) { /* k_permute_bwd */
		size_t dst = gp_bnth_to_btc(i, T, NH, HS, 3 * (size_t)C);
		dqkv[dst] = dq[i];
		dqkv[dst + C] = dk[i];
		dqkv[dst + 2 * C] = dv[i];
	}
	float md = max_diff(dqkv, wdqkv, sizeof dqkv / sizeof *dqkv);
	printf("GPU GEMM plans through column-major BLAS: attention gradient max error %.2g\n", md);
	CHECK(md < 1e-5f);
}

/* --device / with.device: the choice and its errors, GPU or not. */
static void test_device_choice(void)
{
	struct gp_err e = {0};
	const char *why = NULL;
	int have = gp_gpu_available(&why) > 0, use = -1;
	CHECK(have || (why && *why));
	REQUIRE_OK(gp_gpu_choose("cpu", &use, &e), e);
	CHECK(use == 0);
	REQUIRE_OK(gp_gpu_choose("auto", &use, &e), e);
	CHECK(use == have);
	REQUIRE_OK(gp_gpu_choose(NULL, &use, &e), e);
	CHECK(use == have);
	gp_status st = gp_gpu_choose("cuda", &use, &e);
	if (have) {
		CHECK(st == GP_OK && use == 1);
	} else {
		CHECK(st == GP_ERR_UNAVAILABLE && use == 0);
		CHECK_CONTAINS(e.msg, why); /* the reason, not just "no" */
	}
	CHECK(gp_gpu_choose("tpu", &use, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "\"tpu\"");
	CHECK_STR(gp_gpu_precision_str(GP_GPU_BF16), "bf16");
	CHECK_STR(gp_gpu_precision_str(GP_GPU_FP32), "fp32");
	CHECK(gp_gpu_built() == (GENPIPE_HAVE_CUDA_TEST + 0));
}

int main(void)
{
	test_device_choice();
	test_gemm_plans();
	test_config();
	test_gradcheck();
	test_fast_vs_reference();
	test_overfit();
	test_decode(GP_MODEL_REFERENCE);
	test_decode(GP_MODEL_FAST);
	test_step(GP_MODEL_REFERENCE);
	test_step(GP_MODEL_FAST);
	test_checkpoint();
	test_map();
	test_safetensors();
	test_sampling();
	test_generate();
	return CHECK_RESULT();
}
