/*
 * gpu.h: the one door to CUDA, with no CUDA types in it (ggml-cuda.h style).
 *
 * Built with GENPIPE_CUDA the functions are implemented in common/cuda/;
 * without it, in gpu.c, where they report that no GPU path exists
 * (GP_ERR_UNAVAILABLE, with the reason). Callers pick the CUDA path only
 * when gp_gpu_available() says so, or when the user asked for it
 * (--device cuda), in which case the reason is the error they see.
 *
 * The model on the GPU is the model of model.h (same configuration, same
 * parameter order and layout, same function): gp_gpu_model_upload takes
 * gp_model_params() as they are and gp_gpu_model_download gives them back.
 * Two precisions: GP_GPU_FP32 (every tensor fp32, cuBLAS without TF32; the
 * mode the tests hold to the CPU reference tightly) and GP_GPU_BF16 (bf16
 * weights and activations, fp32 master weights, gradients, optimizer state
 * and accumulation; the training mode).
 *
 * Thread-safety: an object belongs to one thread at a time; each has its
 * own stream.
 */
#ifndef GP_GPU_H
#define GP_GPU_H

#include <stddef.h>
#include <stdint.h>

#include "model.h"
#include "status.h"

/* 1 when this binary was built with the CUDA path. */
int gp_gpu_built(void);

/*
 * Number of usable CUDA devices (0 without CUDA, without a driver, or
 * without a device). Never fails; *why (may be NULL) gets the reason
 * for 0 as static text.
 */
int gp_gpu_available(const char **why);

/* Name and memory of device i into name (len bytes). Returns 0 on success. */
int gp_gpu_describe(int i, char *name, size_t len, size_t *total_bytes);

/* "cpu", "cuda" or "auto" (cuda when available): *use_gpu gets the choice;
 * "cuda" without a GPU is an error that says why. */
gp_status gp_gpu_choose(const char *device, int *use_gpu, struct gp_err *err);

enum gp_gpu_precision { GP_GPU_FP32, GP_GPU_BF16 };
const char *gp_gpu_precision_str(enum gp_gpu_precision p);

/* ---- training ---- */

struct gp_gpu_model;

/*
 * A model on the current device with room for batches of up to max_B x
 * max_T tokens (activations are sized for that at creation: no allocation
 * during training). Parameters start at zero: upload them. max_B = max_T =
 * 0 makes a model for generation only (weights, no gradients, optimizer
 * state or activations): the training calls refuse it.
 */
gp_status gp_gpu_model_create(struct gp_gpu_model **out, const struct gp_model_config *c,
			      enum gp_gpu_precision prec, int max_B, int max_T,
			      struct gp_err *err);
void gp_gpu_model_destroy(struct gp_gpu_model *g);
/* Bytes of device memory the model holds. */
size_t gp_gpu_model_bytes(const struct gp_gpu_model *g);

/*
 * How training computes attention. GEMM: q, k, v permuted, cuBLAS batched
 * products around a causal softmax kernel, the (B, NH, T, T) probabilities
 * kept (the ATT activation); any precision. FLASH: fused tensor-core
 * kernels that keep only a log-sum-exp per row; bf16 training models with
 * head size 16, 32 or 64 only, where it is the default (the environment's
 * GENPIPE_GPU_ATTENTION=gemm turns that default off). Changing it drops a
 * pending forward (gp_gpu_backward then refuses until the next forward).
 */
enum gp_gpu_attention { GP_GPU_ATTN_GEMM, GP_GPU_ATTN_FLASH };
gp_status gp_gpu_model_set_attention(struct gp_gpu_model *g, enum gp_gpu_attention a,
				     struct gp_err *err);
enum gp_gpu_attention gp_gpu_model_attention(const struct gp_gpu_model *g);

/* params: gp_model_num_params floats; mom/vel (may be NULL: zero) the AdamW
 * moments of the same size. */
gp_status gp_gpu_model_upload(struct gp_gpu_model *g, const float *params, const float *mom,
			      const float *vel, struct gp_err *err);
/* Copy back the fp32 master parameters (and moments, when not NULL). */
gp_status gp_gpu_model_download(struct gp_gpu_model *g, float *params, float *mom, float *vel,
				struct gp_err *err);

/*
 * Forward over B x T tokens (B <= max_B, T <= max_T, ids < vocab, checked).
 * With targets *loss gets the mean cross-entropy (waits for the device);
 * without, nothing is waited for.
 */
gp_status gp_gpu_forward(struct gp_gpu_model *g, const uint16_t *inputs, const uint16_t *targets,
			 int B, int T, float *loss, struct gp_err *err);
/* Zero the parameter gradients. */
gp_status gp_gpu_zero_grad(struct gp_gpu_model *g, struct gp_err *err);
/* Backward of the last forward (which had targets); accumulates into the
 * parameter gradients like gp_model_backward. */
gp_status gp_gpu_backward(struct gp_gpu_model *g, struct gp_err *err);
/*
 * Global gradient norm into *norm (may be NULL); with max_norm > 0 the
 * AdamW update that follows scales the gradients to it (gp_model_clip_grad).
 */
gp_status gp_gpu_clip_grad(struct gp_gpu_model *g, float max_norm, float *norm,
			   struct gp_err *err);
/* AdamW as gp_model_adamw (decay on matrices only); leaves gradients zero. */
gp_status gp_gpu_adamw(struct gp_gpu_model *g, const struct gp_adamw *o, long step,
		       struct gp_err *err);
/*
 * One training step: zero, forward, backward, clip, AdamW. *loss and *norm
 * (may be NULL) get the step's loss and gradient norm; with both NULL the
 * step does not wait for the device.
 */
gp_status gp_gpu_train_step(struct gp_gpu_model *g, const uint16_t *inputs,
			    const uint16_t *targets, int B, int T, const struct gp_adamw *o,
			    long step, float max_norm, float *loss, float *norm,
			    struct gp_err *err);

/* ---- inspection (tests) ---- */

/*
 * Copy the last forward's activation act (enum gp_model_act, the layout of
 * gp_model_act_sizes for its B x T) to out as fp32: n floats. The GPU keeps
 * every activation the CPU keeps except GP_A_PREATT and GP_A_PROBS
 * (GP_ERR_INVALID for those).
 */
gp_status gp_gpu_read_activation(struct gp_gpu_model *g, int act, float *out, size_t n,
				 struct gp_err *err);
/* The parameter gradients (gp_model_num_params floats, fp32). */
gp_status gp_gpu_read_grads(struct gp_gpu_model *g, float *out, struct gp_err *err);
/* Fill activations, their gradients and the loss buffers with NaN, so that
 * a kernel that fails to write its output cannot pass a test by accident. */
gp_status gp_gpu_poison(struct gp_gpu_model *g, struct gp_err *err);

/* ---- generation ---- */

struct gp_gpu_decoder;

/*
 * KV caches for `slots` sequences of up to context tokens each, over the
 * model g's current parameters (in g's precision). Steps are captured as
 * CUDA graphs (one per row count) so that small steps are not launch-bound.
 * A decoder uses its model's cuBLASLt plans: the model and its decoders
 * belong to one thread at a time, together.
 */
gp_status gp_gpu_decoder_create(struct gp_gpu_decoder **out, struct gp_gpu_model *g, int slots,
				int max_rows, struct gp_err *err);
void gp_gpu_decoder_destroy(struct gp_gpu_decoder *d);
void gp_gpu_decoder_reset(struct gp_gpu_decoder *d, int slot);
int gp_gpu_decoder_len(const struct gp_gpu_decoder *d, int slot);
/* 0: launch each step's kernels; 1: replay captured graphs (the default). */
void gp_gpu_decoder_use_graphs(struct gp_gpu_decoder *d, int on);

/*
 * One step over n rows (n <= max_rows): row i appends tokens[i] to slot
 * slots[i]; rows of one slot must be consecutive (a prompt is several rows
 * of its slot). logits (may be NULL) gets n x padded_vocab fp32 logits, one
 * row per input row. Checks everything (slots, ids, room in each cache)
 * before it changes any cache.
 */
gp_status gp_gpu_decoder_step(struct gp_gpu_decoder *d, const int *slots,
			      const uint16_t *tokens, int n, float *logits, struct gp_err *err);
/* The same step with the greedy choice made on the device: next[i] gets
 * the argmax (first of equals) of row i's logits over the vocabulary. */
gp_status gp_gpu_decoder_greedy(struct gp_gpu_decoder *d, const int *slots,
				const uint16_t *tokens, int n, uint16_t *next, struct gp_err *err);

/* What the device draws one row's token with: gp_sample's options over the
 * first `vocab` logits, and the draw gp_sample_draw made for it (taken only
 * when temperature > 0, as gp_sample takes it). */
struct gp_gpu_pick {
	int want;          /* 0: no token for this row (a prompt row before the last) */
	int vocab;         /* 1..the model's vocabulary */
	float temperature; /* <= 0: greedy */
	int top_k;         /* 0: off */
	float top_p;       /* 0 or 1: off */
	double u;          /* in [0, 1) */
};
/* The step with gp_sample's choice made on the device for the rows whose
 * pick wants one: next[i] gets row i's token (rows that want none: 0). Only
 * n tokens come back, not n x vocab logits. Given the same logits and draw,
 * the device chooses as gp_sample does (it sorts a row by probability only
 * when top_k or top_p asks for it). */
gp_status gp_gpu_decoder_sample(struct gp_gpu_decoder *d, const int *slots,
				const uint16_t *tokens, const struct gp_gpu_pick *picks, int n,
				uint16_t *next, struct gp_err *err);

#endif
