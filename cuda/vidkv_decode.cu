// vidkv_decode.cu - fused decode attention over a packed VidKV / KIVI KV cache (flash-decoding, plain CUDA C++).
//
// Contract: vopt_cuda.h ("VidKV / KIVI packed decode attention") and vopt/kvcache/fused_decode_args.py (operand
// layouts, index arithmetic, numerics); the Triton kernel kernels/vidkv_decode.py (_packed_decode_kernel) computes
// the same thing; the oracle is vopt.kvcache.decode_attention.packed_decode_attention.
//
// Design (decode is memory bound: no tensor cores, fp32 FMAs on CUDA cores).
// * Grid (BH, splits), 256 threads = 8 warps. The N tokens are cut into 32-token tiles; split s runs the tiles
//   [s * tps, min((s + 1) * tps, ntiles)) with tps = ceil(ntiles / splits) (a split may be empty: it then writes
//   m = -inf, l = 0, acc = 0). The M <= 128 query rows of the (b, kv head) are handled in blocks of 32 rows (one
//   pass over the split's tiles per block: a single pass for the usual decode shapes M = (Hq / Hkv) * Lq <= 32).
// * Row ownership: warp w owns rows w + 8 i (i < 4) of the row block, for the scores, the online softmax and the
//   accumulator. Scores: lane = token of the tile (s[i] of lane j = score of row w + 8 i with token j). PV: lane owns
//   channels lane + 32 k (k < 8, DV <= 256), acc[i][k].
// * Scores of a tile, in channel chunks of 64 (two phases, each only when the tile has such tokens):
//   (A) packed keys (tokens < TQK): channels [0, KA) are 2-bit codes (code * s + z, query qa), channels
//       [KA, KA + KB) are 1-bit FFT signs ((2 bit - 1) * s or bit * s + z, query qb); (R) residual keys (tokens >=
//       TQK): k_res fp16, query q. Per chunk the CTA writes the query chunk q_s[32 rows][64] (fp32) and the
//       dequantized, fp16-rounded key chunk k_s[32 tokens][64 (+1 pad)] (zero outside the phase's tokens/channels),
//       then each thread does s[i] += q_s[row][c] * k_s[lane][c] (q_s: warp broadcast; k_s: row stride 65 words ->
//       lane j hits bank (j + c) % 32, conflict-free). Key code fill: lane = token, so a warp reads 32 consecutive
//       codes of one channel (2-4 words of one group, coalesced); the residual fill is channel-fast (coalesced fp16).
// * Online softmax per row in fp32, exp2 domain (scores * qk_scale): warp max / sum with __shfl_xor_sync; m_use =
//   (m_new == -inf ? 0 : m_new); alpha = exp2f(m_old - m_use); p = exp2f(s - m_use); l = l * alpha + sum(p) with
//   the fp32 p; p rounded to fp16 goes to p_s[row][token]. Tokens >= N (last tile) score -inf.
// * Values: the tile's dequantized, fp16-rounded V tile v_s[32 tokens][256 (+2)] (fp16) is written (token-fast for
//   per-channel packed values, whose codes run along tokens; channel-fast otherwise), then acc[i][k] = acc * alpha +
//   sum_j p_s[row][j] * v_s[j][lane + 32 k] (fp32 FMA, tokens in order).
// * Output: splits == 1: out = acc / l (rows with l == 0 -> 0). splits > 1: (acc, m, l) partials go to the
//   workspace ([BH][splits][M][DV] fp32 accumulators, then [BH][splits][M][2] (m, l)) and vidkv_merge_kernel (grid
//   (BH, ceil(M * DV / 256))) combines them: out = sum_s acc_s * 2^(m_s - m*) / sum_s l_s * 2^(m_s - m*).
// * Shared memory (static): q_s 8192 + k_s 8320 + p_s 4224 + v_s 16512 = 37248 bytes per CTA. Registers (ptxas -v,
//   nvcc 13.0): decode kernel 128 (the cap of __launch_bounds__(256, 2)), merge kernel 32 (sm_89: 40); 0 spill
//   stores / loads, 0 stack frame on sm_80 / sm_89 / sm_90a; SASS has no STL / LDL (FFMA, MUFU.EX2, SHFL.BFLY,
//   LDS, LDG.E / .U16 / .U8, BAR.SYNC).
// * Indices: per-element code indices are int64 (flat indices of a big cache exceed 2^31); tokens, channels and
//   group sizes are int32 (n <= 2^31 - 64 is checked). Divisions: t / GK, t / GV, c / GV (int32, runtime divisor)
//   and flat / 5 for the base-3 bytes (unsigned 64-bit by a constant).
// Checked on the CPU: tests/test_vidkv_decode_emulated.py runs this device section as host C++ (emu_runtime.h)
// against the torch oracle and, with one split, against the Triton kernel to fp32 summation order.
// Not done (performance; no GPU timing yet): no vectorized / cp.async loads, no word-once expansion of the codes
// (each element re-reads its word: L1 hits for the 15 / 31 neighbours), the query chunk is re-read from L1/L2 for
// every tile and chunk, metadata are loaded per element, per-element int64 index arithmetic, M > 32 re-streams the
// tokens once per 32-row block. A GPU run must check first: the kernel through the real launcher
// (vopt/kvcache/decode_cuda.py) against the oracle and the emulation, splits 1 and > 1, M > 32, and
// compute-sanitizer racecheck / memcheck (the __syncthreads placement in the tile loop, the bounds of every load).
//
// Only plain CUDA C++ in the device section (it is compiled as host C++ by tests/cuda_emu/vidkv_decode_emu.cpp):
// no inline PTX, no cp.async, no atomics, no MMA, no cooperative groups.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "vopt_cuda.h"
#include "vopt_internal.h"

// ---- device code ----
namespace {

constexpr int kThreads = 256;                  // 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kTileN = 32;                     // tokens per tile (= lanes: lane j scores token j)
constexpr int kRowBlock = 32;                  // query rows per pass
constexpr int kRowsPerWarp = kRowBlock / kWarps;  // 4: warp w owns rows w + 8 i
constexpr int kChunk = 64;                     // channels per score chunk
constexpr int kMaxDV = 256;
constexpr int kVSlots = kMaxDV / 32;           // 8 channels per lane: lane + 32 k
constexpr int kKStride = kChunk + 1;           // k_s row stride (words): lane j -> bank (j + c) % 32
constexpr int kVStride = kMaxDV + 2;           // v_s row stride (halves): 129 words, odd
constexpr int kPStride = kTileN + 1;
constexpr int kMaxM = 128;
constexpr int kMaxD = 256;

// Everything the kernels read; built on the host by make_kparams (below, shared with the CPU emulation).
struct KParams {
  const __half* q;
  const __half* qa;
  const __half* qb;
  const int32_t* ka_words;
  const void* ka_scale;
  const void* ka_zero;
  const int32_t* kb_words;
  const void* kb_scale;
  const void* kb_zero;
  const __half* k_res;
  const void* v_words;
  const void* v_scale;
  const void* v_zero;
  const __half* v_res;
  float* out;
  float* ws;  // splits > 1: accumulators [BH][splits][M][DV], then (m, l) [BH][splits][M][2]
  int64_t bh;
  int m, d, dv, ka, kb, tqk, tqv, n, gk, gv;
  int ngk, ngv;      // TQK / GK, TQV / GV (packed groups per bh)
  int dv_groups;     // DV / GV (per-token value groups per token)
  int ntiles, splits, tiles_per_split;
  float qk_scale;
  int meta_dtype, kb_pm, v_per_token, v_codec, v_has_scale;
};

// Scale / zero point i in the metadata dtype (0 fp16, 1 bf16, 2 fp32), as fp32.
__device__ __forceinline__ float ld_meta(const void* p, int64_t i, int dtype) {
  if (dtype == 2) return static_cast<const float*>(p)[i];
  if (dtype == 1) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  return __half2float(static_cast<const __half*>(p)[i]);
}

__device__ __forceinline__ float round_h(float x) { return __half2float(__float2half_rn(x)); }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Packed key of token t (< TQK) on channel c (< KA + KB), dequantized and rounded to fp16 (fused_decode_args.py):
// c < KA: flat = ((bh NGK + t / GK) KA + c) GK + t % GK, 2-bit code in word flat >> 4 at bits 2 (flat & 15),
// code * s + z with s, z at [bh, t / GK, c]; c >= KA: the same flat index with KB and cb = c - KA, bit in word
// flat >> 5 at bit flat & 31, (2 bit - 1) s (kb_pm) or bit * s + z.
// (g, ti) = (t / GK, t % GK), computed once per token by the caller.
__device__ __forceinline__ float packed_key(const KParams& p, int64_t bh, int g, int ti, int c) {
  if (c < p.ka) {
    const int64_t gidx = (bh * p.ngk + g) * p.ka + c;
    const int64_t flat = gidx * p.gk + ti;
    const uint32_t w = static_cast<uint32_t>(p.ka_words[flat >> 4]);
    const float code = static_cast<float>((w >> (2 * static_cast<int>(flat & 15))) & 3u);
    return round_h(fmaf(code, ld_meta(p.ka_scale, gidx, p.meta_dtype), ld_meta(p.ka_zero, gidx, p.meta_dtype)));
  }
  const int64_t gidx = (bh * p.ngk + g) * p.kb + (c - p.ka);
  const int64_t flat = gidx * p.gk + ti;
  const uint32_t bit = (static_cast<uint32_t>(p.kb_words[flat >> 5]) >> static_cast<int>(flat & 31)) & 1u;
  const float s = ld_meta(p.kb_scale, gidx, p.meta_dtype);
  if (p.kb_pm) return round_h(bit ? s : -s);  // (2 bit - 1) * s, exact
  return round_h(fmaf(static_cast<float>(bit), s, ld_meta(p.kb_zero, gidx, p.meta_dtype)));
}

// Packed value of token t (< TQV) on channel c (< DV), dequantized and rounded to fp16. Per token (KIVI):
// flat = (bh TQV + t) DV + c, group (bh TQV + t) (DV / GV) + c / GV; per channel (VidKV): group
// (bh NGV + t / GV) DV + c, flat = group GV + t % GV. Codec 0: 2-bit code * s + z; 1: (code - 1) [* s];
// 2: base-3 digit flat % 5 of byte flat / 5 (digit d = (byte / 3^d) % 3), minus 1 [* s].
// Per channel, (g, ti) = (t / GV, t % GV) come from the caller (once per token); per token they are unused.
__device__ __forceinline__ float packed_value(const KParams& p, int64_t bh, int t, int g, int ti, int c) {
  int64_t gidx, flat;
  if (p.v_per_token) {
    const int64_t row = bh * p.tqv + t;
    gidx = row * p.dv_groups + c / p.gv;
    flat = row * p.dv + c;
  } else {
    gidx = (bh * p.ngv + g) * p.dv + c;
    flat = gidx * p.gv + ti;
  }
  float val;
  if (p.v_codec == 2) {
    const uint64_t uf = static_cast<uint64_t>(flat);
    const uint64_t byte_i = uf / 5u;
    const uint32_t r = static_cast<uint32_t>(uf - byte_i * 5u);
    const uint32_t byte = static_cast<const uint8_t*>(p.v_words)[byte_i];
    const uint32_t pw = r == 0 ? 1u : r == 1 ? 3u : r == 2 ? 9u : r == 3 ? 27u : 81u;
    val = static_cast<float>(static_cast<int>((byte / pw) % 3u) - 1);
    if (p.v_has_scale) val *= ld_meta(p.v_scale, gidx, p.meta_dtype);
  } else {
    const uint32_t w = static_cast<uint32_t>(static_cast<const int32_t*>(p.v_words)[flat >> 4]);
    const uint32_t code = (w >> (2 * static_cast<int>(flat & 15))) & 3u;
    if (p.v_codec == 1) {
      val = static_cast<float>(static_cast<int>(code) - 1);
      if (p.v_has_scale) val *= ld_meta(p.v_scale, gidx, p.meta_dtype);
    } else {
      val = fmaf(static_cast<float>(code), ld_meta(p.v_scale, gidx, p.meta_dtype),
                 ld_meta(p.v_zero, gidx, p.meta_dtype));
    }
  }
  return round_h(val);
}

__global__ void __launch_bounds__(kThreads, 2) vidkv_decode_kernel(const KParams p) {
  __shared__ float q_s[kRowBlock][kChunk];        // query chunk (fp16 values as fp32)
  __shared__ float k_s[kTileN][kKStride];         // key chunk, fp16-rounded
  __shared__ float p_s[kRowBlock][kPStride];      // P (fp16-rounded) of the tile
  __shared__ __half v_s[kTileN][kVStride];        // V tile, fp16
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int64_t bh = blockIdx.x;
  const int split = blockIdx.y;
  const int tile0 = split * p.tiles_per_split;
  const int tile1 = min(p.ntiles, tile0 + p.tiles_per_split);
  const int ck = p.ka + p.kb;
  const int dvr = (p.dv + 31) & ~31;  // v_s columns written (zeros in [DV, dvr): read by lanes of slot k)
  const int64_t nrk = p.n - p.tqk, nrv = p.n - p.tqv;

  for (int r0 = 0; r0 < p.m; r0 += kRowBlock) {
    const int rows = min(kRowBlock, p.m - r0);
    float m_i[kRowsPerWarp], l_i[kRowsPerWarp], acc[kRowsPerWarp][kVSlots];
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      m_i[i] = -INFINITY;
      l_i[i] = 0.f;
#pragma unroll
      for (int k = 0; k < kVSlots; ++k) acc[i][k] = 0.f;
    }
    for (int tile = tile0; tile < tile1; ++tile) {
      const int t0 = tile * kTileN;
      const int tn = min(kTileN, p.n - t0);  // valid tokens of the tile (>= 1)
      float s[kRowsPerWarp];
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) s[i] = 0.f;
      // phase 0: packed keys (channels [0, KA + KB)), phase 1: residual keys (channels [0, D)). CTA-uniform.
      for (int phase = 0; phase < 2; ++phase) {
        const bool packed = phase == 0;
        if (packed ? (t0 >= p.tqk || ck == 0) : (t0 + tn <= p.tqk)) continue;
        const int nch = packed ? ck : p.d;
        for (int c0 = 0; c0 < nch; c0 += kChunk) {
          __syncthreads();  // previous readers of q_s / k_s (and of p_s / v_s: previous tile) are done
          // query chunk: e -> (row r = e / 64, channel cc = e % 64): consecutive threads read consecutive halves
          for (int e = tid; e < kRowBlock * kChunk; e += kThreads) {
            const int r = e / kChunk, cc = e % kChunk, c = c0 + cc;
            float v = 0.f;
            if (r < rows && c < nch) {
              const int64_t row = bh * p.m + r0 + r;
              if (!packed) v = __half2float(p.q[row * p.d + c]);
              else if (c < p.ka) v = __half2float(p.qa[row * p.ka + c]);
              else v = __half2float(p.qb[row * p.kb + (c - p.ka)]);
            }
            q_s[r][cc] = v;
          }
          if (packed) {
            // token j = lane, channels cc = warp + 8 k: a warp = 32 consecutive tokens of one channel, whose codes
            // are consecutive within a group (one or a few words); t / GK once per thread
            const int t = t0 + lane;
            const bool tv = lane < tn && t < p.tqk;
            const int g = tv ? t / p.gk : 0;
            const int ti = t - g * p.gk;
            for (int cc = warp; cc < kChunk; cc += kWarps) {
              const int c = c0 + cc;
              k_s[lane][cc] = (tv && c < nch) ? packed_key(p, bh, g, ti, c) : 0.f;
            }
          } else {
            // e -> (token j = e / 64, channel cc = e % 64): a warp = 32 consecutive fp16 of one residual key
            for (int e = tid; e < kTileN * kChunk; e += kThreads) {
              const int j = e / kChunk, cc = e % kChunk, t = t0 + j, c = c0 + cc;
              float v = 0.f;
              if (j < tn && t >= p.tqk && c < nch) v = __half2float(p.k_res[(bh * nrk + (t - p.tqk)) * p.d + c]);
              k_s[j][cc] = v;
            }
          }
          __syncthreads();
          const int cw = min(kChunk, nch - c0);
          for (int cc = 0; cc < cw; ++cc) {
            const float kv = k_s[lane][cc];
#pragma unroll
            for (int i = 0; i < kRowsPerWarp; ++i)
              if (warp + kWarps * i < rows) s[i] = fmaf(q_s[warp + kWarps * i][cc], kv, s[i]);  // exact fp16 x fp16
          }
        }
      }
      // online softmax of the tile (row r = warp + 8 i is warp-uniform: all 32 lanes shuffle together)
      float alpha[kRowsPerWarp];
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i) {
        alpha[i] = 1.f;
        const int r = warp + kWarps * i;
        if (r < rows) {
          const float x = lane < tn ? s[i] * p.qk_scale : -INFINITY;
          const float m_new = fmaxf(m_i[i], warp_max(x));
          const float m_use = m_new == -INFINITY ? 0.f : m_new;
          alpha[i] = exp2f(m_i[i] - m_use);  // m_i = -inf (first tile) -> 0
          const float pr = exp2f(x - m_use);  // -inf -> 0
          l_i[i] = l_i[i] * alpha[i] + warp_sum(pr);
          m_i[i] = m_new;
          p_s[r][lane] = round_h(pr);
        }
      }
      // V tile [32 tokens][dvr channels]. Per-channel packed codes run along tokens -> token-fast (token j = lane,
      // channels warp + 8 k, t / GV once per thread); per-token codes and the residual -> channel-fast.
      if (!p.v_per_token && t0 < p.tqv) {
        const int t = t0 + lane;
        const bool tv = lane < tn && t < p.tqv;
        const int g = tv ? t / p.gv : 0;
        const int ti = t - g * p.gv;
        for (int c = warp; c < dvr; c += kWarps) {
          float v = 0.f;
          if (lane < tn && c < p.dv)
            v = tv ? packed_value(p, bh, t, g, ti, c) : __half2float(p.v_res[(bh * nrv + (t - p.tqv)) * p.dv + c]);
          v_s[lane][c] = __float2half_rn(v);
        }
      } else {  // here packed tokens (t < TQV) are per-token values (per-channel ones take the branch above)
        for (int e = tid; e < kTileN * dvr; e += kThreads) {
          const int j = e / dvr, c = e - j * dvr, t = t0 + j;
          float v = 0.f;
          if (j < tn && c < p.dv)
            v = t < p.tqv ? packed_value(p, bh, t, 0, 0, c)
                          : __half2float(p.v_res[(bh * nrv + (t - p.tqv)) * p.dv + c]);
          v_s[j][c] = __float2half_rn(v);
        }
      }
      __syncthreads();  // p_s and v_s complete
#pragma unroll
      for (int i = 0; i < kRowsPerWarp; ++i)
#pragma unroll
        for (int k = 0; k < kVSlots; ++k) acc[i][k] *= alpha[i];
      for (int j = 0; j < tn; ++j) {
        float vv[kVSlots];
#pragma unroll
        for (int k = 0; k < kVSlots; ++k) vv[k] = (32 * k < p.dv) ? __half2float(v_s[j][lane + 32 * k]) : 0.f;
#pragma unroll
        for (int i = 0; i < kRowsPerWarp; ++i) {
          const int r = warp + kWarps * i;
          if (r < rows) {
            const float pj = p_s[r][j];  // warp broadcast
#pragma unroll
            for (int k = 0; k < kVSlots; ++k) acc[i][k] = fmaf(pj, vv[k], acc[i][k]);
          }
        }
      }
    }
    // epilogue of the row block
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
      const int r = warp + kWarps * i;
      if (r >= rows) continue;
      const int row = r0 + r;
      if (p.splits == 1) {
        float* o = p.out + (bh * p.m + row) * p.dv;
#pragma unroll
        for (int k = 0; k < kVSlots; ++k) {
          const int c = lane + 32 * k;
          if (c < p.dv) o[c] = l_i[i] > 0.f ? acc[i][k] / l_i[i] : 0.f;
        }
      } else {
        const int64_t prow = (bh * p.splits + split) * p.m + row;
        float* wa = p.ws + prow * p.dv;
#pragma unroll
        for (int k = 0; k < kVSlots; ++k) {
          const int c = lane + 32 * k;
          if (c < p.dv) wa[c] = acc[i][k];
        }
        if (lane == 0) {
          float* ml = p.ws + p.bh * p.splits * p.m * p.dv + 2 * prow;
          ml[0] = m_i[i];
          ml[1] = l_i[i];
        }
      }
    }
  }
}

// Flash-decoding merge: element e = row * DV + c of bh = blockIdx.x; grid (BH, ceil(M DV / 256)).
__global__ void __launch_bounds__(kThreads) vidkv_merge_kernel(const KParams p) {
  const int64_t bh = blockIdx.x;
  const int e = blockIdx.y * kThreads + threadIdx.x;
  if (e >= p.m * p.dv) return;
  const int row = e / p.dv, c = e - row * p.dv;
  const float* ml = p.ws + p.bh * p.splits * p.m * p.dv;
  float mx = -INFINITY;
  for (int s = 0; s < p.splits; ++s) mx = fmaxf(mx, ml[2 * ((bh * p.splits + s) * p.m + row)]);
  float num = 0.f, den = 0.f;
  if (mx != -INFINITY) {
    for (int s = 0; s < p.splits; ++s) {
      const int64_t prow = (bh * p.splits + s) * p.m + row;
      const float l = ml[2 * prow + 1];
      if (l > 0.f) {  // empty splits (m = -inf, l = 0) contribute nothing
        const float w = exp2f(ml[2 * prow] - mx);
        num = fmaf(p.ws[prow * p.dv + c], w, num);
        den = fmaf(l, w, den);
      }
    }
  }
  p.out[(bh * p.m + row) * p.dv + c] = den > 0.f ? num / den : 0.f;
}

// ---- launch geometry, shared by the host launcher and the CPU emulation (host code) ----
inline KParams make_kparams(const vopt_vidkv_decode_params& a) {
  KParams p;
  p.q = static_cast<const __half*>(a.q);
  p.qa = static_cast<const __half*>(a.qa);
  p.qb = static_cast<const __half*>(a.qb);
  p.ka_words = a.ka_words;
  p.ka_scale = a.ka_scale;
  p.ka_zero = a.ka_zero;
  p.kb_words = a.kb_words;
  p.kb_scale = a.kb_scale;
  p.kb_zero = a.kb_zero;
  p.k_res = static_cast<const __half*>(a.k_res);
  p.v_words = a.v_words;
  p.v_scale = a.v_scale;
  p.v_zero = a.v_zero;
  p.v_res = static_cast<const __half*>(a.v_res);
  p.out = a.out;
  p.ws = a.workspace;
  p.bh = a.bh;
  p.m = static_cast<int>(a.m);
  p.d = static_cast<int>(a.d);
  p.dv = static_cast<int>(a.dv);
  p.ka = static_cast<int>(a.ka);
  p.kb = static_cast<int>(a.kb);
  p.tqk = static_cast<int>(a.tqk);
  p.tqv = static_cast<int>(a.tqv);
  p.n = static_cast<int>(a.n);
  p.gk = static_cast<int>(a.gk);
  p.gv = static_cast<int>(a.gv);
  p.ngk = p.tqk / p.gk;
  p.ngv = p.tqv / p.gv;
  p.dv_groups = p.dv / p.gv;
  p.ntiles = (p.n + kTileN - 1) / kTileN;
  p.splits = static_cast<int>(a.splits);
  p.tiles_per_split = (p.ntiles + p.splits - 1) / p.splits;
  p.qk_scale = a.qk_scale;
  p.meta_dtype = a.meta_dtype;
  p.kb_pm = a.kb_pm;
  p.v_per_token = a.v_per_token;
  p.v_codec = a.v_codec;
  p.v_has_scale = a.v_has_scale;
  return p;
}

// Grids: decode (BH, splits); merge (BH, ceil(M DV / 256)) (splits > 1 only). Both kThreads threads per CTA.
inline void grid_dims(const KParams& p, unsigned decode[3], unsigned merge[3]) {
  decode[0] = static_cast<unsigned>(p.bh);
  decode[1] = static_cast<unsigned>(p.splits);
  decode[2] = 1;
  merge[0] = static_cast<unsigned>(p.bh);
  merge[1] = static_cast<unsigned>((p.m * p.dv + kThreads - 1) / kThreads);
  merge[2] = 1;
}
// ---- host side ----

using vopt::fail;

constexpr int64_t kMaxTokens = 2147483647LL - 2 * kTileN;  // tile * 32 + 31 stays in int32

cudaError_t check_params(const vopt_vidkv_decode_params* params) {
  if (params == nullptr) return fail(cudaErrorInvalidValue, "vidkv_decode: params is NULL");
  const vopt_vidkv_decode_params& p = *params;
  const cudaError_t E = cudaErrorInvalidValue;
  if (p.bh < 1 || p.bh > 2147483647LL)
    return fail(E, "vidkv_decode: bh=%lld; accepted: 1 .. 2^31-1 (grid.x)", (long long)p.bh);
  if (p.m < 1 || p.m > kMaxM)
    return fail(E, "vidkv_decode: m=%lld query rows per (b, kv head); accepted: 1 .. %d", (long long)p.m, kMaxM);
  if (p.d < 1 || p.d > kMaxD) return fail(E, "vidkv_decode: d=%lld; accepted: 1 .. %d", (long long)p.d, kMaxD);
  if (p.dv < 1 || p.dv > kMaxDV) return fail(E, "vidkv_decode: dv=%lld; accepted: 1 .. %d", (long long)p.dv, kMaxDV);
  if (p.n < 1 || p.n > kMaxTokens)
    return fail(E, "vidkv_decode: n=%lld tokens; accepted: 1 .. %lld", (long long)p.n, (long long)kMaxTokens);
  if (p.ka < 0 || p.kb < 0 || p.ka + p.kb > 2147483647LL)
    return fail(E, "vidkv_decode: ka=%lld, kb=%lld; accepted: >= 0 with ka + kb < 2^31", (long long)p.ka,
                (long long)p.kb);
  if (p.tqk < 0 || p.tqk > p.n)
    return fail(E, "vidkv_decode: tqk=%lld; accepted: 0 .. n=%lld", (long long)p.tqk, (long long)p.n);
  if (p.tqv < 0 || p.tqv > p.n)
    return fail(E, "vidkv_decode: tqv=%lld; accepted: 0 .. n=%lld", (long long)p.tqv, (long long)p.n);
  if (p.gk < 1 || p.gk > 2147483647LL) return fail(E, "vidkv_decode: gk=%lld; accepted: >= 1", (long long)p.gk);
  if (p.gv < 1 || p.gv > 2147483647LL) return fail(E, "vidkv_decode: gv=%lld; accepted: >= 1", (long long)p.gv);
  if (p.tqk % p.gk != 0)
    return fail(E, "vidkv_decode: tqk=%lld must be a multiple of gk=%lld (whole key groups)", (long long)p.tqk,
                (long long)p.gk);
  if (p.tqk > 0 && p.ka + p.kb == 0)
    return fail(E, "vidkv_decode: tqk=%lld packed key tokens need ka + kb >= 1 channels", (long long)p.tqk);
  if (p.meta_dtype < 0 || p.meta_dtype > 2)
    return fail(E, "vidkv_decode: meta_dtype=%d; accepted: 0 (fp16), 1 (bf16), 2 (fp32)", p.meta_dtype);
  if (p.v_codec < 0 || p.v_codec > 2)
    return fail(E, "vidkv_decode: v_codec=%d; accepted: 0 (2-bit affine), 1 (2-bit trit), 2 (base-3)", p.v_codec);
  if (p.kb_pm != 0 && p.kb_pm != 1) return fail(E, "vidkv_decode: kb_pm=%d; accepted: 0, 1", p.kb_pm);
  if (p.v_per_token != 0 && p.v_per_token != 1)
    return fail(E, "vidkv_decode: v_per_token=%d; accepted: 0, 1", p.v_per_token);
  if (p.v_has_scale != 0 && p.v_has_scale != 1)
    return fail(E, "vidkv_decode: v_has_scale=%d; accepted: 0, 1", p.v_has_scale);
  if (p.v_per_token ? p.dv % p.gv != 0 : p.tqv % p.gv != 0)
    return fail(E, "vidkv_decode: gv=%lld must divide %s=%lld", (long long)p.gv, p.v_per_token ? "dv" : "tqv",
                (long long)(p.v_per_token ? p.dv : p.tqv));
  if (p.v_codec == 0 && !p.v_has_scale)
    return fail(E, "vidkv_decode: v_codec=0 (code * s + z) needs v_has_scale=1");
  if (p.splits < 1 || p.splits > 65535)
    return fail(E, "vidkv_decode: splits=%lld; accepted: 1 .. 65535 (grid.y)", (long long)p.splits);
  if (p.q == nullptr) return fail(E, "vidkv_decode: q is NULL");
  if (p.out == nullptr) return fail(E, "vidkv_decode: out is NULL");
  if ((p.qa == nullptr) != (p.ka == 0))
    return fail(E, "vidkv_decode: qa must be NULL iff ka == 0 (ka=%lld, qa %s)", (long long)p.ka,
                p.qa ? "given" : "NULL");
  if ((p.qb == nullptr) != (p.kb == 0))
    return fail(E, "vidkv_decode: qb must be NULL iff kb == 0 (kb=%lld, qb %s)", (long long)p.kb,
                p.qb ? "given" : "NULL");
  if (p.ka > 0 && p.tqk > 0 && (!p.ka_words || !p.ka_scale || !p.ka_zero))
    return fail(E, "vidkv_decode: ka > 0 and tqk > 0 need ka_words, ka_scale and ka_zero");
  if (p.kb > 0 && p.tqk > 0 && (!p.kb_words || !p.kb_scale))
    return fail(E, "vidkv_decode: kb > 0 and tqk > 0 need kb_words and kb_scale");
  if (p.kb_pm && p.kb_zero != nullptr) return fail(E, "vidkv_decode: kb_zero must be NULL when kb_pm=1");
  if (!p.kb_pm && p.kb > 0 && p.tqk > 0 && p.kb_zero == nullptr)
    return fail(E, "vidkv_decode: kb_pm=0 (bit * s + z) needs kb_zero");
  if ((p.k_res == nullptr) != (p.n == p.tqk))
    return fail(E, "vidkv_decode: k_res must be NULL iff n == tqk (n=%lld, tqk=%lld, k_res %s)", (long long)p.n,
                (long long)p.tqk, p.k_res ? "given" : "NULL");
  if ((p.v_res == nullptr) != (p.n == p.tqv))
    return fail(E, "vidkv_decode: v_res must be NULL iff n == tqv (n=%lld, tqv=%lld, v_res %s)", (long long)p.n,
                (long long)p.tqv, p.v_res ? "given" : "NULL");
  if (p.tqv > 0 && p.v_words == nullptr) return fail(E, "vidkv_decode: tqv > 0 needs v_words");
  if (!p.v_has_scale && p.v_scale != nullptr) return fail(E, "vidkv_decode: v_scale must be NULL when v_has_scale=0");
  if (p.v_has_scale && p.tqv > 0 && p.v_scale == nullptr)
    return fail(E, "vidkv_decode: v_has_scale=1 and tqv > 0 need v_scale");
  if (p.v_codec != 0 && p.v_zero != nullptr)
    return fail(E, "vidkv_decode: v_zero must be NULL for v_codec=%d (only codec 0 has zero points)", p.v_codec);
  if (p.v_codec == 0 && p.tqv > 0 && p.v_zero == nullptr)
    return fail(E, "vidkv_decode: v_codec=0 and tqv > 0 need v_zero");
  if ((p.workspace == nullptr) != (p.splits == 1))
    return fail(E, "vidkv_decode: workspace must be given iff splits > 1 (splits=%lld, workspace %s)",
                (long long)p.splits, p.workspace ? "given" : "NULL");
  if (reinterpret_cast<uintptr_t>(p.out) % 4 != 0 || reinterpret_cast<uintptr_t>(p.workspace) % 4 != 0)
    return fail(E, "vidkv_decode: out and workspace must be 4-byte aligned (fp32)");
  return cudaSuccess;
}

// Workspace floats for splits > 1: accumulators BH * splits * M * DV plus (m, l) BH * splits * M * 2.
cudaError_t workspace_bytes(const vopt_vidkv_decode_params& p, int64_t* bytes) {
  if (p.splits == 1) {
    *bytes = 0;
    return cudaSuccess;
  }
  const int64_t per_bh = p.splits * p.m * (p.dv + 2) * 4;  // <= 65535 * 128 * 258 * 4 < 2^34
  if (p.bh > INT64_MAX / per_bh)
    return fail(cudaErrorInvalidValue, "vidkv_decode: workspace of bh=%lld x %lld bytes overflows int64",
                (long long)p.bh, (long long)per_bh);
  *bytes = p.bh * per_bh;
  return cudaSuccess;
}

}  // namespace

extern "C" {

int64_t vopt_vidkv_decode_params_size(void) { return static_cast<int64_t>(sizeof(vopt_vidkv_decode_params)); }

int vopt_vidkv_decode_workspace_bytes(const vopt_vidkv_decode_params* params, int64_t* bytes) {
  vopt::clear_error();
  if (bytes == nullptr) return static_cast<int>(fail(cudaErrorInvalidValue, "vidkv_decode: bytes is NULL"));
  // the workspace pointer itself is not known yet: check everything else with a stand-in
  if (params == nullptr) return static_cast<int>(fail(cudaErrorInvalidValue, "vidkv_decode: params is NULL"));
  vopt_vidkv_decode_params p = *params;
  p.workspace = p.splits > 1 ? reinterpret_cast<float*>(uintptr_t{16}) : nullptr;
  cudaError_t err = check_params(&p);
  if (err != cudaSuccess) return static_cast<int>(err);
  return static_cast<int>(workspace_bytes(p, bytes));
}

int vopt_vidkv_decode_fwd(const vopt_vidkv_decode_params* params, void* stream) {
  vopt::clear_error();
  cudaError_t err = check_params(params);
  if (err != cudaSuccess) return static_cast<int>(err);
  int64_t bytes = 0;
  err = workspace_bytes(*params, &bytes);
  if (err != cudaSuccess) return static_cast<int>(err);
  const KParams p = make_kparams(*params);
  unsigned g1[3], g2[3];
  grid_dims(p, g1, g2);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  vidkv_decode_kernel<<<dim3(g1[0], g1[1], g1[2]), kThreads, 0, s>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess)
    return static_cast<int>(fail(err, "vidkv_decode kernel launch failed (%s)", cudaGetErrorString(err)));
  if (p.splits > 1) {
    vidkv_merge_kernel<<<dim3(g2[0], g2[1], g2[2]), kThreads, 0, s>>>(p);
    err = cudaGetLastError();
    if (err != cudaSuccess)
      return static_cast<int>(fail(err, "vidkv_decode merge kernel launch failed (%s)", cudaGetErrorString(err)));
  }
  return cudaSuccess;
}

}  // extern "C"
