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

/* ---- MoE grouped GEMM (moe_grouped_gemm.cu; CUTLASS grouped GEMM, fp32 accumulation) ----
 * Rows of x [m, k] are sorted by expert: expert e owns rows [offsets[e], offsets[e+1]) (offsets: device int64
 * array of num_experts + 1 non-decreasing entries, clamped to [0, m]). out [m, n] = x_rows @ w[e] (+ bias[e]);
 * w: [num_experts, k, n] row-major; bias: [num_experts, n] or NULL. Rows outside [offsets[0], offsets[E]) are
 * written as zeros. n and k must be multiples of 8 and every pointer 16-byte aligned (cudaErrorInvalidValue /
 * cudaErrorMisalignedAddress otherwise). workspace: device memory of at least
 * vopt_moe_grouped_gemm_workspace_bytes(num_experts) bytes, 16-byte aligned. m == 0 returns 0 without launching.
 * No host synchronization: the per-expert split is read on the device. */
VOPT_API int vopt_moe_grouped_gemm_workspace_bytes(int64_t num_experts, int64_t* out);
VOPT_API int vopt_moe_grouped_gemm_f16(const void* x, const void* w, const void* bias, const int64_t* offsets,
                                       void* out, int64_t m, int64_t n, int64_t k, int64_t num_experts,
                                       void* workspace, int64_t workspace_bytes, void* stream);
VOPT_API int vopt_moe_grouped_gemm_bf16(const void* x, const void* w, const void* bias, const int64_t* offsets,
                                        void* out, int64_t m, int64_t n, int64_t k, int64_t num_experts,
                                        void* workspace, int64_t workspace_bytes, void* stream);

/* ---- vq_argmin (vq_argmin.cu): fused nearest-code search ----
 * x: [n, d] row-major, codebook: [k, d] row-major, code_sq_norms: [k] fp32 ||c_j||^2 (all contiguous, on the
 * device). The codes are split into S = ceil(k / codes_per_split) ranges; for split s and row i, over the codes
 * j of that range: best[s * n + i] = min_j s_ij with s_ij = code_sq_norms[j] - 2 x_i.c_j (fp32),
 * best_idx[s * n + i] = its first index, second[s * n + i] = the smallest s_ij over the other codes of the range
 * (== best for a duplicate code); outputs are [S, n]. The [n, k] matrix is never stored. n == 0 returns 0
 * without launching; n < 0, k < 1, k > INT32_MAX, d < 1, codes_per_split < 1, S > 65535 or a NULL pointer
 * return cudaErrorInvalidValue. fp16/bf16 inputs are raw 16-bit storage. */
VOPT_API int vopt_vq_argmin_f32(const float* x, const float* codebook, const float* code_sq_norms, float* best,
                                int32_t* best_idx, float* second, int64_t n, int64_t k, int64_t d,
                                int64_t codes_per_split, void* stream);
VOPT_API int vopt_vq_argmin_f16(const void* x, const void* codebook, const float* code_sq_norms, float* best,
                                int32_t* best_idx, float* second, int64_t n, int64_t k, int64_t d,
                                int64_t codes_per_split, void* stream);
VOPT_API int vopt_vq_argmin_bf16(const void* x, const void* codebook, const float* code_sq_norms, float* best,
                                 int32_t* best_idx, float* second, int64_t n, int64_t k, int64_t d,
                                 int64_t codes_per_split, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* VOPT_CUDA_H_ */
