// sage_attn_internal.h - the SageAttention2 attention kernels' entry points inside the library.
//
// sage_attn.cu checks the generic contract of vopt_sage_attn_params (vopt_cuda.h) and picks a kernel; the kernel
// files check what only they know (their own limits) and launch. Each entry point returns cudaSuccess, or an error
// status after vopt::fail(...) said why.
#ifndef VOPT_SAGE_ATTN_INTERNAL_H_
#define VOPT_SAGE_ATTN_INTERNAL_H_

#include <cuda_runtime.h>

#include "vopt_cuda.h"

namespace vopt {
namespace sage {

// Whether the mma.sync kernel (sage_attn_mma.cu) supports `p` on a device of compute capability `cc` (e.g. 89).
// Returns cudaSuccess or an error after vopt::fail(). Makes no CUDA call.
cudaError_t mma_supports(const vopt_sage_attn_params& p, int cc);
// Launch the mma.sync kernel (sm_80 / sm_89 code; also runs on sm_90) on `stream`.
cudaError_t mma_launch(const vopt_sage_attn_params& p, int cc, cudaStream_t stream);

// The same for the sm_90a wgmma + TMA kernel (sage_attn_wgmma.cu).
cudaError_t wgmma_supports(const vopt_sage_attn_params& p, int cc);
cudaError_t wgmma_launch(const vopt_sage_attn_params& p, int cc, cudaStream_t stream);

}  // namespace sage
}  // namespace vopt

#endif  // VOPT_SAGE_ATTN_INTERNAL_H_
