/*
 * model_fast.c: the fast CPU path, model_ops.inc instantiated over float
 * with OpenBLAS matmuls and OpenMP loops, plus the optimizer's two memory
 * passes.
 *
 * This one file is compiled with -O3 -ffast-math (common/CMakeLists.txt):
 * GELU's tanh and the softmaxes' exp then vectorize through glibc's libmvec
 * and the reductions use vector lanes. Nothing here tests for NaN or
 * infinity (the callers in model.c do that), and the reassociation is fixed
 * at compile time, so runs stay bit-for-bit repeatable. test_model holds
 * every result to the plain reference.
 */
#include <cblas.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <tgmath.h>

#include "model.h"
#include "model_fast.h"

#define real float
#define GP_OPS_FAST 1
#define OPS(x) x##_fast
#include "model_ops.inc"

void gp_model_forward_fast_(const struct gp_model_config *cfg, float *const *P, float *const *A,
			    const uint16_t *inputs, const uint16_t *targets, int B, int T,
			    float *loss)
{
	forward_fast(cfg, P, A, inputs, targets, B, T, loss);
}

void gp_model_backward_fast_(const struct gp_model_config *cfg, float *const *P,
			     float *const *G, float *const *A, float *const *GA,
			     const uint16_t *inputs, const uint16_t *targets, int B, int T)
{
	backward_fast(cfg, P, G, A, GA, inputs, targets, B, T);
}

/* Fixed chunks, each summed by one thread, then the chunk sums in order:
 * the same bits whatever the schedule. */
#define CHUNK 16384

double gp_model_sumsq_fast_(const float *g, size_t n)
{
	size_t nchunks = (n + CHUNK - 1) / CHUNK;
	double *part = malloc(nchunks * sizeof(double));
	double total = 0;
	if (!part) {
		for (size_t i = 0; i < n; i++)
			total += (double)g[i] * g[i];
		return total;
	}
#pragma omp parallel for schedule(static)
	for (size_t c = 0; c < nchunks; c++) {
		size_t lo = c * CHUNK, hi = lo + CHUNK < n ? lo + CHUNK : n;
		float s = 0;
		for (size_t i = lo; i < hi; i++)
			s += g[i] * g[i];
		part[c] = s;
	}
	for (size_t c = 0; c < nchunks; c++)
		total += part[c];
	free(part);
	return total;
}

void gp_model_adamw_fast_(float *p, float *g, float *m, float *v, size_t n, float lr, float b1,
			  float b2, float eps, float wd, float b1c, float b2c)
{
	float ib1c = 1.0f / b1c, ib2c = 1.0f / b2c;
#pragma omp parallel for schedule(static) if (n > 4096)
	for (size_t i = 0; i < n; i++) {
		float gi = g[i];
		float mi = b1 * m[i] + (1.0f - b1) * gi;
		float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
		m[i] = mi;
		v[i] = vi;
		p[i] -= lr * ((mi * ib1c) / (sqrtf(vi * ib2c) + eps) + wd * p[i]);
		g[i] = 0;
	}
}
