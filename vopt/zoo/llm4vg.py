"""LLM4VG: video grounding by an LLM reading per-second visual answers.

LLM4VG (Feng et al., arXiv 2312.14206; **no public code**) asks an LLM for the
start and end of a query in a video from text alone: a visual model describes
the video at 1 fps (captions, or a VQA model's answer to "is <query> happening?"),
the answers become a prompt ``"t=0: no, t=1: yes, ..."`` and the LLM answers
with the span, parsed from its text (:func:`parse_spans`).

The harness here is the VQA variant: a BLIP-2 VQA model answers yes/no per
frame (all frames of all videos in one batch; the decision is the sign of the
"yes" minus "no" logit at the last position), the glue writes each answer
into the prompt's answer slots (a fixed-length prompt, so the LLM stage keeps
one static shape), and the LLM (Llama) returns logits or generates the span.

Tiny: BLIP-2 (vision 32 / 2 layers, image 32, patch 8; Q-Former 32 / 2
layers, 8 queries; OPT 64 / 2 layers, vocab 512) + Llama 64 / 2 layers, 4
heads (MHA, as Llama-2), vocab 512; 8 one-second frames. Full: BLIP-2
OPT-2.7B (assumed: LLM4VG's exact VQA model is unverified) + Vicuna-7B
(Llama-2-7B dims: 32 layers, 4096, 32 heads / 32 KV, MLP 11008, vocab 32000).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from . import LLMDims, StageCall, ZooEntry, ZooModel, register
from ._inputs import check_positive
from ._llm4vg_text import build_prompt, charades_sta_metrics, mean_iou, parse_spans, recall_at_1, temporal_iou
from ..adapters import ModelAdapter, StageRole, StageSpec
from ..errors import ConfigError

DEFAULT_FRAMES = {"tiny": 8, "full": 30}         # 1 fps; Charades-STA videos average ~30 s (assumption for the full size)
#: Prompt tokens per second ("t=12: yes," in Llama's tokenizer ~ 7: assumption) and around them.
PER_SECOND_TOKENS = {"tiny": 5, "full": 7}
PROMPT_PREFIX_TOKENS = {"tiny": 6, "full": 64}   # instruction + query (full: assumption)
PROMPT_SUFFIX_TOKENS = {"tiny": 4, "full": 24}
VQA_QUESTION_TOKENS = {"tiny": 6, "full": 16}    # "Question: is <query> happening? Answer:" (full: assumption)

TINY_VQA = dict(
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                       patch_size=8, initializer_range=0.02),   # the 1e-10 default makes every frame look the same
    qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=512),
    text_config=dict(model_type="opt", vocab_size=512, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=512, word_embed_proj_dim=64),
    num_query_tokens=8, image_token_index=500,
)
TINY_LLM = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=1024)
# Salesforce/blip2-opt-2.7b: EVA ViT-g (HF defaults), BERT-base Q-Former, 32 queries, OPT-2.7B;
# <image> takes the first unused row of OPT's 50272-row table (assumption).
FULL_VQA = dict(
    vision_config=dict(),
    qformer_config=dict(),
    text_config=dict(model_type="opt", vocab_size=50272, hidden_size=2560, ffn_dim=10240, num_hidden_layers=32,
                     num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2560),
    num_query_tokens=32, image_token_index=50265,
)
# lmsys/vicuna-7b-v1.5 (Llama-2-7B): MHA.
FULL_LLM = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, max_position_embeddings=4096)


@dataclass(frozen=True)
class LLM4VGTokens:
    """Token ids of the glue (random-weight builds reserve them; real runs read them from the tokenizers)."""

    vqa_yes: int
    vqa_no: int
    llm_yes: int
    llm_no: int
    llm_slot: int
    """The prompt's per-second answer placeholder; the glue replaces it by ``llm_yes`` / ``llm_no``."""

    @classmethod
    def reserved(cls, vqa_vocab: int, llm_vocab: int) -> "LLM4VGTokens":
        return cls(vqa_yes=vqa_vocab - 2, vqa_no=vqa_vocab - 1, llm_yes=llm_vocab - 3, llm_no=llm_vocab - 2, llm_slot=llm_vocab - 1)


class LLM4VG(nn.Module):
    """BLIP-2 VQA per frame -> answers written into the prompt (glue) -> Llama.

    ``forward(pixel_values [B, T, 3, H, W], input_ids [B, L], vqa_input_ids [B, Lq], attention_mask=None,
    vqa_attention_mask=None) -> LLM logits [B, L, V]``. ``input_ids`` holds exactly ``T`` answer slots
    (``tokens.llm_slot``), one per second in order; ``vqa_input_ids`` is the per-frame VQA prompt (with the
    BLIP-2 image placeholders), left-padded so that its last position is the answer.
    """

    vopt_adapter = ModelAdapter(
        "llm4vg",
        ("LLM4VG",),
        (
            StageSpec("vqa_vision", StageRole.VISION, ("vqa.vision_model",)),
            StageSpec("vqa_qformer", StageRole.PROJECTOR, ("vqa.qformer",)),
            StageSpec("vqa_projection", StageRole.PROJECTOR, ("vqa.language_projection",)),
            StageSpec("vqa_language_model", StageRole.LANGUAGE, ("vqa.language_model",)),
            StageSpec("llm", StageRole.LANGUAGE, ("llm",)),
        ),
        "BLIP-2 VQA (ViT -> Q-Former -> OPT) per frame -> yes/no into the prompt (glue) -> Llama",
    )

    def __init__(self, vqa_config, llm_config, tokens: LLM4VGTokens):
        super().__init__()
        from transformers import Blip2ForConditionalGeneration, LlamaForCausalLM

        for name in ("vqa_yes", "vqa_no"):
            if not 0 <= getattr(tokens, name) < vqa_config.text_config.vocab_size:
                raise ConfigError(f"tokens.{name}={getattr(tokens, name)} is outside the VQA vocabulary")
        for name in ("llm_yes", "llm_no", "llm_slot"):
            if not 0 <= getattr(tokens, name) < llm_config.vocab_size:
                raise ConfigError(f"tokens.{name}={getattr(tokens, name)} is outside the LLM vocabulary")
        self.vqa = Blip2ForConditionalGeneration(vqa_config)
        self.llm = LlamaForCausalLM(llm_config)
        self.tokens = tokens

    def frame_margins(self, pixel_values: torch.Tensor, vqa_input_ids: torch.Tensor,
                      vqa_attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[B, T]``: the VQA model's "yes" minus "no" logit per frame (all frames in one batch)."""
        if pixel_values.dim() != 5:
            raise ValueError(f"pixel_values must be [batch, frames, 3, H, W], got shape {tuple(pixel_values.shape)}")
        b, t = pixel_values.shape[:2]
        if vqa_attention_mask is None:
            vqa_attention_mask = torch.ones_like(vqa_input_ids)
        out = self.vqa(pixel_values=pixel_values.flatten(0, 1), input_ids=vqa_input_ids.repeat_interleave(t, dim=0),
                       attention_mask=vqa_attention_mask.repeat_interleave(t, dim=0), logits_to_keep=1, use_cache=False)
        last = out.logits[:, -1]
        return (last[:, self.tokens.vqa_yes] - last[:, self.tokens.vqa_no]).view(b, t)

    def fill_answers(self, input_ids: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
        """Write ``answers [B, T]`` (bool, one per second) into the prompt's slots as "yes" / "no" ids."""
        slots = input_ids == self.tokens.llm_slot
        counts = slots.sum(dim=1)
        if bool((counts != answers.shape[1]).any()):          # glue: a host check is fine here
            raise ValueError(f"input_ids must hold one answer slot per frame ({answers.shape[1]}), got {counts.tolist()}")
        words = torch.where(answers, self.tokens.llm_yes, self.tokens.llm_no)
        order = (slots.cumsum(dim=1) - 1).clamp(0, answers.shape[1] - 1)   # the k-th slot of a row takes answer k
        return torch.where(slots, words.gather(1, order), input_ids)

    def prompt_ids(self, pixel_values, input_ids, vqa_input_ids, vqa_attention_mask=None) -> torch.Tensor:
        """The LLM's prompt ids with every second's VQA answer filled in."""
        return self.fill_answers(input_ids, self.frame_margins(pixel_values, vqa_input_ids, vqa_attention_mask) > 0)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, vqa_input_ids: torch.Tensor,
                attention_mask: Optional[torch.Tensor] = None, vqa_attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        ids = self.prompt_ids(pixel_values, input_ids, vqa_input_ids, vqa_attention_mask)
        return self.llm(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, vqa_input_ids: torch.Tensor,
                 attention_mask: Optional[torch.Tensor] = None, vqa_attention_mask: Optional[torch.Tensor] = None,
                 **generate_kwargs) -> torch.Tensor:
        """The LLM's answer (prompt + new ids), as ``LlamaForCausalLM.generate``."""
        ids = self.prompt_ids(pixel_values, input_ids, vqa_input_ids, vqa_attention_mask)
        return self.llm.generate(input_ids=ids, attention_mask=attention_mask, **generate_kwargs)

    def ground(self, tokenizer, pixel_values, input_ids, vqa_input_ids, max_new_tokens: int = 32, **kwargs) -> list:
        """Spans per video: generate greedily, decode the new ids with ``tokenizer``, :func:`parse_spans`."""
        out = self.generate(pixel_values, input_ids, vqa_input_ids, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
        return [parse_spans(tokenizer.decode(row[input_ids.shape[1]:], skip_special_tokens=True)) for row in out]


def build(size: str, device: torch.device, dtype: torch.dtype) -> ZooModel:
    import transformers as T

    tiny = size == "tiny"
    vqa_cfg = T.Blip2Config(**(TINY_VQA if tiny else FULL_VQA))
    llm_cfg = T.LlamaConfig(**(TINY_LLM if tiny else FULL_LLM))
    tokens = LLM4VGTokens.reserved(vqa_cfg.text_config.vocab_size, llm_cfg.vocab_size)
    with torch.device(device):
        model = LLM4VG(vqa_cfg, llm_cfg, tokens).to(dtype)
    side, n_query = vqa_cfg.vision_config.image_size, vqa_cfg.num_query_tokens
    per_second, n_pre, n_suf, n_q = PER_SECOND_TOKENS[size], PROMPT_PREFIX_TOKENS[size], PROMPT_SUFFIX_TOKENS[size], VQA_QUESTION_TOKENS[size]

    def visual_tokens(frames: int) -> int:
        return frames * per_second        # the prompt tokens that describe the video (text, not embeddings)

    def example_inputs(batch: int = 1, frames: int = DEFAULT_FRAMES[size], seed: int = 0) -> dict:
        check_positive(batch=batch, frames=frames)
        gen = torch.Generator().manual_seed(seed)
        text = lambda n, vocab: torch.randint(3, vocab - 16, (batch, n), generator=gen)
        # Per second: "t", "=", <second>, ":" stand-ins, then the answer slot.
        second = torch.stack([torch.full((batch,), 3 + i % 10) for i in range(frames)], dim=1)
        stem = text(per_second - 2, llm_cfg.vocab_size)[:, None, :].expand(-1, frames, -1)
        slot = torch.full((batch, frames, 1), tokens.llm_slot)
        video = torch.cat([stem, second[..., None], slot], dim=2).flatten(1)
        ids = torch.cat([text(n_pre, llm_cfg.vocab_size), video, text(n_suf, llm_cfg.vocab_size)], dim=1)
        q = torch.cat([torch.full((batch, n_query), vqa_cfg.image_token_index), text(n_q, vqa_cfg.text_config.vocab_size)], dim=1)
        pixels = torch.randn(batch, frames, 3, side, side, generator=gen)
        return {"pixel_values": pixels.to(device=device, dtype=dtype), "input_ids": ids.to(device),
                "vqa_input_ids": q.to(device), "attention_mask": torch.ones_like(ids).to(device),
                "vqa_attention_mask": torch.ones_like(q).to(device)}

    def stage_calls(batch: int, frames: int) -> list:
        new = lambda *shape: torch.empty(*shape, device=device, dtype=dtype)
        vc, qc, tc = vqa_cfg.vision_config, vqa_cfg.qformer_config, vqa_cfg.text_config
        n = batch * frames
        seq = n_pre + visual_tokens(frames) + n_suf
        return [
            StageCall("vqa_vision", model.vqa.vision_model, kwargs={"pixel_values": new(n, 3, side, side)}),
            StageCall("vqa_qformer", model.vqa.qformer, kwargs={"query_embeds": new(n, n_query, qc.hidden_size),
                      "encoder_hidden_states": new(n, (side // vc.patch_size) ** 2 + 1, vc.hidden_size)}),
            StageCall("vqa_projection", model.vqa.language_projection, (new(n, n_query, qc.hidden_size),)),
            StageCall("vqa_language_model", model.vqa.language_model, kwargs={"inputs_embeds": new(n, n_query + n_q, tc.hidden_size),
                      "use_cache": False, "logits_to_keep": 1}),
            StageCall("llm", model.llm.model, kwargs={"inputs_embeds": new(batch, seq, llm_cfg.hidden_size), "use_cache": False}),
            StageCall("llm", model.llm.lm_head, (new(batch, 1, llm_cfg.hidden_size),)),
        ]

    return ZooModel("llm4vg", size, model, example_inputs, DEFAULT_FRAMES[size], generates=True,
                    llm=LLMDims.from_hf(llm_cfg), visual_tokens=visual_tokens, stage_calls=stage_calls)


register(ZooEntry(
    name="llm4vg",
    paper="LLM4VG: Large Language Models Evaluation for Video Grounding",
    backbone="BLIP-2 (OPT-2.7B) VQA at 1 fps + Vicuna-7B (Llama-2-7B)",
    stages=("vqa_vision", "vqa_qformer", "vqa_projection", "vqa_language_model", "llm"),
    passes=("canonicalize_attention", "sdpa", "sageattention2", "vidkv"),
    build=build,
    notes=("No public code. Assumptions: the VQA model (BLIP-2 OPT-2.7B; the paper also uses captioners and other "
           "VidLLMs), <image> id 50265, 30 one-second frames (Charades-STA's ~30 s videos), ~7 Llama tokens per "
           "second ('t=12: yes,'), a 64-token instruction and 24-token suffix, a 16-token VQA question. "
           "visual_tokens(frames) counts the prompt tokens that describe the video (text, not embeddings). "
           "A yes/no decision is the sign of the yes-minus-no logit: a margin within float noise can flip it."),
))

__all__ = ["LLM4VG", "LLM4VGTokens", "build_prompt", "charades_sta_metrics", "mean_iou", "parse_spans", "recall_at_1", "temporal_iou"]
