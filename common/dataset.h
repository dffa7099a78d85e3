/*
 * dataset.h: the document file ingest writes and preprocess reads, and the
 * manifest that describes it (formats documented in docs/formats.md).
 *
 * Document file (an artifact):
 *   "GPDS" version(u32 = 1)
 *   records: source_len(u32 <= 4096) source, sha256(32 bytes) of the text,
 *            text_len(u64 <= GP_DATASET_MAX_DOC) text
 *   trailer: "GPDE" count(u64)
 * integers little-endian. The reader checks every length against what is
 * left, every document's hash, and that the trailer's count matches.
 *
 * Manifest (an artifact, JSON; what a stage output `dataset` names):
 *   {"format": "genpipe-dataset/1", "data": "sha256:<hex>",
 *    "documents": N, "bytes": B, "dropped": {"reason": n, ...},
 *    "utf8_replaced": n, "sources": [{"source": s, "documents": n, "bytes": b}]}
 */
#ifndef GP_DATASET_H
#define GP_DATASET_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

#define GP_DATASET_MAX_DOC ((uint64_t)256 << 20)
#define GP_DATASET_MAX_SOURCE 4096
#define GP_MANIFEST_MAX ((size_t)16 << 20)

struct gp_doc {
	const char *source; /* not NUL-terminated */
	size_t source_len;
	const uint8_t *sha256; /* 32 bytes */
	const uint8_t *text;
	size_t len;
};

/* Encoders append to a growing buffer. */
struct gp_buf {
	uint8_t *p;
	size_t len, cap;
};
gp_status gp_buf_append(struct gp_buf *b, const void *data, size_t len, struct gp_err *err);

void gp_dataset_header(uint8_t out[8]);
/* One record's bytes (source, sha, text) appended to b. */
gp_status gp_dataset_record(struct gp_buf *b, const char *source, const uint8_t sha[32],
			    const void *text, size_t len, struct gp_err *err);
void gp_dataset_trailer(uint64_t count, uint8_t out[12]);

/* Read records from a whole document file. */
struct gp_dataset_reader {
	const uint8_t *p;
	size_t len, off;
	uint64_t count, seen;
};
gp_status gp_dataset_open(struct gp_dataset_reader *r, const uint8_t *data, size_t len,
			  struct gp_err *err);
/* 1: *doc filled; 0: end (trailer checked); <0 never: errors are statuses. */
gp_status gp_dataset_next(struct gp_dataset_reader *r, struct gp_doc *doc, int *more,
			  struct gp_err *err);

struct gp_manifest {
	char data[65];      /* hex hash of the document file */
	long long documents;
	long long bytes;
	char *dropped_json; /* malloc'd {"reason": n} */
	long long utf8_replaced;
};
gp_status gp_manifest_parse(const char *text, size_t len, struct gp_manifest *m,
			    struct gp_err *err);
void gp_manifest_free(struct gp_manifest *m);

#endif
