/*
 * gemm_plan.h: the model's row-major products written as column-major
 * GEMMs (cuBLAS's, and BLAS's CblasColMajor), in one place that both the
 * CUDA path (gpt.cu) and a CPU unit test (test_model: gemm plans through
 * OpenBLAS against the reference) use, so that the argument lists the GPU
 * runs have been executed and checked on a machine without a GPU.
 *
 * Plain C, no CUDA types; included from C and from CUDA.
 *
 * Each plan names which tensor is the A operand and which the B operand;
 * a row-major (R, C) matrix is the column-major (C, R) matrix with ld = C.
 */
#ifndef GP_GEMM_PLAN_H
#define GP_GEMM_PLAN_H

#include <stddef.h>

#ifdef __CUDACC__
#define GP_HD __host__ __device__
#else
#define GP_HD
#endif

struct gp_gemm {
	int ta, tb;		/* 1: the operand is transposed (CUBLAS_OP_T) */
	int m, n, k;
	int lda, ldb, ldc;
	long long sa, sb, sc;	/* strides between batches (batched products) */
};

/* out (N, OC) = inp (N, C) . w (OC, C)^T.  A = w, B = inp, C = out. */
static inline struct gp_gemm gp_gemm_linear_fwd(int N, int C, int OC)
{
	struct gp_gemm g = { 1, 0, OC, N, C, C, C, OC, 0, 0, 0 };
	return g;
}

/* dinp (N, C) = dout (N, OC) . w (OC, C).  A = w, B = dout, C = dinp. */
static inline struct gp_gemm gp_gemm_linear_dinp(int N, int C, int OC)
{
	struct gp_gemm g = { 0, 0, C, N, OC, C, OC, C, 0, 0, 0 };
	return g;
}

/* dw (OC, C) += dout^T . inp.  A = inp, B = dout, C = dw. */
static inline struct gp_gemm gp_gemm_linear_dw(int N, int C, int OC)
{
	struct gp_gemm g = { 0, 1, C, OC, N, C, OC, C, 0, 0, 0 };
	return g;
}

/*
 * Attention per (b, h), q, k, v and y as (B*NH, T, hs), att and its
 * gradient as (B*NH, T, T), all row-major and batched.
 */
/* pre (T, T) = scale q k^T.  A = k, B = q, C = pre. */
static inline struct gp_gemm gp_gemm_att_scores(int T, int hs)
{
	struct gp_gemm g = { 1, 0, T, T, hs, hs, hs, T,
			     (long long)T * hs, (long long)T * hs, (long long)T * T };
	return g;
}

/* y (T, hs) = att v.  A = v, B = att, C = y. */
static inline struct gp_gemm gp_gemm_att_values(int T, int hs)
{
	struct gp_gemm g = { 0, 0, hs, T, T, hs, T, hs,
			     (long long)T * hs, (long long)T * T, (long long)T * hs };
	return g;
}

/* datt (T, T) = dy v^T.  A = v, B = dy, C = datt. */
static inline struct gp_gemm gp_gemm_att_datt(int T, int hs)
{
	return gp_gemm_att_scores(T, hs); /* the same shape as the scores */
}

/* dv (T, hs) = att^T dy.  A = dy, B = att, C = dv. */
static inline struct gp_gemm gp_gemm_att_dv(int T, int hs)
{
	struct gp_gemm g = { 0, 1, hs, T, T, hs, T, hs,
			     (long long)T * hs, (long long)T * T, (long long)T * hs };
	return g;
}

/* dq (T, hs) = dpre k.  A = k, B = dpre, C = dq. */
static inline struct gp_gemm gp_gemm_att_dq(int T, int hs)
{
	return gp_gemm_att_values(T, hs);
}

/* dk (T, hs) = dpre^T q.  A = q, B = dpre, C = dk. */
static inline struct gp_gemm gp_gemm_att_dk(int T, int hs)
{
	return gp_gemm_att_dv(T, hs);
}

/* Element i of a (B, NH, T, hs) tensor: its place in a (B, T, row) tensor
 * whose head h occupies columns h*hs .. h*hs+hs-1 (row = C, or 3C for the
 * q part of qkv). */
static inline GP_HD size_t gp_bnth_to_btc(size_t i, int T, int NH, int hs, size_t row)
{
	int e = (int)(i % (size_t)hs);
	size_t r = i / (size_t)hs;
	int t = (int)(r % (size_t)T);
	r /= (size_t)T;
	int h = (int)(r % (size_t)NH), b = (int)(r / (size_t)NH);
	return ((size_t)b * T + t) * row + (size_t)h * hs + e;
}

#endif
