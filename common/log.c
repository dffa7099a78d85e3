/*
 * log.c: JSON-lines logger. One line is built in a stack buffer and written
 * with a single write(2); a line longer than the buffer is truncated (and
 * still valid JSON) rather than split.
 */
#include <stddef.h>
#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

static const char *svc_name = "genpipe";
static int min_level = GP_LOG_INFO;
static const char *const level_names[] = { "debug", "info", "warn", "error" };

int gp_log_parse_level(const char *s)
{
	for (int i = 0; i < 4; i++)
		if (s && strcasecmp(s, level_names[i]) == 0)
			return i;
	if (s && strcasecmp(s, "warning") == 0)
		return GP_LOG_WARN;
	return -1;
}

void gp_log_init(const char *service)
{
	if (service)
		svc_name = service;
	const char *lv = getenv("GENPIPE_LOG_LEVEL");
	if (lv && *lv) {
		int l = gp_log_parse_level(lv);
		if (l >= 0)
			min_level = l;
	}
}

void gp_log_set_level(enum gp_log_level level)
{
	min_level = level;
}

void gp_json_escape(char *out, size_t cap, size_t *len, const char *s)
{
	size_t n = *len;
	for (; s && *s; s++) {
		unsigned char c = (unsigned char)*s;
		char esc[8];
		const char *add = esc;
		size_t alen;
		if (c == '"' || c == '\\') {
			esc[0] = '\\';
			esc[1] = (char)c;
			alen = 2;
		} else if (c == '\n') {
			add = "\\n";
			alen = 2;
		} else if (c == '\t') {
			add = "\\t";
			alen = 2;
		} else if (c < 0x20) {
			snprintf(esc, sizeof esc, "\\u%04x", c);
			alen = 6;
		} else {
			esc[0] = (char)c;
			alen = 1;
		}
		if (n + alen + 1 > cap)
			break;
		memcpy(out + n, add, alen);
		n += alen;
	}
	if (n < cap)
		out[n] = '\0';
	*len = n;
}

static void append_raw(char *out, size_t cap, size_t *len, const char *s)
{
	size_t l = strlen(s);
	if (*len + l + 1 > cap)
		l = cap > *len + 1 ? cap - *len - 1 : 0;
	memcpy(out + *len, s, l);
	*len += l;
	out[*len] = '\0';
}

static void emit(enum gp_log_level level, const char *msg, va_list *kv)
{
	char line[4096];
	size_t len = 0;
	char ts[40];
	struct timespec now;
	struct tm tm;
	clock_gettime(CLOCK_REALTIME, &now);
	gmtime_r(&now.tv_sec, &tm);
	size_t tl = strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
	snprintf(ts + tl, sizeof ts - tl, ".%03ldZ", now.tv_nsec / 1000000);

	line[0] = '\0';
	append_raw(line, sizeof line - 2, &len, "{\"ts\":\"");
	append_raw(line, sizeof line - 2, &len, ts);
	append_raw(line, sizeof line - 2, &len, "\",\"level\":\"");
	append_raw(line, sizeof line - 2, &len, level_names[level]);
	append_raw(line, sizeof line - 2, &len, "\",\"svc\":\"");
	gp_json_escape(line, sizeof line - 2, &len, svc_name);
	append_raw(line, sizeof line - 2, &len, "\",\"pid\":");
	char pid[24];
	snprintf(pid, sizeof pid, "%d", (int)getpid());
	append_raw(line, sizeof line - 2, &len, pid);
	append_raw(line, sizeof line - 2, &len, ",\"msg\":\"");
	gp_json_escape(line, sizeof line - 64, &len, msg);
	append_raw(line, sizeof line - 2, &len, "\"");
	if (kv) {
		const char *k;
		while ((k = va_arg(*kv, const char *)) != NULL) {
			const char *v = va_arg(*kv, const char *);
			if (len + 16 > sizeof line - 64)
				continue;
			append_raw(line, sizeof line - 2, &len, ",\"");
			gp_json_escape(line, sizeof line - 64, &len, k);
			append_raw(line, sizeof line - 2, &len, "\":\"");
			gp_json_escape(line, sizeof line - 64, &len, v ? v : "");
			append_raw(line, sizeof line - 2, &len, "\"");
		}
	}
	line[len++] = '}';
	line[len++] = '\n';
	ssize_t w = write(STDERR_FILENO, line, len);
	(void)w;
}

void gp_log(enum gp_log_level level, const char *fmt, ...)
{
	if ((int)level < min_level)
		return;
	char msg[2048];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	emit(level, msg, NULL);
}

void gp_log_kv(enum gp_log_level level, const char *msg, ...)
{
	if ((int)level < min_level)
		return;
	va_list ap;
	va_start(ap, msg);
	emit(level, msg, &ap);
	va_end(ap);
}
