"""A transformers 5.x KV cache that stores VidKV / KIVI packed codes (spec ``kvcache.md`` §1.4-1.5, §3, §5).

:class:`VidKVLayer` is a ``DynamicLayer`` subclass (spec §5: no ``_layer_type``, so nothing is registered with
transformers' layer mappings and ``DynamicLayer`` is never replaced globally). :class:`VidKVCache` is a
``transformers.Cache`` with one :class:`VidKVLayer` per decoder layer; pass it as ``model.generate(..., cache=...)``.

Storage of one layer (batch ``B``, KV heads ``H``, head dim ``D``):

* **protected tokens**: positions chosen at prefill (``protect_first`` leading tokens and/or an explicit boolean mask
  or index list, e.g. text/system tokens or salient visual tokens) are kept in the input dtype forever, with their
  positions (``int64``, counted as *indices*);
* **packed blocks** (append-only): every other token goes through a full-precision window; whenever the window holds
  more than ``residual_length`` tokens by at least one whole block (``lcm`` of the key group and, for per-channel
  values, the value group), the oldest whole blocks are quantized with :func:`~vopt.kvcache.quantize_keys` /
  :func:`~vopt.kvcache.quantize_values` numerics into one new :class:`~vopt.kvcache.PackedKeys` /
  :class:`~vopt.kvcache.PackedValues` pair. Old blocks are never re-quantized (KIVI-style; spec §3 "vidkv");
* **key channel split**: computed on the first quantized block (usually at prefill) and frozen: every later block
  reuses it (per ``(sample, KV head)`` in recommended mode, one per layer pooled over ``B·H·T`` in reference mode).
  It is stored once per layer (*indices*);
* **window**: the last ``residual_length .. residual_length + block − 1`` unprotected tokens, input dtype
  (*full_precision*).

:meth:`VidKVLayer.update` returns the full K/V sequence in the original order: dequantized blocks, then the window,
with protected tokens scattered back to their positions (the reference decode path: dequantize → ordinary attention;
slower than FP16, spec §3 "Decode path" (1)). At prefill (the first update) it returns the exact K/V by default
(``prefill_exact=True``), as both VidKV (§1.5.1) and KIVI (§4) do, so a single-token answer is never affected: only
tokens computed by decode steps attend to dequantized K/V.

Batch: every statistic is per row except the reference layer-pooled channel split (a documented reference defect,
§1.7). Protection is by position and shared by all rows. ``reorder_cache`` / ``batch_select_indices`` /
``batch_repeat_interleave`` reorder the packed words exactly (unpack, select rows, repack). ``crop`` raises
(packed blocks cannot be rolled back), ``reset`` drops everything. What this module does **not** do:
STP scoring (§1.4: pass salient positions as ``protected`` instead). ``flush="requantize"`` reproduces the reference's
whole-cache re-quantization (§1.5.3: at prefill every whole block is quantized, and whenever the window reaches
``residual_length`` everything is dequantized and re-quantized, channels re-ranked); the default ``flush="append"`` is
the recommended policy above.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Optional, Sequence, Union

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ..errors import ConfigError
from .accounting import KVAccount, account
from .quantizers import (
    KVQuantMode,
    PackedCodes,
    PackedKeys,
    PackedValues,
    ValueAxis,
    VidKVConfig,
    concat_blocks,
    _gather_channels,
    _group_tokens,
    _pack,
    _q1sign,
    _q2,
    _real_coefficients,
    dequantize_keys,
    dequantize_values,
    quantize_keys,
    quantize_values,
)

log = logging.getLogger(__name__)

__all__ = ["VidKVLayer", "VidKVCache", "FLUSH_POLICIES"]

#: ``"append"``: KIVI-style append-only blocks, split frozen at the first block (recommended, spec §3).
#: ``"requantize"``: the published VidKV flush (spec §1.5.3), for reproduction only.
FLUSH_POLICIES = ("append", "requantize")

Protected = Union[None, torch.Tensor, Sequence[int]]


# ---------------------------------------------------------------------------------------------------------------
# Row selection of packed containers (beam search): unpack, select, repack -- exact
# ---------------------------------------------------------------------------------------------------------------
def _select_codes(pc: Optional[PackedCodes], idx: torch.Tensor) -> Optional[PackedCodes]:
    if pc is None:
        return None
    codes = pc.codes().index_select(0, idx)
    sel = lambda t: None if t is None else t.index_select(0, idx)  # noqa: E731
    return PackedCodes(_pack(codes, pc.bits), pc.bits, tuple(codes.shape), pc.decode, sel(pc.scale), sel(pc.zero))


def _select_keys(pk: PackedKeys, idx: torch.Tensor, stored_idx: Optional[torch.Tensor]) -> PackedKeys:
    B, H, T, D = pk.shape
    return dataclasses.replace(
        pk, shape=(idx.numel(), H, T, D), anomalous_idx=stored_idx,
        anomalous=_select_codes(pk.anomalous, idx), easy=_select_codes(pk.easy, idx),
        tail=None if pk.tail is None else pk.tail.index_select(0, idx))


def _select_values(pv: PackedValues, idx: torch.Tensor) -> PackedValues:
    B, H, T, D = pv.shape
    return dataclasses.replace(pv, shape=(idx.numel(), H, T, D), codes=_select_codes(pv.codes, idx),
                               tail=None if pv.tail is None else pv.tail.index_select(0, idx))


def _nbytes(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.numel() * t.element_size()


# ---------------------------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------------------------
class VidKVLayer(DynamicLayer):
    """One decoder layer's VidKV / KIVI cache (module docstring).

    State a fused decode kernel can read (all rows ``[B, H, ...]``; the sequence order is blocks, window, with the
    protected tokens at ``protected_pos``):

    * ``blocks``: ``[(PackedKeys, PackedValues)]``, oldest first, each covering a whole number of groups; never
      modified after it is appended (except row selection by beam search);
    * ``split_idx``: the frozen anomalous key channels (int16 ``[k]`` layer split or ``[B, H, k]`` head split; None
      when ``k`` is 0 or ``D``), shared by every block's ``anomalous_idx``;
    * ``keys`` / ``values``: the full-precision window ``[B, H, W, D]`` (input dtype);
    * ``protected_pos`` (int64 ``[P]``), ``protected_keys`` / ``protected_values`` ``[B, H, P, D]``.
    """

    is_croppable = False
    is_compileable = False

    def __init__(self, vidkv: Optional[VidKVConfig] = None, residual_length: int = 128, protect_first: int = 0,
                 protected: Protected = None, prefill_exact: bool = True, flush: str = "append",
                 fused_decode: bool = False):
        super().__init__()
        self.fused_decode = bool(fused_decode)
        vidkv = VidKVConfig() if vidkv is None else vidkv
        if not isinstance(vidkv, VidKVConfig):
            raise ConfigError(f"VidKVLayer.vidkv must be a VidKVConfig (e.g. kivi_config()), "
                              f"got {type(vidkv).__name__}")
        vidkv.validate()
        if isinstance(residual_length, bool) or not isinstance(residual_length, int) or residual_length < 0:
            raise ConfigError(f"VidKVCache.residual_length must be an integer >= 0 (e.g. 128), got {residual_length!r}")
        if isinstance(protect_first, bool) or not isinstance(protect_first, int) or protect_first < 0:
            raise ConfigError(f"VidKVCache.protect_first must be an integer >= 0 (e.g. 1 for the first token), "
                              f"got {protect_first!r}")
        self.vidkv = vidkv
        self.residual_length = residual_length
        self.protect_first = protect_first
        self.protected = protected
        self.prefill_exact = bool(prefill_exact)
        if flush not in FLUSH_POLICIES:
            raise ConfigError(f"VidKVCache.flush must be one of {', '.join(FLUSH_POLICIES)}, got {flush!r}")
        self.flush = flush
        vg = vidkv.value_group_size if vidkv.value_axis is ValueAxis.CHANNEL else 1
        #: Tokens per quantization step: a whole number of key groups and (per-channel values) value groups.
        self.block_size = math.lcm(vidkv.key_group_size, vg)
        self._clear()

    # -- state ---------------------------------------------------------------------------------------------------
    def _clear(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.cumulative_length = 0
        self.blocks: list = []                    # [(PackedKeys, PackedValues)], oldest first, append-only
        self.split_idx: Optional[torch.Tensor] = None   # stored anomalous channel indices (frozen), int16
        self._split_frozen = False
        self.protected_pos: Optional[torch.Tensor] = None  # int64 [P] sequence positions
        self.protected_keys = self.protected_values = None  # [B, H, P, D], input dtype
        self._merged = None  # (the block objects joined, PackedKeys, PackedValues): merged_blocks()' cache
        self.prefill_length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        cfg = self.vidkv
        D = key_states.shape[-1]
        if cfg.value_axis is ValueAxis.TOKEN and D % cfg.value_group_size:
            raise ConfigError(f"VidKVConfig.value_group_size={cfg.value_group_size} must divide the head dim {D} when "
                              f"value_axis='token'; accepted: a divisor of {D}")
        self.keys = key_states[:, :, :0].clone()
        self.values = value_states[:, :, :0].clone()
        self.is_initialized = True

    def _protected_mask(self, T: int) -> torch.Tensor:
        mask = torch.zeros(T, dtype=torch.bool, device=self.device)
        mask[: min(self.protect_first, T)] = True
        p = self.protected
        if p is None:
            return mask
        p = torch.as_tensor(p, device=self.device)
        if p.dtype == torch.bool:
            if p.dim() == 2:  # [B, T]: a position is protected when any row protects it (protection is per position)
                p = p.any(0)
            if p.dim() != 1 or p.shape[0] != T:
                raise ConfigError(f"VidKVCache.protected: a boolean mask must have shape [T] or [B, T] with T = the "
                                  f"prefill length {T}, got {tuple(p.shape)}")
            return mask | p
        p = p.reshape(-1).long()
        if p.numel() and (int(p.min()) < -T or int(p.max()) >= T):
            raise ConfigError(f"VidKVCache.protected: positions must lie in [0, {T}) (the prefill length), got "
                              f"range [{int(p.min())}, {int(p.max())}]")
        mask[p] = True
        return mask

    # -- quantization --------------------------------------------------------------------------------------------
    def _channel_orders(self, B: int, H: int, D: int):
        """(easy, anomalous) channel indices ``[B, H, *]`` of the frozen split, in the order dequantization uses."""
        k = int(D * self.vidkv.anomalous_fraction)
        if self.split_idx is None:
            ch = torch.arange(D, device=self.device).expand(B, H, D)
            return ch[..., : D - k], ch[..., D - k:]
        anom = self.split_idx.long()
        anom = anom.expand(B, H, k) if anom.dim() == 1 else anom
        is_anom = torch.zeros(B, H, D, dtype=torch.int8, device=anom.device).scatter_(-1, anom, 1)
        order = torch.sort(is_anom, dim=-1, stable=True).indices
        return order[..., : D - k], order[..., D - k:]

    def _quantize_keys_frozen(self, k: torch.Tensor) -> PackedKeys:
        """:func:`quantize_keys` with the frozen channel split (``k``'s length is a whole number of groups)."""
        cfg = self.vidkv
        B, H, T, D = k.shape
        n_anom = int(D * cfg.anomalous_fraction)
        kq = k.to(torch.float32)
        easy_idx, anom_idx = self._channel_orders(B, H, D)
        G, meta = cfg.key_group_size, cfg.meta_dtype
        anomalous = _q2(_group_tokens(_gather_channels(kq, anom_idx), G), meta) if n_anom else None
        easy = None
        if n_anom < D:
            coeffs = _real_coefficients(_gather_channels(kq, easy_idx), cfg.mode is KVQuantMode.REFERENCE)
            easy = _q1sign(_group_tokens(coeffs, G), meta, cfg.mode is KVQuantMode.REFERENCE)
        return PackedKeys(tuple(k.shape), k.dtype, cfg.mode, G, self.split_idx, n_anom, anomalous, easy, None)

    def _quantize_block(self, k: torch.Tensor, v: torch.Tensor) -> None:
        if not self._split_frozen:
            pk = quantize_keys(k, self.vidkv)  # ranks the channels: this split is frozen from now on
            self.split_idx = pk.anomalous_idx
            self._split_frozen = True
        else:
            pk = self._quantize_keys_frozen(k)
        self.blocks.append((pk, quantize_values(v, self.vidkv)))

    def _flush(self, prefill: bool) -> None:
        if self.flush == "requantize":
            return self._flush_requantize(prefill)
        over = self.keys.shape[2] - self.residual_length
        n = (over // self.block_size) * self.block_size if over > 0 else 0
        if n <= 0:
            return
        self._quantize_block(self.keys[:, :, :n], self.values[:, :, :n])
        self.keys = self.keys[:, :, n:].clone()
        self.values = self.values[:, :, n:].clone()

    def _flush_requantize(self, prefill: bool) -> None:
        """The reference policy (spec §1.5): at prefill quantize every whole block; afterwards, once the window holds
        ``residual_length`` tokens, dequantize everything and re-quantize it all from scratch (channels re-ranked),
        keeping only the partial block in the window. Old tokens are re-quantized (errors compound; O(T) per flush)."""
        W = self.keys.shape[2]
        if not prefill and W < max(self.residual_length, 1):
            return
        if prefill:
            k_all, v_all = self.keys, self.values
        else:
            ks = [dequantize_keys(pk) for pk, _ in self.blocks] + [self.keys]
            vs = [dequantize_values(pv) for _, pv in self.blocks] + [self.values]
            k_all, v_all = torch.cat(ks, dim=2), torch.cat(vs, dim=2)
        n = (k_all.shape[2] // self.block_size) * self.block_size
        if n == 0:
            return
        self.blocks, self._split_frozen, self.split_idx = [], False, None
        self._quantize_block(k_all[:, :, :n], v_all[:, :, :n])
        self.keys, self.values = k_all[:, :, n:].clone(), v_all[:, :, n:].clone()

    # -- transformers API ----------------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[B, H, t, D]`` K/V; return the whole sequence (exact at prefill by default, else dequantized)."""
        first = not self.is_initialized
        if first:
            self.lazy_initialization(key_states, value_states)
        T_new = key_states.shape[2]
        k_rest, v_rest = key_states, value_states
        if first:
            self.prefill_length = T_new
            mask = self._protected_mask(T_new)
            if bool(mask.any()):
                self.protected_pos = mask.nonzero().reshape(-1)
                self.protected_keys = key_states[:, :, mask].clone()
                self.protected_values = value_states[:, :, mask].clone()
                k_rest, v_rest = key_states[:, :, ~mask], value_states[:, :, ~mask]
        self.cumulative_length += T_new
        self.keys = torch.cat([self.keys, k_rest], dim=-2)
        self.values = torch.cat([self.values, v_rest], dim=-2)
        self._flush(first)
        if first and self.prefill_exact:
            return key_states, value_states
        if self.fused_decode and not first and T_new == 1:
            handle = PackedKV(self)
            return handle, handle
        return self.full_kv()

    def decode_attention(self, query: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         scale: Optional[float] = None) -> torch.Tensor:
        """Attention of ``query [B, Hq, Lq, D]`` over this layer's cache, computed on the packed codes
        (:func:`vopt.kvcache.packed_decode_attention`: no dequantized K/V is formed); ``[B, Hq, Lq, Dv]``.

        Tokens are visited as ``[blocks | window | protected]``; ``attn_mask`` (SDPA semantics, columns in sequence
        order ``[.., T]``) is permuted to that order. Equals SDPA over :meth:`full_kv` to float tolerance.
        """
        from .decode_attention import packed_decode_attention

        window_k, window_v = self.keys, self.values
        if self.protected_pos is not None:
            window_k = torch.cat([window_k, self.protected_keys], dim=2)
            window_v = torch.cat([window_v, self.protected_values], dim=2)
        if attn_mask is not None:
            attn_mask = attn_mask[..., -self.cumulative_length:]
            if self.protected_pos is not None:
                keep = torch.ones(self.cumulative_length, dtype=torch.bool, device=attn_mask.device)
                keep[self.protected_pos] = False
                order = torch.cat([keep.nonzero().reshape(-1), self.protected_pos.to(attn_mask.device)])
                attn_mask = attn_mask.index_select(-1, order)
        pks = [pk for pk, _ in self.blocks]
        pvs = [pv for _, pv in self.blocks]
        wk = window_k if window_k.shape[2] else None
        wv = window_v if window_v.shape[2] else None
        gqa = query.shape[1] != window_k.shape[1]
        if query.is_cuda and pks and attn_mask is None:
            out = self._fused_decode(query, wk, wv, scale, gqa)
            if out is not None:
                return out
        return packed_decode_attention(query, pks or None, pvs or None, wk, wv, scale=scale, enable_gqa=gqa,
                                       attn_mask=attn_mask)

    def merged_blocks(self) -> tuple:
        """``(PackedKeys, PackedValues)``: the append-only blocks joined into one container each
        (:func:`~vopt.kvcache.quantizers.concat_blocks`), re-joined only when a block was added since the last call
        (once every ``block_size`` tokens, not every step; any rewrite of the blocks, e.g. a beam reorder or the
        re-quantizing flush, makes new block objects and so a new join)."""
        current = tuple(pk for pk, _ in self.blocks)  # held by the cache entry, so identity comparison is safe
        cached = self._merged
        if cached is None or len(cached[0]) != len(current) or any(a is not b for a, b in zip(cached[0], current)):
            pk, pv = concat_blocks([pk for pk, _ in self.blocks], [pv for _, pv in self.blocks])
            self._merged = cached = (current, pk, pv)
        return cached[1], cached[2]

    def _fused_decode(self, query, window_k, window_v, scale, gqa) -> Optional[torch.Tensor]:
        """A fused kernel over :meth:`merged_blocks` + window (CUDA, no mask): the CUDA library's
        (:mod:`vopt.kvcache.decode_cuda`), else the Triton one, else None; each refusal is logged once."""
        from . import decode_cuda

        pk, pv = self.merged_blocks()
        why = decode_cuda.unsupported_reason(query, pk, pv, window_k, window_v, gqa)
        if why is None:
            return decode_cuda.packed_decode_attention_cuda(query, pk, pv, window_k, window_v, scale, gqa)
        _log_once(f"vidkv fused decode: CUDA kernel refused ({why}); trying Triton")
        try:
            from vopt.kernels import vidkv_decode as kd
        except ImportError as exc:  # pragma: no cover - triton missing
            _log_once(f"vidkv fused decode: Triton unavailable ({exc}); torch reference used")
            return None
        why = kd.unsupported_reason(query, pk, pv, window_k, window_v, gqa)
        if why is not None:
            _log_once(f"vidkv fused decode: Triton kernel refused ({why}); torch reference used")
            return None
        return kd.packed_decode_attention_triton(query, pk, pv, window_k, window_v, scale, gqa)

    def full_kv(self):
        """The cached K/V ``[B, H, T, D]`` in sequence order: dequantized blocks, window, protected tokens in place."""
        ks = [dequantize_keys(pk) for pk, _ in self.blocks] + [self.keys]
        vs = [dequantize_values(pv) for _, pv in self.blocks] + [self.values]
        k, v = torch.cat(ks, dim=2), torch.cat(vs, dim=2)
        if self.protected_pos is None:
            return k, v
        T = self.cumulative_length
        keep = torch.ones(T, dtype=torch.bool, device=self.device)
        keep[self.protected_pos] = False
        rest = keep.nonzero().reshape(-1)
        B, H, _, D = k.shape
        out_k = k.new_empty(B, H, T, D).index_copy_(2, rest, k).index_copy_(2, self.protected_pos, self.protected_keys)
        out_v = v.new_empty(B, H, T, v.shape[-1]).index_copy_(2, rest, v).index_copy_(
            2, self.protected_pos, self.protected_values)
        return out_k, out_v

    def get_seq_length(self) -> int:
        return self.cumulative_length if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple:
        """As ``DynamicLayer``: ``(cached length + query_length, 0)``."""
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        """Drop everything (the next update is a fresh prefill; protection settings are kept)."""
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise NotImplementedError(
            "VidKVLayer cannot crop: packed blocks are append-only and quantized in whole groups, so tokens cannot be "
            "removed (assisted / speculative decoding and DoLa need a croppable cache; use DynamicCache there)")

    def _select_rows(self, idx: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        idx = idx.to(self.device).long()
        if self.split_idx is not None and self.split_idx.dim() == 3:  # per (sample, head) split: rows follow
            self.split_idx = self.split_idx.index_select(0, idx)
        self.blocks = [(_select_keys(pk, idx, self.split_idx), _select_values(pv, idx)) for pk, pv in self.blocks]
        self.keys, self.values = self.keys.index_select(0, idx), self.values.index_select(0, idx)
        if self.protected_keys is not None:
            self.protected_keys = self.protected_keys.index_select(0, idx)
            self.protected_values = self.protected_values.index_select(0, idx)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: reorder the rows of every packed block (exactly), the window and the protected tokens."""
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if isinstance(indices, torch.Tensor) and indices.dtype == torch.bool:
            indices = indices.nonzero().reshape(-1)
        self._select_rows(torch.as_tensor(indices))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            B = self.keys.shape[0]
            self._select_rows(torch.arange(B, device=self.device).repeat_interleave(repeats))

    def offload(self):  # packed blocks stay where they are; only the window would move: keep it simple
        return None

    def prefetch(self):
        return None

    # -- accounting ----------------------------------------------------------------------------------------------
    def account(self, label: str = "", quantized_only: bool = False) -> KVAccount:
        """Exact stored bytes of this layer (:func:`vopt.kvcache.account`); the frozen split is counted once.

        ``quantized_only``: only the packed blocks and the channel split (the bits of the quantized part), without
        the window, the protected tokens and their positions.
        """
        if not self.is_initialized:
            return KVAccount(label=label)
        items = []
        for pk, pv in self.blocks:
            items += [dataclasses.replace(pk, anomalous_idx=None), pv]
        if quantized_only:
            acc = account(*items, label=label)
            acc.indices += _nbytes(self.split_idx) if self.blocks else 0
            return acc
        prot = [] if self.protected_keys is None else [self.protected_keys, self.protected_values]
        acc = account(*items, full_precision=[self.keys, self.values], unquantized=prot, label=label)
        acc.indices += _nbytes(self.split_idx) + _nbytes(self.protected_pos)
        return acc

    @property
    def num_quantized_tokens(self) -> int:
        return sum(pk.shape[2] for pk, _ in self.blocks)


_LOGGED: set = set()


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        log.info(message)


class PackedKV:
    """What :meth:`VidKVLayer.update` returns for a decode step in ``fused_decode`` mode, in place of K and V: a
    handle on the packed layer. Only an attention function that knows it (the ``vidkv`` pass installs one) may
    receive it; it computes :meth:`VidKVLayer.decode_attention` instead of attention over dequantized tensors."""

    __slots__ = ("layer",)

    def __init__(self, layer: "VidKVLayer"):
        self.layer = layer


# ---------------------------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------------------------
def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if callable(get) else config


class VidKVCache(Cache):
    """A ``transformers.Cache`` of :class:`VidKVLayer` s, one per decoder layer.

    ``config``: the model's (or text) config: ``config.get_text_config(decoder=True).num_hidden_layers`` layers; or
    ``None`` with ``num_layers``. ``vidkv``: the numerics (:class:`VidKVConfig`; :func:`~vopt.kvcache.kivi_config` for
    KIVI-2). ``residual_length``: full-precision window (spec R). ``protect_first``: leading prefill tokens kept in full
    precision; ``protected``: further positions (boolean mask ``[T]`` / ``[B, T]`` or index list) of the prefill.
    Use: ``model.generate(**inputs, cache=VidKVCache(model.config, kivi_config(), residual_length=32))``; a cache
    serves one ``generate`` call (build a fresh one per call). ``fused_decode=True``: single-token decode steps get
    :class:`PackedKV` handles instead of dequantized K/V (needs the ``vidkv`` pass's attention function, see
    ``passes/vidkv.py``; with any other attention implementation leave it False).
    """

    def __init__(self, config=None, vidkv: Optional[VidKVConfig] = None, residual_length: int = 128,
                 protect_first: int = 0, protected: Protected = None, prefill_exact: bool = True,
                 num_layers: Optional[int] = None, flush: str = "append", fused_decode: bool = False):
        if num_layers is None:
            if config is None:
                raise ConfigError("VidKVCache needs a model config (or num_layers=) to know the number of layers")
            text = _text_config(config)
            num_layers = getattr(text, "num_hidden_layers", None)
            if not isinstance(num_layers, int) or num_layers < 1:
                raise ConfigError(f"VidKVCache: {type(text).__name__} has no num_hidden_layers; pass num_layers=")
            types_ = set(getattr(text, "layer_types", None) or ())
            if types_ - {"full_attention"}:
                raise ConfigError(f"VidKVCache supports full-attention decoders only; "
                                  f"{type(text).__name__}.layer_types contains {sorted(types_ - {'full_attention'})}")
        self.vidkv = VidKVConfig() if vidkv is None else vidkv
        layers = [VidKVLayer(self.vidkv, residual_length, protect_first, protected, prefill_exact, flush, fused_decode)
                  for _ in range(num_layers)]
        super().__init__(layers=layers)

    def protect(self, protected: Protected) -> "VidKVCache":
        """Set the protected prefill positions (mask or indices) before the prefill; returns ``self``."""
        if any(layer.is_initialized for layer in self.layers):
            raise ConfigError("VidKVCache.protect() must be called before the prefill (the cache already holds tokens)")
        for layer in self.layers:
            layer.protected = protected
        return self

    def account(self, label: str = "", quantized_only: bool = False) -> KVAccount:
        """Exact stored bytes over all layers: packed blocks, windows, protected tokens, index lists.

        ``quantized_only``: the packed blocks and channel splits only (:meth:`VidKVLayer.account`).
        """
        acc = KVAccount(label=label)
        for layer in self.layers:
            acc = acc + layer.account(quantized_only=quantized_only)
        acc.label = label
        return acc

    @property
    def num_quantized_tokens(self) -> int:
        """Quantized tokens of layer 0 (all layers quantize the same positions)."""
        return self.layers[0].num_quantized_tokens if self.layers else 0
