/*
 * engine.c: continuous batching (see engine.h).
 */
#include "engine.h"

#include "gpu.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bpe.h"
#include "db.h"
#include "log.h"
#include "utf8.h"

/* ---- loaded versions ---- */

static gp_status lm_new(struct gp_lm **out, const char *name, long long version,
			long long version_id, struct gp_model *model, struct gp_bpe *tok,
			struct gp_err *err)
{
	if (gp_bpe_vocab_size(tok) > gp_model_config(model)->vocab)
		return gp_err_set(err, GP_ERR_INVALID, "the tokenizer has %d tokens, the model %d",
				  gp_bpe_vocab_size(tok), gp_model_config(model)->vocab);
	struct gp_lm *lm = calloc(1, sizeof(*lm));
	if (!lm)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	snprintf(lm->name, sizeof(lm->name), "%s", name);
	lm->version = version;
	lm->version_id = version_id;
	lm->model = model;
	lm->tok = tok;
	lm->bytes = gp_model_mapped_bytes(model);
	if (!lm->bytes)
		lm->bytes = gp_model_num_params(model) * sizeof(float);
	atomic_store((_Atomic int *)&lm->refs, 1);
	pthread_mutex_init(&lm->tok_mu, NULL);
	*out = lm;
	return GP_OK;
}

gp_status gp_lm_wrap(struct gp_lm **out, const char *name, long long version,
		     long long version_id, struct gp_model *model, struct gp_bpe *tok,
		     struct gp_err *err)
{
	return lm_new(out, name, version, version_id, model, tok, err);
}

struct gp_lm *gp_lm_ref(struct gp_lm *lm)
{
	atomic_fetch_add((_Atomic int *)&lm->refs, 1);
	return lm;
}

void gp_lm_unref(struct gp_lm *lm)
{
	if (!lm || atomic_fetch_sub((_Atomic int *)&lm->refs, 1) != 1)
		return;
	gp_model_destroy(lm->model);
	gp_bpe_free(lm->tok);
	pthread_mutex_destroy(&lm->tok_mu);
	free(lm);
}

/* ---- the response cache ---- */

struct centry {
	char key[65];
	long long version_id;
	char *text;
	size_t len;
	int output_tokens;
	enum gp_finish finish;
	struct centry *hnext;          /* bucket chain */
	struct centry *prev, *next;    /* LRU list, most recent first */
};

#define CACHE_BUCKETS 4096

/* ---- requests and the engine ---- */

struct req {
	struct req *next;
	struct gp_lm *lm;
	uint16_t *ids;
	size_t n_ids, ids_cap;
	int fed;                   /* prompt tokens already in the cache */
	struct gp_sample_opts sample;
	uint64_t rng;
	int max_tokens;
	char *stop[16];
	int n_stop;
	size_t max_stop;
	int out_tokens;
	int last;                  /* the token the next decode row feeds */
	char *text;
	size_t len, cap, sent;
	double t_submit, t_admit, deadline;
	double compute_ms;
	enum gp_finish finish;
	const char *error_code;
	char error[160];
	int cacheable;
	int fresh;                  /* admitted this loop: needs its cache set up */
	char key[65];
	gp_gen_partial_fn partial;
	gp_gen_done_fn done;
	void *closure;
};

struct slot {
	struct req *r;
	struct gp_kv *kv;
	struct gp_model_config cfg;
};

#define NBATCH 4

/* A version's weights on the GPU with a decoder whose slot i is engine slot i. */
struct gpu_lm {
	long long version_id; /* 0: free; by id, not a reference, so that the
			       * server can still unload the version's mapping */
	struct gp_gpu_model *g;
	struct gp_gpu_decoder *d;
	struct gp_gpu_pick *picks; /* the step's rows: what to draw */
	uint16_t *tok, *next;      /* the step's tokens in, the chosen ones out */
	long long used;   /* loop count of the last use */
};

struct gp_engine {
	struct gp_engine_config cfg;
	pthread_t thread;
	pthread_mutex_t mu;
	pthread_cond_t cv;
	int stop;
	struct req *qhead, *qtail;
	int queued, active;
	struct slot *slots;
	struct gp_batch *batch[NBATCH];
	int batch_next;
	struct gpu_lm gpu[NBATCH]; /* use_gpu: the versions on the device */
	long long loops;
	struct gp_step_row *rows;
	int *row_any;              /* slot of each row */
	int *row_slot;             /* slot of each logits row */
	float *sp;                 /* sampling scratch */
	int *si;
	int scratch_vocab;
	/* cache */
	pthread_mutex_t cmu;
	struct centry *buckets[CACHE_BUCKETS];
	struct centry *lru_head, *lru_tail;
	size_t cache_used;
	long long cache_entries;
	/* stats (under mu) */
	long long steps, nrows, tokens, hits, misses;
	struct gp_metric *m_steps, *m_rows, *m_tokens, *m_hits, *m_misses, *m_active, *m_queued,
		*m_busy, *m_deadline;
};

static void metric_inc(struct gp_metric *m, double v)
{
	if (m)
		gp_metric_inc(m, v);
}

static void metric_set(struct gp_metric *m, double v)
{
	if (m)
		gp_metric_set(m, v);
}

static unsigned bucket_of(const char *key)
{
	unsigned h = 0;
	for (int i = 0; i < 8; i++)
		h = h * 16 + (unsigned)(key[i] <= '9' ? key[i] - '0' : key[i] - 'a' + 10);
	return h % CACHE_BUCKETS;
}

static void lru_unlink(struct gp_engine *e, struct centry *c)
{
	if (c->prev)
		c->prev->next = c->next;
	else
		e->lru_head = c->next;
	if (c->next)
		c->next->prev = c->prev;
	else
		e->lru_tail = c->prev;
	c->prev = c->next = NULL;
}

static void lru_front(struct gp_engine *e, struct centry *c)
{
	c->next = e->lru_head;
	c->prev = NULL;
	if (e->lru_head)
		e->lru_head->prev = c;
	e->lru_head = c;
	if (!e->lru_tail)
		e->lru_tail = c;
}

static size_t centry_size(const struct centry *c) { return sizeof(*c) + c->len + 1; }

static void cache_remove(struct gp_engine *e, struct centry *c)
{
	struct centry **pp = &e->buckets[bucket_of(c->key)];
	while (*pp != c)
		pp = &(*pp)->hnext;
	*pp = c->hnext;
	lru_unlink(e, c);
	e->cache_used -= centry_size(c);
	e->cache_entries--;
	free(c->text);
	free(c);
}

/* Under cmu. */
static struct centry *cache_find(struct gp_engine *e, const char *key)
{
	for (struct centry *c = e->buckets[bucket_of(key)]; c; c = c->hnext)
		if (!strcmp(c->key, key))
			return c;
	return NULL;
}

static void cache_put(struct gp_engine *e, const struct req *r, const char *text, size_t len)
{
	struct centry *c = calloc(1, sizeof(*c));
	if (!c || !(c->text = malloc(len + 1))) {
		free(c);
		return;
	}
	memcpy(c->text, text, len);
	c->text[len] = 0;
	c->len = len;
	memcpy(c->key, r->key, sizeof(c->key));
	c->version_id = r->lm->version_id;
	c->output_tokens = r->out_tokens;
	c->finish = r->finish;
	if (centry_size(c) > e->cfg.cache_bytes) {
		free(c->text);
		free(c);
		return;
	}
	pthread_mutex_lock(&e->cmu);
	struct centry *old = cache_find(e, c->key);
	if (old)
		cache_remove(e, old);
	while (e->lru_tail && e->cache_used + centry_size(c) > e->cfg.cache_bytes)
		cache_remove(e, e->lru_tail);
	unsigned b = bucket_of(c->key);
	c->hnext = e->buckets[b];
	e->buckets[b] = c;
	lru_front(e, c);
	e->cache_used += centry_size(c);
	e->cache_entries++;
	pthread_mutex_unlock(&e->cmu);
}

void gp_engine_cache_drop(struct gp_engine *e, long long version_id)
{
	pthread_mutex_lock(&e->cmu);
	for (struct centry *c = e->lru_head, *n; c; c = n) {
		n = c->next;
		if (!version_id || c->version_id == version_id)
			cache_remove(e, c);
	}
	pthread_mutex_unlock(&e->cmu);
}

/* The key: every input that decides a deterministic completion. */
static void cache_key(const struct req *r, const struct gp_gen_params *p, char out[65])
{
	size_t n = 64 + p->prompt_len;
	for (int i = 0; i < p->n_stop; i++)
		n += strlen(p->stop[i]) + 8;
	char *b = malloc(n);
	if (!b) {
		out[0] = 0;
		return;
	}
	size_t o = 0;
#define PUT(v)                                    \
	do {                                      \
		memcpy(b + o, &(v), sizeof(v));   \
		o += sizeof(v);                   \
	} while (0)
	long long vid = r->lm->version_id;
	PUT(vid);
	PUT(r->sample.temperature);
	PUT(r->sample.top_k);
	PUT(r->sample.top_p);
	uint64_t seed = r->sample.temperature > 0 ? r->sample.seed : 0;
	PUT(seed);
	PUT(r->max_tokens);
	PUT(r->n_stop);
	for (int i = 0; i < r->n_stop; i++) {
		size_t l = strlen(r->stop[i]);
		PUT(l);
		memcpy(b + o, r->stop[i], l);
		o += l;
	}
#undef PUT
	memcpy(b + o, p->prompt, p->prompt_len);
	o += p->prompt_len;
	gp_sha256_hex(b, o, out);
	free(b);
}

static void req_free(struct req *r)
{
	if (!r)
		return;
	gp_lm_unref(r->lm);
	free(r->ids);
	for (int i = 0; i < r->n_stop; i++)
		free(r->stop[i]);
	free(r->text);
	free(r);
}

/* Deliver the result and free r. Called without e->mu. */
static void req_finish(struct gp_engine *e, struct req *r)
{
	size_t clen = 0;
	double now = gp_mono_ms();
	struct gp_gen_result res = {
		.error_code = r->error_code,
		.error = r->error_code ? r->error : NULL,
		.prompt_ids = r->ids,
		.prompt_tokens = (int)r->n_ids,
		.output_tokens = r->out_tokens,
		.finish = r->finish,
		.queue_ms = (r->t_admit > 0 ? r->t_admit : now) - r->t_submit,
		.compute_ms = r->compute_ms,
		.latency_ms = now - r->t_submit,
	};
	char *clean = gp_utf8_repaired(r->text ? r->text : "", r->len, &clen);
	if (!clean) {
		res.error_code = "internal";
		res.error = "out of memory";
		res.text = "";
	} else {
		res.text = clean;
		res.len = clen;
	}
	if (!r->error_code && r->cacheable && e->cfg.cache_bytes && clean)
		cache_put(e, r, clean, clen);
	if (r->partial && !res.error_code && clean && r->sent < r->len) {
		/* the held-back tail (a possible stop prefix, an unfinished character) */
		size_t tl = 0;
		char *tail = gp_utf8_repaired(r->text + r->sent, r->len - r->sent, &tl);
		if (tail && tl)
			r->partial(r->closure, tail, tl);
		free(tail);
	}
	/* the version is no longer ours before the reply goes out: a client that
	 * asks for another version at once finds this one unloadable */
	gp_lm_unref(r->lm);
	r->lm = NULL;
	r->done(r->closure, &res);
	free(clean);
	req_free(r);
}

static int text_append(struct req *r, const uint8_t *b, size_t n)
{
	if (r->len + n + 1 > r->cap) {
		size_t c = r->cap ? r->cap : 256;
		while (r->len + n + 1 > c)
			c *= 2;
		char *t = realloc(r->text, c);
		if (!t)
			return -1;
		r->text = t;
		r->cap = c;
	}
	memcpy(r->text + r->len, b, n);
	r->len += n;
	r->text[r->len] = 0;
	return 0;
}

/* Stream what is certain: not a possible stop prefix, nothing after the last
 * valid character (an unfinished one, or bytes the repair may yet merge). */
static void stream_out(struct req *r)
{
	if (!r->partial)
		return;
	size_t upto = r->len;
	if (r->max_stop > 1)
		upto = upto > r->max_stop - 1 ? upto - (r->max_stop - 1) : 0;
	if (upto <= r->sent)
		return;
	/* r->sent is always the end of a valid character */
	upto = r->sent + gp_utf8_safe_prefix(r->text + r->sent, upto - r->sent);
	if (upto <= r->sent)
		return;
	size_t dl = 0;
	char *d = gp_utf8_repaired(r->text + r->sent, upto - r->sent, &dl);
	if (d)
		r->partial(r->closure, d, dl);
	free(d);
	r->sent = upto;
}

/*
 * A sampled token for r: returns 1 when r is finished. Stop sequences
 * cut the text where they start, as gp_model_generate does.
 */
static int req_token(struct gp_engine *e, struct req *r, int t, int ctx_len, int context)
{
	if (t == gp_bpe_eot(r->lm->tok)) {
		r->finish = GP_FINISH_EOT;
		return 1;
	}
	size_t tl = 0;
	const uint8_t *tb = gp_bpe_token(r->lm->tok, t, &tl);
	if (text_append(r, tb, tl)) {
		r->error_code = "internal";
		snprintf(r->error, sizeof(r->error), "out of memory");
		return 1;
	}
	r->out_tokens++;
	(void)e;
	if (r->max_stop) {
		size_t from = r->len > tl + r->max_stop ? r->len - tl - r->max_stop : 0;
		for (int s = 0; s < r->n_stop; s++) {
			size_t sl = strlen(r->stop[s]);
			char *hit = sl ? memmem(r->text + from, r->len - from, r->stop[s], sl) : NULL;
			if (hit) {
				r->len = (size_t)(hit - r->text);
				r->text[r->len] = 0;
				if (r->sent > r->len)
					r->sent = r->len;
				r->finish = GP_FINISH_STOP;
				return 1;
			}
		}
	}
	r->last = t;
	if (r->out_tokens >= r->max_tokens) {
		r->finish = GP_FINISH_LENGTH;
		return 1;
	}
	if (ctx_len >= context) {
		r->finish = GP_FINISH_CONTEXT;
		return 1;
	}
	stream_out(r);
	return 0;
}

static int slots_free(const struct gp_engine *e) { return e->cfg.slots - e->active; }

static void gpu_lm_free(struct gpu_lm *x)
{
	gp_gpu_decoder_destroy(x->d);
	gp_gpu_model_destroy(x->g);
	free(x->picks);
	free(x->tok);
	free(x->next);
	memset(x, 0, sizeof(*x));
}

/* lm's weights and decoder on the GPU, made on first use; the least
 * recently used entry not running a sequence goes when all are taken. */
static struct gpu_lm *gpu_for(struct gp_engine *e, struct gp_lm *lm, struct gp_err *err)
{
	int victim = -1;
	for (int i = 0; i < NBATCH; i++) {
		struct gpu_lm *x = &e->gpu[i];
		if (x->version_id == lm->version_id) {
			x->used = e->loops;
			return x;
		}
		int busy = 0;
		for (int s = 0; x->version_id && s < e->cfg.slots && !busy; s++)
			busy = e->slots[s].r && e->slots[s].r->lm->version_id == x->version_id;
		if (busy)
			continue;
		if (victim < 0 || !x->version_id ||
		    (e->gpu[victim].version_id && x->used < e->gpu[victim].used))
			victim = i;
	}
	if (victim < 0) {
		gp_err_set(err, GP_ERR_UNAVAILABLE,
			   "more model versions running at once than the GPU engine holds (%d)",
			   NBATCH);
		return NULL;
	}
	struct gpu_lm *x = &e->gpu[victim];
	gpu_lm_free(x);
	const struct gp_model_config *c = gp_model_config(lm->model);
	x->picks = calloc((size_t)e->cfg.max_rows, sizeof *x->picks);
	x->tok = malloc((size_t)e->cfg.max_rows * sizeof(uint16_t));
	x->next = malloc((size_t)e->cfg.max_rows * sizeof(uint16_t));
	gp_status st = x->picks && x->tok && x->next
			       ? GP_OK
			       : gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	if (!st)
		st = gp_gpu_model_create(&x->g, c, e->cfg.gpu_fp32 ? GP_GPU_FP32 : GP_GPU_BF16, 0,
					 0, err);
	if (!st)
		st = gp_gpu_model_upload(x->g, gp_model_params(lm->model), NULL, NULL, err);
	if (!st)
		st = gp_gpu_decoder_create(&x->d, x->g, e->cfg.slots, e->cfg.max_rows, err);
	if (st) {
		gpu_lm_free(x);
		return NULL;
	}
	x->version_id = lm->version_id;
	x->used = e->loops;
	return x;
}

/* Tokens in slot s's cache. */
static int slot_len(struct gp_engine *e, struct gp_lm *lm, int s)
{
	if (!e->cfg.use_gpu)
		return gp_kv_len(e->slots[s].kv);
	for (int i = 0; i < NBATCH; i++)
		if (e->gpu[i].version_id == lm->version_id)
			return gp_gpu_decoder_len(e->gpu[i].d, s);
	return 0;
}

/* gp_model_step on the GPU with gp_sample's choice made there: the same
 * rows (rows[i].kv unused; slot_of[i] names the slot); *chosen gets the
 * tokens of the rows with .logits set, in order. Each such row's draw comes
 * from its request's generator as gp_sample would take it, so a seed gives
 * the same text on either device (up to the GPU's rounding). */
static gp_status gpu_step(struct gp_engine *e, struct gp_lm *lm, const struct gp_step_row *rows,
			  const int *slot_of, int n, const uint16_t **chosen, int *n_chosen,
			  struct gp_err *err)
{
	struct gpu_lm *x = gpu_for(e, lm, err);
	if (!x)
		return err->status;
	int V = gp_bpe_vocab_size(lm->tok), Vm = gp_model_config(lm->model)->vocab;
	for (int i = 0; i < n; i++) {
		struct gp_gpu_pick *p = &x->picks[i];
		x->tok[i] = rows[i].token;
		memset(p, 0, sizeof *p);
		if (!rows[i].logits)
			continue;
		const struct gp_sample_opts *o = &e->slots[slot_of[i]].r->sample;
		p->want = 1;
		p->vocab = V < Vm ? V : Vm;
		p->temperature = o->temperature;
		p->top_k = o->top_k;
		p->top_p = o->top_p;
		p->u = o->temperature > 0.0f ? gp_sample_draw(&e->slots[slot_of[i]].r->rng) : 0.0;
	}
	gp_status st = gp_gpu_decoder_sample(x->d, slot_of, x->tok, x->picks, n, x->next, err);
	if (st)
		return st;
	int k = 0;
	for (int i = 0; i < n; i++)
		if (rows[i].logits)
			x->next[k++] = x->next[i];
	*chosen = x->next;
	*n_chosen = k;
	return GP_OK;
}

/* One step of the version lm over its active slots; finished ones go to *done. */
static void run_version(struct gp_engine *e, struct gp_lm *lm, struct req **done,
			struct gp_batch *b)
{
	const struct gp_model_config *c = gp_model_config(lm->model);
	int n = 0, nl = 0, budget = e->cfg.max_rows;
	/* decode rows first: a long prompt never stalls running sequences */
	for (int pass = 0; pass < 2; pass++)
		for (int s = 0; s < e->cfg.slots && n < budget; s++) {
			struct req *r = e->slots[s].r;
			if (!r || r->lm != lm)
				continue;
			int prefill = (size_t)r->fed < r->n_ids;
			if (pass == 0 && !prefill) {
				e->row_any[n] = s;
				e->rows[n++] = (struct gp_step_row){ e->slots[s].kv, (uint16_t)r->last, 1 };
				e->row_slot[nl++] = s;
			} else if (pass == 1 && prefill) {
				int k = (int)r->n_ids - r->fed;
				if (k > e->cfg.prefill_chunk)
					k = e->cfg.prefill_chunk;
				if (k > budget - n)
					k = budget - n;
				for (int i = 0; i < k; i++) {
					int last = (size_t)(r->fed + i + 1) == r->n_ids;
					e->row_any[n] = s;
					e->rows[n++] = (struct gp_step_row){ e->slots[s].kv,
									     r->ids[r->fed + i], last };
					if (last)
						e->row_slot[nl++] = s;
				}
				r->fed += k;
			}
		}
	if (!n)
		return;
	const float *logits = NULL;
	const uint16_t *chosen = NULL; /* the GPU's choices */
	int got = 0;
	struct gp_err err = {0};
	double t0 = gp_mono_ms();
	gp_status st;
	if (e->cfg.use_gpu) {
		st = gpu_step(e, lm, e->rows, e->row_any, n, &chosen, &got, &err);
	} else {
		gp_model_set_path(lm->model, e->cfg.path);
		st = gp_model_step(lm->model, b, e->rows, n, &logits, &got, &err);
	}
	e->steps++;
	e->nrows += n;
	metric_inc(e->m_steps, 1);
	metric_inc(e->m_rows, n);
	/* everyone in the step is charged its time, sampling included */
	struct req *part[1024];
	int np = 0;
	for (int s = 0; s < e->cfg.slots && np < 1024; s++)
		if (e->slots[s].r && e->slots[s].r->lm == lm)
			part[np++] = e->slots[s].r;
	if (st) {
		double dt = gp_mono_ms() - t0;
		for (int i = 0; i < np; i++)
			part[i]->compute_ms += dt;
		/* a step that fails fails every sequence in it */
		for (int s = 0; s < e->cfg.slots; s++) {
			struct req *r = e->slots[s].r;
			if (!r || r->lm != lm)
				continue;
			r->error_code = "internal";
			snprintf(r->error, sizeof(r->error), "%s", err.msg);
			e->slots[s].r = NULL;
			r->next = *done;
			*done = r;
		}
		return;
	}
	int V = gp_bpe_vocab_size(lm->tok);
	for (int i = 0; i < got; i++) {
		int s = e->row_slot[i];
		struct req *r = e->slots[s].r;
		int t = chosen ? chosen[i]
			       : gp_sample(logits + (size_t)i * c->padded_vocab, V, &r->sample,
					   &r->rng, e->sp, e->si);
		e->tokens++;
		metric_inc(e->m_tokens, 1);
		if (req_token(e, r, t, slot_len(e, lm, s), c->context)) {
			e->slots[s].r = NULL;
			r->next = *done;
			*done = r;
		}
	}
	double dt = gp_mono_ms() - t0;
	for (int i = 0; i < np; i++)
		part[i]->compute_ms += dt;
}

static gp_status ensure_scratch(struct gp_engine *e, int vocab, struct gp_err *err)
{
	if (vocab <= e->scratch_vocab)
		return GP_OK;
	float *p = realloc(e->sp, (size_t)vocab * sizeof(float));
	if (p)
		e->sp = p;
	int *i = realloc(e->si, (size_t)vocab * sizeof(int));
	if (i)
		e->si = i;
	if (!p || !i)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	e->scratch_vocab = vocab;
	return GP_OK;
}

static void *engine_main(void *arg);

gp_status gp_engine_create(struct gp_engine **out, const struct gp_engine_config *cfg,
			   struct gp_err *err)
{
	struct gp_engine *e = calloc(1, sizeof(*e));
	if (!e)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	e->cfg = *cfg;
	struct gp_engine_config *c = &e->cfg;
	if (c->slots <= 0)
		c->slots = 32;
	if (c->queue < 0)
		c->queue = 0;
	else if (c->queue == 0)
		c->queue = 64;
	if (c->max_new_tokens <= 0)
		c->max_new_tokens = 512;
	if (c->prefill_chunk <= 0)
		c->prefill_chunk = 64;
	if (c->max_rows <= 0)
		c->max_rows = c->slots > 256 ? c->slots : 256;
	if (c->max_rows < c->slots)
		c->max_rows = c->slots;
	if (c->default_deadline_ms <= 0)
		c->default_deadline_ms = 30000;
	if (c->max_deadline_ms <= 0)
		c->max_deadline_ms = 300000;
	if (c->slots > 1024 || c->max_rows > GP_BATCH_MAX_ROWS) {
		int slots = c->slots, rows = c->max_rows;
		free(e);
		return gp_err_set(err, GP_ERR_INVALID, "slots %d (at most 1024) or rows %d (at most %d) out of range",
				  slots, rows, GP_BATCH_MAX_ROWS);
	}
	e->slots = calloc((size_t)c->slots, sizeof(*e->slots));
	e->rows = calloc((size_t)c->max_rows, sizeof(*e->rows));
	e->row_slot = calloc((size_t)c->max_rows, sizeof(int));
	e->row_any = calloc((size_t)c->max_rows, sizeof(int));
	if (!e->slots || !e->rows || !e->row_slot || !e->row_any) {
		free(e->slots);
		free(e->rows);
		free(e->row_slot);
		free(e->row_any);
		free(e);
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	}
	const char *why = NULL;
	if (c->use_gpu && gp_gpu_available(&why) <= 0) {
		free(e->slots);
		free(e->rows);
		free(e->row_slot);
		free(e->row_any);
		free(e);
		return gp_err_set(err, GP_ERR_UNAVAILABLE, "engine on the GPU: %s", why);
	}
	pthread_mutex_init(&e->mu, NULL);
	pthread_mutex_init(&e->cmu, NULL);
	pthread_cond_init(&e->cv, NULL);
	if (c->metrics) {
		struct gp_metrics *m = c->metrics;
		e->m_steps = gp_metrics_get(m, GP_COUNTER, "genpipe_infer_steps_total",
					    "Batched model steps", NULL, NULL, 0);
		e->m_rows = gp_metrics_get(m, GP_COUNTER, "genpipe_infer_rows_total",
					   "Rows (tokens fed) over all steps", NULL, NULL, 0);
		e->m_tokens = gp_metrics_get(m, GP_COUNTER, "genpipe_infer_tokens_total",
					     "Tokens generated", NULL, NULL, 0);
		e->m_hits = gp_metrics_get(m, GP_COUNTER, "genpipe_infer_cache_hits_total",
					   "Response cache hits", NULL, NULL, 0);
		e->m_misses = gp_metrics_get(m, GP_COUNTER, "genpipe_infer_cache_misses_total",
					     "Response cache misses (cacheable requests)", NULL, NULL, 0);
		e->m_active = gp_metrics_get(m, GP_GAUGE, "genpipe_infer_active",
					     "Sequences being generated", NULL, NULL, 0);
		e->m_queued = gp_metrics_get(m, GP_GAUGE, "genpipe_infer_queued",
					     "Requests waiting for a slot", NULL, NULL, 0);
		e->m_busy = gp_metrics_get(m, GP_COUNTER, "genpipe_infer_busy_total",
					   "Requests refused past the concurrency limit", NULL, NULL, 0);
		e->m_deadline = gp_metrics_get(m, GP_COUNTER, "genpipe_infer_deadline_total",
					       "Requests ended by their deadline", NULL, NULL, 0);
	}
	int rc = pthread_create(&e->thread, NULL, engine_main, e);
	if (rc) {
		free(e->slots);
		free(e->rows);
		free(e->row_slot);
		free(e);
		return gp_err_set(err, GP_ERR_IO, "could not start the engine thread");
	}
	*out = e;
	return GP_OK;
}

void gp_engine_destroy(struct gp_engine *e)
{
	if (!e)
		return;
	pthread_mutex_lock(&e->mu);
	e->stop = 1;
	pthread_cond_broadcast(&e->cv);
	pthread_mutex_unlock(&e->mu);
	pthread_join(e->thread, NULL);
	for (int i = 0; i < e->cfg.slots; i++)
		gp_kv_destroy(e->slots[i].kv);
	for (int i = 0; i < NBATCH; i++) {
		gp_batch_destroy(e->batch[i]);
		gpu_lm_free(&e->gpu[i]);
	}
	gp_engine_cache_drop(e, 0);
	free(e->slots);
	free(e->rows);
	free(e->row_slot);
	free(e->row_any);
	free(e->sp);
	free(e->si);
	pthread_mutex_destroy(&e->mu);
	pthread_mutex_destroy(&e->cmu);
	pthread_cond_destroy(&e->cv);
	free(e);
}

gp_status gp_engine_submit(struct gp_engine *e, struct gp_lm *lm, const struct gp_gen_params *p,
			   gp_gen_partial_fn partial, gp_gen_done_fn done, void *closure,
			   const char **code, struct gp_err *err)
{
	const struct gp_model_config *mc = gp_model_config(lm->model);
	double t0 = gp_mono_ms();
	*code = "bad_request";
	struct gp_err e2 = {0};
	if (gp_sample_opts_check(&p->sample, &e2))
		return gp_err_set(err, GP_ERR_INVALID, "%s", e2.msg);
	int max_tokens = p->max_tokens ? p->max_tokens : 64;
	if (max_tokens < 0 || max_tokens > e->cfg.max_new_tokens)
		return gp_err_set(err, GP_ERR_INVALID, "max_tokens %d is outside 1..%d", max_tokens,
				  e->cfg.max_new_tokens);
	if (p->n_stop < 0 || p->n_stop > 16)
		return gp_err_set(err, GP_ERR_INVALID, "at most 16 stop sequences");
	if (p->deadline_ms < 0)
		return gp_err_set(err, GP_ERR_INVALID, "deadline_ms is negative");
	struct req *r = calloc(1, sizeof(*r));
	if (!r) {
		*code = "internal";
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	}
	r->lm = gp_lm_ref(lm);
	r->sample = p->sample;
	r->rng = p->sample.seed;
	r->max_tokens = max_tokens;
	r->partial = partial;
	r->done = done;
	r->closure = closure;
	r->t_submit = t0;
	long long dl = p->deadline_ms ? p->deadline_ms : e->cfg.default_deadline_ms;
	if (dl > e->cfg.max_deadline_ms)
		dl = e->cfg.max_deadline_ms;
	r->deadline = t0 + (double)dl;
	for (int i = 0; i < p->n_stop; i++) {
		if (!(r->stop[i] = strdup(p->stop[i] ? p->stop[i] : ""))) {
			req_free(r);
			*code = "internal";
			return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		}
		r->n_stop++;
		size_t l = strlen(r->stop[i]);
		if (l > r->max_stop)
			r->max_stop = l;
	}
	pthread_mutex_lock(&lm->tok_mu);
	gp_status st = gp_bpe_encode(lm->tok, p->prompt, p->prompt_len, &r->ids, &r->n_ids,
				     &r->ids_cap, &e2);
	pthread_mutex_unlock(&lm->tok_mu);
	if (st) {
		req_free(r);
		return gp_err_set(err, st, "prompt: %s", e2.msg);
	}
	if (r->n_ids == 0) {
		/* an empty prompt starts from end-of-text, as GPT-2 does */
		free(r->ids);
		if (!(r->ids = malloc(sizeof(uint16_t)))) {
			req_free(r);
			*code = "internal";
			return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		}
		r->ids[0] = (uint16_t)gp_bpe_eot(lm->tok);
		r->n_ids = 1;
	}
	int max_prompt = e->cfg.max_prompt_tokens > 0 && e->cfg.max_prompt_tokens < mc->context
				 ? e->cfg.max_prompt_tokens
				 : mc->context - 1;
	if (r->n_ids > (size_t)max_prompt) {
		long long n = (long long)r->n_ids;
		req_free(r);
		return gp_err_set(err, GP_ERR_TOO_BIG, "prompt has %lld tokens; the limit is %d", n,
				  max_prompt);
	}
	r->cacheable = !p->no_cache && e->cfg.cache_bytes &&
		       (p->sample.temperature <= 0 || p->has_seed);
	if (r->cacheable) {
		cache_key(r, p, r->key);
		int hit = 0;
		struct gp_gen_result res = {0};
		char *text = NULL;
		pthread_mutex_lock(&e->cmu);
		struct centry *c = r->key[0] ? cache_find(e, r->key) : NULL;
		if (c && (text = malloc(c->len + 1))) {
			memcpy(text, c->text, c->len + 1);
			res.len = c->len;
			res.output_tokens = c->output_tokens;
			res.finish = c->finish;
			lru_unlink(e, c);
			lru_front(e, c);
			hit = 1;
		}
		pthread_mutex_unlock(&e->cmu);
		pthread_mutex_lock(&e->mu);
		if (hit)
			e->hits++;
		else
			e->misses++;
		pthread_mutex_unlock(&e->mu);
		metric_inc(hit ? e->m_hits : e->m_misses, 1);
		if (hit) {
			res.text = text;
			res.prompt_ids = r->ids;
			res.prompt_tokens = (int)r->n_ids;
			res.cache_hit = 1;
			res.latency_ms = gp_mono_ms() - t0;
			if (partial && res.len)
				partial(closure, text, res.len);
			done(closure, &res);
			free(text);
			req_free(r);
			return GP_OK;
		}
	}
	pthread_mutex_lock(&e->mu);
	if (e->stop || e->active + e->queued >= e->cfg.slots + e->cfg.queue) {
		int stopping = e->stop;
		long long lim = e->cfg.slots + e->cfg.queue;
		pthread_mutex_unlock(&e->mu);
		req_free(r);
		metric_inc(e->m_busy, 1);
		*code = stopping ? "shutting_down" : "busy";
		if (stopping)
			return gp_err_set(err, GP_ERR_UNAVAILABLE, "the service is shutting down");
		return gp_err_set(err, GP_ERR_UNAVAILABLE,
				  "busy: %lld requests in flight (the limit); retry later", lim);
	}
	if (e->qtail)
		e->qtail->next = r;
	else
		e->qhead = r;
	e->qtail = r;
	e->queued++;
	metric_set(e->m_queued, e->queued);
	pthread_cond_signal(&e->cv);
	pthread_mutex_unlock(&e->mu);
	*code = NULL;
	return GP_OK;
}

void gp_engine_stats(struct gp_engine *e, struct gp_engine_stats *s)
{
	pthread_mutex_lock(&e->mu);
	s->steps = e->steps;
	s->rows = e->nrows;
	s->tokens = e->tokens;
	s->cache_hits = e->hits;
	s->cache_misses = e->misses;
	s->active = e->active;
	s->queued = e->queued;
	pthread_mutex_unlock(&e->mu);
	pthread_mutex_lock(&e->cmu);
	s->cache_entries = e->cache_entries;
	s->cache_bytes = (long long)e->cache_used;
	pthread_mutex_unlock(&e->cmu);
}

static void *engine_main(void *arg)
{
	struct gp_engine *e = arg;
	struct gp_err err = {0};
	for (;;) {
		struct req *done = NULL;
		pthread_mutex_lock(&e->mu);
		while (!e->stop && !e->active && !e->qhead)
			pthread_cond_wait(&e->cv, &e->mu);
		if (e->stop) {
			/* everything outstanding ends now */
			for (struct req *r = e->qhead, *n; r; r = n) {
				n = r->next;
				r->error_code = "shutting_down";
				snprintf(r->error, sizeof(r->error), "the service is shutting down");
				r->next = done;
				done = r;
			}
			e->qhead = e->qtail = NULL;
			for (int s = 0; s < e->cfg.slots; s++)
				if (e->slots[s].r) {
					struct req *r = e->slots[s].r;
					r->error_code = "shutting_down";
					snprintf(r->error, sizeof(r->error), "the service is shutting down");
					r->next = done;
					done = r;
					e->slots[s].r = NULL;
				}
			e->active = e->queued = 0;
			pthread_mutex_unlock(&e->mu);
			while (done) {
				struct req *n = done->next;
				req_finish(e, done);
				done = n;
			}
			return NULL;
		}
		double now = gp_mono_ms();
		/* admit in arrival order; expired waiting requests end here */
		while (e->qhead && slots_free(e) > 0) {
			struct req *r = e->qhead;
			e->qhead = r->next;
			if (!e->qhead)
				e->qtail = NULL;
			e->queued--;
			r->next = NULL;
			if (now > r->deadline) {
				r->error_code = "deadline_exceeded";
				snprintf(r->error, sizeof(r->error), "the deadline passed while queued");
				metric_inc(e->m_deadline, 1);
				r->next = done;
				done = r;
				continue;
			}
			for (int s = 0; s < e->cfg.slots; s++)
				if (!e->slots[s].r) {
					e->slots[s].r = r;
					r->t_admit = now;
					r->fresh = 1;
					e->active++;
					break;
				}
		}
		metric_set(e->m_queued, e->queued);
		metric_set(e->m_active, e->active);
		pthread_mutex_unlock(&e->mu);

		/* KV caches for the admitted (engine thread only from here) */
		for (int s = 0; s < e->cfg.slots; s++) {
			struct slot *sl = &e->slots[s];
			struct req *r = sl->r;
			if (!r || !r->fresh)
				continue;
			r->fresh = 0;
			const struct gp_model_config *c = gp_model_config(r->lm->model);
			gp_status st = GP_OK;
			if (e->cfg.use_gpu) {
				/* the slot's cache is the version's decoder's slot s */
				struct gpu_lm *x = gpu_for(e, r->lm, &err);
				if (!x)
					st = err.status;
				else
					gp_gpu_decoder_reset(x->d, s);
			} else {
				if (sl->kv && memcmp(&sl->cfg, c, sizeof(*c))) {
					gp_kv_destroy(sl->kv);
					sl->kv = NULL;
				}
				st = sl->kv ? GP_OK : gp_kv_create(&sl->kv, c, &err);
			}
			if (!st && !e->cfg.use_gpu) /* the GPU draws on the device */
				st = ensure_scratch(e, c->padded_vocab, &err);
			if (st) {
				r->error_code = "internal";
				snprintf(r->error, sizeof(r->error), "%s", err.msg);
				sl->r = NULL;
				r->next = done;
				done = r;
				continue;
			}
			sl->cfg = *c;
			if (sl->kv)
				gp_kv_reset(sl->kv);
		}
		/* one step per loaded version with active sequences */
		struct gp_lm *seen[16];
		int nseen = 0;
		for (int s = 0; s < e->cfg.slots; s++) {
			struct req *r = e->slots[s].r;
			if (!r)
				continue;
			int dup = 0;
			for (int i = 0; i < nseen; i++)
				dup |= seen[i] == r->lm;
			if (dup)
				continue;
			if (nseen < 16)
				seen[nseen++] = r->lm;
		}
		e->loops++;
		for (int i = 0; i < nseen; i++) {
			if (e->cfg.use_gpu) { /* the decoder holds the step's scratch */
				run_version(e, seen[i], &done, NULL);
				continue;
			}
			const struct gp_model_config *c = gp_model_config(seen[i]->model);
			struct gp_batch *b = NULL;
			for (int k = 0; k < NBATCH && !b; k++)
				if (e->batch[k] && !memcmp(gp_batch_config(e->batch[k]), c, sizeof(*c)))
					b = e->batch[k];
			if (!b) {
				if (gp_batch_create(&b, c, e->cfg.max_rows, &err)) {
					gp_error("engine: %s", err.msg);
					continue;
				}
				gp_batch_destroy(e->batch[e->batch_next]);
				e->batch[e->batch_next] = b;
				e->batch_next = (e->batch_next + 1) % NBATCH;
			}
			run_version(e, seen[i], &done, b);
		}
		/* deadlines of running sequences */
		now = gp_mono_ms();
		for (int s = 0; s < e->cfg.slots; s++) {
			struct req *r = e->slots[s].r;
			if (r && now > r->deadline) {
				r->error_code = "deadline_exceeded";
				snprintf(r->error, sizeof(r->error),
					 "the deadline passed after %d tokens", r->out_tokens);
				metric_inc(e->m_deadline, 1);
				e->slots[s].r = NULL;
				r->next = done;
				done = r;
			}
		}
		int finished = 0;
		for (struct req *r = done; r; r = r->next)
			if (r->t_admit > 0)
				finished++;
		pthread_mutex_lock(&e->mu);
		e->active -= finished;
		metric_set(e->m_active, e->active);
		pthread_mutex_unlock(&e->mu);
		while (done) {
			struct req *n = done->next;
			req_finish(e, done);
			done = n;
		}
	}
}
