/*
 * test_drift: PSI and Jensen-Shannon against hand-computed values, the
 * reference histogram parser (valid and each refusal), and windows drawn
 * from the reference (no drift) or from another distribution (drift), with
 * latency percentiles, rare-token share and rates.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../check.h"
#include "drift.h"

static uint64_t rng = 99;
static double unit(void)
{
	rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
	return (double)(rng >> 11) / 9007199254740992.0;
}

/* A histogram JSON for counts[V] in both splits. */
static char *hist_json(const long long *counts, int V)
{
	size_t cap = (size_t)V * 24 + 256, n = 0;
	char *s = malloc(cap);
	long long tot = 0;
	for (int i = 0; i < V; i++)
		tot += counts[i];
	n += (size_t)snprintf(s + n, cap - n,
			      "{\"format\": \"genpipe-token-histogram/1\", \"vocab_size\": %d, "
			      "\"train\": {\"tokens\": %lld, \"counts\": [", V, tot);
	for (int i = 0; i < V; i++)
		n += (size_t)snprintf(s + n, cap - n, "%s%lld", i ? ", " : "", counts[i]);
	n += (size_t)snprintf(s + n, cap - n, "]}, \"val\": {\"tokens\": 1, \"counts\": [1");
	for (int i = 1; i < V; i++)
		n += (size_t)snprintf(s + n, cap - n, ", 0");
	snprintf(s + n, cap - n, "]}}");
	return s;
}

static int draw(const double *cdf, int V)
{
	double u = unit();
	int lo = 0, hi = V - 1;
	while (lo < hi) {
		int mid = (lo + hi) / 2;
		if (cdf[mid] < u)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

int main(void)
{
	struct gp_err err = {0};
	/* hand-computed: p = (.5, .5), q = (.9, .1) */
	double p[2] = {0.5, 0.5}, q[2] = {0.9, 0.1};
	CHECK(fabs(gp_drift_psi(p, q, 2) - 0.878890) < 1e-5);
	CHECK(fabs(gp_drift_js(p, q, 2) - 0.146793) < 1e-5);
	CHECK(gp_drift_psi(p, p, 2) == 0 && gp_drift_js(p, p, 2) == 0);
	double a[2] = {1, 0}, b[2] = {0, 1};
	CHECK(fabs(gp_drift_js(a, b, 2) - 1.0) < 1e-12); /* disjoint: the maximum, 1 bit */

	/* the reference: a Zipf-like vocabulary of 1000 with a rare tail */
	enum { V = 1000 };
	static long long counts[V];
	static double pz[V], cdf[V], shifted[V];
	double zs = 0;
	for (int i = 0; i < V; i++)
		zs += pz[i] = 1.0 / (i + 1);
	for (int i = 0; i < V; i++) {
		counts[i] = i < 990 ? (long long)(1e6 * pz[i] / zs) + 1 : 0;
		pz[i] /= zs;
	}
	char *js = hist_json(counts, V);
	struct gp_drift_ref ref;
	REQUIRE_OK(gp_drift_ref_parse(js, strlen(js), "train", 0, 0, 0, &ref, &err), err);
	CHECK(ref.vocab == V && ref.rare[995] && !ref.rare[0]);
	double sum = 0, bsum = 0;
	for (int i = 0; i < V; i++)
		sum += ref.p[i];
	for (int k = 0; k < ref.nbins; k++)
		bsum += ref.pbin[k];
	CHECK(fabs(sum - 1) < 1e-9 && fabs(bsum - 1) < 1e-9);
	/* bins of equal mass from the most frequent token down: token 0 holds
	 * 13% of the mass, more than a bin's 5%, so it is a bin of its own */
	CHECK(ref.nbins > 10 && ref.nbins <= 20);
	CHECK(ref.bin[0] == 0 && ref.bin[1] == 1 && ref.bin[999] == ref.nbins - 1);
	int monotone = 1;
	for (int i = 1; i < V; i++)
		monotone &= ref.bin[i] >= ref.bin[i - 1];
	CHECK(monotone); /* ids here are in frequency order */

	/* refusals, each named */
	struct {
		const char *json, *msg;
	} bad[] = {
		{"[1]", "not a JSON object"},
		{"{\"format\": \"x\"}", "format"},
		{"{\"format\": \"genpipe-token-histogram/1\", \"vocab_size\": 1}", "vocab_size"},
		{"{\"format\": \"genpipe-token-histogram/1\", \"vocab_size\": 2.5}", "vocab_size"},
		{"{\"format\": \"genpipe-token-histogram/1\", \"vocab_size\": 3, \"train\": {}}",
		 "needs \"tokens\" and \"counts\""},
		{"{\"format\": \"genpipe-token-histogram/1\", \"vocab_size\": 3, \"train\": "
		 "{\"tokens\": 2, \"counts\": [1, 1]}}", "2 entries for vocab_size 3"},
		{"{\"format\": \"genpipe-token-histogram/1\", \"vocab_size\": 3, \"train\": "
		 "{\"tokens\": 2, \"counts\": [1, -1, 2]}}", "counts[1] is not a non-negative integer"},
		{"{\"format\": \"genpipe-token-histogram/1\", \"vocab_size\": 3, \"train\": "
		 "{\"tokens\": 5, \"counts\": [1, 1, 2]}}", "sum to 4"},
	};
	for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
		struct gp_drift_ref r2;
		CHECK(gp_drift_ref_parse(bad[i].json, strlen(bad[i].json), "train", 0, 0, 0, &r2, &err) ==
		      GP_ERR_INVALID);
		CHECK_CONTAINS(err.msg, bad[i].msg);
		CHECK(r2.p == NULL);
	}
	struct gp_drift_ref big;
	CHECK(gp_drift_ref_parse(js, GP_DRIFT_MAX_REF_BYTES + 1, "train", 0, 0, 0, &big, &err) ==
	      GP_ERR_TOO_BIG);
	CHECK(gp_drift_ref_parse(js, strlen(js), "train", GP_DRIFT_MAX_BINS + 1, 0, 0, &big, &err) ==
	      GP_ERR_INVALID);

	/* a window drawn from the reference: no drift */
	double c = 0;
	for (int i = 0; i < V; i++)
		cdf[i] = c += pz[i];
	struct gp_drift_window w;
	REQUIRE_OK(gp_drift_window_init(&w, V, &err), err);
	uint32_t ids[20];
	for (int e = 0; e < 2000; e++) {
		for (int k = 0; k < 20; k++)
			ids[k] = (uint32_t)draw(cdf, V);
		gp_drift_window_add(&w, ids, 20, 1 + e % 1000, e % 50 == 0, e % 4 == 0, 1000 + e);
	}
	struct gp_drift_result r;
	gp_drift_compute(&ref, &w, 0, &r);
	printf("same distribution: PSI %.4f, JS %.4f, rare %.4f, p50 %.1f ms, p99 %.1f ms, errors "
	       "%.3f, cache %.3f\n", r.psi, r.js, r.rare_share, r.p50_ms, r.p99_ms, r.error_rate,
	       r.cache_hit_rate);
	CHECK(r.psi < 0.2 && r.js < 0.1);
	CHECK(r.requests == 2000 && r.tokens == 40000);
	CHECK(fabs(r.error_rate - 0.02) < 1e-9 && fabs(r.cache_hit_rate - 0.25) < 1e-9);
	/* latencies 1..1000 ms (errors excluded): percentiles within a bucket (4%) */
	CHECK(fabs(r.p50_ms - 500) / 500 < 0.05);
	CHECK(fabs(r.p99_ms - 990) / 990 < 0.05);
	CHECK(r.rare_share < 0.003); /* the tail the reference never saw */
	CHECK(isnan(r.mean_loss));
	/* the window's PSI and JS are the pure forms on the smoothed bins */
	double qv[GP_DRIFT_MAX_BINS] = {0};
	for (int i = 0; i < V; i++)
		qv[ref.bin[i]] += w.counts[i];
	for (int k = 0; k < ref.nbins; k++)
		qv[k] = (qv[k] + 0.5) / (w.tokens + 0.5 * ref.nbins);
	CHECK(fabs(r.psi - gp_drift_psi(ref.pbin, qv, ref.nbins)) < 1e-12);
	CHECK(fabs(r.js - gp_drift_js(ref.pbin, qv, ref.nbins)) < 1e-12);
	CHECK(r.psi < 0.01 && r.js < 0.005); /* binned: sampling noise is small */

	/* another distribution: uniform over the upper half, rare tail included */
	gp_drift_window_reset(&w);
	CHECK(w.tokens == 0 && w.counts[0] == 0 && w.vocab == V);
	c = 0;
	for (int i = 0; i < V; i++)
		shifted[i] = c += (i >= V / 2) ? 2.0 / V : 0;
	for (int e = 0; e < 2000; e++) {
		for (int k = 0; k < 20; k++)
			ids[k] = (uint32_t)draw(shifted, V);
		gp_drift_window_add(&w, ids, 20, 5, 0, 0, 5000 + e);
	}
	uint32_t oov[2] = {V, V + 7};
	gp_drift_window_add(&w, oov, 2, 5, 0, 0, 9000);
	gp_drift_compute(&ref, &w, 0, &r);
	printf("shifted distribution: PSI %.4f, JS %.4f, rare %.4f, out of vocabulary %lld\n", r.psi,
	       r.js, r.rare_share, w.out_of_vocab);
	CHECK(r.psi > 0.2 && r.js > 0.1);
	CHECK(fabs(r.rare_share - 0.02) < 0.005); /* 10 rare ids of 500 */
	CHECK(w.out_of_vocab == 2 && w.first_ms == 5000 && w.last_ms == 9000);
	CHECK(fabs(r.p50_ms - 5) / 5 < 0.05);

	/* an empty window says nothing */
	gp_drift_window_reset(&w);
	gp_drift_compute(&ref, &w, 0, &r);
	CHECK(r.psi == 0 && r.js == 0 && isnan(r.p50_ms) && r.requests == 0);
	gp_drift_window_free(&w);
	CHECK(gp_drift_window_init(&w, 1, &err) == GP_ERR_INVALID);
	/* latency buckets are monotone and cover the range */
	CHECK(gp_drift_lat_bucket(0) == 0 && gp_drift_lat_bucket(-1) == 0 &&
	      gp_drift_lat_bucket(NAN) == 0);
	CHECK(gp_drift_lat_bucket(1e12) == GP_DRIFT_LAT_BUCKETS - 1);
	int mono = 1;
	for (double ms = 0.02; ms < 1e6; ms *= 1.01) {
		int bk = gp_drift_lat_bucket(ms);
		mono &= ms <= gp_drift_lat_upper(bk) * (1 + 1e-12) &&
			(bk == 0 || ms > gp_drift_lat_upper(bk - 1) * (1 - 1e-12));
	}
	CHECK(mono);
	gp_drift_ref_free(&ref);
	free(js);
	return CHECK_RESULT();
}
