/*
 * artifact.c: the content-addressed store (see artifact.h).
 */
#include "artifact.h"
#include "file.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#define PATHMAX 4096

struct gp_store {
	char root[PATHMAX - 128];
};

struct gp_store_writer {
	struct gp_store *s;
	int fd;
	char tmp[PATHMAX];
	EVP_MD_CTX *md;
	size_t size;
};

gp_status gp_store_open(struct gp_store **out, const char *uri, struct gp_err *err)
{
	const char *path = uri;
	if (!strncmp(uri, "file://", 7))
		path = uri + 7;
	else if (strstr(uri, "://"))
		return gp_err_set(err, GP_ERR_INVALID,
				  "artifact store \"%s\": only file:// stores are supported", uri);
	if (path[0] != '/')
		return gp_err_set(err, GP_ERR_INVALID,
				  "artifact store \"%s\": the path must be absolute", uri);
	struct gp_store *s = calloc(1, sizeof *s);
	if (!s)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	if (strlen(path) >= sizeof s->root) {
		free(s);
		return gp_err_set(err, GP_ERR_INVALID, "artifact store path is too long");
	}
	snprintf(s->root, sizeof s->root, "%s", path);
	char tmp[PATHMAX];
	snprintf(tmp, sizeof tmp, "%s/tmp", s->root);
	gp_status st = gp_file_mkdirs(tmp, 0755, err);
	if (!st) {
		snprintf(tmp, sizeof tmp, "%s/sha256", s->root);
		st = gp_file_mkdirs(tmp, 0755, err);
	}
	if (st) {
		free(s);
		return st;
	}
	*out = s;
	return GP_OK;
}

gp_status gp_store_open_in(struct gp_store **out, const char *uri, const char *data_dir,
			   struct gp_err *err)
{
	if (uri && *uri)
		return gp_store_open(out, uri, err);
	char def[PATHMAX];
	if ((size_t)snprintf(def, sizeof def, "file://%s/artifacts", data_dir) >= sizeof def)
		return gp_err_set(err, GP_ERR_INVALID, "data directory path is too long");
	return gp_store_open(out, def, err);
}

void gp_store_close(struct gp_store *s)
{
	free(s);
}

static int valid_hex(const char *h)
{
	for (int i = 0; i < 64; i++)
		if (!((h[i] >= '0' && h[i] <= '9') || (h[i] >= 'a' && h[i] <= 'f')))
			return 0;
	return h[64] == '\0';
}

int gp_artifact_ref_parse(const char *ref, char hash[65])
{
	if (!ref || strncmp(ref, "sha256:", 7) || strlen(ref) != 71 || !valid_hex(ref + 7))
		return -1;
	memcpy(hash, ref + 7, 65);
	return 0;
}

static void obj_path(const struct gp_store *s, const char *hash, char *out, size_t len)
{
	snprintf(out, len, "%s/sha256/%.2s/%s", s->root, hash, hash);
}

void gp_store_uri(const struct gp_store *s, const char *hash, char *out, size_t len)
{
	char p[PATHMAX];
	obj_path(s, hash, p, sizeof p);
	snprintf(out, len, "file://%s", p);
}

gp_status gp_store_local_path(const struct gp_store *s, const char *hash, char *out, size_t len,
			      struct gp_err *err)
{
	if (!valid_hex(hash))
		return gp_err_set(err, GP_ERR_INVALID, "\"%s\" is not a SHA-256 in hex", hash);
	obj_path(s, hash, out, len);
	return GP_OK;
}

int gp_store_has(struct gp_store *s, const char *hash)
{
	char p[PATHMAX];
	if (!valid_hex(hash))
		return 0;
	obj_path(s, hash, p, sizeof p);
	return access(p, F_OK) == 0;
}

gp_status gp_store_writer_open(struct gp_store *s, struct gp_store_writer **out,
			       struct gp_err *err)
{
	struct gp_store_writer *w = calloc(1, sizeof *w);
	if (!w)
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	unsigned char rnd[8];
	if (getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd) {
		free(w);
		return gp_err_set(err, GP_ERR_IO, "getrandom: %s", strerror(errno));
	}
	snprintf(w->tmp, sizeof w->tmp, "%s/tmp/%02x%02x%02x%02x%02x%02x%02x%02x.part", s->root,
		 rnd[0], rnd[1], rnd[2], rnd[3], rnd[4], rnd[5], rnd[6], rnd[7]);
	w->fd = open(w->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	if (w->fd < 0) {
		gp_status st = gp_err_set(err, GP_ERR_IO, "could not create \"%s\": %s", w->tmp,
					  strerror(errno));
		free(w);
		return st;
	}
	w->md = EVP_MD_CTX_new();
	if (!w->md || !EVP_DigestInit_ex(w->md, EVP_sha256(), NULL)) {
		gp_store_writer_abort(w);
		return gp_err_set(err, GP_ERR_NOMEM, "could not start SHA-256");
	}
	w->s = s;
	*out = w;
	return GP_OK;
}

gp_status gp_store_writer_write(struct gp_store_writer *w, const void *data, size_t len,
				struct gp_err *err)
{
	const char *p = data;
	EVP_DigestUpdate(w->md, data, len);
	w->size += len;
	while (len) {
		ssize_t k = write(w->fd, p, len);
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			return gp_err_set(err, GP_ERR_IO, "could not write \"%s\": %s", w->tmp,
					  strerror(k < 0 ? errno : EIO));
		p += k;
		len -= (size_t)k;
	}
	return GP_OK;
}

void gp_store_writer_abort(struct gp_store_writer *w)
{
	if (!w)
		return;
	if (w->fd >= 0) {
		close(w->fd);
		unlink(w->tmp);
	}
	EVP_MD_CTX_free(w->md);
	free(w);
}

static gp_status fsync_dir(const char *dir, struct gp_err *err)
{
	int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return gp_err_set(err, GP_ERR_IO, "could not open \"%s\": %s", dir, strerror(errno));
	int r = fsync(fd);
	int e = errno;
	close(fd);
	if (r != 0)
		return gp_err_set(err, GP_ERR_IO, "fsync \"%s\": %s", dir, strerror(e));
	return GP_OK;
}

gp_status gp_store_writer_commit(struct gp_store_writer *w, char hash[65], size_t *size,
				 struct gp_err *err)
{
	unsigned char md[32];
	unsigned int mdlen = 0;
	gp_status st = GP_OK;
	EVP_DigestFinal_ex(w->md, md, &mdlen);
	for (int i = 0; i < 32; i++)
		sprintf(hash + 2 * i, "%02x", md[i]);
	hash[64] = '\0';
	if (size)
		*size = w->size;
	if (fsync(w->fd) != 0) {
		st = gp_err_set(err, GP_ERR_IO, "fsync \"%s\": %s", w->tmp, strerror(errno));
		goto out;
	}
	char dir[PATHMAX], dst[PATHMAX];
	snprintf(dir, sizeof dir, "%s/sha256/%.2s", w->s->root, hash);
	if ((st = gp_file_mkdirs(dir, 0755, err)))
		goto out;
	obj_path(w->s, hash, dst, sizeof dst);
	if (access(dst, F_OK) == 0)
		goto out; /* same name, same bytes: keep the existing object */
	if (rename(w->tmp, dst) != 0) {
		st = gp_err_set(err, GP_ERR_IO, "could not rename \"%s\" to \"%s\": %s", w->tmp,
				dst, strerror(errno));
		goto out;
	}
	w->tmp[0] = '\0';
	st = fsync_dir(dir, err);
out:
	close(w->fd);
	if (w->tmp[0])
		unlink(w->tmp);
	EVP_MD_CTX_free(w->md);
	free(w);
	return st;
}

gp_status gp_store_put(struct gp_store *s, const void *data, size_t len, char hash[65],
		       struct gp_err *err)
{
	struct gp_store_writer *w;
	gp_status st = gp_store_writer_open(s, &w, err);
	if (st)
		return st;
	if ((st = gp_store_writer_write(w, data, len, err))) {
		gp_store_writer_abort(w);
		return st;
	}
	return gp_store_writer_commit(w, hash, NULL, err);
}

gp_status gp_store_get(struct gp_store *s, const char *hash, size_t max_len, uint8_t **data,
		       size_t *len, struct gp_err *err)
{
	if (!valid_hex(hash))
		return gp_err_set(err, GP_ERR_INVALID, "\"%.80s\" is not a SHA-256 in hex", hash);
	char p[PATHMAX];
	obj_path(s, hash, p, sizeof p);
	int fd = open(p, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0)
		return gp_err_set(err, errno == ENOENT ? GP_ERR_NOT_FOUND : GP_ERR_IO,
				  "artifact sha256:%s: %s", hash, strerror(errno));
	struct stat sb;
	if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
		close(fd);
		return gp_err_set(err, GP_ERR_IO, "artifact sha256:%s is not a regular file", hash);
	}
	if ((unsigned long long)sb.st_size > max_len) {
		close(fd);
		return gp_err_set(err, GP_ERR_TOO_BIG,
				  "artifact sha256:%s has %lld bytes, more than the limit of %zu",
				  hash, (long long)sb.st_size, max_len);
	}
	size_t n = (size_t)sb.st_size, got = 0;
	uint8_t *buf = malloc(n ? n : 1);
	if (!buf) {
		close(fd);
		return gp_err_set(err, GP_ERR_NOMEM, "out of memory");
	}
	while (got < n) {
		ssize_t k = read(fd, buf + got, n - got);
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			break;
		got += (size_t)k;
	}
	close(fd);
	char h[65];
	gp_sha256_hex(buf, got, h);
	if (got != n || strcmp(h, hash)) {
		free(buf);
		return gp_err_set(err, GP_ERR_INVALID,
				  "artifact sha256:%s is corrupt: its bytes hash to %s", hash, h);
	}
	*data = buf;
	*len = n;
	return GP_OK;
}

gp_status gp_artifact_register(struct gp_db *db, struct gp_store *s, const char *hash,
			       const char *kind, size_t size, long long run_id, const char *stage,
			       const char *meta_json, struct gp_err *err)
{
	char uri[PATHMAX + 16], sz[24], rid[24];
	gp_store_uri(s, hash, uri, sizeof uri);
	snprintf(sz, sizeof sz, "%zu", size);
	snprintf(rid, sizeof rid, "%lld", run_id);
	const char *p[] = { hash, uri, kind, sz, run_id > 0 ? rid : NULL, stage,
			    meta_json ? meta_json : "{}" };
	return gp_db_exec(db, "register artifact",
			  "INSERT INTO artifacts (content_hash, uri, kind, size_bytes, run_id, stage, "
			  "meta) VALUES ($1, $2, $3, $4::bigint, $5::bigint, $6, $7::jsonb) "
			  "ON CONFLICT (content_hash) DO NOTHING",
			  7, p, NULL, err);
}
