// sage_attn_mma.cu - SageAttention2 attention on quantized operands with mma.sync (sm_80 / sm_89; runs on sm_90).
//
// Contract: vopt_cuda.h ("SageAttention2"); numerics: vopt/ops/sage_reference.py (the oracle). Entry points:
// vopt::sage::mma_supports / mma_launch (sage_attn_internal.h); sage_attn.cu has already checked the generic
// contract of vopt_sage_attn_params.
//
// Tiling. One CTA = 4 warps = 128 query rows (one 128-row Q block) of one (batch, query head); grid
// (L_pad(Lq) / 128, Hq, B). Warp w owns rows 32w..32w+31 of the block as two m16 tiles, so lane (g = lane / 4,
// t = lane % 4) holds rows 32w + {g, g+8, g+16, g+24}: one per-thread Q scale group ((r / 32) * 8 + r % 8) and one
// per-block group. Keys stream in tiles of 64 (the K scale block); in the QK accumulator a lane holds keys
// {8j + 2t, 8j + 2t + 1} (j = 0..7) of a tile: one per-thread K scale ((n / 64) * 4 + t) per tile. GQA: query head h
// reads KV head h / (Hq / Hkv).
//
// QK: mma.sync m16n8k32 s8 (qk_bits 8) or m16n8k64 s4 (qk_bits 4), exact s32 accumulation. Either way one MMA
// k-step covers 32 bytes of a code row, and every A/B register is one aligned 32-bit word of a [rows][bytes]
// row-major code array (A reg0: row g bytes 4t..4t+3, reg1: row g+8, reg2/3: bytes 16+4t..; B reg0: key g bytes
// 4t.., reg1 bytes 16+4t..): ldmatrix.x4 (8x8 b16 "matrices" = 8 rows x 16 bytes; lane L gets row L/4, word L%4)
// delivers exactly these registers from shared memory. K tiles live in shared memory. Q: hd64 keeps its codes in
// registers for the whole loop (8 or 16 registers); hd128 keeps them in shared memory and reloads each k-step's A
// fragment (one ldmatrix.x4) per m-tile pass, because O alone takes 128 registers there and Q in registers (16 / 32
// more) made ptxas spill (the reference sm89 kernel does the same whenever a row has more than one k-step).
// Scores: S2 = float(dot) * (q_scale * k_scale) [+ delta_s of the block's row and key], then key >= Lk and causal
// (bottom-right: key > row + Lk - Lq) -> -inf. Causal CTAs skip key tiles past their last row's diagonal; rows
// that see no key keep m = -inf, l = 0 and output 0 (lse -inf).
// Online softmax in fp32, exp2 domain (ex2.approx.ftz), quad shuffles for the row max; l is kept per lane (partial
// sums of the lane's fp32 P) and summed over the quad in the epilogue. The two m-tiles of a warp go through
// QK -> softmax -> P fragments one after the other (only one m-tile's 32 scores live next to O), then PV runs once.
// PV fp8 (sm_89+): P -> e4m3 (cvt.rn.satfinite) packed straight from the QK accumulator; V^T fp8 tiles [D][64] are
// key-permuted (perm16) by the quantizer so that A and B positions name the same key; mma.sync m16n8k32 e4m3.
// two_level = 1: per 64-key tile, m-tile and 8-channel n-tile a zeroed accumulator takes the two k32 MMAs, then
// O = O * alpha + acc on the CUDA cores; two_level = 0: the MMAs accumulate onto O * alpha. On sm_90 (where ptxas
// emulates e4m3 mma.sync) the same e4m3 P and V values are widened exactly to f16 and multiplied with m16n8k16
// (fp32 accumulation: products identical, but no FP22 truncation). PV fp16 (sm_80+): P -> fp16 (the accumulators of
// n-tiles 2i, 2i+1 are the A fragment of k16 chunk i), V fp16 [64][D] via ldmatrix.x4.trans, m16n8k16 into O
// (two_level ignored).
// Epilogue: O * (1 / l) (correctly rounded reciprocal and product: within 1 fp32 ulp of the reference's division),
// * v_scale (fp8), + v_mean, rows with l == 0 -> 0; lse_log2 = m + log2(l); fp16/bf16 RN stores (4-byte pairs when
// out and its strides allow) of rows < Lq, channels < out_dim.
//
// Memory pipeline: cp.async (LDGSTS; .cg, i.e. L2 only, for K/V) double buffering. At the top of iteration i the CTA
// issues tile i+1's K, V and delta_s (64 fp32) into the other stage, then waits for tile i (cp.async.wait_group 1 +
// __syncthreads) and computes; a second __syncthreads ends the iteration before that stage is refilled. K scales are
// prefetched one tile ahead in a register. (hd128: the Q tile rides in tile 0's commit group.)
// Shared-memory layout: unpadded rows, XOR-swizzled in 16-byte chunks (RowLayout below), so that every ldmatrix
// phase (8 consecutive rows at one logical chunk) and every cp.async phase (8 consecutive chunks) touches the 8
// different 16-byte bank groups of a 128-byte line: no bank conflicts for the fragment loads or the copies.
//   bytes / CTA: hd128 int8 fp8 49696, int8 fp16 66080, int4 fp8 33312, int4 fp16 49696; hd64 int8 fp8 16928,
//   int8 fp16 25120, int4 fp8 12832, int4 fp16 21024 (> 48 KB: opt-in attribute set at launch). sm_89 (100 KB/SM)
//   fits 2 hd128 CTAs except int8 + fp16 (1 CTA/SM there; sm_80 / sm_90 fit 2).
// Registers: __launch_bounds__(128, 2) for hd128 (<= 255; O is 128 fp32 registers), (128, 3) for hd64 (<= 168).
// ptxas -v (nvcc 13.0), spill stores/loads and stack frame are 0 for every kernel on sm_80, sm_89 and sm_90a:
//   hd128 int8 fp8 242 (sm_89) / 243 (sm_90a), int8 fp16 251 / 243 / 246 (sm_80 / 89 / 90a), int4 fp8 231 / 242,
//   int4 fp16 244 / 241 / 242; hd64 kernels 167-168. ptxas is close to its limit here; the scheduling fences
//   (dep_zero) and the re-reads of loop-invariant values (sreg_*, cta bases in shared memory) are what keep it
//   spill-free: re-check -Xptxas -v after any change in the main loop.
//
// Implemented: everything in vopt_sage_attn_params (per-thread / per-block scales, delta_s, v_mean, lse_log2, causal
// bottom-right incl. Lq > Lk, GQA, fp16/bf16 out, out strides, out_dim < head_dim, two_level 0/1). 8 kernels:
// head_dim {64, 128} x qk_bits {8, 4} x pv {fp8, fp16}; causal, granularity, delta_s, v_mean, lse, out dtype and
// two_level are runtime flags. The fp8 kernels compile to a trap on sm_80 (mma_supports refuses fp8 PV below sm_89).
// Limit: len_k <= 2^23 - 128 (int32 byte offsets inside one KV head). Not implemented: attention masks (not in the
// contract), block sparsity, split-K / decode-specific scheduling, a shared-memory staged (coalesced) epilogue.
//
// A GPU run must check first (nothing here has run): (1) pv fp8 against the reference with Lk = 64 (a wrong P/V key
// permutation or fragment relabeling gives a large error, not an ulp-level one); (2) qk_bits 4 (nibble order);
// (3) causal with Lq > Lk and Lq < Lk (rows that see no key, partial tiles); (4) per-thread vs per-block scale
// indices with Lq, Lk not multiples of 128; (5) hd128 (Q from shared memory) vs hd64 (Q in registers); (6) GQA and
// out_dim < head_dim with odd strides (scalar store path).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "sage_attn_internal.h"
#include "vopt_cuda.h"
#include "vopt_internal.h"

namespace vopt {
namespace sage {
namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr int kBlockQ = 128;   // query rows per CTA (= the per-block Q scale / delta_s block)
constexpr int kBlockK = 64;    // keys per tile (= the K scale block)
constexpr float kFp8Offset = 8.807f;  // S_FP8_OFFSET: the row max maps to 2^8.807 ~ 448
// Byte offsets inside one (batch, KV head) of K / V are int32: L_pad(Lk) * 256 (V fp16 hd128) < 2^31.
constexpr int64_t kMaxLenK = (int64_t{1} << 23) - kBlockQ;

#if defined(__CUDA_ARCH__)
constexpr int kCudaArch = __CUDA_ARCH__;
#else
constexpr int kCudaArch = 0;  // host pass
#endif

struct KParams {
  const uint8_t* q;
  const uint8_t* k;
  const float* q_scale;
  const float* k_scale;
  const float* delta_s;  // may be null
  const uint8_t* v;
  const float* v_scale;  // fp8 only
  const float* v_mean;   // may be null
  void* out;
  float* lse;            // may be null
  int64_t sb, sh, sl;
  int64_t len_q, len_k, lpad_q, lpad_k;
  int64_t heads_q, group;  // group = Hq / Hkv
  int out_dim;
  int lpad_k32;  // L_pad(Lk) as int (bounded by mma_supports)
  int per_block, causal, two_level, out_bf16;
};

// Shared-memory row layout of a tile of ROW_BYTES-byte rows (16-byte chunks), XOR-swizzled, no padding: chunk c
// of row r is stored at chunk c ^ key(r), key(r) = (r / RPL) % min(CPR, 8), with RPL = 128 / ROW_BYTES rows per
// 128-byte line (1 for rows of >= 128 bytes) and CPR chunks per row. Fragment loads (ldmatrix) and cp.async stores
// touch 8 consecutive rows 8a..8a+7 at one logical chunk, or 8 consecutive chunks of 128 bytes; both hit the 8
// different 16-byte bank groups of a 128-byte line:
//   rows >= 128 B: group = (c ^ (r % 8)) % 8, distinct over r % 8;
//   64-B rows:     group = 4 (r % 2) + (c ^ ((r / 2) % 4)), distinct over (r % 2, (r / 2) % 4);
//   32-B rows:     group = 2 (r % 4) + (c ^ ((r / 4) % 2)), distinct over (r % 4, (r / 4) % 2).
// key(r) depends on r % 8 only, and only touches the low 3 bits of the chunk, so
//   offset(8a + x, 8b + c) = offset(x, c) + 8a * ROW_BYTES + 128 b   (a, b >= 0, x < 16, c < 8):
// a lane's fragment addresses are a few per-lane values plus compile-time constants. Also, for 2c < CPR and
// h in {0, 1}: (2c + h) ^ key = 2c ^ (h ^ key), and x * ROW_BYTES has no bit below ROW_BYTES, so
//   offset(x, 2c + h) = offset(x, h) ^ (32 c).
template <int ROW_BYTES>
struct RowLayout {
  static_assert(ROW_BYTES == 32 || ROW_BYTES == 64 || ROW_BYTES == 128 || ROW_BYTES == 256, "row size");
  static constexpr int kStride = ROW_BYTES;
  static constexpr int kCpr = ROW_BYTES / 16;
  static constexpr int kRpl = ROW_BYTES >= 128 ? 1 : 128 / ROW_BYTES;
  static constexpr int kKeyMask = (kCpr < 8 ? kCpr : 8) - 1;
  __device__ __forceinline__ static uint32_t offset(int row, int chunk) {
    return static_cast<uint32_t>(row * kStride + 16 * (chunk ^ ((row / kRpl) & kKeyMask)));
  }
};

template <int D, int BITS, bool FP8>
struct Cfg {
  static constexpr int kRowBytes = D * BITS / 8;   // bytes of one Q/K code row: 128, 64 or 32
  static constexpr int kSegs = kRowBytes / 16;     // 16-byte chunks per code row: 8, 4 or 2
  static constexpr int kKSteps = kRowBytes / 32;   // MMA k-steps per row (k32 s8 or k64 s4 = 32 bytes): 4, 2, 1
  static constexpr int kNv = D / 8;                // 8-channel n-tiles of O
  // hd128: O alone takes 128 registers, so the Q codes stay in shared memory and each m-tile pass reloads its
  // fragments (as the reference kernel does when a row needs more than one k-step); hd64: Q lives in registers.
  static constexpr bool kQInSmem = D == 128;
  using QRows = RowLayout<kRowBytes>;
  using KRows = RowLayout<kRowBytes>;
  using VRows = RowLayout<FP8 ? kBlockK : 2 * D>;  // fp8: V^T rows of 64 keys; fp16: key rows of D halves
  static constexpr int kQBytes = kQInSmem ? kBlockQ * kRowBytes : 0;
  static constexpr int kKBytes = kBlockK * kRowBytes;
  static constexpr int kVBytes = (FP8 ? D : kBlockK) * VRows::kStride;
  static constexpr int kDsBytes = kBlockK * 4;
  static constexpr int kStage = kKBytes + kVBytes + kDsBytes;
  static constexpr int kBasesOffset = kQBytes + 2 * kStage;  // 4 CTA-uniform pointers (see attn_body)
  static constexpr int kSmem = kBasesOffset + 4 * 8;
  static constexpr int kMinBlocks = D == 128 ? 2 : 3;
  static_assert(kQBytes % 128 == 0 && kKBytes % 128 == 0 && kVBytes % 128 == 0 && kStage % 128 == 0,
                "128-byte aligned regions (the swizzle assumes line-aligned tiles)");
};

// ---------------------------------------------------------------------------------------------------------------
// PTX wrappers
// ---------------------------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a * b: m16n8k32 s8 (BITS 8) or m16n8k64 s4 (BITS 4); same register shapes.
template <int BITS>
__device__ __forceinline__ void mma_qk(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (BITS == 8) {
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// d += a * b, m16n8k32 e4m3 x e4m3 -> f32 (sm_89+; a trap elsewhere, never reached: see the kernel). (Templates
// here and below only so that passes that do not use them do not warn.)
template <int = 0>
__device__ __forceinline__ void mma_fp8(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  __trap();
#endif
}

// d += a * b, m16n8k16 f16 x f16 -> f32.
__device__ __forceinline__ void mma_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four fp32 -> e4m3 (RNE, saturating to +-448), byte i = x_i. cvt ... d, a, b puts a in the upper byte of d.
__device__ __forceinline__ uint32_t pack_e4m3x4(float x0, float x1, float x2, float x3) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  uint32_t r;
  asm("{\n"
      "  .reg .b16 lo, hi;\n"
      "  cvt.rn.satfinite.e4m3x2.f32 lo, %2, %1;\n"
      "  cvt.rn.satfinite.e4m3x2.f32 hi, %4, %3;\n"
      "  mov.b32 %0, {lo, hi};\n"
      "}\n"
      : "=r"(r)
      : "f"(x0), "f"(x1), "f"(x2), "f"(x3));
  return r;
#else
  __trap();
  return 0;
#endif
}

// Four e4m3 (bytes 0..3 of x) -> f16x2 {byte0, byte1} and {byte2, byte3} (exact; low half = lower byte).
template <int = 0>
__device__ __forceinline__ void e4m3x4_to_f16x2x2(uint32_t x, uint32_t& lo, uint32_t& hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm("{\n"
      "  .reg .b16 a, b;\n"
      "  mov.b32 {a, b}, %2;\n"
      "  cvt.rn.f16x2.e4m3x2 %0, a;\n"
      "  cvt.rn.f16x2.e4m3x2 %1, b;\n"
      "}\n"
      : "=r"(lo), "=r"(hi)
      : "r"(x));
#else
  __trap();
  lo = hi = 0;
#endif
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);  // .x = lo = the lower 16 bits
  return *reinterpret_cast<const uint32_t*>(&h);
}

// Scheduling fences. ptxas hoists shared-memory fragment loads (and with them the MMAs and their accumulators) far
// above their use to hide latency; next to O (up to 128 registers) that spills. So some loads take their address
// from a value produced by the work that must come first, through dep_zero(x): 0 unless x has the bit pattern
// kNever, which it never has (kNeverF32 = 0xffffffff: a NaN payload that no arithmetic produces, and P, l >= 0
// never set a sign bit; kNeverS32 = INT_MIN: |QK dot| < 2^21). ptxas cannot see through it. Used for: m-tile 1's
// Q/K loads after m-tile 0's P fragments and row sums; each QK k-step's loads after the previous k-step's first
// MMA; the PV loads after m-tile 1's P and l; each group of VG / VGT V loads after the previous group's O update.
// Were the impossible pattern ever seen, a load would read 16 bytes further (inside the allocation): wrong values,
// no fault.
constexpr uint32_t kNeverF32 = 0xffffffffu;
constexpr uint32_t kNeverS32 = 0x80000000u;
template <uint32_t kNever>
__device__ __forceinline__ uint32_t dep_zero(uint32_t x) {
  uint32_t z;
  asm volatile(
      "{\n"
      "  .reg .pred p;\n"
      "  setp.eq.u32 p, %1, %2;\n"
      "  selp.u32 %0, 16, 0, p;\n"
      "}\n"
      : "=r"(z)
      : "r"(x), "n"(kNever));
  return z;
}
template <int N>
__device__ __forceinline__ uint32_t or_all(const uint32_t (&a)[N][4]) {
  uint32_t x = 0;
#pragma unroll
  for (int i = 0; i < N; ++i) x |= a[i][0] | a[i][1] | a[i][2] | a[i][3];
  return x;
}
__device__ __forceinline__ uint32_t dep_zero_f32(float x) { return dep_zero<kNeverF32>(__float_as_uint(x)); }
__device__ __forceinline__ uint32_t dep_zero_s32(int x) { return dep_zero<kNeverS32>(static_cast<uint32_t>(x)); }

__device__ __forceinline__ uint32_t sreg_ctaid_x() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%ctaid.x;\n" : "=r"(r));
  return r;
}
__device__ __forceinline__ uint32_t sreg_ctaid_y() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%ctaid.y;\n" : "=r"(r));
  return r;
}
__device__ __forceinline__ uint32_t sreg_ctaid_z() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%ctaid.z;\n" : "=r"(r));
  return r;
}
__device__ __forceinline__ uint32_t sreg_tid_x() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(r));
  return r;
}

__device__ __forceinline__ float ex2(float x) {  // 2^x; ex2(-inf) = +0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// acc += P V for one 64-key tile, one m-tile, one 8-channel n-tile. v[c] = V^T fp8 register c of the n-tile:
// channel 8nv + g, key positions 16c + 4t..16c + 4t + 3 (B reg (c & 1) of k32 chunk c >> 1).
// Native (sm_89): pa = 2 k32 chunks of e4m3 A fragments. Emulated (sm_90): pa = 4 k16 f16 A fragments (see the
// P packing); v[c] is widened the same way: B reg0 = positions 16c + {4t, 4t+1} (k = 2t, 2t+1), reg1 = 16c +
// {4t+2, 4t+3} (k = 8+2t, 9+2t), matching the A side's relabeling.
template <bool kEmu, int N>
__device__ __forceinline__ void pv_fp8(float (&acc)[4], const uint32_t (&pa)[N][4], const uint32_t (&v)[4]) {
  if constexpr (kEmu) {
    static_assert(N == 4, "4 k16 steps");
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      uint32_t b0, b1;
      e4m3x4_to_f16x2x2(v[c], b0, b1);
      mma_f16(acc, pa[c], b0, b1);
    }
  } else {
    static_assert(N == 2, "2 k32 steps");
    mma_fp8(acc, pa[0], v[0], v[1]);
    mma_fp8(acc, pa[1], v[2], v[3]);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Tile loader: key tile `tile` of K, V (and delta_s) into the stage at shared address `st` (all 128 threads).
// Tiles lie inside the padded buffers (tile < ceil(Lk / 64) <= L_pad(Lk) / 64), so no bounds checks.
// ---------------------------------------------------------------------------------------------------------------
// 16-byte chunk c = tid + 128 i of a tile with CPR chunks per row: row c / CPR = tid / CPR + i * (128 / CPR), chunk
// tid % CPR. 128 / CPR is a multiple of 8, so row % 8 (the swizzle key) does not depend on i: the shared offset is
// offset(tid / CPR, tid % CPR) + i * (128 / CPR) * stride.
template <class Rows, int CPR>
__device__ __forceinline__ uint32_t copy_offset(int tid) {
  static_assert((kThreads / CPR) % 8 == 0, "rows per copy step must keep row % 8");
  return Rows::offset(tid / CPR, tid % CPR);
}

template <int D, int BITS, bool FP8>
__device__ __forceinline__ void load_tile(uint32_t st, const uint8_t* kg, const uint8_t* vg, const float* dsg,
                                          int tile, int lpad_k) {
  using C = Cfg<D, BITS, FP8>;
  // tid re-read from %tid.x (volatile): the per-thread offsets below are recomputed per call instead of being kept
  // in registers across the main loop.
  const int tid = static_cast<int>(sreg_tid_x());
  // Byte offsets inside one (batch, KV head) are int32 (mma_supports bounds L_pad(Lk)); the bases are CTA-uniform.
  // K: 64 consecutive code rows (SEGS chunks each), contiguous in global memory.
  constexpr int kKChunks = kBlockK * C::kSegs;
  static_assert(kKChunks % kThreads == 0, "whole K chunks per thread");
  {
    const uint32_t dst = st + copy_offset<typename C::KRows, C::kSegs>(tid);
    const uint32_t src = static_cast<uint32_t>(tile * (kBlockK * C::kRowBytes) + tid * 16);
#pragma unroll
    for (int i = 0; i < kKChunks / kThreads; ++i)
      cp_async16(dst + i * (kThreads / C::kSegs) * C::KRows::kStride, kg + (src + i * (kThreads * 16)));
  }
  const uint32_t sv = st + C::kKBytes;
  if constexpr (FP8) {
    // V^T: D channel rows of 64 (permuted) key bytes = 4 chunks, row stride L_pad(Lk) in global memory.
    static_assert((D * 4) % kThreads == 0, "whole V chunks per thread");
    const uint32_t dst = sv + copy_offset<typename C::VRows, 4>(tid);
    const uint32_t src = static_cast<uint32_t>(tile * kBlockK + (tid >> 2) * lpad_k + (tid & 3) * 16);
#pragma unroll
    for (int i = 0; i < D * 4 / kThreads; ++i)
      cp_async16(dst + i * (kThreads / 4) * C::VRows::kStride,
                 vg + (src + static_cast<uint32_t>(i * (kThreads / 4) * lpad_k)));
  } else {
    // V fp16: 64 consecutive key rows of D halves (D / 8 chunks), contiguous.
    constexpr int kVChunks = kBlockK * (D / 8);
    static_assert(kVChunks % kThreads == 0, "whole V chunks per thread");
    const uint32_t dst = sv + copy_offset<typename C::VRows, D / 8>(tid);
    const uint32_t src = static_cast<uint32_t>(tile * (kBlockK * 2 * D) + tid * 16);
#pragma unroll
    for (int i = 0; i < kVChunks / kThreads; ++i)
      cp_async16(dst + i * (kThreads / (D / 8)) * C::VRows::kStride, vg + (src + i * (kThreads * 16)));
  }
  // delta_s: 64 floats of this Q block's row (4-byte copies: delta_s has no alignment promise beyond fp32).
  if (dsg != nullptr && tid < kBlockK) cp_async4(st + C::kKBytes + C::kVBytes + tid * 4, dsg + (tile * kBlockK + tid));
}

// ---------------------------------------------------------------------------------------------------------------
// The kernel body.
// ---------------------------------------------------------------------------------------------------------------
template <int D, int BITS, bool FP8>
__device__ __forceinline__ void attn_body(const KParams& p) {
  using C = Cfg<D, BITS, FP8>;
  constexpr int KS = C::kKSteps;
  constexpr int SEGS = C::kSegs;
  constexpr int NV = C::kNv;
  // FP8 PV on sm_90: mma.sync e4m3 is emulated there by ptxas; we widen to f16 ourselves (same numbers, fewer
  // registers). sm_89 uses the native e4m3 MMA.
  constexpr bool kEmuFp8 = FP8 && kCudaArch >= 900;
  constexpr int VG = 4;   // fp16 PV: V fragment loads per fence group (see dep_zero)
  constexpr int VGT = 2;  // fp8 PV: the same (each load feeds 2 m-tiles x 4 registers of fresh accumulators)
  extern __shared__ __align__(128) uint8_t smem[];
  const uint32_t smem0 = smem_u32(smem);

  const int tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;  // accumulator row group / column pair
  const int lm = lane >> 3, lr = lane & 7;  // ldmatrix: which 8x8 matrix this lane addresses, and which row of it
  const int64_t qt = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t bh = b * p.heads_q + h;                              // (batch, query head)
  const int64_t bhk = b * (p.heads_q / p.group) + h / p.group;       // (batch, KV head)
  const int64_t r0 = qt * kBlockQ;
  const int64_t Lq = p.len_q, Lk = p.len_k;

  // Key tiles this CTA visits: all ceil(Lk / 64); causal: up to the tile holding the last row's last visible key
  // (row min(r0 + 127, Lq - 1) sees keys <= row + Lk - Lq); none if even that row sees no key.
  int64_t n_tiles64 = (Lk + kBlockK - 1) / kBlockK;
  if (p.causal) {
    const int64_t last_row = r0 + kBlockQ - 1 < Lq - 1 ? r0 + kBlockQ - 1 : Lq - 1;
    const int64_t last_key = last_row + Lk - Lq;
    n_tiles64 = last_key < 0 ? 0 : (last_key / kBlockK + 1 < n_tiles64 ? last_key / kBlockK + 1 : n_tiles64);
  }
  const int n_tiles = static_cast<int>(n_tiles64);  // <= L_pad(Lk) / 64 (mma_supports bounds Lk)

  const uint8_t* kg = p.k + bhk * p.lpad_k * C::kRowBytes;
  const uint8_t* vg = p.v + bhk * p.lpad_k * (FP8 ? D : 2 * D);  // fp8 [D][L_pad] bytes, fp16 [L_pad][D] halves
  const float* dsg = p.delta_s != nullptr ? p.delta_s + (bh * (p.lpad_q / kBlockQ) + qt) * p.lpad_k : nullptr;
  const uint8_t* qg = p.q + (bh * p.lpad_q + r0) * C::kRowBytes;  // this CTA's 128 Q code rows, contiguous
  const uint32_t sq = smem0;                 // Q tile (hd128)
  const uint32_t stage0 = smem0 + C::kQBytes;  // K/V/delta_s stages

  if (n_tiles > 0) {
    if constexpr (C::kQInSmem) {  // 128 rows x SEGS chunks; in the same commit group as tile 0
      const uint32_t dst = sq + copy_offset<typename C::QRows, SEGS>(tid);
#pragma unroll
      for (int i = 0; i < SEGS; ++i)
        cp_async16(dst + i * (kThreads / SEGS) * C::kRowBytes, qg + tid * 16 + i * (kThreads * 16));
    }
    load_tile<D, BITS, FP8>(stage0, kg, vg, dsg, 0, p.lpad_k32);
  }
  cp_async_commit();

  // Q A-fragments of m-tile mi (warp rows 16mi..16mi+15), k-step kc (bytes 32kc..32kc+31 of a row): reg0 = row g
  // bytes 4t..4t+3, reg1 = row g+8, reg2 / reg3 = the same at bytes +16.
  // hd64: loaded once from global memory into registers. hd128: read from shared memory with ldmatrix.x4 per
  // k-step: matrix m = L/8 covers rows 8 (m & 1) + 0..7 and chunk 2kc + (m >> 1), so register m is exactly A reg m;
  // lane L addresses row 32w + 16mi + 8 (lm & 1) + lr, chunk 2kc + (lm >> 1): qlane ^ 32kc, + 16mi rows.
  uint32_t qa[2][C::kQInSmem ? 1 : KS][4];  // hd128: unused
  uint32_t qlane = 0;
  if constexpr (C::kQInSmem) {
    qlane = 32 * warp * C::kRowBytes + C::QRows::offset(8 * (lm & 1) + lr, lm >> 1);
  } else {
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int kc = 0; kc < KS; ++kc) {
        const uint8_t* base = qg + (32 * warp + 16 * mi + g) * C::kRowBytes + 32 * kc + 4 * t;
        qa[mi][kc][0] = __ldg(reinterpret_cast<const uint32_t*>(base));
        qa[mi][kc][1] = __ldg(reinterpret_cast<const uint32_t*>(base + 8 * C::kRowBytes));
        qa[mi][kc][2] = __ldg(reinterpret_cast<const uint32_t*>(base + 16));
        qa[mi][kc][3] = __ldg(reinterpret_cast<const uint32_t*>(base + 8 * C::kRowBytes + 16));
      }
  }
  // Q scale: per-thread index (r / 32) * 8 + r % 8 with r / 32 = r0 / 32 + warp, r % 8 = g for all 4 rows;
  // per-block index r / 128 = qt. Layouts [B, Hq, L_pad / 32, 8] and [B, Hq, L_pad / 128].
  const float qs = p.per_block ? __ldg(p.q_scale + bh * (p.lpad_q / kBlockQ) + qt)
                               : __ldg(p.q_scale + bh * (p.lpad_q / 4) + (r0 / 32 + warp) * 8 + g);
  // K scale of tile i: per-thread [B, Hkv, L_pad / 64, 4] index i * 4 + t (keys 8j + 2t + e: (n % 8) / 2 = t);
  // per-block [B, Hkv, L_pad / 64] index i.
  const int ks_step = p.per_block ? 1 : 4;
  const float* ksg = p.k_scale + bhk * (p.lpad_k / kBlockK) * ks_step;  // CTA-uniform
  const int ks_t = p.per_block ? 0 : t;
  // The CTA-uniform global bases, parked in shared memory: the main loop re-reads them once per tile (broadcast
  // loads after a barrier, which the compiler cannot hoist) instead of holding 4 x 64-bit registers next to O.
  const void** cta_bases = reinterpret_cast<const void**>(smem + C::kBasesOffset);
  if (tid == 0) {
    cta_bases[0] = kg;
    cta_bases[1] = vg;
    cta_bases[2] = dsg;
    cta_bases[3] = ksg;
  }
  __syncthreads();

  float m[4], l[4];  // lane rows ri = 2mi + hh: running (shifted) max, per-lane partial sum of P
#pragma unroll
  for (int ri = 0; ri < 4; ++ri) {
    m[ri] = -INFINITY;
    l[ri] = 0.0f;
  }
  float o[2][NV][4];  // O accumulator: o[mi][nv] = rows (g, g+8) of m-tile mi, channels 8nv + 2t, +1
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int nv = 0; nv < NV; ++nv)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mi][nv][e] = 0.0f;

  // Lane parts of the K / V fragment-load offsets (ldmatrix: lane L addresses row lr = L%8 of matrix lm = L/8);
  // see RowLayout for offset(8a + x, c) = offset(x, c) + 8a * ROW_BYTES and offset(x, 2c + h) = offset(x, h) ^ 32c.
  // K, x4 load (k-step kc, n-tile pair jp): matrix m at key rows 8 (2jp + (m >> 1)) + 0..7, chunk 2kc + (m & 1):
  // register m = key 8 (2jp + (m >> 1)) + g, bytes 32kc + 16 (m & 1) + 4t.. = B reg (m & 1) of n-tile 2jp + (m >> 1).
  // Lane offset: klane ^ 32kc, + 16jp rows.
  const uint32_t klane = C::KRows::offset(8 * (lm >> 1) + lr, lm & 1);
  // V fp8 (V^T rows of 64 key positions = 4 chunks): x4 at channel rows 8nv + lr, chunk lm: vlane + 8nv rows;
  // register c = channel 8nv + g, positions 16c + 4t.. = B reg (c & 1) of k32 chunk c >> 1.
  // V fp16 (key rows of D halves): x4.trans for (k16 chunk kk, channel pair np): matrix m at key rows
  // 16kk + 8 (m & 1) + 0..7, chunk 2np + (m >> 1) (channels 16np + 8 (m >> 1) + 0..7); transposed, register m =
  // keys 2t, 2t+1 (+8 for m odd) of channel g (+8 for m >= 2) = B reg (m & 1) of n-tile 2np + (m >> 1).
  // Lane offset: vlane ^ 32np, + 16kk rows.
  const uint32_t vlane = FP8 ? C::VRows::offset(lr, lm) : C::VRows::offset(8 * (lm & 1) + lr, lm >> 1);

  float ks_next = n_tiles > 0 ? __ldg(ksg + ks_t) : 1.0f;

  for (int tile = 0; tile < n_tiles; ++tile) {
    const int stage = tile & 1;
    const uint32_t st = stage0 + stage * C::kStage;
    const float ks = ks_next;
    if (tile + 1 < n_tiles) {
      const void* const volatile* bases = cta_bases;
      load_tile<D, BITS, FP8>(stage0 + (stage ^ 1) * C::kStage, static_cast<const uint8_t*>(bases[0]),
                              static_cast<const uint8_t*>(bases[1]), static_cast<const float*>(bases[2]), tile + 1,
                              p.lpad_k32);
      ks_next = __ldg(static_cast<const float*>(bases[3]) + ((tile + 1) * ks_step + ks_t));
    }
    cp_async_commit();
    cp_async_wait<1>();  // all but the newest group (tile + 1) done: tile `tile` has landed (this thread's part)
    __syncthreads();     // ... and every thread's part

    // The two m-tiles go through QK -> softmax -> P fragments one after the other, so only one m-tile's scores
    // (32 registers) are live next to O (the K fragments are read from shared memory twice); PV then runs once
    // for both m-tiles.
    // P A-fragment registers per m-tile: fp8 2 k32 chunks x 4; fp16 (and fp8 emulated on sm_90, see pv_fp8) 4 k16
    // chunks x 4.
    constexpr int kPRegs = FP8 && !kEmuFp8 ? 8 : 16;
    uint32_t pa[2][kPRegs / 4][4];
    float alpha[4];
    const float qk = __fmul_rn(qs, ks);  // q_scale * k_scale first, as the reference does
    const int64_t k0 = static_cast<int64_t>(tile) * kBlockK;
    // Tile-relative last visible key of row r0 (causal). r0 is re-read from %ctaid.x here (a volatile read, so no
    // 64-bit register stays live across the loop for it).
    const int64_t diag = static_cast<int64_t>(sreg_ctaid_x()) * kBlockQ + Lk - Lq - k0;
    const bool need_mask = k0 + kBlockK > Lk || (p.causal && diag < kBlockK - 1);  // CTA-uniform
    // int32 versions for the per-element tests: lk_rel = min(Lk - 1 - k0, 64); diag clamped to [-256, 256]
    // (rows add 0..127: below -128 everything is masked, above 64 nothing, either way the result is the same).
    const int lk_rel = Lk - 1 - k0 < kBlockK ? static_cast<int>(Lk - 1 - k0) : kBlockK;
    const int diag32 = diag < -256 ? -256 : (diag > 256 ? 256 : static_cast<int>(diag));
    uint32_t fz = 0;  // scheduling fence offset (always 0, see dep_zero)
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
      // ---- S = Q K^T (exact int32) for m-tile mi ----
      int sacc[8][4];
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) sacc[j][e] = 0;
      uint32_t fk = fz;  // fence offset of this k-step's loads
#pragma unroll
      for (int kc = 0; kc < KS; ++kc) {
        if (kc > 0) fk = dep_zero_s32(sacc[0][0]);  // fence: the previous k-step's first MMA
        uint32_t qf[4];
        if constexpr (C::kQInSmem) ldsm_x4(sq + fk + 16 * mi * C::kRowBytes + (qlane ^ (32 * kc)), qf);
        const uint32_t(&qfrag)[4] = C::kQInSmem ? qf : qa[mi][C::kQInSmem ? 0 : kc];
#pragma unroll
        for (int jp = 0; jp < 4; ++jp) {
          uint32_t r[4];
          ldsm_x4(st + fk + 16 * jp * C::kRowBytes + (klane ^ (32 * kc)), r);
          mma_qk<BITS>(sacc[2 * jp], qfrag, r[0], r[1]);
          mma_qk<BITS>(sacc[2 * jp + 1], qfrag, r[2], r[3]);
        }
      }

      // ---- scores (exp2 domain): float(dot) * (qs * ks) [+ delta_s], masks ----
      // sacc[j][e]: row ri = 2mi + (e >> 1) (= row r0 + 32w + 16mi + 8 (e >> 1) + g), key (tile-relative)
      // 8j + 2t + (e & 1).
      float s[8][4];
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = __fmul_rn(__int2float_rn(sacc[j][e]), qk);  // exact: |dot| < 2^24
      if (p.delta_s != nullptr) {
        const float* sds = reinterpret_cast<const float*>(smem + C::kQBytes + stage * C::kStage + C::kKBytes + C::kVBytes);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const float2 d2 = *reinterpret_cast<const float2*>(sds + 8 * j + 2 * t);
          s[j][0] = __fadd_rn(s[j][0], d2.x);
          s[j][1] = __fadd_rn(s[j][1], d2.y);
          s[j][2] = __fadd_rn(s[j][2], d2.x);
          s[j][3] = __fadd_rn(s[j][3], d2.y);
        }
      }
      if (need_mask) {
        // Last visible key of the row: Lk - 1, and row + Lk - Lq if causal; tile-relative keys > rel are masked.
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int causal_rel = diag32 + (32 * warp + 16 * mi + 8 * hh + g);
          const int rel = p.causal && causal_rel < lk_rel ? causal_rel : lk_rel;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            if (8 * j + 2 * t > rel) s[j][2 * hh] = -INFINITY;
            if (8 * j + 2 * t + 1 > rel) s[j][2 * hh + 1] = -INFINITY;
          }
        }
      }

      // ---- online softmax (rows ri = 2mi + hh) ----
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int ri = 2 * mi + hh;
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < 8; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * hh], s[j][2 * hh + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));  // the quad (t = 0..3) holds the whole row
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(m[ri], FP8 ? __fsub_rn(mx, kFp8Offset) : mx);
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;
        alpha[ri] = ex2(__fsub_rn(m[ri], m_use));  // m = -inf: 0
        m[ri] = m_new;
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          s[j][2 * hh] = ex2(__fsub_rn(s[j][2 * hh], m_use));  // masked (-inf): 0
          s[j][2 * hh + 1] = ex2(__fsub_rn(s[j][2 * hh + 1], m_use));
          sum = __fadd_rn(sum, __fadd_rn(s[j][2 * hh], s[j][2 * hh + 1]));
        }
        l[ri] = __fadd_rn(__fmul_rn(l[ri], alpha[ri]), sum);  // fp32 P, before rounding to fp8 / fp16
      }

      // ---- P A fragments ----
      if constexpr (FP8) {
        // k32 chunk kc (tile keys 32kc..32kc+31): lane t holds keys 2t, 2t+1 (n-tile 4kc), 8+2t, 9+2t (4kc+1),
        // 16+2t, 17+2t (4kc+2), 24+2t, 25+2t (4kc+3) of the chunk. Packed in that order into positions 4t..4t+3
        // (reg0 row g, reg1 row g+8) and 16+4t..16+4t+3 (reg2, reg3): position 4t+i holds key
        // perm16[4t+i] = {2t, 2t+1, 8+2t, 9+2t}[i] (+16 for reg2/3), the key the quantizer stored at that
        // position of V (perm16 = {0,1,8,9,2,3,10,11,4,5,12,13,6,7,14,15} in each 16-key group).
#pragma unroll
        for (int kc = 0; kc < 2; ++kc) {
          const int j = 4 * kc;
          uint32_t p8[4];
          p8[0] = pack_e4m3x4(s[j][0], s[j][1], s[j + 1][0], s[j + 1][1]);
          p8[1] = pack_e4m3x4(s[j][2], s[j][3], s[j + 1][2], s[j + 1][3]);
          p8[2] = pack_e4m3x4(s[j + 2][0], s[j + 2][1], s[j + 3][0], s[j + 3][1]);
          p8[3] = pack_e4m3x4(s[j + 2][2], s[j + 2][3], s[j + 3][2], s[j + 3][3]);
          if constexpr (kEmuFp8) {
            // sm_90: the same e4m3 values, widened (exactly) to f16 A fragments of two k16 steps 2kc + hf, which
            // take positions 16hf + {4t, 4t+1} as their k = {2t, 2t+1} and 16hf + {4t+2, 4t+3} as k = {8+2t, 9+2t}
            // (reg0/reg1: rows g / g+8 from the low halves of p8[2hf] / p8[2hf+1], reg2/reg3 from the high halves).
            // The V side applies the same relabeling (pv_fp8), so every product still pairs the same key.
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
              e4m3x4_to_f16x2x2(p8[2 * hf], pa[mi][2 * kc + hf][0], pa[mi][2 * kc + hf][2]);
              e4m3x4_to_f16x2x2(p8[2 * hf + 1], pa[mi][2 * kc + hf][1], pa[mi][2 * kc + hf][3]);
            }
          } else {
#pragma unroll
            for (int i = 0; i < 4; ++i) pa[mi][kc][i] = p8[i];
          }
        }
      } else {
        // k16 chunk kk (keys 16kk..16kk+15) = the accumulators of n-tiles 2kk (cols 2t, 2t+1 -> reg0 row g, reg1
        // row g+8) and 2kk+1 (cols 8+2t, 9+2t -> reg2, reg3).
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          pa[mi][kk][0] = pack_half2(s[2 * kk][0], s[2 * kk][1]);
          pa[mi][kk][1] = pack_half2(s[2 * kk][2], s[2 * kk][3]);
          pa[mi][kk][2] = pack_half2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
          pa[mi][kk][3] = pack_half2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
        }
      }
      // Scheduling fence: m-tile 1's Q / K fragment loads (and so its MMAs) wait for all of m-tile 0's P fragments
      // and row sums. Otherwise ptxas hoists them into m-tile 0's softmax and both m-tiles' scores are live at once
      // next to O and the Q codes. P >= 0 and l >= 0: no byte (fp8) / half (fp16) of a P register and no l has
      // its sign bit set, so the OR of them all is never 0xffffffff.
      if (mi == 0) fz = dep_zero<kNeverF32>(or_all(pa[0]) | __float_as_uint(l[0]) | __float_as_uint(l[1]));
    }

    // ---- O += P V ----
    const uint32_t sv = st + C::kKBytes;
    // V tile base, re-derived through dep_zero (scheduling fences): PV starts after both m-tiles' softmax (l of the
    // last row), then each group of 4 V fragment loads waits for the previous group's first MMA.
    uint32_t vst = sv + dep_zero<kNeverF32>(or_all(pa[1]) | __float_as_uint(l[2]) | __float_as_uint(l[3]));
    if constexpr (FP8) {
      // One code path for both accumulation modes (selects, no branch): per (n-tile, m-tile) x = O * alpha;
      // two_level: acc = 0, acc += P V (the tile's PV in a fresh accumulator), O = x + acc (CUDA cores);
      // single:    acc = x, acc += P V (the MMAs accumulate onto the rescaled O), O = acc.
      const bool two_level = p.two_level != 0;
      // V^T tile: row = channel (D rows), 64 key positions = 4 chunks. x4 at rows 8nv + L%8, chunk L/8: register c
      // = channel 8nv + g, positions 16c + 4t..16c+4t+3 = B reg0 (c = 0, 2) / reg1 (c = 1, 3) of k32 chunk c / 2.
#pragma unroll
      for (int nv = 0; nv < NV; ++nv) {
        if (nv % VGT == 0 && nv > 0) vst = sv + dep_zero_f32(o[0][nv - VGT][0]);  // fence: previous group's O
        uint32_t r[4];
        ldsm_x4(vst + 8 * nv * C::VRows::kStride + vlane, r);
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          float x[4], acc[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            x[e] = __fmul_rn(o[mi][nv][e], alpha[2 * mi + (e >> 1)]);
            acc[e] = two_level ? 0.0f : x[e];
          }
          pv_fp8<kEmuFp8>(acc, pa[mi], r);
#pragma unroll
          for (int e = 0; e < 4; ++e) o[mi][nv][e] = two_level ? __fadd_rn(x[e], acc[e]) : acc[e];
        }
      }
    } else {
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int nv = 0; nv < NV; ++nv)
#pragma unroll
          for (int e = 0; e < 4; ++e) o[mi][nv][e] = __fmul_rn(o[mi][nv][e], alpha[2 * mi + (e >> 1)]);
      // V tile [64 keys][D halves]. x4.trans for (kk, channel pair np): matrix m = L/8 at key rows
      // 16kk + 8 (m & 1) + L%8, channels 16np + 8 (m >> 1) .. +7 (chunk 2np + (m >> 1)). Transposed, lane gets keys
      // 2t, 2t+1 (+8 for m odd) of channel g (+8 for m >= 2): r0/r1 = B reg0/reg1 of n-tile 2np, r2/r3 of 2np+1.
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int np = 0; np < D / 16; ++np) {
          const int n = kk * (D / 16) + np;  // load index; fence on the previous group's first MMA output
          if (n % VG == 0 && n > 0) vst = sv + dep_zero_f32(o[0][2 * ((n - VG) % (D / 16))][0]);
          uint32_t r[4];
          ldsm_x4_trans(vst + 16 * kk * C::VRows::kStride + (vlane ^ (32 * np)), r);
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) {
            mma_f16(o[mi][2 * np], pa[mi][kk], r[0], r[1]);
            mma_f16(o[mi][2 * np + 1], pa[mi][kk], r[2], r[3]);
          }
        }
    }
    __syncthreads();  // every warp is done with this stage before iteration tile + 1 refills it
  }
  cp_async_wait<0>();  // no copy may be in flight at exit (only the empty last group can be)

  // ---- epilogue ----
#pragma unroll
  for (int ri = 0; ri < 4; ++ri) {  // l: sum the quad's partial sums
    l[ri] = __fadd_rn(l[ri], __shfl_xor_sync(0xffffffffu, l[ri], 1));
    l[ri] = __fadd_rn(l[ri], __shfl_xor_sync(0xffffffffu, l[ri], 2));
  }
  // Indices again from the special registers (volatile reads), so that nothing derived from them has to stay live
  // across the loop.
  const int64_t eb = sreg_ctaid_z(), eh = sreg_ctaid_y();
  const int etid = static_cast<int>(sreg_tid_x());
  const int et = etid & 3;
  const int64_t erow0 = static_cast<int64_t>(sreg_ctaid_x()) * kBlockQ + 32 * (etid >> 5) + ((etid & 31) >> 2);
  const int64_t bhk_d = (eb * (p.heads_q / p.group) + eh / p.group) * D;
  const bool vec_ok = ((reinterpret_cast<uintptr_t>(p.out) & 3) == 0) && ((p.sb | p.sh | p.sl) & 1) == 0;
#pragma unroll
  for (int ri = 0; ri < 4; ++ri) {
    const int mi = ri >> 1, e0 = 2 * (ri & 1);
    const int64_t row = erow0 + 16 * mi + 8 * (ri & 1);
    if (row >= p.len_q) continue;
    const bool live = l[ri] > 0.0f;
    if (p.lse != nullptr && et == 0)
      p.lse[(eb * p.heads_q + eh) * p.len_q + row] = live ? __fadd_rn(m[ri], log2f(l[ri])) : -INFINITY;
    // O / l as O * (1 / l): both correctly rounded, so within 1 ulp (fp32) of the reference's division.
    const float inv_l = live ? __frcp_rn(l[ri]) : 0.0f;
    const int64_t obase = eb * p.sb + eh * p.sh + row * p.sl;
#pragma unroll
    for (int nv = 0; nv < NV; ++nv) {
      const int ch = 8 * nv + 2 * et;
      if (ch >= p.out_dim) break;
      float v[2];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float x = 0.0f;
        if (live) {
          x = __fmul_rn(o[mi][nv][e0 + e], inv_l);
          if constexpr (FP8) x = __fmul_rn(x, __ldg(p.v_scale + bhk_d + ch + e));
          if (p.v_mean != nullptr) x = __fadd_rn(x, __ldg(p.v_mean + bhk_d + ch + e));
        }
        v[e] = x;
      }
      if (p.out_bf16) {
        __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out) + obase + ch;
        if (vec_ok && ch + 1 < p.out_dim) {
          *reinterpret_cast<__nv_bfloat162*>(out) = __floats2bfloat162_rn(v[0], v[1]);
        } else {
          out[0] = __float2bfloat16_rn(v[0]);
          if (ch + 1 < p.out_dim) out[1] = __float2bfloat16_rn(v[1]);
        }
      } else {
        __half* out = static_cast<__half*>(p.out) + obase + ch;
        if (vec_ok && ch + 1 < p.out_dim) {
          *reinterpret_cast<__half2*>(out) = __floats2half2_rn(v[0], v[1]);
        } else {
          out[0] = __float2half_rn(v[0]);
          if (ch + 1 < p.out_dim) out[1] = __float2half_rn(v[1]);
        }
      }
    }
  }
}

template <int D, int BITS, bool FP8>
__global__ void __launch_bounds__(kThreads, Cfg<D, BITS, FP8>::kMinBlocks) sage_attn_mma_kernel(const KParams p) {
  if constexpr (FP8 && kCudaArch > 0 && kCudaArch < 890) {
    using C = Cfg<D, BITS, FP8>;  // (referenced so that this pass does not warn about unused members)
    static_assert(C::kSegs > 0 && C::kKSteps > 0 && C::kNv > 0, "");
    __trap();  // sm_80/86 have no FP8 MMA; mma_supports refuses fp8 PV there, so this is never launched
  } else {
    attn_body<D, BITS, FP8>(p);
  }
}

template <int D, int BITS, bool FP8>
cudaError_t launch(const KParams& kp, dim3 grid, cudaStream_t stream) {
  constexpr int smem = Cfg<D, BITS, FP8>::kSmem;
  auto kernel = sage_attn_mma_kernel<D, BITS, FP8>;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess)
      return fail(err, "sage mma attention: cannot set %d bytes of dynamic shared memory (%s)", smem,
                  cudaGetErrorString(err));
  }
  kernel<<<grid, kThreads, smem, stream>>>(kp);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return fail(err, "sage mma attention (head_dim %d, qk int%d, pv %s): launch failed (%s)", D, BITS,
                FP8 ? "fp8" : "fp16", cudaGetErrorString(err));
  return cudaSuccess;
}

template <int D, int BITS>
cudaError_t launch_pv(const KParams& kp, bool fp8, dim3 grid, cudaStream_t stream) {
  return fp8 ? launch<D, BITS, true>(kp, grid, stream) : launch<D, BITS, false>(kp, grid, stream);
}

}  // namespace

cudaError_t mma_supports(const vopt_sage_attn_params& p, int cc) {
  if (cc < 80)
    return fail(cudaErrorNotSupported, "the mma SageAttention kernel needs sm_80 or newer (this device is sm_%d)",
                cc);
  if (p.pv == VOPT_SAGE_PV_FP8 && cc < 89)
    return fail(cudaErrorNotSupported,
                "FP8 PV (pv=%d) needs FP8 tensor cores, sm_89 or newer (this device is sm_%d); use pv=%d (fp16)",
                p.pv, cc, VOPT_SAGE_PV_FP16);
  if (p.len_k > kMaxLenK)
    return fail(cudaErrorNotSupported, "len_k=%lld exceeds the mma SageAttention kernel's limit of %lld keys",
                static_cast<long long>(p.len_k), static_cast<long long>(kMaxLenK));
  return cudaSuccess;
}

cudaError_t mma_launch(const vopt_sage_attn_params& p, int cc, cudaStream_t stream) {
  cudaError_t err = mma_supports(p, cc);
  if (err != cudaSuccess) return err;
  KParams kp;
  kp.q = static_cast<const uint8_t*>(p.q);
  kp.k = static_cast<const uint8_t*>(p.k);
  kp.q_scale = p.q_scale;
  kp.k_scale = p.k_scale;
  kp.delta_s = p.delta_s;
  kp.v = static_cast<const uint8_t*>(p.v);
  kp.v_scale = p.v_scale;
  kp.v_mean = p.v_mean;
  kp.out = p.out;
  kp.lse = p.lse_log2;
  kp.sb = p.out_stride_b;
  kp.sh = p.out_stride_h;
  kp.sl = p.out_stride_l;
  kp.len_q = p.len_q;
  kp.len_k = p.len_k;
  kp.lpad_q = (p.len_q + kBlockQ - 1) / kBlockQ * kBlockQ;
  kp.lpad_k = (p.len_k + kBlockQ - 1) / kBlockQ * kBlockQ;  // L_pad: multiples of 128 for K too
  kp.lpad_k32 = static_cast<int>(kp.lpad_k);
  kp.heads_q = p.heads_q;
  kp.group = p.heads_q / p.heads_kv;
  kp.out_dim = static_cast<int>(p.out_dim);
  kp.per_block = p.granularity == VOPT_SAGE_PER_BLOCK;
  kp.causal = p.causal;
  kp.two_level = p.two_level;
  kp.out_bf16 = p.out_dtype == 1;
  const dim3 grid(static_cast<unsigned>(kp.lpad_q / kBlockQ), static_cast<unsigned>(p.heads_q),
                  static_cast<unsigned>(p.batch));
  const bool fp8 = p.pv == VOPT_SAGE_PV_FP8;
  if (p.head_dim == 128)
    return p.qk_bits == 8 ? launch_pv<128, 8>(kp, fp8, grid, stream) : launch_pv<128, 4>(kp, fp8, grid, stream);
  return p.qk_bits == 8 ? launch_pv<64, 8>(kp, fp8, grid, stream) : launch_pv<64, 4>(kp, fp8, grid, stream);
}

}  // namespace sage
}  // namespace vopt
