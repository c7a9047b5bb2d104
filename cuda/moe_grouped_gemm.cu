// moe_grouped_gemm.cu - the grouped GEMM of sorted-by-expert MoE dispatch (vopt::grouped_gemm), CUTLASS 2.x.
//
// out[r, :] = x[r, :] @ w[e] (+ bias[e]) for every row r in expert e's segment [offsets[e], offsets[e+1]);
// rows outside [offsets[0], offsets[E]) (tokens dropped by a capacity limit) are written as zeros.
//
// The per-expert row counts live on the device (they come from the router), so nothing is copied to the host:
// a one-block setup kernel turns `offsets` into CUTLASS's per-problem arrays (problem sizes, A/B/C/D pointers and
// leading dimensions) in a caller-provided workspace, and CUTLASS's grouped kernel runs with the device-only
// schedule (GroupScheduleMode::kDeviceOnly: each persistent threadblock walks the problem list on the device).
// An expert with no rows is a 0 x N x K problem and contributes no tiles. Bias is CUTLASS's source operand C with
// leading dimension 0 (every row reads bias[e]) and beta = 1.
//
// fp16 / bf16 operands, fp32 accumulation, row-major everything. Tensor-core tiles need 16-byte vectors:
// K and N must be multiples of 8 and the pointers 16-byte aligned; the Python side checks this and falls back
// to the Triton kernel otherwise. One Sm80 kernel serves sm_80, sm_89 and sm_90a (no Hopper-specific kernel yet).
#include <cuda_runtime.h>

#include <cutlass/cutlass.h>
#include <cutlass/epilogue/thread/linear_combination.h>
#include <cutlass/gemm/device/gemm_grouped.h>
#include <cutlass/gemm/gemm.h>
#include <cutlass/gemm/kernel/default_gemm_grouped.h>
#include <cutlass/numeric_types.h>

#include <climits>
#include <cstdint>

#include "vopt_cuda.h"

namespace {

constexpr int kAlign = 8;  // elements per 16-byte vector of a 16-bit type

template <typename T>
struct GroupedGemm {
  using Layout = cutlass::layout::RowMajor;
  using Kernel = typename cutlass::gemm::kernel::DefaultGemmGrouped<
      T, Layout, cutlass::ComplexTransform::kNone, kAlign,
      T, Layout, cutlass::ComplexTransform::kNone, kAlign,
      T, Layout, float,
      cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      cutlass::gemm::GemmShape<128, 128, 32>, cutlass::gemm::GemmShape<64, 64, 32>,
      cutlass::gemm::GemmShape<16, 8, 16>,
      cutlass::epilogue::thread::LinearCombination<T, 128 / cutlass::sizeof_bits<T>::value, float, float>,
      cutlass::gemm::threadblock::GemmBatchedIdentityThreadblockSwizzle,  // unused by grouped kernels
      4, cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly>::GemmKernel;
  using Gemm = cutlass::gemm::device::GemmGrouped<Kernel>;
};

// Workspace layout: problem sizes, then A, B, C, D pointer arrays, then lda, ldb, ldc, ldd; each 16-byte aligned.
__host__ __device__ inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

struct Layout {
  int64_t problems, ptrs, lds, total;
};

__host__ __device__ inline Layout workspace_layout(int64_t e) {
  Layout l;
  l.problems = 0;
  l.ptrs = round16(e * static_cast<int64_t>(sizeof(cutlass::gemm::GemmCoord)));
  l.lds = l.ptrs + 4 * round16(e * static_cast<int64_t>(sizeof(void*)));
  l.total = l.lds + 4 * round16(e * static_cast<int64_t>(sizeof(int64_t)));
  return l;
}

__device__ __forceinline__ int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

template <typename T>
__global__ void setup_problems(const int64_t* __restrict__ offsets, int64_t num_experts, int64_t m, int n, int k,
                               const T* x, const T* w, const T* bias, T* out, char* workspace) {
  const Layout l = workspace_layout(num_experts);
  auto* problems = reinterpret_cast<cutlass::gemm::GemmCoord*>(workspace + l.problems);
  const int64_t ptr_stride = round16(num_experts * static_cast<int64_t>(sizeof(void*)));
  const int64_t ld_stride = round16(num_experts * static_cast<int64_t>(sizeof(int64_t)));
  auto** pa = reinterpret_cast<T**>(workspace + l.ptrs);
  auto** pb = reinterpret_cast<T**>(workspace + l.ptrs + ptr_stride);
  auto** pc = reinterpret_cast<T**>(workspace + l.ptrs + 2 * ptr_stride);
  auto** pd = reinterpret_cast<T**>(workspace + l.ptrs + 3 * ptr_stride);
  auto* lda = reinterpret_cast<int64_t*>(workspace + l.lds);
  auto* ldb = reinterpret_cast<int64_t*>(workspace + l.lds + ld_stride);
  auto* ldc = reinterpret_cast<int64_t*>(workspace + l.lds + 2 * ld_stride);
  auto* ldd = reinterpret_cast<int64_t*>(workspace + l.lds + 3 * ld_stride);
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < num_experts;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // Clamped so that malformed offsets can never address memory outside x / out.
    const int64_t lo = clamp64(offsets[e], 0, m);
    const int64_t hi = clamp64(offsets[e + 1], lo, m);
    problems[e] = cutlass::gemm::GemmCoord(static_cast<int>(hi - lo), n, k);
    pa[e] = const_cast<T*>(x) + lo * k;
    pb[e] = const_cast<T*>(w) + e * static_cast<int64_t>(k) * n;
    pc[e] = bias != nullptr ? const_cast<T*>(bias) + e * n : out + lo * n;
    pd[e] = out + lo * n;
    lda[e] = k;
    ldb[e] = n;
    ldc[e] = bias != nullptr ? 0 : n;  // stride 0: every row of C is bias[e]
    ldd[e] = n;
  }
}

// Zero the rows no expert writes: r < offsets[0] or r >= offsets[E] (clamped like setup_problems).
template <typename T>
__global__ void zero_uncovered_rows(const int64_t* __restrict__ offsets, int64_t num_experts, int64_t m, int n, T* out) {
  const int64_t first = clamp64(offsets[0], 0, m);
  const int64_t last = clamp64(offsets[num_experts], first, m);
  const int64_t total = m * n;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / n;
    if (r < first || r >= last) out[i] = T(0.0f);
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Persistent threadblocks: one full wave (SMs x occupancy); computed once per device and element type.
template <typename T>
int threadblock_count(int* out) {
  static int cached[64] = {0};
  int dev = 0;
  cudaError_t st = cudaGetDevice(&dev);
  if (st != cudaSuccess) return static_cast<int>(st);
  if (dev >= 0 && dev < 64 && cached[dev] > 0) {
    *out = cached[dev];
    return 0;
  }
  const int count = GroupedGemm<T>::Gemm::sufficient();  // no host problem sizes: SM count x max active blocks
  if (count <= 0) {
    st = cudaGetLastError();
    return static_cast<int>(st != cudaSuccess ? st : cudaErrorInvalidConfiguration);
  }
  if (dev >= 0 && dev < 64) cached[dev] = count;
  *out = count;
  return 0;
}

template <typename T>
int launch(const void* x, const void* w, const void* bias, const int64_t* offsets, void* out, int64_t m, int64_t n,
           int64_t k, int64_t num_experts, void* workspace, int64_t workspace_bytes, void* stream_ptr) {
  using Gemm = typename GroupedGemm<T>::Gemm;
  if (m < 0 || n <= 0 || k <= 0 || num_experts <= 0) return static_cast<int>(cudaErrorInvalidValue);
  if (m > INT_MAX || n > INT_MAX || k > INT_MAX || num_experts > INT_MAX) return static_cast<int>(cudaErrorInvalidValue);
  if (m == 0) return static_cast<int>(cudaSuccess);
  if (x == nullptr || w == nullptr || offsets == nullptr || out == nullptr || workspace == nullptr)
    return static_cast<int>(cudaErrorInvalidValue);
  if (n % kAlign != 0 || k % kAlign != 0) return static_cast<int>(cudaErrorInvalidValue);
  if (!aligned16(x) || !aligned16(w) || !aligned16(out) || (bias != nullptr && !aligned16(bias)) || !aligned16(workspace))
    return static_cast<int>(cudaErrorMisalignedAddress);
  const Layout l = workspace_layout(num_experts);
  if (workspace_bytes < l.total) return static_cast<int>(cudaErrorInvalidValue);
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  char* ws = static_cast<char*>(workspace);

  int blocks = (static_cast<int>(num_experts) + 127) / 128;
  setup_problems<T><<<blocks, 128, 0, stream>>>(offsets, num_experts, m, static_cast<int>(n), static_cast<int>(k),
                                                 static_cast<const T*>(x), static_cast<const T*>(w),
                                                 static_cast<const T*>(bias), static_cast<T*>(out), ws);
  cudaError_t st = cudaGetLastError();
  if (st != cudaSuccess) return static_cast<int>(st);
  const int64_t zero_blocks = (m * n + 255) / 256;
  zero_uncovered_rows<T><<<static_cast<unsigned>(zero_blocks < 4096 ? zero_blocks : 4096), 256, 0, stream>>>(
      offsets, num_experts, m, static_cast<int>(n), static_cast<T*>(out));
  st = cudaGetLastError();
  if (st != cudaSuccess) return static_cast<int>(st);

  int tb_count = 0;
  const int tb_status = threadblock_count<T>(&tb_count);
  if (tb_status != 0) return tb_status;

  const int64_t ptr_stride = round16(num_experts * static_cast<int64_t>(sizeof(void*)));
  const int64_t ld_stride = round16(num_experts * static_cast<int64_t>(sizeof(int64_t)));
  typename Gemm::EpilogueOutputOp::Params epilogue(1.0f, bias != nullptr ? 1.0f : 0.0f);
  typename Gemm::Arguments args(
      reinterpret_cast<cutlass::gemm::GemmCoord*>(ws + l.problems), static_cast<int>(num_experts), tb_count, epilogue,
      reinterpret_cast<T**>(ws + l.ptrs), reinterpret_cast<T**>(ws + l.ptrs + ptr_stride),
      reinterpret_cast<T**>(ws + l.ptrs + 2 * ptr_stride), reinterpret_cast<T**>(ws + l.ptrs + 3 * ptr_stride),
      reinterpret_cast<int64_t*>(ws + l.lds), reinterpret_cast<int64_t*>(ws + l.lds + ld_stride),
      reinterpret_cast<int64_t*>(ws + l.lds + 2 * ld_stride), reinterpret_cast<int64_t*>(ws + l.lds + 3 * ld_stride));
  Gemm gemm;
  cutlass::Status status = gemm.can_implement(args);
  if (status != cutlass::Status::kSuccess) return static_cast<int>(cudaErrorInvalidValue);
  status = gemm.initialize(args, nullptr, stream);
  if (status != cutlass::Status::kSuccess) {
    st = cudaGetLastError();
    return static_cast<int>(st != cudaSuccess ? st : cudaErrorInvalidConfiguration);
  }
  status = gemm.run(stream);
  if (status != cutlass::Status::kSuccess) {
    st = cudaGetLastError();
    return static_cast<int>(st != cudaSuccess ? st : cudaErrorLaunchFailure);
  }
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

extern "C" {

int vopt_moe_grouped_gemm_workspace_bytes(int64_t num_experts, int64_t* out) {
  if (out == nullptr || num_experts <= 0) return static_cast<int>(cudaErrorInvalidValue);
  *out = workspace_layout(num_experts).total;
  return 0;
}

int vopt_moe_grouped_gemm_f16(const void* x, const void* w, const void* bias, const int64_t* offsets, void* out,
                              int64_t m, int64_t n, int64_t k, int64_t num_experts, void* workspace,
                              int64_t workspace_bytes, void* stream) {
  return launch<cutlass::half_t>(x, w, bias, offsets, out, m, n, k, num_experts, workspace, workspace_bytes, stream);
}

int vopt_moe_grouped_gemm_bf16(const void* x, const void* w, const void* bias, const int64_t* offsets, void* out,
                               int64_t m, int64_t n, int64_t k, int64_t num_experts, void* workspace,
                               int64_t workspace_bytes, void* stream) {
  return launch<cutlass::bfloat16_t>(x, w, bias, offsets, out, m, n, k, num_experts, workspace, workspace_bytes,
                                     stream);
}

}  // extern "C"
