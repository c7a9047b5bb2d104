"""Format ``pt2``: the ``torch.export`` program itself, vopt's custom ops as opaque calls.

Saved with ``torch.export.save``; loaded with ``torch.export.load`` after
``import vopt.ops`` registers the ops (the program references them by name;
their kernels dispatch as usual, so ``VOPT_BACKEND`` applies at run time).

Weights-only: a ``.pt2`` archive may hold pickled payloads (``use_pickle``
weights, custom/opaque objects, non-tensor sample inputs), and torch's
loader unpickles them. :func:`check_no_pickle` reads the archive's JSON payload
configs first and refuses any such entry, and checks that the sample inputs
load with ``torch.load(weights_only=True)``, so loading never runs pickled code.
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import torch

from ..errors import EngineError


def save(ep: torch.export.ExportedProgram, path: Path) -> None:
    torch.export.save(ep, str(path))


def check_no_pickle(path: Path) -> None:
    """Raise :class:`EngineError` if loading ``path`` would unpickle anything but plain tensors."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise EngineError(f"{path} is not a readable .pt2 archive ({exc}); rebuild the engine") from None
    with archive:
        for name in archive.namelist():
            if name.endswith("_weights_config.json") or name.endswith("_constants_config.json"):
                try:
                    config = json.loads(archive.read(name)).get("config", {})
                except (ValueError, AttributeError) as exc:
                    raise EngineError(f"{path}: {name} is not valid JSON ({exc}); rebuild the engine") from None
                for fqn, meta in config.items():
                    if meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(("weight_", "tensor_")):
                        raise EngineError(f"{path}: payload {fqn!r} ({meta.get('path_name')}) is pickled; vopt loads "
                                          "weights-only engines and refuses it")
            elif "/sample_inputs/" in name:
                data = archive.read(name)
                if data:
                    try:
                        torch.load(io.BytesIO(data), weights_only=True)
                    except Exception as exc:  # any unpickling refusal means "not weights-only"
                        raise EngineError(f"{path}: {name} does not load weights-only ({type(exc).__name__}); "
                                          "vopt refuses pickled engine payloads") from None


def load(path: Path):
    """The program's module (a callable taking the flat input tensors)."""
    from .. import ops  # noqa: F401  (registers torch.ops.vopt.* before deserialization)

    check_no_pickle(path)
    return torch.export.load(str(path)).module()
