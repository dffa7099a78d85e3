/*
 * The whole loop on real servers and every service, on two real corpora:
 * corpus A is Debian's fortune cookies, corpus B the system's C headers
 * (the .h files of /usr/include, from libc6-dev).
 *
 * 1. A pipeline trains a small GPT on three fortune files, deploys it and
 *    has the monitor watch it. Prompts from A (fortunes of one of those
 *    files) raise no alert; then the traffic switches to C headers, and within
 *    three windows a window alerts with PSI and perplexity both over their
 *    thresholds.
 * 2. Negative ratings with corrections on the B answers fire the pipeline's
 *    feedback trigger: exactly one retraining run, and more ratings during
 *    the cool-down start nothing more. The run ingests the corrections and
 *    the drifted prompts, and its deploy gate promotes the candidate only
 *    because its loss per byte on that new data is at least 30% lower and
 *    its loss on A's validation text within 5%. Measured here as well on
 *    text neither version saw: at least 10% lower on other headers, within
 *    5% on another fortune file. New B
 *    traffic from the held-out headers reaches the new version, and the
 *    monitor's perplexity on it is back under the threshold.
 * 3. A run forced to be worse (8 training steps) is not promoted, and
 *    `genpipe models show` gives the reason with its figures.
 */
#include <glob.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>

#include "../check.h"
#include "../harness.h"

#include "artifact.h"
#include "bpe.h"
#include "model.h"
#include "registry.h"
#include "subjects.h"
#include "wire.h"

#define MODEL "scenario"
#define FORTUNES "/usr/share/games/fortunes/"
#define PROMPT_BYTES 90
#define CORRECTION_BYTES 400
#define WINDOW 50

static struct gp_db *db;
static struct gp_bus *bus;
static const struct gp_test_env *ENV;

#define q(...) gp_test_q(db, __VA_ARGS__)

static char *slurp(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	if (!f)
		return NULL;
	size_t cap = 1 << 16, n = 0;
	char *p = malloc(cap + 1);
	size_t k;
	while (p && (k = fread(p + n, 1, cap - n, f)) > 0) {
		n += k;
		if (n == cap) {
			char *q2 = realloc(p, 2 * cap + 1);
			if (!q2) {
				free(p);
				p = NULL;
				break;
			}
			p = q2;
			cap *= 2;
		}
	}
	fclose(f);
	if (p) {
		p[n] = 0;
		*len = n;
	}
	return p;
}

/* ---- the corpora ---- */

struct prompts {
	char **p;
	int n;
};

static void prompts_add(struct prompts *ps, const char *s, size_t len)
{
	ps->p = realloc(ps->p, (size_t)(ps->n + 1) * sizeof(char *));
	REQUIRE(ps->p);
	ps->p[ps->n] = malloc(len + 1);
	REQUIRE(ps->p[ps->n]);
	memcpy(ps->p[ps->n], s, len);
	ps->p[ps->n++][len] = 0;
}

static void prompts_free(struct prompts *ps)
{
	for (int i = 0; i < ps->n; i++)
		free(ps->p[i]);
	free(ps->p);
}

/* Fortunes of a file, whitespace folded, cut to PROMPT_BYTES (ASCII ones
 * only, so that a cut never splits a character); all of them in *text. */
static struct prompts a_prompts(const char *file, int n, char **text, size_t *text_len)
{
	struct prompts ps = {0};
	size_t len = 0;
	char *all = slurp(file, &len);
	REQUIRE(all);
	char *flat = malloc(len + 1);
	size_t fl = 0;
	REQUIRE(flat);
	for (char *f = all; f && *f && ps.n < n;) {
		char *end = strstr(f, "\n%\n");
		size_t fn = end ? (size_t)(end - f) : strlen(f);
		char buf[4096];
		size_t bl = 0;
		int ascii = 1, space = 1;
		for (size_t i = 0; i < fn && bl < sizeof buf - 1; i++) {
			unsigned char c = (unsigned char)f[i];
			ascii &= c < 0x80;
			if (c == ' ' || c == '\n' || c == '\t') {
				if (!space)
					buf[bl++] = ' ';
				space = 1;
			} else {
				buf[bl++] = (char)c;
				space = 0;
			}
		}
		if (ascii && bl >= 30) {
			prompts_add(&ps, buf, bl < PROMPT_BYTES ? bl : PROMPT_BYTES);
			memcpy(flat + fl, buf, bl);
			fl += bl;
			flat[fl++] = '\n';
		}
		f = end ? end + 3 : NULL;
	}
	free(all);
	flat[fl] = 0;
	*text = flat;
	*text_len = fl;
	REQUIRE(ps.n == n);
	return ps;
}

/* The C headers, sorted by name: half 0 is the traffic that drifts (and
 * what the corrections and drifted prompts are made of), half 1 is held out. */
static char *b_text(int half, size_t *len)
{
	glob_t g;
	REQUIRE(glob("/usr/include/*.h", 0, NULL, &g) == 0 && g.gl_pathc >= 20);
	size_t from = half ? g.gl_pathc / 2 : 0, to = half ? g.gl_pathc : g.gl_pathc / 2;
	size_t n = 0, cap = 1 << 20;
	char *t = malloc(cap);
	REQUIRE(t);
	for (size_t i = from; i < to; i++) {
		size_t fl = 0;
		char *f = slurp(g.gl_pathv[i], &fl);
		if (!f)
			continue;
		for (size_t k = 0; k < fl; k++) {
			if ((unsigned char)f[k] >= 0x80)
				continue; /* (a rare accented name in a comment) */
			if (n + 1 >= cap) {
				cap *= 2;
				t = realloc(t, cap);
				REQUIRE(t);
			}
			t[n++] = f[k];
		}
		free(f);
	}
	globfree(&g);
	t[n] = 0;
	*len = n;
	return t;
}

static struct prompts b_prompts(const char *text, size_t len, int n)
{
	struct prompts ps = {0};
	for (int i = 0; i < n; i++) {
		size_t off = ((size_t)i * 997) % (len - 2 * PROMPT_BYTES);
		prompts_add(&ps, text + off, PROMPT_BYTES);
	}
	return ps;
}

/* ---- requests and feedback ---- */

/* Ask the served model; its version in *version; 1 when answered. */
static int ask(const char *rid, const char *prompt, long long *version)
{
	Genpipe__V1__SamplingParams sp = GENPIPE__V1__SAMPLING_PARAMS__INIT;
	sp.max_tokens = 8;
	sp.top_p = 1;
	gp_infer_request r = GENPIPE__V1__INFER_REQUEST__INIT;
	r.request_id = (char *)rid;
	r.model = MODEL;
	r.prompt = (char *)prompt;
	r.sampling = &sp;
	uint8_t *b = NULL;
	size_t len = 0;
	struct gp_err e = {0};
	REQUIRE_OK(gp_wire_encode(&r.base, &b, &len, &e), e);
	natsMsg *reply = NULL;
	gp_status st = gp_bus_request(bus, GP_SUBJ_INFER MODEL, b, (int)len, 10000, &reply, &e);
	free(b);
	int ok = 0;
	gp_infer_response *resp = NULL;
	if (!st && !gp_wire_decode_infer_response(&resp, (const uint8_t *)natsMsg_GetData(reply),
						  (size_t)natsMsg_GetDataLength(reply), &e)) {
		ok = !*resp->error_code;
		if (!ok)
			printf("request %s: %s: %s\n", rid, resp->error_code, resp->error);
		if (version)
			*version = resp->model_version;
		gp_wire_free_infer_response(resp);
	} else {
		printf("request %s: %s\n", rid, e.msg);
	}
	natsMsg_Destroy(reply);
	return ok;
}

/* Send every prompt; the request ids are PREFIX-i. Returns how many answered. */
static int send_all(const struct prompts *ps, const char *prefix)
{
	int ok = 0;
	for (int i = 0; i < ps->n; i++) {
		char rid[64];
		snprintf(rid, sizeof rid, "%s-%d", prefix, i);
		ok += ask(rid, ps->p[i], NULL);
	}
	return ok;
}

static void rate_down(const char *rid, const char *correction)
{
	gp_feedback f = GENPIPE__V1__FEEDBACK__INIT;
	f.request_id = (char *)rid;
	f.rating = GENPIPE__V1__RATING__RATING_DOWN;
	f.correction = (char *)correction;
	f.user = "reviewer";
	uint8_t *b = NULL;
	size_t len = 0;
	struct gp_err e = {0};
	REQUIRE_OK(gp_wire_encode(&f.base, &b, &len, &e), e);
	char mid[80];
	snprintf(mid, sizeof mid, "rate-%s", rid);
	REQUIRE_OK(gp_bus_publish(bus, GP_SUBJ_FEEDBACK MODEL, b, (int)len, mid, 5000, NULL, NULL,
				  &e), e);
	free(b);
}

/* Run the CLI; its output in out, its exit status returned. */
#define cli(out, cap, ...) gp_test_cli(ENV, GENPIPE_CLI, out, cap, __VA_ARGS__)

/* Windows recorded for version v of the model. */
static long long windows_of(int v)
{
	return q("SELECT count(*) FROM drift_windows w JOIN model_versions v ON v.id = "
		 "w.model_version_id JOIN models m ON m.id = v.model_id WHERE m.name = '" MODEL
		 "' AND v.version = %d", v);
}

static int wait_windows(int v, long long n, long ms)
{
	for (long t = 0; t < ms && windows_of(v) < n; t += 200)
		gp_sleep_ms(200);
	return windows_of(v) >= n;
}

static void print_windows(void)
{
	char out[16384];
	CHECK(cli(out, sizeof out, "drift " MODEL) == 0);
	printf("%s", out);
}

/* Loss per byte of version v on text. */
static double loss_of(struct gp_store *st, int v, const char *text, size_t len)
{
	struct gp_err e = {0};
	struct gp_model_ref ref = {0};
	struct gp_model *m = NULL;
	struct gp_bpe *tok = NULL;
	REQUIRE_OK(gp_registry_resolve(db, MODEL, NULL, v, &ref, &e), e);
	REQUIRE_OK(gp_registry_load(st, MODEL, &ref, &m, &tok, &e), e);
	double x = gp_text_nats_per_byte(m, tok, text, len, &e);
	gp_model_destroy(m);
	gp_bpe_free(tok);
	return x;
}

static const char *PIPELINE =
	"apiVersion: genpipe/v1\n"
	"kind: Pipeline\n"
	"metadata: {name: scenario, description: \"fortunes first, then whatever users bring\"}\n"
	"spec:\n"
	"  params:\n"
	"    steps: {type: int, default: 600}\n"
	"  stages:\n"
	"    - name: ingest\n"
	"      kind: ingest\n"
	"      with:\n"
	"        sources: [" FORTUNES "fortunes, " FORTUNES "literature, " FORTUNES "wisdom, \"feedback:" MODEL "\", \"drifted:" MODEL "\"]\n"
	"        split: \"%\"\n"
	"    - name: new-data\n"
	"      kind: ingest\n"
	"      with: {sources: [\"feedback:" MODEL "\", \"drifted:" MODEL "\"]}\n"
	"    - name: prep\n"
	"      kind: preprocess\n"
	"      needs: [ingest]\n"
	"      with: {dataset: \"${stages.ingest.outputs.dataset}\", vocab_size: 1024, "
	"min_length: 16, val_fraction: 0.05}\n"
	"    - name: train\n"
	"      kind: train\n"
	"      needs: [prep]\n"
	"      with:\n"
	"        model: " MODEL "\n"
	"        train_shards: ${stages.prep.outputs.train_shards}\n"
	"        val_shards: ${stages.prep.outputs.val_shards}\n"
	"        tokenizer: ${stages.prep.outputs.tokenizer}\n"
	"        config: {layers: 2, heads: 2, width: 96, context: 128}\n"
	"        steps: ${params.steps}\n"
	"        eval_interval: ${params.steps}\n"
	"        eval_batches: 8\n"
	"        batch: 16\n"
	"        lr: 0.003\n"
	"    - name: deploy\n"
	"      kind: deploy\n"
	"      needs: [train, new-data]\n"
	"      with:\n"
	"        model: " MODEL "\n"
	"        version: ${stages.train.outputs.model_version}\n"
	"        gate: {data: \"${stages.new-data.outputs.dataset}\", margin: 0.3, "
	"tolerance: 0.05}\n"
	"    - name: monitor\n"
	"      kind: monitor\n"
	"      needs: [deploy]\n"
	"      with: {model: " MODEL ", histogram: \"${stages.prep.outputs.histogram}\", "
	"window: 50, window_time: 30s}\n"
	"  triggers:\n"
	"    - {name: unhappy, on: feedback, negative_rate: 0.5, window: 10, cooldown: 1h, "
	"max_per_day: 3}\n";

static int body(struct gp_test_env *env)
{
	ENV = env;
	struct stat sb;
	if (stat(FORTUNES "fortunes", &sb) || stat("/usr/include/stdio.h", &sb)) {
		printf("corpus A (" FORTUNES ", Debian's fortunes) or B (/usr/include, "
		       "libc6-dev) is missing: scripts/install-deps installs both\n");
		return 1;
	}
	db = gp_test_db(env);
	bus = gp_test_bus(env, "test-loop");
	struct gp_err e = {0};
	char uri[600];
	snprintf(uri, sizeof uri, "file://%s/artifacts", env->dir);
	struct gp_store *st = NULL;
	REQUIRE_OK(gp_store_open(&st, uri, &e), e);

	gp_test_service(env, "genpipe-orchestrator", "--sweep-ms", "200", NULL);
	gp_test_service(env, "genpipe-ingest", "--roots", "/usr/share", "--data-dir", env->dir,
			NULL);
	gp_test_service(env, "genpipe-preprocess", "--data-dir", env->dir, NULL);
	gp_test_service(env, "genpipe-train", "--data-dir", env->dir, NULL);
	gp_test_service(env, "genpipe-infer", "--data-dir", env->dir, "--model", MODEL, NULL);
	gp_test_service(env, "genpipe-monitor", "--data-dir", env->dir, "--reload-ms", "200", NULL);
	gp_test_service(env, "genpipe-feedback", "--triggers-ms", "200", NULL);

	/* 1. train on A, serve, watch */
	long long run1 = gp_test_submit(db, PIPELINE, NULL, 0);
	REQUIRE(gp_test_wait_run(db, run1, 600000) == 1);
	CHECK(q("SELECT count(*) FROM model_aliases a JOIN model_versions v ON v.id = "
		"a.model_version_id WHERE a.alias = 'production' AND v.version = 1") == 1);
	gp_sleep_ms(1000); /* the monitor reads its configuration */

	char *a_held = NULL, *b0 = NULL, *b1 = NULL;
	size_t a_held_len = 0, b0_len = 0, b1_len = 0;
	/* A traffic: fortunes of a file it trained on; A held out: another file */
	char *a_seen = NULL;
	size_t a_seen_len = 0;
	struct prompts pa = a_prompts(FORTUNES "wisdom", 2 * WINDOW, &a_seen, &a_seen_len);
	struct prompts pa_held = a_prompts(FORTUNES "work", 300, &a_held, &a_held_len);
	b0 = b_text(0, &b0_len);
	b1 = b_text(1, &b1_len);
	struct prompts pb = b_prompts(b0, b0_len, 6 * WINDOW);
	struct prompts pc = b_prompts(b1, b1_len, 3 * WINDOW);

	CHECK(send_all(&pa, "a") == pa.n);
	REQUIRE(wait_windows(1, 2, 60000));
	CHECK(q("SELECT count(*) FROM alerts") == 0);
	long long a_windows = windows_of(1);

	CHECK(send_all(&pb, "b") == pb.n);
	REQUIRE(wait_windows(1, a_windows + 6, 60000));
	print_windows();
	/* within the first three B windows, one where PSI and perplexity both
	 * alert */
	CHECK(q("SELECT count(*) FROM (SELECT id FROM drift_windows ORDER BY id OFFSET %lld LIMIT 3) "
		"w WHERE EXISTS (SELECT 1 FROM alerts a WHERE a.drift_window_id = w.id AND a.metric = "
		"'psi') AND EXISTS (SELECT 1 FROM alerts a WHERE a.drift_window_id = w.id AND "
		"a.metric = 'perplexity_ratio')", a_windows) >= 1);
	CHECK(q("SELECT count(*) FROM drift_windows WHERE (metrics->>'psi')::float8 > 0.2 AND "
		"(metrics->>'perplexity_ratio')::float8 > 2") >= 1);

	/* 2. negative ratings with corrections (the header text that follows
	 * each prompt) start one retraining run */
	for (int i = 0; i < 12; i++) {
		char rid[32];
		size_t off = ((size_t)i * 997) % (b0_len - 2 * PROMPT_BYTES) + PROMPT_BYTES;
		if (off + CORRECTION_BYTES > b0_len)
			off = 0;
		char corr[CORRECTION_BYTES + 1];
		memcpy(corr, b0 + off, CORRECTION_BYTES);
		corr[CORRECTION_BYTES] = 0;
		snprintf(rid, sizeof rid, "b-%d", i);
		rate_down(rid, corr);
	}
	for (int t = 0; t < 150 && q("SELECT count(*) FROM retrain_triggers") < 1; t++)
		gp_sleep_ms(200);
	REQUIRE(q("SELECT count(*) FROM retrain_triggers") == 1);
	long long run2 = q("SELECT run_id FROM retrain_triggers");
	CHECK(q("SELECT count(*) FROM runs WHERE id = %lld AND trigger = 'feedback:unhappy'", run2)
	      == 1);
	/* more of the same within the cool-down: nothing more */
	for (int i = 12; i < 30; i++) {
		char rid[32];
		snprintf(rid, sizeof rid, "b-%d", i);
		rate_down(rid, "#include <stddef.h>");
	}
	for (int t = 0; t < 150 && q("SELECT count(*) FROM feedback") < 30; t++)
		gp_sleep_ms(200);
	CHECK(q("SELECT count(*) FROM feedback") == 30);
	REQUIRE(gp_test_wait_run(db, run2, 600000) == 1);
	gp_sleep_ms(1000); /* ten more judgements of the triggers */
	CHECK(q("SELECT count(*) FROM retrain_triggers") == 1);
	CHECK(q("SELECT count(*) FROM runs") == 2);

	/* the gate's figures: on the feedback and drift set, at least 30% lower;
	 * on A's validation text, within 5% */
	char *why = gp_test_qs(db, "SELECT reason FROM deploy_decisions WHERE run_id = %lld", run2);
	printf("retraining run %lld: %s\n", run2, why ? why : "-");
	free(why);
	CHECK(q("SELECT count(*) FROM deploy_decisions WHERE run_id = %lld AND promoted AND "
		"(figures->'gate'->>'candidate_new')::float8 <= 0.7 * "
		"(figures->'gate'->>'current_new')::float8 AND "
		"(figures->'gate'->>'candidate_validation')::float8 <= 1.05 * "
		"(figures->'gate'->>'current_validation')::float8 AND "
		"(figures->'gate'->>'new_data_bytes')::int > 10000", run2) == 1);
	CHECK(q("SELECT count(*) FROM model_aliases a JOIN model_versions v ON v.id = "
		"a.model_version_id WHERE a.alias = 'production' AND v.version = 2") == 1);
	/* and on text neither version saw */
	size_t hb = b1_len > 60000 ? 60000 : b1_len, ha = a_held_len > 30000 ? 30000 : a_held_len;
	double b_v1 = loss_of(st, 1, b1 + b1_len / 3, hb / 2), b_v2 = loss_of(st, 2, b1 + b1_len / 3,
									       hb / 2);
	double a_v1 = loss_of(st, 1, a_held, ha), a_v2 = loss_of(st, 2, a_held, ha);
	printf("held out, nats per byte: C headers %.4f -> %.4f (%+.1f%%), fortunes %.4f -> %.4f "
	       "(%+.1f%%)\n", b_v1, b_v2, 100 * (b_v2 - b_v1) / b_v1, a_v1, a_v2,
	       100 * (a_v2 - a_v1) / a_v1);
	CHECK(b_v2 <= 0.9 * b_v1);
	CHECK(a_v2 <= 1.05 * a_v1);

	/* new B traffic from the held-out headers reaches version 2 ... */
	long long served = 0;
	for (int t = 0; t < 100 && served != 2; t++) {
		char rid[32];
		snprintf(rid, sizeof rid, "probe-%d", t);
		ask(rid, "#include <stdint.h>", &served);
		if (served != 2)
			gp_sleep_ms(100);
	}
	CHECK(served == 2);
	long long v2_windows = windows_of(2);
	struct prompts pc2 = {pc.p, 2 * WINDOW};
	CHECK(send_all(&pc2, "c") == pc2.n);
	REQUIRE(wait_windows(2, v2_windows + 2, 60000));
	print_windows();
	/* ... and the monitor's perplexity there is back under its threshold */
	CHECK(q("SELECT count(*) FROM drift_windows w JOIN model_versions v ON v.id = "
		"w.model_version_id WHERE v.version = 2 AND w.n_requests = %d AND "
		"(w.metrics->>'perplexity_ratio')::float8 < 2", WINDOW) == 2);
	CHECK(q("SELECT count(*) FROM alerts a JOIN model_versions v ON v.id = a.model_version_id "
		"WHERE v.version = 2 AND a.metric = 'perplexity_ratio'") == 0);

	/* 3. a candidate forced to be worse stays out */
	const char *params[] = {"steps=8"};
	long long run3 = gp_test_submit(db, PIPELINE, params, 1);
	REQUIRE(gp_test_wait_run(db, run3, 600000) == 1);
	CHECK(q("SELECT count(*) FROM deploy_decisions d JOIN model_versions v ON v.id = "
		"d.model_version_id WHERE d.run_id = %lld AND NOT d.promoted AND v.version = 3",
		run3) == 1);
	CHECK(q("SELECT count(*) FROM model_aliases a JOIN model_versions v ON v.id = "
		"a.model_version_id WHERE a.alias = 'production' AND v.version = 2") == 1);
	char out[16384];
	CHECK(cli(out, sizeof out, "models show " MODEL) == 0);
	printf("%s", out);
	CHECK_CONTAINS(out, "kept out of production");
	CHECK_CONTAINS(out, "needs at least 30.0% better");
	CHECK_CONTAINS(out, "failed");
	CHECK(q("SELECT count(*) FROM retrain_triggers") == 1);

	prompts_free(&pa);
	prompts_free(&pa_held);
	free(a_seen);
	prompts_free(&pb);
	prompts_free(&pc);
	free(a_held);
	free(b0);
	free(b1);
	gp_store_close(st);
	gp_bus_destroy(bus);
	gp_db_destroy(db);
	return CHECK_RESULT();
}

int main(void)
{
	return gp_test_run(body);
}
