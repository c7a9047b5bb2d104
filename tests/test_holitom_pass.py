"""The ``holitom`` runtime pass: HoliTom outer-LLM merging on the working copy of a LLaVA-OneVision model."""
from __future__ import annotations

import pytest
import torch

from _holitom_helpers import LMInputs, holitom_opt
import vopt
import vopt.eval
from vopt import zoo
from vopt.errors import ConfigError
from vopt.eval import scoring
from vopt.eval import video_task as vt
from vopt.merging import HoliTomConfig
from vopt.optimize import OptimizeConfig
from vopt.pass_protocol import PassKind, registered_passes
from vopt.passes.holitom import STATS_ATTR, HoliTomPassConfig


@pytest.fixture(scope="module")
def base():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    model = zoo.build("llava-onevision").model.eval()  # the trained tiny model
    yield model
    torch.set_num_threads(n)


_opt = holitom_opt  # retain ratio first, then HoliTomPassConfig fields


def _inputs(model, n=4, seed=0, samples=None):
    samples = scoring.qa_samples("test", n, seed, 8, samples)
    return scoring.model_inputs(model, samples)


def test_registered_opt_in_runtime():
    cls = registered_passes()["holitom"]
    assert cls.kind is PassKind.RUNTIME and cls.default is False and cls.config_cls is HoliTomPassConfig


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="logits"):
        HoliTomPassConfig(logits="gapped")
    with pytest.raises(ConfigError, match="retain_ratio"):
        HoliTomPassConfig(merge=HoliTomConfig(retain_ratio=0.0))
    with pytest.raises(ConfigError, match="merge"):
        HoliTomPassConfig(merge="half")
    c = HoliTomPassConfig(merge=HoliTomConfig(retain_ratio=0.25, tau=0.65), logits="compact")
    assert HoliTomPassConfig.from_json(c.to_json()) == c


def test_identity_at_retain_1(base):
    opt = _opt(base, 1.0)
    inputs = _inputs(base, n=4)
    pos = vt.answer_positions(inputs["attention_mask"])
    with torch.no_grad():
        ref = base(**inputs).logits
        out = opt(**inputs)
    assert out.logits.shape == ref.shape
    rows = torch.arange(4)
    torch.testing.assert_close(out.logits[rows, pos], ref[rows, pos], atol=1e-5, rtol=0)
    assert out.holitom.tokens_after == out.holitom.tokens_before
    # a budget >= every token is the identity too
    opt2 = vopt.optimize(base, OptimizeConfig(pass_configs={"holitom": HoliTomPassConfig(
        merge=HoliTomConfig(token_budget=10_000))}), passes=["holitom"])
    with torch.no_grad():
        out2 = opt2(**inputs)
    torch.testing.assert_close(out2.logits[rows, pos], ref[rows, pos], atol=1e-5, rtol=0)


def test_caller_model_untouched(base):
    before = {k: v.clone() for k, v in base.state_dict().items()}
    opt = _opt(base, 0.25)
    inputs = _inputs(base, n=2)
    with torch.no_grad():
        opt(**inputs)
        out = base(**inputs)
    assert "forward" not in vars(base) and not hasattr(base, STATS_ATTR)
    assert out.logits.shape[1] == inputs["input_ids"].shape[1]
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_non_llava_skipped_with_reason():
    model = zoo.build("llama", pretrained=False).model
    opt = vopt.optimize(model, passes=["holitom"])
    (res,) = opt.report.runtime_results
    (m,) = res.matches
    assert not m.rewritten and "not a LlavaOnevisionForConditionalGeneration" in m.reason
    assert "forward" not in vars(opt.module.eager if hasattr(opt.module, "eager") else opt.module)


@pytest.mark.parametrize("retain,positions", [(0.5, "compact"), (0.25, "compact"), (0.5, "original"),
                                              (0.25, "original")])
def test_trained_model_fidelity_and_reduction(base, retain, positions):
    samples = scoring.qa_samples("test", 64, 0, 8, None)
    opt = _opt(base, retain, positions=positions)
    with LMInputs(opt.module.model.language_model) as spy:
        cmp = vopt.eval.compare(base, opt, samples=samples, stages=False)
        cmp2 = vopt.eval.compare(base, opt, samples=samples, stages=False)
    stats = getattr(opt.module, STATS_ATTR)
    full_len = scoring.model_inputs(base, samples)["input_ids"].shape[1]
    full_real = scoring.model_inputs(base, samples)["attention_mask"].sum(1)
    # what the LM saw: shorter sequences, and per row exactly the merged count of video tokens fewer
    assert spy.calls[0]["inputs_embeds"].shape[1] < full_len
    removed = (full_real - spy.calls[0]["attention_mask"].sum(1)).sum().item()
    assert removed == stats.tokens_before // 2 - stats.tokens_after // 2 > 0  # two identical compare runs
    kept = stats.tokens_after / stats.tokens_before
    kept_tokens, all_tokens = stats.tokens_after // 2, stats.tokens_before // 2
    assert kept <= retain + 1.0 / 33 + 1e-9  # budget per video + the newline
    # deterministic
    assert cmp.to_dict() == cmp2.to_dict()
    # the report carries the measured reduction of the first call
    (match,) = opt.report.runtime_results[0].matches
    assert "first call: video tokens" in match.what
    d = cmp.to_dict()
    qa = vopt.eval.video_qa(opt, samples=samples)
    assert qa.accuracy == pytest.approx(d["accuracy_optimized"])
    print(f"\nholitom retain={retain} positions={positions}: video tokens kept {kept_tokens}/{all_tokens} "
          f"({kept:.1%}); agreement {d['agreement']:.4f}; accuracy {d['accuracy_baseline']:.4f} -> "
          f"{d['accuracy_optimized']:.4f} (delta {d['accuracy_delta']:+.4f})")
    assert d["agreement"] > 0.3  # runs and is far from chance-level disagreement; the measured values are printed


def test_batch_of_two_with_different_counts_matches_batch_of_one(base):
    opt = _opt(base, 0.5, logits="compact")
    samples = scoring.qa_samples("test", 16, 0, 8, None)
    with torch.no_grad():
        counts = [opt(**scoring.model_inputs(base, [s])).holitom.tokens_after[0] for s in samples]
    i = 0
    j = next(k for k in range(1, len(samples)) if counts[k] != counts[0])
    pair = [samples[i], samples[j]]
    with torch.no_grad():
        out2 = opt(**scoring.model_inputs(base, pair))
        singles = [opt(**scoring.model_inputs(base, [s])) for s in pair]
    assert out2.holitom.tokens_after == [counts[i], counts[j]]
    pos2 = out2.attention_mask.sum(1) - 1  # the new mask: right padding after different merged counts
    for r, one in enumerate(singles):
        a = out2.logits[r, pos2[r]]
        b = one.logits[0, one.attention_mask.sum(1)[0] - 1]
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert int(a.argmax()) == int(b.argmax())
    # the 'original' layout gives the same answer logits at the caller's answer positions
    opt_o = _opt(base, 0.5)
    inputs = scoring.model_inputs(base, pair)
    with torch.no_grad():
        out_o = opt_o(**inputs)
    pos = vt.answer_positions(inputs["attention_mask"])
    torch.testing.assert_close(out_o.logits[torch.arange(2), pos], out2.logits[torch.arange(2), pos2],
                               atol=1e-5, rtol=0)


def _kept_slots(inputs, out, n_per_frame):
    """[B] lists: the caller's placeholder slots of the tokens each row kept (selection only) + the newline slot."""
    vid = 501
    slots = []
    for b, mr in enumerate(out.holitom.merges):
        pos = (inputs["input_ids"][b] == vid).nonzero().reshape(-1)
        s, e = int(pos[0]), int(pos[-1]) + 1
        slots.append([s + int(t) * n_per_frame + int(sp) for t, sp in mr.positions.tolist()] + [e - 1])
    return slots


def _left_pad(inputs):
    """The same rows, padded on the left instead of the right."""
    out = dict(inputs)
    ids, mask = inputs["input_ids"].clone(), inputs["attention_mask"].clone()
    for b in range(ids.shape[0]):
        k = int((mask[b] == 0).sum())
        ids[b], mask[b] = ids[b].roll(k), mask[b].roll(k)
    out["input_ids"], out["attention_mask"] = ids, mask
    return out


@pytest.mark.parametrize("side", ["right", "left"])
def test_original_positions_equal_masking_the_dropped_tokens(base, side):
    """Reference computation for positions: with pure selection (tau=1: no temporal merge; D=0: attention top-k) and
    positions='original', HoliTom must equal the unmodified model with the dropped placeholders masked out (the same
    padded batch; right and left padding)."""
    cfg = HoliTomPassConfig(merge=HoliTomConfig(retain_ratio=0.25, tau=1.0), positions="original")
    opt = vopt.optimize(base, OptimizeConfig(pass_configs={"holitom": cfg}), passes=["holitom"])
    inputs = _inputs(base, n=6)
    if side == "left":
        inputs = _left_pad(inputs)
    with LMInputs(opt.module.model.language_model) as spy, torch.no_grad():
        out = opt(**inputs)
    # rows where merging is a pure selection (fp cosines of identical frames can exceed 1 = tau: those rows still merge)
    pure = [b for b, mr in enumerate(out.holitom.merges) if bool((mr.counts == 1).all())]
    assert len(pure) >= 2
    slots = _kept_slots(inputs, out, 4)
    mask = inputs["attention_mask"].clone()
    vid = inputs["input_ids"] == 501
    mask[vid] = 0
    for b, sl in enumerate(slots):
        mask[b, sl] = 1
    with torch.no_grad():
        ref = base(**{**inputs, "attention_mask": mask}).logits
    pos = vt.answer_positions(inputs["attention_mask"]) if side == "right" else torch.full((6,), mask.shape[1] - 1)
    rows = torch.tensor(pure)
    torch.testing.assert_close(out.logits[rows, pos[rows]], ref[rows, pos[rows]], atol=1e-4, rtol=1e-4)
    # the LM saw gapped position ids: text keeps its own, kept video tokens their representatives' slots
    p = spy.calls[0]["position_ids"]
    assert p is not None and p.shape[1] == spy.calls[0]["inputs_embeds"].shape[1] < inputs["input_ids"].shape[1]
    for b, sl in enumerate(slots):
        if side == "left":
            continue  # the added left padding shifts the rows; the logits check above covers them
        s = int(vid[b].nonzero()[0])
        assert p[b, :s].tolist() == list(range(s))
        assert p[b, s:s + len(sl)].tolist() == sl
        n_real = int(inputs["attention_mask"][b].sum())
        after = p[b, s + len(sl):s + len(sl) + n_real - (s + 33)].tolist()
        assert after == list(range(s + 33, n_real))
    # and positions='original' is the identity at retain 1.0 too
    opt1 = vopt.optimize(base, OptimizeConfig(pass_configs={"holitom": HoliTomPassConfig(
        merge=HoliTomConfig(retain_ratio=1.0), positions="original")}), passes=["holitom"])
    with torch.no_grad():
        allr = torch.arange(6)
        torch.testing.assert_close(opt1(**inputs).logits[allr, pos], base(**inputs).logits[allr, pos],
                                   atol=1e-5, rtol=0)


def test_generate_merges_via_inputs_embeds(base):
    inputs = _inputs(base, n=1)
    with torch.no_grad():
        ref = base.generate(**inputs, max_new_tokens=3, do_sample=False)
        ident = _opt(base, 1.0).generate(**inputs, max_new_tokens=3, do_sample=False)
    assert ident.tolist() == ref[:, -3:].tolist()  # inputs_embeds generation returns the new tokens only
    opt = _opt(base, 0.5)
    with torch.no_grad():
        gen = opt.generate(**inputs, max_new_tokens=3, do_sample=False)
        first = opt(**inputs).logits[0, int(inputs["attention_mask"].sum()) - 1].argmax()
    stats = getattr(opt.module, STATS_ATTR)
    assert stats.calls == 2 and stats.tokens_after < stats.tokens_before
    # Paper-formula FLOPs (per video, 4 n d^2 + 2 n^2 d + 2 n d m per layer) shrink at least as fast as the tokens.
    text = base.config.get_text_config()
    n0 = stats.tokens_before // stats.videos
    per_layer = lambda n: 4 * n * text.hidden_size ** 2 + 2 * n * n * text.hidden_size + 2 * n * text.hidden_size * text.intermediate_size
    assert stats.paper_flops_before == pytest.approx(stats.videos * text.num_hidden_layers * per_layer(n0))
    assert 0 < stats.paper_flops_fraction <= stats.kept_fraction
    assert int(gen[0, 0]) == int(first)  # the first generated token is the merged forward's greedy answer


def test_generate_with_original_positions_continues_after_the_prompts_last_position(base):
    """positions='original' in generate: retain 1.0 is the unmodified generation (left-padded batch: HF's own
    padding-aware positions); merged, each step equals the merged forward + cached decode steps at positions
    L, L+1, ... of the *full* prompt (not of the shortened one)."""
    batch = _left_pad(_inputs(base, n=3))
    with torch.no_grad():
        ref = base.generate(**batch, max_new_tokens=3, do_sample=False)[:, -3:]
        ident = _opt(base, 1.0, positions="original").generate(**batch, max_new_tokens=3, do_sample=False)
    assert torch.equal(ident, ref)
    inputs = _inputs(base, n=1, seed=4)
    L = inputs["input_ids"].shape[1]
    opt = _opt(base, 0.25, positions="original")
    with torch.no_grad():
        gen = opt.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                           output_logits=True)
        out = opt(**inputs, use_cache=True)
        logits, cache = [out.logits[:, L - 1]], out.cache
        for i in range(2):
            tok = logits[-1].argmax(-1, keepdim=True)
            step = opt(input_ids=tok, cache=cache, position_ids=torch.tensor([[L + i]]), use_cache=True)
            logits.append(step.logits[:, -1])
    assert getattr(opt.module, STATS_ATTR).tokens_after < getattr(opt.module, STATS_ATTR).tokens_before
    for got, want in zip(gen.logits, logits):   # fp32, same kernels on the same shapes: 1e-5
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# ---- inner-LLM merging (spec §2) -----------------------------------------------------------------------------------


def _inner(model, **kw):
    return vopt.optimize(model, OptimizeConfig(pass_configs={"holitom": HoliTomPassConfig(**kw)}), passes=["holitom"])


def test_inner_config_validation():
    with pytest.raises(ConfigError, match="inner_keep"):
        HoliTomPassConfig(inner_layer=2, inner_keep=0.0)
    with pytest.raises(ConfigError, match="inner_layer"):
        HoliTomPassConfig(inner_layer=-1)
    with pytest.raises(ConfigError, match="nothing to do"):
        HoliTomPassConfig(outer=False)


def test_inner_layer_out_of_range_is_a_config_error(base):
    with pytest.raises(ConfigError, match="inner_layer=9 is out of range"):
        _inner(base, outer=False, inner_layer=9)


def test_inner_identity_at_keep_1_and_batch_rows_equal_single_rows(base):
    inputs = _inputs(base, n=4)   # right padding: rows of 39..43 real tokens, the same 33 video tokens each
    pos = vt.answer_positions(inputs["attention_mask"])
    rows = torch.arange(4)
    with torch.no_grad():
        ref = base(**inputs).logits
        same = _inner(base, outer=False, inner_layer=2, inner_keep=1.0)(**inputs).logits
        opt = _inner(base, outer=False, inner_layer=2, inner_keep=0.5)
        got = opt(**inputs).logits
        single = [opt(**{k: v[b:b + 1] for k, v in inputs.items()}).logits[0, pos[b]] for b in range(4)]
    assert (same - ref).abs().max().item() <= 1e-6            # keep=1 gathers every token: only copies
    assert got.shape == ref.shape                              # the last layer maps back to the input layout
    assert (got[rows, pos] - ref[rows, pos]).abs().max().item() > 1e-3   # and keep=0.5 really changed something
    for b in range(4):                                         # batch x padding: each row as if alone (fp32 order)
        assert (single[b] - got[b, pos[b]]).abs().max().item() <= 1e-5
    stats = getattr(opt.module, STATS_ATTR).inner
    assert stats.visual_before == 8 * 33 and stats.visual_after == 8 * 17   # ceil(0.5 x 33) per row; 4 + 4 x 1 rows
    from vopt.merging.flops import paper_prefill_flops

    text = base.config.get_text_config()
    f = lambda **kw: 8 * paper_prefill_flops(4, text.hidden_size, text.intermediate_size, 33, **kw)
    assert stats.paper_flops_before == pytest.approx(f())
    assert stats.paper_flops_after == pytest.approx(f(inner_layer=2, inner_keep=0.5))
    assert stats.paper_flops_after < stats.paper_flops_before
    assert any("inner K=2/4 keep=0.5" in m.what for r in opt.report.runtime_results for m in r.matches)


def test_inner_scores_equal_the_models_own_last_token_attention(base):
    """The importance (layer K's q/k + RoPE, GQA) equals HF eager attention probabilities of the last query."""
    from vopt.merging.inner import last_token_importance
    from vopt.passes.holitom import InnerMergeLayer

    inputs = _inputs(base, n=2)
    inputs["attention_mask"][:, -3:] = 0  # more right padding: the scoring query is each row's last real token
    K = 2
    model = vopt.optimize(base, passes=["sdpa"]).module  # a working copy whose attention we may switch
    model.config.get_text_config()._attn_implementation = "eager"
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
    last = inputs["attention_mask"].sum(1) - 1                                  # right padding: last real token
    want = out.attentions[K][torch.arange(2), :, last, :].float().mean(1)      # [B, L]
    # Recompute through the wrapper's own path on a freshly wrapped model.
    opt = _inner(base, outer=False, inner_layer=K, inner_keep=0.5)
    layer = opt.module.model.language_model.layers[K]
    assert isinstance(layer, InnerMergeLayer)
    captured = {}
    orig = last_token_importance

    def spy(q, k, key_mask=None, q_pos=None):
        captured["imp"] = orig(q, k, key_mask, q_pos)
        return captured["imp"]

    import vopt.merging.families.inner_llm as inner_llm

    inner_llm.last_token_importance = spy
    try:
        with torch.no_grad():
            opt(**inputs)
    finally:
        inner_llm.last_token_importance = orig
    torch.testing.assert_close(captured["imp"], want, rtol=0, atol=2e-6)  # fp32 softmax of the same logits


def test_inner_generate_batch_equals_single_rows(base):
    samples = scoring.qa_samples("test", 2, 5, 8, None)
    base.config.get_text_config().pad_token_id = base.config.get_text_config().pad_token_id or 0
    opt = _inner(base, outer=False, inner_layer=1, inner_keep=0.4)
    batch = scoring.model_inputs(base, samples)
    left = {k: v.clone() for k, v in batch.items()}
    # Left-pad row by row (generation continues after the last real token of each row).
    for b in range(2):
        n = int(batch["attention_mask"][b].sum())
        for key in ("input_ids", "attention_mask"):
            row = batch[key][b, :n]
            left[key][b] = torch.cat([torch.zeros(left[key].shape[1] - n, dtype=row.dtype), row])
    with torch.no_grad():
        gen = opt.generate(**left, max_new_tokens=4, do_sample=False)
        for b in range(2):
            n = int(batch["attention_mask"][b].sum())
            one = {"input_ids": batch["input_ids"][b:b + 1, :n], "attention_mask": batch["attention_mask"][b:b + 1, :n],
                   "pixel_values_videos": batch["pixel_values_videos"][b:b + 1]}
            alone = opt.generate(**one, max_new_tokens=4, do_sample=False)
            assert gen[b, -4:].tolist() == alone[0, -4:].tolist()
            first = opt(**one).logits[0, n - 1].argmax()
            assert int(alone[0, -4]) == int(first)   # the first new token is the merged forward's greedy answer
    assert getattr(opt.module, STATS_ATTR).inner.prefills == 5  # 1 batch + 2 single generates, 2 forwards: all merged


def test_outer_plus_inner_ragged_batch_equals_single_rows(base):
    """The outer stage leaves rows with different visual counts: the inner stage pads them with masked fillers."""
    inputs = _inputs(base, n=4, seed=3)
    pos = vt.answer_positions(inputs["attention_mask"])
    opt = _inner(base, merge=HoliTomConfig(retain_ratio=0.5), inner_layer=2, inner_keep=0.5)
    with torch.no_grad():
        out = opt(**inputs)
        single = [opt(**{k: v[b:b + 1] for k, v in inputs.items()}).logits[0, pos[b]] for b in range(4)]
    assert len(set(out.holitom.tokens_after)) > 1, "the outer stage should leave rows of different lengths here"
    for b in range(4):
        assert torch.isfinite(out.logits[b, pos[b]]).all()
        assert (single[b] - out.logits[b, pos[b]]).abs().max().item() <= 1e-5
    stats = getattr(opt.module, STATS_ATTR)
    assert stats.inner.visual_after < stats.inner.visual_before <= stats.tokens_after


# ---- vision attention scores (spec §1.1) ---------------------------------------------------------------------------


def test_scores_are_the_vision_layers_received_attention_pooled_like_the_features(base):
    """video_features_and_scores: features equal the model's own get_video_features bit for bit; scores equal the
    eager SigLIP attention probabilities of the selected layer (mean over heads and queries), pooled 4x4 -> 2x2 with
    the model's bilinear interpolation."""
    import copy
    import math

    from vopt.merging.families.llava_onevision import video_features_and_scores

    inputs = _inputs(base, n=2)
    pv = inputs["pixel_values_videos"]
    with torch.no_grad():
        feats, scores = video_features_and_scores(base, pv)
        want_feats = base.get_video_features(pv, return_dict=True).pooler_output
        eager = copy.deepcopy(base)
        eager.config.vision_config._attn_implementation = "eager"
        att = eager.model.vision_tower(pv.flatten(0, 1), output_attentions=True, return_dict=True).attentions[-1]
    assert torch.equal(feats, want_feats)
    received = att.float().mean(dim=(1, 2))                                   # [B*F, 16 patches]
    side = base.config.vision_config.image_size // base.config.vision_config.patch_size
    pooled = torch.nn.functional.interpolate(received.view(-1, 1, side, side), size=[math.ceil(side / 2)] * 2,
                                             mode="bilinear").reshape(scores.shape)
    torch.testing.assert_close(scores, pooled, rtol=0, atol=1e-6)           # fp32 softmax of the same logits
    assert float(scores.std()) > 0                                            # not a constant


def test_attention_scores_change_the_choice_vs_the_proxy(base):
    """tau=1.0 (no temporal merging): every frame's budget is chosen by score, so the scores decide the tokens."""
    inputs = _inputs(base, n=4)
    cfg = lambda scores: HoliTomPassConfig(merge=HoliTomConfig(retain_ratio=0.25, tau=1.0), scores=scores)
    run = lambda c: vopt.optimize(base, OptimizeConfig(pass_configs={"holitom": c}), passes=["holitom"])
    with torch.no_grad():
        a = run(cfg("attention"))(**inputs).holitom.merges
        p = run(cfg("proxy"))(**inputs).holitom.merges
    assert sum(not torch.equal(x.positions, y.positions) for x, y in zip(a, p)) >= 2
    with pytest.raises(ConfigError, match="scores"):
        HoliTomPassConfig(scores="cls")
