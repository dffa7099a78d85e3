/*
 * engine.h: generation with continuous batching, for the online service
 * and the batch-infer stage. No NATS and no SQL here: callers hand in
 * loaded model versions and requests, and get results through callbacks.
 *
 * One engine thread owns every model computation. Each loop it admits
 * waiting requests into free slots (a slot is one sequence with its KV
 * cache), then runs one gp_model_step per loaded version over the rows of
 * all its active slots: one row per decoding sequence plus up to
 * prefill_chunk prompt rows per sequence still reading its prompt. A new
 * request therefore joins between two decode steps; nobody waits for a
 * batch to finish.
 *
 * Limits: a request over max_prompt_tokens or with max_tokens over
 * max_new_tokens is refused at submit ("bad_request"); past slots + queue
 * outstanding requests submit says "busy" at once; a request whose
 * deadline passes (queued or generating) ends with "deadline_exceeded",
 * the text so far, and frees its slot.
 *
 * The response cache keeps completions of deterministic requests
 * (temperature 0, or a fixed seed), keyed by model version, prompt and
 * every sampling parameter; bounded in bytes, least recently used first.
 */
#ifndef GP_INFER_ENGINE_H
#define GP_INFER_ENGINE_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "http.h"
#include "model.h"
#include "status.h"

/* One loaded model version; shared by reference count. */
struct gp_lm {
	char name[64];
	long long version;    /* model_versions.version */
	long long version_id; /* model_versions.id */
	struct gp_model *model;
	struct gp_bpe *tok;
	size_t bytes;         /* mapped checkpoint */
	int refs;             /* atomic */
	pthread_mutex_t tok_mu; /* gp_bpe_encode keeps a cache: one caller at a time */
};

/* Wrap a model and its tokenizer (gp_registry_load opens them); takes
 * ownership on success. *out has one reference. */
gp_status gp_lm_wrap(struct gp_lm **out, const char *name, long long version,
		     long long version_id, struct gp_model *model, struct gp_bpe *tok,
		     struct gp_err *err);
struct gp_lm *gp_lm_ref(struct gp_lm *lm);
void gp_lm_unref(struct gp_lm *lm);

struct gp_engine_config {
	int slots;                  /* sequences decoded together; default 32 */
	int queue;                  /* requests waiting beyond the slots; default 64 */
	int max_prompt_tokens;      /* 0: the model's context - 1 */
	int max_new_tokens;         /* the most a request may ask for; default 512 */
	int prefill_chunk;          /* prompt rows per sequence per step; default 64 */
	int max_rows;               /* rows per step; default max(slots, 256) */
	long long default_deadline_ms; /* when a request gives none; default 30000 */
	long long max_deadline_ms;  /* default 300000 */
	size_t cache_bytes;         /* response cache; 0: off */
	enum gp_model_path path;    /* GP_MODEL_FAST unless testing */
	int use_gpu;                /* steps on the GPU (gpu.h); create fails where none is usable */
	int gpu_fp32;               /* GPU weights in fp32 (tests: identical to the CPU) rather than bf16 */
	struct gp_metrics *metrics; /* may be NULL */
};

struct gp_gen_result {
	const char *error_code;   /* NULL on success, else "busy", "bad_request",
				   * "deadline_exceeded", "shutting_down", "internal" */
	const char *error;        /* the message that goes with it */
	const char *text;         /* completion (valid UTF-8), possibly partial on error */
	size_t len;
	const uint16_t *prompt_ids;
	int prompt_tokens;
	int output_tokens;
	int cache_hit;
	enum gp_finish finish;
	double queue_ms;          /* submit to admission */
	double compute_ms;        /* wall time of the model steps it took part in */
	double latency_ms;        /* submit to result */
};

struct gp_gen_request;
/* Streaming: new text (valid UTF-8, never splitting a character). */
typedef void (*gp_gen_partial_fn)(void *closure, const char *delta, size_t n);
/* Exactly once per accepted request, from the engine thread (or from
 * gp_engine_submit's thread for a cache hit). */
typedef void (*gp_gen_done_fn)(void *closure, const struct gp_gen_result *res);

struct gp_gen_params {
	const char *prompt;
	size_t prompt_len;
	struct gp_sample_opts sample;
	int has_seed;               /* with temperature > 0: deterministic, cacheable */
	int max_tokens;             /* 0: 64 */
	const char *const *stop;
	int n_stop;                 /* at most 16 */
	long long deadline_ms;      /* relative; 0: the default */
	int no_cache;
};

struct gp_engine;

gp_status gp_engine_create(struct gp_engine **out, const struct gp_engine_config *cfg,
			   struct gp_err *err);
/* Stops the thread; requests still outstanding end with "shutting_down". */
void gp_engine_destroy(struct gp_engine *e);

/*
 * Submit a request against lm (the engine takes its own reference).
 * Returns GP_OK when the request was accepted (done will be called once),
 * or an error with a message and *code set ("busy", "bad_request"), in
 * which case done is never called. partial may be NULL.
 */
gp_status gp_engine_submit(struct gp_engine *e, struct gp_lm *lm, const struct gp_gen_params *p,
			   gp_gen_partial_fn partial, gp_gen_done_fn done, void *closure,
			   const char **code, struct gp_err *err);

struct gp_engine_stats {
	long long steps, rows, tokens, cache_hits, cache_misses, cache_entries, cache_bytes;
	int active, queued;
};
void gp_engine_stats(struct gp_engine *e, struct gp_engine_stats *s);

/* Drop cached responses of a version (when it is unloaded); 0: all. */
void gp_engine_cache_drop(struct gp_engine *e, long long version_id);

#endif
