/* file.c: see file.h. */
#include "file.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

gp_status gp_file_mkdirs(const char *path, mode_t mode, struct gp_err *err)
{
	char buf[PATH_MAX];
	if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf)
		return gp_err_set(err, GP_ERR_INVALID, "path too long: \"%s\"", path);
	for (char *p = buf + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = '\0';
		if (mkdir(buf, 0755) != 0 && errno != EEXIST)
			return gp_err_set(err, GP_ERR_IO, "could not create directory \"%s\": %s", buf,
					  strerror(errno));
		*p = '/';
	}
	if (mkdir(buf, mode) != 0 && errno != EEXIST)
		return gp_err_set(err, GP_ERR_IO, "could not create directory \"%s\": %s", buf,
				  strerror(errno));
	return GP_OK;
}

gp_status gp_file_write_atomic(const char *path, const void *data, size_t len, mode_t mode,
			       struct gp_err *err)
{
	char tmp[PATH_MAX], dir[PATH_MAX];
	if (snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid()) >= (int)sizeof tmp)
		return gp_err_set(err, GP_ERR_INVALID, "path too long: \"%s\"", path);
	int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
	if (fd < 0)
		return gp_err_set(err, GP_ERR_IO, "could not create \"%s\": %s", tmp, strerror(errno));
	const uint8_t *p = data;
	size_t off = 0;
	int e = 0;
	while (off < len && !e) {
		ssize_t w = write(fd, p + off, len - off);
		if (w > 0)
			off += (size_t)w;
		else if (!(w < 0 && errno == EINTR))
			e = w < 0 ? errno : EIO;
	}
	if (!e && fsync(fd) != 0)
		e = errno;
	if (close(fd) != 0 && !e)
		e = errno;
	if (!e && rename(tmp, path) != 0)
		e = errno;
	if (e) {
		unlink(tmp);
		return gp_err_set(err, GP_ERR_IO, "could not write \"%s\": %s", path, strerror(e));
	}
	snprintf(dir, sizeof dir, "%s", path);
	char *slash = strrchr(dir, '/');
	if (slash == dir)
		slash[1] = '\0';
	else if (slash)
		*slash = '\0';
	else
		snprintf(dir, sizeof dir, ".");
	int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd >= 0) {
		fsync(dfd); /* best effort: the rename is done either way */
		close(dfd);
	}
	return GP_OK;
}

gp_status gp_file_read(const char *path, size_t max_len, uint8_t **data, size_t *len,
		       struct gp_err *err)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return gp_err_set(err, errno == ENOENT ? GP_ERR_NOT_FOUND : GP_ERR_IO,
				  "could not open \"%s\": %s", path, strerror(errno));
	struct stat sb;
	if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
		close(fd);
		return gp_err_set(err, GP_ERR_IO, "\"%s\" is not a regular file", path);
	}
	if ((unsigned long long)sb.st_size > max_len) {
		close(fd);
		return gp_err_set(err, GP_ERR_TOO_BIG, "\"%s\" is larger than %zu bytes", path,
				  max_len);
	}
	size_t n = (size_t)sb.st_size, off = 0;
	uint8_t *b = malloc(n + 1);
	if (!b) {
		close(fd);
		return gp_err_set(err, GP_ERR_NOMEM, "cannot read \"%s\" (%zu bytes)", path, n);
	}
	while (off < n) {
		ssize_t r = read(fd, b + off, n - off);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			break;
		off += (size_t)r;
	}
	close(fd);
	if (off != n) {
		free(b);
		return gp_err_set(err, GP_ERR_IO, "could not read \"%s\": short read", path);
	}
	b[n] = '\0';
	*data = b;
	*len = n;
	return GP_OK;
}
