/*
 * gpu_bench: training and generation speed of the CUDA path, beside a
 * PyTorch peer on the same shapes on the same machine in the same run.
 *
 * Shapes:
 *   124m  llm.c's GPT-2 124M: vocab 50257 (padded 50304), context 1024,
 *         12 layers, 12 heads, width 768; training batch 16 x 1024
 *   demo  about 12M parameters: vocab 4096, context 256, 6 layers, 6 heads,
 *         width 384; training batch 64 x 256
 * Training: bf16, one step = zero + forward + backward + clip + AdamW;
 * tokens/s over timed steps after warm-up (flash attention where the head
 * size allows, then the same steps with the GEMM attention beside it), and
 * MFU = 3 x forward matmul and
 * attention FLOPs (gp_model_forward_flops) per second over the device's
 * dense bf16 peak (989 TFLOP/s for H100/H200 SXM; GPU_BENCH_PEAK_TFLOPS
 * overrides). Generation: bf16, a 16-token prompt per sequence, then 128
 * greedy tokens at batch 1 and 32 with the KV cache and graph replay (and
 * the same with top-k/top-p sampling on the device, printed on its own);
 * tokens/s counts generated tokens.
 *
 * The peer: bench/torch_peer.py (eager and torch.compile training, a KV-cache
 * decode loop, Hugging Face generate), run by this program after its own
 * figures, on the same shapes; GPU_BENCH_PEER=0 skips it, GPU_BENCH_PYTHON
 * names the interpreter. Each line of the table: ours, the peer's, ratio.
 *
 * usage: gpu_bench [124m|demo|all] [PEER_SCRIPT]
 * Exit 77 (with the reason) where no GPU is usable.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gpu.h"
#include "model.h"

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

struct shape {
	const char *name;
	struct gp_model_config cfg;
	int B, T, steps;
};

static const struct shape shapes[] = {
	{ "124m", { 50257, 50304, 1024, 12, 12, 768 }, 16, 1024, 20 },
	{ "demo", { 4096, 4096, 256, 6, 6, 384 }, 64, 256, 50 },
};

#define GEN_PROMPT 16
#define GEN_TOKENS 128

struct row {
	char what[64];
	double ours, peer;
	const char *unit;
	char note[96];
};
static struct row rows[64];
static int nrows;

static struct row *add_row(const char *shape, const char *what, double ours, const char *unit)
{
	struct row *r = &rows[nrows++];
	snprintf(r->what, sizeof r->what, "%s %s", shape, what);
	r->ours = ours;
	r->peer = NAN;
	r->unit = unit;
	r->note[0] = 0;
	return r;
}

static uint64_t rs = 88172645463325252ULL;
static uint16_t rtok(int vocab)
{
	rs ^= rs << 13;
	rs ^= rs >> 7;
	rs ^= rs << 17;
	return (uint16_t)(rs % (uint64_t)vocab);
}

static double peak_flops(void)
{
	const char *e = getenv("GPU_BENCH_PEAK_TFLOPS");
	if (e)
		return atof(e) * 1e12;
	char name[256] = "";
	gp_gpu_describe(0, name, sizeof name, NULL);
	if (strstr(name, "H100") || strstr(name, "H200"))
		return 989e12;
	return 0;
}

/* Training tokens/s over s->steps timed steps after three of warm-up (from
 * step number step0); NAN on error (e says why). */
static double time_training(struct gp_gpu_model *g, const struct shape *s, const uint16_t *x,
			    long step0, float *loss0, float *loss, struct gp_err *e)
{
	struct gp_adamw o = { .lr = 3e-4f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f,
			      .weight_decay = 0.1f };
	for (int i = 0; i < 3; i++) /* warm-up: cuBLAS picks its kernels */
		if (gp_gpu_train_step(g, x, x + 1, s->B, s->T, &o, step0 + i, 1.0f, loss0, NULL, e))
			return NAN;
	double t0 = now();
	for (int i = 0; i < s->steps; i++)
		if (gp_gpu_train_step(g, x, x + 1, s->B, s->T, &o, step0 + 3 + i, 1.0f,
				      i == s->steps - 1 ? loss : NULL, NULL, e))
			return NAN;
	return (double)s->B * s->T * s->steps / (now() - t0);
}

static int bench_shape(const struct shape *s, double *train_tps, double *mfu, double gen_tps[2],
		       double *gemm_tps)
{
	struct gp_err e = { 0 };
	struct gp_model *m = NULL;
	if (gp_model_create(&m, &s->cfg, &e)) {
		fprintf(stderr, "%s: %s\n", s->name, e.msg);
		return 1;
	}
	gp_model_init(m, 1);
	struct gp_gpu_model *g = NULL;
	if (gp_gpu_model_create(&g, &s->cfg, GP_GPU_BF16, s->B, s->T, &e) ||
	    gp_gpu_model_upload(g, gp_model_params(m), NULL, NULL, &e)) {
		fprintf(stderr, "%s: %s\n", s->name, e.msg);
		gp_gpu_model_destroy(g);
		gp_model_destroy(m);
		return 1;
	}
	size_t BT = (size_t)s->B * s->T;
	uint16_t *x = malloc((BT + 1) * sizeof *x);
	for (size_t i = 0; i <= BT; i++)
		x[i] = rtok(s->cfg.vocab);
	float loss0 = 0, loss = 0;
	int flash = gp_gpu_model_attention(g) == GP_GPU_ATTN_FLASH;
	double tps = time_training(g, s, x, 1, &loss0, &loss, &e);
	int rc = isnan(tps);
	if (rc) {
		fprintf(stderr, "%s training: %s\n", s->name, e.msg);
	} else {
		*train_tps = tps;
		double pk = peak_flops();
		*mfu = pk > 0 ? 3.0 * gp_model_forward_flops(&s->cfg, s->B, s->T) * tps / BT / pk
			      : NAN;
		printf("%s: %zu parameters, loss %.4f -> %.4f over %d steps, %.1f ms/step, "
		       "%.0f tokens/s (%s attention), GPU memory %.2f GiB\n",
		       s->name, gp_model_num_params(m), loss0, loss, s->steps,
		       BT * 1000.0 / tps, tps, flash ? "flash" : "GEMM",
		       gp_gpu_model_bytes(g) / 1073741824.0);
	}
	/* the same steps with the GEMM attention, for the comparison */
	if (!rc && flash && !gp_gpu_model_set_attention(g, GP_GPU_ATTN_GEMM, &e)) {
		float l0 = 0, l1 = 0;
		*gemm_tps = time_training(g, s, x, 100, &l0, &l1, &e);
		if (isnan(*gemm_tps))
			fprintf(stderr, "%s training (GEMM attention): %s\n", s->name, e.msg);
		else
			printf("%s: with the GEMM attention %.1f ms/step, %.0f tokens/s: flash is "
			       "%.2fx\n",
			       s->name, BT * 1000.0 / *gemm_tps, *gemm_tps, tps / *gemm_tps);
		gp_gpu_model_set_attention(g, GP_GPU_ATTN_FLASH, &e);
	}
	/* generation at batch 1 and 32 */
	for (int bi = 0; bi < 2 && !rc; bi++) {
		int nb = bi ? 32 : 1;
		struct gp_gpu_decoder *d = NULL;
		if (gp_gpu_decoder_create(&d, g, nb, nb * GEN_PROMPT, &e)) {
			fprintf(stderr, "%s decoder: %s\n", s->name, e.msg);
			rc = 1;
			break;
		}
		int slots[32 * GEN_PROMPT];
		uint16_t toks[32 * GEN_PROMPT], next[32 * GEN_PROMPT];
		for (int rep = 0; rep < 2 && !rc; rep++) { /* the first run captures the graphs */
			for (int sl = 0; sl < nb; sl++)
				gp_gpu_decoder_reset(d, sl);
			int n = 0;
			for (int sl = 0; sl < nb; sl++)
				for (int i = 0; i < GEN_PROMPT; i++) {
					slots[n] = sl;
					toks[n++] = rtok(s->cfg.vocab);
				}
			rc = gp_gpu_decoder_greedy(d, slots, toks, n, next, &e) != 0;
			for (int sl = 0; sl < nb; sl++) {
				slots[sl] = sl;
				toks[sl] = next[sl * GEN_PROMPT + GEN_PROMPT - 1];
			}
			double g0 = now();
			for (int t = 0; t < GEN_TOKENS && !rc; t++) {
				rc = gp_gpu_decoder_greedy(d, slots, toks, nb, next, &e) != 0;
				memcpy(toks, next, (size_t)nb * sizeof *toks);
			}
			gen_tps[bi] = (double)nb * GEN_TOKENS / (now() - g0);
		}
		if (rc)
			fprintf(stderr, "%s generation: %s\n", s->name, e.msg);
		else
			printf("%s: generation batch %d: %.0f tokens/s\n", s->name, nb, gen_tps[bi]);
		/* the same decode with a sampled choice (temperature 0.8, top-k 40,
		 * top-p 0.95: the device sorts each row) after a fresh prefill */
		for (int rep = 0; rep < 2 && !rc; rep++) {
			struct gp_gpu_pick picks[32];
			uint64_t rng = 42;
			for (int sl = 0; sl < nb; sl++) {
				gp_gpu_decoder_reset(d, sl);
				slots[sl] = sl;
				toks[sl] = rtok(s->cfg.vocab);
			}
			double g0 = 0;
			for (int t = 0; t < GEN_TOKENS + 1 && !rc; t++) {
				if (t == 1)
					g0 = now(); /* the first step captures the graph */
				for (int sl = 0; sl < nb; sl++)
					picks[sl] = (struct gp_gpu_pick){ .want = 1, .vocab = s->cfg.vocab,
									  .temperature = 0.8f, .top_k = 40,
									  .top_p = 0.95f,
									  .u = gp_sample_draw(&rng) };
				rc = gp_gpu_decoder_sample(d, slots, toks, picks, nb, next, &e) != 0;
				memcpy(toks, next, (size_t)nb * sizeof *toks);
			}
			if (!rc && rep == 1)
				printf("%s: generation batch %d, sampled on the device (top-k 40, top-p "
				       "0.95): %.0f tokens/s\n",
				       s->name, nb, (double)nb * GEN_TOKENS / (now() - g0));
		}
		if (rc)
			fprintf(stderr, "%s sampled generation: %s\n", s->name, e.msg);
		gp_gpu_decoder_destroy(d);
	}
	free(x);
	gp_gpu_model_destroy(g);
	gp_model_destroy(m);
	return rc;
}

/* Run the peer for one shape; fill the rows' peer figures from its
 * "PEER key value" lines. */
static void run_peer(const char *script, const struct shape *s, int first_row)
{
	const char *py = getenv("GPU_BENCH_PYTHON") ? getenv("GPU_BENCH_PYTHON") : "python3";
	char cmd[1024];
	const struct gp_model_config *c = &s->cfg;
	snprintf(cmd, sizeof cmd,
		 "%s %s --vocab %d --padded-vocab %d --context %d --layers %d --heads %d "
		 "--width %d --batch %d --seq %d --steps %d --prompt %d --gen %d 2>&1",
		 py, script, c->vocab, c->padded_vocab, c->context, c->layers, c->heads, c->width,
		 s->B, s->T, s->steps, GEN_PROMPT, GEN_TOKENS);
	printf("peer: %s\n", cmd);
	fflush(stdout);
	FILE *f = popen(cmd, "r");
	if (!f) {
		perror("popen");
		return;
	}
	char line[1024];
	while (fgets(line, sizeof line, f)) {
		char key[64];
		double v;
		if (sscanf(line, "PEER %63s %lf", key, &v) != 2) {
			fputs("  | ", stdout);
			fputs(line, stdout);
			continue;
		}
		/* rows of this shape: train eager, train compile, gen b1 (decode loop),
		 * gen b1 (HF), gen b32 (decode loop), gen b32 (HF) */
		static const char *const keys[] = { "train_eager", "train_compile", "gen1_loop",
						    "gen1_hf",	   "gen32_loop",    "gen32_hf" };
		for (int k = 0; k < 6; k++)
			if (!strcmp(key, keys[k]))
				rows[first_row + k].peer = v;
	}
	int st = pclose(f);
	if (st)
		printf("peer exited with status %d\n", st);
}

int main(int argc, char **argv)
{
	const char *which = argc > 1 ? argv[1] : "all";
	const char *script = argc > 2 ? argv[2] : "bench/torch_peer.py";
	const char *why = NULL;
	if (gp_gpu_available(&why) <= 0) {
		printf("gpu_bench: no GPU: %s\n", why ? why : "?");
		return 77;
	}
	char name[256];
	size_t mem = 0;
	gp_gpu_describe(0, name, sizeof name, &mem);
	printf("gpu_bench on %s, %.0f GiB\n", name, mem / 1073741824.0);
	int fail = 0;
	const char *peer_env = getenv("GPU_BENCH_PEER");
	int peer = !peer_env || strcmp(peer_env, "0");
	for (size_t i = 0; i < sizeof shapes / sizeof *shapes; i++) {
		const struct shape *s = &shapes[i];
		if (strcmp(which, "all") && strcmp(which, s->name))
			continue;
		double tps = NAN, mfu = NAN, gen[2] = { NAN, NAN }, gemm = NAN;
		fail |= bench_shape(s, &tps, &mfu, gen, &gemm);
		int first = nrows;
		struct row *r = add_row(s->name, "train tokens/s vs eager", tps, "tok/s");
		snprintf(r->note, sizeof r->note, "MFU %.1f%%; GEMM attention %.0f tok/s", mfu * 100,
			 gemm);
		add_row(s->name, "train tokens/s vs torch.compile", tps, "tok/s");
		add_row(s->name, "gen b1 vs torch KV loop", gen[0], "tok/s");
		add_row(s->name, "gen b1 vs HF generate", gen[0], "tok/s");
		add_row(s->name, "gen b32 vs torch KV loop", gen[1], "tok/s");
		add_row(s->name, "gen b32 vs HF generate", gen[1], "tok/s");
		if (peer)
			run_peer(script, s, first);
	}
	printf("\n%-38s %14s %14s %8s  %s\n", "measure", "genpipe", "peer", "ratio", "");
	for (int i = 0; i < nrows; i++)
		printf("%-38s %14.0f %14.0f %7.2fx  %s\n", rows[i].what, rows[i].ours, rows[i].peer,
		       rows[i].ours / rows[i].peer, rows[i].note);
	printf("goals (H100): 124m train >= 1.1x torch.compile; demo train >= 2x torch.compile; "
	       "124m gen b1 >= 3000 tok/s; gen b32 >= 20x HF generate\n");
	return fail;
}
