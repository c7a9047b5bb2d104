"""VidKVCache (vopt.kvcache.cache) and the ``vidkv`` runtime pass on tiny models.

Tiny llama: 2 layers, 2 KV heads, head dim 16, float32. Trained tiny LLaVA-OneVision: 4 layers, 2 KV heads, head dim
32, 39-token prompts (33 video placeholders). Everything runs on CPU in a few seconds.
"""
import copy

import pytest
import torch
from transformers import DynamicCache

import vopt
from vopt import zoo
from vopt.errors import ConfigError
from vopt.eval import video_task as vt
from vopt.kvcache import VidKVConfig, kivi_config, quantize_keys
from vopt.kvcache.cache import PackedKV, VidKVCache, VidKVLayer
from vopt.pass_protocol import PassContext
from vopt.passes.vidkv import FACTORY_ATTR, VidKVPass, VidKVPassConfig

GEN = dict(max_new_tokens=8, do_sample=False)


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def llama():
    return zoo.build("llama").model.eval()


@pytest.fixture(scope="module")
def video_model():
    return zoo.build("llava-onevision").model.eval()


def _ids(batch=1, T=20, seed=0, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, T), generator=g)


def _gen(model, ids, cache=None, **kw):
    with torch.no_grad():
        if cache is not None:
            kw["cache"] = cache
        return model.generate(input_ids=ids, **GEN, **kw)


# ---- generation on tiny llama ----------------------------------------------------------------------------------
@pytest.mark.parametrize("vidkv", [VidKVConfig(), VidKVConfig(mode="reference"), kivi_config(8)],
                         ids=["recommended", "reference", "kivi2"])
def test_nothing_quantized_equals_dynamic_cache(llama, vidkv):
    ids = _ids()
    cache = VidKVCache(llama.config, vidkv, residual_length=64)
    out = _gen(llama, ids, cache)
    assert torch.equal(out, _gen(llama, ids))
    assert cache.num_quantized_tokens == 0
    acc = cache.account()
    assert acc.codes == 0 and acc.scales == 0 and acc.full_precision > 0
    assert cache.get_seq_length() == ids.shape[1] + GEN["max_new_tokens"] - 1
    assert len(cache.layers) == llama.config.num_hidden_layers


def test_small_residual_quantizes_kivi_bits_exact(llama):
    ids = _ids()
    cache = VidKVCache(llama.config, kivi_config(8), residual_length=4)
    out = _gen(llama, ids, cache)
    assert out.shape == (1, 28)
    # 27 cached tokens, R = 4, blocks of 8: 16 at prefill (20 - 4), then the window grows to 11 < R + 8
    assert cache.num_quantized_tokens == 16
    q = cache.account(quantized_only=True)
    assert q.codes > 0
    bits = q.bits()
    # KIVI-2, G = 8: 2-bit codes + fp16 scale and zero per 8 elements = 2 + 32/8 bits, no index lists
    assert bits["codes"] == pytest.approx(2.0) and bits["scales"] == pytest.approx(4.0) and bits["indices"] == 0
    full = cache.account()
    L, H, D = 2, llama.config.num_key_value_heads, 16
    assert full.elements == 2 * L * H * 27 * D
    assert full.full_precision == 2 * L * H * (27 - 16) * D * 4  # float32 window
    assert full.total_bytes == q.total_bytes + full.full_precision


def test_small_residual_recommended_bits(llama):
    cfg = VidKVConfig(key_group_size=4, value_group_size=4)
    cache = VidKVCache(llama.config, cfg, residual_length=4)
    _gen(llama, _ids(), cache)
    assert cache.num_quantized_tokens == 20  # 16 at prefill, 4 more once the window reached R + 4 = 8
    b = cache.account(quantized_only=True).bits()
    # keys: 8 channels 2-bit + 8 rfft coefficients 1-bit = 1.5 bits; values: trits 5 per byte = 1.6 bits (+ padding)
    assert b["codes"] == pytest.approx((1.5 + 1.6) / 2, abs=0.02)
    # keys: fp16 scale+zero per 4 tokens on 8 channels, one fp16 scale per 4 on 8 coefficients; values: one fp16 per 4
    assert b["scales"] == pytest.approx(((8 * 8 + 8 * 4) / 16 + 4) / 2)
    assert b["indices"] > 0  # the per-head split (int16), stored once per layer


def test_batch_left_padding_rows_match_alone(llama):
    a, b = _ids(T=20, seed=1), _ids(T=14, seed=2)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 6, dtype=torch.long), b], 1)])
    mask = torch.cat([torch.ones(1, 20, dtype=torch.long), torch.cat([torch.zeros(1, 6), torch.ones(1, 14)], 1).long()])
    kw = dict(attention_mask=mask, pad_token_id=0)
    # nothing quantized: every row equals that row generated alone
    out = _gen(llama, ids, VidKVCache(llama.config, residual_length=64), **kw)
    assert torch.equal(out[0], _gen(llama, a)[0])
    assert torch.equal(out[1, 6:], _gen(llama, b)[0])
    # quantized (recommended, per-(sample, head) statistics): the unpadded row equals itself generated alone; a padded
    # row does not in general (its groups start at padded positions and mix pad K/V in), but rows never interact:
    cfg = VidKVConfig(key_group_size=4, value_group_size=4)
    out_q = _gen(llama, ids, VidKVCache(llama.config, cfg, residual_length=4), **kw)
    assert torch.equal(out_q[0], _gen(llama, a, VidKVCache(llama.config, cfg, residual_length=4))[0])
    other = ids.clone()
    other[1, 6:] = _ids(T=14, seed=3)
    out_o = _gen(llama, other, VidKVCache(llama.config, cfg, residual_length=4), **kw)
    assert torch.equal(out_o[0], out_q[0])


def test_beam_search(llama):
    ids = _ids()
    ref = _gen(llama, ids, num_beams=2)
    assert torch.equal(_gen(llama, ids, VidKVCache(llama.config, residual_length=64), num_beams=2), ref)
    out = _gen(llama, ids, VidKVCache(llama.config, kivi_config(8), residual_length=4), num_beams=2)
    assert out.shape == ref.shape


def test_reorder_and_select_are_exact():
    torch.manual_seed(0)
    layer = VidKVLayer(VidKVConfig(key_group_size=4, value_group_size=4), residual_length=2, protect_first=1)
    k, v = torch.randn(3, 2, 13, 16), torch.randn(3, 2, 13, 16)
    layer.update(k, v)
    layer.update(torch.randn(3, 2, 1, 16), torch.randn(3, 2, 1, 16))
    K, V = layer.full_kv()
    idx = torch.tensor([2, 0, 0])
    layer.reorder_cache(idx)
    K2, V2 = layer.full_kv()
    assert torch.equal(K2, K[idx]) and torch.equal(V2, V[idx])
    layer.batch_select_indices(torch.tensor([1, 2]))
    K3, _ = layer.full_kv()
    assert torch.equal(K3, K[idx][[1, 2]])
    layer.batch_repeat_interleave(2)
    assert torch.equal(layer.full_kv()[0], K[idx][[1, 2]].repeat_interleave(2, 0))


# ---- protection, append-only, API ------------------------------------------------------------------------------
def test_protected_first_tokens_bit_exact(llama):
    ids = _ids()
    dyn = DynamicCache(config=llama.config)
    _gen(llama, ids, dyn)
    cache = VidKVCache(llama.config, kivi_config(8), residual_length=4, protect_first=3)
    _gen(llama, ids, cache)
    for lv, ld in zip(cache.layers, dyn.layers):
        K, V = lv.full_kv()
        assert torch.equal(K[:, :, :3], ld.keys[:, :, :3]) and torch.equal(V[:, :, :3], ld.values[:, :, :3])
        assert not torch.equal(K[:, :, 3:11], ld.keys[:, :, 3:11])  # quantized
        assert lv.protected_pos.tolist() == [0, 1, 2]


def test_protected_indices_scatter_back_in_order():
    torch.manual_seed(1)
    layer = VidKVLayer(VidKVConfig(key_group_size=4, value_group_size=4), residual_length=2, protected=[3, 7, 8])
    k, v = torch.randn(2, 2, 15, 16), torch.randn(2, 2, 15, 16)
    K, V = layer.update(k, v)
    assert torch.equal(K, k) and torch.equal(V, v)  # prefill returns exact K/V
    kn, vn = torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16)
    K, V = layer.update(kn, vn)
    assert K.shape == (2, 2, 16, 16)
    assert torch.equal(K[:, :, [3, 7, 8]], k[:, :, [3, 7, 8]]) and torch.equal(V[:, :, [3, 7, 8]], v[:, :, [3, 7, 8]])
    assert torch.equal(K[:, :, -1:], kn) and torch.equal(V[:, :, -2:-1], v[:, :, -1:])  # window exact
    assert layer.num_quantized_tokens == 8  # 12 unprotected prefill tokens, R = 2: two blocks of 4
    # a bool mask is accepted too; out-of-range positions name the field
    m = torch.zeros(15, dtype=torch.bool)
    m[[3, 7, 8]] = True
    layer2 = VidKVLayer(VidKVConfig(key_group_size=4, value_group_size=4), residual_length=2, protected=m)
    layer2.update(k, v)
    assert torch.equal(layer2.update(kn, vn)[0], K)
    with pytest.raises(ConfigError, match="protected"):
        VidKVLayer(protected=[20]).update(k, v)


@pytest.mark.parametrize("vidkv", [VidKVConfig(key_group_size=4, value_group_size=4),
                                   VidKVConfig(mode="reference", key_group_size=4, value_group_size=4)],
                         ids=["recommended", "reference"])
def test_append_only_and_frozen_split(vidkv):
    torch.manual_seed(2)
    layer = VidKVLayer(vidkv, residual_length=4)
    k, v = torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
    layer.update(k, v)
    assert len(layer.blocks) == 1
    pk0, pv0 = layer.blocks[0]
    # the first block is exactly quantize_keys of those tokens (it ranks the channels)
    ref = quantize_keys(k[:, :, :8], vidkv)
    assert torch.equal(pk0.anomalous.words, ref.anomalous.words) and torch.equal(pk0.easy.words, ref.easy.words)
    words = [t.clone() for t in (pk0.anomalous.words, pk0.easy.words, pk0.anomalous.scale, pv0.codes.words)]
    split = layer.split_idx.clone()
    K0 = layer.full_kv()[0][:, :, :8].clone()
    for _ in range(9):  # drift: later tokens have other outlier channels
        layer.update(5 * torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16))
    assert len(layer.blocks) == 3
    pk, pv = layer.blocks[0]
    for a, b in zip(words, (pk.anomalous.words, pk.easy.words, pk.anomalous.scale, pv.codes.words)):
        assert torch.equal(a, b)
    assert torch.equal(layer.split_idx, split)  # frozen: never re-ranked
    assert layer.blocks[1][0].anomalous_idx is layer.split_idx
    assert torch.equal(layer.full_kv()[0][:, :, :8], K0)
    # the frozen-split path on the first block's tokens reproduces quantize_keys (same split -> same words)
    again = layer._quantize_keys_frozen(k[:, :, :8])
    assert torch.equal(again.anomalous.words, ref.anomalous.words) and torch.equal(again.easy.words, ref.easy.words)
    assert torch.equal(again.easy.scale, ref.easy.scale)
    assert layer.get_seq_length() == 21 and layer.get_mask_sizes(1) == (22, 0)


def test_requantize_flush_reproduces_reference_policy():
    torch.manual_seed(3)
    cfg = VidKVConfig(mode="reference", key_group_size=4, value_group_size=4)
    layer = VidKVLayer(cfg, residual_length=4, flush="requantize")
    k, v = torch.randn(1, 2, 10, 16), torch.randn(1, 2, 10, 16)
    layer.update(k, v)
    assert layer.num_quantized_tokens == 8 and layer.keys.shape[2] == 2  # prefill: every whole block, no R window
    words = layer.blocks[0][0].easy.words.clone()
    layer.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))  # window 3 < R
    assert layer.num_quantized_tokens == 8
    layer.update(5 * torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))  # window reaches R: re-quantize everything
    assert len(layer.blocks) == 1 and layer.num_quantized_tokens == 12 and layer.keys.shape[2] == 0
    assert not torch.equal(layer.blocks[0][0].easy.words[: words.numel()], words)  # old tokens re-quantized
    assert layer.get_seq_length() == 12
    with pytest.raises(ConfigError, match="flush"):
        VidKVLayer(flush="sometimes")
    with pytest.raises(ConfigError, match="flush"):
        VidKVPassConfig(flush="sometimes")


def test_crop_reset_and_config_errors(llama):
    cache = VidKVCache(llama.config, kivi_config(8), residual_length=4)
    _gen(llama, _ids(), cache)
    with pytest.raises(NotImplementedError, match="append-only"):
        cache.crop(-1)
    assert not cache.is_croppable
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.num_quantized_tokens == 0
    assert torch.equal(_gen(llama, _ids(), cache), _gen(llama, _ids(), VidKVCache(llama.config, kivi_config(8),
                                                                                  residual_length=4)))
    with pytest.raises(ConfigError, match="residual_length"):
        VidKVCache(llama.config, residual_length=-1)
    with pytest.raises(ConfigError, match="protect_first"):
        VidKVCache(llama.config, protect_first=1.5)
    with pytest.raises(ConfigError, match="value_group_size"):  # KIVI value groups must divide head dim 16
        _gen(llama, _ids(), VidKVCache(llama.config, kivi_config(32), residual_length=4))
    with pytest.raises(ConfigError, match="anomalous_fraction"):
        VidKVConfig(anomalous_fraction=2.0)
    with pytest.raises(ConfigError, match="residual_length"):
        VidKVPassConfig(residual_length=-3)
    with pytest.raises(ConfigError, match="num_layers"):
        VidKVCache(None)


# ---- the pass --------------------------------------------------------------------------------------------------
def test_pass_wraps_generate_on_the_copy_only(llama):
    cfg = vopt.OptimizeConfig(pass_configs={"vidkv": VidKVPassConfig(vidkv=kivi_config(8), residual_length=4)})
    opt = vopt.optimize(llama, cfg, passes=["vidkv"])
    res = opt.report.runtime_results[0]
    assert len(res.rewritten) == llama.config.num_hidden_layers
    assert "generate" not in vars(llama) and not hasattr(llama, FACTORY_ATTR)
    assert llama.config.use_cache is True
    ids = _ids()
    out = _gen(opt, ids)
    assert torch.equal(out, _gen(llama, ids, VidKVCache(llama.config, kivi_config(8), residual_length=4)))
    assert torch.equal(_gen(opt, ids, DynamicCache(config=llama.config)), _gen(llama, ids))  # caller's cache wins
    assert isinstance(getattr(opt, FACTORY_ATTR)(ids), VidKVCache)
    work = copy.deepcopy(opt.module).eager  # the whole llama is one captured stage; the wrapper follows a deep copy
    assert work.generate.__self__ is work and getattr(work, FACTORY_ATTR) is not getattr(opt, FACTORY_ATTR)
    assert torch.equal(_gen(work, ids), out)


def test_pass_skips_models_without_generate():
    res = VidKVPass().run_runtime(torch.nn.Linear(2, 2), PassContext())
    assert not res.rewritten and "generate" in res.skipped[0].reason


def test_pass_gives_videollm_online_a_packed_streaming_cache():
    """VideoLLM-online streams frames onto a caller-owned cache from ``new_cache()``: the pass makes that a
    VidKVCache on the working copy only, and streaming through the optimized model equals streaming the original
    onto the same kind of cache (the cache appends frame after frame: packed blocks plus the window)."""
    from vopt import zoo

    m = zoo.build("videollm-online", size="tiny").model.eval()
    vk = VidKVConfig(key_group_size=8, value_group_size=8)
    pc = VidKVPassConfig(vidkv=vk, residual_length=8, protect_text=True)
    opt = vopt.optimize(m, vopt.OptimizeConfig(pass_configs={"vidkv": pc}), passes=["vidkv"])
    res = next(r for r in opt.report.runtime_results if r.pass_name == "vidkv")
    assert len(res.rewritten) == m.language_model.config.num_hidden_layers
    assert "streaming" in res.rewritten[0].what and "not applied to a stream: protect_text" in res.rewritten[0].what
    assert "new_cache" not in vars(m) and not hasattr(m, FACTORY_ATTR)
    cache = opt.new_cache()
    assert isinstance(cache, VidKVCache)
    frames = torch.randn(1, 5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ref_cache = VidKVCache(m.language_model.config, vk, residual_length=8)
    with torch.no_grad():
        got = list(opt.stream(frames, cache))
        want = list(m.stream(frames, ref_cache))
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert torch.equal(opt.respond(got[-1], cache, 3), m.respond(want[-1], ref_cache, 3))
    assert cache.get_seq_length() == 5 * (1 + m.tokens_per_frame) + 3  # 5 frames, then 3 answer tokens
    assert cache.account().codes > 0  # frames were packed, not only windowed


# ---- the trained tiny video model ------------------------------------------------------------------------------
def _decode_step_answer(model, inp, cache):
    """The answer token computed by a decode step: prefill the prompt minus its last token, then that token."""
    ids, am = inp["input_ids"], inp["attention_mask"]
    with torch.no_grad():
        model(input_ids=ids[:, :-1], attention_mask=am[:, :-1], pixel_values_videos=inp["pixel_values_videos"],
              cache=cache, use_cache=True)
        return model(input_ids=ids[:, -1:], attention_mask=am, cache=cache, use_cache=True).logits[0, -1].argmax()


def test_video_model_agreement_table(video_model, capsys):
    m = video_model
    inputs = [vt.to_model_inputs([s]) for s in vt.make_split("test", 32)]
    with torch.no_grad():
        base_gen = [m.generate(**i, max_new_tokens=2, do_sample=False)[0, -2:] for i in inputs]
        base_ans = [m(**i).logits[0, -1].argmax() for i in inputs]
    modes = {"recommended": (VidKVConfig(), "append"), "reference": (VidKVConfig(mode="reference"), "append"),
             "reference+rq": (VidKVConfig(mode="reference"), "requantize"), "kivi2": (kivi_config(32), "append")}
    rows = {}
    for name, (vk, flush) in modes.items():
        pc = VidKVPassConfig(vidkv=vk, residual_length=4, flush=flush)
        opt = vopt.optimize(m, vopt.OptimizeConfig(pass_configs={"vidkv": pc}), passes=["vidkv"])
        with torch.no_grad():
            gen = [opt.generate(**i, max_new_tokens=2, do_sample=False)[0, -2:] for i in inputs]
        caches = [getattr(opt, FACTORY_ATTR)(i["input_ids"][:, :-1]) for i in inputs]
        ans = [_decode_step_answer(opt, i, c) for i, c in zip(inputs, caches)]
        assert all(c.num_quantized_tokens == 32 for c in caches)  # 38-token prefill: one block of 32 (both policies)
        q = caches[0].account(quantized_only=True)
        rows[name] = dict(
            tok1=sum(bool(g[0] == b[0]) for g, b in zip(gen, base_gen)) / len(inputs),
            tok2=sum(bool(g[1] == b[1]) for g, b in zip(gen, base_gen)) / len(inputs),
            answer=sum(bool(a == b) for a, b in zip(ans, base_ans)) / len(inputs),
            bits=q.bits_per_element, total=caches[0].account().bits_per_element)
    lines = [f"{'mode':<12}{'gen tok1':>9}{'gen tok2':>9}{'decode-step answer':>20}{'stored bits (quantized)':>25}"
             f"{'bits incl. fp32 window':>24}"]
    for name, r in rows.items():
        lines.append(f"{name:<12}{r['tok1']:>9.3f}{r['tok2']:>9.3f}{r['answer']:>20.3f}{r['bits']:>25.3f}"
                     f"{r['total']:>24.2f}")
    with capsys.disabled():
        print("\nvidkv on the trained tiny LLaVA-OV, 32 test clips, R=4, G=32 (32 of 39 tokens quantized)\n"
              + "\n".join(lines))
    # protect_text keeps BOS and the question (every non-video prompt position) in full precision
    pt = VidKVPassConfig(protect_text=True)
    opt = vopt.optimize(m, vopt.OptimizeConfig(pass_configs={"vidkv": pt}), passes=["vidkv"])
    ids = inputs[0]["input_ids"]
    cache = getattr(opt, FACTORY_ATTR)(ids)
    assert cache.layers[0].protected.tolist() == (ids[0] != m.config.video_token_id).tolist()
    for r in rows.values():
        assert r["tok1"] == 1.0  # prefill attends to exact K/V: the first generated token never changes
        assert 0.0 <= r["tok2"] <= 1.0 and 0.0 <= r["answer"] <= 1.0
    assert rows["kivi2"]["answer"] >= 0.8
    assert rows["kivi2"]["bits"] == pytest.approx(3.0)  # 2-bit codes + fp16 scale/zero per 32


# ---- fused decode: attention on the packed codes --------------------------------------------------------------
@pytest.mark.parametrize("cfg", [VidKVConfig(key_group_size=4, value_group_size=4),
                                 VidKVConfig(mode="reference", key_group_size=4, value_group_size=4), kivi_config(4)],
                         ids=["recommended", "reference", "kivi2"])
def test_decode_attention_equals_sdpa_over_the_dequantized_cache(cfg):
    """GQA (4 query heads / 2 KV heads), protected tokens out of order, a padding mask: same result as SDPA over
    full_kv() (the definition), to fp32 summation order (outputs are O(1): 2e-5)."""
    torch.manual_seed(2)
    layer = VidKVLayer(cfg, residual_length=3, protected=[1, 6, 7], fused_decode=True)
    layer.update(torch.randn(2, 2, 17, 16), torch.randn(2, 2, 17, 16))
    for _ in range(3):
        handle, same = layer.update(torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16))
    assert isinstance(handle, PackedKV) and handle is same and layer.num_quantized_tokens > 0
    q = torch.randn(2, 4, 1, 16)
    mask = torch.ones(2, 1, 1, 20, dtype=torch.bool)
    mask[1, :, :, :5] = False                                  # row 1 left-padded by 5
    K, V = layer.full_kv()
    for m in (None, mask, torch.zeros(2, 1, 1, 20).masked_fill(~mask, float("-inf"))):
        want = torch.nn.functional.scaled_dot_product_attention(q, K, V, attn_mask=m, enable_gqa=True)
        torch.testing.assert_close(layer.decode_attention(q, m), want, rtol=0, atol=2e-5)


def test_fused_decode_generation_equals_dequantized_generation(video_model, monkeypatch):
    """The vidkv pass with fused_decode on the trained video model: the same tokens as dequantize-then-attend, with
    a window small enough that decode steps really read packed blocks; the caller's attention config untouched."""
    from vopt.eval import scoring

    seen = []
    real = VidKVLayer.decode_attention
    monkeypatch.setattr(VidKVLayer, "decode_attention",
                        lambda self, *a, **k: seen.append(self.num_quantized_tokens) or real(self, *a, **k))

    inputs = scoring.model_inputs(video_model, scoring.qa_samples("test", 1, 3, 8, None))
    before = video_model.config.get_text_config()._attn_implementation
    outs = []
    for fused in (False, True):
        cfg = VidKVPassConfig(vidkv=VidKVConfig(key_group_size=16, value_group_size=16), residual_length=8,
                              protect_text=True, fused_decode=fused)
        opt = vopt.optimize(video_model, vopt.OptimizeConfig(pass_configs={"vidkv": cfg}), passes=["vidkv"])
        with torch.no_grad():
            outs.append(opt.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False))
        if fused:
            assert opt.module.config.get_text_config()._attn_implementation == "vopt_vidkv_sdpa"
            cache = getattr(opt.module, FACTORY_ATTR)(inputs["input_ids"])
            assert all(layer.fused_decode for layer in cache.layers)
    assert torch.equal(outs[0], outs[1])
    assert len(seen) == 11 * 4 and min(seen) >= 16   # 11 decode steps x 4 layers, each over >= 1 packed block
    assert video_model.config.get_text_config()._attn_implementation == before
