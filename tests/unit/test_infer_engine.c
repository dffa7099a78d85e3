/*
 * test_infer_engine: continuous batching against one-at-a-time generation.
 *
 * The oracle is gp_model_generate (one sequence, the reference decoder).
 * The engine runs the reference path too, so greedy and seeded completions
 * must be identical byte for byte, whatever the batch they shared steps
 * with. Then the cache, the limits, deadlines, streaming and stop
 * sequences, and the UTF-8 helpers.
 */
#include <math.h>
#include <stdatomic.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bpe.h"
#include "../check.h"
#include "engine.h"
#include "gpu.h"
#include "model.h"
#include "utf8.h"

struct waiter {
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int done;
	char *text;
	size_t len;
	char *streamed;
	size_t slen;
	char code[32];
	char error[256];
	int cache_hit, prompt_tokens, output_tokens;
	enum gp_finish finish;
	double compute_ms, latency_ms;
	struct gp_lm *watch; /* when set: its reference count as the reply goes out */
	int refs_at_done;
};

static void w_init(struct waiter *w)
{
	memset(w, 0, sizeof(*w));
	pthread_mutex_init(&w->mu, NULL);
	pthread_cond_init(&w->cv, NULL);
}

static void w_free(struct waiter *w)
{
	free(w->text);
	free(w->streamed);
	pthread_mutex_destroy(&w->mu);
	pthread_cond_destroy(&w->cv);
}

static void on_partial(void *cl, const char *d, size_t n)
{
	struct waiter *w = cl;
	w->streamed = realloc(w->streamed, w->slen + n + 1);
	memcpy(w->streamed + w->slen, d, n);
	w->slen += n;
	w->streamed[w->slen] = 0;
}

static void on_done(void *cl, const struct gp_gen_result *r)
{
	struct waiter *w = cl;
	pthread_mutex_lock(&w->mu);
	w->text = malloc(r->len + 1);
	memcpy(w->text, r->text, r->len);
	w->text[r->len] = 0;
	w->len = r->len;
	snprintf(w->code, sizeof(w->code), "%s", r->error_code ? r->error_code : "");
	snprintf(w->error, sizeof(w->error), "%s", r->error ? r->error : "");
	w->cache_hit = r->cache_hit;
	w->prompt_tokens = r->prompt_tokens;
	w->output_tokens = r->output_tokens;
	w->finish = r->finish;
	w->compute_ms = r->compute_ms;
	w->latency_ms = r->latency_ms;
	if (w->watch)
		w->refs_at_done = atomic_load((_Atomic int *)&w->watch->refs);
	w->done = 1;
	pthread_cond_broadcast(&w->cv);
	pthread_mutex_unlock(&w->mu);
}

static void w_wait(struct waiter *w)
{
	pthread_mutex_lock(&w->mu);
	while (!w->done)
		pthread_cond_wait(&w->cv, &w->mu);
	pthread_mutex_unlock(&w->mu);
}

static const char *corpus[] = {
	"The quick brown fox jumps over the lazy dog. ",
	"A bird in the hand is worth two in the bush. ",
	"Q: Why did the chicken cross the road? A: To get to the other side. ",
	"Never put off until tomorrow what you can do the day after tomorrow. ",
};

static struct gp_bpe *make_tok(void)
{
	struct gp_err err = {0};
	struct gp_bpe_trainer *tr = NULL;
	REQUIRE_OK(gp_bpe_trainer_new(&tr, &err), err);
	for (int r = 0; r < 20; r++)
		for (size_t i = 0; i < sizeof(corpus) / sizeof(*corpus); i++)
			REQUIRE_OK(gp_bpe_trainer_add(tr, corpus[i], strlen(corpus[i]), &err), err);
	struct gp_bpe *tok = NULL;
	REQUIRE_OK(gp_bpe_train(tr, 320, 0, &tok, &err), err);
	gp_bpe_trainer_free(tr);
	return tok;
}

static struct gp_lm *make_lm(long long version, uint64_t seed)
{
	struct gp_err err = {0};
	struct gp_bpe *tok = make_tok();
	struct gp_model_config c = {.vocab = gp_bpe_vocab_size(tok),
				    .padded_vocab = (gp_bpe_vocab_size(tok) + 63) / 64 * 64,
				    .context = 48, .layers = 2, .heads = 2, .width = 32};
	struct gp_model *m = NULL;
	REQUIRE_OK(gp_model_create(&m, &c, &err), err);
	gp_model_init(m, seed);
	float *p = gp_model_params(m);
	for (size_t i = 0; i < gp_model_num_params(m); i++)
		p[i] *= 8.0f; /* peaked distributions: varied, decisive tokens */
	struct gp_lm *lm = NULL;
	REQUIRE_OK(gp_lm_wrap(&lm, "toy", version, version, m, tok, &err), err);
	return lm;
}

static const char *prompts[] = {
	"The quick", "A bird in", "Q: Why", "", "Never put off until tomorrow what you can",
	"the lazy dog", "two in the bush", "A: To get", "road?", "over the",
	"brown fox jumps", "worth two", "the day after", "Q:", "tomorrow", "hand is",
};
#define NP ((int)(sizeof(prompts) / sizeof(*prompts)))

/* The engine's completions equal one-at-a-time generation on the CPU. On
 * the GPU (fp32 weights) the greedy ones must be identical; sampled ones
 * may part where a draw lands within rounding of a boundary. Without a GPU
 * the GPU engine is refused with the reason. */
static void test_batched_equals_single(int gpu)
{
	struct gp_err err = {0};
	struct gp_engine *e = NULL;
	struct gp_engine_config cfg = {.slots = 6, .queue = 64, .max_new_tokens = 64,
				       .prefill_chunk = 3, .path = GP_MODEL_REFERENCE,
				       .use_gpu = gpu, .gpu_fp32 = 1};
	const char *why = NULL;
	if (gpu && gp_gpu_available(&why) <= 0) {
		CHECK(gp_engine_create(&e, &cfg, &err) == GP_ERR_UNAVAILABLE);
		CHECK_CONTAINS(err.msg, "GPU");
		printf("engine on the GPU here: %s\n", err.msg);
		return;
	}
	struct gp_lm *lm = make_lm(1, 7);
	REQUIRE_OK(gp_engine_create(&e, &cfg, &err), err);
	static struct waiter w[NP];
	struct gp_gen_params gp[NP];
	for (int i = 0; i < NP; i++) {
		w_init(&w[i]);
		w[i].watch = lm;
		gp[i] = (struct gp_gen_params){
			.prompt = prompts[i], .prompt_len = strlen(prompts[i]),
			.sample = {.temperature = i % 2 ? 0.9f : 0.0f, .top_k = i % 3 ? 0 : 20,
				   .top_p = i % 4 ? 1.0f : 0.9f, .seed = 100 + (uint64_t)i},
			.has_seed = 1, .max_tokens = 5 + 2 * i, .no_cache = 1,
		};
		const char *code = NULL;
		REQUIRE_OK(gp_engine_submit(e, lm, &gp[i], i % 2 ? on_partial : NULL, on_done, &w[i],
					    &code, &err), err);
		if (i == 5)
			usleep(2000); /* later requests join sequences already decoding */
	}
	struct gp_kv *kv = NULL;
	REQUIRE_OK(gp_kv_create(&kv, gp_model_config(lm->model), &err), err);
	gp_model_set_path(lm->model, GP_MODEL_REFERENCE);
	int same = 0, streamed_ok = 0, greedy = 0, greedy_same = 0;
	for (int i = 0; i < NP; i++) {
		w_wait(&w[i]);
		CHECK_STR(w[i].code, "");
		struct gp_generate_opts o = {.sample = gp[i].sample, .max_new_tokens = gp[i].max_tokens,
					     .stop_at_eot = 1};
		struct gp_generation g = {0};
		REQUIRE_OK(gp_model_generate(lm->model, kv, lm->tok, prompts[i], strlen(prompts[i]),
					     &o, NULL, NULL, &g, &err), err);
		size_t cl = 0;
		char *clean = gp_utf8_repaired(g.text, g.len, &cl);
		REQUIRE(clean);
		int eq = cl == w[i].len && !memcmp(clean, w[i].text, cl) &&
			 g.n_ids == w[i].output_tokens && g.prompt_tokens == w[i].prompt_tokens;
		same += eq;
		greedy += gp[i].sample.temperature == 0;
		greedy_same += eq && gp[i].sample.temperature == 0;
		if (!eq)
			fprintf(stderr, "request %d: engine \"%s\" (%d tokens), alone \"%s\" (%d)\n", i,
				w[i].text, w[i].output_tokens, clean, g.n_ids);
		if (i % 2)
			streamed_ok += w[i].slen == w[i].len &&
				       (!w[i].len || !memcmp(w[i].streamed, w[i].text, w[i].len));
		CHECK(w[i].compute_ms > 0 && w[i].latency_ms >= w[i].compute_ms);
		free(clean);
		gp_generation_release(&g);
	}
	struct gp_engine_stats s;
	gp_engine_stats(e, &s);
	printf("batched%s vs single: %d of %d completions identical (greedy %d of %d); %lld steps "
	       "for %lld rows (%.1f rows per step)\n", gpu ? " on the GPU" : "", same, NP,
	       greedy_same, greedy, s.steps, s.rows, (double)s.rows / s.steps);
	CHECK(greedy_same == greedy);
	/* a request's reference to its version is gone before its reply: the
	 * last reply of all leaves only the test's own (a server under a memory
	 * budget can unload the version as soon as a client has its answer) */
	int min_refs = 1 << 30;
	for (int i = 0; i < NP; i++)
		min_refs = w[i].refs_at_done < min_refs ? w[i].refs_at_done : min_refs;
	CHECK(min_refs == 1);
	CHECK(gpu ? same >= NP - 2 : same == NP);
	CHECK(streamed_ok == NP / 2);
	CHECK(s.rows > 2 * s.steps); /* steps really were shared */
	CHECK(s.active == 0 && s.queued == 0);
	for (int i = 0; i < NP; i++)
		w_free(&w[i]);
	gp_kv_destroy(kv);
	gp_engine_destroy(e);
	gp_lm_unref(lm);
}

static void submit_wait(struct gp_engine *e, struct gp_lm *lm, const struct gp_gen_params *p,
			struct waiter *w)
{
	struct gp_err err = {0};
	const char *code = NULL;
	w_init(w);
	REQUIRE_OK(gp_engine_submit(e, lm, p, NULL, on_done, w, &code, &err), err);
	w_wait(w);
}

static void test_cache(void)
{
	struct gp_err err = {0};
	struct gp_lm *lm = make_lm(1, 3), *lm2 = make_lm(2, 4);
	lm2->version_id = 2;
	struct gp_engine *e = NULL;
	struct gp_engine_config cfg = {.slots = 4, .cache_bytes = 2048};
	REQUIRE_OK(gp_engine_create(&e, &cfg, &err), err);
	struct gp_gen_params p = {.prompt = "The quick", .prompt_len = 9, .max_tokens = 12};
	struct waiter a, b, c, d;
	submit_wait(e, lm, &p, &a);
	submit_wait(e, lm, &p, &b);
	CHECK(!a.cache_hit && b.cache_hit);
	CHECK_STR(b.text, a.text);
	CHECK(b.output_tokens == a.output_tokens && b.prompt_tokens == a.prompt_tokens);
	/* another version, other max_tokens: misses */
	submit_wait(e, lm2, &p, &c);
	CHECK(!c.cache_hit);
	p.max_tokens = 11;
	submit_wait(e, lm, &p, &d);
	CHECK(!d.cache_hit);
	w_free(&a), w_free(&b), w_free(&c), w_free(&d);
	/* sampling without a seed is never cached; with one it is */
	p.sample.temperature = 1.0f;
	submit_wait(e, lm, &p, &a);
	submit_wait(e, lm, &p, &b);
	CHECK(!b.cache_hit);
	p.has_seed = 1;
	p.sample.seed = 9;
	submit_wait(e, lm, &p, &c);
	submit_wait(e, lm, &p, &d);
	CHECK(!c.cache_hit && d.cache_hit);
	CHECK_STR(d.text, c.text);
	w_free(&a), w_free(&b), w_free(&c), w_free(&d);
	struct gp_engine_stats s;
	gp_engine_stats(e, &s);
	printf("cache: %lld hits, %lld misses, %lld entries, %lld bytes (bound 2048)\n",
	       s.cache_hits, s.cache_misses, s.cache_entries, s.cache_bytes);
	CHECK(s.cache_hits == 2 && s.cache_misses == 4);
	CHECK(s.cache_bytes <= 2048);
	/* the bound holds: many distinct prompts evict the oldest */
	for (int i = 0; i < NP; i++) {
		struct gp_gen_params q = {.prompt = prompts[i], .prompt_len = strlen(prompts[i]),
					  .max_tokens = 30};
		submit_wait(e, lm, &q, &a);
		w_free(&a);
	}
	gp_engine_stats(e, &s);
	printf("cache after %d more prompts: %lld entries, %lld bytes\n", NP, s.cache_entries,
	       s.cache_bytes);
	CHECK(s.cache_bytes <= 2048 && s.cache_entries < 4 + NP);
	gp_engine_cache_drop(e, 0);
	gp_engine_stats(e, &s);
	CHECK(s.cache_entries == 0 && s.cache_bytes == 0);
	gp_engine_destroy(e);
	gp_lm_unref(lm);
	gp_lm_unref(lm2);
}

static void test_limits(void)
{
	struct gp_err err = {0};
	struct gp_lm *lm = make_lm(1, 5);
	struct gp_engine *e = NULL;
	struct gp_engine_config cfg = {.slots = 1, .queue = 1, .max_new_tokens = 40,
				       .max_prompt_tokens = 8};
	REQUIRE_OK(gp_engine_create(&e, &cfg, &err), err);
	const char *code = NULL;
	struct waiter w;
	w_init(&w);
	struct gp_gen_params p = {.prompt = "Q:", .prompt_len = 2, .max_tokens = 41};
	CHECK(gp_engine_submit(e, lm, &p, NULL, on_done, &w, &code, &err) == GP_ERR_INVALID);
	CHECK_STR(code, "bad_request");
	CHECK_CONTAINS(err.msg, "max_tokens 41");
	p.max_tokens = -1;
	CHECK(gp_engine_submit(e, lm, &p, NULL, on_done, &w, &code, &err) == GP_ERR_INVALID);
	p.max_tokens = 4;
	p.sample.temperature = NAN;
	CHECK(gp_engine_submit(e, lm, &p, NULL, on_done, &w, &code, &err) == GP_ERR_INVALID);
	CHECK_CONTAINS(err.msg, "temperature");
	p.sample.temperature = -1;
	CHECK(gp_engine_submit(e, lm, &p, NULL, on_done, &w, &code, &err) == GP_ERR_INVALID);
	p.sample.temperature = 0;
	const char *longp = "Never put off until tomorrow what you can do the day after tomorrow.";
	struct gp_gen_params lp = {.prompt = longp, .prompt_len = strlen(longp), .max_tokens = 4};
	CHECK(gp_engine_submit(e, lm, &lp, NULL, on_done, &w, &code, &err) == GP_ERR_TOO_BIG);
	CHECK_STR(code, "bad_request");
	CHECK_CONTAINS(err.msg, "the limit is 8");
	/* one slot, one queue place: the third concurrent request is busy */
	struct waiter a, b;
	w_init(&a);
	w_init(&b);
	struct gp_gen_params slow = {.prompt = "Q:", .prompt_len = 2, .max_tokens = 40,
				     .sample = {.temperature = 1, .seed = 1}};
	REQUIRE_OK(gp_engine_submit(e, lm, &slow, NULL, on_done, &a, &code, &err), err);
	REQUIRE_OK(gp_engine_submit(e, lm, &slow, NULL, on_done, &b, &code, &err), err);
	gp_status st = gp_engine_submit(e, lm, &slow, NULL, on_done, &w, &code, &err);
	/* the first may already be done on a fast machine; then this one queued */
	if (st == GP_OK) {
		w_wait(&w);
	} else {
		CHECK(st == GP_ERR_UNAVAILABLE);
		CHECK_STR(code, "busy");
		CHECK_CONTAINS(err.msg, "busy");
	}
	w_wait(&a);
	w_wait(&b);
	CHECK_STR(a.code, "");
	CHECK_STR(b.code, "");
	w_free(&a), w_free(&b), w_free(&w);
	gp_engine_destroy(e);

	/* deadlines: a request that cannot finish in time ends with its text so far */
	struct gp_engine_config c2 = {.slots = 2, .max_new_tokens = 100000};
	REQUIRE_OK(gp_engine_create(&e, &c2, &err), err);
	struct gp_gen_params dl = {.prompt = "Q:", .prompt_len = 2, .max_tokens = 100000,
				   .deadline_ms = 1, .sample = {.temperature = 1, .seed = 2}};
	submit_wait(e, lm, &dl, &a);
	CHECK_STR(a.code, "deadline_exceeded");
	CHECK(a.latency_ms < 1000);
	w_free(&a);
	/* the context ends a long generation */
	dl.deadline_ms = 60000;
	submit_wait(e, lm, &dl, &a);
	CHECK_STR(a.code, "");
	CHECK(a.finish == GP_FINISH_CONTEXT || a.finish == GP_FINISH_EOT);
	w_free(&a);
	gp_engine_destroy(e);
	gp_lm_unref(lm);
}

static void test_stop_and_shutdown(void)
{
	struct gp_err err = {0};
	struct gp_lm *lm = make_lm(1, 11);
	struct gp_engine *e = NULL;
	struct gp_engine_config cfg = {.slots = 2};
	REQUIRE_OK(gp_engine_create(&e, &cfg, &err), err);
	struct gp_gen_params p = {.prompt = "The", .prompt_len = 3, .max_tokens = 20};
	struct waiter a, b;
	submit_wait(e, lm, &p, &a);
	/* stop at a piece of what it would say (ASCII, the text is the model's
	 * random bytes made valid): the text ends right before it */
	size_t at = 1;
	while (at + 1 < a.len && !(a.text[at] > ' ' && a.text[at] < 127 && a.text[at + 1] > ' ' &&
				   a.text[at + 1] < 127))
		at++;
	REQUIRE(at + 1 < a.len);
	char stop[3] = {a.text[at], a.text[at + 1], 0};
	const char *stops[] = {stop};
	p.stop = stops;
	p.n_stop = 1;
	w_init(&b);
	const char *code = NULL;
	REQUIRE_OK(gp_engine_submit(e, lm, &p, on_partial, on_done, &b, &code, &err), err);
	w_wait(&b);
	printf("stop \"%s\": \"%s\" -> \"%s\"\n", stop, a.text, b.text);
	char *first = strstr(a.text, stop);
	REQUIRE(first);
	CHECK(b.finish == GP_FINISH_STOP);
	CHECK(b.len == (size_t)(first - a.text) && !memcmp(b.text, a.text, b.len));
	CHECK(b.slen == b.len); /* nothing of the stop sequence was streamed */
	w_free(&a), w_free(&b);
	/* outstanding requests end with shutting_down */
	struct gp_gen_params slow = {.prompt = "Q:", .prompt_len = 2, .max_tokens = 40,
				     .sample = {.temperature = 1, .seed = 1}, .deadline_ms = 60000};
	w_init(&a);
	REQUIRE_OK(gp_engine_submit(e, lm, &slow, NULL, on_done, &a, &code, &err), err);
	gp_engine_destroy(e);
	w_wait(&a);
	CHECK(!strcmp(a.code, "shutting_down") || !strcmp(a.code, ""));
	w_free(&a);
	gp_lm_unref(lm);
}

static void test_utf8(void)
{
	/* the repair itself is test_ingest's; here the copy the engine uses */
	size_t n = 0;
	char *o = gp_utf8_repaired("a\xff" "b\xc3\xa9", 5, &n);
	CHECK(o && n == 7 && !memcmp(o, "a\xef\xbf\xbd" "b\xc3\xa9", 8));
	free(o);
	o = gp_utf8_repaired("\xed\xa0\x80\xc0\xaf", 5, &n);
	CHECK(o && n == 6); /* a surrogate and an overlong form: one U+FFFD each */
	free(o);
	CHECK(gp_utf8_safe_prefix("ab\xe2\x82", 4) == 2);
	CHECK(gp_utf8_safe_prefix("ab\xe2\x82\xac", 5) == 5);
	CHECK(gp_utf8_safe_prefix("ab\xff", 3) == 2); /* what follows may join its U+FFFD */
	CHECK(gp_utf8_safe_prefix("ab\xff" "c", 4) == 4);
	CHECK(gp_utf8_safe_prefix("", 0) == 0);
}

int main(void)
{
	test_utf8();
	test_batched_equals_single(0);
	test_batched_equals_single(1);
	test_cache();
	test_limits();
	test_stop_and_shutdown();
	return CHECK_RESULT();
}
