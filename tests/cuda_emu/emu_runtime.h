// emu_runtime.h - the generic part of the CPU emulation of CUDA device code (tests/cuda_emu/*_emu.cpp).
//
// Include it, then the kernels' source (kern.inc: a .cu file's device section, extracted verbatim by the test), then
// write extern "C" entries that mirror the host launcher and call launch(grid, threads, body). A CTA is `threads`
// std::threads (CTAs run one after another, so function-scope `__shared__` arrays, which become `static`, are the
// CTA's shared memory); std::barrier stands in for __syncthreads, per-warp barriers and a shared buffer for the warp
// shuffles (full mask only; every lane of the warp must take part, as the CUDA code requires anyway), a mutex for
// atomicMax. The fp32 intrinsics are the IEEE operations they name (volatile, so the compiler cannot contract
// them; build with -ffp-contract=off). Dynamic shared memory: the test redirects the one `extern __shared__`
// declaration to g_dyn_smem. What this cannot check: the CUDA memory model, coalescing, real warp scheduling,
// register/shared-memory limits and the host launchers themselves (the emu entries mirror their launch geometry).
#ifndef VOPT_EMU_RUNTIME_H_
#define VOPT_EMU_RUNTIME_H_

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include "vopt_cuda.h"
#include "vopt_internal.h"
#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __launch_bounds__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct D3 { unsigned x, y, z; };
inline thread_local D3 threadIdx, blockIdx;
inline D3 gridDim, blockDim;

constexpr int kEmuMaxWarps = 32;  // up to 1024 threads per CTA
inline std::barrier<>* g_bar;
inline std::barrier<>* g_wbar[kEmuMaxWarps];
inline uint32_t g_xbuf[kEmuMaxWarps][32];
alignas(16) inline uint4 g_dyn_smem[2048];
inline std::mutex g_atomic_mu;

inline void __syncthreads() { g_bar->arrive_and_wait(); }

// Lane `src_of(lane)`'s value of v, for the 32 lanes of the calling thread's warp.
template <class T, class F> T emu_shuffle(T v, F src_of) {
  static_assert(sizeof(T) == 4, "32-bit shuffles only");
  const int t = threadIdx.x, w = t / 32, l = t % 32;
  std::memcpy(&g_xbuf[w][l], &v, 4);
  g_wbar[w]->arrive_and_wait();
  T r;
  std::memcpy(&r, &g_xbuf[w][src_of(l) & 31], 4);
  g_wbar[w]->arrive_and_wait();
  return r;
}
template <class T> T __shfl_xor_sync(unsigned, T v, int off) { return emu_shuffle(v, [=](int l) { return l ^ off; }); }
template <class T> T __shfl_sync(unsigned, T v, int src) { return emu_shuffle(v, [=](int) { return src; }); }
template <class T> T __ldg(const T* p) { return *p; }
inline float __fdiv_rn(float a, float b) { volatile float r = a / b; return r; }
inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline uint32_t __byte_perm(uint32_t x, uint32_t y, uint32_t s) {
  uint8_t b[8];
  for (int i = 0; i < 4; ++i) { b[i] = (x >> (8 * i)) & 0xFF; b[4 + i] = (y >> (8 * i)) & 0xFF; }
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= uint32_t(b[(s >> (4 * i)) & 7]) << (8 * i);
  return r;
}
inline int atomicMax(int* p, int v) {
  std::lock_guard<std::mutex> g(g_atomic_mu);
  const int o = *p;
  if (v > o) *p = v;
  return o;
}
template <class A> A min(A a, A b) { return b < a ? b : a; }

// Run body() as the CTAs of `grid`, `threads` threads each (a multiple of 32, at most 1024), one CTA at a time.
template <class F> void launch(D3 grid, unsigned threads, F body) {
  gridDim = grid;
  blockDim = D3{threads, 1, 1};
  const unsigned warps = threads / 32;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::barrier<> bar(threads);
        g_bar = &bar;
        for (unsigned w = 0; w < warps; ++w) g_wbar[w] = new std::barrier<>(32);
        std::vector<std::thread> ts;
        ts.reserve(threads);
        for (unsigned t = 0; t < threads; ++t)
          ts.emplace_back([=] { threadIdx = D3{t, 0, 0}; blockIdx = D3{x, y, z}; body(); });
        for (auto& t : ts) t.join();
        for (unsigned w = 0; w < warps; ++w) delete g_wbar[w];
      }
}

#endif  // VOPT_EMU_RUNTIME_H_
