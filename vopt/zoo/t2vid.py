"""T2Vid's Idefics3 variant: HF ``Idefics3ForConditionalGeneration`` fed video frames as images.

T2Vid (xjtupanda/T2Vid, evaluation in ``Idefics3/eval/model_video_qa_loader.py``)
fine-tunes Idefics3-8B-Llama3 on real and synthetic (text rendered as images)
videos; each sampled frame is one image, processed with
``do_image_splitting=False``: SigLIP at 364 px (26x26 = 676 patches) -> pixel
shuffle x2 (scale_factor 2) -> 169 tokens per frame -> Llama-3.1-8B. The
evaluation default is 24 frames; up to 65 frames are used (models.md §1).

Prompt layout per frame (Idefics3 processor without splitting):
``<fake_token_around_image> <image> x 169 <fake_token_around_image>`` (the
``<global-img>`` text between them, a few ordinary tokens, is left out here).

Full (``HuggingFaceM4/Idefics3-8B-Llama3`` config, models.md §1): vision 27
layers, 1152 wide, 16 heads (head dim 72), MLP 4304, image 364, patch 14;
connector Linear 1152*4 -> 4096 (no bias); Llama-3.1-8B: 32 layers, 4096 wide,
32 heads / 8 KV, MLP 14336, vocab 128259 (128256 + 3 added ids), rope theta
5e5 with llama3 scaling. Tiny (models.md §3): vision 48 wide / 2 layers (image
56, patch 14: 4x4 patches -> 2x2 = 4 tokens per frame), Llama 64 wide / 2 layers.

Capture: vopt has no Idefics3 adapter yet, so the generic adapter captures
the whole model as one graph (it exports: the padding-image filter and the
placeholder merge trace with this input signature). A per-stage adapter
(``vision_model`` / ``connector`` / ``text_model``) is proposed in the entry notes.
"""
from __future__ import annotations

import torch

from . import LLMDims, StageCall, ZooEntry, ZooModel, register
from ._inputs import PROMPT_TEXT_TOKENS, check_positive
from ..errors import ConfigError

DEFAULT_FRAMES = {"tiny": 8, "full": 24}       # T2Vid's Idefics3 evaluation default: --num-frames 24
MAX_FRAMES = 65                                # models.md §1: Idefics3 variant, <= 65 frames
FRAME_WRAP_TOKENS = 2                          # <fake_token_around_image> before and after each frame's tokens

TINY_VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14)
TINY_TEXT = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                 pad_token_id=0)
TINY_IDS = dict(image_token_id=500, fake_image_token_id=501)

# HuggingFaceM4/Idefics3-8B-Llama3 vision_config (SigLIP-SO400M at 364 px).
FULL_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=364, patch_size=14)
# Llama-3.1-8B(-Instruct) with Idefics3's 3 added tokens (vocab 128259).
FULL_TEXT = dict(model_type="llama", vocab_size=128259, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, bos_token_id=128000,
                 eos_token_id=128009, pad_token_id=128002,
                 rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
# <fake_token_around_image> = 128256, <image> = 128257 (Idefics3 tokenizer added tokens).
FULL_IDS = dict(image_token_id=128257, fake_image_token_id=128256)


def config(size: str):
    import transformers as T

    tiny = size == "tiny"
    text, vision, ids = (TINY_TEXT, TINY_VISION, TINY_IDS) if tiny else (FULL_TEXT, FULL_VISION, FULL_IDS)
    return T.Idefics3Config(text_config=dict(text), vision_config=dict(vision), image_token_id=ids["image_token_id"],
                            scale_factor=2, pad_token_id=text["pad_token_id"])


def tokens_per_frame(cfg) -> int:
    """LLM tokens per frame: (image/patch)^2 patches, pixel-shuffled by scale_factor^2."""
    return (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 // cfg.scale_factor ** 2


def check_frames(frames: int) -> None:
    check_positive(frames=frames)
    if frames > MAX_FRAMES:
        raise ConfigError(f"frames must be <= {MAX_FRAMES} for T2Vid's Idefics3 (max frames used), got {frames}")


def frame_prompt_ids(batch: int, frames: int, per_frame: int, image_id: int, open_id: int, close_id: int, vocab: int,
                     generator: torch.Generator) -> torch.Tensor:
    """``[batch, n_text + frames * (per_frame + 2)]``: text, each frame's placeholders between open and close ids, text.

    Text ids are drawn below every special id and below ``vocab - 16``.
    """
    text = torch.randint(1, min(open_id, close_id, image_id, vocab - 16), (batch, PROMPT_TEXT_TOKENS), generator=generator)
    frame = torch.tensor([open_id] + [image_id] * per_frame + [close_id], dtype=torch.long)
    half = PROMPT_TEXT_TOKENS // 2
    return torch.cat([text[:, :half], frame.repeat(frames).expand(batch, -1), text[:, half:]], dim=1)


def build(size: str, device: torch.device, dtype: torch.dtype) -> ZooModel:
    import transformers as T

    cfg = config(size)
    vc, tc = cfg.vision_config, cfg.text_config
    ids = TINY_IDS if size == "tiny" else FULL_IDS
    with torch.device(device):
        model = T.Idefics3ForConditionalGeneration(cfg).to(dtype)
    per_frame, side = tokens_per_frame(cfg), vc.image_size

    def visual_tokens(frames: int) -> int:
        check_frames(frames)
        return frames * per_frame

    def example_inputs(batch: int = 1, frames: int = DEFAULT_FRAMES[size], seed: int = 0) -> dict:
        check_positive(batch=batch)
        check_frames(frames)
        gen = torch.Generator().manual_seed(seed)
        wrap = ids["fake_image_token_id"]
        input_ids = frame_prompt_ids(batch, frames, per_frame, ids["image_token_id"], wrap, wrap, tc.vocab_size, gen)
        video = torch.randn(batch, frames, 3, side, side, generator=gen)
        return {"input_ids": input_ids.to(device), "pixel_values": video.to(device=device, dtype=dtype)}

    def stage_calls(batch: int, frames: int) -> list:
        inner = model.model
        new = lambda *shape: torch.empty(*shape, device=device, dtype=dtype)
        patches = (side // vc.patch_size) ** 2
        seq = visual_tokens(frames) + frames * FRAME_WRAP_TOKENS + PROMPT_TEXT_TOKENS
        return [
            StageCall("vision_model", inner.vision_model, (new(batch * frames, 3, side, side),)),
            StageCall("connector", inner.connector, (new(batch * frames, patches, vc.hidden_size),)),
            StageCall("text_model", inner.text_model, kwargs={"inputs_embeds": new(batch, seq, tc.hidden_size), "use_cache": False}),
            StageCall("lm_head", model.lm_head, (new(batch, 1, tc.hidden_size),)),  # generation keeps the last position
        ]

    return ZooModel("t2vid", size, model, example_inputs, DEFAULT_FRAMES[size], generates=True,
                    llm=LLMDims.from_hf(tc), visual_tokens=visual_tokens, stage_calls=stage_calls)


register(ZooEntry(
    name="t2vid",
    paper="T2Vid: Translating Long Text into Multi-Image is the Catalyst for Video-LLMs",
    backbone="Idefics3-8B-Llama3 (SigLIP-SO400M 364 px + pixel shuffle x2 + Llama-3.1-8B), 169 tokens/frame",
    stages=("vision_model", "connector", "text_model"),
    passes=("canonicalize_attention", "sdpa", "sageattention2", "vidkv", "holitom"),
    build=build,
    notes=("HF Idefics3ForConditionalGeneration, frames as images without splitting (169 tokens each; 24 frames by default, "
           "<= 65). vopt has no Idefics3 adapter: the generic adapter captures the whole model (it exports). Proposed "
           "adapter for per-stage capture: ModelAdapter('idefics3', ('Idefics3ForConditionalGeneration', 'Idefics3Model'), "
           "_stages(('vision_model', VISION, 'vision_model'), ('connector', PROJECTOR, 'connector'), ('text_model', LANGUAGE, "
           "'text_model'))); then stages = ('vision_model', 'connector', 'text_model'). The <global-img> text tokens of "
           "the real prompt are left out. HoliTom applies to the 13x13 per-frame grids. The MiniCPM-V-2.5 variant is "
           "entry 't2vid-minicpm'."),
))
