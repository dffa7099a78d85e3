/*
 * spec.c: pipeline spec parser and validator (see spec.h).
 *
 * Two layers. The YAML layer turns libyaml events into a small node tree
 * with positions, enforcing the limits as events arrive and stopping at the
 * first structural problem (a YAML syntax error leaves nothing to validate).
 * The spec layer walks the tree, collects every error it finds and builds
 * the normalized JSON document at the same time.
 */
#include "spec.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <yaml.h>

#include "bus.h"
#include "db.h"
#include "wire.h"

/* ------------------------------------------------------------------ */
/* YAML layer                                                          */

enum ntype { N_MAP, N_SEQ, N_SCALAR };

struct node {
	enum ntype t;
	int line, col;
	char *s;       /* scalar text, NUL-terminated */
	size_t slen;
	int plain;     /* plain (unquoted) scalar: may be null, bool or number */
	struct node **kids; /* map: key, value, key, value ...; seq: items */
	int nkids, cap;
};

static void node_free(struct node *n)
{
	if (!n)
		return;
	for (int i = 0; i < n->nkids; i++)
		node_free(n->kids[i]);
	free(n->kids);
	free(n->s);
	free(n);
}

static int node_add(struct node *parent, struct node *kid)
{
	if (parent->nkids == parent->cap) {
		int nc = parent->cap ? parent->cap * 2 : 8;
		struct node **nk = realloc(parent->kids, sizeof *nk * (size_t)nc);
		if (!nk)
			return -1;
		parent->kids = nk;
		parent->cap = nc;
	}
	parent->kids[parent->nkids++] = kid;
	return 0;
}

static void add_error(struct gp_spec_errors *errs, int line, int col, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
static void add_error(struct gp_spec_errors *errs, int line, int col, const char *fmt, ...)
{
	if (errs->n >= GP_SPEC_MAX_ERRORS) {
		errs->truncated = 1;
		return;
	}
	struct gp_spec_error *e = &errs->v[errs->n++];
	e->line = line;
	e->col = col;
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(e->msg, sizeof e->msg, fmt, ap);
	va_end(ap);
}

static int key_cmp(const void *a, const void *b)
{
	const struct node *x = *(struct node *const *)a, *y = *(struct node *const *)b;
	int c = strcmp(x->s, y->s);
	if (c)
		return c;
	return x->line != y->line ? x->line - y->line : x->col - y->col;
}

/* Report duplicate keys of every mapping (the later occurrence is the error). */
static void check_duplicates(struct node *n, struct gp_spec_errors *errs)
{
	if (n->t == N_SCALAR)
		return;
	if (n->t == N_MAP && n->nkids > 2) {
		int nk = n->nkids / 2;
		struct node **keys = malloc(sizeof *keys * (size_t)nk);
		if (keys) {
			for (int i = 0; i < nk; i++)
				keys[i] = n->kids[2 * i];
			qsort(keys, (size_t)nk, sizeof *keys, key_cmp);
			for (int i = 1; i < nk; i++)
				if (keys[i]->t == N_SCALAR && keys[i - 1]->t == N_SCALAR &&
				    !strcmp(keys[i]->s, keys[i - 1]->s))
					add_error(errs, keys[i]->line, keys[i]->col,
						  "duplicate key \"%s\" (first at line %d)",
						  keys[i]->s, keys[i - 1]->line);
			free(keys);
		}
	}
	for (int i = 0; i < n->nkids; i++)
		check_duplicates(n->kids[i], errs);
}

/* Build the tree; on failure one error is added and NULL returned. */
static struct node *yaml_tree(const char *text, size_t len, struct gp_spec_errors *errs)
{
	if (len > GP_SPEC_MAX_BYTES) {
		add_error(errs, 0, 0, "document is %zu bytes (limit %u)", len, GP_SPEC_MAX_BYTES);
		return NULL;
	}
	yaml_parser_t p;
	if (!yaml_parser_initialize(&p)) {
		add_error(errs, 0, 0, "out of memory");
		return NULL;
	}
	yaml_parser_set_input_string(&p, (const unsigned char *)text, len);
	struct node *stack[GP_SPEC_MAX_DEPTH + 1];
	int depth = 0, nodes = 0, docs = 0, done = 0;
	struct node *root = NULL;
	int failed = 0;
	while (!done && !failed) {
		yaml_event_t ev;
		if (!yaml_parser_parse(&p, &ev)) {
			add_error(errs, (int)p.problem_mark.line + 1, (int)p.problem_mark.column + 1,
				  "invalid YAML: %s%s%s", p.problem ? p.problem : "syntax error",
				  p.context ? " " : "", p.context ? p.context : "");
			failed = 1;
			break;
		}
		int line = (int)ev.start_mark.line + 1, col = (int)ev.start_mark.column + 1;
		struct node *n = NULL;
		const unsigned char *anchor = NULL, *tag = NULL;
		switch (ev.type) {
		case YAML_STREAM_END_EVENT:
			done = 1;
			break;
		case YAML_DOCUMENT_START_EVENT:
			if (++docs > 1) {
				add_error(errs, line, col, "only one YAML document is allowed");
				failed = 1;
			}
			break;
		case YAML_ALIAS_EVENT:
			add_error(errs, line, col, "aliases (*%s) are not allowed",
				  ev.data.alias.anchor ? (const char *)ev.data.alias.anchor : "");
			failed = 1;
			break;
		case YAML_SCALAR_EVENT:
			anchor = ev.data.scalar.anchor;
			tag = ev.data.scalar.tag;
			if (ev.data.scalar.length > GP_SPEC_MAX_SCALAR) {
				add_error(errs, line, col, "scalar of %zu bytes (limit %u)",
					  ev.data.scalar.length, GP_SPEC_MAX_SCALAR);
				failed = 1;
				break;
			}
			/* fallthrough */
		case YAML_SEQUENCE_START_EVENT:
		case YAML_MAPPING_START_EVENT:
			if (ev.type == YAML_SEQUENCE_START_EVENT) {
				anchor = ev.data.sequence_start.anchor;
				tag = ev.data.sequence_start.tag;
			} else if (ev.type == YAML_MAPPING_START_EVENT) {
				anchor = ev.data.mapping_start.anchor;
				tag = ev.data.mapping_start.tag;
			}
			if (anchor) {
				add_error(errs, line, col, "anchors (&%s) are not allowed",
					  (const char *)anchor);
				failed = 1;
				break;
			}
			if (tag) {
				add_error(errs, line, col, "tags (%s) are not allowed", (const char *)tag);
				failed = 1;
				break;
			}
			if (++nodes > GP_SPEC_MAX_NODES) {
				add_error(errs, line, col, "more than %d nodes", GP_SPEC_MAX_NODES);
				failed = 1;
				break;
			}
			n = calloc(1, sizeof *n);
			if (!n) {
				add_error(errs, line, col, "out of memory");
				failed = 1;
				break;
			}
			n->line = line;
			n->col = col;
			if (ev.type == YAML_SCALAR_EVENT) {
				n->t = N_SCALAR;
				n->slen = ev.data.scalar.length;
				n->s = malloc(n->slen + 1);
				if (!n->s) {
					free(n);
					add_error(errs, line, col, "out of memory");
					failed = 1;
					break;
				}
				memcpy(n->s, ev.data.scalar.value, n->slen);
				n->s[n->slen] = '\0';
				n->plain = ev.data.scalar.style == YAML_PLAIN_SCALAR_STYLE;
				if (strlen(n->s) != n->slen) {
					add_error(errs, line, col, "scalar contains a NUL character");
					node_free(n);
					failed = 1;
					break;
				}
			} else {
				n->t = ev.type == YAML_MAPPING_START_EVENT ? N_MAP : N_SEQ;
			}
			if (depth > 0 && stack[depth - 1]->t == N_MAP &&
			    stack[depth - 1]->nkids % 2 == 0 && n->t != N_SCALAR) {
				add_error(errs, line, col, "mapping keys must be scalars");
				node_free(n);
				failed = 1;
				break;
			}
			if (depth == 0) {
				root = n;
			} else if (node_add(stack[depth - 1], n) != 0) {
				node_free(n);
				add_error(errs, line, col, "out of memory");
				failed = 1;
				break;
			}
			if (n->t != N_SCALAR) {
				if (depth >= GP_SPEC_MAX_DEPTH) {
					add_error(errs, line, col, "nesting deeper than %d levels",
						  GP_SPEC_MAX_DEPTH);
					failed = 1;
					break;
				}
				stack[depth++] = n;
			} else if (depth == 0) {
				/* a lone scalar document: nothing to push */
			}
			break;
		case YAML_SEQUENCE_END_EVENT:
		case YAML_MAPPING_END_EVENT:
			if (depth > 0)
				depth--;
			break;
		default:
			break;
		}
		yaml_event_delete(&ev);
	}
	yaml_parser_delete(&p);
	if (failed) {
		node_free(root);
		return NULL;
	}
	if (!root) {
		add_error(errs, 1, 1, "empty document");
		return NULL;
	}
	check_duplicates(root, errs);
	return root;
}

/* ------------------------------------------------------------------ */
/* helpers                                                             */

int gp_spec_edit_distance(const char *a, const char *b)
{
	size_t la = strlen(a), lb = strlen(b);
	if (la > 64 || lb > 64)
		return 99;
	int row[65];
	for (size_t j = 0; j <= lb; j++)
		row[j] = (int)j;
	for (size_t i = 1; i <= la; i++) {
		int prev = row[0];
		row[0] = (int)i;
		for (size_t j = 1; j <= lb; j++) {
			int cur = row[j];
			int sub = prev + (a[i - 1] != b[j - 1]);
			int del = row[j] + 1, ins = row[j - 1] + 1;
			row[j] = sub < del ? (sub < ins ? sub : ins) : (del < ins ? del : ins);
			prev = cur;
		}
	}
	return row[lb];
}

/* " (did you mean \"x\"?)" or "" */
static void suggest(char *out, size_t len, const char *got, const char *const *cands, int n)
{
	out[0] = '\0';
	int best = 99;
	const char *pick = NULL;
	for (int i = 0; i < n; i++) {
		if (!cands[i])
			continue; /* e.g. a stage whose name was invalid */
		int d = gp_spec_edit_distance(got, cands[i]);
		if (d < best) {
			best = d;
			pick = cands[i];
		}
	}
	int len_got = (int)strlen(got);
	int lim = len_got / 3 > 1 ? len_got / 3 : 1;
	if (len_got >= 4 && lim < 2)
		lim = 2; /* one transposition ("retyr") costs two edits */
	if (pick && best <= lim)
		snprintf(out, len, " (did you mean \"%s\"?)", pick);
}

static const char *type_name(const struct node *n)
{
	return n->t == N_MAP ? "a mapping" : n->t == N_SEQ ? "a list" : "a scalar";
}

static struct node *map_get(const struct node *m, const char *key)
{
	if (!m || m->t != N_MAP)
		return NULL;
	for (int i = 0; i + 1 < m->nkids; i += 2)
		if (m->kids[i]->t == N_SCALAR && !strcmp(m->kids[i]->s, key))
			return m->kids[i + 1];
	return NULL;
}

/* Every key of m must be in allowed; each unknown one is an error. */
static void check_keys(const struct node *m, const char *const *allowed, int n, const char *ctx,
		       struct gp_spec_errors *errs)
{
	for (int i = 0; i + 1 < m->nkids; i += 2) {
		const struct node *k = m->kids[i];
		if (k->t != N_SCALAR) {
			add_error(errs, k->line, k->col, "%s: keys must be scalars", ctx);
			continue;
		}
		int ok = 0;
		for (int j = 0; j < n && !ok; j++)
			ok = !strcmp(k->s, allowed[j]);
		if (!ok) {
			char hint[96];
			suggest(hint, sizeof hint, k->s, allowed, n);
			add_error(errs, k->line, k->col, "%s: unknown key \"%s\"%s", ctx, k->s, hint);
		}
	}
}

static int is_null(const struct node *n)
{
	return n->t == N_SCALAR && n->plain &&
	       (!strcmp(n->s, "") || !strcmp(n->s, "~") || !strcasecmp(n->s, "null"));
}

static int want_map(const struct node *n, const char *ctx, struct gp_spec_errors *errs)
{
	if (n->t == N_MAP)
		return 1;
	add_error(errs, n->line, n->col, "%s must be a mapping, got %s", ctx, type_name(n));
	return 0;
}

static const char *want_string(const struct node *n, const char *ctx, struct gp_spec_errors *errs)
{
	if (n->t == N_SCALAR && !is_null(n)) {
		if (!gp_utf8_valid(n->s, n->slen)) {
			add_error(errs, n->line, n->col, "%s is not valid UTF-8", ctx);
			return NULL;
		}
		return n->s;
	}
	add_error(errs, n->line, n->col, "%s must be a string, got %s", ctx,
		  n->t == N_SCALAR ? "null" : type_name(n));
	return NULL;
}

static int parse_int(const char *s, long long *out)
{
	char *end;
	errno = 0;
	long long v = strtoll(s, &end, 10);
	if (errno || end == s || *end || !*s)
		return 0;
	*out = v;
	return 1;
}

static int want_int(const struct node *n, const char *ctx, long long lo, long long hi,
		    long long *out, struct gp_spec_errors *errs)
{
	long long v;
	if (n->t != N_SCALAR || !n->plain || !parse_int(n->s, &v)) {
		add_error(errs, n->line, n->col, "%s must be an integer, got %s%s%s", ctx,
			  n->t == N_SCALAR ? "\"" : type_name(n), n->t == N_SCALAR ? n->s : "",
			  n->t == N_SCALAR ? "\"" : "");
		return 0;
	}
	if (v < lo || v > hi) {
		add_error(errs, n->line, n->col, "%s must be between %lld and %lld, got %lld", ctx, lo,
			  hi, v);
		return 0;
	}
	*out = v;
	return 1;
}

static int parse_float(const char *s, double *out)
{
	char *end;
	errno = 0;
	double v = strtod(s, &end);
	if (errno || end == s || *end || v != v || v > 1e300 || v < -1e300)
		return 0;
	*out = v;
	return 1;
}

static int want_float(const struct node *n, const char *ctx, double *out,
		      struct gp_spec_errors *errs)
{
	if (n->t != N_SCALAR || !n->plain || !parse_float(n->s, out)) {
		add_error(errs, n->line, n->col, "%s must be a number, got %s%s%s", ctx,
			  n->t == N_SCALAR ? "\"" : type_name(n), n->t == N_SCALAR ? n->s : "",
			  n->t == N_SCALAR ? "\"" : "");
		return 0;
	}
	return 1;
}

static int parse_bool(const char *s, int *out)
{
	if (!strcasecmp(s, "true") || !strcasecmp(s, "yes") || !strcasecmp(s, "on")) {
		*out = 1;
		return 1;
	}
	if (!strcasecmp(s, "false") || !strcasecmp(s, "no") || !strcasecmp(s, "off")) {
		*out = 0;
		return 1;
	}
	return 0;
}

static int want_bool(const struct node *n, const char *ctx, int *out, struct gp_spec_errors *errs)
{
	if (n->t != N_SCALAR || !n->plain || !parse_bool(n->s, out)) {
		add_error(errs, n->line, n->col, "%s must be true or false, got %s%s%s", ctx,
			  n->t == N_SCALAR ? "\"" : type_name(n), n->t == N_SCALAR ? n->s : "",
			  n->t == N_SCALAR ? "\"" : "");
		return 0;
	}
	return 1;
}

long long gp_spec_parse_duration(const char *s)
{
	if (!s || !*s)
		return -1;
	long long total = 0;
	const char *p = s;
	while (*p) {
		if (!isdigit((unsigned char)*p))
			return -1;
		long long v = 0;
		while (isdigit((unsigned char)*p)) {
			v = v * 10 + (*p - '0');
			if (v > 1000000000LL)
				return -1;
			p++;
		}
		long long mult;
		if (!strncmp(p, "ms", 2)) {
			mult = 1;
			p += 2;
		} else if (*p == 's') {
			mult = 1000;
			p++;
		} else if (*p == 'm') {
			mult = 60000;
			p++;
		} else if (*p == 'h') {
			mult = 3600000;
			p++;
		} else if (*p == 'd') {
			mult = 86400000;
			p++;
		} else {
			return -1;
		}
		total += v * mult;
		if (total > 366LL * 86400000)
			return -1;
	}
	return total;
}

long long gp_spec_parse_size(const char *s)
{
	if (!s || !isdigit((unsigned char)*s))
		return -1;
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno)
		return -1;
	static const struct {
		const char *suf;
		unsigned long long mult;
	} units[] = {
		{ "", 1 },	     { "k", 1000ULL },	       { "K", 1000ULL },
		{ "M", 1000000ULL }, { "G", 1000000000ULL }, { "T", 1000000000000ULL },
		{ "Ki", 1ULL << 10 }, { "Mi", 1ULL << 20 },   { "Gi", 1ULL << 30 },
		{ "Ti", 1ULL << 40 }, { "B", 1 },
	};
	for (size_t i = 0; i < sizeof units / sizeof units[0]; i++) {
		if (!strcmp(end, units[i].suf)) {
			if (v > (unsigned long long)LLONG_MAX / units[i].mult)
				return -1;
			return (long long)(v * units[i].mult);
		}
	}
	return -1;
}

static int want_duration(const struct node *n, const char *ctx, long long *ms,
			 struct gp_spec_errors *errs)
{
	if (n->t == N_SCALAR && (*ms = gp_spec_parse_duration(n->s)) >= 0)
		return 1;
	add_error(errs, n->line, n->col,
		  "%s: \"%s\" is not a duration (use e.g. 500ms, 30s, 5m, 1h30m, 2d; at most 366d)",
		  ctx, n->t == N_SCALAR ? n->s : type_name(n));
	return 0;
}

static int dns_label(const char *s)
{
	return gp_bus_token_ok(s);
}

/* ------------------------------------------------------------------ */
/* kinds                                                               */

enum ftype { F_STR, F_INT, F_FLOAT, F_BOOL, F_DURATION, F_SIZE, F_LIST, F_MAP, F_ANY };

struct field {
	const char *name;
	enum ftype t;
	int required;
};

struct kind {
	const char *name;
	const struct field *fields;
	const char *const *outputs; /* NULL: any key */
	int external;               /* reads inputs from outside genpipe (see spec.h) */
};

static const struct field f_ingest[] = {
	{ "sources", F_LIST, 1 },	    { "include", F_LIST, 0 },	     { "exclude", F_LIST, 0 },
	{ "max_doc_size", F_SIZE, 0 },	    { "allow_hosts", F_LIST, 0 },    { "invalid_utf8", F_STR, 0 },
	{ "max_total_size", F_SIZE, 0 },    { "split", F_STR, 0 },	     { "timeout", F_DURATION, 0 },
	{ "connect_timeout", F_DURATION, 0 }, { "max_redirects", F_INT, 0 }, { NULL, F_ANY, 0 },
};
static const char *const o_ingest[] = { "dataset", "data", "documents", NULL };
static const struct field f_preprocess[] = {
	{ "dataset", F_STR, 0 },	{ "datasets", F_LIST, 0 },     { "vocab_size", F_INT, 0 },
	{ "min_length", F_INT, 0 },	{ "max_length", F_INT, 0 },    { "dedup_threshold", F_FLOAT, 0 },
	{ "val_fraction", F_FLOAT, 0 }, { "normalize", F_MAP, 0 },     { "seed", F_INT, 0 },
	{ "shingle", F_INT, 0 },	{ NULL, F_ANY, 0 },
};
static const char *const o_preprocess[] = { "train_shards", "val_shards", "tokenizer",
					     "histogram", "stats", "vocab_size", NULL };
static const struct field f_train[] = {
	{ "model", F_STR, 1 },	       { "train_shards", F_STR, 1 },  { "val_shards", F_STR, 1 },
	{ "tokenizer", F_STR, 1 },     { "config", F_MAP, 0 },	      { "steps", F_INT, 0 },
	{ "batch", F_INT, 0 },	       { "seq_len", F_INT, 0 },	      { "lr", F_FLOAT, 0 },
	{ "min_lr_frac", F_FLOAT, 0 }, { "warmup", F_INT, 0 },	      { "weight_decay", F_FLOAT, 0 },
	{ "beta1", F_FLOAT, 0 },       { "beta2", F_FLOAT, 0 },	      { "grad_clip", F_FLOAT, 0 },
	{ "eval_interval", F_INT, 0 }, { "eval_batches", F_INT, 0 },  { "checkpoint_interval", F_INT, 0 },
	{ "checkpoint_seconds", F_FLOAT, 0 }, { "seed", F_INT, 0 },   { "samples", F_INT, 0 },
	{ "sample_tokens", F_INT, 0 }, { "device", F_STR, 0 },	      { NULL, F_ANY, 0 },
};
static const char *const o_train[] = { "model",	    "model_version", "checkpoint", "safetensors",
				       "tokenizer", "val_loss",	     NULL };
static const struct field f_eval[] = {
	{ "model_version", F_STR, 1 }, { "data", F_STR, 0 }, { "metrics", F_LIST, 0 },
	{ NULL, F_ANY, 0 },
};
static const char *const o_eval[] = { "report", "val_loss", NULL };
static const struct field f_deploy[] = {
	{ "model", F_STR, 1 },	    { "version", F_INT, 1 }, { "alias", F_STR, 0 },
	{ "promote_if", F_STR, 0 }, { "canary", F_MAP, 0 }, { "gate", F_MAP, 0 },
	{ NULL, F_ANY, 0 },
};
static const char *const o_deploy[] = { "alias", "version", "promoted", "previous", "reason",
					NULL };
static const struct field f_monitor[] = {
	{ "model", F_STR, 1 },		      { "histogram", F_STR, 0 },
	{ "window", F_INT, 0 },		      { "window_time", F_DURATION, 0 },
	{ "psi_threshold", F_FLOAT, 0 },      { "js_threshold", F_FLOAT, 0 },
	{ "perplexity_ratio", F_FLOAT, 0 },   { "embedding_threshold", F_FLOAT, 0 },
	{ "error_rate_threshold", F_FLOAT, 0 }, { "loss_sample", F_INT, 0 },
	{ "bins", F_INT, 0 },		      { "min_alert_requests", F_INT, 0 },
	{ "webhook", F_STR, 0 },	      { NULL, F_ANY, 0 },
};
static const char *const o_monitor[] = { "model", "histogram", NULL };
static const struct field f_batch[] = {
	{ "model", F_STR, 1 },	       { "dataset", F_STR, 1 },	   { "version", F_INT, 0 },
	{ "alias", F_STR, 0 },	       { "max_tokens", F_INT, 0 }, { "temperature", F_FLOAT, 0 },
	{ "top_k", F_INT, 0 },	       { "top_p", F_FLOAT, 0 },	   { "seed", F_INT, 0 },
	{ "max_prompts", F_INT, 0 },   { NULL, F_ANY, 0 },
};
static const char *const o_batch[] = { "completions", "count", "errors", "model_version", NULL };
static const struct field f_noop[] = {
	{ "duration", F_DURATION, 0 }, { "fail_attempts", F_INT, 0 }, { "crash_attempts", F_INT, 0 },
	{ "outputs", F_MAP, 0 },       { "message", F_STR, 0 },	      { NULL, F_ANY, 0 },
};

static const struct kind kinds[] = {
	{ "ingest", f_ingest, o_ingest, 1 },	     { "preprocess", f_preprocess, o_preprocess, 0 },
	{ "train", f_train, o_train, 0 },	     { "eval", f_eval, o_eval, 0 },
	{ "deploy", f_deploy, o_deploy, 0 },	     { "monitor", f_monitor, o_monitor, 0 },
	{ "batch-infer", f_batch, o_batch, 0 },	     { "noop", f_noop, NULL, 0 },
};
#define NKINDS ((int)(sizeof kinds / sizeof kinds[0]))

static const struct kind *find_kind(const char *name)
{
	for (int i = 0; i < NKINDS; i++)
		if (!strcmp(kinds[i].name, name))
			return &kinds[i];
	return NULL;
}

int gp_spec_kind_known(const char *kind)
{
	return kind && find_kind(kind) != NULL;
}

int gp_spec_kind_external(const char *kind)
{
	const struct kind *k = kind ? find_kind(kind) : NULL;
	return k && k->external;
}

/* ------------------------------------------------------------------ */
/* YAML value -> JSON (for `with`, labels, outputs)                    */

static cJSON *to_json(const struct node *n)
{
	if (n->t == N_MAP) {
		cJSON *o = cJSON_CreateObject();
		for (int i = 0; o && i + 1 < n->nkids; i += 2) {
			cJSON *v = to_json(n->kids[i + 1]);
			if (!v) {
				cJSON_Delete(o);
				return NULL;
			}
			cJSON_AddItemToObject(o, n->kids[i]->s ? n->kids[i]->s : "", v);
		}
		return o;
	}
	if (n->t == N_SEQ) {
		cJSON *a = cJSON_CreateArray();
		for (int i = 0; a && i < n->nkids; i++) {
			cJSON *v = to_json(n->kids[i]);
			if (!v) {
				cJSON_Delete(a);
				return NULL;
			}
			cJSON_AddItemToArray(a, v);
		}
		return a;
	}
	if (n->plain) {
		long long iv;
		double dv;
		int bv;
		if (is_null(n))
			return cJSON_CreateNull();
		if (parse_bool(n->s, &bv) && (!strcasecmp(n->s, "true") || !strcasecmp(n->s, "false")))
			return cJSON_CreateBool(bv);
		if (parse_int(n->s, &iv) && iv > -(1LL << 53) && iv < (1LL << 53))
			return cJSON_CreateNumber((double)iv);
		if (parse_float(n->s, &dv))
			return cJSON_CreateNumber(dv);
	}
	return cJSON_CreateString(n->s);
}

/* ------------------------------------------------------------------ */
/* templates                                                           */

struct vctx {
	struct gp_spec_errors *errs;
	const struct node *params;  /* spec.params mapping or NULL */
	const struct node *stages;  /* spec.stages sequence */
	int nstages;
	const char **stage_names;   /* by index; NULL for invalid */
	unsigned char *ancestors;   /* nstages x nstages: [i*n+j] = j is an ancestor of i */
};

static int stage_index(const struct vctx *c, const char *name)
{
	for (int i = 0; i < c->nstages; i++)
		if (c->stage_names[i] && !strcmp(c->stage_names[i], name))
			return i;
	return -1;
}

/* Check one ${...} expression (without the braces) used by stage `self`. */
static void check_ref(const struct vctx *c, int self, const struct node *at, const char *expr)
{
	const char *stage_name = c->stage_names[self] ? c->stage_names[self] : "?";
	if (!strncmp(expr, "params.", 7)) {
		const char *p = expr + 7;
		if (!map_get(c->params, p)) {
			const char *cands[64];
			int n = 0;
			for (int i = 0; c->params && i + 1 < c->params->nkids && n < 64; i += 2)
				cands[n++] = c->params->kids[i]->s;
			char hint[96];
			suggest(hint, sizeof hint, p, cands, n);
			add_error(c->errs, at->line, at->col,
				  "stage \"%s\": ${%s} refers to unknown param \"%s\"%s", stage_name,
				  expr, p, hint);
		}
		return;
	}
	if (!strncmp(expr, "stages.", 7)) {
		char name[128], key[128];
		const char *p = expr + 7;
		const char *dot = strchr(p, '.');
		if (!dot || strncmp(dot, ".outputs.", 9) != 0 || (size_t)(dot - p) >= sizeof name ||
		    !dot[9] || strlen(dot + 9) >= sizeof key) {
			add_error(c->errs, at->line, at->col,
				  "stage \"%s\": ${%s} must look like ${stages.NAME.outputs.KEY}",
				  stage_name, expr);
			return;
		}
		memcpy(name, p, (size_t)(dot - p));
		name[dot - p] = '\0';
		snprintf(key, sizeof key, "%s", dot + 9);
		int j = stage_index(c, name);
		if (j < 0) {
			char hint[96];
			suggest(hint, sizeof hint, name, c->stage_names, c->nstages);
			add_error(c->errs, at->line, at->col,
				  "stage \"%s\": ${%s} refers to unknown stage \"%s\"%s", stage_name,
				  expr, name, hint);
			return;
		}
		if (!c->ancestors[self * c->nstages + j]) {
			add_error(c->errs, at->line, at->col,
				  "stage \"%s\" uses outputs of \"%s\" but does not need it (add it "
				  "to needs)",
				  stage_name, name);
			return;
		}
		const struct node *sk = map_get(c->stages->kids[j], "kind");
		const struct kind *k = sk && sk->t == N_SCALAR ? find_kind(sk->s) : NULL;
		if (k && k->outputs) {
			int ok = 0, n = 0;
			while (k->outputs[n])
				ok |= !strcmp(k->outputs[n++], key);
			if (!ok) {
				char hint[96];
				suggest(hint, sizeof hint, key, k->outputs, n);
				add_error(c->errs, at->line, at->col,
					  "stage \"%s\": ${%s}: stages of kind %s have no output \"%s\"%s",
					  stage_name, expr, k->name, key, hint);
			}
		}
		return;
	}
	add_error(c->errs, at->line, at->col,
		  "stage \"%s\": ${%s}: only ${params.NAME} and ${stages.NAME.outputs.KEY} may "
		  "be referenced",
		  stage_name, expr);
}

static void check_templates(const struct vctx *c, int self, const struct node *n)
{
	if (n->t != N_SCALAR) {
		for (int i = (n->t == N_MAP ? 1 : 0); i < n->nkids; i += (n->t == N_MAP ? 2 : 1))
			check_templates(c, self, n->kids[i]);
		return;
	}
	const char *p = n->s;
	while ((p = strstr(p, "${")) != NULL) {
		const char *end = strchr(p + 2, '}');
		if (!end) {
			add_error(c->errs, n->line, n->col, "unterminated \"${\" in \"%.60s\"", n->s);
			return;
		}
		char expr[300];
		size_t l = (size_t)(end - p - 2);
		if (l >= sizeof expr)
			l = sizeof expr - 1;
		memcpy(expr, p + 2, l);
		expr[l] = '\0';
		check_ref(c, self, n, expr);
		p = end + 1;
	}
}

/* ------------------------------------------------------------------ */
/* the spec                                                            */

static void check_with(const struct vctx *c, const struct kind *k, const struct node *w,
		       const char *stage_name)
{
	char ctx[160];
	snprintf(ctx, sizeof ctx, "stage \"%s\" (%s): with", stage_name, k->name);
	if (w && !want_map(w, ctx, c->errs))
		return;
	const char *names[32];
	int nf = 0;
	while (k->fields[nf].name && nf < 32) {
		names[nf] = k->fields[nf].name;
		nf++;
	}
	if (w)
		check_keys(w, names, nf, ctx, c->errs);
	for (int i = 0; i < nf; i++) {
		const struct field *f = &k->fields[i];
		const struct node *v = map_get(w, f->name);
		char fctx[200];
		snprintf(fctx, sizeof fctx, "stage \"%s\": with.%s", stage_name, f->name);
		if (!v) {
			if (f->required)
				add_error(c->errs, w ? w->line : 0, w ? w->col : 0,
					  "stage \"%s\" (%s): with.%s is required", stage_name,
					  k->name, f->name);
			continue;
		}
		/* A value that references something is checked when it is resolved. */
		if (v->t == N_SCALAR && strstr(v->s, "${"))
			continue;
		long long iv;
		double dv;
		int bv;
		switch (f->t) {
		case F_STR:
			want_string(v, fctx, c->errs);
			break;
		case F_INT:
			want_int(v, fctx, LLONG_MIN, LLONG_MAX, &iv, c->errs);
			break;
		case F_FLOAT:
			want_float(v, fctx, &dv, c->errs);
			break;
		case F_BOOL:
			want_bool(v, fctx, &bv, c->errs);
			break;
		case F_DURATION:
			want_duration(v, fctx, &iv, c->errs);
			break;
		case F_SIZE:
			if (v->t != N_SCALAR || gp_spec_parse_size(v->s) < 0)
				add_error(c->errs, v->line, v->col,
					  "%s: \"%s\" is not a size (use e.g. 512k, 10Mi, 2G)", fctx,
					  v->t == N_SCALAR ? v->s : type_name(v));
			break;
		case F_LIST:
			if (v->t != N_SEQ)
				add_error(c->errs, v->line, v->col, "%s must be a list, got %s", fctx,
					  type_name(v));
			break;
		case F_MAP:
			want_map(v, fctx, c->errs);
			break;
		case F_ANY:
			break;
		}
	}
}

/* Depth-first search for a cycle; reports the first one found. */
static int find_cycle(int u, int n, const unsigned char *adj, char *color, int *stack, int *sp,
		      int *cyc_from)
{
	color[u] = 1;
	stack[(*sp)++] = u;
	for (int v = 0; v < n; v++) {
		if (!adj[u * n + v])
			continue;
		if (color[v] == 1) {
			*cyc_from = v;
			return 1;
		}
		if (color[v] == 0 && find_cycle(v, n, adj, color, stack, sp, cyc_from))
			return 1;
	}
	color[u] = 2;
	(*sp)--;
	return 0;
}

static const char *const top_keys[] = { "apiVersion", "kind", "metadata", "spec" };
static const char *const meta_keys[] = { "name", "description", "labels" };
static const char *const spec_keys[] = { "params", "stages", "triggers", "budget",
					 "parallelism" };
static const char *const param_keys[] = { "type", "default", "description" };
static const char *const param_types[] = { "string", "int", "float", "bool" };
static const char *const stage_keys[] = { "name",      "kind",	  "needs", "with",
					  "resources", "retry",	  "timeout", "cache",
					  "description" };
static const char *const res_keys[] = { "class", "pool" };
static const char *const classes[] = { "cpu", "gpu-small", "gpu-large" };
static const char *const pools[] = { "on-demand", "spot" };
static const char *const retry_keys[] = { "limit", "backoff", "max_backoff" };
static const char *const trig_keys[] = { "name",      "on",	       "negative_rate",
					 "window",    "min_corrections", "metric",
					 "threshold", "every",	       "cooldown",
					 "max_per_day", "model" };
static const char *const trig_ons[] = { "feedback", "drift", "schedule" };
static const char *const budget_keys[] = { "max_usd", "action" };
static const char *const budget_actions[] = { "warn", "stop" };
#define N(a) ((int)(sizeof a / sizeof a[0]))

static int one_of(const struct node *n, const char *const *set, int count, const char *ctx,
		  struct gp_spec_errors *errs)
{
	const char *s = want_string(n, ctx, errs);
	if (!s)
		return -1;
	for (int i = 0; i < count; i++)
		if (!strcmp(s, set[i]))
			return i;
	char opts[200] = "";
	for (int i = 0; i < count; i++) {
		strncat(opts, i ? ", " : "", sizeof opts - strlen(opts) - 1);
		strncat(opts, set[i], sizeof opts - strlen(opts) - 1);
	}
	char hint[96];
	suggest(hint, sizeof hint, s, set, count);
	add_error(errs, n->line, n->col, "%s: \"%s\" is not one of %s%s", ctx, s, opts, hint);
	return -1;
}

static void check_param(const struct node *k, const struct node *v, cJSON *out,
			struct gp_spec_errors *errs)
{
	const char *name = k->s;
	int ok = *name && (islower((unsigned char)*name) || *name == '_');
	for (const char *p = name; ok && *p; p++)
		ok = islower((unsigned char)*p) || isdigit((unsigned char)*p) || *p == '_';
	if (!ok || strlen(name) > 63)
		add_error(errs, k->line, k->col,
			  "param name \"%s\" must be lower-case letters, digits and '_' (at most "
			  "63), starting with a letter or '_'",
			  name);
	char ctx[128];
	snprintf(ctx, sizeof ctx, "param \"%s\"", name);
	if (!want_map(v, ctx, errs))
		return;
	check_keys(v, param_keys, N(param_keys), ctx, errs);
	const struct node *t = map_get(v, "type");
	if (!t) {
		add_error(errs, v->line, v->col, "%s: type is required (string, int, float, bool)",
			  ctx);
		return;
	}
	char tctx[160];
	snprintf(tctx, sizeof tctx, "%s: type", ctx);
	int ti = one_of(t, param_types, N(param_types), tctx, errs);
	if (ti < 0)
		return;
	cJSON *p = cJSON_CreateObject();
	cJSON_AddStringToObject(p, "type", param_types[ti]);
	const struct node *d = map_get(v, "default");
	char dctx[160];
	snprintf(dctx, sizeof dctx, "%s: default", ctx);
	if (d && !is_null(d)) {
		long long iv;
		double dv;
		int bv;
		if (ti == 0) {
			const char *s = want_string(d, dctx, errs);
			if (s)
				cJSON_AddStringToObject(p, "default", s);
		} else if (ti == 1 && want_int(d, dctx, -(1LL << 53), 1LL << 53, &iv, errs)) {
			cJSON_AddNumberToObject(p, "default", (double)iv);
		} else if (ti == 2 && want_float(d, dctx, &dv, errs)) {
			cJSON_AddNumberToObject(p, "default", dv);
		} else if (ti == 3 && want_bool(d, dctx, &bv, errs)) {
			cJSON_AddBoolToObject(p, "default", bv);
		}
	}
	const struct node *desc = map_get(v, "description");
	if (desc)
		want_string(desc, ctx, errs);
	cJSON_AddItemToObject(out, name, p);
}

static void check_labels(const struct node *l, cJSON *out, struct gp_spec_errors *errs)
{
	if (!want_map(l, "metadata.labels", errs))
		return;
	for (int i = 0; i + 1 < l->nkids; i += 2) {
		const struct node *k = l->kids[i], *v = l->kids[i + 1];
		int ok = k->t == N_SCALAR && k->slen > 0 && k->slen <= 63;
		for (size_t j = 0; ok && j < k->slen; j++)
			ok = isalnum((unsigned char)k->s[j]) || strchr("-_./", k->s[j]);
		if (!ok) {
			add_error(errs, k->line, k->col,
				  "label key \"%s\" must be 1 to 63 letters, digits, '-', '_', '.', '/'",
				  k->t == N_SCALAR ? k->s : "");
			continue;
		}
		char ctx[128];
		snprintf(ctx, sizeof ctx, "label \"%s\"", k->s);
		const char *s = v->t == N_SCALAR ? v->s : want_string(v, ctx, errs);
		if (!s)
			continue;
		if (strlen(s) > 63 || !gp_utf8_valid(s, strlen(s))) {
			add_error(errs, v->line, v->col,
				  "label \"%s\": value must be valid UTF-8 of at most 63 bytes", k->s);
			continue;
		}
		cJSON_AddStringToObject(out, k->s, s);
	}
}

static void check_triggers(const struct node *t, cJSON *out, struct gp_spec_errors *errs)
{
	if (t->t != N_SEQ) {
		add_error(errs, t->line, t->col, "spec.triggers must be a list, got %s", type_name(t));
		return;
	}
	for (int i = 0; i < t->nkids; i++) {
		const struct node *tr = t->kids[i];
		char ctx[64];
		snprintf(ctx, sizeof ctx, "trigger %d", i + 1);
		if (!want_map(tr, ctx, errs))
			continue;
		check_keys(tr, trig_keys, N(trig_keys), ctx, errs);
		const struct node *on = map_get(tr, "on");
		if (!on) {
			add_error(errs, tr->line, tr->col, "%s: \"on\" is required (feedback, drift, "
				  "schedule)", ctx);
			continue;
		}
		int which = one_of(on, trig_ons, N(trig_ons), ctx, errs);
		cJSON *o = cJSON_CreateObject();
		const struct node *nm = map_get(tr, "name");
		if (nm) {
			const char *s = want_string(nm, ctx, errs);
			if (s && !dns_label(s))
				add_error(errs, nm->line, nm->col, "%s: name \"%s\" is not a DNS label",
					  ctx, s);
			if (s)
				cJSON_AddStringToObject(o, "name", s);
		}
		if (which >= 0)
			cJSON_AddStringToObject(o, "on", trig_ons[which]);
		double dv;
		long long iv;
		const struct node *v;
		if ((v = map_get(tr, "negative_rate")) && want_float(v, ctx, &dv, errs)) {
			if (dv < 0 || dv > 1)
				add_error(errs, v->line, v->col, "%s: negative_rate must be in [0, 1]",
					  ctx);
			cJSON_AddNumberToObject(o, "negative_rate", dv);
		}
		if ((v = map_get(tr, "window")) && want_int(v, ctx, 1, 1000000, &iv, errs))
			cJSON_AddNumberToObject(o, "window", (double)iv);
		if ((v = map_get(tr, "min_corrections")) && want_int(v, ctx, 1, 1000000, &iv, errs))
			cJSON_AddNumberToObject(o, "min_corrections", (double)iv);
		if ((v = map_get(tr, "metric")) && want_string(v, ctx, errs))
			cJSON_AddStringToObject(o, "metric", v->s);
		if ((v = map_get(tr, "model")) && want_string(v, ctx, errs)) {
			if (!dns_label(v->s))
				add_error(errs, v->line, v->col, "%s: model \"%s\" is not a DNS label",
					  ctx, v->s);
			cJSON_AddStringToObject(o, "model", v->s);
		}
		if ((v = map_get(tr, "threshold")) && want_float(v, ctx, &dv, errs))
			cJSON_AddNumberToObject(o, "threshold", dv);
		if ((v = map_get(tr, "every")) && want_duration(v, ctx, &iv, errs))
			cJSON_AddNumberToObject(o, "every_ms", (double)iv);
		if ((v = map_get(tr, "cooldown")) && want_duration(v, ctx, &iv, errs))
			cJSON_AddNumberToObject(o, "cooldown_ms", (double)iv);
		if ((v = map_get(tr, "max_per_day")) && want_int(v, ctx, 1, 1000, &iv, errs))
			cJSON_AddNumberToObject(o, "max_per_day", (double)iv);
		if (which == 2 && !map_get(tr, "every"))
			add_error(errs, tr->line, tr->col, "%s: a schedule trigger needs \"every\"",
				  ctx);
		cJSON_AddItemToArray(out, o);
	}
}

static cJSON *sorted_copy(const cJSON *j)
{
	if (cJSON_IsObject(j)) {
		int n = cJSON_GetArraySize(j);
		const cJSON **kids = malloc(sizeof *kids * (size_t)(n ? n : 1));
		if (!kids)
			return NULL;
		int i = 0;
		for (const cJSON *c = j->child; c; c = c->next)
			kids[i++] = c;
		/* insertion sort: objects here are small */
		for (int a = 1; a < n; a++)
			for (int b = a; b > 0 && strcmp(kids[b - 1]->string, kids[b]->string) > 0; b--) {
				const cJSON *t = kids[b];
				kids[b] = kids[b - 1];
				kids[b - 1] = t;
			}
		cJSON *o = cJSON_CreateObject();
		for (i = 0; o && i < n; i++)
			cJSON_AddItemToObject(o, kids[i]->string, sorted_copy(kids[i]));
		free(kids);
		return o;
	}
	if (cJSON_IsArray(j)) {
		cJSON *a = cJSON_CreateArray();
		for (const cJSON *c = j->child; a && c; c = c->next)
			cJSON_AddItemToArray(a, sorted_copy(c));
		return a;
	}
	return cJSON_Duplicate(j, 1);
}

static void check_stages(const struct node *st, const struct node *params, cJSON *out,
			 struct gp_spec_errors *errs)
{
	if (st->t != N_SEQ) {
		add_error(errs, st->line, st->col, "spec.stages must be a list, got %s", type_name(st));
		return;
	}
	if (st->nkids == 0) {
		add_error(errs, st->line, st->col, "spec.stages must list at least one stage");
		return;
	}
	int n = st->nkids;
	struct vctx c = { .errs = errs, .params = params, .stages = st, .nstages = n };
	c.stage_names = calloc((size_t)n, sizeof *c.stage_names);
	unsigned char *adj = calloc((size_t)n * (size_t)n, 1);
	c.ancestors = calloc((size_t)n * (size_t)n, 1);
	char *color = calloc((size_t)n, 1);
	int *stack = calloc((size_t)n + 1, sizeof *stack);
	if (!c.stage_names || !adj || !c.ancestors || !color || !stack) {
		add_error(errs, 0, 0, "out of memory");
		goto out;
	}
	/* Pass 1: names. */
	for (int i = 0; i < n; i++) {
		const struct node *s = st->kids[i];
		char ctx[48];
		snprintf(ctx, sizeof ctx, "stage %d", i + 1);
		if (!want_map(s, ctx, errs))
			continue;
		const struct node *nm = map_get(s, "name");
		if (!nm) {
			add_error(errs, s->line, s->col, "stage %d: name is required", i + 1);
			continue;
		}
		const char *name = want_string(nm, ctx, errs);
		if (!name)
			continue;
		if (!dns_label(name)) {
			add_error(errs, nm->line, nm->col,
				  "stage name \"%s\" is not a DNS label (lower-case letters, digits "
				  "and '-', at most 63, no leading or trailing '-')",
				  name);
			continue;
		}
		if (stage_index(&c, name) >= 0) {
			add_error(errs, nm->line, nm->col, "duplicate stage name \"%s\"", name);
			continue;
		}
		c.stage_names[i] = name;
	}
	/* Pass 2: needs -> adjacency (i needs j: edge i -> j). */
	for (int i = 0; i < n; i++) {
		const struct node *s = st->kids[i];
		const struct node *nd = map_get(s, "needs");
		if (!nd || !c.stage_names[i])
			continue;
		const struct node *const *items = (const struct node *const *)&nd;
		int ni = 1;
		if (nd->t == N_SEQ) {
			items = (const struct node *const *)nd->kids;
			ni = nd->nkids;
		} else if (nd->t != N_SCALAR) {
			add_error(errs, nd->line, nd->col,
				  "stage \"%s\": needs must be a stage name or a list of them",
				  c.stage_names[i]);
			continue;
		}
		for (int k = 0; k < ni; k++) {
			const struct node *it = items[k];
			if (it->t != N_SCALAR) {
				add_error(errs, it->line, it->col,
					  "stage \"%s\": needs entries must be stage names",
					  c.stage_names[i]);
				continue;
			}
			int j = stage_index(&c, it->s);
			if (j < 0) {
				char hint[96];
				suggest(hint, sizeof hint, it->s, c.stage_names, n);
				add_error(errs, it->line, it->col,
					  "stage \"%s\" needs unknown stage \"%s\"%s",
					  c.stage_names[i], it->s, hint);
				continue;
			}
			if (j == i) {
				add_error(errs, it->line, it->col, "stage \"%s\" needs itself",
					  c.stage_names[i]);
				continue;
			}
			adj[i * n + j] = 1;
		}
	}
	/* Cycles. */
	int cyclic = 0;
	for (int i = 0; i < n && !cyclic; i++) {
		int sp = 0, from = -1;
		if (color[i] == 0 && find_cycle(i, n, adj, color, stack, &sp, &from)) {
			cyclic = 1;
			char path[400] = "";
			int start = 0;
			while (start < sp && stack[start] != from)
				start++;
			for (int k = start; k < sp; k++) {
				strncat(path, c.stage_names[stack[k]], sizeof path - strlen(path) - 1);
				strncat(path, " -> ", sizeof path - strlen(path) - 1);
			}
			strncat(path, c.stage_names[from], sizeof path - strlen(path) - 1);
			const struct node *at = map_get(st->kids[from], "needs");
			add_error(errs, at ? at->line : st->line, at ? at->col : st->col,
				  "the needs form a cycle: %s", path);
		}
	}
	/* Ancestors: transitive closure of needs (n is small: at most a few thousand). */
	if (!cyclic) {
		memcpy(c.ancestors, adj, (size_t)n * (size_t)n);
		for (int k = 0; k < n; k++)
			for (int i = 0; i < n; i++)
				if (c.ancestors[i * n + k])
					for (int j = 0; j < n; j++)
						c.ancestors[i * n + j] |= c.ancestors[k * n + j];
	}
	/* Pass 3: everything else, building the normalized stages. */
	for (int i = 0; i < n; i++) {
		const struct node *s = st->kids[i];
		if (s->t != N_MAP)
			continue;
		const char *name = c.stage_names[i] ? c.stage_names[i] : "?";
		char ctx[128];
		snprintf(ctx, sizeof ctx, "stage \"%s\"", name);
		check_keys(s, stage_keys, N(stage_keys), ctx, errs);
		cJSON *o = cJSON_CreateObject();
		cJSON_AddStringToObject(o, "name", name);
		const struct node *kn = map_get(s, "kind");
		const struct kind *k = NULL;
		if (!kn) {
			add_error(errs, s->line, s->col, "%s: kind is required", ctx);
		} else if (want_string(kn, ctx, errs)) {
			k = find_kind(kn->s);
			if (!k) {
				const char *names[NKINDS];
				for (int q = 0; q < NKINDS; q++)
					names[q] = kinds[q].name;
				char hint[96];
				suggest(hint, sizeof hint, kn->s, names, NKINDS);
				add_error(errs, kn->line, kn->col, "%s: unknown stage kind \"%s\"%s",
					  ctx, kn->s, hint);
			} else {
				cJSON_AddStringToObject(o, "kind", k->name);
			}
		}
		cJSON *needs = cJSON_CreateArray();
		for (int j = 0; j < n; j++)
			if (adj[i * n + j])
				cJSON_AddItemToArray(needs, cJSON_CreateString(c.stage_names[j]));
		cJSON_AddItemToObject(o, "needs", needs);
		const struct node *w = map_get(s, "with");
		if (k)
			check_with(&c, k, w, name);
		if (w && w->t == N_MAP) {
			if (!cyclic)
				check_templates(&c, i, w);
			cJSON *wj = to_json(w);
			cJSON *ws = sorted_copy(wj);
			cJSON_Delete(wj);
			cJSON_AddItemToObject(o, "with", ws ? ws : cJSON_CreateObject());
		} else {
			cJSON_AddItemToObject(o, "with", cJSON_CreateObject());
		}
		/* resources */
		const char *cls = "cpu", *pool = "on-demand";
		const struct node *r = map_get(s, "resources");
		if (r && want_map(r, ctx, errs)) {
			char rctx[160];
			snprintf(rctx, sizeof rctx, "%s: resources", ctx);
			check_keys(r, res_keys, N(res_keys), rctx, errs);
			const struct node *v;
			int q;
			if ((v = map_get(r, "class")) &&
			    (q = one_of(v, classes, N(classes), rctx, errs)) >= 0)
				cls = classes[q];
			if ((v = map_get(r, "pool")) && (q = one_of(v, pools, N(pools), rctx, errs)) >= 0)
				pool = pools[q];
		}
		cJSON *res = cJSON_CreateObject();
		cJSON_AddStringToObject(res, "class", cls);
		cJSON_AddStringToObject(res, "pool", pool);
		cJSON_AddItemToObject(o, "resources", res);
		/* retry */
		long long limit = 2, backoff = 1000, maxb = 60000, iv;
		const struct node *rt = map_get(s, "retry");
		if (rt && want_map(rt, ctx, errs)) {
			char rctx[160];
			snprintf(rctx, sizeof rctx, "%s: retry", ctx);
			check_keys(rt, retry_keys, N(retry_keys), rctx, errs);
			const struct node *v;
			snprintf(rctx, sizeof rctx, "%s: retry.limit", ctx);
			if ((v = map_get(rt, "limit")) && want_int(v, rctx, 0, 100, &iv, errs))
				limit = iv;
			snprintf(rctx, sizeof rctx, "%s: retry.backoff", ctx);
			if ((v = map_get(rt, "backoff")) && want_duration(v, rctx, &iv, errs))
				backoff = iv;
			snprintf(rctx, sizeof rctx, "%s: retry.max_backoff", ctx);
			if ((v = map_get(rt, "max_backoff")) && want_duration(v, rctx, &iv, errs))
				maxb = iv;
			if (maxb < backoff)
				add_error(errs, rt->line, rt->col,
					  "%s: retry.max_backoff is shorter than retry.backoff", ctx);
		}
		cJSON *rj = cJSON_CreateObject();
		cJSON_AddNumberToObject(rj, "limit", (double)limit);
		cJSON_AddNumberToObject(rj, "backoff_ms", (double)backoff);
		cJSON_AddNumberToObject(rj, "max_backoff_ms", (double)maxb);
		cJSON_AddItemToObject(o, "retry", rj);
		long long timeout = 24LL * 3600 * 1000;
		const struct node *to = map_get(s, "timeout");
		char tctx[160];
		snprintf(tctx, sizeof tctx, "%s: timeout", ctx);
		if (to && want_duration(to, tctx, &iv, errs)) {
			if (iv < 100)
				add_error(errs, to->line, to->col, "%s must be at least 100ms", tctx);
			else
				timeout = iv;
		}
		cJSON_AddNumberToObject(o, "timeout_ms", (double)timeout);
		int cache = 1;
		const struct node *ca = map_get(s, "cache");
		snprintf(tctx, sizeof tctx, "%s: cache", ctx);
		if (ca)
			want_bool(ca, tctx, &cache, errs);
		cJSON_AddBoolToObject(o, "cache", cache);
		const struct node *de = map_get(s, "description");
		if (de && want_string(de, ctx, errs))
			cJSON_AddStringToObject(o, "description", de->s);
		cJSON_AddItemToArray(out, o);
	}
out:
	free(c.stage_names);
	free(adj);
	free(c.ancestors);
	free(color);
	free(stack);
}

static cJSON *validate(const struct node *root, struct gp_spec_errors *errs)
{
	cJSON *doc = cJSON_CreateObject();
	if (!doc)
		return NULL;
	if (!want_map(root, "the document", errs))
		return doc;
	check_keys(root, top_keys, N(top_keys), "top level", errs);
	const struct node *v = map_get(root, "apiVersion");
	if (!v)
		add_error(errs, root->line, root->col, "apiVersion is required (genpipe/v1)");
	else if (want_string(v, "apiVersion", errs) && strcmp(v->s, "genpipe/v1") != 0)
		add_error(errs, v->line, v->col, "apiVersion \"%s\" is not supported (expected "
			  "genpipe/v1)", v->s);
	v = map_get(root, "kind");
	if (!v)
		add_error(errs, root->line, root->col, "kind is required (Pipeline)");
	else if (want_string(v, "kind", errs) && strcmp(v->s, "Pipeline") != 0)
		add_error(errs, v->line, v->col, "kind \"%s\" is not supported (expected Pipeline)",
			  v->s);
	cJSON_AddStringToObject(doc, "apiVersion", "genpipe/v1");
	cJSON_AddStringToObject(doc, "kind", "Pipeline");

	cJSON *meta = cJSON_CreateObject();
	cJSON_AddItemToObject(doc, "metadata", meta);
	const struct node *m = map_get(root, "metadata");
	if (!m) {
		add_error(errs, root->line, root->col, "metadata is required (with a name)");
	} else if (want_map(m, "metadata", errs)) {
		check_keys(m, meta_keys, N(meta_keys), "metadata", errs);
		const struct node *nm = map_get(m, "name");
		if (!nm) {
			add_error(errs, m->line, m->col, "metadata.name is required");
		} else if (want_string(nm, "metadata.name", errs)) {
			if (!dns_label(nm->s))
				add_error(errs, nm->line, nm->col,
					  "pipeline name \"%s\" is not a DNS label (lower-case "
					  "letters, digits and '-', at most 63, no leading or "
					  "trailing '-')",
					  nm->s);
			cJSON_AddStringToObject(meta, "name", nm->s);
		}
		const struct node *d = map_get(m, "description");
		if (d && want_string(d, "metadata.description", errs))
			cJSON_AddStringToObject(meta, "description", d->s);
		cJSON *labels = cJSON_CreateObject();
		const struct node *l = map_get(m, "labels");
		if (l)
			check_labels(l, labels, errs);
		cJSON *sl = sorted_copy(labels);
		cJSON_Delete(labels);
		cJSON_AddItemToObject(meta, "labels", sl ? sl : cJSON_CreateObject());
	}

	cJSON *spec = cJSON_CreateObject();
	cJSON_AddItemToObject(doc, "spec", spec);
	const struct node *s = map_get(root, "spec");
	if (!s) {
		add_error(errs, root->line, root->col, "spec is required (with stages)");
		return doc;
	}
	if (!want_map(s, "spec", errs))
		return doc;
	check_keys(s, spec_keys, N(spec_keys), "spec", errs);
	cJSON *params = cJSON_CreateObject();
	const struct node *p = map_get(s, "params");
	if (p && want_map(p, "spec.params", errs))
		for (int i = 0; i + 1 < p->nkids; i += 2)
			if (p->kids[i]->t == N_SCALAR)
				check_param(p->kids[i], p->kids[i + 1], params, errs);
	cJSON *sp = sorted_copy(params);
	cJSON_Delete(params);
	cJSON_AddItemToObject(spec, "params", sp ? sp : cJSON_CreateObject());
	cJSON *stages = cJSON_CreateArray();
	cJSON_AddItemToObject(spec, "stages", stages);
	const struct node *st = map_get(s, "stages");
	if (!st)
		add_error(errs, s->line, s->col, "spec.stages is required");
	else
		check_stages(st, p && p->t == N_MAP ? p : NULL, stages, errs);
	/* At most this many stages of a run dispatched and not finished (0: no cap). */
	long long par = 0;
	const struct node *pn = map_get(s, "parallelism");
	if (pn)
		want_int(pn, "spec.parallelism", 1, 100000, &par, errs);
	cJSON_AddNumberToObject(spec, "parallelism", (double)par);
	cJSON *trig = cJSON_CreateArray();
	cJSON_AddItemToObject(spec, "triggers", trig);
	const struct node *t = map_get(s, "triggers");
	if (t)
		check_triggers(t, trig, errs);
	const struct node *b = map_get(s, "budget");
	if (b && want_map(b, "spec.budget", errs)) {
		check_keys(b, budget_keys, N(budget_keys), "spec.budget", errs);
		cJSON *bj = cJSON_CreateObject();
		double dv;
		const struct node *x;
		if ((x = map_get(b, "max_usd")) && want_float(x, "spec.budget.max_usd", &dv, errs)) {
			if (dv < 0)
				add_error(errs, x->line, x->col, "spec.budget.max_usd must be >= 0");
			cJSON_AddNumberToObject(bj, "max_usd", dv);
		}
		int q;
		if ((x = map_get(b, "action")) &&
		    (q = one_of(x, budget_actions, N(budget_actions), "spec.budget.action", errs)) >= 0)
			cJSON_AddStringToObject(bj, "action", budget_actions[q]);
		else
			cJSON_AddStringToObject(bj, "action", "warn");
		cJSON_AddItemToObject(spec, "budget", bj);
	}
	return doc;
}

static int err_cmp(const void *a, const void *b)
{
	const struct gp_spec_error *x = a, *y = b;
	if (x->line != y->line)
		return x->line - y->line;
	return x->col - y->col;
}

gp_status gp_spec_parse(const char *text, size_t len, cJSON **out, struct gp_spec_errors *errs)
{
	memset(errs, 0, sizeof *errs);
	struct node *root = yaml_tree(text, len, errs);
	if (!root)
		return GP_ERR_INVALID;
	cJSON *doc = validate(root, errs);
	node_free(root);
	if (!doc)
		return GP_ERR_NOMEM;
	if (errs->n) {
		cJSON_Delete(doc);
		/* stable sort by position keeps same-place errors in discovery order */
		for (int i = 1; i < errs->n; i++)
			for (int j = i; j > 0 && err_cmp(&errs->v[j - 1], &errs->v[j]) > 0; j--) {
				struct gp_spec_error t = errs->v[j];
				errs->v[j] = errs->v[j - 1];
				errs->v[j - 1] = t;
			}
		return GP_ERR_INVALID;
	}
	*out = doc;
	return GP_OK;
}

gp_status gp_spec_canonical(const cJSON *doc, char **text, char hash[65], struct gp_err *err)
{
	char *s = cJSON_PrintUnformatted(doc);
	if (!s)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	gp_sha256_hex(s, strlen(s), hash);
	*text = s;
	return GP_OK;
}

/* ------------------------------------------------------------------ */
/* params and templates at run time                                    */

cJSON *gp_spec_resolve_params(const cJSON *doc, const char *const *overrides, int n,
			      struct gp_err *err)
{
	const cJSON *decl = cJSON_GetObjectItemCaseSensitive(
		cJSON_GetObjectItemCaseSensitive(doc, "spec"), "params");
	cJSON *out = cJSON_CreateObject();
	if (!out) {
		gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		return NULL;
	}
	const cJSON *p;
	cJSON_ArrayForEach(p, decl)
	{
		const cJSON *d = cJSON_GetObjectItemCaseSensitive(p, "default");
		if (d)
			cJSON_AddItemToObject(out, p->string, cJSON_Duplicate(d, 1));
	}
	for (int i = 0; i < n; i++) {
		const char *eq = strchr(overrides[i], '=');
		if (!eq || eq == overrides[i]) {
			gp_err_set(err, GP_ERR_INVALID, "--param %s: expected NAME=VALUE", overrides[i]);
			goto fail;
		}
		char name[128];
		snprintf(name, sizeof name, "%.*s", (int)(eq - overrides[i]), overrides[i]);
		const char *val = eq + 1;
		const cJSON *dp = cJSON_GetObjectItemCaseSensitive(decl, name);
		if (!dp) {
			gp_err_set(err, GP_ERR_INVALID, "--param %s: the pipeline has no param \"%s\"",
				   overrides[i], name);
			goto fail;
		}
		const char *type = cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(dp, "type"));
		cJSON *v = NULL;
		long long iv;
		double dv;
		int bv;
		if (!strcmp(type, "string"))
			v = cJSON_CreateString(val);
		else if (!strcmp(type, "int") && parse_int(val, &iv))
			v = cJSON_CreateNumber((double)iv);
		else if (!strcmp(type, "float") && parse_float(val, &dv))
			v = cJSON_CreateNumber(dv);
		else if (!strcmp(type, "bool") && parse_bool(val, &bv))
			v = cJSON_CreateBool(bv);
		if (!v) {
			gp_err_set(err, GP_ERR_INVALID, "--param %s: %s is %s %s", overrides[i], name,
				   strcmp(type, "int") ? "a" : "an", type);
			goto fail;
		}
		cJSON_DeleteItemFromObjectCaseSensitive(out, name);
		cJSON_AddItemToObject(out, name, v);
	}
	cJSON_ArrayForEach(p, decl)
	{
		if (!cJSON_GetObjectItemCaseSensitive(out, p->string)) {
			gp_err_set(err, GP_ERR_INVALID, "param \"%s\" has no default: pass --param "
				   "%s=VALUE",
				   p->string, p->string);
			goto fail;
		}
	}
	return out;
fail:
	cJSON_Delete(out);
	return NULL;
}

static const cJSON *lookup_ref(const char *expr, const cJSON *params, const cJSON *outputs)
{
	if (!strncmp(expr, "params.", 7))
		return cJSON_GetObjectItemCaseSensitive(params, expr + 7);
	if (!strncmp(expr, "stages.", 7)) {
		const char *p = expr + 7, *dot = strstr(p, ".outputs.");
		if (!dot)
			return NULL;
		char name[128];
		snprintf(name, sizeof name, "%.*s", (int)(dot - p), p);
		return cJSON_GetObjectItemCaseSensitive(
			cJSON_GetObjectItemCaseSensitive(outputs, name), dot + 9);
	}
	return NULL;
}

/* A growing string for template expansion; failed is set once out of memory. */
struct sbuf {
	char *p;
	size_t len, cap;
	int failed;
};

static void sbuf_add(struct sbuf *b, const char *s, size_t n)
{
	if (b->failed)
		return;
	if (b->len + n + 1 > b->cap) {
		size_t cap = b->cap ? b->cap : 64;
		while (b->len + n + 1 > cap)
			cap *= 2;
		char *np = realloc(b->p, cap);
		if (!np) {
			b->failed = 1;
			return;
		}
		b->p = np;
		b->cap = cap;
	}
	memcpy(b->p + b->len, s, n);
	b->len += n;
	b->p[b->len] = '\0';
}

static cJSON *resolve_value(const cJSON *v, const cJSON *params, const cJSON *outputs,
			    struct gp_err *err)
{
	if (cJSON_IsString(v) && strstr(v->valuestring, "${")) {
		const char *s = v->valuestring;
		size_t sl = strlen(s);
		/* exactly one reference: keep the referenced value's type */
		if (s[0] == '$' && s[1] == '{' && s[sl - 1] == '}' && !strchr(s + 2, '$') &&
		    strchr(s, '}') == s + sl - 1) {
			char expr[300];
			snprintf(expr, sizeof expr, "%.*s", (int)(sl - 3), s + 2);
			const cJSON *r = lookup_ref(expr, params, outputs);
			if (!r) {
				gp_err_set(err, GP_ERR_INVALID, "cannot resolve ${%s}", expr);
				return NULL;
			}
			return cJSON_Duplicate(r, 1);
		}
		/* references inside text: strings as they are, other values as JSON */
		struct sbuf b = { 0 };
		const char *p = s, *ref;
		while ((ref = strstr(p, "${")) != NULL) {
			const char *end = strchr(ref, '}');
			if (!end) {
				free(b.p);
				gp_err_set(err, GP_ERR_INVALID, "unterminated ${ in \"%.60s\"", s);
				return NULL;
			}
			char expr[300];
			snprintf(expr, sizeof expr, "%.*s", (int)(end - ref - 2), ref + 2);
			const cJSON *r = lookup_ref(expr, params, outputs);
			if (!r) {
				free(b.p);
				gp_err_set(err, GP_ERR_INVALID, "cannot resolve ${%s}", expr);
				return NULL;
			}
			sbuf_add(&b, p, (size_t)(ref - p));
			if (cJSON_IsString(r)) {
				sbuf_add(&b, r->valuestring, strlen(r->valuestring));
			} else {
				char *t = cJSON_PrintUnformatted(r);
				if (t)
					sbuf_add(&b, t, strlen(t));
				else
					b.failed = 1;
				free(t);
			}
			p = end + 1;
		}
		sbuf_add(&b, p, strlen(p));
		cJSON *o = b.failed ? NULL : cJSON_CreateString(b.p);
		free(b.p);
		if (!o)
			gp_err_set(err, GP_ERR_NOMEM, "out of memory expanding \"%.60s\"", s);
		return o;
	}
	if (cJSON_IsObject(v) || cJSON_IsArray(v)) {
		cJSON *o = cJSON_IsObject(v) ? cJSON_CreateObject() : cJSON_CreateArray();
		const cJSON *c;
		cJSON_ArrayForEach(c, v)
		{
			cJSON *r = resolve_value(c, params, outputs, err);
			if (!r) {
				cJSON_Delete(o);
				return NULL;
			}
			if (cJSON_IsObject(v))
				cJSON_AddItemToObject(o, c->string, r);
			else
				cJSON_AddItemToArray(o, r);
		}
		return o;
	}
	return cJSON_Duplicate(v, 1);
}

cJSON *gp_spec_resolve_with(const cJSON *with, const cJSON *params, const cJSON *outputs,
			    struct gp_err *err)
{
	return resolve_value(with, params, outputs, err);
}
