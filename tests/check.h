/*
 * check.h: the few macros the C tests use. A failed CHECK prints file:line
 * and the expression and counts; REQUIRE also stops the test. A test's main
 * returns CHECK_RESULT(), which is non-zero when anything failed or when no
 * check ran at all (a test that asserts nothing is a failure).
 */
#ifndef GP_CHECK_H
#define GP_CHECK_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int check_failures_;
static int check_count_;

#define CHECK(cond)                                                                      \
	do {                                                                             \
		check_count_++;                                                          \
		if (!(cond)) {                                                           \
			fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, \
				#cond);                                                  \
			check_failures_++;                                               \
		}                                                                        \
	} while (0)

#define REQUIRE(cond)                                                                    \
	do {                                                                             \
		check_count_++;                                                          \
		if (!(cond)) {                                                           \
			fprintf(stderr, "%s:%d: required check failed: %s\n", __FILE__,  \
				__LINE__, #cond);                                        \
			exit(1);                                                         \
		}                                                                        \
	} while (0)

/* st is a gp_status, e a struct gp_err: print its message on failure. */
#define REQUIRE_OK(expr, e)                                                              \
	do {                                                                             \
		check_count_++;                                                          \
		int st_ = (int)(expr);                                                   \
		if (st_ != 0) {                                                          \
			fprintf(stderr, "%s:%d: %s failed (%d): %s\n", __FILE__, __LINE__, \
				#expr, st_, (e).msg);                                    \
			exit(1);                                                         \
		}                                                                        \
	} while (0)

#define CHECK_STR(a, b)                                                                  \
	do {                                                                             \
		check_count_++;                                                          \
		const char *a_ = (a), *b_ = (b);                                         \
		if (!a_ || !b_ || strcmp(a_, b_) != 0) {                                 \
			fprintf(stderr, "%s:%d: %s == \"%s\", expected \"%s\"\n", __FILE__, \
				__LINE__, #a, a_ ? a_ : "(null)", b_ ? b_ : "(null)");   \
			check_failures_++;                                               \
		}                                                                        \
	} while (0)

#define CHECK_CONTAINS(hay, needle)                                                      \
	do {                                                                             \
		check_count_++;                                                          \
		const char *h_ = (hay), *n_ = (needle);                                  \
		if (!h_ || !strstr(h_, n_)) {                                            \
			fprintf(stderr, "%s:%d: \"%s\" does not contain \"%s\"\n", __FILE__, \
				__LINE__, h_ ? h_ : "(null)", n_);                       \
			check_failures_++;                                               \
		}                                                                        \
	} while (0)

#define CHECK_RESULT()                                                                   \
	(check_count_ == 0 ? (fprintf(stderr, "no checks ran\n"), 1)                      \
			   : (fprintf(stderr, "%d checks, %d failed\n", check_count_,     \
				      check_failures_),                                   \
			      check_failures_ != 0))

#endif
