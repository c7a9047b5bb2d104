"""Base of the zoo's own video-LLM wrappers: video tokens spliced into a causal LM's input embeddings."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class SplicedVideoLM(nn.Module):
    """Video features replace placeholder ids in ``input_ids``, then a causal LM runs on the embeddings.

    Subclasses set ``self.language_model`` (an HF causal LM), define
    ``placeholder_id`` and ``video_features(pixel_values_videos) -> [B, N, width]``,
    and may override ``embed_ids`` (e.g. for placeholder ids outside the table).
    The splice is glue between captured stages (it is data-dependent).
    """

    placeholder_id: int

    def video_features(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(input_ids)

    def embed(self, input_ids: torch.Tensor, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        """Text embeddings with the placeholders replaced, in order, by the video tokens."""
        embeds = self.embed_ids(input_ids)
        feats = self.video_features(pixel_values_videos).to(embeds.dtype)
        is_slot = input_ids == self.placeholder_id
        if not torch.compiler.is_compiling() and int(is_slot.sum()) != feats.shape[0] * feats.shape[1]:
            raise ValueError(f"input_ids hold {int(is_slot.sum())} placeholders (id {self.placeholder_id}) but the "
                             f"videos give {feats.shape[0]} x {feats.shape[1]} tokens")
        return embeds.masked_scatter(is_slot.unsqueeze(-1), feats)

    def forward(self, input_ids: torch.Tensor, pixel_values_videos: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        embeds = self.embed(input_ids, pixel_values_videos)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).logits

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values_videos: torch.Tensor,
                 attention_mask: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """Generation from the spliced embeddings; returns the new token ids only."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.embed(input_ids, pixel_values_videos)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
