/*
 * test_gpu: the CUDA path held to the CPU reference (label gpu).
 *
 * Fresh random parameters and tokens each run (the seed is printed, and
 * GENPIPE_TEST_SEED repeats one). Before each pass every GPU activation,
 * scratch buffer and the loss are filled with NaN, so a kernel that does
 * not write its output fails the comparison instead of passing on a stale
 * value. Each kernel's output is an activation or a gradient tensor that is
 * compared with the reference's: the encoder, LayerNorm (output, mean,
 * rstd), the QKV/attention-projection/MLP matmuls with their biases, the
 * attention (softmax probabilities and output), GELU, residuals, the
 * logits and per-token losses (in bf16 with the GEMM attention and with flash
 * attention, whose probabilities are not kept); then every parameter gradient, the gradient
 * norm, a clipped AdamW step, ten training steps, greedy generation (one
 * sequence, three at once, prefill in one step; graphs on and off) and
 * sampling on the device (as gp_sample on the same logits).
 *
 * Tolerances: fp32 max|gpu - cpu| / max|cpu| <= 1e-4 (orders of magnitude
 * under 1e-3; the two sum in different orders); bf16 ||gpu - cpu|| / ||cpu||
 * <= 1e-2. Without a GPU (or built without CUDA) the test exits 77, which
 * ctest reports as skipped, with the reason on stdout.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../check.h"
#include "gpu.h"
#include "model.h"

static uint64_t rng_state;

static uint32_t rnd(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return (uint32_t)(rng_state >> 11);
}

static const char *const act_names[GP_A_COUNT] = {
	"encoded", "ln1",      "ln1_mean", "ln1_rstd", "qkv",	  "atty",      "preatt", "att",
	"attproj", "residual2", "ln2",	    "ln2_mean", "ln2_rstd", "fch",	"fch_gelu",
	"fcproj",  "residual3", "lnf",	    "lnf_mean", "lnf_rstd", "logits",	"probs",
	"losses",
};
static const char *const param_names[GP_P_COUNT] = {
	"wte",	    "wpe",	 "ln1w",  "ln1b", "qkvw",      "qkvb",	     "attprojw", "attprojb",
	"ln2w",	    "ln2b",	 "fcw",	  "fcb",  "fcprojw",   "fcprojb",   "lnfw",	 "lnfb",
};

/* The error measure of a precision; NaN anywhere in got is an error of inf. */
static double rel_err(const float *got, const float *want, size_t n, enum gp_gpu_precision p)
{
	double num = 0, den = 0;
	for (size_t i = 0; i < n; i++) {
		if (isnan(got[i]) || isinf(got[i]))
			return INFINITY;
		double d = fabs((double)got[i] - want[i]), w = fabs((double)want[i]);
		if (p == GP_GPU_FP32) {
			num = d > num ? d : num;
			den = w > den ? w : den;
		} else {
			num += d * d;
			den += w * w;
		}
	}
	if (p == GP_GPU_BF16) {
		num = sqrt(num);
		den = sqrt(den);
	}
	return den > 0 ? num / den : num;
}

static double tolerance(enum gp_gpu_precision p)
{
	return p == GP_GPU_FP32 ? 1e-4 : 1e-2;
}

static const struct gp_model_config tiny = {
	.vocab = 97, .padded_vocab = 128, .context = 32, .layers = 2, .heads = 4, .width = 64,
};

static void random_tokens(uint16_t *x, size_t n, int vocab)
{
	for (size_t i = 0; i < n; i++)
		x[i] = (uint16_t)(rnd() % (uint32_t)vocab);
}

/* Forward, backward and one clipped AdamW step on both sides. */
static const char *attn_str(enum gp_gpu_attention a)
{
	return a == GP_GPU_ATTN_FLASH ? "flash attention" : "GEMM attention";
}

/* The model's attention set to a (flash: bf16 only, refused in fp32). */
static void set_attention(struct gp_gpu_model *g, enum gp_gpu_precision prec,
			  enum gp_gpu_attention a)
{
	struct gp_err e = { 0 };
	if (prec == GP_GPU_FP32) {
		CHECK(gp_gpu_model_set_attention(g, GP_GPU_ATTN_FLASH, &e) == GP_ERR_INVALID);
		CHECK(strstr(e.msg, "bf16") != NULL);
		CHECK(gp_gpu_model_attention(g) == GP_GPU_ATTN_GEMM);
		return;
	}
	REQUIRE_OK(gp_gpu_model_set_attention(g, a, &e), e);
	CHECK(gp_gpu_model_attention(g) == a);
}

static void check_passes(enum gp_gpu_precision prec, enum gp_gpu_attention attn)
{
	struct gp_err e = { 0 };
	const int B = 3, T = 17; /* odd sizes: no kernel may assume multiples */
	struct gp_model *m = NULL;
	REQUIRE_OK(gp_model_create(&m, &tiny, &e), e);
	gp_model_set_path(m, GP_MODEL_REFERENCE);
	gp_model_init(m, rnd());
	/* biases and LayerNorm parameters start at 0 and 1: perturb them so
	 * that their kernels are exercised with general values */
	float *P = gp_model_params(m);
	size_t np = gp_model_num_params(m);
	for (size_t i = 0; i < np; i++)
		P[i] += ((float)(rnd() % 2001) - 1000.0f) * 1e-5f;
	uint16_t in[B * T], tg[B * T];
	random_tokens(in, B * T, tiny.vocab);
	random_tokens(tg, B * T, tiny.vocab);

	struct gp_gpu_model *g = NULL;
	REQUIRE_OK(gp_gpu_model_create(&g, &tiny, prec, 4, 32, &e), e);
	set_attention(g, prec, attn);
	REQUIRE_OK(gp_gpu_model_upload(g, P, NULL, NULL, &e), e);
	REQUIRE_OK(gp_gpu_poison(g, &e), e);
	float lc = 0, lg = NAN;
	REQUIRE_OK(gp_model_forward(m, in, tg, B, T, &lc, &e), e);
	REQUIRE_OK(gp_gpu_forward(g, in, tg, B, T, &lg, &e), e);
	double tol = tolerance(prec);
	printf("%s forward (%s), loss cpu %.6f gpu %.6f\n", gp_gpu_precision_str(prec),
	       attn_str(gp_gpu_model_attention(g)), lc, lg);
	CHECK(fabs(lc - lg) <= (prec == GP_GPU_FP32 ? 1e-4 : 1e-2) * fabs(lc));
	size_t sizes[GP_A_COUNT];
	gp_model_act_sizes(&tiny, B, T, sizes);
	for (int a = 0; a < GP_A_COUNT; a++) {
		if (a == GP_A_PREATT || a == GP_A_PROBS ||
		    (a == GP_A_ATT && gp_gpu_model_attention(g) == GP_GPU_ATTN_FLASH)) {
			float x;
			CHECK(gp_gpu_read_activation(g, a, &x, 1, &e) == GP_ERR_INVALID);
			continue;
		}
		float *got = malloc(sizes[a] * sizeof *got);
		REQUIRE(got);
		REQUIRE_OK(gp_gpu_read_activation(g, a, got, sizes[a], &e), e);
		/* bf16 LayerNorm statistics are fp32 of bf16 inputs: the same bound */
		double r = rel_err(got, gp_model_activation(m, a), sizes[a], prec);
		printf("  %-10s %10zu values  error %.3g\n", act_names[a], sizes[a], r);
		if (!(r <= tol))
			fprintf(stderr, "activation %s: error %.3g over %.0e\n", act_names[a], r, tol);
		CHECK(r <= tol);
		free(got);
	}

	/* every parameter gradient */
	gp_model_zero_grad(m);
	REQUIRE_OK(gp_model_backward(m, &e), e);
	REQUIRE_OK(gp_gpu_zero_grad(g, &e), e);
	REQUIRE_OK(gp_gpu_backward(g, &e), e);
	/* a second backward without a forward is refused */
	CHECK(gp_gpu_backward(g, &e) == GP_ERR_INVALID);
	if (prec == GP_GPU_BF16) { /* and one after the attention changed */
		REQUIRE_OK(gp_gpu_forward(g, in, tg, B, T, NULL, &e), e);
		REQUIRE_OK(gp_gpu_model_set_attention(g, attn == GP_GPU_ATTN_FLASH
								 ? GP_GPU_ATTN_GEMM
								 : GP_GPU_ATTN_FLASH,
						      &e),
			   e);
		CHECK(gp_gpu_backward(g, &e) == GP_ERR_INVALID);
		REQUIRE_OK(gp_gpu_model_set_attention(g, attn, &e), e);
	}
	float *gg = malloc(np * sizeof *gg);
	REQUIRE(gg);
	REQUIRE_OK(gp_gpu_read_grads(g, gg, &e), e);
	const float *gc = gp_model_grads(m);
	size_t psz[GP_P_COUNT], off = 0;
	gp_model_param_sizes(&tiny, psz);
	for (int p = 0; p < GP_P_COUNT; p++) {
		double r = rel_err(gg + off, gc + off, psz[p], prec);
		printf("  d%-9s %10zu values  error %.3g\n", param_names[p], psz[p], r);
		if (!(r <= tol))
			fprintf(stderr, "gradient %s: error %.3g over %.0e\n", param_names[p], r, tol);
		CHECK(r <= tol);
		off += psz[p];
	}

	/* clip to half the norm, then AdamW with decay, from moments that are
	 * not zero (at step 1 from zero an update is lr * sign(g), which a
	 * rounding can flip for a gradient near zero) */
	float ng = 0;
	REQUIRE_OK(gp_gpu_clip_grad(g, 0, &ng, &e), e);
	float nc = gp_model_clip_grad(m, 0);
	CHECK(fabsf(nc - ng) <= tol * nc);
	REQUIRE_OK(gp_gpu_clip_grad(g, nc / 2, &ng, &e), e);
	gp_model_clip_grad(m, nc / 2);
	struct gp_adamw o = { .lr = 1e-3f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f,
			      .weight_decay = 0.1f };
	float *mom = malloc(np * sizeof *mom), *vel = malloc(np * sizeof *vel);
	float *pg = malloc(np * sizeof *pg), *mg = malloc(np * sizeof *mg),
	      *vg = malloc(np * sizeof *vg), *P0 = malloc(np * sizeof *P0);
	REQUIRE(mom && vel && pg && mg && vg && P0);
	for (size_t i = 0; i < np; i++) {
		mom[i] = ((float)(rnd() % 2001) - 1000.0f) * 1e-5f;
		vel[i] = 1e-4f + (float)(rnd() % 1000) * 1e-7f;
	}
	memcpy(P0, gp_model_params(m), np * sizeof *P0);
	/* the GPU's moments: the same values (its gradients stay its own) */
	REQUIRE_OK(gp_gpu_model_download(g, pg, NULL, NULL, &e), e);
	{
		/* upload resets nothing but parameters and moments */
		float *gkeep = malloc(np * sizeof *gkeep);
		REQUIRE(gkeep);
		REQUIRE_OK(gp_gpu_read_grads(g, gkeep, &e), e);
		REQUIRE_OK(gp_gpu_model_upload(g, pg, mom, vel, &e), e);
		REQUIRE_OK(gp_gpu_read_grads(g, gg, &e), e);
		CHECK(!memcmp(gkeep, gg, np * sizeof *gg));
		free(gkeep);
	}
	gp_model_adamw(m, mom, vel, &o, 5);
	REQUIRE_OK(gp_gpu_adamw(g, &o, 5, &e), e);
	REQUIRE_OK(gp_gpu_model_download(g, pg, mg, vg, &e), e);
	/* compare the updates (lr-sized), not the parameters */
	double num = 0, den = 0;
	for (size_t i = 0; i < np; i++) {
		double dg = (double)pg[i] - P0[i], dc = (double)gp_model_params(m)[i] - P0[i];
		num += (dg - dc) * (dg - dc);
		den += dc * dc;
	}
	double r_p = den > 0 ? sqrt(num / den) : sqrt(num);
	double r_m = rel_err(mg, mom, np, GP_GPU_BF16), r_v = rel_err(vg, vel, np, GP_GPU_BF16);
	REQUIRE_OK(gp_gpu_read_grads(g, gg, &e), e);
	int zero = 1;
	for (size_t i = 0; i < np; i++)
		zero &= gg[i] == 0.0f;
	CHECK(zero); /* AdamW leaves the gradients zero, as on the CPU */
	printf("  adamw: update error %.3g, moments %.3g %.3g, norm cpu %.6f gpu %.6f\n", r_p, r_m,
	       r_v, nc, ng);
	CHECK(r_p <= tol);
	CHECK(r_m <= tol);
	CHECK(r_v <= tol);
	free(pg);
	free(mg);
	free(vg);
	free(P0);
	free(mom);
	free(vel);
	free(gg);
	/* limits */
	uint16_t big[5 * 32] = { 0 };
	CHECK(gp_gpu_forward(g, big, big, 5, 8, NULL, &e) == GP_ERR_INVALID);
	in[3] = (uint16_t)tiny.vocab;
	CHECK(gp_gpu_forward(g, in, tg, B, T, NULL, &e) == GP_ERR_INVALID);
	gp_gpu_model_destroy(g);
	gp_model_destroy(m);
}

/* Ten training steps: the losses stay within 1e-2 relative of the CPU's. */
static void check_training(enum gp_gpu_precision prec, enum gp_gpu_attention attn)
{
	struct gp_err e = { 0 };
	const struct gp_model_config c = { .vocab = 200, .padded_vocab = 256, .context = 64,
					   .layers = 2, .heads = 4, .width = 128 };
	const int B = 4, T = 64;
	struct gp_model *m = NULL;
	REQUIRE_OK(gp_model_create(&m, &c, &e), e);
	gp_model_set_path(m, GP_MODEL_FAST);
	gp_model_init(m, rnd());
	size_t np = gp_model_num_params(m);
	struct gp_gpu_model *g = NULL;
	REQUIRE_OK(gp_gpu_model_create(&g, &c, prec, B, T, &e), e);
	set_attention(g, prec, attn);
	REQUIRE_OK(gp_gpu_model_upload(g, gp_model_params(m), NULL, NULL, &e), e);
	float *mom = calloc(np, sizeof *mom), *vel = calloc(np, sizeof *vel);
	REQUIRE(mom && vel);
	/* a learnable stream: a few repeating phrases */
	uint16_t data[B * T + 1];
	for (int i = 0; i < B * T + 1; i++)
		data[i] = (uint16_t)((i * 7 + (i / 13) * 3) % 50);
	struct gp_adamw o = { .lr = 1e-3f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f,
			      .weight_decay = 0.1f };
	double worst = 0;
	float first = 0, last = 0;
	for (int step = 1; step <= 10; step++) {
		float lc = 0, lg = 0, ng = 0;
		gp_model_zero_grad(m);
		REQUIRE_OK(gp_model_forward(m, data, data + 1, B, T, &lc, &e), e);
		REQUIRE_OK(gp_model_backward(m, &e), e);
		gp_model_clip_grad(m, 1.0f);
		gp_model_adamw(m, mom, vel, &o, step);
		REQUIRE_OK(gp_gpu_train_step(g, data, data + 1, B, T, &o, step, 1.0f, &lg, &ng, &e),
			   e);
		double r = fabs((double)lg - lc) / lc;
		worst = r > worst ? r : worst;
		if (step == 1)
			first = lg;
		last = lg;
		printf("  %s (%s) step %2d: loss cpu %.5f gpu %.5f (rel %.2g), gpu grad norm %.4f\n",
		       gp_gpu_precision_str(prec), attn_str(attn), step, lc, lg, r, ng);
	}
	CHECK(worst <= 1e-2);
	CHECK(last < first); /* it learns */
	free(mom);
	free(vel);
	gp_gpu_model_destroy(g);
	gp_model_destroy(m);
}

static int argmax(const float *x, int n)
{
	int b = 0;
	for (int i = 1; i < n; i++)
		if (x[i] > x[b])
			b = i;
	return b;
}

/* Greedy continuation on the CPU (the KV-cache decoder of model.c). */
static void cpu_greedy(struct gp_model *m, const uint16_t *prompt, int np, int gen, uint16_t *out)
{
	struct gp_err e = { 0 };
	struct gp_kv *kv = NULL;
	REQUIRE_OK(gp_kv_create(&kv, gp_model_config(m), &e), e);
	const float *lg = NULL;
	for (int i = 0; i < np; i++)
		REQUIRE_OK(gp_model_decode(m, kv, prompt[i], &lg, &e), e);
	for (int i = 0; i < gen; i++) {
		out[i] = (uint16_t)argmax(lg, gp_model_config(m)->vocab);
		if (i + 1 < gen)
			REQUIRE_OK(gp_model_decode(m, kv, out[i], &lg, &e), e);
	}
	gp_kv_destroy(kv);
}

static void check_generation(int graphs)
{
	struct gp_err e = { 0 };
	const struct gp_model_config c = tiny;
	struct gp_model *m = NULL;
	REQUIRE_OK(gp_model_create(&m, &c, &e), e);
	gp_model_set_path(m, GP_MODEL_FAST);
	gp_model_init(m, rnd());
	/* train it a little first: at initialization the logits are nearly
	 * equal and greedy choices would hang on near-ties */
	{
		size_t np = gp_model_num_params(m);
		float *mom = calloc(np, sizeof *mom), *vel = calloc(np, sizeof *vel);
		REQUIRE(mom && vel);
		uint16_t seq[4 * 32 + 1];
		for (int i = 0; i < 4 * 32 + 1; i++)
			seq[i] = (uint16_t)((i * 5 + (i / 7)) % c.vocab);
		struct gp_adamw o = { .lr = 3e-3f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f };
		for (int step = 1; step <= 40; step++) {
			float loss;
			gp_model_zero_grad(m);
			REQUIRE_OK(gp_model_forward(m, seq, seq + 1, 4, 32, &loss, &e), e);
			REQUIRE_OK(gp_model_backward(m, &e), e);
			gp_model_adamw(m, mom, vel, &o, step);
		}
		free(mom);
		free(vel);
	}
	gp_model_set_path(m, GP_MODEL_REFERENCE);
	struct gp_gpu_model *g = NULL;
	REQUIRE_OK(gp_gpu_model_create(&g, &c, GP_GPU_FP32, 1, 8, &e), e);
	REQUIRE_OK(gp_gpu_model_upload(g, gp_model_params(m), NULL, NULL, &e), e);
	struct gp_gpu_decoder *d = NULL;
	REQUIRE_OK(gp_gpu_decoder_create(&d, g, 3, 16, &e), e);
	gp_gpu_decoder_use_graphs(d, graphs);
	enum { NS = 3, GEN = 20 };
	uint16_t prompts[NS][6];
	int plen[NS] = { 6, 3, 5 };
	uint16_t want[NS][GEN], got[NS][GEN];
	for (int s = 0; s < NS; s++) {
		random_tokens(prompts[s], 6, c.vocab);
		cpu_greedy(m, prompts[s], plen[s], GEN, want[s]);
	}
	int Vp = c.padded_vocab;
	float *logits = malloc((size_t)16 * Vp * sizeof *logits);
	REQUIRE(logits);
	/* prefill all three prompts in one step (rows of a slot consecutive) */
	int slots[16];
	uint16_t toks[16];
	int n = 0, last_row[NS];
	for (int s = 0; s < NS; s++)
		for (int i = 0; i < plen[s]; i++) {
			slots[n] = s;
			toks[n] = prompts[s][i];
			last_row[s] = n;
			n++;
		}
	REQUIRE_OK(gp_gpu_decoder_step(d, slots, toks, n, logits, &e), e);
	for (int s = 0; s < NS; s++) {
		CHECK(gp_gpu_decoder_len(d, s) == plen[s]);
		got[s][0] = (uint16_t)argmax(logits + (size_t)last_row[s] * Vp, c.vocab);
	}
	/* then decode all three together, one row each */
	for (int i = 1; i < GEN; i++) {
		for (int s = 0; s < NS; s++) {
			slots[s] = s;
			toks[s] = got[s][i - 1];
		}
		if (i % 2) { /* the host's choice and the device's, alternately */
			REQUIRE_OK(gp_gpu_decoder_step(d, slots, toks, NS, logits, &e), e);
			for (int s = 0; s < NS; s++)
				got[s][i] = (uint16_t)argmax(logits + (size_t)s * Vp, c.vocab);
		} else {
			uint16_t next[NS];
			REQUIRE_OK(gp_gpu_decoder_greedy(d, slots, toks, NS, next, &e), e);
			for (int s = 0; s < NS; s++)
				got[s][i] = next[s];
		}
	}
	for (int s = 0; s < NS; s++) {
		int same = !memcmp(got[s], want[s], sizeof got[s]);
		if (!same)
			fprintf(stderr, "slot %d: greedy tokens differ from the CPU's (graphs %d)\n", s,
				graphs);
		CHECK(same);
	}
	printf("  greedy generation (graphs %s): 3 sequences x %d tokens identical to the CPU\n",
	       graphs ? "on" : "off", GEN);
	/* refusals change nothing */
	int before = gp_gpu_decoder_len(d, 0);
	int bad_slot[2] = { 0, 7 };
	uint16_t two[2] = { 1, 2 };
	CHECK(gp_gpu_decoder_step(d, bad_slot, two, 2, NULL, &e) == GP_ERR_INVALID);
	int split[3] = { 0, 1, 0 };
	uint16_t three[3] = { 1, 2, 3 };
	CHECK(gp_gpu_decoder_step(d, split, three, 3, NULL, &e) == GP_ERR_INVALID);
	uint16_t badtok = (uint16_t)c.vocab;
	CHECK(gp_gpu_decoder_step(d, bad_slot, &badtok, 1, NULL, &e) == GP_ERR_INVALID);
	CHECK(gp_gpu_decoder_len(d, 0) == before);
	/* a full cache is refused */
	gp_gpu_decoder_reset(d, 1);
	CHECK(gp_gpu_decoder_len(d, 1) == 0);
	int one = 1;
	uint16_t t0 = 0;
	for (int i = 0; i < c.context; i++)
		REQUIRE_OK(gp_gpu_decoder_step(d, &one, &t0, 1, NULL, &e), e);
	CHECK(gp_gpu_decoder_step(d, &one, &t0, 1, NULL, &e) == GP_ERR_TOO_BIG);
	CHECK(gp_gpu_decoder_len(d, 1) == c.context);
	free(logits);
	gp_gpu_decoder_destroy(d);
	gp_gpu_model_destroy(g);
	gp_model_destroy(m);
}

/*
 * Sampling on the device against gp_sample on the host over the same
 * logits: decoder A returns its logits, decoder B (same model, same rows)
 * draws on the device; for every row that wants a token, B's choice must be
 * gp_sample's with the same generator. Greedy, temperature alone, top-k,
 * top-p, both, and a vocabulary smaller than the model's.
 */
static void check_sampling(int graphs)
{
	struct gp_err e = { 0 };
	const struct gp_model_config c = tiny;
	struct gp_model *m = NULL;
	REQUIRE_OK(gp_model_create(&m, &c, &e), e);
	gp_model_init(m, rnd());
	struct gp_gpu_model *g = NULL;
	REQUIRE_OK(gp_gpu_model_create(&g, &c, GP_GPU_FP32, 0, 0, &e), e);
	REQUIRE_OK(gp_gpu_model_upload(g, gp_model_params(m), NULL, NULL, &e), e);
	enum { NS = 6, STEPS = 24 };
	struct gp_gpu_decoder *da = NULL, *db = NULL;
	REQUIRE_OK(gp_gpu_decoder_create(&da, g, NS, 32, &e), e);
	REQUIRE_OK(gp_gpu_decoder_create(&db, g, NS, 32, &e), e);
	gp_gpu_decoder_use_graphs(da, graphs);
	gp_gpu_decoder_use_graphs(db, graphs);
	/* the logits of a random model are close together: a high temperature
	 * would make every choice near-uniform, so some rows sharpen them */
	const struct gp_sample_opts opts[NS] = {
		{ .temperature = 0 },
		{ .temperature = 1.0f },
		{ .temperature = 0.05f, .top_k = 5 },
		{ .temperature = 0.1f, .top_p = 0.9f },
		{ .temperature = 0.08f, .top_k = 20, .top_p = 0.8f },
		{ .temperature = 0.5f, .top_p = 0.5f },
	};
	const int vocab[NS] = { c.vocab, c.vocab, c.vocab, c.vocab - 3, c.vocab, c.vocab - 10 };
	uint64_t rng_dev[NS], rng_cpu[NS];
	for (int s = 0; s < NS; s++)
		rng_dev[s] = rng_cpu[s] = ((uint64_t)rnd() << 32) | rnd();
	int Vp = c.padded_vocab, total = 0, same = 0, sorted_rows = 0;
	float *logits = malloc((size_t)32 * Vp * sizeof *logits), *sp = malloc(Vp * sizeof *sp);
	int *si = malloc(Vp * sizeof *si);
	REQUIRE(logits && sp && si);
	int slots[32];
	uint16_t toks[32], next[32], last[NS];
	struct gp_gpu_pick picks[32];
	for (int step = 0; step < STEPS; step++) {
		/* step 0: a prompt of 3 rows per slot (only its last row wants a
		 * token); then one row per slot with its last token */
		int n = 0;
		for (int s = 0; s < NS; s++)
			for (int i = 0; i < (step ? 1 : 3); i++) {
				slots[n] = s;
				toks[n] = step ? last[s] : (uint16_t)(rnd() % (uint32_t)vocab[s]);
				memset(&picks[n], 0, sizeof picks[n]);
				if (step || i == 2) {
					picks[n] = (struct gp_gpu_pick){
						.want = 1, .vocab = vocab[s],
						.temperature = opts[s].temperature,
						.top_k = opts[s].top_k, .top_p = opts[s].top_p,
						.u = opts[s].temperature > 0 ? gp_sample_draw(&rng_dev[s])
									     : 0.0,
					};
				}
				n++;
			}
		REQUIRE_OK(gp_gpu_decoder_step(da, slots, toks, n, logits, &e), e);
		REQUIRE_OK(gp_gpu_decoder_sample(db, slots, toks, picks, n, next, &e), e);
		for (int i = 0; i < n; i++) {
			if (!picks[i].want) {
				CHECK(next[i] == 0);
				continue;
			}
			int s = slots[i];
			int want = gp_sample(logits + (size_t)i * Vp, vocab[s], &opts[s], &rng_cpu[s],
					     sp, si);
			total++;
			same += next[i] == want;
			sorted_rows += opts[s].top_k > 0 || (opts[s].top_p > 0 && opts[s].top_p < 1);
			if (next[i] != want)
				fprintf(stderr, "step %d slot %d: device drew %u, gp_sample %d\n", step,
					s, next[i], want);
			CHECK(next[i] < vocab[s]);
			last[s] = next[i];
		}
	}
	CHECK(same == total);
	printf("  sampling on the device (graphs %s): %d of %d draws as gp_sample's (%d with "
	       "top-k or top-p)\n",
	       graphs ? "on" : "off", same, total, sorted_rows);
	/* a pick out of range is refused before any cache changes */
	int len0 = gp_gpu_decoder_len(db, 0);
	struct gp_gpu_pick bad = { .want = 1, .vocab = c.vocab + 1, .temperature = 1 };
	uint16_t t0 = 0;
	int s0 = 0;
	CHECK(gp_gpu_decoder_sample(db, &s0, &t0, &bad, 1, next, &e) == GP_ERR_INVALID);
	CHECK(strstr(e.msg, "vocabulary") != NULL);
	bad = (struct gp_gpu_pick){ .want = 1, .vocab = c.vocab, .temperature = 1, .u = 1.0 };
	CHECK(gp_gpu_decoder_sample(db, &s0, &t0, &bad, 1, next, &e) == GP_ERR_INVALID);
	CHECK(gp_gpu_decoder_len(db, 0) == len0);
	free(logits);
	free(sp);
	free(si);
	gp_gpu_decoder_destroy(da);
	gp_gpu_decoder_destroy(db);
	gp_gpu_model_destroy(g);
	gp_model_destroy(m);
}

int main(void)
{
	const char *why = NULL;
	int n = gp_gpu_available(&why);
	if (n <= 0) {
		struct gp_err e = { 0 };
		struct gp_gpu_model *g = NULL;
		/* the door says why, in the caller's error too */
		int st = gp_gpu_model_create(&g, &tiny, GP_GPU_FP32, 1, 1, &e);
		printf("SKIPPED: no GPU: %s (%s)\n", why ? why : "?",
		       st == GP_ERR_UNAVAILABLE ? e.msg : "unexpected status");
		return st == GP_ERR_UNAVAILABLE ? 77 : 1;
	}
	char name[256];
	size_t mem = 0;
	gp_gpu_describe(0, name, sizeof name, &mem);
	const char *s = getenv("GENPIPE_TEST_SEED");
	rng_state = s ? strtoull(s, NULL, 10) : (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
	if (!rng_state)
		rng_state = 1;
	printf("device %s, %.1f GiB; GENPIPE_TEST_SEED=%llu\n", name, mem / 1073741824.0,
	       (unsigned long long)rng_state);
	check_passes(GP_GPU_FP32, GP_GPU_ATTN_GEMM);
	check_passes(GP_GPU_BF16, GP_GPU_ATTN_GEMM);
	check_passes(GP_GPU_BF16, GP_GPU_ATTN_FLASH);
	check_training(GP_GPU_FP32, GP_GPU_ATTN_GEMM);
	check_training(GP_GPU_BF16, GP_GPU_ATTN_GEMM);
	check_training(GP_GPU_BF16, GP_GPU_ATTN_FLASH);
	check_generation(0);
	check_generation(1);
	check_sampling(0);
	check_sampling(1);
	return CHECK_RESULT();
}
