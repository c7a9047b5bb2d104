/*
 * vopt_cuda.h - C interface of libvopt_cuda.so, vopt's standalone CUDA library.
 *
 * The library is torch-independent: Python loads it with ctypes
 * (vopt/cuda_library.py) and passes raw device pointers, sizes and the CUDA
 * stream handle as integers. Every launcher returns a cudaError_t as int
 * (0 = success); vopt_cuda_error_string() turns a status into text.
 *
 * Bump VOPT_CUDA_ABI_VERSION whenever a signature below changes, together
 * with ABI_VERSION in vopt/cuda_library.py.
 */
#ifndef VOPT_CUDA_H_
#define VOPT_CUDA_H_

#include <stdint.h>

#define VOPT_CUDA_ABI_VERSION 2

#if defined(__GNUC__)
#define VOPT_API __attribute__((visibility("default")))
#else
#define VOPT_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---- runtime / build information (runtime.cu) ---- */

/* The ABI version this library was built with (VOPT_CUDA_ABI_VERSION). */
VOPT_API int vopt_cuda_abi_version(void);

/* The CUDA runtime version linked in (e.g. 13000). Needs no driver. */
VOPT_API int vopt_cuda_runtime_version(int* out);

/* Number of visible CUDA devices; returns an error status without a driver. */
VOPT_API int vopt_cuda_device_count(int* out);

/* Human-readable name and description of a cudaError_t status. Never NULL. */
VOPT_API const char* vopt_cuda_error_string(int status);

/* The CUDA architectures compiled in, as CMake lists them (e.g. "80;89;90a"). */
VOPT_API const char* vopt_cuda_built_archs(void);

/* ---- axpy (axpy.cu): out[i] = alpha * x[i] + y[i], computed in fp32 ----
 * x, y, out: contiguous device arrays of n elements; stream: a cudaStream_t
 * (NULL = legacy default stream). n == 0 returns 0 without launching. */

VOPT_API int vopt_axpy_f32(const float* x, const float* y, float* out, float alpha, int64_t n, void* stream);
/* half / bfloat16 arrays are passed as raw 16-bit storage. */
VOPT_API int vopt_axpy_f16(const void* x, const void* y, void* out, float alpha, int64_t n, void* stream);
VOPT_API int vopt_axpy_bf16(const void* x, const void* y, void* out, float alpha, int64_t n, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* VOPT_CUDA_H_ */
