// sage_quant_emu.cpp - runs the device code of cuda/sage_quant.cu on the CPU (tests/test_sage_quant_emulated.py).
//
// The kernels' source (cuda/sage_quant.cu from "namespace {" to "// ---- host side ----") is included verbatim as
// kern.inc, which the test extracts; only the dynamic shared-memory declaration is redirected to a static buffer.
// The CUDA stand-ins and the launch loop live in emu_runtime.h: a CTA is 256 std::threads (CTAs run one after
// another); std::barrier stands in for __syncthreads, per-warp barriers and a shared buffer for __shfl_xor_sync, a
// mutex for atomicMax. The fp32 intrinsics are the IEEE operations they name (volatile, so the compiler cannot
// contract them; built with -ffp-contract=off), so codes and scales must be bit-identical to the reference here
// exactly as on a GPU. What this cannot check: the CUDA memory model, coalescing, real warp scheduling, and the
// launchers' grid set-up (the emu_* functions below mirror the host side's launch geometry: keep them in step).
#include "emu_runtime.h"

#include "kern.inc"

// launches use kThreads (256) from kern.inc: every sage_quant.cu kernel runs 256-thread CTAs

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
    if (dim_pad == 64) launch(grid, kThreads, [&] { quant_qk_kernel<__half, 64>(p); });
    else launch(grid, kThreads, [&] { quant_qk_kernel<__half, 128>(p); });
  } else {
    if (dim_pad == 64) launch(grid, kThreads, [&] { quant_qk_kernel<__nv_bfloat16, 64>(p); });
    else launch(grid, kThreads, [&] { quant_qk_kernel<__nv_bfloat16, 128>(p); });
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
  launch(g1, kThreads, [&] { v_amax_kernel<T, D>(p); });            \
  launch(g2, kThreads, [&] { v_quant_kernel<T, D>(p); });
  if (dtype == 0) { if (dim_pad == 64) { RUNV(__half, 64) } else { RUNV(__half, 128) } }
  else { if (dim_pad == 64) { RUNV(__nv_bfloat16, 64) } else { RUNV(__nv_bfloat16, 128) } }
  launch(g3, kThreads, [&] { v_scale_finalize_kernel(p.scale, n); });
  return p.vec_in;
}

int emu_channel_mean(int dtype, const void* x, int64_t sb, int64_t sh, int64_t sl, int64_t batch, int64_t heads,
                     int64_t len, int64_t dim, float* mean) {
  MeanParams p;
  p.x = (const uint16_t*)x; p.sb = sb; p.sh = sh; p.sl = sl; p.len = len; p.heads = (int)heads; p.dim = (int)dim;
  p.mean = mean; p.vec_in = vec_input(x, sb, sh, sl, batch, heads);
  D3 g{(unsigned)((dim + 15) / 16), (unsigned)heads, (unsigned)batch};
  if (dtype == 0) launch(g, kThreads, [&] { channel_mean_kernel<__half>(p); });
  else launch(g, kThreads, [&] { channel_mean_kernel<__nv_bfloat16>(p); });
  return p.vec_in;
}
}
