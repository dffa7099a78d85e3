/*
 * preprocess.c: the preprocess stage (see preprocess.h).
 */
#include "preprocess.h"
#include "params.h"

#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bytes.h"
#include <time.h>

#include "bpe.h"
#include "dataset.h"
#include "log.h"
#include "shard.h"

#define NHASH 64
#define BANDS 16
#define ROWS 4

size_t gp_normalize(unsigned char *t, size_t len, int whitespace, int control)
{
	size_t w = 0;
	int nl_run = 0;
	for (size_t i = 0; i < len; i++) {
		unsigned char c = t[i];
		if (control && ((c < 0x20 && c != '\n' && c != '\t') || c == 0x7f))
			continue;
		if (whitespace) {
			if (c == '\t')
				c = ' ';
			if (c == ' ' && w > 0 && t[w - 1] == ' ')
				continue; /* collapse runs */
			if (c == '\n') {
				while (w > 0 && t[w - 1] == ' ')
					w--; /* no trailing spaces */
				if (++nl_run > 2)
					continue;
			} else {
				nl_run = 0;
			}
		}
		t[w++] = c;
	}
	if (whitespace) {
		while (w > 0 && (t[w - 1] == ' ' || t[w - 1] == '\n'))
			w--;
		size_t s = 0;
		while (s < w && (t[s] == ' ' || t[s] == '\n'))
			s++;
		memmove(t, t + s, w - s);
		w -= s;
	}
	return w;
}

static void minhash(const uint8_t *t, size_t len, int k, uint64_t seed, uint64_t sig[NHASH])
{
	for (int i = 0; i < NHASH; i++)
		sig[i] = UINT64_MAX;
	size_t n = len >= (size_t)k ? len - (size_t)k + 1 : 1;
	size_t kl = len >= (size_t)k ? (size_t)k : len;
	for (size_t s = 0; s < n; s++) {
		uint64_t h = gp_hash64(t + s, kl, seed);
		for (int i = 0; i < NHASH; i++) {
			uint64_t v = gp_mix64(h ^ (0x9e3779b97f4a7c15ULL * (uint64_t)(i + 1)));
			if (v < sig[i])
				sig[i] = v;
		}
	}
}

struct doc {
	uint8_t *text; /* normalized, owned */
	size_t len;
	uint64_t hkey; /* split key from the document hash */
	int val;
};

/* LSH buckets: entries chained per band key. */
struct lsh {
	uint64_t *key;
	uint32_t *doc, *next, *head;
	size_t n, cap, hcap;
};

static int lsh_add(struct lsh *l, uint64_t key, uint32_t doc)
{
	if (l->n == l->cap) {
		size_t nc = l->cap ? l->cap * 2 : 4096;
		uint64_t *k = realloc(l->key, nc * sizeof *k);
		if (k)
			l->key = k;
		uint32_t *d = realloc(l->doc, nc * sizeof *d);
		if (d)
			l->doc = d;
		uint32_t *x = realloc(l->next, nc * sizeof *x);
		if (x)
			l->next = x;
		if (!k || !d || !x)
			return -1;
		l->cap = nc;
	}
	size_t b = gp_mix64(key) & (l->hcap - 1);
	l->key[l->n] = key;
	l->doc[l->n] = doc;
	l->next[l->n] = l->head[b];
	l->head[b] = (uint32_t)(l->n + 1);
	l->n++;
	return 0;
}

/* with.key as a number within lo..hi (def when absent); the error names it. */
static int bool_param(const cJSON *p, const char *k, int def)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(p, k);
	return cJSON_IsBool(v) ? cJSON_IsTrue(v) : def;
}

static void bump(cJSON *o, const char *key, double by)
{
	cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
	if (v)
		cJSON_SetNumberValue(v, v->valuedouble + by);
	else
		cJSON_AddNumberToObject(o, key, by);
}

static double secs(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static gp_status put_artifact(const struct gp_preprocess_config *cfg, const void *data,
			      size_t len, const char *kind, struct gp_pp_artifact *a, cJSON *outputs,
			      const char *key, struct gp_err *err)
{
	gp_status st = gp_store_put(cfg->store, data, len, a->hash, err);
	if (st)
		return st;
	a->kind = kind;
	a->size = len;
	char ref[GP_ARTIFACT_REF_MAX];
	snprintf(ref, sizeof ref, "sha256:%s", a->hash);
	cJSON_AddStringToObject(outputs, key, ref);
	return GP_OK;
}

static gp_status histogram_json(const uint16_t *ids, size_t n, int vocab, cJSON *parent,
				const char *name)
{
	long long *c = calloc((size_t)vocab, sizeof *c);
	if (!c)
		return GP_ERR_NOMEM;
	for (size_t i = 0; i < n; i++)
		c[ids[i]]++;
	cJSON *o = cJSON_AddObjectToObject(parent, name);
	cJSON_AddNumberToObject(o, "tokens", (double)n);
	cJSON *a = cJSON_AddArrayToObject(o, "counts");
	for (int i = 0; a && i < vocab; i++)
		cJSON_AddItemToArray(a, cJSON_CreateNumber((double)c[i]));
	free(c);
	return a ? GP_OK : GP_ERR_NOMEM;
}

gp_status gp_preprocess_run(const cJSON *params, const struct gp_preprocess_config *cfg,
			    void (*progress)(void *ctx, double f, const char *msg), void *ctx,
			    cJSON **outputs, cJSON **stats_out, struct gp_pp_artifact arts[5],
			    struct gp_err *err)
{
	gp_status st = GP_OK;
	struct doc *docs = NULL;
	size_t ndocs = 0, cdocs = 0;
	struct lsh l = { 0 };
	uint64_t *sigs = NULL;
	size_t *kept_doc = NULL; /* kept index -> document index */
	struct gp_bpe *bpe = NULL;
	struct gp_bpe_trainer *tr = NULL;
	uint16_t *ids[2] = { NULL, NULL };
	size_t nids[2] = { 0, 0 }, cids[2] = { 0, 0 };
	uint8_t *buf = NULL;
	size_t blen = 0;
	char *htext = NULL, *stext = NULL;
	cJSON *hist = NULL;
	cJSON *out = cJSON_CreateObject(), *stats = cJSON_CreateObject();
	cJSON *dropped = stats ? cJSON_AddObjectToObject(stats, "dropped") : NULL;
	cJSON *ingest_dropped = stats ? cJSON_AddObjectToObject(stats, "ingest_dropped") : NULL;
	*outputs = *stats_out = NULL;
	if (!out || !dropped || !ingest_dropped) {
		st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		goto out;
	}
	/* parameters */
	const cJSON *normalize = cJSON_GetObjectItemCaseSensitive(params, "normalize");
	int ws = bool_param(normalize, "whitespace", 1), ctl = bool_param(normalize, "control", 1);
	double min_len, max_len, thr, valf, vocab, shingle, seedv;
	if ((st = gp_param_number(params, "with", "min_length", 1, 0, 1e12, &min_len, err)) ||
	    (st = gp_param_number(params, "with", "max_length", 1 << 20, min_len, 1e12, &max_len, err)) ||
	    (st = gp_param_number(params, "with", "dedup_threshold", 0.8, 0, 1, &thr, err)) ||
	    (st = gp_param_number(params, "with", "val_fraction", 0.05, 0, 0.5, &valf, err)) ||
	    (st = gp_param_number(params, "with", "vocab_size", 4096, 257, GP_BPE_MAX_VOCAB, &vocab, err)) ||
	    (st = gp_param_number(params, "with", "shingle", 5, 1, 64, &shingle, err)) ||
	    (st = gp_param_number(params, "with", "seed", 0, -9e15, 9e15, &seedv, err)))
		goto out;
	uint64_t seed = (uint64_t)(long long)seedv;
	/* the inputs: manifests, each naming a document file */
	const cJSON *one = cJSON_GetObjectItemCaseSensitive(params, "dataset");
	const cJSON *many = cJSON_GetObjectItemCaseSensitive(params, "datasets");
	cJSON *refs = cJSON_CreateArray();
	if (!refs) {
		st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		goto out;
	}
	if (cJSON_IsString(one))
		cJSON_AddItemToArray(refs, cJSON_CreateString(one->valuestring));
	for (const cJSON *c = cJSON_IsArray(many) ? many->child : NULL; c; c = c->next)
		cJSON_AddItemToArray(refs, cJSON_Duplicate(c, 0));
	if (!refs->child) {
		cJSON_Delete(refs);
		st = gp_err_set(err, GP_ERR_INVALID, "with.dataset or with.datasets is required");
		goto out;
	}
	long long docs_in = 0;
	size_t total_in = 0;
	for (const cJSON *c = refs->child; c && !st; c = c->next) {
		char mh[65];
		if (!cJSON_IsString(c) || gp_artifact_ref_parse(c->valuestring, mh)) {
			st = gp_err_set(err, GP_ERR_INVALID,
					"dataset \"%.100s\" is not a sha256: reference",
					cJSON_IsString(c) ? c->valuestring : "?");
			break;
		}
		uint8_t *mtext = NULL, *data = NULL;
		size_t mlen = 0, dlen = 0;
		struct gp_manifest m;
		if ((st = gp_store_get(cfg->store, mh, GP_MANIFEST_MAX, &mtext, &mlen, err)))
			break;
		st = gp_manifest_parse((const char *)mtext, mlen, &m, err);
		free(mtext);
		if (st)
			break;
		cJSON *md = cJSON_Parse(m.dropped_json);
		for (const cJSON *k = md ? md->child : NULL; k; k = k->next)
			bump(ingest_dropped, k->string, k->valuedouble);
		cJSON_Delete(md);
		bump(stats, "ingest_utf8_replaced", (double)m.utf8_replaced);
		st = gp_store_get(cfg->store, m.data, cfg->max_input - total_in, &data, &dlen, err);
		gp_manifest_free(&m);
		if (st)
			break;
		total_in += dlen;
		struct gp_dataset_reader rd;
		if ((st = gp_dataset_open(&rd, data, dlen, err))) {
			free(data);
			break;
		}
		for (;;) {
			struct gp_doc d;
			int more = 0;
			if ((st = gp_dataset_next(&rd, &d, &more, err)) || !more)
				break;
			docs_in++;
			uint8_t *t = malloc(d.len ? d.len : 1);
			if (!t) {
				st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
				break;
			}
			memcpy(t, d.text, d.len);
			size_t n = gp_normalize(t, d.len, ws, ctl);
			if ((double)n < min_len || n == 0) {
				bump(dropped, "too_short", 1);
				free(t);
				continue;
			}
			if ((double)n > max_len) {
				bump(dropped, "too_long", 1);
				free(t);
				continue;
			}
			if (ndocs == cdocs) {
				cdocs = cdocs ? cdocs * 2 : 1024;
				struct doc *nd = realloc(docs, cdocs * sizeof *nd);
				if (!nd) {
					free(t);
					st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
					break;
				}
				docs = nd;
			}
			docs[ndocs++] = (struct doc){ .text = t, .len = n };
		}
		free(data);
	}
	cJSON_Delete(refs);
	if (st)
		goto out;
	cJSON_AddNumberToObject(stats, "documents_in", (double)docs_in);
	if (progress)
		progress(ctx, 0.1, "read and normalized");
	/* exact and near duplicates, in input order: the first one stays */
	l.hcap = 1;
	while (l.hcap < ndocs * BANDS * 2 + 2)
		l.hcap <<= 1;
	l.head = calloc(l.hcap, sizeof *l.head);
	sigs = malloc((ndocs ? ndocs : 1) * NHASH * sizeof *sigs);
	kept_doc = malloc((ndocs ? ndocs : 1) * sizeof *kept_doc);
	if (!l.head || !sigs || !kept_doc) {
		st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		goto out;
	}
	size_t kept = 0;
	for (size_t i = 0; i < ndocs; i++) {
		unsigned char md[32];
		unsigned int mdlen = 0;
		EVP_Digest(docs[i].text, docs[i].len, md, &mdlen, EVP_sha256(), NULL);
		uint64_t hk;
		memcpy(&hk, md, 8);
		docs[i].hkey = gp_mix64(hk ^ seed);
		uint64_t *sig = sigs + kept * NHASH;
		minhash(docs[i].text, docs[i].len, (int)shingle, seed, sig);
		int dup = 0, exact = 0;
		uint64_t bkeys[BANDS];
		for (int b = 0; b < BANDS; b++) {
			uint64_t k = (uint64_t)b * 0x9e3779b97f4a7c15ULL;
			for (int r = 0; r < ROWS; r++)
				k = gp_mix64(k ^ sig[b * ROWS + r]);
			bkeys[b] = k;
		}
		for (int b = 0; b < BANDS && !dup; b++) {
			for (uint32_t e = l.head[gp_mix64(bkeys[b]) & (l.hcap - 1)]; e && !dup;
			     e = l.next[e - 1]) {
				if (l.key[e - 1] != bkeys[b])
					continue;
				uint32_t j = l.doc[e - 1];
				const uint64_t *sj = sigs + (size_t)j * NHASH;
				int same = 0;
				for (int h = 0; h < NHASH; h++)
					same += sj[h] == sig[h];
				if (same == NHASH) {
					/* identical signatures: check bytes for an exact copy */
					const struct doc *dj = &docs[kept_doc[j]];
					exact = dj->len == docs[i].len &&
						!memcmp(dj->text, docs[i].text, docs[i].len);
				}
				if (thr > 0 ? (double)same / NHASH >= thr : exact)
					dup = 1;
			}
		}
		if (dup) {
			bump(dropped, exact ? "duplicate" : "near_duplicate", 1);
			free(docs[i].text);
			docs[i].text = NULL;
			continue;
		}
		for (int b = 0; b < BANDS; b++)
			if (lsh_add(&l, bkeys[b], (uint32_t)kept)) {
				st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
				goto out;
			}
		kept_doc[kept++] = i;
	}
	if (kept == 0) {
		st = gp_err_set(err, GP_ERR_INVALID,
				"no documents left after filtering (%lld in)", docs_in);
		goto out;
	}
	if (progress)
		progress(ctx, 0.25, "de-duplicated");
	/* split by document hash; keep one validation document when asked for any */
	size_t nval = 0, lowest = (size_t)-1;
	uint64_t cut = valf >= 0.5 ? UINT64_MAX / 2 : (uint64_t)(valf * 18446744073709551616.0);
	for (size_t i = 0; i < ndocs; i++) {
		if (!docs[i].text)
			continue;
		docs[i].val = valf > 0 && docs[i].hkey < cut;
		nval += (size_t)docs[i].val;
		if (lowest == (size_t)-1 || docs[i].hkey < docs[lowest].hkey)
			lowest = i;
	}
	if (valf > 0 && nval == 0 && kept > 1) {
		docs[lowest].val = 1;
		nval = 1;
	}
	/* tokenizer on the training split */
	double t0 = secs();
	size_t train_bytes = 0, val_bytes = 0;
	if ((st = gp_bpe_trainer_new(&tr, err)))
		goto out;
	for (size_t i = 0; i < ndocs; i++) {
		if (!docs[i].text)
			continue;
		if (docs[i].val) {
			val_bytes += docs[i].len;
			continue;
		}
		train_bytes += docs[i].len;
		if ((st = gp_bpe_trainer_add(tr, docs[i].text, docs[i].len, err)))
			goto out;
	}
	if ((st = gp_bpe_train(tr, (int)vocab, 0, &bpe, err)))
		goto out;
	double t1 = secs();
	if (progress)
		progress(ctx, 0.6, "tokenizer trained");
	/* encode: every document is preceded by the end-of-text token */
	uint16_t eot = (uint16_t)gp_bpe_eot(bpe);
	for (size_t i = 0; i < ndocs; i++) {
		if (!docs[i].text)
			continue;
		int s = docs[i].val;
		if (nids[s] == cids[s]) {
			/* room for the separator */
			size_t nc = cids[s] ? cids[s] * 2 : 4096;
			uint16_t *p = realloc(ids[s], nc * sizeof *p);
			if (!p) {
				st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
				goto out;
			}
			ids[s] = p;
			cids[s] = nc;
		}
		ids[s][nids[s]++] = eot;
		if ((st = gp_bpe_encode(bpe, docs[i].text, docs[i].len, &ids[s], &nids[s], &cids[s],
					err)))
			goto out;
	}
	double t2 = secs();
	if (progress)
		progress(ctx, 0.9, "encoded");
	/* artifacts */
	if ((st = gp_bpe_save(bpe, &buf, &blen, err)) ||
	    (st = put_artifact(cfg, buf, blen, "tokenizer", &arts[0], out, "tokenizer", err)))
		goto out;
	for (int s = 0; s < 2; s++) {
		free(buf);
		buf = NULL;
		if ((st = gp_shard_encode(ids[s], nids[s], &buf, &blen, err)) ||
		    (st = put_artifact(cfg, buf, blen, "shard", &arts[1 + s], out,
				       s ? "val_shards" : "train_shards", err)))
			goto out;
	}
	int V = gp_bpe_vocab_size(bpe);
	hist = cJSON_CreateObject();
	if (!hist || !cJSON_AddStringToObject(hist, "format", "genpipe-token-histogram/1") ||
	    !cJSON_AddNumberToObject(hist, "vocab_size", V) ||
	    histogram_json(ids[0], nids[0], V, hist, "train") ||
	    histogram_json(ids[1], nids[1], V, hist, "val") ||
	    !(htext = cJSON_PrintUnformatted(hist))) {
		st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		goto out;
	}
	if ((st = put_artifact(cfg, htext, strlen(htext), "histogram", &arts[3], out, "histogram",
			       err)))
		goto out;
	cJSON_AddNumberToObject(stats, "documents", (double)kept);
	cJSON_AddNumberToObject(stats, "documents_train", (double)(kept - nval));
	cJSON_AddNumberToObject(stats, "documents_val", (double)nval);
	cJSON_AddNumberToObject(stats, "bytes_train", (double)train_bytes);
	cJSON_AddNumberToObject(stats, "bytes_val", (double)val_bytes);
	cJSON_AddNumberToObject(stats, "tokens_train", (double)nids[0]);
	cJSON_AddNumberToObject(stats, "tokens_val", (double)nids[1]);
	cJSON_AddNumberToObject(stats, "vocab_size", V);
	size_t content_tokens = nids[0] + nids[1] - kept; /* without separators */
	cJSON_AddNumberToObject(stats, "bytes_per_token",
				content_tokens ? (double)(train_bytes + val_bytes) /
							 (double)content_tokens
					       : 0);
	cJSON_AddNumberToObject(stats, "tokenizer_train_mb_s",
				t1 > t0 ? (double)train_bytes / 1e6 / (t1 - t0) : 0);
	cJSON_AddNumberToObject(stats, "encode_mb_s",
				t2 > t1 ? (double)(train_bytes + val_bytes) / 1e6 / (t2 - t1) : 0);
	if (!(stext = cJSON_PrintUnformatted(stats))) {
		st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		goto out;
	}
	if ((st = put_artifact(cfg, stext, strlen(stext), "stats", &arts[4], out, "stats", err)))
		goto out;
	cJSON_AddNumberToObject(out, "vocab_size", V);
	*outputs = out;
	*stats_out = stats;
	out = stats = NULL;
out:
	for (size_t i = 0; i < ndocs; i++)
		free(docs[i].text);
	free(docs);
	free(l.key);
	free(l.doc);
	free(l.next);
	free(l.head);
	free(sigs);
	free(kept_doc);
	gp_bpe_trainer_free(tr);
	gp_bpe_free(bpe);
	free(ids[0]);
	free(ids[1]);
	free(buf);
	free(htext);
	free(stext);
	cJSON_Delete(hist);
	cJSON_Delete(out);
	cJSON_Delete(stats);
	return st;
}

static void job_progress(void *ctx, double f, const char *msg)
{
	gp_job_progress(ctx, f, msg, NULL);
}

void gp_preprocess_handle(struct gp_job *job, void *closure)
{
	const struct gp_preprocess_config *cfg = closure;
	const gp_stage_job *m = gp_job_msg(job);
	struct gp_err err = { 0 };
	cJSON *p = cJSON_Parse(m->params_json && *m->params_json ? m->params_json : "{}");
	cJSON *outputs = NULL, *stats = NULL;
	struct gp_pp_artifact arts[5];
	memset(arts, 0, sizeof arts);
	if (!cJSON_IsObject(p)) {
		gp_job_fail(job, 1, "params are not a JSON object");
		goto done;
	}
	gp_status st = gp_preprocess_run(p, cfg, job_progress, job, &outputs, &stats, arts, &err);
	if (st) {
		gp_job_fail(job, st == GP_ERR_INVALID || st == GP_ERR_TOO_BIG, err.msg);
		goto done;
	}
	for (int i = 0; i < 5; i++) {
		if (gp_artifact_register(gp_job_db(job), cfg->store, arts[i].hash, arts[i].kind,
					 arts[i].size, (long long)m->run_id, m->stage, NULL, &err)) {
			gp_job_fail(job, 0, err.msg);
			goto done;
		}
	}
	char *o = cJSON_PrintUnformatted(outputs), *s = cJSON_PrintUnformatted(stats);
	if (o && s) {
		gp_info("preprocess: run %lld stage %s: %s", (long long)m->run_id, m->stage, s);
		gp_job_succeed(job, o, s);
	} else {
		gp_job_fail(job, 0, "out of memory");
	}
	free(o);
	free(s);
done:
	cJSON_Delete(p);
	cJSON_Delete(outputs);
	cJSON_Delete(stats);
}
