/*
 * shard.h: token shards in llm.c's format, so other tools read them.
 *
 * A shard is a 1024-byte header of 256 little-endian int32 (header[0] =
 * 20240520, header[1] = 1, header[2] = token count, the rest 0) followed by
 * that many uint16 token ids. The reader checks magic, version, that the
 * size is exactly header + 2 * count, and (when vocab > 0) that every id is
 * below vocab.
 */
#ifndef GP_SHARD_H
#define GP_SHARD_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

#define GP_SHARD_MAGIC 20240520
#define GP_SHARD_VERSION 1
#define GP_SHARD_HEADER 1024
/* llm.c keeps counts in int32: at most this many tokens per shard. */
#define GP_SHARD_MAX_TOKENS 0x7fffffffLL

/* Serialize (malloc'd). */
gp_status gp_shard_encode(const uint16_t *ids, size_t n, uint8_t **out, size_t *len,
			  struct gp_err *err);
/* Validate data; *ids points at the tokens inside data (borrowed; read
 * them with gp_shard_token, which is endian- and alignment-safe). */
gp_status gp_shard_parse(const uint8_t *data, size_t len, int vocab, const uint8_t **ids,
			 size_t *n, struct gp_err *err);
/* Token i of a parsed shard. */
static inline uint16_t gp_shard_token(const uint8_t *ids, size_t i)
{
	return (uint16_t)(ids[2 * i] | (ids[2 * i + 1] << 8));
}

#endif
