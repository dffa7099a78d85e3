/*
 * fetch.c: HTTP with an SSRF guard, and opening files beneath a root
 * (see fetch.h).
 */
#include "fetch.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/syscall.h>
#include <unistd.h>

/* ---- addresses ---- */

static int v4_blocked(uint32_t a, const char **why)
{
	static const struct {
		uint32_t net, mask;
		const char *why;
	} r[] = {
		{ 0x00000000, 0xff000000, "an unspecified (0.0.0.0/8)" },
		{ 0x0a000000, 0xff000000, "a private (10.0.0.0/8)" },
		{ 0x64400000, 0xffc00000, "a shared CGNAT (100.64.0.0/10)" },
		{ 0x7f000000, 0xff000000, "a loopback" },
		{ 0xa9fe0000, 0xffff0000, "a link-local (169.254.0.0/16, cloud metadata)" },
		{ 0xac100000, 0xfff00000, "a private (172.16.0.0/12)" },
		{ 0xc0000000, 0xffffff00, "an IETF protocol (192.0.0.0/24)" },
		{ 0xc0a80000, 0xffff0000, "a private (192.168.0.0/16)" },
		{ 0xc6120000, 0xfffe0000, "a benchmarking (198.18.0.0/15)" },
		{ 0xe0000000, 0xf0000000, "a multicast" },
		{ 0xf0000000, 0xf0000000, "a reserved (240.0.0.0/4)" },
	};
	for (size_t i = 0; i < sizeof r / sizeof r[0]; i++)
		if ((a & r[i].mask) == r[i].net) {
			*why = r[i].why;
			return 1;
		}
	return 0;
}

int gp_addr_blocked(const struct sockaddr *sa, const char **why)
{
	const char *dummy;
	if (!why)
		why = &dummy;
	if (sa->sa_family == AF_INET) {
		const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
		return v4_blocked(ntohl(in->sin_addr.s_addr), why);
	}
	if (sa->sa_family != AF_INET6) {
		*why = "a non-IP";
		return 1;
	}
	const uint8_t *b = ((const struct sockaddr_in6 *)sa)->sin6_addr.s6_addr;
	static const uint8_t zero[16];
	if (!memcmp(b, zero, 15) && (b[15] == 0 || b[15] == 1)) {
		*why = b[15] ? "a loopback" : "an unspecified";
		return 1;
	}
	/* ::ffff:a.b.c.d (mapped), ::a.b.c.d (compatible), 64:ff9b::a.b.c.d (NAT64) */
	static const uint8_t mapped[12] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff };
	static const uint8_t nat64[12] = { 0, 0x64, 0xff, 0x9b };
	if (!memcmp(b, mapped, 12) || !memcmp(b, zero, 12) || !memcmp(b, nat64, 12)) {
		uint32_t a = (uint32_t)b[12] << 24 | (uint32_t)b[13] << 16 | (uint32_t)b[14] << 8 |
			     b[15];
		if (v4_blocked(a, why))
			return 1;
		if (!memcmp(b, zero, 12)) {
			*why = "an IPv4-compatible (deprecated)";
			return 1;
		}
		return 0;
	}
	if ((b[0] & 0xfe) == 0xfc) {
		*why = "a unique-local (fc00::/7)";
		return 1;
	}
	if (b[0] == 0xfe && (b[1] & 0xc0) == 0x80) {
		*why = "a link-local (fe80::/10)";
		return 1;
	}
	if (b[0] == 0xfe && (b[1] & 0xc0) == 0xc0) {
		*why = "a site-local (fec0::/10)";
		return 1;
	}
	if (b[0] == 0xff) {
		*why = "a multicast";
		return 1;
	}
	if (b[0] == 0x01 && !memcmp(b + 1, zero, 7)) {
		*why = "a discard (100::/64)";
		return 1;
	}
	return 0;
}

/* ---- HTTP ---- */

struct hop {
	int allowed;
	char refused[200];
	uint8_t *buf;
	size_t len, cap, max;
	int too_big;
};

static curl_socket_t open_socket(void *clientp, curlsocktype purpose, struct curl_sockaddr *a)
{
	struct hop *h = clientp;
	(void)purpose;
	const char *why = NULL;
	if (!h->allowed && gp_addr_blocked(&a->addr, &why)) {
		char ip[INET6_ADDRSTRLEN] = "?";
		if (a->family == AF_INET)
			inet_ntop(AF_INET, &((struct sockaddr_in *)&a->addr)->sin_addr, ip, sizeof ip);
		else if (a->family == AF_INET6)
			inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&a->addr)->sin6_addr, ip,
				  sizeof ip);
		snprintf(h->refused, sizeof h->refused, "%s is %s address", ip, why);
		return CURL_SOCKET_BAD;
	}
	return socket(a->family, a->socktype | SOCK_CLOEXEC, a->protocol);
}

static size_t on_body(char *data, size_t size, size_t n, void *clientp)
{
	struct hop *h = clientp;
	size_t k = size * n;
	if (h->len + k > h->max) {
		h->too_big = 1;
		return 0;
	}
	if (h->len + k + 1 > h->cap) {
		size_t nc = h->cap ? h->cap : 65536;
		while (nc < h->len + k + 1)
			nc *= 2;
		uint8_t *p = realloc(h->buf, nc);
		if (!p)
			return 0;
		h->buf = p;
		h->cap = nc;
	}
	memcpy(h->buf + h->len, data, k);
	h->len += k;
	return k;
}

static int host_allowed(const char *host, const struct gp_fetch_options *o)
{
	for (int i = 0; i < o->n_allow_hosts; i++)
		if (o->allow_hosts[i] && !strcasecmp(o->allow_hosts[i], host))
			return 1;
	return 0;
}

/* The host as written in url (no normalization), or "" when absent. */
static void raw_host(const char *url, char *out, size_t len)
{
	out[0] = '\0';
	const char *p = strstr(url, "://");
	if (!p)
		return;
	p += 3;
	size_t alen = strcspn(p, "/?#");
	const char *at = NULL;
	for (size_t i = 0; i < alen; i++)
		if (p[i] == '@')
			at = p + i;
	const char *h = at ? at + 1 : p;
	size_t hl = (size_t)(p + alen - h);
	if (hl && h[0] == '[') {
		const char *e = memchr(h, ']', hl);
		hl = e ? (size_t)(e - h) + 1 : hl;
	} else {
		const char *e = memchr(h, ':', hl);
		hl = e ? (size_t)(e - h) : hl;
	}
	snprintf(out, len, "%.*s", (int)hl, h);
}

/*
 * Scheme and host of url, checked. *allowed: the host as written is in
 * allow_hosts and libcurl reads the same host (an IPv4 address spelled
 * another way, or any parser disagreement, is not allowed).
 */
static gp_status check_url(const char *url, const struct gp_fetch_options *o, char *host,
			   size_t hlen, int *allowed, struct gp_err *err)
{
	CURLU *u = curl_url();
	char *scheme = NULL, *h = NULL;
	gp_status st = GP_OK;
	if (!u)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	CURLUcode rc = curl_url_set(u, CURLUPART_URL, url, CURLU_NON_SUPPORT_SCHEME);
	if (rc) {
		st = gp_err_set(err, GP_ERR_INVALID, "\"%.200s\" is not a URL: %s", url,
				curl_url_strerror(rc));
		goto out;
	}
	curl_url_get(u, CURLUPART_SCHEME, &scheme, 0);
	if (!scheme || (strcasecmp(scheme, "http") && strcasecmp(scheme, "https"))) {
		st = gp_err_set(err, GP_ERR_INVALID,
				"refused \"%.200s\": scheme \"%s\" is not allowed (http and https "
				"only)",
				url, scheme ? scheme : "");
		goto out;
	}
	if (curl_url_get(u, CURLUPART_HOST, &h, 0) || !h || !*h) {
		st = gp_err_set(err, GP_ERR_INVALID, "refused \"%.200s\": no host", url);
		goto out;
	}
	snprintf(host, hlen, "%s", h);
	char raw[256];
	raw_host(url, raw, sizeof raw);
	*allowed = host_allowed(raw, o) && !strcasecmp(raw, h);
out:
	curl_free(scheme);
	curl_free(h);
	curl_url_cleanup(u);
	return st;
}

gp_status gp_fetch(const char *url, const struct gp_fetch_options *o, uint8_t **body,
		   size_t *len, char *final_url, size_t final_len, struct gp_err *err)
{
	long long connect_ms = o->connect_timeout_ms > 0 ? o->connect_timeout_ms : 10000;
	long long total_ms = o->total_timeout_ms > 0 ? o->total_timeout_ms : 60000;
	size_t max = o->max_bytes ? o->max_bytes : (size_t)64 << 20;
	int max_redirects = o->max_redirects >= 0 ? o->max_redirects : 5;
	char *cur = strdup(url);
	gp_status st = GP_OK;
	struct hop h = { 0 };
	if (!cur)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	struct timespec t0;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (int hopn = 0;; hopn++) {
		char host[256];
		int allowed = 0;
		if ((st = check_url(cur, o, host, sizeof host, &allowed, err)))
			break;
		free(h.buf);
		h = (struct hop){ .allowed = allowed, .max = max };
		struct timespec t1;
		clock_gettime(CLOCK_MONOTONIC, &t1);
		long long left = total_ms - ((t1.tv_sec - t0.tv_sec) * 1000 +
					     (t1.tv_nsec - t0.tv_nsec) / 1000000);
		if (left <= 0) {
			st = gp_err_set(err, GP_ERR_TIMEOUT, "fetching \"%.200s\": timed out", url);
			break;
		}
		CURL *c = curl_easy_init();
		if (!c) {
			st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
			break;
		}
		curl_easy_setopt(c, CURLOPT_URL, cur);
		curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
		curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L);
		curl_easy_setopt(c, CURLOPT_NOPROXY, "*");
		curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
		curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, (long)connect_ms);
		curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, (long)left);
		curl_easy_setopt(c, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)max);
		curl_easy_setopt(c, CURLOPT_OPENSOCKETFUNCTION, open_socket);
		curl_easy_setopt(c, CURLOPT_OPENSOCKETDATA, &h);
		curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
		curl_easy_setopt(c, CURLOPT_WRITEDATA, &h);
		curl_easy_setopt(c, CURLOPT_USERAGENT, "genpipe-ingest/" GENPIPE_VERSION);
		CURLcode cr = curl_easy_perform(c);
		long code = 0;
		char *loc = NULL;
		curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
		curl_easy_getinfo(c, CURLINFO_REDIRECT_URL, &loc);
		char *next = loc ? strdup(loc) : NULL;
		curl_easy_cleanup(c);
		if (h.refused[0]) {
			st = gp_err_set(err, GP_ERR_INVALID,
					"refused \"%.200s\"%s: host \"%s\" resolves to %s (allow it "
					"with allow_hosts)",
					cur, hopn ? " (a redirect)" : "", host, h.refused);
		} else if (h.too_big || cr == CURLE_FILESIZE_EXCEEDED) {
			st = gp_err_set(err, GP_ERR_TOO_BIG, "\"%.200s\" is larger than %zu bytes",
					cur, max);
		} else if (cr == CURLE_OPERATION_TIMEDOUT) {
			st = gp_err_set(err, GP_ERR_TIMEOUT, "fetching \"%.200s\": timed out", cur);
		} else if (cr != CURLE_OK) {
			st = gp_err_set(err, GP_ERR_IO, "fetching \"%.200s\": %s", cur,
					curl_easy_strerror(cr));
		} else if (code >= 300 && code < 400 && next) {
			if (hopn >= max_redirects) {
				st = gp_err_set(err, GP_ERR_INVALID,
						"fetching \"%.200s\": more than %d redirects", url,
						max_redirects);
			} else {
				free(cur);
				cur = next;
				continue;
			}
		} else if (code < 200 || code >= 300) {
			st = gp_err_set(err, GP_ERR_IO, "fetching \"%.200s\": HTTP status %ld", cur,
					code);
		}
		free(next);
		break;
	}
	if (!st) {
		if (!h.buf && !(h.buf = malloc(1)))
			st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	}
	if (!st) {
		h.buf[h.len] = '\0';
		*body = h.buf;
		*len = h.len;
		if (final_url)
			snprintf(final_url, final_len, "%s", cur);
	} else {
		free(h.buf);
	}
	free(cur);
	return st;
}

/* ---- files beneath a root ---- */

int gp_path_escapes(const char *rel)
{
	if (!rel || rel[0] == '/')
		return 1;
	for (const char *p = rel; *p;) {
		const char *e = strchr(p, '/');
		size_t n = e ? (size_t)(e - p) : strlen(p);
		if (n == 2 && p[0] == '.' && p[1] == '.')
			return 1;
		p += n;
		while (*p == '/')
			p++;
	}
	return 0;
}

static int walk_open(int rootfd, const char *rel, int flags)
{
	/* no openat2: refuse ".." and every symlink, one component at a time */
	if (gp_path_escapes(rel)) {
		errno = EXDEV;
		return -1;
	}
	char buf[4096];
	snprintf(buf, sizeof buf, "%s", rel);
	int dir = dup(rootfd);
	char *save = NULL;
	char *part = strtok_r(buf, "/", &save);
	while (part && dir >= 0) {
		char *next = strtok_r(NULL, "/", &save);
		int f = next ? (O_RDONLY | O_DIRECTORY) : flags;
		int fd = openat(dir, part, f | O_NOFOLLOW | O_CLOEXEC);
		int e = errno;
		close(dir);
		if (fd < 0) {
			errno = e == ELOOP ? EXDEV : e;
			return -1;
		}
		dir = fd;
		part = next;
	}
	return dir;
}

int gp_beneath_open(int rootfd, const char *rel, int flags)
{
	static int no_openat2;
	if (!rel || !*rel || rel[0] == '/') {
		errno = EXDEV;
		return -1;
	}
	if (!no_openat2) {
		struct open_how how = { .flags = (unsigned long long)(flags | O_CLOEXEC),
					.resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS };
		long fd = syscall(SYS_openat2, rootfd, rel, &how, sizeof how);
		if (fd >= 0 || errno != ENOSYS)
			return (int)fd;
		no_openat2 = 1;
	}
	return walk_open(rootfd, rel, flags);
}
