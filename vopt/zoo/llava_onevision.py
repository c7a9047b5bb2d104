"""LLaVA-OneVision (SigLIP + MLP projector + Qwen2): HoliTom's base model.

Tiny: SigLIP 64-wide/2 layers (image 32, patch 8: 4x4 patches, pooled 2x2 per
frame) + Qwen2 128-wide/4 layers (4 heads, 2 KV heads, head_dim 32), with the
weights ``tools/train_video_qa.py`` trained on :mod:`vopt.eval.video_task`
(``vopt/zoo/weights/``; ``pretrained=False`` gives seeded random weights). Full: LLaVA-OV-7B
(SigLIP-SO400M minus its last layer, 729 patches -> 196 tokens per frame;
Qwen2-7B: 28 layers, 3584 wide, 28 heads / 4 KV, MLP 18944, vocab 152064).

Tiny64 (``build("llava-onevision", "tiny64")``): the tiny model with image size 64 (8x8 patches, 4x4 = 16 pooled
tokens per frame, 129 video tokens at 8 frames), trained the same way on 64x64 clips
(``tools/train_video_qa.py --size tiny64``): most of its tokens are black background, as in real videos.
"""
from __future__ import annotations

import math

import torch

from . import LLMDims, StageCall, ZooEntry, ZooModel, register
from ._inputs import PROMPT_TEXT_TOKENS, check_positive, prompt_ids

DEFAULT_FRAMES = {"tiny": 4, "tiny64": 4, "full": 32}

TINY_TEXT = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=1024)
TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
TINY_IDS = dict(image_token_index=500, video_token_index=501)
TINY64_VISION = dict(TINY_VISION, image_size=64)

FULL_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, max_position_embeddings=32768, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
FULL_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14)
FULL_IDS = dict(image_token_index=151646, video_token_index=151647)


def config(size: str):
    import transformers as T

    text, vision, ids = {"tiny": (TINY_TEXT, TINY_VISION, TINY_IDS), "tiny64": (TINY_TEXT, TINY64_VISION, TINY_IDS)}.get(
        size, (FULL_TEXT, FULL_VISION, FULL_IDS))
    side = vision["image_size"]
    return T.LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", **text),
        vision_config=dict(model_type="siglip_vision_model", **vision),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=[[side, side]],
        **ids,
    )


def tokens_per_frame(cfg) -> int:
    grid = cfg.vision_config.image_size // cfg.vision_config.patch_size
    return math.ceil(grid / 2) ** 2


def build(size: str, device: torch.device, dtype: torch.dtype) -> ZooModel:
    import transformers as T

    cfg = config(size)
    with torch.device(device):
        model = T.LlavaOnevisionForConditionalGeneration(cfg).to(dtype)
    side, per_frame = cfg.vision_config.image_size, tokens_per_frame(cfg)

    def visual_tokens(frames: int) -> int:
        return frames * per_frame + 1  # one newline embedding after all frames

    def example_inputs(batch: int = 1, frames: int = DEFAULT_FRAMES[size], seed: int = 0) -> dict:
        check_positive(batch=batch, frames=frames)
        gen = torch.Generator().manual_seed(seed)
        ids = prompt_ids(batch, visual_tokens(frames), cfg.video_token_index, cfg.text_config.vocab_size, gen)
        video = torch.randn(batch, frames, 3, side, side, generator=gen)
        return {"input_ids": ids.to(device), "pixel_values_videos": video.to(device=device, dtype=dtype)}

    def stage_calls(batch: int, frames: int) -> list:
        inner = model.model
        vc, tc = cfg.vision_config, cfg.text_config
        patches = (side // vc.patch_size) ** 2
        seq = visual_tokens(frames) + PROMPT_TEXT_TOKENS
        new = lambda *shape: torch.empty(*shape, device=device, dtype=dtype)
        return [
            StageCall("vision_tower", inner.vision_tower, (new(batch * frames, 3, side, side),)),
            StageCall("projector", inner.multi_modal_projector, (new(batch * frames, patches, vc.hidden_size),)),
            StageCall("language_model", inner.language_model, kwargs={"inputs_embeds": new(batch, seq, tc.hidden_size), "use_cache": False}),
            StageCall("lm_head", model.lm_head, (new(batch, 1, tc.hidden_size),)),  # generation keeps the last position's logits
        ]

    return ZooModel("llava-onevision", size, model, example_inputs, DEFAULT_FRAMES[size], generates=True,
                    llm=LLMDims.from_hf(cfg.text_config), visual_tokens=visual_tokens, stage_calls=stage_calls)


register(ZooEntry(
    name="llava-onevision",
    paper="LLaVA-OneVision: Easy Visual Task Transfer",
    backbone="SigLIP-SO400M + 2-layer MLP + Qwen2-7B",
    stages=("vision_tower", "projector", "language_model"),
    passes=("canonicalize_attention", "sdpa", "sageattention2", "vidkv", "holitom"),
    build=build,
    weights="llava-onevision-tiny.safetensors",
    variants={"tiny64": "llava-onevision-tiny64.safetensors"},
    notes="tiny: trained on vopt.eval.video_task (tools/train_video_qa.py); pretrained=False for random weights; "
          "tiny64: the same at 64x64 frames (16 tokens per frame)",
))
