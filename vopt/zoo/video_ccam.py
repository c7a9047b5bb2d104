"""Video-CCAM: SigLIP -> CCAM projector (causal cross-attention mask) -> Qwen2.5 LLM.

Full (models.md §1, tokens.md §7, ``JaronTHU/Video-CCAM-7B-v1.2`` config.json):
SigLIP-SO400M-384 (27 layers, 1152 wide, 16 heads x 72, MLP 4304, 27x27 = 729
tokens per frame, features from ``hidden_states[-2]``) -> CCAM projector (1024
queries, width 1024, 16 heads, SwiGLU 4096, 1152 -> 3584; 1024 tokens for any
number of frames) -> Qwen2.5-7B (28 layers, 3584 wide, 28 heads / 4 KV, MLP
18944, rope theta 1e6). Tiny (models.md §3): SigLIP 48 wide / 2 layers (image
32, patch 8: 16 tokens per frame), projector 64 queries / 64 wide / 4 heads /
SwiGLU 128, Qwen2 64 wide / 2 layers / 2 KV heads; 8 frames.

The wrapper :class:`VideoCCAM` is ours (the reference glue, QQ-MM/Video-CCAM
``model/videoccam.py``, splices features at an ``IMAGE_TOKEN_INDEX = -200``
id; here ``num_queries`` placeholder ids per video are replaced, as in the HF
LLaVA classes). Stages: vision, projector, language_model.
"""
from __future__ import annotations


import torch

from . import LLMDims, StageCall, ZooEntry, ZooModel, register
from ._ccam_projector import CCAMProjector
from ._spliced_lm import SplicedVideoLM
from ._inputs import PROMPT_TEXT_TOKENS, check_positive, prompt_ids
from ..adapters import ModelAdapter, StageRole, StageSpec

DEFAULT_FRAMES = {"tiny": 8, "full": 16}        # Video-CCAM trains with 16 frames (MVBench: 16; Video-MME: 96)
VISION_FEATURE_LAYER = -2                       # model/videoccam.py: visual_select_layer=-2

TINY_VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
TINY_PROJECTOR = dict(num_queries=64, hidden_size=64, num_heads=4, intermediate_size=128)
TINY_TEXT = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048)
TINY_VIDEO_TOKEN = 501

# google/siglip-so400m-patch14-384 vision config.
FULL_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=384, patch_size=14)
# Video-CCAM-7B-v1.2 projector_config (num_query, hidden_size, num_attention_heads, intermediate_size; dropout 0.1).
FULL_PROJECTOR = dict(num_queries=1024, hidden_size=1024, num_heads=16, intermediate_size=4096, dropout=0.1)
# Qwen2.5-7B(-Instruct) config.json.
FULL_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, max_position_embeddings=32768, tie_word_embeddings=False,
                 rope_parameters={"rope_type": "default", "rope_theta": 1e6})
# ASSUMPTION: the first free embedding row after Qwen2.5's 151665 tokenizer entries stands for a video placeholder.
FULL_VIDEO_TOKEN = 151665


class VideoCCAM(SplicedVideoLM):
    """SigLIP vision tower -> :class:`CCAMProjector` -> causal LM, with placeholder splicing as glue.

    ``forward(input_ids, pixel_values_videos [B, T, 3, H, W], attention_mask=None) -> logits [B, L, vocab]``:
    each video's ``num_queries`` projector tokens replace its ``video_token_id``
    placeholders in ``input_ids`` (in order).
    """

    vopt_adapter = ModelAdapter(
        "video_ccam",
        ("VideoCCAM",),
        (
            StageSpec("vision", StageRole.VISION, ("vision",)),
            StageSpec("projector", StageRole.PROJECTOR, ("projector",)),
            StageSpec("language_model", StageRole.LANGUAGE, ("language_model",)),
        ),
        "SigLIP (hidden_states[-2]) -> CCAM projector (masked cross-attention, SDPA) -> Qwen2 causal LM; splicing is glue",
    )

    def __init__(self, vision_config, text_config, projector: dict, video_token_id: int):
        super().__init__()
        import transformers as T

        self.video_token_id = video_token_id
        self.vision = T.SiglipVisionModel(vision_config)
        self.projector = CCAMProjector(cross_hidden_size=vision_config.hidden_size, output_size=text_config.hidden_size,
                                       **projector)
        self.language_model = T.Qwen2ForCausalLM(text_config)

    @property
    def num_queries(self) -> int:
        return self.projector.num_queries

    def video_features(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        """``[B, T, 3, H, W]`` -> projector tokens ``[B, num_queries, llm_width]``."""
        if pixel_values_videos.dim() != 5:
            raise ValueError(f"pixel_values_videos must be [batch, frames, 3, H, W], got {tuple(pixel_values_videos.shape)}")
        b, t = pixel_values_videos.shape[:2]
        out = self.vision(pixel_values=pixel_values_videos.flatten(0, 1), output_hidden_states=True)
        feats = out.hidden_states[VISION_FEATURE_LAYER]                               # [B*T, P, C]
        return self.projector(feats.reshape(b, t, *feats.shape[1:]))

    @property
    def placeholder_id(self) -> int:
        return self.video_token_id


def configs(size: str):
    """``(vision_config, text_config, projector kwargs, video_token_id)`` for ``size``."""
    import transformers as T

    tiny = size == "tiny"
    vision = T.SiglipVisionConfig(**(TINY_VISION if tiny else FULL_VISION))
    text = T.Qwen2Config(**(TINY_TEXT if tiny else FULL_TEXT))
    return vision, text, dict(TINY_PROJECTOR if tiny else FULL_PROJECTOR), TINY_VIDEO_TOKEN if tiny else FULL_VIDEO_TOKEN


def build(size: str, device: torch.device, dtype: torch.dtype) -> ZooModel:
    vision_cfg, text_cfg, projector, video_token = configs(size)
    with torch.device(device):
        model = VideoCCAM(vision_cfg, text_cfg, projector, video_token).to(dtype)
    side, patch = vision_cfg.image_size, vision_cfg.patch_size
    per_frame = (side // patch) ** 2
    n_queries = projector["num_queries"]

    def visual_tokens(frames: int) -> int:
        return n_queries                                   # constant: the projector's query count, for any T

    def example_inputs(batch: int = 1, frames: int = DEFAULT_FRAMES[size], seed: int = 0) -> dict:
        check_positive(batch=batch, frames=frames)
        gen = torch.Generator().manual_seed(seed)
        ids = prompt_ids(batch, n_queries, video_token, text_cfg.vocab_size, gen)
        video = torch.randn(batch, frames, 3, side, side, generator=gen)
        return {"input_ids": ids.to(device), "pixel_values_videos": video.to(device=device, dtype=dtype)}

    def stage_calls(batch: int, frames: int) -> list:
        new = lambda *shape: torch.empty(*shape, device=device, dtype=dtype)
        seq = n_queries + PROMPT_TEXT_TOKENS
        return [
            StageCall("vision", model.vision, kwargs={"pixel_values": new(batch * frames, 3, side, side), "output_hidden_states": True}),
            StageCall("projector", model.projector, (new(batch, frames, per_frame, vision_cfg.hidden_size),)),
            # The LM head on the last position only (what generation keeps).
            StageCall("language_model", model.language_model,
                      kwargs={"inputs_embeds": new(batch, seq, text_cfg.hidden_size), "use_cache": False, "logits_to_keep": 1}),
        ]

    return ZooModel("video-ccam", size, model, example_inputs, DEFAULT_FRAMES[size], generates=True,
                    llm=LLMDims.from_hf(text_cfg), visual_tokens=visual_tokens, stage_calls=stage_calls)


register(ZooEntry(
    name="video-ccam",
    paper="Video-CCAM: Enhancing Video-Language Understanding with Causal Cross-Attention Masks for Short and Long Videos",
    backbone="SigLIP-SO400M-384 + CCAM projector (1024 queries) + Qwen2.5-7B (Video-CCAM-7B v1.2)",
    stages=("vision", "projector", "language_model"),
    passes=("canonicalize_attention", "sdpa", "sageattention2", "vidkv", "holitom", "ccam"),
    build=build,
    notes=("Projector rebuilt from projector_config (the Hub code was not read): one inferred block "
           "(LN -> masked cross-attention -> residual -> LN -> SwiGLU -> residual -> Linear), plus an ASSUMED LayerNorm "
           "on the 1152-d visual keys/values. Mask rule g(i) = ceil((i+1)T/N)-1 by default ('floor' selectable; equal when "
           "T divides N): UNVERIFIED. The video placeholder id of the full size (151665) is an assumption. SigLIP runs whole "
           "(27 layers + post-LN + pooling head) although only hidden_states[-2] is used, as in the reference: the last "
           "layer and head are dead compute a pass may drop. The Phi-3 / Yi / Phi-3-medium variants (4B/9B/14B) are not built."),
))
