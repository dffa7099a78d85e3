/*
 * artifact.h: content-addressed artifacts.
 *
 * An artifact is named by the SHA-256 of its bytes; stage outputs refer to
 * it as "sha256:<64 hex>". A store is opened from a URI:
 *   file:///abs/dir  (or a plain absolute path): DIR/sha256/ab/<hex>
 * Other schemes (s3:// is planned) are refused by gp_store_open with a
 * clear error; callers use only the functions below, so a second backend
 * changes this file and artifact.c alone.
 *
 * Writes are atomic: bytes go to DIR/tmp/<random>, are fsynced, renamed
 * into place and the directory is fsynced; an object that already exists is
 * left alone (same name, same bytes). Every read verifies the hash and
 * fails with GP_ERR_INVALID on a mismatch (a corrupted or truncated file).
 * The artifacts table records kind, size, producing run and stage;
 * registering the same hash twice keeps the first row.
 */
#ifndef GP_ARTIFACT_H
#define GP_ARTIFACT_H

#include <stddef.h>
#include <stdint.h>

#include "db.h"
#include "status.h"

#define GP_ARTIFACT_REF_MAX 72 /* "sha256:" + 64 + NUL */

struct gp_store;
struct gp_store_writer;

gp_status gp_store_open(struct gp_store **out, const char *uri, struct gp_err *err);
/* uri, or file://DATA_DIR/artifacts when uri is NULL or empty. */
gp_status gp_store_open_in(struct gp_store **out, const char *uri, const char *data_dir,
			   struct gp_err *err);
void gp_store_close(struct gp_store *s);

/* Stream bytes into a new artifact; commit names it (hash: 65 bytes). */
gp_status gp_store_writer_open(struct gp_store *s, struct gp_store_writer **out,
			       struct gp_err *err);
gp_status gp_store_writer_write(struct gp_store_writer *w, const void *data, size_t len,
				struct gp_err *err);
/* Finish: w is freed whatever the result. size may be NULL. */
gp_status gp_store_writer_commit(struct gp_store_writer *w, char hash[65], size_t *size,
				 struct gp_err *err);
void gp_store_writer_abort(struct gp_store_writer *w);

/* One call: put len bytes. */
gp_status gp_store_put(struct gp_store *s, const void *data, size_t len, char hash[65],
		       struct gp_err *err);

/* Read a whole artifact (at most max_len bytes, else GP_ERR_TOO_BIG) and
 * verify its hash. *data is malloc'd. Missing: GP_ERR_NOT_FOUND. */
gp_status gp_store_get(struct gp_store *s, const char *hash, size_t max_len, uint8_t **data,
		       size_t *len, struct gp_err *err);

/* The artifact's URI (file:///...). */
void gp_store_uri(const struct gp_store *s, const char *hash, char *out, size_t len);

/* The object's path on this machine, for readers that map files in place
 * (serving). No verification: the caller checks what it maps. */
gp_status gp_store_local_path(const struct gp_store *s, const char *hash, char *out, size_t len,
			      struct gp_err *err);

/* Whether an object with this hash is present (no verification). */
int gp_store_has(struct gp_store *s, const char *hash);

/* "sha256:<hex>" -> hex (65 bytes). 0 on success, -1 when malformed. */
int gp_artifact_ref_parse(const char *ref, char hash[65]);

/*
 * Record the artifact in PostgreSQL (idempotent by hash). meta_json may be
 * NULL; run_id <= 0 and stage NULL leave them empty.
 */
gp_status gp_artifact_register(struct gp_db *db, struct gp_store *s, const char *hash,
			       const char *kind, size_t size, long long run_id, const char *stage,
			       const char *meta_json, struct gp_err *err);

#endif
