/*
 * train.c: the trainer (pure: tokens in, weights out) and the `train`
 * stage handler around it (artifacts, checkpoints, the registry). See
 * train.h.
 */
#include "train.h"

#include <libpq-fe.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bpe.h"
#include "bus.h"
#include "bytes.h"
#include "file.h"
#include "gpu.h"
#include "log.h"
#include "params.h"
#include "shard.h"

gp_status gp_train_params_parse(const cJSON *w, struct gp_train_params *p, struct gp_err *err)
{
	memset(p, 0, sizeof(*p));
	const char *s = NULL;
	gp_status st;
	if ((st = gp_param_string(w, "with", "model", NULL, GP_TRAIN_NAME_MAX, &s, err)))
		return st;
	if (!gp_bus_token_ok(s))
		return gp_err_set(err, GP_ERR_INVALID,
				  "with.model \"%s\" is not a DNS label (a-z, 0-9, '-', at most %d)", s,
				  GP_TRAIN_NAME_MAX);
	snprintf(p->model_name, sizeof(p->model_name), "%s", s);
	struct { const char *key; char *dst; } refs[] = {
		{"train_shards", p->train_ref}, {"val_shards", p->val_ref},
		{"tokenizer", p->tokenizer_ref},
	};
	for (int i = 0; i < 3; i++) {
		char h[65];
		if ((st = gp_param_string(w, "with", refs[i].key, NULL, 79, &s, err)))
			return st;
		if (gp_artifact_ref_parse(s, h))
			return gp_err_set(err, GP_ERR_INVALID,
					  "with.%s \"%s\" is not an artifact reference (sha256:<64 hex>)",
					  refs[i].key, s);
		snprintf(refs[i].dst, 80, "%s", h);
	}
	const cJSON *cfg = cJSON_GetObjectItemCaseSensitive(w, "config");
	if (cfg && !cJSON_IsObject(cfg))
		return gp_err_set(err, GP_ERR_INVALID, "with.config must be a mapping");
	long long layers, heads, width, context, v;
	if ((st = gp_param_int(cfg, "with.config", "layers", 4, 1, GP_MODEL_MAX_LAYERS, &layers, err)) ||
	    (st = gp_param_int(cfg, "with.config", "heads", 4, 1, 1024, &heads, err)) ||
	    (st = gp_param_int(cfg, "with.config", "width", 256, 1, GP_MODEL_MAX_WIDTH, &width, err)) ||
	    (st = gp_param_int(cfg, "with.config", "context", 256, 2, GP_MODEL_MAX_CONTEXT, &context, err)))
		return st;
	for (const cJSON *c = cfg ? cfg->child : NULL; c; c = c->next)
		if (strcmp(c->string, "layers") && strcmp(c->string, "heads") &&
		    strcmp(c->string, "width") && strcmp(c->string, "context"))
			return gp_err_set(err, GP_ERR_INVALID,
					  "with.config.%s is not a model setting (layers, heads, width, context)",
					  c->string);
	if (width % heads)
		return gp_err_set(err, GP_ERR_INVALID,
				  "with.config.heads %lld must divide with.config.width %lld", heads,
				  width);
	p->config = (struct gp_model_config){.context = (int)context, .layers = (int)layers,
					     .heads = (int)heads, .width = (int)width};
	if ((st = gp_param_int(w, "with", "steps", 1000, 1, 100000000, &p->steps, err)) ||
	    (st = gp_param_int(w, "with", "batch", 8, 1, 4096, &v, err)))
		return st;
	p->batch = (int)v;
	if ((st = gp_param_int(w, "with", "seq_len", context, 1, context, &v, err)))
		return st;
	p->seq_len = (int)v;
	double seed;
	if ((st = gp_param_number(w, "with", "lr", 1e-3, 0, 10, &p->lr, err)) ||
	    (st = gp_param_number(w, "with", "min_lr_frac", 0.1, 0, 1, &p->min_lr_frac, err)) ||
	    (st = gp_param_int(w, "with", "warmup", p->steps / 20, 0, p->steps, &p->warmup, err)) ||
	    (st = gp_param_number(w, "with", "weight_decay", 0.1, 0, 10, &p->weight_decay, err)) ||
	    (st = gp_param_number(w, "with", "beta1", 0.9, 0, 0.999999, &p->beta1, err)) ||
	    (st = gp_param_number(w, "with", "beta2", 0.95, 0, 0.999999, &p->beta2, err)) ||
	    (st = gp_param_number(w, "with", "grad_clip", 1.0, 0, 1e6, &p->grad_clip, err)) ||
	    (st = gp_param_int(w, "with", "eval_interval", p->steps / 10 > 0 ? p->steps / 10 : 1, 1,
			       p->steps, &p->eval_interval, err)) ||
	    (st = gp_param_int(w, "with", "eval_batches", 8, 1, 1000, &p->eval_batches, err)) ||
	    (st = gp_param_int(w, "with", "checkpoint_interval",
			       p->steps / 10 > 0 ? p->steps / 10 : 1, 1, p->steps,
			       &p->checkpoint_interval, err)) ||
	    (st = gp_param_number(w, "with", "checkpoint_seconds", 60, 1, 86400,
				  &p->checkpoint_seconds, err)) ||
	    (st = gp_param_number(w, "with", "seed", 1337, 0, 9007199254740991.0, &seed, err)) ||
	    (st = gp_param_int(w, "with", "samples", 3, 0, 16, &v, err)))
		return st;
	p->seed = (uint64_t)seed;
	p->samples = (int)v;
	if ((st = gp_param_int(w, "with", "sample_tokens", 64, 1, 1024, &v, err)) ||
	    (st = gp_param_string(w, "with", "device", "auto", 7, &s, err)))
		return st;
	p->sample_tokens = (int)v;
	if (strcmp(s, "auto") && strcmp(s, "cpu") && strcmp(s, "cuda"))
		return gp_err_set(err, GP_ERR_INVALID, "with.device \"%s\" is not auto, cpu or cuda", s);
	snprintf(p->device, sizeof(p->device), "%s", s);
	/* activations grow with batch x seq_len; keep one step within ~8 GiB */
	double acts = (double)p->batch * p->seq_len * p->config.layers *
		      (16.0 * p->config.width + 2.0 * p->config.heads * p->seq_len) * 4 * 2;
	if (acts > 8.0 * (1 << 30))
		return gp_err_set(err, GP_ERR_TOO_BIG,
				  "with.batch %d x with.seq_len %d needs about %.0f GiB of activations (limit 8)",
				  p->batch, p->seq_len, acts / (1 << 30));
	return GP_OK;
}

void gp_train_params_set_vocab(struct gp_train_params *p, int vocab)
{
	p->config.vocab = vocab;
	p->config.padded_vocab = (vocab + 63) / 64 * 64; /* llm.c pads for aligned matmuls */
	if (p->config.padded_vocab > GP_MODEL_MAX_VOCAB)
		p->config.padded_vocab = vocab;
}

uint64_t gp_train_fingerprint(const struct gp_train_params *p)
{
	char buf[1024];
	int n = snprintf(buf, sizeof(buf),
			 "v1 %s %s %d %d %d %d %d %d %lld %d %d %.17g %.17g %lld %.17g %.17g %.17g %.17g %llu",
			 p->train_ref, p->tokenizer_ref, p->config.vocab, p->config.padded_vocab,
			 p->config.context, p->config.layers, p->config.heads, p->config.width,
			 p->steps, p->batch, p->seq_len, p->lr, p->min_lr_frac, p->warmup,
			 p->weight_decay, p->beta1, p->beta2, p->grad_clip,
			 (unsigned long long)p->seed);
	return gp_hash64((const uint8_t *)buf, (size_t)n, 0x7472616e);
}

/* ---- the trainer ---- */

struct gp_trainer {
	struct gp_train_params p;
	struct gp_model *m;
	struct gp_gpu_model *g; /* training on the GPU: m is the host copy */
	int host_stale;         /* the GPU's state is newer than m, mom, vel */
	float *mom, *vel;
	const uint16_t *train, *val;
	size_t n_train, n_val;
	uint16_t *batch; /* B*T + 1 per sequence: inputs and targets */
	uint16_t *in, *tg;
	long long step;
	unsigned long long tokens;
	uint64_t rng;
	double seconds;
};

gp_status gp_trainer_create(struct gp_trainer **out, const struct gp_train_params *p,
			    const uint16_t *train, size_t n_train, const uint16_t *val,
			    size_t n_val, struct gp_err *err)
{
	if (n_train < (size_t)p->seq_len + 1)
		return gp_err_set(err, GP_ERR_INVALID,
				  "the train split has %zu tokens, fewer than with.seq_len + 1 = %d",
				  n_train, p->seq_len + 1);
	struct gp_trainer *t = calloc(1, sizeof(*t));
	if (!t)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	t->p = *p;
	t->train = train;
	t->n_train = n_train;
	t->val = val;
	t->n_val = n_val;
	gp_status st = gp_model_create(&t->m, &p->config, err);
	if (st) {
		free(t);
		return st;
	}
	size_t n = gp_model_num_params(t->m), bt = (size_t)p->batch * p->seq_len;
	t->mom = calloc(n, sizeof(float));
	t->vel = calloc(n, sizeof(float));
	t->in = malloc(bt * sizeof(uint16_t));
	t->tg = malloc(bt * sizeof(uint16_t));
	if (!t->mom || !t->vel || !t->in || !t->tg) {
		gp_trainer_destroy(t);
		return gp_err_set(err, GP_ERR_NOMEM, "cannot allocate the optimizer state");
	}
	gp_model_init(t->m, p->seed);
	t->rng = gp_mix64(p->seed ^ 0x64617461ULL);
	int use_gpu = 0;
	if ((st = gp_gpu_choose(p->device, &use_gpu, err))) {
		gp_err_wrap(err, "with.device");
		gp_trainer_destroy(t);
		return st;
	}
	if (use_gpu &&
	    ((st = gp_gpu_model_create(&t->g, &p->config, GP_GPU_BF16, p->batch, p->seq_len, err)) ||
	     (st = gp_gpu_model_upload(t->g, gp_model_params(t->m), t->mom, t->vel, err)))) {
		gp_err_wrap(err, "GPU trainer");
		gp_trainer_destroy(t);
		return st;
	}
	*out = t;
	return GP_OK;
}

const char *gp_trainer_device(const struct gp_trainer *t)
{
	return t->g ? "cuda" : "cpu";
}

/* Bring the host copy up to the GPU's state (before anything reads it). */
static gp_status to_host(struct gp_trainer *t, struct gp_err *err)
{
	if (!t->g || !t->host_stale)
		return GP_OK;
	gp_status st = gp_gpu_model_download(t->g, gp_model_params(t->m), t->mom, t->vel, err);
	if (!st)
		t->host_stale = 0;
	return st;
}

void gp_trainer_destroy(struct gp_trainer *t)
{
	if (!t)
		return;
	gp_gpu_model_destroy(t->g);
	gp_model_destroy(t->m);
	free(t->mom);
	free(t->vel);
	free(t->in);
	free(t->tg);
	free(t);
}

gp_status gp_trainer_resume(struct gp_trainer *t, const char *path, struct gp_err *err)
{
	struct gp_model *m = NULL;
	float *mom = NULL, *vel = NULL;
	struct gp_ckpt_meta meta = {0};
	gp_status st = gp_ckpt_load(path, &m, &mom, &vel, &meta, err);
	if (st)
		return st;
	if (memcmp(gp_model_config(m), &t->p.config, sizeof(t->p.config)) || !mom ||
	    meta.train_fingerprint != gp_train_fingerprint(&t->p) || meta.step > t->p.steps) {
		gp_model_destroy(m);
		free(mom);
		free(vel);
		return gp_err_set(err, GP_ERR_CONFLICT,
				  "checkpoint \"%s\" was made with other hyperparameters or another shape",
				  path);
	}
	size_t n = gp_model_num_params(m);
	memcpy(gp_model_params(t->m), gp_model_params(m), n * sizeof(float));
	memcpy(t->mom, mom, n * sizeof(float));
	memcpy(t->vel, vel, n * sizeof(float));
	gp_model_destroy(m);
	free(mom);
	free(vel);
	t->step = meta.step;
	t->tokens = meta.tokens_seen;
	t->rng = meta.rng[0];
	t->seconds = meta.train_seconds;
	t->host_stale = 0;
	if (t->g)
		return gp_gpu_model_upload(t->g, gp_model_params(t->m), t->mom, t->vel, err);
	return GP_OK;
}

gp_status gp_trainer_step(struct gp_trainer *t, float *loss, float *lr, struct gp_err *err)
{
	const struct gp_train_params *p = &t->p;
	double t0 = (gp_now_ms() / 1000.0);
	int B = p->batch, T = p->seq_len;
	size_t span = t->n_train - (size_t)T; /* starting offsets 0..span-1 */
	for (int b = 0; b < B; b++) {
		size_t off = (size_t)(gp_mix64(t->rng += 0x9e3779b97f4a7c15ULL) % span);
		memcpy(t->in + (size_t)b * T, t->train + off, (size_t)T * sizeof(uint16_t));
		memcpy(t->tg + (size_t)b * T, t->train + off + 1, (size_t)T * sizeof(uint16_t));
	}
	float l = 0;
	float rate = gp_lr_cosine(t->step, p->steps, p->warmup, (float)p->lr,
				  (float)(p->lr * p->min_lr_frac));
	struct gp_adamw o = {.lr = rate, .beta1 = (float)p->beta1, .beta2 = (float)p->beta2,
			     .eps = 1e-8f, .weight_decay = (float)p->weight_decay};
	if (t->g) {
		/* the whole step on the device; only the loss comes back */
		gp_status st = gp_gpu_train_step(t->g, t->in, t->tg, B, T, &o, t->step + 1,
						 (float)p->grad_clip, &l, NULL, err);
		if (st)
			return st;
		t->host_stale = 1;
		if (!isfinite(l))
			return gp_err_set(err, GP_ERR_INTERNAL,
					  "loss is not finite at step %lld (lower with.lr?)",
					  t->step + 1);
	} else {
		gp_status st = gp_model_forward(t->m, t->in, t->tg, B, T, &l, err);
		if (!st && t->step == 0)
			gp_model_zero_grad(t->m);
		if (st || (st = gp_model_backward(t->m, err)))
			return st;
		if (!isfinite(l))
			return gp_err_set(err, GP_ERR_INTERNAL,
					  "loss is not finite at step %lld (lower with.lr?)",
					  t->step + 1);
		gp_model_clip_grad(t->m, (float)p->grad_clip);
		gp_model_adamw(t->m, t->mom, t->vel, &o, t->step + 1);
	}
	t->step++;
	t->tokens += (unsigned long long)B * T;
	t->seconds += (gp_now_ms() / 1000.0) - t0;
	*loss = l;
	*lr = rate;
	return GP_OK;
}

gp_status gp_trainer_eval(struct gp_trainer *t, double *val_loss, struct gp_err *err)
{
	const struct gp_train_params *p = &t->p;
	int T = p->seq_len;
	if (t->n_val < 2) {
		*val_loss = NAN;
		return GP_OK;
	}
	if ((size_t)T + 1 > t->n_val)
		T = (int)t->n_val - 1;
	int B = p->batch;
	long long nseq = p->eval_batches * B;
	size_t span = t->n_val - (size_t)T - 1;
	double sum = 0;
	long long batches = 0;
	/* evenly spaced windows over the validation tokens: the same every time */
	for (long long s0 = 0; s0 < nseq; s0 += B) {
		int nb = (int)(nseq - s0 < B ? nseq - s0 : B);
		for (int b = 0; b < nb; b++) {
			long long i = s0 + b;
			size_t off = nseq > 1 ? (size_t)((double)span * (double)i / (double)(nseq - 1)) : 0;
			memcpy(t->in + (size_t)b * T, t->val + off, (size_t)T * sizeof(uint16_t));
			memcpy(t->tg + (size_t)b * T, t->val + off + 1, (size_t)T * sizeof(uint16_t));
		}
		float l = 0;
		gp_status st = t->g ? gp_gpu_forward(t->g, t->in, t->tg, nb, T, &l, err)
				    : gp_model_forward(t->m, t->in, t->tg, nb, T, &l, err);
		if (st)
			return st;
		sum += l;
		batches++;
	}
	*val_loss = sum / (double)batches;
	return GP_OK;
}

static void meta_of(struct gp_trainer *t, struct gp_ckpt_meta *meta)
{
	*meta = (struct gp_ckpt_meta){.step = t->step, .tokens_seen = t->tokens,
				      .rng = {t->rng, 0},
				      .train_fingerprint = gp_train_fingerprint(&t->p),
				      .train_seconds = t->seconds};
}

gp_status gp_trainer_save(struct gp_trainer *t, const char *path, struct gp_err *err)
{
	gp_status st = to_host(t, err);
	if (st)
		return st;
	struct gp_ckpt_meta meta;
	meta_of(t, &meta);
	return gp_ckpt_save(path, t->m, t->mom, t->vel, &meta, err);
}

gp_status gp_trainer_encode(struct gp_trainer *t, uint8_t **out, size_t *len, struct gp_err *err)
{
	gp_status st = to_host(t, err);
	if (st)
		return st;
	struct gp_ckpt_meta meta;
	meta_of(t, &meta);
	return gp_ckpt_encode(t->m, t->mom, t->vel, &meta, out, len, err);
}

long long gp_trainer_steps_done(const struct gp_trainer *t) { return t->step; }
unsigned long long gp_trainer_tokens_seen(const struct gp_trainer *t) { return t->tokens; }
double gp_trainer_seconds(const struct gp_trainer *t) { return t->seconds; }
struct gp_model *gp_trainer_model(struct gp_trainer *t)
{
	struct gp_err err = {0};
	if (to_host(t, &err))
		gp_warn("reading the model back from the GPU: %s", err.msg);
	return t->m;
}

void gp_trainer_params_sha256(struct gp_trainer *t, char out[65])
{
	gp_trainer_model(t);
	gp_sha256_hex(gp_model_params(t->m), gp_model_num_params(t->m) * sizeof(float), out);
}

double gp_unigram_entropy(const uint16_t *ids, size_t n, int vocab)
{
	if (!n)
		return 0;
	size_t *c = calloc((size_t)vocab, sizeof(size_t));
	if (!c)
		return NAN;
	for (size_t i = 0; i < n; i++)
		if (ids[i] < vocab)
			c[ids[i]]++;
	double h = 0;
	for (int i = 0; i < vocab; i++)
		if (c[i]) {
			double q = (double)c[i] / (double)n;
			h -= q * log(q);
		}
	free(c);
	return h;
}

/* ---- the stage handler ---- */

struct run_state {
	struct gp_job *job;
	const struct gp_train_config *cfg;
	const gp_stage_job *msg;
	struct gp_train_params p;
	uint8_t *shard[2], *tokbuf;
	size_t shard_len[2], tok_len;
	uint16_t *ids[2];
	size_t n[2];
	struct gp_bpe *tok;
	struct gp_trainer *t;
	char dir[1024], path[1200];
};

static gp_status load_shard(struct run_state *s, int which, const char *hash, int vocab,
			    struct gp_err *err)
{
	gp_status st = gp_store_get(s->cfg->store, hash, (size_t)1 << 33, &s->shard[which],
				    &s->shard_len[which], err);
	if (st)
		return gp_err_wrap(err, "%s", which ? "with.val_shards" : "with.train_shards");
	const uint8_t *raw = NULL;
	st = gp_shard_parse(s->shard[which], s->shard_len[which], vocab, &raw, &s->n[which], err);
	if (st)
		return gp_err_wrap(err, "%s", which ? "with.val_shards" : "with.train_shards");
	s->ids[which] = malloc((s->n[which] ? s->n[which] : 1) * sizeof(uint16_t));
	if (!s->ids[which])
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	for (size_t i = 0; i < s->n[which]; i++)
		s->ids[which][i] = gp_shard_token(raw, i);
	free(s->shard[which]); /* the ids are a copy */
	s->shard[which] = NULL;
	return GP_OK;
}

/* Record our checkpoint; 0 rows: the lease is gone (the caller stops). */
static gp_status record_checkpoint(struct run_state *s, long long step, int *accepted,
				   struct gp_err *err)
{
	char run[32], stp[32], att[32];
	snprintf(run, sizeof(run), "%lld", (long long)s->msg->run_id);
	snprintf(stp, sizeof(stp), "%lld", step);
	snprintf(att, sizeof(att), "%lld", (long long)s->msg->attempt_id);
	const char *pv[] = {run, s->msg->stage, stp, s->path, att, gp_job_lease_token(s->job)};
	PGresult *r = NULL;
	gp_status st = gp_db_exec(
		gp_job_db(s->job), "record checkpoint",
		"INSERT INTO train_checkpoints (run_id, stage, step, path, attempt_id) "
		"SELECT $1::bigint, $2, $3::bigint, $4, a.id FROM stage_attempts a "
		"WHERE a.id = $5::bigint AND a.lease_token = $6 AND a.state = 'running' "
		"AND a.lease_deadline > now() "
		"ON CONFLICT (run_id, stage) DO UPDATE SET step = EXCLUDED.step, path = EXCLUDED.path, "
		"attempt_id = EXCLUDED.attempt_id, updated_at = now() RETURNING step",
		6, pv, &r, err);
	if (!st)
		*accepted = PQntuples(r) == 1;
	PQclear(r);
	return st;
}

/*
 * Save to our attempt's file, point the table at it, drop the file we
 * resumed from. With image non-NULL the encoded checkpoint is handed back
 * (the final one also goes to the artifact store: encoded once).
 */
static gp_status checkpoint(struct run_state *s, char *resumed_from, int *accepted,
			    uint8_t **image, size_t *image_len, struct gp_err *err)
{
	uint8_t *b = NULL;
	size_t n = 0;
	gp_status st = gp_trainer_encode(s->t, &b, &n, err);
	if (!st)
		st = gp_file_write_atomic(s->path, b, n, 0644, err);
	if (!st)
		st = record_checkpoint(s, gp_trainer_steps_done(s->t), accepted, err);
	if (!st && *accepted && resumed_from[0] && strcmp(resumed_from, s->path)) {
		unlink(resumed_from);
		resumed_from[0] = 0;
	}
	if (!st && image) {
		*image = b;
		*image_len = n;
	} else {
		free(b);
	}
	return st;
}

static gp_status register_version(struct run_state *s, const char *ckpt_hash,
				  const char *st_hash, const char *metrics, const char *lineage,
				  double seconds, int *version, struct gp_err *err)
{
	struct gp_db *db = gp_job_db(s->job);
	char run[32], att[32], secs[64];
	snprintf(run, sizeof(run), "%lld", (long long)s->msg->run_id);
	snprintf(att, sizeof(att), "%lld", (long long)s->msg->attempt_id);
	snprintf(secs, sizeof(secs), "%.3f", seconds);
	PGresult *r = NULL;
	gp_status st = gp_db_begin(db, err);
	if (st)
		return st;
	/* the fence: only the lease holder registers (and the reaper waits) */
	const char *fence[] = {att, gp_job_lease_token(s->job)};
	if ((st = gp_db_exec(db, "check lease",
			     "SELECT 1 FROM stage_attempts WHERE id = $1::bigint AND lease_token = $2 "
			     "AND state = 'running' AND lease_deadline > now() FOR UPDATE",
			     2, fence, &r, err)))
		goto out;
	if (PQntuples(r) != 1) {
		st = gp_err_set(err, GP_ERR_CONFLICT, "lease lost before registering the model");
		goto out;
	}
	PQclear(r);
	r = NULL;
	const char *nm[] = {s->p.model_name};
	if ((st = gp_db_exec(db, "create model",
			     "INSERT INTO models (name) VALUES ($1) ON CONFLICT (name) DO NOTHING", 1,
			     nm, NULL, err)))
		goto out;
	if ((st = gp_db_exec(db, "lock model", "SELECT id FROM models WHERE name = $1 FOR UPDATE",
			     1, nm, &r, err)))
		goto out;
	char model_id[32];
	snprintf(model_id, sizeof(model_id), "%s", PQgetvalue(r, 0, 0));
	PQclear(r);
	r = NULL;
	const char *ex[] = {run, s->msg->stage};
	if ((st = gp_db_exec(db, "find version",
			     "SELECT version FROM model_versions WHERE run_id = $1::bigint AND stage = $2",
			     2, ex, &r, err)))
		goto out;
	if (PQntuples(r) == 1) {
		/* an earlier attempt registered and died before reporting */
		*version = atoi(PQgetvalue(r, 0, 0));
		goto out;
	}
	PQclear(r);
	r = NULL;
	const char *iv[] = {model_id, ckpt_hash, st_hash, metrics, lineage, run, s->msg->stage,
			    s->cfg->resource_class, secs};
	if ((st = gp_db_exec(
		     db, "register model version",
		     "INSERT INTO model_versions (model_id, version, artifact_id, export_artifact_id, "
		     "metrics, lineage, run_id, stage, resource_class, seconds) "
		     "SELECT $1::bigint, coalesce(max(v.version), 0) + 1, "
		     "(SELECT id FROM artifacts WHERE content_hash = $2), "
		     "(SELECT id FROM artifacts WHERE content_hash = $3), $4::jsonb, $5::jsonb, "
		     "$6::bigint, $7, $8, $9::double precision "
		     "FROM model_versions v WHERE v.model_id = $1::bigint RETURNING version",
		     9, iv, &r, err)))
		goto out;
	*version = atoi(PQgetvalue(r, 0, 0));
	char detail[512], object[128];
	snprintf(object, sizeof(object), "%s:%d", s->p.model_name, *version);
	snprintf(detail, sizeof(detail), "{\"run_id\": %s, \"stage\": \"%s\", \"attempt_id\": %s}",
		 run, s->msg->stage, att);
	const char *av[] = {object, detail};
	st = gp_db_exec(db, "audit registration",
			"INSERT INTO audit_log (actor, action, object, detail) "
			"VALUES ('train', 'model.register', $1, $2::jsonb)",
			2, av, NULL, err);
out:
	PQclear(r);
	if (!st)
		st = gp_db_commit(db, err);
	if (st)
		gp_db_rollback(db);
	return st;
}

static gp_status put_and_register(struct run_state *s, const void *data, size_t len,
				  const char *kind, char hash[65], struct gp_err *err)
{
	gp_status st = gp_store_put(s->cfg->store, data, len, hash, err);
	if (!st)
		st = gp_artifact_register(gp_job_db(s->job), s->cfg->store, hash, kind, len,
					  (long long)s->msg->run_id, s->msg->stage, NULL, err);
	return st;
}

static void fmt_eta(char *b, size_t n, double s)
{
	if (!(s >= 0) || s > 1e7)
		snprintf(b, n, "?");
	else if (s >= 3600)
		snprintf(b, n, "%dh%02dm", (int)(s / 3600), (int)(s / 60) % 60);
	else if (s >= 60)
		snprintf(b, n, "%dm%02ds", (int)(s / 60), (int)s % 60);
	else
		snprintf(b, n, "%.0fs", s);
}

void gp_train_handle(struct gp_job *job, void *closure)
{
	struct run_state s = {.job = job, .cfg = closure, .msg = gp_job_msg(job)};
	struct gp_err err = {0};
	cJSON *w = cJSON_Parse(s.msg->params_json && *s.msg->params_json ? s.msg->params_json : "{}");
	cJSON *metrics = NULL, *lineage = NULL, *outputs = NULL;
	char *mtext = NULL, *ltext = NULL, *otext = NULL;
	uint8_t *img = NULL;
	size_t img_len = 0;
	struct gp_kv *kv = NULL;
	char resumed_from[1200] = "";
	gp_status st;
	if (!cJSON_IsObject(w)) {
		gp_job_fail(job, 1, "params are not a JSON object");
		goto done;
	}
	if ((st = gp_train_params_parse(w, &s.p, &err))) {
		gp_job_fail(job, 1, err.msg);
		goto done;
	}
	{
		/* cuda without a GPU here: another worker may have one (retryable) */
		int use_gpu = 0;
		if ((st = gp_gpu_choose(s.p.device, &use_gpu, &err))) {
			gp_err_wrap(&err, "with.device");
			gp_job_fail(job, 0, err.msg);
			goto done;
		}
	}
	/* inputs */
	if ((st = gp_store_get(s.cfg->store, s.p.tokenizer_ref, 64u << 20, &s.tokbuf, &s.tok_len,
			       &err)) ||
	    (st = gp_bpe_load(s.tokbuf, s.tok_len, &s.tok, &err))) {
		gp_err_wrap(&err, "with.tokenizer");
		gp_job_fail(job, st == GP_ERR_INVALID || st == GP_ERR_NOT_FOUND, err.msg);
		goto done;
	}
	gp_train_params_set_vocab(&s.p, gp_bpe_vocab_size(s.tok));
	if ((st = gp_model_config_check(&s.p.config, &err))) {
		gp_job_fail(job, 1, err.msg);
		goto done;
	}
	if ((st = load_shard(&s, 0, s.p.train_ref, s.p.config.vocab, &err)) ||
	    (st = load_shard(&s, 1, s.p.val_ref, s.p.config.vocab, &err))) {
		gp_job_fail(job, st == GP_ERR_INVALID || st == GP_ERR_NOT_FOUND, err.msg);
		goto done;
	}
	if ((st = gp_trainer_create(&s.t, &s.p, s.ids[0], s.n[0], s.ids[1], s.n[1], &err))) {
		gp_job_fail(job, st == GP_ERR_INVALID, err.msg);
		goto done;
	}
	/* resume from the stage's latest checkpoint, whoever wrote it */
	snprintf(s.dir, sizeof(s.dir), "%s/run-%lld/%s", s.cfg->checkpoint_dir,
		 (long long)s.msg->run_id, s.msg->stage);
	snprintf(s.path, sizeof(s.path), "%s/attempt-%lld.ckpt", s.dir,
		 (long long)s.msg->attempt_id);
	if (gp_file_mkdirs(s.dir, 0755, &err)) {
		gp_job_fail(job, 0, err.msg);
		goto done;
	}
	long long resumed_step = 0;
	{
		char run[32];
		snprintf(run, sizeof(run), "%lld", (long long)s.msg->run_id);
		const char *pv[] = {run, s.msg->stage};
		PGresult *r = NULL;
		if ((st = gp_db_exec(gp_job_db(job), "find checkpoint",
				     "SELECT path FROM train_checkpoints WHERE run_id = $1::bigint AND stage = $2",
				     2, pv, &r, &err))) {
			gp_job_fail(job, 0, err.msg);
			goto done;
		}
		if (PQntuples(r) == 1) {
			snprintf(resumed_from, sizeof(resumed_from), "%s", PQgetvalue(r, 0, 0));
			struct gp_err e2 = {0};
			if (gp_trainer_resume(s.t, resumed_from, &e2)) {
				gp_warn("train: run %lld stage %s: not resuming: %s",
					(long long)s.msg->run_id, s.msg->stage, e2.msg);
				resumed_from[0] = 0;
			} else {
				resumed_step = gp_trainer_steps_done(s.t);
				gp_info("train: run %lld stage %s: resumed at step %lld from %s",
					(long long)s.msg->run_id, s.msg->stage, resumed_step,
					resumed_from);
			}
		}
		PQclear(r);
	}
	metrics = cJSON_CreateObject();
	cJSON *curve = cJSON_AddArrayToObject(metrics, "val_curve");
	double last_ckpt = (gp_now_ms() / 1000.0), last_progress = 0, t_start = (gp_now_ms() / 1000.0);
	long long start_step = gp_trainer_steps_done(s.t);
	float loss = NAN, lr = 0;
	double val = NAN;
	while (gp_trainer_steps_done(s.t) < s.p.steps) {
		int stop = gp_job_should_stop(job);
		if (stop == 1) {
			gp_warn("train: lease lost at step %lld; stopping", gp_trainer_steps_done(s.t));
			goto done; /* any result would be refused */
		}
		if (stop == 2) {
			int acc = 0;
			if (checkpoint(&s, resumed_from, &acc, NULL, NULL, &err) || !acc) {
				gp_warn("train: could not checkpoint on shutdown: %s",
					acc ? err.msg : "lease lost");
				goto done;
			}
			char why[128];
			snprintf(why, sizeof(why), "preempted: checkpoint at step %lld",
				 gp_trainer_steps_done(s.t));
			gp_job_release(job, why);
			goto done;
		}
		if ((st = gp_trainer_step(s.t, &loss, &lr, &err))) {
			gp_job_fail(job, 0, err.msg);
			goto done;
		}
		long long step = gp_trainer_steps_done(s.t);
		if (step % s.p.eval_interval == 0 || step == s.p.steps) {
			if ((st = gp_trainer_eval(s.t, &val, &err))) {
				gp_job_fail(job, 0, err.msg);
				goto done;
			}
			cJSON *pt = cJSON_CreateObject();
			cJSON_AddNumberToObject(pt, "step", (double)step);
			cJSON_AddNumberToObject(pt, "val_loss", isfinite(val) ? val : -1);
			cJSON_AddItemToArray(curve, pt);
		}
		double now = (gp_now_ms() / 1000.0);
		if (step < s.p.steps &&
		    (step % s.p.checkpoint_interval == 0 || now - last_ckpt >= s.p.checkpoint_seconds)) {
			int acc = 0;
			if ((st = checkpoint(&s, resumed_from, &acc, NULL, NULL, &err))) {
				gp_job_fail(job, 0, err.msg);
				goto done;
			}
			if (!acc) {
				gp_warn("train: lease lost at step %lld; stopping", step);
				goto done;
			}
			last_ckpt = now;
		}
		if (now - last_progress >= 1.0 || step == s.p.steps) {
			double el = now - t_start;
			double tps = el > 0 ? (double)(step - start_step) * s.p.batch * s.p.seq_len / el : 0;
			double eta = step > start_step ? el / (double)(step - start_step) * (double)(s.p.steps - step) : -1;
			char etab[32], msgb[256], mj[256];
			fmt_eta(etab, sizeof(etab), eta);
			char valb[32] = "";
			if (isfinite(val))
				snprintf(valb, sizeof(valb), " val %.3f", val);
			snprintf(msgb, sizeof(msgb), "step %lld/%lld loss %.3f%s lr %.2e %.0f tok/s eta %s",
				 step, s.p.steps, loss, valb, lr, tps, etab);
			int k = snprintf(mj, sizeof(mj),
					 "{\"step\": %lld, \"loss\": %.5f, \"lr\": %.6g, \"tokens_per_s\": %.1f, \"eta_s\": %.1f",
					 step, loss, lr, tps, eta);
			if (isfinite(val))
				k += snprintf(mj + k, sizeof(mj) - (size_t)k, ", \"val_loss\": %.5f", val);
			snprintf(mj + k, sizeof(mj) - (size_t)k, "}");
			gp_job_progress(job, (double)step / (double)s.p.steps, msgb, mj);
			last_progress = now;
		}
	}
	if (!isfinite(val) && (st = gp_trainer_eval(s.t, &val, &err))) {
		gp_job_fail(job, 0, err.msg);
		goto done;
	}
	/* the final state, then the artifacts */
	{
		int acc = 0;
		if ((st = checkpoint(&s, resumed_from, &acc, &img, &img_len, &err))) {
			gp_job_fail(job, 0, err.msg);
			goto done;
		}
		if (!acc)
			goto done;
	}
	char ckpt_hash[65], st_hash[65], psha[65];
	if ((st = put_and_register(&s, img, img_len, "checkpoint", ckpt_hash, &err))) {
		gp_job_fail(job, 0, err.msg);
		goto done;
	}
	free(img);
	img = NULL;
	if ((st = gp_model_safetensors(gp_trainer_model(s.t), &img, &img_len, &err)) ||
	    (st = put_and_register(&s, img, img_len, "safetensors", st_hash, &err))) {
		gp_job_fail(job, 0, err.msg);
		goto done;
	}
	gp_trainer_params_sha256(s.t, psha);
	double h1 = gp_unigram_entropy(s.ids[0], s.n[0], s.p.config.vocab);
	cJSON_AddNumberToObject(metrics, "val_loss", isfinite(val) ? val : -1);
	cJSON_AddNumberToObject(metrics, "val_perplexity", isfinite(val) ? exp(val) : -1);
	cJSON_AddNumberToObject(metrics, "train_loss", isfinite(loss) ? loss : -1);
	cJSON_AddNumberToObject(metrics, "unigram_entropy", h1);
	cJSON_AddNumberToObject(metrics, "tokens_seen", (double)gp_trainer_tokens_seen(s.t));
	cJSON_AddNumberToObject(metrics, "train_seconds", gp_trainer_seconds(s.t));
	cJSON_AddNumberToObject(metrics, "steps", (double)s.p.steps);
	cJSON_AddNumberToObject(metrics, "resumed_from_step", (double)resumed_step);
	cJSON_AddNumberToObject(metrics, "parameters", (double)gp_model_num_params(gp_trainer_model(s.t)));
	cJSON_AddStringToObject(metrics, "params_sha256", psha);
	cJSON_AddStringToObject(metrics, "device", gp_trainer_device(s.t));
	/* a few samples, from end-of-text, so that a person can judge the style */
	cJSON *samples = cJSON_AddArrayToObject(metrics, "samples");
	if (s.p.samples && !gp_kv_create(&kv, &s.p.config, &err)) {
		for (int i = 0; i < s.p.samples; i++) {
			struct gp_generate_opts go = {
				.sample = {.temperature = 0.8f, .top_k = 40, .seed = s.p.seed + (uint64_t)i},
				.max_new_tokens = s.p.sample_tokens, .stop_at_eot = 1};
			struct gp_generation g = {0};
			if (gp_model_generate(gp_trainer_model(s.t), kv, s.tok, "", 0, &go, NULL, NULL,
					      &g, &err) == GP_OK) {
				char *txt = malloc(g.len + 1);
				if (txt) {
					/* JSON text must be valid UTF-8: cJSON escapes
					 * controls; replace stray bytes */
					for (size_t k = 0; k < g.len; k++)
						txt[k] = (unsigned char)g.text[k] >= 0x80 ? '?' : g.text[k];
					txt[g.len] = 0;
					cJSON_AddItemToArray(samples, cJSON_CreateString(txt));
					free(txt);
				}
			}
			gp_generation_release(&g);
		}
	}
	lineage = cJSON_CreateObject();
	cJSON_AddNumberToObject(lineage, "run_id", (double)s.msg->run_id);
	cJSON_AddStringToObject(lineage, "stage", s.msg->stage);
	char ref[80];
	snprintf(ref, sizeof(ref), "sha256:%s", s.p.train_ref);
	cJSON_AddStringToObject(lineage, "train_shards", ref);
	snprintf(ref, sizeof(ref), "sha256:%s", s.p.val_ref);
	cJSON_AddStringToObject(lineage, "val_shards", ref);
	snprintf(ref, sizeof(ref), "sha256:%s", s.p.tokenizer_ref);
	cJSON_AddStringToObject(lineage, "tokenizer", ref);
	cJSON_AddStringToObject(lineage, "code_version", GENPIPE_VERSION);
	cJSON *cj = cJSON_AddObjectToObject(lineage, "config");
	cJSON_AddNumberToObject(cj, "vocab", s.p.config.vocab);
	cJSON_AddNumberToObject(cj, "padded_vocab", s.p.config.padded_vocab);
	cJSON_AddNumberToObject(cj, "context", s.p.config.context);
	cJSON_AddNumberToObject(cj, "layers", s.p.config.layers);
	cJSON_AddNumberToObject(cj, "heads", s.p.config.heads);
	cJSON_AddNumberToObject(cj, "width", s.p.config.width);
	cJSON *hp = cJSON_AddObjectToObject(lineage, "hyperparameters");
	cJSON_AddNumberToObject(hp, "steps", (double)s.p.steps);
	cJSON_AddNumberToObject(hp, "batch", s.p.batch);
	cJSON_AddNumberToObject(hp, "seq_len", s.p.seq_len);
	cJSON_AddNumberToObject(hp, "lr", s.p.lr);
	cJSON_AddNumberToObject(hp, "warmup", (double)s.p.warmup);
	cJSON_AddNumberToObject(hp, "weight_decay", s.p.weight_decay);
	cJSON_AddNumberToObject(hp, "seed", (double)s.p.seed);
	mtext = cJSON_PrintUnformatted(metrics);
	ltext = cJSON_PrintUnformatted(lineage);
	int version = 0;
	if (!mtext || !ltext) {
		gp_job_fail(job, 0, "out of memory");
		goto done;
	}
	if ((st = register_version(&s, ckpt_hash, st_hash, mtext, ltext, gp_trainer_seconds(s.t),
				   &version, &err))) {
		if (st == GP_ERR_CONFLICT)
			goto done; /* lease gone: the next attempt registers */
		gp_job_fail(job, 0, err.msg);
		goto done;
	}
	outputs = cJSON_CreateObject();
	cJSON_AddStringToObject(outputs, "model", s.p.model_name);
	cJSON_AddNumberToObject(outputs, "model_version", version);
	snprintf(ref, sizeof(ref), "sha256:%s", ckpt_hash);
	cJSON_AddStringToObject(outputs, "checkpoint", ref);
	snprintf(ref, sizeof(ref), "sha256:%s", st_hash);
	cJSON_AddStringToObject(outputs, "safetensors", ref);
	snprintf(ref, sizeof(ref), "sha256:%s", s.p.tokenizer_ref);
	cJSON_AddStringToObject(outputs, "tokenizer", ref);
	cJSON_AddNumberToObject(outputs, "val_loss", isfinite(val) ? val : -1);
	otext = cJSON_PrintUnformatted(outputs);
	gp_info("train: run %lld stage %s: %s version %d, val loss %.4f (unigram entropy %.4f), %.1f s",
		(long long)s.msg->run_id, s.msg->stage, s.p.model_name, version, val, h1,
		gp_trainer_seconds(s.t));
	gp_job_succeed(job, otext, mtext);
	/* the stage's checkpoint files are no longer needed (the final state is
	 * an artifact now); the table row stays for the record */
	unlink(s.path);
	rmdir(s.dir);
done:
	gp_kv_destroy(kv);
	free(img);
	free(mtext);
	free(ltext);
	free(otext);
	cJSON_Delete(metrics);
	cJSON_Delete(lineage);
	cJSON_Delete(outputs);
	cJSON_Delete(w);
	gp_trainer_destroy(s.t);
	gp_bpe_free(s.tok);
	free(s.tokbuf);
	free(s.shard[0]);
	free(s.shard[1]);
	free(s.ids[0]);
	free(s.ids[1]);
}
