"""ONNX lowerings of today's vopt ops (registered in :mod:`vopt.engine.onnx_registry`).

* ``vopt::attention`` (exact) -> one opset-23 ``Attention`` node (ORT 1.32 CPU runs it),
  plus the op's own convention for rows whose keys are all masked out: zeros
  (``Where(row_alive, out, 0)``; ONNX leaves such rows undefined). A causal flag
  combined with a mask is folded into the mask (``j <= i``, top-left, as SDPA).
  Inputs that are not 4-D ``[B, H, L, D]`` lower to ``MatMul``/``Softmax`` with the same rules.
* ``vopt::block_sparse_attention`` (exact) -> the element mask rebuilt from the
  block mask (``Gather`` of the block rows/columns of each position, ``And`` the
  dense mask), then ``MatMul``/``Softmax`` with dead rows zeroed. ONNX has no
  block-sparse attention, so the engine computes the dead tiles too: same numbers,
  none of the speed.
* ``vopt::sage_attention`` is **refused**: its numerics (per-block INT8 Q/K with
  K smoothing, FP8 e4m3 P and V with a static P scale, two-level accumulation)
  would need in-graph FP8 rounding of softmax probabilities; lowering it to
  exact attention, or to QuantizeLinear/MatMulInteger INT8-QK alone, changes the
  numbers beyond the op's reference (FP8 rounding of P and V alone moves rel-L1 by
  ~0.035), so an ONNX engine would not compute what the optimized model computes.
  Build pt2 or aoti for SageAttention2 models.
* ``vopt::grouped_gemm`` (exact) -> each row's expert from the offsets (``ReduceSum(offsets[1:] <= row)``), its
  weight matrix gathered (``Gather(w, expert)``: ``[M, K, N]``, the memory a grouped GEMM avoids), a batched
  ``MatMul`` in fp32, the bias gathered the same way, rows outside ``offsets[0]:offsets[E]`` zeroed. ONNX has no
  grouped GEMM: same numbers, none of the speed.
* ``vopt::vq_argmin`` -> the op's reference expression for its ``form`` (``mm``: ``ReduceSum(x*x) - 2 x c^T +
  ReduceSum(c*c)``; ``diff``; ``cdist``: ``Sqrt`` of the clamped ``mm`` form) in fp32, then ``ArgMin`` (first
  index on ties) and the minimum. The ``[N, K]`` distances are built (no fused argmin in ONNX). Codes equal the
  reference's except on rows whose two best distances lie within fp32 rounding of each other (onnxruntime sums in
  another order); the engine's validation compares the codes exactly on its stored inputs.
* ``aten._is_all_true`` (from transformers' placeholder checks in VLM glue) ->
  ``Cast(ReduceMin(Cast(x, int32)), bool)``.
"""
from __future__ import annotations

import math

from .onnx_registry import refuse_onnx, register_onnx_translation

_BOOL, _INT64, _FLOAT = 9, 7, 1


def _attention_translation():
    from onnxscript import opset23 as op

    def _causal_allowed(q, k):
        lq = op.Shape(q, start=-2, end=-1)
        lk = op.Shape(k, start=-2, end=-1)
        zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
        rows = op.Unsqueeze(op.Range(zero, op.Squeeze(lq), one), [-1])
        cols = op.Unsqueeze(op.Range(zero, op.Squeeze(lk), one), [0])
        return op.LessOrEqual(cols, rows)  # [Lq, Lk], True = visible (top-left, like SDPA)

    def _fold(q, k, attn_mask, is_causal):
        """(mask or None, is_bool): the causal flag folded into the mask when both are given."""
        if attn_mask is None:
            return None, False
        is_bool = attn_mask.dtype is not None and attn_mask.dtype.name == "BOOL"
        if is_causal:
            allowed = _causal_allowed(q, k)
            if is_bool:
                attn_mask = op.And(attn_mask, allowed)
            else:
                neg_inf = op.CastLike(op.Constant(value_float=-math.inf), attn_mask)
                attn_mask = op.Where(allowed, attn_mask, neg_inf)
        return attn_mask, is_bool

    def _row_alive(mask, is_bool):
        if is_bool:
            return op.Cast(op.ReduceMax(op.Cast(mask, to=_FLOAT), [-1], keepdims=1), to=_BOOL)
        neg_inf = op.CastLike(op.Constant(value_float=-math.inf), mask)
        return op.Greater(op.ReduceMax(mask, [-1], keepdims=1), neg_inf)

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        mask, is_bool = _fold(query, key, attn_mask, is_causal)
        causal_attr = 1 if (is_causal and mask is None) else 0
        rank = len(query.shape) if query.shape is not None else None
        if rank == 4:
            if mask is not None:
                # onnxruntime wants the mask's query dim to be Lq (no size-1 broadcast there, e.g. BERT's [B,1,1,S]).
                lq_lk = op.Concat(op.Shape(query, start=-2, end=-1), op.Shape(key, start=-2, end=-1), axis=0)
                mask = op.Expand(mask, lq_lk)
            kwargs = {"is_causal": causal_attr}
            if scale is not None:
                kwargs["scale"] = float(scale)
            out = op.Attention(query, key, value, mask, **kwargs) if mask is not None else \
                op.Attention(query, key, value, **kwargs)
            if isinstance(out, (tuple, list)):
                out = out[0]
        else:
            out = _matmul_attention(op, query, key, value, mask, is_bool, causal_attr, scale,
                                    _causal_allowed if causal_attr else None)
        if mask is None:
            return out
        return op.Where(_row_alive(mask, is_bool), out, op.CastLike(op.Constant(value_float=0.0), out))

    return attention


def _matmul_attention(op, q, k, v, mask, is_bool, causal, scale, causal_allowed):
    """``softmax(q k^T * scale + mask) v`` with standard ops (fp32 math; fully masked rows give 0 via the caller)."""
    d = q.shape[-1] if q.shape is not None else None
    if scale is None:
        if not isinstance(d, int):
            raise ValueError("vopt::attention ONNX lowering needs a static head_dim when scale is None")
        scale = 1.0 / math.sqrt(d)
    qf, kf, vf = op.Cast(q, to=_FLOAT), op.Cast(k, to=_FLOAT), op.Cast(v, to=_FLOAT)
    rank = len(q.shape)
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    scores = op.Mul(op.MatMul(qf, op.Transpose(kf, perm=perm)), op.Constant(value_float=float(scale)))
    neg_inf = op.Constant(value_float=-math.inf)
    if causal_allowed is not None:
        scores = op.Where(causal_allowed(q, k), scores, neg_inf)
    if mask is not None:
        scores = op.Where(mask, scores, neg_inf) if is_bool else op.Add(scores, op.Cast(mask, to=_FLOAT))
    probs = op.Softmax(scores, axis=-1)
    if mask is not None or causal_allowed is not None:
        alive = op.Greater(op.ReduceMax(scores, [-1], keepdims=1), neg_inf)
        probs = op.Where(alive, probs, op.Constant(value_float=0.0))
    return op.CastLike(op.MatMul(probs, vf), q)


def _block_sparse_translation():
    from onnxscript import opset23 as op

    def block_sparse_attention(query, key, value, block_mask, block_q, block_k, dense_mask=None, scale=None):
        zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
        lq = op.Squeeze(op.Shape(query, start=-2, end=-1))
        lk = op.Squeeze(op.Shape(key, start=-2, end=-1))
        row_block = op.Div(op.Range(zero, lq, one), op.Constant(value_int=int(block_q)))
        col_block = op.Div(op.Range(zero, lk, one), op.Constant(value_int=int(block_k)))
        allowed = op.Gather(op.Gather(block_mask, row_block, axis=0), col_block, axis=1)  # [Lq, Lk]
        if dense_mask is not None:
            allowed = op.And(allowed, dense_mask)
        return _matmul_attention(op, query, key, value, allowed, True, 0, scale, None)

    return block_sparse_attention


def _grouped_gemm_translation():
    from onnxscript import opset23 as op

    def grouped_gemm(x, w, offsets, bias=None):
        zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
        m = op.Squeeze(op.Shape(x, start=0, end=1))
        rows = op.Range(zero, m, one)                                                    # [M]
        ends = op.Slice(offsets, op.Constant(value_ints=[1]), op.Constant(value_ints=[2 ** 62]))  # offsets[1:]
        before = op.LessOrEqual(op.Unsqueeze(ends, [0]), op.Unsqueeze(rows, [-1]))      # [M, E]: segment ended
        experts = op.Shape(w, start=0, end=1)
        expert = op.Min(op.ReduceSum(op.Cast(before, to=_INT64), [1], keepdims=0), op.Sub(experts, one))
        first = op.Gather(offsets, zero, axis=0)
        last = op.Gather(offsets, op.Squeeze(experts), axis=0)
        inside = op.And(op.GreaterOrEqual(rows, first), op.Less(rows, last))            # [M]
        w_rows = op.Cast(op.Gather(w, expert, axis=0), to=_FLOAT)                       # [M, K, N]
        out = op.Squeeze(op.MatMul(op.Unsqueeze(op.Cast(x, to=_FLOAT), [1]), w_rows), [1])
        if bias is not None:
            out = op.Add(out, op.Cast(op.Gather(bias, expert, axis=0), to=_FLOAT))
        out = op.Where(op.Unsqueeze(inside, [-1]), out, op.Constant(value_float=0.0))
        return op.CastLike(out, x)

    return grouped_gemm


def _vq_argmin_translation():
    from onnxscript import opset23 as op

    def vq_argmin(x, codebook, form: str = "mm", fallback: str = "batch"):
        xf, cf = op.Cast(x, to=_FLOAT), op.Cast(codebook, to=_FLOAT)
        if form == "diff":
            diff = op.Sub(op.Unsqueeze(xf, [1]), op.Unsqueeze(cf, [0]))
            dist = op.ReduceSum(op.Mul(diff, diff), [-1], keepdims=0)
        else:
            xx = op.ReduceSum(op.Mul(xf, xf), [-1], keepdims=1)                          # [N, 1]
            cc = op.Unsqueeze(op.ReduceSum(op.Mul(cf, cf), [-1], keepdims=0), [0])       # [1, K]
            xc = op.MatMul(xf, op.Transpose(cf, perm=[1, 0]))
            dist = op.Add(op.Sub(xx, op.Mul(xc, op.Constant(value_float=2.0))), cc)
            if form == "cdist":
                dist = op.Sqrt(op.Max(dist, op.Constant(value_float=0.0)))
        codes = op.ArgMin(dist, axis=1, keepdims=0, select_last_index=0)
        best = op.ReduceMin(dist, [1], keepdims=0)
        if form == "cdist":
            best = op.Mul(best, best)
        return codes, best

    return vq_argmin


def _is_all_true_translation():
    from onnxscript import opset18 as op

    def is_all_true(x):
        return op.Cast(op.ReduceMin(op.Cast(x, to=6), keepdims=0), to=_BOOL)

    return is_all_true


def register_all() -> None:
    """Register today's lowerings (idempotent)."""
    register_onnx_translation("vopt::attention", _attention_translation)
    register_onnx_translation("vopt::block_sparse_attention", _block_sparse_translation)
    register_onnx_translation("aten::_is_all_true", _is_all_true_translation)
    register_onnx_translation("vopt::grouped_gemm", _grouped_gemm_translation)
    register_onnx_translation("vopt::vq_argmin", _vq_argmin_translation)
    refuse_onnx("vopt::sage_attention",
                "its SageAttention2 numerics (per-block INT8 Q/K with K smoothing, FP8 e4m3 P and V) have no faithful "
                "standard-ONNX lowering (FP8 rounding of the softmax probabilities inside the graph); an exact or "
                "INT8-only lowering would change the numbers beyond the op's reference")
