"""vopt's passes (installed as ``vopt.passes``). Importing registers them.

One pattern family per module, each readable top to bottom:

* :mod:`.attention_canonicalize`: eager ``bmm -> softmax -> bmm`` attention -> SDPA.
* :mod:`.sdpa`: SDPA -> ``vopt::attention``.
* :mod:`.ccam`: projector cross-attention with a causal cross-attention (CCAM) mask -> ``vopt::block_sparse_attention`` (opt-in).
* :mod:`.sageattention2`: SDPA / ``vopt::attention`` -> ``vopt::sage_attention`` (quantized; opt-in).
* :mod:`.sageattention2_hf`: HF ``AttentionInterface`` -> ``vopt::sage_attention`` (runtime pass; quantized; opt-in).
* :mod:`.vidkv`: ``generate()`` with a packed VidKV / KIVI KV cache (runtime pass; quantized; opt-in).
* :mod:`.holitom`: HoliTom outer- and inner-LLM video-token merging for LLaVA-OneVision, Qwen2-VL, Idefics3 and VideoLLM-online's stream (per-family code in :mod:`vopt.merging.families`), peers (VisionZip, pooling, FastV) as configs (runtime pass; drops tokens; opt-in).
* :mod:`.moe_dispatch`: mixture-of-experts blocks -> sorted-by-expert dispatch with ``vopt::grouped_gemm`` (runtime pass; opt-in), and ``moe_detect`` reporting dense MoE dispatch left in graphs.
* :mod:`.vq_lookup`: nearest-code search (codebook distances + argmin) -> ``vopt::vq_argmin`` (exact codes; opt-in).
"""
from . import (  # noqa: F401
    attention_canonicalize, ccam, holitom, moe_dispatch, sageattention2, sageattention2_hf, sdpa, vidkv, vq_lookup)
