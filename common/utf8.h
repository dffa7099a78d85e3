/*
 * utf8.h: strict UTF-8 (no overlongs, surrogates or values past U+10FFFF),
 * for text that crosses the system: ingested documents, generated
 * completions (byte-level BPE can stop inside a character).
 */
#ifndef GP_UTF8_H
#define GP_UTF8_H

#include <stddef.h>

/* Returns the number of invalid sequences; when out is not NULL, writes the
 * text with each (the maximal invalid subpart) replaced by U+FFFD (out needs
 * 3 * len bytes). */
size_t gp_utf8_repair(const unsigned char *in, size_t len, unsigned char *out, size_t *out_len);

/* The same into a malloc'd, NUL-terminated copy (NULL: out of memory). */
char *gp_utf8_repaired(const char *s, size_t n, size_t *out_len);

/* The prefix of s[0..n) up to the end of its last valid character: text
 * that can be repaired and sent now, while what follows may still be
 * completed (or absorbed into one U+FFFD) by the bytes to come. Repairing
 * the prefix and the rest apart gives what repairing the whole gives. */
size_t gp_utf8_safe_prefix(const char *s, size_t n);

#endif
