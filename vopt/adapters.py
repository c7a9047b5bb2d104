"""Model adapters: which submodules of a model family are its stages.

An adapter is declarative: the family's model classes and, per stage, a name,
a role and the attribute paths where the stage lives (the HF
``...ForConditionalGeneration`` classes keep them under ``.model``). The model's
own forward is the glue between stages (feature selection, pooling, placeholder
scatter), so it keeps running eagerly while each stage runs a captured graph.

The generic adapter captures the whole module as one stage: any module whose
forward exports whole (a plain HF causal LM, a custom ``nn.Module``).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import UnknownNameError


class StageRole(str, enum.Enum):
    VISION = "vision"
    PROJECTOR = "projector"
    LANGUAGE = "language"
    WHOLE = "whole"


@dataclass(frozen=True)
class StageSpec:
    name: str
    role: StageRole
    paths: tuple
    """Candidate dotted attribute paths, first found wins; ``""`` is the model itself."""


@dataclass(frozen=True)
class ModelAdapter:
    family: str
    model_classes: tuple
    stages: tuple
    description: str = ""

    def matches(self, model: torch.nn.Module) -> bool:
        return type(model).__name__ in self.model_classes

    def resolve(self, model: torch.nn.Module) -> list:
        """``[(StageSpec, path)]`` for the stages present in ``model``."""
        found = []
        for spec in self.stages:
            for path in spec.paths:
                if path == "" or _get_path(model, path) is not None:
                    found.append((spec, path))
                    break
        return found


def _get_path(model: torch.nn.Module, path: str) -> Optional[torch.nn.Module]:
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if not isinstance(obj, torch.nn.Module):
            return None
    return obj


def set_path(model: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = _get_path(model, parent_path) if parent_path else model
    setattr(parent, attr, module)


def get_path(model: torch.nn.Module, path: str) -> torch.nn.Module:
    mod = _get_path(model, path) if path else model
    if mod is None:
        raise AttributeError(f"{type(model).__name__} has no submodule {path!r}")
    return mod


def _stages(*triples) -> tuple:
    return tuple(StageSpec(name, role, (f"model.{attr}", attr)) for name, role, attr in triples)


_LLAVA_STAGES = _stages(
    ("vision_tower", StageRole.VISION, "vision_tower"),
    ("projector", StageRole.PROJECTOR, "multi_modal_projector"),
    ("language_model", StageRole.LANGUAGE, "language_model"),
)

ADAPTERS: tuple = (
    ModelAdapter(
        "llava_onevision",
        ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel"),
        _LLAVA_STAGES,
        "SigLIP vision tower -> MLP projector -> (2x2 pooling, newline: glue) -> Qwen2 LM",
    ),
    ModelAdapter(
        "llava_next_video",
        ("LlavaNextVideoForConditionalGeneration", "LlavaNextVideoModel"),
        _LLAVA_STAGES,
        "CLIP vision tower -> MLP projector -> Llama LM",
    ),
    ModelAdapter(
        "llava",
        ("LlavaForConditionalGeneration", "LlavaModel"),
        _LLAVA_STAGES,
        "vision tower -> MLP projector -> LM",
    ),
    ModelAdapter(
        "video_llava",
        ("VideoLlavaForConditionalGeneration", "VideoLlavaModel"),
        _stages(
            ("video_tower", StageRole.VISION, "video_tower"),
            ("image_tower", StageRole.VISION, "image_tower"),
            ("projector", StageRole.PROJECTOR, "multi_modal_projector"),
            ("language_model", StageRole.LANGUAGE, "language_model"),
        ),
        "CLIP video/image towers -> MLP projector -> Llama LM",
    ),
    ModelAdapter(
        "idefics3",
        ("Idefics3ForConditionalGeneration", "Idefics3Model"),
        _stages(
            ("vision_model", StageRole.VISION, "vision_model"),
            ("connector", StageRole.PROJECTOR, "connector"),
            ("text_model", StageRole.LANGUAGE, "text_model"),
        ),
        "SigLIP (NaViT buckets) -> pixel-shuffle connector -> Llama; padding-image filter and placeholder merge are glue",
    ),
    ModelAdapter(
        "qwen2_vl",
        ("Qwen2VLForConditionalGeneration", "Qwen2VLModel", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel"),
        _stages(
            ("visual", StageRole.VISION, "visual"),
            ("language_model", StageRole.LANGUAGE, "language_model"),
        ),
        "varlen ViT + patch merger (does not export: runs eagerly) -> Qwen2 LM with M-RoPE",
    ),
)

GENERIC = ModelAdapter("generic", (), (StageSpec("model", StageRole.WHOLE, ("",)),), "the whole module as one stage")


def adapter_names() -> list:
    return [a.family for a in ADAPTERS] + [GENERIC.family]


def find_adapter(model: torch.nn.Module, family: Optional[str] = None) -> ModelAdapter:
    """The adapter named ``family``, the one ``model`` declares, or the first whose classes match (else generic).

    vopt's own model classes (the zoo's) declare their stages with a class
    attribute ``vopt_adapter = ModelAdapter(...)``.
    """
    declared = getattr(type(model), "vopt_adapter", None)
    if family is not None:
        if isinstance(declared, ModelAdapter) and declared.family == family:
            return declared
        for a in (*ADAPTERS, GENERIC):
            if a.family == family:
                return a
        raise UnknownNameError("adapter", family, adapter_names())
    if isinstance(declared, ModelAdapter):
        return declared
    for a in ADAPTERS:
        if a.matches(model):
            return a
    return GENERIC


def disable_kv_cache(model: torch.nn.Module) -> list:
    """Set ``use_cache=False`` on every HF config of ``model``; return notes for the report.

    A ``DynamicCache`` cannot cross a ``torch.export`` boundary, so without this
    every default HF forward would fall back to eager. Calls that pass
    ``use_cache=True`` or a cache explicitly (``generate``) still work: their
    stage runs eagerly, with the reason in the report.
    """
    notes = []
    seen = set()
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        for c in (cfg, *(getattr(cfg, k, None) for k in ("text_config", "vision_config"))):
            if c is not None and id(c) not in seen and getattr(c, "use_cache", None) is True:
                seen.add(id(c))
                c.use_cache = False
                notes.append(f"use_cache disabled on the optimized copy's {type(c).__name__}")
    return notes
