"""SeViLA: BLIP-2's EVA ViT, two Q-Formers (localizer, answerer) and one Flan-T5-XL.

Tiny (models.md §3): Blip2Vision 64 wide / 2 layers / 4 heads (image 56,
patch 14: 17 tokens per frame); two Q-Formers 64 wide / 2 layers / 8 queries
(cross-attention every 2nd layer); T5 d 64, d_kv 16, 4 heads, 2+2 layers,
d_ff 128, gated-GELU, vocab 256; 8 frames -> top-2 keyframes.

Full (models.md §1, Yui010206/SeViLA): EVA-CLIP ViT-g/14 at 224 px (257
tokens per frame, 39 layers, 1408 wide, 16 heads x 88, MLP 6144); two BERT-base
Q-Formers (12 layers, 768, 32 queries, projection 768 -> 2048); Flan-T5-XL
(24+24 layers, d_model 2048, 32 heads x 64, d_ff 5120 gated-GELU, vocab
32128); 32 frames -> top-4 keyframes (4 x 32 = 128 visual embeddings in the
answerer). The model classes are in :mod:`vopt.zoo._sevila_modules`.
"""
from __future__ import annotations

import torch

from . import LLMDims, StageCall, ZooEntry, ZooModel, register
from ._inputs import PROMPT_TEXT_TOKENS, check_positive
from ._sevila_modules import SeViLA, SeViLATokens
from ..errors import ConfigError

DEFAULT_FRAMES = {"tiny": 8, "full": 32}       # SeViLA samples 32 frames for the localizer
NUM_KEYFRAMES = {"tiny": 2, "full": 4}          # ... and keeps the top 4 for the answerer
NUM_QUERIES = {"tiny": 8, "full": 32}           # BLIP-2 num_query_token
NUM_OPTIONS = 5                                 # multiple-choice letters A-E (NExT-QA, STAR, How2QA ...)
#: Prompt lengths in T5 tokens. Tiny: the zoo's usual prompt. Full: assumptions (SeViLA truncates at 77).
LOC_TEXT_TOKENS = {"tiny": PROMPT_TEXT_TOKENS, "full": 64}
QA_TEXT_TOKENS = {"tiny": PROMPT_TEXT_TOKENS, "full": 77}

# initializer_range: Blip2VisionConfig's default (1e-10) makes random features ~0 and every frame score equal.
TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14,
                   initializer_range=0.02)
TINY_QFORMER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, cross_attention_frequency=2)
TINY_T5 = dict(vocab_size=256, d_model=64, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=2, d_ff=128)

# EVA-CLIP ViT-g/14 as LAVIS builds it (depth 40 minus the last layer); equal to HF Blip2VisionConfig's defaults.
FULL_VISION = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16, image_size=224, patch_size=14)
# BLIP-2 Q-Former: BERT-base, cross-attention every 2nd layer.
FULL_QFORMER = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, cross_attention_frequency=2)
# google/flan-t5-xl config.json.
FULL_T5 = dict(vocab_size=32128, d_model=2048, d_kv=64, num_heads=32, num_layers=24, num_decoder_layers=24, d_ff=5120)


def configs(size: str):
    """``(vision, qformer, t5)`` HF configs for ``size``."""
    import transformers as T

    tiny = size == "tiny"
    vision = T.Blip2VisionConfig(**(TINY_VISION if tiny else FULL_VISION))
    qformer = T.Blip2QFormerConfig(**(TINY_QFORMER if tiny else FULL_QFORMER), encoder_hidden_size=vision.hidden_size)
    # tie_word_embeddings=False: T5 v1.1 / Flan-T5 do not rescale the decoder output by d_model**-0.5.
    # (transformers 5.x still ties lm_head to the shared embedding; Flan-T5's checkpoint has its own head.)
    t5 = T.T5Config(**(TINY_T5 if tiny else FULL_T5), feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                    dropout_rate=0.0, decoder_start_token_id=0)
    return vision, qformer, t5


def build(size: str, device: torch.device, dtype: torch.dtype, tokens: "SeViLATokens | None" = None) -> ZooModel:
    """Build SeViLA; ``tokens`` defaults to ids reserved at the top of the vocabulary (random weights)."""
    vision_cfg, qformer_cfg, t5_cfg = configs(size)
    k, n_queries = NUM_KEYFRAMES[size], NUM_QUERIES[size]
    tokens = tokens or SeViLATokens.reserved(t5_cfg.vocab_size, k, NUM_OPTIONS)
    with torch.device(device):
        model = SeViLA(vision_cfg, qformer_cfg, t5_cfg, n_queries, k, tokens).to(dtype)
    side = vision_cfg.image_size
    patches = (side // vision_cfg.patch_size) ** 2 + 1       # + CLS
    loc_len, qa_len = LOC_TEXT_TOKENS[size], QA_TEXT_TOKENS[size]

    def visual_tokens(frames: int) -> int:
        return k * n_queries                                 # the answerer's T5 input (the localizer sees Q per frame)

    def example_inputs(batch: int = 1, frames: int = DEFAULT_FRAMES[size], seed: int = 0) -> dict:
        check_positive(batch=batch, frames=frames)
        if frames < k:
            raise ConfigError(f"frames must be at least num_keyframes={k}, got {frames}")
        gen = torch.Generator().manual_seed(seed)
        low = tokens.lowest_id                               # prompt ids stay below the reserved ids
        loc = torch.randint(2, low, (batch, loc_len), generator=gen)
        qa = torch.randint(2, low, (batch, qa_len), generator=gen)
        video = torch.randn(batch, frames, 3, side, side, generator=gen)
        return {"pixel_values": video.to(device=device, dtype=dtype), "loc_input_ids": loc.to(device),
                "qa_input_ids": qa.to(device), "loc_attention_mask": torch.ones_like(loc).to(device),
                "qa_attention_mask": torch.ones_like(qa).to(device)}

    def stage_calls(batch: int, frames: int) -> list:
        new = lambda *shape: torch.empty(*shape, device=device, dtype=dtype)
        ids = lambda *shape: torch.zeros(*shape, device=device, dtype=torch.long)
        mask = lambda *shape: torch.ones(*shape, device=device, dtype=torch.long)
        d, w = t5_cfg.d_model, vision_cfg.hidden_size
        n_loc = len(tokens.frame_prefix_ids) + n_queries + loc_len
        n_qa = k * (len(tokens.keyframe_prefix_ids[0]) + n_queries) + qa_len
        t5 = lambda n, rows: {"inputs_embeds": new(rows, n, d), "attention_mask": mask(rows, n),
                              "decoder_input_ids": ids(rows, 1), "use_cache": False}
        return [
            StageCall("vision", model.vision, kwargs={"pixel_values": new(batch * frames, 3, side, side)}),
            StageCall("localizer_qformer", model.localizer_qformer, (new(batch * frames, patches, w),)),
            StageCall("t5", model.t5, kwargs=t5(n_loc, batch * frames)),     # all frames' localizer passes, batched
            StageCall("answerer_qformer", model.answerer_qformer, (new(batch * k, patches, w),)),
            StageCall("t5", model.t5, kwargs=t5(n_qa, batch)),
        ]

    return ZooModel("sevila", size, model, example_inputs, DEFAULT_FRAMES[size], generates=False,
                    llm=LLMDims.from_hf(t5_cfg), visual_tokens=visual_tokens, stage_calls=stage_calls)


register(ZooEntry(
    name="sevila",
    paper="Self-Chained Image-Language Model for Video Localization and Question Answering",
    backbone="EVA-CLIP ViT-g/14 + 2 x Q-Former (BERT-base) + Flan-T5-XL",
    stages=("vision", "localizer_qformer", "answerer_qformer", "t5"),
    passes=("canonicalize_attention", "sdpa", "sageattention2"),
    build=build,
    notes=("Token ids: SeViLATokens.from_tokenizer(<Flan-T5 tokenizer>, 4) for real weights; random-weight builds reserve "
           "the top vocabulary rows (never the reference's hard-coded ids). Prompt lengths of the full size (localizer 64, "
           "QA 77 T5 tokens) are assumptions. `llm` is the T5 decoder (KV per token of self-attention; cross-attention "
           "KV is the same size per encoder token). The T5 attention carries a relative-position bias (SDPA with "
           "scale 1 and an additive mask): SA2 there needs a bias-capable kernel. Parameters: 3.98B, of which T5 2.78B "
           "(transformers 5.x ties T5's lm_head to the shared embedding; the Flan-T5-XL checkpoint's untied head adds "
           "65.8M, the published 2.85B)."),
))
