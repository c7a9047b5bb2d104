"""SeViLA's model classes: one frozen ViT, two Q-Former bridges, one Flan-T5 (the zoo's ``sevila`` entry).

SeViLA (Yu et al., NeurIPS 2023) chains two copies of BLIP-2's Q-Former over one
shared ViT and one T5:

1. **Localizer**: every frame's ViT features -> localizer Q-Former -> 32
   embeddings -> T5 encoder input ``["Frame: ", queries, localizer prompt]``;
   the frame's score is the first decoding step's logit of the "yes" token.
   All frames of all videos go through the T5 as one batch.
2. **Keyframe selection** (glue, between captured stages): the top-k frames
   by score, kept in temporal order.
3. **Answerer**: the keyframes' ViT features -> answerer Q-Former ->
   ``["Frame 1: ", queries_1, ..., "Frame k: ", queries_k, question and options]``
   -> T5; the answer is scored over the option letters' ids at the first step.

Differences from the reference code (models.md §4): token ids are never
hard-coded (:class:`SeViLATokens` derives them from a tokenizer, or reserves
ids of a random-weight vocabulary), and the T5 is the library class.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import nn

from ..adapters import ModelAdapter, StageRole, StageSpec
from ..errors import ConfigError

#: LAVIS ``ln_vision`` / ``ln_vision_loc``: a plain LayerNorm (torch default eps).
LN_VISION_EPS = 1e-5
#: LAVIS initializes the learned queries with N(0, 0.02).
QUERY_INIT_STD = 0.02


def _single_id(tokenizer, word: str) -> int:
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{word!r} must be one token of the tokenizer, got ids {ids}")
    return int(ids[0])


@dataclass(frozen=True)
class SeViLATokens:
    """The T5 token ids SeViLA's glue needs (never hard-coded: see :meth:`from_tokenizer`)."""

    yes_token_id: int
    """The localizer scores a frame with this token's logit ("yes")."""
    answer_token_ids: tuple
    """The option letters' ids ("A", "B", ...): the answerer's scores."""
    frame_prefix_ids: tuple
    """``"Frame: "``: before each frame's queries in the localizer input."""
    keyframe_prefix_ids: tuple
    """``"Frame 1: "``, ...: one id tuple per keyframe, padded with ``pad_token_id`` to one length."""
    pad_token_id: int = 0

    @classmethod
    def from_tokenizer(cls, tokenizer, num_keyframes: int, num_options: int = 5) -> "SeViLATokens":
        """Derive the ids from a (Flan-)T5 tokenizer, as SeViLA's prompts spell them."""
        answers = tuple(_single_id(tokenizer, chr(ord("A") + i)) for i in range(num_options))
        prefixes = [tuple(tokenizer(f"Frame {i + 1}: ", add_special_tokens=False)["input_ids"]) for i in range(num_keyframes)]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        width = max(len(p) for p in prefixes)
        return cls(
            yes_token_id=_single_id(tokenizer, "yes"),
            answer_token_ids=answers,
            frame_prefix_ids=tuple(tokenizer("Frame: ", add_special_tokens=False)["input_ids"]),
            keyframe_prefix_ids=tuple(p + (pad,) * (width - len(p)) for p in prefixes),
            pad_token_id=pad,
        )

    @classmethod
    def reserved(cls, vocab_size: int, num_keyframes: int, num_options: int = 5) -> "SeViLATokens":
        """Ids reserved at the top of a random-weight vocabulary (no tokenizer).

        Layout (top down): "yes", the option letters, "Frame", ":", the keyframe
        digits. In T5's 32128-row table the top 28 rows are unused padding.
        """
        top = vocab_size - 1
        frame, colon = top - num_options - 1, top - num_options - 2
        digits = [top - num_options - 3 - i for i in range(num_keyframes)]
        return cls(
            yes_token_id=top,
            answer_token_ids=tuple(range(top - num_options, top)),
            frame_prefix_ids=(frame, colon),
            keyframe_prefix_ids=tuple((frame, d, colon) for d in digits),
        )

    @property
    def lowest_id(self) -> int:
        return min(self.yes_token_id, *self.answer_token_ids, *self.frame_prefix_ids, *(i for p in self.keyframe_prefix_ids for i in p))

    def validate(self, vocab_size: int, num_keyframes: int) -> None:
        ids = (self.yes_token_id, *self.answer_token_ids, *self.frame_prefix_ids,
               *(i for p in self.keyframe_prefix_ids for i in p))
        if any(not 0 <= i < vocab_size for i in ids):
            raise ConfigError(f"SeViLA token ids must lie in [0, {vocab_size}), got {sorted(set(ids))}")
        if len(self.keyframe_prefix_ids) != num_keyframes:
            raise ConfigError(f"keyframe_prefix_ids needs {num_keyframes} prefixes (one per keyframe), got {len(self.keyframe_prefix_ids)}")
        if len({len(p) for p in self.keyframe_prefix_ids}) != 1 or not self.frame_prefix_ids or not self.answer_token_ids:
            raise ConfigError("keyframe_prefix_ids must have one length; frame_prefix_ids and answer_token_ids must be non-empty")


class QFormerBridge(nn.Module):
    """``ln_vision`` -> learned queries cross-attend to a frame's patches (Q-Former) -> linear to the T5 width."""

    def __init__(self, qformer_config, num_queries: int, vision_width: int, t5_width: int):
        super().__init__()
        from transformers import Blip2QFormerModel

        self.layernorm = nn.LayerNorm(vision_width, eps=LN_VISION_EPS)
        self.query_tokens = nn.Parameter(torch.randn(1, num_queries, qformer_config.hidden_size) * QUERY_INIT_STD)
        self.qformer = Blip2QFormerModel(qformer_config)
        self.projection = nn.Linear(qformer_config.hidden_size, t5_width)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """``image_embeds [N, patches, vision_width]`` -> ``[N, num_queries, t5_width]``."""
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=self.layernorm(image_embeds)).last_hidden_state
        return self.projection(out)


class SeViLAOutput(NamedTuple):
    frame_scores: torch.Tensor
    """``[B, T]``: the localizer's "yes" logit per frame."""
    keyframes: torch.Tensor
    """``[B, k]``: the selected frame indices, in temporal order."""
    answer_logits: torch.Tensor
    """``[B, num_options]``: the answerer's logits over the option letters."""


class SeViLA(nn.Module):
    """ViT -> localizer (Q-Former #1 + T5) -> top-k keyframes (glue) -> answerer (Q-Former #2 + T5).

    ``forward(pixel_values [B, T, 3, H, W], loc_input_ids [B, Lq], qa_input_ids [B, La],
    loc_attention_mask=None, qa_attention_mask=None) -> SeViLAOutput``. The
    prompts are T5 token ids (the localizer question, the question with its
    options); the frame prefixes come from :class:`SeViLATokens`.
    """

    vopt_adapter = ModelAdapter(
        "sevila",
        ("SeViLA",),
        (
            StageSpec("vision", StageRole.VISION, ("vision",)),
            StageSpec("localizer_qformer", StageRole.PROJECTOR, ("localizer_qformer",)),
            StageSpec("answerer_qformer", StageRole.PROJECTOR, ("answerer_qformer",)),
            StageSpec("t5", StageRole.LANGUAGE, ("t5",)),
        ),
        "EVA ViT -> localizer Q-Former -> T5 (all frames batched) -> top-k keyframes (glue) -> answerer Q-Former -> T5",
    )

    def __init__(self, vision_config, qformer_config, t5_config, num_queries: int, num_keyframes: int, tokens: SeViLATokens):
        super().__init__()
        from transformers import Blip2VisionModel, T5ForConditionalGeneration

        tokens.validate(t5_config.vocab_size, num_keyframes)
        self.vision = Blip2VisionModel(vision_config)
        # EVA-CLIP's features enter each Q-Former through its own LayerNorm (ln_vision, ln_vision_loc): no shared final norm.
        self.vision.post_layernorm = nn.Identity()
        width = vision_config.hidden_size
        self.localizer_qformer = QFormerBridge(qformer_config, num_queries, width, t5_config.d_model)
        self.answerer_qformer = QFormerBridge(qformer_config, num_queries, width, t5_config.d_model)
        self.t5 = T5ForConditionalGeneration(t5_config)
        self.num_queries = num_queries
        self.num_keyframes = num_keyframes
        self.tokens = tokens

    # -- glue helpers ---------------------------------------------------------------------------
    def _embed(self, ids) -> torch.Tensor:
        emb = self.t5.get_input_embeddings()
        return emb(torch.as_tensor(ids, dtype=torch.long, device=emb.weight.device))

    def _t5_first_step(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits of the first decoding step, ``[N, vocab]`` (one T5 call for the whole batch)."""
        start = torch.full((inputs_embeds.shape[0], 1), self.t5.config.decoder_start_token_id, dtype=torch.long,
                           device=inputs_embeds.device)
        out = self.t5(inputs_embeds=inputs_embeds, attention_mask=attention_mask, decoder_input_ids=start, use_cache=False)
        return out.logits[:, 0]

    def localize(self, image_embeds: torch.Tensor, loc_input_ids: torch.Tensor, loc_attention_mask: torch.Tensor) -> torch.Tensor:
        """Frame scores ``[B, T]`` from ViT features ``[B, T, P, W]``: the "yes" logit per frame."""
        b, t = image_embeds.shape[:2]
        queries = self.localizer_qformer(image_embeds.flatten(0, 1))                        # [B*T, Q, D]
        prefix = self._embed(self.tokens.frame_prefix_ids).expand(b * t, -1, -1)
        text = self._embed(loc_input_ids).repeat_interleave(t, dim=0)
        inputs = torch.cat([prefix, queries, text], dim=1)
        ones = torch.ones(b * t, prefix.shape[1] + queries.shape[1], dtype=loc_attention_mask.dtype, device=inputs.device)
        mask = torch.cat([ones, loc_attention_mask.repeat_interleave(t, dim=0)], dim=1)
        return self._t5_first_step(inputs, mask)[:, self.tokens.yes_token_id].view(b, t)

    def select_keyframes(self, frame_scores: torch.Tensor) -> torch.Tensor:
        """The ``num_keyframes`` best-scored frames per video, in temporal order: ``[B, k]``."""
        return torch.topk(frame_scores, self.num_keyframes, dim=1).indices.sort(dim=1).values

    def answer(self, keyframe_embeds: torch.Tensor, qa_input_ids: torch.Tensor, qa_attention_mask: torch.Tensor) -> torch.Tensor:
        """Option logits ``[B, num_options]`` from the keyframes' ViT features ``[B, k, P, W]``."""
        b, k = keyframe_embeds.shape[:2]
        queries = self.answerer_qformer(keyframe_embeds.flatten(0, 1)).unflatten(0, (b, k))  # [B, k, Q, D]
        prefix_ids = torch.as_tensor(self.tokens.keyframe_prefix_ids, dtype=torch.long, device=queries.device)  # [k, p]
        prefix = self._embed(prefix_ids).expand(b, -1, -1, -1)
        frames = torch.cat([prefix, queries], dim=2).flatten(1, 2)                             # [B, k*(p+Q), D]
        prefix_mask = (prefix_ids != self.tokens.pad_token_id).to(qa_attention_mask.dtype)
        query_mask = torch.ones(k, queries.shape[2], dtype=qa_attention_mask.dtype, device=queries.device)
        frames_mask = torch.cat([prefix_mask, query_mask], dim=1).flatten().expand(b, -1)
        inputs = torch.cat([frames, self._embed(qa_input_ids)], dim=1)
        mask = torch.cat([frames_mask, qa_attention_mask], dim=1)
        return self._t5_first_step(inputs, mask)[:, list(self.tokens.answer_token_ids)]

    def forward(self, pixel_values: torch.Tensor, loc_input_ids: torch.Tensor, qa_input_ids: torch.Tensor,
                loc_attention_mask: Optional[torch.Tensor] = None, qa_attention_mask: Optional[torch.Tensor] = None) -> SeViLAOutput:
        if pixel_values.dim() != 5:
            raise ValueError(f"pixel_values must be [batch, frames, 3, H, W], got shape {tuple(pixel_values.shape)}")
        b, t = pixel_values.shape[:2]
        if t < self.num_keyframes:
            raise ValueError(f"pixel_values has {t} frames, fewer than num_keyframes={self.num_keyframes}")
        if loc_attention_mask is None:
            loc_attention_mask = torch.ones_like(loc_input_ids)
        if qa_attention_mask is None:
            qa_attention_mask = torch.ones_like(qa_input_ids)
        feats = self.vision(pixel_values=pixel_values.flatten(0, 1)).last_hidden_state
        feats = feats.unflatten(0, (b, t))                                                     # [B, T, P, W]
        scores = self.localize(feats, loc_input_ids, loc_attention_mask)
        # Data-dependent keyframe gather: glue between the captured stages.
        keyframes = self.select_keyframes(scores)
        index = keyframes[:, :, None, None].expand(-1, -1, feats.shape[2], feats.shape[3])
        answer_logits = self.answer(feats.gather(1, index), qa_input_ids, qa_attention_mask)
        return SeViLAOutput(scores, keyframes, answer_logits)
