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

/* One warp per row; two passes over the row as the reference does. */
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
	float m = warp_sum(s) / C;
	float v = 0;
	for (int i = lane; i < C; i += 32) {
		float d = tof(x[i]) - m;
		v += d * d;
	}
	v = warp_sum(v) / C;
	float r = rsqrtf(v + 1e-5f);
	T *o = out + (size_t)row * C;
	for (int i = lane; i < C; i += 32)
		o[i] = fromf<T>((tof(x[i]) - m) * r * tof(w[i]) + tof(b[i]));
	if (lane == 0) {
		mean[row] = m;
		rstd[row] = r;
	}
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
	float m = warp_sum(s) / C;
	float v = 0;
	for (int i = lane; i < C; i += 32) {
		float d = tof(x[i]) - m;
		v += d * d;
	}
	v = warp_sum(v) / C;
	float r = rsqrtf(v + 1e-5f);
	T *o = out + off;
	for (int i = lane; i < C; i += 32)
		o[i] = fromf<T>((tof(x[i]) - m) * r * tof(w[i]) + tof(bias[i]));
	if (lane == 0) {
		mean[row] = m;
		rstd[row] = r;
	}
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

/* One block per (row, head): scores over positions 0..pos of the row's
 * slot (in shared memory), softmax, weighted sum of values. */
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
	float inv = 1.0f / s;
	for (int i = threadIdx.x; i < hs; i += blockDim.x) {
		float acc = 0;
		for (int p = 0; p <= pos; p++)
			acc += sc[p] * inv * tof(vc[base + (size_t)p * C + i]);
		y[(size_t)r * C + (size_t)h * hs + i] = fromf<T>(acc);
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

#endif
