"""VideoLLM-online (LIVE, live1+): SigLIP per frame -> CLS + 3x3 pooled tokens -> MLP -> Llama-3, streamed.

Per frame (showlab/videollm-online ``models/vision_live.py``): SigLIP's MAP-head
output (the "CLS" token) and the 24x24 patch tokens average-pooled to 3x3 give
10 tokens, mapped by a 2-layer GELU MLP into the LLM. The stream interleaves
frames as ``, <v> x 10`` per frame (the interval token ``,`` then the frame's
placeholders), 2 frames per second, up to 1200 frames (10 min). While
streaming, each frame's 11 ids are prefilled onto the persistent KV cache; the
model answers when p(interval token) at the frame's last position falls below
0.725.

:class:`VideoLLMOnline` is ours. Its ``forward`` embeds a whole stream at once
(placeholder scatter: glue between the captured stages); :meth:`~VideoLLMOnline.stream`
prefills frame by frame onto a caller-owned HF ``DynamicCache``, which only
grows (the original threads the KV through Python trim functions; none here).

Full (models.md §1; ``google/siglip-large-patch16-384``, ``Meta-Llama-3-8B-Instruct``):
SigLIP-L 24 layers, 1024 wide, 16 heads x 64, MLP 4096, 384 px / patch 16 =
576 patches; connector 1024 -> 4096 -> 4096; Llama-3-8B 32 layers, 4096 wide,
32 heads / 8 KV, MLP 14336, vocab 128256. Tiny (models.md §3): SigLIP 64 wide
/ 2 layers (image 64, patch 16: 4x4 patches -> CLS + 2x2 = 5 tokens), connector
64 -> 128 -> 128, Llama 128 wide / 2 layers / 4 heads / 2 KV, vocab 512.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import LLMDims, StageCall, ZooEntry, ZooModel, register
from ._spliced_lm import SplicedVideoLM
from ._inputs import PROMPT_TEXT_TOKENS, check_positive
from ..adapters import ModelAdapter, StageRole, StageSpec

DEFAULT_FRAMES = {"tiny": 8, "full": 1200}     # live1+ max_num_frames: 10 min at 2 fps
RESPONSE_THRESHOLD = 0.725                     # respond when p(interval token) < this (models.md §1)

TINY_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, image_size=64, patch_size=16)
TINY_TEXT = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
TINY_STREAM = dict(pool=2, interval_token_id=11)

# google/siglip-large-patch16-384 vision config.
FULL_VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=384, patch_size=16)
# meta-llama/Meta-Llama-3-8B-Instruct config.json.
FULL_TEXT = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128009,
                 rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
# live1+: frame_token_pooled [3, 3]; frame_token_interval ',' (Llama-3 token id 11).
FULL_STREAM = dict(pool=3, interval_token_id=11)


class VideoLLMOnline(SplicedVideoLM):
    """SigLIP -> (CLS + pooled patches: glue) -> connector MLP -> Llama, offline and streaming.

    The frame placeholder id is ``vocab_size`` (one past the embedding table,
    as the original's added ``<v>`` token); ids are clamped before the lookup
    and the placeholders replaced by frame tokens.
    """

    vopt_adapter = ModelAdapter(
        "videollm_online",
        ("VideoLLMOnline",),
        (
            StageSpec("vision", StageRole.VISION, ("vision",)),
            StageSpec("connector", StageRole.PROJECTOR, ("connector",)),
            StageSpec("language_model", StageRole.LANGUAGE, ("language_model",)),
        ),
        "SigLIP (+ MAP head) -> CLS + avg-pooled patches (glue) -> MLP connector -> Llama; streaming loop stays eager",
    )

    def __init__(self, vision_config, text_config, pool: int, interval_token_id: int):
        super().__init__()
        import transformers as T

        self.pool = pool
        self.grid = vision_config.image_size // vision_config.patch_size
        self.interval_token_id = interval_token_id
        self.frame_token_id = text_config.vocab_size
        self.vision = T.SiglipVisionModel(vision_config)
        self.connector = nn.Sequential(nn.Linear(vision_config.hidden_size, text_config.hidden_size), nn.GELU(),
                                       nn.Linear(text_config.hidden_size, text_config.hidden_size))
        self.language_model = T.LlamaForCausalLM(text_config)

    @property
    def tokens_per_frame(self) -> int:
        """Visual tokens per frame: the CLS plus pool x pool pooled patch tokens."""
        return 1 + self.pool ** 2

    def frame_embeddings(self, frames: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` -> ``[N, tokens_per_frame, llm_width]`` (CLS first, then the pooled grid row-major)."""
        if frames.dim() != 4:
            raise ValueError(f"frames must be [N, 3, H, W], got {tuple(frames.shape)}")
        out = self.vision(pixel_values=frames)
        patches = out.last_hidden_state
        grid = patches.reshape(patches.shape[0], self.grid, self.grid, -1).permute(0, 3, 1, 2)
        pooled = F.adaptive_avg_pool2d(grid, self.pool).flatten(2).transpose(1, 2)
        return self.connector(torch.cat([out.pooler_output[:, None], pooled], dim=1))

    @property
    def placeholder_id(self) -> int:
        return self.frame_token_id

    def embed_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of ``input_ids``, the ``<v>`` id (one past the table) clamped to a valid row."""
        table = self.language_model.get_input_embeddings()
        return table(input_ids.clamp(max=table.num_embeddings - 1))

    def video_features(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        """``[B, T, 3, H, W]`` -> ``[B, T * tokens_per_frame, width]``, frame by frame in order."""
        if pixel_values_videos.dim() != 5:
            raise ValueError(f"pixel_values_videos must be [batch, frames, 3, H, W], got {tuple(pixel_values_videos.shape)}")
        b, t = pixel_values_videos.shape[:2]
        return self.frame_embeddings(pixel_values_videos.flatten(0, 1)).reshape(b, t * self.tokens_per_frame, -1)

    # ---- streaming -------------------------------------------------------------------------------------------

    def new_cache(self):
        """An empty HF ``DynamicCache`` for :meth:`stream`; the caller keeps it across frames and turns."""
        from transformers import DynamicCache

        return DynamicCache(config=self.language_model.config)

    def extend(self, inputs_embeds: torch.Tensor, cache) -> torch.Tensor:
        """Prefill ``inputs_embeds [B, L, D]`` onto ``cache`` (in place); the last position's logits ``[B, vocab]``."""
        past = cache.get_seq_length()
        positions = torch.arange(past, past + inputs_embeds.shape[1], device=inputs_embeds.device)
        out = self.language_model(inputs_embeds=inputs_embeds, cache=cache, use_cache=True,
                                  position_ids=positions.expand(inputs_embeds.shape[0], -1), logits_to_keep=1)
        return out.logits[:, -1]

    @torch.no_grad()
    def prefill_ids(self, input_ids: torch.Tensor, cache) -> torch.Tensor:
        """Prefill text ids (e.g. the system prompt or a user turn) onto ``cache``."""
        return self.extend(self.embed_ids(input_ids), cache)

    @torch.no_grad()
    def prefill_frame(self, frame: torch.Tensor, cache) -> torch.Tensor:
        """Prefill one frame ``[B, 3, H, W]`` as ``[interval id, frame tokens]`` onto ``cache``."""
        interval = torch.full((frame.shape[0], 1), self.interval_token_id, dtype=torch.long, device=frame.device)
        embeds = torch.cat([self.embed_ids(interval), self.frame_embeddings(frame)], dim=1)
        return self.extend(embeds, cache)

    def stream(self, frames: "Iterable[torch.Tensor] | torch.Tensor", cache) -> Iterator[torch.Tensor]:
        """Prefill frames one by one onto ``cache``; yield each frame's last-position logits ``[B, vocab]``.

        ``frames``: an iterable of ``[B, 3, H, W]`` frames (e.g. a camera) or a
        ``[B, T, 3, H, W]`` tensor. The cache grows by ``1 + tokens_per_frame``
        per frame; use :meth:`should_respond` and :meth:`respond` between frames.
        """
        if isinstance(frames, torch.Tensor):
            if frames.dim() != 5:
                raise ValueError(f"a frames tensor must be [batch, frames, 3, H, W], got {tuple(frames.shape)}")
            frames = frames.unbind(1)
        for frame in frames:
            yield self.prefill_frame(frame, cache)

    def should_respond(self, logits: torch.Tensor, threshold: float = RESPONSE_THRESHOLD) -> torch.Tensor:
        """``[B]`` bool: the model speaks when p(interval token) at the frame's last position < ``threshold``."""
        return logits.float().softmax(-1)[:, self.interval_token_id] < threshold

    @torch.no_grad()
    def respond(self, logits: torch.Tensor, cache, max_new_tokens: int, eos_token_id: Optional[int] = None) -> torch.Tensor:
        """Greedy decode onto ``cache`` from the last logits; ``[B, n <= max_new_tokens]`` new ids."""
        check_positive(max_new_tokens=max_new_tokens)
        eos = self.language_model.config.eos_token_id if eos_token_id is None else eos_token_id
        out = []
        for _ in range(max_new_tokens):
            token = logits.argmax(-1, keepdim=True)
            out.append(token)
            if eos is not None and bool((token == eos).all()):
                break
            logits = self.extend(self.embed_ids(token), cache)
        return torch.cat(out, dim=1)


def stream_ids(batch: int, frames: int, per_frame: int, model: VideoLLMOnline, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """``[batch, n_text + frames * (1 + per_frame)]``: half the prompt, ``[interval, <v> x per_frame]`` per frame, the rest."""
    text = torch.randint(12, vocab - 16, (batch, PROMPT_TEXT_TOKENS), generator=generator)   # above the interval id 11
    frame = torch.tensor([model.interval_token_id] + [model.frame_token_id] * per_frame, dtype=torch.long)
    half = PROMPT_TEXT_TOKENS // 2
    return torch.cat([text[:, :half], frame.repeat(frames).expand(batch, -1), text[:, half:]], dim=1)


def build(size: str, device: torch.device, dtype: torch.dtype) -> ZooModel:
    import transformers as T

    tiny = size == "tiny"
    vision_cfg = T.SiglipVisionConfig(**(TINY_VISION if tiny else FULL_VISION))
    text_cfg = T.LlamaConfig(**(TINY_TEXT if tiny else FULL_TEXT))
    with torch.device(device):
        model = VideoLLMOnline(vision_cfg, text_cfg, **(TINY_STREAM if tiny else FULL_STREAM)).to(dtype)
    side, per_frame = vision_cfg.image_size, model.tokens_per_frame

    def visual_tokens(frames: int) -> int:
        return frames * per_frame

    def example_inputs(batch: int = 1, frames: int = DEFAULT_FRAMES[size], seed: int = 0) -> dict:
        check_positive(batch=batch, frames=frames)
        gen = torch.Generator().manual_seed(seed)
        ids = stream_ids(batch, frames, per_frame, model, text_cfg.vocab_size, gen)
        video = torch.randn(batch, frames, 3, side, side, generator=gen)
        return {"input_ids": ids.to(device), "pixel_values_videos": video.to(device=device, dtype=dtype)}

    def stage_calls(batch: int, frames: int) -> list:
        new = lambda *shape: torch.empty(*shape, device=device, dtype=dtype)
        seq = frames * (1 + per_frame) + PROMPT_TEXT_TOKENS
        return [
            StageCall("vision", model.vision, kwargs={"pixel_values": new(batch * frames, 3, side, side)}),
            StageCall("connector", model.connector, (new(batch * frames, per_frame, vision_cfg.hidden_size),)),
            StageCall("language_model", model.language_model,
                      kwargs={"inputs_embeds": new(batch, seq, text_cfg.hidden_size), "use_cache": False, "logits_to_keep": 1}),
        ]

    return ZooModel("videollm-online", size, model, example_inputs, DEFAULT_FRAMES[size], generates=True,
                    llm=LLMDims.from_hf(text_cfg), visual_tokens=visual_tokens, stage_calls=stage_calls)


register(ZooEntry(
    name="videollm-online",
    paper="VideoLLM-online: Online Video Large Language Model for Streaming Video",
    backbone="SigLIP-L/16-384 (CLS + 3x3 pooled = 10 tokens/frame) + MLP + Llama-3-8B-Instruct, streaming at 2 fps",
    stages=("vision", "connector", "language_model"),
    passes=("canonicalize_attention", "sdpa", "sageattention2", "vidkv", "holitom"),
    build=build,
    notes=("Own wrapper over SiglipVisionModel (MAP head = the CLS token; its nn.MultiheadAttention keeps need_weights=True, "
           "so it exports as bmm-softmax-bmm) and LlamaForCausalLM; the LoRA (r 128) is not built (merged-weight "
           "equivalent). 11 LLM tokens per frame (interval ',' + 10 visual); full default 1200 frames = 10 min at 2 fps "
           "(13.2k tokens). stream()/respond() prefill and decode on a caller-owned DynamicCache (those calls run the "
           "language model eagerly: a cache cannot cross an export boundary). The paper's Llama-2 variants are not "
           "built. HoliTom merges each streamed frame (prefill_frame: the MAP-head token kept, tokens static against the "
           "previous frame dropped first, the rest clustered to the per-frame budget; the whole-stream forward() is not "
           "merged); vidkv makes new_cache() a packed VidKVCache; CCAM does not apply."),
))
