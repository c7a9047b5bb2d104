"""T2Vid zoo entries: Idefics3 (169 tokens/frame, <= 65 frames) and MiniCPM-V-2.5 style (96 tokens/frame, <= 90 frames)."""
import pytest
import torch

import vopt
from vopt import zoo
from vopt.errors import ConfigError
from vopt.zoo import t2vid_minicpm
from vopt.zoo.t2vid_minicpm import Resampler, sincos_2d


@pytest.fixture(scope="module")
def idefics():
    return zoo.build("t2vid")


@pytest.fixture(scope="module")
def minicpm():
    return zoo.build("t2vid-minicpm")


def lm_embeds(module, model, inputs):
    """The inputs_embeds ``module`` (the LM) receives when ``model(**inputs)`` runs."""
    seen = {}
    handle = module.register_forward_pre_hook(lambda m, a, kw: seen.update(e=kw["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return seen["e"]


# ---- Idefics3 ---------------------------------------------------------------------------------------------------

def test_idefics3_full_dims_and_169_tokens_per_frame():
    zm = zoo.build("t2vid", "full")
    cfg = zm.model.config
    vc, tc = cfg.vision_config, cfg.text_config
    assert (vc.num_hidden_layers, vc.hidden_size, vc.num_attention_heads, vc.intermediate_size) == (27, 1152, 16, 4304)
    assert vc.hidden_size // vc.num_attention_heads == 72 and (vc.image_size, vc.patch_size, cfg.scale_factor) == (364, 14, 2)
    assert (tc.num_hidden_layers, tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads) == (32, 4096, 32, 8)
    assert (tc.intermediate_size, tc.vocab_size) == (14336, 128259)
    assert zm.model.model.image_seq_len == 169 == (364 // 14) ** 2 // 4
    assert zm.visual_tokens(1) == 169 and zm.visual_tokens(24) == 4056 and zm.visual_tokens(65) == 65 * 169
    assert zm.default_frames == 24
    c = zoo.cost("t2vid")
    assert c.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 128 * 1024
    assert 8.4e9 < c.params < 8.5e9                                          # Idefics3-8B-Llama3: 8.46B
    assert set(c.prefill_flops_per_stage) == {"vision_model", "connector", "text_model", "lm_head"}


def test_idefics3_frames_reach_the_llm(idefics):
    inputs = idefics.example_inputs(batch=2, frames=3)
    ids = inputs["input_ids"]
    assert ((ids == 500).sum(1) == 3 * 4).all() and ((ids == 501).sum(1) == 3 * 2).all()
    inner = idefics.model.model
    embeds = lm_embeds(inner.text_model, idefics.model, inputs)
    with torch.no_grad():
        feats = inner.connector(inner.vision_model(inputs["pixel_values"].flatten(0, 1)).last_hidden_state)
    assert feats.shape == (6, 4, 64)
    assert torch.allclose(embeds[ids == 500], feats.reshape(-1, 64), atol=1e-6)
    with torch.no_grad():
        assert idefics.model(**inputs).logits.shape == (2, ids.shape[1], 512)
        assert idefics.model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3


def test_idefics3_frame_cap(idefics):
    assert idefics.example_inputs(frames=65)["pixel_values"].shape[1] == 65
    with pytest.raises(ConfigError, match="frames must be <= 65"):
        idefics.example_inputs(frames=66)
    with pytest.raises(ConfigError, match="frames"):
        idefics.visual_tokens(66)
    with pytest.raises(ConfigError, match="batch"):
        idefics.example_inputs(batch=0)


def test_idefics3_is_captured_per_stage(idefics):
    """The idefics3 adapter exports vision_model, connector and text_model separately, exactly."""
    inputs = idefics.example_inputs(frames=2)
    with torch.no_grad():
        ref = idefics.model(**inputs).logits
    opt = vopt.optimize(idefics.model, passes=[], example_inputs=inputs)
    assert opt.report.adapter == "idefics3"
    assert {ev.stage: ev.exported for ev in opt.report.stage_events} == {"vision_model": True, "connector": True, "text_model": True}
    with torch.no_grad():
        assert (opt(**inputs).logits - ref).abs().max() <= 1e-5


# ---- MiniCPM-V-2.5 style ----------------------------------------------------------------------------------------

def test_minicpm_full_dims_and_96_tokens_per_frame():
    zm = zoo.build("t2vid-minicpm", "full")
    m = zm.model
    vc, tc = m.vision.config, m.language_model.config
    assert (vc.num_hidden_layers, vc.hidden_size, vc.num_attention_heads, vc.intermediate_size, vc.patch_size) == (27, 1152, 16, 4304, 14)
    assert vc.image_size == 448 and not any("head" in n for n, _ in m.vision.named_modules())
    r = m.resampler
    assert (r.num_queries, r.attn.embed_dim, r.attn.num_heads, r.attn.head_dim, r.kv_proj.in_features) == (96, 4096, 32, 128, 1152)
    assert r.pos_embed.shape == (32 * 32, 4096)
    assert (tc.num_hidden_layers, tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads) == (32, 4096, 32, 8)
    assert (tc.intermediate_size, tc.vocab_size) == (14336, 128256)
    assert zm.visual_tokens(1) == 96 and zm.visual_tokens(24) == 2304 and zm.visual_tokens(90) == 8640
    with pytest.raises(ConfigError, match="frames must be <= 90"):
        zm.visual_tokens(91)
    c = zoo.cost("t2vid-minicpm")
    assert c.kv_bytes_per_token == 128 * 1024
    assert 8.45e9 < c.params < 8.6e9                                         # MiniCPM-Llama3-V-2.5: 8.54B
    assert c.params_per_stage["resampler"] == 96 * 4096 + 1152 * 4096 + 4 * 4096 * 4096 + 4 * 4096 + 3 * 2 * 4096 + 4096 * 4096


def test_minicpm_tiny_frames_reach_the_llm_in_order(minicpm):
    inputs = minicpm.example_inputs(frames=3)
    ids = inputs["input_ids"]
    assert (ids == 500).sum() == 3 * 8 and (ids == 501).sum() == 3 and (ids == 502).sum() == 3
    m = minicpm.model
    embeds = lm_embeds(m.language_model, m, inputs)
    with torch.no_grad():
        feats = m.resampler(m.vision(pixel_values=inputs["pixel_values_videos"][0]).last_hidden_state)
        assert feats.shape == (3, 8, 64)
        assert torch.equal(embeds[ids == 500], feats.reshape(-1, 64))
        logits = m(**inputs)
        assert logits.shape == (1, ids.shape[1], 512)
        new = m.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert new.shape == (1, 3)


def test_minicpm_resampler_is_one_sdpa_and_matches_a_reference():
    torch.manual_seed(0)
    r = Resampler(num_queries=5, embed_dim=32, num_heads=4, kv_dim=24, grid=3).eval()
    x = torch.randn(2, 9, 24)
    with torch.no_grad():
        got = r(x)
        kv = r.ln_kv(r.kv_proj(x))
        q = r.ln_q(r.query).expand(2, -1, -1)
        ref = r.attn(q, kv + r.pos_embed, kv, need_weights=True)[0]   # the non-SDPA path: same numbers
        ref = r.ln_post(ref) @ r.proj
    assert got.shape == (2, 5, 32) and torch.allclose(got, ref, atol=1e-5)
    ep = torch.export.export(r, (x,), strict=False)
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.aten.scaled_dot_product_attention.default) == 1


def test_minicpm_sincos_positions():
    pe = sincos_2d(8, 3)
    assert pe.shape == (9, 8)
    assert torch.equal(pe[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))          # row 0, col 0: sin 0, cos 0
    assert torch.equal(pe[1, :4], pe[0, :4]) and not torch.equal(pe[1, 4:], pe[0, 4:])   # same row, next column
    with pytest.raises(ConfigError, match="multiple of 4"):
        sincos_2d(6, 3)


def test_minicpm_errors(minicpm):
    with pytest.raises(ConfigError, match="frames must be <= 90"):
        minicpm.example_inputs(frames=91)
    with pytest.raises(ConfigError, match="frames"):
        minicpm.example_inputs(frames=0)
    inputs = minicpm.example_inputs(frames=2)
    with pytest.raises(ValueError, match="placeholders"):
        minicpm.model(inputs["input_ids"], torch.cat([inputs["pixel_values_videos"]] * 2, dim=1))
    with pytest.raises(ValueError, match="pixel_values_videos"):
        minicpm.model(inputs["input_ids"], inputs["pixel_values_videos"][0])
    assert t2vid_minicpm.MAX_FRAMES == 90
