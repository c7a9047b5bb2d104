"""Video-CCAM's projector: learnable queries cross-attending to frame tokens under a causal cross-attention mask.

The released projector is ``trust_remote_code`` Hub code that we have not read
(tokens.md §7); this module is rebuilt from the 7B-v1.2 ``projector_config``:
``num_query`` 1024, ``hidden_size`` 1024, ``cross_hidden_size`` 1152 (K/V input),
16 heads, SwiGLU 4096, attention/MLP biases, dropout 0.1, LayerNorm eps 1e-5,
``output_size`` 3584. The config has no depth field, so one block is
*inferred*: LN(queries) -> masked cross-attention to LN(visual tokens) ->
residual -> LN -> SwiGLU -> residual -> Linear to the LLM width. The projector
emits ``num_queries`` tokens for any number of frames.

The mask (:func:`ccam_mask`) is passed to ``F.scaled_dot_product_attention`` as
``attn_mask``, so the cross-attention is one SDPA node in exported graphs.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

#: How query ``i`` of ``N`` maps to its last visible frame among ``T`` (tokens.md §7; the released rule is unverified).
MASK_RULES = ("ceil", "floor")


def ccam_last_frame(num_queries: int, num_frames: Union[int, torch.Tensor], rule: str = "ceil",
                    device: "torch.device | str | None" = None) -> torch.Tensor:
    """The last frame ``g(i)`` each query may attend to: ``[Q]`` (int frames) or ``[B, Q]`` (per-video counts).

    * ``rule="ceil"``:  ``g(i) = ceil((i + 1) * T / N) - 1``: the last query sees every frame, even when T > N.
    * ``rule="floor"``: ``g(i) = floor(i * T / N)``.

    Both equal ``i // (N / T)`` when T divides N (query group g sees frames 0..g),
    both let every query see frame 0 (no fully masked row), and T = 1 gives full
    attention. Integer arithmetic only, so it exports without guards.
    """
    if rule not in MASK_RULES:
        raise ConfigError(f"rule={rule!r} is invalid; accepted: {list(MASK_RULES)}")
    if not isinstance(num_queries, int) or isinstance(num_queries, bool) or num_queries < 1:
        raise ConfigError(f"num_queries must be a positive integer, got {num_queries!r}")
    if isinstance(num_frames, torch.Tensor):
        device = num_frames.device
        frames = num_frames.to(torch.long).reshape(-1, 1)              # [B, 1]
    elif isinstance(num_frames, int) and not isinstance(num_frames, bool) and num_frames >= 1:
        frames = num_frames
    else:
        raise ConfigError(f"num_frames must be a positive integer or a LongTensor of per-video counts, got {num_frames!r}")
    i = torch.arange(num_queries, device=device)
    if rule == "ceil":
        return ((i + 1) * frames + num_queries - 1) // num_queries - 1
    return (i * frames) // num_queries


def ccam_mask(num_queries: int, num_frames: int, tokens_per_frame: int, *, rule: str = "ceil",
              frames_per_video: Optional[torch.Tensor] = None, device: "torch.device | str | None" = None) -> torch.Tensor:
    """Causal cross-attention mask of Video-CCAM: bool ``[Q, T*P]``, True where query i may attend to key j.

    Keys are the ``T * P`` visual tokens, frame-major (key j belongs to frame
    ``j // P``). Query i may attend to key j iff ``frame(j) <= g(i)``
    (:func:`ccam_last_frame`): queries are split into T ordered groups and group
    g sees frames 0..g, so early queries summarize the start of the video and
    the projector output keeps temporal order.

    ``frames_per_video`` (LongTensor ``[B]``, each 1..T) handles videos padded to
    T frames at the end: ``g`` is computed from each video's own frame count and
    padded frames are masked out, giving a ``[B, Q, T*P]`` mask; a padded video
    then gets exactly the outputs it gets unpadded.

    Execution note (tokens.md §7): each query group attends to a key *prefix*,
    so about (T+1)/(2T) of the key blocks are live; a block-sparse kernel or T
    prefix-attention calls skip the rest. This dense boolean mask is the
    reference (SDPA) form.
    """
    for name, value in (("num_frames", num_frames), ("tokens_per_frame", tokens_per_frame)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if frames_per_video is not None:
        if not isinstance(frames_per_video, torch.Tensor) or frames_per_video.dim() != 1:
            raise ConfigError("frames_per_video must be a 1-D LongTensor of per-video frame counts")
        device = frames_per_video.device
    frame_of_key = torch.arange(num_frames * tokens_per_frame, device=device) // tokens_per_frame    # [K]
    if frames_per_video is None:
        last = ccam_last_frame(num_queries, num_frames, rule, device)                                 # [Q]
        return frame_of_key[None, :] <= last[:, None]
    last = ccam_last_frame(num_queries, frames_per_video, rule)                                      # [B, Q]
    valid = frame_of_key[None, :] < frames_per_video.to(torch.long)[:, None]                         # [B, K]
    return (frame_of_key[None, None, :] <= last[:, :, None]) & valid[:, None, :]


class CCAMProjector(nn.Module):
    """Learnable queries -> one masked cross-attention block -> SwiGLU -> Linear to the LLM width.

    ``forward(visual_features [B, T, P, C_in], frames_per_video=None) -> [B, num_queries, output_size]``.
    """

    def __init__(self, num_queries: int, hidden_size: int, cross_hidden_size: int, num_heads: int,
                 intermediate_size: int, output_size: int, *, dropout: float = 0.0, layer_norm_eps: float = 1e-5,
                 mask_rule: str = "ceil"):
        super().__init__()
        if hidden_size % num_heads:
            raise ConfigError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
        if mask_rule not in MASK_RULES:
            raise ConfigError(f"mask_rule={mask_rule!r} is invalid; accepted: {list(MASK_RULES)}")
        self.num_queries, self.num_heads, self.mask_rule = num_queries, num_heads, mask_rule
        self.head_dim = hidden_size // num_heads
        self.dropout = dropout
        self.queries = nn.Parameter(torch.randn(num_queries, hidden_size) * 0.02)
        self.query_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.kv_norm = nn.LayerNorm(cross_hidden_size, eps=layer_norm_eps)
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(cross_hidden_size, hidden_size)
        self.v_proj = nn.Linear(cross_hidden_size, hidden_size)
        self.o_proj = nn.Linear(hidden_size, hidden_size)
        self.mlp_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size)
        self.up_proj = nn.Linear(hidden_size, intermediate_size)
        self.down_proj = nn.Linear(intermediate_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, output_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)             # [B, H, n, hd]

    def forward(self, visual_features: torch.Tensor, frames_per_video: Optional[torch.Tensor] = None) -> torch.Tensor:
        if visual_features.dim() != 4:
            raise ValueError(f"visual_features must be [batch, frames, tokens_per_frame, dim], got {tuple(visual_features.shape)}")
        b, t, p, c = visual_features.shape
        mask = ccam_mask(self.num_queries, t, p, rule=self.mask_rule, frames_per_video=frames_per_video,
                         device=visual_features.device)
        mask = mask[:, None] if mask.dim() == 3 else mask                              # [B, 1, Q, K] or [Q, K]
        kv = self.kv_norm(visual_features.reshape(b, t * p, c))
        # The query projection does not depend on the input: computed once, broadcast over the batch.
        q = self._heads(self.q_proj(self.query_norm(self.queries)).unsqueeze(0)).expand(b, -1, -1, -1)
        k, v = self._heads(self.k_proj(kv)), self._heads(self.v_proj(kv))
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        x = self.queries + self.o_proj(attn.transpose(1, 2).reshape(b, self.num_queries, -1))     # [B, Q, hidden]
        h = self.mlp_norm(x)
        x = x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
        return self.out_proj(x)
