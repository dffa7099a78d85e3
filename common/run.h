/*
 * run.h: pipeline versions and runs in PostgreSQL, shared by the CLI, the
 * orchestrator and (later) the gateway.
 *
 * Versions are immutable: submitting content whose normalized form equals an
 * existing version of that pipeline returns that version; anything else is
 * version N+1 (serialized per pipeline by a row lock). A run pins one
 * version and its resolved params; its stages start 'pending' and the
 * orchestrator's engine (services/orchestrator) moves them on.
 *
 * Every function takes a connection it uses for the call only.
 */
#ifndef GP_RUN_H
#define GP_RUN_H

#include <cjson/cJSON.h>

#include "db.h"

struct gp_version_ref {
	long long id;      /* pipeline_versions.id */
	int version;       /* 1, 2, ... */
	int created;       /* 1 when this call made a new version */
	char hash[65];
};

/*
 * Store a parsed spec (doc from gp_spec_parse; text is the file as written).
 * Writes an audit_log row when a version is created.
 */
gp_status gp_pipeline_submit(struct gp_db *db, const char *text, const cJSON *doc,
			     const char *author, struct gp_version_ref *out, struct gp_err *err);

/*
 * Create a run of version pv_id with resolved params (an object; borrowed).
 * Inserts the run and its pending stages and wakes the orchestrators.
 */
gp_status gp_run_create(struct gp_db *db, long long pv_id, const cJSON *params,
			const char *trigger, long long *run_id, struct gp_err *err);
/* The same inside the caller's open transaction. */
gp_status gp_run_insert(struct gp_db *db, long long pv_id, const cJSON *params,
			const char *trigger, long long *run_id, struct gp_err *err);

/*
 * Cancel a run that has not finished: queued and running attempts become
 * 'cancelled' (their workers' leases stop extending, their results are
 * refused), unfinished stages 'cancelled'. GP_ERR_CONFLICT when finished.
 */
gp_status gp_run_cancel(struct gp_db *db, long long run_id, struct gp_err *err);

/*
 * Resume a failed or cancelled run: stages that did not succeed go back to
 * pending with a fresh retry budget; succeeded and cached stages are kept.
 * GP_ERR_CONFLICT when the run is not failed or cancelled.
 */
gp_status gp_run_retry(struct gp_db *db, long long run_id, struct gp_err *err);

/*
 * Look up NAME or NAME@VERSION. *spec (may be NULL) gets the normalized
 * document (caller owns). GP_ERR_NOT_FOUND names what is missing.
 */
gp_status gp_pipeline_find(struct gp_db *db, const char *ref, struct gp_version_ref *out,
			   cJSON **spec, struct gp_err *err);

#endif
