/*
 * gpu.c: the CPU-only side of gpu.h, compiled when GENPIPE_CUDA is off.
 * Every GPU entry point reports why it cannot run.
 */
#include "gpu.h"

#include <stdio.h>

#define NO_CUDA "built without CUDA (-DGENPIPE_CUDA=OFF or no nvcc)"

int gp_gpu_built(void)
{
	return 0;
}

int gp_gpu_available(const char **why)
{
	if (why)
		*why = NO_CUDA;
	return 0;
}

int gp_gpu_describe(int i, char *name, size_t len, size_t *total_bytes)
{
	(void)i;
	(void)total_bytes;
	if (len)
		snprintf(name, len, "none");
	return -1;
}

static gp_status none(struct gp_err *err)
{
	return gp_err_set(err, GP_ERR_UNAVAILABLE, "GPU path: " NO_CUDA);
}

gp_status gp_gpu_model_create(struct gp_gpu_model **out, const struct gp_model_config *c,
			      enum gp_gpu_precision prec, int max_B, int max_T,
			      struct gp_err *err)
{
	*out = NULL;
	return none(err);
}

void gp_gpu_model_destroy(struct gp_gpu_model *g)
{
}

size_t gp_gpu_model_bytes(const struct gp_gpu_model *g)
{
	return 0;
}

gp_status gp_gpu_model_upload(struct gp_gpu_model *g, const float *params, const float *mom,
			      const float *vel, struct gp_err *err)
{
	return none(err);
}

gp_status gp_gpu_model_download(struct gp_gpu_model *g, float *params, float *mom, float *vel,
				struct gp_err *err)
{
	return none(err);
}

gp_status gp_gpu_forward(struct gp_gpu_model *g, const uint16_t *inputs, const uint16_t *targets,
			 int B, int T, float *loss, struct gp_err *err)
{
	return none(err);
}

gp_status gp_gpu_zero_grad(struct gp_gpu_model *g, struct gp_err *err)
{
	return none(err);
}

gp_status gp_gpu_backward(struct gp_gpu_model *g, struct gp_err *err)
{
	return none(err);
}

gp_status gp_gpu_clip_grad(struct gp_gpu_model *g, float max_norm, float *norm,
			   struct gp_err *err)
{
	return none(err);
}

gp_status gp_gpu_adamw(struct gp_gpu_model *g, const struct gp_adamw *o, long step,
		       struct gp_err *err)
{
	return none(err);
}

gp_status gp_gpu_train_step(struct gp_gpu_model *g, const uint16_t *inputs,
			    const uint16_t *targets, int B, int T, const struct gp_adamw *o,
			    long step, float max_norm, float *loss, float *norm,
			    struct gp_err *err)
{
	return none(err);
}

gp_status gp_gpu_model_set_attention(struct gp_gpu_model *g, enum gp_gpu_attention a,
				     struct gp_err *err)
{
	return none(err);
}

enum gp_gpu_attention gp_gpu_model_attention(const struct gp_gpu_model *g)
{
	return GP_GPU_ATTN_GEMM;
}

gp_status gp_gpu_read_activation(struct gp_gpu_model *g, int act, float *out, size_t n,
				 struct gp_err *err)
{
	return none(err);
}

gp_status gp_gpu_read_grads(struct gp_gpu_model *g, float *out, struct gp_err *err)
{
	return none(err);
}

gp_status gp_gpu_poison(struct gp_gpu_model *g, struct gp_err *err)
{
	return none(err);
}

gp_status gp_gpu_decoder_create(struct gp_gpu_decoder **out, struct gp_gpu_model *g, int slots,
				int max_rows, struct gp_err *err)
{
	*out = NULL;
	return none(err);
}

void gp_gpu_decoder_destroy(struct gp_gpu_decoder *d)
{
}

void gp_gpu_decoder_reset(struct gp_gpu_decoder *d, int slot)
{
}

int gp_gpu_decoder_len(const struct gp_gpu_decoder *d, int slot)
{
	return 0;
}

void gp_gpu_decoder_use_graphs(struct gp_gpu_decoder *d, int on)
{
}

gp_status gp_gpu_decoder_step(struct gp_gpu_decoder *d, const int *slots,
			      const uint16_t *tokens, int n, float *logits, struct gp_err *err)
{
	return none(err);
}

gp_status gp_gpu_decoder_greedy(struct gp_gpu_decoder *d, const int *slots,
				const uint16_t *tokens, int n, uint16_t *next, struct gp_err *err)
{
	return none(err);
}

gp_status gp_gpu_decoder_sample(struct gp_gpu_decoder *d, const int *slots,
				const uint16_t *tokens, const struct gp_gpu_pick *picks, int n,
				uint16_t *next, struct gp_err *err)
{
	return none(err);
}
