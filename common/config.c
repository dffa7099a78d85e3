/*
 * config.c: option tables. Values are applied in order default, environment,
 * flag, so the last source wins; each source is validated on its own so an
 * error names where the bad value came from.
 */
#include "config.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

static gp_status set_value(const struct gp_opt *o, const char *v, const char *src, struct gp_err *err)
{
	switch (o->type) {
	case GP_OPT_STR:
		*(const char **)o->dst = v;
		return GP_OK;
	case GP_OPT_INT: {
		char *end;
		errno = 0;
		long long x = strtoll(v, &end, 10);
		if (errno || end == v || *end)
			return gp_err_set(err, GP_ERR_INVALID, "%s: invalid integer \"%s\" for --%s",
					  src, v, o->name);
		*(long long *)o->dst = x;
		return GP_OK;
	}
	case GP_OPT_LIST: {
		struct gp_opt_list *l = o->dst;
		const char **nv = realloc(l->v, sizeof *nv * (size_t)(l->n + 1));
		if (!nv)
			return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		nv[l->n++] = v;
		l->v = nv;
		return GP_OK;
	}
	case GP_OPT_BOOL:
		if (!strcasecmp(v, "1") || !strcasecmp(v, "true") || !strcasecmp(v, "yes") ||
		    !strcasecmp(v, "on"))
			*(int *)o->dst = 1;
		else if (!strcasecmp(v, "0") || !strcasecmp(v, "false") || !strcasecmp(v, "no") ||
			 !strcasecmp(v, "off"))
			*(int *)o->dst = 0;
		else
			return gp_err_set(err, GP_ERR_INVALID, "%s: invalid boolean \"%s\" for --%s",
					  src, v, o->name);
		return GP_OK;
	}
	return GP_ERR_INTERNAL;
}

void gp_config_usage(const struct gp_opt *opts, int nopts, const char *usage, FILE *out)
{
	fprintf(out, "usage: %s\n\noptions:\n", usage);
	for (int i = 0; i < nopts; i++) {
		const struct gp_opt *o = &opts[i];
		char flag[96];
		snprintf(flag, sizeof flag, "--%s%s", o->name,
			 o->type == GP_OPT_BOOL	  ? ""
			 : o->type == GP_OPT_INT  ? " N"
			 : o->type == GP_OPT_LIST ? " VALUE..."
						  : " VALUE");
		fprintf(out, "  %-28s %s", flag, o->help);
		if (o->def)
			fprintf(out, " (default: %s)", o->def);
		if (o->env)
			fprintf(out, " [env %s]", o->env);
		fputc('\n', out);
	}
	fprintf(out, "  %-28s %s\n", "--help", "show this help");
}

gp_status gp_config_parse(const struct gp_opt *opts, int nopts, int argc, char **argv,
			  const char *usage, FILE *out, int *first_pos, int *help_shown,
			  struct gp_err *err)
{
	gp_status st;
	*help_shown = 0;
	for (int i = 0; i < nopts; i++) {
		if (opts[i].def && (st = set_value(&opts[i], opts[i].def, "default", err)))
			return st;
		const char *ev = opts[i].env ? getenv(opts[i].env) : NULL;
		if (ev && *ev) {
			char src[128];
			snprintf(src, sizeof src, "environment variable %s", opts[i].env);
			if ((st = set_value(&opts[i], ev, src, err)))
				return st;
		}
	}
	/* Move positionals to the end, preserving order. */
	char **pos = calloc((size_t)argc + 1, sizeof *pos);
	if (!pos)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	int npos = 0;
	for (int i = 1; i < argc; i++) {
		char *a = argv[i];
		if (!strcmp(a, "--")) {
			while (++i < argc)
				pos[npos++] = argv[i];
			break;
		}
		if (strncmp(a, "--", 2) != 0 || a[2] == '\0') {
			pos[npos++] = a;
			continue;
		}
		if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
			gp_config_usage(opts, nopts, usage, out);
			*help_shown = 1;
			free(pos);
			return GP_OK;
		}
		const char *name = a + 2;
		const char *eq = strchr(name, '=');
		size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
		const struct gp_opt *o = NULL;
		int negate = 0;
		for (int k = 0; k < nopts; k++) {
			if (strlen(opts[k].name) == nlen && !strncmp(opts[k].name, name, nlen)) {
				o = &opts[k];
				break;
			}
			if (opts[k].type == GP_OPT_BOOL && nlen == strlen(opts[k].name) + 3 &&
			    !strncmp(name, "no-", 3) && !strncmp(name + 3, opts[k].name, nlen - 3)) {
				o = &opts[k];
				negate = 1;
				break;
			}
		}
		if (!o) {
			st = gp_err_set(err, GP_ERR_INVALID, "unknown option --%.*s (see --help)",
					(int)nlen, name);
			free(pos);
			return st;
		}
		const char *v;
		if (eq)
			v = eq + 1;
		else if (o->type == GP_OPT_BOOL)
			v = negate ? "false" : "true";
		else if (i + 1 < argc)
			v = argv[++i];
		else {
			free(pos);
			return gp_err_set(err, GP_ERR_INVALID, "option --%s needs a value", o->name);
		}
		if ((st = set_value(o, v, "command line", err))) {
			free(pos);
			return st;
		}
	}
	int start = argc - npos;
	for (int k = 0; k < npos; k++)
		argv[start + k] = pos[k];
	free(pos);
	*first_pos = start;
	return GP_OK;
}
