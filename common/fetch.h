/*
 * fetch.h: reading outside bytes safely: HTTP(S) with an SSRF guard, and
 * files that must stay beneath a root directory.
 *
 * HTTP: only http and https; redirects are followed by us, not by libcurl,
 * one hop at a time, so every hop's URL is checked again. The guard runs in
 * libcurl's open-socket callback, on the resolved address of every
 * connection (every hop, every address tried), before connect(): loopback,
 * private, link-local (169.254.169.254 included), CGNAT, multicast,
 * reserved, unspecified, unique-local IPv6, and IPv4-mapped or NAT64 forms
 * of those are refused unless the hop's host, as written in the URL, is in
 * allow_hosts and libcurl parses the same host (allowing "127.0.0.1" does
 * not allow 2130706433, 0x7f000001 or 127.1, nor "localhost").
 * Proxies from the environment are not used.
 *
 * Files: gp_beneath_open opens a path relative to a root directory fd with
 * openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS): ".." and symlinks that
 * leave the root fail (EXDEV), checked by the kernel at open, so there is no
 * window between a check and the open. Kernels without openat2 get an
 * equivalent walk that refuses ".." and every symlink.
 */
#ifndef GP_FETCH_H
#define GP_FETCH_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "status.h"

struct gp_fetch_options {
	long long connect_timeout_ms; /* 0: 10 s */
	long long total_timeout_ms;   /* 0: 60 s, all hops together */
	size_t max_bytes;             /* 0: 64 MiB */
	int max_redirects;            /* < 0: 5 */
	const char *const *allow_hosts;
	int n_allow_hosts;
};

/*
 * GET url. *body is malloc'd (NUL-terminated for convenience, not counted in
 * *len). final_url (may be NULL) gets the URL of the last hop. Refusals are
 * GP_ERR_INVALID with the reason; HTTP errors GP_ERR_IO; too big
 * GP_ERR_TOO_BIG; timeouts GP_ERR_TIMEOUT.
 */
gp_status gp_fetch(const char *url, const struct gp_fetch_options *o, uint8_t **body,
		   size_t *len, char *final_url, size_t final_len, struct gp_err *err);

/* Non-zero when the address may not be connected to; why gets the class. */
int gp_addr_blocked(const struct sockaddr *sa, const char **why);

/* Open rel (relative, no leading '/') beneath rootfd. flags as for openat;
 * O_CLOEXEC is added. Returns the fd or -1 with errno (EXDEV: it escapes). */
int gp_beneath_open(int rootfd, const char *rel, int flags);

/* Whether a relative path or pattern has a ".." component or is absolute. */
int gp_path_escapes(const char *rel);

#endif
