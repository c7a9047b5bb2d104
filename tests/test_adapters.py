"""Model-family adapters: each declared family captures its stages and stays exact.

Tiny configs from shared/specs/environment.md §6 (random weights). Qwen2-VL's
varlen vision tower does not export (data-dependent cu_seqlens): it must run
eagerly with the reason in the report while its language model is captured.
"""
import pytest
import torch

import vopt
from vopt.adapters import adapter_names, find_adapter

V, IMG, VID, FRAMES = 512, 500, 501, 4
TXT = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=1024)
CLIP_V = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
              projection_dim=32)


def ids(n, tok, pre=(1, 5, 6), suf=(7, 8, 9)):
    return torch.tensor([list(pre) + [tok] * n + list(suf)])


def qwen2_vl():
    import transformers as T

    text = dict(**TXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, mlp_ratio=2)
    cfg = T.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=IMG, video_token_id=VID,
                          vision_start_token_id=502, vision_end_token_id=503)
    t, h, w = FRAMES // 2, 4, 4
    x = ids(t * h * w // 4, VID, pre=(1, 502), suf=(503, 7, 8))
    inputs = dict(input_ids=x, pixel_values_videos=torch.randn(t * h * w, 3 * 2 * 4 * 4),
                  video_grid_thw=torch.tensor([[t, h, w]]), mm_token_type_ids=(x == VID).long() * 2)
    return T.Qwen2VLForConditionalGeneration(cfg), inputs


def llava_next_video():
    import transformers as T

    cfg = T.LlavaNextVideoConfig(text_config=dict(model_type="llama", **TXT), vision_config=dict(model_type="clip_vision_model", **CLIP_V),
                                 image_token_index=IMG, video_token_index=VID, image_grid_pinpoints=[[32, 32]],
                                 spatial_pool_stride=2, vision_feature_layer=-2)
    return T.LlavaNextVideoForConditionalGeneration(cfg), dict(input_ids=ids(FRAMES * 4, VID),
                                                              pixel_values_videos=torch.randn(1, FRAMES, 3, 32, 32))


def video_llava():
    import transformers as T

    cfg = T.VideoLlavaConfig(text_config=dict(model_type="llama", **TXT), vision_config=dict(model_type="clip_vision_model", **CLIP_V),
                             image_token_index=IMG, video_token_index=VID, vision_feature_layer=-2)
    return T.VideoLlavaForConditionalGeneration(cfg), dict(input_ids=ids(FRAMES * 17, VID),
                                                          pixel_values_videos=torch.randn(1, FRAMES, 3, 32, 32))


# family -> (builder, stages expected exported, stages expected eager, SDPA nodes rewritten)
CASES = {
    "qwen2_vl": (qwen2_vl, {"language_model"}, {"visual"}, 2),
    "llava_next_video": (llava_next_video, {"vision_tower", "projector", "language_model"}, set(), 4),
    "video_llava": (video_llava, {"video_tower", "projector", "language_model"}, set(), 4),
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_family_is_captured_per_stage_and_exact(family):
    build, exported, eager, n_sdpa = CASES[family]
    torch.manual_seed(0)
    model, inputs = build()
    model.eval()
    assert find_adapter(model).family == family
    opt = vopt.optimize(model, example_inputs=inputs)
    with torch.no_grad():
        diff = (opt(**inputs).logits - model(**inputs).logits).abs().max().item()
    assert diff <= 1e-5, diff
    events = opt.report.stage_events
    assert {e.stage for e in events if e.exported} == exported
    assert {e.stage for e in events if not e.exported} == eager
    assert all("torch.export failed" in e.reason for e in events if not e.exported)
    assert len(opt.report.rewritten("sdpa")) == n_sdpa


def test_adapter_names_and_generic_default():
    assert {"llava_onevision", "qwen2_vl", "generic"} <= set(adapter_names())
    assert find_adapter(torch.nn.Linear(2, 2)).family == "generic"
