/*
 * model.h: a GPT-2-family transformer in C (llm.c's shapes and vocabulary):
 * token and learned position embeddings, pre-LayerNorm blocks, causal
 * multi-head attention, GELU MLP, output head tied to the token embedding.
 *
 * Two CPU paths compute the same function: GP_MODEL_REFERENCE, plain loops
 * that are the oracle, and GP_MODEL_FAST, OpenBLAS matmuls and OpenMP
 * elsewhere; tests hold the fast path to the reference. A double-precision
 * instance of the reference (gp_model64_*) exists for the gradient check.
 *
 * Parameters live in one float array in the order of enum gp_model_param
 * (llm.c's order); each tensor is row-major, matrices (out, in).
 *
 * Thread-safety: a struct gp_model belongs to one thread at a time; the
 * fast path uses OpenMP threads inside each call.
 */
#ifndef GP_MODEL_H
#define GP_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

struct gp_bpe;

/* Limits a configuration must respect (and a checkpoint header too). */
#define GP_MODEL_MAX_VOCAB 65536 /* token ids are uint16 (llm.c shards) */
#define GP_MODEL_MAX_CONTEXT 16384
#define GP_MODEL_MAX_LAYERS 256
#define GP_MODEL_MAX_WIDTH 16384
#define GP_MODEL_MAX_PARAMS (4ULL << 30) /* 4 Gi parameters */

struct gp_model_config {
	int vocab;        /* real vocabulary; logits past it are ignored */
	int padded_vocab; /* rows of the embedding (llm.c pads 50257 to 50304) */
	int context;      /* maximum sequence length */
	int layers;
	int heads;
	int width;        /* channels; a multiple of heads */
};

enum gp_model_param {
	GP_P_WTE, GP_P_WPE, GP_P_LN1W, GP_P_LN1B, GP_P_QKVW, GP_P_QKVB, GP_P_ATTPROJW,
	GP_P_ATTPROJB, GP_P_LN2W, GP_P_LN2B, GP_P_FCW, GP_P_FCB, GP_P_FCPROJW, GP_P_FCPROJB,
	GP_P_LNFW, GP_P_LNFB, GP_P_COUNT
};

enum gp_model_act {
	GP_A_ENCODED, GP_A_LN1, GP_A_LN1_MEAN, GP_A_LN1_RSTD, GP_A_QKV, GP_A_ATTY, GP_A_PREATT,
	GP_A_ATT, GP_A_ATTPROJ, GP_A_RESIDUAL2, GP_A_LN2, GP_A_LN2_MEAN, GP_A_LN2_RSTD, GP_A_FCH,
	GP_A_FCH_GELU, GP_A_FCPROJ, GP_A_RESIDUAL3, GP_A_LNF, GP_A_LNF_MEAN, GP_A_LNF_RSTD,
	GP_A_LOGITS, GP_A_PROBS, GP_A_LOSSES, GP_A_COUNT
};

enum gp_model_path { GP_MODEL_REFERENCE, GP_MODEL_FAST };

/* Check ranges and divisibility; the message names the field. */
gp_status gp_model_config_check(const struct gp_model_config *c, struct gp_err *err);
/* Element counts of each parameter tensor; returns the total. */
size_t gp_model_param_sizes(const struct gp_model_config *c, size_t sizes[GP_P_COUNT]);
/* 1 for the tensors AdamW decays (the matrices: embeddings and weights). */
int gp_model_param_decays(int tensor);
/* Element counts of each activation tensor for B x T tokens (llm.c's
 * layout: per layer where it applies). Returns the total. */
size_t gp_model_act_sizes(const struct gp_model_config *c, int B, int T,
			  size_t sizes[GP_A_COUNT]);
/* Matmul FLOPs of one forward pass over B x T tokens (x3 for a training step). */
double gp_model_forward_flops(const struct gp_model_config *c, int B, int T);

struct gp_model;

/* Allocate parameters (zero). Caller owns; free with gp_model_destroy. */
gp_status gp_model_create(struct gp_model **out, const struct gp_model_config *c,
			  struct gp_err *err);
void gp_model_destroy(struct gp_model *m);
const struct gp_model_config *gp_model_config(const struct gp_model *m);
/* GPT-2 initialization from seed: N(0, 0.02) weights, residual projections
 * scaled by 1/sqrt(2 layers), zero biases, unit LayerNorm gains. */
void gp_model_init(struct gp_model *m, uint64_t seed);
void gp_model_set_path(struct gp_model *m, enum gp_model_path p);
enum gp_model_path gp_model_path(const struct gp_model *m);
/* Borrowed; valid until gp_model_destroy. */
float *gp_model_params(struct gp_model *m);
float *gp_model_param_tensor(struct gp_model *m, int tensor);
size_t gp_model_num_params(const struct gp_model *m);
/* NULL before the first gp_model_backward. */
float *gp_model_grads(struct gp_model *m);

/*
 * Forward pass over B sequences of T tokens (T <= context). With targets
 * (B*T ids) *loss gets the mean cross-entropy. Activations are allocated
 * for the largest B*T seen. Ids >= vocab are refused.
 */
gp_status gp_model_forward(struct gp_model *m, const uint16_t *inputs, const uint16_t *targets,
			   int B, int T, float *loss, struct gp_err *err);
/* Borrowed (B, T, padded_vocab) of the last forward. */
const float *gp_model_logits(const struct gp_model *m);
/* An activation of the last forward (layout of gp_model_act_sizes), e.g.
 * GP_A_LNF: the final normalized hidden state, (B, T, width). */
const float *gp_model_activation(const struct gp_model *m, int act);
/* Zero the parameter gradients (they accumulate over backward calls). */
void gp_model_zero_grad(struct gp_model *m);
/* Backward of the last forward (which must have had targets). */
gp_status gp_model_backward(struct gp_model *m, struct gp_err *err);

/* Global L2 norm of the gradients; scales them to max_norm when above it
 * (max_norm <= 0: no clipping). Returns the norm before clipping. */
float gp_model_clip_grad(struct gp_model *m, float max_norm);

struct gp_adamw {
	float lr, beta1, beta2, eps, weight_decay;
};
/*
 * One AdamW update (step counts from 1); m and v are the moment arrays
 * (num_params each, caller-owned, zero at the start). Weight decay is
 * decoupled and applies to the matrices only (gp_model_param_decays).
 * Leaves the gradients zero (one pass over memory instead of two), ready
 * for the next backward.
 */
void gp_model_adamw(struct gp_model *m, float *mom, float *vel, const struct gp_adamw *o,
		    long step);
/* Cosine decay from max_lr to min_lr after linear warmup. */
float gp_lr_cosine(long step, long total, long warmup, float max_lr, float min_lr);

/* ---- generation with a KV cache ---- */

struct gp_kv;
/* A cache for one sequence of up to context tokens. Caller owns; free
 * with gp_kv_destroy. */
gp_status gp_kv_create(struct gp_kv **out, const struct gp_model_config *c, struct gp_err *err);
void gp_kv_destroy(struct gp_kv *kv);
void gp_kv_reset(struct gp_kv *kv);
int gp_kv_len(const struct gp_kv *kv);
/* Append token; logits (padded_vocab floats, borrowed, valid until the
 * next call) for the next position. GP_ERR_TOO_BIG when the cache is full. */
gp_status gp_model_decode(struct gp_model *m, struct gp_kv *kv, uint16_t token,
			  const float **logits, struct gp_err *err);

/*
 * Batched steps, for serving many sequences at once (continuous batching):
 * each row appends one token to one cache, and every matmul of the step is
 * one sgemm over all rows instead of a matvec per sequence. A prompt is
 * several consecutive rows of one cache (prefill); a decoding sequence is
 * one row. Rows of different caches attend only to their own cache.
 */
#define GP_BATCH_MAX_ROWS 4096
struct gp_batch;
/* Scratch for up to max_rows rows of models with configuration c. */
gp_status gp_batch_create(struct gp_batch **out, const struct gp_model_config *c, int max_rows,
			  struct gp_err *err);
void gp_batch_destroy(struct gp_batch *b);
int gp_batch_max_rows(const struct gp_batch *b);
const struct gp_model_config *gp_batch_config(const struct gp_batch *b);

struct gp_step_row {
	struct gp_kv *kv;  /* the sequence this row extends */
	uint16_t token;
	int logits;        /* 1: compute next-token logits after this row */
};
/*
 * One forward step over n rows. Rows of one cache must be consecutive and
 * in order; each appends its token at the cache's next position. *logits
 * (borrowed, valid until the next step) gets *n_logits rows of
 * padded_vocab floats, one per row with .logits set, in row order. Checks
 * everything before it changes any cache.
 */
gp_status gp_model_step(struct gp_model *m, struct gp_batch *b, const struct gp_step_row *rows,
			int n, const float **logits, int *n_logits, struct gp_err *err);

struct gp_sample_opts {
	float temperature; /* 0: greedy */
	int top_k;         /* 0: off */
	float top_p;       /* 1 (or 0): off */
	uint64_t seed;
};
/* Draw a token from logits[0..vocab) (scratch: vocab floats + vocab ints,
 * caller-provided so that sampling does not allocate). *rng advances. */
int gp_sample(const float *logits, int vocab, const struct gp_sample_opts *o, uint64_t *rng,
	      float *scratch_p, int *scratch_i);
/* The uniform draw in [0, 1) gp_sample makes when temperature > 0 (it
 * advances *rng); a sampler elsewhere (the GPU's) takes it from here so that
 * both choose alike. */
double gp_sample_draw(uint64_t *rng);
/* Check temperature, top_k, top_p; the message names the field. */
gp_status gp_sample_opts_check(const struct gp_sample_opts *o, struct gp_err *err);

struct gp_generate_opts {
	struct gp_sample_opts sample;
	int max_new_tokens;
	const char *const *stop; /* stop sequences (text), may be NULL */
	int n_stop;
	int stop_at_eot;         /* end at the tokenizer's end-of-text token */
};
enum gp_finish { GP_FINISH_LENGTH, GP_FINISH_STOP, GP_FINISH_EOT, GP_FINISH_CONTEXT };
struct gp_generation {
	char *text;      /* completion (without the stop sequence), malloc'd */
	size_t len;
	uint16_t *ids;   /* generated ids, malloc'd */
	int n_ids;
	int prompt_tokens;
	enum gp_finish finish;
};
/* Called after each token with the text so far (may be NULL); non-zero stops. */
typedef int (*gp_token_fn)(const char *text, size_t len, void *closure);
/*
 * Encode prompt with tok, run it through a fresh cache and sample up to
 * max_new_tokens. Caller owns *out; release with gp_generation_release.
 */
gp_status gp_model_generate(struct gp_model *m, struct gp_kv *kv, struct gp_bpe *tok,
			    const char *prompt, size_t prompt_len,
			    const struct gp_generate_opts *o, gp_token_fn fn, void *closure,
			    struct gp_generation *out, struct gp_err *err);
void gp_generation_release(struct gp_generation *g);
const char *gp_finish_str(enum gp_finish f);

/* ---- checkpoints (format: docs/formats.md) ---- */

#define GP_CKPT_MAGIC 0x4b435047u /* "GPCK" */
#define GP_CKPT_VERSION 1
#define GP_CKPT_HEADER 256

struct gp_ckpt_meta {
	long long step;
	unsigned long long tokens_seen;
	uint64_t rng[2];          /* the data sampler's state */
	uint64_t train_fingerprint; /* hash of the hyperparameters it was trained with */
	double train_seconds;
};

/*
 * Write params (and mom/vel when not NULL) to path atomically: a temporary
 * file in the same directory, fsync, rename, directory fsync.
 */
gp_status gp_ckpt_save(const char *path, struct gp_model *m, const float *mom, const float *vel,
		       const struct gp_ckpt_meta *meta, struct gp_err *err);
/* Serialize to memory (malloc'd) instead. */
gp_status gp_ckpt_encode(struct gp_model *m, const float *mom, const float *vel,
			 const struct gp_ckpt_meta *meta, uint8_t **out, size_t *len,
			 struct gp_err *err);
/*
 * Validate a checkpoint image completely (magic, version, header size,
 * configuration ranges, exact size, checksum, finite parameters) and load
 * it: *out gets a new model (caller owns); *mom and *vel (may be NULL)
 * get malloc'd moments, or NULL when the checkpoint has none.
 */
gp_status gp_ckpt_decode(const uint8_t *data, size_t len, struct gp_model **out, float **mom,
			 float **vel, struct gp_ckpt_meta *meta, struct gp_err *err);
/* Read a file and decode it (messages name the file). */
gp_status gp_ckpt_load(const char *path, struct gp_model **out, float **mom, float **vel,
		       struct gp_ckpt_meta *meta, struct gp_err *err);

/*
 * Map a checkpoint read-only and use its parameters in place (serving): a
 * cold start costs one read of the file for the checksum and no copy. The
 * same checks as gp_ckpt_decode; the optimizer state, if any, is ignored.
 * The model cannot be trained (gp_model_backward refuses it).
 */
gp_status gp_ckpt_map(const char *path, struct gp_model **out, struct gp_ckpt_meta *meta,
		      struct gp_err *err);
/* Bytes mapped by gp_ckpt_map (0 for a model in ordinary memory). */
size_t gp_model_mapped_bytes(const struct gp_model *m);

/*
 * Write DIR/model.safetensors (F32, Hugging Face GPT-2 names, Conv1D
 * weights transposed to (in, out), vocab rows past vocab dropped) and
 * DIR/config.json for GPT2LMHeadModel. eot is the end-of-text id.
 */
gp_status gp_model_export_safetensors(struct gp_model *m, const char *dir, int eot,
				      struct gp_err *err);
/* The same safetensors image in memory (malloc'd). */
gp_status gp_model_safetensors(struct gp_model *m, uint8_t **out, size_t *len,
			       struct gp_err *err);

/* ---- the double-precision reference (gradient check) ---- */

struct gp_model64;
/* A copy of m's configuration and parameters in double. */
gp_status gp_model64_from(struct gp_model64 **out, struct gp_model *m, struct gp_err *err);
void gp_model64_destroy(struct gp_model64 *m);
double *gp_model64_params(struct gp_model64 *m);
double *gp_model64_grads(struct gp_model64 *m);
size_t gp_model64_num_params(const struct gp_model64 *m);
/* Mean loss of B x T tokens with targets. */
double gp_model64_loss(struct gp_model64 *m, const uint16_t *inputs, const uint16_t *targets,
		       int B, int T);
/* Zero the gradients, forward, backward: gradients of the mean loss. */
double gp_model64_grad(struct gp_model64 *m, const uint16_t *inputs, const uint16_t *targets,
		       int B, int T);

#endif
