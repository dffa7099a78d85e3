/*
 * ingest.h: the `ingest` stage kind: read documents from files, URLs and
 * collected feedback into a dataset (a document file and its manifest,
 * both artifacts).
 *
 * Parameters (`with`):
 *   sources        list of: an absolute path (a directory is read
 *                  recursively; a path with * ? [ is a glob below the
 *                  directory before its first wildcard), file:///path,
 *                  http(s)://..., or feedback:MODEL
 *   include/exclude  globs for files under path sources; a pattern with a
 *                  '/' matches the path below the root, otherwise the name
 *   split          file (default: one document per file), lines,
 *                  paragraphs, or a separator: a line equal to it ends a
 *                  document (fortune files use "%")
 *   max_doc_size   documents larger than this are dropped (default 1Mi)
 *   max_total_size the whole dataset (default 1Gi); beyond it the stage fails
 *   invalid_utf8   replace (default: each invalid sequence becomes U+FFFD)
 *                  or drop (the document is dropped)
 *   allow_hosts    host names (as written in URLs) that may resolve to
 *                  loopback or private addresses
 *   timeout, connect_timeout, max_redirects   for URL sources
 *
 * Files are read only beneath the source's root, and the root itself must
 * be beneath one of the service's allowed roots (--roots). Exact duplicate
 * documents are removed by SHA-256. A run whose file sources are unchanged
 * (same paths, sizes, inodes and change times) and that has no URL source
 * reuses the previous dataset (the stage shows as cached).
 */
#ifndef GP_INGEST_H
#define GP_INGEST_H

#include <cjson/cJSON.h>

#include "artifact.h"
#include "dataset.h"
#include "utf8.h" /* gp_utf8_repair (tests of ingest's invalid_utf8 option) */
#include "worker.h"

struct gp_ingest_config {
	struct gp_store *store;
	const char *roots; /* colon-separated absolute directories */
};

void gp_ingest_handle(struct gp_job *job, void *closure);

/* What a collection produced. */
struct gp_ingest_result {
	struct gp_buf data;       /* the document file */
	long long documents, bytes, files, utf8_replaced;
	long long files_seen;     /* files matched (read or, when fingerprinting, stat'ed) */
	cJSON *dropped;           /* reason -> count */
	cJSON *sources;           /* per-source counts */
	char fingerprint[65];     /* "" when not reusable (a URL source) */
};

/*
 * The stage's work without the bus or the database: parse params, read
 * every source, build the document file. db may be NULL when no source is
 * feedback:. fingerprint_only: walk and fingerprint, read nothing.
 * progress (may be NULL) gets the number of files read so far and a message.
 */
gp_status gp_ingest_collect(const cJSON *params, const struct gp_ingest_config *cfg,
			    struct gp_db *db, int fingerprint_only,
			    void (*progress)(void *ctx, long long files_read, const char *msg),
			    void *ctx,
			    struct gp_ingest_result *res, struct gp_err *err);
void gp_ingest_result_free(struct gp_ingest_result *res);


#endif
