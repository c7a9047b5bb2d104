"""A plain Llama causal LM: the language model of VideoLLM-online (Llama-3-8B), and the simplest capture test.

Tiny: 64 wide, 2 layers, 4 heads / 2 KV heads, vocab 512. Full: Llama-3-8B
(32 layers, 4096 wide, 32 heads / 8 KV, MLP 14336, vocab 128256).
"""
from __future__ import annotations

import torch

from . import LLMDims, StageCall, ZooEntry, ZooModel, register
from ._inputs import check_positive

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024)
FULL = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, max_position_embeddings=8192, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
SEQ_LEN = {"tiny": 12, "full": 2048}


def build(size: str, device: torch.device, dtype: torch.dtype) -> ZooModel:
    import transformers as T

    cfg = T.LlamaConfig(**(TINY if size == "tiny" else FULL))
    with torch.device(device):
        model = T.LlamaForCausalLM(cfg).to(dtype)
    seq_len = SEQ_LEN[size]

    def example_inputs(batch: int = 1, seq_len: int = seq_len, seed: int = 0) -> dict:
        check_positive(batch=batch, seq_len=seq_len)
        gen = torch.Generator().manual_seed(seed)
        return {"input_ids": torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=gen).to(device)}

    def stage_calls(batch: int, frames: int) -> list:
        # Text only: `frames` does not apply; the prefill is SEQ_LEN[size] tokens.
        embeds = torch.empty(batch, seq_len, cfg.hidden_size, device=device, dtype=dtype)
        last = torch.empty(batch, 1, cfg.hidden_size, device=device, dtype=dtype)
        return [StageCall("model", model.model, kwargs={"inputs_embeds": embeds, "use_cache": False}),
                StageCall("lm_head", model.lm_head, (last,))]

    return ZooModel("llama", size, model, example_inputs, default_frames=0, generates=True,
                    llm=LLMDims.from_hf(cfg), stage_calls=stage_calls)


register(ZooEntry(
    name="llama",
    paper="(language model of VideoLLM-online; capture baseline)",
    backbone="Llama-3-8B",
    stages=("model",),
    passes=("canonicalize_attention", "sdpa", "sageattention2", "vidkv"),
    build=build,
))
