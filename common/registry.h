/*
 * registry.h: the model registry operations more than one process does:
 * moving an alias (the CLI, the deploy stage) and resolving a model
 * reference to a servable version (the infer service).
 *
 * An alias move is one transaction: the model_aliases row, an audit_log
 * row (action model.alias, detail {from, to, ...}) and a RegistryChange
 * message in the outbox for genpipe.registry.<model>, so that serving
 * replicas hear of it exactly when it is committed.
 */
#ifndef GP_REGISTRY_H
#define GP_REGISTRY_H

#include "db.h"
#include "status.h"

/*
 * Point model's alias at version. actor names who did it in the audit
 * log; extra_json (may be NULL) is merged into the audit detail. *from
 * (may be NULL) gets the version it named before, 0 when it is new.
 * GP_ERR_NOT_FOUND with a message when the model or version is missing.
 * Must not run inside the caller's transaction.
 */
gp_status gp_registry_move_alias(struct gp_db *db, const char *model, const char *alias,
				 long long version, const char *actor, const char *extra_json,
				 long long *from, struct gp_err *err);

/* What a server needs to load one version. */
struct gp_model_ref {
	long long version;
	long long version_id;
	char checkpoint[65];   /* artifact hash of the checkpoint */
	char tokenizer[65];    /* artifact hash of the tokenizer */
	double val_loss;       /* NAN when not recorded */
	long long canary_version;  /* through an alias with a canary: its version, else 0 */
	double canary_fraction;
};

/*
 * Resolve model at version (> 0) or through alias (version 0).
 * GP_ERR_NOT_FOUND naming what is missing (model, version or alias).
 */
gp_status gp_registry_resolve(struct gp_db *db, const char *model, const char *alias,
			      long long version, struct gp_model_ref *out, struct gp_err *err);

struct gp_store;
struct gp_model;
struct gp_bpe;
/*
 * Open what ref names from the artifact store: the checkpoint, mapped in
 * place (gp_ckpt_map), and the tokenizer when tok is not NULL. Messages
 * name the model and version. On failure nothing is handed out.
 */
gp_status gp_registry_load(struct gp_store *store, const char *model,
			   const struct gp_model_ref *ref, struct gp_model **m, struct gp_bpe **tok,
			   struct gp_err *err);

/*
 * A model's mean loss on text in nats per byte (not per token, so that
 * versions with different tokenizers compare), over windows of its
 * context. NAN when the text is under two tokens or a forward pass fails
 * (err says which).
 */
double gp_text_nats_per_byte(struct gp_model *m, struct gp_bpe *tok, const char *text,
			     size_t len, struct gp_err *err);

/*
 * Send fraction (0 < f < 1) of alias's requests to version as a canary, for
 * the deploy stage (run_id, stage) that watches it; replaces any canary of
 * that alias. *started_ms (may be NULL) gets when the canary began (kept
 * when the same run and stage set it again, so a retried stage resumes its
 * window). Clearing removes it (no row: nothing happens). Each change is
 * one transaction with an audit row (model.canary) and a RegistryChange.
 */
gp_status gp_registry_set_canary(struct gp_db *db, const char *model, const char *alias,
				 long long version, double fraction, long long run_id,
				 const char *stage, long long *started_ms, struct gp_err *err);
gp_status gp_registry_clear_canary(struct gp_db *db, const char *model, const char *alias,
				   const char *why, struct gp_err *err);

#endif
