// axpy.cu - out = alpha * x + y for fp32, fp16 and bf16, computed in fp32.
//
// The trivial kernel that proves the build -> ctypes -> dispatch path. The
// multiply and the add are rounded separately (__fmul_rn / __fadd_rn, no FMA
// contraction) so results match vopt's torch reference bit for bit.
#include <cuda_runtime.h>

#include <cutlass/numeric_types.h>

#include <algorithm>
#include <cstdint>

#include "vopt_cuda.h"

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;  // grid-stride loop covers the rest

template <typename T>
__global__ void axpy_kernel(const T* __restrict__ x, const T* __restrict__ y, T* __restrict__ out,
                            float alpha, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float xf = static_cast<float>(x[i]);
    const float yf = static_cast<float>(y[i]);
    out[i] = static_cast<T>(__fadd_rn(__fmul_rn(alpha, xf), yf));
  }
}

template <typename T>
int launch_axpy(const void* x, const void* y, void* out, float alpha, int64_t n, void* stream) {
  if (n < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (n == 0) return static_cast<int>(cudaSuccess);
  if (x == nullptr || y == nullptr || out == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks);
  axpy_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const T*>(x), static_cast<const T*>(y), static_cast<T*>(out), alpha, n);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" {

int vopt_axpy_f32(const float* x, const float* y, float* out, float alpha, int64_t n, void* stream) {
  return launch_axpy<float>(x, y, out, alpha, n, stream);
}

int vopt_axpy_f16(const void* x, const void* y, void* out, float alpha, int64_t n, void* stream) {
  return launch_axpy<cutlass::half_t>(x, y, out, alpha, n, stream);
}

int vopt_axpy_bf16(const void* x, const void* y, void* out, float alpha, int64_t n, void* stream) {
  return launch_axpy<cutlass::bfloat16_t>(x, y, out, alpha, n, stream);
}

}  // extern "C"
