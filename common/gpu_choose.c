/*
 * gpu_choose.c: the parts of gpu.h that are the same with and without CUDA.
 */
#include <string.h>

#include "gpu.h"

gp_status gp_gpu_choose(const char *device, int *use_gpu, struct gp_err *err)
{
	const char *why = NULL;
	*use_gpu = 0;
	if (!device || !*device || !strcmp(device, "auto")) {
		*use_gpu = gp_gpu_available(&why) > 0;
		return GP_OK;
	}
	if (!strcmp(device, "cpu"))
		return GP_OK;
	if (!strcmp(device, "cuda")) {
		if (gp_gpu_available(&why) <= 0)
			return gp_err_set(err, GP_ERR_UNAVAILABLE, "\"cuda\" was asked for and no GPU is usable: %s",
					  why ? why : "no CUDA device");
		*use_gpu = 1;
		return GP_OK;
	}
	return gp_err_set(err, GP_ERR_INVALID, "device \"%s\" is not one of cpu, cuda, auto",
			  device);
}

const char *gp_gpu_precision_str(enum gp_gpu_precision p)
{
	return p == GP_GPU_BF16 ? "bf16" : "fp32";
}
