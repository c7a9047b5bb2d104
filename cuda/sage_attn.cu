// sage_attn.cu - vopt_sage_attn_fwd: checks the SageAttention2 attention parameters and picks a kernel.
//
// The checks here are the generic contract of vopt_sage_attn_params (vopt_cuda.h); they run before any CUDA call,
// so bad parameters fail the same way on a machine without a GPU. The kernels' own limits live in their files
// (mma_supports / wgmma_supports). Choice for VOPT_SAGE_KERNEL_AUTO: the wgmma kernel where it supports the call
// (sm_90 with INT8 QK and FP8 PV), else the mma.sync kernel.
#include <cuda_runtime.h>

#include <cstdint>

#include "sage_attn_internal.h"
#include "vopt_cuda.h"
#include "vopt_internal.h"

namespace {

using vopt::fail;

cudaError_t check_params(const vopt_sage_attn_params* p) {
  if (p == nullptr) return fail(cudaErrorInvalidValue, "params is NULL");
  if (p->q == nullptr || p->k == nullptr || p->v == nullptr || p->q_scale == nullptr || p->k_scale == nullptr ||
      p->out == nullptr)
    return fail(cudaErrorInvalidValue, "q, k, v, q_scale, k_scale and out must be non-NULL device pointers");
  if (p->batch < 1 || p->heads_q < 1 || p->heads_kv < 1 || p->len_q < 1 || p->len_k < 1)
    return fail(cudaErrorInvalidValue,
                "batch=%lld, heads_q=%lld, heads_kv=%lld, len_q=%lld, len_k=%lld; accepted: all >= 1",
                (long long)p->batch, (long long)p->heads_q, (long long)p->heads_kv, (long long)p->len_q,
                (long long)p->len_k);
  if (p->heads_q % p->heads_kv != 0)
    return fail(cudaErrorInvalidValue, "heads_q=%lld is not a multiple of heads_kv=%lld (GQA)",
                (long long)p->heads_q, (long long)p->heads_kv);
  // Grid dimensions: y = heads_q, z = batch (65535 each); x = 128-row Q tiles.
  if (p->heads_q > 65535 || p->batch > 65535 || (p->len_q + 127) / 128 > INT32_MAX)
    return fail(cudaErrorInvalidValue, "batch=%lld, heads_q=%lld or len_q=%lld exceeds the launch grid",
                (long long)p->batch, (long long)p->heads_q, (long long)p->len_q);
  if (p->head_dim != 64 && p->head_dim != 128)
    return fail(cudaErrorInvalidValue, "head_dim=%lld; accepted: 64, 128 (pad smaller head dims)",
                (long long)p->head_dim);
  if (p->out_dim < 1 || p->out_dim > p->head_dim)
    return fail(cudaErrorInvalidValue, "out_dim=%lld; accepted: 1..head_dim (%lld)", (long long)p->out_dim,
                (long long)p->head_dim);
  if (p->qk_bits != 8 && p->qk_bits != 4)
    return fail(cudaErrorInvalidValue, "qk_bits=%d; accepted: 8, 4", p->qk_bits);
  if (p->granularity != VOPT_SAGE_PER_THREAD && p->granularity != VOPT_SAGE_PER_BLOCK)
    return fail(cudaErrorInvalidValue, "granularity=%d; accepted: %d (per-thread), %d (per-block)", p->granularity,
                VOPT_SAGE_PER_THREAD, VOPT_SAGE_PER_BLOCK);
  if (p->pv != VOPT_SAGE_PV_FP8 && p->pv != VOPT_SAGE_PV_FP16)
    return fail(cudaErrorInvalidValue, "pv=%d; accepted: %d (fp8), %d (fp16)", p->pv, VOPT_SAGE_PV_FP8,
                VOPT_SAGE_PV_FP16);
  if ((p->pv == VOPT_SAGE_PV_FP8) != (p->v_scale != nullptr))
    return fail(cudaErrorInvalidValue, "v_scale must be given for fp8 PV and NULL for fp16 PV");
  if (p->two_level != 0 && p->two_level != 1)
    return fail(cudaErrorInvalidValue, "two_level=%d; accepted: 0, 1", p->two_level);
  if (p->causal != 0 && p->causal != 1) return fail(cudaErrorInvalidValue, "causal=%d; accepted: 0, 1", p->causal);
  if (p->out_dtype != 0 && p->out_dtype != 1)
    return fail(cudaErrorInvalidValue, "out_dtype=%d; accepted: 0 (fp16), 1 (bf16)", p->out_dtype);
  if (p->kernel != VOPT_SAGE_KERNEL_AUTO && p->kernel != VOPT_SAGE_KERNEL_MMA && p->kernel != VOPT_SAGE_KERNEL_WGMMA)
    return fail(cudaErrorInvalidValue, "kernel=%d; accepted: %d (auto), %d (mma), %d (wgmma)", p->kernel,
                VOPT_SAGE_KERNEL_AUTO, VOPT_SAGE_KERNEL_MMA, VOPT_SAGE_KERNEL_WGMMA);
  if (p->reserved != 0) return fail(cudaErrorInvalidValue, "reserved=%d; must be 0", p->reserved);
  if (p->out_stride_l < p->out_dim || p->out_stride_b < 0 || p->out_stride_h < 0)
    return fail(cudaErrorInvalidValue, "out strides (b=%lld, h=%lld, l=%lld) do not fit rows of out_dim=%lld",
                (long long)p->out_stride_b, (long long)p->out_stride_h, (long long)p->out_stride_l,
                (long long)p->out_dim);
  const uintptr_t aligned = reinterpret_cast<uintptr_t>(p->q) | reinterpret_cast<uintptr_t>(p->k) |
                            reinterpret_cast<uintptr_t>(p->v);
  if (aligned % 16 != 0) return fail(cudaErrorMisalignedAddress, "q, k and v must be 16-byte aligned");
  return cudaSuccess;
}

// Pick the kernel for `p` on a device of compute capability `cc`.
cudaError_t choose(const vopt_sage_attn_params* p, int cc, int32_t* kernel) {
  if (p->kernel == VOPT_SAGE_KERNEL_WGMMA) {
    cudaError_t err = vopt::sage::wgmma_supports(*p, cc);
    if (err == cudaSuccess) *kernel = VOPT_SAGE_KERNEL_WGMMA;
    return err;
  }
  if (p->kernel == VOPT_SAGE_KERNEL_AUTO && vopt::sage::wgmma_supports(*p, cc) == cudaSuccess) {
    *kernel = VOPT_SAGE_KERNEL_WGMMA;
    return cudaSuccess;
  }
  vopt::clear_error();  // the wgmma refusal above is not this call's failure
  cudaError_t err = vopt::sage::mma_supports(*p, cc);
  if (err == cudaSuccess) *kernel = VOPT_SAGE_KERNEL_MMA;
  return err;
}

}  // namespace

extern "C" {

int64_t vopt_sage_attn_params_size(void) { return static_cast<int64_t>(sizeof(vopt_sage_attn_params)); }

int vopt_sage_attn_select(const vopt_sage_attn_params* params, int32_t* kernel) {
  vopt::clear_error();
  if (kernel == nullptr) return static_cast<int>(fail(cudaErrorInvalidValue, "kernel (output) is NULL"));
  cudaError_t err = check_params(params);
  if (err != cudaSuccess) return static_cast<int>(err);
  int cc = 0;
  err = vopt::current_compute_capability(&cc);
  if (err != cudaSuccess) return static_cast<int>(err);
  return static_cast<int>(choose(params, cc, kernel));
}

int vopt_sage_attn_fwd(const vopt_sage_attn_params* params, void* stream) {
  vopt::clear_error();
  cudaError_t err = check_params(params);
  if (err != cudaSuccess) return static_cast<int>(err);
  int cc = 0;
  err = vopt::current_compute_capability(&cc);
  if (err != cudaSuccess) return static_cast<int>(err);
  int32_t kernel = 0;
  err = choose(params, cc, &kernel);
  if (err != cudaSuccess) return static_cast<int>(err);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  err = kernel == VOPT_SAGE_KERNEL_WGMMA ? vopt::sage::wgmma_launch(*params, cc, s)
                                         : vopt::sage::mma_launch(*params, cc, s);
  return static_cast<int>(err);
}

}  // extern "C"
