/*
 * shard.c: llm.c token shards (see shard.h).
 */
#include "shard.h"

#include <stdlib.h>
#include <string.h>

#include "bytes.h"

gp_status gp_shard_encode(const uint16_t *ids, size_t n, uint8_t **out, size_t *len,
			  struct gp_err *err)
{
	if ((long long)n > GP_SHARD_MAX_TOKENS)
		return gp_err_set(err, GP_ERR_TOO_BIG, "%zu tokens do not fit one shard", n);
	size_t size = GP_SHARD_HEADER + 2 * n;
	uint8_t *p = calloc(1, size);
	if (!p)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	gp_put_le32(p, GP_SHARD_MAGIC);
	gp_put_le32(p + 4, GP_SHARD_VERSION);
	gp_put_le32(p + 8, (uint32_t)n);
	for (size_t i = 0; i < n; i++) {
		p[GP_SHARD_HEADER + 2 * i] = (uint8_t)ids[i];
		p[GP_SHARD_HEADER + 2 * i + 1] = (uint8_t)(ids[i] >> 8);
	}
	*out = p;
	*len = size;
	return GP_OK;
}

gp_status gp_shard_parse(const uint8_t *data, size_t len, int vocab, const uint8_t **ids,
			 size_t *n, struct gp_err *err)
{
	if (len < GP_SHARD_HEADER)
		return gp_err_set(err, GP_ERR_INVALID,
				  "shard: %zu bytes, shorter than the %d-byte header", len,
				  GP_SHARD_HEADER);
	if (gp_get_le32(data) != GP_SHARD_MAGIC)
		return gp_err_set(err, GP_ERR_INVALID, "shard: bad magic %u (expected %d)",
				  gp_get_le32(data), GP_SHARD_MAGIC);
	if (gp_get_le32(data + 4) != GP_SHARD_VERSION)
		return gp_err_set(err, GP_ERR_INVALID,
				  "shard: version %u is not %d (uint16 tokens)", gp_get_le32(data + 4),
				  GP_SHARD_VERSION);
	uint32_t count = gp_get_le32(data + 8);
	if (count > GP_SHARD_MAX_TOKENS)
		return gp_err_set(err, GP_ERR_INVALID, "shard: token count %u is negative", count);
	if (len - GP_SHARD_HEADER != 2 * (size_t)count)
		return gp_err_set(err, GP_ERR_INVALID,
				  "shard: header says %u tokens but %zu bytes follow it", count,
				  len - GP_SHARD_HEADER);
	const uint8_t *t = data + GP_SHARD_HEADER;
	if (vocab > 0)
		for (size_t i = 0; i < count; i++)
			if (gp_shard_token(t, i) >= vocab)
				return gp_err_set(err, GP_ERR_INVALID,
						  "shard: token %zu has id %u, outside the "
						  "vocabulary of %d",
						  i, gp_shard_token(t, i), vocab);
	*ids = t;
	*n = count;
	return GP_OK;
}
