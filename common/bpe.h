/*
 * bpe.h: a byte-level BPE tokenizer (GPT-2 family), its trainer, and its
 * file format.
 *
 * Token ids: 0..255 are the bytes; 256+i is merge i (the concatenation of
 * its two parts); the last id, 256 + n_merges, is the end-of-text token,
 * which encode never produces and decode renders as nothing. For any byte
 * string x, decode(encode(x)) == x.
 *
 * Text is first cut into chunks (never merged across): an optional single
 * space followed by a run of letters (ASCII letters and every byte >= 0x80,
 * so UTF-8 text stays whole), of digits, or of other printable bytes; or a
 * run of whitespace (whose last space is left to the word after it). A
 * chunk is at most GP_BPE_MAX_CHUNK bytes, so no token is longer.
 *
 * File format (all integers little-endian uint32), documented in
 * docs/formats.md:
 *   magic 0x4B545047 ("GPTK"), version 1, vocab_size, n_merges,
 *   then n_merges pairs (left, right),
 * with vocab_size == 256 + n_merges + 1 <= 65536 (ids fit uint16 shards),
 * every part < 256 + its own index, no pair twice, token length <=
 * GP_BPE_MAX_CHUNK, and nothing after the last pair.
 */
#ifndef GP_BPE_H
#define GP_BPE_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

#define GP_BPE_MAGIC 0x4B545047u
#define GP_BPE_VERSION 1u
#define GP_BPE_MAX_VOCAB 65536
#define GP_BPE_MAX_CHUNK 64

struct gp_bpe;

/* Training input: add text (any bytes), then train. */
struct gp_bpe_trainer;
gp_status gp_bpe_trainer_new(struct gp_bpe_trainer **out, struct gp_err *err);
gp_status gp_bpe_trainer_add(struct gp_bpe_trainer *t, const void *text, size_t len,
			     struct gp_err *err);
void gp_bpe_trainer_free(struct gp_bpe_trainer *t);

/*
 * Learn up to vocab_size - 257 merges (the most frequent adjacent pair
 * first; ties to the smaller (left, right); pairs seen fewer than twice are
 * not merged, so the vocabulary may come out smaller). Deterministic.
 * naive != 0 recounts every pair before every merge: the reference the
 * incremental trainer is tested against.
 */
gp_status gp_bpe_train(struct gp_bpe_trainer *t, int vocab_size, int naive,
		       struct gp_bpe **out, struct gp_err *err);

int gp_bpe_vocab_size(const struct gp_bpe *b);
int gp_bpe_eot(const struct gp_bpe *b);
/* The bytes of token id (length in *len); NULL for ids out of range. */
const uint8_t *gp_bpe_token(const struct gp_bpe *b, int id, size_t *len);

/*
 * Encode len bytes, appending token ids to *ids (realloc'd; *n and *cap
 * updated). Not thread-safe (a per-tokenizer chunk cache).
 */
gp_status gp_bpe_encode(struct gp_bpe *b, const void *text, size_t len, uint16_t **ids,
			size_t *n, size_t *cap, struct gp_err *err);
/* The reference encoder: no cache, merges applied one rank at a time. */
gp_status gp_bpe_encode_reference(const struct gp_bpe *b, const void *text, size_t len,
				  uint16_t **ids, size_t *n, size_t *cap, struct gp_err *err);
/* Decode into a malloc'd buffer (*out, *out_len). Ids out of range fail. */
gp_status gp_bpe_decode(const struct gp_bpe *b, const uint16_t *ids, size_t n, uint8_t **out,
			size_t *out_len, struct gp_err *err);

/* Serialize (malloc'd) / load with full validation. */
gp_status gp_bpe_save(const struct gp_bpe *b, uint8_t **out, size_t *len, struct gp_err *err);
gp_status gp_bpe_load(const void *data, size_t len, struct gp_bpe **out, struct gp_err *err);
void gp_bpe_free(struct gp_bpe *b);

/* The chunker, exposed for tests: length of the chunk starting at p. */
size_t gp_bpe_chunk(const uint8_t *p, size_t len);

#endif
