/*
 * bpe.c: byte-level BPE (see bpe.h).
 *
 * Training counts distinct chunks once, then merges incrementally: each
 * pair keeps its count and the list of words it occurs in, and a max-heap
 * (with stale entries skipped on pop) picks the next merge. A merge only
 * visits the words that hold its pair. The naive trainer recounts all
 * pairs before each merge; tests require both to learn the same merges.
 */
#include "bpe.h"

#include <stdlib.h>
#include <string.h>

#include "bytes.h"

/* ---- pairs ---- */

static uint64_t pair_key(uint32_t a, uint32_t b)
{
	return ((uint64_t)a << 32) | b;
}

/* ---- the chunker ---- */

enum { C_LETTER, C_DIGIT, C_SPACE, C_WS, C_OTHER };

static int cls(uint8_t c)
{
	if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c >= 0x80)
		return C_LETTER;
	if (c >= '0' && c <= '9')
		return C_DIGIT;
	if (c == ' ')
		return C_SPACE;
	if (c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f')
		return C_WS;
	return C_OTHER;
}

size_t gp_bpe_chunk(const uint8_t *p, size_t len)
{
	if (len == 0)
		return 0;
	size_t max = len < GP_BPE_MAX_CHUNK ? len : GP_BPE_MAX_CHUNK;
	int c0 = cls(p[0]);
	size_t i = 0;
	if (c0 == C_SPACE && max > 1) {
		int c1 = cls(p[1]);
		if (c1 == C_LETTER || c1 == C_DIGIT || c1 == C_OTHER) {
			i = 2;
			while (i < max && cls(p[i]) == c1)
				i++;
			return i;
		}
	}
	if (c0 == C_SPACE || c0 == C_WS) {
		i = 1;
		while (i < max && (cls(p[i]) == C_SPACE || cls(p[i]) == C_WS))
			i++;
		/* leave a final space to the word that follows it */
		if (i > 1 && i < len && p[i - 1] == ' ' && cls(p[i]) != C_SPACE && cls(p[i]) != C_WS)
			i--;
		return i;
	}
	i = 1;
	while (i < max && cls(p[i]) == c0)
		i++;
	return i;
}

/* ---- the tokenizer ---- */

struct rank_slot {
	uint64_t key; /* pair_key + 1; 0 = empty */
	uint32_t rank;
};

struct cache_slot {
	uint64_t hash; /* 0 = empty */
	uint32_t off, len;    /* chunk bytes in cache_bytes */
	uint32_t toff, tlen;  /* tokens in cache_toks */
};

struct gp_bpe {
	int n_merges;
	uint32_t (*merges)[2];
	uint32_t *tok_off, *tok_len; /* per id, into bytes */
	uint8_t *bytes;
	struct rank_slot *ranks;
	size_t rank_cap;
	/* encode cache */
	struct cache_slot *cache;
	size_t cache_cap, cache_n;
	uint8_t *cache_bytes;
	size_t cb_len, cb_cap;
	uint16_t *cache_toks;
	size_t ct_len, ct_cap;
};

#define CACHE_SLOTS (1u << 16)

int gp_bpe_vocab_size(const struct gp_bpe *b)
{
	return 256 + b->n_merges + 1;
}

int gp_bpe_eot(const struct gp_bpe *b)
{
	return 256 + b->n_merges;
}

const uint8_t *gp_bpe_token(const struct gp_bpe *b, int id, size_t *len)
{
	if (id < 0 || id >= gp_bpe_vocab_size(b))
		return NULL;
	*len = b->tok_len[id];
	return b->bytes + b->tok_off[id];
}

void gp_bpe_free(struct gp_bpe *b)
{
	if (!b)
		return;
	free(b->merges);
	free(b->tok_off);
	free(b->tok_len);
	free(b->bytes);
	free(b->ranks);
	free(b->cache);
	free(b->cache_bytes);
	free(b->cache_toks);
	free(b);
}

static int rank_of(const struct gp_bpe *b, uint32_t l, uint32_t r)
{
	uint64_t k = pair_key(l, r) + 1;
	size_t mask = b->rank_cap - 1;
	for (size_t i = gp_mix64(k) & mask;; i = (i + 1) & mask) {
		if (b->ranks[i].key == 0)
			return -1;
		if (b->ranks[i].key == k)
			return (int)b->ranks[i].rank;
	}
}

/*
 * Build a tokenizer from a merge list, validating it as the loader must:
 * parts refer to earlier ids, no pair twice, tokens at most
 * GP_BPE_MAX_CHUNK bytes.
 */
static gp_status build(uint32_t (*merges)[2], int n, struct gp_bpe **out, struct gp_err *err)
{
	struct gp_bpe *b = calloc(1, sizeof *b);
	int vocab = 256 + n + 1;
	if (!b) {
		free(merges);
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	}
	b->n_merges = n;
	b->merges = merges;
	b->tok_off = calloc((size_t)vocab, sizeof *b->tok_off);
	b->tok_len = calloc((size_t)vocab, sizeof *b->tok_len);
	b->bytes = malloc(256 + (size_t)n * GP_BPE_MAX_CHUNK);
	b->rank_cap = 16;
	while (b->rank_cap < (size_t)n * 2 + 2)
		b->rank_cap <<= 1;
	b->ranks = calloc(b->rank_cap, sizeof *b->ranks);
	if (!b->tok_off || !b->tok_len || !b->bytes || !b->ranks) {
		gp_bpe_free(b);
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	}
	for (int i = 0; i < 256; i++) {
		b->bytes[i] = (uint8_t)i;
		b->tok_off[i] = (uint32_t)i;
		b->tok_len[i] = 1;
	}
	size_t used = 256;
	for (int i = 0; i < n; i++) {
		uint32_t l = merges[i][0], r = merges[i][1];
		uint32_t id = 256u + (uint32_t)i;
		if (l >= id || r >= id) {
			gp_bpe_free(b);
			return gp_err_set(err, GP_ERR_INVALID,
					  "merge %d: part %u refers to a later token", i,
					  l >= id ? l : r);
		}
		size_t len = (size_t)b->tok_len[l] + b->tok_len[r];
		if (len > GP_BPE_MAX_CHUNK) {
			gp_bpe_free(b);
			return gp_err_set(err, GP_ERR_INVALID,
					  "merge %d: token of %zu bytes exceeds the limit of %d", i,
					  len, GP_BPE_MAX_CHUNK);
		}
		memcpy(b->bytes + used, b->bytes + b->tok_off[l], b->tok_len[l]);
		memcpy(b->bytes + used + b->tok_len[l], b->bytes + b->tok_off[r], b->tok_len[r]);
		b->tok_off[id] = (uint32_t)used;
		b->tok_len[id] = (uint32_t)len;
		used += len;
		uint64_t k = pair_key(l, r) + 1;
		size_t mask = b->rank_cap - 1, j = gp_mix64(k) & mask;
		while (b->ranks[j].key && b->ranks[j].key != k)
			j = (j + 1) & mask;
		if (b->ranks[j].key == k) {
			uint32_t first = b->ranks[j].rank;
			gp_bpe_free(b);
			return gp_err_set(err, GP_ERR_INVALID, "merge %d repeats merge %u (%u, %u)",
					  i, first, l, r);
		}
		b->ranks[j].key = k;
		b->ranks[j].rank = (uint32_t)i;
	}
	b->tok_off[256 + n] = (uint32_t)used; /* end of text: no bytes */
	b->tok_len[256 + n] = 0;
	*out = b;
	return GP_OK;
}

/* ---- encoding ---- */

static gp_status push_ids(uint16_t **ids, size_t *n, size_t *cap, const uint16_t *src, size_t k,
			  struct gp_err *err)
{
	if (*n + k > *cap) {
		size_t nc = *cap ? *cap : 1024;
		while (nc < *n + k)
			nc *= 2;
		uint16_t *p = realloc(*ids, nc * sizeof *p);
		if (!p)
			return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		*ids = p;
		*cap = nc;
	}
	memcpy(*ids + *n, src, k * sizeof *src);
	*n += k;
	return GP_OK;
}

/* Lowest rank first, every occurrence of that pair per pass. Returns count. */
static size_t encode_chunk(const struct gp_bpe *b, const uint8_t *p, size_t len, uint16_t *sym)
{
	for (size_t i = 0; i < len; i++)
		sym[i] = p[i];
	size_t n = len;
	while (n > 1) {
		int best = -1;
		for (size_t i = 0; i + 1 < n; i++) {
			int r = rank_of(b, sym[i], sym[i + 1]);
			if (r >= 0 && (best < 0 || r < best))
				best = r;
		}
		if (best < 0)
			break;
		uint32_t l = b->merges[best][0], r = b->merges[best][1];
		size_t j = 0;
		for (size_t i = 0; i < n;) {
			if (i + 1 < n && sym[i] == l && sym[i + 1] == r) {
				sym[j++] = (uint16_t)(256 + best);
				i += 2;
			} else {
				sym[j++] = sym[i++];
			}
		}
		n = j;
	}
	return n;
}

static gp_status cache_grow(void **p, size_t *cap, size_t need, size_t elem, struct gp_err *err)
{
	if (need <= *cap)
		return GP_OK;
	size_t nc = *cap ? *cap : 65536;
	while (nc < need)
		nc *= 2;
	void *q = realloc(*p, nc * elem);
	if (!q)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	*p = q;
	*cap = nc;
	return GP_OK;
}

gp_status gp_bpe_encode(struct gp_bpe *b, const void *text, size_t len, uint16_t **ids,
			size_t *n, size_t *cap, struct gp_err *err)
{
	const uint8_t *p = text;
	uint16_t sym[GP_BPE_MAX_CHUNK];
	gp_status st;
	if (!b->cache) {
		b->cache = calloc(CACHE_SLOTS, sizeof *b->cache);
		if (!b->cache)
			return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		b->cache_cap = CACHE_SLOTS;
	}
	size_t mask = b->cache_cap - 1;
	for (size_t off = 0; off < len;) {
		size_t cl = gp_bpe_chunk(p + off, len - off);
		uint64_t h = gp_hash64(p + off, cl, 0) | 1;
		size_t i = h & mask;
		struct cache_slot *hit = NULL;
		for (;; i = (i + 1) & mask) {
			struct cache_slot *s = &b->cache[i];
			if (!s->hash)
				break;
			if (s->hash == h && s->len == cl &&
			    !memcmp(b->cache_bytes + s->off, p + off, cl)) {
				hit = s;
				break;
			}
		}
		if (hit) {
			if ((st = push_ids(ids, n, cap, b->cache_toks + hit->toff, hit->tlen, err)))
				return st;
			off += cl;
			continue;
		}
		size_t k = encode_chunk(b, p + off, cl, sym);
		if ((st = push_ids(ids, n, cap, sym, k, err)))
			return st;
		/* remember it; a full cache (half the slots) starts over */
		if (b->cache_n >= b->cache_cap / 2) {
			memset(b->cache, 0, b->cache_cap * sizeof *b->cache);
			b->cache_n = 0;
			b->cb_len = b->ct_len = 0;
			i = h & mask;
		}
		if ((st = cache_grow((void **)&b->cache_bytes, &b->cb_cap, b->cb_len + cl, 1, err)) ||
		    (st = cache_grow((void **)&b->cache_toks, &b->ct_cap, b->ct_len + k, 2, err)))
			return st;
		memcpy(b->cache_bytes + b->cb_len, p + off, cl);
		memcpy(b->cache_toks + b->ct_len, sym, k * sizeof *sym);
		b->cache[i] = (struct cache_slot){ h, (uint32_t)b->cb_len, (uint32_t)cl,
						   (uint32_t)b->ct_len, (uint32_t)k };
		b->cb_len += cl;
		b->ct_len += k;
		b->cache_n++;
		off += cl;
	}
	return GP_OK;
}

gp_status gp_bpe_encode_reference(const struct gp_bpe *b, const void *text, size_t len,
				  uint16_t **ids, size_t *n, size_t *cap, struct gp_err *err)
{
	const uint8_t *p = text;
	uint16_t sym[GP_BPE_MAX_CHUNK];
	for (size_t off = 0; off < len;) {
		size_t cl = gp_bpe_chunk(p + off, len - off);
		size_t k = cl;
		for (size_t i = 0; i < cl; i++)
			sym[i] = p[off + i];
		/* every merge in order, as training applied them */
		for (int m = 0; m < b->n_merges && k > 1; m++) {
			size_t j = 0;
			for (size_t i = 0; i < k;) {
				if (i + 1 < k && sym[i] == b->merges[m][0] &&
				    sym[i + 1] == b->merges[m][1]) {
					sym[j++] = (uint16_t)(256 + m);
					i += 2;
				} else {
					sym[j++] = sym[i++];
				}
			}
			k = j;
		}
		gp_status st = push_ids(ids, n, cap, sym, k, err);
		if (st)
			return st;
		off += cl;
	}
	return GP_OK;
}

gp_status gp_bpe_decode(const struct gp_bpe *b, const uint16_t *ids, size_t n, uint8_t **out,
			size_t *out_len, struct gp_err *err)
{
	size_t total = 0;
	int vocab = gp_bpe_vocab_size(b);
	for (size_t i = 0; i < n; i++) {
		if (ids[i] >= vocab)
			return gp_err_set(err, GP_ERR_INVALID,
					  "token %zu: id %u is outside the vocabulary of %d", i,
					  ids[i], vocab);
		total += b->tok_len[ids[i]];
	}
	uint8_t *o = malloc(total ? total : 1);
	if (!o)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	size_t w = 0;
	for (size_t i = 0; i < n; i++) {
		memcpy(o + w, b->bytes + b->tok_off[ids[i]], b->tok_len[ids[i]]);
		w += b->tok_len[ids[i]];
	}
	*out = o;
	*out_len = w;
	return GP_OK;
}

/* ---- file format ---- */

gp_status gp_bpe_save(const struct gp_bpe *b, uint8_t **out, size_t *len, struct gp_err *err)
{
	size_t n = 16 + (size_t)b->n_merges * 8;
	uint8_t *p = malloc(n);
	if (!p)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	gp_put_le32(p, GP_BPE_MAGIC);
	gp_put_le32(p + 4, GP_BPE_VERSION);
	gp_put_le32(p + 8, (uint32_t)gp_bpe_vocab_size(b));
	gp_put_le32(p + 12, (uint32_t)b->n_merges);
	for (int i = 0; i < b->n_merges; i++) {
		gp_put_le32(p + 16 + (size_t)i * 8, b->merges[i][0]);
		gp_put_le32(p + 20 + (size_t)i * 8, b->merges[i][1]);
	}
	*out = p;
	*len = n;
	return GP_OK;
}

gp_status gp_bpe_load(const void *data, size_t len, struct gp_bpe **out, struct gp_err *err)
{
	const uint8_t *p = data;
	if (len < 16)
		return gp_err_set(err, GP_ERR_INVALID, "tokenizer: %zu bytes, shorter than the header",
				  len);
	if (gp_get_le32(p) != GP_BPE_MAGIC)
		return gp_err_set(err, GP_ERR_INVALID, "tokenizer: bad magic 0x%08x", gp_get_le32(p));
	if (gp_get_le32(p + 4) != GP_BPE_VERSION)
		return gp_err_set(err, GP_ERR_INVALID, "tokenizer: unsupported version %u",
				  gp_get_le32(p + 4));
	uint32_t vocab = gp_get_le32(p + 8), n = gp_get_le32(p + 12);
	if (vocab > GP_BPE_MAX_VOCAB || n > GP_BPE_MAX_VOCAB - 257 || vocab != 257 + n)
		return gp_err_set(err, GP_ERR_INVALID,
				  "tokenizer: vocab_size %u does not match %u merges (must be "
				  "257 + merges, at most %d)",
				  vocab, n, GP_BPE_MAX_VOCAB);
	if (len != 16 + (size_t)n * 8)
		return gp_err_set(err, GP_ERR_INVALID,
				  "tokenizer: %zu bytes, expected %zu for %u merges", len,
				  16 + (size_t)n * 8, n);
	uint32_t (*m)[2] = malloc((n ? n : 1) * sizeof *m);
	if (!m)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	for (uint32_t i = 0; i < n; i++) {
		m[i][0] = gp_get_le32(p + 16 + (size_t)i * 8);
		m[i][1] = gp_get_le32(p + 20 + (size_t)i * 8);
	}
	gp_status st = build(m, (int)n, out, err);
	if (st)
		return gp_err_wrap(err, "tokenizer");
	return GP_OK;
}

/* ---- training ---- */

struct chunk_slot {
	uint64_t hash; /* 0 = empty */
	uint32_t off, len;
	int64_t count;
};

struct gp_bpe_trainer {
	struct chunk_slot *slots;
	size_t cap, n;
	uint8_t *arena;
	size_t alen, acap;
};

gp_status gp_bpe_trainer_new(struct gp_bpe_trainer **out, struct gp_err *err)
{
	struct gp_bpe_trainer *t = calloc(1, sizeof *t);
	if (t) {
		t->cap = 1024;
		t->slots = calloc(t->cap, sizeof *t->slots);
	}
	if (!t || !t->slots) {
		free(t);
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	}
	*out = t;
	return GP_OK;
}

void gp_bpe_trainer_free(struct gp_bpe_trainer *t)
{
	if (!t)
		return;
	free(t->slots);
	free(t->arena);
	free(t);
}

static gp_status chunks_grow(struct gp_bpe_trainer *t, struct gp_err *err)
{
	size_t nc = t->cap * 2;
	struct chunk_slot *ns = calloc(nc, sizeof *ns);
	if (!ns)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	for (size_t i = 0; i < t->cap; i++) {
		if (!t->slots[i].hash)
			continue;
		size_t j = t->slots[i].hash & (nc - 1);
		while (ns[j].hash)
			j = (j + 1) & (nc - 1);
		ns[j] = t->slots[i];
	}
	free(t->slots);
	t->slots = ns;
	t->cap = nc;
	return GP_OK;
}

gp_status gp_bpe_trainer_add(struct gp_bpe_trainer *t, const void *text, size_t len,
			     struct gp_err *err)
{
	const uint8_t *p = text;
	gp_status st;
	for (size_t off = 0; off < len;) {
		size_t cl = gp_bpe_chunk(p + off, len - off);
		uint64_t h = gp_hash64(p + off, cl, 0) | 1;
		size_t mask = t->cap - 1, i = h & mask;
		for (;; i = (i + 1) & mask) {
			struct chunk_slot *s = &t->slots[i];
			if (!s->hash)
				break;
			if (s->hash == h && s->len == cl && !memcmp(t->arena + s->off, p + off, cl))
				break;
		}
		if (t->slots[i].hash) {
			t->slots[i].count++;
		} else {
			if ((st = cache_grow((void **)&t->arena, &t->acap, t->alen + cl, 1, err)))
				return st;
			if (t->alen + cl > UINT32_MAX)
				return gp_err_set(err, GP_ERR_TOO_BIG, "too many distinct chunks");
			memcpy(t->arena + t->alen, p + off, cl);
			t->slots[i] = (struct chunk_slot){ h, (uint32_t)t->alen, (uint32_t)cl, 1 };
			t->alen += cl;
			t->n++;
			if (t->n * 2 > t->cap && (st = chunks_grow(t, err)))
				return st;
		}
		off += cl;
	}
	return GP_OK;
}

/* Training state: words as symbol runs, pairs with counts and word lists. */
struct word {
	uint32_t off, len; /* into syms */
	int64_t count;
};

struct pair {
	uint64_t key;
	int64_t count;
	uint32_t *words;
	uint32_t nw, cw;
	int stamp;
};

struct heap_ent {
	int64_t count;
	uint64_t key;
};

struct trainer_state {
	struct word *words;
	size_t nwords;
	uint32_t *syms;
	struct pair *pairs;
	size_t npairs, cpairs;
	uint32_t *index; /* open addressing: pair index + 1 */
	size_t icap;
	struct heap_ent *heap;
	size_t nheap, cheap;
	uint32_t *touched;
	size_t ntouched, ctouched;
	int oom;
};

static int heap_less(const struct heap_ent *a, const struct heap_ent *b)
{
	/* a ranks below b */
	return a->count < b->count || (a->count == b->count && a->key > b->key);
}

static void heap_push(struct trainer_state *s, int64_t count, uint64_t key)
{
	if (s->nheap == s->cheap) {
		size_t nc = s->cheap ? s->cheap * 2 : 4096;
		struct heap_ent *h = realloc(s->heap, nc * sizeof *h);
		if (!h) {
			s->oom = 1;
			return;
		}
		s->heap = h;
		s->cheap = nc;
	}
	size_t i = s->nheap++;
	s->heap[i] = (struct heap_ent){ count, key };
	while (i > 0) {
		size_t parent = (i - 1) / 2;
		if (!heap_less(&s->heap[parent], &s->heap[i]))
			break;
		struct heap_ent t = s->heap[parent];
		s->heap[parent] = s->heap[i];
		s->heap[i] = t;
		i = parent;
	}
}

static struct heap_ent heap_pop(struct trainer_state *s)
{
	struct heap_ent top = s->heap[0];
	s->heap[0] = s->heap[--s->nheap];
	size_t i = 0;
	for (;;) {
		size_t l = 2 * i + 1, r = l + 1, m = i;
		if (l < s->nheap && heap_less(&s->heap[m], &s->heap[l]))
			m = l;
		if (r < s->nheap && heap_less(&s->heap[m], &s->heap[r]))
			m = r;
		if (m == i)
			break;
		struct heap_ent t = s->heap[m];
		s->heap[m] = s->heap[i];
		s->heap[i] = t;
		i = m;
	}
	return top;
}

/* Index of the pair, created with count 0 when absent; (size_t)-1 on OOM. */
static size_t pair_find(struct trainer_state *s, uint64_t key, int create)
{
	size_t mask = s->icap - 1;
	size_t i = gp_mix64(key) & mask;
	for (;; i = (i + 1) & mask) {
		uint32_t v = s->index[i];
		if (!v)
			break;
		if (s->pairs[v - 1].key == key)
			return v - 1;
	}
	if (!create)
		return (size_t)-1;
	if (s->npairs == s->cpairs) {
		size_t nc = s->cpairs ? s->cpairs * 2 : 4096;
		struct pair *p = realloc(s->pairs, nc * sizeof *p);
		if (!p) {
			s->oom = 1;
			return (size_t)-1;
		}
		s->pairs = p;
		s->cpairs = nc;
	}
	size_t id = s->npairs++;
	s->pairs[id] = (struct pair){ .key = key, .stamp = -1 };
	s->index[i] = (uint32_t)(id + 1);
	if (s->npairs * 2 > s->icap) {
		size_t nc = s->icap * 2;
		uint32_t *ni = calloc(nc, sizeof *ni);
		if (!ni) {
			s->oom = 1;
			return (size_t)-1;
		}
		for (size_t k = 0; k < s->npairs; k++) {
			size_t j = gp_mix64(s->pairs[k].key) & (nc - 1);
			while (ni[j])
				j = (j + 1) & (nc - 1);
			ni[j] = (uint32_t)(k + 1);
		}
		free(s->index);
		s->index = ni;
		s->icap = nc;
	}
	return id;
}

static void pair_add(struct trainer_state *s, uint32_t a, uint32_t b, int64_t delta, uint32_t w,
		     int stamp)
{
	size_t id = pair_find(s, pair_key(a, b), 1);
	if (id == (size_t)-1)
		return;
	struct pair *p = &s->pairs[id];
	p->count += delta;
	if (delta > 0 && (p->nw == 0 || p->words[p->nw - 1] != w)) {
		if (p->nw == p->cw) {
			uint32_t nc = p->cw ? p->cw * 2 : 4;
			uint32_t *nw = realloc(p->words, nc * sizeof *nw);
			if (!nw) {
				s->oom = 1;
				return;
			}
			p->words = nw;
			p->cw = nc;
		}
		p->words[p->nw++] = w;
	}
	if (stamp >= 0 && p->stamp != stamp) {
		p->stamp = stamp;
		if (s->ntouched == s->ctouched) {
			size_t nc = s->ctouched ? s->ctouched * 2 : 1024;
			uint32_t *t = realloc(s->touched, nc * sizeof *t);
			if (!t) {
				s->oom = 1;
				return;
			}
			s->touched = t;
			s->ctouched = nc;
		}
		s->touched[s->ntouched++] = (uint32_t)id;
	}
}

static void state_free(struct trainer_state *s)
{
	for (size_t i = 0; i < s->npairs; i++)
		free(s->pairs[i].words);
	free(s->pairs);
	free(s->index);
	free(s->heap);
	free(s->touched);
	free(s->words);
	free(s->syms);
}

/* Merge (a, b) into t in word w, keeping pair counts exact (stamp >= 0:
 * incremental bookkeeping; -1: naive, counts are rebuilt anyway). */
static void merge_word(struct trainer_state *s, uint32_t w, uint32_t a, uint32_t b, uint32_t t,
		       int stamp)
{
	struct word *wd = &s->words[w];
	uint32_t *sy = s->syms + wd->off;
	uint32_t n = wd->len, j = 0;
	int64_t c = wd->count;
	for (uint32_t i = 0; i < n;) {
		if (i + 1 < n && sy[i] == a && sy[i + 1] == b) {
			if (stamp >= 0) {
				if (j > 0) {
					pair_add(s, sy[j - 1], a, -c, w, stamp);
					pair_add(s, sy[j - 1], t, c, w, stamp);
				}
				if (i + 2 < n) {
					pair_add(s, b, sy[i + 2], -c, w, stamp);
					pair_add(s, t, sy[i + 2], c, w, stamp);
				}
				pair_add(s, a, b, -c, w, stamp);
			}
			sy[j++] = t;
			i += 2;
		} else {
			sy[j++] = sy[i++];
		}
	}
	wd->len = j;
}

static int best_naive(struct trainer_state *s, uint64_t *key, int64_t *count)
{
	/* recount from scratch */
	for (size_t i = 0; i < s->npairs; i++)
		s->pairs[i].count = 0;
	for (size_t w = 0; w < s->nwords; w++) {
		const uint32_t *sy = s->syms + s->words[w].off;
		for (uint32_t i = 0; i + 1 < s->words[w].len; i++) {
			size_t id = pair_find(s, pair_key(sy[i], sy[i + 1]), 1);
			if (id == (size_t)-1)
				return -1;
			s->pairs[id].count += s->words[w].count;
		}
	}
	int found = 0;
	for (size_t i = 0; i < s->npairs; i++) {
		struct pair *p = &s->pairs[i];
		if (p->count <= 0)
			continue;
		if (!found || p->count > *count || (p->count == *count && p->key < *key)) {
			*key = p->key;
			*count = p->count;
			found = 1;
		}
	}
	return found;
}

gp_status gp_bpe_train(struct gp_bpe_trainer *t, int vocab_size, int naive,
		       struct gp_bpe **out, struct gp_err *err)
{
	if (vocab_size < 257 || vocab_size > GP_BPE_MAX_VOCAB)
		return gp_err_set(err, GP_ERR_INVALID, "vocab_size %d is not within 257..%d",
				  vocab_size, GP_BPE_MAX_VOCAB);
	struct trainer_state s = { 0 };
	int want = vocab_size - 257, n = 0;
	uint32_t (*merges)[2] = malloc((size_t)(want ? want : 1) * sizeof *merges);
	s.words = malloc((t->n ? t->n : 1) * sizeof *s.words);
	s.syms = malloc((t->alen ? t->alen : 1) * sizeof *s.syms);
	s.icap = 4096;
	s.index = calloc(s.icap, sizeof *s.index);
	if (!merges || !s.words || !s.syms || !s.index)
		goto oom;
	/* words in slot order: deterministic for the same input */
	for (size_t i = 0; i < t->cap; i++) {
		const struct chunk_slot *c = &t->slots[i];
		if (!c->hash)
			continue;
		s.words[s.nwords++] = (struct word){ c->off, c->len, c->count };
	}
	for (size_t w = 0; w < s.nwords; w++) {
		uint32_t off = s.words[w].off;
		for (uint32_t i = 0; i < s.words[w].len; i++)
			s.syms[off + i] = t->arena[off + i];
		if (!naive)
			for (uint32_t i = 0; i + 1 < s.words[w].len; i++)
				pair_add(&s, s.syms[off + i], s.syms[off + i + 1], s.words[w].count,
					 (uint32_t)w, -1);
	}
	if (s.oom)
		goto oom;
	if (!naive)
		for (size_t i = 0; i < s.npairs; i++)
			heap_push(&s, s.pairs[i].count, s.pairs[i].key);
	while (n < want) {
		uint64_t key = 0;
		int64_t count = 0;
		if (naive) {
			int f = best_naive(&s, &key, &count);
			if (f < 0)
				goto oom;
			if (!f || count < 2)
				break;
		} else {
			int found = 0;
			while (s.nheap) {
				struct heap_ent e = heap_pop(&s);
				size_t id = pair_find(&s, e.key, 0);
				if (id != (size_t)-1 && s.pairs[id].count == e.count && e.count > 0) {
					key = e.key;
					count = e.count;
					found = 1;
					break;
				}
			}
			if (!found || count < 2)
				break;
		}
		uint32_t a = (uint32_t)(key >> 32), b = (uint32_t)key, tok = 256u + (uint32_t)n;
		merges[n][0] = a;
		merges[n][1] = b;
		if (naive) {
			for (size_t w = 0; w < s.nwords; w++)
				merge_word(&s, (uint32_t)w, a, b, tok, -1);
		} else {
			size_t id = pair_find(&s, key, 0);
			uint32_t *list = s.pairs[id].words;
			uint32_t nl = s.pairs[id].nw;
			s.pairs[id].words = NULL;
			s.pairs[id].nw = s.pairs[id].cw = 0;
			s.ntouched = 0;
			for (uint32_t k = 0; k < nl; k++)
				if (k == 0 || list[k] != list[k - 1])
					merge_word(&s, list[k], a, b, tok, n);
			free(list);
			if (s.oom)
				goto oom;
			for (size_t k = 0; k < s.ntouched; k++) {
				struct pair *p = &s.pairs[s.touched[k]];
				if (p->count > 0)
					heap_push(&s, p->count, p->key);
				else if (p->words) {
					free(p->words);
					p->words = NULL;
					p->nw = p->cw = 0;
				}
			}
			if (s.oom)
				goto oom;
		}
		n++;
	}
	state_free(&s);
	return build(merges, n, out, err);
oom:
	state_free(&s);
	free(merges);
	return gp_err_set(err, GP_ERR_NOMEM, "out of memory while training the tokenizer");
}
