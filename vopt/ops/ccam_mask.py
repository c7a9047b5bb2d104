"""Video-CCAM causal cross-attention mask as a reusable, cached mask object (tokens.md §7).

``N`` learnable queries cross-attend to ``T * P`` frame tokens (frame-major: key j
belongs to frame ``j // P``). Query i may see key j iff ``frame(j) <= g(i)`` with

* ``form="ceil"``:  ``g(i) = ceil((i + 1) * T / N) - 1`` (the last query sees every frame, even for T > N);
* ``form="floor"``: ``g(i) = floor(i * T / N)``.

Both equal ``i // (N / T)`` when T divides N, both always allow frame 0, and T = 1 is
full attention. ``T`` is the frame count *of the call* (any T >= 1, including more
frames than at training: 32-96 at inference vs 16 at training), so a mask object is
built per shape; everything derived from it is cached per shape with
:func:`functools.lru_cache` on pure functions of the fields.

:meth:`CCAMMask.dense` equals :func:`vopt.zoo._ccam_projector.ccam_mask` (the zoo
model's own mask) for the same parameters. Because every query sees a key *prefix*
of length ``(g(i) + 1) * P``, block layouts are computed analytically from the
per-query prefix lengths, never from the dense mask.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from ..errors import ConfigError

FORMS = ("ceil", "floor")

__all__ = ["FORMS", "CCAMMask", "BlockLayout", "last_frame"]


def _pos_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def last_frame(num_queries: int, frames: int, form: str = "ceil") -> torch.Tensor:
    """``g(i)`` for every query: LongTensor ``[num_queries]`` (integer arithmetic only)."""
    i = torch.arange(num_queries)
    if form == "ceil":
        return ((i + 1) * frames + num_queries - 1) // num_queries - 1
    if form == "floor":
        return (i * frames) // num_queries
    raise ConfigError(f"form={form!r} is invalid; accepted: {list(FORMS)}")


class BlockLayout(NamedTuple):
    """Block structure of a mask for ``(block_q, block_k)`` tiles (all CPU tensors, cached: treat as read-only).

    * ``live``  bool ``[nQB, nKB]``: the block holds at least one visible (query, key) element;
    * ``full``  bool ``[nQB, nKB]``: every in-range element of the block is visible (no element mask needed);
    * ``kv_num`` int32 ``[nQB]``: number of live key blocks per query block;
    * ``kv_idx`` int32 ``[nQB, max(kv_num)]``: the live key-block indices, ascending, padded with 0;
    * ``kv_full`` int8 ``[nQB, max(kv_num)]``: ``full`` for each listed block (0 in the padding).
    """

    live: torch.Tensor
    full: torch.Tensor
    kv_num: torch.Tensor
    kv_idx: torch.Tensor
    kv_full: torch.Tensor

    @property
    def live_fraction(self) -> float:
        """Fraction of (query block, key block) tiles that are computed (1 - skipped fraction)."""
        return float(self.live.float().mean()) if self.live.numel() else 0.0


def compact_blocks(live: torch.Tensor, full: Optional[torch.Tensor] = None):
    """``(kv_num int32 [nQB], kv_idx int32 [nQB, maxc], kv_full int8 [nQB, maxc])`` from a bool block mask.

    ``kv_idx[r, :kv_num[r]]`` lists row r's live key blocks in ascending order; padding is 0.
    ``full`` (bool, same shape) marks blocks needing no element mask; ``None`` means all live blocks are full.
    """
    if live.dtype != torch.bool or live.dim() != 2:
        raise ValueError(f"block mask must be a 2-D bool tensor [nQB, nKB], got {live.dtype} {tuple(live.shape)}")
    live = live.cpu()
    kv_num = live.sum(dim=1).to(torch.int32)
    maxc = max(int(kv_num.max()) if kv_num.numel() else 0, 1)
    order = torch.argsort((~live).to(torch.int8), dim=1, stable=True)[:, :maxc]    # live blocks first, ascending
    slot_used = torch.arange(maxc)[None, :] < kv_num[:, None].long()
    kv_idx = torch.where(slot_used, order, torch.zeros_like(order)).to(torch.int32)
    full = live if full is None else (full.cpu() & live)
    kv_full = (torch.gather(full, 1, order) & slot_used).to(torch.int8)
    return kv_num.contiguous(), kv_idx.contiguous(), kv_full.contiguous()


@functools.lru_cache(maxsize=256)
def _last_frame_cached(num_queries: int, frames: int, form: str) -> torch.Tensor:
    return last_frame(num_queries, frames, form)


@functools.lru_cache(maxsize=256)
def _layout(num_queries: int, frames: int, tokens_per_frame: int, form: str, block_q: int, block_k: int) -> BlockLayout:
    nk = frames * tokens_per_frame
    prefix = (_last_frame_cached(num_queries, frames, form) + 1) * tokens_per_frame      # visible keys per query [Q]
    nqb, nkb = -(-num_queries // block_q), -(-nk // block_k)
    pad = nqb * block_q - num_queries
    # g is non-decreasing in i, so per query block: max prefix = last row's, min prefix = first row's.
    p = torch.cat([prefix, prefix[-1:].expand(pad)]).view(nqb, block_q)
    pmax, pmin = p[:, -1], p[:, 0]
    kstart = torch.arange(nkb) * block_k
    kend = torch.clamp(kstart + block_k, max=nk)                                       # in-range keys only
    live = kstart[None, :] < pmax[:, None]
    full = kend[None, :] <= pmin[:, None]
    kv_num, kv_idx, kv_full = compact_blocks(live, full)
    return BlockLayout(live, full, kv_num, kv_idx, kv_full)


@dataclass(frozen=True)
class CCAMMask:
    """Video-CCAM causal cross-attention mask for one shape: ``num_queries`` x ``frames * tokens_per_frame``."""

    num_queries: int
    frames: int
    tokens_per_frame: int
    form: str = "ceil"

    def __post_init__(self):
        _pos_int("num_queries", self.num_queries)
        _pos_int("frames", self.frames)
        _pos_int("tokens_per_frame", self.tokens_per_frame)
        if self.form not in FORMS:
            raise ConfigError(f"form={self.form!r} is invalid; accepted: {list(FORMS)}")

    # -- shape ---------------------------------------------------------------------------------
    @property
    def num_keys(self) -> int:
        return self.frames * self.tokens_per_frame

    @property
    def shape(self) -> tuple:
        return (self.num_queries, self.num_keys)

    def with_frames(self, frames: int) -> "CCAMMask":
        """The same mask rule for another frame count (e.g. 96 inference frames for a 16-frame-trained model)."""
        return CCAMMask(self.num_queries, frames, self.tokens_per_frame, self.form)

    # -- per-query view ------------------------------------------------------------------------
    def last_frame(self) -> torch.Tensor:
        """``g(i)``: LongTensor ``[Q]`` of the last frame each query sees (cached; read-only)."""
        return _last_frame_cached(self.num_queries, self.frames, self.form)

    def frames_visible(self) -> torch.Tensor:
        """Number of frames each query sees, ``g(i) + 1``: LongTensor ``[Q]`` (>= 1)."""
        return self.last_frame() + 1

    def keys_visible(self) -> torch.Tensor:
        """Visible key-prefix length per query, ``(g(i) + 1) * P``: LongTensor ``[Q]``."""
        return self.frames_visible() * self.tokens_per_frame

    def mask_mod(self, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        """Elementwise rule ``kv_idx // P <= g(q_idx)`` (broadcasting index tensors)."""
        g = self.last_frame().to(q_idx.device)
        return (kv_idx // self.tokens_per_frame) <= g[q_idx]

    def dense(self, device: "torch.device | str | None" = None) -> torch.Tensor:
        """bool ``[Q, T * P]``, True = visible; equals ``ccam_mask(Q, T, P, rule=form)``."""
        frame_of_key = torch.arange(self.num_keys, device=device) // self.tokens_per_frame
        return frame_of_key[None, :] <= self.last_frame().to(device)[:, None]

    # -- block view ----------------------------------------------------------------------------
    def layout(self, block_q: int, block_k: int) -> BlockLayout:
        """:class:`BlockLayout` for ``block_q`` x ``block_k`` tiles (cached per shape and block sizes)."""
        _pos_int("block_q", block_q)
        _pos_int("block_k", block_k)
        return _layout(self.num_queries, self.frames, self.tokens_per_frame, self.form, block_q, block_k)

    def block_mask(self, block_q: int, block_k: int) -> torch.Tensor:
        """bool ``[ceil(Q / block_q), ceil(K / block_k)]``: blocks with at least one visible key."""
        return self.layout(block_q, block_k).live

    def full_blocks(self, block_q: int, block_k: int) -> torch.Tensor:
        """bool ``[nQB, nKB]``: blocks whose in-range elements are all visible (no element mask needed)."""
        return self.layout(block_q, block_k).full

    def skipped_fraction(self, block_q: int, block_k: int) -> float:
        """Fraction of tiles a block-sparse kernel skips (about (T - 1) / (2T) for T | N)."""
        return 1.0 - self.layout(block_q, block_k).live_fraction

    # -- FlexAttention -------------------------------------------------------------------------
    def to_flex_block_mask(self, block_size: int = 128, device: "torch.device | str" = "cpu"):
        """A ``torch.nn.attention.flex_attention.BlockMask`` (B = H = 1, broadcast) for this mask.

        Raises ``ImportError`` when this torch has no FlexAttention.
        """
        from torch.nn.attention.flex_attention import create_block_mask

        g = self.last_frame().to(device)
        p = self.tokens_per_frame

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx // p) <= g[q_idx]

        return create_block_mask(mask_mod, B=None, H=None, Q_LEN=self.num_queries, KV_LEN=self.num_keys,
                                 device=device, BLOCK_SIZE=block_size)
