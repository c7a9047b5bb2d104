"""Salient visual-token protection: vopt.kvcache.salience and the ``vidkv`` pass's ``protect_salient``.

Scoring functions on constructed inputs; the pass on the trained tiny LLaVA-OneVision (39-token prompts: BOS, 33 video
placeholders, 5 question tokens), measured like tests/test_vidkv_cache.py's agreement table (decode-step answer).
"""
import pytest
import torch

import vopt
from vopt import zoo
from vopt.errors import ConfigError
from vopt.eval import video_task as vt
from vopt.kvcache import (VidKVConfig, by_last_token_attention, by_random, by_text_similarity, salient_visual_tokens,
                          top_fraction)
from vopt.kvcache.salience import fraction_count
from vopt.passes.vidkv import FACTORY_ATTR, SALIENCE_ATTR, VidKVPassConfig


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


# ---- scoring functions -----------------------------------------------------------------------------------------
def test_text_similarity_picks_planted_tokens():
    g = torch.Generator().manual_seed(0)
    D = 16
    text = torch.randn(3, D, generator=g)
    visual = 0.1 * torch.randn(20, D, generator=g)
    planted = [3, 11, 17]
    for i in planted:
        visual[i] = text.mean(0) * 3 + 0.01 * torch.randn(D, generator=g)
    for metric in ("dot", "cosine"):
        for reduce in ("mean", "max"):
            idx = by_text_similarity(visual, text, 0.15, metric=metric, reduce=reduce)  # 0.15*20 = 3
            assert idx.tolist() == planted, (metric, reduce)
            assert idx.dtype == torch.long
    # dot vs cosine differ: a long vector in a slightly worse direction wins on dot only
    v = torch.tensor([[1.0, 0.0], [10.0, 5.0]])
    t = torch.tensor([[1.0, 0.0]])
    assert by_text_similarity(v, t, 0.5, metric="dot").tolist() == [1]
    assert by_text_similarity(v, t, 0.5, metric="cosine").tolist() == [0]
    # mean vs max over text tokens
    t2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    v2 = torch.tensor([[1.5, 0.0], [0.0, 1.0]])
    assert by_text_similarity(v2, t2, 0.5, reduce="max").tolist() == [0]
    assert by_text_similarity(v2, t2, 0.5, reduce="mean").tolist() == [1]
    assert salient_visual_tokens("text_similarity", 0.15, visual_embeds=visual, text_embeds=text).tolist() == planted


def test_fraction_rounding_and_ties():
    assert [fraction_count(f, 33) for f in (0.0, 0.01, 0.2, 0.25, 0.5, 1.0)] == [0, 1, 7, 8, 17, 33]
    assert fraction_count(0.5, 0) == 0
    scores = torch.tensor([1.0, 5.0, 5.0, 2.0, 5.0, 5.0])
    assert top_fraction(scores, 0.5).tolist() == [1, 2, 4]   # 4 tied at 5.0: the earliest three
    assert top_fraction(torch.zeros(8), 0.25).tolist() == [0, 1]  # all tied: by position
    assert top_fraction(torch.tensor([0.0, float("nan"), 1.0]), 0.67).tolist() == [0, 2]  # NaN ranks last
    assert top_fraction(scores, 0.0).numel() == 0
    # deterministic: same call, same answer
    v = torch.randn(50, 8, generator=torch.Generator().manual_seed(1))
    t = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(by_text_similarity(v, t, 0.3), by_text_similarity(v, t, 0.3))
    r = by_random(33, 0.25, seed=3)
    assert r.tolist() == sorted(set(r.tolist())) and r.numel() == 8 and torch.equal(r, by_random(33, 0.25, seed=3))


def test_last_token_attention():
    # given weights [layers, heads, T]: averaged, restricted to visual_index
    w = torch.zeros(2, 2, 10)
    w[0, 0, 4] = 1.0
    w[1, 1, 7] = 0.9
    w[:, :, 0] = 5.0  # a non-visual sink: excluded by visual_index
    vis = torch.arange(2, 10)
    idx = by_last_token_attention(0.25, w, visual_index=vis)  # 2 of 8
    assert vis[idx].tolist() == [4, 7]
    # from q_last / keys with GQA (4 query heads, 2 KV heads): the key aligned with every head's query wins
    D, T = 8, 12
    keys = torch.zeros(2, T, D)
    keys[:, 5] = 4.0
    keys[:, 9] = 3.0
    q = torch.ones(4, D)
    assert by_last_token_attention(2 / 12, q_last=q, keys=keys).tolist() == [5, 9]
    mask = torch.ones(T, dtype=torch.bool)
    mask[5] = False  # a padded key gets weight 0
    assert by_last_token_attention(2 / 12, q_last=q, keys=keys, key_mask=mask).tolist() == [0, 9]
    # leading layer axis
    assert by_last_token_attention(1 / 12, q_last=q.expand(3, 4, D), keys=keys.expand(3, 2, T, D)).tolist() == [5]


@pytest.mark.parametrize("call, name", [
    (lambda: by_text_similarity(torch.zeros(4, 8), torch.zeros(2, 8), 1.5), "fraction"),
    (lambda: by_text_similarity(torch.zeros(4, 8), torch.zeros(2, 8), True), "fraction"),
    (lambda: by_text_similarity(torch.zeros(4), torch.zeros(2, 8), 0.5), "visual_embeds"),
    (lambda: by_text_similarity(torch.zeros(4, 8), torch.zeros(2, 4), 0.5), "text_embeds"),
    (lambda: by_text_similarity(torch.zeros(4, 8), torch.zeros(0, 8), 0.5), "text_embeds"),
    (lambda: by_text_similarity(torch.zeros(4, 8), torch.zeros(2, 8), 0.5, metric="l2"), "metric"),
    (lambda: by_text_similarity(torch.zeros(4, 8), torch.zeros(2, 8), 0.5, reduce="sum"), "reduce"),
    (lambda: by_last_token_attention(0.5), "attn_weights"),
    (lambda: by_last_token_attention(0.5, torch.zeros(4), q_last=torch.zeros(2, 8), keys=torch.zeros(2, 4, 8)),
     "attn_weights"),
    (lambda: by_last_token_attention(0.5, q_last=torch.zeros(3, 8), keys=torch.zeros(2, 4, 8)), "q_last"),
    (lambda: by_last_token_attention(0.5, q_last=torch.zeros(2, 8), keys=torch.zeros(2, 4, 6)), "keys"),
    (lambda: by_last_token_attention(0.5, torch.zeros(4), visual_index=torch.tensor([5])), "visual_index"),
    (lambda: by_random(-1, 0.5), "n_visual"),
    (lambda: salient_visual_tokens("saliency", 0.5), "method"),
    (lambda: VidKVPassConfig(protect_salient=2.0).validate(), "protect_salient"),
    (lambda: VidKVPassConfig(protect_salient=0.2, salience="x").validate(), "salience"),
])
def test_errors_name_the_argument(call, name):
    with pytest.raises(ConfigError, match=name):
        call()


# ---- the pass on the trained tiny video model ------------------------------------------------------------------
@pytest.fixture(scope="module")
def video_model():
    return zoo.build("llava-onevision").model.eval()


# G=8 so that a prompt with 8 protected tokens still has whole blocks to quantize (30 unprotected - R=4 -> 24)
_VK = dict(key_group_size=8, value_group_size=8)


def _decode_step_logits(model, inp, cache):
    """As tests/test_vidkv_cache.py: prefill the prompt minus its last token, then that token as a decode step."""
    ids, am = inp["input_ids"], inp["attention_mask"]
    with torch.no_grad():
        model(input_ids=ids[:, :-1], attention_mask=am[:, :-1], pixel_values_videos=inp["pixel_values_videos"],
              cache=cache, use_cache=True)
        return model(input_ids=ids[:, -1:], attention_mask=am, cache=cache, use_cache=True).logits[0, -1].float()


def _check_protected(caches, inputs, vid):
    for c, i in zip(caches, inputs):
        assert getattr(c, SALIENCE_ATTR, None) is None  # request consumed at prefill
        ids = i["input_ids"][0, :-1]
        pos = c.layers[0].protected_pos
        # 8 = round(0.25 * 33) visual positions kept in full precision in every layer, nothing else protected
        assert pos.numel() == 8 and bool((ids[pos] == vid).all())
        assert all(torch.equal(layer.protected_pos, pos) for layer in c.layers)
        assert c.num_quantized_tokens == 24  # 38 - 8 protected = 30; R=4 -> 3 blocks of 8
    c0 = caches[0]
    L, H, D = 4, 2, 32
    assert c0.account().unquantized == 8 * 2 * L * H * D * 4  # 8 tokens, K and V, fp32: the protected bytes
    for layer in c0.layers:  # the protected K/V come back bit-exact at their positions
        k, v = layer.full_kv()
        assert torch.equal(k[:, :, layer.protected_pos], layer.protected_keys)
        assert torch.equal(v[:, :, layer.protected_pos], layer.protected_values)


def test_video_model_salient_protection_table(video_model, capsys):
    m = video_model
    vid = m.config.video_token_id
    inputs = [vt.to_model_inputs([s]) for s in vt.make_split("test", 32)]
    with torch.no_grad():
        base = [m(**i).logits[0, -1].float() for i in inputs]
    settings = {"none (p=0)": dict(), "text_similarity 0.25": dict(protect_salient=0.25),
                "last_token_attn 0.25": dict(protect_salient=0.25, salience="last_token_attention")}
    seeds = range(4)
    settings.update({f"random 0.25 seed {s}": dict(protect_salient=0.25, salience="random", salience_seed=s)
                     for s in seeds})
    modes = {"recommended": VidKVConfig(**_VK), "reference": VidKVConfig(mode="reference", **_VK)}
    rows, prot0 = {}, {}
    for mode, vk in modes.items():
        for name, kw in settings.items():
            pc = VidKVPassConfig(vidkv=vk, residual_length=4, **kw)
            opt = vopt.optimize(m, vopt.OptimizeConfig(pass_configs={"vidkv": pc}), passes=["vidkv"])
            if kw:
                assert f"protect_salient=0.25 salience={pc.salience}" in opt.report.runtime_results[0].rewritten[0].what
            caches = [getattr(opt, FACTORY_ATTR)(i["input_ids"][:, :-1]) for i in inputs]
            logits = [_decode_step_logits(opt, i, c) for i, c in zip(inputs, caches)]
            if kw:
                _check_protected(caches, inputs, vid)
            else:
                assert all(c.layers[0].protected_pos is None and c.num_quantized_tokens == 32 for c in caches)
            kl = sum(torch.nn.functional.kl_div(lg.log_softmax(-1), b.log_softmax(-1), log_target=True,
                                                reduction="sum").item() for lg, b in zip(logits, base)) / len(inputs)
            rows[(mode, name)] = dict(answer=sum(bool(lg.argmax() == b.argmax()) for lg, b in zip(logits, base))
                                      / len(inputs), kl=kl, quantized=caches[0].num_quantized_tokens,
                                      bits=caches[0].account().bits_per_element)
            pp = caches[0].layers[0].protected_pos
            prot0[name] = [] if pp is None else pp.tolist()
        rnd = [rows[(mode, f"random 0.25 seed {s}")] for s in seeds]
        rows[(mode, "random 0.25 mean")] = dict(answer=sum(r["answer"] for r in rnd) / len(rnd),
                                                kl=sum(r["kl"] for r in rnd) / len(rnd), quantized=24,
                                                bits=rnd[0]["bits"])
    lines = [f"{'mode':<13}{'protection':<24}{'answer agree':>13}{'KL(exact||q)':>14}{'quant tok':>10}"
             f"{'bits incl. fp32':>16}"]
    for (mode, name), r in rows.items():
        lines.append(f"{mode:<13}{name:<24}{r['answer']:>13.3f}{r['kl']:>14.4f}{r['quantized']:>10d}{r['bits']:>16.2f}")
    with capsys.disabled():
        print("\nvidkv (G=8, R=4) on the trained tiny LLaVA-OV, 32 test clips, 38-token prefill (33 visual); "
              "decode-step answer vs the exact model\n" + "\n".join(lines)
              + "\nprotected positions, clip 0: " + "; ".join(f"{k}: {v}" for k, v in prot0.items()))
    # salient choices differ from the random control; no accuracy claim (1 clip = 0.031; see the report)
    assert prot0["text_similarity 0.25"] != prot0["random 0.25 seed 0"]
    for r in rows.values():
        assert 0.0 <= r["answer"] <= 1.0 and r["kl"] >= -1e-6


def test_salient_union_with_protect_text_and_generate(video_model):
    m = video_model
    inp = vt.to_model_inputs([vt.make_split("test", 1)[0]])
    pc = VidKVPassConfig(vidkv=VidKVConfig(**_VK), residual_length=4, protect_first=1, protect_text=True,
                         protect_salient=0.25)
    opt = vopt.optimize(m, vopt.OptimizeConfig(pass_configs={"vidkv": pc}), passes=["vidkv"])
    ids = inp["input_ids"][:, :-1]
    cache = getattr(opt, FACTORY_ATTR)(ids)
    _decode_step_logits(opt, inp, cache)
    pos = cache.layers[0].protected_pos.tolist()
    text = (ids[0] != m.config.video_token_id).nonzero().reshape(-1).tolist()
    assert set(text) <= set(pos) and len(pos) == len(text) + 8
    # generate() goes through the wrapper; the first token is unchanged (prefill attends to exact K/V)
    with torch.no_grad():
        out = opt.generate(**inp, max_new_tokens=2, do_sample=False)
        ref = m.generate(**inp, max_new_tokens=2, do_sample=False)
    assert out[0, -2] == ref[0, -2]
    # the caller's model is untouched: no hook on its decoder
    assert not m.get_decoder()._forward_pre_hooks
