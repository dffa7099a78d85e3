/*
 * libFuzzer harness for the deploy stage's promote_if parser
 * (services/infer/stages.c): any text parses into a gate whose fields are
 * terminated and whose operator is one of the four, or is refused with a
 * message; evaluating a parsed gate never crashes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "stages.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	if (size > 4096)
		return 0;
	char *text = malloc(size + 1);
	if (!text)
		return 0;
	memcpy(text, data, size);
	text[size] = 0;
	struct gp_gate g;
	struct gp_err err = {0};
	gp_status st = gp_gate_parse(text, &g, &err);
	if (st == GP_OK) {
		if (!g.always && strcmp(g.op, "<") && strcmp(g.op, "<=") && strcmp(g.op, ">") &&
		    strcmp(g.op, ">="))
			abort();
		if (strlen(g.metric) >= sizeof g.metric || strlen(g.alias) >= sizeof g.alias)
			abort();
		(void)gp_gate_eval(&g, 1.0, 2.0);
		(void)gp_gate_eval(&g, NAN, 2.0);
	} else if (st != GP_ERR_INVALID || !err.msg[0]) {
		abort();
	}
	free(text);
	return 0;
}
