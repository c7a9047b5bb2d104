// sage_quant_emu.cpp - runs the device code of cuda/sage_quant.cu on the CPU (tests/test_sage_quant_emulated.py).
//
// The kernels' source (cuda/sage_quant.cu from "namespace {" to "// ---- host side ----") is included verbatim as
// kern.inc, which the test extracts; only the dynamic shared-memory declaration is redirected to a static buffer.
// A CTA is 256 std::threads (CTAs run one after another); std::barrier stands in for __syncthreads, per-warp
// barriers and a shared buffer for __shfl_xor_sync, a mutex for atomicMax. The fp32 intrinsics are the IEEE
// operations they name (volatile, so the compiler cannot contract them; built with -ffp-contract=off), so codes
// and scales must be bit-identical to the reference here exactly as on a GPU. What this cannot check: the CUDA
// memory model, coalescing, real warp scheduling, and the launchers' grid set-up (the emu_* functions below mirror
// the host side's launch geometry: keep them in step with it).
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>
#include <algorithm>
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
#define __launch_bounds__(x)
#define __align__(n) __attribute__((aligned(n)))

struct D3 { unsigned x, y, z; };
thread_local D3 threadIdx, blockIdx;
D3 gridDim;
std::barrier<>* g_bar;
std::barrier<>* g_wbar[8];
float g_xbuf[8][32];
alignas(16) uint4 g_dyn_smem[2048];
std::mutex g_atomic_mu;

inline void __syncthreads() { g_bar->arrive_and_wait(); }
template <class T> T __shfl_xor_sync(unsigned, T v, int off) {
  static_assert(sizeof(T) == 4, "");
  const int t = threadIdx.x, w = t / 32, l = t % 32;
  std::memcpy(&g_xbuf[w][l], &v, 4);
  g_wbar[w]->arrive_and_wait();
  T r;
  std::memcpy(&r, &g_xbuf[w][l ^ off], 4);
  g_wbar[w]->arrive_and_wait();
  return r;
}
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
inline int atomicMax(int* p, int v) { std::lock_guard<std::mutex> g(g_atomic_mu); int o = *p; if (v > o) *p = v; return o; }
template <class A> A min(A a, A b) { return b < a ? b : a; }

#include "kern.inc"

template <class F> void launch(D3 grid, F body) {
  gridDim = grid;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::barrier<> bar(256);
        g_bar = &bar;
        for (int w = 0; w < 8; ++w) g_wbar[w] = new std::barrier<>(32);
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < 256; ++t)
          ts.emplace_back([=] { threadIdx = D3{t, 0, 0}; blockIdx = D3{x, y, z}; body(); });
        for (auto& t : ts) t.join();
        for (int w = 0; w < 8; ++w) delete g_wbar[w];
      }
}

static bool vec_input(const void* x, int64_t sb, int64_t sh, int64_t sl, int64_t batch, int64_t heads) {
  return reinterpret_cast<uintptr_t>(x) % 16 == 0 && (batch == 1 || sb % 8 == 0) && (heads == 1 || sh % 8 == 0) &&
         sl % 8 == 0;
}

extern "C" {
// dtype: 0 fp16, 1 bf16. All pointers are host memory.
int emu_quant_qk(int dtype, int is_k, const void* x, int64_t sb, int64_t sh, int64_t sl, int64_t batch, int64_t heads,
                 int64_t len, int64_t dim, int64_t dim_pad, int bits, int gran, int smooth, float mult, const float* km,
                 void* codes, float* scale, float* qm, int force_scalar_out) {
  QKParams p;
  p.x = (const uint16_t*)x; p.sb = sb; p.sh = sh; p.sl = sl; p.len = len; p.heads = (int)heads; p.dim = (int)dim;
  p.is_k = is_k; p.per_block = gran; p.bits = bits; p.smooth = smooth; p.out_mult = mult; p.km = km;
  p.codes = (uint8_t*)codes; p.scale = scale; p.qm = qm;
  p.vec_in = vec_input(x, sb, sh, sl, batch, heads);
  p.vec_out = force_scalar_out ? 0 : ((uintptr_t)codes % (bits == 8 ? 8 : 4) == 0);
  D3 grid{(unsigned)((len + 127) / 128), (unsigned)heads, (unsigned)batch};
  if (dtype == 0) {
    if (dim_pad == 64) launch(grid, [&] { quant_qk_kernel<__half, 64>(p); });
    else launch(grid, [&] { quant_qk_kernel<__half, 128>(p); });
  } else {
    if (dim_pad == 64) launch(grid, [&] { quant_qk_kernel<__nv_bfloat16, 64>(p); });
    else launch(grid, [&] { quant_qk_kernel<__nv_bfloat16, 128>(p); });
  }
  return p.vec_in;
}

int emu_quant_v(int dtype, const void* x, int64_t sb, int64_t sh, int64_t sl, int64_t batch, int64_t heads,
                int64_t len, int64_t dim, int64_t dim_pad, const float* vm, void* out, float* scale) {
  VParams p;
  p.x = (const uint16_t*)x; p.sb = sb; p.sh = sh; p.sl = sl; p.len = len; p.lpad = (len + 127) / 128 * 128;
  p.heads = (int)heads; p.dim = (int)dim; p.vm = vm; p.out = (uint8_t*)out; p.scale = scale;
  p.vec_in = vec_input(x, sb, sh, sl, batch, heads); p.vec_out = (uintptr_t)out % 16 == 0;
  const int64_t n = batch * heads * dim_pad;
  std::memset(scale, 0, n * 4);
  D3 g1{(unsigned)((len + 511) / 512), (unsigned)heads, (unsigned)batch};
  D3 g2{(unsigned)(p.lpad / 128), (unsigned)heads, (unsigned)batch};
  D3 g3{(unsigned)((n + 255) / 256), 1, 1};
#define RUNV(T, D)                                        \
  launch(g1, [&] { v_amax_kernel<T, D>(p); });            \
  launch(g2, [&] { v_quant_kernel<T, D>(p); });
  if (dtype == 0) { if (dim_pad == 64) { RUNV(__half, 64) } else { RUNV(__half, 128) } }
  else { if (dim_pad == 64) { RUNV(__nv_bfloat16, 64) } else { RUNV(__nv_bfloat16, 128) } }
  launch(g3, [&] { v_scale_finalize_kernel(p.scale, n); });
  return p.vec_in;
}

int emu_channel_mean(int dtype, const void* x, int64_t sb, int64_t sh, int64_t sl, int64_t batch, int64_t heads,
                     int64_t len, int64_t dim, float* mean) {
  MeanParams p;
  p.x = (const uint16_t*)x; p.sb = sb; p.sh = sh; p.sl = sl; p.len = len; p.heads = (int)heads; p.dim = (int)dim;
  p.mean = mean; p.vec_in = vec_input(x, sb, sh, sl, batch, heads);
  D3 g{(unsigned)((dim + 15) / 16), (unsigned)heads, (unsigned)batch};
  if (dtype == 0) launch(g, [&] { channel_mean_kernel<__half>(p); });
  else launch(g, [&] { channel_mean_kernel<__nv_bfloat16>(p); });
  return p.vec_in;
}
}
