"""The ``holitom`` pass on VideoLLM-online's stream: per-frame merging before each frame is prefilled."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from _holitom_helpers import holitom_opt
from vopt import zoo
from vopt.merging import HoliTomConfig
from vopt.merging.families.stream import STREAM_STATE_ATTR, stream_frame_budget, stream_frame_merge
from vopt.passes.holitom import STATS_ATTR


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base():
    return zoo.build("videollm-online", size="tiny").model.eval()


_opt = holitom_opt  # retain ratio first, then HoliTomPassConfig fields


def _match(opt):
    (res,) = [r for r in opt.report.runtime_results if r.pass_name == "holitom"]
    (m,) = res.matches
    return m


def _frames(t=5, seed=0):
    return torch.randn(1, t, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_retain_one_is_bit_identical(base):
    opt = _opt(base, retain=1.0)
    m = _match(opt)
    assert m.rewritten and "streaming prefill_frame()" in m.what and "5 of 5 tokens" in m.what
    assert "forward() (whole-stream embedding) unmerged" in m.what
    frames = _frames()
    c, ref = opt.new_cache(), base.new_cache()
    with torch.no_grad():
        got, want = list(opt.stream(frames, c)), list(base.stream(frames, ref))
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert torch.equal(opt.respond(got[-1], c, 4), base.respond(want[-1], ref, 4))
    assert c.get_seq_length() == ref.get_seq_length()


def test_half_budget_shrinks_cache_exactly_and_respond_works(base, capsys):
    opt = _opt(base, retain=0.5)
    n = base.tokens_per_frame
    k = stream_frame_budget(HoliTomConfig(retain_ratio=0.5), n)
    assert (n, k) == (5, 3)  # ceil(0.5 * 5): CLS + 2 merged patch tokens
    assert f"{k} of {n} tokens" in _match(opt).what
    c = opt.new_cache()
    lengths = []
    with torch.no_grad():
        for logits in opt.stream(_frames(6), c):
            assert logits.shape == (1, base.language_model.config.vocab_size) and torch.isfinite(logits).all()
            lengths.append(c.get_seq_length())
        assert lengths == [(1 + k) * (i + 1) for i in range(6)]
        ans = opt.respond(logits, c, 3)
    eos = int(ans[0, -1]) == base.language_model.config.eos_token_id
    assert c.get_seq_length() == 6 * (1 + k) + ans.shape[1] - eos  # answers extend the shortened cache
    st = getattr(opt, STATS_ATTR)
    assert (st.calls, st.tokens_before, st.tokens_after) == (6, 6 * n, 6 * k)
    assert "first frame: tokens 5 -> 3" in _match(opt).what
    with capsys.disabled():
        print(f"\n[holitom stream] tiny VideoLLM-online, 6 frames, retain 0.5: visual tokens {st.tokens_before} -> "
              f"{st.tokens_after}, cache {6 * (1 + n)} -> {lengths[-1]} after the frames "
              f"(static tokens {st.static_tokens})")


def _kept(opt, frames, cache):
    """Per frame: the kept patch tokens the stream state recorded (row 0)."""
    state = getattr(opt, STREAM_STATE_ATTR)
    out = []
    with torch.no_grad():
        for _ in opt.stream(frames, cache):
            out.append(state.prev[cache][0][0].clone())
    return out


def test_static_stream_merges_temporally_and_new_cache_restarts(base):
    opt = _opt(base, retain=0.5)
    st = getattr(opt, STATS_ATTR)
    frame = _frames(1, seed=3)
    static = frame.expand(1, 4, 3, 64, 64)
    kept = _kept(opt, static, opt.new_cache())
    # Frames 1..3 repeat frame 0: every patch token is static; the kept tokens are frame 0's.
    assert st.static_tokens == 3 * (base.tokens_per_frame - 1)
    assert all(torch.equal(x, kept[0]) for x in kept[1:])
    # A moving stream has (at most) few static tokens.
    before = st.static_tokens
    _kept(opt, _frames(4, seed=4), opt.new_cache())
    moving = st.static_tokens - before
    assert moving < 3 * (base.tokens_per_frame - 1)
    # A fresh cache starts fresh: its first frame has no temporal neighbour (nothing static), and its first logits
    # equal the first stream's first logits.
    before = st.static_tokens
    c1, c2 = opt.new_cache(), opt.new_cache()
    with torch.no_grad():
        a = next(iter(opt.stream(frame, c1)))
        b = next(iter(opt.stream(frame, c2)))
    assert st.static_tokens == before and torch.equal(a, b)
    assert len(getattr(opt, STREAM_STATE_ATTR).prev) >= 2  # one state per live cache


def test_callers_model_untouched(base):
    params = {k: v.clone() for k, v in base.state_dict().items()}
    opt = _opt(base, retain=0.5)
    with torch.no_grad():
        list(opt.stream(_frames(2), opt.new_cache()))
    assert not {"prefill_frame", STATS_ATTR, STREAM_STATE_ATTR} & set(vars(base))
    assert all(torch.equal(params[k], v) for k, v in base.state_dict().items())
    c = base.new_cache()
    with torch.no_grad():
        list(base.stream(_frames(2), c))
    assert c.get_seq_length() == 2 * (1 + base.tokens_per_frame)


def _stream_reference(base, frames, K: int, keep: float, text: torch.Tensor, steps: int):
    """The unmodified LM on the whole stream at once, uncached: per frame chunk ``[interval, CLS, patches]`` the
    kept patches are the top ``ceil(keep * (patches - 1))`` by the **eager** attention of the chunk's last token (a
    patch, never dropped: it is the scoring query) at layer K
    (HF ``output_attentions``; earlier chunks' dropped tokens already masked there), and layers >= K never attend to
    a dropped token. Returns each frame's last-position logits, and the greedy reply after ``text``, with logits."""
    lm = base.language_model
    n = base.tokens_per_frame
    interval = torch.full((1, 1), base.interval_token_id, dtype=torch.long)
    chunks = [torch.cat([base.embed_ids(interval), base.frame_embeddings(f)], 1) for f in frames.unbind(1)]
    embeds = torch.cat(chunks, 1)
    L = embeds.shape[1]
    kept = torch.ones(1, L, dtype=torch.bool)
    eager = copy.deepcopy(lm)
    eager.set_attn_implementation("eager")

    def run(model, e, kept, **kw):
        T = e.shape[1]
        allowed = torch.ones(T, T, dtype=torch.bool).tril() & kept[:, None, :T] | torch.eye(T, dtype=torch.bool)
        add = torch.zeros(1, 1, T, T).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        hooks = [layer.register_forward_pre_hook(lambda m, a, k: (a, {**k, "attention_mask": add}), with_kwargs=True)
                 for layer in model.model.layers[K:]]
        try:
            return model(inputs_embeds=e, use_cache=False, **kw)
        finally:
            for h in hooks:
                h.remove()

    for f in range(frames.shape[1]):   # the chunks one by one: each choice sees the earlier ones' masks
        s = f * (1 + n)
        att = run(eager, embeds[:, :s + 1 + n], kept, output_attentions=True).attentions[K]
        patches = torch.arange(s + 2, s + n)
        imp = att[0, :, s + n, patches].mean(0)
        kept[0, patches] = False
        kept[0, patches[imp.topk(math.ceil(keep * (n - 2))).indices]] = True
    per_frame = run(lm, embeds, kept).logits[0, n::1 + n]
    reply, logits = [], []
    e, kk = torch.cat([embeds, base.embed_ids(text)], 1), torch.cat([kept, torch.ones_like(text).bool()], 1)
    for _ in range(steps):
        last = run(lm, e, kk).logits[:, -1]
        logits.append(last)
        tok = last.argmax(-1, keepdim=True)
        reply.append(tok)
        e, kk = torch.cat([e, base.embed_ids(tok)], 1), torch.cat([kk, torch.ones_like(tok).bool()], 1)
    return per_frame, torch.cat(reply, 1), logits


def test_inner_stage_in_the_stream_equals_the_masked_unmodified_model(base):
    """Every frame is merged at layer K as it is prefilled onto the cache (its last token's attention over the
    cached entries and the frame, as the model computes it); later frames, a text turn and the reply attend only to
    the kept entries of layers >= K. fp32; the pass works on gathered sequences, the reference on full masked ones:
    atol 2e-5."""
    K, keep = 1, 0.5
    frames = _frames(4, seed=5)
    text = torch.randint(12, 100, (1, 3), generator=torch.Generator().manual_seed(1))
    opt = _opt(base, retain=1.0, outer=False, inner_layer=K, inner_keep=keep, inner_merge=False)
    m = _match(opt)
    assert m.rewritten and "no outer stage" in m.what and f"inner K={K}/" in m.what
    with torch.no_grad():
        want_frames, want_reply, want_logits = _stream_reference(base, frames, K, keep, text, 3)
        c = opt.new_cache()
        got = torch.cat(list(opt.stream(frames, c)))
        n = base.tokens_per_frame
        assert c.get_seq_length(0) == 4 * (1 + n)
        assert c.get_seq_length(K) == 4 * (3 + math.ceil(keep * (n - 2)))   # interval, CLS, kept patches, last
        last = opt.prefill_ids(text, c)
        reply = opt.respond(last, c, 3)
    torch.testing.assert_close(got, want_frames, rtol=0, atol=2e-5)
    torch.testing.assert_close(last, want_logits[0], rtol=0, atol=2e-5)
    assert torch.equal(reply, want_reply)
    st = getattr(opt.module, STATS_ATTR).inner
    assert (st.prefills, st.visual_before, st.visual_after) == (4, 4 * (n - 2), 4 * math.ceil(keep * (n - 2)))


def test_outer_and_inner_stream_keeps_one_map_per_cache(base):
    """Outer (per frame) + inner (layer K) merging; two streams interleaved on two caches equal each run alone."""
    opt = _opt(base, retain=0.8, inner_layer=1, inner_keep=0.5)   # 4 of 5 frame tokens, then 1 of 2 patches at K
    a, b = _frames(3, seed=1), _frames(3, seed=2)
    with torch.no_grad():
        ca, cb = opt.new_cache(), opt.new_cache()
        inter = [(opt.prefill_frame(fa, ca), opt.prefill_frame(fb, cb)) for fa, fb in zip(a.unbind(1), b.unbind(1))]
        ra, rb = opt.respond(inter[-1][0], ca, 3), opt.respond(inter[-1][1], cb, 3)
        alone = []
        for frames in (a, b):
            c = opt.new_cache()
            logits = list(opt.stream(frames, c))
            alone.append((torch.cat(logits), opt.respond(logits[-1], c, 3), c))
    assert torch.equal(torch.cat([x[0] for x in inter]), alone[0][0])
    assert torch.equal(torch.cat([x[1] for x in inter]), alone[1][0])
    assert torch.equal(ra, alone[0][1]) and torch.equal(rb, alone[1][1])
    c = alone[0][2]
    # per frame [interval, CLS, p1, p2, p3]: p3 scores (kept), one of p1 / p2 kept at layer 1; 3 reply tokens
    assert c.get_seq_length(0) == 3 * 5 + 3 and c.get_seq_length(1) == 3 * 4 + 3


def test_frame_merge_is_weighted_mean_budget_exact_and_drops_static_first():
    g = torch.Generator().manual_seed(0)
    cfg = HoliTomConfig(retain_ratio=0.5, tau=0.8)
    frame = torch.randn(10, 16, generator=g)  # CLS + 9 patches
    for k in range(1, 11):
        r = stream_frame_merge(frame, None, k, cfg)
        assert r.tokens.shape == (k, 16) and torch.equal(r.tokens[0], frame[0])  # CLS untouched
        if k < 10:
            kept = r.assign >= 0
            # Each kept patch token is the weighted mean of its members (weights summing to 1).
            rebuilt = torch.zeros(k - 1, 16).index_add_(0, r.assign[kept], r.coeff[kept, None] * frame[1:][kept])
            sums = torch.zeros(k - 1).index_add_(0, r.assign[kept], r.coeff[kept])
            assert torch.allclose(rebuilt, r.tokens[1:], atol=1e-6) and torch.allclose(sums, torch.ones(k - 1))
    # Patches 1..6 repeat the previous frame's kept tokens (static); 7..9 are new: with k - 1 = 3 slots the three
    # dynamic tokens are kept as they are and the static ones are dropped.
    prev = torch.randn(6, 16, generator=g)
    cur = torch.cat([frame[:1], prev, torch.randn(3, 16, generator=g)])
    r = stream_frame_merge(cur, prev, 4, cfg)
    assert r.static.tolist() == [True] * 6 + [False] * 3
    assert torch.equal(r.tokens[1:], cur[7:]) and (r.assign[:6] == -1).all()
    # Fewer dynamic tokens than slots: the dynamic ones are kept, the static ones fill the rest (merged).
    r = stream_frame_merge(cur, prev, 6, cfg)
    assert r.tokens.shape == (6, 16) and torch.equal(r.tokens[1:4], cur[7:]) and (r.assign[:6] >= 3).all()
