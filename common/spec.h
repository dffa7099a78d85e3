/*
 * spec.h: the pipeline spec (apiVersion genpipe/v1, kind Pipeline).
 *
 * Parsing uses libyaml's event API (never yaml_parser_load) under our own
 * limits, checked while events arrive so that hostile input stops early:
 *   document 1 MiB, nesting depth 32, 100,000 nodes, scalar 64 KiB;
 * anchors, aliases, tags and multiple documents are refused.
 * Validation collects every error it can find, each with line and column
 * (1-based) and a message naming the object and what was expected.
 * The result is a normalized JSON document (defaults filled in, durations in
 * milliseconds, keys in a fixed order, `with` keys sorted): the same content
 * written differently normalizes to the same text, whose SHA-256 is the
 * version's content hash. The format is documented in docs/pipeline-spec.md.
 *
 * Thread-safe: no global state besides the constant kind table.
 */
#ifndef GP_SPEC_H
#define GP_SPEC_H

#include <cjson/cJSON.h>
#include <stddef.h>

#include "status.h"

#define GP_SPEC_MAX_BYTES (1u << 20)
#define GP_SPEC_MAX_DEPTH 32
#define GP_SPEC_MAX_NODES 100000
#define GP_SPEC_MAX_SCALAR (64u << 10)
#define GP_SPEC_MAX_ERRORS 100

struct gp_spec_error {
	int line, col; /* 1-based; 0 when the error concerns the whole file */
	char msg[256];
};

struct gp_spec_errors {
	struct gp_spec_error v[GP_SPEC_MAX_ERRORS];
	int n;
	int truncated; /* more errors than fit */
};

/*
 * Parse and validate text (len bytes). On success *out is the normalized
 * document (caller owns; cJSON_Delete) and errs->n == 0. On GP_ERR_INVALID
 * errs holds every error found, in file order. Other statuses: GP_ERR_NOMEM.
 */
gp_status gp_spec_parse(const char *text, size_t len, cJSON **out, struct gp_spec_errors *errs);

/* Canonical text of a normalized document and its SHA-256 (hex). Caller
 * frees *text with free(). */
gp_status gp_spec_canonical(const cJSON *doc, char **text, char hash[65], struct gp_err *err);

/*
 * Apply `--param name=value` overrides to a normalized document's params:
 * the value is checked against the declared type. Returns the resolved
 * params object (every declared param; caller owns) or NULL with err set
 * ("--param steps=abc: steps is an int").
 */
cJSON *gp_spec_resolve_params(const cJSON *doc, const char *const *overrides, int n,
			      struct gp_err *err);

/*
 * Substitute ${params.x} and ${stages.s.outputs.k} in a stage's `with`
 * object. params: the run's resolved params; outputs: object of stage name ->
 * outputs object. A scalar that is exactly one reference takes the
 * referenced value's JSON type; references inside longer strings are
 * formatted as text. Caller owns the result; NULL with err on a reference
 * that cannot be resolved.
 */
cJSON *gp_spec_resolve_with(const cJSON *with, const cJSON *params, const cJSON *outputs,
			    struct gp_err *err);

/* "1h30m" -> ms. Accepts ms, s, m, h, d units, concatenated. -1 when invalid. */
long long gp_spec_parse_duration(const char *s);
/* "10Mi" / "1G" / "512k" / "123" -> bytes. -1 when invalid or overflowing. */
long long gp_spec_parse_size(const char *s);

/* 1 when name is a known stage kind. */
int gp_spec_kind_known(const char *kind);
/* 1 when the kind reads inputs from outside genpipe (files, URLs), so its
 * parameters do not determine its outputs: the orchestrator does not serve
 * it from its cache; the worker fingerprints the inputs and reuses an
 * earlier attempt itself (worker.h, gp_job_reuse_lookup). */
int gp_spec_kind_external(const char *kind);

/* Levenshtein distance, capped; used for "did you mean" (exposed for tests). */
int gp_spec_edit_distance(const char *a, const char *b);

#endif
