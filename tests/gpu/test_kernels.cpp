/*
 * test_kernels: every kernel of common/cuda/kernels.cuh executed on the CPU
 * by the emulator of emu.h and held to the plain C reference (model_ops.inc,
 * gp_model_clip_grad, gp_model_adamw, gp_sample), on fresh random inputs
 * whose outputs start as NaN (a kernel that skips an element fails). The
 * products between kernels (cuBLAS's on the GPU) are plain loops here: the
 * GEMM plans are test_model's. This runs where no GPU is; test_gpu holds
 * the same kernels to the reference on a GPU, with the libraries around
 * them.
 *
 * Shapes are chosen against the kernels' structure: rows longer than a
 * warp and not a multiple of 32, a vocabulary under its padding, blocks
 * with more than one warp of rows. fp32 must agree within 1e-5 of the
 * largest reference value (orders differ); bf16 within 1e-2 (norm-wise).
 * The emulator's own reports (a shuffle in divergent code, a shuffle after
 * lanes returned) are checked first, so that a kernel bug of that kind is
 * known to fail the launch. GENPIPE_TEST_SEED repeats a run;
 * GENPIPE_TEST_VERBOSE=1 prints every comparison's error.
 */
#include "emu.h"

#include "kernels.cuh"
#undef GELU_K

#include <algorithm>
#include <cmath>
#include <ctime>

extern "C" {
#include "../check.h"
#include "model.h"
}

#define real float
#define OPS(x) x##_ref
#define GP_OPS_FAST 0
#include "model_ops.inc"
#undef real

static uint64_t rng_state;

static uint32_t rnd()
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return (uint32_t)(rng_state >> 11);
}

/* uniform in [-scale, scale) */
static std::vector<float> randv(size_t n, float scale = 1.0f)
{
	std::vector<float> v(n);
	for (auto &x : v)
		x = scale * ((float)(rnd() & 0xffffff) / 8388608.0f - 1.0f);
	return v;
}

static std::vector<float> nanv(size_t n)
{
	return std::vector<float>(n, NAN);
}

template <typename T> static std::vector<T> to_T(const std::vector<float> &v)
{
	std::vector<T> o(v.size());
	for (size_t i = 0; i < v.size(); i++)
		o[i] = fromf<T>(v[i]);
	return o;
}

template <typename T> static std::vector<float> to_f(const std::vector<T> &v)
{
	std::vector<float> o(v.size());
	for (size_t i = 0; i < v.size(); i++)
		o[i] = tof(v[i]);
	return o;
}

/* fp32: max|got - want| / max|want|; bf16: ||got - want|| / ||want||. NaN
 * or inf in got: inf. */
static double err_of(const float *got, const float *want, size_t n, bool bf)
{
	double num = 0, den = 0;
	for (size_t i = 0; i < n; i++) {
		if (std::isnan(got[i]) || std::isinf(got[i]))
			return INFINITY;
		double d = fabs((double)got[i] - want[i]), w = fabs((double)want[i]);
		if (bf) {
			num += d * d;
			den += w * w;
		} else {
			num = std::max(num, d);
			den = std::max(den, w);
		}
	}
	if (bf) {
		num = sqrt(num);
		den = sqrt(den);
	}
	return den > 0 ? num / den : num;
}

static int close_(const char *what, const std::vector<float> &got, const std::vector<float> &want,
		  bool bf)
{
	if (got.size() != want.size()) {
		fprintf(stderr, "  %s: %zu values, want %zu\n", what, got.size(), want.size());
		return 0;
	}
	double e = err_of(got.data(), want.data(), got.size(), bf);
	double tol = bf ? 1e-2 : 1e-5;
	if (!(e <= tol))
		fprintf(stderr, "  %s: error %.3g over %.0e\n", what, e, tol);
	else if (getenv("GENPIPE_TEST_VERBOSE"))
		printf("  %s: error %.3g (limit %.0e)\n", what, e, tol);
	return e <= tol;
}
#define CLOSE(what, got, want, bf) CHECK(close_(what, got, want, bf))

#define LAUNCH(grid, block, smem, call) CHECK(emu::launch(grid, block, smem, [&] { call; }))

static unsigned nblocks(size_t n, unsigned threads)
{
	return (unsigned)((n + threads - 1) / threads);
}

/* ---- the emulator's own reports ---- */

static void k_test_reduce(float *out)
{
	float s = block_reduce((float)threadIdx.x, false);
	float m = block_reduce((float)(threadIdx.x % 100), true);
	out[threadIdx.x] = s + 1000000.0f * m;
}

static void k_test_divergent_shuffle(float *out)
{
	float v = (float)threadIdx.x;
	if ((threadIdx.x & 31) < 16)
		v = __shfl_xor_sync(0xffffffffu, v, 1);
	else
		__syncthreads();
	out[threadIdx.x] = v;
}

static void k_test_shuffle_after_return(float *out)
{
	if ((threadIdx.x & 31) >= 16)
		return;
	out[threadIdx.x] = warp_sum(1.0f);
}

static void k_test_cub_reduce(int *out)
{
	typedef cub::BlockReduce<int, 64> red;
	__shared__ typename red::TempStorage tmp;
	out[threadIdx.x] = red(tmp).Sum((int)threadIdx.x + 1);
}

static void test_emulator()
{
	std::vector<float> out = nanv(96);
	LAUNCH(1, 96, 0, k_test_reduce(out.data()));
	int ok = 1;
	for (float x : out) /* sum 0..95, max 95 */
		ok &= x == 4560.0f + 1000000.0f * 95.0f;
	CHECK(ok);
	fprintf(stderr, "  (two emulator failures are expected next)\n");
	CHECK(!emu::launch(1, 64, 0, [&] { k_test_divergent_shuffle(out.data()); }));
	CHECK(strstr(emu::s.failure, "no thread can go on") != NULL);
	CHECK(!emu::launch(1, 64, 0, [&] { k_test_shuffle_after_return(out.data()); }));
	CHECK(strstr(emu::s.failure, "lanes that returned") != NULL);
	std::vector<int> r(64, -1);
	LAUNCH(1, 64, 0, k_test_cub_reduce(r.data()));
	CHECK(r[0] == 64 * 65 / 2);
	CHECK(r[1] == 2); /* CUB defines thread 0's result only */
	printf("  emulator: reductions, a divergent shuffle and a shuffle after return reported\n");
}

/* ---- the training kernels ---- */

static void test_encoder()
{
	const int B = 2, T = 9, C = 40, V = 23;
	std::vector<uint16_t> inp(B * T);
	for (auto &t : inp)
		t = (uint16_t)(rnd() % V);
	auto wte = randv((size_t)V * C), wpe = randv((size_t)T * C);
	std::vector<float> want((size_t)B * T * C), got = nanv((size_t)B * T * C);
	encoder_forward_ref(want.data(), inp.data(), wte.data(), wpe.data(), B, T, C);
	LAUNCH(nblocks(got.size(), 64), 64, 0,
	       k_encoder_fwd<float>(got.data(), inp.data(), wte.data(), wpe.data(), B * T, T, C));
	CLOSE("encoder forward", got, want, false);
	auto dout = randv((size_t)B * T * C);
	std::vector<float> dwte((size_t)V * C, 0), dwpe((size_t)T * C, 0), gwte = dwte, gwpe = dwpe;
	encoder_backward_ref(dwte.data(), dwpe.data(), dout.data(), inp.data(), B, T, C);
	LAUNCH(nblocks(dout.size(), 64), 64, 0,
	       k_encoder_bwd<float>(gwte.data(), gwpe.data(), dout.data(), inp.data(), B * T, T, C));
	CLOSE("encoder backward (wte)", gwte, dwte, false);
	CLOSE("encoder backward (wpe)", gwpe, dwpe, false);
}

template <typename T> static void test_layernorm(bool bf)
{
	const int N = 11, C = 70; /* rows over several blocks of 2 warps; C not a multiple of 32 */
	auto x = randv((size_t)N * C, 2.0f), w = randv(C), b = randv(C);
	if (bf) { /* the reference sees the values the kernel sees */
		x = to_f(to_T<T>(x));
		w = to_f(to_T<T>(w));
		b = to_f(to_T<T>(b));
	}
	std::vector<float> out((size_t)N * C), mean(N), rstd(N);
	layernorm_forward_ref(out.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), N,
			      C);
	auto xT = to_T<T>(x), wT = to_T<T>(w), bT = to_T<T>(b);
	auto oT = to_T<T>(nanv(out.size()));
	std::vector<float> gm = nanv(N), gr = nanv(N);
	LAUNCH(nblocks((size_t)N * 32, 64), 64, 0,
	       k_layernorm_fwd<T>(oT.data(), gm.data(), gr.data(), xT.data(), wT.data(), bT.data(),
				  N, C));
	CLOSE(bf ? "layernorm forward (bf16)" : "layernorm forward", to_f(oT), out, bf);
	CLOSE("layernorm mean", gm, mean, bf);
	CLOSE("layernorm rstd", gr, rstd, bf);
	/* the residual add fused in front: res = x + y (in T), then the norm
	 * of res; in place (res = x) too, as the decoder runs it */
	auto y = randv((size_t)N * C);
	if (bf)
		y = to_f(to_T<T>(y));
	std::vector<float> res((size_t)N * C), rout((size_t)N * C), rmean(N), rrstd(N);
	residual_forward_ref(res.data(), x.data(), y.data(), res.size());
	if (bf)
		res = to_f(to_T<T>(res));
	layernorm_forward_ref(rout.data(), rmean.data(), rrstd.data(), res.data(), w.data(),
			      b.data(), N, C);
	for (int inplace = 0; inplace < 2; inplace++) {
		auto yT = to_T<T>(y), aT = xT;
		auto resT = to_T<T>(nanv(res.size())), routT = to_T<T>(nanv(res.size()));
		T *rp = inplace ? aT.data() : resT.data();
		std::fill(gm.begin(), gm.end(), NAN);
		std::fill(gr.begin(), gr.end(), NAN);
		LAUNCH(nblocks((size_t)N * 32, 64), 64, 0,
		       k_residual_layernorm_fwd<T>(rp, routT.data(), gm.data(), gr.data(), aT.data(),
						   yT.data(), wT.data(), bT.data(), N, C));
		CLOSE("residual + layernorm (residual)", to_f(inplace ? aT : resT), res, bf);
		CLOSE("residual + layernorm (output)", to_f(routT), rout, bf);
		CLOSE("residual + layernorm (mean)", gm, rmean, bf);
		CLOSE("residual + layernorm (rstd)", gr, rrstd, bf);
	}
	/* backward: dinp += ..., dw += ..., db += ... */
	auto dout = randv((size_t)N * C);
	if (bf)
		dout = to_f(to_T<T>(dout));
	auto dinp0 = randv((size_t)N * C, 0.5f);
	if (bf)
		dinp0 = to_f(to_T<T>(dinp0));
	std::vector<float> dinp = dinp0, dw(C, 0.25f), db(C, -0.5f);
	layernorm_backward_ref(dinp.data(), dw.data(), db.data(), dout.data(), x.data(), w.data(),
			       mean.data(), rstd.data(), N, C);
	auto dT = to_T<T>(dout), dxT = to_T<T>(dinp0);
	std::vector<float> gdw(C, 0.25f), gdb(C, -0.5f);
	LAUNCH(nblocks((size_t)N * 32, 64), 64, 0,
	       k_layernorm_bwd_x<T>(dxT.data(), dT.data(), xT.data(), wT.data(), mean.data(),
				    rstd.data(), N, C));
	const int chunk = 4; /* three row chunks, the last one short */
	LAUNCH(dim3(nblocks(C, 32), (N + chunk - 1) / chunk), 32, 0,
	       k_layernorm_bwd_wb<T>(gdw.data(), gdb.data(), dT.data(), xT.data(), mean.data(),
				     rstd.data(), N, C, chunk));
	CLOSE("layernorm backward (input)", to_f(dxT), dinp, bf);
	CLOSE("layernorm backward (weight)", gdw, dw, bf);
	CLOSE("layernorm backward (bias)", gdb, db, bf);
}

static void test_pointwise()
{
	const size_t N = 333;
	auto x = randv(N, 3.0f), y = randv(N);
	std::vector<float> want(N), got = nanv(N);
	gelu_forward_ref(want.data(), x.data(), N);
	LAUNCH(nblocks(N, 64), 64, 0, k_gelu_fwd<float>(got.data(), x.data(), N));
	CLOSE("gelu forward", got, want, false);
	auto d = randv(N);
	std::vector<float> dwant(N, 0), dgot = d;
	gelu_backward_ref(dwant.data(), x.data(), d.data(), N);
	LAUNCH(nblocks(N, 64), 64, 0, k_gelu_bwd<float>(dgot.data(), x.data(), N));
	CLOSE("gelu backward", dgot, dwant, false);
	std::fill(got.begin(), got.end(), NAN);
	residual_forward_ref(want.data(), x.data(), y.data(), N);
	LAUNCH(nblocks(N, 64), 64, 0, k_residual<float>(got.data(), x.data(), y.data(), N));
	CLOSE("residual", got, want, false);
	/* bias and the column sum of a matmul's backward */
	const int R = 13, OC = 37;
	auto out = randv((size_t)R * OC), bias = randv(OC);
	std::vector<float> bwant = out;
	for (int r = 0; r < R; r++)
		for (int o = 0; o < OC; o++)
			bwant[(size_t)r * OC + o] += bias[o];
	LAUNCH(nblocks((size_t)R * OC, 64), 64, 0,
	       k_add_bias<float>(out.data(), bias.data(), (size_t)R, OC));
	CLOSE("bias", out, bwant, false);
	const int IC = 3;
	auto dout = randv((size_t)R * OC), inp = randv((size_t)R * IC), w = randv((size_t)OC * IC);
	std::vector<float> dinp((size_t)R * IC, 0), dwm((size_t)OC * IC, 0), dbias(OC, 1.0f);
	matmul_backward_ref(dinp.data(), dwm.data(), dbias.data(), dout.data(), inp.data(), w.data(),
			    R, IC, OC);
	std::vector<float> gb(OC, 1.0f);
	LAUNCH(dim3(nblocks(OC, 32), (R + 5) / 6), 32, 0,
	       k_colsum<float>(gb.data(), dout.data(), R, OC, 6));
	CLOSE("bias gradient (column sums)", gb, dbias, false);
}

/* q k^T, att v and their gradients for one (b, h), as the batched GEMMs do */
static void attention_case(int B, int T, int NH, int hs)
{
	const int C = NH * hs;
	const size_t n = (size_t)B * T * C, tt = (size_t)B * NH * T * T;
	auto qkv = randv(n * 3);
	std::vector<float> out(n), preatt(tt), att(tt);
	attention_forward_ref(out.data(), preatt.data(), att.data(), qkv.data(), B, T, C, NH);

	std::vector<float> q = nanv(n), k = nanv(n), v = nanv(n), pre(tt), gatt = nanv(tt),
			   y(n), gout = nanv(n);
	LAUNCH(nblocks(n, 64), 64, 0,
	       k_permute<float>(q.data(), k.data(), v.data(), qkv.data(), B, T, NH, hs));
	float scale = 1.0f / sqrtf((float)hs);
	for (int bh = 0; bh < B * NH; bh++) {
		const float *Q = &q[(size_t)bh * T * hs], *K = &k[(size_t)bh * T * hs];
		for (int t = 0; t < T; t++)
			for (int s = 0; s < T; s++) { /* the whole square, as the GEMM writes it */
				float acc = 0;
				for (int e = 0; e < hs; e++)
					acc += Q[t * hs + e] * K[s * hs + e];
				pre[((size_t)bh * T + t) * T + s] = scale * acc;
			}
	}
	size_t rows = (size_t)B * NH * T;
	LAUNCH(nblocks(rows * 32, 64), 64, 0, k_softmax_causal<float>(gatt.data(), pre.data(), rows, T));
	CLOSE("causal softmax", gatt, att, false);
	for (int bh = 0; bh < B * NH; bh++)
		for (int t = 0; t < T; t++)
			for (int e = 0; e < hs; e++) {
				float acc = 0;
				for (int s = 0; s < T; s++)
					acc += gatt[((size_t)bh * T + t) * T + s] *
					       v[((size_t)bh * T + s) * hs + e];
				y[((size_t)bh * T + t) * hs + e] = acc;
			}
	LAUNCH(nblocks(n, 64), 64, 0, k_unpermute<float>(gout.data(), y.data(), B, T, NH, hs, 0));
	CLOSE("attention output", gout, out, false);

	/* backward */
	auto dout = randv(n);
	std::vector<float> dqkv(3 * n, 0), dpreatt(tt, 0), datt(tt, 0);
	attention_backward_ref(dqkv.data(), dpreatt.data(), datt.data(), dout.data(), qkv.data(),
			       att.data(), B, T, C, NH);
	std::vector<float> dy = nanv(n), da(tt), dq(n), dk(n), dv(n), gdqkv = nanv(3 * n);
	LAUNCH(nblocks(n, 64), 64, 0, k_unpermute<float>(dy.data(), dout.data(), B, T, NH, hs, 1));
	for (int bh = 0; bh < B * NH; bh++) {
		const float *A = &gatt[(size_t)bh * T * T], *V = &v[(size_t)bh * T * hs],
			    *DY = &dy[(size_t)bh * T * hs];
		for (int t = 0; t < T; t++)
			for (int s = 0; s < T; s++) {
				float acc = 0;
				for (int e = 0; e < hs; e++)
					acc += DY[t * hs + e] * V[s * hs + e];
				da[((size_t)bh * T + t) * T + s] = acc;
			}
		for (int s = 0; s < T; s++)
			for (int e = 0; e < hs; e++) {
				float acc = 0;
				for (int t = 0; t < T; t++)
					acc += A[t * T + s] * DY[t * hs + e];
				dv[((size_t)bh * T + s) * hs + e] = acc;
			}
	}
	LAUNCH(nblocks(rows * 32, 64), 64, 0,
	       k_softmax_causal_bwd<float>(da.data(), gatt.data(), rows, T, scale));
	CLOSE("causal softmax backward", da, dpreatt, false);
	for (int bh = 0; bh < B * NH; bh++) {
		const float *D = &da[(size_t)bh * T * T], *Q = &q[(size_t)bh * T * hs],
			    *K = &k[(size_t)bh * T * hs];
		for (int t = 0; t < T; t++)
			for (int e = 0; e < hs; e++) {
				float a1 = 0, a2 = 0;
				for (int s = 0; s < T; s++) {
					a1 += D[t * T + s] * K[s * hs + e];
					a2 += D[s * T + t] * Q[s * hs + e];
				}
				dq[((size_t)bh * T + t) * hs + e] = a1;
				dk[((size_t)bh * T + t) * hs + e] = a2;
			}
	}
	LAUNCH(nblocks(n, 64), 64, 0,
	       k_permute_bwd<float>(gdqkv.data(), dq.data(), dk.data(), dv.data(), B, T, NH, hs));
	CLOSE("attention backward (dqkv)", gdqkv, dqkv, false);
}

static void test_attention()
{
	attention_case(2, 7, 3, 4);  /* rows shorter than a warp */
	attention_case(1, 37, 2, 8); /* rows longer than a warp */
}

/* flash attention (bf16, tensor cores) against the reference on the same
 * bf16-rounded inputs: output, log-sum-exp, and the whole dqkv */
template <int HS> static void flash_case(int B, int T, int NH)
{
	const int C = NH * HS;
	const size_t n = (size_t)B * T * C, tt = (size_t)B * NH * T * T;
	auto qkv = to_f(to_T<bf16>(randv(n * 3)));
	std::vector<float> out(n), preatt(tt), att(tt);
	attention_forward_ref(out.data(), preatt.data(), att.data(), qkv.data(), B, T, C, NH);
	std::vector<float> lse_want((size_t)B * NH * T);
	for (size_t r = 0; r < lse_want.size(); r++) {
		int t = (int)(r % T);
		const float *pr = &preatt[r * T];
		double mx = -INFINITY, sum = 0;
		for (int s = 0; s <= t; s++)
			mx = std::max(mx, (double)pr[s]);
		for (int s = 0; s <= t; s++)
			sum += exp(pr[s] - mx);
		lse_want[r] = (float)(mx + log(sum));
	}
	auto qkvT = to_T<bf16>(qkv);
	auto y = to_T<bf16>(nanv(n));
	std::vector<float> lse = nanv(lse_want.size());
	float scale = 1.0f / sqrtf((float)HS);
	dim3 grid((unsigned)((T + FA_ROWS - 1) / FA_ROWS), (unsigned)(B * NH));
	LAUNCH(grid, FA_THREADS, 0, k_flash_fwd<HS>(y.data(), lse.data(), qkvT.data(), T, NH, scale));
	char what[96];
	snprintf(what, sizeof what, "flash attention output (hs %d, T %d)", HS, T);
	CLOSE(what, to_f(y), out, true);
	CLOSE("flash attention log-sum-exp", lse, lse_want, true);

	auto dout = to_f(to_T<bf16>(randv(n)));
	std::vector<float> dqkv(3 * n, 0), dpreatt(tt, 0), datt(tt, 0);
	attention_backward_ref(dqkv.data(), dpreatt.data(), datt.data(), dout.data(), qkv.data(),
			       att.data(), B, T, C, NH);
	auto dyT = to_T<bf16>(dout), gdqkv = to_T<bf16>(nanv(3 * n));
	std::vector<float> dd = nanv(lse.size()), dq((size_t)B * NH * T * HS, 0.0f);
	LAUNCH(nblocks(lse.size() * 32, 64), 64, 0,
	       k_flash_bwd_dot<HS>(dd.data(), dyT.data(), y.data(), B, T, NH));
	LAUNCH(grid, FA_THREADS, 0,
	       k_flash_bwd<HS>(gdqkv.data(), dq.data(), qkvT.data(), dyT.data(), lse.data(),
			       dd.data(), T, NH, scale));
	LAUNCH(nblocks(dq.size(), 64), 64, 0, k_flash_dq<HS>(gdqkv.data(), dq.data(), B, T, NH));
	snprintf(what, sizeof what, "flash attention backward (hs %d, T %d)", HS, T);
	CLOSE(what, to_f(gdqkv), dqkv, true);
	/* and each of q, k, v apart: one of them all wrong would hide in the norm */
	for (int part = 0; part < 3; part++) {
		std::vector<float> got, want;
		for (size_t r = 0; r < (size_t)B * T; r++)
			for (int c = 0; c < C; c++) {
				got.push_back(tof(gdqkv[r * 3 * C + (size_t)part * C + (size_t)c]));
				want.push_back(dqkv[r * 3 * C + (size_t)part * C + (size_t)c]);
			}
		CLOSE(part == 0 ? "flash dq" : part == 1 ? "flash dk" : "flash dv", got, want, true);
	}
}

static void test_flash()
{
	CHECK(fa_supported(64) && fa_supported(16) && !fa_supported(48) && !fa_supported(128));
	flash_case<16>(2, 37, 2); /* one tile, rows past T in it */
	flash_case<64>(1, 130, 2); /* three tiles, the last one short */
	flash_case<32>(1, 64, 1);  /* exactly one tile */
}

static void test_crossentropy()
{
	const int N = 5, V = 613, Vp = 640; /* over one pass of 512 threads */
	auto logits = randv((size_t)N * Vp, 4.0f);
	std::vector<uint16_t> tg(N);
	for (auto &t : tg)
		t = (uint16_t)(rnd() % V);
	tg[0] = (uint16_t)(V - 1);
	std::vector<float> probs((size_t)N * Vp), losses(N), glosses = nanv(N);
	softmax_forward_ref(probs.data(), logits.data(), N, V, Vp);
	crossentropy_forward_ref(losses.data(), probs.data(), tg.data(), N, Vp);
	LAUNCH(N, 512, 0,
	       k_crossentropy_fwd<float>(glosses.data(), logits.data(), tg.data(), V, Vp));
	CLOSE("cross-entropy", glosses, losses, false);
	float mean = NAN, want = 0;
	for (float l : losses)
		want += l;
	want /= N;
	LAUNCH(1, 1024, 0, k_mean(&mean, glosses.data(), N));
	CHECK(fabsf(mean - want) <= 1e-5f * fabsf(want));
	std::vector<float> dl((size_t)N * Vp, 0.0f), g = logits;
	crossentropy_softmax_backward_ref(dl.data(), probs.data(), tg.data(), 1.0f / N, N, V, Vp);
	LAUNCH(N, 512, 0, k_crossentropy_bwd<float>(g.data(), tg.data(), 1.0f / N, V, Vp));
	CLOSE("cross-entropy backward", g, dl, false); /* padding: 0 in both */
}

static void test_optimizer()
{
	const struct gp_model_config c = { 29, 32, 8, 1, 2, 8 };
	struct gp_model *m = NULL;
	struct gp_err e = {};
	REQUIRE_OK(gp_model_create(&m, &c, &e), e);
	gp_model_init(m, rnd());
	/* the gradients exist after a first backward; then they are replaced */
	uint16_t toks[4] = { 1, 2, 3, 4 };
	float loss = 0;
	REQUIRE_OK(gp_model_forward(m, toks, toks, 1, 4, &loss, &e), e);
	REQUIRE_OK(gp_model_backward(m, &e), e);
	size_t n = gp_model_num_params(m);
	auto grads = randv(n, 0.1f), mom = randv(n, 0.01f), vel = randv(n, 0.01f);
	for (auto &x : vel)
		x = fabsf(x);
	std::vector<float> p(gp_model_params(m), gp_model_params(m) + n);
	std::vector<float> gm = mom, gv = vel, gp = p, gg = grads;
	memcpy(gp_model_grads(m), grads.data(), n * sizeof(float));
	const float max_norm = 0.5f;
	float norm = gp_model_clip_grad(m, max_norm);
	struct gp_adamw o = { 1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f };
	const long step = 3;
	gp_model_adamw(m, mom.data(), vel.data(), &o, step);

	double sumsq = 0;
	float gnorm = NAN, gscale = NAN;
	LAUNCH(4, 64, 0, k_sumsq(&sumsq, gg.data(), n)); /* grid-stride: any grid */
	LAUNCH(1, 1, 0, k_clip_scale(&gnorm, &gscale, &sumsq, max_norm));
	CHECK(fabsf(gnorm - norm) <= 1e-6f * norm);
	CHECK(norm > max_norm && fabsf(gscale - max_norm / norm) <= 1e-6f);
	float b1c = 1.0f - powf(o.beta1, (float)step), b2c = 1.0f - powf(o.beta2, (float)step);
	std::vector<bf16> wT(n);
	size_t sizes[GP_P_COUNT], off = 0;
	gp_model_param_sizes(&c, sizes);
	for (int t = 0; t < GP_P_COUNT; t++) {
		float wd = gp_model_param_decays(t) ? o.weight_decay : 0.0f;
		LAUNCH(nblocks(sizes[t], 64), 64, 0,
		       k_adamw(gp.data() + off, gg.data() + off, gm.data() + off, gv.data() + off,
			       wT.data() + off, sizes[t], o.lr, o.beta1, o.beta2, o.eps, wd, b1c,
			       b2c, &gscale));
		off += sizes[t];
	}
	std::vector<float> want(gp_model_params(m), gp_model_params(m) + n);
	CLOSE("AdamW parameters", gp, want, false);
	CLOSE("AdamW first moment", gm, mom, false);
	CLOSE("AdamW second moment", gv, vel, false);
	CHECK(std::all_of(gg.begin(), gg.end(), [](float x) { return x == 0.0f; }));
	CLOSE("AdamW bf16 copy", to_f(wT), want, true);
	gp_model_destroy(m);
}

/* ---- generation ---- */

static void decode_case(int NH, int hs)
{
	/* two slots of a KV cache; every position of both in one step (as a
	 * prefill), attention per row over its slot's positions 0..pos */
	const int B = 2, T = 37, C = NH * hs, L = 2, l = 1, ctx = 40, V = 19;
	const size_t n = (size_t)B * T;
	auto qkv = randv(n * 3 * C);
	std::vector<float> out(n * C), preatt((size_t)B * NH * T * T), att(preatt.size());
	attention_forward_ref(out.data(), preatt.data(), att.data(), qkv.data(), B, T, C, NH);
	std::vector<row_info> rows(n);
	std::vector<uint16_t> toks(n);
	for (int b = 0; b < B; b++)
		for (int t = 0; t < T; t++) {
			/* slot 1 holds sequence 0 and slot 0 sequence 1: slots are not rows */
			toks[b * T + t] = (uint16_t)(rnd() % V);
			rows[b * T + t] = row_info{ 1 - b, t, toks[b * T + t], 0 };
		}
	std::vector<float> kc = nanv((size_t)2 * L * ctx * C), vc = kc, y = nanv(n * C);
	LAUNCH(nblocks(n * C, 64), 64, 0,
	       k_kv_write<float>(kc.data(), vc.data(), qkv.data(), rows.data(), (int)n, l, L, ctx,
				 C));
	LAUNCH(dim3((unsigned)n, NH), DECODE_THREADS, decode_attn_smem(ctx, hs),
	       k_decode_attn<float>(y.data(), qkv.data(), kc.data(), vc.data(), rows.data(), l, L,
				    ctx, C, NH));
	CLOSE("decode attention over the KV cache", y, out, false);
	/* embedding of the rows */
	auto wte = randv((size_t)V * C), wpe = randv((size_t)ctx * C);
	std::vector<float> ewant(n * C), egot = nanv(n * C);
	encoder_forward_ref(ewant.data(), toks.data(), wte.data(), wpe.data(), B, T, C);
	LAUNCH(nblocks(n * C, 64), 64, 0,
	       k_embed_rows<float>(egot.data(), rows.data(), wte.data(), wpe.data(), (int)n, C));
	CLOSE("row embedding", egot, ewant, false);
}

static void test_decode()
{
	decode_case(3, 4);  /* a head narrower than a warp */
	decode_case(2, 40); /* wider than a warp, not a multiple of it */
}

/* CUB's radix key of a float: unsigned order of the keys is the floats'
 * order, with NaN (positive) above every number, as the GPU would sort an
 * unwritten (NaN-poisoned) probability. */
static uint32_t radix_key(float f)
{
	uint32_t b;
	memcpy(&b, &f, sizeof b);
	return (b & 0x80000000u) ? ~b : b | 0x80000000u;
}

/* The order CUB's stable radix sort (descending) gives a segment: key
 * descending, ties by position. */
static void sort_segments(float *sprobs, int *sidx, const float *probs, const int *idx,
			  const int *seg_begin, const int *seg_end, int n)
{
	for (int r = 0; r < n; r++) {
		int b = seg_begin[r], e = seg_end[r];
		std::vector<int> ord((size_t)(e - b));
		for (int i = 0; i < e - b; i++)
			ord[(size_t)i] = b + i;
		std::stable_sort(ord.begin(), ord.end(),
				 [&](int x, int y) { return radix_key(probs[x]) > radix_key(probs[y]); });
		for (int i = 0; i < e - b; i++) {
			sprobs[b + i] = probs[ord[(size_t)i]];
			sidx[b + i] = idx[ord[(size_t)i]];
		}
	}
}

static void test_sampling()
{
	const int Vm = 300, Vp = 320, R = 6;
	const struct gp_sample_opts opts[R] = {
		{ 0, 0, 0, 0 },		{ 1.0f, 0, 0, 0 },	   { 0.05f, 5, 0, 0 },
		{ 0.1f, 0, 0.9f, 0 },	{ 0.08f, 20, 0.8f, 0 }, { 0.5f, 0, 0.5f, 0 },
	};
	const int vocab[R] = { Vm, Vm, Vm, Vm - 3, Vm, Vm - 10 };
	uint64_t rng_dev[R], rng_cpu[R];
	for (int r = 0; r < R; r++)
		rng_dev[r] = rng_cpu[r] = ((uint64_t)rnd() << 32) | rnd();
	std::vector<float> sp(Vm);
	std::vector<int> si(Vm);
	int total = 0, same = 0;
	for (int round = 0; round < 8; round++) {
		/* R rows that want a token and one that does not */
		const int n = R + 1;
		auto logits = randv((size_t)n * Vp, 3.0f);
		if (round == 0) /* a tie for the largest logit: the first wins */
			for (int r = 0; r < n; r++)
				logits[(size_t)r * Vp + 7] = logits[(size_t)r * Vp + 3] = 5.0f;
		std::vector<gp_gpu_pick> picks(n);
		for (int r = 0; r < R; r++)
			picks[r] = gp_gpu_pick{ 1,	      vocab[r],	      opts[r].temperature,
						opts[r].top_k, opts[r].top_p,
						opts[r].temperature > 0 ? gp_sample_draw(&rng_dev[r])
									: 0.0 };
		picks[R] = gp_gpu_pick{ 0, Vm, 1.0f, 0, 0, 0.5 };
		std::vector<float> probs = nanv((size_t)n * Vp), sprobs = nanv((size_t)n * Vp);
		std::vector<int> idx((size_t)n * Vp, -1), sidx((size_t)n * Vp, -1), best(n, -1),
			sb(n, -1), se(n, -1), next(n, -1), greedy(n, -1);
		LAUNCH(n, SAMPLE_THREADS, 0,
		       k_probs(probs.data(), idx.data(), best.data(), sb.data(), se.data(),
			       logits.data(), picks.data(), Vm, Vp));
		sort_segments(sprobs.data(), sidx.data(), probs.data(), idx.data(), sb.data(),
			      se.data(), n);
		LAUNCH(n, SAMPLE_THREADS, 0,
		       k_pick(next.data(), probs.data(), sprobs.data(), sidx.data(), best.data(),
			      picks.data(), Vp));
		LAUNCH(n, 256, 0, k_argmax(greedy.data(), logits.data(), Vm, Vp));
		for (int r = 0; r < R; r++) {
			int want = gp_sample(&logits[(size_t)r * Vp], vocab[r], &opts[r], &rng_cpu[r],
					     sp.data(), si.data());
			total++;
			same += next[r] == want;
			if (next[r] != want)
				fprintf(stderr, "  round %d row %d: kernels drew %d, gp_sample %d\n",
					round, r, next[r], want);
			int g = gp_sample(&logits[(size_t)r * Vp], Vm, &opts[0], &rng_cpu[r], NULL,
					  NULL);
			CHECK(greedy[r] == g);
			if (round == 0)
				CHECK(g == 3);
		}
		CHECK(next[R] == 0);	      /* a row that wants no token */
		CHECK(sb[R] == se[R]);	      /* and is not sorted */
		CHECK(sb[1] == se[1]);	      /* temperature alone: no sort */
		CHECK(se[2] - sb[2] == Vm);   /* top-k: the model's vocabulary sorted */
	}
	CHECK(same == total);
	printf("  sampling kernels: %d of %d draws as gp_sample's\n", same, total);

	/* Exact sums: four tokens of probability 1/4 (the rest underflow to
	 * 0). top_p 0.5 is reached exactly by two of them (reaching counts:
	 * the nucleus is {5, 9}); the draw's threshold u * 0.5 is then met
	 * exactly by the first at u = 0.5 (it must be exceeded: token 9). */
	const int tied[4] = { 5, 9, 11, 20 };
	const double us[3] = { 0.5, 0.7, 0.49 };
	const int expect[3] = { 9, 9, 5 };
	for (int c = 0; c < 3; c++) {
		std::vector<float> logits((size_t)Vp, -1000.0f);
		for (int t : tied)
			logits[(size_t)t] = 2.0f;
		gp_gpu_pick pk = { 1, Vm, 1.0f, 0, 0.5f, us[c] };
		std::vector<float> probs = nanv((size_t)Vp), sprobs = nanv((size_t)Vp);
		std::vector<int> idx((size_t)Vp, -1), sidx((size_t)Vp, -1);
		int best = -1, sb = -1, se = -1, next = -1;
		LAUNCH(1, SAMPLE_THREADS, 0,
		       k_probs(probs.data(), idx.data(), &best, &sb, &se, logits.data(), &pk, Vm, Vp));
		sort_segments(sprobs.data(), sidx.data(), probs.data(), idx.data(), &sb, &se, 1);
		LAUNCH(1, SAMPLE_THREADS, 0,
		       k_pick(&next, probs.data(), sprobs.data(), sidx.data(), &best, &pk, Vp));
		CHECK(probs[9] == 0.25f && probs[0] == 0.0f);
		if (next != expect[c])
			fprintf(stderr, "  exact sums, u %.2f: token %d, want %d\n", us[c], next,
				expect[c]);
		CHECK(next == expect[c]);
	}
}

int main()
{
	const char *seed = getenv("GENPIPE_TEST_SEED");
	rng_state = seed ? strtoull(seed, NULL, 10) : (uint64_t)time(NULL) * 2654435761u + 1;
	if (!rng_state)
		rng_state = 1;
	printf("test_kernels: GENPIPE_TEST_SEED=%llu\n", (unsigned long long)rng_state);
	test_emulator();
	test_encoder();
	test_layernorm<float>(false);
	test_layernorm<bf16>(true);
	test_pointwise();
	test_attention();
	test_flash();
	test_crossentropy();
	test_optimizer();
	test_decode();
	test_sampling();
	printf("test_kernels: %ld fiber switches\n", emu::s.switches);
	return CHECK_RESULT();
}
