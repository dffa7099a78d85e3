/*
 * gpt.cu: the model of model.h on an NVIDIA GPU (training and generation),
 * behind gpu.h.
 *
 * The passes follow model_ops.inc operation by operation, in the same
 * tensor layouts, so that every activation and every gradient can be held
 * to the CPU reference (tests/gpu/test_gpu.c). Kernels are templates over
 * the storage type T of weights and activations: float (GP_GPU_FP32) or
 * __nv_bfloat16 (GP_GPU_BF16). Arithmetic inside a kernel is fp32; master
 * weights, gradients and AdamW moments are fp32 in both modes; matmuls are
 * cuBLAS with fp32 accumulation (CUBLAS_COMPUTE_32F: no TF32 in fp32 mode,
 * tensor cores on bf16 inputs in bf16 mode).
 *
 * Attention (gp_gpu_model_set_attention): flash attention in bf16 where the
 * head size is 16, 32 or 64 (kernels.cuh: fused tensor-core kernels, a
 * log-sum-exp per row kept for the backward), else q, k, v permuted to
 * (B, NH, T, hs) and multiplied with strided-batched GEMMs around a causal
 * softmax kernel, the probabilities kept. Each residual add is fused with
 * the LayerNorm after it. The backward pass keeps one residual-gradient
 * buffer that each LayerNorm backward adds into (llm.c's scheme), so no
 * residual gradient is copied.
 *
 * Generation: per-slot KV caches, a step over rows of several slots at once
 * (prefill rows and decode rows alike), captured once per row count as a
 * CUDA graph whose inputs (slot, position, token of each row) are copied in
 * by the graph itself from pinned host memory. The next token is chosen on
 * the device (greedy, or gp_sample's temperature, top-k and top-p with the
 * host's draw), so a step returns n tokens, not n rows of logits.
 *
 * The kernels are in kernels.cuh; this file holds the host side (memory,
 * cuBLAS and cuBLASLt plans, launches, graphs).
 */
#include <cub/cub.cuh>
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "gpu.h"
#include "model.h"
}
#include "gemm_plan.h"
#include "kernels.cuh"

/* ---- errors ---- */

static gp_status cuda_fail(struct gp_err *err, const char *what, cudaError_t e)
{
	return gp_err_set(err, e == cudaErrorMemoryAllocation ? GP_ERR_NOMEM : GP_ERR_INTERNAL,
			  "CUDA %s: %s", what, cudaGetErrorString(e));
}

static gp_status cublas_fail(struct gp_err *err, const char *what, cublasStatus_t s)
{
	return gp_err_set(err, GP_ERR_INTERNAL, "cuBLAS %s: status %d", what, (int)s);
}

#define CK(call)                                                   \
	do {                                                       \
		cudaError_t e_ = (call);                           \
		if (e_ != cudaSuccess)                             \
			return cuda_fail(err, #call, e_);          \
	} while (0)
#define CB(call)                                                   \
	do {                                                       \
		cublasStatus_t s_ = (call);                        \
		if (s_ != CUBLAS_STATUS_SUCCESS)                   \
			return cublas_fail(err, #call, s_);        \
	} while (0)
/* after a kernel launch: a bad configuration shows here */
#define CL(what)                                                   \
	do {                                                       \
		cudaError_t e_ = cudaGetLastError();               \
		if (e_ != cudaSuccess)                             \
			return cuda_fail(err, what, e_);           \
	} while (0)
#define TRY(call)                                                  \
	do {                                                       \
		gp_status st_ = (call);                            \
		if (st_)                                           \
			return st_;                                \
	} while (0)

template <typename T> static cudaDataType_t dtype();
template <> cudaDataType_t dtype<float>()
{
	return CUDA_R_32F;
}
template <> cudaDataType_t dtype<bf16>()
{
	return CUDA_R_16BF;
}

static unsigned blocks(size_t n, unsigned threads)
{
	size_t b = (n + threads - 1) / threads;
	return (unsigned)(b < 1 ? 1 : b > 2147483647u ? 2147483647u : b);
}


/* ---- the model ---- */

struct gp_gpu_model {
	struct gp_model_config cfg;
	enum gp_gpu_precision prec;
	int maxB, maxT;
	size_t esz; /* bytes of T */
	size_t sizes[GP_P_COUNT], offs[GP_P_COUNT], nparams;
	float *master, *grads, *mom, *vel;
	void *wT; /* bf16 copy of master (bf16 mode); master itself in fp32 mode */
	/* activations (type T) and statistics (fp32), laid out per (B, T) */
	void *acts;
	float *stats;
	size_t acts_bytes, stats_bytes;
	size_t asz[GP_A_COUNT], aoff[GP_A_COUNT]; /* elements, in acts or stats */
	/* scratch (type T) */
	void *qkvr, *vacc, *pre, *dres, *dbig, *dqkv, *dx, *dqkvr, *datt, *dvacc;
	size_t scratch_bytes;
	uint16_t *inp, *tgt;
	float *d_loss, *d_norm, *d_scale;
	double *d_sumsq;
	int B, T, have_targets, have_forward;
	int infer_only; /* made with max_B = max_T = 0: weights only */
	/* flash attention (kernels.cuh): 1 when on; fa_lse (L, B, NH, T) the
	 * forward's log-sum-exp, fa_dd (B, NH, T) the backward's D, fa_dq
	 * (B, NH, T, hs) its fp32 dq; allocated where it can run (bf16
	 * training, fa_supported head size) */
	int flash;
	float *fa_lse, *fa_dd, *fa_dq;
	cudaStream_t stream;
	cublasHandle_t blas;
	void *blas_ws;
	size_t blas_ws_bytes;
	cublasLtHandle_t lt;  /* fused-epilogue matmuls; NULL: plain GEMM + kernels */
	struct lt_plan *plans;
	int nplans;
	size_t total_bytes;
};

/* A cuBLASLt matmul shape with its chosen algorithm (the pointers, which
 * change per layer, are set on the descriptor at each call). */
struct lt_plan {
	int M, N, K, epi;
	cudaDataType_t t;
	cublasLtMatmulDesc_t desc;
	cublasLtMatrixLayout_t a, b, d;
	cublasLtMatmulAlgo_t algo;
	int ok; /* 0: no algorithm for this shape, use the plain path */
};
/* training uses a dozen shapes; each decoder row count that is stepped adds
 * four; past this many the plain path (GEMM, then kernels) serves */
#define LT_PLANS 512

static int is_stat(int a)
{
	return a == GP_A_LN1_MEAN || a == GP_A_LN1_RSTD || a == GP_A_LN2_MEAN ||
	       a == GP_A_LN2_RSTD || a == GP_A_LNF_MEAN || a == GP_A_LNF_RSTD || a == GP_A_LOSSES;
}

/* Offsets of each activation for (B, T); PREATT and PROBS are not kept. */
static void layout(struct gp_gpu_model *g, int B, int T, size_t *acts_elems, size_t *stat_elems)
{
	gp_model_act_sizes(&g->cfg, B, T, g->asz);
	g->asz[GP_A_PREATT] = g->asz[GP_A_PROBS] = 0;
	size_t na = 0, ns = 0;
	for (int a = 0; a < GP_A_COUNT; a++) {
		size_t *n = is_stat(a) ? &ns : &na;
		g->aoff[a] = *n;
		*n += (g->asz[a] + 63) & ~(size_t)63;
	}
	*acts_elems = na;
	*stat_elems = ns;
}

#define ACT(g, T, a) ((T *)(g)->acts + (g)->aoff[a])
#define STAT(g, a) ((g)->stats + (g)->aoff[a])
#define PW(g, T, p) ((T *)(g)->wT + (g)->offs[p])
#define PG(g, p) ((g)->grads + (g)->offs[p])

static gp_status dalloc(struct gp_gpu_model *g, void **p, size_t bytes, struct gp_err *err)
{
	CK(cudaMalloc(p, bytes ? bytes : 16));
	g->total_bytes += bytes;
	return GP_OK;
}

extern "C" gp_status gp_gpu_model_create(struct gp_gpu_model **out, const struct gp_model_config *c,
					 enum gp_gpu_precision prec, int max_B, int max_T,
					 struct gp_err *err)
{
	*out = NULL;
	TRY(gp_model_config_check(c, err));
	int infer_only = max_B == 0 && max_T == 0;
	if (!infer_only && (max_B < 1 || max_T < 1 || max_T > c->context))
		return gp_err_set(err, GP_ERR_INVALID,
				  "GPU model: batch %d x %d: need B >= 1 and 1 <= T <= context %d "
				  "(or 0 x 0 for generation only)",
				  max_B, max_T, c->context);
	const char *why = NULL;
	if (gp_gpu_available(&why) <= 0)
		return gp_err_set(err, GP_ERR_UNAVAILABLE, "GPU model: %s", why);
	struct gp_gpu_model *g = (struct gp_gpu_model *)calloc(1, sizeof *g);
	if (!g)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	g->cfg = *c;
	g->prec = prec;
	g->maxB = max_B;
	g->maxT = max_T;
	g->infer_only = infer_only;
	g->esz = prec == GP_GPU_BF16 ? sizeof(bf16) : sizeof(float);
	g->nparams = gp_model_param_sizes(c, g->sizes);
	size_t off = 0;
	for (int p = 0; p < GP_P_COUNT; p++) {
		g->offs[p] = off;
		off += g->sizes[p];
	}
	gp_status st = GP_OK;
#define A_(ptr, bytes)                                                         \
	do {                                                                   \
		if (!st)                                                       \
			st = dalloc(g, (void **)&(ptr), (bytes), err);         \
	} while (0)
	size_t np = g->nparams;
	A_(g->master, np * 4);
	if (prec == GP_GPU_BF16)
		A_(g->wT, np * sizeof(bf16));
	else
		g->wT = g->master;
	if (!infer_only) {
		A_(g->grads, np * 4);
		A_(g->mom, np * 4);
		A_(g->vel, np * 4);
		size_t na = 0, ns = 0;
		layout(g, max_B, max_T, &na, &ns);
		g->acts_bytes = na * g->esz;
		g->stats_bytes = ns * 4;
		A_(g->acts, g->acts_bytes);
		A_(g->stats, g->stats_bytes);
		size_t BTC = (size_t)max_B * max_T * c->width;
		size_t att = (size_t)max_B * c->heads * max_T * max_T;
		size_t e = g->esz;
		A_(g->qkvr, 3 * BTC * e);
		A_(g->vacc, BTC * e);
		A_(g->pre, att * e);
		A_(g->dres, BTC * e);
		A_(g->dbig, 4 * BTC * e);
		A_(g->dqkv, 3 * BTC * e);
		A_(g->dx, BTC * e);
		A_(g->dqkvr, 3 * BTC * e);
		A_(g->datt, att * e);
		A_(g->dvacc, BTC * e);
		A_(g->inp, (size_t)max_B * max_T * 2);
		A_(g->tgt, (size_t)max_B * max_T * 2);
		A_(g->d_loss, 4);
		A_(g->d_norm, 4);
		A_(g->d_scale, 4);
		A_(g->d_sumsq, 8);
		if (prec == GP_GPU_BF16 && fa_supported(c->width / c->heads)) {
			size_t rows = (size_t)max_B * c->heads * max_T;
			A_(g->fa_lse, (size_t)c->layers * rows * 4);
			A_(g->fa_dd, rows * 4);
			A_(g->fa_dq, BTC * 4);
			const char *a = getenv("GENPIPE_GPU_ATTENTION");
			g->flash = !(a && !strcmp(a, "gemm"));
		}
	}
	size_t ws = 32u << 20; /* cuBLAS workspace: set, so that graph capture never allocates */
	A_(g->blas_ws, ws);
#undef A_
	if (!st) {
		cudaError_t ce = cudaStreamCreateWithFlags(&g->stream, cudaStreamNonBlocking);
		if (ce != cudaSuccess)
			st = cuda_fail(err, "stream", ce);
	}
	g->blas_ws_bytes = ws;
	if (!st && !getenv("GENPIPE_GPU_NO_LT")) {
		/* without cuBLASLt the plain GEMM path still works */
		if (cublasLtCreate(&g->lt) != CUBLAS_STATUS_SUCCESS)
			g->lt = NULL;
		g->plans = (struct lt_plan *)calloc(LT_PLANS, sizeof *g->plans);
		if (!g->plans && g->lt) {
			cublasLtDestroy(g->lt);
			g->lt = NULL;
		}
	}
	if (!st) {
		cublasStatus_t bs = cublasCreate(&g->blas);
		if (bs != CUBLAS_STATUS_SUCCESS)
			st = cublas_fail(err, "create", bs);
		else if ((bs = cublasSetStream(g->blas, g->stream)) != CUBLAS_STATUS_SUCCESS ||
			 (bs = cublasSetWorkspace(g->blas, g->blas_ws, ws)) != CUBLAS_STATUS_SUCCESS ||
			 (bs = cublasSetMathMode(g->blas, CUBLAS_DEFAULT_MATH)) !=
				 CUBLAS_STATUS_SUCCESS)
			st = cublas_fail(err, "setup", bs);
	}
	if (!st) {
		cudaMemsetAsync(g->master, 0, np * 4, g->stream);
		if (prec == GP_GPU_BF16)
			cudaMemsetAsync(g->wT, 0, np * sizeof(bf16), g->stream);
		if (!infer_only) {
			cudaMemsetAsync(g->grads, 0, np * 4, g->stream);
			cudaMemsetAsync(g->mom, 0, np * 4, g->stream);
			cudaMemsetAsync(g->vel, 0, np * 4, g->stream);
			k_set<<<1, 1, 0, g->stream>>>(g->d_scale, 1.0f);
		}
		cudaError_t ce = cudaStreamSynchronize(g->stream);
		if (ce != cudaSuccess)
			st = cuda_fail(err, "initialize", ce);
	}
	if (st) {
		gp_gpu_model_destroy(g);
		return st;
	}
	*out = g;
	return GP_OK;
}

extern "C" void gp_gpu_model_destroy(struct gp_gpu_model *g)
{
	if (!g)
		return;
	if (g->stream)
		cudaStreamSynchronize(g->stream);
	if (g->blas)
		cublasDestroy(g->blas);
	for (int i = 0; i < g->nplans; i++) {
		cublasLtMatmulDescDestroy(g->plans[i].desc);
		cublasLtMatrixLayoutDestroy(g->plans[i].a);
		cublasLtMatrixLayoutDestroy(g->plans[i].b);
		cublasLtMatrixLayoutDestroy(g->plans[i].d);
	}
	free(g->plans);
	if (g->lt)
		cublasLtDestroy(g->lt);
	void *ptrs[] = { g->master, g->grads, g->mom,  g->vel,	 g->acts,  g->stats, g->qkvr,
			 g->vacc,   g->pre,   g->dres, g->dbig,	 g->dqkv,  g->dx,    g->dqkvr,
			 g->datt,   g->dvacc, g->inp,  g->tgt,	 g->d_loss, g->d_norm, g->d_scale,
			 g->d_sumsq, g->blas_ws, g->fa_lse, g->fa_dd, g->fa_dq };
	for (size_t i = 0; i < sizeof ptrs / sizeof *ptrs; i++)
		if (ptrs[i])
			cudaFree(ptrs[i]);
	if (g->prec == GP_GPU_BF16 && g->wT)
		cudaFree(g->wT);
	if (g->stream)
		cudaStreamDestroy(g->stream);
	free(g);
}

extern "C" size_t gp_gpu_model_bytes(const struct gp_gpu_model *g)
{
	return g ? g->total_bytes : 0;
}

extern "C" gp_status gp_gpu_model_set_attention(struct gp_gpu_model *g, enum gp_gpu_attention a,
						struct gp_err *err)
{
	if (a == GP_GPU_ATTN_FLASH && !g->fa_lse)
		return gp_err_set(err, GP_ERR_INVALID,
				  "flash attention needs a bf16 training model with head size 16, "
				  "32 or 64 (this one: %s, head size %d%s)",
				  gp_gpu_precision_str(g->prec), g->cfg.width / g->cfg.heads,
				  g->infer_only ? ", generation only" : "");
	int flash = a == GP_GPU_ATTN_FLASH;
	if (flash != g->flash)
		g->have_forward = 0; /* its backward would read what the other kept */
	g->flash = flash;
	return GP_OK;
}

extern "C" enum gp_gpu_attention gp_gpu_model_attention(const struct gp_gpu_model *g)
{
	return g->flash ? GP_GPU_ATTN_FLASH : GP_GPU_ATTN_GEMM;
}

static gp_status sync_weights(struct gp_gpu_model *g, struct gp_err *err)
{
	if (g->prec == GP_GPU_BF16) {
		k_to_T<bf16><<<blocks(g->nparams, 256), 256, 0, g->stream>>>((bf16 *)g->wT, g->master,
									   g->nparams);
		CL("convert weights");
	}
	return GP_OK;
}

extern "C" gp_status gp_gpu_model_upload(struct gp_gpu_model *g, const float *params,
					 const float *mom, const float *vel, struct gp_err *err)
{
	size_t b = g->nparams * 4;
	CK(cudaMemcpyAsync(g->master, params, b, cudaMemcpyHostToDevice, g->stream));
	if (g->infer_only)
		; /* no optimizer state */
	else if (mom)
		CK(cudaMemcpyAsync(g->mom, mom, b, cudaMemcpyHostToDevice, g->stream));
	else
		CK(cudaMemsetAsync(g->mom, 0, b, g->stream));
	if (vel)
		CK(cudaMemcpyAsync(g->vel, vel, b, cudaMemcpyHostToDevice, g->stream));
	else
		CK(cudaMemsetAsync(g->vel, 0, b, g->stream));
	TRY(sync_weights(g, err));
	CK(cudaStreamSynchronize(g->stream));
	return GP_OK;
}

extern "C" gp_status gp_gpu_model_download(struct gp_gpu_model *g, float *params, float *mom,
					   float *vel, struct gp_err *err)
{
	size_t b = g->nparams * 4;
	if (params)
		CK(cudaMemcpyAsync(params, g->master, b, cudaMemcpyDeviceToHost, g->stream));
	if (mom)
		CK(cudaMemcpyAsync(mom, g->mom, b, cudaMemcpyDeviceToHost, g->stream));
	if ((mom || vel) && g->infer_only)
		return gp_err_set(err, GP_ERR_INVALID, "GPU model made for generation only");
	if (vel)
		CK(cudaMemcpyAsync(vel, g->vel, b, cudaMemcpyDeviceToHost, g->stream));
	CK(cudaStreamSynchronize(g->stream));
	return GP_OK;
}

/* ---- GEMMs (column-major cuBLAS over our row-major tensors) ---- */

static cublasOperation_t op(int t)
{
	return t ? CUBLAS_OP_T : CUBLAS_OP_N;
}

/* C = alpha op(A) op(B) + beta C with the plan's shape (gemm_plan.h). */
template <typename T>
static gp_status gemm(cublasHandle_t h, const struct gp_gemm &p, float alpha, const T *A,
		      const T *B, float beta, void *C, cudaDataType_t ctype, struct gp_err *err)
{
	CB(cublasGemmEx(h, op(p.ta), op(p.tb), p.m, p.n, p.k, &alpha, A, dtype<T>(), p.lda, B,
			dtype<T>(), p.ldb, &beta, C, ctype, p.ldc, CUBLAS_COMPUTE_32F,
			CUBLAS_GEMM_DEFAULT));
	return GP_OK;
}

/* The same over `batch` products at the plan's strides (beta 0). */
template <typename T>
static gp_status gemm_batched(struct gp_gpu_model *g, const struct gp_gemm &p, float alpha,
			      const T *A, const T *B, T *C, int batch, struct gp_err *err)
{
	float beta = 0.0f;
	CB(cublasGemmStridedBatchedEx(g->blas, op(p.ta), op(p.tb), p.m, p.n, p.k, &alpha, A,
				      dtype<T>(), p.lda, p.sa, B, dtype<T>(), p.ldb, p.sb, &beta, C,
				      dtype<T>(), p.ldc, p.sc, batch, CUBLAS_COMPUTE_32F,
				      CUBLAS_GEMM_DEFAULT));
	return GP_OK;
}

static int aligned16(const void *p)
{
	return ((uintptr_t)p & 15) == 0;
}

/* The plan for (M, N, K, epilogue, type), made on first use; NULL when
 * cuBLASLt is off or has no algorithm for it. */
static struct lt_plan *lt_plan_for(struct gp_gpu_model *g, int M, int N, int K, int epi,
				   cudaDataType_t t)
{
	if (!g->lt)
		return NULL;
	for (int i = 0; i < g->nplans; i++) {
		struct lt_plan *p = &g->plans[i];
		if (p->M == M && p->N == N && p->K == K && p->epi == epi && p->t == t)
			return p->ok ? p : NULL;
	}
	if (g->nplans == LT_PLANS)
		return NULL;
	struct lt_plan *p = &g->plans[g->nplans++];
	*p = lt_plan{};
	p->M = M, p->N = N, p->K = K, p->epi = epi, p->t = t;
	cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
	cublasLtEpilogue_t e = (cublasLtEpilogue_t)epi;
	cublasLtMatmulPreference_t pref = NULL;
	cublasLtMatmulHeuristicResult_t h;
	int found = 0;
	if (cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) ||
	    cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta) ||
	    cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb) ||
	    cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &e, sizeof e) ||
	    cublasLtMatrixLayoutCreate(&p->a, t, K, M, K) ||
	    cublasLtMatrixLayoutCreate(&p->b, t, K, N, K) ||
	    cublasLtMatrixLayoutCreate(&p->d, t, M, N, M) || cublasLtMatmulPreferenceCreate(&pref) ||
	    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
						 &g->blas_ws_bytes, sizeof g->blas_ws_bytes) ||
	    cublasLtMatmulAlgoGetHeuristic(g->lt, p->desc, p->a, p->b, p->d, p->d, pref, 1, &h,
					   &found) ||
	    found < 1)
		p->ok = 0;
	else {
		p->algo = h.algo;
		p->ok = 1;
	}
	if (pref)
		cublasLtMatmulPreferenceDestroy(pref);
	return p->ok ? p : NULL;
}

/* Where a product runs: the model's stream and handles, or a decoder's. */
struct run_on {
	cublasHandle_t blas;
	cudaStream_t stream;
	void *ws; /* the cuBLASLt workspace, g->blas_ws_bytes */
};

/* out (N, OC) = inp (N, C) . w (OC, C)^T + bias; with pre (may be NULL)
 * out = gelu(that) and pre = that. One cuBLASLt call with the bias (and
 * GELU) epilogue where it can, else a GEMM and the kernels. The plans are
 * the model's; r says which stream (and workspace) the call goes to. */
template <typename T>
static gp_status matmul_fwd_on(struct gp_gpu_model *g, const struct run_on &r, T *out,
			       const T *inp, const T *w, const T *bias, int N, int C, int OC,
			       struct gp_err *err, T *pre = NULL)
{
	int epi = !bias ? CUBLASLT_EPILOGUE_DEFAULT
		  : pre ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS
			: CUBLASLT_EPILOGUE_BIAS;
	struct lt_plan *p = NULL;
	/* the plan's shape: M = OC, N, K = C, A = w transposed (gp_gemm_linear_fwd) */
	if (aligned16(out) && aligned16(inp) && aligned16(w) && (!bias || aligned16(bias)) &&
	    (!pre || (aligned16(pre) && OC % 8 == 0)))
		p = lt_plan_for(g, OC, N, C, epi, dtype<T>());
	if (p) {
		int64_t ld = OC;
		float one = 1.0f, zero = 0.0f;
		if ((!bias || !cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER,
							       &bias, sizeof bias)) &&
		    (!pre ||
		     (!cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER,
						      &pre, sizeof pre) &&
		      !cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &ld,
						      sizeof ld))) &&
		    !cublasLtMatmul(g->lt, p->desc, &one, w, p->a, inp, p->b, &zero, out, p->d, out,
				    p->d, &p->algo, r.ws, g->blas_ws_bytes, r.stream))
			return GP_OK;
		p->ok = 0; /* refused at run time: the plain path from now on */
	}
	T *o = pre ? pre : out;
	TRY(gemm<T>(r.blas, gp_gemm_linear_fwd(N, C, OC), 1.0f, w, inp, 0.0f, o, dtype<T>(), err));
	if (bias) {
		k_add_bias<T><<<blocks((size_t)N * OC, 256), 256, 0, r.stream>>>(o, bias, (size_t)N,
										  OC);
		CL("bias");
	}
	if (pre) {
		k_gelu_fwd<T><<<blocks((size_t)N * OC, 256), 256, 0, r.stream>>>(out, pre,
										  (size_t)N * OC);
		CL("gelu");
	}
	return GP_OK;
}

template <typename T>
static gp_status matmul_fwd(struct gp_gpu_model *g, T *out, const T *inp, const T *w,
			    const T *bias, int N, int C, int OC, struct gp_err *err, T *pre = NULL)
{
	return matmul_fwd_on<T>(g, run_on{ g->blas, g->stream, g->blas_ws }, out, inp, w, bias, N,
				C, OC, err, pre);
}

static void reduce_grid(int cols, int N, dim3 *grid, int *chunk)
{
	int cb = (cols + 255) / 256;
	int chunks = N < 256 ? N : 256;
	/* enough blocks to fill the device, few enough atomics */
	if (cb >= 128)
		chunks = chunks < 8 ? chunks : 8;
	*chunk = (N + chunks - 1) / chunks;
	*grid = dim3((unsigned)cb, (unsigned)((N + *chunk - 1) / *chunk));
}

/* dinp (N, C) = dout . w (overwrites); dw (OC, C) += dout^T . inp; dbias += colsum(dout) */
template <typename T>
static gp_status matmul_bwd(struct gp_gpu_model *g, T *dinp, float *dw, float *dbias,
			    const T *dout, const T *inp, const T *w, int N, int C, int OC,
			    struct gp_err *err)
{
	TRY(gemm<T>(g->blas, gp_gemm_linear_dinp(N, C, OC), 1.0f, w, dout, 0.0f, dinp, dtype<T>(),
		    err));
	TRY(gemm<T>(g->blas, gp_gemm_linear_dw(N, C, OC), 1.0f, inp, dout, 1.0f, dw, CUDA_R_32F,
		    err));
	if (dbias) {
		dim3 grid;
		int chunk;
		reduce_grid(OC, N, &grid, &chunk);
		k_colsum<T><<<grid, 256, 0, g->stream>>>(dbias, dout, N, OC, chunk);
		CL("bias gradient");
	}
	return GP_OK;
}

template <typename T>
static gp_status layernorm_fwd(struct gp_gpu_model *g, T *out, float *mean, float *rstd,
			       const T *inp, const T *w, const T *b, int N, int C,
			       struct gp_err *err)
{
	k_layernorm_fwd<T><<<blocks((size_t)N * 32, 256), 256, 0, g->stream>>>(out, mean, rstd, inp,
									       w, b, N, C);
	CL("layernorm");
	return GP_OK;
}

/* res = a + b, then out = LayerNorm(res): one kernel (kernels.cuh). */
template <typename T>
static gp_status residual_layernorm_fwd(cudaStream_t s, T *res, T *out, float *mean, float *rstd,
					const T *a, const T *b, const T *w, const T *bias, int N,
					int C, struct gp_err *err)
{
	k_residual_layernorm_fwd<T><<<blocks((size_t)N * 32, 256), 256, 0, s>>>(
		res, out, mean, rstd, a, b, w, bias, N, C);
	CL("residual + layernorm");
	return GP_OK;
}

template <typename T>
static gp_status layernorm_bwd(struct gp_gpu_model *g, T *dinp, float *dw, float *db,
			       const T *dout, const T *inp, const T *w, const float *mean,
			       const float *rstd, int N, int C, struct gp_err *err)
{
	k_layernorm_bwd_x<T><<<blocks((size_t)N * 32, 256), 256, 0, g->stream>>>(
		dinp, dout, inp, w, mean, rstd, N, C);
	CL("layernorm backward");
	dim3 grid;
	int chunk;
	reduce_grid(C, N, &grid, &chunk);
	k_layernorm_bwd_wb<T><<<grid, 256, 0, g->stream>>>(dw, db, dout, inp, mean, rstd, N, C,
							   chunk);
	CL("layernorm parameter gradient");
	return GP_OK;
}

/* Flash attention's launches for a head size (kernels.cuh; bf16 only). */
template <int HS>
static gp_status flash_fwd_hs(struct gp_gpu_model *g, bf16 *y, float *lse, const bf16 *qkv,
			      int B, int Tl, struct gp_err *err)
{
	int NH = g->cfg.heads;
	dim3 grid((unsigned)((Tl + FA_ROWS - 1) / FA_ROWS), (unsigned)(B * NH));
	k_flash_fwd<HS><<<grid, FA_THREADS, 0, g->stream>>>(y, lse, qkv, Tl, NH,
							     1.0f / sqrtf((float)HS));
	CL("flash attention");
	return GP_OK;
}

template <int HS>
static gp_status flash_bwd_hs(struct gp_gpu_model *g, bf16 *dqkv, const bf16 *dy, const bf16 *y,
			      const bf16 *qkv, const float *lse, int B, int Tl, struct gp_err *err)
{
	int NH = g->cfg.heads;
	size_t rows = (size_t)B * NH * Tl;
	k_flash_bwd_dot<HS><<<blocks(rows * 32, 256), 256, 0, g->stream>>>(g->fa_dd, dy, y, B, Tl,
									  NH);
	CL("flash attention backward (D)");
	CK(cudaMemsetAsync(g->fa_dq, 0, rows * HS * 4, g->stream));
	dim3 grid((unsigned)((Tl + FA_ROWS - 1) / FA_ROWS), (unsigned)(B * NH));
	k_flash_bwd<HS><<<grid, FA_THREADS, 0, g->stream>>>(dqkv, g->fa_dq, qkv, dy, lse, g->fa_dd,
							     Tl, NH, 1.0f / sqrtf((float)HS));
	CL("flash attention backward");
	k_flash_dq<HS><<<blocks(rows * HS, 256), 256, 0, g->stream>>>(dqkv, g->fa_dq, B, Tl, NH);
	CL("flash attention backward (dq)");
	return GP_OK;
}

/* Attention forward for one layer l: atty (B,T,C) from qkv, with att
 * (B,NH,T,T) (the GEMM path) or the log-sum-exp (flash). */
template <typename T>
static gp_status attention_fwd(struct gp_gpu_model *g, T *atty, T *att, const T *qkv, int B,
			       int Tl, int l, struct gp_err *err)
{
	int C = g->cfg.width, NH = g->cfg.heads, hs = C / NH;
	if (g->flash) { /* set only in bf16 */
		float *lse = g->fa_lse + (size_t)l * B * NH * Tl;
		bf16 *y = (bf16 *)atty;
		const bf16 *x = (const bf16 *)qkv;
		return hs == 16 ? flash_fwd_hs<16>(g, y, lse, x, B, Tl, err)
		       : hs == 32 ? flash_fwd_hs<32>(g, y, lse, x, B, Tl, err)
				  : flash_fwd_hs<64>(g, y, lse, x, B, Tl, err);
	}
	size_t n = (size_t)B * Tl * C;
	T *q = (T *)g->qkvr, *k = q + n, *v = k + n, *pre = (T *)g->pre, *y = (T *)g->vacc;
	k_permute<T><<<blocks(n, 256), 256, 0, g->stream>>>(q, k, v, qkv, B, Tl, NH, hs);
	CL("permute");
	float scale = 1.0f / sqrtf((float)hs);
	/* pre (T,T) = scale q k^T, per (b, h) */
	TRY(gemm_batched<T>(g, gp_gemm_att_scores(Tl, hs), scale, k, q, pre, B * NH, err));
	size_t rows = (size_t)B * NH * Tl;
	k_softmax_causal<T><<<blocks(rows * 32, 256), 256, 0, g->stream>>>(att, pre, rows, Tl);
	CL("softmax");
	/* y (T,hs) = att v */
	TRY(gemm_batched<T>(g, gp_gemm_att_values(Tl, hs), 1.0f, v, att, y, B * NH, err));
	k_unpermute<T><<<blocks(n, 256), 256, 0, g->stream>>>(atty, y, B, Tl, NH, hs, 0);
	CL("unpermute");
	return GP_OK;
}

/* dqkv (overwritten) from datty, given the layer's qkv and att (or, with
 * flash attention, its output atty and log-sum-exp). */
template <typename T>
static gp_status attention_bwd(struct gp_gpu_model *g, T *dqkv, const T *datty, const T *qkv,
			       const T *att, const T *atty, int B, int Tl, int l,
			       struct gp_err *err)
{
	int C = g->cfg.width, NH = g->cfg.heads, hs = C / NH;
	if (g->flash) {
		const float *lse = g->fa_lse + (size_t)l * B * NH * Tl;
		bf16 *d = (bf16 *)dqkv;
		const bf16 *dy = (const bf16 *)datty, *y = (const bf16 *)atty,
			   *x = (const bf16 *)qkv;
		return hs == 16 ? flash_bwd_hs<16>(g, d, dy, y, x, lse, B, Tl, err)
		       : hs == 32 ? flash_bwd_hs<32>(g, d, dy, y, x, lse, B, Tl, err)
				  : flash_bwd_hs<64>(g, d, dy, y, x, lse, B, Tl, err);
	}
	size_t n = (size_t)B * Tl * C;
	T *q = (T *)g->qkvr, *k = q + n, *v = k + n;
	T *dq = (T *)g->dqkvr, *dk = dq + n, *dv = dk + n;
	T *dy = (T *)g->dvacc, *da = (T *)g->datt;
	k_permute<T><<<blocks(n, 256), 256, 0, g->stream>>>(q, k, v, qkv, B, Tl, NH, hs);
	CL("permute");
	k_unpermute<T><<<blocks(n, 256), 256, 0, g->stream>>>(dy, datty, B, Tl, NH, hs, 1);
	CL("unpermute backward");
	int nb = B * NH;
	/* datt (T,T) = dy v^T ; dv (T,hs) = att^T dy */
	TRY(gemm_batched<T>(g, gp_gemm_att_datt(Tl, hs), 1.0f, v, dy, da, nb, err));
	TRY(gemm_batched<T>(g, gp_gemm_att_dv(Tl, hs), 1.0f, dy, att, dv, nb, err));
	size_t rows = (size_t)nb * Tl;
	k_softmax_causal_bwd<T><<<blocks(rows * 32, 256), 256, 0, g->stream>>>(
		da, att, rows, Tl, 1.0f / sqrtf((float)hs));
	CL("softmax backward");
	/* dq = dpre k ; dk = dpre^T q */
	TRY(gemm_batched<T>(g, gp_gemm_att_dq(Tl, hs), 1.0f, k, da, dq, nb, err));
	TRY(gemm_batched<T>(g, gp_gemm_att_dk(Tl, hs), 1.0f, q, da, dk, nb, err));
	k_permute_bwd<T><<<blocks(n, 256), 256, 0, g->stream>>>(dqkv, dq, dk, dv, B, Tl, NH, hs);
	CL("permute backward");
	return GP_OK;
}

template <typename T>
static gp_status forward_impl(struct gp_gpu_model *g, int B, int Tl, int targets,
			      struct gp_err *err)
{
	const struct gp_model_config *c = &g->cfg;
	int C = c->width, L = c->layers, V = c->vocab, Vp = c->padded_vocab;
	int BT = B * Tl;
	size_t BTC = (size_t)BT * C, attn = (size_t)B * c->heads * Tl * Tl;
	size_t na, ns;
	layout(g, B, Tl, &na, &ns);
	cudaStream_t s = g->stream;
	k_encoder_fwd<T><<<blocks(BTC, 256), 256, 0, s>>>(ACT(g, T, GP_A_ENCODED), g->inp,
							   PW(g, T, GP_P_WTE), PW(g, T, GP_P_WPE),
							   BT, Tl, C);
	CL("encoder");
	/* the first LayerNorm here; each later one, and the final one, comes
	 * fused with the residual add before it */
	TRY(layernorm_fwd<T>(g, ACT(g, T, GP_A_LN1), STAT(g, GP_A_LN1_MEAN), STAT(g, GP_A_LN1_RSTD),
			     ACT(g, T, GP_A_ENCODED), PW(g, T, GP_P_LN1W), PW(g, T, GP_P_LN1B), BT,
			     C, err));
	for (int l = 0; l < L; l++) {
		T *res = l == 0 ? ACT(g, T, GP_A_ENCODED) : ACT(g, T, GP_A_RESIDUAL3) + (l - 1) * BTC;
		T *ln1 = ACT(g, T, GP_A_LN1) + l * BTC, *qkv = ACT(g, T, GP_A_QKV) + l * 3 * BTC,
		  *atty = ACT(g, T, GP_A_ATTY) + l * BTC, *att = ACT(g, T, GP_A_ATT) + l * attn,
		  *proj = ACT(g, T, GP_A_ATTPROJ) + l * BTC,
		  *res2 = ACT(g, T, GP_A_RESIDUAL2) + l * BTC, *ln2 = ACT(g, T, GP_A_LN2) + l * BTC,
		  *fch = ACT(g, T, GP_A_FCH) + l * 4 * BTC,
		  *fchg = ACT(g, T, GP_A_FCH_GELU) + l * 4 * BTC,
		  *fcp = ACT(g, T, GP_A_FCPROJ) + l * BTC,
		  *res3 = ACT(g, T, GP_A_RESIDUAL3) + l * BTC;
		TRY(matmul_fwd<T>(g, qkv, ln1, PW(g, T, GP_P_QKVW) + (size_t)l * 3 * C * C,
				  PW(g, T, GP_P_QKVB) + l * 3 * C, BT, C, 3 * C, err));
		TRY(attention_fwd<T>(g, atty, att, qkv, B, Tl, l, err));
		TRY(matmul_fwd<T>(g, proj, atty, PW(g, T, GP_P_ATTPROJW) + (size_t)l * C * C,
				  PW(g, T, GP_P_ATTPROJB) + l * C, BT, C, C, err));
		TRY(residual_layernorm_fwd<T>(s, res2, ln2, STAT(g, GP_A_LN2_MEAN) + l * BT,
					      STAT(g, GP_A_LN2_RSTD) + l * BT, res, proj,
					      PW(g, T, GP_P_LN2W) + l * C, PW(g, T, GP_P_LN2B) + l * C,
					      BT, C, err));
		/* fch = ln2 . fcw + fcb and fchg = gelu(fch), one call */
		TRY(matmul_fwd<T>(g, fchg, ln2, PW(g, T, GP_P_FCW) + (size_t)l * 4 * C * C,
				  PW(g, T, GP_P_FCB) + l * 4 * C, BT, C, 4 * C, err, fch));
		TRY(matmul_fwd<T>(g, fcp, fchg, PW(g, T, GP_P_FCPROJW) + (size_t)l * 4 * C * C,
				  PW(g, T, GP_P_FCPROJB) + l * C, BT, 4 * C, C, err));
		/* res3 = res2 + fcp and the next layer's ln1 (after the last
		 * layer, lnf) */
		int last = l == L - 1;
		TRY(residual_layernorm_fwd<T>(
			s, res3, last ? ACT(g, T, GP_A_LNF) : ln1 + BTC,
			last ? STAT(g, GP_A_LNF_MEAN) : STAT(g, GP_A_LN1_MEAN) + (l + 1) * BT,
			last ? STAT(g, GP_A_LNF_RSTD) : STAT(g, GP_A_LN1_RSTD) + (l + 1) * BT, res2,
			fcp, last ? PW(g, T, GP_P_LNFW) : PW(g, T, GP_P_LN1W) + (l + 1) * C,
			last ? PW(g, T, GP_P_LNFB) : PW(g, T, GP_P_LN1B) + (l + 1) * C, BT, C, err));
	}
	TRY(matmul_fwd<T>(g, ACT(g, T, GP_A_LOGITS), ACT(g, T, GP_A_LNF), PW(g, T, GP_P_WTE),
			  (const T *)NULL, BT, C, Vp, err));
	if (targets) {
		k_crossentropy_fwd<T><<<BT, 512, 0, s>>>(STAT(g, GP_A_LOSSES),
							 ACT(g, T, GP_A_LOGITS), g->tgt, V, Vp);
		CL("cross-entropy");
		k_mean<<<1, 1024, 0, s>>>(g->d_loss, STAT(g, GP_A_LOSSES), BT);
		CL("mean loss");
	}
	return GP_OK;
}

template <typename T> static gp_status backward_impl(struct gp_gpu_model *g, struct gp_err *err)
{
	const struct gp_model_config *c = &g->cfg;
	int C = c->width, L = c->layers, V = c->vocab, Vp = c->padded_vocab;
	int B = g->B, Tl = g->T, BT = B * Tl;
	size_t BTC = (size_t)BT * C, attn = (size_t)B * c->heads * Tl * Tl;
	cudaStream_t s = g->stream;
	T *dres = (T *)g->dres, *dbig = (T *)g->dbig, *dx = (T *)g->dx, *dqkv = (T *)g->dqkv;
	T *logits = ACT(g, T, GP_A_LOGITS);
	k_crossentropy_bwd<T><<<BT, 512, 0, s>>>(logits, g->tgt, 1.0f / BT, V, Vp);
	CL("cross-entropy backward");
	/* dlnf = dlogits . wte ; dwte += dlogits^T . lnf */
	TRY(matmul_bwd<T>(g, dx, PG(g, GP_P_WTE), NULL, logits, ACT(g, T, GP_A_LNF),
			  PW(g, T, GP_P_WTE), BT, C, Vp, err));
	CK(cudaMemsetAsync(dres, 0, BTC * g->esz, s));
	TRY(layernorm_bwd<T>(g, dres, PG(g, GP_P_LNFW), PG(g, GP_P_LNFB), dx,
			     ACT(g, T, GP_A_RESIDUAL3) + (L - 1) * BTC, PW(g, T, GP_P_LNFW),
			     STAT(g, GP_A_LNF_MEAN), STAT(g, GP_A_LNF_RSTD), BT, C, err));
	for (int l = L - 1; l >= 0; l--) {
		T *res = l == 0 ? ACT(g, T, GP_A_ENCODED) : ACT(g, T, GP_A_RESIDUAL3) + (l - 1) * BTC;
		/* dres holds d residual3[l] */
		TRY(matmul_bwd<T>(g, dbig, PG(g, GP_P_FCPROJW) + (size_t)l * 4 * C * C,
				  PG(g, GP_P_FCPROJB) + l * C, dres,
				  ACT(g, T, GP_A_FCH_GELU) + l * 4 * BTC,
				  PW(g, T, GP_P_FCPROJW) + (size_t)l * 4 * C * C, BT, 4 * C, C, err));
		k_gelu_bwd<T><<<blocks(4 * BTC, 256), 256, 0, s>>>(
			dbig, ACT(g, T, GP_A_FCH) + l * 4 * BTC, 4 * BTC);
		CL("gelu backward");
		TRY(matmul_bwd<T>(g, dx, PG(g, GP_P_FCW) + (size_t)l * 4 * C * C,
				  PG(g, GP_P_FCB) + l * 4 * C, dbig, ACT(g, T, GP_A_LN2) + l * BTC,
				  PW(g, T, GP_P_FCW) + (size_t)l * 4 * C * C, BT, C, 4 * C, err));
		TRY(layernorm_bwd<T>(g, dres, PG(g, GP_P_LN2W) + l * C, PG(g, GP_P_LN2B) + l * C, dx,
				     ACT(g, T, GP_A_RESIDUAL2) + l * BTC, PW(g, T, GP_P_LN2W) + l * C,
				     STAT(g, GP_A_LN2_MEAN) + l * BT, STAT(g, GP_A_LN2_RSTD) + l * BT,
				     BT, C, err));
		/* dres holds d residual2[l] */
		TRY(matmul_bwd<T>(g, dx, PG(g, GP_P_ATTPROJW) + (size_t)l * C * C,
				  PG(g, GP_P_ATTPROJB) + l * C, dres, ACT(g, T, GP_A_ATTY) + l * BTC,
				  PW(g, T, GP_P_ATTPROJW) + (size_t)l * C * C, BT, C, C, err));
		TRY(attention_bwd<T>(g, dqkv, dx, ACT(g, T, GP_A_QKV) + l * 3 * BTC,
				     ACT(g, T, GP_A_ATT) + l * attn, ACT(g, T, GP_A_ATTY) + l * BTC,
				     B, Tl, l, err));
		TRY(matmul_bwd<T>(g, dx, PG(g, GP_P_QKVW) + (size_t)l * 3 * C * C,
				  PG(g, GP_P_QKVB) + l * 3 * C, dqkv, ACT(g, T, GP_A_LN1) + l * BTC,
				  PW(g, T, GP_P_QKVW) + (size_t)l * 3 * C * C, BT, C, 3 * C, err));
		TRY(layernorm_bwd<T>(g, dres, PG(g, GP_P_LN1W) + l * C, PG(g, GP_P_LN1B) + l * C, dx,
				     res, PW(g, T, GP_P_LN1W) + l * C, STAT(g, GP_A_LN1_MEAN) + l * BT,
				     STAT(g, GP_A_LN1_RSTD) + l * BT, BT, C, err));
	}
	k_encoder_bwd<T><<<blocks(BTC, 256), 256, 0, s>>>(PG(g, GP_P_WTE), PG(g, GP_P_WPE), dres,
							   g->inp, BT, Tl, C);
	CL("encoder backward");
	return GP_OK;
}

static gp_status check_batch(struct gp_gpu_model *g, const uint16_t *inputs,
			     const uint16_t *targets, int B, int T, struct gp_err *err)
{
	if (g->infer_only)
		return gp_err_set(err, GP_ERR_INVALID, "GPU model made for generation only");
	if (B < 1 || T < 1 || B > g->maxB || T > g->maxT)
		return gp_err_set(err, GP_ERR_INVALID,
				  "GPU batch %d x %d tokens: the model was made for at most %d x %d",
				  B, T, g->maxB, g->maxT);
	size_t BT = (size_t)B * T;
	for (size_t i = 0; i < BT; i++)
		if (inputs[i] >= g->cfg.vocab || (targets && targets[i] >= g->cfg.vocab))
			return gp_err_set(err, GP_ERR_INVALID,
					  "token %u at position %zu is outside the vocabulary (%d)",
					  inputs[i] >= g->cfg.vocab ? inputs[i] : targets[i], i,
					  g->cfg.vocab);
	return GP_OK;
}

extern "C" gp_status gp_gpu_forward(struct gp_gpu_model *g, const uint16_t *inputs,
				    const uint16_t *targets, int B, int T, float *loss,
				    struct gp_err *err)
{
	TRY(check_batch(g, inputs, targets, B, T, err));
	size_t BT = (size_t)B * T;
	CK(cudaMemcpyAsync(g->inp, inputs, BT * 2, cudaMemcpyHostToDevice, g->stream));
	if (targets)
		CK(cudaMemcpyAsync(g->tgt, targets, BT * 2, cudaMemcpyHostToDevice, g->stream));
	g->B = B;
	g->T = T;
	g->have_targets = targets != NULL;
	g->have_forward = 1;
	if (g->prec == GP_GPU_BF16)
		TRY(forward_impl<bf16>(g, B, T, targets != NULL, err));
	else
		TRY(forward_impl<float>(g, B, T, targets != NULL, err));
	if (targets && loss) {
		CK(cudaMemcpyAsync(loss, g->d_loss, 4, cudaMemcpyDeviceToHost, g->stream));
		CK(cudaStreamSynchronize(g->stream));
	}
	return GP_OK;
}

extern "C" gp_status gp_gpu_zero_grad(struct gp_gpu_model *g, struct gp_err *err)
{
	if (g->infer_only)
		return gp_err_set(err, GP_ERR_INVALID, "GPU model made for generation only");
	CK(cudaMemsetAsync(g->grads, 0, g->nparams * 4, g->stream));
	return GP_OK;
}

extern "C" gp_status gp_gpu_backward(struct gp_gpu_model *g, struct gp_err *err)
{
	if (!g->have_forward || !g->have_targets)
		return gp_err_set(err, GP_ERR_INVALID,
				  "GPU backward needs a forward pass with targets before it");
	g->have_forward = 0; /* the logits are now their gradient */
	if (g->prec == GP_GPU_BF16)
		return backward_impl<bf16>(g, err);
	return backward_impl<float>(g, err);
}

extern "C" gp_status gp_gpu_clip_grad(struct gp_gpu_model *g, float max_norm, float *norm,
				      struct gp_err *err)
{
	if (g->infer_only)
		return gp_err_set(err, GP_ERR_INVALID, "GPU model made for generation only");
	CK(cudaMemsetAsync(g->d_sumsq, 0, 8, g->stream));
	k_sumsq<<<1024, 256, 0, g->stream>>>(g->d_sumsq, g->grads, g->nparams);
	CL("gradient norm");
	k_clip_scale<<<1, 1, 0, g->stream>>>(g->d_norm, g->d_scale, g->d_sumsq, max_norm);
	CL("clip");
	if (norm) {
		CK(cudaMemcpyAsync(norm, g->d_norm, 4, cudaMemcpyDeviceToHost, g->stream));
		CK(cudaStreamSynchronize(g->stream));
	}
	return GP_OK;
}

extern "C" gp_status gp_gpu_adamw(struct gp_gpu_model *g, const struct gp_adamw *o, long step,
				  struct gp_err *err)
{
	if (g->infer_only)
		return gp_err_set(err, GP_ERR_INVALID, "GPU model made for generation only");
	float b1c = 1.0f - powf(o->beta1, (float)step), b2c = 1.0f - powf(o->beta2, (float)step);
	for (int t = 0; t < GP_P_COUNT; t++) {
		size_t off = g->offs[t], n = g->sizes[t];
		float wd = gp_model_param_decays(t) ? o->weight_decay : 0.0f;
		bf16 *wT = g->prec == GP_GPU_BF16 ? (bf16 *)g->wT + off : NULL;
		k_adamw<<<blocks(n, 256), 256, 0, g->stream>>>(g->master + off, g->grads + off,
							       g->mom + off, g->vel + off, wT, n,
							       o->lr, o->beta1, o->beta2, o->eps, wd,
							       b1c, b2c, g->d_scale);
		CL("AdamW");
	}
	k_set<<<1, 1, 0, g->stream>>>(g->d_scale, 1.0f); /* the clip applies to one update */
	CL("reset clip");
	return GP_OK;
}

extern "C" gp_status gp_gpu_train_step(struct gp_gpu_model *g, const uint16_t *inputs,
				       const uint16_t *targets, int B, int T,
				       const struct gp_adamw *o, long step, float max_norm,
				       float *loss, float *norm, struct gp_err *err)
{
	if (!targets)
		return gp_err_set(err, GP_ERR_INVALID, "GPU training step without targets");
	TRY(gp_gpu_zero_grad(g, err));
	TRY(gp_gpu_forward(g, inputs, targets, B, T, NULL, err));
	TRY(gp_gpu_backward(g, err));
	TRY(gp_gpu_clip_grad(g, max_norm, NULL, err));
	TRY(gp_gpu_adamw(g, o, step, err));
	if (loss)
		CK(cudaMemcpyAsync(loss, g->d_loss, 4, cudaMemcpyDeviceToHost, g->stream));
	if (norm)
		CK(cudaMemcpyAsync(norm, g->d_norm, 4, cudaMemcpyDeviceToHost, g->stream));
	if (loss || norm)
		CK(cudaStreamSynchronize(g->stream));
	return GP_OK;
}

/* ---- inspection ---- */

extern "C" gp_status gp_gpu_read_activation(struct gp_gpu_model *g, int act, float *out, size_t n,
					    struct gp_err *err)
{
	if (act < 0 || act >= GP_A_COUNT || act == GP_A_PREATT || act == GP_A_PROBS)
		return gp_err_set(err, GP_ERR_INVALID, "activation %d is not kept on the GPU", act);
	if (act == GP_A_ATT && g->flash)
		return gp_err_set(err, GP_ERR_INVALID,
				  "the attention probabilities are not kept with flash attention");
	if (!g->B)
		return gp_err_set(err, GP_ERR_INVALID, "no forward pass yet");
	size_t na, ns;
	layout(g, g->B, g->T, &na, &ns);
	if (n != g->asz[act])
		return gp_err_set(err, GP_ERR_INVALID, "activation %d has %zu values, not %zu", act,
				  g->asz[act], n);
	if (is_stat(act)) {
		CK(cudaMemcpyAsync(out, STAT(g, act), n * 4, cudaMemcpyDeviceToHost, g->stream));
	} else if (g->prec == GP_GPU_FP32) {
		CK(cudaMemcpyAsync(out, ACT(g, float, act), n * 4, cudaMemcpyDeviceToHost,
				   g->stream));
	} else {
		/* through a float copy in the (free between passes) scratch */
		float *tmp = NULL;
		CK(cudaMallocAsync((void **)&tmp, n * 4, g->stream));
		k_to_f32<bf16><<<blocks(n, 256), 256, 0, g->stream>>>(tmp, ACT(g, bf16, act), n);
		cudaError_t e1 = cudaGetLastError();
		cudaError_t e2 = cudaMemcpyAsync(out, tmp, n * 4, cudaMemcpyDeviceToHost, g->stream);
		cudaFreeAsync(tmp, g->stream);
		if (e1 != cudaSuccess)
			return cuda_fail(err, "convert activation", e1);
		if (e2 != cudaSuccess)
			return cuda_fail(err, "copy activation", e2);
	}
	CK(cudaStreamSynchronize(g->stream));
	return GP_OK;
}

extern "C" gp_status gp_gpu_read_grads(struct gp_gpu_model *g, float *out, struct gp_err *err)
{
	if (g->infer_only)
		return gp_err_set(err, GP_ERR_INVALID, "GPU model made for generation only");
	CK(cudaMemcpyAsync(out, g->grads, g->nparams * 4, cudaMemcpyDeviceToHost, g->stream));
	CK(cudaStreamSynchronize(g->stream));
	return GP_OK;
}

extern "C" gp_status gp_gpu_poison(struct gp_gpu_model *g, struct gp_err *err)
{
	if (g->infer_only)
		return gp_err_set(err, GP_ERR_INVALID, "GPU model made for generation only");
	/* all-ones bytes are NaN in fp32 and in bf16 */
	CK(cudaMemsetAsync(g->acts, 0xff, g->acts_bytes, g->stream));
	CK(cudaMemsetAsync(g->stats, 0xff, g->stats_bytes, g->stream));
	size_t BTC = (size_t)g->maxB * g->maxT * g->cfg.width;
	size_t att = (size_t)g->maxB * g->cfg.heads * g->maxT * g->maxT;
	void *scr[] = { g->qkvr, g->vacc, g->pre, g->dres, g->dbig, g->dqkv, g->dx, g->dqkvr,
			g->datt, g->dvacc };
	size_t n[] = { 3 * BTC, BTC, att, BTC, 4 * BTC, 3 * BTC, BTC, 3 * BTC, att, BTC };
	for (int i = 0; i < 10; i++)
		CK(cudaMemsetAsync(scr[i], 0xff, n[i] * g->esz, g->stream));
	CK(cudaMemsetAsync(g->d_loss, 0xff, 4, g->stream));
	CK(cudaStreamSynchronize(g->stream));
	return GP_OK;
}

/* ---- generation ---- */

struct gp_gpu_decoder {
	struct gp_gpu_model *g;
	int slots, max_rows, use_graphs;
	int *len;
	void *kc, *vc; /* (slots, L, context, C) of T */
	void *x, *xn, *qkv, *y, *proj, *h, *hg;
	float *mean, *rstd, *logits;
	struct row_info *d_rows, *h_rows; /* h_rows pinned */
	float *h_logits;                  /* pinned */
	cudaStream_t stream;
	cublasHandle_t blas;
	void *blas_ws;
	cudaGraphExec_t *graphs; /* by mode * max_rows + row count - 1 */
	int *d_next, *h_next;     /* chosen ids (h_next pinned) */
	size_t smem;
	/* sampling: per row the probabilities and their order (sorted only
	 * when a row asks for top-k or top-p), the picks (h_picks pinned) */
	float *probs, *sprobs;
	int *idx, *sidx, *best, *seg_begin, *seg_end;
	struct gp_gpu_pick *d_picks, *h_picks;
	void *sort_tmp;
	size_t sort_bytes;
};

/* Graph modes: what a step returns. */
enum { MODE_LOGITS, MODE_GREEDY, MODE_SAMPLE, MODE_SAMPLE_SORTED, NMODES };


/* Every kernel of one step over n rows (rows already in d_rows). x is the
 * residual stream; each LayerNorm after the first comes fused with the
 * residual add before it; the products take their bias (and the MLP's
 * GELU) in cuBLASLt's epilogue where it can, as training does. */
template <typename T> static gp_status decode_impl(struct gp_gpu_decoder *d, int n, struct gp_err *err)
{
	struct gp_gpu_model *g = d->g;
	const struct gp_model_config *c = &g->cfg;
	int C = c->width, L = c->layers, NH = c->heads, ctx = c->context, Vp = c->padded_vocab;
	size_t nC = (size_t)n * C;
	cudaStream_t s = d->stream;
	const run_on on = { d->blas, s, d->blas_ws };
	T *x = (T *)d->x, *xn = (T *)d->xn, *qkv = (T *)d->qkv, *y = (T *)d->y, *proj = (T *)d->proj,
	  *h = (T *)d->h, *hg = (T *)d->hg;
	k_embed_rows<T><<<blocks(nC, 256), 256, 0, s>>>(x, d->d_rows, PW(g, T, GP_P_WTE),
							 PW(g, T, GP_P_WPE), n, C);
	CL("embed");
	k_layernorm_fwd<T><<<blocks((size_t)n * 32, 256), 256, 0, s>>>(
		xn, d->mean, d->rstd, x, PW(g, T, GP_P_LN1W), PW(g, T, GP_P_LN1B), n, C);
	CL("layernorm");
	for (int l = 0; l < L; l++) {
		TRY(matmul_fwd_on<T>(g, on, qkv, xn, PW(g, T, GP_P_QKVW) + (size_t)l * 3 * C * C,
				     PW(g, T, GP_P_QKVB) + l * 3 * C, n, C, 3 * C, err));
		k_kv_write<T><<<blocks(nC, 256), 256, 0, s>>>((T *)d->kc, (T *)d->vc, qkv, d->d_rows,
							       n, l, L, ctx, C);
		CL("kv write");
		k_decode_attn<T><<<dim3((unsigned)n, (unsigned)NH), DECODE_THREADS, d->smem, s>>>(
			y, qkv, (const T *)d->kc, (const T *)d->vc, d->d_rows, l, L, ctx, C, NH);
		CL("decode attention");
		TRY(matmul_fwd_on<T>(g, on, proj, y, PW(g, T, GP_P_ATTPROJW) + (size_t)l * C * C,
				     PW(g, T, GP_P_ATTPROJB) + l * C, n, C, C, err));
		TRY(residual_layernorm_fwd<T>(s, x, xn, d->mean, d->rstd, x, proj,
					      PW(g, T, GP_P_LN2W) + l * C, PW(g, T, GP_P_LN2B) + l * C,
					      n, C, err));
		/* hg = gelu(h), h = xn . fcw + fcb */
		TRY(matmul_fwd_on<T>(g, on, hg, xn, PW(g, T, GP_P_FCW) + (size_t)l * 4 * C * C,
				     PW(g, T, GP_P_FCB) + l * 4 * C, n, C, 4 * C, err, h));
		TRY(matmul_fwd_on<T>(g, on, proj, hg, PW(g, T, GP_P_FCPROJW) + (size_t)l * 4 * C * C,
				     PW(g, T, GP_P_FCPROJB) + l * C, n, 4 * C, C, err));
		int last = l == L - 1;
		TRY(residual_layernorm_fwd<T>(
			s, x, xn, d->mean, d->rstd, x, proj,
			last ? PW(g, T, GP_P_LNFW) : PW(g, T, GP_P_LN1W) + (l + 1) * C,
			last ? PW(g, T, GP_P_LNFB) : PW(g, T, GP_P_LN1B) + (l + 1) * C, n, C, err));
	}
	/* logits in fp32 (the sampling reads them), no bias */
	TRY(gemm<T>(d->blas, gp_gemm_linear_fwd(n, C, Vp), 1.0f, PW(g, T, GP_P_WTE), xn, 0.0f,
		    d->logits, CUDA_R_32F, err));
	return GP_OK;
}

/* Copy rows in, run the step, copy out the logits (MODE_LOGITS) or the
 * chosen ids (the others): what a graph captures. */
static gp_status decode_all(struct gp_gpu_decoder *d, int n, int mode, struct gp_err *err)
{
	CK(cudaMemcpyAsync(d->d_rows, d->h_rows, (size_t)n * sizeof *d->h_rows,
			   cudaMemcpyHostToDevice, d->stream));
	if (d->g->prec == GP_GPU_BF16)
		TRY(decode_impl<bf16>(d, n, err));
	else
		TRY(decode_impl<float>(d, n, err));
	const struct gp_model_config *c = &d->g->cfg;
	if (mode == MODE_SAMPLE || mode == MODE_SAMPLE_SORTED) {
		CK(cudaMemcpyAsync(d->d_picks, d->h_picks, (size_t)n * sizeof *d->h_picks,
				   cudaMemcpyHostToDevice, d->stream));
		k_probs<<<n, SAMPLE_THREADS, 0, d->stream>>>(d->probs, d->idx, d->best, d->seg_begin,
							     d->seg_end, d->logits, d->d_picks,
							     c->vocab, c->padded_vocab);
		CL("sampling probabilities");
		if (mode == MODE_SAMPLE_SORTED) {
			size_t bytes = d->sort_bytes;
			CK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
				d->sort_tmp, bytes, d->probs, d->sprobs, d->idx, d->sidx,
				n * c->padded_vocab, n, d->seg_begin, d->seg_end, 0, 32, d->stream));
		}
		k_pick<<<n, SAMPLE_THREADS, 0, d->stream>>>(d->d_next, d->probs, d->sprobs, d->sidx,
							    d->best, d->d_picks, c->padded_vocab);
		CL("sampling choice");
		CK(cudaMemcpyAsync(d->h_next, d->d_next, (size_t)n * sizeof(int),
				   cudaMemcpyDeviceToHost, d->stream));
		return GP_OK;
	}
	if (mode == MODE_GREEDY) {
		k_argmax<<<n, 256, 0, d->stream>>>(d->d_next, d->logits, d->g->cfg.vocab,
						   d->g->cfg.padded_vocab);
		CL("argmax");
		CK(cudaMemcpyAsync(d->h_next, d->d_next, (size_t)n * sizeof(int),
				   cudaMemcpyDeviceToHost, d->stream));
	} else {
		CK(cudaMemcpyAsync(d->h_logits, d->logits,
				   (size_t)n * d->g->cfg.padded_vocab * 4, cudaMemcpyDeviceToHost,
				   d->stream));
	}
	return GP_OK;
}

extern "C" gp_status gp_gpu_decoder_create(struct gp_gpu_decoder **out, struct gp_gpu_model *g,
					   int slots, int max_rows, struct gp_err *err)
{
	*out = NULL;
	if (slots < 1 || slots > 4096 || max_rows < 1 || max_rows > GP_BATCH_MAX_ROWS)
		return gp_err_set(err, GP_ERR_INVALID,
				  "GPU decoder: %d slots, %d rows (1..4096 and 1..%d)", slots,
				  max_rows, GP_BATCH_MAX_ROWS);
	struct gp_gpu_decoder *d = (struct gp_gpu_decoder *)calloc(1, sizeof *d);
	if (!d)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	const struct gp_model_config *c = &g->cfg;
	d->g = g;
	d->slots = slots;
	d->max_rows = max_rows;
	d->use_graphs = 1;
	d->len = (int *)calloc((size_t)slots, sizeof *d->len);
	d->graphs = (cudaGraphExec_t *)calloc((size_t)max_rows * NMODES, sizeof *d->graphs);
	gp_status st = (d->len && d->graphs) ? GP_OK
					      : gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	size_t e = g->esz, C = c->width, R = max_rows;
	size_t cache = (size_t)slots * c->layers * c->context * C * e;
	struct {
		void **p;
		size_t bytes;
	} al[] = {
		{ &d->kc, cache },
		{ &d->vc, cache },
		{ &d->x, R * C * e },
		{ &d->xn, R * C * e },
		{ &d->qkv, R * 3 * C * e },
		{ &d->y, R * C * e },
		{ &d->proj, R * C * e },
		{ &d->h, R * 4 * C * e },
		{ &d->hg, R * 4 * C * e },
		{ (void **)&d->mean, R * 4 },
		{ (void **)&d->rstd, R * 4 },
		{ (void **)&d->logits, R * c->padded_vocab * 4 },
		{ (void **)&d->d_rows, R * sizeof(struct row_info) },
		{ (void **)&d->d_next, R * sizeof(int) },
		{ &d->blas_ws, 32u << 20 },
		{ (void **)&d->probs, R * c->padded_vocab * 4 },
		{ (void **)&d->sprobs, R * c->padded_vocab * 4 },
		{ (void **)&d->idx, R * c->padded_vocab * 4 },
		{ (void **)&d->sidx, R * c->padded_vocab * 4 },
		{ (void **)&d->best, R * sizeof(int) },
		{ (void **)&d->seg_begin, R * sizeof(int) },
		{ (void **)&d->seg_end, R * sizeof(int) },
		{ (void **)&d->d_picks, R * sizeof(struct gp_gpu_pick) },
	};
	for (size_t i = 0; !st && i < sizeof al / sizeof *al; i++) {
		cudaError_t ce = cudaMalloc(al[i].p, al[i].bytes);
		if (ce != cudaSuccess)
			st = cuda_fail(err, "decoder memory", ce);
	}
	if (!st) {
		cudaError_t ce = cudaMallocHost((void **)&d->h_rows, R * sizeof(struct row_info));
		if (ce == cudaSuccess)
			ce = cudaMallocHost((void **)&d->h_logits, R * c->padded_vocab * 4);
		if (ce == cudaSuccess)
			ce = cudaMallocHost((void **)&d->h_next, R * sizeof(int));
		if (ce == cudaSuccess)
			ce = cudaMallocHost((void **)&d->h_picks, R * sizeof(struct gp_gpu_pick));
		if (ce == cudaSuccess) /* the sort's scratch for the most rows */
			ce = cub::DeviceSegmentedRadixSort::SortPairsDescending(
				(void *)NULL, d->sort_bytes, d->probs, d->sprobs, d->idx, d->sidx,
				(int)(R * c->padded_vocab), (int)R, d->seg_begin, d->seg_end, 0, 32);
		if (ce == cudaSuccess)
			ce = cudaMalloc(&d->sort_tmp, d->sort_bytes ? d->sort_bytes : 1);
		if (ce == cudaSuccess)
			ce = cudaStreamCreateWithFlags(&d->stream, cudaStreamNonBlocking);
		if (ce != cudaSuccess)
			st = cuda_fail(err, "decoder setup", ce);
	}
	if (!st) {
		cublasStatus_t bs = cublasCreate(&d->blas);
		if (bs == CUBLAS_STATUS_SUCCESS)
			bs = cublasSetStream(d->blas, d->stream);
		if (bs == CUBLAS_STATUS_SUCCESS)
			bs = cublasSetWorkspace(d->blas, d->blas_ws, 32u << 20);
		if (bs != CUBLAS_STATUS_SUCCESS)
			st = cublas_fail(err, "decoder setup", bs);
	}
	if (!st) {
		d->smem = decode_attn_smem(c->context, c->width / c->heads);
		cudaError_t ce = cudaSuccess;
		if (d->smem > 48 * 1024) {
			if (g->prec == GP_GPU_BF16)
				ce = cudaFuncSetAttribute(k_decode_attn<bf16>,
							  cudaFuncAttributeMaxDynamicSharedMemorySize,
							  (int)d->smem);
			else
				ce = cudaFuncSetAttribute(k_decode_attn<float>,
							  cudaFuncAttributeMaxDynamicSharedMemorySize,
							  (int)d->smem);
		}
		if (ce != cudaSuccess)
			st = cuda_fail(err, "decoder attention shared memory", ce);
	}
	if (st) {
		gp_gpu_decoder_destroy(d);
		return st;
	}
	*out = d;
	return GP_OK;
}

extern "C" void gp_gpu_decoder_destroy(struct gp_gpu_decoder *d)
{
	if (!d)
		return;
	if (d->stream)
		cudaStreamSynchronize(d->stream);
	for (int i = 0; d->graphs && i < NMODES * d->max_rows; i++)
		if (d->graphs[i])
			cudaGraphExecDestroy(d->graphs[i]);
	if (d->blas)
		cublasDestroy(d->blas);
	void *p[] = { d->kc,   d->vc,	  d->x,	     d->xn,	d->qkv,	    d->y,
		      d->proj, d->h,	  d->hg,     d->mean,	d->rstd,    d->logits,
		      d->d_rows, d->d_next, d->blas_ws, d->probs, d->sprobs, d->idx,
		      d->sidx, d->best, d->seg_begin, d->seg_end, d->d_picks, d->sort_tmp };
	for (size_t i = 0; i < sizeof p / sizeof *p; i++)
		if (p[i])
			cudaFree(p[i]);
	if (d->h_rows)
		cudaFreeHost(d->h_rows);
	if (d->h_logits)
		cudaFreeHost(d->h_logits);
	if (d->h_next)
		cudaFreeHost(d->h_next);
	if (d->h_picks)
		cudaFreeHost(d->h_picks);
	if (d->stream)
		cudaStreamDestroy(d->stream);
	free(d->graphs);
	free(d->len);
	free(d);
}

extern "C" void gp_gpu_decoder_reset(struct gp_gpu_decoder *d, int slot)
{
	if (slot >= 0 && slot < d->slots)
		d->len[slot] = 0;
}

extern "C" int gp_gpu_decoder_len(const struct gp_gpu_decoder *d, int slot)
{
	return slot >= 0 && slot < d->slots ? d->len[slot] : 0;
}

extern "C" void gp_gpu_decoder_use_graphs(struct gp_gpu_decoder *d, int on)
{
	d->use_graphs = on;
}

static gp_status step_impl(struct gp_gpu_decoder *d, const int *slots, const uint16_t *tokens,
			   int n, int mode, struct gp_err *err)
{
	const struct gp_model_config *c = &d->g->cfg;
	if (n < 1 || n > d->max_rows)
		return gp_err_set(err, GP_ERR_INVALID, "GPU step of %d rows (1..%d)", n, d->max_rows);
	/* check everything before any cache changes */
	for (int i = 0; i < n; i++) {
		if (slots[i] < 0 || slots[i] >= d->slots)
			return gp_err_set(err, GP_ERR_INVALID, "row %d: slot %d out of range 0..%d", i,
					  slots[i], d->slots - 1);
		if (tokens[i] >= c->vocab)
			return gp_err_set(err, GP_ERR_INVALID,
					  "row %d: token %u is outside the vocabulary (%d)", i,
					  tokens[i], c->vocab);
		if (i > 0 && slots[i] != slots[i - 1])
			for (int j = 0; j < i - 1; j++)
				if (slots[j] == slots[i])
					return gp_err_set(err, GP_ERR_INVALID,
							  "row %d: rows of slot %d are not consecutive",
							  i, slots[i]);
	}
	int run = 0;
	for (int i = 0; i < n; i++) {
		run = i > 0 && slots[i] == slots[i - 1] ? run + 1 : 0;
		int pos = d->len[slots[i]] + run;
		if (pos >= c->context)
			return gp_err_set(err, GP_ERR_TOO_BIG,
					  "slot %d is full (context %d tokens)", slots[i], c->context);
		d->h_rows[i] = (struct row_info){ slots[i], pos, tokens[i], 0 };
	}
	if (d->use_graphs) {
		cudaGraphExec_t *ge = &d->graphs[mode * d->max_rows + n - 1];
		if (!*ge) {
			cudaGraph_t graph = NULL;
			CK(cudaStreamBeginCapture(d->stream, cudaStreamCaptureModeThreadLocal));
			gp_status st = decode_all(d, n, mode, err);
			cudaError_t ce = cudaStreamEndCapture(d->stream, &graph);
			if (st) {
				if (graph)
					cudaGraphDestroy(graph);
				return st;
			}
			if (ce != cudaSuccess)
				return cuda_fail(err, "capture decode step", ce);
			ce = cudaGraphInstantiate(ge, graph, 0);
			cudaGraphDestroy(graph);
			if (ce != cudaSuccess) {
				*ge = NULL;
				return cuda_fail(err, "instantiate decode step", ce);
			}
		}
		CK(cudaGraphLaunch(*ge, d->stream));
	} else {
		TRY(decode_all(d, n, mode, err));
	}
	CK(cudaStreamSynchronize(d->stream));
	for (int i = 0; i < n; i++)
		d->len[slots[i]]++;
	return GP_OK;
}

extern "C" gp_status gp_gpu_decoder_step(struct gp_gpu_decoder *d, const int *slots,
					 const uint16_t *tokens, int n, float *logits,
					 struct gp_err *err)
{
	TRY(step_impl(d, slots, tokens, n, MODE_LOGITS, err));
	if (logits)
		memcpy(logits, d->h_logits, (size_t)n * d->g->cfg.padded_vocab * 4);
	return GP_OK;
}

extern "C" gp_status gp_gpu_decoder_greedy(struct gp_gpu_decoder *d, const int *slots,
					   const uint16_t *tokens, int n, uint16_t *next,
					   struct gp_err *err)
{
	TRY(step_impl(d, slots, tokens, n, MODE_GREEDY, err));
	for (int i = 0; i < n; i++)
		next[i] = (uint16_t)d->h_next[i];
	return GP_OK;
}

extern "C" gp_status gp_gpu_decoder_sample(struct gp_gpu_decoder *d, const int *slots,
					   const uint16_t *tokens, const struct gp_gpu_pick *picks,
					   int n, uint16_t *next, struct gp_err *err)
{
	const struct gp_model_config *c = &d->g->cfg;
	if (n < 1 || n > d->max_rows)
		return gp_err_set(err, GP_ERR_INVALID, "GPU step of %d rows (1..%d)", n, d->max_rows);
	int mode = MODE_SAMPLE;
	for (int i = 0; i < n; i++) {
		const struct gp_gpu_pick *p = &picks[i];
		if (!p->want)
			continue;
		if (p->vocab < 1 || p->vocab > c->vocab)
			return gp_err_set(err, GP_ERR_INVALID, "row %d: vocabulary %d (1..%d)", i,
					  p->vocab, c->vocab);
		if (!isfinite(p->temperature) || p->top_k < 0 || !(p->top_p >= 0.0f) ||
		    p->top_p > 1.0f || !(p->u >= 0.0) || !(p->u < 1.0))
			return gp_err_set(err, GP_ERR_INVALID,
					  "row %d: temperature %g, top_k %d, top_p %g, draw %g: "
					  "need finite, >= 0, 0..1 and [0, 1)",
					  i, (double)p->temperature, p->top_k, (double)p->top_p, p->u);
		if (p->temperature > 0.0f &&
		    ((p->top_k > 0 && p->top_k < p->vocab) || (p->top_p > 0.0f && p->top_p < 1.0f)))
			mode = MODE_SAMPLE_SORTED;
	}
	/* the graph copies the picks in from here when it runs */
	memcpy(d->h_picks, picks, (size_t)n * sizeof *picks);
	TRY(step_impl(d, slots, tokens, n, mode, err));
	for (int i = 0; i < n; i++)
		next[i] = picks[i].want ? (uint16_t)d->h_next[i] : 0;
	return GP_OK;
}
