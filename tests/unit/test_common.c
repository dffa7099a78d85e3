/*
 * Unit tests of the pure parts of common/: status messages, config
 * precedence, JSON escaping, SQLSTATE mapping, subject tokens, metrics text.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "../check.h"
#include "bus.h"
#include "config.h"
#include "db.h"
#include "gpu.h"
#include "http.h"
#include "log.h"
#include "status.h"
#include "worker.h"

static void test_err(void)
{
	struct gp_err e = { 0 };
	CHECK(gp_err_set(&e, GP_ERR_IO, "could not open \"%s\"", "x.bin") == GP_ERR_IO);
	CHECK_STR(e.msg, "could not open \"x.bin\"");
	gp_err_wrap(&e, "checkpoint %d", 4);
	CHECK_STR(e.msg, "checkpoint 4: could not open \"x.bin\"");
	CHECK(e.status == GP_ERR_IO);
	CHECK_STR(gp_status_str(GP_ERR_TIMEOUT), "timeout");
	CHECK_STR(gp_status_str((gp_status)999), "unknown status");
	/* A long message is cut, never overflowed. */
	char big[2000];
	memset(big, 'a', sizeof big - 1);
	big[sizeof big - 1] = 0;
	gp_err_set(&e, GP_ERR_INVALID, "%s", big);
	CHECK(strlen(e.msg) == GP_ERR_MSG_MAX - 1);
	gp_err_wrap(&e, "%s", big);
	CHECK(strlen(e.msg) == GP_ERR_MSG_MAX - 1);
	CHECK(gp_err_set(NULL, GP_ERR_NOMEM, "x") == GP_ERR_NOMEM);
}

static void test_config(void)
{
	const char *url = NULL, *name = NULL;
	long long port = 0;
	int verbose = 0;
	struct gp_opt opts[] = {
		{ "url", "GP_TEST_URL", GP_OPT_STR, "nats://d", "url", &url },
		{ "name", NULL, GP_OPT_STR, NULL, "name", &name },
		{ "port", "GP_TEST_PORT", GP_OPT_INT, "10", "port", &port },
		{ "verbose", "GP_TEST_VERBOSE", GP_OPT_BOOL, "false", "v", &verbose },
	};
	struct gp_err e = { 0 };
	int first = 0, help = 0;

	/* defaults */
	unsetenv("GP_TEST_URL");
	unsetenv("GP_TEST_PORT");
	char *a0[] = { "prog", "pos1", NULL };
	REQUIRE_OK(gp_config_parse(opts, 4, 2, a0, "prog", stdout, &first, &help, &e), e);
	CHECK_STR(url, "nats://d");
	CHECK(port == 10);
	CHECK(name == NULL);
	CHECK(first == 1 && !strcmp(a0[first], "pos1"));

	/* environment over default, flag over environment */
	setenv("GP_TEST_URL", "nats://env", 1);
	setenv("GP_TEST_PORT", "20", 1);
	char *a1[] = { "prog", "--port", "30", "run", "--verbose", "--name=x", "--", "--lit", NULL };
	REQUIRE_OK(gp_config_parse(opts, 4, 8, a1, "prog", stdout, &first, &help, &e), e);
	CHECK_STR(url, "nats://env");
	CHECK(port == 30);
	CHECK(verbose == 1);
	CHECK_STR(name, "x");
	CHECK(8 - first == 2);
	CHECK_STR(a1[first], "run");
	CHECK_STR(a1[first + 1], "--lit");

	/* --no-bool */
	char *a2[] = { "prog", "--verbose", "--no-verbose", NULL };
	REQUIRE_OK(gp_config_parse(opts, 4, 3, a2, "prog", stdout, &first, &help, &e), e);
	CHECK(verbose == 0);

	/* errors name the source */
	setenv("GP_TEST_PORT", "abc", 1);
	char *a3[] = { "prog", NULL };
	CHECK(gp_config_parse(opts, 4, 1, a3, "prog", stdout, &first, &help, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "GP_TEST_PORT");
	CHECK_CONTAINS(e.msg, "abc");
	unsetenv("GP_TEST_PORT");
	char *a4[] = { "prog", "--bogus", NULL };
	CHECK(gp_config_parse(opts, 4, 2, a4, "prog", stdout, &first, &help, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "unknown option --bogus");
	char *a5[] = { "prog", "--port", NULL };
	CHECK(gp_config_parse(opts, 4, 2, a5, "prog", stdout, &first, &help, &e) == GP_ERR_INVALID);
	CHECK_CONTAINS(e.msg, "needs a value");

	/* --help prints every option */
	FILE *f = tmpfile();
	char *a6[] = { "prog", "--help", NULL };
	REQUIRE_OK(gp_config_parse(opts, 4, 2, a6, "prog [x]", f, &first, &help, &e), e);
	CHECK(help == 1);
	rewind(f);
	char buf[2048] = { 0 };
	size_t n = fread(buf, 1, sizeof buf - 1, f);
	buf[n] = 0;
	fclose(f);
	CHECK_CONTAINS(buf, "usage: prog [x]");
	CHECK_CONTAINS(buf, "--port N");
	CHECK_CONTAINS(buf, "GP_TEST_URL");
	unsetenv("GP_TEST_URL");
}

static void test_json_escape(void)
{
	char out[64];
	size_t len = 0;
	out[0] = 0;
	gp_json_escape(out, sizeof out, &len, "a\"b\\c\n\x01");
	CHECK_STR(out, "a\\\"b\\\\c\\n\\u0001");
	/* bounded */
	char small[8];
	len = 0;
	gp_json_escape(small, sizeof small, &len, "0123456789");
	CHECK(len == 7 && strlen(small) == 7);
	CHECK(gp_log_parse_level("WARN") == GP_LOG_WARN);
	CHECK(gp_log_parse_level("verbose") == -1);
}

static void test_sqlstate(void)
{
	CHECK(gp_db_status_from_sqlstate("23505") == GP_ERR_EXISTS);
	CHECK(gp_db_status_from_sqlstate("40001") == GP_ERR_CONFLICT);
	CHECK(gp_db_status_from_sqlstate("40P01") == GP_ERR_CONFLICT);
	CHECK(gp_db_status_from_sqlstate("08006") == GP_ERR_UNAVAILABLE);
	CHECK(gp_db_status_from_sqlstate("57P01") == GP_ERR_UNAVAILABLE);
	CHECK(gp_db_status_from_sqlstate("22P02") == GP_ERR_INVALID);
	CHECK(gp_db_status_from_sqlstate("23503") == GP_ERR_INVALID);
	CHECK(gp_db_status_from_sqlstate("57014") == GP_ERR_TIMEOUT);
	CHECK(gp_db_status_from_sqlstate("XX000") == GP_ERR_DB);
	CHECK(gp_db_status_from_sqlstate(NULL) == GP_ERR_DB);
	CHECK(gp_db_status_from_sqlstate("123") == GP_ERR_DB);
	char hex[65];
	gp_sha256_hex("abc", 3, hex);
	CHECK_STR(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

static void test_tokens(void)
{
	CHECK(gp_bus_token_ok("train"));
	CHECK(gp_bus_token_ok("batch-infer"));
	CHECK(gp_bus_token_ok("a1"));
	CHECK(!gp_bus_token_ok(""));
	CHECK(!gp_bus_token_ok(NULL));
	CHECK(!gp_bus_token_ok("Train"));
	CHECK(!gp_bus_token_ok("a.b"));
	CHECK(!gp_bus_token_ok("a*"));
	CHECK(!gp_bus_token_ok(">"));
	CHECK(!gp_bus_token_ok("-a"));
	CHECK(!gp_bus_token_ok("a-"));
	char long64[65];
	memset(long64, 'a', 64);
	long64[64] = 0;
	CHECK(!gp_bus_token_ok(long64));
	long64[63] = 0;
	CHECK(gp_bus_token_ok(long64));
	int n = 0;
	const struct gp_stream_def *s = gp_bus_default_streams(&n);
	CHECK(n >= 6);
	CHECK(s[0].work_queue == 1);
}

static void test_metrics(void)
{
	struct gp_metrics *r = gp_metrics_create();
	REQUIRE(r);
	struct gp_metric *c1 = gp_metrics_get(r, GP_COUNTER, "gp_jobs_total", "Jobs\\done\nok",
					      "kind=\"a\"", NULL, 0);
	struct gp_metric *g = gp_metrics_get(r, GP_GAUGE, "gp_up", "Up", NULL, NULL, 0);
	struct gp_metric *c2 = gp_metrics_get(r, GP_COUNTER, "gp_jobs_total", "Jobs", "kind=\"b\"",
					      NULL, 0);
	static const double b[] = { 0.1, 1, 10 };
	struct gp_metric *h = gp_metrics_get(r, GP_HISTOGRAM, "gp_latency_seconds", "Latency",
					     NULL, b, 3);
	REQUIRE(c1 && g && c2 && h);
	CHECK(gp_metrics_get(r, GP_COUNTER, "gp_jobs_total", "Jobs", "kind=\"a\"", NULL, 0) == c1);
	CHECK(gp_metrics_get(r, GP_GAUGE, "gp_jobs_total", "x", NULL, NULL, 0) == NULL);
	CHECK(gp_metrics_get(r, GP_GAUGE, "bad name", "x", NULL, NULL, 0) == NULL);
	gp_metric_inc(c1, 2);
	gp_metric_inc(c2, 1);
	gp_metric_set(g, NAN);
	gp_metric_observe(h, 0.05);
	gp_metric_observe(h, 0.5);
	gp_metric_observe(h, 100);
	char *text = NULL;
	size_t len = 0;
	struct gp_err e = { 0 };
	REQUIRE_OK(gp_metrics_render(r, &text, &len, &e), e);
	CHECK(strlen(text) == len);
	CHECK_CONTAINS(text, "# HELP gp_jobs_total Jobs\\\\done\\nok\n# TYPE gp_jobs_total counter\n"
			     "gp_jobs_total{kind=\"a\"} 2\ngp_jobs_total{kind=\"b\"} 1\n");
	CHECK_CONTAINS(text, "gp_up NaN\n");
	CHECK_CONTAINS(text, "gp_latency_seconds_bucket{le=\"0.1\"} 1\n");
	CHECK_CONTAINS(text, "gp_latency_seconds_bucket{le=\"1\"} 2\n");
	CHECK_CONTAINS(text, "gp_latency_seconds_bucket{le=\"10\"} 2\n");
	CHECK_CONTAINS(text, "gp_latency_seconds_bucket{le=\"+Inf\"} 3\n");
	CHECK_CONTAINS(text, "gp_latency_seconds_count 3\n");
	/* one HELP per family even though series were added interleaved */
	char *first = strstr(text, "# HELP gp_jobs_total");
	CHECK(first && !strstr(first + 1, "# HELP gp_jobs_total"));
	free(text);
	gp_metrics_destroy(r);
}

/* Array literals for many-row statements: quoting, NULL, empty. */
static void test_db_array(void)
{
	struct gp_db_array a = { 0 };
	gp_db_array_add(&a, "plain");
	gp_db_array_add(&a, NULL);
	gp_db_array_add(&a, "a \"quoted\" {brace}, comma\\x0a");
	gp_db_array_add(&a, "");
	gp_db_array_add(&a, "NULL");
	CHECK_STR(gp_db_array_text(&a),
		  "{\"plain\",NULL,\"a \\\"quoted\\\" {brace}, comma\\\\x0a\",\"\",\"NULL\"}");
	gp_db_array_free(&a);
	gp_db_array_add_int(&a, -5);
	gp_db_array_add_int(&a, 1LL << 40);
	CHECK_STR(gp_db_array_text(&a), "{-5,1099511627776}");
	gp_db_array_free(&a);
	CHECK_STR(gp_db_array_text(&a), "{}");
	gp_db_array_free(&a);
	/* long elements grow the buffer */
	char big[5000];
	memset(big, 'x', sizeof big - 1);
	big[sizeof big - 1] = 0;
	for (int i = 0; i < 10; i++)
		gp_db_array_add(&a, big);
	const char *t = gp_db_array_text(&a);
	CHECK(t && strlen(t) == 2 + 10 * (2 + 4999) + 9);
	gp_db_array_free(&a);
}

/* Which results skip the WAL flush wait: only attempts shorter than the
 * bound, never with the bound at 0, never on a clock that went backwards. */
static void test_quick_result(void)
{
	CHECK(gp_worker_quick_result(1000, 0));
	CHECK(gp_worker_quick_result(1000, 999));
	CHECK(!gp_worker_quick_result(1000, 1000));
	CHECK(!gp_worker_quick_result(1000, 7200000));
	CHECK(!gp_worker_quick_result(0, 0));
	CHECK(!gp_worker_quick_result(0, 5));
	CHECK(!gp_worker_quick_result(1000, -1));
}

static void test_gpu(void)
{
	const char *why = NULL;
	int n = gp_gpu_available(&why);
	CHECK(n >= 0);
	if (n == 0)
		CHECK(why != NULL && *why);
	if (!gp_gpu_built())
		CHECK(n == 0);
	char name[64];
	CHECK(gp_gpu_describe(n, name, sizeof name, NULL) != 0); /* past the last device */
	fprintf(stderr, "gpu: built=%d devices=%d (%s)\n", gp_gpu_built(), n, why ? why : "");
}

int main(void)
{
	test_db_array();
	test_quick_result();
	test_gpu();
	test_err();
	test_config();
	test_json_escape();
	test_sqlstate();
	test_tokens();
	test_metrics();
	return CHECK_RESULT();
}
