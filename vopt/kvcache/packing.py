"""Bit packing of quantization codes into integer words (spec ``kvcache.md`` §3 "Storage").

Two layouts, both along the last axis and both exactly invertible:

* :func:`pack_bits` / :func:`unpack_bits`: ``b``-bit unsigned codes, ``b`` in {1, 2, 4, 8}, ``32 / b`` codes per
  ``int32`` word (or ``8 / b`` per ``uint8``). Code ``i`` of a word sits at bits ``[b·i, b·i + b)`` (little end
  first). The last word is zero-padded when the length is not a multiple of the codes per word.
* :func:`pack_trits` / :func:`unpack_trits`: ternary codes {-1, 0, 1}, five per byte in base 3
  (``sum((q_i + 1)·3^i)`` ≤ 242 < 256), i.e. 8/5 = **1.6 stored bits per trit** against the 1.58-bit entropy bound
  (spec §2, "1.6 (5 trits/byte)"). The alternative, 2-bit codes ``q + 1``, is what the reference stores.

Packing is pure integer arithmetic (``int64`` intermediates), so it is exact on every backend.
"""
from __future__ import annotations

import torch

__all__ = [
    "SUPPORTED_BITS", "TRITS_PER_BYTE", "codes_per_word", "pack_bits", "unpack_bits", "pack_trits", "unpack_trits",
    "packed_length", "packed_trit_length",
]

#: Code widths :func:`pack_bits` accepts.
SUPPORTED_BITS = (1, 2, 4, 8)
#: Trits per byte of :func:`pack_trits` (3**5 = 243 <= 256).
TRITS_PER_BYTE = 5

_WORD_BITS = {torch.int32: 32, torch.uint8: 8}


def _check_bits(bits: int, word_dtype: torch.dtype) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if word_dtype not in _WORD_BITS:
        raise ValueError(f"word_dtype must be torch.int32 or torch.uint8, got {word_dtype}")
    return _WORD_BITS[word_dtype]


def codes_per_word(bits: int, word_dtype: torch.dtype = torch.int32) -> int:
    """How many ``bits``-bit codes one word of ``word_dtype`` holds (16 two-bit codes per int32)."""
    return _check_bits(bits, word_dtype) // bits


def packed_length(length: int, bits: int, word_dtype: torch.dtype = torch.int32) -> int:
    """Words needed for ``length`` codes (the last one padded)."""
    per = codes_per_word(bits, word_dtype)
    return -(-length // per)


def packed_trit_length(length: int) -> int:
    """Bytes needed for ``length`` trits."""
    return -(-length // TRITS_PER_BYTE)


def pack_bits(codes: torch.Tensor, bits: int, *, word_dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """Pack unsigned ``bits``-bit integer ``codes`` along the last axis into ``word_dtype`` words.

    Returns a tensor of shape ``codes.shape[:-1] + (ceil(n / per_word),)``. ``codes`` is not modified.
    Raises ``ValueError`` if a code is outside ``[0, 2**bits)``.
    """
    word_bits = _check_bits(bits, word_dtype)
    if codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"codes must be an integer (or bool) tensor, got {codes.dtype}")
    per = word_bits // bits
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(f"{bits}-bit codes must lie in [0, {1 << bits}), got range [{int(c.min())}, {int(c.max())}]")
    n = c.shape[-1]
    n_words = -(-n // per)
    pad = n_words * per - n
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*c.shape[:-1], n_words, per)
    shifts = torch.arange(per, dtype=torch.int64, device=c.device) * bits
    words = (c << shifts).sum(-1)  # disjoint bit fields: the sum is a bitwise OR, < 2**word_bits
    if word_dtype == torch.int32:  # reinterpret the unsigned 32-bit value as two's complement
        words = torch.where(words >= (1 << 31), words - (1 << 32), words)
    return words.to(word_dtype)


def unpack_bits(words: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``length`` codes along the last axis, as ``uint8``."""
    word_bits = _check_bits(bits, words.dtype)
    per = word_bits // bits
    if length > words.shape[-1] * per:
        raise ValueError(f"{words.shape[-1]} words of {per} codes cannot hold {length} codes")
    w = words.to(torch.int64)
    if words.dtype == torch.int32:
        w = w & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64, device=w.device) * bits
    c = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    c = c.reshape(*words.shape[:-1], words.shape[-1] * per)[..., :length]
    return c.to(torch.uint8)


def pack_trits(trits: torch.Tensor) -> torch.Tensor:
    """Pack ternary codes {-1, 0, 1} along the last axis, five per ``uint8`` (base 3). ``trits`` is not modified."""
    t = trits.to(torch.int64)
    if t.numel() and (int(t.min()) < -1 or int(t.max()) > 1):
        raise ValueError(f"trits must lie in {{-1, 0, 1}}, got range [{int(t.min())}, {int(t.max())}]")
    n = t.shape[-1]
    n_bytes = -(-n // TRITS_PER_BYTE)
    pad = n_bytes * TRITS_PER_BYTE - n
    t = t + 1
    if pad:
        t = torch.nn.functional.pad(t, (0, pad))  # padding digit 0 (trit -1): never read back
    t = t.reshape(*t.shape[:-1], n_bytes, TRITS_PER_BYTE)
    powers = 3 ** torch.arange(TRITS_PER_BYTE, dtype=torch.int64, device=t.device)
    return (t * powers).sum(-1).to(torch.uint8)


def unpack_trits(packed: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_trits`: the first ``length`` trits along the last axis, as ``int8`` in {-1, 0, 1}."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed trits must be uint8, got {packed.dtype}")
    if length > packed.shape[-1] * TRITS_PER_BYTE:
        raise ValueError(f"{packed.shape[-1]} bytes cannot hold {length} trits")
    p = packed.to(torch.int64).unsqueeze(-1)
    powers = 3 ** torch.arange(TRITS_PER_BYTE, dtype=torch.int64, device=p.device)
    digits = (p // powers) % 3
    digits = digits.reshape(*packed.shape[:-1], packed.shape[-1] * TRITS_PER_BYTE)[..., :length]
    return (digits - 1).to(torch.int8)
