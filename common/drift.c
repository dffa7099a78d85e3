/*
 * drift.c: drift statistics over windows of served requests (drift.h).
 */
#include "drift.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define LAT_MIN_MS 0.01
/* 0.01 ms to 1e6 ms over the buckets: about 3.7% apart */
#define LAT_LOG_RATIO (log(1e8) / (GP_DRIFT_LAT_BUCKETS - 2))

int gp_drift_lat_bucket(double ms)
{
	if (!(ms > LAT_MIN_MS))
		return 0;
	double k = ceil(log(ms / LAT_MIN_MS) / LAT_LOG_RATIO);
	if (k >= GP_DRIFT_LAT_BUCKETS - 1)
		return GP_DRIFT_LAT_BUCKETS - 1;
	return (int)k;
}

double gp_drift_lat_upper(int b)
{
	if (b >= GP_DRIFT_LAT_BUCKETS - 1)
		return INFINITY;
	return LAT_MIN_MS * exp(LAT_LOG_RATIO * b);
}

double gp_drift_psi(const double *p, const double *q, int n)
{
	double s = 0;
	for (int i = 0; i < n; i++)
		if (p[i] > 0 && q[i] > 0)
			s += (q[i] - p[i]) * log(q[i] / p[i]);
	return s;
}

double gp_drift_js(const double *p, const double *q, int n)
{
	double s = 0;
	for (int i = 0; i < n; i++) {
		double m = 0.5 * (p[i] + q[i]);
		if (p[i] > 0)
			s += 0.5 * p[i] * log2(p[i] / m);
		if (q[i] > 0)
			s += 0.5 * q[i] * log2(q[i] / m);
	}
	return s < 0 ? 0 : s;
}

static _Thread_local const double *sort_p;

static int by_p_desc(const void *a, const void *b)
{
	int x = *(const int *)a, y = *(const int *)b;
	if (sort_p[x] != sort_p[y])
		return sort_p[x] > sort_p[y] ? -1 : 1;
	return x - y;
}

/* Bins of equal reference mass over tokens ordered by frequency. */
static gp_status make_bins(struct gp_drift_ref *r, int bins, double alpha, struct gp_err *err)
{
	int V = r->vocab;
	int *order = malloc((size_t)V * sizeof(int));
	r->bin = malloc((size_t)V * sizeof(uint16_t));
	r->pbin = calloc((size_t)bins, sizeof(double));
	if (!order || !r->bin || !r->pbin) {
		free(order);
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	}
	for (int i = 0; i < V; i++)
		order[i] = i;
	sort_p = r->p;
	qsort(order, (size_t)V, sizeof(int), by_p_desc);
	double cum = 0;
	int b = -1, last = -1;
	for (int k = 0; k < V; k++) {
		int t = order[k];
		int want = (int)(cum * bins);
		if (want >= bins)
			want = bins - 1;
		if (want != last) { /* a new bin starts (skipped numbers are not used) */
			b++;
			last = want;
		}
		r->bin[t] = (uint16_t)b;
		r->pbin[b] += r->p[t];
		cum += r->p[t];
	}
	free(order);
	r->nbins = b + 1;
	double n = (double)r->tokens;
	for (int i = 0; i < r->nbins; i++)
		r->pbin[i] = (r->pbin[i] * n + alpha) / (n + alpha * r->nbins);
	return GP_OK;
}

gp_status gp_drift_ref_parse(const char *json, size_t len, const char *which, int bins,
			     double alpha, double rare_p, struct gp_drift_ref *out,
			     struct gp_err *err)
{
	memset(out, 0, sizeof(*out));
	if (bins <= 0)
		bins = 20;
	if (bins > GP_DRIFT_MAX_BINS)
		return gp_err_set(err, GP_ERR_INVALID, "%d bins: at most %d", bins, GP_DRIFT_MAX_BINS);
	if (len > GP_DRIFT_MAX_REF_BYTES)
		return gp_err_set(err, GP_ERR_TOO_BIG, "token histogram: %zu bytes, over the limit of %zu",
				  len, GP_DRIFT_MAX_REF_BYTES);
	if (alpha <= 0)
		alpha = 0.5;
	if (rare_p <= 0)
		rare_p = 1e-5;
	cJSON *j = cJSON_ParseWithLength(json, len);
	gp_status st = GP_OK;
	if (!cJSON_IsObject(j)) {
		st = gp_err_set(err, GP_ERR_INVALID, "token histogram: not a JSON object");
		goto out;
	}
	const char *fmt = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(j, "format"));
	if (!fmt || strcmp(fmt, "genpipe-token-histogram/1")) {
		st = gp_err_set(err, GP_ERR_INVALID,
				"token histogram: format is not \"genpipe-token-histogram/1\"");
		goto out;
	}
	const cJSON *vs = cJSON_GetObjectItemCaseSensitive(j, "vocab_size");
	if (!cJSON_IsNumber(vs) || vs->valuedouble != floor(vs->valuedouble) ||
	    vs->valuedouble < 2 || vs->valuedouble > GP_DRIFT_MAX_VOCAB) {
		st = gp_err_set(err, GP_ERR_INVALID,
				"token histogram: vocab_size must be an integer in 2..%d",
				GP_DRIFT_MAX_VOCAB);
		goto out;
	}
	int V = (int)vs->valuedouble;
	const cJSON *split = cJSON_GetObjectItemCaseSensitive(j, which);
	const cJSON *counts = cJSON_GetObjectItemCaseSensitive(split, "counts");
	const cJSON *tokens = cJSON_GetObjectItemCaseSensitive(split, "tokens");
	if (!cJSON_IsObject(split) || !cJSON_IsArray(counts) || !cJSON_IsNumber(tokens)) {
		st = gp_err_set(err, GP_ERR_INVALID,
				"token histogram: \"%s\" needs \"tokens\" and \"counts\"", which);
		goto out;
	}
	if (cJSON_GetArraySize(counts) != V) {
		st = gp_err_set(err, GP_ERR_INVALID,
				"token histogram: %s.counts has %d entries for vocab_size %d", which,
				cJSON_GetArraySize(counts), V);
		goto out;
	}
	out->p = malloc((size_t)V * sizeof(double));
	out->rare = malloc((size_t)V);
	if (!out->p || !out->rare) {
		st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		goto out;
	}
	double total = 0;
	int i = 0;
	const cJSON *c;
	cJSON_ArrayForEach(c, counts) {
		if (!cJSON_IsNumber(c) || c->valuedouble < 0 || c->valuedouble > 9e15 ||
		    c->valuedouble != floor(c->valuedouble)) {
			st = gp_err_set(err, GP_ERR_INVALID,
					"token histogram: %s.counts[%d] is not a non-negative integer",
					which, i);
			goto out;
		}
		out->p[i++] = c->valuedouble;
		total += c->valuedouble;
	}
	if (total != tokens->valuedouble || total < 1) {
		st = gp_err_set(err, GP_ERR_INVALID,
				"token histogram: %s.counts sum to %.0f, \"tokens\" says %.0f", which,
				total, tokens->valuedouble);
		goto out;
	}
	for (i = 0; i < V; i++) {
		out->p[i] /= total;
		out->rare[i] = out->p[i] < rare_p;
	}
	out->vocab = V;
	out->tokens = (long long)total;
	st = make_bins(out, bins, alpha, err);
out:
	cJSON_Delete(j);
	if (st)
		gp_drift_ref_free(out);
	return st;
}

void gp_drift_ref_free(struct gp_drift_ref *r)
{
	if (!r)
		return;
	free(r->p);
	free(r->rare);
	free(r->bin);
	free(r->pbin);
	memset(r, 0, sizeof(*r));
}

gp_status gp_drift_window_init(struct gp_drift_window *w, int vocab, struct gp_err *err)
{
	memset(w, 0, sizeof(*w));
	if (vocab < 2 || vocab > GP_DRIFT_MAX_VOCAB)
		return gp_err_set(err, GP_ERR_INVALID, "window vocabulary %d out of range 2..%d", vocab,
				  GP_DRIFT_MAX_VOCAB);
	if (!(w->counts = calloc((size_t)vocab, sizeof(uint32_t))))
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	w->vocab = vocab;
	return GP_OK;
}

void gp_drift_window_free(struct gp_drift_window *w)
{
	if (!w)
		return;
	free(w->counts);
	memset(w, 0, sizeof(*w));
}

void gp_drift_window_reset(struct gp_drift_window *w)
{
	uint32_t *c = w->counts;
	int V = w->vocab;
	memset(c, 0, (size_t)V * sizeof(uint32_t));
	memset(w, 0, sizeof(*w));
	w->counts = c;
	w->vocab = V;
}

void gp_drift_window_add(struct gp_drift_window *w, const uint32_t *ids, size_t n,
			 double latency_ms, int error, int cache_hit, long long time_ms)
{
	for (size_t i = 0; i < n; i++) {
		if (ids[i] < (uint32_t)w->vocab) {
			if (w->counts[ids[i]] != UINT32_MAX)
				w->counts[ids[i]]++;
			w->tokens++;
		} else {
			w->out_of_vocab++;
		}
	}
	w->requests++;
	w->errors += error != 0;
	w->cache_hits += cache_hit != 0;
	if (!error && isfinite(latency_ms)) {
		w->lat[gp_drift_lat_bucket(latency_ms)]++;
		w->lat_n++;
	}
	if (!w->first_ms || time_ms < w->first_ms)
		w->first_ms = time_ms;
	if (time_ms > w->last_ms)
		w->last_ms = time_ms;
}

static double lat_pct(const struct gp_drift_window *w, double p)
{
	if (!w->lat_n)
		return NAN;
	long long rank = (long long)ceil(p * (double)w->lat_n), seen = 0;
	if (rank < 1)
		rank = 1;
	for (int b = 0; b < GP_DRIFT_LAT_BUCKETS; b++) {
		seen += w->lat[b];
		if (seen >= rank)
			return gp_drift_lat_upper(b);
	}
	return NAN;
}

void gp_drift_compute(const struct gp_drift_ref *ref, const struct gp_drift_window *w, double alpha,
		      struct gp_drift_result *out)
{
	memset(out, 0, sizeof(*out));
	if (alpha <= 0)
		alpha = 0.5;
	int V = ref->vocab < w->vocab ? ref->vocab : w->vocab, B = ref->nbins;
	double qb[GP_DRIFT_MAX_BINS] = {0}, rare = 0, n = 0;
	for (int i = 0; i < V; i++) {
		qb[ref->bin[i]] += w->counts[i];
		n += w->counts[i];
		if (ref->rare[i])
			rare += w->counts[i];
	}
	for (int b = 0; b < B; b++)
		qb[b] = (qb[b] + alpha) / (n + alpha * B);
	double psi = gp_drift_psi(ref->pbin, qb, B), js = gp_drift_js(ref->pbin, qb, B);
	out->psi = n > 0 ? psi : 0;
	out->js = n > 0 ? js : 0;
	out->rare_share = n > 0 ? rare / n : 0;
	out->p50_ms = lat_pct(w, 0.50);
	out->p95_ms = lat_pct(w, 0.95);
	out->p99_ms = lat_pct(w, 0.99);
	out->error_rate = w->requests ? (double)w->errors / (double)w->requests : 0;
	out->cache_hit_rate = w->requests ? (double)w->cache_hits / (double)w->requests : 0;
	out->mean_loss = w->loss_n ? w->loss_sum / (double)w->loss_n : NAN;
	out->requests = w->requests;
	out->tokens = w->tokens;
}
