/*
 * model_bench: CPU training speed of the GPT-2 library, fast path beside the
 * plain C reference on the same shape in the same run, and both beside the
 * machine's OpenBLAS sgemm rate (measured here too).
 *
 * A training step is forward + backward + gradient clipping + AdamW. The
 * effective GFLOP/s counts 3x the forward pass's matmul and attention FLOPs
 * (gp_model_forward_flops), as llm.c and nanoGPT count MFU. Before timing,
 * the first step's loss on both paths is compared (they must agree).
 *
 * Shapes: "demo" is the demo pipeline's model (vocab 4096, context 256,
 * 4 layers, 4 heads, width 256) at batch 8 x 128; "124m" is llm.c's GPT-2
 * 124M (vocab 50304, context 1024, 12 layers, 12 heads, width 768) at
 * batch 4 x 64.
 * Usage: model_bench [demo|124m|all] [MIN_SECONDS]
 * (MODEL_BENCH_FAST_ONLY=1 in the environment skips the reference, for perf)
 */
#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bytes.h"
#include "model.h"

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* GFLOP/s of C (M,N) = A (M,K) . B^T, best of a few runs of at least min_s */
static double sgemm_rate(int M, int N, int K, double min_s)
{
	float *a = malloc((size_t)M * K * 4), *b = malloc((size_t)N * K * 4),
	      *c = malloc((size_t)M * N * 4);
	for (size_t i = 0; i < (size_t)M * K; i++)
		a[i] = (float)(i % 13) * 0.01f;
	for (size_t i = 0; i < (size_t)N * K; i++)
		b[i] = (float)(i % 7) * 0.01f;
	cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1, a, K, b, K, 0, c, N);
	double best = 0;
	for (int rep = 0; rep < 3; rep++) {
		int n = 0;
		double t0 = now(), t;
		do {
			cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1, a, K, b, K, 0,
				    c, N);
			n++;
		} while ((t = now() - t0) < min_s / 3);
		double r = 2.0 * M * N * K * n / t / 1e9;
		if (r > best)
			best = r;
	}
	free(a);
	free(b);
	free(c);
	return best;
}

struct result {
	double step_s, tok_s, gflops;
	double phase[4]; /* forward, backward, clip, adamw (s per step) */
	float loss;
};

static int run(struct gp_model *m, float *mo, float *ve, const uint16_t *x, int B, int T,
	       int min_steps, double min_s, struct result *r)
{
	struct gp_err err = {0};
	struct gp_adamw o = {.lr = 1e-4f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f,
			     .weight_decay = 0.1f};
	int steps = 0;
	gp_model_zero_grad(m);
	double ph[4] = {0}, t0 = 0, t = 0;
	/* step 0 is a warm-up (it allocates and first-touches the activations,
	 * gradients and moments); the timing starts after it */
	for (;;) {
		float loss;
		double a = now();
		if (steps == 1)
			t0 = a;
		if (gp_model_forward(m, x, x + 1, B, T, &loss, &err)) {
			fprintf(stderr, "model_bench: %s\n", err.msg);
			return -1;
		}
		double b = now();
		if (gp_model_backward(m, &err)) {
			fprintf(stderr, "model_bench: %s\n", err.msg);
			return -1;
		}
		double c = now();
		gp_model_clip_grad(m, 1.0f);
		double d = now();
		gp_model_adamw(m, mo, ve, &o, steps + 1);
		double e = now();
		if (steps == 0)
			r->loss = loss;
		else {
			ph[0] += b - a;
			ph[1] += c - b;
			ph[2] += d - c;
			ph[3] += e - d;
		}
		steps++;
		if (steps > 1 && ((t = now() - t0) >= min_s && steps - 1 >= min_steps))
			break;
	}
	steps--; /* timed steps */
	r->step_s = t / steps;
	for (int i = 0; i < 4; i++)
		r->phase[i] = ph[i] / steps;
	r->tok_s = (double)B * T / r->step_s;
	r->gflops = 3.0 * gp_model_forward_flops(gp_model_config(m), B, T) / r->step_s / 1e9;
	return 0;
}

static int bench_shape(const char *name, struct gp_model_config c, int B, int T, double min_s,
		       double sgemm)
{
	struct gp_err err = {0};
	struct gp_model *m = NULL;
	if (gp_model_create(&m, &c, &err)) {
		fprintf(stderr, "model_bench: %s\n", err.msg);
		return 1;
	}
	size_t n = gp_model_num_params(m);
	float *mo = calloc(n, 4), *ve = calloc(n, 4);
	float *saved = malloc(n * 4);
	uint16_t *x = malloc(((size_t)B * T + 1) * sizeof(uint16_t));
	uint64_t s = 1;
	for (int i = 0; i < B * T + 1; i++)
		x[i] = (uint16_t)(gp_mix64(s++) % (uint64_t)c.vocab);
	gp_model_init(m, 1);
	memcpy(saved, gp_model_params(m), n * 4);
	printf("\n%s: vocab %d, context %d, %d layers, %d heads, width %d: %.1fM parameters, batch %d x %d\n",
	       name, c.vocab, c.context, c.layers, c.heads, c.width, n / 1e6, B, T);
	printf("  %-22s %12s %12s %10s %10s %10s\n", "path", "step (ms)", "tokens/s", "GFLOP/s",
	       "of sgemm", "loss@1");
	struct result fast = {0}, ref = {0};
	gp_model_set_path(m, GP_MODEL_FAST);
	if (run(m, mo, ve, x, B, T, 3, min_s, &fast))
		return 1;
	printf("  %-22s %12.1f %12.0f %10.1f %9.0f%% %10.4f\n", "fast (OpenBLAS+OpenMP)",
	       fast.step_s * 1e3, fast.tok_s, fast.gflops, 100 * fast.gflops / sgemm, fast.loss);
	fflush(stdout);
	printf("  %-22s forward %.1f ms, backward %.1f ms, clip %.1f ms, AdamW %.1f ms\n", "",
	       fast.phase[0] * 1e3, fast.phase[1] * 1e3, fast.phase[2] * 1e3, fast.phase[3] * 1e3);
	if (getenv("MODEL_BENCH_FAST_ONLY")) /* for profiling the fast path */
		return 0;
	memcpy(gp_model_params(m), saved, n * 4);
	memset(mo, 0, n * 4);
	memset(ve, 0, n * 4);
	gp_model_set_path(m, GP_MODEL_REFERENCE);
	if (run(m, mo, ve, x, B, T, 1, 0, &ref))
		return 1;
	printf("  %-22s %12.1f %12.1f %10.2f %9.1f%% %10.4f\n", "reference (plain C)",
	       ref.step_s * 1e3, ref.tok_s, ref.gflops, 100 * ref.gflops / sgemm, ref.loss);
	printf("  fast / reference: %.1fx; first-step losses differ by %.2g\n",
	       fast.tok_s / ref.tok_s, fabs(fast.loss - ref.loss));
	int bad = fabs(fast.loss - ref.loss) > 1e-3 * fabs(ref.loss);
	if (bad)
		fprintf(stderr, "model_bench: the paths disagree on the loss\n");
	free(mo);
	free(ve);
	free(saved);
	free(x);
	gp_model_destroy(m);
	return bad;
}

int main(int argc, char **argv)
{
	const char *which = argc > 1 ? argv[1] : "all";
	double min_s = argc > 2 ? atof(argv[2]) : 5.0;
	double sq = sgemm_rate(1024, 1024, 1024, 2.0);
	double shaped = sgemm_rate(256, 3072, 768, 2.0);
	double sgemm = sq > shaped ? sq : shaped;
	printf("OpenBLAS sgemm: %.1f GFLOP/s at 1024^3, %.1f GFLOP/s at 256x3072x768 (the 124M MLP at 4x64 tokens)\n",
	       sq, shaped);
	int rc = 0;
	if (!strcmp(which, "demo") || !strcmp(which, "all"))
		rc |= bench_shape("demo", (struct gp_model_config){.vocab = 4096, .padded_vocab = 4096,
								    .context = 256, .layers = 4,
								    .heads = 4, .width = 256},
				  8, 128, min_s, sgemm);
	if (!strcmp(which, "124m") || !strcmp(which, "all"))
		rc |= bench_shape("124m", (struct gp_model_config){.vocab = 50304,
								    .padded_vocab = 50304,
								    .context = 1024, .layers = 12,
								    .heads = 12, .width = 768},
				  4, 64, min_s, sgemm);
	return rc;
}
