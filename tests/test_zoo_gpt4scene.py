"""GPT4Scene zoo entry: frames (video) and BEV (image) both reach the LLM, full Qwen2-VL-7B dims, FLOP stand-in."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vopt import zoo
from vopt.errors import ConfigError
from vopt.zoo import gpt4scene


@pytest.fixture(scope="module")
def tiny():
    return zoo.build("gpt4scene")


def llm_inputs(zm, inputs):
    """The (inputs_embeds, position_ids) the language model receives."""
    seen = {}

    def hook(module, args, kwargs):
        seen.update(embeds=kwargs["inputs_embeds"], positions=kwargs["position_ids"])

    handle = zm.model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            zm.model(**inputs)
    finally:
        handle.remove()
    return seen["embeds"], seen["positions"]


def test_placeholder_counts_match_frames_and_bev(tiny):
    cfg = tiny.model.config
    for frames in (1, 3, 8):
        inputs = tiny.example_inputs(batch=2, frames=frames)
        ids = inputs["input_ids"]
        assert ((ids == cfg.video_token_id).sum(1) == frames * 6).all()        # 16x24 px, patch 4, 2x2 merge -> 2x3
        assert ((ids == cfg.image_token_id).sum(1) == 9).all()                 # 24x24 px -> 3x3
        assert ((ids == cfg.vision_start_token_id).sum(1) == 2).all()
        assert tiny.visual_tokens(frames) == frames * 6 + 9
        types = inputs["mm_token_type_ids"]
        assert torch.equal(types == 2, ids == cfg.video_token_id) and torch.equal(types == 1, ids == cfg.image_token_id)
        assert inputs["video_grid_thw"].tolist() == [[frames, 4, 6]] * 2
        assert inputs["image_grid_thw"].tolist() == [[1, 6, 6]] * 2


def test_bev_and_frames_both_reach_the_llm(tiny):
    cfg = tiny.model.config
    inputs = tiny.example_inputs(frames=4)
    embeds, positions = llm_inputs(tiny, inputs)
    ids = inputs["input_ids"]
    with torch.no_grad():
        video = tiny.model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output[0]
        bev = tiny.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output[0]
    assert torch.equal(embeds[ids == cfg.video_token_id], video)
    assert torch.equal(embeds[ids == cfg.image_token_id], bev)
    assert positions.shape == (3, 1, ids.shape[1])                             # M-RoPE: t, h, w rows
    bev_pos = positions[:, 0, (ids == cfg.image_token_id)[0]]
    assert (bev_pos[0] == bev_pos[0, 0]).all() and len(set(bev_pos[2].tolist())) == 3   # one image: one t, a 3-wide grid
    # Changing either input changes the last position's logits.
    with torch.no_grad():
        ref = tiny.model(**inputs).logits[:, -1]
        for key in ("pixel_values", "pixel_values_videos"):
            changed = dict(inputs, **{key: inputs[key] + 1.0})
            assert (tiny.model(**changed).logits[:, -1] - ref).abs().max() > 1e-4, key


def test_tiny_forward_and_generate(tiny):
    inputs = tiny.example_inputs(batch=2)
    with torch.no_grad():
        out = tiny.model(**inputs)
        assert out.logits.shape == (2, inputs["input_ids"].shape[1], 512)
        gen = tiny.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert gen.shape[0] == 2 and gen.shape[1] > inputs["input_ids"].shape[1]


def test_flop_stand_in_equals_the_real_vit(tiny):
    inputs = tiny.example_inputs(frames=3)
    visual = tiny.model.model.visual
    with torch.no_grad():
        real = FlopCounterMode(display=False)
        with real:
            visual(inputs["pixel_values_videos"], grid_thw=inputs["video_grid_thw"])
            visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        proxy = FlopCounterMode(display=False)
        with proxy:
            gpt4scene.VarlenVisionFlops(visual, [(3, 24), (1, 36)])(inputs["pixel_values_videos"], inputs["pixel_values"])
    assert proxy.get_total_flops() == real.get_total_flops() > 0


def test_full_size_dims_are_qwen2_vl_7b():
    zm = zoo.build("gpt4scene", "full")
    vc, tc = zm.model.config.vision_config, zm.model.config.text_config
    assert (vc.depth, vc.embed_dim, vc.num_heads, vc.embed_dim // vc.num_heads) == (32, 1280, 16, 80)
    assert (vc.patch_size, vc.temporal_patch_size, vc.spatial_merge_size, vc.hidden_size, vc.mlp_ratio) == (14, 2, 2, 3584, 4)
    assert (tc.num_hidden_layers, tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads) == (28, 3584, 28, 4)
    assert (tc.intermediate_size, tc.vocab_size) == (18944, 152064)
    assert sum(tc.rope_parameters["mrope_section"]) == tc.hidden_size // tc.num_attention_heads // 2 == 64
    assert zm.default_frames == 32
    assert zm.visual_tokens(32) == 32 * 252 + 324 == 8388        # 392x504 -> 14x18 per frame; BEV 504x504 -> 18x18
    assert zm.llm.kv_heads * zm.llm.head_dim * zm.llm.layers * 2 * 2 == 56 * 1024
    c = zoo.cost("gpt4scene")
    assert c.params_per_stage["visual"] == 675_759_104             # the "ViT 675M"
    assert 8.2e9 < c.params < 8.35e9                               # Qwen2-VL-7B: 8.29B
    assert c.kv_bytes_per_token == 56 * 1024 and c.visual_tokens == 8388
    assert c.prefill_flops_per_stage["visual"] > 0 and c.prefill_flops_per_stage["language_model"] > 0


def test_errors_name_the_argument(tiny):
    with pytest.raises(ConfigError, match="frames"):
        tiny.example_inputs(frames=0)
    with pytest.raises(ConfigError, match="batch"):
        tiny.example_inputs(batch=-1)
    with pytest.raises(ValueError, match="multiple of"):
        gpt4scene.patch_grid((30, 24), tiny.model.config.vision_config)
