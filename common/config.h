/*
 * config.h: flags over GENPIPE_* environment variables over defaults.
 *
 * A binary declares its options in one table; gp_config_parse() fills the
 * destinations from the default, then the environment variable, then the
 * flag (`--name value` or `--name=value`), and answers `--help` with a
 * generated usage text. Strings stored in destinations are borrowed from
 * argv, environ or the table's literals: valid for the life of the process.
 */
#ifndef GP_CONFIG_H
#define GP_CONFIG_H

#include <stdio.h>

#include "status.h"

enum gp_opt_type { GP_OPT_STR, GP_OPT_INT, GP_OPT_BOOL, GP_OPT_LIST };

/* Destination of a GP_OPT_LIST option: every occurrence of the flag, in
 * order (borrowed from argv; the array is the caller's to free()). */
struct gp_opt_list {
	const char **v;
	int n;
};

struct gp_opt {
	const char *name;      /* flag without "--" */
	const char *env;       /* GENPIPE_... or NULL */
	enum gp_opt_type type;
	const char *def;       /* default as text, or NULL */
	const char *help;
	void *dst;             /* const char **, long long *, int *, struct gp_opt_list * */
};

/*
 * Parse argv[1..] against opts. Positional arguments (and everything after
 * "--") are left in order at argv[*first_pos .. argc). On `--help` the usage
 * is printed to `out` and *help_shown is set; the caller exits 0.
 * Errors: GP_ERR_INVALID for unknown flags, missing values, bad integers or
 * booleans, naming the flag or variable.
 */
gp_status gp_config_parse(const struct gp_opt *opts, int nopts, int argc, char **argv,
			  const char *usage, FILE *out, int *first_pos, int *help_shown,
			  struct gp_err *err);

/* Print the option table (used by --help). */
void gp_config_usage(const struct gp_opt *opts, int nopts, const char *usage, FILE *out);

#endif
