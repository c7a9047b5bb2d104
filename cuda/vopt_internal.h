// vopt_internal.h - helpers shared by the library's translation units (not part of the C ABI).
#ifndef VOPT_INTERNAL_H_
#define VOPT_INTERNAL_H_

#include <cuda_runtime.h>

namespace vopt {

// Record why the current vopt_* call fails (printf-style) and return `code`, so launchers can write
//   if (dim != 64 && dim != 128) return fail(cudaErrorInvalidValue, "head_dim=%lld; accepted: 64, 128", dim);
// The message is per thread and read back by vopt_cuda_last_error_message().
cudaError_t fail(cudaError_t code, const char* fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

// Forget the calling thread's message (every exported launcher calls this first).
void clear_error();

// The calling thread's message ("" if none).
const char* last_error();

// Compute capability of the current device as major * 10 + minor (e.g. 89), or an error status.
cudaError_t current_compute_capability(int* cc);

}  // namespace vopt

#endif  // VOPT_INTERNAL_H_
