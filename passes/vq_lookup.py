"""``vq_lookup``: nearest-code searches (distances to a codebook, then ``argmin``) -> ``vopt::vq_argmin``.

What it matches. Every ``aten.argmin`` over the last dim of an fp32 distance matrix ``[N, K]`` built from
rows ``x [..., D]`` and a 2-D codebook ``c [K, D]`` in one of the forms torch.export produces for

* ``"mm"``: ``(x*x).sum(-1, keepdim=True) - 2 * (x @ c.t()) + (c*c).sum(-1)`` (E-ViLM's ``VectorQuantizer``;
  ``x**2`` for ``x*x``, ``2 * g`` either side, ``mm``/``matmul``, ``t``/``transpose``/``permute`` for ``c.t()``);
* ``"diff"``: ``((x[:, None] - c[None]) ** 2).sum(-1)`` (``x`` 2-D);
* ``"cdist"``: ``torch.cdist(x, c)`` (p=2, default ``compute_mode``; ``x`` 2-D).

The argmin becomes ``vopt::vq_argmin(x.reshape(-1, D), c, form, fallback)[0]`` (reshaped back, or unsqueezed
for ``keepdim``) and the dead distance nodes are removed. The op's reference *is* each form's expression,
so with ``fallback="batch"`` (default) codes are identical to the original graph's, ties included (see
:mod:`vopt.ops.vq_lookup` for how the fused kernel certifies rows and what happens to the others).

Skipped, with the reason: a distance matrix (or one of its ``[N, K]`` intermediates) that something else
also reads (the matrix would be built anyway), argmin over another dim, fp16/bf16 distances (the original
computes them in half precision; the op accumulates in fp32, so near-ties could flip: ``upcast_half=True``
rewrites them anyway), and expressions that look like a distance (an argmin over ``add``/``sub`` of a
``matmul``) but round differently from the three forms, e.g. ``(xx + cc) - 2g``.

Why ``default = False`` (opt-in). The rewrite is exact, and on CPU the op's only backend is the reference
(same cost as the original). The gain needs the Triton/CUDA kernels on a GPU, which are not measured yet,
and with ``fallback="batch"`` a call where any row is a near-tie pays the kernel *plus* the full reference.
Measured uncertified rows (certificate of :mod:`vopt.ops.vq_lookup`, N = 1568): Gaussian tokens and codes
1.2% (K 1024, D 256), 1.5% (K 8192, D 256), 12% (K 16384, D 1024), so such batches always fall back; tokens
near their code (code + 0.3-sigma noise, like a trained tokenizer's features) 0% at all three. Use
``vopt.optimize(model, passes=["vq_lookup"])`` and see ``tools/bench_vq.py``.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx

import vopt.ops.vq_lookup  # noqa: F401  (registers torch.ops.vopt.vq_argmin)
from vopt.config import VoptConfig, config_field, register_config
from vopt.errors import ConfigError
from vopt.ops.vq_lookup import FALLBACKS
from vopt.pass_protocol import Match, Pass, PassContext, PassKind, PassResult, StageGraph, register_pass

from ._graph import shape_of, where

aten = torch.ops.aten
ARGMIN = aten.argmin.default
VQ_ARGMIN = torch.ops.vopt.vq_argmin.default
_MATMULS = {aten.matmul.default, aten.mm.default}
_SUMS = {aten.sum.dim_IntList}
_HALF = {torch.float16, torch.bfloat16}


@register_config
@dataclass
class VqLookupConfig(VoptConfig):
    """Config of the ``vq_lookup`` pass."""

    stages: Optional[list[str]] = config_field(
        None, help="Only rewrite nearest-code searches in these stages (e.g. ['vq_tokenizer']); None: every stage."
    )
    fallback: str = config_field(
        "batch", help="What vopt::vq_argmin does with rows the fused kernel cannot certify: 'batch' (exact: the "
        "original expression on the whole call) or 'rows' (only those rows; never builds [N, K], but such rows may "
        "differ from the original where its GEMM's rounding decides them).",
    )
    upcast_half: bool = config_field(
        False, help="Also rewrite fp16/bf16 distance expressions (the op accumulates in fp32, so codes may differ "
        "from the half-precision original at near-ties).",
    )

    def validate(self) -> None:
        name = type(self).__name__
        if self.fallback not in FALLBACKS:
            raise ConfigError(f"{name}.fallback={self.fallback!r} is invalid; accepted: {list(FALLBACKS)}")
        if self.stages is not None and not (isinstance(self.stages, list) and all(isinstance(s, str) for s in self.stages)):
            raise ConfigError(f"{name}.stages must be a list of stage names or None, got {self.stages!r}")
        if not isinstance(self.upcast_half, bool):
            raise ConfigError(f"{name}.upcast_half must be a bool, got {self.upcast_half!r}")


# ---- reading the graph --------------------------------------------------------------------


def _call(node, targets) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def _val(node):
    v = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _arg(node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _is_last_dim(dims, rank: int) -> bool:
    if isinstance(dims, int):
        dims = [dims]
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and dims[0] in (-1, rank - 1)


def _square_of(node) -> Optional[torch.fx.Node]:
    """``t`` when ``node`` is ``t * t`` or ``t ** 2``."""
    if _call(node, {aten.mul.Tensor}) and len(node.args) == 2 and node.args[0] is node.args[1]:
        return node.args[0]
    if _call(node, {aten.pow.Tensor_Scalar}) and node.args[1] == 2 and isinstance(node.args[0], torch.fx.Node):
        return node.args[0]
    return None


def _sum_sq(node, keepdim: bool) -> Optional[torch.fx.Node]:
    """``t`` when ``node`` is ``(t*t).sum(-1, keepdim=keepdim)``."""
    if not _call(node, _SUMS):
        return None
    t = _square_of(node.args[0])
    v = _val(t)
    if t is None or v is None or not _is_last_dim(node.args[1], v.dim()):
        return None
    if bool(_arg(node, 2, "keepdim", False)) != keepdim or _arg(node, 3, "dtype") is not None:
        return None
    return t


def _transposed(node) -> Optional[torch.fx.Node]:
    """``c`` when ``node`` is ``c.t()`` of a 2-D ``c``."""
    if _call(node, {aten.t.default}):
        return node.args[0]
    if _call(node, {aten.transpose.int}) and sorted(d % 2 for d in node.args[1:3]) == [0, 1]:
        return node.args[0]
    if _call(node, {aten.permute.default}) and list(node.args[1]) in ([1, 0], [-1, -2], [1, -2], [-1, 0]):
        return node.args[0]
    return None


def _twice(node) -> Optional[torch.fx.Node]:
    """``g`` when ``node`` is ``2 * g`` or ``g * 2``."""
    if not _call(node, {aten.mul.Tensor}) or len(node.args) != 2:
        return None
    a, b = node.args
    if isinstance(b, (int, float)) and not isinstance(b, bool) and b == 2:
        return a if isinstance(a, torch.fx.Node) else None
    if isinstance(a, (int, float)) and not isinstance(a, bool) and a == 2:
        return b if isinstance(b, torch.fx.Node) else None
    return None


def _no_alpha(node) -> bool:
    return _arg(node, 2, "alpha", 1) == 1


def match_mm(dist) -> Optional[tuple]:
    """``(x, c, [N, K] intermediates, helper nodes)`` for ``(xx - 2 * (x @ c.t())) + cc``, else ``None``."""
    if not (_call(dist, {aten.add.Tensor}) and _no_alpha(dist)):
        return None
    sub, cc = dist.args[0], dist.args[1]
    if not (_call(sub, {aten.sub.Tensor}) and _no_alpha(sub)):
        return None
    xx, twice = sub.args[0], sub.args[1]
    g = _twice(twice)
    if not _call(g, _MATMULS):
        return None
    x, ct = g.args[0], g.args[1]
    c = _transposed(ct)
    if c is None or _sum_sq(xx, keepdim=True) is not x or _sum_sq(cc, keepdim=False) is not c:
        return None
    return x, c, [g, twice, sub, dist], [xx, xx.args[0], cc, cc.args[0], ct]


def match_diff(dist) -> Optional[tuple]:
    """``(x, c, [N, K(, D)] intermediates, helper nodes)`` for ``((x[:, None] - c[None]) ** 2).sum(-1)``, else ``None``."""
    if not _call(dist, _SUMS) or bool(_arg(dist, 2, "keepdim", False)) or _arg(dist, 3, "dtype") is not None:
        return None
    sq = dist.args[0]
    diff = _square_of(sq)
    if not (_call(diff, {aten.sub.Tensor}) and _no_alpha(diff)) or not _is_last_dim(dist.args[1], 3):
        return None
    ux, uc = diff.args[0], diff.args[1]
    if not (_call(ux, {aten.unsqueeze.default}) and ux.args[1] in (1, -2)):
        return None
    if not (_call(uc, {aten.unsqueeze.default}) and uc.args[1] in (0, -3)):
        return None
    return ux.args[0], uc.args[0], [diff, sq, dist], [ux, uc]


def match_cdist(dist) -> Optional[tuple]:
    """``(x, c, [dist], [])`` for ``torch.cdist(x, c)`` with p=2 and the default compute_mode, else ``None``."""
    if not _call(dist, {aten.cdist.default, aten._cdist_forward.default}):
        return None
    p = _arg(dist, 2, "p", 2.0)
    mode = _arg(dist, 3, "compute_mode", None)
    if p != 2 or mode is not None:
        return None
    return dist.args[0], dist.args[1], [dist], []


MATCHERS = (("mm", match_mm), ("diff", match_diff), ("cdist", match_cdist))


def _looks_like_distance(node, depth: int = 4) -> bool:
    """An add/sub tree over a matmul or cdist: a distance in a form the pass does not know."""
    if depth == 0 or not isinstance(node, torch.fx.Node) or node.op != "call_function":
        return False
    if node.target in _MATMULS or node.target in (aten.cdist.default, aten._cdist_forward.default):
        return True
    if node.target in (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.pow.Tensor_Scalar, aten.sum.dim_IntList):
        return any(_looks_like_distance(a, depth - 1) for a in node.args)
    return False


# ---- the pass -------------------------------------------------------------------------------


@register_pass
class VqLookupPass(Pass):
    name = "vq_lookup"
    summary = "nearest-code search (distances to a codebook + argmin) -> vopt::vq_argmin (fused, exact codes)"
    config_cls = VqLookupConfig
    kind = PassKind.GRAPH
    provides = frozenset({"vq:fused_argmin"})
    default = False  # opt-in: see the module docstring

    def run_graph(self, graph: StageGraph, ctx: PassContext) -> PassResult:
        cfg = self.config
        result = PassResult(self.name, graph.stage)
        g = graph.gm.graph
        for node in list(g.nodes):
            if not _call(node, {ARGMIN}):
                continue
            dist = node.args[0]
            form, found = None, None
            for name, matcher in MATCHERS:
                found = matcher(dist)
                if found is not None:
                    form = name
                    break
            site = where(graph.stage, node)
            if found is None:
                if _looks_like_distance(dist):
                    result.matches.append(Match(site, f"argmin over {shape_of(dist)} {getattr(dist, 'name', dist)}", False,
                                                "distance-like expression in none of the forms vopt::vq_argmin reproduces "
                                                "bit for bit (mm: (xx - 2*x@c.t()) + cc, diff, cdist)"))
                continue
            x, c, inner, helpers = found
            what = f"nearest code [{form}] x{shape_of(x)} codebook{shape_of(c)} -> argmin"
            reason = self._refusal(graph, node, dist, x, c, inner, form)
            if reason is not None:
                result.matches.append(Match(site, what, False, reason))
                continue
            saved = self._rewrite(g, node, x, c, inner, helpers, form)
            result.matches.append(Match(site, f"{what} -> vopt::vq_argmin(form={form!r}, fallback={cfg.fallback!r})",
                                        True, bytes_saved=float(saved)))
        return result

    def _refusal(self, graph, node, dist, x, c, inner, form) -> Optional[str]:
        cfg = self.config
        if cfg.stages is not None and graph.stage not in cfg.stages:
            return f"stage {graph.stage!r} not in VqLookupConfig.stages={cfg.stages}"
        dv, xv, cv = _val(dist), _val(x), _val(c)
        if dv is None or xv is None or cv is None:
            return "no shape/dtype metadata on the distance, x or codebook nodes"
        if not _is_last_dim(_arg(node, 1, "dim"), dv.dim()):
            return f"argmin over dim={_arg(node, 1, 'dim')} of a {dv.dim()}-D distance (the codes are the last dim)"
        if cv.dim() != 2:
            return f"codebook is {cv.dim()}-D (a shared 2-D [K, D] codebook is needed)"
        if xv.dim() < 2 or (form != "mm" and xv.dim() != 2):
            return f"x is {xv.dim()}-D (form {form!r} needs 2-D x)"
        if xv.dtype != cv.dtype:
            return f"x is {xv.dtype} but the codebook is {cv.dtype}"
        if xv.dtype in _HALF and not self.config.upcast_half:
            return (f"{str(xv.dtype).removeprefix('torch.')} distances: the original rounds in half precision, the op "
                    "accumulates in fp32 (near-ties could flip); set upcast_half=True to rewrite anyway")
        if xv.dtype not in (torch.float32,) + tuple(_HALF):
            return f"dtype {xv.dtype} (the op takes float32, float16, bfloat16)"
        if cv.shape[0] < 1 or xv.shape[-1] != cv.shape[1]:
            return f"x{list(xv.shape)} and codebook{list(cv.shape)} do not form a [N, K] distance"
        for t in inner:
            others = [u.name for u in t.users if u not in inner and u is not node]
            if others:
                return f"{t.name} (an [N, K] intermediate) is also read by {others}: the matrix would be built anyway"
        return None

    def _rewrite(self, g: torch.fx.Graph, node, x, c, inner, helpers, form) -> int:
        """Insert the op, reroute the argmin's users, erase the dead pattern; returns the bytes no longer materialized."""
        xv = _val(x)
        keepdim = bool(_arg(node, 2, "keepdim", False))
        lead = list(xv.shape[:-1])
        with g.inserting_before(node):
            x2 = x if xv.dim() == 2 else g.call_function(aten.reshape.default, (x, [-1, xv.shape[-1]]))
            fused = g.call_function(VQ_ARGMIN, (x2, c), {"form": form, "fallback": self.config.fallback})
            codes = g.call_function(operator.getitem, (fused, 0))
            out = codes
            if xv.dim() != 2:
                out = g.call_function(aten.reshape.default, (out, lead))
            if keepdim:
                out = g.call_function(aten.unsqueeze.default, (out, -1))
        node.replace_all_uses_with(out)
        out.meta = dict(node.meta)
        g.erase_node(node)
        removed = 0
        for t in reversed(inner):                         # the dead [N, K] intermediates (last first) ...
            if not t.users:
                v = _val(t)
                removed += 0 if v is None else v.numel() * v.element_size()
                g.erase_node(t)
        for t in helpers:                                 # ... then the norms / transposes only they read
            if not t.users:
                g.erase_node(t)
        return removed
