/*
 * bytes.h: little-endian integers in byte buffers (the file formats of
 * bpe.c, shard.c and dataset.c) and the 64-bit hashes used by in-memory
 * hash tables and MinHash. None of these are for anything an attacker may
 * choose collisions against and gain from; names on disk use SHA-256.
 */
#ifndef GP_BYTES_H
#define GP_BYTES_H

#include <stddef.h>
#include <stdint.h>

static inline void gp_put_le32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static inline void gp_put_le64(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static inline uint32_t gp_get_le32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint64_t gp_get_le64(const uint8_t *p)
{
	return (uint64_t)gp_get_le32(p) | (uint64_t)gp_get_le32(p + 4) << 32;
}

/* splitmix64's finalizer: a bijection that spreads every input bit. */
static inline uint64_t gp_mix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

/* FNV-1a over the bytes, seeded, then mixed. */
static inline uint64_t gp_hash64(const uint8_t *p, size_t n, uint64_t seed)
{
	uint64_t h = 0xcbf29ce484222325ULL ^ seed ^ n;
	for (size_t i = 0; i < n; i++)
		h = (h ^ p[i]) * 0x100000001b3ULL;
	return gp_mix64(h);
}

#endif
