/*
 * gpu.c: the CPU-only side of gpu.h, compiled when GENPIPE_CUDA is off.
 */
#include "gpu.h"

#include <stdio.h>

int gp_gpu_built(void)
{
	return 0;
}

int gp_gpu_available(const char **why)
{
	if (why)
		*why = "built without CUDA (-DGENPIPE_CUDA=OFF or no nvcc)";
	return 0;
}

int gp_gpu_describe(int i, char *name, size_t len, size_t *total_bytes)
{
	(void)i;
	(void)total_bytes;
	if (len)
		snprintf(name, len, "none");
	return -1;
}
