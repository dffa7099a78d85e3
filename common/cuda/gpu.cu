/*
 * gpu.cu: the CUDA side of gpu.h. Kernels come with the GPU issue; today
 * this is device discovery through the runtime API (no NVML link).
 */
#include <cuda_runtime.h>
#include <stdio.h>

extern "C" {
#include "gpu.h"
}

extern "C" int gp_gpu_built(void)
{
	return 1;
}

extern "C" int gp_gpu_available(const char **why)
{
	int n = 0;
	cudaError_t e = cudaGetDeviceCount(&n);
	if (e != cudaSuccess) {
		if (why)
			*why = cudaGetErrorString(e);
		return 0;
	}
	if (n == 0 && why)
		*why = "no CUDA device";
	return n;
}

extern "C" int gp_gpu_describe(int i, char *name, size_t len, size_t *total_bytes)
{
	cudaDeviceProp p;
	if (cudaGetDeviceProperties(&p, i) != cudaSuccess)
		return -1;
	snprintf(name, len, "%s (sm_%d%d)", p.name, p.major, p.minor);
	if (total_bytes)
		*total_bytes = p.totalGlobalMem;
	return 0;
}
