/*
 * preprocess.h: the `preprocess` stage kind: normalize, filter and
 * de-duplicate a dataset, split it, train a byte-level BPE tokenizer on
 * the training split, and write token shards and token histograms.
 *
 * Parameters (`with`):
 *   dataset / datasets  the `dataset` output(s) of ingest stages (manifests)
 *   normalize       {whitespace: true, control: true}: collapse runs of
 *                   spaces and tabs, strip trailing spaces, at most two
 *                   newlines in a row; drop control characters but \n, \t
 *   min_length, max_length   in bytes after normalization (1, 1 MiB)
 *   dedup_threshold  near-duplicates: estimated Jaccard similarity of byte
 *                   shingles (MinHash, 64 hashes, 16 bands of 4) at or above
 *                   this drops the later document (default 0.8; 0 turns it off)
 *   shingle         shingle length in bytes (default 5)
 *   val_fraction    share of documents in the validation split, chosen by
 *                   document hash (default 0.05; 0..0.5)
 *   vocab_size      tokenizer vocabulary (default 4096, 257..65536)
 *   seed            changes the MinHash functions and the split (default 0)
 *
 * Outputs: train_shards, val_shards (llm.c shards; every document is
 * preceded by the end-of-text token), tokenizer, histogram (token counts
 * per split: the drift reference), stats (all counts), vocab_size.
 */
#ifndef GP_PREPROCESS_H
#define GP_PREPROCESS_H

#include <cjson/cJSON.h>

#include "artifact.h"
#include "worker.h"

struct gp_preprocess_config {
	struct gp_store *store;
	size_t max_input; /* bytes of documents read at most */
};

void gp_preprocess_handle(struct gp_job *job, void *closure);

/* One artifact the run produced. */
struct gp_pp_artifact {
	char hash[65];
	const char *kind;
	size_t size;
};

/*
 * The stage's work without bus or database: reads the inputs from the
 * store, writes the outputs to it. *outputs and *stats are new cJSON
 * objects; arts gets the artifacts written (up to 5).
 */
gp_status gp_preprocess_run(const cJSON *params, const struct gp_preprocess_config *cfg,
			    void (*progress)(void *ctx, double f, const char *msg), void *ctx,
			    cJSON **outputs, cJSON **stats, struct gp_pp_artifact arts[5],
			    struct gp_err *err);

/* Normalize text in place (returns the new length). */
size_t gp_normalize(unsigned char *t, size_t len, int whitespace, int control);

#endif
