"""E-ViLM: a compact video-language model pre-trained with masked video modelling on VQ codes.

E-ViLM (Fang et al., arXiv 2311.17267) has **no public code**, and the
abstract gives no dimensions, so this is a faithful-in-spirit build and every
dimension is an assumption (``notes``):

* a video encoder (``VideoMAEModel``: tubelet patches, joint space-time attention),
* a text encoder (``BertModel``),
* a cross-modal fusion stack (ours: text queries self-attend, then attend to the
  video tokens; post-norm BERT-style blocks with SDPA attention),
* a QA head over the fused [CLS] (MSRVTT-QA as answer classification),
* a semantic VQ tokenizer (its own video encoder -> projection ->
  :class:`VectorQuantizer`): code ids are the masked-video-modelling targets;
  the MVM head predicts them at masked positions (BEiT-style mask token).

Tiny (models.md §3): ``VideoMAEConfig(image 32, patch 8, tubelet 2, 4 frames,
64 wide, 2 layers, 4 heads)`` -> 2 x 4 x 4 = 32 video tokens; BERT 64 / 2
layers; 2 fusion layers; codebook 128 x 32; 16 answers. Full (assumed):
VideoMAE-B-like (12 layers, 768, 12 heads, 16 frames at 224 px, patch 16,
tubelet 2 -> 1568 tokens); BERT-base text; 4 fusion layers; codebook 8192 x 256;
the 1500-answer MSRVTT-QA vocabulary.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import StageCall, ZooEntry, ZooModel, register
from ._inputs import check_positive
from ..adapters import ModelAdapter, StageRole, StageSpec
from ..errors import ConfigError

TINY = dict(
    video=dict(image_size=32, patch_size=8, tubelet_size=2, num_frames=4, hidden_size=64, num_hidden_layers=2,
               num_attention_heads=4, intermediate_size=128),
    text=dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              max_position_embeddings=64),
    fusion_layers=2, codebook=(128, 32), answers=16, text_tokens=8,
)
# All assumed (no public code): VideoMAE-B-like video encoder, BERT-base text encoder, 4 fusion layers,
# an 8192 x 256 codebook, MSRVTT-QA's 1500 most frequent answers, 32-token questions.
FULL = dict(
    video=dict(image_size=224, patch_size=16, tubelet_size=2, num_frames=16, hidden_size=768, num_hidden_layers=12,
               num_attention_heads=12, intermediate_size=3072),
    text=dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
              max_position_embeddings=512),
    fusion_layers=4, codebook=(8192, 256), answers=1500, text_tokens=32,
)
LAYER_NORM_EPS = 1e-12  # BERT's


class VectorQuantizer(nn.Module):
    """Nearest-code lookup in a ``[num_codes, code_dim]`` codebook.

    Distances come from one GEMM, ``||x||^2 - 2 x C^T + ||c||^2`` (``[N, K]``),
    then a row argmin (first index on ties): the ``K x N x D`` differences are
    never materialized. This is the pattern vopt's ``vq_lookup`` pass fuses.
    """

    def __init__(self, num_codes: int, code_dim: int):
        super().__init__()
        check_positive(num_codes=num_codes, code_dim=code_dim)
        self.codebook = nn.Parameter(torch.randn(num_codes, code_dim))

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """Squared Euclidean distances ``[N, K]`` of ``x [N, D]`` to every code."""
        c = self.codebook
        return (x * x).sum(-1, keepdim=True) - 2.0 * (x @ c.t()) + (c * c).sum(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Code ids ``[...]`` (int64) of ``x [..., D]``."""
        if x.shape[-1] != self.codebook.shape[1]:
            raise ValueError(f"x must end in code_dim={self.codebook.shape[1]}, got shape {tuple(x.shape)}")
        return self.distances(x.reshape(-1, x.shape[-1])).argmin(dim=-1).view(x.shape[:-1])

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The code vectors of ``ids``: ``[..., D]``."""
        return F.embedding(ids, self.codebook)


class SemanticVQTokenizer(nn.Module):
    """Video -> discrete semantic codes: its own video encoder, a projection to the code width, a VQ lookup."""

    def __init__(self, video_config, num_codes: int, code_dim: int):
        super().__init__()
        from transformers import VideoMAEModel

        self.encoder = VideoMAEModel(video_config)
        self.projection = nn.Linear(video_config.hidden_size, code_dim)
        self.quantizer = VectorQuantizer(num_codes, code_dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.quantizer(self.projection(self.encoder(pixel_values=pixel_values).last_hidden_state))


class _Attention(nn.Module):
    """Multi-head attention (SDPA); ``mask [B, Lk]`` with 1 for the keys to attend to."""

    def __init__(self, hidden: int, heads: int, kv_dim: int):
        super().__init__()
        if hidden % heads:
            raise ConfigError(f"hidden={hidden} must be divisible by heads={heads}")
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(hidden, hidden), nn.Linear(kv_dim, hidden), nn.Linear(kv_dim, hidden)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)          # [B, H, L, hd]
        attn_mask = None if mask is None else mask[:, None, None, :].bool()
        o = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(kv)), split(self.v(kv)), attn_mask=attn_mask)
        return self.out(o.transpose(1, 2).flatten(2))


class FusionLayer(nn.Module):
    """Post-norm block: text self-attention, cross-attention to the video tokens, GELU MLP."""

    def __init__(self, hidden: int, heads: int, intermediate: int, video_dim: int):
        super().__init__()
        self.self_attn, self.norm1 = _Attention(hidden, heads, hidden), nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.cross_attn, self.norm2 = _Attention(hidden, heads, video_dim), nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.mlp = nn.Sequential(nn.Linear(hidden, intermediate), nn.GELU(), nn.Linear(intermediate, hidden))
        self.norm3 = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        x = self.norm1(text + self.self_attn(text, text, text_mask))
        x = self.norm2(x + self.cross_attn(x, video))
        return self.norm3(x + self.mlp(x))


class CrossModalFusion(nn.Module):
    """A stack of :class:`FusionLayer`: ``(text [B, L, H], text_mask [B, L], video [B, N, Hv]) -> [B, L, H]``."""

    def __init__(self, layers: int, hidden: int, heads: int, intermediate: int, video_dim: int):
        super().__init__()
        self.layers = nn.ModuleList(FusionLayer(hidden, heads, intermediate, video_dim) for _ in range(layers))

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            text = layer(text, text_mask, video)
        return text


class EViLM(nn.Module):
    """Video encoder + text encoder + fusion + QA head; a VQ tokenizer and an MVM head for pre-training.

    ``forward(pixel_values [B, T, 3, H, W], input_ids [B, L], attention_mask=None) -> answer logits [B, A]``.
    """

    vopt_adapter = ModelAdapter(
        "e_vilm",
        ("EViLM",),
        (
            StageSpec("video_encoder", StageRole.VISION, ("video_encoder",)),
            StageSpec("text_encoder", StageRole.LANGUAGE, ("text_encoder",)),
            StageSpec("fusion", StageRole.LANGUAGE, ("fusion",)),
            StageSpec("qa_head", StageRole.PROJECTOR, ("qa_head",)),
            StageSpec("vq_tokenizer", StageRole.VISION, ("vq_tokenizer",)),
        ),
        "VideoMAE video encoder + BERT text encoder -> cross-attention fusion -> QA head; VQ tokenizer (pre-training)",
    )

    def __init__(self, video_config, text_config, fusion_layers: int, num_codes: int, code_dim: int, num_answers: int):
        super().__init__()
        from transformers import BertModel, VideoMAEModel

        h, hv = text_config.hidden_size, video_config.hidden_size
        self.video_encoder = VideoMAEModel(video_config)
        self.text_encoder = BertModel(text_config, add_pooling_layer=False)
        self.fusion = CrossModalFusion(fusion_layers, h, text_config.num_attention_heads, text_config.intermediate_size, hv)
        self.qa_head = nn.Sequential(nn.Linear(h, 2 * h), nn.GELU(), nn.LayerNorm(2 * h, eps=LAYER_NORM_EPS),
                                     nn.Linear(2 * h, num_answers))
        self.vq_tokenizer = SemanticVQTokenizer(video_config, num_codes, code_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hv))
        self.mvm_head = nn.Linear(hv, num_codes)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        video = self.video_encoder(pixel_values=pixel_values).last_hidden_state
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        fused = self.fusion(text, attention_mask, video)
        return self.qa_head(fused[:, 0])                                  # the fused [CLS]

    @torch.no_grad()
    def tokenize_video(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Semantic code ids ``[B, N]`` (one per video token): the MVM targets."""
        return self.vq_tokenizer(pixel_values)

    def masked_video_logits(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        """MVM: code logits ``[B, N, K]`` with the masked tokens (``True``) replaced by a learned mask token."""
        enc = self.video_encoder
        x = enc.embeddings.patch_embeddings(pixel_values)
        x = torch.where(bool_masked_pos[..., None], self.mask_token.to(x.dtype), x)
        x = x + enc.embeddings.position_embeddings.to(x.dtype)
        h = enc.encoder(x).last_hidden_state
        if enc.layernorm is not None:
            h = enc.layernorm(h)
        return self.mvm_head(h)

    def mvm_loss(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the masked tokens' predicted codes against the tokenizer's codes."""
        targets = self.tokenize_video(pixel_values)
        logits = self.masked_video_logits(pixel_values, bool_masked_pos)
        return F.cross_entropy(logits[bool_masked_pos], targets[bool_masked_pos])


def fixed_ratio_mask(batch: int, num_tokens: int, ratio: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``[batch, num_tokens]`` bool mask with exactly ``round(ratio * num_tokens)`` masked tokens per row (static shapes)."""
    check_positive(batch=batch, num_tokens=num_tokens)
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"ratio must lie in (0, 1), got {ratio!r}")
    n = max(1, round(ratio * num_tokens))
    order = torch.rand(batch, num_tokens, generator=generator).argsort(dim=1)
    return order < n


def build(size: str, device: torch.device, dtype: torch.dtype) -> ZooModel:
    import transformers as T

    dims = TINY if size == "tiny" else FULL
    video_cfg = T.VideoMAEConfig(**dims["video"], use_mean_pooling=False)
    text_cfg = T.BertConfig(**dims["text"])
    num_codes, code_dim = dims["codebook"]
    with torch.device(device):
        model = EViLM(video_cfg, text_cfg, dims["fusion_layers"], num_codes, code_dim, dims["answers"]).to(dtype)
    side, frames0, tubelet, n_text = video_cfg.image_size, video_cfg.num_frames, video_cfg.tubelet_size, dims["text_tokens"]

    def visual_tokens(frames: int) -> int:
        return (frames // tubelet) * (side // video_cfg.patch_size) ** 2

    def check_frames(frames: int) -> None:
        if frames != frames0:
            raise ConfigError(f"frames must equal num_frames={frames0} (VideoMAE's fixed position table), got {frames}")

    def example_inputs(batch: int = 1, frames: int = frames0, seed: int = 0) -> dict:
        check_positive(batch=batch, frames=frames)
        check_frames(frames)
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(1000 if size == "full" else 3, text_cfg.vocab_size, (batch, n_text), generator=gen)
        ids[:, 0] = 101 if size == "full" else 1                         # [CLS]
        video = torch.randn(batch, frames, 3, side, side, generator=gen)
        return {"pixel_values": video.to(device=device, dtype=dtype), "input_ids": ids.to(device),
                "attention_mask": torch.ones_like(ids).to(device)}

    def stage_calls(batch: int, frames: int) -> list:
        check_frames(frames)
        new = lambda *shape: torch.empty(*shape, device=device, dtype=dtype)
        ids = torch.zeros(batch, n_text, device=device, dtype=torch.long)
        h, n = text_cfg.hidden_size, visual_tokens(frames)
        return [
            StageCall("video_encoder", model.video_encoder, kwargs={"pixel_values": new(batch, frames, 3, side, side)}),
            StageCall("text_encoder", model.text_encoder, kwargs={"input_ids": ids, "attention_mask": torch.ones_like(ids)}),
            StageCall("fusion", model.fusion, (new(batch, n_text, h), torch.ones_like(ids), new(batch, n, video_cfg.hidden_size))),
            StageCall("qa_head", model.qa_head, (new(batch, h),)),
        ]

    return ZooModel("e-vilm", size, model, example_inputs, frames0, generates=False,
                    visual_tokens=visual_tokens, stage_calls=stage_calls)


register(ZooEntry(
    name="e-vilm",
    paper="E-ViLM: Efficient Video-Language Model via Masked Video Modeling with Semantic Vector-Quantized Tokenizer",
    backbone="VideoMAE-style video encoder + BERT text encoder + cross-attention fusion + VQ tokenizer (assumed)",
    stages=("video_encoder", "text_encoder", "fusion", "qa_head", "vq_tokenizer"),
    passes=("canonicalize_attention", "sdpa", "sageattention2", "holitom", "vq_lookup"),
    build=build,
    notes=("No public code; the abstract gives no dims. ALL dims are assumptions: VideoMAE-B-like video encoder "
           "(12 L, 768, 12 h, 16 frames at 224 px, patch 16, tubelet 2 -> 1568 tokens); BERT-base text encoder "
           "(32-token questions); 4 post-norm fusion layers (self + cross-attention, 768); a BEiT-v2-like tokenizer "
           "with its own VideoMAE-B encoder and an 8192 x 256 codebook; MVM = BEiT-style mask token + linear code "
           "head; QA = MLP over the fused [CLS] into MSRVTT-QA's 1500 answers. The tokenizer and MVM head are "
           "pre-training only (not in the QA prefill cost)."),
))
