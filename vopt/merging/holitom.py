"""HoliTom outer-LLM token merging as pure tensor functions (no model wiring).

Spec: ``shared/specs/tokens.md`` §1 (reference: cokeshao/HoliTom, paper arXiv 2505.21334). Input: the video's
visual features ``F [T, N, D]`` *after* projector and pooling, in LLM space, without the newline token (the caller
appends LLaVA-OneVision's single ``image_newline`` after the merged tokens).

Pipeline (:func:`holitom_merge`):

1. :func:`temporal_segments` (§1.2): ``s[t, n] = cos(F[t, n], F[t+1, n])``; a position is static over ``[a, b]``
   when ``s > tau`` for every consecutive pair; gain ``G(a, b) = (b - a) * #static``; a DP over frames maximises the
   total gain (strict ``>``: ties prefer singletons and shorter windows); ``reduced`` = the optimum.
2. :func:`temporal_merge` (§1.3): in each segment of >= 2 frames, static positions become one token (mean over the
   segment's frames, provenance = (first frame, n)); the other tokens stay per frame ("dynamic").
3. :func:`spatial_merge` (§1.4) per group, to the budget: the static tokens of a segment by DPC-KNN + beta-merge;
   each frame's dynamic tokens by attention top-k (``dominant``) plus, when ``dominant_ratio > 0``, DPC-KNN
   contextual tokens over the rest. Tokens not selected or merged are dropped.
4. Output order (§1.5, "one_token"): per segment, static tokens in raster order, then dynamic tokens frame by frame in
   raster order. Each output token's position is its representative's (frame, spatial index) (rule R2).

Every output token is a linear combination of input tokens; :class:`MergeResult` carries that map in COO form
(``source_owner``, ``source_index`` = t*N + n, ``source_weight``) so ``reconstruct(F)`` reproduces ``tokens``.

Attention scores: the reference scores dynamic tokens by the attention they receive in the last kept SigLIP layer
(§1.1), which the model pass will supply via ``scores=[T, N]``. Without it, :func:`proxy_scores` uses a
feature-only stand-in (column mean of ``softmax(F_t F_t^T / sqrt(D))`` per frame) — a deviation, documented here.

Deviations from the reference (on purpose):

* ``budget_rounding='exact'`` (default) splits the budget over groups by largest remainder, so the output has exactly
  ``min(budget, T*N - reduced)`` tokens; ``'reference'`` reproduces ``ceil(n*r_eff)`` / ``round(n*r_eff)``.
* DPC-KNN ties are broken by index instead of random noise (deterministic; see :mod:`.density`).
* A budget >= T*N returns the input unchanged (the reference would still merge temporally).

Anchor numbers (spec §5-§6; recorded, **not** reproduced here): LLaVA-OV-7B, 32 frames, 196 tokens/frame, vanilla
58.4 avg (MVBench/EgoSchema/LongVideoBench/VideoMME) at 40.8 prefill TFLOPs. HoliTom at 25% retain 7.1 T -> 58.8
(100.7%); 15% 4.3 T -> 58.2 (99.7%); 10% 2.8 T (6.9% of vanilla FLOPs, with inner merging) -> 57.9 (99.1%);
outer-only ("w/o M") at 10% 3.4 T -> 57.8. TTFT 1687 -> 741 ms (2.28x), decode 29.5 -> 38.8 tok/s (1.32x).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as Fn

from .config import BudgetRounding, HoliTomConfig
from .density import cluster_merge, dpc_knn_centers, pairwise_distance

Segment = Tuple[int, int]  # inclusive frame range [a, b]


# ---------------------------------------------------------------------------------------------------------------
# helpers
def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_video(video: torch.Tensor, who: str) -> None:
    if not isinstance(video, torch.Tensor) or video.dim() != 3:
        raise ValueError(f"{who}: expected frame features of shape [F, N, D], got "
                         f"{tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__}")
    if not video.is_floating_point():
        raise ValueError(f"{who}: expected a floating-point tensor, got {video.dtype}")
    if min(video.shape) < 1:
        raise ValueError(f"{who}: every dimension of [F, N, D] must be >= 1, got {tuple(video.shape)}")


def consecutive_similarity(frame_features: torch.Tensor) -> torch.Tensor:
    """``s[t, n] = cos(F[t, n], F[t+1, n])`` for t = 0..T-2, shape [T-1, N] (fp32, or fp64 for fp64 input)."""
    x = Fn.normalize(frame_features.to(_work_dtype(frame_features)), dim=-1)
    return (x[:-1] * x[1:]).sum(-1)


# ---------------------------------------------------------------------------------------------------------------
# Stage I: temporal segmentation
@dataclass
class Segmentation:
    segments: List[Segment]     #: contiguous inclusive frame ranges covering 0..T-1 in order
    reduced: int                #: tokens removed by temporal merging (the DP optimum)
    similarity: torch.Tensor    #: [T-1, N] consecutive-frame cosine similarity


def static_counts(similarity: torch.Tensor, tau: float) -> torch.Tensor:
    """``C[a, b]`` = number of positions static over every pair in [a, b] (b >= a; C[a, a] = N), shape [T, T]."""
    T = similarity.shape[0] + 1
    N = similarity.shape[1]
    above = similarity > tau  # [T-1, N]
    # next_break[a, n] = first t >= a with s[t, n] <= tau (T-1 if none): static over [a, b] iff b <= next_break.
    t_idx = torch.arange(T - 1, device=similarity.device)[:, None].expand(T - 1, N)
    brk = torch.where(above, torch.full_like(t_idx, T - 1), t_idx)
    brk = torch.cat([brk, torch.full((1, N), T - 1, dtype=brk.dtype, device=brk.device)], 0)  # row a = T-1
    next_break = torch.flip(torch.cummin(torch.flip(brk, [0]), dim=0).values, [0])  # [T, N]
    b = torch.arange(T, device=similarity.device)
    counts = (b[None, :, None] <= next_break[:, None, :]).sum(-1)  # [T, T]
    return torch.where(b[None, :] >= b[:, None], counts, torch.zeros_like(counts))


def temporal_segments(frame_features: torch.Tensor, tau: float = 0.8, max_window: int = 1024) -> Segmentation:
    """Stage I (§1.2): globally optimal segmentation of the frames by dynamic programming."""
    _check_video(frame_features, "temporal_segments")
    T = frame_features.shape[0]
    sim = consecutive_similarity(frame_features)
    if T == 1:
        return Segmentation([(0, 0)], 0, sim)
    C = static_counts(sim, tau)
    a = torch.arange(T)
    gain = ((a[None, :] - a[:, None]).clamp_min(0) * C.cpu()).tolist()  # G[a][b] = (b - a) * C[a, b]
    best = [0] * (T + 1)  # best[i + 1] = optimum over frames 0..i (best[0] = the empty prefix)
    start = [0] * T
    for i in range(T):
        val, s = best[i], i  # singleton
        for w in range(2, min(i + 1, max_window) + 1):
            cand = best[i - w + 1] + gain[i - w + 1][i]
            if cand > val:
                val, s = cand, i - w + 1
        best[i + 1], start[i] = val, s
    segs: List[Segment] = []
    i = T - 1
    while i >= 0:
        segs.append((start[i], i))
        i = start[i] - 1
    return Segmentation(segs[::-1], best[T], sim)


# ---------------------------------------------------------------------------------------------------------------
# Stage I': temporal merge
@dataclass
class TokenMap:
    """Tokens plus their provenance as a sparse linear map from the flattened input ``F.reshape(T*N, D)``."""

    tokens: torch.Tensor         #: [M, D] in the working dtype (fp32 / fp64)
    positions: torch.Tensor      #: [M, 2] long: (frame, spatial index) of the representative
    source_owner: torch.Tensor   #: [E] long: output token of each entry
    source_index: torch.Tensor   #: [E] long: flat input index t*N + n
    source_weight: torch.Tensor  #: [E] weight (working dtype)


@dataclass
class TemporalMerge(TokenMap):
    is_static: torch.Tensor = None  #: [M] bool
    group: torch.Tensor = None      #: [M] long: spatial-merge group (one static group per segment, one per frame)
    segments: List[Segment] = field(default_factory=list)


def temporal_merge(frame_features: torch.Tensor, segments: Sequence[Segment], tau: float = 0.8,
                   similarity: Optional[torch.Tensor] = None) -> TemporalMerge:
    """Stage I' (§1.3): merge each segment's static positions into one token (mean over the segment's frames)."""
    _check_video(frame_features, "temporal_merge")
    T, N, D = frame_features.shape
    _check_segments(segments, T)
    x = frame_features.to(_work_dtype(frame_features))
    sim = consecutive_similarity(frame_features) if similarity is None else similarity
    dev = x.device
    ar = torch.arange(N, device=dev)
    toks, pos, owner, src, wts, static, group = [], [], [], [], [], [], []
    m = 0  # tokens emitted so far
    g = 0  # groups emitted so far
    for a, b in segments:
        if b > a:
            mask = (sim[a:b] > tau).all(0)  # [N]
            n_idx = ar[mask]
            k = n_idx.numel()
            if k:
                L = b - a + 1
                toks.append(x[a:b + 1, mask].mean(0))
                pos.append(torch.stack([torch.full_like(n_idx, a), n_idx], -1))
                t_rng = torch.arange(a, b + 1, device=dev)
                owner.append((m + torch.arange(k, device=dev))[None, :].expand(L, k).reshape(-1))
                src.append((t_rng[:, None] * N + n_idx[None, :]).reshape(-1))
                wts.append(torch.full((L * k,), 1.0 / L, dtype=x.dtype, device=dev))
                static.append(torch.ones(k, dtype=torch.bool, device=dev))
                group.append(torch.full((k,), g, dtype=torch.long, device=dev))
                m += k
                g += 1
            dyn = ar[~mask]
        else:
            dyn = ar
        k = dyn.numel()
        for t in range(a, b + 1):
            if k == 0:
                break
            toks.append(x[t, dyn])
            pos.append(torch.stack([torch.full_like(dyn, t), dyn], -1))
            owner.append(m + torch.arange(k, device=dev))
            src.append(t * N + dyn)
            wts.append(torch.ones(k, dtype=x.dtype, device=dev))
            static.append(torch.zeros(k, dtype=torch.bool, device=dev))
            group.append(torch.full((k,), g, dtype=torch.long, device=dev))
            m += k
            g += 1
    return TemporalMerge(torch.cat(toks), torch.cat(pos), torch.cat(owner), torch.cat(src), torch.cat(wts),
                         torch.cat(static), torch.cat(group), list(segments))


def _check_segments(segments: Sequence[Segment], T: int) -> None:
    nxt = 0
    for a, b in segments:
        if a != nxt or b < a:
            raise ValueError(f"segments must be contiguous inclusive ranges covering frames 0..{T - 1}, got {segments}")
        nxt = b + 1
    if nxt != T:
        raise ValueError(f"segments must be contiguous inclusive ranges covering frames 0..{T - 1}, got {segments}")


# ---------------------------------------------------------------------------------------------------------------
# Stage II: spatial merge
@dataclass
class SpatialMerge:
    tokens: torch.Tensor  #: [k, D]
    rep: torch.Tensor     #: [k] long: input index of each output's representative, ascending
    assign: torch.Tensor  #: [n] long: output index each input contributes to, -1 = dropped
    coeff: torch.Tensor   #: [n] weight of each input in its output (0 where dropped)


def proxy_scores(frame_features: torch.Tensor) -> torch.Tensor:
    """Feature-only stand-in for SigLIP received attention: per frame, column mean of softmax(F F^T / sqrt(D))."""
    x = frame_features.to(_work_dtype(frame_features))
    attn = torch.softmax(x @ x.transpose(-1, -2) / math.sqrt(x.shape[-1]), dim=-1)
    return attn.mean(dim=-2)


def spatial_merge(tokens: torch.Tensor, k: int, *, method: str = "density", scores: Optional[torch.Tensor] = None,
                  knn: int = 7, beta: float = 0.6, dominant_ratio: float = 0.0, merge_mode: str = "beta"
                  ) -> SpatialMerge:
    """Reduce ``tokens`` [n, D] to ``k`` tokens (§1.4).

    ``method='density'`` (static tokens): DPC-KNN with ``knn = min(knn, k)``, then cluster merge.
    ``method='attention'`` (dynamic tokens of one frame): ``round(k * (1 - dominant_ratio))`` top tokens by ``scores``
    (stable: ties keep the lower index) are kept as they are, the remaining budget is DPC-KNN contextual tokens over
    the rest (``knn = min(knn, contextual)``), merged by ``merge_mode``; everything else is dropped.
    """
    n = tokens.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"spatial_merge: k={k} must lie in [0, {n}]")
    if method not in ("density", "attention"):
        raise ValueError(f"spatial_merge: method={method!r}; accepted: 'density', 'attention'")
    x = tokens.to(_work_dtype(tokens))
    dev = x.device
    if k == 0:  # the whole group is dropped
        return SpatialMerge(x.new_zeros(0, x.shape[-1]), torch.zeros(0, dtype=torch.long, device=dev),
                            torch.full((n,), -1, dtype=torch.long, device=dev), x.new_zeros(n))
    if k == n:
        ar = torch.arange(n, device=dev)
        return SpatialMerge(x.clone(), ar, ar.clone(), torch.ones(n, dtype=x.dtype, device=dev))
    if method == "density":
        dist = pairwise_distance(x)
        centers = dpc_knn_centers(x, k, min(knn, k), dist)
        cm = cluster_merge(x, centers, beta, merge_mode, dist)
        return SpatialMerge(cm.tokens, centers, cm.assign, cm.coeff)
    if scores is None or scores.shape != (n,):
        raise ValueError(f"spatial_merge(method='attention') needs scores of shape [{n}]")
    dominant = round(k * (1.0 - dominant_ratio))
    contextual = k - dominant
    order = torch.argsort(-scores.to(x.dtype), stable=True)
    dom = order[:dominant]
    rest = torch.sort(order[dominant:]).values
    assign = torch.full((n,), -1, dtype=torch.long, device=dev)
    coeff = torch.zeros(n, dtype=x.dtype, device=dev)
    reps, outs = [dom], [x[dom]]
    slot_of = [torch.arange(dominant, device=dev)]  # provisional output slots, re-sorted below
    if contextual:
        xr = x[rest]
        dist = pairwise_distance(xr)
        centers = dpc_knn_centers(xr, contextual, min(knn, contextual), dist)
        cm = cluster_merge(xr, centers, beta, merge_mode, dist)
        reps.append(rest[centers])
        outs.append(cm.tokens)
        assign[rest] = dominant + cm.assign
        coeff[rest] = cm.coeff
    assign[dom] = slot_of[0]
    coeff[dom] = 1.0
    rep = torch.cat(reps)
    out = torch.cat(outs)
    perm = torch.argsort(rep)  # raster order
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(k, device=dev)
    kept = assign >= 0
    assign[kept] = inv[assign[kept]]
    return SpatialMerge(out[perm], rep[perm], assign, coeff)


# ---------------------------------------------------------------------------------------------------------------
# the whole outer-LLM pipeline
@dataclass
class MergeResult(TokenMap):
    """Output of :func:`holitom_merge`; ``tokens`` has the input dtype."""

    kept_per_frame: torch.Tensor = None  #: [T] long: output tokens whose representative lies in frame t
    segments: List[Segment] = field(default_factory=list)
    reduced: int = 0                     #: tokens removed by temporal merging
    budget: int = 0                      #: the requested budget

    @property
    def counts(self) -> torch.Tensor:
        """[M] number of input tokens each output token represents."""
        return torch.bincount(self.source_owner, minlength=self.tokens.shape[0])

    def reconstruct(self, video_features: torch.Tensor) -> torch.Tensor:
        """Apply the source map to ``video_features`` [T, N, D]: equals ``tokens`` up to rounding."""
        flat = video_features.reshape(-1, video_features.shape[-1]).to(self.source_weight.dtype)
        out = flat.new_zeros(self.tokens.shape[0], flat.shape[-1])
        return out.index_add_(0, self.source_owner, self.source_weight[:, None] * flat[self.source_index])


def group_budgets(sizes: Sequence[int], budget: int, survivors: int, is_static: Sequence[bool],
                  rounding: BudgetRounding = BudgetRounding.EXACT) -> List[int]:
    """Tokens each spatial group keeps. ``exact``: largest remainder, summing to ``min(budget, survivors)``."""
    if budget >= survivors:
        return list(sizes)
    if rounding is BudgetRounding.REFERENCE:
        r_eff = budget / survivors
        return [min(n, (round(n * r_eff) if st else math.ceil(n * r_eff))) for n, st in zip(sizes, is_static)]
    base = [n * budget // survivors for n in sizes]
    rem = [n * budget % survivors for n in sizes]
    left = budget - sum(base)
    for i in sorted(range(len(sizes)), key=lambda j: (-rem[j], j))[:left]:
        base[i] += 1
    return base


def holitom_merge(video_features: torch.Tensor, config: Optional[HoliTomConfig] = None,
                  scores: Optional[torch.Tensor] = None) -> MergeResult:
    """HoliTom outer-LLM merging of one video ``[T, N, D]`` (no newline token). Deterministic; inputs untouched.

    ``scores`` [T, N]: attention each token receives in the vision tower (§1.1); None -> :func:`proxy_scores`.
    """
    config = HoliTomConfig() if config is None else config
    _check_video(video_features, "holitom_merge")
    T, N, D = video_features.shape
    if scores is not None and tuple(scores.shape) != (T, N):
        raise ValueError(f"holitom_merge: scores must have shape [{T}, {N}], got {tuple(scores.shape)}")
    budget = config.budget(T * N)
    dev = video_features.device
    if budget >= T * N:  # identity
        flat = torch.arange(T * N, device=dev)
        pos = torch.stack([flat // N, flat % N], -1)
        wd = _work_dtype(video_features)
        return MergeResult(video_features.reshape(T * N, D).clone(), pos, flat, flat.clone(),
                           torch.ones(T * N, dtype=wd, device=dev), torch.full((T,), N, dtype=torch.long, device=dev),
                           [(t, t) for t in range(T)], 0, budget)
    if config.method != "holitom":
        return _per_frame_merge(video_features, config, scores, budget)
    seg = temporal_segments(video_features, config.tau, config.max_window)
    tm = temporal_merge(video_features, seg.segments, config.tau, seg.similarity)
    survivors = tm.tokens.shape[0]
    assert survivors == T * N - seg.reduced, (survivors, seg.reduced)
    n_groups = int(tm.group.max()) + 1
    sizes = torch.bincount(tm.group, minlength=n_groups).tolist()
    first = torch.zeros(n_groups, dtype=torch.long)
    first[1:] = torch.cumsum(torch.tensor(sizes), 0)[:-1]
    g_static = [bool(tm.is_static[int(f)]) for f in first]
    ks = group_budgets(sizes, budget, survivors, g_static, config.budget_rounding)
    sc = proxy_scores(video_features) if scores is None else scores.to(tm.tokens.dtype)
    tok_scores = sc[tm.positions[:, 0], tm.positions[:, 1]]
    assign = torch.full((survivors,), -1, dtype=torch.long, device=dev)
    coeff = torch.zeros(survivors, dtype=tm.tokens.dtype, device=dev)
    outs, reps = [], []
    m = 0
    for gi in range(n_groups):
        lo, hi = int(first[gi]), int(first[gi]) + sizes[gi]
        sm = spatial_merge(tm.tokens[lo:hi], ks[gi], method="density" if g_static[gi] else "attention",
                           scores=None if g_static[gi] else tok_scores[lo:hi], knn=config.knn, beta=config.beta,
                           dominant_ratio=config.dominant_ratio, merge_mode=config.cluster_merge.value)
        kept = sm.assign >= 0
        assign[lo:hi][kept] = sm.assign[kept] + m
        coeff[lo:hi] = sm.coeff
        outs.append(sm.tokens)
        reps.append(sm.rep + lo)
        m += ks[gi]
    tokens = torch.cat(outs)
    positions = tm.positions[torch.cat(reps)]
    # compose the temporal source map with the spatial assignment
    new_owner = assign[tm.source_owner]
    live = new_owner >= 0
    owner = new_owner[live]
    src = tm.source_index[live]
    w = tm.source_weight[live] * coeff[tm.source_owner[live]]
    order = torch.argsort(owner * (T * N) + src)
    kept_per_frame = torch.bincount(positions[:, 0], minlength=T)
    return MergeResult(tokens.to(video_features.dtype), positions, owner[order], src[order], w[order],
                       kept_per_frame, seg.segments, seg.reduced, budget)


def _uniform_pool(tokens: torch.Tensor, k: int) -> SpatialMerge:
    """``k`` averages of consecutive raster runs of ``tokens`` [n, D] (sizes differ by at most one)."""
    n = tokens.shape[0]
    if k == 0:  # the whole frame is dropped
        return spatial_merge(tokens, 0)
    x = tokens.to(_work_dtype(tokens))
    assign = torch.arange(n, device=x.device) * k // n                                   # [n] run id, non-decreasing
    sizes = torch.bincount(assign, minlength=k).to(x.dtype)
    out = x.new_zeros(k, x.shape[-1]).index_add_(0, assign, x) / sizes[:, None]
    rep = torch.searchsorted(assign, torch.arange(k, device=x.device))                  # first token of each run
    return SpatialMerge(out, rep, assign, 1.0 / sizes[assign])


def _per_frame_merge(video_features: torch.Tensor, config: HoliTomConfig, scores: Optional[torch.Tensor],
                     budget: int) -> MergeResult:
    """The peers (``config.method``): each frame reduced on its own to its share of the budget, no temporal stage."""
    T, N, D = video_features.shape
    ks = group_budgets([N] * T, budget, T * N, [False] * T, config.budget_rounding)
    sc = proxy_scores(video_features) if scores is None else scores.to(_work_dtype(video_features))
    outs, positions, owners, srcs, weights = [], [], [], [], []
    m = 0
    for t in range(T):
        if config.method == "pool":
            sm = _uniform_pool(video_features[t], ks[t])
        else:  # visionzip: dominant tokens by attention + contextual DPC-KNN tokens
            sm = spatial_merge(video_features[t], ks[t], method="attention", scores=sc[t], knn=config.knn,
                               beta=config.beta, dominant_ratio=config.dominant_ratio,
                               merge_mode=config.cluster_merge.value)
        live = torch.nonzero(sm.assign >= 0).squeeze(1)
        outs.append(sm.tokens)
        positions.append(torch.stack([torch.full_like(sm.rep, t), sm.rep], -1))
        owners.append(sm.assign[live] + m)
        srcs.append(live + t * N)
        weights.append(sm.coeff[live])
        m += ks[t]
    owner, src, w = torch.cat(owners), torch.cat(srcs), torch.cat(weights)
    order = torch.argsort(owner * (T * N) + src)
    return MergeResult(torch.cat(outs).to(video_features.dtype), torch.cat(positions), owner[order], src[order],
                       w[order], torch.tensor(ks, dtype=torch.long, device=video_features.device),
                       [(t, t) for t in range(T)], 0, budget)
