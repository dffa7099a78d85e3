/*
 * log.h: structured logs, one JSON object per line on stderr.
 *
 *   {"ts":"2026-11-27T22:41:03.120Z","level":"info","svc":"orchestrator",
 *    "msg":"relay published","count":"3"}
 *
 * The level comes from GENPIPE_LOG_LEVEL (debug, info, warn, error; default
 * info) when gp_log_init() runs. Lines are written with one write(2) each so
 * that concurrent threads and processes sharing a file do not interleave.
 * Thread-safe after gp_log_init().
 */
#ifndef GP_LOG_H
#define GP_LOG_H

enum gp_log_level { GP_LOG_DEBUG, GP_LOG_INFO, GP_LOG_WARN, GP_LOG_ERROR };

/* Set the service name shown in every line and read GENPIPE_LOG_LEVEL.
 * `service` is borrowed and must outlive logging (a string literal). */
void gp_log_init(const char *service);
void gp_log_set_level(enum gp_log_level level);
/* Parse "debug"/"info"/"warn"/"error"; returns -1 for anything else. */
int gp_log_parse_level(const char *s);

/* msg is printf-formatted. */
void gp_log(enum gp_log_level level, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

/* msg plus string fields: key, value pairs terminated by NULL. */
void gp_log_kv(enum gp_log_level level, const char *msg, ...)
	__attribute__((sentinel));

#define gp_debug(...) gp_log(GP_LOG_DEBUG, __VA_ARGS__)
#define gp_info(...) gp_log(GP_LOG_INFO, __VA_ARGS__)
#define gp_warn(...) gp_log(GP_LOG_WARN, __VA_ARGS__)
#define gp_error(...) gp_log(GP_LOG_ERROR, __VA_ARGS__)

/*
 * Append s to out (capacity cap, current length *len) as JSON string
 * contents (no quotes), escaping quotes, backslashes and control bytes.
 * Stops silently when out is full; out stays NUL-terminated.
 */
void gp_json_escape(char *out, size_t cap, size_t *len, const char *s);

#endif
