"""Honest stored-bits accounting of a quantized KV cache (spec ``kvcache.md`` §2, §6.1).

The bits quoted for a KV cache are the stored ones: every byte the cache holds (packed codes, scales and zero points,
channel index lists, the FP16 residual window, tokens left unquantized) divided by the number of K and V elements it
represents. Nominal labels ("1.5-bit keys", "1.58-bit values") are not bits per element: VidKV's reference "K1.5/V1.58"
stores 3.25 bits per element at D = 128, G = 32 with fp16 metadata (spec §2).

:func:`account` sums ``numel · element_size`` over what it is given; nothing is estimated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from .quantizers import PackedKeys, PackedValues

__all__ = ["KVAccount", "account", "CATEGORIES", "cache_stored_bytes"]

#: Byte categories, in table order.
CATEGORIES = ("codes", "scales", "indices", "full_precision", "unquantized")

_DESCRIPTIONS = {
    "codes": "packed code words",
    "scales": "scales and zero points",
    "indices": "channel index lists",
    "full_precision": "full-precision (residual) window",
    "unquantized": "unquantized tokens (partial groups, fp tensors)",
}


@dataclass
class KVAccount:
    """Exact stored bytes by category and the bits per represented K/V element."""

    codes: int = 0
    scales: int = 0
    indices: int = 0
    full_precision: int = 0
    unquantized: int = 0
    elements: int = 0
    label: str = ""

    @property
    def total_bytes(self) -> int:
        return sum(getattr(self, c) for c in CATEGORIES)

    @property
    def bits_per_element(self) -> float:
        """``8 · total_bytes / elements`` (0 when nothing is represented)."""
        return 8.0 * self.total_bytes / self.elements if self.elements else 0.0

    def bits(self) -> dict:
        """Bits per element of each category (they sum to :attr:`bits_per_element`)."""
        return {c: (8.0 * getattr(self, c) / self.elements if self.elements else 0.0) for c in CATEGORIES}

    @property
    def compression_vs_fp16(self) -> float:
        """16 / bits_per_element."""
        return 16.0 / self.bits_per_element if self.bits_per_element else float("inf")

    def to_dict(self) -> dict:
        out = {c: getattr(self, c) for c in CATEGORIES}
        out.update(total_bytes=self.total_bytes, elements=self.elements, bits_per_element=self.bits_per_element,
                   bits=self.bits(), label=self.label)
        return out

    def table(self) -> str:
        """A plain-text table: bytes and bits per element of each category, then the total."""
        title = f"KV cache storage{': ' + self.label if self.label else ''} ({self.elements} elements)"
        rows = [title, f"{'category':<16}{'bytes':>14}{'bits/elem':>11}  what"]
        bits = self.bits()
        for c in CATEGORIES:
            rows.append(f"{c:<16}{getattr(self, c):>14}{bits[c]:>11.4f}  {_DESCRIPTIONS[c]}")
        rows.append(f"{'total':<16}{self.total_bytes:>14}{self.bits_per_element:>11.4f}  "
                    f"({self.compression_vs_fp16:.2f}x vs fp16)")
        return "\n".join(rows)

    def __add__(self, other: "KVAccount") -> "KVAccount":
        return KVAccount(*(getattr(self, c) + getattr(other, c) for c in CATEGORIES),
                         elements=self.elements + other.elements, label=self.label or other.label)


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def account(
    *items,
    full_precision: Iterable[torch.Tensor] = (),
    unquantized: Iterable[torch.Tensor] = (),
    label: str = "",
) -> KVAccount:
    """Stored bytes of a KV cache, by category.

    ``items``: :class:`PackedKeys` / :class:`PackedValues` (their codes, metadata, indices and fp16 tails) or plain
    tensors (counted as *unquantized*, e.g. a layer kept in fp16). ``full_precision``: the residual window tensors
    (K and V) the cache keeps in full precision. ``unquantized``: further unquantized tensors. Every tensor counts
    ``numel · element_size`` bytes and its ``numel`` elements; a packed container counts the elements it represents.
    """
    acc = KVAccount(label=label)
    for item in items:
        if isinstance(item, (PackedKeys, PackedValues)):
            nb = item.nbytes()
            acc.codes += nb["codes"]
            acc.scales += nb["scales"]
            acc.indices += nb["indices"]
            acc.unquantized += nb["unquantized"]
            acc.elements += item.numel()
        elif isinstance(item, torch.Tensor):
            acc.unquantized += _tensor_bytes(item)
            acc.elements += item.numel()
        else:
            raise TypeError(f"account() takes PackedKeys, PackedValues or tensors, got {type(item).__name__}")
    for t in full_precision:
        acc.full_precision += _tensor_bytes(t)
        acc.elements += t.numel()
    for t in unquantized:
        acc.unquantized += _tensor_bytes(t)
        acc.elements += t.numel()
    return acc


def _stored_bytes(obj) -> int:
    """Bytes of the plain tensors inside ``obj``: tensor subclasses (e.g. optimum-quanto's packed tensors) are
    unpacked through ``__tensor_flatten__`` down to the tensors that hold memory; lists and tuples are walked."""
    if isinstance(obj, (list, tuple)):
        return sum(_stored_bytes(x) for x in obj)
    if not isinstance(obj, torch.Tensor):
        return 0
    if type(obj) in (torch.Tensor, torch.nn.Parameter) or not hasattr(obj, "__tensor_flatten__"):
        return obj.numel() * obj.element_size()
    names, _ = obj.__tensor_flatten__()
    return sum(_stored_bytes(getattr(obj, n)) for n in names)


def cache_stored_bytes(cache) -> int:
    """Stored bytes of any transformers ``Cache``: ``cache.account()`` for vopt's caches, else the bytes of every
    tensor its layers hold (``DynamicCache`` K/V, ``QuantizedCache``'s codes, scales and residual tensors)."""
    account_fn = getattr(cache, "account", None)
    if callable(account_fn):
        return int(account_fn().total_bytes)
    return sum(_stored_bytes(list(vars(layer).values())) for layer in getattr(cache, "layers", []))
