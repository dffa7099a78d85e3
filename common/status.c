/*
 * status.c: status names, error messages, clocks.
 */
#include "status.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char *const names[GP_STATUS_COUNT_] = {
	[GP_OK] = "ok",
	[GP_ERR_INVALID] = "invalid",
	[GP_ERR_NOT_FOUND] = "not found",
	[GP_ERR_EXISTS] = "already exists",
	[GP_ERR_CONFLICT] = "conflict",
	[GP_ERR_TIMEOUT] = "timeout",
	[GP_ERR_IO] = "i/o error",
	[GP_ERR_NOMEM] = "out of memory",
	[GP_ERR_TOO_BIG] = "too big",
	[GP_ERR_UNAVAILABLE] = "unavailable",
	[GP_ERR_DB] = "database error",
	[GP_ERR_BUS] = "bus error",
	[GP_ERR_INTERNAL] = "internal error",
};

const char *gp_status_str(gp_status st)
{
	if ((unsigned)st >= GP_STATUS_COUNT_)
		return "unknown status";
	return names[st];
}

gp_status gp_err_set(struct gp_err *err, gp_status st, const char *fmt, ...)
{
	if (err) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(err->msg, sizeof err->msg, fmt, ap);
		va_end(ap);
		err->status = st;
	}
	return st;
}

gp_status gp_err_wrap(struct gp_err *err, const char *fmt, ...)
{
	if (!err)
		return GP_ERR_INTERNAL;
	/* Built at double size and cut, so truncation is explicit. */
	char joined[2 * GP_ERR_MSG_MAX + 2];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(joined, GP_ERR_MSG_MAX, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if (n > GP_ERR_MSG_MAX - 1)
		n = GP_ERR_MSG_MAX - 1;
	joined[n++] = ':';
	joined[n++] = ' ';
	size_t ol = strnlen(err->msg, GP_ERR_MSG_MAX - 1);
	memcpy(joined + n, err->msg, ol);
	joined[(size_t)n + ol] = '\0';
	memcpy(err->msg, joined, GP_ERR_MSG_MAX - 1);
	err->msg[GP_ERR_MSG_MAX - 1] = '\0';
	return err->status;
}

void gp_bug_(const char *file, int line, const char *fmt, ...)
{
	va_list ap;
	fprintf(stderr, "BUG at %s:%d: ", file, line);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	abort();
}

long long gp_now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

double gp_mono_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

long long gp_wall_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void gp_sleep_ms(long long ms)
{
	if (ms <= 0)
		return;
	struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000 };
	while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
		;
}
