"""Small helpers shared by graph passes."""
from __future__ import annotations

import torch


def module_path(node: torch.fx.Node) -> str:
    """The dotted path of the module that emitted ``node`` (``""`` at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _cls = list(stack.values())[-1]
    return str(path)


def shape_of(node) -> str:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if isinstance(val, torch.Tensor):
        return f"{str(val.dtype).removeprefix('torch.')}{list(val.shape)}"
    return "?"


def where(stage: str, node: torch.fx.Node) -> str:
    path = module_path(node)
    return f"{stage}:{path}/{node.name}" if path else f"{stage}:{node.name}"
