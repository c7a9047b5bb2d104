"""The model zoo: the models vopt serves, tiny (random weights, tests) or full-size (meta device).

    zm = vopt.zoo.build("llava-onevision")          # tiny, CPU, float32
    inputs = zm.example_inputs(batch=1, frames=4)    # valid inputs for it
    zm.model(**inputs)

``vopt.zoo.list()`` describes each entry. This module holds the registry and
the API; one module per model family builds the models.
"""
from __future__ import annotations

import builtins
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..errors import ConfigError, UnknownNameError

SIZES = ("tiny", "full")
DEFAULT_MODEL = "llava-onevision"


@dataclass(frozen=True)
class ZooEntry:
    name: str
    paper: str
    backbone: str
    stages: tuple
    passes: tuple
    """Passes that apply to this model (whether or not they exist yet)."""
    build: Callable = field(repr=False, compare=False)
    """``build(size, device, dtype) -> (model, example_inputs)``."""


@dataclass
class ZooModel:
    name: str
    size: str
    model: torch.nn.Module
    example_inputs: Callable
    """``example_inputs(batch=1, frames=..., seed=0) -> dict`` of keyword inputs."""


_ENTRIES: dict = {}


def register(entry: ZooEntry) -> ZooEntry:
    _ENTRIES[entry.name] = entry
    return entry


def _load_entries() -> None:
    from . import llama, llava_onevision  # noqa: F401  (each registers its entry)


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


def build(name: str, size: str = "tiny", *, device: "str | torch.device | None" = None, dtype: Optional[torch.dtype] = None) -> ZooModel:
    """Build zoo model ``name``: ``size="tiny"`` (random weights) or ``"full"`` (published dims; meta device by default)."""
    entry = get(name)
    if size not in SIZES:
        raise ConfigError(f"size={size!r} is invalid; accepted: {builtins.list(SIZES)}")
    if device is None:
        device = "meta" if size == "full" else "cpu"
    dtype = dtype or (torch.bfloat16 if size == "full" else torch.float32)
    model, example_inputs = entry.build(size, torch.device(device), dtype)
    return ZooModel(name, size, model.eval(), example_inputs)
