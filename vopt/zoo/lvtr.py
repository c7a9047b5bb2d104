"""LVTR (Explore-And-Match): a DETR-style encoder-decoder grounding sentences in CLIP frame features.

Full (models.md §1; sangminwoo/Explore-And-Match c5125df5, lib/configs.py and
train_activitynet.sh): 64 CLIP ViT-B/32 frame features and <= 4 CLIP sentence
embeddings (512-d) -> input projections (``n_input_proj=2``: LN-Dropout-Linear
512->256-ReLU, LN-Dropout-Linear 256->256) -> sine positions -> joint encoder
over 64 + 4 = 68 tokens (4 post-norm layers, d 256, 8 heads x 32, FFN 1024,
ReLU) -> decoder (4 layers, self + cross attention, final LayerNorm) with 10
learned queries per sentence = 40 -> span head (3-layer MLP, sigmoid:
(centre, width)) and "class" logits = cosine(query, sentence memory)
(``pred_label=cos``). Tiny (models.md §3): d 64, 4 heads, FFN 128, 2+2 layers,
16 frames, 2 sentences, 10 queries per sentence.

Our own module (the original's ``nn.MultiheadAttention`` returns attention
weights, which blocks SDPA): attention runs with ``need_weights=False`` and
exports as SDPA nodes; padded frames and sentences are key-padding masked.
The Hungarian matcher, the auxiliary (per-layer) outputs and NMS are training /
post-processing only and stay outside the graph.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import StageCall, ZooEntry, ZooModel, register
from ._inputs import check_positive
from ..adapters import ModelAdapter, StageRole, StageSpec
from ..errors import ConfigError

FEATURE_DIM = 512                 # CLIP ViT-B/32 image and text embeddings (vid_feat_dim, txt_feat_dim)
# lib/configs.py defaults + train_activitynet.sh (enc/dec 4, num_proposals = 10 x num_input_sentences).
FULL = dict(d_model=256, num_heads=8, ffn=1024, encoder_layers=4, decoder_layers=4, num_frames=64, num_sentences=4,
            queries_per_sentence=10)
TINY = dict(d_model=64, num_heads=4, ffn=128, encoder_layers=2, decoder_layers=2, num_frames=16, num_sentences=2,
            queries_per_sentence=10)
INPUT_DROPOUT, DROPOUT = 0.5, 0.1  # input_dropout, dropout (inactive in eval)


class LVTROutput(NamedTuple):
    spans: torch.Tensor
    """``[B, Q, 2]`` normalized (centre, width), each in (0, 1)."""
    class_logits: torch.Tensor
    """``[B, Q, S]`` cosine similarity of each query to each sentence's encoder memory."""


def sine_positions(mask: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """DETR's normalized 1-D sine embedding over the valid positions of ``mask [B, L]`` -> ``[B, L, dim]``."""
    x = mask.to(torch.float32).cumsum(1)
    x = x / (x[:, -1:] + 1e-6) * (2 * math.pi)
    i = torch.arange(dim, dtype=torch.float32, device=mask.device)
    freq = temperature ** (2 * torch.div(i, 2, rounding_mode="floor") / dim)
    pos = x[:, :, None] / freq
    return torch.stack((pos[:, :, 0::2].sin(), pos[:, :, 1::2].cos()), dim=3).flatten(2)


def input_projection(d_in: int, d_model: int) -> nn.Sequential:
    """``n_input_proj=2``: LN -> Dropout -> Linear -> ReLU, LN -> Dropout -> Linear."""
    return nn.Sequential(nn.LayerNorm(d_in), nn.Dropout(INPUT_DROPOUT), nn.Linear(d_in, d_model), nn.ReLU(),
                         nn.LayerNorm(d_model), nn.Dropout(INPUT_DROPOUT), nn.Linear(d_model, d_model))


class EncoderLayer(nn.Module):
    """Post-norm DETR encoder layer: positions added to queries and keys only."""

    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=DROPOUT, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.ReLU(), nn.Dropout(DROPOUT), nn.Linear(ffn, d))
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop1, self.drop2 = nn.Dropout(DROPOUT), nn.Dropout(DROPOUT)

    def forward(self, src: torch.Tensor, pos: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        q = src + pos
        src = self.norm1(src + self.drop1(self.self_attn(q, q, src, key_padding_mask=padding, need_weights=False)[0]))
        return self.norm2(src + self.drop2(self.ffn(src)))


class DecoderLayer(nn.Module):
    """Post-norm DETR decoder layer: query self-attention, cross-attention to the memory, FFN."""

    def __init__(self, d: int, heads: int, ffn: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d, heads, dropout=DROPOUT, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d, heads, dropout=DROPOUT, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.ReLU(), nn.Dropout(DROPOUT), nn.Linear(ffn, d))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop1, self.drop2, self.drop3 = nn.Dropout(DROPOUT), nn.Dropout(DROPOUT), nn.Dropout(DROPOUT)

    def forward(self, tgt, memory, query_pos, pos, padding):
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.drop1(self.self_attn(q, q, tgt, need_weights=False)[0]))
        out = self.cross_attn(tgt + query_pos, memory + pos, memory, key_padding_mask=padding, need_weights=False)[0]
        tgt = self.norm2(tgt + self.drop2(out))
        return self.norm3(tgt + self.drop3(self.ffn(tgt)))


class LVTR(nn.Module):
    """``forward(frame_features [B,T,512], frame_mask [B,T], sentence_features [B,S,512], sentence_mask=None)``.

    Masks are True (or 1) on valid entries; padded frames/sentences never
    influence the outputs. Returns :class:`LVTROutput` (last decoder layer).
    """

    vopt_adapter = ModelAdapter("lvtr", ("LVTR",), (StageSpec("model", StageRole.WHOLE, ("",)),),
                                "joint DETR encoder over frames + sentences, query decoder, span/cosine heads: one graph")

    def __init__(self, d_model: int, num_heads: int, ffn: int, encoder_layers: int, decoder_layers: int,
                 num_queries: int, feature_dim: int = FEATURE_DIM):
        super().__init__()
        self.d_model, self.num_queries = d_model, num_queries
        self.input_vid_proj = input_projection(feature_dim, d_model)
        self.input_txt_proj = input_projection(feature_dim, d_model)
        self.encoder = nn.ModuleList(EncoderLayer(d_model, num_heads, ffn) for _ in range(encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(d_model, num_heads, ffn) for _ in range(decoder_layers))
        self.decoder_norm = nn.LayerNorm(d_model)
        self.query_embed = nn.Embedding(num_queries, d_model)
        self.span_embed = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, d_model), nn.ReLU(),
                                        nn.Linear(d_model, 2))

    def forward(self, frame_features: torch.Tensor, frame_mask: torch.Tensor, sentence_features: torch.Tensor,
                sentence_mask: Optional[torch.Tensor] = None) -> LVTROutput:
        if frame_features.dim() != 3 or sentence_features.dim() != 3:
            raise ValueError("frame_features and sentence_features must be [batch, length, dim]")
        if sentence_mask is None:
            sentence_mask = torch.ones(sentence_features.shape[:2], dtype=torch.bool, device=sentence_features.device)
        vid, txt = self.input_vid_proj(frame_features), self.input_txt_proj(sentence_features)
        t = vid.shape[1]
        valid = torch.cat([frame_mask.bool(), sentence_mask.bool()], dim=1)                       # [B, T+S]
        pos = torch.cat([sine_positions(frame_mask, self.d_model), sine_positions(sentence_mask, self.d_model)], dim=1).to(vid.dtype)
        memory, padding = torch.cat([vid, txt], dim=1), ~valid
        for layer in self.encoder:
            memory = layer(memory, pos, padding)
        query_pos = self.query_embed.weight                                                         # [Q, d], broadcast
        hs = memory.new_zeros(memory.shape[0], self.num_queries, self.d_model)
        for layer in self.decoder:
            hs = layer(hs, memory, query_pos, pos, padding)
        hs = self.decoder_norm(hs)
        spans = self.span_embed(hs).sigmoid()
        # Cosine over the feature dimension (the reference's F.normalize(hs) defaults to dim=1, the query axis).
        class_logits = F.normalize(hs, dim=-1) @ F.normalize(memory[:, t:], dim=-1).transpose(1, 2)
        return LVTROutput(spans, class_logits)


def build(size: str, device: torch.device, dtype: torch.dtype) -> ZooModel:
    dims = TINY if size == "tiny" else FULL
    n_frames, n_sentences = dims["num_frames"], dims["num_sentences"]
    num_queries = dims["queries_per_sentence"] * n_sentences
    with torch.device(device):
        model = LVTR(dims["d_model"], dims["num_heads"], dims["ffn"], dims["encoder_layers"], dims["decoder_layers"],
                     num_queries).to(dtype)

    def example_inputs(batch: int = 1, frames: int = n_frames, seed: int = 0, valid_frames: Optional[int] = None,
                       sentences: int = n_sentences) -> dict:
        """Random CLIP-like features; the first ``valid_frames`` frames are real, the rest padding."""
        check_positive(batch=batch, frames=frames, sentences=sentences)
        valid_frames = frames if valid_frames is None else valid_frames
        check_positive(valid_frames=valid_frames)
        if valid_frames > frames:
            raise ConfigError(f"valid_frames must be at most frames={frames}, got {valid_frames}")
        gen = torch.Generator().manual_seed(seed)
        mask = torch.zeros(batch, frames, dtype=torch.bool)
        mask[:, :valid_frames] = True
        vid = torch.randn(batch, frames, FEATURE_DIM, generator=gen)
        txt = torch.randn(batch, sentences, FEATURE_DIM, generator=gen)
        return {"frame_features": vid.to(device=device, dtype=dtype), "frame_mask": mask.to(device),
                "sentence_features": txt.to(device=device, dtype=dtype)}

    def stage_calls(batch: int, frames: int) -> list:
        new = lambda *shape: torch.empty(*shape, device=device, dtype=dtype)
        mask = torch.ones(batch, frames, device=device, dtype=torch.bool)
        return [StageCall("model", model, (new(batch, frames, FEATURE_DIM), mask, new(batch, n_sentences, FEATURE_DIM)))]

    return ZooModel("lvtr", size, model, example_inputs, n_frames, generates=False,
                    visual_tokens=lambda frames: frames, stage_calls=stage_calls)


register(ZooEntry(
    name="lvtr",
    paper="Explore-And-Match: Bridging Proposal-Based and Proposal-Free With Transformer for Sentence Grounding in Videos",
    backbone="CLIP ViT-B/32 features (offline) + DETR encoder-decoder (d 256, 4+4 layers, 40 queries)",
    stages=("model",),
    passes=("canonicalize_attention", "sdpa", "sageattention2"),
    build=build,
    notes=("Inputs are precomputed CLIP features (the CLIP backbone is not built). Attention uses need_weights=False "
           "(the reference returns the weights, which blocks SDPA; they only feed pred_label='att', not the released "
           "'cos'). Class logits are a true cosine over the feature dimension (the reference normalizes hs over the "
           "query axis). Only the last decoder layer is output (aux outputs are training-only). Head dim 32 is below "
           "SA2's 64/96/128 kernels; the model is launch-bound (68 tokens)."),
))
