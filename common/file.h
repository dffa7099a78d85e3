/*
 * file.h: the few file-system steps several modules need, done one way:
 * creating a directory path, replacing a file atomically, reading a file
 * whole under a size limit. Messages name the path and the reason.
 */
#ifndef GP_FILE_H
#define GP_FILE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "status.h"

/* mkdir -p: missing parents get 0755, the last component mode. An
 * existing directory is fine. */
gp_status gp_file_mkdirs(const char *path, mode_t mode, struct gp_err *err);

/*
 * Replace path with len bytes: write "<path>.tmp.<pid>" (created with
 * mode), fsync, rename over path, fsync the directory. Readers see the old
 * file or the new one, never a part; a crash leaves at most the temporary.
 */
gp_status gp_file_write_atomic(const char *path, const void *data, size_t len, mode_t mode,
			       struct gp_err *err);

/*
 * Read a regular file whole: *data malloc'd with a NUL after the last
 * byte (caller frees), *len its size. GP_ERR_NOT_FOUND when missing,
 * GP_ERR_TOO_BIG over max_len bytes.
 */
gp_status gp_file_read(const char *path, size_t max_len, uint8_t **data, size_t *len,
		       struct gp_err *err);

#endif
