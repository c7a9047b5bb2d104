// vq_argmin.cu - fused nearest-code search: per row, best score, its first index, second-best score.
//
// Scores are s_k = ||c_k||^2 - 2 x.c_k (the squared distance minus the row's ||x||^2), in fp32 for fp32,
// fp16 and bf16 inputs (fp16/bf16 are converted exactly to fp32 on load). Block (i, s) owns rows
// [64 i, 64 i + 64) and codes [s * codes_per_split, ...) (a split: more blocks when N alone is too few;
// outputs are [splits, n], merged by vopt.ops.vq_lookup.merge_splits) and streams those codes past them in kCodes-code tiles, kDepth-wide slices of D staged in shared
// memory; each of the 16 x 16 threads computes a 4 x 4 patch of the kRows x kCodes score tile and keeps a
// running (best, index, second) for its 4 rows; the 16 threads sharing rows merge theirs with warp shuffles.
// The [N, K] score matrix never exists. Ties go to the first index: a thread visits its codes in
// increasing order with a strict '<', and merges prefer the smaller index on equal scores.
// vopt.ops.vq_lookup certifies the codes (the kernel alone does not promise the reference's codes at
// near-ties), exactly as for the Triton kernel.
#include <cuda_runtime.h>

#include <cutlass/numeric_types.h>

#include <cstdint>

#include "vopt_cuda.h"

namespace {

constexpr int kRows = 64;      // rows per block
constexpr int kCodes = 64;     // codes per tile
constexpr int kDepth = 16;     // D slice staged in shared memory
constexpr int kThreadsX = 16;  // threads along codes (lanes sharing rows: a half warp)
constexpr int kThreadsY = 16;  // threads along rows
constexpr int kPerThread = 4;  // rows (and codes) per thread
constexpr int kThreads = kThreadsX * kThreadsY;

struct Best {
  float best;
  int idx;
  float second;
};

// Merge two running results; on equal best scores the smaller index wins and the other's best becomes a
// second-best candidate (so duplicates give second == best).
__device__ __forceinline__ Best merge(Best a, Best b) {
  const bool a_wins = a.best < b.best || (a.best == b.best && a.idx < b.idx);
  Best out;
  if (a_wins) {
    out.best = a.best;
    out.idx = a.idx;
    out.second = fminf(a.second, b.best);
  } else {
    out.best = b.best;
    out.idx = b.idx;
    out.second = fminf(b.second, a.best);
  }
  return out;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) vq_argmin_kernel(const T* __restrict__ x, const T* __restrict__ codebook,
                                                             const float* __restrict__ code_sq_norms,
                                                             float* __restrict__ best_out, int32_t* __restrict__ idx_out,
                                                             float* __restrict__ second_out, int64_t n, int64_t k,
                                                             int64_t d, int64_t codes_per_split) {
  __shared__ float xs[kDepth][kRows + 1];   // x tile, transposed: xs[j][row] (+1: no bank conflicts on stores)
  __shared__ float cs[kDepth][kCodes + 1];  // code tile, transposed: cs[j][code]
  const int tx = threadIdx.x % kThreadsX;
  const int ty = threadIdx.x / kThreadsX;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  // This block's codes: [code_lo, code_hi), split blockIdx.y of the codebook (outputs are [splits, n]).
  const int64_t code_lo = static_cast<int64_t>(blockIdx.y) * codes_per_split;
  const int64_t code_hi = code_lo + codes_per_split < k ? code_lo + codes_per_split : k;
  const int64_t out0 = static_cast<int64_t>(blockIdx.y) * n;

  Best run[kPerThread];
  for (int r = 0; r < kPerThread; ++r) run[r] = Best{INFINITY, 0, INFINITY};

  for (int64_t code0 = code_lo; code0 < code_hi; code0 += kCodes) {
    float acc[kPerThread][kPerThread];
    for (int r = 0; r < kPerThread; ++r)
      for (int q = 0; q < kPerThread; ++q) acc[r][q] = 0.0f;

    for (int64_t j0 = 0; j0 < d; j0 += kDepth) {
      // Stage kRows x kDepth of x and kCodes x kDepth of the codebook (zero outside the matrices).
      for (int e = threadIdx.x; e < kRows * kDepth; e += kThreads) {
        const int row = e / kDepth, j = e % kDepth;
        const int64_t gr = row0 + row, gj = j0 + j;
        xs[j][row] = (gr < n && gj < d) ? static_cast<float>(x[gr * d + gj]) : 0.0f;
      }
      for (int e = threadIdx.x; e < kCodes * kDepth; e += kThreads) {
        const int code = e / kDepth, j = e % kDepth;
        const int64_t gc = code0 + code, gj = j0 + j;
        cs[j][code] = (gc < code_hi && gj < d) ? static_cast<float>(codebook[gc * d + gj]) : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int j = 0; j < kDepth; ++j) {
        float xv[kPerThread], cv[kPerThread];
#pragma unroll
        for (int r = 0; r < kPerThread; ++r) xv[r] = xs[j][ty + r * kThreadsY];
#pragma unroll
        for (int q = 0; q < kPerThread; ++q) cv[q] = cs[j][tx + q * kThreadsX];
#pragma unroll
        for (int r = 0; r < kPerThread; ++r)
#pragma unroll
          for (int q = 0; q < kPerThread; ++q) acc[r][q] = fmaf(xv[r], cv[q], acc[r][q]);
      }
      __syncthreads();
    }

    // This thread's codes in increasing index order: tx, tx + 16, tx + 32, tx + 48.
#pragma unroll
    for (int q = 0; q < kPerThread; ++q) {
      const int64_t gc = code0 + tx + q * kThreadsX;
      if (gc >= code_hi) continue;
      const float norm = code_sq_norms[gc];
#pragma unroll
      for (int r = 0; r < kPerThread; ++r) {
        const float s = fmaf(-2.0f, acc[r][q], norm);
        if (s < run[r].best) {
          run[r].second = run[r].best;
          run[r].best = s;
          run[r].idx = static_cast<int>(gc);
        } else if (s < run[r].second) {
          run[r].second = s;
        }
      }
    }
  }

  // Merge across the 16 lanes (tx) that share these rows; they are one half warp.
#pragma unroll
  for (int r = 0; r < kPerThread; ++r) {
    Best b = run[r];
#pragma unroll
    for (int offset = kThreadsX / 2; offset > 0; offset /= 2) {
      Best o;
      o.best = __shfl_xor_sync(0xffffffffu, b.best, offset, kThreadsX);
      o.idx = __shfl_xor_sync(0xffffffffu, b.idx, offset, kThreadsX);
      o.second = __shfl_xor_sync(0xffffffffu, b.second, offset, kThreadsX);
      b = merge(b, o);
    }
    const int64_t gr = row0 + ty + r * kThreadsY;
    if (tx == 0 && gr < n) {
      best_out[out0 + gr] = b.best;
      idx_out[out0 + gr] = b.idx;
      second_out[out0 + gr] = b.second;
    }
  }
}

template <typename T>
int launch_vq_argmin(const void* x, const void* codebook, const float* code_sq_norms, float* best, int32_t* best_idx,
                     float* second, int64_t n, int64_t k, int64_t d, int64_t codes_per_split, void* stream) {
  if (n < 0 || k < 1 || d < 1 || k > INT32_MAX || codes_per_split < 1) return static_cast<int>(cudaErrorInvalidValue);
  const int64_t splits = (k + codes_per_split - 1) / codes_per_split;
  if (splits > 65535) return static_cast<int>(cudaErrorInvalidValue);
  if (n == 0) return static_cast<int>(cudaSuccess);
  if (x == nullptr || codebook == nullptr || code_sq_norms == nullptr || best == nullptr || best_idx == nullptr ||
      second == nullptr)
    return static_cast<int>(cudaErrorInvalidValue);
  const int64_t blocks = (n + kRows - 1) / kRows;
  if (blocks > INT32_MAX) return static_cast<int>(cudaErrorInvalidValue);
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(splits));
  vq_argmin_kernel<T><<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const T*>(x), static_cast<const T*>(codebook), code_sq_norms, best, best_idx, second, n, k, d,
      codes_per_split);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" {

int vopt_vq_argmin_f32(const float* x, const float* codebook, const float* code_sq_norms, float* best,
                       int32_t* best_idx, float* second, int64_t n, int64_t k, int64_t d, int64_t codes_per_split,
                       void* stream) {
  return launch_vq_argmin<float>(x, codebook, code_sq_norms, best, best_idx, second, n, k, d, codes_per_split, stream);
}

int vopt_vq_argmin_f16(const void* x, const void* codebook, const float* code_sq_norms, float* best,
                       int32_t* best_idx, float* second, int64_t n, int64_t k, int64_t d, int64_t codes_per_split,
                       void* stream) {
  return launch_vq_argmin<cutlass::half_t>(x, codebook, code_sq_norms, best, best_idx, second, n, k, d, codes_per_split, stream);
}

int vopt_vq_argmin_bf16(const void* x, const void* codebook, const float* code_sq_norms, float* best,
                        int32_t* best_idx, float* second, int64_t n, int64_t k, int64_t d, int64_t codes_per_split,
                        void* stream) {
  return launch_vq_argmin<cutlass::bfloat16_t>(x, codebook, code_sq_norms, best, best_idx, second, n, k, d, codes_per_split, stream);
}

}  // extern "C"
