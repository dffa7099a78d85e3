/*
 * The pipeline spec: a table of files fed through `genpipe validate` (the
 * real binary, offline), checked for exit code, FILE:LINE:COL and message;
 * hostile inputs rejected fast with bounded memory; normalization, params
 * and template resolution through the library.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../check.h"
#include "spec.h"

#if defined(__SANITIZE_ADDRESS__)
#define SLOW 5
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SLOW 5
#endif
#endif
#ifndef SLOW
#define SLOW 1
#endif

static char tmpdir[] = "/tmp/gp-spec-XXXXXX";

static const char *write_tmp(const char *name, const char *text, size_t len)
{
	static char path[512];
	snprintf(path, sizeof path, "%s/%s", tmpdir, name);
	FILE *f = fopen(path, "wb");
	REQUIRE(f);
	REQUIRE(fwrite(text, 1, len, f) == len);
	fclose(f);
	return path;
}

/* Run genpipe validate on one file; returns exit code, output in out. */
static int validate(const char *path, char *out, size_t outlen)
{
	char cmd[1200];
	snprintf(cmd, sizeof cmd, "%s validate %s 2>&1", GENPIPE_CLI, path);
	FILE *p = popen(cmd, "r");
	REQUIRE(p);
	size_t n = fread(out, 1, outlen - 1, p);
	out[n] = '\0';
	int ws = pclose(p);
	return WIFEXITED(ws) ? WEXITSTATUS(ws) : -1;
}

#define HDR "apiVersion: genpipe/v1\nkind: Pipeline\nmetadata:\n  name: p\nspec:\n  stages:\n"

static const struct {
	const char *name;
	const char *yaml;
	int line, col;
	const char *msg;
} bad[] = {
	{ "unknown-key", HDR "    - name: a\n      kind: noop\n      retyr: {limit: 1}\n", 9, 7,
	  "stage \"a\": unknown key \"retyr\" (did you mean \"retry\"?)" },
	{ "duplicate-key", HDR "    - name: a\n      kind: noop\n      kind: noop\n", 9, 7,
	  "duplicate key \"kind\" (first at line 8)" },
	{ "wrong-type", HDR "    - name: a\n      kind: noop\n      cache: maybe\n", 9, 14,
	  "stage \"a\": cache must be true or false, got \"maybe\"" },
	{ "unknown-kind", HDR "    - name: a\n      kind: trian\n", 8, 13,
	  "unknown stage kind \"trian\" (did you mean \"train\"?)" },
	{ "unknown-need", HDR "    - {name: a, kind: noop}\n    - {name: b, kind: noop, needs: [c]}\n",
	  8, 37, "stage \"b\" needs unknown stage \"c\"" },
	{ "cycle",
	  HDR "    - {name: a, kind: noop, needs: [c]}\n    - {name: b, kind: noop, needs: [a]}\n"
	      "    - {name: c, kind: noop, needs: [b]}\n",
	  7, 36, "the needs form a cycle: a -> c -> b -> a" },
	{ "missing-param", HDR "    - name: a\n      kind: noop\n      with: {message: \"${params.x}\"}\n",
	  9, 23, "refers to unknown param \"x\"" },
	{ "missing-output",
	  HDR "    - {name: a, kind: ingest, with: {sources: [x]}}\n"
	      "    - {name: b, kind: preprocess, needs: [a], with: {dataset: \"${stages.a.outputs.dat}\"}}\n",
	  8, 63, "stages of kind ingest have no output \"dat\"" },
	{ "output-not-needed",
	  HDR "    - {name: a, kind: noop}\n    - {name: b, kind: noop, with: {message: \"${stages.a.outputs.k}\"}}\n",
	  8, 45, "stage \"b\" uses outputs of \"a\" but does not need it" },
	{ "bad-duration", HDR "    - name: a\n      kind: noop\n      timeout: 10 minutes\n", 9, 16,
	  "\"10 minutes\" is not a duration" },
	{ "bad-size", HDR "    - name: a\n      kind: ingest\n      with: {sources: [x], max_doc_size: 3 apples}\n",
	  9, 42, "\"3 apples\" is not a size" },
	{ "bad-name", HDR "    - name: Train_1\n      kind: noop\n", 7, 13,
	  "stage name \"Train_1\" is not a DNS label" },
	{ "bad-pipeline-name",
	  "apiVersion: genpipe/v1\nkind: Pipeline\nmetadata:\n  name: my.pipe\nspec:\n  stages: [{name: a, kind: noop}]\n",
	  4, 9, "pipeline name \"my.pipe\" is not a DNS label" },
	{ "missing-required", HDR "    - name: a\n      kind: train\n      with: {steps: 3}\n", 9, 13,
	  "stage \"a\" (train): with.model is required" },
	{ "bad-api", "apiVersion: genpipe/v2\nkind: Pipeline\nmetadata: {name: p}\nspec: {stages: [{name: a, kind: noop}]}\n",
	  1, 13, "apiVersion \"genpipe/v2\" is not supported" },
	{ "no-stages", "apiVersion: genpipe/v1\nkind: Pipeline\nmetadata: {name: p}\nspec: {stages: []}\n",
	  4, 16, "spec.stages must list at least one stage" },
	{ "anchor", HDR "    - &x {name: a, kind: noop}\n    - *x\n", 7, 7,
	  "anchors (&x) are not allowed" },
	{ "tag", HDR "    - !!python/object {name: a, kind: noop}\n", 7, 7, "tags" },
	{ "syntax", HDR "    - {name: a, kind: noop\n", 8, 1, "invalid YAML" },
	{ "two-docs", HDR "    - {name: a, kind: noop}\n---\nfoo: 1\n", 8, 1,
	  "only one YAML document is allowed" },
	{ "bad-param-type",
	  "apiVersion: genpipe/v1\nkind: Pipeline\nmetadata: {name: p}\nspec:\n  params:\n    n: {type: int, default: lots}\n  stages: [{name: a, kind: noop}]\n",
	  6, 29, "param \"n\": default must be an integer, got \"lots\"" },
	{ "bad-parallelism",
	  "apiVersion: genpipe/v1\nkind: Pipeline\nmetadata: {name: p}\nspec:\n  parallelism: 0\n"
	  "  stages: [{name: a, kind: noop}]\n",
	  5, 16, "spec.parallelism must be between 1 and 100000, got 0" },
	{ "bad-pool", HDR "    - name: a\n      kind: noop\n      resources: {pool: spotty}\n", 9, 25,
	  "\"spotty\" is not one of on-demand, spot (did you mean \"spot\"?)" },
};

static const char valid_yaml[] =
	"# a comment before everything\n"
	"apiVersion: genpipe/v1   # trailing comment\n"
	"kind: Pipeline\n"
	"metadata:\n"
	"  name: valid-one\n"
	"  description: \"Ünïcödé — 日本語 descriptions are fine ✓\"\n"
	"  labels: {team: données, owner: \"zoë\"}\n"
	"spec:\n"
	"  params: {n: {type: int, default: 3}, name: {type: string, default: x}}\n"
	"  stages:\n"
	"    - name: a\n"
	"      kind: noop\n"
	"      description: |\n"
	"        a block scalar\n"
	"        over two lines\n"
	"      with:\n"
	"        duration: 10ms\n"
	"        message: >-\n"
	"          folded text\n"
	"          here\n"
	"        outputs: {k: v, list: [1, 2.5, true, null]}\n"
	"    - {name: b, kind: noop, needs: a, with: {message: \"n=${params.n} ${stages.a.outputs.k}\"}}\n";

static void test_cli_table(void)
{
	char out[8192];
	for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
		char fname[64];
		snprintf(fname, sizeof fname, "%s.yaml", bad[i].name);
		const char *path = write_tmp(fname, bad[i].yaml, strlen(bad[i].yaml));
		int rc = validate(path, out, sizeof out);
		char want[700];
		snprintf(want, sizeof want, "%s:%d:%d: ", path, bad[i].line, bad[i].col);
		check_count_++;
		/* the expected error must be on the expected line and column */
		int found = 0;
		for (char *l = out; l && *l;) {
			char *nl = strchr(l, '\n');
			if (nl)
				*nl = '\0';
			if (!strncmp(l, want, strlen(want)) && strstr(l, bad[i].msg))
				found = 1;
			l = nl ? nl + 1 : NULL;
		}
		if (rc != 2 || !found) {
			check_failures_++;
			fprintf(stderr, "case %s: exit %d, wanted 2 and \"%s...%s\"; got:\n%s\n",
				bad[i].name, rc, want, bad[i].msg, out);
		}
	}
	/* Every error is reported, not just the first. */
	const char many[] = HDR "    - {name: a, kind: nope}\n    - {name: B, kind: noop}\n"
				"    - {name: c, kind: noop, needs: [zz], timeout: soon}\n";
	const char *path = write_tmp("many.yaml", many, strlen(many));
	CHECK(validate(path, out, sizeof out) == 2);
	int lines = 0;
	for (char *p = out; (p = strchr(p, '\n')); p++)
		lines++;
	CHECK(lines == 4);

	path = write_tmp("valid.yaml", valid_yaml, strlen(valid_yaml));
	int rc = validate(path, out, sizeof out);
	CHECK(rc == 0);
	CHECK_CONTAINS(out, ": valid");
	if (rc)
		fprintf(stderr, "%s\n", out);

	CHECK(validate("/nonexistent/x.yaml", out, sizeof out) == 1);
	CHECK_CONTAINS(out, "could not open");

	/* the project's examples */
	char cmd[1200];
	snprintf(cmd, sizeof cmd, "%s validate %s/pipelines/*.yaml >/dev/null", GENPIPE_CLI,
		 GENPIPE_SOURCE_DIR);
	CHECK(system(cmd) == 0);
}

static void expect_rejected(const char *what, const char *text, size_t len, const char *msg)
{
	struct gp_spec_errors *errs = calloc(1, sizeof *errs);
	cJSON *doc = NULL;
	/* the parser's own CPU time: on a loaded machine (ctest -j2 beside a
	 * training) wall time measures the scheduler, not the parser */
	struct timespec c0, c1;
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c0);
	gp_status st = gp_spec_parse(text, len, &doc, errs);
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &c1);
	long long dt = (c1.tv_sec - c0.tv_sec) * 1000LL + (c1.tv_nsec - c0.tv_nsec) / 1000000;
	CHECK(st == GP_ERR_INVALID);
	CHECK(doc == NULL);
	CHECK(errs->n >= 1);
	if (errs->n)
		CHECK_CONTAINS(errs->v[0].msg, msg);
	check_count_++;
	if (dt > 100 * SLOW) {
		check_failures_++;
		fprintf(stderr, "%s took %lld ms of CPU (limit %d)\n", what, dt, 100 * SLOW);
	}
	free(errs);
}

static void test_hostile(void)
{
	struct rusage ru0, ru1;
	getrusage(RUSAGE_SELF, &ru0);
	size_t n = 200 * 1024;
	char *b = malloc(10u << 20);
	REQUIRE(b);
	memset(b, '[', n);
	expect_rejected("200 KB of [", b, n, "nesting deeper than 32 levels");
	memset(b, '{', n);
	expect_rejected("200 KB of {", b, n, "mapping keys must be scalars");
	size_t len = 0;
	for (int d = 0; d < 40; d++) {
		for (int k = 0; k < d; k++)
			b[len++] = ' ';
		len += (size_t)sprintf(b + len, "k%d:\n", d);
	}
	expect_rejected("40 nested mappings", b, len, "nesting deeper than 32 levels");
	/* alias bomb */
	const char bomb[] = "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n"
			    "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
			    "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n";
	expect_rejected("alias bomb", bomb, sizeof bomb - 1, "anchors (&a) are not allowed");
	/* 10 MB scalar */
	memcpy(b, "a: ", 3);
	memset(b + 3, 'x', (10u << 20) - 3);
	expect_rejected("10 MB scalar", b, 10u << 20, "document is 10485760 bytes (limit 1048576)");
	/* 100 KB scalar inside the size limit */
	memset(b + 3, 'x', 100000);
	expect_rejected("100 KB scalar", b, 100003, "scalar of 100000 bytes (limit 65536)");
	/* invalid UTF-8 */
	const char bad8[] = "apiVersion: genpipe/v1\nkind: \xff\xfe Pipeline\n";
	expect_rejected("invalid UTF-8", bad8, sizeof bad8 - 1, "invalid YAML");
	/* binary garbage */
	srand(7);
	for (size_t i = 0; i < 65536; i++)
		b[i] = (char)(rand() & 0xff);
	expect_rejected("binary garbage", b, 65536, "");
	/* too many nodes */
	len = 0;
	b[len++] = '[';
	while (len < (1u << 20) - 4) {
		b[len++] = '1';
		b[len++] = ',';
	}
	b[len++] = '1';
	b[len++] = ']';
	expect_rejected("500k nodes", b, len, "more than 100000 nodes");
	free(b);
	getrusage(RUSAGE_SELF, &ru1);
	/* Peak memory grew by less than 64 MiB over all of the above (10 MiB of it
	 * is our own test buffer). */
	CHECK(ru1.ru_maxrss - ru0.ru_maxrss < 64 * 1024 * SLOW);
}

static cJSON *parse_ok(const char *text)
{
	struct gp_spec_errors *errs = calloc(1, sizeof *errs);
	cJSON *doc = NULL;
	gp_status st = gp_spec_parse(text, strlen(text), &doc, errs);
	if (st) {
		for (int i = 0; i < errs->n; i++)
			fprintf(stderr, "%d:%d: %s\n", errs->v[i].line, errs->v[i].col, errs->v[i].msg);
	}
	CHECK(st == GP_OK);
	free(errs);
	return doc;
}

static void test_normalize(void)
{
	const char a[] = HDR "    - name: s\n      kind: noop\n      with: {message: x, duration: 1s}\n"
			     "    - {name: t, kind: noop, needs: s}\n";
	const char b[] = "# same content, other layout\n"
			 "kind: Pipeline\napiVersion: genpipe/v1\nspec:\n  stages:\n"
			 "  - {kind: noop, name: s, with: {duration: 1s, message: x}, cache: true}\n"
			 "  - kind: noop\n    name: t\n    needs: [s]\n    retry: {limit: 2}\n"
			 "metadata: {name: p}\n";
	const char c[] = HDR "    - name: s\n      kind: noop\n      with: {message: y, duration: 1s}\n"
			     "    - {name: t, kind: noop, needs: s}\n";
	cJSON *da = parse_ok(a), *db = parse_ok(b), *dc = parse_ok(c);
	REQUIRE(da && db && dc);
	char *ta, *tb, *tc, ha[65], hb[65], hc[65];
	struct gp_err e = { 0 };
	REQUIRE_OK(gp_spec_canonical(da, &ta, ha, &e), e);
	REQUIRE_OK(gp_spec_canonical(db, &tb, hb, &e), e);
	REQUIRE_OK(gp_spec_canonical(dc, &tc, hc, &e), e);
	CHECK_STR(ta, tb);
	CHECK_STR(ha, hb);
	CHECK(strcmp(ha, hc) != 0);
	CHECK_CONTAINS(ta, "\"retry\":{\"limit\":2,\"backoff_ms\":1000,\"max_backoff_ms\":60000}");
	CHECK_CONTAINS(ta, "\"with\":{\"duration\":\"1s\",\"message\":\"x\"}");
	free(ta);
	free(tb);
	free(tc);
	cJSON_Delete(da);
	cJSON_Delete(db);
	cJSON_Delete(dc);
}

static void test_params_and_templates(void)
{
	const char y[] = "apiVersion: genpipe/v1\nkind: Pipeline\nmetadata: {name: p}\nspec:\n"
			 "  params: {steps: {type: int, default: 10}, tag: {type: string}, "
			 "on: {type: bool, default: false}}\n"
			 "  stages: [{name: a, kind: noop}, {name: b, kind: noop, needs: a, with: "
			 "{outputs: {n: \"${params.steps}\", s: \"run ${params.tag} after "
			 "${stages.a.outputs.k}\"}}}]\n";
	cJSON *doc = parse_ok(y);
	REQUIRE(doc);
	struct gp_err e = { 0 };
	CHECK(gp_spec_resolve_params(doc, NULL, 0, &e) == NULL);
	CHECK_CONTAINS(e.msg, "param \"tag\" has no default");
	const char *bad1[] = { "steps=many", "tag=x" };
	CHECK(gp_spec_resolve_params(doc, bad1, 2, &e) == NULL);
	CHECK_CONTAINS(e.msg, "--param steps=many: steps is an int");
	const char *bad2[] = { "nope=1", "tag=x" };
	CHECK(gp_spec_resolve_params(doc, bad2, 2, &e) == NULL);
	CHECK_CONTAINS(e.msg, "the pipeline has no param \"nope\"");
	const char *ok[] = { "steps=42", "tag=blue", "on=true" };
	cJSON *params = gp_spec_resolve_params(doc, ok, 3, &e);
	REQUIRE(params);
	CHECK(cJSON_GetObjectItem(params, "steps")->valuedouble == 42);
	CHECK(cJSON_IsTrue(cJSON_GetObjectItem(params, "on")));
	cJSON *stages = cJSON_GetObjectItem(cJSON_GetObjectItem(doc, "spec"), "stages");
	const cJSON *with = cJSON_GetObjectItem(cJSON_GetArrayItem(stages, 1), "with");
	cJSON *outputs = cJSON_Parse("{\"a\":{\"k\":\"sha256:ab\"}}");
	cJSON *w = gp_spec_resolve_with(with, params, outputs, &e);
	REQUIRE(w);
	cJSON *o = cJSON_GetObjectItem(w, "outputs");
	CHECK(cJSON_IsNumber(cJSON_GetObjectItem(o, "n")));
	CHECK(cJSON_GetObjectItem(o, "n")->valuedouble == 42);
	CHECK_STR(cJSON_GetStringValue(cJSON_GetObjectItem(o, "s")), "run blue after sha256:ab");
	cJSON_Delete(w);
	/* a non-string value inside text is written out whole as JSON */
	cJSON *wide = cJSON_Parse("{\"outputs\":{\"s\":\"v=${stages.a.outputs.k}!\"}}");
	cJSON *big = cJSON_CreateObject(), *ak = cJSON_AddObjectToObject(big, "a");
	cJSON *arr = cJSON_AddArrayToObject(cJSON_AddObjectToObject(ak, "k"), "x");
	for (int i = 0; i < 300; i++)
		cJSON_AddItemToArray(arr, cJSON_CreateNumber(i));
	cJSON *wr = gp_spec_resolve_with(wide, params, big, &e);
	REQUIRE(wr);
	const char *ws = cJSON_GetStringValue(cJSON_GetObjectItem(cJSON_GetObjectItem(wr, "outputs"), "s"));
	CHECK(ws && !strncmp(ws, "v={\"x\":[0,1,2,", 14));
	CHECK(ws && strstr(ws, ",298,299]}!") != NULL);
	cJSON_Delete(wr);
	cJSON_Delete(big);
	cJSON_Delete(wide);
	cJSON *empty = cJSON_Parse("{}");
	CHECK(gp_spec_resolve_with(with, params, empty, &e) == NULL);
	CHECK_CONTAINS(e.msg, "cannot resolve ${stages.a.outputs.k}");
	cJSON_Delete(empty);
	cJSON_Delete(outputs);
	cJSON_Delete(params);
	cJSON_Delete(doc);
}

static void test_units(void)
{
	CHECK(gp_spec_parse_duration("500ms") == 500);
	CHECK(gp_spec_parse_duration("30s") == 30000);
	CHECK(gp_spec_parse_duration("1h30m") == 5400000);
	CHECK(gp_spec_parse_duration("2d") == 172800000);
	CHECK(gp_spec_parse_duration("0s") == 0);
	CHECK(gp_spec_parse_duration("") == -1);
	CHECK(gp_spec_parse_duration("5") == -1);
	CHECK(gp_spec_parse_duration("5 m") == -1);
	CHECK(gp_spec_parse_duration("-5s") == -1);
	CHECK(gp_spec_parse_duration("400d") == -1);
	CHECK(gp_spec_parse_duration("99999999999999s") == -1);
	CHECK(gp_spec_parse_size("512k") == 512000);
	CHECK(gp_spec_parse_size("10Mi") == 10485760);
	CHECK(gp_spec_parse_size("1G") == 1000000000);
	CHECK(gp_spec_parse_size("123") == 123);
	CHECK(gp_spec_parse_size("1Q") == -1);
	CHECK(gp_spec_parse_size("Mi") == -1);
	CHECK(gp_spec_parse_size("99999999999999999Ti") == -1);
	CHECK(gp_spec_edit_distance("retyr", "retry") == 2);
	CHECK(gp_spec_edit_distance("", "abc") == 3);
	CHECK(gp_spec_kind_known("train") && !gp_spec_kind_known("trian"));
}

int main(void)
{
	REQUIRE(mkdtemp(tmpdir));
	test_units();
	test_cli_table();
	test_hostile();
	test_normalize();
	test_params_and_templates();
	char cmd[600];
	snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
	if (system(cmd) != 0)
		fprintf(stderr, "could not remove %s\n", tmpdir);
	return CHECK_RESULT();
}
