"""T2Vid's MiniCPM-Llama3-V-2.5 variant: SigLIP -> 96-query one-layer resampler -> Llama-3-8B.

MiniCPM-V has no HF core class (its code is ``trust_remote_code`` Hub code,
not loaded here), so :class:`MiniCPMV` is ours: ``SiglipVisionModel`` (no MAP
head; MiniCPM uses the patch tokens), :class:`Resampler` (learned queries,
one ``nn.MultiheadAttention`` cross-attention whose keys carry a 2-D sin-cos
position embedding, then LayerNorm and a square projection: the MiniCPM-V
resampler design) and ``LlamaForCausalLM``. Each frame is one 448 px image
(no slicing): 32x32 = 1024 patches -> 96 tokens per frame, up to 90 frames
(models.md §1; 24 by default, T2Vid's evaluation default).

Prompt layout per frame: ``<image-start> <slot> x 96 <image-end>``; the slots
are replaced by the frame's resampler tokens (glue, in order).

Full: SigLIP-SO400M (27 layers, 1152 wide, 16 heads x 72, MLP 4304, patch
14) at 448 px; resampler 96 queries, width 4096, 32 heads (4096 / 128),
key/value input 1152; Llama-3-8B (32 layers, 4096 wide, 32 heads / 8 KV, MLP
14336, vocab 128256, rope theta 5e5). Tiny (models.md §3): SigLIP 48 wide / 2
layers (image 56, patch 14: 16 patches), resampler 8 queries / 4 heads, Llama
64 wide / 2 layers / 2 KV heads.
"""
from __future__ import annotations


import torch
from torch import nn

from . import LLMDims, StageCall, ZooEntry, ZooModel, register
from ._spliced_lm import SplicedVideoLM
from ._inputs import PROMPT_TEXT_TOKENS, check_positive
from .t2vid import frame_prompt_ids
from ..adapters import ModelAdapter, StageRole, StageSpec
from ..errors import ConfigError

DEFAULT_FRAMES = {"tiny": 8, "full": 24}
MAX_FRAMES = 90                                # models.md §1: MiniCPM-V-2.5 variant, <= 90 frames
FRAME_WRAP_TOKENS = 2                          # image start and end ids around each frame's slots

TINY_VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14,
                   vision_use_head=False)
TINY_TEXT = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
TINY_RESAMPLER = dict(num_queries=8, num_heads=4)
TINY_IDS = dict(slot=500, start=501, end=502)

# MiniCPM-Llama3-V-2.5: SigLIP-SO400M/14 (its Hub config says image 980 for slicing; ASSUMPTION: 448 px frames,
# so a 32x32 position table instead of 70x70).
FULL_VISION = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=448,
                   patch_size=14, vision_use_head=False)
# Meta-Llama-3-8B(-Instruct) config.json.
FULL_TEXT = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128009,
                 rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
# Resampler(num_queries=96, embed_dim=llm width, num_heads=embed_dim // 128, kv_dim=vision width).
FULL_RESAMPLER = dict(num_queries=96, num_heads=32)
# ASSUMPTION: Llama-3 reserved special ids stand for the slot / image start / image end tokens.
FULL_IDS = dict(slot=128002, start=128003, end=128004)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """``[grid * grid, dim]`` 2-D sin-cos position embedding (half the channels for rows, half for columns)."""
    if dim % 4:
        raise ConfigError(f"resampler width must be a multiple of 4 for the 2-D sin-cos embedding, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij")
    emb = [torch.cat([torch.sin(a.reshape(-1, 1) * omega), torch.cos(a.reshape(-1, 1) * omega)], dim=1) for a in (rows, cols)]
    return torch.cat(emb, dim=1)


class Resampler(nn.Module):
    """One cross-attention layer from ``num_queries`` learned queries to a frame's patch tokens.

    ``forward(x [N, P, kv_dim]) -> [N, num_queries, embed_dim]``: keys and
    values are ``LN(kv_proj(x))``, the keys plus a fixed 2-D sin-cos position
    embedding of the ``grid x grid`` patches; output ``LN(attn) @ proj``.
    """

    def __init__(self, num_queries: int, embed_dim: int, num_heads: int, kv_dim: int, grid: int):
        super().__init__()
        self.num_queries = num_queries
        self.query = nn.Parameter(torch.randn(num_queries, embed_dim) * 0.02)
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False)
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Parameter(embed_dim ** -0.5 * torch.randn(embed_dim, embed_dim))
        self.register_buffer("pos_embed", sincos_2d(embed_dim, grid), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.ln_kv(self.kv_proj(x))
        q = self.ln_q(self.query).unsqueeze(0).expand(x.shape[0], -1, -1)
        out = self.attn(q, kv + self.pos_embed.to(kv.dtype), kv, need_weights=False)[0]
        return self.ln_post(out) @ self.proj


class MiniCPMV(SplicedVideoLM):
    """SigLIP -> :class:`Resampler` per frame -> Llama, the frames' tokens spliced into the slot ids (glue).

    ``forward(input_ids, pixel_values_videos [B, T, 3, H, W], attention_mask=None) -> logits [B, L, vocab]``.
    """

    vopt_adapter = ModelAdapter(
        "minicpm_v",
        ("MiniCPMV",),
        (
            StageSpec("vision", StageRole.VISION, ("vision",)),
            StageSpec("resampler", StageRole.PROJECTOR, ("resampler",)),
            StageSpec("language_model", StageRole.LANGUAGE, ("language_model",)),
        ),
        "SigLIP patch tokens -> 96-query cross-attention resampler (MHA, SDPA) -> Llama causal LM; splicing is glue",
    )

    def __init__(self, vision_config, text_config, resampler: dict, slot_token_id: int):
        super().__init__()
        import transformers as T

        self.slot_token_id = slot_token_id
        self.vision = T.SiglipVisionModel(vision_config)
        grid = vision_config.image_size // vision_config.patch_size
        self.resampler = Resampler(embed_dim=text_config.hidden_size, kv_dim=vision_config.hidden_size, grid=grid, **resampler)
        self.language_model = T.LlamaForCausalLM(text_config)

    def video_features(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        """``[B, T, 3, H, W]`` -> ``[B, T * num_queries, llm_width]``, frame by frame in order."""
        if pixel_values_videos.dim() != 5:
            raise ValueError(f"pixel_values_videos must be [batch, frames, 3, H, W], got {tuple(pixel_values_videos.shape)}")
        b, t = pixel_values_videos.shape[:2]
        patches = self.vision(pixel_values=pixel_values_videos.flatten(0, 1)).last_hidden_state
        return self.resampler(patches).reshape(b, t * self.resampler.num_queries, -1)

    @property
    def placeholder_id(self) -> int:
        return self.slot_token_id


def check_frames(frames: int) -> None:
    check_positive(frames=frames)
    if frames > MAX_FRAMES:
        raise ConfigError(f"frames must be <= {MAX_FRAMES} for T2Vid's MiniCPM-V-2.5 (max frames used), got {frames}")


def build(size: str, device: torch.device, dtype: torch.dtype) -> ZooModel:
    import transformers as T

    tiny = size == "tiny"
    vision_cfg = T.SiglipVisionConfig(**(TINY_VISION if tiny else FULL_VISION))
    text_cfg = T.LlamaConfig(**(TINY_TEXT if tiny else FULL_TEXT))
    resampler, ids = (TINY_RESAMPLER, TINY_IDS) if tiny else (FULL_RESAMPLER, FULL_IDS)
    with torch.device(device):
        model = MiniCPMV(vision_cfg, text_cfg, dict(resampler), ids["slot"]).to(dtype)
    side, per_frame = vision_cfg.image_size, resampler["num_queries"]
    patches = (side // vision_cfg.patch_size) ** 2

    def visual_tokens(frames: int) -> int:
        check_frames(frames)
        return frames * per_frame

    def example_inputs(batch: int = 1, frames: int = DEFAULT_FRAMES[size], seed: int = 0) -> dict:
        check_positive(batch=batch)
        check_frames(frames)
        gen = torch.Generator().manual_seed(seed)
        text_ids = frame_prompt_ids(batch, frames, per_frame, ids["slot"], ids["start"], ids["end"], text_cfg.vocab_size, gen)
        video = torch.randn(batch, frames, 3, side, side, generator=gen)
        return {"input_ids": text_ids.to(device), "pixel_values_videos": video.to(device=device, dtype=dtype)}

    def stage_calls(batch: int, frames: int) -> list:
        new = lambda *shape: torch.empty(*shape, device=device, dtype=dtype)
        seq = visual_tokens(frames) + frames * FRAME_WRAP_TOKENS + PROMPT_TEXT_TOKENS
        return [
            StageCall("vision", model.vision, kwargs={"pixel_values": new(batch * frames, 3, side, side)}),
            StageCall("resampler", model.resampler, (new(batch * frames, patches, vision_cfg.hidden_size),)),
            StageCall("language_model", model.language_model,
                      kwargs={"inputs_embeds": new(batch, seq, text_cfg.hidden_size), "use_cache": False, "logits_to_keep": 1}),
        ]

    return ZooModel("t2vid-minicpm", size, model, example_inputs, DEFAULT_FRAMES[size], generates=True,
                    llm=LLMDims.from_hf(text_cfg), visual_tokens=visual_tokens, stage_calls=stage_calls)


register(ZooEntry(
    name="t2vid-minicpm",
    paper="T2Vid: Translating Long Text into Multi-Image is the Catalyst for Video-LLMs",
    backbone="MiniCPM-Llama3-V-2.5 style: SigLIP-SO400M 448 px + 96-query resampler + Llama-3-8B, 96 tokens/frame",
    stages=("vision", "resampler", "language_model"),
    passes=("canonicalize_attention", "sdpa", "sageattention2", "vidkv", "holitom", "ccam"),
    build=build,
    notes=("Own rebuild (MiniCPM-V's Hub code is not loaded): SiglipVisionModel without its MAP head, a one-layer "
           "resampler in the MiniCPM-V design (learned queries, MHA cross-attention with need_weights=False, 2-D sin-cos "
           "key positions, LN, square projection), LlamaForCausalLM. ASSUMPTIONS: 448 px frames without slicing (the "
           "real vision tower is a NaViT-style SigLIP with a 70x70 position table), fixed sin-cos positions for the 32x32 "
           "grid, slot/start/end ids 128002-128004. HoliTom applies only temporally (resampler slots have no spatial "
           "grid); CCAM optionally on the resampler."),
))
