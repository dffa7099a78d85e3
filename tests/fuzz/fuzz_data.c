/*
 * libFuzzer harnesses for the data formats read from artifacts (built once
 * per target with GP_FUZZ_DATA=tokenizer|shard|manifest|dataset|checkpoint|
 * histogram). Any bytes
 * must be refused with an error or read back consistently; never a crash,
 * leak, hang or out-of-bounds read.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

#include "bpe.h"
#include "bytes.h"
#include "dataset.h"
#include "drift.h"
#include "model.h"
#include "shard.h"

#define TARGET_tokenizer 1
#define TARGET_shard 2
#define TARGET_manifest 3
#define TARGET_dataset 4
#define TARGET_checkpoint 5
#define TARGET_histogram 6
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
#elif TARGET(GP_FUZZ_DATA) == TARGET_checkpoint
	/* As given (the checksums stop almost everything), then with both
	 * checksums made right, so that the mutations reach the checks behind
	 * them: configuration ranges, sizes, flags, non-finite values. */
	for (int fix = 0; fix < 2; fix++) {
		uint8_t *d = malloc(size ? size : 1);
		if (!d)
			return 0;
		memcpy(d, data, size);
		if (fix) {
			if (size < GP_CKPT_HEADER) {
				free(d);
				break;
			}
			gp_put_le32(d + 96, (uint32_t)crc32(0L, d + GP_CKPT_HEADER,
							    (uInt)(size - GP_CKPT_HEADER)));
			gp_put_le32(d + 100, (uint32_t)crc32(0L, d, 100));
		}
		struct gp_model *m = NULL;
		float *mo = NULL, *ve = NULL;
		struct gp_ckpt_meta meta;
		if (gp_ckpt_decode(d, size, &m, &mo, &ve, &meta, &e) == GP_OK) {
			/* what loaded is what the file says: the same bytes re-encode */
			size_t np = gp_model_num_params(m);
			if (size != GP_CKPT_HEADER + np * 4 * (mo ? 3 : 1) || meta.step < 0)
				abort();
			if (memcmp(gp_model_params(m), d + GP_CKPT_HEADER, np * 4))
				abort();
			gp_model_destroy(m);
			free(mo);
			free(ve);
		} else if (m || mo || ve) {
			abort(); /* nothing is handed out on failure */
		}
		free(d);
	}
#elif TARGET(GP_FUZZ_DATA) == TARGET_histogram
	/* a reference that parses is a probability distribution, binned */
	struct gp_drift_ref r;
	if (gp_drift_ref_parse((const char *)data, size, "train", 0, 0, 0, &r, &e) == GP_OK) {
		double sum = 0, bsum = 0;
		for (int i = 0; i < r.vocab; i++) {
			if (!(r.p[i] >= 0) || r.bin[i] >= r.nbins)
				abort();
			sum += r.p[i];
		}
		for (int b = 0; b < r.nbins; b++) {
			if (!(r.pbin[b] > 0))
				abort();
			bsum += r.pbin[b];
		}
		if (r.vocab < 2 || r.nbins < 1 || r.nbins > 20 || fabs(sum - 1) > 1e-6 ||
		    fabs(bsum - 1) > 1e-6)
			abort();
		gp_drift_ref_free(&r);
	} else if (r.p || r.rare || r.bin || r.pbin) {
		abort();
	}
#else
#error "GP_FUZZ_DATA must name a target"
#endif
	return 0;
}
