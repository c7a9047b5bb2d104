// sage_quant.cu - the fused SageAttention2 quantizers (vopt_sage_channel_mean_*, vopt_sage_quant_{q,k,v_fp8}_*).
//
// Contract: vopt_cuda.h, section "SageAttention2" (padded layouts, rounding); oracle: vopt/ops/sage_reference.py
// (smooth_q_blocks, _quantize_symmetric, quantize_v_fp8). Codes and scales are bit-identical to the reference given
// the same means: every step is the reference's fp32 operation in the reference's order (x - mean with __fsub_rn,
// scale = amax / qmax with __fdiv_rn, x / scale with __fdiv_rn, rintf = round-half-even, then the clamp). amax is
// a max, so its reduction order does not matter. The explicit __f*_rn intrinsics keep this exact even if the file
// is ever built with --use_fast_math (they are never contracted into FMAs nor approximated).
//
// Common loading scheme. Every kernel reads 16-bit rows (fp16 / bf16 storage, element strides sb, sh, sl, unit
// stride along D) in 8-channel chunks: one thread owns one chunk (16 bytes) of a row, kTPR = D_pad / 8 consecutive
// threads cover a row (a warp reads 2 (D_pad 128) or 4 (D_pad 64) whole rows per instruction: coalesced). A chunk
// is one 16-byte load when the input allows it (x 16-byte aligned, sl - and sb / sh where batch / heads > 1 -
// multiples of 8 elements: the host sets vec_in) and the chunk lies inside dim; otherwise 8 scalar 16-bit loads
// (any storage offset works). Channels >= dim and rows >= len read as +0.0 (raw bits 0) and are masked where the
// contract says so.
//
// vopt_sage_quant_q / _k (quant_qk_kernel<T, D_pad>): one CTA of 256 threads per (128-row block, head, batch); the
// block's raw 16-bit data stays in registers (8 x uint4 per thread for D_pad 128, 4 for 64), so the input is read
// from global memory once. Steps inside the CTA:
//   1. load; Q with smoothing also copies the raw block to shared memory (128 x D_pad x 2 bytes, dynamic smem,
//      32 KiB for D_pad 128; 0 without smoothing);
//   2. the mean to subtract, per channel, in mean_s: Q smoothing = sum of the block's REAL rows in fp32, in row
//      order r = 0, 1, ..., nreal-1 starting from 0.0f (one thread per channel), then / nreal (written to qm);
//      K = km[b, h, c] (or 0 without km; x - 0.0f == x bit for bit, -0.0 included). Summation order vs torch:
//      smooth_q_blocks uses index_add_ (CPU: the same sequential row order, so qm is bit-identical; CUDA: atomicAdd
//      in an unspecified order, so qm may differ by an ulp from a CUDA-computed reference - compare codes against the
//      reference run with this kernel's qm);
//   3. per-row amax of |x - mean| over the row's first dim channels (real rows only; padded rows give 0), reduced
//      over the kTPR lanes of the row with xor-shuffles, into rowmax_s[128];
//   4. warp 0 turns rowmax_s into the group amaxes (Q per-thread: 32 groups, rows 32w + g + 8i; Q per-block: 1;
//      K per-thread: 8 groups, rows 64j + 8i + 2t + {0,1}; K per-block: 2 groups of 64 rows), scale = amax / qmax
//      (1 where amax == 0: also the groups with no real row), stored x sm_scale_log2 for Q (fp32 multiply, the codes
//      use the unscaled value) and as is for K;
//   5. codes = clamp(rint(x / scale), -qmax, qmax) (padded rows and channels >= dim: x = 0 -> code 0), int8 as one
//      8-byte store per chunk, int4 as one 4-byte store (byte j = code[2j] & 0xF | (code[2j+1] & 0xF) << 4).
//   Every byte of codes [L_pad, D_pad(/2)], every scale group and (smoothing) every qm entry is written.
//   Registers (nvcc 13.0, -O3): 64 (sm_80/89) / 68 (sm_90a) for D_pad 128, 50-56 for 64, no spills; smem: 32 KiB
//   dynamic (smooth, D_pad 128; 16 KiB for 64) + 1.2 KiB static.
//
// vopt_sage_quant_v_fp8 (three kernels + a memset, in stream order): V needs each channel's amax over ALL Lk keys
// before any key can be quantized. One CTA per (b, h) reading V twice would leave the GPU mostly idle for the
// typical B * Hkv of 8..48 heads with long sequences, so the amax pass is split over the keys instead:
//   0. cudaMemsetAsync(scale, 0): the scale buffer first holds each channel's amax as fp32 bits;
//   1. v_amax_kernel: one CTA per (512 keys, head, batch): per-thread max |x - vm| over its keys, reduced over the
//      CTA (xor-shuffles + smem), then one atomicMax on the int bits per channel (non-negative floats order like
//      their bit patterns, so the int max is the float max; the result does not depend on the order);
//   2. v_quant_kernel: one CTA per (128-key tile, head, batch); scale = amax / 448 (1 where amax == 0, channels >= D
//      included); e4m3 = __nv_cvt_float2_to_fp8x2(x / scale, satfinite, E4M3) (RNE; |x / scale| <= 448 up to one
//      rounding, and satfinite RNE of a value above 448 gives 448 = the reference's clamp-then-RNE). The tile is
//      staged in smem as codes [128 keys][128 bytes] (XOR-swizzled, see below), then each thread reads one
//      (4-channel word, 16-key group) item down the keys in perm16 order, transposes the 16x4 bytes with PRMTs and
//      writes 4 x 16 contiguous bytes of V^T rows: 8 lanes write one 128-byte row segment (coalesced). Keys >= Lk
//      and channels >= D are written as 0.
//   3. v_scale_finalize_kernel: scale = amax / 448 in place (the same expression as step 2, so the same bits).
//   V is read twice (the second read mostly from L2 for moderate sizes). Quantize CTA: 16 KiB smem, 50-72
//   registers; amax CTA: 2-4 KiB smem, ~60 registers; no spills.
//
// vopt_sage_channel_mean (channel_mean_kernel<T>): one CTA per (16-channel slice, head, batch), 256 threads = 128
// row lanes x 2 chunks (a warp reads 16 rows x 32 bytes: whole sectors). Per thread a sequential fp32 sum over the
// rows rl, rl + 128, ...; then a fixed xor-shuffle tree inside the warp and the 8 warps summed in order; then
// / len (fp32 IEEE). Deterministic, but not torch's order (torch.mean: cascade sum on CPU, its own tree on CUDA),
// so km / vm may differ from torch's by an ulp or so: the quantizers take the mean as an input.
//
// Argument checks run before any CUDA call; len >= 1 everywhere (len == 0 is refused, also for channel_mean, whose
// mean over no rows would be 0/0). Float pointers must be 4-byte aligned and x 2-byte aligned
// (cudaErrorMisalignedAddress); byte outputs (codes, v_fp8) may have any alignment (vector stores only when
// aligned, checked on the host). NaN inputs are not handled like torch (fmaxf drops NaN from amaxes).
//
// Checked without a GPU: these kernels, compiled as host C++ with 256 std::threads per CTA (barriers for
// __syncthreads, per-warp barriers for the shuffles), matched the CPU torch reference bit for bit (codes, scales,
// qm, V layout) over fp16/bf16, D 64..128 with dim < dim_pad, len 1..1100, both granularities, int8/int4, smoothing
// on/off, and contiguous / storage-offset-1 / [B, L, H, D] inputs. A GPU run should first check the same against
// the reference: Q per-thread scales + int4 packing, K per-thread groups, the V layout (position p of every 16-key
// group holds key perm16[p]; keys >= Lk zero), with dim < dim_pad, len not a multiple of 128 and a storage offset.
// Run the reference on CPU tensors: on CUDA tensors, torch evaluates `amax / qmax` and `amax / 448.0` (a tensor
// divided by a Python number) as amax * fp32(1 / q), not the IEEE quotient the contract (and this file) uses - the
// two differ in about half of the int4 / fp8 scales (and ~4% of the int8 ones) by one ulp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "vopt_cuda.h"
#include "vopt_internal.h"

namespace {

using vopt::fail;

constexpr int kThreads = 256;    // every kernel below (8 warps)
constexpr int kBlockRows = 128;  // Q/K quantizer: rows per CTA (= the L_pad granule); V: keys per tile
constexpr int kVAmaxRows = 512;  // V amax pass: keys per CTA
constexpr int kMeanSlice = 16;   // channel_mean: channels per CTA (2 chunks of 8: one 32-byte sector per row)
constexpr int kMeanLanes = kThreads / 2;  // channel_mean: row lanes per CTA
constexpr int64_t kMaxLen = INT32_MAX;
constexpr int64_t kMaxGridYZ = 65535;

// ---- element access ----

// fp32 value of one 16-bit storage element (low 16 bits of `bits`); exact for fp16 and bf16.
template <typename T>
__device__ __forceinline__ float to_f32(uint32_t bits);
template <>
__device__ __forceinline__ float to_f32<__half>(uint32_t bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(uint32_t bits) {
  return __uint_as_float((bits & 0xFFFFu) << 16);
}

// The 8 elements of a chunk: word w holds element 2w in its low half, 2w + 1 in its high half (little endian).
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& v, float (&f)[8]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = to_f32<T>(w[i] & 0xFFFFu);
    f[2 * i + 1] = to_f32<T>(w[i] >> 16);
  }
}

// Channels [c0, c0 + 8) of one row (`row` points at channel 0); channels >= dim read as 0. `vec`: the row is
// 16-byte aligned (then so is row + c0, c0 being a multiple of 8) - one 16-byte load when the chunk is all inside dim.
__device__ __forceinline__ uint4 load8(const uint16_t* row, int c0, int dim, bool vec) {
  if (vec && c0 + 8 <= dim) return __ldg(reinterpret_cast<const uint4*>(row + c0));
  uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int i = 0; i < 8; ++i)
    if (c0 + i < dim) w[i >> 1] |= static_cast<uint32_t>(__ldg(row + c0 + i)) << (16 * (i & 1));
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// ---- Q / K: smoothing + symmetric per-group INT8 / INT4 ----

struct QKParams {
  const uint16_t* x;  // fp16 / bf16 storage
  int64_t sb, sh, sl;
  int64_t len;        // real rows
  int heads;
  int dim;            // real channels (<= D_pad)
  int is_k;           // 0: Q groups (32-row per-thread / 128-row per-block); 1: K groups (64-row blocks)
  int per_block;      // granularity == VOPT_SAGE_PER_BLOCK
  int bits;           // 8 or 4
  int smooth;         // Q: subtract the 128-row block mean (computed here, written to qm)
  float out_mult;     // stored scale = scale * out_mult: sm_scale_log2 for Q, 1 for K
  const float* km;    // K: fp32 [B, H, dim] or NULL
  uint8_t* codes;     // [B, H, L_pad, D_pad] int8 or [B, H, L_pad, D_pad / 2] packed int4
  float* scale;
  float* qm;          // smooth: fp32 [B, H, L_pad / 128, D_pad]
  int vec_in;         // x 16-byte aligned and sb, sh, sl multiples of 8 elements
  int vec_out;        // codes 8-byte (bits 8) / 4-byte (bits 4) aligned
};

template <typename T, int DPAD>
__global__ void __launch_bounds__(kThreads) quant_qk_kernel(const QKParams p) {
  constexpr int kTPR = DPAD / 8;                // threads per row (one 8-channel chunk each): 16 or 8
  constexpr int kRPP = kThreads / kTPR;         // rows per pass: 16 or 32
  constexpr int kPasses = kBlockRows / kRPP;    // passes over the 128 rows: 8 or 4
  static_assert(kRPP % 8 == 0 && 32 % kTPR == 0, "row mapping");
  extern __shared__ uint4 tile_s[];             // smooth only: raw block [128][D_pad] 16-bit, as [128][kTPR] uint4
  __shared__ float mean_s[DPAD];
  __shared__ float rowmax_s[kBlockRows];
  __shared__ float scale_s[32];                 // unscaled group scales (at most 32 groups per CTA)

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int chunk = tid % kTPR, rip = tid / kTPR, c0 = chunk * 8;  // this thread: rows pass * kRPP + rip, chunk c0
  const int64_t blk = blockIdx.x, nblk = gridDim.x;
  const int64_t bh = static_cast<int64_t>(blockIdx.z) * p.heads + blockIdx.y;
  const int64_t row0 = blk * kBlockRows;
  const int nreal = static_cast<int>(min(static_cast<int64_t>(kBlockRows), p.len - row0));  // >= 1
  const uint16_t* xbh = p.x + static_cast<int64_t>(blockIdx.z) * p.sb + static_cast<int64_t>(blockIdx.y) * p.sh;
  const bool vec_in = p.vec_in != 0;

  // 1. Load the block (rows >= len: zeros). All kPasses loads are independent: they are in flight together.
  uint4 raw[kPasses];
#pragma unroll
  for (int pass = 0; pass < kPasses; ++pass) {
    const int r = pass * kRPP + rip;
    raw[pass] = r < nreal ? load8(xbh + (row0 + r) * p.sl, c0, p.dim, vec_in) : make_uint4(0u, 0u, 0u, 0u);
  }
  if (p.smooth) {  // uniform branch
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) tile_s[(pass * kRPP + rip) * kTPR + chunk] = raw[pass];
    __syncthreads();
  }

  // 2. The mean subtracted from every element of channel c (0 without smoothing).
  if (tid < DPAD) {
    float m = 0.0f;
    if (p.smooth) {
      // Sequential fp32 sum of the real rows in row order (= torch's CPU index_add_ order), then / count.
      // Channels >= dim hold zeros, so their mean is 0 as the qm layout requires.
      const uint16_t* t16 = reinterpret_cast<const uint16_t*>(tile_s);
      float s = 0.0f;
#pragma unroll 8
      for (int r = 0; r < nreal; ++r) s = __fadd_rn(s, to_f32<T>(t16[r * DPAD + tid]));
      m = __fdiv_rn(s, static_cast<float>(nreal));
      p.qm[(bh * nblk + blk) * DPAD + tid] = m;
    } else if (p.km != nullptr && tid < p.dim) {
      m = p.km[bh * p.dim + tid];
    }
    mean_s[tid] = m;
  }
  __syncthreads();
  float mv[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) mv[i] = mean_s[c0 + i];

  // 3. Row amax of |x - mean| (padded rows: 0; channels >= dim are 0 - 0 = 0).
#pragma unroll
  for (int pass = 0; pass < kPasses; ++pass) {
    const int r = pass * kRPP + rip;
    float f[8];
    unpack8<T>(raw[pass], f);
    float am = 0.0f;
    if (r < nreal) {
#pragma unroll
      for (int i = 0; i < 8; ++i) am = fmaxf(am, fabsf(__fsub_rn(f[i], mv[i])));
    }
    // The kTPR threads of row r are the consecutive lanes with lane / kTPR equal: xor offsets < kTPR stay inside.
#pragma unroll
    for (int off = kTPR / 2; off >= 1; off >>= 1) am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, off));
    if (chunk == 0) rowmax_s[r] = am;
  }
  __syncthreads();

  // 4. Group amax -> scale. Group numbering inside the CTA = the scale layout's order, so the global index is
  //    (bh * nblk + blk) * ngroups + group for all four layouts:
  //    Q per-thread [B, H, L_pad/32, 8]: (bh*nblk*4 + blk*4 + w)*8 + g = (bh*nblk + blk)*32 + (8w + g);
  //    Q per-block  [B, H, L_pad/128]:   bh*nblk + blk;
  //    K per-thread [B, H, L_pad/64, 4]: (bh*nblk*2 + blk*2 + j)*4 + t = (bh*nblk + blk)*8 + (4j + t);
  //    K per-block  [B, H, L_pad/64]:    (bh*nblk + blk)*2 + j.
  const float qmax = p.bits == 8 ? 127.0f : 7.0f;
  const int ngroups = p.is_k ? (p.per_block ? 2 : 8) : (p.per_block ? 1 : 32);
  if (warp == 0) {
    float am = 0.0f;
    if (!p.is_k && !p.per_block) {
      // Q per-thread: group lane = 8w + g owns the rows r of warp block w with r % 8 == g: 32w + g + 8i, i < 4.
      const int base = 32 * (lane >> 3) + (lane & 7);
      am = fmaxf(fmaxf(rowmax_s[base], rowmax_s[base + 8]), fmaxf(rowmax_s[base + 16], rowmax_s[base + 24]));
    } else if (!p.is_k) {
      // Q per-block: one group of all 128 rows; the butterfly leaves the max in every lane (lane 0 stores it).
      am = fmaxf(fmaxf(rowmax_s[lane], rowmax_s[lane + 32]), fmaxf(rowmax_s[lane + 64], rowmax_s[lane + 96]));
#pragma unroll
      for (int off = 16; off >= 1; off >>= 1) am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, off));
    } else if (!p.per_block) {
      // K per-thread: group lane = 4j + t (lane < 8) owns rows 64j + 8i + 2t + e (i < 8, e < 2): (n % 8) / 2 == t.
      if (lane < 8) {
        const int base = 64 * (lane >> 2) + 2 * (lane & 3);
#pragma unroll
        for (int i = 0; i < 8; ++i) am = fmaxf(am, fmaxf(rowmax_s[base + 8 * i], rowmax_s[base + 8 * i + 1]));
      }
    } else {
      // K per-block: group j = rows 64j..64j+63; a0 / a1 reduce rows 0..63 / 64..127 over the warp.
      float a0 = fmaxf(rowmax_s[lane], rowmax_s[lane + 32]);
      float a1 = fmaxf(rowmax_s[lane + 64], rowmax_s[lane + 96]);
#pragma unroll
      for (int off = 16; off >= 1; off >>= 1) {
        a0 = fmaxf(a0, __shfl_xor_sync(0xffffffffu, a0, off));
        a1 = fmaxf(a1, __shfl_xor_sync(0xffffffffu, a1, off));
      }
      am = lane == 0 ? a0 : a1;
    }
    if (lane < ngroups) {
      const float s = am == 0.0f ? 1.0f : __fdiv_rn(am, qmax);  // reference: amax / qmax, 1 where amax == 0
      scale_s[lane] = s;
      p.scale[(bh * nblk + blk) * ngroups + lane] = __fmul_rn(s, p.out_mult);  // Q: x sm_scale_log2 (fp32)
    }
  }
  __syncthreads();

  // 5. Codes: clamp(rint(x / scale), -qmax, qmax) with the row's group scale; padded rows / channels: x = 0 -> 0.
  const bool vec_out = p.vec_out != 0;
#pragma unroll
  for (int pass = 0; pass < kPasses; ++pass) {
    const int r = pass * kRPP + rip;
    int group;
    if (!p.is_k) group = p.per_block ? 0 : (r >> 5) * 8 + (r & 7);  // Q: (r / 32) * 8 + r % 8
    else group = p.per_block ? (r >> 6) : (r >> 6) * 4 + ((r & 7) >> 1);  // K: (n / 64) * 4 + (n % 8) / 2
    const float s = scale_s[group];
    float f[8];
    unpack8<T>(raw[pass], f);
    int code[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float x = r < nreal ? __fsub_rn(f[i], mv[i]) : 0.0f;
      const float q = fminf(fmaxf(rintf(__fdiv_rn(x, s)), -qmax), qmax);  // round half even, then clamp
      code[i] = static_cast<int>(q);
    }
    const int64_t grow = bh * nblk * kBlockRows + row0 + r;  // row of the padded [B, H, L_pad] code matrix
    if (p.bits == 8) {
      uint32_t w[2] = {0u, 0u};
#pragma unroll
      for (int i = 0; i < 8; ++i) w[i >> 2] |= (static_cast<uint32_t>(code[i]) & 0xFFu) << (8 * (i & 3));
      uint8_t* dst = p.codes + grow * DPAD + c0;
      if (vec_out) {
        *reinterpret_cast<uint2*>(dst) = make_uint2(w[0], w[1]);
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) dst[i] = static_cast<uint8_t>(w[i >> 2] >> (8 * (i & 3)));
      }
    } else {
      // byte j (channels c0 + 2j, c0 + 2j + 1) = (code[2j] & 0xF) | (code[2j + 1] & 0xF) << 4.
      uint32_t w = 0u;
#pragma unroll
      for (int j = 0; j < 4; ++j)
        w |= ((static_cast<uint32_t>(code[2 * j]) & 0xFu) | ((static_cast<uint32_t>(code[2 * j + 1]) & 0xFu) << 4))
             << (8 * j);
      uint8_t* dst = p.codes + grow * (DPAD / 2) + c0 / 2;
      if (vec_out) {
        *reinterpret_cast<uint32_t*>(dst) = w;
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) dst[j] = static_cast<uint8_t>(w >> (8 * j));
      }
    }
  }
}

// ---- V: per-channel E4M3, transposed and permuted ----

struct VParams {
  const uint16_t* x;
  int64_t sb, sh, sl;
  int64_t len;        // Lk
  int64_t lpad;       // L_pad(Lk)
  int heads;
  int dim;
  const float* vm;    // fp32 [B, H, dim] or NULL
  uint8_t* out;       // e4m3 [B, H, D_pad, L_pad]
  float* scale;       // fp32 [B, H, D_pad]: amax bits during steps 1-2, the scale after step 3
  int vec_in;
  int vec_out;        // out 16-byte aligned
};

// Output position p of a 16-key group holds key perm16(p) = {0,1,8,9,2,3,10,11,4,5,12,13,6,7,14,15}[p]:
// p = 4t + 2h + e -> key 2t + e + 8h (t = p / 4, h = (p / 2) % 2, e = p % 2). Why (the FP8 PV fragments): lane t's
// QK accumulators of n8 tiles 0 / 1 hold keys {2t, 2t+1} / {8+2t, 9+2t}; the e4m3 A fragment wants k positions
// 4t..4t+3 in one register; so positions 4t..4t+3 must be keys 2t, 2t+1, 8+2t, 9+2t.
__host__ __device__ constexpr int perm16(int p) { return (p & 1) + ((p >> 2) << 1) + (((p >> 1) & 1) << 3); }
static_assert(perm16(0) == 0 && perm16(1) == 1 && perm16(2) == 8 && perm16(3) == 9 && perm16(4) == 2 &&
                  perm16(5) == 3 && perm16(6) == 10 && perm16(7) == 11 && perm16(8) == 4 && perm16(9) == 5 &&
                  perm16(10) == 12 && perm16(11) == 13 && perm16(12) == 6 && perm16(13) == 7 && perm16(14) == 14 &&
                  perm16(15) == 15,
              "perm16");

// Shared-memory swizzle of the V code tile [128 keys][32 words]: logical word w (channels 4w..4w+3) of key k lives
// at physical word w ^ (4 * (k / 16)) ^ (16 * (k % 2)). XOR masks are multiples of 4, so logical words 2c, 2c + 1
// stay adjacent (8-byte stores) and the map is a bijection of 0..31 per key. Banks (a row is 32 words = 128 bytes,
// so bank = physical word): stage-2 reads (lanes g = lane % 8, w = 4 * warp + lane / 8, one key position p for all:
// k % 2 = perm16(p) % 2 is the same in every lane) hit 4 * (warp ^ g) + lane / 8, XOR a constant: 32 distinct
// banks. Stage-1 8-byte stores: D_pad 128, a warp writes 2 keys x 32 words (each key covers all banks);
// D_pad 64, 4 keys x 16 words, keys of opposite parity use opposite bank halves: 2 keys per wavefront, no conflict.
__device__ __forceinline__ int v_swz(int k, int w) { return w ^ (4 * (k >> 4)) ^ (16 * (k & 1)); }

template <typename T, int DPAD>
__global__ void __launch_bounds__(kThreads) v_amax_kernel(const VParams p) {
  constexpr int kTPR = DPAD / 8;
  constexpr int kRPP = kThreads / kTPR;
  constexpr int kUnroll = 4;
  __shared__ float red_s[kThreads / 32][DPAD];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int chunk = tid % kTPR, rip = tid / kTPR, c0 = chunk * 8;
  const int64_t bh = static_cast<int64_t>(blockIdx.z) * p.heads + blockIdx.y;
  const uint16_t* xbh = p.x + static_cast<int64_t>(blockIdx.z) * p.sb + static_cast<int64_t>(blockIdx.y) * p.sh;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.x) * kVAmaxRows;
  const int64_t r_end = min(p.len, r_begin + kVAmaxRows);
  const bool vec_in = p.vec_in != 0;

  float mv[8], am[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    mv[i] = (p.vm != nullptr && c0 + i < p.dim) ? p.vm[bh * p.dim + c0 + i] : 0.0f;
    am[i] = 0.0f;
  }
  // The trip count is the same for every thread of the CTA (no divergent loop before the shuffles below).
  for (int64_t r = r_begin; r < r_end; r += kUnroll * kRPP) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t rr = r + u * kRPP + rip;
      v[u] = rr < r_end ? load8(xbh + rr * p.sl, c0, p.dim, vec_in) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float f[8];
      unpack8<T>(v[u], f);  // rows past r_end are zeros: |0 - vm| must not enter the amax, hence the guard
      if (r + u * kRPP + rip < r_end) {
#pragma unroll
        for (int i = 0; i < 8; ++i) am[i] = fmaxf(am[i], fabsf(__fsub_rn(f[i], mv[i])));
      }
    }
  }
  // Lanes holding the same chunk differ by multiples of kTPR.
#pragma unroll
  for (int off = kTPR; off < 32; off <<= 1)
#pragma unroll
    for (int i = 0; i < 8; ++i) am[i] = fmaxf(am[i], __shfl_xor_sync(0xffffffffu, am[i], off));
  if (lane < kTPR) {
#pragma unroll
    for (int i = 0; i < 8; ++i) red_s[warp][c0 + i] = am[i];
  }
  __syncthreads();
  if (tid < DPAD && tid < p.dim) {
    float m = red_s[0][tid];
#pragma unroll
    for (int w = 1; w < kThreads / 32; ++w) m = fmaxf(m, red_s[w][tid]);
    // m >= 0: its int bits order like the float (the buffer was zeroed, so 0 needs no atomic).
    if (m > 0.0f) atomicMax(reinterpret_cast<int*>(p.scale + bh * DPAD + tid), __float_as_int(m));
  }
}

template <typename T, int DPAD>
__global__ void __launch_bounds__(kThreads) v_quant_kernel(const VParams p) {
  constexpr int kTPR = DPAD / 8;
  constexpr int kRPP = kThreads / kTPR;
  constexpr int kPasses = kBlockRows / kRPP;
  constexpr int kItems = (DPAD / 4) * 8;  // (4-channel word, 16-key group) pairs of the tile: 256 or 128
  static_assert(kRPP % 16 == 0 || 16 % kRPP == 0, "key mapping");
  __shared__ __align__(16) uint32_t codes_s[kBlockRows][32];  // [key][physical word] (v_swz), 16 KiB

  const int tid = threadIdx.x;
  const int chunk = tid % kTPR, rip = tid / kTPR, c0 = chunk * 8;
  const int64_t bh = static_cast<int64_t>(blockIdx.z) * p.heads + blockIdx.y;
  const uint16_t* xbh = p.x + static_cast<int64_t>(blockIdx.z) * p.sb + static_cast<int64_t>(blockIdx.y) * p.sh;
  const int64_t key0 = static_cast<int64_t>(blockIdx.x) * kBlockRows;
  const bool vec_in = p.vec_in != 0;

  // Stage 1: this thread's 8 channels of keys pass * kRPP + rip -> e4m3 -> smem (key-major, swizzled).
  float mv[8], sc[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int c = c0 + i;
    mv[i] = (p.vm != nullptr && c < p.dim) ? p.vm[bh * p.dim + c] : 0.0f;
    const float a = p.scale[bh * DPAD + c];  // the channel's amax (step 1); 0 for channels >= dim
    sc[i] = a == 0.0f ? 1.0f : __fdiv_rn(a, 448.0f);
  }
  uint4 raw[kPasses];
#pragma unroll
  for (int pass = 0; pass < kPasses; ++pass) {
    const int64_t key = key0 + pass * kRPP + rip;
    raw[pass] = key < p.len ? load8(xbh + key * p.sl, c0, p.dim, vec_in) : make_uint4(0u, 0u, 0u, 0u);
  }
#pragma unroll
  for (int pass = 0; pass < kPasses; ++pass) {
    const int k = pass * kRPP + rip;
    uint32_t w[2] = {0u, 0u};
    if (key0 + k < p.len) {  // keys >= Lk stay 0; channels >= dim: (+0 - 0) / 1 = +0 -> e4m3 0x00
      float f[8];
      unpack8<T>(raw[pass], f);
#pragma unroll
      for (int i = 0; i < 8; i += 2) {
        const float2 v = make_float2(__fdiv_rn(__fsub_rn(f[i], mv[i]), sc[i]),
                                     __fdiv_rn(__fsub_rn(f[i + 1], mv[i + 1]), sc[i + 1]));
        // .x -> low byte (channel c0 + i), .y -> high byte.
        const uint32_t two = __nv_cvt_float2_to_fp8x2(v, __NV_SATFINITE, __NV_E4M3);
        w[i >> 2] |= two << (16 * ((i >> 1) & 1));
      }
    }
    // Logical words 2 * chunk, 2 * chunk + 1 (channels c0..c0+7) -> physical v_swz(k, 2 * chunk) (even), + 1.
    *reinterpret_cast<uint2*>(&codes_s[k][v_swz(k, 2 * chunk)]) = make_uint2(w[0], w[1]);
  }
  __syncthreads();

  // Stage 2: item (word cw = channels 4cw..4cw+3, group g = keys 16g..16g+15). r[p] = word cw of key
  // 16g + perm16(p): byte j of r[p] = channel 4cw + j at output position p. A 4x4 byte transpose per quad q turns
  // r[4q..4q+3] into o[j][q] = positions 4q..4q+3 of channel 4cw + j. Output row (channel 4cw + j) gets 16 bytes at
  // key0 + 16g; the 8 lanes g = 0..7 of one cw write 128 contiguous bytes.
  if (tid < kItems) {
    const int g = tid & 7, cw = tid >> 3;
    uint32_t r[16];
#pragma unroll
    for (int q = 0; q < 16; ++q) {
      const int k = 16 * g + perm16(q);
      r[q] = codes_s[k][v_swz(k, cw)];
    }
    uint32_t o[4][4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      // __byte_perm(x, y, s): result byte i = byte s[4i+3:4i] of {y, x} (0-3: x, 4-7: y).
      const uint32_t a = r[4 * q], b = r[4 * q + 1], c = r[4 * q + 2], d = r[4 * q + 3];
      const uint32_t t0 = __byte_perm(a, b, 0x5140);  // a0 b0 a1 b1
      const uint32_t t1 = __byte_perm(a, b, 0x7362);  // a2 b2 a3 b3
      const uint32_t u0 = __byte_perm(c, d, 0x5140);  // c0 d0 c1 d1
      const uint32_t u1 = __byte_perm(c, d, 0x7362);  // c2 d2 c3 d3
      o[0][q] = __byte_perm(t0, u0, 0x5410);          // a0 b0 c0 d0
      o[1][q] = __byte_perm(t0, u0, 0x7632);          // a1 b1 c1 d1
      o[2][q] = __byte_perm(t1, u1, 0x5410);          // a2 b2 c2 d2
      o[3][q] = __byte_perm(t1, u1, 0x7632);          // a3 b3 c3 d3
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint8_t* dst = p.out + (bh * DPAD + 4 * cw + j) * p.lpad + key0 + 16 * g;
      if (p.vec_out) {
        *reinterpret_cast<uint4*>(dst) = make_uint4(o[j][0], o[j][1], o[j][2], o[j][3]);
      } else {
#pragma unroll
        for (int e = 0; e < 16; ++e) dst[e] = static_cast<uint8_t>(o[j][e >> 2] >> (8 * (e & 3)));
      }
    }
  }
}

// amax -> scale = amax / 448 (1 where amax == 0), in place; the same expression v_quant_kernel used.
__global__ void __launch_bounds__(kThreads) v_scale_finalize_kernel(float* scale, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const float a = scale[i];
    scale[i] = a == 0.0f ? 1.0f : __fdiv_rn(a, 448.0f);
  }
}

// ---- channel mean ----

struct MeanParams {
  const uint16_t* x;
  int64_t sb, sh, sl;
  int64_t len;
  int heads;
  int dim;
  float* mean;  // fp32 [B, H, dim]
  int vec_in;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) channel_mean_kernel(const MeanParams p) {
  constexpr int kUnroll = 4;
  __shared__ float red_s[kThreads / 32][kMeanSlice];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int half = tid & 1, rl = tid >> 1;  // chunk of the slice, row lane (rows rl, rl + 128, ...)
  const int c0 = blockIdx.x * kMeanSlice + half * 8;
  const int64_t bh = static_cast<int64_t>(blockIdx.z) * p.heads + blockIdx.y;
  const uint16_t* xbh = p.x + static_cast<int64_t>(blockIdx.z) * p.sb + static_cast<int64_t>(blockIdx.y) * p.sh;
  const bool vec_in = p.vec_in != 0;

  float acc[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
  // Uniform trip count over the CTA; this thread's rows rl + r + u * 128 in increasing order.
  for (int64_t r = 0; r < p.len; r += kUnroll * kMeanLanes) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t rr = r + u * kMeanLanes + rl;
      v[u] = rr < p.len ? load8(xbh + rr * p.sl, c0, p.dim, vec_in) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (r + u * kMeanLanes + rl < p.len) {
        float f[8];
        unpack8<T>(v[u], f);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] = __fadd_rn(acc[i], f[i]);
      }
    }
  }
  // Fixed tree over the 16 row lanes of the warp (lanes with the same `half`: xor 2, 4, 8, 16; fp add commutes, so
  // both partners get the same value), then the 8 warps in order: deterministic.
#pragma unroll
  for (int off = 2; off < 32; off <<= 1)
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = __fadd_rn(acc[i], __shfl_xor_sync(0xffffffffu, acc[i], off));
  if (lane < 2) {
#pragma unroll
    for (int i = 0; i < 8; ++i) red_s[warp][lane * 8 + i] = acc[i];
  }
  __syncthreads();
  if (tid < kMeanSlice) {
    const int c = blockIdx.x * kMeanSlice + tid;
    if (c < p.dim) {
      float s = red_s[0][tid];
#pragma unroll
      for (int w = 1; w < kThreads / 32; ++w) s = __fadd_rn(s, red_s[w][tid]);
      p.mean[bh * p.dim + c] = __fdiv_rn(s, static_cast<float>(p.len));
    }
  }
}

// ---- host side ----

// 16-byte loads are safe when every row start is 16-byte aligned: x is, and so is every stride that is ever
// multiplied by a non-zero index (sb only matters when batch > 1, sh when heads > 1).
bool vec_input(const void* x, int64_t sb, int64_t sh, int64_t sl, int64_t batch, int64_t heads) {
  return reinterpret_cast<uintptr_t>(x) % 16 == 0 && (batch == 1 || sb % 8 == 0) && (heads == 1 || sh % 8 == 0) &&
         sl % 8 == 0;
}

cudaError_t check_input(const void* x, int64_t sb, int64_t sh, int64_t sl, int64_t batch, int64_t heads,
                        int64_t len) {
  if (x == nullptr) return fail(cudaErrorInvalidValue, "x=NULL; accepted: a device pointer");
  if (batch < 1 || batch > kMaxGridYZ)
    return fail(cudaErrorInvalidValue, "batch=%lld; accepted: 1..%lld", (long long)batch, (long long)kMaxGridYZ);
  if (heads < 1 || heads > kMaxGridYZ)
    return fail(cudaErrorInvalidValue, "heads=%lld; accepted: 1..%lld", (long long)heads, (long long)kMaxGridYZ);
  if (len < 1 || len > kMaxLen)
    return fail(cudaErrorInvalidValue, "len=%lld; accepted: 1..%lld", (long long)len, (long long)kMaxLen);
  if (sb < 0 || sh < 0 || sl < 0)
    return fail(cudaErrorInvalidValue, "strides sb=%lld, sh=%lld, sl=%lld; accepted: >= 0 (elements)",
                (long long)sb, (long long)sh, (long long)sl);
  if (reinterpret_cast<uintptr_t>(x) % 2 != 0)
    return fail(cudaErrorMisalignedAddress, "x=%p; accepted: 2-byte aligned (fp16 / bf16 elements)", x);
  return cudaSuccess;
}

cudaError_t check_dims(int64_t dim, int64_t dim_pad) {
  if (dim_pad != 64 && dim_pad != 128)
    return fail(cudaErrorInvalidValue, "dim_pad=%lld; accepted: 64, 128", (long long)dim_pad);
  if (dim < 1 || dim > dim_pad)
    return fail(cudaErrorInvalidValue, "dim=%lld; accepted: 1..dim_pad (%lld)", (long long)dim, (long long)dim_pad);
  return cudaSuccess;
}

// A float pointer argument: NULL (when not allowed) or misaligned.
cudaError_t check_f32(const float* ptr, const char* name, bool may_be_null) {
  if (ptr == nullptr) {
    if (may_be_null) return cudaSuccess;
    return fail(cudaErrorInvalidValue, "%s=NULL; accepted: a device pointer", name);
  }
  if (reinterpret_cast<uintptr_t>(ptr) % 4 != 0)
    return fail(cudaErrorMisalignedAddress, "%s=%p; accepted: 4-byte aligned (fp32)", name,
                static_cast<const void*>(ptr));
  return cudaSuccess;
}

cudaError_t launch_status(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return fail(err, "%s: launch failed: %s", what, cudaGetErrorString(err));
  return cudaSuccess;
}

int64_t num_blocks(int64_t len) { return (len + kBlockRows - 1) / kBlockRows; }

template <typename T>
cudaError_t channel_mean(const void* x, int64_t sb, int64_t sh, int64_t sl, int64_t batch, int64_t heads,
                         int64_t len, int64_t dim, float* mean, void* stream) {
  cudaError_t err = check_input(x, sb, sh, sl, batch, heads, len);
  if (err != cudaSuccess) return err;
  if (dim < 1 || dim > 65536) return fail(cudaErrorInvalidValue, "dim=%lld; accepted: 1..65536", (long long)dim);
  if ((err = check_f32(mean, "mean", false)) != cudaSuccess) return err;
  MeanParams p;
  p.x = static_cast<const uint16_t*>(x);
  p.sb = sb;
  p.sh = sh;
  p.sl = sl;
  p.len = len;
  p.heads = static_cast<int>(heads);
  p.dim = static_cast<int>(dim);
  p.mean = mean;
  p.vec_in = vec_input(x, sb, sh, sl, batch, heads) ? 1 : 0;
  const dim3 grid(static_cast<unsigned>((dim + kMeanSlice - 1) / kMeanSlice), static_cast<unsigned>(heads),
                  static_cast<unsigned>(batch));
  channel_mean_kernel<T><<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(p);
  return launch_status("channel_mean_kernel");
}

// Q (is_k = 0) and K (is_k = 1).
template <typename T>
cudaError_t quant_qk(int is_k, const void* x, int64_t sb, int64_t sh, int64_t sl, int64_t batch, int64_t heads,
                     int64_t len, int64_t dim, int64_t dim_pad, int32_t bits, int32_t granularity, int32_t smooth,
                     float sm_scale_log2, const float* km, void* codes, float* scale, float* qm, void* stream) {
  cudaError_t err = check_input(x, sb, sh, sl, batch, heads, len);
  if (err != cudaSuccess) return err;
  if ((err = check_dims(dim, dim_pad)) != cudaSuccess) return err;
  if (bits != 8 && bits != 4) return fail(cudaErrorInvalidValue, "bits=%d; accepted: 8, 4", bits);
  if (granularity != VOPT_SAGE_PER_THREAD && granularity != VOPT_SAGE_PER_BLOCK)
    return fail(cudaErrorInvalidValue, "granularity=%d; accepted: %d (per-thread), %d (per-block)", granularity,
                VOPT_SAGE_PER_THREAD, VOPT_SAGE_PER_BLOCK);
  if (codes == nullptr) return fail(cudaErrorInvalidValue, "codes=NULL; accepted: a device pointer");
  if ((err = check_f32(scale, "scale", false)) != cudaSuccess) return err;
  if (!is_k) {
    if (smooth != 0 && smooth != 1) return fail(cudaErrorInvalidValue, "smooth=%d; accepted: 0, 1", smooth);
    if (smooth == 1 && qm == nullptr)
      return fail(cudaErrorInvalidValue, "qm=NULL with smooth=1; accepted: a device pointer (NULL only with smooth=0)");
    if (smooth == 1 && (err = check_f32(qm, "qm", false)) != cudaSuccess) return err;  // ignored when smooth=0
  } else {
    if ((err = check_f32(km, "km", true)) != cudaSuccess) return err;
  }

  QKParams p;
  p.x = static_cast<const uint16_t*>(x);
  p.sb = sb;
  p.sh = sh;
  p.sl = sl;
  p.len = len;
  p.heads = static_cast<int>(heads);
  p.dim = static_cast<int>(dim);
  p.is_k = is_k;
  p.per_block = granularity == VOPT_SAGE_PER_BLOCK ? 1 : 0;
  p.bits = bits;
  p.smooth = is_k ? 0 : smooth;
  p.out_mult = is_k ? 1.0f : sm_scale_log2;
  p.km = is_k ? km : nullptr;
  p.codes = static_cast<uint8_t*>(codes);
  p.scale = scale;
  p.qm = p.smooth ? qm : nullptr;
  p.vec_in = vec_input(x, sb, sh, sl, batch, heads) ? 1 : 0;
  p.vec_out = reinterpret_cast<uintptr_t>(codes) % (bits == 8 ? 8 : 4) == 0 ? 1 : 0;
  const dim3 grid(static_cast<unsigned>(num_blocks(len)), static_cast<unsigned>(heads),
                  static_cast<unsigned>(batch));
  const size_t smem = p.smooth ? static_cast<size_t>(kBlockRows) * dim_pad * sizeof(uint16_t) : 0;  // <= 32 KiB
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dim_pad == 64)
    quant_qk_kernel<T, 64><<<grid, kThreads, smem, s>>>(p);
  else
    quant_qk_kernel<T, 128><<<grid, kThreads, smem, s>>>(p);
  return launch_status(is_k ? "quant_qk_kernel (K)" : "quant_qk_kernel (Q)");
}

template <typename T, int DPAD>
cudaError_t launch_v(const VParams& p, int64_t batch, int64_t heads, cudaStream_t s) {
  const int64_t n_scale = batch * heads * DPAD;
  cudaError_t err = cudaMemsetAsync(p.scale, 0, static_cast<size_t>(n_scale) * sizeof(float), s);
  if (err != cudaSuccess) return fail(err, "cudaMemsetAsync(scale) failed: %s", cudaGetErrorString(err));
  const dim3 amax_grid(static_cast<unsigned>((p.len + kVAmaxRows - 1) / kVAmaxRows), static_cast<unsigned>(heads),
                       static_cast<unsigned>(batch));
  v_amax_kernel<T, DPAD><<<amax_grid, kThreads, 0, s>>>(p);
  if ((err = launch_status("v_amax_kernel")) != cudaSuccess) return err;
  const dim3 quant_grid(static_cast<unsigned>(p.lpad / kBlockRows), static_cast<unsigned>(heads),
                        static_cast<unsigned>(batch));
  v_quant_kernel<T, DPAD><<<quant_grid, kThreads, 0, s>>>(p);
  if ((err = launch_status("v_quant_kernel")) != cudaSuccess) return err;
  const int64_t fin_blocks = (n_scale + kThreads - 1) / kThreads;
  v_scale_finalize_kernel<<<static_cast<unsigned>(fin_blocks < (1 << 20) ? fin_blocks : (1 << 20)), kThreads, 0, s>>>(
      p.scale, n_scale);
  return launch_status("v_scale_finalize_kernel");
}

template <typename T>
cudaError_t quant_v_fp8(const void* x, int64_t sb, int64_t sh, int64_t sl, int64_t batch, int64_t heads,
                        int64_t len, int64_t dim, int64_t dim_pad, const float* vm, void* v_fp8, float* scale,
                        void* stream) {
  cudaError_t err = check_input(x, sb, sh, sl, batch, heads, len);
  if (err != cudaSuccess) return err;
  if ((err = check_dims(dim, dim_pad)) != cudaSuccess) return err;
  if ((err = check_f32(vm, "vm", true)) != cudaSuccess) return err;
  if (v_fp8 == nullptr) return fail(cudaErrorInvalidValue, "v_fp8=NULL; accepted: a device pointer");
  if ((err = check_f32(scale, "scale", false)) != cudaSuccess) return err;
  VParams p;
  p.x = static_cast<const uint16_t*>(x);
  p.sb = sb;
  p.sh = sh;
  p.sl = sl;
  p.len = len;
  p.lpad = num_blocks(len) * kBlockRows;
  p.heads = static_cast<int>(heads);
  p.dim = static_cast<int>(dim);
  p.vm = vm;
  p.out = static_cast<uint8_t*>(v_fp8);
  p.scale = scale;
  p.vec_in = vec_input(x, sb, sh, sl, batch, heads) ? 1 : 0;
  p.vec_out = reinterpret_cast<uintptr_t>(v_fp8) % 16 == 0 ? 1 : 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dim_pad == 64 ? launch_v<T, 64>(p, batch, heads, s) : launch_v<T, 128>(p, batch, heads, s);
}

}  // namespace

extern "C" {

int vopt_sage_channel_mean_f16(const void* x, int64_t sb, int64_t sh, int64_t sl, int64_t batch, int64_t heads,
                               int64_t len, int64_t dim, float* mean, void* stream) {
  vopt::clear_error();
  return static_cast<int>(channel_mean<__half>(x, sb, sh, sl, batch, heads, len, dim, mean, stream));
}

int vopt_sage_channel_mean_bf16(const void* x, int64_t sb, int64_t sh, int64_t sl, int64_t batch, int64_t heads,
                                int64_t len, int64_t dim, float* mean, void* stream) {
  vopt::clear_error();
  return static_cast<int>(channel_mean<__nv_bfloat16>(x, sb, sh, sl, batch, heads, len, dim, mean, stream));
}

int vopt_sage_quant_q_f16(const void* x, int64_t sb, int64_t sh, int64_t sl, int64_t batch, int64_t heads,
                          int64_t len, int64_t dim, int64_t dim_pad, int32_t bits, int32_t granularity, int32_t smooth,
                          float sm_scale_log2, void* codes, float* scale, float* qm, void* stream) {
  vopt::clear_error();
  return static_cast<int>(quant_qk<__half>(0, x, sb, sh, sl, batch, heads, len, dim, dim_pad, bits, granularity,
                                           smooth, sm_scale_log2, nullptr, codes, scale, qm, stream));
}

int vopt_sage_quant_q_bf16(const void* x, int64_t sb, int64_t sh, int64_t sl, int64_t batch, int64_t heads,
                           int64_t len, int64_t dim, int64_t dim_pad, int32_t bits, int32_t granularity, int32_t smooth,
                           float sm_scale_log2, void* codes, float* scale, float* qm, void* stream) {
  vopt::clear_error();
  return static_cast<int>(quant_qk<__nv_bfloat16>(0, x, sb, sh, sl, batch, heads, len, dim, dim_pad, bits,
                                                  granularity, smooth, sm_scale_log2, nullptr, codes, scale, qm,
                                                  stream));
}

int vopt_sage_quant_k_f16(const void* x, int64_t sb, int64_t sh, int64_t sl, int64_t batch, int64_t heads,
                          int64_t len, int64_t dim, int64_t dim_pad, int32_t bits, int32_t granularity,
                          const float* km, void* codes, float* scale, void* stream) {
  vopt::clear_error();
  return static_cast<int>(quant_qk<__half>(1, x, sb, sh, sl, batch, heads, len, dim, dim_pad, bits, granularity, 0,
                                           1.0f, km, codes, scale, nullptr, stream));
}

int vopt_sage_quant_k_bf16(const void* x, int64_t sb, int64_t sh, int64_t sl, int64_t batch, int64_t heads,
                           int64_t len, int64_t dim, int64_t dim_pad, int32_t bits, int32_t granularity,
                           const float* km, void* codes, float* scale, void* stream) {
  vopt::clear_error();
  return static_cast<int>(quant_qk<__nv_bfloat16>(1, x, sb, sh, sl, batch, heads, len, dim, dim_pad, bits,
                                                  granularity, 0, 1.0f, km, codes, scale, nullptr, stream));
}

int vopt_sage_quant_v_fp8_f16(const void* x, int64_t sb, int64_t sh, int64_t sl, int64_t batch, int64_t heads,
                              int64_t len, int64_t dim, int64_t dim_pad, const float* vm, void* v_fp8, float* scale,
                              void* stream) {
  vopt::clear_error();
  return static_cast<int>(quant_v_fp8<__half>(x, sb, sh, sl, batch, heads, len, dim, dim_pad, vm, v_fp8, scale,
                                              stream));
}

int vopt_sage_quant_v_fp8_bf16(const void* x, int64_t sb, int64_t sh, int64_t sl, int64_t batch, int64_t heads,
                               int64_t len, int64_t dim, int64_t dim_pad, const float* vm, void* v_fp8, float* scale,
                               void* stream) {
  vopt::clear_error();
  return static_cast<int>(quant_v_fp8<__nv_bfloat16>(x, sb, sh, sl, batch, heads, len, dim, dim_pad, vm, v_fp8,
                                                     scale, stream));
}

}  // extern "C"
