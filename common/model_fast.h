/*
 * model_fast.h: private to model.c and model_fast.c: the fast path's entry
 * points (model_fast.c is compiled with its own flags, see its header).
 * Arguments as model_ops.inc's forward and backward.
 */
#ifndef GP_MODEL_FAST_H
#define GP_MODEL_FAST_H

#include <stddef.h>
#include <stdint.h>

#include "model.h"

void gp_model_forward_fast_(const struct gp_model_config *cfg, float *const *P, float *const *A,
			    const uint16_t *inputs, const uint16_t *targets, int B, int T,
			    float *loss);
void gp_model_backward_fast_(const struct gp_model_config *cfg, float *const *P,
			     float *const *G, float *const *A, float *const *GA,
			     const uint16_t *inputs, const uint16_t *targets, int B, int T);
/* Sum of squares in fixed chunks (repeatable for any schedule). */
double gp_model_sumsq_fast_(const float *g, size_t n);
/* AdamW over one tensor; clears g. b1c, b2c: the bias corrections. */
void gp_model_adamw_fast_(float *p, float *g, float *m, float *v, size_t n, float lr, float b1,
			  float b2, float eps, float wd, float b1c, float b2c);

#endif
