/*
 * ingest.c: the ingest stage (see ingest.h).
 */
#include "ingest.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "fetch.h"
#include "log.h"
#include "spec.h"

#define MAX_DEPTH 64
#define MAX_FILES 1000000
#define MAX_SOURCES 256

/* ---- options ---- */

enum split_mode { SPLIT_FILE, SPLIT_LINES, SPLIT_PARAGRAPHS, SPLIT_SEPARATOR };

struct opts {
	const cJSON *sources, *include, *exclude, *allow;
	enum split_mode split;
	const char *separator;
	long long max_doc, max_total;
	int drop_invalid;
	struct gp_fetch_options fetch;
	const char **allow_hosts;
};

/* A size or duration parameter: a number, or a string parse() accepts;
 * def when absent, -1 when invalid. */
static long long unit_param(const cJSON *p, const char *key, long long def,
			    long long (*parse)(const char *))
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(p, key);
	if (cJSON_IsNumber(v))
		return v->valuedouble >= 0 && v->valuedouble < 9e15 ? (long long)v->valuedouble : -1;
	if (cJSON_IsString(v))
		return parse(v->valuestring);
	return v ? -1 : def;
}

static gp_status string_list(const cJSON *p, const char *key, int required, const cJSON **out,
			     struct gp_err *err)
{
	const cJSON *v = cJSON_GetObjectItemCaseSensitive(p, key);
	*out = NULL;
	if (!v) {
		if (required)
			return gp_err_set(err, GP_ERR_INVALID, "with.%s is required", key);
		return GP_OK;
	}
	if (!cJSON_IsArray(v))
		return gp_err_set(err, GP_ERR_INVALID, "with.%s must be a list of strings", key);
	int i = 0;
	for (const cJSON *c = v->child; c; c = c->next, i++)
		if (!cJSON_IsString(c) || !*c->valuestring)
			return gp_err_set(err, GP_ERR_INVALID, "with.%s[%d] must be a non-empty string",
					  key, i);
	if (i > MAX_SOURCES)
		return gp_err_set(err, GP_ERR_TOO_BIG, "with.%s has %d entries, at most %d", key, i,
				  MAX_SOURCES);
	*out = v;
	return GP_OK;
}

static gp_status parse_opts(const cJSON *p, struct opts *o, struct gp_err *err)
{
	gp_status st;
	memset(o, 0, sizeof *o);
	if ((st = string_list(p, "sources", 1, &o->sources, err)) ||
	    (st = string_list(p, "include", 0, &o->include, err)) ||
	    (st = string_list(p, "exclude", 0, &o->exclude, err)) ||
	    (st = string_list(p, "allow_hosts", 0, &o->allow, err)))
		return st;
	if (!o->sources->child)
		return gp_err_set(err, GP_ERR_INVALID, "with.sources is empty");
	const cJSON *pats[2] = { o->include, o->exclude };
	for (int k = 0; k < 2; k++)
		for (const cJSON *c = pats[k] ? pats[k]->child : NULL; c; c = c->next)
			if (gp_path_escapes(c->valuestring))
				return gp_err_set(err, GP_ERR_INVALID,
						  "with.%s: pattern \"%.200s\" leaves the source root "
						  "(absolute or with \"..\")",
						  k ? "exclude" : "include", c->valuestring);
	const char *split =
		cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(p, "split"));
	if (!split || !strcmp(split, "file"))
		o->split = SPLIT_FILE;
	else if (!strcmp(split, "lines"))
		o->split = SPLIT_LINES;
	else if (!strcmp(split, "paragraphs"))
		o->split = SPLIT_PARAGRAPHS;
	else if (!*split || strchr(split, '\n'))
		return gp_err_set(err, GP_ERR_INVALID, "with.split: a separator must be one line");
	else {
		o->split = SPLIT_SEPARATOR;
		o->separator = split;
	}
	o->max_doc = unit_param(p, "max_doc_size", 1LL << 20, gp_spec_parse_size);
	o->max_total = unit_param(p, "max_total_size", 1LL << 30, gp_spec_parse_size);
	if (o->max_doc <= 0 || o->max_doc > (long long)GP_DATASET_MAX_DOC)
		return gp_err_set(err, GP_ERR_INVALID,
				  "with.max_doc_size must be a size above 0 and at most 256Mi");
	if (o->max_total <= 0)
		return gp_err_set(err, GP_ERR_INVALID, "with.max_total_size must be a size above 0");
	const char *inv =
		cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(p, "invalid_utf8"));
	if (inv && strcmp(inv, "replace") && strcmp(inv, "drop"))
		return gp_err_set(err, GP_ERR_INVALID,
				  "with.invalid_utf8: \"%.40s\" is neither replace nor drop", inv);
	o->drop_invalid = inv && !strcmp(inv, "drop");
	o->fetch.total_timeout_ms = unit_param(p, "timeout", 60000, gp_spec_parse_duration);
	o->fetch.connect_timeout_ms = unit_param(p, "connect_timeout", 10000, gp_spec_parse_duration);
	const cJSON *mr = cJSON_GetObjectItemCaseSensitive(p, "max_redirects");
	o->fetch.max_redirects = cJSON_IsNumber(mr) ? (int)mr->valuedouble : 5;
	if (o->fetch.total_timeout_ms < 0)
		return gp_err_set(err, GP_ERR_INVALID, "with.timeout is not a duration");
	if (o->fetch.connect_timeout_ms < 0)
		return gp_err_set(err, GP_ERR_INVALID, "with.connect_timeout is not a duration");
	if (o->fetch.max_redirects < 0 || o->fetch.max_redirects > 20)
		return gp_err_set(err, GP_ERR_INVALID, "with.max_redirects must be within 0..20");
	o->fetch.max_bytes = (size_t)o->max_total;
	int na = o->allow ? cJSON_GetArraySize(o->allow) : 0;
	if (na) {
		o->allow_hosts = calloc((size_t)na, sizeof *o->allow_hosts);
		if (!o->allow_hosts)
			return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		int i = 0;
		for (const cJSON *c = o->allow->child; c; c = c->next)
			o->allow_hosts[i++] = c->valuestring;
		o->fetch.allow_hosts = o->allow_hosts;
		o->fetch.n_allow_hosts = na;
	}
	return GP_OK;
}

/* ---- collection state ---- */

struct seen {
	uint8_t (*h)[32];
	size_t n, cap; /* open addressing over the first 8 bytes */
};

static int seen_add(struct seen *s, const uint8_t d[32], int *oom)
{
	if (s->n * 2 >= s->cap) {
		size_t nc = s->cap ? s->cap * 2 : 4096;
		uint8_t (*nh)[32] = calloc(nc, 32);
		static const uint8_t zero[32];
		if (!nh) {
			*oom = 1;
			return 0;
		}
		for (size_t i = 0; i < s->cap; i++) {
			if (!memcmp(s->h[i], zero, 32))
				continue;
			uint64_t k;
			memcpy(&k, s->h[i], 8);
			size_t j = k & (nc - 1);
			while (memcmp(nh[j], zero, 32))
				j = (j + 1) & (nc - 1);
			memcpy(nh[j], s->h[i], 32);
		}
		free(s->h);
		s->h = nh;
		s->cap = nc;
	}
	static const uint8_t zero[32];
	uint64_t k;
	memcpy(&k, d, 8);
	for (size_t j = k & (s->cap - 1);; j = (j + 1) & (s->cap - 1)) {
		if (!memcmp(s->h[j], zero, 32)) {
			memcpy(s->h[j], d, 32);
			s->n++;
			return 1;
		}
		if (!memcmp(s->h[j], d, 32))
			return 0;
	}
}

struct collect {
	const struct opts *o;
	const struct gp_ingest_config *cfg;
	struct gp_ingest_result *res;
	struct seen seen;
	EVP_MD_CTX *fp; /* fingerprint */
	int fingerprint_only;
	long long files_total, files_done;
	void (*progress)(void *ctx, long long files_read, const char *msg);
	void *pctx;
	long long next_progress_ms;
	cJSON *src;           /* this source's counts */
	unsigned char *fix;   /* UTF-8 repair buffer */
	size_t fix_cap;
};

static void bump(cJSON *o, const char *key, long long by)
{
	cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
	if (v)
		cJSON_SetNumberValue(v, v->valuedouble + (double)by);
	else
		cJSON_AddNumberToObject(o, key, (double)by);
}

static void drop(struct collect *c, const char *reason)
{
	bump(c->res->dropped, reason, 1);
}

/* One document: validate, dedupe, append. */
static gp_status add_doc(struct collect *c, const char *source, const unsigned char *text,
			 size_t len, struct gp_err *err)
{
	size_t i = 0;
	while (i < len && (text[i] == ' ' || text[i] == '\n' || text[i] == '\t' || text[i] == '\r'))
		i++;
	if (i == len) {
		drop(c, "empty");
		return GP_OK;
	}
	if ((long long)len > c->o->max_doc) {
		drop(c, "too_large");
		return GP_OK;
	}
	size_t bad = gp_utf8_repair(text, len, NULL, NULL);
	if (bad) {
		if (c->o->drop_invalid) {
			drop(c, "invalid_utf8");
			return GP_OK;
		}
		if (c->fix_cap < 3 * len) {
			unsigned char *f = realloc(c->fix, 3 * len);
			if (!f)
				return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
			c->fix = f;
			c->fix_cap = 3 * len;
		}
		gp_utf8_repair(text, len, c->fix, &len);
		text = c->fix;
		c->res->utf8_replaced++;
		if ((long long)len > c->o->max_doc) {
			drop(c, "too_large");
			return GP_OK;
		}
	}
	unsigned char md[32];
	unsigned int mdlen = 0;
	EVP_Digest(text, len, md, &mdlen, EVP_sha256(), NULL);
	int oom = 0;
	if (!seen_add(&c->seen, md, &oom)) {
		if (oom)
			return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		drop(c, "duplicate");
		return GP_OK;
	}
	if (c->res->bytes + (long long)len > c->o->max_total)
		return gp_err_set(err, GP_ERR_TOO_BIG,
				  "the documents exceed max_total_size (%lld bytes) at \"%.200s\"",
				  c->o->max_total, source);
	gp_status st = gp_dataset_record(&c->res->data, source, md, text, len, err);
	if (st)
		return st;
	c->res->documents++;
	c->res->bytes += (long long)len;
	bump(c->src, "documents", 1);
	bump(c->src, "bytes", (long long)len);
	return GP_OK;
}

/* Cut a file's bytes into documents by the split mode. */
static gp_status split_docs(struct collect *c, const char *source, const unsigned char *p,
			    size_t len, struct gp_err *err)
{
	if (c->o->split == SPLIT_FILE)
		return add_doc(c, source, p, len, err);
	size_t start = 0, sep_len = c->o->separator ? strlen(c->o->separator) : 0;
	gp_status st;
	for (size_t i = 0; i <= len;) {
		size_t e = i;
		while (e < len && p[e] != '\n')
			e++;
		/* line is p[i..e) */
		size_t ll = e - i;
		int boundary = 0;
		size_t doc_end = i, next = e < len ? e + 1 : len + 1;
		if (c->o->split == SPLIT_LINES) {
			if ((st = add_doc(c, source, p + i, ll, err)))
				return st;
			start = next;
		} else if (c->o->split == SPLIT_PARAGRAPHS) {
			size_t k = i;
			while (k < e && (p[k] == ' ' || p[k] == '\t' || p[k] == '\r'))
				k++;
			boundary = k == e && e < len;
		} else {
			size_t l2 = ll && p[e - 1] == '\r' ? ll - 1 : ll;
			boundary = l2 == sep_len && !memcmp(p + i, c->o->separator, sep_len);
		}
		if (c->o->split != SPLIT_LINES && (boundary || e >= len)) {
			size_t end = boundary ? doc_end : len;
			if (end > start && (st = add_doc(c, source, p + start, end - start, err)))
				return st;
			start = next;
		}
		if (e >= len)
			break;
		i = next;
	}
	return GP_OK;
}

static void maybe_progress(struct collect *c, const char *what)
{
	if (!c->progress || gp_now_ms() < c->next_progress_ms)
		return;
	c->next_progress_ms = gp_now_ms() + 500;
	char msg[300];
	snprintf(msg, sizeof msg, "%lld files, %lld documents: %.200s", c->files_done,
		 c->res->documents, what);
	c->progress(c->pctx, c->files_done, msg);
}

/* Read a whole file (gunzipped when its name ends in .gz) up to max bytes. */
static gp_status read_file(int fd, const char *name, long long max, unsigned char **out,
			   size_t *len, struct gp_err *err)
{
	size_t n = strlen(name);
	int gz = n > 3 && !strcmp(name + n - 3, ".gz");
	size_t cap = 65536, got = 0;
	unsigned char *buf = malloc(cap);
	gzFile g = NULL;
	if (!buf) {
		close(fd);
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	}
	if (gz) {
		g = gzdopen(fd, "rb");
		if (!g) {
			close(fd);
			free(buf);
			return gp_err_set(err, GP_ERR_IO, "could not open gzip stream");
		}
	}
	gp_status st = GP_OK;
	for (;;) {
		if (got == cap) {
			if ((long long)cap > max) {
				st = gp_err_set(err, GP_ERR_TOO_BIG, "larger than %lld bytes", max);
				break;
			}
			unsigned char *nb = realloc(buf, cap * 2);
			if (!nb) {
				st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
				break;
			}
			buf = nb;
			cap *= 2;
		}
		long k = gz ? gzread(g, buf + got, (unsigned)(cap - got > (1u << 30) ? (1u << 30)
										    : cap - got))
			    : (long)read(fd, buf + got, cap - got);
		if (k < 0 && !gz && errno == EINTR)
			continue;
		if (k < 0) {
			int ge = 0;
			st = gp_err_set(err, GP_ERR_IO, "read: %s",
					gz ? gzerror(g, &ge) : strerror(errno));
			break;
		}
		if (k == 0)
			break;
		got += (size_t)k;
		if ((long long)got > max) {
			st = gp_err_set(err, GP_ERR_TOO_BIG, "larger than %lld bytes", max);
			break;
		}
	}
	if (gz)
		gzclose(g);
	else
		close(fd);
	if (st) {
		free(buf);
		return st;
	}
	*out = buf;
	*len = got;
	return GP_OK;
}

static int matches(const cJSON *pats, const char *rel, const char *name)
{
	for (const cJSON *c = pats ? pats->child : NULL; c; c = c->next) {
		const char *pat = c->valuestring;
		if (strchr(pat, '/') ? !fnmatch(pat, rel, FNM_PATHNAME) : !fnmatch(pat, name, 0))
			return 1;
	}
	return 0;
}

static int name_cmp(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

struct path_source {
	int rootfd;
	char root[4096];
	const char *pattern; /* from the source itself (glob or file name); may be NULL */
	const char *label;   /* the source as written */
};

/* One candidate file beneath the root. */
static gp_status visit_file(struct collect *c, const struct path_source *ps, const char *rel,
			    const char *name, struct gp_err *err)
{
	if (ps->pattern && fnmatch(ps->pattern, rel, FNM_PATHNAME))
		return GP_OK;
	if (c->o->include && !matches(c->o->include, rel, name))
		return GP_OK;
	if (c->o->exclude && matches(c->o->exclude, rel, name))
		return GP_OK;
	if (c->files_total++ >= MAX_FILES)
		return gp_err_set(err, GP_ERR_TOO_BIG, "more than %d files under \"%.200s\"",
				  MAX_FILES, ps->root);
	struct stat sb;
	int fd = gp_beneath_open(ps->rootfd, rel, O_RDONLY | O_NOCTTY | O_NONBLOCK);
	char source[4096 + 8];
	snprintf(source, sizeof source, "%s/%s", ps->root, rel);
	if (fd < 0) {
		if (errno == EXDEV || errno == ELOOP) {
			gp_warn("ingest: refused \"%s\": it resolves outside \"%s\"", source,
				ps->root);
			drop(c, "outside_root");
		} else {
			gp_warn("ingest: could not open \"%s\": %s", source, strerror(errno));
			drop(c, "unreadable");
		}
		return GP_OK;
	}
	if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
		close(fd);
		return GP_OK; /* a symlink to a directory, a device, ... */
	}
	if (c->fp) {
		char line[4096 + 160];
		int n = snprintf(line, sizeof line, "%s\t%lld\t%lld.%09ld\t%lld.%09ld\t%llu\n", rel,
				 (long long)sb.st_size, (long long)sb.st_mtim.tv_sec,
				 sb.st_mtim.tv_nsec, (long long)sb.st_ctim.tv_sec,
				 sb.st_ctim.tv_nsec, (unsigned long long)sb.st_ino);
		EVP_DigestUpdate(c->fp, line, (size_t)n);
	}
	if (c->fingerprint_only) {
		close(fd);
		return GP_OK;
	}
	c->files_done++;
	c->res->files++;
	bump(c->src, "files", 1);
	unsigned char *buf = NULL;
	size_t len = 0;
	long long limit = c->o->split == SPLIT_FILE ? c->o->max_doc : c->o->max_total;
	struct gp_err rerr = { 0 };
	if (read_file(fd, name, limit, &buf, &len, &rerr)) {
		if (rerr.status == GP_ERR_NOMEM)
			return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		gp_warn("ingest: \"%s\": %s", source, rerr.msg);
		drop(c, rerr.status == GP_ERR_TOO_BIG ? "too_large" : "unreadable");
		return GP_OK;
	}
	gp_status st = split_docs(c, source, buf, len, err);
	free(buf);
	maybe_progress(c, source);
	return st;
}

static gp_status walk_dir(struct collect *c, const struct path_source *ps, const char *rel,
			  int depth, struct gp_err *err)
{
	if (depth > MAX_DEPTH)
		return gp_err_set(err, GP_ERR_TOO_BIG, "directories nest deeper than %d under \"%s\"",
				  MAX_DEPTH, ps->root);
	int fd = *rel ? gp_beneath_open(ps->rootfd, rel, O_RDONLY | O_DIRECTORY | O_NOFOLLOW)
		      : openat(ps->rootfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0) {
		gp_warn("ingest: skipped directory \"%s/%s\": %s", ps->root, rel, strerror(errno));
		return GP_OK;
	}
	DIR *d = fdopendir(fd);
	if (!d) {
		close(fd);
		return gp_err_set(err, GP_ERR_IO, "could not list \"%s/%s\": %s", ps->root, rel,
				  strerror(errno));
	}
	char **names = NULL;
	size_t n = 0, cap = 0;
	gp_status st = GP_OK;
	for (struct dirent *de; (de = readdir(d));) {
		if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
			continue;
		if (n == cap) {
			cap = cap ? cap * 2 : 64;
			char **nn = realloc(names, cap * sizeof *nn);
			if (!nn) {
				st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
				break;
			}
			names = nn;
		}
		if (!(names[n] = strdup(de->d_name))) {
			st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
			break;
		}
		n++;
	}
	qsort(names, n, sizeof *names, name_cmp);
	for (size_t i = 0; i < n && !st; i++) {
		char sub[4096];
		if ((size_t)snprintf(sub, sizeof sub, "%s%s%s", rel, *rel ? "/" : "", names[i]) >=
		    sizeof sub)
			continue;
		struct stat sb;
		if (fstatat(dirfd(d), names[i], &sb, AT_SYMLINK_NOFOLLOW) != 0)
			continue;
		if (S_ISDIR(sb.st_mode))
			st = walk_dir(c, ps, sub, depth + 1, err);
		else if (S_ISREG(sb.st_mode) || S_ISLNK(sb.st_mode))
			st = visit_file(c, ps, sub, names[i], err);
	}
	for (size_t i = 0; i < n; i++)
		free(names[i]);
	free(names);
	closedir(d);
	return st;
}

/* Whether path (a real path) is one of the roots or beneath one. */
static int under_roots(const char *path, const char *roots)
{
	const char *p = roots;
	while (p && *p) {
		const char *e = strchr(p, ':');
		size_t n = e ? (size_t)(e - p) : strlen(p);
		while (n > 1 && p[n - 1] == '/')
			n--;
		if (n > 0 && !strncmp(path, p, n) &&
		    (path[n] == '\0' || path[n] == '/' || (n == 1 && p[0] == '/')))
			return 1;
		p = e ? e + 1 : NULL;
	}
	return 0;
}

static gp_status path_source(struct collect *c, const char *src, struct gp_err *err)
{
	const char *path = !strncmp(src, "file://", 7) ? src + 7 : src;
	if (path[0] != '/')
		return gp_err_set(err, GP_ERR_INVALID,
				  "source \"%.200s\": a path must be absolute", src);
	if (gp_path_escapes(path + 1))
		return gp_err_set(err, GP_ERR_INVALID,
				  "source \"%.200s\": \"..\" is not allowed in a path", src);
	struct path_source ps = { .label = src };
	char dir[4096];
	snprintf(dir, sizeof dir, "%s", path);
	const char *wild = strpbrk(path, "*?[");
	char pattern[4096] = "";
	if (wild) {
		/* root: the directory before the first wildcard */
		size_t cut = (size_t)(wild - path);
		while (cut > 0 && path[cut - 1] != '/')
			cut--;
		snprintf(pattern, sizeof pattern, "%s", path + cut);
		dir[cut > 1 ? cut - 1 : 1] = '\0';
		ps.pattern = pattern;
	} else {
		struct stat sb;
		if (stat(path, &sb) != 0)
			return gp_err_set(err, GP_ERR_INVALID, "source \"%.200s\": %s", src,
					  strerror(errno));
		if (!S_ISDIR(sb.st_mode)) {
			char *slash = strrchr(dir, '/');
			snprintf(pattern, sizeof pattern, "%s", slash + 1);
			/* match the name literally */
			char lit[4096 * 2];
			size_t w = 0;
			for (const char *q = pattern; *q && w + 2 < sizeof lit; q++) {
				if (strchr("*?[]\\", *q))
					lit[w++] = '\\';
				lit[w++] = *q;
			}
			lit[w] = '\0';
			snprintf(pattern, sizeof pattern, "%s", lit);
			*(slash == dir ? slash + 1 : slash) = '\0';
			ps.pattern = pattern;
		}
	}
	ps.rootfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (ps.rootfd < 0)
		return gp_err_set(err, GP_ERR_INVALID, "source \"%.200s\": cannot open \"%s\": %s",
				  src, dir, strerror(errno));
	/* where the root really is, read from the open descriptor (no race) */
	char proc[64];
	snprintf(proc, sizeof proc, "/proc/self/fd/%d", ps.rootfd);
	ssize_t k = readlink(proc, ps.root, sizeof ps.root - 1);
	if (k <= 0) {
		close(ps.rootfd);
		return gp_err_set(err, GP_ERR_IO, "source \"%.200s\": cannot resolve its directory",
				  src);
	}
	ps.root[k] = '\0';
	if (!under_roots(ps.root, c->cfg->roots)) {
		close(ps.rootfd);
		return gp_err_set(err, GP_ERR_INVALID,
				  "source \"%.200s\": \"%s\" is not under the service's allowed "
				  "roots (%s)",
				  src, ps.root, c->cfg->roots ? c->cfg->roots : "none");
	}
	if (c->fp) {
		EVP_DigestUpdate(c->fp, "path\t", 5);
		EVP_DigestUpdate(c->fp, ps.root, strlen(ps.root));
		EVP_DigestUpdate(c->fp, "\n", 1);
	}
	gp_status st = walk_dir(c, &ps, "", 0, err);
	close(ps.rootfd);
	return st;
}

static gp_status url_source(struct collect *c, const char *src, struct gp_err *err)
{
	if (c->fp) {
		/* a URL's content can change without notice: never reuse */
		EVP_MD_CTX_free(c->fp);
		c->fp = NULL;
	}
	if (c->fingerprint_only)
		return GP_OK;
	uint8_t *body = NULL;
	size_t len = 0;
	char final[2048];
	struct gp_fetch_options fo = c->o->fetch;
	long long room = c->o->max_total - c->res->bytes;
	fo.max_bytes = (size_t)(room > 0 ? room : 1);
	gp_status st = gp_fetch(src, &fo, &body, &len, final, sizeof final, err);
	if (st)
		return gp_err_wrap(err, "source \"%.200s\"", src);
	c->files_done++;
	bump(c->src, "files", 1);
	st = split_docs(c, final, body, len, err);
	free(body);
	maybe_progress(c, src);
	return st;
}

static gp_status feedback_source(struct collect *c, struct gp_db *db, const char *model,
				 struct gp_err *err)
{
	if (!*model || !db)
		return gp_err_set(err, GP_ERR_INVALID, "source \"feedback:%s\": %s", model,
				  *model ? "no database" : "name a model");
	const char *p[] = { model };
	PGresult *r = NULL;
	gp_status st = gp_db_exec(db, "read feedback corrections",
				  "SELECT id, prompt, correction FROM feedback_corrections "
				  "WHERE model = $1 ORDER BY id",
				  1, p, &r, err);
	if (st)
		return st;
	int n = PQntuples(r);
	if (c->fp) {
		char line[600];
		int k = snprintf(line, sizeof line, "feedback\t%s\t%d\t%s\n", model, n,
				 n ? PQgetvalue(r, n - 1, 0) : "0");
		EVP_DigestUpdate(c->fp, line, (size_t)k);
	}
	for (int i = 0; i < n && !c->fingerprint_only && !st; i++) {
		const char *prompt = PQgetvalue(r, i, 1), *corr = PQgetvalue(r, i, 2);
		size_t pl = strlen(prompt), cl = strlen(corr);
		char *text = malloc(pl + cl + 1);
		if (!text) {
			st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
			break;
		}
		memcpy(text, prompt, pl);
		memcpy(text + pl, corr, cl + 1);
		char source[600];
		snprintf(source, sizeof source, "feedback:%s#%s", model, PQgetvalue(r, i, 0));
		st = add_doc(c, source, (unsigned char *)text, pl + cl, err);
		free(text);
	}
	PQclear(r);
	return st;
}

/*
 * drifted:MODEL: the prompts of MODEL's logged requests (inference_events)
 * served inside drift windows that raised an alert, newest first, at most
 * DRIFTED_MAX: a sample of what the served model was asked that it did not
 * expect, for a retraining run.
 */
#define DRIFTED_MAX 5000
static gp_status drifted_source(struct collect *c, struct gp_db *db, const char *model,
				struct gp_err *err)
{
	if (!*model || !db)
		return gp_err_set(err, GP_ERR_INVALID, "source \"drifted:%s\": %s", model,
				  *model ? "no database" : "name a model");
	char lim[16];
	snprintf(lim, sizeof lim, "%d", DRIFTED_MAX);
	const char *p[] = { model, lim };
	PGresult *r = NULL;
	gp_status st = gp_db_exec(
		db, "read drifted prompts",
		"SELECT DISTINCT ON (e.id) e.id, e.prompt FROM inference_events e "
		"JOIN models m ON m.name = e.model "
		"JOIN model_versions v ON v.model_id = m.id AND v.version = e.version "
		"JOIN drift_windows w ON w.model_version_id = v.id AND e.served_at BETWEEN "
		"w.window_start AND w.window_end "
		"WHERE e.model = $1 AND e.prompt IS NOT NULL AND e.prompt <> '' AND EXISTS "
		"(SELECT 1 FROM alerts a WHERE a.drift_window_id = w.id) "
		"ORDER BY e.id DESC LIMIT $2::int",
		2, p, &r, err);
	if (st)
		return st;
	int n = PQntuples(r);
	if (c->fp) {
		char line[600];
		int k = snprintf(line, sizeof line, "drifted\t%s\t%d\t%s\n", model, n,
				 n ? PQgetvalue(r, 0, 0) : "0");
		EVP_DigestUpdate(c->fp, line, (size_t)k);
	}
	for (int i = n - 1; i >= 0 && !c->fingerprint_only && !st; i--) {
		char source[600];
		snprintf(source, sizeof source, "drifted:%s#%s", model, PQgetvalue(r, i, 0));
		const char *text = PQgetvalue(r, i, 1);
		st = add_doc(c, source, (const unsigned char *)text, strlen(text), err);
	}
	PQclear(r);
	return st;
}

gp_status gp_ingest_collect(const cJSON *params, const struct gp_ingest_config *cfg,
			    struct gp_db *db, int fingerprint_only,
			    void (*progress)(void *ctx, long long files_read, const char *msg),
			    void *ctx, struct gp_ingest_result *res, struct gp_err *err)
{
	struct opts o;
	struct collect c = { .o = &o, .cfg = cfg, .res = res, .fingerprint_only = fingerprint_only,
			     .progress = progress, .pctx = ctx };
	memset(res, 0, sizeof *res);
	res->dropped = cJSON_CreateObject();
	res->sources = cJSON_CreateArray();
	c.fp = EVP_MD_CTX_new();
	gp_status st = parse_opts(params, &o, err);
	if (st)
		goto out;
	if (!res->dropped || !res->sources || !c.fp || !EVP_DigestInit_ex(c.fp, EVP_sha256(), NULL)) {
		st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
		goto out;
	}
	if (!fingerprint_only) {
		uint8_t h[8];
		gp_dataset_header(h);
		if ((st = gp_buf_append(&res->data, h, 8, err)))
			goto out;
	}
	for (const cJSON *s = o.sources->child; s && !st; s = s->next) {
		const char *src = s->valuestring;
		c.src = cJSON_CreateObject();
		if (!c.src || !cJSON_AddStringToObject(c.src, "source", src)) {
			cJSON_Delete(c.src);
			st = gp_err_set(err, GP_ERR_NOMEM, "out of memory");
			break;
		}
		cJSON_AddItemToArray(res->sources, c.src);
		bump(c.src, "documents", 0);
		bump(c.src, "bytes", 0);
		if (!strncmp(src, "http://", 7) || !strncmp(src, "https://", 8))
			st = url_source(&c, src, err);
		else if (!strncmp(src, "feedback:", 9))
			st = feedback_source(&c, db, src + 9, err);
		else if (!strncmp(src, "drifted:", 8))
			st = drifted_source(&c, db, src + 8, err);
		else if (strstr(src, "://") && strncmp(src, "file://", 7))
			st = gp_err_set(err, GP_ERR_INVALID,
					"source \"%.200s\": only paths, file://, http(s)://, "
					"feedback: and drifted: sources are supported",
					src);
		else
			st = path_source(&c, src, err);
	}
	if (!st && !fingerprint_only) {
		uint8_t t[12];
		gp_dataset_trailer((uint64_t)res->documents, t);
		st = gp_buf_append(&res->data, t, 12, err);
	}
	if (!st && c.fp) {
		unsigned char md[32];
		unsigned int mdlen = 0;
		EVP_DigestFinal_ex(c.fp, md, &mdlen);
		for (int i = 0; i < 32; i++)
			sprintf(res->fingerprint + 2 * i, "%02x", md[i]);
	}
	res->files_seen = c.files_total;
out:
	EVP_MD_CTX_free(c.fp);
	free(c.seen.h);
	free(c.fix);
	free(o.allow_hosts);
	if (st)
		gp_ingest_result_free(res);
	return st;
}

void gp_ingest_result_free(struct gp_ingest_result *res)
{
	free(res->data.p);
	cJSON_Delete(res->dropped);
	cJSON_Delete(res->sources);
	memset(res, 0, sizeof *res);
}

/* ---- the stage handler ---- */

struct progress_ctx {
	struct gp_job *job;
	long long total; /* files the fingerprint pass matched */
};

static void job_progress(void *ctx, long long files_read, const char *msg)
{
	const struct progress_ctx *p = ctx;
	gp_job_progress(p->job, p->total > 0 ? (double)files_read / (double)p->total : 0, msg,
			NULL);
}

/* Outputs reusable when both artifacts they name are still in the store. */
static int outputs_present(struct gp_store *store, const char *outputs)
{
	cJSON *o = cJSON_Parse(outputs);
	char h1[65], h2[65];
	int ok = o &&
		 !gp_artifact_ref_parse(
			 cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(o, "dataset")), h1) &&
		 !gp_artifact_ref_parse(
			 cJSON_GetStringValue(cJSON_GetObjectItemCaseSensitive(o, "data")), h2) &&
		 gp_store_has(store, h1) && gp_store_has(store, h2);
	cJSON_Delete(o);
	return ok;
}

void gp_ingest_handle(struct gp_job *job, void *closure)
{
	const struct gp_ingest_config *cfg = closure;
	const gp_stage_job *m = gp_job_msg(job);
	struct gp_db *db = gp_job_db(job);
	struct gp_err err = { 0 };
	struct gp_ingest_result res;
	cJSON *p = cJSON_Parse(m->params_json && *m->params_json ? m->params_json : "{}");
	cJSON *manifest = NULL, *out = NULL;
	char *mtext = NULL, *otext = NULL, *metrics = NULL;
	if (!cJSON_IsObject(p)) {
		gp_job_fail(job, 1, "params are not a JSON object");
		goto done;
	}
	/* 1. unchanged inputs: reuse the previous dataset */
	if (gp_ingest_collect(p, cfg, db, 1, NULL, NULL, &res, &err)) {
		gp_job_fail(job, err.status == GP_ERR_INVALID, err.msg);
		goto done;
	}
	if (res.fingerprint[0]) {
		char *prev = NULL;
		long long from = 0;
		if (gp_job_reuse_lookup(job, res.fingerprint, &prev, &from, &err)) {
			gp_ingest_result_free(&res);
			gp_job_fail(job, 0, err.msg);
			goto done;
		}
		if (prev && outputs_present(cfg->store, prev)) {
			gp_info("ingest: run %lld stage %s: inputs unchanged, reusing attempt %lld",
				(long long)m->run_id, m->stage, from);
			gp_job_succeed_reused(job, prev, from);
			free(prev);
			gp_ingest_result_free(&res);
			goto done;
		}
		free(prev);
	}
	struct progress_ctx pc = { job, res.files_seen };
	gp_ingest_result_free(&res);
	/* 2. read everything */
	if (gp_ingest_collect(p, cfg, db, 0, job_progress, &pc, &res, &err)) {
		gp_job_fail(job, err.status == GP_ERR_INVALID || err.status == GP_ERR_TOO_BIG,
			    err.msg);
		goto done;
	}
	if (gp_job_should_stop(job)) {
		gp_ingest_result_free(&res);
		gp_job_release(job, "stopping");
		goto done;
	}
	char data_hash[65], man_hash[65], ref[GP_ARTIFACT_REF_MAX];
	if (gp_store_put(cfg->store, res.data.p, res.data.len, data_hash, &err)) {
		gp_ingest_result_free(&res);
		gp_job_fail(job, 0, err.msg);
		goto done;
	}
	manifest = cJSON_CreateObject();
	snprintf(ref, sizeof ref, "sha256:%s", data_hash);
	cJSON_AddStringToObject(manifest, "format", "genpipe-dataset/1");
	cJSON_AddStringToObject(manifest, "data", ref);
	cJSON_AddNumberToObject(manifest, "documents", (double)res.documents);
	cJSON_AddNumberToObject(manifest, "bytes", (double)res.bytes);
	cJSON_AddNumberToObject(manifest, "files", (double)res.files);
	cJSON_AddNumberToObject(manifest, "utf8_replaced", (double)res.utf8_replaced);
	cJSON_AddItemToObject(manifest, "dropped", cJSON_Duplicate(res.dropped, 1));
	cJSON_AddItemToObject(manifest, "sources", cJSON_Duplicate(res.sources, 1));
	mtext = cJSON_PrintUnformatted(manifest);
	if (!mtext || gp_store_put(cfg->store, mtext, strlen(mtext), man_hash, &err)) {
		gp_ingest_result_free(&res);
		gp_job_fail(job, 0, mtext ? err.msg : "out of memory");
		goto done;
	}
	char meta[128];
	snprintf(meta, sizeof meta, "{\"documents\":%lld,\"bytes\":%lld}", res.documents,
		 res.bytes);
	if (gp_artifact_register(db, cfg->store, data_hash, "documents", res.data.len,
				 (long long)m->run_id, m->stage, meta, &err) ||
	    gp_artifact_register(db, cfg->store, man_hash, "dataset", strlen(mtext),
				 (long long)m->run_id, m->stage, meta, &err)) {
		gp_ingest_result_free(&res);
		gp_job_fail(job, 0, err.msg);
		goto done;
	}
	out = cJSON_CreateObject();
	snprintf(ref, sizeof ref, "sha256:%s", man_hash);
	cJSON_AddStringToObject(out, "dataset", ref);
	snprintf(ref, sizeof ref, "sha256:%s", data_hash);
	cJSON_AddStringToObject(out, "data", ref);
	cJSON_AddNumberToObject(out, "documents", (double)res.documents);
	otext = cJSON_PrintUnformatted(out);
	/* metrics: the manifest without its sources list */
	cJSON_DeleteItemFromObjectCaseSensitive(manifest, "sources");
	cJSON_DeleteItemFromObjectCaseSensitive(manifest, "format");
	metrics = cJSON_PrintUnformatted(manifest);
	gp_info("ingest: run %lld stage %s: %lld documents, %lld bytes from %lld files",
		(long long)m->run_id, m->stage, res.documents, res.bytes, res.files);
	gp_ingest_result_free(&res);
	if (!otext || !metrics)
		gp_job_fail(job, 0, "out of memory");
	else
		gp_job_succeed(job, otext, metrics);
done:
	cJSON_Delete(p);
	cJSON_Delete(manifest);
	cJSON_Delete(out);
	free(mtext);
	free(otext);
	free(metrics);
}
