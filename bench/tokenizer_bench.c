/*
 * tokenizer_bench: byte-level BPE training and encoding speed (MB/s) on a
 * real corpus (Debian's fortune files and common licenses when installed,
 * else generated text), each beside its plain reference measured in the
 * same run on the same bytes:
 *   training: the incremental trainer vs the naive one (recounts every pair
 *             before every merge), on a slice both can finish;
 *   encoding: the cached encoder vs the reference that applies every merge
 *             in order, on a slice; then the cached encoder on everything.
 * The outputs are compared too: both trainers must learn the same merges,
 * both encoders must give the same ids.
 * Usage: tokenizer_bench [VOCAB] [SLICE_KB]
 */
#include <glob.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bpe.h"

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static size_t load(const char *pattern, unsigned char **buf, size_t *cap, size_t len)
{
	glob_t g;
	if (glob(pattern, 0, NULL, &g) != 0)
		return len;
	for (size_t i = 0; i < g.gl_pathc; i++) {
		size_t n = strlen(g.gl_pathv[i]);
		if (n > 4 && (!strcmp(g.gl_pathv[i] + n - 4, ".dat") ||
			      !strcmp(g.gl_pathv[i] + n - 3, ".u8")))
			continue;
		FILE *f = fopen(g.gl_pathv[i], "rb");
		if (!f)
			continue;
		for (;;) {
			if (*cap - len < 65536) {
				*cap = *cap ? *cap * 2 : 1 << 20;
				*buf = realloc(*buf, *cap);
			}
			size_t k = fread(*buf + len, 1, *cap - len, f);
			if (k == 0)
				break;
			len += k;
		}
		fclose(f);
	}
	globfree(&g);
	return len;
}

static struct gp_bpe *train(const unsigned char *t, size_t n, int vocab, int naive, double *secs)
{
	struct gp_err e = { 0 };
	struct gp_bpe_trainer *tr;
	struct gp_bpe *b = NULL;
	double t0 = now();
	if (gp_bpe_trainer_new(&tr, &e) || gp_bpe_trainer_add(tr, t, n, &e) ||
	    gp_bpe_train(tr, vocab, naive, &b, &e)) {
		fprintf(stderr, "tokenizer_bench: %s\n", e.msg);
		exit(1);
	}
	*secs = now() - t0;
	gp_bpe_trainer_free(tr);
	return b;
}

int main(int argc, char **argv)
{
	int vocab = argc > 1 ? atoi(argv[1]) : 4096;
	size_t slice = (size_t)(argc > 2 ? atoi(argv[2]) : 256) * 1024;
	unsigned char *buf = NULL;
	size_t cap = 0, len = 0;
	len = load("/usr/share/games/fortunes/*", &buf, &cap, len);
	len = load("/usr/share/common-licenses/*", &buf, &cap, len);
	const char *what = "fortunes + common-licenses";
	if (len < (1 << 20)) {
		what = "generated text";
		cap = 4 << 20;
		buf = realloc(buf, cap);
		unsigned s = 1;
		static const char *w[] = { "alpha ", "beta ", "gamma ", "delta, ", "eps.\n" };
		for (len = 0; len + 8 < cap;) {
			s = s * 1103515245u + 12345u;
			const char *x = w[(s >> 16) % 5];
			memcpy(buf + len, x, strlen(x));
			len += strlen(x);
		}
	}
	if (slice > len)
		slice = len;
	printf("corpus: %s, %.2f MB; vocab %d; reference slice %.0f KB\n", what, len / 1e6, vocab,
	       slice / 1e3);

	double tf, tn, tall;
	struct gp_bpe *bf = train(buf, slice, vocab, 0, &tf);
	struct gp_bpe *bn = train(buf, slice, vocab, 1, &tn);
	uint8_t *s1, *s2;
	size_t l1, l2;
	struct gp_err e = { 0 };
	gp_bpe_save(bf, &s1, &l1, &e);
	gp_bpe_save(bn, &s2, &l2, &e);
	int same_merges = l1 == l2 && !memcmp(s1, s2, l1);
	free(s1);
	free(s2);
	gp_bpe_free(bn);
	printf("%-34s %10s %10s %8s\n", "", "genpipe", "reference", "ratio");
	printf("%-34s %9.2f  %9.2f  %7.1fx   (same merges: %s)\n", "train MB/s (slice)",
	       slice / 1e6 / tf, slice / 1e6 / tn, tn / tf, same_merges ? "yes" : "NO");
	struct gp_bpe *ball = train(buf, len, vocab, 0, &tall);
	printf("%-34s %9.2f\n", "train MB/s (whole corpus)", len / 1e6 / tall);

	uint16_t *a = NULL, *r = NULL;
	size_t na = 0, ca = 0, nr = 0, cr = 0;
	double t0 = now();
	gp_bpe_encode(bf, buf, slice, &a, &na, &ca, &e);
	double te = now() - t0;
	t0 = now();
	gp_bpe_encode_reference(bf, buf, slice, &r, &nr, &cr, &e);
	double tr = now() - t0;
	int same_ids = na == nr && !memcmp(a, r, na * sizeof *a);
	printf("%-34s %9.2f  %9.2f  %7.1fx   (same ids: %s)\n", "encode MB/s (slice, own vocab)",
	       slice / 1e6 / te, slice / 1e6 / tr, tr / te, same_ids ? "yes" : "NO");
	na = 0;
	t0 = now();
	gp_bpe_encode(ball, buf, len, &a, &na, &ca, &e);
	double tw = now() - t0;
	printf("%-34s %9.2f   (%.2f bytes per token)\n", "encode MB/s (whole corpus)",
	       len / 1e6 / tw, (double)len / (double)na);
	free(a);
	free(r);
	gp_bpe_free(bf);
	gp_bpe_free(ball);
	free(buf);
	return same_merges && same_ids ? 0 : 1;
}
