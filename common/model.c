/*
 * model.c: GPT-2 in C. The passes themselves are in model_ops.inc, included
 * here twice (reference and fast); this file holds the model's memory, the
 * optimizer, generation with a KV cache, checkpoints and the safetensors
 * export. See model.h.
 */
#include "model.h"

#include <cjson/cJSON.h>
#include <cblas.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <tgmath.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "bpe.h"
#include "bytes.h"
#include "file.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "checkpoints and safetensors are written with the host's float layout: little-endian only"
#endif

#define real float
#define GP_OPS_FAST 0
#define OPS(x) x##_ref
#include "model_ops.inc"
#undef OPS
#undef GP_OPS_FAST
#undef real

#include "model_fast.h"

struct gp_model {
	struct gp_model_config cfg;
	enum gp_model_path path;
	size_t sizes[GP_P_COUNT];
	size_t n_params;
	float *params, *grads;
	float *P[GP_P_COUNT], *G[GP_P_COUNT];
	/* activations for the current (B, T); capacity in floats */
	float *acts, *gacts;
	size_t acts_cap, gacts_cap, acts_n;
	float *A[GP_A_COUNT], *GA[GP_A_COUNT];
	int B, T;
	uint16_t *inputs, *targets; /* copies of the last forward's batch */
	size_t tok_cap;
	int have_targets;
	void *map;                  /* gp_ckpt_map: params point into this read-only mapping */
	size_t map_len;
};

static void *xalloc(size_t n)
{
	/* 64-byte aligned for the vector units; n rounded up as aligned_alloc wants */
	size_t r = (n + 63) & ~(size_t)63;
	return aligned_alloc(64, r ? r : 64);
}

gp_status gp_model_config_check(const struct gp_model_config *c, struct gp_err *err)
{
	if (c->vocab < 2 || c->vocab > GP_MODEL_MAX_VOCAB)
		return gp_err_set(err, GP_ERR_INVALID, "vocab %d out of range 2..%d", c->vocab,
				  GP_MODEL_MAX_VOCAB);
	if (c->padded_vocab < c->vocab || c->padded_vocab > GP_MODEL_MAX_VOCAB)
		return gp_err_set(err, GP_ERR_INVALID, "padded_vocab %d out of range %d..%d",
				  c->padded_vocab, c->vocab, GP_MODEL_MAX_VOCAB);
	if (c->context < 1 || c->context > GP_MODEL_MAX_CONTEXT)
		return gp_err_set(err, GP_ERR_INVALID, "context %d out of range 1..%d", c->context,
				  GP_MODEL_MAX_CONTEXT);
	if (c->layers < 1 || c->layers > GP_MODEL_MAX_LAYERS)
		return gp_err_set(err, GP_ERR_INVALID, "layers %d out of range 1..%d", c->layers,
				  GP_MODEL_MAX_LAYERS);
	if (c->width < 1 || c->width > GP_MODEL_MAX_WIDTH)
		return gp_err_set(err, GP_ERR_INVALID, "width %d out of range 1..%d", c->width,
				  GP_MODEL_MAX_WIDTH);
	if (c->heads < 1 || c->heads > c->width || c->width % c->heads)
		return gp_err_set(err, GP_ERR_INVALID,
				  "heads %d must divide width %d", c->heads, c->width);
	size_t sizes[GP_P_COUNT];
	if (gp_model_param_sizes(c, sizes) > GP_MODEL_MAX_PARAMS)
		return gp_err_set(err, GP_ERR_TOO_BIG, "model has more than %llu parameters",
				  (unsigned long long)GP_MODEL_MAX_PARAMS);
	return GP_OK;
}

size_t gp_model_param_sizes(const struct gp_model_config *c, size_t s[GP_P_COUNT])
{
	size_t C = (size_t)c->width, L = (size_t)c->layers;
	s[GP_P_WTE] = (size_t)c->padded_vocab * C;
	s[GP_P_WPE] = (size_t)c->context * C;
	s[GP_P_LN1W] = L * C;
	s[GP_P_LN1B] = L * C;
	s[GP_P_QKVW] = L * 3 * C * C;
	s[GP_P_QKVB] = L * 3 * C;
	s[GP_P_ATTPROJW] = L * C * C;
	s[GP_P_ATTPROJB] = L * C;
	s[GP_P_LN2W] = L * C;
	s[GP_P_LN2B] = L * C;
	s[GP_P_FCW] = L * 4 * C * C;
	s[GP_P_FCB] = L * 4 * C;
	s[GP_P_FCPROJW] = L * 4 * C * C;
	s[GP_P_FCPROJB] = L * C;
	s[GP_P_LNFW] = C;
	s[GP_P_LNFB] = C;
	size_t n = 0;
	for (int i = 0; i < GP_P_COUNT; i++)
		n += s[i];
	return n;
}

int gp_model_param_decays(int t)
{
	return t == GP_P_WTE || t == GP_P_WPE || t == GP_P_QKVW || t == GP_P_ATTPROJW ||
	       t == GP_P_FCW || t == GP_P_FCPROJW;
}

double gp_model_forward_flops(const struct gp_model_config *c, int B, int T)
{
	double N = (double)B * T, C = c->width, L = c->layers;
	double mm = 2.0 * N * L * (3 * C * C + C * C + 8 * C * C) + 2.0 * N * C * c->padded_vocab;
	/* causal attention: q.k and a.v over (t+1) keys on average (T+1)/2 */
	double att = 2.0 * 2.0 * B * L * C * (double)T * (T + 1) / 2.0;
	return mm + att;
}

gp_status gp_model_create(struct gp_model **out, const struct gp_model_config *c,
			  struct gp_err *err)
{
	gp_status st = gp_model_config_check(c, err);
	if (st)
		return st;
	struct gp_model *m = calloc(1, sizeof(*m));
	if (!m)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	m->cfg = *c;
	m->path = GP_MODEL_FAST;
	m->n_params = gp_model_param_sizes(c, m->sizes);
	m->params = xalloc(m->n_params * sizeof(float));
	if (!m->params) {
		size_t n = m->n_params;
		free(m);
		return gp_err_set(err, GP_ERR_NOMEM, "cannot allocate %zu parameters", n);
	}
	memset(m->params, 0, m->n_params * sizeof(float));
	float *p = m->params;
	for (int i = 0; i < GP_P_COUNT; i++) {
		m->P[i] = p;
		p += m->sizes[i];
	}
	*out = m;
	return GP_OK;
}

void gp_model_destroy(struct gp_model *m)
{
	if (!m)
		return;
	if (m->map)
		munmap(m->map, m->map_len);
	else
		free(m->params);
	free(m->grads);
	free(m->acts);
	free(m->gacts);
	free(m->inputs);
	free(m->targets);
	free(m);
}

const struct gp_model_config *gp_model_config(const struct gp_model *m) { return &m->cfg; }
void gp_model_set_path(struct gp_model *m, enum gp_model_path p) { m->path = p; }
enum gp_model_path gp_model_path(const struct gp_model *m) { return m->path; }
float *gp_model_params(struct gp_model *m) { return m->params; }
float *gp_model_param_tensor(struct gp_model *m, int t) { return m->P[t]; }
size_t gp_model_num_params(const struct gp_model *m) { return m->n_params; }
float *gp_model_grads(struct gp_model *m) { return m->grads; }
const float *gp_model_logits(const struct gp_model *m) { return m->A[GP_A_LOGITS]; }
const float *gp_model_activation(const struct gp_model *m, int act)
{
	return act >= 0 && act < GP_A_COUNT ? m->A[act] : NULL;
}

/* A standard normal from splitmix64 (Box-Muller). */
static double rng_normal(uint64_t *s)
{
	uint64_t a = gp_mix64(*s += 0x9e3779b97f4a7c15ULL), b = gp_mix64(*s += 0x9e3779b97f4a7c15ULL);
	double u1 = ((a >> 11) + 1.0) / 9007199254740993.0; /* (0, 1] */
	double u2 = (b >> 11) / 9007199254740992.0;
	return sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2);
}

void gp_model_init(struct gp_model *m, uint64_t seed)
{
	uint64_t s = seed;
	const struct gp_model_config *c = &m->cfg;
	double resid = 0.02 / sqrt(2.0 * c->layers);
	for (int t = 0; t < GP_P_COUNT; t++) {
		float *p = m->P[t];
		size_t n = m->sizes[t];
		switch (t) {
		case GP_P_LN1W: case GP_P_LN2W: case GP_P_LNFW:
			for (size_t i = 0; i < n; i++)
				p[i] = 1.0f;
			break;
		case GP_P_WTE: case GP_P_WPE: case GP_P_QKVW: case GP_P_FCW:
		case GP_P_ATTPROJW: case GP_P_FCPROJW: {
			double sd = (t == GP_P_ATTPROJW || t == GP_P_FCPROJW) ? resid : 0.02;
			/* the vocabulary padding stays zero: never an input, never a target */
			size_t live = t == GP_P_WTE ? (size_t)c->vocab * c->width : n;
			for (size_t i = 0; i < live; i++)
				p[i] = (float)(sd * rng_normal(&s));
			for (size_t i = live; i < n; i++)
				p[i] = 0;
			break;
		}
		default:
			memset(p, 0, n * sizeof(float));
		}
	}
}

size_t gp_model_act_sizes(const struct gp_model_config *c, int B, int T,
			  size_t s[GP_A_COUNT])
{
	size_t BT = (size_t)B * T, C = c->width, L = c->layers, NH = c->heads;
	s[GP_A_ENCODED] = BT * C;
	s[GP_A_LN1] = s[GP_A_ATTY] = s[GP_A_ATTPROJ] = s[GP_A_RESIDUAL2] = s[GP_A_LN2] =
		s[GP_A_FCPROJ] = s[GP_A_RESIDUAL3] = L * BT * C;
	s[GP_A_LN1_MEAN] = s[GP_A_LN1_RSTD] = s[GP_A_LN2_MEAN] = s[GP_A_LN2_RSTD] = L * BT;
	s[GP_A_QKV] = L * BT * 3 * C;
	s[GP_A_PREATT] = s[GP_A_ATT] = L * B * NH * T * T;
	s[GP_A_FCH] = s[GP_A_FCH_GELU] = L * BT * 4 * C;
	s[GP_A_LNF] = BT * C;
	s[GP_A_LNF_MEAN] = s[GP_A_LNF_RSTD] = s[GP_A_LOSSES] = BT;
	s[GP_A_LOGITS] = s[GP_A_PROBS] = BT * c->padded_vocab;
	size_t n = 0;
	for (int i = 0; i < GP_A_COUNT; i++)
		n += s[i];
	return n;
}

/* Lay out activations for (B, T) in buf; returns the floats needed. */
static size_t act_layout(const struct gp_model_config *c, int B, int T, float *buf,
			 float *A[GP_A_COUNT])
{
	size_t s[GP_A_COUNT];
	gp_model_act_sizes(c, B, T, s);
	size_t n = 0;
	for (int i = 0; i < GP_A_COUNT; i++) {
		if (A)
			A[i] = buf + n;
		n += (s[i] + 15) & ~(size_t)15; /* each tensor 64-byte aligned */
	}
	return n;
}

gp_status gp_model_forward(struct gp_model *m, const uint16_t *inputs, const uint16_t *targets,
			   int B, int T, float *loss, struct gp_err *err)
{
	const struct gp_model_config *c = &m->cfg;
	if (B < 1 || T < 1 || T > c->context)
		return gp_err_set(err, GP_ERR_INVALID, "batch %d x %d tokens: need B >= 1 and 1 <= T <= context %d",
				  B, T, c->context);
	size_t BT = (size_t)B * T;
	for (size_t i = 0; i < BT; i++)
		if (inputs[i] >= c->vocab || (targets && targets[i] >= c->vocab))
			return gp_err_set(err, GP_ERR_INVALID,
					  "token %u at position %zu is outside the vocabulary (%d)",
					  inputs[i] >= c->vocab ? inputs[i] : targets[i], i, c->vocab);
	size_t need = act_layout(c, B, T, NULL, NULL);
	if (need > m->acts_cap) {
		free(m->acts);
		m->acts = xalloc(need * sizeof(float));
		m->acts_cap = m->acts ? need : 0;
		if (!m->acts)
			return gp_err_set(err, GP_ERR_NOMEM, "cannot allocate activations for %d x %d",
					  B, T);
	}
	act_layout(c, B, T, m->acts, m->A);
	m->acts_n = need;
	if (BT > m->tok_cap) {
		free(m->inputs);
		free(m->targets);
		m->inputs = malloc(BT * sizeof(uint16_t));
		m->targets = malloc(BT * sizeof(uint16_t));
		m->tok_cap = (m->inputs && m->targets) ? BT : 0;
		if (!m->tok_cap)
			return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	}
	memcpy(m->inputs, inputs, BT * sizeof(uint16_t));
	m->have_targets = targets != NULL;
	if (targets)
		memcpy(m->targets, targets, BT * sizeof(uint16_t));
	m->B = B;
	m->T = T;
	float l = 0;
	if (m->path == GP_MODEL_FAST)
		gp_model_forward_fast_(c, m->P, m->A, m->inputs, targets ? m->targets : NULL, B, T, &l);
	else
		forward_ref(c, m->P, m->A, m->inputs, targets ? m->targets : NULL, B, T, &l);
	if (loss)
		*loss = targets ? l : 0;
	return GP_OK;
}

void gp_model_zero_grad(struct gp_model *m)
{
	if (m->grads)
		memset(m->grads, 0, m->n_params * sizeof(float));
}

gp_status gp_model_backward(struct gp_model *m, struct gp_err *err)
{
	if (m->map)
		return gp_err_set(err, GP_ERR_INVALID, "a mapped model is read-only: it cannot be trained");
	if (!m->acts_n || !m->have_targets)
		return gp_err_set(err, GP_ERR_INVALID, "backward needs a forward pass with targets");
	if (!m->grads) {
		m->grads = xalloc(m->n_params * sizeof(float));
		if (!m->grads)
			return gp_err_set(err, GP_ERR_NOMEM, "cannot allocate gradients");
		memset(m->grads, 0, m->n_params * sizeof(float));
		float *g = m->grads;
		for (int i = 0; i < GP_P_COUNT; i++) {
			m->G[i] = g;
			g += m->sizes[i];
		}
	}
	if (m->acts_n > m->gacts_cap) {
		free(m->gacts);
		m->gacts = xalloc(m->acts_n * sizeof(float));
		m->gacts_cap = m->gacts ? m->acts_n : 0;
		if (!m->gacts)
			return gp_err_set(err, GP_ERR_NOMEM, "cannot allocate activation gradients");
	}
	act_layout(&m->cfg, m->B, m->T, m->gacts, m->GA);
	memset(m->gacts, 0, m->acts_n * sizeof(float));
	if (m->path == GP_MODEL_FAST)
		gp_model_backward_fast_(&m->cfg, m->P, m->G, m->A, m->GA, m->inputs, m->targets, m->B, m->T);
	else
		backward_ref(&m->cfg, m->P, m->G, m->A, m->GA, m->inputs, m->targets, m->B, m->T);
	return GP_OK;
}

float gp_model_clip_grad(struct gp_model *m, float max_norm)
{
	if (!m->grads)
		return 0;
	size_t n = m->n_params;
	double total = 0;
	if (m->path == GP_MODEL_FAST) {
		total = gp_model_sumsq_fast_(m->grads, n);
	} else {
		for (size_t i = 0; i < n; i++)
			total += (double)m->grads[i] * m->grads[i];
	}
	float norm = (float)sqrt(total);
	if (max_norm > 0 && norm > max_norm) {
		float s = max_norm / norm;
#pragma omp parallel for schedule(static) if (m->path == GP_MODEL_FAST)
		for (size_t i = 0; i < n; i++)
			m->grads[i] *= s;
	}
	return norm;
}

void gp_model_adamw(struct gp_model *m, float *mom, float *vel, const struct gp_adamw *o,
		    long step)
{
	float b1c = 1.0f - powf(o->beta1, (float)step), b2c = 1.0f - powf(o->beta2, (float)step);
	size_t off = 0;
	for (int t = 0; t < GP_P_COUNT; t++) {
		float wd = gp_model_param_decays(t) ? o->weight_decay : 0.0f;
		float *p = m->params + off, *g = m->grads + off, *mm = mom + off, *vv = vel + off;
		size_t n = m->sizes[t];
		off += n;
		if (m->path == GP_MODEL_FAST) {
			gp_model_adamw_fast_(p, g, mm, vv, n, o->lr, o->beta1, o->beta2, o->eps, wd,
					     b1c, b2c);
			continue;
		}
		for (size_t i = 0; i < n; i++) {
			float gi = g[i];
			float mi = o->beta1 * mm[i] + (1.0f - o->beta1) * gi;
			float vi = o->beta2 * vv[i] + (1.0f - o->beta2) * gi * gi;
			mm[i] = mi;
			vv[i] = vi;
			float mh = mi / b1c, vh = vi / b2c;
			p[i] -= o->lr * (mh / (sqrtf(vh) + o->eps) + wd * p[i]);
			g[i] = 0;
		}
	}
}

float gp_lr_cosine(long step, long total, long warmup, float max_lr, float min_lr)
{
	if (step < warmup)
		return max_lr * (float)(step + 1) / (float)warmup;
	if (total <= warmup || step >= total)
		return min_lr;
	double r = (double)(step - warmup) / (double)(total - warmup);
	return min_lr + (float)(0.5 * (1.0 + cos(M_PI * r))) * (max_lr - min_lr);
}

/* ---- generation ---- */

struct gp_kv {
	struct gp_model_config cfg;
	int len;
	float *k, *v;                /* (L, context, C) */
	float *x, *xb, *qkv, *att, *h, *y, *logits;
};

gp_status gp_kv_create(struct gp_kv **out, const struct gp_model_config *c, struct gp_err *err)
{
	gp_status st = gp_model_config_check(c, err);
	if (st)
		return st;
	struct gp_kv *kv = calloc(1, sizeof(*kv));
	if (!kv)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	kv->cfg = *c;
	size_t cache = (size_t)c->layers * c->context * c->width;
	kv->k = xalloc(cache * sizeof(float));
	kv->v = xalloc(cache * sizeof(float));
	kv->x = xalloc(c->width * sizeof(float));
	kv->xb = xalloc(c->width * sizeof(float));
	kv->y = xalloc(c->width * sizeof(float));
	kv->qkv = xalloc(3 * (size_t)c->width * sizeof(float));
	kv->att = xalloc((size_t)c->context * sizeof(float));
	kv->h = xalloc(4 * (size_t)c->width * sizeof(float));
	kv->logits = xalloc((size_t)c->padded_vocab * sizeof(float));
	if (!kv->k || !kv->v || !kv->x || !kv->xb || !kv->y || !kv->qkv || !kv->att || !kv->h ||
	    !kv->logits) {
		gp_kv_destroy(kv);
		return gp_err_set(err, GP_ERR_NOMEM, "cannot allocate a KV cache of %zu floats",
				  2 * cache);
	}
	*out = kv;
	return GP_OK;
}

void gp_kv_destroy(struct gp_kv *kv)
{
	if (!kv)
		return;
	free(kv->k);
	free(kv->v);
	free(kv->x);
	free(kv->xb);
	free(kv->y);
	free(kv->qkv);
	free(kv->att);
	free(kv->h);
	free(kv->logits);
	free(kv);
}

void gp_kv_reset(struct gp_kv *kv) { kv->len = 0; }
int gp_kv_len(const struct gp_kv *kv) { return kv->len; }

static void ln_vec(float *out, const float *x, const float *w, const float *b, int C)
{
	float m = 0, v = 0;
	for (int i = 0; i < C; i++)
		m += x[i];
	m /= C;
	for (int i = 0; i < C; i++)
		v += (x[i] - m) * (x[i] - m);
	v /= C;
	float s = 1.0f / sqrtf(v + 1e-5f);
	for (int i = 0; i < C; i++)
		out[i] = (x[i] - m) * s * w[i] + b[i];
}

/* y (OC) = W (OC, C) . x (C) + bias */
static void matvec(float *y, const float *W, const float *x, const float *bias, int C, int OC,
		   int fast)
{
	if (fast) {
		if (bias)
			memcpy(y, bias, OC * sizeof(float));
		cblas_sgemv(CblasRowMajor, CblasNoTrans, OC, C, 1.0f, W, C, x, 1, bias ? 1.0f : 0.0f,
			    y, 1);
		return;
	}
	for (int o = 0; o < OC; o++) {
		float s = bias ? bias[o] : 0;
		const float *w = W + (size_t)o * C;
		for (int i = 0; i < C; i++)
			s += w[i] * x[i];
		y[o] = s;
	}
}

gp_status gp_model_decode(struct gp_model *m, struct gp_kv *kv, uint16_t token,
			  const float **logits, struct gp_err *err)
{
	const struct gp_model_config *c = &m->cfg;
	if (memcmp(c, &kv->cfg, sizeof(*c)))
		return gp_err_set(err, GP_ERR_INVALID, "KV cache made for another configuration");
	if (token >= c->vocab)
		return gp_err_set(err, GP_ERR_INVALID, "token %u is outside the vocabulary (%d)",
				  token, c->vocab);
	if (kv->len >= c->context)
		return gp_err_set(err, GP_ERR_TOO_BIG, "context of %d tokens is full", c->context);
	int C = c->width, NH = c->heads, hs = C / NH, pos = kv->len, fast = m->path == GP_MODEL_FAST;
	float scale = 1.0f / sqrtf((float)hs);
	float *x = kv->x;
	for (int i = 0; i < C; i++)
		x[i] = m->P[GP_P_WTE][(size_t)token * C + i] + m->P[GP_P_WPE][(size_t)pos * C + i];
	for (int l = 0; l < c->layers; l++) {
		float *kc = kv->k + (size_t)l * c->context * C, *vc = kv->v + (size_t)l * c->context * C;
		ln_vec(kv->xb, x, m->P[GP_P_LN1W] + l * C, m->P[GP_P_LN1B] + l * C, C);
		matvec(kv->qkv, m->P[GP_P_QKVW] + (size_t)l * 3 * C * C, kv->xb,
		       m->P[GP_P_QKVB] + l * 3 * C, C, 3 * C, fast);
		memcpy(kc + (size_t)pos * C, kv->qkv + C, C * sizeof(float));
		memcpy(vc + (size_t)pos * C, kv->qkv + 2 * C, C * sizeof(float));
		for (int h = 0; h < NH; h++) {
			const float *q = kv->qkv + h * hs;
			float mx = -INFINITY, sum = 0;
			for (int t = 0; t <= pos; t++) {
				const float *k = kc + (size_t)t * C + h * hs;
				float d = 0;
				for (int i = 0; i < hs; i++)
					d += q[i] * k[i];
				kv->att[t] = d * scale;
				if (kv->att[t] > mx)
					mx = kv->att[t];
			}
			for (int t = 0; t <= pos; t++) {
				kv->att[t] = expf(kv->att[t] - mx);
				sum += kv->att[t];
			}
			float *o = kv->y + h * hs;
			for (int i = 0; i < hs; i++)
				o[i] = 0;
			for (int t = 0; t <= pos; t++) {
				const float *v = vc + (size_t)t * C + h * hs;
				float a = kv->att[t] / sum;
				for (int i = 0; i < hs; i++)
					o[i] += a * v[i];
			}
		}
		matvec(kv->xb, m->P[GP_P_ATTPROJW] + (size_t)l * C * C, kv->y,
		       m->P[GP_P_ATTPROJB] + l * C, C, C, fast);
		for (int i = 0; i < C; i++)
			x[i] += kv->xb[i];
		ln_vec(kv->xb, x, m->P[GP_P_LN2W] + l * C, m->P[GP_P_LN2B] + l * C, C);
		matvec(kv->h, m->P[GP_P_FCW] + (size_t)l * 4 * C * C, kv->xb,
		       m->P[GP_P_FCB] + l * 4 * C, C, 4 * C, fast);
		for (int i = 0; i < 4 * C; i++) {
			float u = kv->h[i];
			kv->h[i] = 0.5f * u *
				   (1.0f + tanhf((float)GELU_K * (u + 0.044715f * u * u * u)));
		}
		matvec(kv->xb, m->P[GP_P_FCPROJW] + (size_t)l * 4 * C * C, kv->h,
		       m->P[GP_P_FCPROJB] + l * C, 4 * C, C, fast);
		for (int i = 0; i < C; i++)
			x[i] += kv->xb[i];
	}
	ln_vec(kv->xb, x, m->P[GP_P_LNFW], m->P[GP_P_LNFB], C);
	matvec(kv->logits, m->P[GP_P_WTE], kv->xb, NULL, C, c->padded_vocab, fast);
	kv->len++;
	*logits = kv->logits;
	return GP_OK;
}

/* ---- batched steps (continuous batching) ---- */

struct gp_batch {
	struct gp_model_config cfg;
	int max_rows;
	float *x, *xb, *qkv, *y, *h, *att, *logits, *lnf; /* per row */
	int *pos;
};

gp_status gp_batch_create(struct gp_batch **out, const struct gp_model_config *c, int max_rows,
			  struct gp_err *err)
{
	gp_status st = gp_model_config_check(c, err);
	if (st)
		return st;
	if (max_rows < 1 || max_rows > GP_BATCH_MAX_ROWS)
		return gp_err_set(err, GP_ERR_INVALID, "batch of %d rows out of range 1..%d",
				  max_rows, GP_BATCH_MAX_ROWS);
	struct gp_batch *b = calloc(1, sizeof(*b));
	if (!b)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	b->cfg = *c;
	b->max_rows = max_rows;
	size_t R = (size_t)max_rows, C = (size_t)c->width;
	b->x = xalloc(R * C * sizeof(float));
	b->xb = xalloc(R * C * sizeof(float));
	b->lnf = xalloc(R * C * sizeof(float));
	b->y = xalloc(R * C * sizeof(float));
	b->qkv = xalloc(R * 3 * C * sizeof(float));
	b->h = xalloc(R * 4 * C * sizeof(float));
	b->att = xalloc(R * (size_t)c->heads * c->context * sizeof(float));
	b->logits = xalloc(R * (size_t)c->padded_vocab * sizeof(float));
	b->pos = malloc(R * sizeof(int));
	if (!b->x || !b->xb || !b->lnf || !b->y || !b->qkv || !b->h || !b->att || !b->logits ||
	    !b->pos) {
		gp_batch_destroy(b);
		return gp_err_set(err, GP_ERR_NOMEM, "cannot allocate a batch of %d rows", max_rows);
	}
	*out = b;
	return GP_OK;
}

void gp_batch_destroy(struct gp_batch *b)
{
	if (!b)
		return;
	free(b->x);
	free(b->xb);
	free(b->lnf);
	free(b->y);
	free(b->qkv);
	free(b->h);
	free(b->att);
	free(b->logits);
	free(b->pos);
	free(b);
}

int gp_batch_max_rows(const struct gp_batch *b) { return b->max_rows; }
const struct gp_model_config *gp_batch_config(const struct gp_batch *b) { return &b->cfg; }

/* Y (n, OC) = X (n, C) . W (OC, C)^T + bias: one sgemm on the fast path. */
static void matrows(float *Y, const float *X, const float *W, const float *bias, int n, int C,
		    int OC, int fast)
{
	if (!fast) {
		for (int r = 0; r < n; r++)
			matvec(Y + (size_t)r * OC, W, X + (size_t)r * C, bias, C, OC, 0);
		return;
	}
	if (bias)
		for (int r = 0; r < n; r++)
			memcpy(Y + (size_t)r * OC, bias, OC * sizeof(float));
	cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, OC, C, 1.0f, X, C, W, C,
		    bias ? 1.0f : 0.0f, Y, OC);
}

gp_status gp_model_step(struct gp_model *m, struct gp_batch *b, const struct gp_step_row *rows,
			int n, const float **logits, int *n_logits, struct gp_err *err)
{
	const struct gp_model_config *c = &m->cfg;
	if (memcmp(c, &b->cfg, sizeof(*c)))
		return gp_err_set(err, GP_ERR_INVALID, "batch made for another configuration");
	if (n < 1 || n > b->max_rows)
		return gp_err_set(err, GP_ERR_INVALID, "%d rows for a batch of %d", n, b->max_rows);
	/* positions: rows of one cache are consecutive and continue it */
	for (int r = 0; r < n; r++) {
		struct gp_kv *kv = rows[r].kv;
		if (memcmp(c, &kv->cfg, sizeof(*c)))
			return gp_err_set(err, GP_ERR_INVALID, "row %d: KV cache made for another configuration", r);
		if (rows[r].token >= c->vocab)
			return gp_err_set(err, GP_ERR_INVALID, "row %d: token %u is outside the vocabulary (%d)",
					  r, rows[r].token, c->vocab);
		int p;
		if (r > 0 && rows[r - 1].kv == kv) {
			p = b->pos[r - 1] + 1;
		} else {
			for (int q = 0; q < r; q++)
				if (rows[q].kv == kv)
					return gp_err_set(err, GP_ERR_INVALID,
							  "row %d: rows of one cache must be consecutive", r);
			p = kv->len;
		}
		if (p >= c->context)
			return gp_err_set(err, GP_ERR_TOO_BIG, "row %d: context of %d tokens is full", r,
					  c->context);
		b->pos[r] = p;
	}
	int C = c->width, NH = c->heads, hs = C / NH, fast = m->path == GP_MODEL_FAST;
	int ctx = c->context;
	float scale = 1.0f / sqrtf((float)hs);
	for (int r = 0; r < n; r++) {
		float *x = b->x + (size_t)r * C;
		const float *te = m->P[GP_P_WTE] + (size_t)rows[r].token * C;
		const float *pe = m->P[GP_P_WPE] + (size_t)b->pos[r] * C;
		for (int i = 0; i < C; i++)
			x[i] = te[i] + pe[i];
	}
	for (int l = 0; l < c->layers; l++) {
		for (int r = 0; r < n; r++)
			ln_vec(b->xb + (size_t)r * C, b->x + (size_t)r * C, m->P[GP_P_LN1W] + l * C,
			       m->P[GP_P_LN1B] + l * C, C);
		matrows(b->qkv, b->xb, m->P[GP_P_QKVW] + (size_t)l * 3 * C * C,
			m->P[GP_P_QKVB] + l * 3 * C, n, C, 3 * C, fast);
		for (int r = 0; r < n; r++) {
			struct gp_kv *kv = rows[r].kv;
			size_t off = ((size_t)l * ctx + b->pos[r]) * C;
			memcpy(kv->k + off, b->qkv + (size_t)r * 3 * C + C, C * sizeof(float));
			memcpy(kv->v + off, b->qkv + (size_t)r * 3 * C + 2 * C, C * sizeof(float));
		}
#pragma omp parallel for collapse(2) schedule(static) if (fast && n * NH > 1)
		for (int r = 0; r < n; r++)
			for (int h = 0; h < NH; h++) {
				const struct gp_kv *kv = rows[r].kv;
				const float *kc = kv->k + (size_t)l * ctx * C;
				const float *vc = kv->v + (size_t)l * ctx * C;
				const float *q = b->qkv + (size_t)r * 3 * C + h * hs;
				float *att = b->att + ((size_t)r * NH + h) * ctx;
				int pos = b->pos[r];
				float mx = -INFINITY, sum = 0;
				for (int t = 0; t <= pos; t++) {
					const float *k = kc + (size_t)t * C + h * hs;
					float d = 0;
					for (int i = 0; i < hs; i++)
						d += q[i] * k[i];
					att[t] = d * scale;
					if (att[t] > mx)
						mx = att[t];
				}
				for (int t = 0; t <= pos; t++) {
					att[t] = expf(att[t] - mx);
					sum += att[t];
				}
				float *o = b->y + (size_t)r * C + h * hs;
				for (int i = 0; i < hs; i++)
					o[i] = 0;
				for (int t = 0; t <= pos; t++) {
					const float *v = vc + (size_t)t * C + h * hs;
					float a = att[t] / sum;
					for (int i = 0; i < hs; i++)
						o[i] += a * v[i];
				}
			}
		matrows(b->xb, b->y, m->P[GP_P_ATTPROJW] + (size_t)l * C * C,
			m->P[GP_P_ATTPROJB] + l * C, n, C, C, fast);
		for (size_t i = 0; i < (size_t)n * C; i++)
			b->x[i] += b->xb[i];
		for (int r = 0; r < n; r++)
			ln_vec(b->xb + (size_t)r * C, b->x + (size_t)r * C, m->P[GP_P_LN2W] + l * C,
			       m->P[GP_P_LN2B] + l * C, C);
		matrows(b->h, b->xb, m->P[GP_P_FCW] + (size_t)l * 4 * C * C,
			m->P[GP_P_FCB] + l * 4 * C, n, C, 4 * C, fast);
		size_t nh = (size_t)n * 4 * C;
#pragma omp parallel for schedule(static) if (fast && nh >= 16384)
		for (size_t i = 0; i < nh; i++) {
			float u = b->h[i];
			b->h[i] = 0.5f * u *
				  (1.0f + tanhf((float)GELU_K * (u + 0.044715f * u * u * u)));
		}
		matrows(b->xb, b->h, m->P[GP_P_FCPROJW] + (size_t)l * 4 * C * C,
			m->P[GP_P_FCPROJB] + l * C, n, 4 * C, C, fast);
		for (size_t i = 0; i < (size_t)n * C; i++)
			b->x[i] += b->xb[i];
	}
	/* the head only for the rows that want logits (the last of a prompt, each decode) */
	int nl = 0;
	for (int r = 0; r < n; r++)
		if (rows[r].logits)
			ln_vec(b->lnf + (size_t)nl++ * C, b->x + (size_t)r * C, m->P[GP_P_LNFW],
			       m->P[GP_P_LNFB], C);
	if (nl)
		matrows(b->logits, b->lnf, m->P[GP_P_WTE], NULL, nl, C, c->padded_vocab, fast);
	for (int r = 0; r < n; r++)
		rows[r].kv->len = b->pos[r] + 1;
	*logits = b->logits;
	if (n_logits)
		*n_logits = nl;
	return GP_OK;
}

gp_status gp_sample_opts_check(const struct gp_sample_opts *o, struct gp_err *err)
{
	if (!(o->temperature >= 0.0f && o->temperature <= 100.0f))
		return gp_err_set(err, GP_ERR_INVALID, "temperature %g out of range 0..100",
				  (double)o->temperature);
	if (o->top_k < 0)
		return gp_err_set(err, GP_ERR_INVALID, "top_k %d is negative", o->top_k);
	if (!(o->top_p >= 0.0f && o->top_p <= 1.0f))
		return gp_err_set(err, GP_ERR_INVALID, "top_p %g out of range 0..1",
				  (double)o->top_p);
	return GP_OK;
}

static _Thread_local const float *sort_key;

static int by_prob_desc(const void *a, const void *b)
{
	float x = sort_key[*(const int *)a], y = sort_key[*(const int *)b];
	if (x != y)
		return x > y ? -1 : 1;
	return *(const int *)a - *(const int *)b;
}

double gp_sample_draw(uint64_t *rng)
{
	uint64_t r = gp_mix64(*rng += 0x9e3779b97f4a7c15ULL);
	return (double)(r >> 11) / 9007199254740992.0;
}

int gp_sample(const float *logits, int V, const struct gp_sample_opts *o, uint64_t *rng,
	      float *p, int *idx)
{
	int best = 0;
	for (int i = 1; i < V; i++)
		if (logits[i] > logits[best])
			best = i;
	if (o->temperature <= 0.0f)
		return best;
	float mx = logits[best];
	double sum = 0;
	for (int i = 0; i < V; i++) {
		p[i] = expf((logits[i] - mx) / o->temperature);
		sum += p[i];
	}
	for (int i = 0; i < V; i++)
		p[i] = (float)(p[i] / sum);
	int n = V;
	int k = o->top_k > 0 && o->top_k < V ? o->top_k : V;
	int nucleus = o->top_p > 0.0f && o->top_p < 1.0f;
	if (k < V || nucleus) {
		for (int i = 0; i < V; i++)
			idx[i] = i;
		sort_key = p;
		qsort(idx, V, sizeof(int), by_prob_desc);
		n = k;
		if (nucleus) {
			double cum = 0;
			for (int i = 0; i < k; i++) {
				cum += p[idx[i]];
				if (cum >= o->top_p) {
					n = i + 1;
					break;
				}
			}
		}
	} else {
		for (int i = 0; i < V; i++)
			idx[i] = i;
	}
	double mass = 0;
	for (int i = 0; i < n; i++)
		mass += p[idx[i]];
	double u = gp_sample_draw(rng) * mass, cum = 0;
	for (int i = 0; i < n; i++) {
		cum += p[idx[i]];
		if (u < cum)
			return idx[i];
	}
	return idx[n - 1];
}

const char *gp_finish_str(enum gp_finish f)
{
	switch (f) {
	case GP_FINISH_LENGTH: return "length";
	case GP_FINISH_STOP: return "stop";
	case GP_FINISH_EOT: return "end_of_text";
	case GP_FINISH_CONTEXT: return "context";
	}
	return "?";
}

void gp_generation_release(struct gp_generation *g)
{
	if (!g)
		return;
	free(g->text);
	free(g->ids);
	memset(g, 0, sizeof(*g));
}

gp_status gp_model_generate(struct gp_model *m, struct gp_kv *kv, struct gp_bpe *tok,
			    const char *prompt, size_t prompt_len,
			    const struct gp_generate_opts *o, gp_token_fn fn, void *closure,
			    struct gp_generation *out, struct gp_err *err)
{
	const struct gp_model_config *c = &m->cfg;
	gp_status st = gp_sample_opts_check(&o->sample, err);
	if (st)
		return st;
	if (gp_bpe_vocab_size(tok) > c->vocab)
		return gp_err_set(err, GP_ERR_INVALID, "tokenizer has %d tokens, the model %d",
				  gp_bpe_vocab_size(tok), c->vocab);
	if (o->max_new_tokens < 0)
		return gp_err_set(err, GP_ERR_INVALID, "max_new_tokens %d is negative",
				  o->max_new_tokens);
	uint16_t *ids = NULL;
	size_t n = 0, cap = 0;
	struct gp_generation g = {0};
	float *scratch_p = NULL;
	int *scratch_i = NULL;
	size_t tcap = 256;
	int eot = gp_bpe_eot(tok);
	st = gp_bpe_encode(tok, prompt, prompt_len, &ids, &n, &cap, err);
	if (st)
		goto out;
	if (n == 0) {
		/* an empty prompt starts from end-of-text, as GPT-2 does */
		if (!(ids = malloc(sizeof(uint16_t)))) {
			st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
			goto out;
		}
		ids[0] = (uint16_t)eot;
		n = 1;
	}
	if (n >= (size_t)c->context) {
		st = gp_err_set(err, GP_ERR_TOO_BIG, "prompt has %zu tokens; the context holds %d",
				n, c->context);
		goto out;
	}
	g.prompt_tokens = (int)n;
	g.text = malloc(tcap);
	g.ids = malloc(((size_t)o->max_new_tokens + 1) * sizeof(uint16_t));
	scratch_p = malloc((size_t)c->vocab * sizeof(float));
	scratch_i = malloc((size_t)c->vocab * sizeof(int));
	if (!g.text || !g.ids || !scratch_p || !scratch_i) {
		st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		goto out;
	}
	g.text[0] = 0;
	gp_kv_reset(kv);
	const float *logits = NULL;
	for (size_t i = 0; i < n; i++)
		if ((st = gp_model_decode(m, kv, ids[i], &logits, err)))
			goto out;
	size_t max_stop = 0;
	for (int s = 0; s < o->n_stop; s++)
		if (strlen(o->stop[s]) > max_stop)
			max_stop = strlen(o->stop[s]);
	uint64_t rng = o->sample.seed;
	g.finish = GP_FINISH_LENGTH;
	/* sample only among tokens the tokenizer knows */
	int V = gp_bpe_vocab_size(tok);
	while (g.n_ids < o->max_new_tokens) {
		int t = gp_sample(logits, V, &o->sample, &rng, scratch_p, scratch_i);
		if (o->stop_at_eot && t == eot) {
			g.finish = GP_FINISH_EOT;
			break;
		}
		g.ids[g.n_ids++] = (uint16_t)t;
		size_t tl = 0;
		const uint8_t *tb = gp_bpe_token(tok, t, &tl);
		if (g.len + tl + 1 > tcap) {
			while (g.len + tl + 1 > tcap)
				tcap *= 2;
			char *nt = realloc(g.text, tcap);
			if (!nt) {
				st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
				goto out;
			}
			g.text = nt;
		}
		if (tl)
			memcpy(g.text + g.len, tb, tl);
		g.len += tl;
		g.text[g.len] = 0;
		int stopped = 0;
		if (max_stop) {
			size_t from = g.len > tl + max_stop ? g.len - tl - max_stop : 0;
			for (int s = 0; s < o->n_stop && !stopped; s++) {
				size_t sl = strlen(o->stop[s]);
				if (!sl)
					continue;
				char *hit = memmem(g.text + from, g.len - from, o->stop[s], sl);
				if (hit) {
					g.len = (size_t)(hit - g.text);
					g.text[g.len] = 0;
					stopped = 1;
				}
			}
		}
		if (stopped) {
			g.finish = GP_FINISH_STOP;
			break;
		}
		if (fn && fn(g.text, g.len, closure))
			break;
		if (g.n_ids == o->max_new_tokens)
			break;
		if (gp_kv_len(kv) >= c->context) {
			g.finish = GP_FINISH_CONTEXT;
			break;
		}
		if ((st = gp_model_decode(m, kv, (uint16_t)t, &logits, err)))
			goto out;
	}
	*out = g;
	memset(&g, 0, sizeof(g));
out:
	gp_generation_release(&g);
	free(ids);
	free(scratch_p);
	free(scratch_i);
	return st;
}

/* ---- checkpoints ---- */

/* Header fields (offsets into the 256-byte header). */
enum {
	H_MAGIC = 0, H_VERSION = 4, H_HEADER = 8, H_FLAGS = 12, H_VOCAB = 16, H_PVOCAB = 20,
	H_CONTEXT = 24, H_LAYERS = 28, H_HEADS = 32, H_WIDTH = 36, H_NPARAMS = 40, H_STEP = 48,
	H_TOKENS = 56, H_RNG0 = 64, H_RNG1 = 72, H_FPRINT = 80, H_SECONDS = 88, H_PCRC = 96,
	H_HCRC = 100, H_END = 104
};
#define CKPT_HAS_OPT 1u

static uint32_t crc_of(const uint8_t *p, size_t n)
{
	uLong c = crc32(0L, Z_NULL, 0);
	while (n) {
		uInt k = n > (1u << 30) ? (1u << 30) : (uInt)n;
		c = crc32(c, p, k);
		p += k;
		n -= k;
	}
	return (uint32_t)c;
}

gp_status gp_ckpt_encode(struct gp_model *m, const float *mom, const float *vel,
			 const struct gp_ckpt_meta *meta, uint8_t **out, size_t *len,
			 struct gp_err *err)
{
	int opt = mom && vel;
	size_t np = m->n_params, payload = np * sizeof(float) * (opt ? 3 : 1);
	size_t total = GP_CKPT_HEADER + payload;
	uint8_t *b = malloc(total);
	if (!b)
		return gp_err_set(err, GP_ERR_NOMEM, "cannot allocate a checkpoint of %zu bytes",
				  total);
	memset(b, 0, GP_CKPT_HEADER);
	const struct gp_model_config *c = &m->cfg;
	gp_put_le32(b + H_MAGIC, GP_CKPT_MAGIC);
	gp_put_le32(b + H_VERSION, GP_CKPT_VERSION);
	gp_put_le32(b + H_HEADER, GP_CKPT_HEADER);
	gp_put_le32(b + H_FLAGS, opt ? CKPT_HAS_OPT : 0);
	gp_put_le32(b + H_VOCAB, (uint32_t)c->vocab);
	gp_put_le32(b + H_PVOCAB, (uint32_t)c->padded_vocab);
	gp_put_le32(b + H_CONTEXT, (uint32_t)c->context);
	gp_put_le32(b + H_LAYERS, (uint32_t)c->layers);
	gp_put_le32(b + H_HEADS, (uint32_t)c->heads);
	gp_put_le32(b + H_WIDTH, (uint32_t)c->width);
	gp_put_le64(b + H_NPARAMS, np);
	gp_put_le64(b + H_STEP, (uint64_t)meta->step);
	gp_put_le64(b + H_TOKENS, meta->tokens_seen);
	gp_put_le64(b + H_RNG0, meta->rng[0]);
	gp_put_le64(b + H_RNG1, meta->rng[1]);
	gp_put_le64(b + H_FPRINT, meta->train_fingerprint);
	uint64_t secs;
	memcpy(&secs, &meta->train_seconds, 8);
	gp_put_le64(b + H_SECONDS, secs);
	uint8_t *p = b + GP_CKPT_HEADER;
	memcpy(p, m->params, np * sizeof(float));
	if (opt) {
		memcpy(p + np * sizeof(float), mom, np * sizeof(float));
		memcpy(p + 2 * np * sizeof(float), vel, np * sizeof(float));
	}
	gp_put_le32(b + H_PCRC, crc_of(p, payload));
	gp_put_le32(b + H_HCRC, crc_of(b, H_HCRC));
	*out = b;
	*len = total;
	return GP_OK;
}

/* Everything about an image but the parameters' values: header, sizes, checksums. */
static gp_status ckpt_check(const uint8_t *d, size_t len, struct gp_model_config *cfg, int *opt_out,
			    struct gp_err *err)
{
	if (len < GP_CKPT_HEADER)
		return gp_err_set(err, GP_ERR_INVALID, "checkpoint is %zu bytes, shorter than its %d-byte header",
				  len, GP_CKPT_HEADER);
	uint32_t magic = gp_get_le32(d + H_MAGIC);
	if (magic != GP_CKPT_MAGIC)
		return gp_err_set(err, GP_ERR_INVALID, "bad magic 0x%08x (expected 0x%08x)", magic,
				  GP_CKPT_MAGIC);
	uint32_t ver = gp_get_le32(d + H_VERSION);
	if (ver != GP_CKPT_VERSION)
		return gp_err_set(err, GP_ERR_INVALID, "unsupported checkpoint version %u (this build reads %d)",
				  ver, GP_CKPT_VERSION);
	if (gp_get_le32(d + H_HEADER) != GP_CKPT_HEADER)
		return gp_err_set(err, GP_ERR_INVALID, "header size %u (expected %d)",
				  gp_get_le32(d + H_HEADER), GP_CKPT_HEADER);
	uint32_t hcrc = crc_of(d, H_HCRC);
	if (gp_get_le32(d + H_HCRC) != hcrc)
		return gp_err_set(err, GP_ERR_INVALID, "header checksum mismatch (0x%08x, computed 0x%08x)",
				  gp_get_le32(d + H_HCRC), hcrc);
	for (size_t i = H_END; i < GP_CKPT_HEADER; i++)
		if (d[i])
			return gp_err_set(err, GP_ERR_INVALID, "reserved header byte %zu is not zero", i);
	uint32_t flags = gp_get_le32(d + H_FLAGS);
	if (flags & ~CKPT_HAS_OPT)
		return gp_err_set(err, GP_ERR_INVALID, "unknown flags 0x%x", flags);
	uint32_t f[6];
	for (int i = 0; i < 6; i++) {
		f[i] = gp_get_le32(d + H_VOCAB + 4 * i);
		if (f[i] > 0x7fffffff)
			return gp_err_set(err, GP_ERR_INVALID, "configuration field %d is %u", i, f[i]);
	}
	struct gp_model_config c = {
		.vocab = (int)f[0], .padded_vocab = (int)f[1], .context = (int)f[2],
		.layers = (int)f[3], .heads = (int)f[4], .width = (int)f[5],
	};
	if (gp_model_config_check(&c, err))
		return gp_err_wrap(err, "checkpoint configuration");
	size_t sizes[GP_P_COUNT];
	size_t np = gp_model_param_sizes(&c, sizes);
	if (gp_get_le64(d + H_NPARAMS) != np)
		return gp_err_set(err, GP_ERR_INVALID, "header says %llu parameters, the configuration has %zu",
				  (unsigned long long)gp_get_le64(d + H_NPARAMS), np);
	int opt = flags & CKPT_HAS_OPT;
	size_t payload = np * sizeof(float) * (opt ? 3 : 1);
	if (len != GP_CKPT_HEADER + payload)
		return gp_err_set(err, GP_ERR_INVALID, "checkpoint is %zu bytes, expected %zu", len,
				  GP_CKPT_HEADER + payload);
	uint32_t pcrc = crc_of(d + GP_CKPT_HEADER, payload);
	if (gp_get_le32(d + H_PCRC) != pcrc)
		return gp_err_set(err, GP_ERR_INVALID, "payload checksum mismatch (0x%08x, computed 0x%08x): the file is damaged",
				  gp_get_le32(d + H_PCRC), pcrc);
	if ((long long)gp_get_le64(d + H_STEP) < 0)
		return gp_err_set(err, GP_ERR_INVALID, "negative step %lld",
				  (long long)gp_get_le64(d + H_STEP));
	*cfg = c;
	*opt_out = opt;
	return GP_OK;
}

static gp_status ckpt_finite(const float *p, size_t n, struct gp_err *err)
{
	for (size_t i = 0; i < n; i++)
		if (!isfinite(p[i]))
			return gp_err_set(err, GP_ERR_INVALID, "parameter %zu is not finite", i);
	return GP_OK;
}

static void ckpt_meta(const uint8_t *d, struct gp_ckpt_meta *meta)
{
	if (!meta)
		return;
	meta->step = (long long)gp_get_le64(d + H_STEP);
	meta->tokens_seen = gp_get_le64(d + H_TOKENS);
	meta->rng[0] = gp_get_le64(d + H_RNG0);
	meta->rng[1] = gp_get_le64(d + H_RNG1);
	meta->train_fingerprint = gp_get_le64(d + H_FPRINT);
	uint64_t secs = gp_get_le64(d + H_SECONDS);
	memcpy(&meta->train_seconds, &secs, 8);
	if (!isfinite(meta->train_seconds) || meta->train_seconds < 0)
		meta->train_seconds = 0;
}

gp_status gp_ckpt_decode(const uint8_t *d, size_t len, struct gp_model **out, float **mom,
			 float **vel, struct gp_ckpt_meta *meta, struct gp_err *err)
{
	struct gp_model_config c;
	int opt = 0;
	gp_status st = ckpt_check(d, len, &c, &opt, err);
	if (st)
		return st;
	const uint8_t *p = d + GP_CKPT_HEADER;
	struct gp_model *m = NULL;
	float *mm = NULL, *vv = NULL;
	if ((st = gp_model_create(&m, &c, err)))
		return st;
	size_t np = m->n_params;
	memcpy(m->params, p, np * sizeof(float));
	if ((st = ckpt_finite(m->params, np, err))) {
		gp_model_destroy(m);
		return st;
	}
	if (opt && (mom || vel)) {
		mm = xalloc(np * sizeof(float));
		vv = xalloc(np * sizeof(float));
		if (!mm || !vv) {
			free(mm);
			free(vv);
			gp_model_destroy(m);
			return gp_err_set(err, GP_ERR_NOMEM, "cannot allocate optimizer state");
		}
		memcpy(mm, p + np * sizeof(float), np * sizeof(float));
		memcpy(vv, p + 2 * np * sizeof(float), np * sizeof(float));
	}
	ckpt_meta(d, meta);
	*out = m;
	if (mom)
		*mom = mm;
	else
		free(mm);
	if (vel)
		*vel = vv;
	else
		free(vv);
	return GP_OK;
}

gp_status gp_ckpt_map(const char *path, struct gp_model **out, struct gp_ckpt_meta *meta,
		      struct gp_err *err)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return gp_err_set(err, errno == ENOENT ? GP_ERR_NOT_FOUND : GP_ERR_IO,
				  "could not open checkpoint \"%s\": %s", path, strerror(errno));
	struct stat sb;
	if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
		close(fd);
		return gp_err_set(err, GP_ERR_IO, "checkpoint \"%s\" is not a regular file", path);
	}
	size_t len = (size_t)sb.st_size;
	if (len < GP_CKPT_HEADER) {
		close(fd);
		return gp_err_set(err, GP_ERR_INVALID, "checkpoint \"%s\" is %zu bytes, shorter than its header",
				  path, len);
	}
	void *map = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
	close(fd);
	if (map == MAP_FAILED)
		return gp_err_set(err, GP_ERR_IO, "could not map checkpoint \"%s\": %s", path,
				  strerror(errno));
	/* the checksum pass reads the file once; later pages come from the page cache */
	madvise(map, len, MADV_WILLNEED);
	struct gp_model_config c;
	int opt = 0;
	const uint8_t *d = map;
	gp_status st = ckpt_check(d, len, &c, &opt, err);
	struct gp_model *m = NULL;
	if (!st)
		st = ckpt_finite((const float *)(d + GP_CKPT_HEADER),
				 gp_model_param_sizes(&c, (size_t[GP_P_COUNT]){ 0 }), err);
	if (!st && !(m = calloc(1, sizeof(*m))))
		st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	if (st) {
		munmap(map, len);
		return gp_err_wrap(err, "checkpoint \"%s\"", path);
	}
	m->cfg = c;
	m->path = GP_MODEL_FAST;
	m->n_params = gp_model_param_sizes(&c, m->sizes);
	m->map = map;
	m->map_len = len;
	m->params = (float *)(d + GP_CKPT_HEADER);
	float *p = m->params;
	for (int i = 0; i < GP_P_COUNT; i++) {
		m->P[i] = p;
		p += m->sizes[i];
	}
	ckpt_meta(d, meta);
	*out = m;
	return GP_OK;
}

size_t gp_model_mapped_bytes(const struct gp_model *m) { return m->map ? m->map_len : 0; }

gp_status gp_ckpt_save(const char *path, struct gp_model *m, const float *mom, const float *vel,
		       const struct gp_ckpt_meta *meta, struct gp_err *err)
{
	uint8_t *b = NULL;
	size_t n = 0;
	gp_status st = gp_ckpt_encode(m, mom, vel, meta, &b, &n, err);
	if (st)
		return st;
	st = gp_file_write_atomic(path, b, n, 0644, err);
	free(b);
	return st;
}

gp_status gp_ckpt_load(const char *path, struct gp_model **out, float **mom, float **vel,
		       struct gp_ckpt_meta *meta, struct gp_err *err)
{
	uint8_t *b = NULL;
	size_t len = 0;
	/* the largest checkpoint a valid configuration allows */
	size_t max = GP_CKPT_HEADER + (size_t)GP_MODEL_MAX_PARAMS * sizeof(float) * 3;
	gp_status st = gp_file_read(path, max, &b, &len, err);
	if (st)
		return gp_err_wrap(err, "could not load checkpoint");
	st = gp_ckpt_decode(b, len, out, mom, vel, meta, err);
	free(b);
	if (st)
		gp_err_wrap(err, "could not load checkpoint \"%s\"", path);
	return st;
}

/* ---- safetensors ---- */

struct st_tensor {
	char name[64];
	int rows, cols;      /* cols 0: a vector of rows */
	const float *src;
	int transpose;       /* src is (cols, rows) row-major */
};

static int st_tensors(struct gp_model *m, struct st_tensor *t)
{
	const struct gp_model_config *c = &m->cfg;
	int C = c->width, n = 0;
	t[n++] = (struct st_tensor){"wte.weight", c->vocab, C, m->P[GP_P_WTE], 0};
	t[n++] = (struct st_tensor){"wpe.weight", c->context, C, m->P[GP_P_WPE], 0};
	for (int l = 0; l < c->layers; l++) {
		struct { const char *fmt; int r, cl, p, tr; size_t stride; } spec[] = {
			{"h.%d.ln_1.weight", C, 0, GP_P_LN1W, 0, (size_t)C},
			{"h.%d.ln_1.bias", C, 0, GP_P_LN1B, 0, (size_t)C},
			{"h.%d.attn.c_attn.weight", C, 3 * C, GP_P_QKVW, 1, (size_t)3 * C * C},
			{"h.%d.attn.c_attn.bias", 3 * C, 0, GP_P_QKVB, 0, (size_t)3 * C},
			{"h.%d.attn.c_proj.weight", C, C, GP_P_ATTPROJW, 1, (size_t)C * C},
			{"h.%d.attn.c_proj.bias", C, 0, GP_P_ATTPROJB, 0, (size_t)C},
			{"h.%d.ln_2.weight", C, 0, GP_P_LN2W, 0, (size_t)C},
			{"h.%d.ln_2.bias", C, 0, GP_P_LN2B, 0, (size_t)C},
			{"h.%d.mlp.c_fc.weight", C, 4 * C, GP_P_FCW, 1, (size_t)4 * C * C},
			{"h.%d.mlp.c_fc.bias", 4 * C, 0, GP_P_FCB, 0, (size_t)4 * C},
			{"h.%d.mlp.c_proj.weight", 4 * C, C, GP_P_FCPROJW, 1, (size_t)4 * C * C},
			{"h.%d.mlp.c_proj.bias", C, 0, GP_P_FCPROJB, 0, (size_t)C},
		};
		for (size_t s = 0; s < sizeof(spec) / sizeof(spec[0]); s++) {
			snprintf(t[n].name, sizeof(t[n].name), spec[s].fmt, l);
			t[n].rows = spec[s].r;
			t[n].cols = spec[s].cl;
			t[n].src = m->P[spec[s].p] + spec[s].stride * l;
			t[n].transpose = spec[s].tr;
			n++;
		}
	}
	t[n++] = (struct st_tensor){"ln_f.weight", C, 0, m->P[GP_P_LNFW], 0};
	t[n++] = (struct st_tensor){"ln_f.bias", C, 0, m->P[GP_P_LNFB], 0};
	return n;
}

gp_status gp_model_safetensors(struct gp_model *m, uint8_t **out, size_t *len,
			       struct gp_err *err)
{
	int cap = 4 + 12 * m->cfg.layers;
	struct st_tensor *t = calloc((size_t)cap, sizeof(*t));
	cJSON *h = cJSON_CreateObject();
	char *hjson = NULL;
	uint8_t *b = NULL;
	gp_status st = GP_OK;
	if (!t || !h) {
		st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		goto out;
	}
	int n = st_tensors(m, t);
	cJSON *meta = cJSON_AddObjectToObject(h, "__metadata__");
	cJSON_AddStringToObject(meta, "format", "pt");
	cJSON_AddStringToObject(meta, "producer", "genpipe");
	size_t off = 0;
	for (int i = 0; i < n; i++) {
		size_t count = (size_t)t[i].rows * (t[i].cols ? t[i].cols : 1);
		cJSON *e = cJSON_AddObjectToObject(h, t[i].name);
		cJSON_AddStringToObject(e, "dtype", "F32");
		cJSON *shape = cJSON_AddArrayToObject(e, "shape");
		cJSON_AddItemToArray(shape, cJSON_CreateNumber(t[i].rows));
		if (t[i].cols)
			cJSON_AddItemToArray(shape, cJSON_CreateNumber(t[i].cols));
		cJSON *offs = cJSON_AddArrayToObject(e, "data_offsets");
		cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)off));
		cJSON_AddItemToArray(offs, cJSON_CreateNumber((double)(off + count * 4)));
		off += count * 4;
	}
	hjson = cJSON_PrintUnformatted(h);
	if (!hjson) {
		st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		goto out;
	}
	size_t hl = strlen(hjson), padded = (hl + 7) & ~(size_t)7;
	size_t total = 8 + padded + off;
	b = malloc(total);
	if (!b) {
		st = gp_err_set(err, GP_ERR_NOMEM, "cannot allocate %zu bytes", total);
		goto out;
	}
	gp_put_le64(b, padded);
	memcpy(b + 8, hjson, hl);
	memset(b + 8 + hl, ' ', padded - hl);
	float *d = (float *)(void *)(b + 8 + padded); /* 8-aligned: malloc + 8 + 8k */
	for (int i = 0; i < n; i++) {
		size_t count = (size_t)t[i].rows * (t[i].cols ? t[i].cols : 1);
		if (t[i].transpose) {
			/* ours (out=cols, in=rows); Conv1D wants (in, out) */
			for (int r = 0; r < t[i].rows; r++)
				for (int cc = 0; cc < t[i].cols; cc++)
					d[(size_t)r * t[i].cols + cc] = t[i].src[(size_t)cc * t[i].rows + r];
		} else {
			memcpy(d, t[i].src, count * sizeof(float));
		}
		d += count;
	}
	*out = b;
	*len = total;
	b = NULL;
out:
	free(b);
	free(hjson);
	cJSON_Delete(h);
	free(t);
	return st;
}

gp_status gp_model_export_safetensors(struct gp_model *m, const char *dir, int eot,
				      struct gp_err *err)
{
	const struct gp_model_config *c = &m->cfg;
	gp_status dst = gp_file_mkdirs(dir, 0755, err);
	if (dst)
		return dst;
	uint8_t *b = NULL;
	size_t n = 0;
	gp_status st = gp_model_safetensors(m, &b, &n, err);
	if (st)
		return st;
	char path[4096];
	snprintf(path, sizeof(path), "%s/model.safetensors", dir);
	st = gp_file_write_atomic(path, b, n, 0644, err);
	free(b);
	if (st)
		return st;
	cJSON *j = cJSON_CreateObject();
	cJSON *arch = cJSON_AddArrayToObject(j, "architectures");
	cJSON_AddItemToArray(arch, cJSON_CreateString("GPT2LMHeadModel"));
	cJSON_AddStringToObject(j, "model_type", "gpt2");
	cJSON_AddNumberToObject(j, "vocab_size", c->vocab);
	cJSON_AddNumberToObject(j, "n_positions", c->context);
	cJSON_AddNumberToObject(j, "n_ctx", c->context);
	cJSON_AddNumberToObject(j, "n_embd", c->width);
	cJSON_AddNumberToObject(j, "n_layer", c->layers);
	cJSON_AddNumberToObject(j, "n_head", c->heads);
	cJSON_AddNullToObject(j, "n_inner");
	cJSON_AddStringToObject(j, "activation_function", "gelu_new");
	cJSON_AddNumberToObject(j, "layer_norm_epsilon", 1e-5);
	cJSON_AddNumberToObject(j, "initializer_range", 0.02);
	cJSON_AddNumberToObject(j, "resid_pdrop", 0.0);
	cJSON_AddNumberToObject(j, "embd_pdrop", 0.0);
	cJSON_AddNumberToObject(j, "attn_pdrop", 0.0);
	cJSON_AddBoolToObject(j, "scale_attn_weights", 1);
	cJSON_AddBoolToObject(j, "tie_word_embeddings", 1);
	cJSON_AddNumberToObject(j, "bos_token_id", eot);
	cJSON_AddNumberToObject(j, "eos_token_id", eot);
	cJSON_AddStringToObject(j, "torch_dtype", "float32");
	char *s = cJSON_Print(j);
	cJSON_Delete(j);
	if (!s)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	snprintf(path, sizeof(path), "%s/config.json", dir);
	st = gp_file_write_atomic(path, s, strlen(s), 0644, err);
	free(s);
	return st;
}
