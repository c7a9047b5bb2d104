"""``ccam``: causal cross-attention masks (Video-CCAM, tokens.md §7) in projectors, run block-sparse.

What it does. In the selected stages (default: stages whose adapter role is ``projector``) every
``aten.scaled_dot_product_attention`` node is a candidate site. A site is *cross-attention* when
its query length differs from its key length, or when query and key project different tensors
(walking back through view/transpose/expand/... to the ``linear`` that made each). Self-attention
sites are reported as skipped, with the reason. Cross-attention sites are then handled by ``mode``:

* ``"existing"`` (default): rewrite a site only when its ``attn_mask`` already **is** a CCAM mask,
  i.e. a bool mask that is a constant of the captured specialization (computed in the graph from
  no input, as :class:`~vopt.zoo._ccam_projector.CCAMProjector` does) and equals
  ``CCAMMask(Q, T, P, form).dense()`` for some ``P`` dividing ``K`` (or the configured
  ``tokens_per_frame`` / ``frames`` / ``form``). The site becomes
  ``torch.ops.vopt.block_sparse_attention`` with the same q/k/v/scale: the result equals the
  dense-masked SDPA (no mask semantics change). Masks that depend on the stage's inputs
  (``frames_per_video`` padding masks), float masks, ``is_causal`` and non-CCAM masks are skipped.
* ``"apply"``: impose a CCAM mask with ``tokens_per_frame`` (or ``frames``) and ``form`` on every
  cross-attention site of the selected stages whose key length is ``T * P`` with ``T >= 2``
  (keys must be frame-major: key j belongs to frame ``j // P``). An existing bool mask is
  ANDed with it; float (additive) masks are skipped. This **changes the model** (queries no
  longer see later frames): it is the opt-in way to give a non-CCAM projector CCAM's
  temporal ordering, e.g. before fine-tuning.

Execution. The block layout of a captured specialization is a constant: the pass computes
``CCAMMask.layout(block_q, block_k).live`` once and stores it on the stage's GraphModule as a
buffer (``_ccam_block_mask_<n>``, read by a ``get_attr`` node); the op compacts it per call (the
Triton backend) or loops over its live tiles (the torch reference). The element mask is passed as
``dense_mask`` only when some live tile is partial (``layout.full != layout.live``); in ``existing``
mode it is the graph's own mask node, in ``apply`` mode a second buffer (or the AND node).
One difference from SDPA: a query row that sees no key gets 0, not NaN (only possible in ``apply``
mode when an existing bool mask hides every key of frames 0..g(i)). At the full Video-CCAM shapes
(1024 queries, T x 729 keys, 64x64 tiles) the layout skips 46.8% of the tiles for T = 16, 32, 96.

Why ``default = False`` (opt-in). ``existing`` mode is exact, but on CPU the only backend of
``vopt::block_sparse_attention`` is a per-tile Python loop that is slower than one dense SDPA
call; the win (skipping ~(T-1)/(2T) of the tiles) needs the Triton kernel on a GPU. It also runs
before ``sdpa`` / ``sageattention2``; ``sageattention2`` then turns a rewritten site into
``vopt::sage_attention`` with the equivalent bool mask (quantized + masked; the sage Triton kernel
skips the dead tiles of a bool mask itself). ``apply`` mode changes the numbers and
must always be asked for. Use e.g.
``vopt.optimize(model, passes=["canonicalize_attention", "ccam"], example_inputs=...)``.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx

import vopt.ops  # noqa: F401  (registers torch.ops.vopt.*)
import vopt.ops.block_sparse_attention  # noqa: F401  (registers torch.ops.vopt.block_sparse_attention)
from vopt.config import VoptConfig, config_field, register_config
from vopt.errors import ConfigError
from vopt.ops.ccam_mask import FORMS, CCAMMask
from vopt.pass_protocol import Match, Pass, PassContext, PassKind, PassResult, StageGraph, register_pass

from ._graph import where
from .sdpa import describe, sdpa_arguments

SDPA = torch.ops.aten.scaled_dot_product_attention.default
BLOCK_SPARSE = torch.ops.vopt.block_sparse_attention.default
MODES = ("existing", "apply")
PROJECTOR_ROLE = "projector"

#: Ops a projection's output goes through before reaching attention (walked back to find the projected tensor).
_PASS_THROUGH = {
    torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default,
    torch.ops.aten.transpose.int, torch.ops.aten.permute.default, torch.ops.aten.expand.default,
    torch.ops.aten.unsqueeze.default, torch.ops.aten.squeeze.dim, torch.ops.aten.contiguous.default,
    torch.ops.aten.clone.default, torch.ops.aten.split.Tensor, torch.ops.aten.split_with_sizes.default,
    torch.ops.aten.chunk.default, torch.ops.aten.unflatten.int, torch.ops.aten.flatten.using_ints,
    torch.ops.aten.select.int, torch.ops.aten.slice.Tensor, torch.ops.aten.unbind.int,
}
_PROJECTIONS = {torch.ops.aten.linear.default, torch.ops.aten.addmm.default, torch.ops.aten.mm.default,
                torch.ops.aten.matmul.default, torch.ops.aten.bmm.default}


def _pos_int_or_none(owner: str, name: str, value) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigError(f"{owner}.{name} must be a positive integer or None, got {value!r}")


@register_config
@dataclass
class CCAMConfig(VoptConfig):
    """Config of the ``ccam`` pass."""

    mode: str = config_field(
        "existing",
        help="'existing' (exact): run cross-attention sites whose attn_mask already is a CCAM mask block-sparse; "
        "'apply' (changes the model): impose a CCAM mask (tokens_per_frame or frames, form) on every "
        "cross-attention site of the selected stages.",
    )
    stages: Optional[list[str]] = config_field(
        None, help="Stages to search for cross-attention sites; None: every stage whose adapter role is 'projector'."
    )
    tokens_per_frame: Optional[int] = config_field(
        None, help="P, keys per frame (keys are frame-major). 'apply' needs it or frames; 'existing' uses it to "
        "restrict recognition (None tries every P dividing K).",
    )
    frames: Optional[int] = config_field(
        None, help="T, frames along the key axis (P = K / T). Alternative to tokens_per_frame; both set must agree with K.",
    )
    form: Optional[str] = config_field(
        None, help="Mask form 'ceil' or 'floor' (tokens.md §7). 'apply': None means 'ceil'; 'existing': None accepts either.",
    )
    block_q: int = config_field(64, help="Query rows per tile of the block layout (Triton needs a power of two >= 16).")
    block_k: int = config_field(64, help="Keys per tile of the block layout (Triton needs a power of two >= 16).")

    def validate(self) -> None:
        name = type(self).__name__
        if self.mode not in MODES:
            raise ConfigError(f"{name}.mode={self.mode!r} is invalid; accepted: {list(MODES)}")
        if self.form is not None and self.form not in FORMS:
            raise ConfigError(f"{name}.form={self.form!r} is invalid; accepted: {list(FORMS)} or None")
        _pos_int_or_none(name, "tokens_per_frame", self.tokens_per_frame)
        _pos_int_or_none(name, "frames", self.frames)
        for field_name in ("block_q", "block_k"):
            v = getattr(self, field_name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name}.{field_name} must be a positive integer, got {v!r}")
        if self.mode == "apply" and self.tokens_per_frame is None and self.frames is None:
            raise ConfigError(f"{name}.tokens_per_frame (or {name}.frames) is required with mode='apply'")
        if self.stages is not None and not isinstance(self.stages, list):
            raise ConfigError(f"{name}.stages must be a list of stage names or None, got {self.stages!r}")


# ---- reading the graph ---------------------------------------------------------------


def _val(node):
    v = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _strip(node):
    """Walk back through view-like ops (bounded)."""
    for _ in range(64):
        if not (isinstance(node, torch.fx.Node) and node.op == "call_function"
                and (node.target in _PASS_THROUGH or node.target is operator.getitem)):
            break
        node = node.args[0]
    return node


def projected_source(node) -> Optional[torch.fx.Node]:
    """The tensor a q/k input was projected from: back through view-like ops to a projection, then to its input's source."""
    node = _strip(node)
    if isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _PROJECTIONS:
        return _strip(node.args[1] if node.target is torch.ops.aten.addmm.default else node.args[0])
    return node if isinstance(node, torch.fx.Node) else None


def _same_value(a, b, depth: int = 6) -> bool:
    """``a`` and ``b`` compute the same value: the same node, or the same op on the same arguments (bounded)."""
    if a is b:
        return True
    if not (isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node)) or depth == 0:
        return False
    if a.op != "call_function" or b.op != "call_function" or a.target is not b.target or a.kwargs != b.kwargs:
        return False
    if len(a.args) != len(b.args):
        return False
    for x, y in zip(a.args, b.args):
        if isinstance(x, torch.fx.Node) or isinstance(y, torch.fx.Node):
            if not _same_value(_strip(x), _strip(y), depth - 1):
                return False
        elif x != y:
            return False
    return True


def cross_attention_reason(q, k) -> tuple:
    """``(is_cross, why)`` for an attention's query/key nodes."""
    qv, kv = _val(q), _val(k)
    if qv is not None and kv is not None and qv.shape[-2] != kv.shape[-2]:
        return True, f"Lq={qv.shape[-2]} != Lk={kv.shape[-2]}"
    qs, ks = projected_source(q), projected_source(k)
    if qs is None or ks is None:
        return False, "cannot tell the projected tensors apart"
    if not _same_value(qs, ks):
        return True, f"q projects {qs.name}, k projects {ks.name}"
    return False, f"self-attention: q and k both project {qs.name}" + ("" if qs is ks else f" (= {ks.name})")


def constant_value(gm: torch.fx.GraphModule, node, _memo=None):
    """The value of ``node`` if it depends on no graph input (a constant of this specialization), else ``None``."""
    memo = {} if _memo is None else _memo
    if not isinstance(node, torch.fx.Node):
        return node
    if node in memo:
        return memo[node]
    if node.op == "get_attr":
        obj = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        out = obj.detach() if isinstance(obj, torch.Tensor) else obj
    elif node.op == "call_function":
        missing = []

        def load(n):
            v = constant_value(gm, n, memo)
            if v is None:
                missing.append(n)
            return v

        args = torch.fx.node.map_arg(node.args, load)
        kwargs = torch.fx.node.map_arg(node.kwargs, load)
        if missing:
            out = None
        else:
            with torch.no_grad():
                out = node.target(*args, **kwargs)
    else:  # placeholder, call_module, ...: depends on the inputs
        out = None
    memo[node] = out
    return out


def as_2d_bool(mask: torch.Tensor) -> Optional[torch.Tensor]:
    """A bool ``[Q, K]`` view of a mask equal over all its leading dims, else ``None``."""
    if mask.dtype != torch.bool or mask.dim() < 2:
        return None
    flat = mask.reshape(-1, *mask.shape[-2:])
    if not bool((flat == flat[:1]).all()):
        return None
    return flat[0]


def recognise_ccam(mask: torch.Tensor, cfg: CCAMConfig) -> tuple:
    """``(CCAMMask, None)`` if bool ``mask [Q, K]`` equals a CCAM mask allowed by ``cfg``, else ``(None, why)``."""
    q, k = mask.shape
    counts = mask.sum(dim=-1)
    if not torch.equal(mask, torch.arange(k)[None, :] < counts[:, None]):
        return None, "attn_mask is not a key-prefix mask (not CCAM)"
    if cfg.tokens_per_frame is not None:
        ps = [cfg.tokens_per_frame]
    elif cfg.frames is not None:
        ps = [k // cfg.frames] if k % cfg.frames == 0 else []
    else:
        ps = [p for p in range(k, 0, -1) if k % p == 0]   # fewest frames first
    forms = [cfg.form] if cfg.form else list(FORMS)
    for p in ps:
        if k % p:
            continue
        for form in forms:
            cand = CCAMMask(q, k // p, p, form)
            if torch.equal(cand.keys_visible(), counts.to(torch.long)):
                return cand, None
    return None, f"attn_mask is a key-prefix mask but no CCAM mask (P in {ps[:6]}{'...' if len(ps) > 6 else ''}, forms {forms}) equals it"


# ---- the pass --------------------------------------------------------------------------


@register_pass
class CCAMPass(Pass):
    name = "ccam"
    summary = "projector cross-attention with a causal cross-attention (CCAM) mask -> vopt::block_sparse_attention"
    config_cls = CCAMConfig
    kind = PassKind.GRAPH
    provides = frozenset({"attention:ccam_block_sparse"})
    after = ("canonicalize_attention",)
    before = ("sdpa", "sageattention2")
    default = False  # opt-in: see the module docstring

    def _selected(self, graph: StageGraph) -> bool:
        if self.config.stages is not None:
            return graph.stage in self.config.stages
        return str(getattr(graph.role, "value", graph.role)) == PROJECTOR_ROLE

    def run_graph(self, graph: StageGraph, ctx: PassContext) -> PassResult:
        cfg = self.config
        result = PassResult(self.name, graph.stage)
        if not self._selected(graph):
            return result
        gm, g = graph.gm, graph.gm.graph
        memo: dict = {}
        for node in list(g.nodes):
            if node.op != "call_function" or node.target is not SDPA:
                continue
            a = sdpa_arguments(node)
            site, what = where(graph.stage, node), describe(node)
            q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
            qv, kv = _val(q), _val(k)
            is_cross, why_cross = cross_attention_reason(q, k)
            plan, reason = None, None
            if not is_cross:
                reason = f"not cross-attention ({why_cross})"
            elif a["dropout_p"] != 0.0:
                reason = f"dropout_p={a['dropout_p']} (training graph)"
            elif a["is_causal"]:
                reason = "is_causal=True (a causal self-attention pattern, not a CCAM cross-attention mask)"
            elif a["enable_gqa"] or qv is None or kv is None or qv.dim() != 4 or qv.shape[:2] != kv.shape[:2]:
                reason = "needs q/k/v [B, H, L, D] with equal heads (vopt::block_sparse_attention has no GQA)"
            elif cfg.mode == "existing":
                plan, reason = self._plan_existing(gm, mask, qv, kv, memo)
            else:
                plan, reason = self._plan_apply(gm, mask, qv, kv, memo)
            if reason is not None:
                result.matches.append(Match(site, f"{what} ({why_cross})" if is_cross else what, rewritten=False, reason=reason))
                continue
            ccam, dense_node_or_tensor = plan
            lay = ccam.layout(cfg.block_q, cfg.block_k)
            skipped = 1.0 - lay.live_fraction
            needs_dense = isinstance(dense_node_or_tensor, tuple) or not torch.equal(lay.full, lay.live)
            idx = 0
            while hasattr(gm, f"_ccam_block_mask_{idx}"):
                idx += 1
            bm_name = f"_ccam_block_mask_{idx}"
            gm.register_buffer(bm_name, lay.live.clone(), persistent=False)
            with g.inserting_before(node):
                bm_node = g.get_attr(bm_name)
                dense = None
                if needs_dense:
                    if isinstance(dense_node_or_tensor, torch.Tensor):
                        dm_name = f"_ccam_dense_mask_{idx}"
                        gm.register_buffer(dm_name, dense_node_or_tensor.clone(), persistent=False)
                        dense = g.get_attr(dm_name)
                    elif isinstance(dense_node_or_tensor, tuple):      # existing bool mask AND the CCAM mask
                        existing, ccam_dense = dense_node_or_tensor
                        dm_name = f"_ccam_dense_mask_{idx}"
                        gm.register_buffer(dm_name, ccam_dense.clone(), persistent=False)
                        dense = g.call_function(torch.ops.aten.logical_and.default, (existing, g.get_attr(dm_name)))
                    else:
                        dense = dense_node_or_tensor
                new = g.call_function(BLOCK_SPARSE, args=(q, k, v, bm_node, cfg.block_q, cfg.block_k),
                                      kwargs={"dense_mask": dense, "scale": a["scale"]})
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            g.erase_node(node)
            b, h, nq, d = qv.shape
            dense_flops = 4.0 * b * h * nq * kv.shape[-2] * d
            result.matches.append(Match(
                site,
                f"{what} ({why_cross}) -> block_sparse[{cfg.mode}: CCAM Q={ccam.num_queries} T={ccam.frames} "
                f"P={ccam.tokens_per_frame} form={ccam.form}; tiles {cfg.block_q}x{cfg.block_k}: "
                f"{lay.live.numel()} total, skipped {skipped:.1%}; dense_mask={'yes' if needs_dense else 'no'}]",
                rewritten=True, flops_saved=skipped * dense_flops))
        return result

    # -- planning: (CCAMMask, dense mask: fx.Node | Tensor | (Node, Tensor) | None), or a skip reason --------

    def _plan_existing(self, gm, mask, qv, kv, memo):
        if mask is None:
            return None, "no attn_mask: nothing to run block-sparse (mode='apply' imposes a CCAM mask)"
        value = constant_value(gm, mask, memo)
        if value is None:
            return None, "attn_mask depends on the stage's inputs (e.g. a per-video padding mask): not a constant CCAM mask"
        m2 = as_2d_bool(value) if isinstance(value, torch.Tensor) else None
        if m2 is None:
            return None, "attn_mask is not a bool mask shared by every batch and head"
        if tuple(m2.shape) != (qv.shape[-2], kv.shape[-2]):
            return None, f"attn_mask [{list(m2.shape)}] is broadcast along Q or K (not a [Q, K] CCAM mask)"
        ccam, why = recognise_ccam(m2.cpu(), self.config)
        if ccam is None:
            return None, why
        return (ccam, mask), None

    def _plan_apply(self, gm, mask, qv, kv, memo):
        cfg = self.config
        nq, nk = qv.shape[-2], kv.shape[-2]
        if cfg.tokens_per_frame is not None:
            p = cfg.tokens_per_frame
            if nk % p:
                return None, f"key length {nk} is not a multiple of tokens_per_frame={p}"
            if cfg.frames is not None and cfg.frames * p != nk:
                return None, f"key length {nk} != frames={cfg.frames} x tokens_per_frame={p}"
        else:
            if nk % cfg.frames:
                return None, f"key length {nk} is not a multiple of frames={cfg.frames}"
            p = nk // cfg.frames
        t = nk // p
        if t < 2:
            return None, f"T={t} frame along the keys (frames are batched, not concatenated): CCAM is full attention, nothing to do"
        ccam = CCAMMask(nq, t, p, cfg.form or "ceil")
        dense = ccam.dense()
        if mask is None:
            return (ccam, dense), None
        mv = _val(mask)
        if mv is None or mv.dtype != torch.bool:
            return None, f"existing attn_mask is {getattr(mv, 'dtype', '?')}, not bool: combining an additive mask is not supported"
        return (ccam, (mask, dense)), None
