"""How the ``holitom`` pass (:mod:`vopt.passes.holitom`) rewrites each model family's call, one module per family.

Each module's docstring is the reference for its family (what is merged, positions, padding, ``generate``, what is
not supported); the pass file dispatches to them.

* :mod:`.common`: running statistics, the per-call info (``out.holitom``), instance-only method shadowing, padding
  tests, the logits scatter back to the caller's layout, row compaction, the attention a vision patch receives.
* :mod:`.llava_onevision`: LLaVA-OneVision (outer stage; the inner stage through :mod:`.inner_llm`).
* :mod:`.qwen2vl`: Qwen2-VL / GPT4Scene (3-D M-RoPE positions gathered, ``rope_deltas`` fixed).
* :mod:`.idefics3`: Idefics3 fed video frames as images (T2Vid).
* :mod:`.stream`: VideoLLM-online's stream (per-frame merging in ``prefill_frame``).
* :mod:`.inner_llm`: the inner-LLM stage (decoder layers ``K..N-1`` wrapped).
"""
