/*
 * drift.h: the numbers the monitor computes over a window of served
 * requests, against the training reference. Pure functions and a bounded
 * aggregator: no I/O here.
 *
 * Token distributions: the reference is preprocess's token histogram (the
 * `histogram` artifact, docs/formats.md); a window counts the prompt
 * tokens of its requests. Compared token by token, a window of a few
 * thousand tokens over a vocabulary of thousands differs from its own
 * source by chance alone (PSI about 0.2 for 12,000 tokens over 4,096 ids:
 * as high as the alert threshold). So both sides are first grouped into
 * `bins` (default 20) bins of equal reference mass, tokens ordered from the
 * most to the least frequent in the reference (a token above 1/bins of the
 * mass is a bin of its own), and the bins are smoothed (add-alpha, alpha =
 * 0.5: no bin is ever zero). A shift of vocabulary (another domain's
 * prompts) moves mass between these bins, towards the rare ones.
 *   PSI = sum_b (q_b - p_b) ln(q_b / p_b)      (alert default 0.2)
 *   JS  = (KL(p || m) + KL(q || m)) / 2, m = (p + q) / 2, in bits, 0..1
 *                                              (alert default 0.1)
 * Rare tokens: ids whose reference probability is under rare_p (default
 * 1e-5, before smoothing); the window's share of such tokens.
 *
 * A window's memory is fixed when it is made: vocab counters, a latency
 * histogram of GP_DRIFT_LAT_BUCKETS log-spaced buckets (percentiles within
 * 2.5%), and counters; adding an event allocates nothing. So memory does
 * not grow with traffic.
 */
#ifndef GP_DRIFT_H
#define GP_DRIFT_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

#define GP_DRIFT_MAX_VOCAB 65536
#define GP_DRIFT_MAX_REF_BYTES ((size_t)16 << 20)
#define GP_DRIFT_LAT_BUCKETS 512

#define GP_DRIFT_MAX_BINS 1000

struct gp_drift_ref {
	int vocab;
	double *p;          /* reference probabilities (unsmoothed), vocab entries */
	uint8_t *rare;      /* 1 where the probability is under rare_p */
	uint16_t *bin;      /* the bin of each token */
	int nbins;
	double *pbin;       /* smoothed reference mass of each bin */
	long long tokens;   /* reference size */
};

/*
 * Parse a token histogram (JSON, at most GP_DRIFT_MAX_REF_BYTES) and build
 * the reference from its `which` split ("train" or "val"). Checks format,
 * vocab_size (2..GP_DRIFT_MAX_VOCAB), that counts has exactly vocab_size
 * non-negative integers and that they sum to `tokens`. bins <= 0: 20
 * (at most GP_DRIFT_MAX_BINS); alpha <= 0: 0.5; rare_p <= 0: 1e-5.
 * Caller frees with gp_drift_ref_free.
 */
gp_status gp_drift_ref_parse(const char *json, size_t len, const char *which, int bins,
			     double alpha, double rare_p, struct gp_drift_ref *out,
			     struct gp_err *err);
void gp_drift_ref_free(struct gp_drift_ref *r);

struct gp_drift_window {
	int vocab;
	uint32_t *counts;   /* prompt token counts */
	long long tokens, requests, errors, cache_hits, out_of_vocab;
	long long first_ms, last_ms; /* event times (wall clock) */
	uint32_t lat[GP_DRIFT_LAT_BUCKETS];
	long long lat_n;
	double loss_sum;    /* optional: the served model's loss on prompts */
	long long loss_n;
};

gp_status gp_drift_window_init(struct gp_drift_window *w, int vocab, struct gp_err *err);
void gp_drift_window_free(struct gp_drift_window *w);
void gp_drift_window_reset(struct gp_drift_window *w);
/* One served request: its prompt token ids, latency, outcome. */
void gp_drift_window_add(struct gp_drift_window *w, const uint32_t *ids, size_t n,
			 double latency_ms, int error, int cache_hit, long long time_ms);

struct gp_drift_result {
	double psi, js, rare_share;
	double p50_ms, p95_ms, p99_ms;
	double error_rate, cache_hit_rate;
	double mean_loss;     /* NAN when no loss was added */
	long long requests, tokens;
};

/* Compare the window with the reference (ids past the reference's
 * vocabulary are not counted). alpha as above. */
void gp_drift_compute(const struct gp_drift_ref *ref, const struct gp_drift_window *w, double alpha,
		      struct gp_drift_result *out);

/* The pure forms, for tests: smoothed PSI and JS of two count vectors. */
double gp_drift_psi(const double *p, const double *q, int n);
double gp_drift_js(const double *p, const double *q, int n);
/* Latency histogram buckets: bucket of a latency, and its upper bound. */
int gp_drift_lat_bucket(double ms);
double gp_drift_lat_upper(int bucket);

#endif
