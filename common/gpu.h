/*
 * gpu.h: the one door to CUDA, with no CUDA types in it (ggml-cuda.h style).
 *
 * Built with GENPIPE_CUDA the functions are implemented in common/cuda/;
 * without it, in gpu.c, where they report that no GPU path exists. Callers
 * pick the CUDA path only when gp_gpu_available() says so.
 */
#ifndef GP_GPU_H
#define GP_GPU_H

#include <stddef.h>

/* 1 when this binary was built with the CUDA path. */
int gp_gpu_built(void);

/*
 * Number of usable CUDA devices (0 without CUDA, without a driver, or
 * without a device). Never fails; *why (may be NULL) gets the reason
 * for 0 as static text.
 */
int gp_gpu_available(const char **why);

/* Name and memory of device i into name (len bytes). Returns 0 on success. */
int gp_gpu_describe(int i, char *name, size_t len, size_t *total_bytes);

#endif
