/*
 * test_ingest: what untrusted input meets first. The SSRF table runs
 * against a loopback HTTP server in this process that counts connections:
 * every refused form must leave the count unchanged (refused before any
 * connection), while the explicitly allowed host works. The traversal
 * table builds a root with escaping symlinks next to a secret file and
 * checks that no form reads the secret. No database or NATS is used.
 */
#include <arpa/inet.h>
#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "../check.h"
#include "dataset.h"
#include "fetch.h"
#include "ingest.h"

static int srv_fd, srv_port;
static atomic_int connections;

static void *serve(void *arg)
{
	(void)arg;
	for (;;) {
		int c = accept(srv_fd, NULL, NULL);
		if (c < 0)
			return NULL;
		atomic_fetch_add(&connections, 1);
		char req[2048];
		ssize_t n = read(c, req, sizeof req - 1);
		req[n > 0 ? n : 0] = '\0';
		char path[256] = "/";
		sscanf(req, "GET %255s", path);
		char resp[4096];
		if (!strcmp(path, "/ok")) {
			const char *b = "hello from the test server\n%\nsecond document\n";
			snprintf(resp, sizeof resp,
				 "HTTP/1.1 200 OK\r\nContent-Length: %zu\r\nConnection: close\r\n\r\n%s",
				 strlen(b), b);
		} else if (!strcmp(path, "/to-loopback")) {
			snprintf(resp, sizeof resp,
				 "HTTP/1.1 302 Found\r\nLocation: http://localhost:%d/ok\r\n"
				 "Content-Length: 0\r\nConnection: close\r\n\r\n",
				 srv_port);
		} else if (!strcmp(path, "/to-ok")) {
			snprintf(resp, sizeof resp,
				 "HTTP/1.1 301 Moved\r\nLocation: /ok\r\nContent-Length: 0\r\n"
				 "Connection: close\r\n\r\n");
		} else if (!strcmp(path, "/to-file")) {
			snprintf(resp, sizeof resp,
				 "HTTP/1.1 302 Found\r\nLocation: file:///etc/passwd\r\n"
				 "Content-Length: 0\r\nConnection: close\r\n\r\n");
		} else if (!strcmp(path, "/loop")) {
			snprintf(resp, sizeof resp,
				 "HTTP/1.1 302 Found\r\nLocation: /loop\r\nContent-Length: 0\r\n"
				 "Connection: close\r\n\r\n");
		} else if (!strcmp(path, "/big")) {
			snprintf(resp, sizeof resp,
				 "HTTP/1.1 200 OK\r\nContent-Length: 5000000\r\nConnection: close\r\n\r\n");
			if (write(c, resp, strlen(resp)) < 0) {
			}
			static char junk[65536];
			memset(junk, 'x', sizeof junk);
			for (int i = 0; i < 77; i++)
				if (write(c, junk, sizeof junk) < 0)
					break;
			close(c);
			continue;
		} else {
			snprintf(resp, sizeof resp,
				 "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
		}
		if (write(c, resp, strlen(resp)) < 0) {
		}
		close(c);
	}
}

static void start_server(void)
{
	srv_fd = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	REQUIRE(bind(srv_fd, (struct sockaddr *)&a, sizeof a) == 0);
	socklen_t l = sizeof a;
	getsockname(srv_fd, (struct sockaddr *)&a, &l);
	srv_port = ntohs(a.sin_port);
	REQUIRE(listen(srv_fd, 64) == 0);
	pthread_t t;
	pthread_create(&t, NULL, serve, NULL);
	pthread_detach(t);
}

static void test_ssrf(void)
{
	const char *allow[] = { "127.0.0.1" };
	struct gp_fetch_options o = { .allow_hosts = allow, .n_allow_hosts = 1,
				      .connect_timeout_ms = 2000, .total_timeout_ms = 5000,
				      .max_redirects = 3, .max_bytes = 1 << 20 };
	struct gp_fetch_options none = o;
	none.n_allow_hosts = 0;
	struct gp_err e = { 0 };
	uint8_t *body;
	size_t len;
	char url[256], final[256];
	/* the allowed loopback server works, redirects included */
	snprintf(url, sizeof url, "http://127.0.0.1:%d/ok", srv_port);
	int before = atomic_load(&connections);
	REQUIRE_OK(gp_fetch(url, &o, &body, &len, final, sizeof final, &e), e);
	CHECK(len > 10 && !memcmp(body, "hello", 5));
	free(body);
	CHECK(atomic_load(&connections) == before + 1);
	snprintf(url, sizeof url, "http://127.0.0.1:%d/to-ok", srv_port);
	REQUIRE_OK(gp_fetch(url, &o, &body, &len, final, sizeof final, &e), e);
	CHECK(len > 10);
	CHECK_CONTAINS(final, "/ok");
	free(body);

	struct {
		const char *fmt;
		const struct gp_fetch_options *o;
		const char *msg;
	} refused[] = {
		{ "http://127.0.0.1:%d/ok", &none, "loopback" },      /* not allowed here */
		{ "http://2130706433:%d/ok", &o, "loopback" },        /* decimal */
		{ "http://0x7f000001:%d/ok", &o, "loopback" },        /* hex */
		{ "http://127.1:%d/ok", &o, "loopback" },             /* short form */
		{ "http://0177.0.0.1:%d/ok", &o, "loopback" },        /* octal */
		{ "http://[::ffff:127.0.0.1]:%d/ok", &o, "loopback" }, /* IPv6-mapped */
		{ "http://[::ffff:7f00:1]:%d/ok", &o, "loopback" },
		{ "http://[::1]:%d/ok", &o, "loopback" },
		{ "http://localhost:%d/ok", &o, "loopback" },         /* a name resolving to it */
		{ "http://x@localhost:%d/ok", &o, "loopback" },
		{ "http://0.0.0.0:%d/ok", &o, "unspecified" },
		{ "http://169.254.169.254:%d/latest/meta-data/", &o, "link-local" },
		{ "http://[::ffff:169.254.169.254]:%d/", &o, "link-local" },
		{ "http://[fd00:ec2::254]:%d/", &o, "unique-local" },
		{ "http://10.1.2.3:%d/", &o, "private" },
		{ "http://192.168.0.1:%d/", &o, "private" },
		{ "http://172.16.5.4:%d/", &o, "private" },
		{ "http://100.64.0.1:%d/", &o, "CGNAT" },
		{ "http://127.0.0.1:%d/to-loopback", &o, "a redirect" }, /* redirect to loopback */
		{ "http://127.0.0.1:%d/to-file", &o, "scheme \"file\"" },
		{ "file:///etc/passwd#%d", &o, "scheme \"file\"" },
		{ "gopher://127.0.0.1:%d/_GET", &o, "scheme \"gopher\"" },
		{ "ftp://127.0.0.1:%d/", &o, "scheme \"ftp\"" },
		{ "dict://127.0.0.1:%d/", &o, "scheme \"dict\"" },
	};
	for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++) {
		snprintf(url, sizeof url, refused[i].fmt, srv_port);
		int redirect = strstr(url, "/to-") != NULL;
		before = atomic_load(&connections);
		memset(&e, 0, sizeof e);
		gp_status st = gp_fetch(url, refused[i].o, &body, &len, NULL, 0, &e);
		if (st != GP_ERR_INVALID || !strstr(e.msg, refused[i].msg))
			fprintf(stderr, "case %s: status %d: %s\n", url, st, e.msg);
		CHECK(st == GP_ERR_INVALID);
		CHECK(strstr(e.msg, refused[i].msg) != NULL);
		/* nothing reached the server (a redirect case: only the first hop) */
		CHECK(atomic_load(&connections) == before + redirect);
	}
	/* limits */
	snprintf(url, sizeof url, "http://127.0.0.1:%d/loop", srv_port);
	CHECK(gp_fetch(url, &o, &body, &len, NULL, 0, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "more than 3 redirects");
	snprintf(url, sizeof url, "http://127.0.0.1:%d/big", srv_port);
	CHECK(gp_fetch(url, &o, &body, &len, NULL, 0, &e) == GP_ERR_TOO_BIG);
	snprintf(url, sizeof url, "http://127.0.0.1:%d/missing", srv_port);
	CHECK(gp_fetch(url, &o, &body, &len, NULL, 0, &e) == GP_ERR_IO);
	CHECK_CONTAINS(e.msg, "HTTP status 404");
}

static void test_addr_table(void)
{
	struct {
		const char *ip;
		int blocked;
	} t[] = {
		{ "8.8.8.8", 0 },	 { "1.1.1.1", 0 },	     { "127.0.0.1", 1 },
		{ "127.255.255.254", 1 }, { "10.0.0.1", 1 },	     { "172.31.255.255", 1 },
		{ "172.32.0.1", 0 },	 { "192.168.1.1", 1 },	     { "169.254.169.254", 1 },
		{ "100.64.0.1", 1 },	 { "100.128.0.1", 0 },	     { "0.0.0.0", 1 },
		{ "224.0.0.1", 1 },	 { "255.255.255.255", 1 },   { "::1", 1 },
		{ "::", 1 },		 { "::ffff:127.0.0.1", 1 },  { "::ffff:8.8.8.8", 0 },
		{ "64:ff9b::7f00:1", 1 }, { "64:ff9b::808:808", 0 }, { "fe80::1", 1 },
		{ "fc00::1", 1 },	 { "fd00:ec2::254", 1 },     { "ff02::1", 1 },
		{ "2001:4860:4860::8888", 0 }, { "::127.0.0.1", 1 },
	};
	for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
		struct sockaddr_storage ss = { 0 };
		if (strchr(t[i].ip, ':')) {
			struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
			a->sin6_family = AF_INET6;
			REQUIRE(inet_pton(AF_INET6, t[i].ip, &a->sin6_addr) == 1);
		} else {
			struct sockaddr_in *a = (struct sockaddr_in *)&ss;
			a->sin_family = AF_INET;
			REQUIRE(inet_pton(AF_INET, t[i].ip, &a->sin_addr) == 1);
		}
		const char *why = NULL;
		int b = gp_addr_blocked((struct sockaddr *)&ss, &why);
		if (b != t[i].blocked)
			fprintf(stderr, "address %s: blocked=%d, expected %d\n", t[i].ip, b,
				t[i].blocked);
		CHECK(b == t[i].blocked);
	}
}

static char tmp[] = "/tmp/gp-ingest-XXXXXX";

static void put(const char *rel, const char *text)
{
	char p[512];
	snprintf(p, sizeof p, "%s/%s", tmp, rel);
	FILE *f = fopen(p, "w");
	REQUIRE(f);
	fputs(text, f);
	fclose(f);
}

/* Collect with sources (a NULL-terminated list) and extra JSON params. */
static gp_status collect(const char *extra, struct gp_ingest_result *res, struct gp_err *e,
			 const char *roots, ...)
{
	va_list ap;
	va_start(ap, roots);
	cJSON *p = cJSON_Parse(extra ? extra : "{}");
	cJSON *s = cJSON_AddArrayToObject(p, "sources");
	for (const char *src; (src = va_arg(ap, const char *));)
		cJSON_AddItemToArray(s, cJSON_CreateString(src));
	va_end(ap);
	struct gp_ingest_config cfg = { .roots = roots };
	gp_status st = gp_ingest_collect(p, &cfg, NULL, 0, NULL, NULL, res, e);
	cJSON_Delete(p);
	return st;
}

/* Whether any document of the result contains needle. */
static int contains(const struct gp_ingest_result *r, const char *needle)
{
	struct gp_dataset_reader rd;
	struct gp_err e = { 0 };
	if (gp_dataset_open(&rd, r->data.p, r->data.len, &e))
		return -1;
	for (;;) {
		struct gp_doc d;
		int more = 0;
		if (gp_dataset_next(&rd, &d, &more, &e))
			return -1;
		if (!more)
			return 0;
		if (memmem(d.text, d.len, needle, strlen(needle)))
			return 1;
	}
}

static long long dropped(const struct gp_ingest_result *r, const char *why)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(r->dropped, why);
	return v ? (long long)v->valuedouble : 0;
}

static void test_traversal(void)
{
	char root[512], d[512], p[1024];
	snprintf(root, sizeof root, "%s/root", tmp);
	REQUIRE(mkdir(root, 0755) == 0);
	snprintf(d, sizeof d, "%s/secret", tmp);
	REQUIRE(mkdir(d, 0755) == 0);
	snprintf(d, sizeof d, "%s/root/sub", tmp);
	REQUIRE(mkdir(d, 0755) == 0);
	put("secret/key.txt", "TOP-SECRET\n");
	put("root/a.txt", "public a\n");
	put("root/sub/b.txt", "public b\n");
	snprintf(p, sizeof p, "%s/root/escape.txt", tmp);
	REQUIRE(symlink("../secret/key.txt", p) == 0);
	snprintf(p, sizeof p, "%s/root/abs.txt", tmp);
	char target[600];
	snprintf(target, sizeof target, "%s/secret/key.txt", tmp);
	REQUIRE(symlink(target, p) == 0);
	snprintf(p, sizeof p, "%s/root/sub/up.txt", tmp);
	REQUIRE(symlink("../../secret/key.txt", p) == 0);
	snprintf(p, sizeof p, "%s/root/dirlink", tmp);
	REQUIRE(symlink("../secret", p) == 0);
	snprintf(p, sizeof p, "%s/root/inside.txt", tmp);
	REQUIRE(symlink("sub/b.txt", p) == 0);

	struct gp_ingest_result r;
	struct gp_err e = { 0 };
	/* the whole root: public files read, every escaping link refused */
	REQUIRE_OK(collect(NULL, &r, &e, tmp, root, NULL), e);
	CHECK(contains(&r, "public a") == 1 && contains(&r, "public b") == 1);
	CHECK(contains(&r, "TOP-SECRET") == 0);
	CHECK(dropped(&r, "outside_root") == 4); /* escape, abs, sub/up, dirlink */
	CHECK(dropped(&r, "duplicate") == 1);    /* inside.txt is b.txt again */
	CHECK(r.documents == 2);
	gp_ingest_result_free(&r);

	/* forms refused outright, each with the reason */
	char s1[600], s2[600], s3[600], s4[600];
	snprintf(s1, sizeof s1, "%s/../secret/key.txt", root);
	snprintf(s2, sizeof s2, "%s/root/../secret", tmp);
	snprintf(s3, sizeof s3, "file://%s/sub/../../secret/key.txt", root);
	snprintf(s4, sizeof s4, "%s/*/../../secret/*", root);
	const char *bad[] = { s1, s2, s3, s4 };
	for (int i = 0; i < 4; i++) {
		CHECK(collect(NULL, &r, &e, tmp, bad[i], NULL) == GP_ERR_INVALID);
		CHECK_CONTAINS(e.msg, "\"..\"");
	}
	CHECK(collect("{\"include\":[\"../secret/*\"]}", &r, &e, tmp, root, NULL) ==
	      GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "leaves the source root");
	CHECK(collect("{\"exclude\":[\"/etc/*\"]}", &r, &e, tmp, root, NULL) == GP_ERR_INVALID);
	CHECK(collect(NULL, &r, &e, tmp, "relative/path", NULL) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "must be absolute");
	/* a root outside the allowed roots */
	snprintf(d, sizeof d, "%s/secret", tmp);
	CHECK(collect(NULL, &r, &e, root, d, NULL) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "not under the service's allowed roots");
	/* a link to a directory outside, named as the source: resolved first */
	snprintf(p, sizeof p, "%s/dirlink", root);
	CHECK(collect(NULL, &r, &e, root, p, NULL) == GP_ERR_INVALID);
	/* the link itself as a file source is refused, a glob through it too */
	snprintf(p, sizeof p, "%s/escape.txt", root);
	REQUIRE_OK(collect(NULL, &r, &e, tmp, p, NULL), e);
	CHECK(r.documents == 0 && dropped(&r, "outside_root") == 1);
	gp_ingest_result_free(&r);
	snprintf(p, sizeof p, "%s/dirlink/*", root);
	CHECK(collect(NULL, &r, &e, root, p, NULL) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "secret\" is not under");
	/* globs and include/exclude */
	snprintf(p, sizeof p, "%s/sub/*.txt", root);
	REQUIRE_OK(collect(NULL, &r, &e, tmp, p, NULL), e);
	CHECK(r.documents == 1 && contains(&r, "public b") == 1);
	gp_ingest_result_free(&r);
	REQUIRE_OK(collect("{\"exclude\":[\"sub/*\",\"inside.txt\"],\"include\":[\"*.txt\"]}", &r, &e, tmp, root,
			   NULL),
		   e);
	CHECK(contains(&r, "public a") == 1 && contains(&r, "public b") == 0);
	gp_ingest_result_free(&r);
	/* other schemes */
	CHECK(collect(NULL, &r, &e, tmp, "gopher://x/", NULL) == GP_ERR_INVALID);
	CHECK(collect(NULL, &r, &e, tmp, "feedback:m", NULL) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "no database");
}

static void test_documents(void)
{
	char dir[512], p[600];
	snprintf(dir, sizeof dir, "%s/docs", tmp);
	REQUIRE(mkdir(dir, 0755) == 0);
	put("docs/f1", "one\n%\ntwo\nlines\n%\none\n%\n\n%\n");
	put("docs/bad", "ok \xff\xfe then \xc0\xaf overlong \xed\xa0\x80 surrogate\n");
	snprintf(p, sizeof p, "%s/docs/z.gz", tmp);
	gzFile g = gzopen(p, "wb");
	REQUIRE(g);
	gzputs(g, "compressed one\n%\ncompressed two\n");
	gzclose(g);
	struct gp_ingest_result r;
	struct gp_err e = { 0 };
	REQUIRE_OK(collect("{\"split\":\"%\"}", &r, &e, tmp, dir, NULL), e);
	/* bad(1) + f1: one, two\nlines (one again: duplicate; blank: empty) + z.gz: 2 */
	CHECK(r.documents == 5);
	CHECK(dropped(&r, "duplicate") == 1);
	CHECK(dropped(&r, "empty") == 1);
	CHECK(contains(&r, "compressed two") == 1);
	CHECK(contains(&r, "two\nlines") == 1);
	CHECK(contains(&r, "ok \xef\xbf\xbd\xef\xbf\xbd then") == 1);
	CHECK(r.utf8_replaced == 1);
	gp_ingest_result_free(&r);
	REQUIRE_OK(collect("{\"split\":\"%\",\"invalid_utf8\":\"drop\"}", &r, &e, tmp, dir, NULL),
		   e);
	CHECK(dropped(&r, "invalid_utf8") == 1 && r.documents == 4);
	gp_ingest_result_free(&r);
	REQUIRE_OK(collect("{\"split\":\"%\",\"max_doc_size\":\"8\"}", &r, &e, tmp, dir, NULL), e);
	CHECK(dropped(&r, "too_large") == 4 && r.documents == 1); /* only "one\n" fits */
	gp_ingest_result_free(&r);
	REQUIRE_OK(collect("{\"split\":\"lines\"}", &r, &e, tmp, dir, NULL), e);
	CHECK(contains(&r, "lines") == 1 && contains(&r, "two\nlines") == 0);
	gp_ingest_result_free(&r);
	CHECK(collect("{\"max_total_size\":\"10\"}", &r, &e, tmp, dir, NULL) == GP_ERR_TOO_BIG);
	CHECK_CONTAINS(e.msg, "max_total_size");
	CHECK(collect("{\"invalid_utf8\":\"ignore\"}", &r, &e, tmp, dir, NULL) == GP_ERR_INVALID);
	CHECK(collect("{\"max_doc_size\":\"lots\"}", &r, &e, tmp, dir, NULL) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "with.max_doc_size");
	CHECK(collect("{\"timeout\":\"soon\"}", &r, &e, tmp, dir, NULL) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "with.timeout");
	CHECK(collect("{\"max_redirects\":50}", &r, &e, tmp, dir, NULL) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "with.max_redirects");
	/* the fingerprint follows file changes */
	cJSON *pj = cJSON_Parse("{}");
	cJSON_AddItemToArray(cJSON_AddArrayToObject(pj, "sources"), cJSON_CreateString(dir));
	struct gp_ingest_config cfg = { .roots = tmp };
	char f1[65], f2[65];
	REQUIRE_OK(gp_ingest_collect(pj, &cfg, NULL, 1, NULL, NULL, &r, &e), e);
	snprintf(f1, sizeof f1, "%s", r.fingerprint);
	gp_ingest_result_free(&r);
	REQUIRE_OK(gp_ingest_collect(pj, &cfg, NULL, 1, NULL, NULL, &r, &e), e);
	CHECK_STR(r.fingerprint, f1);
	gp_ingest_result_free(&r);
	put("docs/f1", "changed\n");
	REQUIRE_OK(gp_ingest_collect(pj, &cfg, NULL, 1, NULL, NULL, &r, &e), e);
	snprintf(f2, sizeof f2, "%s", r.fingerprint);
	CHECK(strlen(f2) == 64 && strcmp(f1, f2) != 0);
	gp_ingest_result_free(&r);
	cJSON_Delete(pj);
}

static void test_utf8(void)
{
	struct {
		const char *in;
		size_t bad;
	} t[] = {
		{ "plain ascii", 0 },	       { "caf\xc3\xa9", 0 },	    { "\xe2\x82\xac", 0 },
		{ "\xf0\x9f\x98\x80", 0 },     { "\xc3", 1 },		    { "\xc0\x80", 1 },
		{ "\xe0\x80\x80", 1 },	       { "\xed\xa0\x80", 1 },	    { "\xf4\x90\x80\x80", 1 },
		{ "\xf5\x80", 1 },	       { "\x80\x80", 1 },	    { "a\xffz", 1 },
	};
	for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
		size_t n = strlen(t[i].in), ol = 0;
		unsigned char out[64];
		size_t bad = gp_utf8_repair((const unsigned char *)t[i].in, n, out, &ol);
		if (bad != t[i].bad)
			fprintf(stderr, "utf8 case %zu: %zu invalid, expected %zu\n", i, bad, t[i].bad);
		CHECK(bad == t[i].bad);
		CHECK(gp_utf8_repair(out, ol, NULL, NULL) == 0); /* output always valid */
	}
}

int main(void)
{
	signal(SIGPIPE, SIG_IGN); /* the server writes to clients that gave up */
	curl_global_init(CURL_GLOBAL_DEFAULT);
	REQUIRE(mkdtemp(tmp));
	start_server();
	test_addr_table();
	test_ssrf();
	test_utf8();
	test_traversal();
	test_documents();
	char cmd[600];
	snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp);
	CHECK(system(cmd) == 0);
	return CHECK_RESULT();
}
