/*
 * kernels.cuh: the device code of gpt.cu (every kernel but the libraries'
 * GEMMs and the segmented sort), apart from its host code so that the same
 * source also compiles for the CPU emulator of tests/gpu/emu.h, which runs
 * each kernel thread by thread against the CPU reference on machines
 * without a GPU (tests/gpu/test_kernels.cpp).
 *
 * Rules that keep it emulatable: block-wide and warp-wide cooperation only
 * through __syncthreads, __shfl_xor_sync, the block_reduce below and cub's
 * BlockReduce/BlockScan; dynamic shared memory only through GP_DYN_SHARED.
 */
#ifndef GP_KERNELS_CUH
#define GP_KERNELS_CUH

#ifndef GP_CUDA_EMU
#include <cub/cub.cuh>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#define GP_DYN_SHARED(type, name) extern __shared__ type name[]
#endif

#include <math.h>
#include <stddef.h>
#include <stdint.h>

extern "C" {
#include "gpu.h"
}
#include "gemm_plan.h"

typedef __nv_bfloat16 bf16;

/* ---- types ---- */

__device__ __forceinline__ float tof(float x)
{
	return x;
}
__device__ __forceinline__ float tof(bf16 x)
{
	return __bfloat162float(x);
}
template <typename T> __device__ __forceinline__ T fromf(float x);
template <> __device__ __forceinline__ float fromf<float>(float x)
{
	return x;
}
template <> __device__ __forceinline__ bf16 fromf<bf16>(float x)
{
	return __float2bfloat16(x);
}
__device__ __forceinline__ float warp_sum(float v)
{
	for (int o = 16; o > 0; o >>= 1)
		v += __shfl_xor_sync(0xffffffffu, v, o);
	return v;
}
__device__ __forceinline__ float warp_max(float v)
{
	for (int o = 16; o > 0; o >>= 1)
		v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
	return v;
}
/* Block-wide sum or max (blockDim.x a multiple of 32, at most 1024); every
 * thread gets the result. */
__device__ float block_reduce(float v, bool is_max)
{
	__shared__ float part[32];
	__shared__ float result;
	int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
	v = is_max ? warp_max(v) : warp_sum(v);
	if (lane == 0)
		part[w] = v;
	__syncthreads();
	if (w == 0) {
		float x = lane < nw ? part[lane] : (is_max ? -INFINITY : 0.0f);
		x = is_max ? warp_max(x) : warp_sum(x);
		if (lane == 0)
			result = x;
	}
	__syncthreads();
	float r = result;
	__syncthreads(); /* part/result may be reused by the next call */
	return r;
}

#define GELU_K 0.7978845608028654f

/* ---- kernels ---- */

template <typename T>
__global__ void k_encoder_fwd(T *out, const uint16_t *inp, const T *wte, const T *wpe, int BT,
			      int Tlen, int C)
{
	size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
	if (i >= (size_t)BT * C)
		return;
	int bt = (int)(i / C), c = (int)(i % C), t = bt % Tlen;
	out[i] = fromf<T>(tof(wte[(size_t)inp[bt] * C + c]) + tof(wpe[(size_t)t * C + c]));
}

template <typename T>
__global__ void k_encoder_bwd(float *dwte, float *dwpe, const T *dout, const uint16_t *inp,
			      int BT, int Tlen, int C)
{
	size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
	if (i >= (size_t)BT * C)
		return;
	int bt = (int)(i / C), c = (int)(i % C), t = bt % Tlen;
	float d = tof(dout[i]);
	atomicAdd(&dwte[(size_t)inp[bt] * C + c], d);
	atomicAdd(&dwpe[(size_t)t * C + c], d);
}

/*
 * The rest of a LayerNorm row for one warp, given each lane's part s of the
 * row's sum: mean, then the variance in a second pass (as the reference
 * does), then o; lane 0 stores the row's mean and rstd.
 */
template <typename T>
__device__ __forceinline__ void layernorm_row(T *o, float *mean, float *rstd, const T *x,
					      const T *w, const T *b, float s, int C, int lane)
{
	float m = warp_sum(s) / C;
	float v = 0;
	for (int i = lane; i < C; i += 32) {
		float d = tof(x[i]) - m;
		v += d * d;
	}
	v = warp_sum(v) / C;
	float r = rsqrtf(v + 1e-5f);
	for (int i = lane; i < C; i += 32)
		o[i] = fromf<T>((tof(x[i]) - m) * r * tof(w[i]) + tof(b[i]));
	if (lane == 0) {
		*mean = m;
		*rstd = r;
	}
}

/* One warp per row. */
template <typename T>
__global__ void k_layernorm_fwd(T *out, float *mean, float *rstd, const T *inp, const T *w,
				const T *b, int N, int C)
{
	int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
	if (row >= N)
		return;
	const T *x = inp + (size_t)row * C;
	float s = 0;
	for (int i = lane; i < C; i += 32)
		s += tof(x[i]);
	layernorm_row(out + (size_t)row * C, mean + row, rstd + row, x, w, b, s, C, lane);
}

/*
 * res = a + b (stored in T), then out = LayerNorm(res) as k_layernorm_fwd
 * computes it from the stored values: the residual add and the LayerNorm
 * that follows it in one pass (one launch instead of two, res read back by
 * the thread that wrote it). res may be a (in place); one warp per row.
 */
template <typename T>
__global__ void k_residual_layernorm_fwd(T *res, T *out, float *mean, float *rstd, const T *a,
					 const T *b, const T *w, const T *bias, int N, int C)
{
	int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
	if (row >= N)
		return;
	size_t off = (size_t)row * C;
	T *x = res + off;
	float s = 0;
	for (int i = lane; i < C; i += 32) {
		T r = fromf<T>(tof(a[off + i]) + tof(b[off + i]));
		x[i] = r;
		s += tof(r);
	}
	layernorm_row(out + off, mean + row, rstd + row, (const T *)x, w, bias, s, C, lane);
}

/* dinp += the LayerNorm's input gradient; one warp per row. */
template <typename T>
__global__ void k_layernorm_bwd_x(T *dinp, const T *dout, const T *inp, const T *w,
				  const float *mean, const float *rstd, int N, int C)
{
	int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
	if (row >= N)
		return;
	const T *d = dout + (size_t)row * C, *x = inp + (size_t)row * C;
	T *dx = dinp + (size_t)row * C;
	float m = mean[row], r = rstd[row];
	float a = 0, bsum = 0;
	for (int i = lane; i < C; i += 32) {
		float norm = (tof(x[i]) - m) * r;
		float dn = tof(w[i]) * tof(d[i]);
		a += dn;
		bsum += dn * norm;
	}
	a = warp_sum(a) / C;
	bsum = warp_sum(bsum) / C;
	for (int i = lane; i < C; i += 32) {
		float norm = (tof(x[i]) - m) * r;
		float dn = tof(w[i]) * tof(d[i]);
		dx[i] = fromf<T>(tof(dx[i]) + (dn - a - norm * bsum) * r);
	}
}

/* dw += sum_n norm * dout, db += sum_n dout: threads over channels, blocks
 * over chunks of rows, one atomic per channel and chunk. */
template <typename T>
__global__ void k_layernorm_bwd_wb(float *dw, float *db, const T *dout, const T *inp,
				   const float *mean, const float *rstd, int N, int C, int chunk)
{
	int c = blockIdx.x * blockDim.x + threadIdx.x;
	int n0 = blockIdx.y * chunk, n1 = min(N, n0 + chunk);
	if (c >= C)
		return;
	float sw = 0, sb = 0;
	for (int n = n0; n < n1; n++) {
		float d = tof(dout[(size_t)n * C + c]);
		sw += (tof(inp[(size_t)n * C + c]) - mean[n]) * rstd[n] * d;
		sb += d;
	}
	atomicAdd(&dw[c], sw);
	atomicAdd(&db[c], sb);
}

/* dbias[o] += sum_n dout[n][o], the same shape of reduction. */
template <typename T>
__global__ void k_colsum(float *dbias, const T *dout, int N, int OC, int chunk)
{
	int o = blockIdx.x * blockDim.x + threadIdx.x;
	int n0 = blockIdx.y * chunk, n1 = min(N, n0 + chunk);
	if (o >= OC)
		return;
	float s = 0;
	for (int n = n0; n < n1; n++)
		s += tof(dout[(size_t)n * OC + o]);
	atomicAdd(&dbias[o], s);
}

template <typename T> __global__ void k_add_bias(T *out, const T *bias, size_t N, int OC)
{
	size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
	if (i >= N * OC)
		return;
	out[i] = fromf<T>(tof(out[i]) + tof(bias[i % OC]));
}

template <typename T> __global__ void k_residual(T *out, const T *a, const T *b, size_t N)
{
	size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
	if (i < N)
		out[i] = fromf<T>(tof(a[i]) + tof(b[i]));
}

template <typename T> __global__ void k_gelu_fwd(T *out, const T *inp, size_t N)
{
	size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
	if (i >= N)
		return;
	float x = tof(inp[i]);
	out[i] = fromf<T>(0.5f * x * (1.0f + tanhf(GELU_K * (x + 0.044715f * x * x * x))));
}

/* d = gelu'(x) * d, in place (d was just written by a GEMM). */
template <typename T> __global__ void k_gelu_bwd(T *d, const T *inp, size_t N)
{
	size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
	if (i >= N)
		return;
	float x = tof(inp[i]);
	float th = tanhf(GELU_K * (x + 0.044715f * x * x * x));
	float du = GELU_K * (1.0f + 3.0f * 0.044715f * x * x);
	d[i] = fromf<T>((0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * du) * tof(d[i]));
}

/* qkv (B, T, 3, NH, hs) -> q, k, v (B, NH, T, hs). */
template <typename T>
__global__ void k_permute(T *q, T *k, T *v, const T *qkv, int B, int Tlen, int NH, int hs)
{
	size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
	size_t n = (size_t)B * NH * Tlen * hs;
	if (i >= n)
		return;
	int C = NH * hs;
	size_t src = gp_bnth_to_btc(i, Tlen, NH, hs, 3 * (size_t)C);
	q[i] = qkv[src];
	k[i] = qkv[src + C];
	v[i] = qkv[src + 2 * C];
}

/* The reverse: dq, dk, dv (B, NH, T, hs) -> dqkv (B, T, 3C), overwriting. */
template <typename T>
__global__ void k_permute_bwd(T *dqkv, const T *dq, const T *dk, const T *dv, int B, int Tlen,
			      int NH, int hs)
{
	size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
	size_t n = (size_t)B * NH * Tlen * hs;
	if (i >= n)
		return;
	int C = NH * hs;
	size_t dst = gp_bnth_to_btc(i, Tlen, NH, hs, 3 * (size_t)C);
	dqkv[dst] = dq[i];
	dqkv[dst + C] = dk[i];
	dqkv[dst + 2 * C] = dv[i];
}

/* y (B, NH, T, hs) -> out (B, T, C); dir 1: the reverse (for the backward). */
template <typename T>
__global__ void k_unpermute(T *out, const T *y, int B, int Tlen, int NH, int hs, int reverse)
{
	size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
	size_t n = (size_t)B * NH * Tlen * hs;
	if (i >= n)
		return;
	size_t o = gp_bnth_to_btc(i, Tlen, NH, hs, (size_t)NH * hs);
	if (reverse)
		out[i] = y[o]; /* out is (B, NH, T, hs) here, y (B, T, C) */
	else
		out[o] = y[i];
}

/* Causal softmax of pre (already scaled) into att, rows of T; one warp per
 * row; zero above the diagonal. */
template <typename T>
__global__ void k_softmax_causal(T *att, const T *pre, size_t rows, int Tlen)
{
	size_t row = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
	int lane = threadIdx.x & 31;
	if (row >= rows)
		return;
	int t = (int)(row % Tlen);
	const T *p = pre + row * Tlen;
	T *a = att + row * Tlen;
	float mx = -INFINITY;
	for (int j = lane; j <= t; j += 32)
		mx = fmaxf(mx, tof(p[j]));
	mx = warp_max(mx);
	float s = 0;
	for (int j = lane; j <= t; j += 32)
		s += expf(tof(p[j]) - mx);
	s = warp_sum(s);
	float inv = s > 0 ? 1.0f / s : 0.0f;
	for (int j = lane; j < Tlen; j += 32)
		a[j] = fromf<T>(j <= t ? expf(tof(p[j]) - mx) * inv : 0.0f);
}

/* datt -> dpreatt in place: att * (datt - <att, datt>) * scale, zero above
 * the diagonal. */
template <typename T>
__global__ void k_softmax_causal_bwd(T *d, const T *att, size_t rows, int Tlen, float scale)
{
	size_t row = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
	int lane = threadIdx.x & 31;
	if (row >= rows)
		return;
	int t = (int)(row % Tlen);
	T *dr = d + row * Tlen;
	const T *a = att + row * Tlen;
	float dot = 0;
	for (int j = lane; j <= t; j += 32)
		dot += tof(a[j]) * tof(dr[j]);
	dot = warp_sum(dot);
	for (int j = lane; j < Tlen; j += 32)
		dr[j] = fromf<T>(j <= t ? tof(a[j]) * (tof(dr[j]) - dot) * scale : 0.0f);
}

/* Max and sum of exp(l - max) over the first V values of a row, by the
 * whole block (every thread gets both). */
template <typename T>
__device__ void row_softmax_stats(const T *l, int V, float *mx_out, float *sum_out)
{
	float mx = -INFINITY;
	for (int i = threadIdx.x; i < V; i += blockDim.x)
		mx = fmaxf(mx, tof(l[i]));
	mx = block_reduce(mx, true);
	float s = 0;
	for (int i = threadIdx.x; i < V; i += blockDim.x)
		s += expf(tof(l[i]) - mx);
	*sum_out = block_reduce(s, false);
	*mx_out = mx;
}

/* Per row: loss = log(sum exp(l - max)) + max - l[target] over the first V
 * logits. One block per row. */
template <typename T>
__global__ void k_crossentropy_fwd(float *losses, const T *logits, const uint16_t *targets, int V,
				   int Vp)
{
	size_t row = blockIdx.x;
	const T *l = logits + row * Vp;
	float mx, s;
	row_softmax_stats(l, V, &mx, &s);
	if (threadIdx.x == 0) {
		float p = expf(tof(l[targets[row]]) - mx) / s;
		/* as the reference: a probability that underflowed gives 1e-30 */
		losses[row] = -logf(p > 0 ? p : 1e-30f);
	}
}

/* logits -> dlogits in place: (softmax - onehot) * dloss over the first V,
 * zero over the padding. */
template <typename T>
__global__ void k_crossentropy_bwd(T *logits, const uint16_t *targets, float dloss, int V, int Vp)
{
	size_t row = blockIdx.x;
	T *l = logits + row * Vp;
	float mx, s;
	row_softmax_stats((const T *)l, V, &mx, &s);
	int tg = targets[row];
	for (int i = threadIdx.x; i < Vp; i += blockDim.x) {
		float g = 0;
		if (i < V)
			g = (expf(tof(l[i]) - mx) / s - (i == tg ? 1.0f : 0.0f)) * dloss;
		l[i] = fromf<T>(g);
	}
}

/* Mean of n floats into *out, one block. */
__global__ void k_mean(float *out, const float *x, int n)
{
	float s = 0;
	for (int i = threadIdx.x; i < n; i += blockDim.x)
		s += x[i];
	s = block_reduce(s, false);
	if (threadIdx.x == 0)
		*out = s / n;
}

__global__ void k_sumsq(double *out, const float *g, size_t n)
{
	double s = 0;
	for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
	     i += (size_t)gridDim.x * blockDim.x)
		s += (double)g[i] * g[i];
	/* warp, then one atomic per warp */
	for (int o = 16; o > 0; o >>= 1)
		s += __shfl_xor_sync(0xffffffffu, s, o);
	if ((threadIdx.x & 31) == 0)
		atomicAdd(out, s);
}

/* norm and the clip scale AdamW applies (1 when not clipping). */
__global__ void k_clip_scale(float *norm, float *scale, const double *sumsq, float max_norm)
{
	float n = (float)sqrt(*sumsq);
	*norm = n;
	*scale = max_norm > 0 && n > max_norm ? max_norm / n : 1.0f;
}

__global__ void k_set(float *p, float v)
{
	*p = v;
}

template <typename T> __global__ void k_to_T(T *dst, const float *src, size_t n)
{
	size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
	if (i < n)
		dst[i] = fromf<T>(src[i]);
}

template <typename T> __global__ void k_to_f32(float *dst, const T *src, size_t n)
{
	size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
	if (i < n)
		dst[i] = tof(src[i]);
}

/* AdamW as gp_model_adamw, gradients scaled by *gscale (the clip), then
 * zeroed; wT (may be NULL) gets the bf16 copy of the new parameters. */
__global__ void k_adamw(float *p, float *g, float *m, float *v, bf16 *wT, size_t n, float lr,
			float b1, float b2, float eps, float wd, float b1c, float b2c,
			const float *gscale)
{
	size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
	if (i >= n)
		return;
	float gi = g[i] * *gscale;
	float mi = b1 * m[i] + (1.0f - b1) * gi;
	float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
	m[i] = mi;
	v[i] = vi;
	float mh = mi / b1c, vh = vi / b2c;
	float pi = p[i];
	pi -= lr * (mh / (sqrtf(vh) + eps) + wd * pi);
	p[i] = pi;
	g[i] = 0.0f;
	if (wT)
		wT[i] = __float2bfloat16(pi);
}

/* ---- generation ---- */

struct row_info {
	int slot, pos, token, pad;
};


template <typename T>
__global__ void k_embed_rows(T *x, const struct row_info *rows, const T *wte, const T *wpe, int n,
			     int C)
{
	size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
	if (i >= (size_t)n * C)
		return;
	int r = (int)(i / C), c = (int)(i % C);
	x[i] = fromf<T>(tof(wte[(size_t)rows[r].token * C + c]) +
			tof(wpe[(size_t)rows[r].pos * C + c]));
}

template <typename T>
__global__ void k_kv_write(T *kc, T *vc, const T *qkv, const struct row_info *rows, int n, int l,
			   int L, int ctx, int C)
{
	size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
	if (i >= (size_t)n * C)
		return;
	int r = (int)(i / C), c = (int)(i % C);
	size_t at = (((size_t)rows[r].slot * L + l) * ctx + rows[r].pos) * C + c;
	kc[at] = qkv[(size_t)r * 3 * C + C + c];
	vc[at] = qkv[(size_t)r * 3 * C + 2 * C + c];
}

/* One block of DECODE_THREADS per (row, head): scores over positions
 * 0..pos of the row's slot (in shared memory), softmax, then the weighted
 * sum of values with each warp over a share of the positions (lanes over
 * channels: coalesced rows of V) and the warps' partial sums added. */
#define DECODE_THREADS 128

/* dynamic shared memory of k_decode_attn: scores, then the partial sums */
static inline size_t decode_attn_smem(int ctx, int hs)
{
	return ((size_t)ctx + (size_t)(DECODE_THREADS / 32) * hs) * sizeof(float);
}

template <typename T>
__global__ void k_decode_attn(T *y, const T *qkv, const T *kc, const T *vc,
			      const struct row_info *rows, int l, int L, int ctx, int C, int NH)
{
	GP_DYN_SHARED(float, sc);
	int r = blockIdx.x, h = blockIdx.y, hs = C / NH;
	int pos = rows[r].pos;
	const T *q = qkv + (size_t)r * 3 * C + (size_t)h * hs;
	size_t base = ((size_t)rows[r].slot * L + l) * ctx * C + (size_t)h * hs;
	float scale = rsqrtf((float)hs);
	float mx = -INFINITY;
	for (int p = threadIdx.x; p <= pos; p += blockDim.x) {
		const T *k = kc + base + (size_t)p * C;
		float d = 0;
		for (int i = 0; i < hs; i++)
			d += tof(q[i]) * tof(k[i]);
		d *= scale;
		sc[p] = d;
		mx = fmaxf(mx, d);
	}
	mx = block_reduce(mx, true);
	float s = 0;
	for (int p = threadIdx.x; p <= pos; p += blockDim.x) {
		float e = expf(sc[p] - mx);
		sc[p] = e;
		s += e;
	}
	s = block_reduce(s, false); /* synchronizes: sc is complete */
	int w = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
	float *part = sc + ctx; /* (nw, hs) */
	for (int i = lane; i < hs; i += 32) {
		float acc = 0;
		for (int p = w; p <= pos; p += nw)
			acc += sc[p] * tof(vc[base + (size_t)p * C + i]);
		part[w * hs + i] = acc;
	}
	__syncthreads();
	float inv = 1.0f / s;
	for (int i = threadIdx.x; i < hs; i += blockDim.x) {
		float acc = 0;
		for (int k = 0; k < nw; k++)
			acc += part[k * hs + i];
		y[(size_t)r * C + (size_t)h * hs + i] = fromf<T>(acc * inv);
	}
}

/* Greedy: the first index of the largest of the first V logits, per row. */
__global__ void k_argmax(int *out, const float *logits, int V, int Vp)
{
	__shared__ float bv[256];
	__shared__ int bi[256];
	const float *l = logits + (size_t)blockIdx.x * Vp;
	float best = -INFINITY;
	int idx = 0x7fffffff;
	for (int i = threadIdx.x; i < V; i += blockDim.x)
		if (l[i] > best) { /* strided in increasing i: the first of equals stays */
			best = l[i];
			idx = i;
		}
	bv[threadIdx.x] = best;
	bi[threadIdx.x] = idx;
	__syncthreads();
	for (int s = blockDim.x / 2; s > 0; s >>= 1) {
		if ((int)threadIdx.x < s) {
			float ov = bv[threadIdx.x + s];
			int oi = bi[threadIdx.x + s];
			if (ov > bv[threadIdx.x] || (ov == bv[threadIdx.x] && oi < bi[threadIdx.x])) {
				bv[threadIdx.x] = ov;
				bi[threadIdx.x] = oi;
			}
		}
		__syncthreads();
	}
	if (threadIdx.x == 0)
		out[blockIdx.x] = bi[0];
}

/* ---- sampling (gp_sample on the device) ---- */

#define SAMPLE_THREADS 512

typedef cub::KeyValuePair<int, float> kv_t;

struct first_max {
	__device__ kv_t operator()(const kv_t &a, const kv_t &b) const
	{
		return (b.value > a.value || (b.value == a.value && b.key < a.key)) ? b : a;
	}
};

/*
 * One block a row. best[r]: the first index of the largest of the pick's
 * first vocab logits. For a sampled row, gp_sample's probabilities: e_i =
 * exp((l_i - max) / T) in float, their sum in double, p_i = (float)(e_i /
 * sum), 0 from vocab up to the model's vocabulary Vm; idx_i = i. The row's
 * sort segment is empty unless top-k or top-p needs the order.
 */
__global__ void __launch_bounds__(SAMPLE_THREADS)
	k_probs(float *probs, int *idx, int *best, int *seg_begin, int *seg_end,
		const float *logits, const struct gp_gpu_pick *picks, int Vm, int Vp)
{
	typedef cub::BlockReduce<kv_t, SAMPLE_THREADS> red_kv;
	typedef cub::BlockReduce<double, SAMPLE_THREADS> red_d;
	__shared__ union {
		typename red_kv::TempStorage kv;
		typename red_d::TempStorage d;
	} tmp;
	__shared__ float s_max;
	__shared__ double s_sum;
	int r = blockIdx.x;
	const struct gp_gpu_pick pk = picks[r];
	size_t base = (size_t)r * Vp;
	if (threadIdx.x == 0) {
		seg_begin[r] = (int)base;
		seg_end[r] = (int)base;
		best[r] = 0;
	}
	if (!pk.want)
		return;
	int V = pk.vocab;
	const float *l = logits + base;
	kv_t m;
	m.key = 0x7fffffff;
	m.value = -INFINITY;
	for (int i = threadIdx.x; i < V; i += blockDim.x)
		if (l[i] > m.value) { /* strided in increasing i: the first of equals stays */
			m.value = l[i];
			m.key = i;
		}
	kv_t b = red_kv(tmp.kv).Reduce(m, first_max());
	if (threadIdx.x == 0) {
		best[r] = b.key;
		s_max = b.value;
	}
	__syncthreads();
	if (!(pk.temperature > 0.0f))
		return;
	float mx = s_max;
	double sum = 0;
	for (int i = threadIdx.x; i < V; i += blockDim.x) {
		float e = expf((l[i] - mx) / pk.temperature);
		probs[base + i] = e;
		sum += e;
	}
	double tot = red_d(tmp.d).Sum(sum);
	if (threadIdx.x == 0)
		s_sum = tot;
	__syncthreads();
	tot = s_sum;
	for (int i = threadIdx.x; i < Vm; i += blockDim.x) {
		probs[base + i] = i < V ? (float)(probs[base + i] / tot) : 0.0f;
		idx[base + i] = i;
	}
	int k = pk.top_k > 0 && pk.top_k < V ? pk.top_k : V;
	if (threadIdx.x == 0 && (k < V || (pk.top_p > 0.0f && pk.top_p < 1.0f)))
		seg_end[r] = (int)(base + Vm);
}

struct reach_tmp {
	typename cub::BlockScan<double, SAMPLE_THREADS>::TempStorage scan;
	int found;
	double carry, at;
};

/*
 * The first i < n at which the running sum p[0] + ... + p[i] (double) is
 * >= thr (ge) or > thr; n when there is none. *upto: the running sum
 * through that i, or through n - 1. Every thread of the block calls it.
 */
__device__ int first_reach(const float *p, int n, double thr, bool ge, double *upto,
			   struct reach_tmp *t)
{
	__syncthreads(); /* the last call's readers are done */
	if (threadIdx.x == 0) {
		t->found = n;
		t->carry = 0;
	}
	__syncthreads();
	for (int c0 = 0; c0 < n; c0 += blockDim.x) {
		int i = c0 + threadIdx.x;
		double v = i < n ? (double)p[i] : 0.0, incl, agg;
		cub::BlockScan<double, SAMPLE_THREADS>(t->scan).InclusiveSum(v, incl, agg);
		double cum = t->carry + incl;
		if (i < n && (ge ? cum >= thr : cum > thr))
			atomicMin(&t->found, i);
		__syncthreads();
		int f = t->found;
		if (f == i)
			t->at = cum;
		__syncthreads();
		if (f < n) {
			*upto = t->at;
			return f;
		}
		if (threadIdx.x == 0)
			t->carry += agg;
		__syncthreads();
	}
	*upto = t->carry;
	return n;
}

/*
 * One block a row: gp_sample's choice. The row's order is the sorted one
 * when top-k or top-p asks (probability descending, ties by index: the
 * radix sort is stable over ascending indices), else the vocabulary's.
 * n = top_k (or all); with top-p, n ends at the first position whose running
 * sum reaches top_p; the token is the first of the n whose running sum
 * exceeds u times their mass (the last of them when rounding leaves none).
 */
__global__ void __launch_bounds__(SAMPLE_THREADS)
	k_pick(int *next, const float *probs, const float *sprobs, const int *sidx, const int *best,
	       const struct gp_gpu_pick *picks, int Vp)
{
	__shared__ struct reach_tmp t;
	int r = blockIdx.x;
	const struct gp_gpu_pick pk = picks[r];
	if (!pk.want || !(pk.temperature > 0.0f)) {
		if (threadIdx.x == 0)
			next[r] = pk.want ? best[r] : 0;
		return;
	}
	int V = pk.vocab;
	int k = pk.top_k > 0 && pk.top_k < V ? pk.top_k : V;
	int nucleus = pk.top_p > 0.0f && pk.top_p < 1.0f;
	int sorted = k < V || nucleus;
	size_t base = (size_t)r * Vp;
	const float *p = (sorted ? sprobs : probs) + base;
	int n = k;
	double mass = 0;
	if (nucleus) {
		int at = first_reach(p, k, (double)pk.top_p, true, &mass, &t);
		n = at < k ? at + 1 : k;
	} else {
		first_reach(p, n, INFINITY, true, &mass, &t); /* the sum of all n */
	}
	double ignored = 0;
	int at = first_reach(p, n, pk.u * mass, false, &ignored, &t);
	int i = at < n ? at : n - 1;
	if (threadIdx.x == 0)
		next[r] = sorted ? sidx[base + i] : i;
}

/* ---- flash attention (bf16, tensor cores) ---- */

/*
 * Causal attention without the (B, NH, T, T) matrices, after FlashAttention-2:
 * one block of four warps per 64 query rows (forward) or 64 keys
 * (backward) of one (b, h), each warp 16 rows, products on tensor cores
 * (mma.sync m16n8k16, bf16 in, fp32 accumulate), q, k, v read from qkv
 * (B, T, 3C) and y written to (B, T, C) in place (no permutes). For head
 * sizes 16, 32 and 64 (fa_supported); the forward keeps lse = m + log l per
 * row for the backward, which recomputes the probabilities tile by tile.
 *
 * Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), lane =
 * 4 g + t: A (16x16, row-major) a0 = (g, 2t..2t+1), a1 = (g+8, 2t..),
 * a2 = (g, 2t+8..), a3 = (g+8, 2t+8..); B (16x8) b0 = (k 2t..2t+1, n g),
 * b1 = (k 2t+8.., n g); C (16x8) c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, ..);
 * two bf16 to a register, the lower index in the low half. A C tile of
 * scores is an A fragment of the next product without leaving registers.
 */
#define FA_ROWS 64 /* rows (queries or keys) of a block: 16 a warp */
#define FA_TILE 64 /* the other side's tile */
#define FA_THREADS 128
#ifdef GP_CUDA_EMU
#define FA_UNROLL
#else
#define FA_UNROLL _Pragma("unroll") /* register arrays stay registers */
#endif

static inline int fa_supported(int hs)
{
	return hs == 16 || hs == 32 || hs == 64;
}

__device__ __forceinline__ uint32_t fa_bits(bf16 x)
{
	return (uint32_t)__bfloat16_as_ushort(x);
}
__device__ __forceinline__ uint32_t fa_pack(float lo, float hi)
{
	return fa_bits(__float2bfloat16(lo)) | (fa_bits(__float2bfloat16(hi)) << 16);
}
__device__ __forceinline__ uint32_t fa_pack2(bf16 lo, bf16 hi)
{
	return fa_bits(lo) | (fa_bits(hi) << 16);
}
/* two consecutive bf16 (4-byte aligned) as one register */
__device__ __forceinline__ uint32_t fa_ld(const bf16 *p)
{
#ifdef GP_CUDA_EMU
	uint32_t v;
	memcpy(&v, (const void *)p, sizeof v);
	return v;
#else
	return *reinterpret_cast<const uint32_t *>(p);
#endif
}
__device__ __forceinline__ void fa_st(bf16 *p, uint32_t v)
{
#ifdef GP_CUDA_EMU
	memcpy((void *)p, &v, sizeof v);
#else
	*reinterpret_cast<uint32_t *>(p) = v;
#endif
}
/* d (16x8) += a (16x16) b (16x8), the whole warp */
__device__ __forceinline__ void fa_mma(float *d, const uint32_t *a, const uint32_t *b)
{
#ifdef GP_CUDA_EMU
	emu_mma_m16n8k16_bf16(d, a, b);
#else
	asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
		     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
		     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
		     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}
/* C tiles n and n+1 (16x8 each, as floats) as the A fragment of 16x16 */
__device__ __forceinline__ void fa_c_to_a(uint32_t *a, const float *c0, const float *c1)
{
	a[0] = fa_pack(c0[0], c0[1]);
	a[1] = fa_pack(c0[2], c0[3]);
	a[2] = fa_pack(c1[0], c1[1]);
	a[3] = fa_pack(c1[2], c1[3]);
}
/* B fragments of a row-major bf16 matrix m (leading dim ld): kn, with k
 * down its rows (B[k][n] = m[k0 + k][n0 + n], pairs gathered); nk, with n
 * down its rows (B[k][n] = m[n0 + n][k0 + k], pairs loaded whole) */
__device__ __forceinline__ void fa_load_b_kn(uint32_t *b, const bf16 *m, int ld, int k0, int n0,
					     int g, int t)
{
	const bf16 *p = m + (size_t)(k0 + 2 * t) * ld + n0 + g;
	b[0] = fa_pack2(p[0], p[ld]);
	b[1] = fa_pack2(p[8 * ld], p[9 * ld]);
}
__device__ __forceinline__ void fa_load_b_nk(uint32_t *b, const bf16 *m, int ld, int k0, int n0,
					     int g, int t)
{
	const bf16 *p = m + (size_t)(n0 + g) * ld + k0 + 2 * t;
	b[0] = fa_ld(p);
	b[1] = fa_ld(p + 8);
}
/* acc (16 x HS as HS/8 C tiles) += a (16 x 16) . m[k0 .. k0+15][0 .. HS),
 * m row-major in shared memory with leading dim ld */
template <int HS>
__device__ __forceinline__ void fa_mma_rows(float (*acc)[4], const uint32_t *a, const bf16 *m,
					    int ld, int k0, int g, int t)
{
	FA_UNROLL
	for (int d = 0; d < HS / 8; d++) {
		uint32_t b[2];
		fa_load_b_kn(b, m, ld, k0, 8 * d, g, t);
		fa_mma(acc[d], a, b);
	}
}
/* the A fragment of rows r0.. of a row-major bf16 matrix (leading dim ld),
 * columns c0..c0+15; rows at or past n are zero */
__device__ __forceinline__ void fa_load_a(uint32_t *a, const bf16 *m, size_t ld, int r0, int c0,
					  int n, int g, int t)
{
	FA_UNROLL
	for (int r = 0; r < 4; r++) {
		int row = r0 + g + (r & 1) * 8, col = c0 + 2 * t + (r >> 1) * 8;
		a[r] = row < n ? fa_ld(m + (size_t)row * ld + col) : 0u;
	}
}

/* y = softmax(scale q k^T, causal) v per (b, h); lse per (b, h, t) */
template <int HS>
__global__ void __launch_bounds__(FA_THREADS)
	k_flash_fwd(bf16 *y, float *lse, const bf16 *qkv, int T, int NH, float scale)
{
	__shared__ __align__(16) bf16 ks[FA_TILE][HS + 8];
	__shared__ __align__(16) bf16 vs[FA_TILE][HS + 8];
	int C = NH * HS, bh = blockIdx.y, b = bh / NH, h = bh % NH;
	int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
	int q0 = blockIdx.x * FA_ROWS + warp * 16;
	size_t ld = 3 * (size_t)C;
	const bf16 *base = qkv + (size_t)b * T * ld + h * HS;
	uint32_t qa[HS / 16][4];
	FA_UNROLL
	for (int s = 0; s < HS / 16; s++)
		fa_load_a(qa[s], base, ld, q0, 16 * s, T, g, t);
	float o[HS / 8][4], m[2] = { -INFINITY, -INFINITY }, l[2] = { 0, 0 };
	FA_UNROLL
	for (int d = 0; d < HS / 8; d++)
		o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0;
	int last = min(T, (int)(blockIdx.x + 1) * FA_ROWS) - 1;
	for (int k0 = 0; k0 <= last; k0 += FA_TILE) {
		__syncthreads(); /* the last tile's readers are done */
		for (int i = threadIdx.x; i < FA_TILE * HS / 2; i += FA_THREADS) {
			int r = i / (HS / 2), c = (i % (HS / 2)) * 2, key = k0 + r;
			const bf16 *src = base + (size_t)key * ld + c;
			fa_st(&ks[r][c], key < T ? fa_ld(src + C) : 0u);
			fa_st(&vs[r][c], key < T ? fa_ld(src + 2 * C) : 0u);
		}
		__syncthreads();
		float sc[FA_TILE / 8][4];
		FA_UNROLL
		for (int j = 0; j < FA_TILE / 8; j++) {
			sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0;
			FA_UNROLL
			for (int s = 0; s < HS / 16; s++) {
				uint32_t kb[2];
				fa_load_b_nk(kb, &ks[0][0], HS + 8, 16 * s, 8 * j, g, t);
				fa_mma(sc[j], qa[s], kb);
			}
		}
		float mt[2] = { -INFINITY, -INFINITY };
		FA_UNROLL
		for (int j = 0; j < FA_TILE / 8; j++)
			FA_UNROLL
			for (int e = 0; e < 4; e++) {
				int row = q0 + g + (e >> 1) * 8, key = k0 + 8 * j + 2 * t + (e & 1);
				float v = key <= row && key < T ? sc[j][e] * scale : -INFINITY;
				sc[j][e] = v;
				mt[e >> 1] = fmaxf(mt[e >> 1], v);
			}
		float alpha[2];
		FA_UNROLL
		for (int r = 0; r < 2; r++) {
			mt[r] = fmaxf(mt[r], __shfl_xor_sync(0xffffffffu, mt[r], 1));
			mt[r] = fmaxf(mt[r], __shfl_xor_sync(0xffffffffu, mt[r], 2));
			float mn = fmaxf(m[r], mt[r]);
			alpha[r] = mn == -INFINITY ? 1.0f : expf(m[r] - mn);
			m[r] = mn;
			l[r] *= alpha[r];
		}
		FA_UNROLL
		for (int j = 0; j < FA_TILE / 8; j++)
			FA_UNROLL
			for (int e = 0; e < 4; e++) {
				float mr = m[e >> 1];
				float p = mr == -INFINITY ? 0.0f : expf(sc[j][e] - mr);
				sc[j][e] = p;
				l[e >> 1] += p;
			}
		FA_UNROLL
		for (int d = 0; d < HS / 8; d++)
			FA_UNROLL
			for (int e = 0; e < 4; e++)
				o[d][e] *= alpha[e >> 1];
		FA_UNROLL
		for (int s = 0; s < FA_TILE / 16; s++) {
			uint32_t pa[4];
			fa_c_to_a(pa, sc[2 * s], sc[2 * s + 1]);
			fa_mma_rows<HS>(o, pa, &vs[0][0], HS + 8, 16 * s, g, t);
		}
	}
	FA_UNROLL
	for (int r = 0; r < 2; r++) {
		l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
		l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
	}
	FA_UNROLL
	for (int d = 0; d < HS / 8; d++)
		FA_UNROLL
		for (int r = 0; r < 2; r++) {
			int row = q0 + g + r * 8;
			if (row < T)
				fa_st(y + ((size_t)b * T + row) * C + h * HS + 8 * d + 2 * t,
				      fa_pack(o[d][2 * r] / l[r], o[d][2 * r + 1] / l[r]));
		}
	if (t == 0)
		FA_UNROLL
		for (int r = 0; r < 2; r++) {
			int row = q0 + g + r * 8;
			if (row < T)
				lse[(size_t)bh * T + row] = m[r] + logf(l[r]);
		}
}

/* dd[(b, h), t] = <dy, y> over the head's channels: the backward's D; one
 * warp a row */
template <int HS>
__global__ void k_flash_bwd_dot(float *dd, const bf16 *dy, const bf16 *y, int B, int T, int NH)
{
	size_t row = (size_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
	int lane = threadIdx.x & 31;
	if (row >= (size_t)B * NH * T)
		return;
	int tt = (int)(row % T), bh = (int)(row / T), b = bh / NH, h = bh % NH;
	size_t at = ((size_t)b * T + tt) * NH * HS + (size_t)h * HS;
	float s = 0;
	for (int i = lane; i < HS; i += 32)
		s += tof(dy[at + i]) * tof(y[at + i]);
	s = warp_sum(s);
	if (lane == 0)
		dd[row] = s;
}

/*
 * The backward for 64 keys of one (b, h): over the query tiles at or after
 * them, P^T = exp(scale k q^T - lse), dV += P^T dO, dP^T = v dO^T, dS^T =
 * P^T (dP^T - D), dK += scale dS^T q; dS goes through shared memory for
 * dQ += scale dS k, added into dq (fp32, (B, NH, T, HS), zeroed before)
 * with atomics. dK and dV are written into dqkv (B, T, 3C).
 */
template <int HS>
__global__ void __launch_bounds__(FA_THREADS)
	k_flash_bwd(bf16 *dqkv, float *dq, const bf16 *qkv, const bf16 *dy, const float *lse,
		    const float *dd, int T, int NH, float scale)
{
	__shared__ __align__(16) bf16 qs[FA_TILE][HS + 8];
	__shared__ __align__(16) bf16 dos[FA_TILE][HS + 8];
	__shared__ __align__(16) bf16 kst[FA_ROWS][HS + 8];
	__shared__ __align__(16) bf16 dss[FA_TILE][FA_ROWS + 8];
	__shared__ float lse_s[FA_TILE], dd_s[FA_TILE];
	int C = NH * HS, bh = blockIdx.y, b = bh / NH, h = bh % NH;
	int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
	int kb0 = blockIdx.x * FA_ROWS, kw0 = kb0 + warp * 16;
	size_t ld = 3 * (size_t)C;
	const bf16 *base = qkv + (size_t)b * T * ld + h * HS;
	const bf16 *dyb = dy + (size_t)b * T * C + h * HS;
	uint32_t ka[HS / 16][4], va[HS / 16][4];
	FA_UNROLL
	for (int s = 0; s < HS / 16; s++) {
		fa_load_a(ka[s], base + C, ld, kw0, 16 * s, T, g, t);
		fa_load_a(va[s], base + 2 * C, ld, kw0, 16 * s, T, g, t);
	}
	for (int i = threadIdx.x; i < FA_ROWS * HS / 2; i += FA_THREADS) {
		int r = i / (HS / 2), c = (i % (HS / 2)) * 2, key = kb0 + r;
		fa_st(&kst[r][c], key < T ? fa_ld(base + (size_t)key * ld + C + c) : 0u);
	}
	float dk[HS / 8][4], dv[HS / 8][4];
	FA_UNROLL
	for (int d = 0; d < HS / 8; d++)
		FA_UNROLL
		for (int e = 0; e < 4; e++)
			dk[d][e] = dv[d][e] = 0;
	for (int q0 = kb0; q0 < T; q0 += FA_TILE) {
		__syncthreads(); /* the last tile's readers are done */
		for (int i = threadIdx.x; i < FA_TILE * HS / 2; i += FA_THREADS) {
			int r = i / (HS / 2), c = (i % (HS / 2)) * 2, q = q0 + r;
			fa_st(&qs[r][c], q < T ? fa_ld(base + (size_t)q * ld + c) : 0u);
			fa_st(&dos[r][c], q < T ? fa_ld(dyb + (size_t)q * C + c) : 0u);
		}
		for (int i = threadIdx.x; i < FA_TILE; i += FA_THREADS) {
			int q = q0 + i;
			lse_s[i] = q < T ? lse[(size_t)bh * T + q] : 0.0f;
			dd_s[i] = q < T ? dd[(size_t)bh * T + q] : 0.0f;
		}
		__syncthreads();
		/* P^T and dP^T, 16 keys x 64 queries a warp */
		float p[FA_TILE / 8][4], ds[FA_TILE / 8][4];
		FA_UNROLL
		for (int j = 0; j < FA_TILE / 8; j++) {
			FA_UNROLL
			for (int e = 0; e < 4; e++)
				p[j][e] = ds[j][e] = 0;
			FA_UNROLL
			for (int s = 0; s < HS / 16; s++) {
				uint32_t qb[2], db[2];
				fa_load_b_nk(qb, &qs[0][0], HS + 8, 16 * s, 8 * j, g, t);
				fa_load_b_nk(db, &dos[0][0], HS + 8, 16 * s, 8 * j, g, t);
				fa_mma(p[j], ka[s], qb);
				fa_mma(ds[j], va[s], db);
			}
			FA_UNROLL
			for (int e = 0; e < 4; e++) {
				int key = kw0 + g + (e >> 1) * 8, qi = 8 * j + 2 * t + (e & 1), q = q0 + qi;
				float pv = q >= key && q < T && key < T
						   ? expf(p[j][e] * scale - lse_s[qi])
						   : 0.0f;
				p[j][e] = pv;
				ds[j][e] = pv * (ds[j][e] - dd_s[qi]);
			}
		}
		/* dV += P^T dO, dK += dS^T q (k = the tile's queries) */
		FA_UNROLL
		for (int s = 0; s < FA_TILE / 16; s++) {
			uint32_t pa[4], sa[4];
			fa_c_to_a(pa, p[2 * s], p[2 * s + 1]);
			fa_c_to_a(sa, ds[2 * s], ds[2 * s + 1]);
			fa_mma_rows<HS>(dv, pa, &dos[0][0], HS + 8, 16 * s, g, t);
			fa_mma_rows<HS>(dk, sa, &qs[0][0], HS + 8, 16 * s, g, t);
		}
		/* dS (queries x keys) for dQ */
		FA_UNROLL
		for (int j = 0; j < FA_TILE / 8; j++)
			FA_UNROLL
			for (int e = 0; e < 4; e++)
				dss[8 * j + 2 * t + (e & 1)][16 * warp + g + (e >> 1) * 8] =
					__float2bfloat16(ds[j][e]);
		__syncthreads();
		/* dQ for this warp's 16 queries of the tile over the block's keys */
		float dqa[HS / 8][4];
		FA_UNROLL
		for (int d = 0; d < HS / 8; d++)
			dqa[d][0] = dqa[d][1] = dqa[d][2] = dqa[d][3] = 0;
		FA_UNROLL
		for (int s = 0; s < FA_ROWS / 16; s++) {
			uint32_t sa[4];
			fa_load_a(sa, &dss[0][0], FA_ROWS + 8, 16 * warp, 16 * s, FA_TILE, g, t);
			fa_mma_rows<HS>(dqa, sa, &kst[0][0], HS + 8, 16 * s, g, t);
		}
		FA_UNROLL
		for (int d = 0; d < HS / 8; d++)
			FA_UNROLL
			for (int e = 0; e < 4; e++) {
				int q = q0 + 16 * warp + g + (e >> 1) * 8, c = 8 * d + 2 * t + (e & 1);
				if (q < T)
					atomicAdd(&dq[((size_t)bh * T + q) * HS + c], scale * dqa[d][e]);
			}
	}
	FA_UNROLL
	for (int d = 0; d < HS / 8; d++)
		FA_UNROLL
		for (int r = 0; r < 2; r++) {
			int key = kw0 + g + r * 8;
			if (key >= T)
				continue;
			bf16 *o = dqkv + ((size_t)b * T + key) * ld + h * HS + 8 * d + 2 * t;
			fa_st(o + C, fa_pack(scale * dk[d][2 * r], scale * dk[d][2 * r + 1]));
			fa_st(o + 2 * C, fa_pack(dv[d][2 * r], dv[d][2 * r + 1]));
		}
}

/* dqkv's q part from the fp32 dq (B, NH, T, HS) */
template <int HS>
__global__ void k_flash_dq(bf16 *dqkv, const float *dq, int B, int T, int NH)
{
	size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
	if (i >= (size_t)B * NH * T * HS)
		return;
	dqkv[gp_bnth_to_btc(i, T, NH, HS, 3 * (size_t)NH * HS)] = __float2bfloat16(dq[i]);
}

#endif
