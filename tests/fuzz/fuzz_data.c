/*
 * libFuzzer harnesses for the data formats read from artifacts (built once
 * per target with GP_FUZZ_DATA=tokenizer|shard|manifest|dataset). Any bytes
 * must be refused with an error or read back consistently; never a crash,
 * leak, hang or out-of-bounds read.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bpe.h"
#include "dataset.h"
#include "shard.h"

#define TARGET_tokenizer 1
#define TARGET_shard 2
#define TARGET_manifest 3
#define TARGET_dataset 4
#define CAT(a, b) a##b
#define TARGET(x) CAT(TARGET_, x)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct gp_err e = { 0 };
#if TARGET(GP_FUZZ_DATA) == TARGET_tokenizer
	struct gp_bpe *b = NULL;
	if (gp_bpe_load(data, size, &b, &e) != GP_OK)
		return 0;
	/* a loaded tokenizer saves to the same bytes and round-trips text */
	uint8_t *out = NULL, *dec = NULL;
	size_t olen = 0, dlen = 0, n = 0, cap = 0;
	uint16_t *ids = NULL;
	static const char text[] = "the quick brown fox \xff\x00 jumps 12345 over\n\n the lazy dog";
	if (gp_bpe_save(b, &out, &olen, &e) || olen != size || memcmp(out, data, size))
		abort();
	if (gp_bpe_encode(b, text, sizeof text - 1, &ids, &n, &cap, &e) ||
	    gp_bpe_decode(b, ids, n, &dec, &dlen, &e) || dlen != sizeof text - 1 ||
	    memcmp(dec, text, dlen))
		abort();
	free(out);
	free(dec);
	free(ids);
	gp_bpe_free(b);
#elif TARGET(GP_FUZZ_DATA) == TARGET_shard
	const uint8_t *t = NULL;
	size_t n = 0;
	int vocab = size ? data[0] * 256 : 0;
	if (gp_shard_parse(data, size, vocab, &t, &n, &e) != GP_OK)
		return 0;
	if (GP_SHARD_HEADER + 2 * n != size)
		abort();
	unsigned sum = 0;
	for (size_t i = 0; i < n; i++) {
		uint16_t v = gp_shard_token(t, i);
		if (vocab > 0 && v >= vocab)
			abort();
		sum += v;
	}
	(void)sum;
#elif TARGET(GP_FUZZ_DATA) == TARGET_manifest
	struct gp_manifest m;
	if (gp_manifest_parse((const char *)data, size, &m, &e) != GP_OK)
		return 0;
	if (strlen(m.data) != 64 || m.documents < 0 || m.bytes < 0 || !m.dropped_json)
		abort();
	gp_manifest_free(&m);
#elif TARGET(GP_FUZZ_DATA) == TARGET_dataset
	struct gp_dataset_reader r;
	if (gp_dataset_open(&r, data, size, &e) != GP_OK)
		return 0;
	size_t total = 0;
	for (;;) {
		struct gp_doc d;
		int more = 0;
		if (gp_dataset_next(&r, &d, &more, &e) != GP_OK || !more)
			break;
		total += d.len + d.source_len;
		if (total > size || d.text < data || d.text + d.len > data + size)
			abort();
	}
#else
#error "GP_FUZZ_DATA must name a target"
#endif
	return 0;
}
