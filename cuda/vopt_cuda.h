/*
 * vopt_cuda.h - C interface of libvopt_cuda.so, vopt's standalone CUDA library.
 *
 * The library is torch-independent: Python loads it with ctypes
 * (vopt/cuda_library.py) and passes raw device pointers, sizes and the CUDA
 * stream handle as integers. Every launcher returns a cudaError_t as int
 * (0 = success); vopt_cuda_error_string() turns a status into text.
 *
 * Bump VOPT_CUDA_ABI_VERSION whenever a signature below changes, together
 * with ABI_VERSION in vopt/cuda_library.py.
 */
#ifndef VOPT_CUDA_H_
#define VOPT_CUDA_H_

#include <stdint.h>

#define VOPT_CUDA_ABI_VERSION 3

#if defined(__GNUC__)
#define VOPT_API __attribute__((visibility("default")))
#else
#define VOPT_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---- runtime / build information (runtime.cu) ---- */

/* The ABI version this library was built with (VOPT_CUDA_ABI_VERSION). */
VOPT_API int vopt_cuda_abi_version(void);

/* The CUDA runtime version linked in (e.g. 13000). Needs no driver. */
VOPT_API int vopt_cuda_runtime_version(int* out);

/* Number of visible CUDA devices; returns an error status without a driver. */
VOPT_API int vopt_cuda_device_count(int* out);

/* Human-readable name and description of a cudaError_t status. Never NULL. */
VOPT_API const char* vopt_cuda_error_string(int status);

/* The CUDA architectures compiled in, as CMake lists them (e.g. "80;89;90a"). */
VOPT_API const char* vopt_cuda_built_archs(void);

/* Why the calling thread's last failed vopt_* call failed, in words (argument checks name the argument and the
 * accepted values), or "" when that call set no message. Valid until the thread's next vopt_* call. Never NULL. */
VOPT_API const char* vopt_cuda_last_error_message(void);

/* ---- axpy (axpy.cu): out[i] = alpha * x[i] + y[i], computed in fp32 ----
 * x, y, out: contiguous device arrays of n elements; stream: a cudaStream_t
 * (NULL = legacy default stream). n == 0 returns 0 without launching. */

VOPT_API int vopt_axpy_f32(const float* x, const float* y, float* out, float alpha, int64_t n, void* stream);
/* half / bfloat16 arrays are passed as raw 16-bit storage. */
VOPT_API int vopt_axpy_f16(const void* x, const void* y, void* out, float alpha, int64_t n, void* stream);
VOPT_API int vopt_axpy_bf16(const void* x, const void* y, void* out, float alpha, int64_t n, void* stream);

/* ---- MoE grouped GEMM (moe_grouped_gemm.cu; CUTLASS grouped GEMM, fp32 accumulation) ----
 * Rows of x [m, k] are sorted by expert: expert e owns rows [offsets[e], offsets[e+1]) (offsets: device int64
 * array of num_experts + 1 non-decreasing entries, clamped to [0, m]). out [m, n] = x_rows @ w[e] (+ bias[e]);
 * w: [num_experts, k, n] row-major; bias: [num_experts, n] or NULL. Rows outside [offsets[0], offsets[E]) are
 * written as zeros. n and k must be multiples of 8 and every pointer 16-byte aligned (cudaErrorInvalidValue /
 * cudaErrorMisalignedAddress otherwise). workspace: device memory of at least
 * vopt_moe_grouped_gemm_workspace_bytes(num_experts) bytes, 16-byte aligned. m == 0 returns 0 without launching.
 * No host synchronization: the per-expert split is read on the device. */
VOPT_API int vopt_moe_grouped_gemm_workspace_bytes(int64_t num_experts, int64_t* out);
VOPT_API int vopt_moe_grouped_gemm_f16(const void* x, const void* w, const void* bias, const int64_t* offsets,
                                       void* out, int64_t m, int64_t n, int64_t k, int64_t num_experts,
                                       void* workspace, int64_t workspace_bytes, void* stream);
VOPT_API int vopt_moe_grouped_gemm_bf16(const void* x, const void* w, const void* bias, const int64_t* offsets,
                                        void* out, int64_t m, int64_t n, int64_t k, int64_t num_experts,
                                        void* workspace, int64_t workspace_bytes, void* stream);

/* ---- vq_argmin (vq_argmin.cu): fused nearest-code search ----
 * x: [n, d] row-major, codebook: [k, d] row-major, code_sq_norms: [k] fp32 ||c_j||^2 (all contiguous, on the
 * device). The codes are split into S = ceil(k / codes_per_split) ranges; for split s and row i, over the codes
 * j of that range: best[s * n + i] = min_j s_ij with s_ij = code_sq_norms[j] - 2 x_i.c_j (fp32),
 * best_idx[s * n + i] = its first index, second[s * n + i] = the smallest s_ij over the other codes of the range
 * (== best for a duplicate code); outputs are [S, n]. The [n, k] matrix is never stored. n == 0 returns 0
 * without launching; n < 0, k < 1, k > INT32_MAX, d < 1, codes_per_split < 1, S > 65535 or a NULL pointer
 * return cudaErrorInvalidValue. fp16/bf16 inputs are raw 16-bit storage. */
VOPT_API int vopt_vq_argmin_f32(const float* x, const float* codebook, const float* code_sq_norms, float* best,
                                int32_t* best_idx, float* second, int64_t n, int64_t k, int64_t d,
                                int64_t codes_per_split, void* stream);
VOPT_API int vopt_vq_argmin_f16(const void* x, const void* codebook, const float* code_sq_norms, float* best,
                                int32_t* best_idx, float* second, int64_t n, int64_t k, int64_t d,
                                int64_t codes_per_split, void* stream);
VOPT_API int vopt_vq_argmin_bf16(const void* x, const void* codebook, const float* code_sq_norms, float* best,
                                 int32_t* best_idx, float* second, int64_t n, int64_t k, int64_t d,
                                 int64_t codes_per_split, void* stream);

/* ---- SageAttention2 (sage_quant.cu, sage_attn.cu, sage_attn_mma.cu, sage_attn_wgmma.cu) ----
 *
 * Numerics: vopt/ops/sage_reference.py (the oracle) and shared/specs/attention.md section 1. Quantize Q, K and V
 * with the vopt_sage_quant_* launchers, then run vopt_sage_attn_fwd on the codes. Shapes are [B, H, L, D];
 * Hq = heads of Q, Hkv = heads of K/V (GQA: query head h reads KV head h / (Hq / Hkv)).
 *
 * Padded layouts (every code/scale buffer below is contiguous and written whole by its quantizer):
 *   L_pad(L) = ceil(L / 128) * 128 rows; D_pad in {64, 128} channels (D <= D_pad; channels >= D are code 0).
 *   Q codes  int8 [B, Hq, L_pad(Lq), D_pad] (bits 8) or packed int4 [B, Hq, L_pad(Lq), D_pad / 2] (bits 4: byte j
 *            holds channel 2j in its low nibble and 2j+1 in its high nibble, two's complement).
 *   K codes  the same with [B, Hkv, L_pad(Lk), ...]. Rows >= L are code 0.
 *   Q scale  fp32, already multiplied by sm_scale_log2 (scores are exp2-domain):
 *            per-thread [B, Hq, L_pad(Lq) / 32, 8]: row r uses index (r / 32) * 8 + r % 8;
 *            per-block  [B, Hq, L_pad(Lq) / 128]:   row r uses index r / 128.
 *   K scale  fp32, per-thread [B, Hkv, L_pad(Lk) / 64, 4]: key n uses index (n / 64) * 4 + (n % 8) / 2;
 *            per-block [B, Hkv, L_pad(Lk) / 64]: key n uses index n / 64.
 *            A group holding no real row has scale 1 (x sm_scale_log2 for Q); padded rows never enter an amax.
 *   qm       fp32 [B, Hq, L_pad(Lq) / 128, D_pad]: the mean of the real rows of each 128-row Q block (Q smoothing).
 *   V (fp8)  e4m3 [B, Hkv, D_pad, L_pad(Lk)] (V transposed), keys permuted inside every 16-key group to match the
 *            FP8 MMA A/B fragments: position p of a group holds key perm16[p % 16] of that group, perm16 =
 *            {0,1,8,9,2,3,10,11,4,5,12,13,6,7,14,15}. Keys >= Lk and channels >= D are 0.
 *   V scale  fp32 [B, Hkv, D_pad] (channels >= D: 1). V mean: fp32 [B, Hkv, D] (the smoothing input) and
 *            [B, Hkv, D_pad] in the attention params (channels >= D: 0).
 *   V (fp16) fp16 [B, Hkv, L_pad(Lk), D_pad] (V rounded to fp16, minus the V mean if smoothed), rows >= Lk zero.
 *
 * Rounding (bit-exact with the reference): scale = amax / qmax in fp32 (IEEE division; 1 where amax == 0),
 * code = clamp(rint(x / scale), -qmax, qmax) with round-half-even, qmax = 127 (bits 8) or 7 (bits 4); x is the
 * fp32 input minus the given mean (fp32 subtraction). FP8: e4m3 = satfinite-RNE(clamp(x / scale, -448, 448)),
 * scale = amax / 448. Inputs: fp16/bf16 with element strides sb, sh, sl for B, H, L and unit stride along D. */
#define VOPT_SAGE_PER_THREAD 0
#define VOPT_SAGE_PER_BLOCK 1
#define VOPT_SAGE_PV_FP8 0
#define VOPT_SAGE_PV_FP16 1
#define VOPT_SAGE_KERNEL_AUTO 0
#define VOPT_SAGE_KERNEL_MMA 1   /* mma.sync: sm_80+ (FP8 PV needs sm_89+) */
#define VOPT_SAGE_KERNEL_WGMMA 2 /* wgmma + TMA, warp-specialized: sm_90a only, INT8 QK + FP8 PV */

/* Mean over L per (b, h, channel), fp32 [B, H, D] (K smoothing km, V smoothing vm). */
VOPT_API int vopt_sage_channel_mean_f16(const void* x, int64_t sb, int64_t sh, int64_t sl, int64_t batch,
                                        int64_t heads, int64_t len, int64_t dim, float* mean, void* stream);
VOPT_API int vopt_sage_channel_mean_bf16(const void* x, int64_t sb, int64_t sh, int64_t sl, int64_t batch,
                                         int64_t heads, int64_t len, int64_t dim, float* mean, void* stream);

/* Q: optional smoothing (smooth = 1: subtract each 128-row block's mean, written to qm) then symmetric per-group
 * quantization (granularity VOPT_SAGE_PER_THREAD with 32-row warps, or VOPT_SAGE_PER_BLOCK with 128-row blocks).
 * qm may be NULL only when smooth == 0. */
VOPT_API int vopt_sage_quant_q_f16(const void* x, int64_t sb, int64_t sh, int64_t sl, int64_t batch, int64_t heads,
                                   int64_t len, int64_t dim, int64_t dim_pad, int32_t bits, int32_t granularity,
                                   int32_t smooth, float sm_scale_log2, void* codes, float* scale, float* qm,
                                   void* stream);
VOPT_API int vopt_sage_quant_q_bf16(const void* x, int64_t sb, int64_t sh, int64_t sl, int64_t batch, int64_t heads,
                                    int64_t len, int64_t dim, int64_t dim_pad, int32_t bits, int32_t granularity,
                                    int32_t smooth, float sm_scale_log2, void* codes, float* scale, float* qm,
                                    void* stream);
/* K: x - km (km: fp32 [B, H, D] or NULL for no smoothing), symmetric per-group quantization (64-key groups). */
VOPT_API int vopt_sage_quant_k_f16(const void* x, int64_t sb, int64_t sh, int64_t sl, int64_t batch, int64_t heads,
                                   int64_t len, int64_t dim, int64_t dim_pad, int32_t bits, int32_t granularity,
                                   const float* km, void* codes, float* scale, void* stream);
VOPT_API int vopt_sage_quant_k_bf16(const void* x, int64_t sb, int64_t sh, int64_t sl, int64_t batch, int64_t heads,
                                    int64_t len, int64_t dim, int64_t dim_pad, int32_t bits, int32_t granularity,
                                    const float* km, void* codes, float* scale, void* stream);
/* V: x - vm (vm: fp32 [B, H, D] or NULL), per-channel E4M3 into the transposed, permuted fp8 layout above. */
VOPT_API int vopt_sage_quant_v_fp8_f16(const void* x, int64_t sb, int64_t sh, int64_t sl, int64_t batch,
                                       int64_t heads, int64_t len, int64_t dim, int64_t dim_pad, const float* vm,
                                       void* v_fp8, float* scale, void* stream);
VOPT_API int vopt_sage_quant_v_fp8_bf16(const void* x, int64_t sb, int64_t sh, int64_t sl, int64_t batch,
                                        int64_t heads, int64_t len, int64_t dim, int64_t dim_pad, const float* vm,
                                        void* v_fp8, float* scale, void* stream);

/* Attention on quantized operands. Every pointer is a device pointer; all buffers use the layouts above. */
typedef struct vopt_sage_attn_params {
  const void* q;         /* Q codes */
  const void* k;         /* K codes */
  const float* q_scale;  /* Q scales (granularity layout, x sm_scale_log2) */
  const float* k_scale;  /* K scales */
  const float* delta_s;  /* NULL, or fp32 [B, Hq, L_pad(Lq) / 128, L_pad(Lk)]: qm . (K - km)^T * sm_scale_log2, added
                            to the scores of every row of the 128-row Q block (Q smoothing) */
  const void* v;         /* V: fp8 layout (pv VOPT_SAGE_PV_FP8) or fp16 layout (VOPT_SAGE_PV_FP16) */
  const float* v_scale;  /* fp32 [B, Hkv, D_pad] for fp8 PV; NULL for fp16 PV */
  const float* v_mean;   /* NULL, or fp32 [B, Hkv, D_pad] added to the output (V smoothing) */
  void* out;             /* [B, Hq, Lq, out_dim] fp16 or bf16 (out_dtype); element strides below, unit along D.
                            Every element of rows < Lq and channels < out_dim is written; nothing else is. */
  float* lse_log2;       /* NULL, or fp32 [B, Hq, Lq] contiguous: log2 sum_j exp2(S2_ij) of the smoothed
                            exp2-domain scores (-inf for a row that sees no key) */
  int64_t out_stride_b, out_stride_h, out_stride_l;
  int64_t batch, heads_q, heads_kv, len_q, len_k;
  int64_t head_dim;      /* D_pad: 64 or 128 */
  int64_t out_dim;       /* 1..head_dim channels written to out */
  int32_t qk_bits;       /* 8 or 4 */
  int32_t granularity;   /* VOPT_SAGE_PER_THREAD or VOPT_SAGE_PER_BLOCK */
  int32_t pv;            /* VOPT_SAGE_PV_FP8 or VOPT_SAGE_PV_FP16 */
  int32_t two_level;     /* fp8 PV: 1 = each 64-key tile's PV in a fresh accumulator added into the fp32 one */
  int32_t causal;        /* 1 = bottom-right aligned: query i sees keys j <= i + Lk - Lq */
  int32_t out_dtype;     /* 0 = fp16, 1 = bf16 */
  int32_t kernel;        /* VOPT_SAGE_KERNEL_AUTO / _MMA / _WGMMA */
  int32_t reserved;      /* must be 0 */
} vopt_sage_attn_params;

/* The size of vopt_sage_attn_params this library was built with (callers check it against their own). */
VOPT_API int64_t vopt_sage_attn_params_size(void);
/* Which kernel vopt_sage_attn_fwd would run for params on the current device: writes VOPT_SAGE_KERNEL_MMA or
 * _WGMMA to *kernel, or returns an error (cudaErrorInvalidValue: bad params; cudaErrorNotSupported: this
 * device/precision has no kernel), with vopt_cuda_last_error_message() saying why. */
VOPT_API int vopt_sage_attn_select(const vopt_sage_attn_params* params, int32_t* kernel);
/* Run attention. Arguments are checked before any CUDA call (so bad params fail the same way with no GPU). */
VOPT_API int vopt_sage_attn_fwd(const vopt_sage_attn_params* params, void* stream);

/* ---- block-sparse masked attention (block_sparse_attn.cu): exact fp16/bf16 attention that skips dead tiles ----
 *
 * out[b, h, i] = softmax_j(q_i . k_j * scale over the visible keys j) . v, fp32 accumulation (P rounded to the input
 * dtype for the PV MMA, as FlashAttention-2 does); a row that sees no key is written as 0. Key j is visible to row i
 * when j < len_k, block_mask[(i / block_q) * nkb + j / block_k] != 0 (nkb = ceil(len_k / block_k)) and, if
 * dense_mask is given, dense_mask[b * dm_sb + h * dm_sh + i * dm_sq + j * dm_sk] != 0 (strides in elements of one
 * byte; 0 broadcasts). The kernel works on its own 64 x 64 tiles: tiles [ceil(len_q / 64), ceil(len_k / 64)] says
 * per kernel tile 0 = dead (never read: its keys are invisible to its rows), 1 = partial (apply the rule above per
 * element), 2 = full (every key < len_k is visible to every row: no mask is read). tiles must be consistent with
 * the rule (the host builds it from block_mask; 2 only without a dense mask).
 * q [B, H, Lq, head_dim], k [B, H, Lk, head_dim], v [B, H, Lk, value_dim], out [B, H, Lq, value_dim]: fp16 or bf16
 * (dtype 0 / 1), element strides (b, h, l) per tensor, unit stride along the last dim; q, k, v 16-byte aligned with
 * row strides that are multiples of 8 elements. head_dim and value_dim: multiples of 8, at most 128. */
typedef struct vopt_block_sparse_attn_params {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  const uint8_t* tiles;       /* kernel-tile classes, [ceil(len_q / 64), ceil(len_k / 64)] row-major */
  const uint8_t* block_mask;  /* [ceil(len_q / block_q), ceil(len_k / block_k)] row-major, 1 = live */
  const uint8_t* dense_mask;  /* NULL or the element mask (1 = visible), strides below */
  int64_t q_sb, q_sh, q_sl, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, o_sb, o_sh, o_sl;
  int64_t dm_sb, dm_sh, dm_sq, dm_sk;
  int64_t batch, heads, len_q, len_k, head_dim, value_dim, block_q, block_k;
  float scale;                /* softmax scale (e.g. 1/sqrt(head_dim)) */
  int32_t dtype;              /* 0 = fp16, 1 = bf16 */
} vopt_block_sparse_attn_params;

/* The size of vopt_block_sparse_attn_params this library was built with. */
VOPT_API int64_t vopt_block_sparse_attn_params_size(void);
/* Run it (arguments checked before any CUDA call; needs sm_80+). */
VOPT_API int vopt_block_sparse_attn_fwd(const vopt_block_sparse_attn_params* params, void* stream);

/* ---- VidKV / KIVI packed decode attention (vidkv_decode.cu) ----
 *
 * Decode attention that reads a packed KV cache directly (no dequantized K/V in memory): the CUDA twin of the
 * Triton kernel vopt/kernels/vidkv_decode.py. Operand layouts, index arithmetic and numerics are specified in
 * vopt/kvcache/fused_decode_args.py (the host prepares them identically for both kernels): rows m < M of
 * (bh = b * Hkv + h), tokens t < N; keys: 2-bit anomalous channels (qa . dequant), 1-bit easy channels in the
 * frequency domain (qb . dequant), fp16 residual for t >= TQK (q . k_res); values: 2-bit affine / 2-bit trit /
 * base-3, per token or per channel, fp16 residual for t >= TQV. Dequantized K and V values and P are rounded to
 * fp16 before their products; scores (x qk_scale, exp2 domain), online softmax and accumulation are fp32;
 * out = acc / l, fp32 [BH, M, DV]. The tokens may be split into `splits` ranges run by separate CTAs (partial
 * max, sum and accumulator in `workspace`) and merged by a second kernel. */
typedef struct vopt_vidkv_decode_params {
  const void* q;          /* fp16 [BH, M, D] */
  const void* qa;         /* fp16 [BH, M, KA]; NULL iff KA == 0 */
  const void* qb;         /* fp16 [BH, M, KB]; NULL iff KB == 0 */
  const int32_t* ka_words;
  const void* ka_scale;   /* [BH, NGK, KA], metadata dtype */
  const void* ka_zero;
  const int32_t* kb_words;
  const void* kb_scale;   /* [BH, NGK, KB] */
  const void* kb_zero;    /* NULL when kb_pm */
  const void* k_res;      /* fp16 [BH, N - TQK, D]; NULL iff N == TQK */
  const void* v_words;    /* int32 words (v_codec 0, 1) or bytes (v_codec 2) */
  const void* v_scale;    /* NULL iff !v_has_scale */
  const void* v_zero;     /* v_codec 0 only */
  const void* v_res;      /* fp16 [BH, N - TQV, DV]; NULL iff N == TQV */
  float* out;             /* fp32 [BH, M, DV] */
  float* workspace;       /* splits > 1: vopt_vidkv_decode_workspace_bytes bytes (fp32-aligned); else NULL */
  int64_t bh, m, d, dv, ka, kb, tqk, tqv, n, gk, gv;
  int64_t splits;         /* >= 1 */
  float qk_scale;         /* softmax scale * log2(e) */
  int32_t meta_dtype;     /* scales and zero points: 0 = fp16, 1 = bf16, 2 = fp32 */
  int32_t kb_pm;          /* 1: easy keys (2 bit - 1) * s; 0: bit * s + z */
  int32_t v_per_token;    /* 1: value groups along channels (KIVI); 0: along tokens (VidKV) */
  int32_t v_codec;        /* 0: 2-bit code * s + z; 1: 2-bit (code - 1) [* s]; 2: base-3 (digit - 1) [* s] */
  int32_t v_has_scale;
} vopt_vidkv_decode_params;

VOPT_API int64_t vopt_vidkv_decode_params_size(void);
/* Bytes of workspace the call needs (0 when splits == 1). */
VOPT_API int vopt_vidkv_decode_workspace_bytes(const vopt_vidkv_decode_params* params, int64_t* bytes);
/* Run it (arguments checked before any CUDA call). */
VOPT_API int vopt_vidkv_decode_fwd(const vopt_vidkv_decode_params* params, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* VOPT_CUDA_H_ */
