// block_sparse_attn.cu - exact block-sparse masked attention (fp16 / bf16) with mma.sync, FlashAttention-2 style.
//
// Contract: vopt_cuda.h ("block-sparse masked attention"); oracle: block_sparse_attention_reference in
// vopt/ops/block_sparse_attention.py (the Triton kernel kernels/block_sparse_attention.py does the same job).
//
// Tiling. One CTA = 4 warps = 64 query rows of one (batch, head); grid (ceil(Lq / 64), H, B). Warp w owns rows
// 16w..16w+15 (one m16 tile): lane (g = lane / 4, t = lane % 4) holds rows g and g + 8. Keys stream in 64-key
// tiles = the kernel tiles of `tiles`. head_dim and value_dim are both padded to one size DP (64 when
// max(head_dim, value_dim) <= 64, else 128): 4 kernels, (fp16, bf16) x (DP 64, 128). Channels >= head_dim of Q / K,
// channels >= value_dim of V, rows >= Lq of Q and keys >= Lk of K / V are zero-filled by cp.async (src-size 0), so
// the padding contributes exact zeros to Q.K and finite zeros to P.V.
//
// Sparsity. The CTA walks its row of `tiles` with a warp ballot over 32 tile classes at a time (every warp does the
// same, so the walk is CTA-uniform): dead tiles (class 0) cost no loads and no math. Class 2 tiles read no mask
// (only key < Lk matters, and only in the last key tile); class 1 tiles evaluate the element rule per score:
// row < Lq, key < Lk, block_mask[(row / block_q) * nkb + key / block_k] and dense_mask (if given). The
// visibility of a lane's 32 scores is gathered into one 32-bit word before the QK MMAs (so the mask loads overlap
// them). A CTA whose row has no live tile writes zeros without loading anything.
//
// Pipeline. cp.async.cg (LDGSTS, 16 bytes) double buffering of K and V: Q and the first live tile form commit
// group 0, the next live tile is issued into the other stage before the current one is computed (wait_group 1 +
// __syncthreads), and a trailing __syncthreads ends every iteration before its stage is refilled.
// Shared memory: Q [64][DP], K [2][64][DP], V [2][64][DP] of 16-bit elements, unpadded rows, XOR swizzle in 16-byte
// chunks (physical chunk = chunk ^ (row & 7); the row stride is a multiple of 128 bytes): every ldmatrix phase
// (8 rows, one logical chunk) and every cp.async phase (8 consecutive chunks of one row) touches 8 distinct 16-byte
// bank groups. Bytes per CTA: DP 64: 40960, DP 128: 81920 (opt-in dynamic smem above 48 KB).
// Registers (ptxas -v, nvcc 13.0; 0 spill stores / loads and 0 stack frame on sm_80, sm_89, sm_90a): DP 64 156
// (158 on sm_90a) under __launch_bounds__(128, 3); DP 128 222 (223) under (128, 2). SASS: HMMA.16816.F32 (fp16) /
// HMMA.16816.F32.BF16 (bf16), LDSM.16.M88.4 / LDSM.16.MT88.4, LDGSTS.E.BYPASS.128, no STL / LDL.
//
// QK: Q A fragments in registers (ldmatrix.x4 once: DP / 16 k16 chunks x 4 regs), K B fragments by ldmatrix.x4
// (2 n8 key tiles x 2 halves of a k16 chunk per call), mma.sync m16n8k16 .f32.f16.f16.f32 / .f32.bf16.bf16.f32.
// Softmax: fp32 scores * (scale * log2 e), masked -> -inf, online softmax in the exp2 domain (ex2.approx.ftz),
// quad shuffles for the row max, m_use = 0 while the running max is -inf, alpha = exp2(m_old - m_use), l kept per
// lane from the fp32 P (summed over the quad in the epilogue).
// PV: P rounded (RN) to the input dtype; the accumulators of n8 tiles 2i, 2i+1 are the A fragment of k16 chunk i;
// V B fragments by ldmatrix.x4.trans from [key][channel] smem; fp32 accumulation into O (O *= alpha first).
// Epilogue: O / l (IEEE division; rows with l == 0 -> 0), RN to fp16 / bf16, stores of rows < Lq and channels <
// value_dim through o_sb / o_sh / o_sl (32-bit pair stores when out and its strides allow, else 16-bit).
//
// The fragment / ldmatrix address expressions were checked in a Python model of ldmatrix(.trans) and
// mma.m16n8k16 (PTX ISA fragment layouts) on random data: /tmp/bsa/sim.py (QK^T and PV, DP 64 and 128).
// The control flow (tile walk, visibility rule, clamps, online softmax, P rounding) was checked at tile level against
// block_sparse_attention_reference (random block / dense masks, any block sizes): /tmp/bsa/model.py. Not run on a GPU.
// A GPU run must check first: (1) dense output vs the reference for a class-2-only tiles map (MMA fragments,
// swizzle, pipeline), (2) class-1 tiles with block_q / block_k not multiples of 64 and a strided / broadcast
// dense mask, (3) rows with nothing visible -> 0, Lq / Lk not multiples of 64, head_dim != value_dim (e.g. 72/64),
// (4) compute-sanitizer racecheck on a small case with dead tiles between live ones.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "vopt_cuda.h"
#include "vopt_internal.h"

namespace {

using vopt::fail;

constexpr int kRows = 64;     // query rows per CTA
constexpr int kKeys = 64;     // keys per tile (= the kernel tile of `tiles`)
constexpr int kThreads = 128;  // 4 warps, 16 rows each

// ---- PTX wrappers ----------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; src_bytes 0 writes 16 zero bytes and reads nothing (src must still be a
// valid address expression; we pass the tensor base).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, uint32_t src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ldmatrix.x4: lanes 8m..8m+7 give the row addresses of 8x8 b16 matrix m; lane L receives r[m] = matrix m's row
// L / 4, elements 2 (L % 4), 2 (L % 4) + 1 (.trans: elements (row 2 (L % 4), col L / 4) and (row 2 (L % 4) + 1,
// col L / 4)).
__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

// D = A (16x16, row) * B (16x8, col) + D, fp32 accumulators. Fragments (g = lane / 4, t = lane % 4):
// a0: row g k 2t..2t+1, a1: row g+8 k 2t.., a2: row g k 8+2t.., a3: row g+8 k 8+2t..; b0: k 2t..2t+1 col g,
// b1: k 8+2t.. col g; d0,d1: row g cols 2t, 2t+1; d2,d3: row g+8. Low 16 bits = the lower k / column index.
template <bool kBF16>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  if constexpr (kBF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ float ex2(float x) {  // 2^x; ex2.approx(-inf) = +0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Two fp32 -> packed pair, RN; `lo` lands in the low 16 bits (the lower column / key index).
template <bool kBF16>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (kBF16) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x = lo (low half)
    return *reinterpret_cast<uint32_t*>(&v);
  } else {
    __half2 v = __floats2half2_rn(lo, hi);  // .x = lo (low half)
    return *reinterpret_cast<uint32_t*>(&v);
  }
}

template <bool kBF16>
__device__ __forceinline__ uint16_t to16(float x) {
  if constexpr (kBF16) {
    __nv_bfloat16 v = __float2bfloat16_rn(x);
    return *reinterpret_cast<uint16_t*>(&v);
  } else {
    __half v = __float2half_rn(x);
    return *reinterpret_cast<uint16_t*>(&v);
  }
}

// ---- shared-memory layout --------------------------------------------------------------------------------------
// A [64][DP] tile of 16-bit elements: row r at r * RB bytes (RB = 2 DP = 128 or 256), 16-byte chunk c (channels
// 8c..8c+7) stored at physical chunk c ^ (r & 7). RB is a multiple of 128, so the bank group of a chunk is its
// physical index mod 8: 8 rows r..r+7 (aligned) at one logical chunk, or one row at 8 consecutive chunks, hit 8
// distinct bank groups.
template <int DP>
struct Smem {
  static constexpr int RB = DP * 2;          // bytes per row
  static constexpr int CPR = DP / 8;         // 16-byte chunks per row
  static constexpr int TILE = kRows * RB;    // bytes per [64][DP] tile (same for Q, K, V)
  static constexpr int Q = 0;                // Q tile
  static constexpr int K = TILE;             // K stages 0, 1
  static constexpr int V = 3 * TILE;         // V stages 0, 1
  static constexpr int BYTES = 5 * TILE;
  __device__ static __forceinline__ uint32_t off(int row, int chunk) {
    return static_cast<uint32_t>(row * RB + 16 * (chunk ^ (row & 7)));
  }
};

// Copy rows [row0, row0 + 64) x channels [0, DP) of a [rows][ld] tensor (16-bit elements, base at `base`) into a
// swizzled tile at shared address `dst`; rows >= nrows and channels >= nch are zero-filled. Thread tid copies chunk
// tid % CPR (constant) of rows tid / CPR + (128 / CPR) i, i < 64 CPR / 128: 8 consecutive threads write one row's 8
// consecutive chunks (no bank conflicts) and read 128 contiguous bytes of global memory.
template <int DP>
__device__ __forceinline__ void load_tile(uint32_t dst, const uint16_t* base, int64_t row0, int64_t nrows,
                                          int64_t ld, int nch, int tid) {
  using S = Smem<DP>;
  constexpr int kStep = kThreads / S::CPR;  // rows per pass (16 or 8)
  constexpr int kIters = kRows / kStep;     // 4 or 8
  const int chunk = tid % S::CPR;
  const int r = tid / S::CPR;
  const bool ch_ok = chunk * 8 < nch;
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
    const int row = r + i * kStep;
    const int64_t grow = row0 + row;
    const bool ok = ch_ok && grow < nrows;
    const uint16_t* src = ok ? base + grow * ld + chunk * 8 : base;
    cp_async16(dst + S::off(row, chunk), src, ok ? 16u : 0u);
  }
}

// ---- the walk over a CTA's row of kernel-tile classes ------------------------------------------------------------
// Window of 32 classes starting at `base` (a multiple of 32): `live` bit i = class[base + i] != 0, `full` bit i =
// class[base + i] == 2. Every lane (and every warp) holds the same values.
struct TileWalk {
  const uint8_t* row;
  int nkt;
  int base;
  uint32_t live, full;

  __device__ __forceinline__ void load(int b, int lane) {
    base = b;
    const int idx = b + lane;
    const int c = idx < nkt ? static_cast<int>(__ldg(row + idx)) : 0;
    live = __ballot_sync(0xffffffffu, c != 0);
    full = __ballot_sync(0xffffffffu, c == 2);
  }
  // The first live tile index >= from (nkt if none); *is_full = its class is 2 (other nonzero values count as 1).
  __device__ __forceinline__ int next(int from, int lane, bool* is_full) {
    while (from < nkt) {
      if ((from & ~31) != base) load(from & ~31, lane);
      const uint32_t bits = live & (0xffffffffu << (from & 31));
      if (bits != 0) {
        const int i = __ffs(bits) - 1;
        *is_full = (full >> i) & 1u;
        return base + i;
      }
      from = base + 32;
    }
    *is_full = false;
    return nkt;
  }
};

struct KernelArgs {
  const uint16_t* q;
  const uint16_t* k;
  const uint16_t* v;
  uint16_t* out;
  const uint8_t* tiles;
  const uint8_t* block_mask;
  const uint8_t* dense_mask;
  int64_t q_sb, q_sh, q_sl, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, o_sb, o_sh, o_sl;
  int64_t dm_sb, dm_sh, dm_sq, dm_sk;
  int len_q, len_k, head_dim, value_dim, block_q, block_k, nkb, nkt;
  float scale_log2;  // scale * log2(e)
  int out_pairs;     // 1: out and its strides allow 32-bit pair stores
};

template <bool kBF16, int DP>
__global__ void __launch_bounds__(kThreads, DP == 128 ? 2 : 3) block_sparse_attn_kernel(const KernelArgs a) {
  using S = Smem<DP>;
  constexpr int KC = DP / 16;  // k16 chunks of QK
  constexpr int NV = DP / 8;   // n8 tiles of O
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t sbase = smem_u32(smem);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int qt = blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z;
  const int q0 = qt * kRows;
  const int row0 = q0 + 16 * warp + g;  // this lane's rows: row0, row0 + 8
  const int row1 = row0 + 8;

  TileWalk walk{a.tiles + static_cast<int64_t>(qt) * a.nkt, a.nkt, -32, 0u, 0u};
  bool cur_full = false;
  int cur = walk.next(0, lane, &cur_full);

  if (cur >= a.nkt) {  // nothing visible to any row of this CTA: zeros
    uint16_t* orow0 = a.out + b * a.o_sb + h * a.o_sh;
    for (int e = tid; e < kRows * a.value_dim; e += kThreads) {
      const int r = q0 + e / a.value_dim, c = e % a.value_dim;
      if (r < a.len_q) orow0[r * a.o_sl + c] = 0;
    }
    return;
  }

  const uint16_t* qg = a.q + b * a.q_sb + h * a.q_sh;
  const uint16_t* kg = a.k + b * a.k_sb + h * a.k_sh;
  const uint16_t* vg = a.v + b * a.v_sb + h * a.v_sh;

  // Q + first live tile -> commit group; next live tile -> the other stage.
  load_tile<DP>(sbase + S::Q, qg, q0, a.len_q, a.q_sl, a.head_dim, tid);
  load_tile<DP>(sbase + S::K, kg, static_cast<int64_t>(cur) * kKeys, a.len_k, a.k_sl, a.head_dim, tid);
  load_tile<DP>(sbase + S::V, vg, static_cast<int64_t>(cur) * kKeys, a.len_k, a.v_sl, a.value_dim, tid);
  cp_async_commit();
  bool nxt_full = false;
  int nxt = walk.next(cur + 1, lane, &nxt_full);
  if (nxt < a.nkt) {
    load_tile<DP>(sbase + S::K + S::TILE, kg, static_cast<int64_t>(nxt) * kKeys, a.len_k, a.k_sl, a.head_dim, tid);
    load_tile<DP>(sbase + S::V + S::TILE, vg, static_cast<int64_t>(nxt) * kKeys, a.len_k, a.v_sl, a.value_dim, tid);
  }
  cp_async_commit();  // (possibly empty group: keeps wait_group 1 meaning "all but the newest")
  cp_async_wait<1>();
  __syncthreads();

  // Per-lane ldmatrix offsets (bytes, relative to a tile). lm = lane / 8 (which matrix this lane addresses),
  // lr = lane % 8 (which row of it).
  const int lm = lane >> 3, lr = lane & 7;
  // Q (A of QK) for k16 chunk kc: matrices {rows 0-7, ch lo}, {rows 8-15, ch lo}, {rows 0-7, ch hi},
  // {rows 8-15, ch hi} = a0..a3 (row g / g+8, k 2t.. / 8+2t..). Lane row 16w + 8 (lm & 1) + lr, chunk 2kc + (lm >> 1);
  // (2kc + x) ^ s = 2kc ^ (x ^ s) for x in {0, 1}, so chunk kc's address is the kc = 0 address ^ 32 kc (the XOR only
  // touches bits 5..7 of the in-row byte offset, below RB).
  uint32_t qf[KC][4];
  {
    const int r = 16 * warp + 8 * (lm & 1) + lr;
    const uint32_t q_off = S::off(r, lm >> 1);
#pragma unroll
    for (int kc = 0; kc < KC; ++kc)
      ldsm_x4(sbase + S::Q + (q_off ^ (32u * kc)), qf[kc][0], qf[kc][1], qf[kc][2], qf[kc][3]);
  }
  // K (B of QK), one ldmatrix.x4 per (key pair-of-n8-tiles jp, k16 chunk kc): matrices {keys 16jp+0..7, ch 16kc+0..7}
  // = b0 of n-tile 2jp, {same keys, ch 16kc+8..15} = b1 of 2jp, {keys 16jp+8..15, ch lo} = b0 of 2jp+1, {.., ch hi}
  // = b1 of 2jp+1 (non-trans: lane gets key g, channels 2t, 2t+1 = B's k 2t.., col g). Lane key 8 (lm >> 1) + lr,
  // chunk 2kc + (lm & 1); + 16 jp rows keeps (row & 7).
  const uint32_t k_off = S::off(8 * (lm >> 1) + lr, lm & 1);
  // V (B of PV, .trans), one ldmatrix.x4 per (k16 key chunk i, channel pair-of-n8-tiles np): matrices
  // {keys 16i+0..7, ch 16np+0..7} = b0 of n-tile 2np (trans: lane gets keys 2t, 2t+1 of channel g), {keys 16i+8..15,
  // ch 16np+0..7} = b1 of 2np, {keys 16i+0..7, ch 16np+8..15} = b0 of 2np+1, {keys +8.., ch hi} = b1 of 2np+1.
  // Lane key 8 (lm & 1) + lr, chunk 2np + (lm >> 1).
  const uint32_t v_off = S::off(8 * (lm & 1) + lr, lm >> 1);

  // Mask bases (class-1 tiles). Rows >= Lq see nothing (their block_mask row may not exist).
  const bool r0_ok = row0 < a.len_q, r1_ok = row1 < a.len_q;
  const uint8_t* bm0 = a.block_mask + (r0_ok ? static_cast<int64_t>(row0 / a.block_q) * a.nkb : 0);
  const uint8_t* bm1 = a.block_mask + (r1_ok ? static_cast<int64_t>(row1 / a.block_q) * a.nkb : 0);
  const uint8_t* dm0 = nullptr;
  const uint8_t* dm1 = nullptr;
  if (a.dense_mask != nullptr) {
    const uint8_t* dmb = a.dense_mask + b * a.dm_sb + h * a.dm_sh;
    dm0 = dmb + static_cast<int64_t>(row0) * a.dm_sq;
    dm1 = dmb + static_cast<int64_t>(row1) * a.dm_sq;
  }

  float o[NV][4];
#pragma unroll
  for (int n = 0; n < NV; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  float m0 = -INFINITY, m1 = -INFINITY;  // running max (log2 domain) of rows row0, row1
  float l0 = 0.0f, l1 = 0.0f;            // this lane's partial row sums

  int stage = 0;
  while (true) {
    const int c0 = cur * kKeys;
    // ---- visibility of this lane's 32 scores: bit 4j + e <-> s[j][e] = (row0 | row1 for e >> 1, key c0 + 8j + 2t +
    // (e & 1)). Full tiles need only key < Lk, and only in the last key tile.
    uint32_t vis = 0xffffffffu;
    const bool need_mask = !cur_full || c0 + kKeys > a.len_k;
    if (need_mask) {
      vis = 0u;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = c0 + 8 * j + 2 * t + e;
          if (key < a.len_k) {
            bool v0 = true, v1 = true;
            if (!cur_full) {
              const int kb = key / a.block_k;
              v0 = r0_ok && bm0[kb] != 0;
              v1 = r1_ok && bm1[kb] != 0;
              if (dm0 != nullptr) {
                const int64_t ko = static_cast<int64_t>(key) * a.dm_sk;
                v0 = v0 && dm0[ko] != 0;
                v1 = v1 && dm1[ko] != 0;
              }
            }
            vis |= (v0 ? 1u : 0u) << (4 * j + e);
            vis |= (v1 ? 1u : 0u) << (4 * j + 2 + e);
          }
        }
      }
    }

    const uint32_t ks = sbase + S::K + stage * S::TILE;
    const uint32_t vs = sbase + S::V + stage * S::TILE;

    // ---- S = Q K^T (16 rows x 64 keys per warp): s[j] = n8 key tile j.
    float s[8][4];
#pragma unroll
    for (int j = 0; j < 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) {
#pragma unroll
      for (int jp = 0; jp < 4; ++jp) {
        uint32_t b0, b1, b2, b3;
        ldsm_x4(ks + ((k_off + 16u * jp * S::RB) ^ (32u * kc)), b0, b1, b2, b3);
        mma16816<kBF16>(s[2 * jp], qf[kc][0], qf[kc][1], qf[kc][2], qf[kc][3], b0, b1);
        mma16816<kBF16>(s[2 * jp + 1], qf[kc][0], qf[kc][1], qf[kc][2], qf[kc][3], b2, b3);
      }
    }

    // ---- online softmax (exp2 domain).
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[j][e] * a.scale_log2;
        if (need_mask && !((vis >> (4 * j + e)) & 1u)) x = -INFINITY;
        s[j][e] = x;
      }
      mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
      mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
    }
    // the 4 lanes of a quad (same g) hold the 64 keys of the same rows
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    const float mu0 = mn0 == -INFINITY ? 0.0f : mn0;  // m_use
    const float mu1 = mn1 == -INFINITY ? 0.0f : mn1;
    const float al0 = ex2(m0 - mu0), al1 = ex2(m1 - mu1);  // m_old = -inf -> 0 (O and l are 0 then anyway)
    m0 = mn0;
    m1 = mn1;
    float rs0 = 0.0f, rs1 = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      s[j][0] = ex2(s[j][0] - mu0);
      s[j][1] = ex2(s[j][1] - mu0);
      s[j][2] = ex2(s[j][2] - mu1);
      s[j][3] = ex2(s[j][3] - mu1);
      rs0 += s[j][0] + s[j][1];
      rs1 += s[j][2] + s[j][3];
    }
    l0 = l0 * al0 + rs0;
    l1 = l1 * al1 + rs1;
#pragma unroll
    for (int n = 0; n < NV; ++n) {
      o[n][0] *= al0;
      o[n][1] *= al0;
      o[n][2] *= al1;
      o[n][3] *= al1;
    }

    // ---- O += P V. A fragment of key chunk i (keys 16i..16i+15): a0 = row g keys 16i+2t.. = s[2i][0,1],
    // a1 = row g+8 = s[2i][2,3], a2 = row g keys 16i+8+2t.. = s[2i+1][0,1], a3 = s[2i+1][2,3].
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t pa0 = pack2<kBF16>(s[2 * i][0], s[2 * i][1]);
      const uint32_t pa1 = pack2<kBF16>(s[2 * i][2], s[2 * i][3]);
      const uint32_t pa2 = pack2<kBF16>(s[2 * i + 1][0], s[2 * i + 1][1]);
      const uint32_t pa3 = pack2<kBF16>(s[2 * i + 1][2], s[2 * i + 1][3]);
#pragma unroll
      for (int np = 0; np < NV / 2; ++np) {
        uint32_t b0, b1, b2, b3;
        ldsm_x4_t(vs + ((v_off + 16u * i * S::RB) ^ (32u * np)), b0, b1, b2, b3);
        mma16816<kBF16>(o[2 * np], pa0, pa1, pa2, pa3, b0, b1);
        mma16816<kBF16>(o[2 * np + 1], pa0, pa1, pa2, pa3, b2, b3);
      }
    }

    __syncthreads();  // every warp is done with this stage
    if (nxt >= a.nkt) break;
    cur = nxt;
    cur_full = nxt_full;
    stage ^= 1;
    nxt = walk.next(cur + 1, lane, &nxt_full);
    if (nxt < a.nkt) {  // into the stage just released
      const uint32_t st = static_cast<uint32_t>(stage ^ 1) * S::TILE;
      load_tile<DP>(sbase + S::K + st, kg, static_cast<int64_t>(nxt) * kKeys, a.len_k, a.k_sl, a.head_dim, tid);
      load_tile<DP>(sbase + S::V + st, vg, static_cast<int64_t>(nxt) * kKeys, a.len_k, a.v_sl, a.value_dim, tid);
    }
    cp_async_commit();
    cp_async_wait<1>();  // tile `cur` (the group before the newest) has landed
    __syncthreads();
  }

  // ---- epilogue: full row sums over the quad, O / l, stores.
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  uint16_t* ob = a.out + b * a.o_sb + h * a.o_sh;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = half ? row1 : row0;
    if (row >= a.len_q) continue;
    const float l = half ? l1 : l0;
    uint16_t* orow = ob + static_cast<int64_t>(row) * a.o_sl;
#pragma unroll
    for (int n = 0; n < NV; ++n) {
      const int c = 8 * n + 2 * t;  // value_dim is a multiple of 8: c + 1 < value_dim iff c < value_dim
      if (c >= a.value_dim) continue;
      const float x0 = l > 0.0f ? o[n][2 * half] / l : 0.0f;
      const float x1 = l > 0.0f ? o[n][2 * half + 1] / l : 0.0f;
      if (a.out_pairs) {
        *reinterpret_cast<uint32_t*>(orow + c) = pack2<kBF16>(x0, x1);
      } else {
        orow[c] = to16<kBF16>(x0);
        orow[c + 1] = to16<kBF16>(x1);
      }
    }
  }
}

// ---- host side ---------------------------------------------------------------------------------------------------

cudaError_t check_params(const vopt_block_sparse_attn_params* p) {
  if (p == nullptr) return fail(cudaErrorInvalidValue, "params is NULL");
  if (p->q == nullptr) return fail(cudaErrorInvalidValue, "q is NULL");
  if (p->k == nullptr) return fail(cudaErrorInvalidValue, "k is NULL");
  if (p->v == nullptr) return fail(cudaErrorInvalidValue, "v is NULL");
  if (p->out == nullptr) return fail(cudaErrorInvalidValue, "out is NULL");
  if (p->tiles == nullptr) return fail(cudaErrorInvalidValue, "tiles is NULL");
  if (p->block_mask == nullptr) return fail(cudaErrorInvalidValue, "block_mask is NULL");
  if (p->dtype != 0 && p->dtype != 1)
    return fail(cudaErrorInvalidValue, "dtype=%d; accepted: 0 (fp16), 1 (bf16)", static_cast<int>(p->dtype));
  const struct {
    const char* name;
    int64_t v;
  } sizes[] = {{"batch", p->batch}, {"heads", p->heads}, {"len_q", p->len_q},
               {"len_k", p->len_k}, {"block_q", p->block_q}, {"block_k", p->block_k}};
  for (const auto& s : sizes)
    if (s.v < 1) return fail(cudaErrorInvalidValue, "%s=%lld; accepted: >= 1", s.name, static_cast<long long>(s.v));
  constexpr int64_t kMaxLen = (int64_t{1} << 31) - 128;  // int32 row / key arithmetic in the kernel
  if (p->len_q > kMaxLen)
    return fail(cudaErrorInvalidValue, "len_q=%lld; accepted: 1..%lld", static_cast<long long>(p->len_q),
                static_cast<long long>(kMaxLen));
  if (p->len_k > kMaxLen)
    return fail(cudaErrorInvalidValue, "len_k=%lld; accepted: 1..%lld", static_cast<long long>(p->len_k),
                static_cast<long long>(kMaxLen));
  if (p->head_dim < 8 || p->head_dim > 128 || p->head_dim % 8 != 0)
    return fail(cudaErrorInvalidValue, "head_dim=%lld; accepted: a multiple of 8 in [8, 128]",
                static_cast<long long>(p->head_dim));
  if (p->value_dim < 8 || p->value_dim > 128 || p->value_dim % 8 != 0)
    return fail(cudaErrorInvalidValue, "value_dim=%lld; accepted: a multiple of 8 in [8, 128]",
                static_cast<long long>(p->value_dim));
  const struct {
    const char* name;
    int64_t v;
  } strides[] = {{"q_sb", p->q_sb},   {"q_sh", p->q_sh},   {"q_sl", p->q_sl},   {"k_sb", p->k_sb},
                 {"k_sh", p->k_sh},   {"k_sl", p->k_sl},   {"v_sb", p->v_sb},   {"v_sh", p->v_sh},
                 {"v_sl", p->v_sl},   {"o_sb", p->o_sb},   {"o_sh", p->o_sh},   {"o_sl", p->o_sl},
                 {"dm_sb", p->dm_sb}, {"dm_sh", p->dm_sh}, {"dm_sq", p->dm_sq}, {"dm_sk", p->dm_sk}};
  for (const auto& s : strides)
    if (s.v < 0)
      return fail(cudaErrorInvalidValue, "%s=%lld; accepted: >= 0 (elements; the last dim has unit stride)", s.name,
                  static_cast<long long>(s.v));
  if ((reinterpret_cast<uintptr_t>(p->q) | reinterpret_cast<uintptr_t>(p->k) | reinterpret_cast<uintptr_t>(p->v)) %
          16 != 0)
    return fail(cudaErrorMisalignedAddress, "q, k and v must be 16-byte aligned");
  if (reinterpret_cast<uintptr_t>(p->out) % 2 != 0) return fail(cudaErrorMisalignedAddress, "out must be 2-byte aligned");
  for (int i = 0; i < 9; ++i)  // q/k/v batch, head and row strides
    if (strides[i].v % 8 != 0)
      return fail(cudaErrorMisalignedAddress, "%s=%lld; accepted: a multiple of 8 elements (16-byte rows)",
                  strides[i].name, static_cast<long long>(strides[i].v));
  const int64_t qtiles = (p->len_q + kRows - 1) / kRows;
  if (qtiles > 0x7fffffff)
    return fail(cudaErrorInvalidValue, "len_q=%lld; accepted: ceil(len_q / 64) <= 2^31 - 1",
                static_cast<long long>(p->len_q));
  if (p->heads > 65535)
    return fail(cudaErrorInvalidValue, "heads=%lld; accepted: 1..65535 (grid y)", static_cast<long long>(p->heads));
  if (p->batch > 65535)
    return fail(cudaErrorInvalidValue, "batch=%lld; accepted: 1..65535 (grid z)", static_cast<long long>(p->batch));
  return cudaSuccess;
}

template <bool kBF16, int DP>
cudaError_t launch(const KernelArgs& a, dim3 grid, cudaStream_t stream) {
  auto kernel = block_sparse_attn_kernel<kBF16, DP>;
  constexpr int smem = Smem<DP>::BYTES;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess)
      return fail(err, "block-sparse attention: cannot set %d bytes of dynamic shared memory (%s)", smem,
                  cudaGetErrorString(err));
  }
  kernel<<<grid, kThreads, smem, stream>>>(a);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return fail(err, "block-sparse attention kernel launch failed (%s)", cudaGetErrorString(err));
  return cudaSuccess;
}

}  // namespace

extern "C" {

int64_t vopt_block_sparse_attn_params_size(void) {
  return static_cast<int64_t>(sizeof(vopt_block_sparse_attn_params));
}

int vopt_block_sparse_attn_fwd(const vopt_block_sparse_attn_params* params, void* stream) {
  vopt::clear_error();
  cudaError_t err = check_params(params);
  if (err != cudaSuccess) return static_cast<int>(err);
  int cc = 0;
  err = vopt::current_compute_capability(&cc);
  if (err != cudaSuccess) return static_cast<int>(err);
  if (cc < 80)
    return static_cast<int>(fail(cudaErrorNotSupported,
                                 "block-sparse attention needs sm_80 or newer (mma.sync bf16/f16, cp.async); this "
                                 "device is sm_%d",
                                 cc));
  const vopt_block_sparse_attn_params& p = *params;
  KernelArgs a;
  a.q = static_cast<const uint16_t*>(p.q);
  a.k = static_cast<const uint16_t*>(p.k);
  a.v = static_cast<const uint16_t*>(p.v);
  a.out = static_cast<uint16_t*>(p.out);
  a.tiles = p.tiles;
  a.block_mask = p.block_mask;
  a.dense_mask = p.dense_mask;
  a.q_sb = p.q_sb; a.q_sh = p.q_sh; a.q_sl = p.q_sl;
  a.k_sb = p.k_sb; a.k_sh = p.k_sh; a.k_sl = p.k_sl;
  a.v_sb = p.v_sb; a.v_sh = p.v_sh; a.v_sl = p.v_sl;
  a.o_sb = p.o_sb; a.o_sh = p.o_sh; a.o_sl = p.o_sl;
  a.dm_sb = p.dm_sb; a.dm_sh = p.dm_sh; a.dm_sq = p.dm_sq; a.dm_sk = p.dm_sk;
  a.len_q = static_cast<int>(p.len_q);
  a.len_k = static_cast<int>(p.len_k);
  a.head_dim = static_cast<int>(p.head_dim);
  a.value_dim = static_cast<int>(p.value_dim);
  // block sizes beyond the lengths behave like the lengths (one block); keeps the int32 divisions in range
  a.block_q = static_cast<int>(p.block_q < p.len_q ? p.block_q : p.len_q);
  a.block_k = static_cast<int>(p.block_k < p.len_k ? p.block_k : p.len_k);
  a.nkb = static_cast<int>(p.block_k >= p.len_k ? 1 : (p.len_k + p.block_k - 1) / p.block_k);  // no int64 overflow
  a.nkt = static_cast<int>((p.len_k + kKeys - 1) / kKeys);
  a.scale_log2 = p.scale * 1.4426950408889634f;
  a.out_pairs = (reinterpret_cast<uintptr_t>(p.out) % 4 == 0 && p.o_sb % 2 == 0 && p.o_sh % 2 == 0 &&
                 p.o_sl % 2 == 0)
                    ? 1
                    : 0;
  const dim3 grid(static_cast<unsigned>((p.len_q + kRows - 1) / kRows), static_cast<unsigned>(p.heads),
                  static_cast<unsigned>(p.batch));
  const int dp = (p.head_dim > 64 || p.value_dim > 64) ? 128 : 64;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (p.dtype == 1)
    err = dp == 128 ? launch<true, 128>(a, grid, s) : launch<true, 64>(a, grid, s);
  else
    err = dp == 128 ? launch<false, 128>(a, grid, s) : launch<false, 64>(a, grid, s);
  return static_cast<int>(err);
}

}  // extern "C"
