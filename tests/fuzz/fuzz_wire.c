/*
 * libFuzzer harness for one wire decoder, chosen at build time with
 * -DGP_FUZZ_MSG=<name> (stage_job, stage_event, ...). Any input must either
 * decode into a message that passes validation and re-encodes, or be refused
 * with a message; ASan/UBSan catch the rest.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "wire.h"

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define DECODE CAT(gp_wire_decode_, GP_FUZZ_MSG)
#define FREE CAT(gp_wire_free_, GP_FUZZ_MSG)
#define TYPE CAT(gp_, GP_FUZZ_MSG)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	TYPE *m = NULL;
	struct gp_err err = { 0 };
	gp_status st = DECODE(&m, data, size, &err);
	if (st == GP_OK) {
		uint8_t *out = NULL;
		size_t len = 0;
		if (gp_wire_encode(&m->base, &out, &len, &err) != GP_OK)
			abort(); /* a valid message must re-encode */
		TYPE *again = NULL;
		if (DECODE(&again, out, len, &err) != GP_OK)
			abort(); /* and decode again */
		FREE(again);
		free(out);
		FREE(m);
	} else if (m != NULL || err.msg[0] == '\0') {
		abort(); /* refusals leave *out alone and say why */
	}
	return 0;
}
