/*
 * monitor_bench: how fast the drift monitor's core consumes telemetry, on
 * one core: decode each Telemetry message (validation included), add it to
 * the window of its model version, and close a window every WINDOW events
 * (PSI, Jensen-Shannon, rare share, latency percentiles against a
 * vocabulary of 4096). Then the same for 10x the events, printing the peak
 * resident memory of both, which must not grow with the volume.
 * Events are made up front (Zipf-distributed prompt tokens, 8 to 40 a
 * prompt); making them is not timed.
 *
 * usage: monitor_bench [EVENTS (1000000)] [WINDOW (500)]
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "drift.h"
#include "wire.h"

enum { V = 4096 };

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static long peak_kb(void)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	return ru.ru_maxrss;
}

struct msgs {
	uint8_t *buf;      /* all messages back to back */
	size_t *off, len;
	int n;
};

/* A pool of distinct encoded events, reused round-robin for any volume. */
static struct msgs make_pool(int n, const double *cdf)
{
	struct msgs m = {0};
	m.off = malloc(((size_t)n + 1) * sizeof(size_t));
	size_t cap = (size_t)n * 256;
	m.buf = malloc(cap);
	uint64_t rng = 7;
	uint32_t ids[64];
	for (int i = 0; i < n; i++) {
		rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
		int len = 8 + (int)((rng >> 33) % 33);
		for (int k = 0; k < len; k++) {
			rng = rng * 6364136223846793005ULL + 1442695040888963407ULL;
			double u = (double)(rng >> 11) / 9007199254740992.0;
			int lo = 0, hi = V - 1;
			while (lo < hi) {
				int mid = (lo + hi) / 2;
				if (cdf[mid] < u)
					lo = mid + 1;
				else
					hi = mid;
			}
			ids[k] = (uint32_t)lo;
		}
		char rid[32];
		snprintf(rid, sizeof rid, "req-%d", i);
		gp_telemetry t = GENPIPE__V1__TELEMETRY__INIT;
		t.request_id = rid;
		t.model = "fortunes";
		t.model_version = 1 + i % 2;
		t.prompt_tokens = ids;
		t.n_prompt_tokens = (size_t)len;
		t.output_tokens = 32;
		t.latency_ms = 20 + (double)(rng >> 54);
		t.error_code = i % 97 ? "" : "busy";
		t.time_unix_ms = 1700000000000LL + i;
		uint8_t *b = NULL;
		size_t bl = 0;
		struct gp_err e = {0};
		if (gp_wire_encode(&t.base, &b, &bl, &e) || m.len + bl > cap) {
			fprintf(stderr, "monitor_bench: cannot make events: %s\n", e.msg);
			exit(1);
		}
		memcpy(m.buf + m.len, b, bl);
		m.off[i] = m.len;
		m.len += bl;
		free(b);
	}
	m.off[n] = m.len;
	m.n = n;
	return m;
}

static double run(const struct msgs *m, long long events, int window,
		  const struct gp_drift_ref *ref, long long *windows, double *psi_sum)
{
	struct gp_drift_window w[2];
	struct gp_err e = {0};
	for (int v = 0; v < 2; v++)
		if (gp_drift_window_init(&w[v], V, &e))
			exit(1);
	double t0 = now_s();
	for (long long i = 0; i < events; i++) {
		int k = (int)(i % m->n);
		gp_telemetry *t = NULL;
		if (gp_wire_decode_telemetry(&t, m->buf + m->off[k], m->off[k + 1] - m->off[k], &e)) {
			fprintf(stderr, "monitor_bench: %s\n", e.msg);
			exit(1);
		}
		struct gp_drift_window *wv = &w[t->model_version == 2];
		gp_drift_window_add(wv, t->prompt_tokens, t->n_prompt_tokens, t->latency_ms,
				    t->error_code[0] != 0, t->cache_hit, t->time_unix_ms);
		gp_wire_free_telemetry(t);
		if (wv->requests == window) {
			struct gp_drift_result r;
			gp_drift_compute(ref, wv, 0, &r);
			*psi_sum += r.psi;
			(*windows)++;
			gp_drift_window_reset(wv);
		}
	}
	double dt = now_s() - t0;
	for (int v = 0; v < 2; v++)
		gp_drift_window_free(&w[v]);
	return dt;
}

int main(int argc, char **argv)
{
	long long events = argc > 1 ? atoll(argv[1]) : 1000000;
	int window = argc > 2 ? atoi(argv[2]) : 500;
	if (events < 1000 || events > 100000000 || window < 10) {
		fprintf(stderr, "usage: monitor_bench [EVENTS 1000..1e8] [WINDOW >= 10]\n");
		return 2;
	}
	static double pz[V], cdf[V];
	double zs = 0, c = 0;
	for (int i = 0; i < V; i++)
		zs += pz[i] = 1.0 / pow(i + 1, 1.1);
	char *hist = malloc((size_t)V * 16 + 256);
	size_t n = (size_t)sprintf(hist, "{\"format\": \"genpipe-token-histogram/1\", "
				   "\"vocab_size\": %d, \"train\": {\"tokens\": ", V);
	long long tot = 0, cnt[V];
	for (int i = 0; i < V; i++) {
		cnt[i] = (long long)(1e7 * pz[i] / zs);
		tot += cnt[i];
		cdf[i] = c += pz[i] / zs;
	}
	n += (size_t)sprintf(hist + n, "%lld, \"counts\": [", tot);
	for (int i = 0; i < V; i++)
		n += (size_t)sprintf(hist + n, "%s%lld", i ? "," : "", cnt[i]);
	n += (size_t)sprintf(hist + n, "]}}");
	struct gp_drift_ref ref;
	struct gp_err e = {0};
	if (gp_drift_ref_parse(hist, n, "train", 0, 0, 0, &ref, &e)) {
		fprintf(stderr, "monitor_bench: %s\n", e.msg);
		return 1;
	}
	struct msgs m = make_pool(100000, cdf);
	long base = peak_kb();
	long long windows = 0;
	double psi = 0;
	double dt = run(&m, events, window, &ref, &windows, &psi);
	long peak1 = peak_kb();
	long long windows10 = 0;
	double psi10 = 0;
	double dt10 = run(&m, events * 10, window, &ref, &windows10, &psi10);
	long peak10 = peak_kb();
	printf("monitor_bench: one core, vocabulary %d, windows of %d events, 2 model versions\n", V,
	       window);
	printf("%-12s %12s %10s %14s %9s %14s\n", "events", "seconds", "windows", "events/s",
	       "mean PSI", "peak RSS");
	printf("%-12lld %12.2f %10lld %14.0f %9.4f %11ld KB\n", events, dt, windows, events / dt,
	       windows ? psi / windows : 0, peak1);
	printf("%-12lld %12.2f %10lld %14.0f %9.4f %11ld KB\n", events * 10, dt10, windows10,
	       events * 10 / dt10, windows10 ? psi10 / windows10 : 0, peak10);
	printf("goal: at least 100,000 events/s on one core; memory at 10x the volume: %+ld KB "
	       "(the event pool and reference take %ld KB before the first run)\n",
	       peak10 - peak1, base);
	printf("published peers (not measured here): Evidently and Alibi Detect run drift as batch "
	       "jobs over stored rows (hours for millions of rows)\n");
	gp_drift_ref_free(&ref);
	free(m.buf);
	free(m.off);
	free(hist);
	return 0;
}
