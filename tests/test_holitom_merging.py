"""HoliTom outer-LLM merging core (vopt.merging; spec shared/specs/tokens.md §1)."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from vopt.config import config_from_dict
from vopt.errors import ConfigError
from vopt.merging import (
    BudgetRounding,
    HoliTomConfig,
    cluster_merge,
    dpc_knn_centers,
    group_budgets,
    holitom_merge,
    spatial_merge,
    temporal_merge,
    temporal_segments,
)


def planted(lengths, N=16, D=8, seed=0, noise=0.0, dtype=torch.float32):
    """Frames identical (up to ``noise``) within each planted segment, independent random across segments."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(len(lengths), N, D, generator=g, dtype=torch.float64)
    frames = torch.cat([base[i:i + 1].expand(L, -1, -1) for i, L in enumerate(lengths)])
    frames = frames + noise * torch.randn(frames.shape, generator=g, dtype=torch.float64)
    return frames.to(dtype)


def segments_of(lengths):
    out, a = [], 0
    for L in lengths:
        out.append((a, a + L - 1))
        a += L
    return out


# ---------------------------------------------------------------------------------------------------------------
# Stage I: segmentation
@pytest.mark.parametrize("lengths", [[3, 2, 3], [1, 4, 1, 2], [5], [1, 1, 1], [2, 6]])
@pytest.mark.parametrize("noise", [0.0, 0.02])
def test_segmentation_finds_planted_cuts(lengths, noise):
    N = 16
    F = planted(lengths, N=N, noise=noise)
    seg = temporal_segments(F, tau=0.8)
    assert seg.segments == segments_of(lengths)
    assert seg.reduced == sum((L - 1) * N for L in lengths)
    assert seg.similarity.shape == (sum(lengths) - 1, N)


def _brute_force_best(F, tau, max_window):
    T, N = F.shape[:2]
    x = torch.nn.functional.normalize(F.double(), dim=-1)
    s = (x[:-1] * x[1:]).sum(-1)

    def gain(a, b):
        if b == a:
            return 0
        return (b - a) * int((s[a:b] > tau).all(0).sum())

    best = -1
    for cuts in itertools.product([0, 1], repeat=T - 1):
        segs, a = [], 0
        for t, c in enumerate(cuts):
            if c:
                segs.append((a, t))
                a = t + 1
        segs.append((a, T - 1))
        if any(b - a + 1 > max_window for a, b in segs):
            continue
        best = max(best, sum(gain(a, b) for a, b in segs))
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_window", [2, 3, 1024])
def test_segmentation_dp_is_globally_optimal(seed, max_window):
    # a slowly drifting video: partially static positions, so windows compete
    g = torch.Generator().manual_seed(seed)
    T, N, D = 6, 10, 4
    steps = 0.6 * torch.randn(T, N, D, generator=g, dtype=torch.float64) * (torch.rand(T, N, 1, generator=g) < 0.4)
    F = torch.randn(1, N, D, generator=g, dtype=torch.float64) + steps.cumsum(0)
    seg = temporal_segments(F, tau=0.8, max_window=max_window)
    assert seg.reduced == _brute_force_best(F, 0.8, max_window)
    assert all(b - a + 1 <= max_window for a, b in seg.segments)
    tm = temporal_merge(F, seg.segments, tau=0.8)
    assert tm.tokens.shape[0] == T * N - seg.reduced


def test_segmentation_ties_prefer_singletons():
    F = planted([1, 1, 1, 1], N=8)  # nothing static: every window gains 0
    assert temporal_segments(F).segments == [(0, 0), (1, 1), (2, 2), (3, 3)]
    assert temporal_segments(F[:1]).segments == [(0, 0)]


# ---------------------------------------------------------------------------------------------------------------
# Stage I': temporal merge
def test_identical_frames_collapse_to_one_frame():
    F = planted([5], N=12, D=6)
    tm = temporal_merge(F, [(0, 4)])
    assert tm.tokens.shape == (12, 6)
    torch.testing.assert_close(tm.tokens, F[0])
    assert tm.is_static.all()
    assert tm.positions.tolist() == [[0, n] for n in range(12)]
    # each static token averages its position over the 5 frames
    assert torch.bincount(tm.source_owner).tolist() == [5] * 12
    torch.testing.assert_close(tm.source_weight, torch.full((60,), 0.2))


def test_temporal_merge_static_and_dynamic_split():
    N, D = 8, 4
    F = planted([3], N=N, D=D, seed=1).clone()
    F[1, :3] = torch.randn(3, D, generator=torch.Generator().manual_seed(9))  # positions 0-2 change in frame 1
    tm = temporal_merge(F, [(0, 2)], tau=0.8)
    static = tm.positions[tm.is_static, 1].tolist()
    assert static == list(range(3, N))
    dyn = tm.positions[~tm.is_static].tolist()
    assert dyn == [[t, n] for t in range(3) for n in range(3)]
    # order: static tokens first, then dynamic frame by frame
    assert tm.is_static[: N - 3].all() and not tm.is_static[N - 3:].any()
    torch.testing.assert_close(tm.tokens[: N - 3], F[:, 3:].mean(0))


# ---------------------------------------------------------------------------------------------------------------
# Stage II: spatial merge
def test_dpc_beta_merge_weights():
    # two tight clusters; centres are one token of each
    g = torch.Generator().manual_seed(0)
    a = torch.zeros(4, 3) + 0.01 * torch.randn(4, 3, generator=g)
    b = torch.full((3, 3), 5.0) + 0.01 * torch.randn(3, 3, generator=g)
    x = torch.cat([a, b]).double()
    centers = dpc_knn_centers(x, 2, knn=2)
    assert (centers < 4).sum() == 1 and (centers >= 4).sum() == 1
    cm = cluster_merge(x, centers, beta=0.6, mode="beta")
    for j, c in enumerate(centers.tolist()):
        members = [i for i in range(7) if cm.assign[i] == j and i != c]
        expected = 0.6 * x[c] + 0.4 * x[members].mean(0)
        torch.testing.assert_close(cm.tokens[j], expected)
    mean = cluster_merge(x, centers, mode="mean")
    torch.testing.assert_close(mean.tokens[0], x[:4].mean(0))
    torch.testing.assert_close(mean.tokens[1], x[4:].mean(0))


def test_memberless_centre_unchanged():
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    cm = cluster_merge(x, torch.arange(3), beta=0.6)
    torch.testing.assert_close(cm.tokens, x)


def test_attention_topk_follows_scores():
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(3))
    scores = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.0, 0.7, 0.3, 0.05, 0.6, 0.4])
    sm = spatial_merge(x, 4, method="attention", scores=scores, dominant_ratio=0.0)
    assert sm.rep.tolist() == [1, 3, 5, 8]  # top-4, raster order
    torch.testing.assert_close(sm.tokens, x[[1, 3, 5, 8]])
    assert (sm.assign >= 0).sum() == 4
    sm2 = spatial_merge(x, 4, method="attention", scores=scores, dominant_ratio=0.5)
    assert {1, 3} <= set(sm2.rep.tolist()) and sm2.tokens.shape == (4, 4)
    assert (sm2.assign >= 0).sum() > 4  # contextual clusters absorb non-dominant tokens


def test_holitom_uses_given_scores_per_frame():
    T, N = 3, 8
    F = planted([1, 1, 1], N=N)
    scores = torch.rand(T, N, generator=torch.Generator().manual_seed(4))
    res = holitom_merge(F, HoliTomConfig(token_budget=6), scores=scores)
    assert res.kept_per_frame.tolist() == [2, 2, 2]
    for t in range(T):
        kept = res.positions[res.positions[:, 0] == t, 1].tolist()
        assert kept == sorted(torch.topk(scores[t], 2).indices.tolist())


# ---------------------------------------------------------------------------------------------------------------
# the pipeline
@pytest.mark.parametrize("budget", [1, 5, 17, 40, 63])
def test_budget_is_exact(budget):
    N = 16
    F = planted([1, 1, 1, 1], N=N, seed=5)  # no temporal redundancy: T*N survivors
    res = holitom_merge(F, HoliTomConfig(token_budget=budget))
    assert res.tokens.shape == (budget, 8)
    assert res.kept_per_frame.sum() == budget


@pytest.mark.parametrize("ratio", [0.1, 0.15, 0.25, 0.5])
def test_budget_exact_with_temporal_merging(ratio):
    T, N = 8, 16
    F = planted([3, 1, 4], N=N, seed=6, noise=0.02)
    F[4:, :5] = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(1))  # some dynamic tokens
    res = holitom_merge(F, HoliTomConfig(retain_ratio=ratio))
    budget = max(1, math.floor(ratio * T * N + 0.5))
    assert res.budget == budget
    assert res.tokens.shape[0] == min(budget, T * N - res.reduced)
    assert res.reduced > 0


def test_reference_rounding_follows_published_formula():
    T, N = 4, 10
    F = planted([1, 1, 1, 1], N=N, seed=7)
    res = holitom_merge(F, HoliTomConfig(retain_ratio=0.15, budget_rounding="reference"))
    assert res.kept_per_frame.tolist() == [math.ceil(N * 6 / 40)] * T  # ceil(n * r_eff) per frame
    assert group_budgets([10, 10, 10], 7, 30, [False] * 3) == [3, 2, 2]
    assert sum(group_budgets([5, 9, 13, 2], 11, 29, [True, False, False, False])) == 11


@pytest.mark.parametrize("dominant_ratio", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("mode", ["beta", "mean"])
def test_source_map_reconstructs_tokens(dominant_ratio, mode):
    F = planted([3, 2, 1, 2], N=16, D=8, seed=8, noise=0.05, dtype=torch.float64)
    F[0:3, :4] += torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cfg = HoliTomConfig(retain_ratio=0.2, dominant_ratio=dominant_ratio, cluster_merge=mode)
    res = holitom_merge(F, cfg)
    torch.testing.assert_close(res.reconstruct(F), res.tokens, rtol=1e-12, atol=1e-12)
    sums = torch.zeros(res.tokens.shape[0], dtype=torch.float64).index_add_(0, res.source_owner, res.source_weight)
    torch.testing.assert_close(sums, torch.ones_like(sums))
    assert (res.counts >= 1).all()
    # each output's representative is among its sources
    flat_rep = res.positions[:, 0] * 16 + res.positions[:, 1]
    for m in range(res.tokens.shape[0]):
        assert flat_rep[m] in res.source_index[res.source_owner == m]


def test_identity_when_budget_covers_everything():
    F = planted([2, 2], N=6, D=3)
    for cfg in (HoliTomConfig(retain_ratio=1.0), HoliTomConfig(token_budget=24), HoliTomConfig(token_budget=99)):
        res = holitom_merge(F, cfg)
        assert torch.equal(res.tokens, F.reshape(24, 3))
        assert res.positions.tolist() == [[t, n] for t in range(4) for n in range(6)]
        assert res.kept_per_frame.tolist() == [6] * 4 and res.reduced == 0


def test_all_identical_input():
    v = torch.randn(5, generator=torch.Generator().manual_seed(0))
    F = v.expand(6, 9, 5).clone()
    res = holitom_merge(F, HoliTomConfig(token_budget=4))
    assert res.segments == [(0, 5)] and res.reduced == 5 * 9
    assert res.tokens.shape == (4, 5)
    torch.testing.assert_close(res.tokens, v.expand(4, 5))
    assert res.kept_per_frame.tolist() == [4, 0, 0, 0, 0, 0]
    # budget above the N survivors: one frame's tokens, unchanged
    res = holitom_merge(F, HoliTomConfig(token_budget=30))
    assert res.tokens.shape == (9, 5)
    torch.testing.assert_close(res.tokens, F[0])


def test_single_frame():
    F = planted([1], N=20, D=4)
    res = holitom_merge(F, HoliTomConfig(token_budget=5))
    assert res.segments == [(0, 0)] and res.tokens.shape == (5, 4)
    assert res.kept_per_frame.tolist() == [5]


def test_inputs_not_mutated_and_deterministic():
    F = planted([3, 3], N=12, D=6, noise=0.05)
    F[:, :3] += torch.randn(6, 3, 6, generator=torch.Generator().manual_seed(1))
    scores = torch.rand(6, 12, generator=torch.Generator().manual_seed(2))
    F0, s0 = F.clone(), scores.clone()
    cfg = HoliTomConfig(retain_ratio=0.2, dominant_ratio=0.5)
    a = holitom_merge(F, cfg, scores=scores)
    b = holitom_merge(F, cfg, scores=scores)
    assert torch.equal(F, F0) and torch.equal(scores, s0)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.positions, b.positions)
    assert torch.equal(a.source_index, b.source_index) and torch.equal(a.source_weight, b.source_weight)
    x = F[0].clone()
    spatial_merge(x, 3, method="attention", scores=scores[0], dominant_ratio=0.5)
    spatial_merge(x, 3, method="density")
    temporal_merge(x[None].expand(2, -1, -1), [(0, 1)])
    assert torch.equal(x, F0[0])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"\[F, N, D\]"):
        holitom_merge(torch.randn(4, 5))
    with pytest.raises(ValueError, match="scores"):
        holitom_merge(torch.randn(2, 4, 3), scores=torch.rand(2, 5))
    with pytest.raises(ValueError, match="contiguous"):
        temporal_merge(torch.randn(3, 4, 2), [(0, 0), (2, 2)])


# ---------------------------------------------------------------------------------------------------------------
# config
@pytest.mark.parametrize("field,value", [
    ("retain_ratio", 0.0), ("retain_ratio", 1.5), ("retain_ratio", float("nan")), ("token_budget", 0),
    ("tau", 1.5), ("max_window", 0), ("beta", -0.1), ("dominant_ratio", 2.0), ("knn", 0),
    ("cluster_merge", "median"), ("budget_rounding", "floor"), ("knn", 2.5),
])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"HoliTomConfig.{field}"):
        HoliTomConfig(**{field: value})


def test_config_round_trip_and_help():
    cfg = HoliTomConfig(retain_ratio=0.25, tau=0.65, cluster_merge="mean", token_budget=100)
    assert config_from_dict(cfg.to_dict()) == cfg
    assert all(HoliTomConfig.field_help().values())
    assert HoliTomConfig().budget(6272) == 627 and HoliTomConfig(retain_ratio=0.25).budget(6272) == 1568
    assert cfg.budget_rounding is BudgetRounding.EXACT


# ---------------------------------------------------------------------------------------------------------------
# property test
@settings(max_examples=20, deadline=None)
@given(
    T=st.integers(1, 5), N=st.integers(1, 12), D=st.integers(1, 6),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    ratio=st.floats(0.01, 1.0), tau=st.sampled_from([0.0, 0.5, 0.8, 0.99]),
    repeat=st.booleans(), dominant=st.sampled_from([0.0, 0.5]), seed=st.integers(0, 2 ** 16),
)
def test_random_invariants(T, N, D, dtype, ratio, tau, repeat, dominant, seed):
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(T, N, D, generator=g)
    if repeat and T > 1:
        F[1] = F[0]
    F = F.to(dtype)
    F0 = F.clone()
    res = holitom_merge(F, HoliTomConfig(retain_ratio=ratio, tau=tau, dominant_ratio=dominant))
    assert torch.equal(F, F0)
    M = res.tokens.shape[0]
    assert res.tokens.dtype == dtype and res.tokens.shape == (M, D)
    assert M == min(res.budget, T * N - res.reduced) if res.budget < T * N else M == T * N
    assert res.kept_per_frame.shape == (T,) and int(res.kept_per_frame.sum()) == M
    assert ((res.positions[:, 0] >= 0) & (res.positions[:, 0] < T)).all()
    assert ((res.positions[:, 1] >= 0) & (res.positions[:, 1] < N)).all()
    assert len({tuple(p) for p in res.positions.tolist()}) == M  # one token per (frame, position)
    assert sorted({s for s in res.source_index.tolist()}) == sorted(res.source_index.tolist())  # no input twice
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(res.reconstruct(F).to(dtype), res.tokens, rtol=tol, atol=tol)


def test_spatial_merge_zero_budget_drops_group():
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    for method, scores in (("density", None), ("attention", torch.rand(5))):
        sm = spatial_merge(x, 0, method=method, scores=scores)
        assert sm.tokens.shape == (0, 3) and (sm.assign == -1).all() and (sm.coeff == 0).all()


def test_gram_distance_matches_exact():
    from vopt.merging import pairwise_distance
    x = torch.randn(80, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(pairwise_distance(x, exact=False), pairwise_distance(x, exact=True))
    assert (torch.diagonal(pairwise_distance(x, exact=False)) == 0).all()


# ---- paper FLOPs formula (spec tokens.md §5) ---------------------------------------------------------------------


@pytest.mark.parametrize("retain,outer_only,with_inner", [
    (1.0, 40.8, None), (0.25, 8.71, 7.11), (0.20, 7.04, 5.75), (0.15, 5.22, 4.27), (0.10, 3.44, 2.82)])
def test_paper_flops_reproduce_the_published_llava_ov_7b_columns(retain, outer_only, with_inner):
    """LLaVA-OV-7B, 32 frames x ceil(196 r) tokens: the TFLOPs HoliTom's table reports (2 decimals, as printed)."""
    import math

    from vopt.merging.flops import paper_prefill_flops

    n = math.ceil(196 * retain) * 32
    assert round(paper_prefill_flops(28, 3584, 18944, n) / 1e12, 2 if retain < 1 else 1) == outer_only
    if with_inner is not None:
        got = paper_prefill_flops(28, 3584, 18944, n, inner_layer=18, inner_keep=0.5)
        assert round(got / 1e12, 2) == with_inner
    if retain == 0.10:  # the headline: 6.9% of the unmerged model's FLOPs
        full = paper_prefill_flops(28, 3584, 18944, 196 * 32)
        assert round(100 * got / full, 1) == 6.9


def test_paper_flops_rejects_bad_inner_arguments():
    from vopt.merging.flops import paper_prefill_flops

    with pytest.raises(ValueError, match="inner_layer"):
        paper_prefill_flops(4, 8, 16, 10, inner_layer=5)
    with pytest.raises(ValueError, match="inner_keep"):
        paper_prefill_flops(4, 8, 16, 10, inner_layer=2, inner_keep=0.0)


# ---- inner-LLM stage (spec tokens.md §2) ----------------------------------------------------------------------------


def _inner_reference(hidden, importance, visual, keep, merge=True):
    """Row by row, token by token: the definition of vopt.merging.inner.inner_merge."""
    B, L, D = hidden.shape
    rows, keeps, backs = [], [], []
    for b in range(B):
        vis = [i for i in range(L) if visual[b, i]]
        k = min(len(vis), math.ceil(keep * len(vis)))
        ranked = sorted(vis, key=lambda i: (-float(importance[b, i]), i))   # stable: earlier token first on ties
        chosen = set(ranked[:k])
        h = hidden[b].clone()
        groups = {c: [c] for c in chosen}
        for i in vis:
            if i not in chosen:
                cos = {c: float(torch.nn.functional.cosine_similarity(hidden[b, i], hidden[b, c], dim=0)) for c in sorted(chosen)}
                best = max(sorted(chosen), key=lambda c: (cos[c], -c))                  # first index on equal cosines
                groups[best].append(i)
        if merge:
            for c, members in groups.items():
                h[c] = hidden[b, members].float().mean(0).to(hidden.dtype)
        kept = [i for i in range(L) if not visual[b, i] or i in chosen]
        new = {i: j for j, i in enumerate(kept)}
        back = [new[i] if i in new else new[next(c for c, m in groups.items() if i in m)] for i in range(L)]
        rows.append(h[kept]), keeps.append(kept), backs.append(back)
    width = max(len(k) for k in keeps)          # short rows: filler copies of their last kept token, flagged invalid
    valid = torch.tensor([[j < len(k) for j in range(width)] for k in keeps])
    keeps = [k + [k[-1]] * (width - len(k)) for k in keeps]
    rows = [torch.cat([r, r[-1:].expand(width - len(r), -1)]) for r in rows]
    return torch.stack(rows), torch.tensor(keeps), torch.tensor(backs), valid


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_inner_merge_matches_the_token_by_token_reference(seed, merge, ragged):
    from vopt.merging.inner import inner_merge

    g = torch.Generator().manual_seed(seed)
    B, L, D = 3, 23, 8
    counts = [12, 7, 2] if ragged else [12, 12, 12]   # ragged: rows after an outer stage that kept different counts
    hidden = torch.randn(B, L, D, generator=g)
    visual = torch.zeros(B, L, dtype=torch.bool)
    for b, n in enumerate(counts):  # different places per row (text/padding around the video)
        start = int(torch.randint(0, L - n + 1, (1,), generator=g))
        visual[b, start:start + n] = True
    importance = torch.rand(B, L, generator=g)
    importance[0, visual[0]] = 0.5            # all-equal scores in row 0: the earliest tokens win
    hidden[1, 5] = hidden[1, 6]               # duplicate states
    got = inner_merge(hidden, importance, visual, 0.4, merge=merge)
    h, keep_idx, back, valid = _inner_reference(hidden, importance, visual, 0.4, merge)
    assert got.visual_before == sum(counts) and got.visual_after == sum(math.ceil(0.4 * n) for n in counts)
    assert torch.equal(got.valid, valid) and got.ragged == ragged
    assert torch.equal(got.keep_idx, keep_idx) and torch.equal(got.back, back)
    torch.testing.assert_close(got.hidden, h, rtol=0, atol=1e-6)  # fp32 means of <= 12 vectors


def test_inner_merge_identity_and_errors():
    from vopt.merging.inner import inner_merge

    h, vis = torch.randn(2, 9, 4), torch.zeros(2, 9, dtype=torch.bool)
    vis[:, 2:6] = True
    same = inner_merge(h, torch.rand(2, 9), vis, 1.0)
    assert torch.equal(same.hidden, h) and torch.equal(same.back, torch.arange(9).expand(2, 9))
    with pytest.raises(ValueError, match="keep"):
        inner_merge(h, torch.rand(2, 9), vis, 0.0)


def test_last_token_importance_equals_softmax_attention_with_gqa_and_masks():
    from vopt.merging.inner import last_token_importance

    g = torch.Generator().manual_seed(3)
    B, H, Hkv, L, hd, t = 2, 4, 2, 11, 8, 2
    q, k = torch.randn(B, H, t, hd, generator=g), torch.randn(B, Hkv, L, hd, generator=g)
    key_mask = torch.ones(B, L, dtype=torch.bool)
    key_mask[1, :3] = False                                                     # left padding in row 1
    q_pos = torch.tensor([[L - 2, L - 1], [5, 8]])                             # row 1: right padding after 8
    key_mask[1, 9:] = False
    got = last_token_importance(q, k, key_mask, q_pos)
    assert torch.equal(last_token_importance(q[:1], k[:1], key_mask[:1]), got[:1])  # default: the last t positions
    want = torch.zeros(B, L)
    for b in range(B):
        for h in range(H):
            for j in range(t):
                pos = int(q_pos[b, j])
                s = (q[b, h, j] @ k[b, h // (H // Hkv), : pos + 1].T) / math.sqrt(hd)
                s = s.masked_fill(~key_mask[b, : pos + 1], float("-inf"))
                want[b, : pos + 1] += torch.softmax(s, 0) / (H * t)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


# ---- peers as configs of the same outer stage ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["visionzip", "pool"])
@pytest.mark.parametrize("budget", [5, 13, 40])
def test_peer_methods_keep_the_budget_per_frame_and_reconstruct(method, budget):
    F = planted([3, 2, 1, 2], N=16, D=8, seed=9, noise=0.05, dtype=torch.float64)
    res = holitom_merge(F, HoliTomConfig(token_budget=budget, method=method, dominant_ratio=0.25))
    assert res.tokens.shape[0] == budget and res.reduced == 0           # exact budget, no temporal stage
    assert res.kept_per_frame.tolist() == group_budgets([16] * 8, budget, 128, [False] * 8)
    torch.testing.assert_close(res.reconstruct(F), res.tokens, rtol=1e-12, atol=1e-12)
    sums = torch.zeros(budget, dtype=torch.float64).index_add_(0, res.source_owner, res.source_weight)
    torch.testing.assert_close(sums, torch.ones_like(sums))             # every output is a weighted mean
    for m in range(budget):                                             # sources stay inside the output's frame
        frames = res.source_index[res.source_owner == m] // 16
        assert (frames == res.positions[m, 0]).all()


def test_uniform_pool_is_the_mean_of_consecutive_runs():
    F = torch.arange(2 * 6 * 1, dtype=torch.float64).view(2, 6, 1)
    res = holitom_merge(F, HoliTomConfig(token_budget=4, method="pool"))
    # 2 tokens per frame: runs [0,1,2] and [3,4,5] of each frame
    assert res.tokens.view(-1).tolist() == [1.0, 4.0, 7.0, 10.0]
    assert res.positions.tolist() == [[0, 0], [0, 3], [1, 0], [1, 3]]


def test_visionzip_keeps_the_top_scored_tokens_when_all_dominant():
    F = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    scores = torch.zeros(2, 8)
    scores[0, [6, 2]] = 1.0
    scores[1, [1, 5]] = 1.0
    res = holitom_merge(F, HoliTomConfig(token_budget=4, method="visionzip", dominant_ratio=0.0), scores=scores)
    assert res.positions.tolist() == [[0, 2], [0, 6], [1, 1], [1, 5]]
    torch.testing.assert_close(res.tokens, F[[0, 0, 1, 1], [2, 6, 1, 5]])


def test_method_is_validated():
    with pytest.raises(ConfigError, match="method"):
        HoliTomConfig(method="tome")
