/*
 * params.h: reading a stage's resolved `with` parameters (a JSON object)
 * with a default, a type and a range each. Errors name the parameter as the
 * user wrote it: `with.steps must be an integer within 1..10000000`. A
 * value of the wrong type is an error, never a silent default.
 */
#ifndef GP_PARAMS_H
#define GP_PARAMS_H

#include <cjson/cJSON.h>

#include "status.h"

/* A number within lo..hi; absent: def. prefix names the enclosing object
 * in messages ("with", "with.config"). */
gp_status gp_param_number(const cJSON *obj, const char *prefix, const char *key, double def,
			  double lo, double hi, double *out, struct gp_err *err);
/* The same, and integral. */
gp_status gp_param_int(const cJSON *obj, const char *prefix, const char *key, long long def,
		       long long lo, long long hi, long long *out, struct gp_err *err);
/* true/false; absent: def. */
gp_status gp_param_bool(const cJSON *obj, const char *prefix, const char *key, int def, int *out,
			struct gp_err *err);
/* A string (borrowed from obj) of at most max_len bytes; absent: def
 * (which may be NULL; then the parameter is required). */
gp_status gp_param_string(const cJSON *obj, const char *prefix, const char *key,
			  const char *def, size_t max_len, const char **out, struct gp_err *err);

#endif
