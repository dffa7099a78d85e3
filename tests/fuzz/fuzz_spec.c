/*
 * libFuzzer harness for the pipeline spec parser (common/spec.c): any bytes
 * must give either a normalized document that canonicalizes, or errors with
 * positions inside the input; never a crash, leak or hang.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "spec.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static struct gp_spec_errors errs;
	cJSON *doc = NULL;
	gp_status st = gp_spec_parse((const char *)data, size, &doc, &errs);
	if (st == GP_OK) {
		char *text = NULL;
		char hash[65];
		if (!doc || errs.n || gp_spec_canonical(doc, &text, hash, NULL) != GP_OK)
			abort();
		free(text);
		cJSON_Delete(doc);
	} else if (st == GP_ERR_INVALID) {
		if (doc || errs.n == 0)
			abort();
		for (int i = 0; i < errs.n; i++)
			if (errs.v[i].line < 0 || errs.v[i].col < 0 || !errs.v[i].msg[0])
				abort();
	}
	return 0;
}
