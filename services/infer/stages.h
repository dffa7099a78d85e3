/*
 * stages.h: the stage kinds the infer service runs beside serving.
 *
 * deploy: with.model, with.version (a train stage's model_version),
 * with.alias (default production), with.promote_if (a gate, below). The
 * alias moves to the version when the gate passes or the alias is new;
 * either way the decision, its reason and figures are recorded in
 * deploy_decisions (one per run and stage) and in the stage's outputs
 * (promoted, version, previous, reason). Registered uncached: the decision
 * depends on the registry, not only on the inputs.
 *
 * The gate on new data (with.gate: data (a dataset: the feedback and
 * drift set a retraining run ingested), margin (0.1), tolerance (0.05),
 * max_bytes (200000)): when the alias names another version, the candidate
 * must lower the loss per byte of the new data by margin relative to that
 * version, and lose at most tolerance on that version's own validation
 * text (decoded from its validation shard). Per byte, because a retrained
 * model may have its own tokenizer. Its figures go to the decision.
 *
 * Canary (with.canary: fraction (0.1), duration ("60s"), max_error_rate
 * (0.01), min_requests (1), max_latency_ratio (2.0)): when the gate passes
 * and the alias names another version, the candidate first takes fraction
 * of the alias's requests for duration (model_canaries; the serving
 * replicas hear of it through a RegistryChange); then the telemetry of the
 * window decides: promoted when it got at least min_requests, its error
 * rate (busy and bad requests aside) is at most max_error_rate and its
 * median latency a token at most max_latency_ratio times the stable
 * version's; otherwise rolled back. Streaming and plain requests are
 * routed alike (by request id, at admission). A retried stage resumes the
 * same window.
 *
 * Gates: "always", or METRIC OP NUMBER, or METRIC OP ALIAS.METRIC, where
 * METRIC is a number in the versions' metrics (val_loss, ...), OP one of
 * < <= > >=, and ALIAS the alias being moved (its current version).
 */
#ifndef GP_INFER_STAGES_H
#define GP_INFER_STAGES_H

#include "worker.h"

struct gp_gate {
	int always;
	char metric[64];
	char op[3];
	int against_alias;      /* compare with the alias's current version */
	char alias[64];
	char other_metric[64];
	double number;
};

/* Parse a promote_if expression; the message names what is wrong. */
gp_status gp_gate_parse(const char *text, struct gp_gate *g, struct gp_err *err);
/* 1 when candidate passes against reference (NAN: missing metric -> 0). */
int gp_gate_eval(const struct gp_gate *g, double candidate, double reference);

struct gp_bus;
struct gp_store;
struct gp_deploy_config {
	struct gp_bus *bus;      /* reads the telemetry stream during a canary */
	struct gp_store *store;  /* checkpoints, tokenizers and data for the gate */
};
void gp_deploy_handle(struct gp_job *job, void *closure);

/*
 * batch-infer: with.dataset (an ingest dataset manifest: each document is a
 * prompt, at most with.max_prompts), with.model and with.version (0:
 * through with.alias, default production), sampling (max_tokens,
 * temperature, top_k, top_p, seed; prompt i uses seed + i, so the output
 * is reproducible). Generates with the batching engine in this process and
 * writes a JSON-lines artifact (kind completions: index, prompt,
 * completion, output_tokens, finish or error). A prompt the model cannot
 * take (too long) is an entry with its error, not a failed stage.
 */
struct gp_batch_infer_config {
	struct gp_store *store;
	int slots;
	int use_gpu; /* the engine steps on the GPU */
};
void gp_batch_infer_handle(struct gp_job *job, void *closure);

#endif
