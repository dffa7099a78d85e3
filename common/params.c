/* params.c: see params.h. */
#include "params.h"

#include <math.h>
#include <string.h>

gp_status gp_param_number(const cJSON *obj, const char *prefix, const char *key, double def,
			  double lo, double hi, double *out, struct gp_err *err)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
	if (!v) {
		*out = def;
		return GP_OK;
	}
	if (!cJSON_IsNumber(v) || !(v->valuedouble >= lo && v->valuedouble <= hi))
		return gp_err_set(err, GP_ERR_INVALID, "%s.%s must be a number within %g..%g", prefix,
				  key, lo, hi);
	*out = v->valuedouble;
	return GP_OK;
}

gp_status gp_param_int(const cJSON *obj, const char *prefix, const char *key, long long def,
		       long long lo, long long hi, long long *out, struct gp_err *err)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
	if (!v) {
		*out = def;
		return GP_OK;
	}
	if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) ||
	    !(v->valuedouble >= (double)lo && v->valuedouble <= (double)hi))
		return gp_err_set(err, GP_ERR_INVALID, "%s.%s must be an integer within %lld..%lld",
				  prefix, key, lo, hi);
	*out = (long long)v->valuedouble;
	return GP_OK;
}

gp_status gp_param_bool(const cJSON *obj, const char *prefix, const char *key, int def, int *out,
			struct gp_err *err)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
	if (!v) {
		*out = def;
		return GP_OK;
	}
	if (!cJSON_IsBool(v))
		return gp_err_set(err, GP_ERR_INVALID, "%s.%s must be true or false", prefix, key);
	*out = cJSON_IsTrue(v);
	return GP_OK;
}

gp_status gp_param_string(const cJSON *obj, const char *prefix, const char *key,
			  const char *def, size_t max_len, const char **out, struct gp_err *err)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
	if (!v) {
		if (!def)
			return gp_err_set(err, GP_ERR_INVALID, "%s.%s is required", prefix, key);
		*out = def;
		return GP_OK;
	}
	if (!cJSON_IsString(v))
		return gp_err_set(err, GP_ERR_INVALID, "%s.%s must be a string", prefix, key);
	if (strlen(v->valuestring) > max_len)
		return gp_err_set(err, GP_ERR_TOO_BIG, "%s.%s is longer than %zu bytes", prefix, key,
				  max_len);
	*out = v->valuestring;
	return GP_OK;
}
