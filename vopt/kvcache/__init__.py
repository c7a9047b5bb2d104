"""KV-cache quantization: VidKV and KIVI quantizers, bit packing, honest stored-bits accounting.

Spec: ``shared/specs/kvcache.md``. Importing it loads torch and nothing heavier.

* :mod:`.packing`: b-bit codes into int32 words, ternary codes five per byte.
* :mod:`.quantizers`: :class:`VidKVConfig`, :func:`kivi_config`, :func:`quantize_keys` / :func:`dequantize_keys`,
  :func:`quantize_values` / :func:`dequantize_values` and the packed containers.
* :mod:`.accounting`: :func:`account` -> :class:`KVAccount` (bytes and bits per element by category).
* :mod:`.decode_attention`: :func:`packed_decode_attention`, exact attention of decode queries over packed blocks +
  a full-precision window, computed on the codes (2-bit channels on integer codes, FFT-sign keys in the frequency
  domain); the oracle of the fused kernels (Triton ``vopt.kernels.vidkv_decode``, CUDA :mod:`.decode_cuda`, both
  fed by :mod:`.fused_decode_args`).
* :mod:`.salience`: :func:`salient_visual_tokens` and its scores :func:`by_text_similarity` (the reference STP score,
  §1.4), :func:`by_last_token_attention`, :func:`by_random` (control), :func:`top_fraction`: which visual tokens to
  keep in full precision (``VidKVCache(protected=...)``; the ``vidkv`` pass's ``protect_salient``).
* :mod:`.cache`: :class:`VidKVCache` / :class:`VidKVLayer`, the transformers cache (imports transformers; loaded lazily
  on first access of those names).
"""
from .accounting import CATEGORIES, KVAccount, account, cache_stored_bytes
from .decode_attention import packed_decode_attention
from .packing import pack_bits, pack_trits, unpack_bits, unpack_trits
from .quantizers import (
    ChannelSplit,
    KVQuantMode,
    MetadataDtype,
    PackedCodes,
    PackedKeys,
    PackedValues,
    TritPacking,
    ValueAxis,
    ValueCodec,
    VidKVConfig,
    dequantize_keys,
    dequantize_values,
    kivi_config,
    quantize_keys,
    quantize_values,
)
from .salience import (
    SALIENCE_METHODS,
    by_last_token_attention,
    by_random,
    by_text_similarity,
    salient_visual_tokens,
    top_fraction,
)

__all__ = [
    "CATEGORIES", "ChannelSplit", "KVAccount", "KVQuantMode", "MetadataDtype", "PackedCodes", "PackedKeys",
    "PackedValues", "TritPacking", "ValueAxis", "ValueCodec", "VidKVConfig", "account", "cache_stored_bytes", "dequantize_keys",
    "dequantize_values", "kivi_config", "pack_bits", "packed_decode_attention", "pack_trits", "quantize_keys", "quantize_values", "unpack_bits",
    "unpack_trits", "VidKVCache", "VidKVLayer", "SALIENCE_METHODS", "by_last_token_attention", "by_random",
    "by_text_similarity", "salient_visual_tokens", "top_fraction",
]

_LAZY = ("VidKVCache", "VidKVLayer")


def __getattr__(name):  # the cache imports transformers: load it only when asked for
    if name in _LAZY:
        from . import cache

        return getattr(cache, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
