// vidkv_decode_emu.cpp - runs the device code of cuda/vidkv_decode.cu on the CPU (tests/test_vidkv_decode_emulated.py).
//
// kern.inc is cuda/vidkv_decode.cu from "// ---- device code ----" to "// ---- host side ----" (the kernels, their
// device helpers and the launch geometry helpers make_kparams / grid_dims), extracted verbatim by the test; the CUDA
// stand-ins and the launch loop (one std::thread per CUDA thread) are in emu_runtime.h. emu_vidkv_decode mirrors
// vopt_vidkv_decode_fwd after its argument checks (which need the CUDA runtime and are not run here): the decode
// kernel on grid (BH, splits), then, for splits > 1, the merge kernel; kThreads threads per CTA. All pointers are
// host memory.
#include "emu_runtime.h"

#include "kern.inc"

extern "C" {

int64_t emu_vidkv_params_size(void) { return static_cast<int64_t>(sizeof(vopt_vidkv_decode_params)); }

int emu_vidkv_decode(const vopt_vidkv_decode_params* params) {
  const KParams p = make_kparams(*params);
  unsigned g1[3], g2[3];
  grid_dims(p, g1, g2);
  launch(D3{g1[0], g1[1], g1[2]}, kThreads, [&] { vidkv_decode_kernel(p); });
  if (p.splits > 1) launch(D3{g2[0], g2[1], g2[2]}, kThreads, [&] { vidkv_merge_kernel(p); });
  return 0;
}
}
