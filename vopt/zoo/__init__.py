"""The model zoo: every model of the papers vopt serves, tiny (tests) or full-size (meta device).

    zm = vopt.zoo.build("llava-onevision")           # tiny, CPU, float32, random weights
    inputs = zm.example_inputs(batch=1, frames=4)     # valid inputs (dict of keyword inputs)
    zm.model(**inputs)
    vopt.zoo.cost("llava-onevision")                  # full size on the meta device: params, FLOPs, KV bytes

``vopt.zoo.list()`` describes each entry. This module holds the registry and
the API; one module per model builds it (see ``_ENTRY_MODULES``).

Adding an entry: write ``vopt/zoo/<name>.py`` with a ``build(size, device,
dtype) -> ZooModel`` function and a ``register(ZooEntry(...))`` call; every
public module of this package is an entry module (``_``-prefixed ones are
helpers). Our own model classes declare their stages with a ``vopt_adapter``
class attribute (:mod:`vopt.adapters`).
"""
from __future__ import annotations

import builtins
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..errors import ConfigError, UnknownNameError

SIZES = ("tiny", "full")
DEFAULT_MODEL = "llava-onevision"



@dataclass(frozen=True)
class LLMDims:
    """Decoder dimensions for KV-cache bytes and the analytic ("paper") FLOP count."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_hf(cls, cfg: Any) -> "LLMDims":
        """From an HF decoder config (Llama/Qwen2/Phi-3/...; OPT/T5 names handled too)."""
        g = lambda *names, default=None: next((getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None), default)
        hidden = g("hidden_size", "d_model")
        heads = g("num_attention_heads", "num_heads")
        head_dim = g("head_dim", "d_kv", default=hidden // heads)
        return cls(
            layers=g("num_hidden_layers", "num_decoder_layers", "num_layers"),
            hidden=hidden,
            heads=heads,
            kv_heads=g("num_key_value_heads", default=heads),
            head_dim=head_dim,
            intermediate=g("intermediate_size", "ffn_dim", "d_ff"),
            vocab=g("vocab_size"),
        )


@dataclass
class StageCall:
    """One stage invocation for FLOP counting: ``module(*args, **kwargs)`` (meta tensors)."""

    stage: str
    module: torch.nn.Module
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


@dataclass
class ZooModel:
    """A built zoo model and what vopt needs to drive and measure it."""

    name: str
    size: str
    model: torch.nn.Module
    example_inputs: Callable
    """``example_inputs(batch=1, frames=<default>, seed=0)``: a dict of keyword inputs (or a tuple of positional ones)."""
    default_frames: int
    generates: bool = False
    """Whether ``model.generate`` applies (decoder LLMs)."""
    llm: Optional[LLMDims] = None
    visual_tokens: Optional[Callable] = None
    """``visual_tokens(frames) -> int``: visual tokens per video entering the LLM (or fusion/decoder)."""
    stage_calls: Optional[Callable] = None
    """``stage_calls(batch, frames) -> [StageCall]`` on the model's device: the prefill, stage by stage."""


@dataclass(frozen=True)
class ZooEntry:
    name: str
    paper: str
    backbone: str
    stages: tuple
    passes: tuple
    """Passes that apply to this model (whether or not they exist yet)."""
    build: Callable = field(repr=False, compare=False)
    """``build(size, device, dtype) -> ZooModel``."""
    notes: str = ""
    weights: Optional[str] = None
    """Trained tiny weights shipped in ``vopt/zoo/weights/`` (a safetensors file name), or None."""
    variants: dict = field(default_factory=dict, compare=False)
    """Extra CPU sizes beyond :data:`SIZES` (e.g. ``"tiny64"``): size name -> its shipped weights file, or None.
    ``build`` passes the size name on to the entry's ``build``; they build like ``"tiny"`` (CPU, float32)."""

    @property
    def sizes(self) -> tuple:
        """Every size ``build`` accepts for this entry: ``"tiny"``, the variants, ``"full"``."""
        return SIZES[:1] + tuple(self.variants) + SIZES[1:]

    def weights_for(self, size: str) -> Optional[str]:
        """The shipped weights file of ``size`` (``weights`` for ``"tiny"``, a variant's own), or None."""
        return self.weights if size == "tiny" else self.variants.get(size)


_ENTRIES: dict = {}


def register(entry: ZooEntry) -> ZooEntry:
    _ENTRIES[entry.name] = entry
    return entry


def _load_entries() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def list() -> builtins.list:  # noqa: A001  (the documented name: vopt.zoo.list())
    """Every entry, in registration order."""
    _load_entries()
    return builtins.list(_ENTRIES.values())


def names() -> builtins.list:
    return [e.name for e in list()]


def get(name: str) -> ZooEntry:
    _load_entries()
    if name not in _ENTRIES:
        raise UnknownNameError("zoo model", name, _ENTRIES)
    return _ENTRIES[name]


def build(name: str, size: str = "tiny", *, device: "str | torch.device | None" = None,
          dtype: Optional[torch.dtype] = None, pretrained: Optional[bool] = None) -> ZooModel:
    """Build zoo model ``name``: ``size="tiny"`` (CPU) or ``"full"`` (published dims, meta device), or one of the
    entry's extra CPU sizes (``ZooEntry.variants``, e.g. ``"tiny64"`` of ``"llava-onevision"``: 64x64 frames).

    Tiny models whose entry ships trained weights (``ZooEntry.weights``; today the default model, trained on
    :mod:`vopt.eval.video_task` by ``tools/train_video_qa.py``) load them unless ``pretrained=False``; the others
    get seeded random weights (the same on every build). ``pretrained=True`` on an entry without weights, or with
    ``size="full"``, is an error.
    """
    entry = get(name)
    if size not in entry.sizes:
        raise ConfigError(f"size={size!r} is invalid; accepted: {builtins.list(entry.sizes)}")
    weights = None if size == "full" else entry.weights_for(size)
    if pretrained and weights is None:
        shipped = [e.name for e in list() if e.weights]
        raise ConfigError(f"pretrained=True: zoo model {name!r} (size={size!r}) has no trained weights; "
                          f"trained tiny weights ship for {shipped}")
    if pretrained is None:
        pretrained = weights is not None
    if device is None:
        device = "meta" if size == "full" else "cpu"
    dtype = dtype or (torch.bfloat16 if size == "full" else torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random tiny weights are reproducible across builds; the caller's RNG is untouched
        zm = entry.build(size, torch.device(device), dtype)
    if pretrained:
        load_weights(zm.model, weights_path(entry, size))
    zm.model.eval()
    return zm


def weights_path(entry: ZooEntry, size: str = "tiny") -> str:
    """The file of ``entry``'s shipped weights of ``size`` (default: the tiny ones)."""
    import os

    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", entry.weights_for(size))


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Load a safetensors state dict into ``model`` (strict: every key must match), keeping the model's dtype."""
    from safetensors.torch import load_file

    state = load_file(path)
    first = next(model.parameters())
    state = {k: v.to(dtype=first.dtype, device=first.device) for k, v in state.items()}
    model.load_state_dict(state, strict=True)


from ._cost import Cost, cost  # noqa: E402  (cost uses the API above)

__all__ = ["Cost", "LLMDims", "SIZES", "StageCall", "ZooEntry", "ZooModel", "build", "cost", "load_weights", "get", "list", "names", "register"]
