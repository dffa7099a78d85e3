/*
 * emu.h: the project's CUDA kernels (common/cuda/kernels.cuh) run on the
 * CPU, thread by thread, so that their indexing, masking, reductions and
 * cooperation are executed and held to the CPU reference on machines
 * without a GPU. It is a test tool, not a GPU: it says nothing about
 * speed, the hardware's rounding (rsqrtf, expf) or memory ordering beyond
 * what the barriers give.
 *
 * Model: a launch runs its blocks one after another. Each thread of a
 * block is a fiber (ucontext) on the calling thread; a fiber runs until it
 * reaches a barrier (__syncthreads, or a warp shuffle, which is two warp
 * barriers around an exchange through a per-warp slot) or returns. The
 * scheduler releases a block barrier when every thread still running is at
 * it, and a warp barrier when every lane of the warp is. What real
 * hardware would hang on or leave undefined is reported as a failure of
 * the launch, with the block and the threads' states:
 *   - __syncthreads reached by some threads while others wait in a shuffle
 *     (a barrier in divergent code),
 *   - a shuffle whose warp has lanes that already returned (the full mask
 *     names them).
 * cub::BlockReduce gives its result to thread 0 only, as CUB documents:
 * the other threads get their own input back, so a kernel that reads the
 * result elsewhere is caught. __shared__ variables are statics, so one
 * block's values stay for the next (on a GPU they are undefined): the
 * dynamic shared memory, at least, is filled with NaN bytes per block.
 *
 * test_kernels is built with AddressSanitizer, and the stack switches are
 * announced to it, so a kernel's read or write outside its buffers fails
 * the test as it would corrupt memory on a GPU.
 *
 * Include this first, then kernels.cuh, in one C++ translation unit.
 */
#ifndef GP_EMU_H
#define GP_EMU_H

#define GP_CUDA_EMU 1

#include <cuda_bf16.h> /* host conversions of __nv_bfloat16; dim3, uint3 */

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <functional>
#include <vector>

/* Under AddressSanitizer (how test_kernels is built) each switch between
 * stacks is announced, so that ASan checks the kernels' memory accesses
 * with the right stack in view. */
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

#undef __shared__
#define __shared__ static
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __forceinline__
#define __forceinline__ inline
#undef __launch_bounds__
#define __launch_bounds__(...)
#define GP_DYN_SHARED(type, name) type *name = (type *)emu::dyn_smem()

#define threadIdx (emu::s.thread_idx)
#define blockIdx (emu::s.block_idx)
#define blockDim (emu::s.block_dim)
#define gridDim (emu::s.grid_dim)

namespace emu {

enum { RUNNING, AT_BLOCK, AT_WARP, DONE };
enum { MAX_THREADS = 1024, STACK_BYTES = 64 << 10 };

struct fiber {
	ucontext_t ctx;
	int state;
	uint3 tid;
	char *stack;
};

struct state {
	uint3 thread_idx, block_idx, block_dim, grid_dim;
	ucontext_t sched;
	std::vector<fiber> fibers;
	int cur;
	const std::function<void()> *body;
	std::vector<unsigned char> dyn;
	uint64_t slot[MAX_THREADS]; /* shuffle exchange, by linear thread id */
	char failure[512];
	long switches;
	const void *sched_bottom; /* the scheduler's stack, as ASan saw it */
	size_t sched_size;
	~state()
	{
		for (fiber &f : fibers)
			free(f.stack);
	}
};
inline state s;

/* a fiber leaves its stack for the scheduler's (dying: its last switch) */
inline void to_scheduler(bool dying)
{
#if EMU_ASAN
	void *fake = NULL;
	__sanitizer_start_switch_fiber(dying ? NULL : &fake, s.sched_bottom, s.sched_size);
	(void)fake;
#else
	(void)dying;
#endif
}

/* a fiber is back on its own stack */
inline void in_fiber()
{
#if EMU_ASAN
	__sanitizer_finish_switch_fiber(NULL, &s.sched_bottom, &s.sched_size);
#endif
}

inline void *dyn_smem()
{
	return s.dyn.data();
}

inline unsigned linear(uint3 t)
{
	return t.x + s.block_dim.x * (t.y + s.block_dim.y * t.z);
}

inline void wait(int kind)
{
	fiber &f = s.fibers[(size_t)s.cur];
	f.state = kind;
	s.switches++;
	to_scheduler(false);
	swapcontext(&f.ctx, &s.sched);
	in_fiber();
}

inline void fiber_main()
{
	in_fiber();
	(*s.body)();
	s.fibers[(size_t)s.cur].state = DONE;
	to_scheduler(true); /* uc_link returns to the scheduler */
}

inline const char *state_name(int st)
{
	return st == RUNNING ? "running" : st == AT_BLOCK ? "at __syncthreads" :
	       st == AT_WARP ? "in a shuffle" : "returned";
}

inline void describe_stuck(const char *why)
{
	size_t n = s.fibers.size(), at = 0;
	int len = snprintf(s.failure, sizeof s.failure, "block (%u,%u,%u): %s:", s.block_idx.x,
			   s.block_idx.y, s.block_idx.z, why);
	for (size_t i = 0; i < n && at < 6 && len > 0 && (size_t)len < sizeof s.failure; i++) {
		if (s.fibers[i].state == DONE)
			continue;
		len += snprintf(s.failure + len, sizeof s.failure - (size_t)len, " thread %zu %s;",
				i, state_name(s.fibers[i].state));
		at++;
	}
}

/* One block to the end; false (s.failure says why) when it cannot end. */
inline bool run_block(unsigned n)
{
	if (s.fibers.size() < n)
		s.fibers.resize(n);
	for (unsigned i = 0; i < n; i++) {
		fiber &f = s.fibers[i];
		if (!f.stack && !(f.stack = (char *)malloc(STACK_BYTES))) {
			snprintf(s.failure, sizeof s.failure, "out of memory for fiber stacks");
			return false;
		}
		getcontext(&f.ctx);
		f.ctx.uc_stack.ss_sp = f.stack;
		f.ctx.uc_stack.ss_size = STACK_BYTES;
		f.ctx.uc_link = &s.sched;
		makecontext(&f.ctx, fiber_main, 0);
		f.state = RUNNING;
		f.tid.x = i % s.block_dim.x;
		f.tid.y = (i / s.block_dim.x) % s.block_dim.y;
		f.tid.z = i / (s.block_dim.x * s.block_dim.y);
	}
	for (unsigned i = n; i < s.fibers.size(); i++)
		s.fibers[i].state = DONE;
	unsigned nwarps = (n + 31) / 32;
	for (;;) {
		bool ran = false;
		for (unsigned i = 0; i < n; i++) {
			if (s.fibers[i].state != RUNNING)
				continue;
			s.cur = (int)i;
			s.thread_idx = s.fibers[i].tid;
			s.switches++;
#if EMU_ASAN
			void *fake = NULL;
			__sanitizer_start_switch_fiber(&fake, s.fibers[i].stack, STACK_BYTES);
#endif
			swapcontext(&s.sched, &s.fibers[i].ctx);
#if EMU_ASAN
			__sanitizer_finish_switch_fiber(fake, NULL, NULL);
#endif
			ran = true;
		}
		unsigned live = 0, at_block = 0;
		for (unsigned i = 0; i < n; i++) {
			live += s.fibers[i].state != DONE;
			at_block += s.fibers[i].state == AT_BLOCK;
		}
		if (live == 0)
			return true;
		bool released = false;
		if (at_block == live) {
			for (unsigned i = 0; i < n; i++)
				s.fibers[i].state = RUNNING;
			released = true;
		}
		for (unsigned w = 0; w < nwarps && !released; w++) {
			unsigned lo = w * 32, hi = lo + 32 < n ? lo + 32 : n, waiting = 0, done = 0;
			for (unsigned i = lo; i < hi; i++) {
				waiting += s.fibers[i].state == AT_WARP;
				done += s.fibers[i].state == DONE;
			}
			if (waiting == 0)
				continue;
			if (done) {
				describe_stuck("a shuffle in a warp with lanes that returned");
				return false;
			}
			if (waiting == hi - lo) {
				for (unsigned i = lo; i < hi; i++)
					s.fibers[i].state = RUNNING;
				released = true;
			}
		}
		if (!ran && !released) {
			describe_stuck("no thread can go on (a barrier in divergent code?)");
			return false;
		}
	}
}

/*
 * kernel<<<grid, block, smem>>>(...) is launch(grid, block, smem, [&] {
 * kernel(...); }). Returns false and prints the failure on stderr when a
 * block cannot finish.
 */
inline bool launch(dim3 grid, dim3 block, size_t smem, const std::function<void()> &k)
{
	unsigned n = block.x * block.y * block.z;
	if (n < 1 || n > MAX_THREADS) {
		fprintf(stderr, "emu: block of %u threads (1..%d)\n", n, (int)MAX_THREADS);
		return false;
	}
	s.body = &k;
	s.grid_dim = uint3{ grid.x, grid.y, grid.z };
	s.block_dim = uint3{ block.x, block.y, block.z };
	for (unsigned z = 0; z < grid.z; z++)
		for (unsigned y = 0; y < grid.y; y++)
			for (unsigned x = 0; x < grid.x; x++) {
				s.block_idx = uint3{ x, y, z };
				s.dyn.assign(smem ? smem : 1, 0xff); /* NaN floats */
				if (!run_block(n)) {
					fprintf(stderr, "emu: %s\n", s.failure);
					return false;
				}
			}
	return true;
}

} /* namespace emu */

/* ---- the device functions the kernels use ---- */

inline void __syncthreads()
{
	emu::wait(emu::AT_BLOCK);
}

template <typename V> inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask)
{
	static_assert(sizeof(V) <= sizeof(uint64_t), "shuffle of a wide type");
	(void)mask;
	unsigned t = emu::linear(threadIdx);
	memcpy(&emu::s.slot[t], &v, sizeof v);
	emu::wait(emu::AT_WARP);
	unsigned other = (t & ~31u) | ((t & 31u) ^ (unsigned)lane_mask);
	V r;
	memcpy(&r, &emu::s.slot[other], sizeof r);
	emu::wait(emu::AT_WARP); /* nobody writes its slot again before all have read */
	return r;
}

/*
 * mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, warp-wide: each lane
 * gives its fragments (the PTX ISA's layout: lane = 4 g + t; A regs (g, 2t),
 * (g+8, 2t), (g, 2t+8), (g+8, 2t+8); B regs (k 2t, n g), (k 2t+8, n g); C
 * (g, 2t..2t+1), (g+8, 2t..2t+1); two bf16 a register, lower index low)
 * and gets its part of D = A B + C, summed in fp32 in k order.
 */
inline void emu_mma_m16n8k16_bf16(float *d, const uint32_t *a, const uint32_t *b)
{
	static uint32_t fa[emu::MAX_THREADS][4], fb[emu::MAX_THREADS][2];
	unsigned me = emu::linear(threadIdx), w0 = me & ~31u, lane = me & 31u;
	memcpy(fa[me], a, sizeof fa[me]);
	memcpy(fb[me], b, sizeof fb[me]);
	emu::wait(emu::AT_WARP);
	auto bf = [](uint32_t reg, int hi) {
		uint32_t bits = (hi ? reg >> 16 : reg & 0xffffu) << 16;
		float f;
		memcpy(&f, &bits, sizeof f);
		return f;
	};
	unsigned g = lane >> 2, t = lane & 3;
	float out[4];
	for (int e = 0; e < 4; e++) {
		unsigned row = g + (e >= 2 ? 8 : 0), col = 2 * t + (e & 1);
		float acc = 0;
		for (unsigned k = 0; k < 16; k++) {
			unsigned al = (row & 7) * 4 + (k & 7) / 2, ar = (row >= 8) + 2 * (k >= 8);
			unsigned bl = col * 4 + (k & 7) / 2, br = k >= 8;
			acc += bf(fa[w0 + al][ar], (int)(k & 1)) * bf(fb[w0 + bl][br], (int)(k & 1));
		}
		out[e] = d[e] + acc;
	}
	emu::wait(emu::AT_WARP); /* nobody's fragments change before all have read */
	memcpy(d, out, sizeof out);
}

/* A fiber switches only at barriers: these are atomic as written. */
inline float atomicAdd(float *p, float v)
{
	float o = *p;
	*p = o + v;
	return o;
}
inline double atomicAdd(double *p, double v)
{
	double o = *p;
	*p = o + v;
	return o;
}
inline int atomicMin(int *p, int v)
{
	int o = *p;
	if (v < o)
		*p = v;
	return o;
}
inline int min(int a, int b)
{
	return a < b ? a : b;
}
inline float rsqrtf(float x)
{
	return 1.0f / sqrtf(x);
}

/* ---- the cub block primitives the sampling kernels use ---- */

namespace cub {

template <typename K, typename V> struct KeyValuePair {
	K key;
	V value;
};

template <typename T, int N> struct BlockReduce {
	struct TempStorage {
		T v[N];
	};
	TempStorage &t;
	explicit BlockReduce(TempStorage &ts) : t(ts) {}
	template <typename Op> T Reduce(T x, Op op)
	{
		unsigned i = emu::linear(threadIdx);
		if (blockDim.x * blockDim.y * blockDim.z != (unsigned)N) {
			fprintf(stderr, "emu: BlockReduce<%d> in a block of %u threads\n", N,
				blockDim.x * blockDim.y * blockDim.z);
			abort();
		}
		t.v[i] = x;
		__syncthreads();
		T r = x; /* CUB: only thread 0's result is defined */
		if (i == 0)
			for (int j = 1; j < N; j++)
				r = op(r, t.v[j]);
		__syncthreads();
		return r;
	}
	T Sum(T x)
	{
		return Reduce(x, [](const T &a, const T &b) { return a + b; });
	}
};

template <typename T, int N> struct BlockScan {
	struct TempStorage {
		T v[N];
	};
	TempStorage &t;
	explicit BlockScan(TempStorage &ts) : t(ts) {}
	void InclusiveSum(T x, T &incl, T &aggregate)
	{
		unsigned i = emu::linear(threadIdx);
		t.v[i] = x;
		__syncthreads();
		T run = T(), all = T();
		for (int j = 0; j < N; j++) {
			all = all + t.v[j];
			if ((unsigned)j == i)
				run = all;
		}
		__syncthreads();
		incl = run;
		aggregate = all;
	}
};

} /* namespace cub */

#endif
