/*
 * model64.c: the reference passes of model_ops.inc instantiated in double,
 * so that the gradient check compares backward with finite differences
 * free of float rounding (a central difference in float at h = 1e-3 has
 * errors of order 1e-4, as large as the gradients it checks).
 */
#include <math.h>
#include <tgmath.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

#define real double
#define GP_OPS_FAST 0
#define OPS(x) x##_f64
#include "model_ops.inc"
#undef OPS
#undef GP_OPS_FAST
#undef real

struct gp_model64 {
	struct gp_model_config cfg;
	size_t sizes[GP_P_COUNT], n;
	double *params, *grads, *acts, *gacts;
	double *P[GP_P_COUNT], *G[GP_P_COUNT], *A[GP_A_COUNT], *GA[GP_A_COUNT];
	size_t an;
	int B, T;
};

gp_status gp_model64_from(struct gp_model64 **out, struct gp_model *src, struct gp_err *err)
{
	struct gp_model64 *m = calloc(1, sizeof(*m));
	if (!m)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	m->cfg = *gp_model_config(src);
	m->n = gp_model_param_sizes(&m->cfg, m->sizes);
	m->params = malloc(m->n * sizeof(double));
	m->grads = calloc(m->n, sizeof(double));
	if (!m->params || !m->grads) {
		gp_model64_destroy(m);
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	}
	const float *p = gp_model_params(src);
	for (size_t i = 0; i < m->n; i++)
		m->params[i] = p[i];
	size_t off = 0;
	for (int i = 0; i < GP_P_COUNT; i++) {
		m->P[i] = m->params + off;
		m->G[i] = m->grads + off;
		off += m->sizes[i];
	}
	*out = m;
	return GP_OK;
}

void gp_model64_destroy(struct gp_model64 *m)
{
	if (!m)
		return;
	free(m->params);
	free(m->grads);
	free(m->acts);
	free(m->gacts);
	free(m);
}

double *gp_model64_params(struct gp_model64 *m) { return m->params; }
double *gp_model64_grads(struct gp_model64 *m) { return m->grads; }
size_t gp_model64_num_params(const struct gp_model64 *m) { return m->n; }

static int layout(struct gp_model64 *m, int B, int T)
{
	if (m->acts && m->B == B && m->T == T)
		return 0;
	size_t s[GP_A_COUNT];
	size_t n = gp_model_act_sizes(&m->cfg, B, T, s);
	free(m->acts);
	free(m->gacts);
	m->acts = calloc(n, sizeof(double));
	m->gacts = calloc(n, sizeof(double));
	if (!m->acts || !m->gacts)
		return -1;
	size_t off = 0;
	for (int i = 0; i < GP_A_COUNT; i++) {
		m->A[i] = m->acts + off;
		m->GA[i] = m->gacts + off;
		off += s[i];
	}
	m->B = B;
	m->T = T;
	m->an = n;
	return 0;
}

double gp_model64_loss(struct gp_model64 *m, const uint16_t *inputs, const uint16_t *targets,
		       int B, int T)
{
	if (layout(m, B, T))
		return NAN;
	double loss = 0;
	forward_f64(&m->cfg, m->P, m->A, inputs, targets, B, T, &loss);
	return loss;
}

double gp_model64_grad(struct gp_model64 *m, const uint16_t *inputs, const uint16_t *targets,
		       int B, int T)
{
	double loss = gp_model64_loss(m, inputs, targets, B, T);
	if (isnan(loss))
		return loss;
	memset(m->grads, 0, m->n * sizeof(double));
	memset(m->gacts, 0, m->an * sizeof(double));
	backward_f64(&m->cfg, m->P, m->G, m->A, m->GA, inputs, targets, B, T);
	return loss;
}
