/*
 * status.h: genpipe's one error currency.
 *
 * A fallible function returns gp_status (GP_OK == 0). Library errors
 * (libpq SQLSTATE, natsStatus, errno) are converted to a gp_status once, at
 * the boundary, and the human-readable reason goes into a struct gp_err the
 * caller passes down. Messages follow PostgreSQL's style: lower case, no
 * trailing period, name the object and the reason.
 *
 * Thread-safety: everything here is reentrant; a struct gp_err belongs to
 * one thread at a time.
 */
#ifndef GP_STATUS_H
#define GP_STATUS_H

#include <stddef.h>

typedef enum gp_status {
	GP_OK = 0,
	GP_ERR_INVALID,     /* bad input: caller's or the wire's */
	GP_ERR_NOT_FOUND,
	GP_ERR_EXISTS,      /* unique violation, duplicate */
	GP_ERR_CONFLICT,    /* lost a race: claim taken, lease gone, serialization */
	GP_ERR_TIMEOUT,
	GP_ERR_IO,          /* file system, sockets */
	GP_ERR_NOMEM,
	GP_ERR_TOO_BIG,     /* a limit was exceeded */
	GP_ERR_UNAVAILABLE, /* server down, connection lost: retry later */
	GP_ERR_DB,          /* any other PostgreSQL error */
	GP_ERR_BUS,         /* any other NATS error */
	GP_ERR_INTERNAL,
	GP_STATUS_COUNT_
} gp_status;

/* Static name of a status ("invalid", "timeout", ...). Never NULL. */
const char *gp_status_str(gp_status st);

#define GP_ERR_MSG_MAX 512

/* The reason behind a non-OK status. Zero-initialise; no release needed. */
struct gp_err {
	gp_status status;
	char msg[GP_ERR_MSG_MAX];
};

/*
 * Record a failure in err (which may be NULL) and return st, so that a
 * caller can write `return gp_err_set(err, GP_ERR_IO, "could not open %s: %s",
 * path, strerror(errno));`. The message is truncated to GP_ERR_MSG_MAX-1.
 */
gp_status gp_err_set(struct gp_err *err, gp_status st, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* Prefix the existing message with context: "ctx: old message". */
gp_status gp_err_wrap(struct gp_err *err, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

/* Programmer errors only (never input): print file:line and abort. */
#define GP_BUG(...) gp_bug_(__FILE__, __LINE__, __VA_ARGS__)
#define GP_ASSERT(cond) do { if (!(cond)) GP_BUG("assertion failed: %s", #cond); } while (0)
void gp_bug_(const char *file, int line, const char *fmt, ...)
	__attribute__((noreturn, format(printf, 3, 4)));

/* Monotonic and wall clocks in milliseconds. */
long long gp_now_ms(void);
/* The monotonic clock in fractional milliseconds (latencies under 1 ms). */
double gp_mono_ms(void);
long long gp_wall_ms(void);
void gp_sleep_ms(long long ms);

#endif
