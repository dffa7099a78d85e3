/*
 * utf8.c: strict UTF-8 checking and repair (utf8.h).
 */
#include "utf8.h"

#include <stdlib.h>
#include <string.h>

/* Length of the valid sequence at p (1..4), or 0 when it is invalid. */
static size_t utf8_seq(const unsigned char *p, size_t n)
{
	unsigned c = p[0];
	if (c < 0x80)
		return 1;
	size_t k;
	unsigned lo = 0x80, hi = 0xbf;
	if (c >= 0xc2 && c <= 0xdf)
		k = 2;
	else if (c >= 0xe0 && c <= 0xef) {
		k = 3;
		if (c == 0xe0)
			lo = 0xa0; /* no overlongs */
		if (c == 0xed)
			hi = 0x9f; /* no surrogates */
	} else if (c >= 0xf0 && c <= 0xf4) {
		k = 4;
		if (c == 0xf0)
			lo = 0x90;
		if (c == 0xf4)
			hi = 0x8f; /* <= U+10FFFF */
	} else
		return 0;
	if (n < k)
		return 0;
	if (p[1] < lo || p[1] > hi)
		return 0;
	for (size_t i = 2; i < k; i++)
		if (p[i] < 0x80 || p[i] > 0xbf)
			return 0;
	return k;
}

size_t gp_utf8_repair(const unsigned char *in, size_t len, unsigned char *out, size_t *out_len)
{
	size_t bad = 0, w = 0;
	for (size_t i = 0; i < len;) {
		size_t k = utf8_seq(in + i, len - i);
		if (k) {
			if (out)
				memcpy(out + w, in + i, k);
			w += k;
			i += k;
			continue;
		}
		bad++;
		if (out) {
			out[w] = 0xef;
			out[w + 1] = 0xbf;
			out[w + 2] = 0xbd;
		}
		w += 3;
		/* skip the maximal invalid subpart: the lead byte and any
		 * continuation bytes that follow it */
		i++;
		while (i < len && (in[i] & 0xc0) == 0x80 && !utf8_seq(in + i, len - i))
			i++;
	}
	if (out_len)
		*out_len = w;
	return bad;
}

size_t gp_utf8_safe_prefix(const char *s, size_t n)
{
	/* the end of the last valid character: repair restarts there, so the
	 * pieces on either side repair to what the whole would */
	const unsigned char *p = (const unsigned char *)s;
	size_t good = 0;
	for (size_t i = 0; i < n;) {
		size_t k = utf8_seq(p + i, n - i);
		if (k) {
			i += k;
			good = i;
		} else {
			i++;
		}
	}
	return good;
}

char *gp_utf8_repaired(const char *s, size_t n, size_t *out_len)
{
	char *o = malloc(3 * n + 1);
	if (!o)
		return NULL;
	size_t w = 0;
	gp_utf8_repair((const unsigned char *)s, n, (unsigned char *)o, &w);
	o[w] = 0;
	if (out_len)
		*out_len = w;
	return o;
}
