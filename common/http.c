/*
 * http.c: metrics registry and the libmicrohttpd server for health and
 * metrics. libmicrohttpd was chosen over a hand-written server: it is in
 * Debian, handles HTTP/1.1 parsing, limits and timeouts, and gives us a
 * thread without owning an event loop.
 */
#include "http.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <curl/curl.h>
#include <math.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct gp_metric {
	struct gp_metric *next;
	enum gp_metric_type type;
	char *name;
	char *help;
	char *labels;
	double value;           /* counter/gauge value; histogram sum */
	unsigned long long count;
	int nbuckets;
	double *bounds;
	unsigned long long *buckets; /* non-cumulative counts; nbuckets + 1 (+Inf) */
	pthread_mutex_t *lock;
};

struct gp_metrics {
	pthread_mutex_t lock;
	struct gp_metric *head, *tail;
};

struct gp_metrics *gp_metrics_create(void)
{
	struct gp_metrics *r = calloc(1, sizeof *r);
	if (r)
		pthread_mutex_init(&r->lock, NULL);
	return r;
}

static void metric_free(struct gp_metric *m)
{
	if (!m)
		return;
	free(m->name);
	free(m->help);
	free(m->labels);
	free(m->bounds);
	free(m->buckets);
	free(m);
}

void gp_metrics_destroy(struct gp_metrics *reg)
{
	if (!reg)
		return;
	struct gp_metric *m = reg->head;
	while (m) {
		struct gp_metric *n = m->next;
		metric_free(m);
		m = n;
	}
	pthread_mutex_destroy(&reg->lock);
	free(reg);
}

static int valid_name(const char *s)
{
	if (!s || !*s || !(isalpha((unsigned char)*s) || *s == '_' || *s == ':'))
		return 0;
	for (; *s; s++)
		if (!(isalnum((unsigned char)*s) || *s == '_' || *s == ':'))
			return 0;
	return 1;
}

struct gp_metric *gp_metrics_get(struct gp_metrics *reg, enum gp_metric_type type,
				 const char *name, const char *help, const char *labels,
				 const double *buckets, int nbuckets)
{
	if (!reg || !valid_name(name) || (type == GP_HISTOGRAM && nbuckets < 1))
		return NULL;
	const char *lab = labels ? labels : "";
	pthread_mutex_lock(&reg->lock);
	struct gp_metric *m, *last_of_family = NULL;
	for (m = reg->head; m; m = m->next) {
		if (strcmp(m->name, name) != 0)
			continue;
		if (m->type != type) {
			pthread_mutex_unlock(&reg->lock);
			return NULL;
		}
		if (!strcmp(m->labels, lab)) {
			pthread_mutex_unlock(&reg->lock);
			return m;
		}
		last_of_family = m;
	}
	m = calloc(1, sizeof *m);
	if (!m)
		goto fail;
	m->type = type;
	m->name = strdup(name);
	m->help = strdup(help ? help : "");
	m->labels = strdup(lab);
	m->lock = &reg->lock;
	if (!m->name || !m->help || !m->labels)
		goto fail;
	if (type == GP_HISTOGRAM) {
		m->nbuckets = nbuckets;
		m->bounds = malloc(sizeof(double) * (size_t)nbuckets);
		m->buckets = calloc((size_t)nbuckets + 1, sizeof(unsigned long long));
		if (!m->bounds || !m->buckets)
			goto fail;
		memcpy(m->bounds, buckets, sizeof(double) * (size_t)nbuckets);
	}
	/* Keep a family's series adjacent so rendering emits HELP/TYPE once. */
	if (last_of_family) {
		m->next = last_of_family->next;
		last_of_family->next = m;
		if (reg->tail == last_of_family)
			reg->tail = m;
	} else if (reg->tail) {
		reg->tail->next = m;
		reg->tail = m;
	} else {
		reg->head = reg->tail = m;
	}
	pthread_mutex_unlock(&reg->lock);
	return m;
fail:
	metric_free(m);
	pthread_mutex_unlock(&reg->lock);
	return NULL;
}

void gp_metric_inc(struct gp_metric *m, double v)
{
	if (!m)
		return;
	pthread_mutex_lock(m->lock);
	m->value += v;
	pthread_mutex_unlock(m->lock);
}

void gp_metric_set(struct gp_metric *m, double v)
{
	if (!m)
		return;
	pthread_mutex_lock(m->lock);
	m->value = v;
	pthread_mutex_unlock(m->lock);
}

void gp_metric_observe(struct gp_metric *m, double v)
{
	if (!m || m->type != GP_HISTOGRAM)
		return;
	pthread_mutex_lock(m->lock);
	int i = 0;
	while (i < m->nbuckets && v > m->bounds[i])
		i++;
	m->buckets[i]++;
	m->count++;
	m->value += v;
	pthread_mutex_unlock(m->lock);
}


/* Bounded growable text buffer. */
struct buf {
	char *p;
	size_t len, cap;
	int failed;
};

static void bprintf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void bprintf(struct buf *b, const char *fmt, ...)
{
	if (b->failed)
		return;
	for (;;) {
		va_list ap;
		va_start(ap, fmt);
		int n = vsnprintf(b->p ? b->p + b->len : NULL, b->p ? b->cap - b->len : 0, fmt, ap);
		va_end(ap);
		if (n < 0) {
			b->failed = 1;
			return;
		}
		if (b->p && b->len + (size_t)n < b->cap) {
			b->len += (size_t)n;
			return;
		}
		size_t ncap = b->cap ? b->cap * 2 : 4096;
		while (ncap < b->len + (size_t)n + 1)
			ncap *= 2;
		if (ncap > (64u << 20)) {
			b->failed = 1;
			return;
		}
		char *np = realloc(b->p, ncap);
		if (!np) {
			b->failed = 1;
			return;
		}
		b->p = np;
		b->cap = ncap;
	}
}

static void fmt_double(char *out, size_t n, double v)
{
	if (isnan(v))
		snprintf(out, n, "NaN");
	else if (isinf(v))
		snprintf(out, n, v > 0 ? "+Inf" : "-Inf");
	else {
		/* Shortest text that reads back as the same double: 0.1, not
		 * 0.10000000000000001. */
		snprintf(out, n, "%.15g", v);
		if (strtod(out, NULL) != v)
			snprintf(out, n, "%.17g", v);
	}
}

static void help_escape(struct buf *b, const char *s)
{
	for (; *s; s++) {
		if (*s == '\\')
			bprintf(b, "\\\\");
		else if (*s == '\n')
			bprintf(b, "\\n");
		else
			bprintf(b, "%c", *s);
	}
}

gp_status gp_metrics_render(struct gp_metrics *reg, char **out, size_t *len, struct gp_err *err)
{
	static const char *const tnames[] = { "counter", "gauge", "histogram" };
	struct buf b = { 0 };
	const char *family = NULL;
	char v[64];
	pthread_mutex_lock(&reg->lock);
	for (struct gp_metric *m = reg->head; m; m = m->next) {
		if (!family || strcmp(family, m->name) != 0) {
			family = m->name;
			bprintf(&b, "# HELP %s ", m->name);
			help_escape(&b, m->help);
			bprintf(&b, "\n# TYPE %s %s\n", m->name, tnames[m->type]);
		}
		if (m->type != GP_HISTOGRAM) {
			fmt_double(v, sizeof v, m->value);
			if (*m->labels)
				bprintf(&b, "%s{%s} %s\n", m->name, m->labels, v);
			else
				bprintf(&b, "%s %s\n", m->name, v);
			continue;
		}
		unsigned long long cum = 0;
		const char *sep = *m->labels ? "," : "";
		for (int i = 0; i <= m->nbuckets; i++) {
			cum += m->buckets[i];
			if (i < m->nbuckets)
				fmt_double(v, sizeof v, m->bounds[i]);
			else
				snprintf(v, sizeof v, "+Inf");
			bprintf(&b, "%s_bucket{%s%sle=\"%s\"} %llu\n", m->name, m->labels, sep, v, cum);
		}
		fmt_double(v, sizeof v, m->value);
		if (*m->labels) {
			bprintf(&b, "%s_sum{%s} %s\n", m->name, m->labels, v);
			bprintf(&b, "%s_count{%s} %llu\n", m->name, m->labels, m->count);
		} else {
			bprintf(&b, "%s_sum %s\n", m->name, v);
			bprintf(&b, "%s_count %llu\n", m->name, m->count);
		}
	}
	pthread_mutex_unlock(&reg->lock);
	if (b.failed || !b.p) {
		free(b.p);
		if (b.failed)
			return gp_err_set(err, GP_ERR_NOMEM, "could not render metrics: out of memory");
		b.p = strdup("");
		if (!b.p)
			return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	}
	*out = b.p;
	*len = b.len;
	return GP_OK;
}

struct gp_http {
	struct MHD_Daemon *d;
	struct gp_metrics *reg;
	gp_ready_fn ready;
	void *closure;
	int port;
	struct gp_metric *requests;
};

static enum MHD_Result reply(struct MHD_Connection *c, unsigned code, const char *ctype,
			     char *body, size_t len, int owned)
{
	struct MHD_Response *r = MHD_create_response_from_buffer(
		len, body, owned ? MHD_RESPMEM_MUST_FREE : MHD_RESPMEM_MUST_COPY);
	if (!r) {
		if (owned)
			free(body);
		return MHD_NO;
	}
	MHD_add_response_header(r, "Content-Type", ctype);
	enum MHD_Result ret = MHD_queue_response(c, code, r);
	MHD_destroy_response(r);
	return ret;
}

static enum MHD_Result handle(void *cls, struct MHD_Connection *c, const char *url,
			      const char *method, const char *version, const char *upload_data,
			      size_t *upload_size, void **con_cls)
{
	struct gp_http *h = cls;
	if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
		static char msg[] = "method not allowed\n";
		return reply(c, MHD_HTTP_METHOD_NOT_ALLOWED, "text/plain", msg, sizeof msg - 1, 0);
	}
	gp_metric_inc(h->requests, 1);
	if (!strcmp(url, "/healthz")) {
		static char ok[] = "ok\n";
		return reply(c, MHD_HTTP_OK, "text/plain", ok, sizeof ok - 1, 0);
	}
	if (!strcmp(url, "/readyz")) {
		char why[256] = "ready";
		int ready = h->ready ? h->ready(h->closure, why, sizeof why) : 1;
		char body[300];
		int n = snprintf(body, sizeof body, "%s\n", ready ? "ready" : why);
		return reply(c, ready ? MHD_HTTP_OK : MHD_HTTP_SERVICE_UNAVAILABLE, "text/plain",
			     body, (size_t)n, 0);
	}
	if (!strcmp(url, "/metrics")) {
		char *text;
		size_t len;
		if (gp_metrics_render(h->reg, &text, &len, NULL) != GP_OK) {
			static char msg[] = "could not render metrics\n";
			return reply(c, MHD_HTTP_INTERNAL_SERVER_ERROR, "text/plain", msg,
				     sizeof msg - 1, 0);
		}
		return reply(c, MHD_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8", text, len,
			     1);
	}
	static char nf[] = "not found\n";
	return reply(c, MHD_HTTP_NOT_FOUND, "text/plain", nf, sizeof nf - 1, 0);
}

gp_status gp_http_create(struct gp_http **out, const char *addr, int port, struct gp_metrics *reg,
			 gp_ready_fn ready, void *closure, struct gp_err *err)
{
	struct sockaddr_in sa = { 0 };
	sa.sin_family = AF_INET;
	sa.sin_port = htons((uint16_t)port);
	if (inet_pton(AF_INET, addr ? addr : "127.0.0.1", &sa.sin_addr) != 1)
		return gp_err_set(err, GP_ERR_INVALID, "invalid http listen address \"%s\"", addr);
	struct gp_http *h = calloc(1, sizeof *h);
	if (!h)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	h->reg = reg;
	h->ready = ready;
	h->closure = closure;
	h->requests = gp_metrics_get(reg, GP_COUNTER, "genpipe_http_requests_total",
				     "HTTP requests served on the health and metrics port", NULL, NULL,
				     0);
	h->d = MHD_start_daemon(MHD_USE_AUTO_INTERNAL_THREAD, (uint16_t)port, NULL, NULL, handle, h,
				MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&sa,
				MHD_OPTION_CONNECTION_LIMIT, (unsigned)64,
				MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)10,
				MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)65536,
				MHD_OPTION_END);
	if (!h->d) {
		free(h);
		return gp_err_set(err, GP_ERR_IO, "could not listen on %s:%d for http",
				  addr ? addr : "127.0.0.1", port);
	}
	const union MHD_DaemonInfo *info = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_BIND_PORT);
	h->port = info ? info->port : port;
	*out = h;
	return GP_OK;
}

int gp_http_port(const struct gp_http *h)
{
	return h ? h->port : 0;
}

void gp_http_destroy(struct gp_http *h)
{
	if (!h)
		return;
	MHD_stop_daemon(h->d);
	free(h);
}

struct sink {
	char *p;
	size_t len;
};

static size_t sink_write(char *data, size_t sz, size_t n, void *cls)
{
	struct sink *s = cls;
	size_t add = sz * n;
	if (s->len + add > (16u << 20))
		return 0;
	char *np = realloc(s->p, s->len + add + 1);
	if (!np)
		return 0;
	memcpy(np + s->len, data, add);
	s->p = np;
	s->len += add;
	s->p[s->len] = '\0';
	return add;
}

gp_status gp_http_get(const char *url, long timeout_ms, long *code, char **body,
		      struct gp_err *err)
{
	CURL *c = curl_easy_init();
	if (!c)
		return gp_err_set(err, GP_ERR_NOMEM, "could not create curl handle");
	struct sink s = { 0 };
	curl_easy_setopt(c, CURLOPT_URL, url);
	curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, timeout_ms);
	curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, sink_write);
	curl_easy_setopt(c, CURLOPT_WRITEDATA, &s);
	CURLcode rc = curl_easy_perform(c);
	gp_status st = GP_OK;
	if (rc != CURLE_OK) {
		st = gp_err_set(err, rc == CURLE_OPERATION_TIMEDOUT ? GP_ERR_TIMEOUT : GP_ERR_UNAVAILABLE,
				"GET %s: %s", url, curl_easy_strerror(rc));
		free(s.p);
	} else {
		curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, code);
		*body = s.p ? s.p : strdup("");
	}
	curl_easy_cleanup(c);
	return st;
}
