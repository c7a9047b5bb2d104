"""The engine manifest: ``manifest.json`` in every engine directory.

Keys: ``format`` (``"vopt-engine"``), ``manifest_version`` (:data:`MANIFEST_VERSION`;
a reader refuses any other with :class:`~vopt.errors.ManifestError`),
``engine_format`` (pt2 / aoti / onnx), ``model`` (the MODEL spec it was built
from), ``route`` (how the glue was shipped, see :mod:`vopt.engine.glue`),
``stages`` (captured stages with their signatures: what the program contains),
``programs`` (files, one per program, with the stages each holds), ``passes``
(names, uuids, configs), ``config`` (the OptimizeConfig), ``versions``,
``target`` (device, arch, dtype), ``inputs`` / ``outputs`` (tensor specs; the
``dynamic`` map of each is empty: shapes are static), ``constants``
(non-tensor inputs baked in), ``lowering`` (per-op notes, e.g. ONNX translations)
and ``validation`` (the build-time comparison with the eager optimized model).

Version history: 1 = the first engine manifest. (A ``vopt-report`` manifest,
written by ``build`` without ``--format``, has the same version key but
``format: "vopt-report"`` and holds no engine.)
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ManifestError

MANIFEST_VERSION = 1
MANIFEST_FILE = "manifest.json"
ENGINE_KIND = "vopt-engine"


def write_manifest(directory: Path, manifest: dict) -> dict:
    """Write ``directory/manifest.json`` (format and version keys added); return what was written."""
    data = {"format": ENGINE_KIND, "manifest_version": MANIFEST_VERSION, **manifest}
    (Path(directory) / MANIFEST_FILE).write_text(json.dumps(data, indent=2, default=str) + "\n")
    return data


def read_manifest(directory) -> dict:
    """Read and check ``directory/manifest.json``; :class:`ManifestError` says what is wrong and what is expected."""
    directory = Path(directory)
    if not directory.exists():
        raise ManifestError(f"engine directory {str(directory)!r} does not exist")
    if not directory.is_dir():
        raise ManifestError(f"engine path {str(directory)!r} is not a directory (give the directory `vopt-compile build --out` wrote)")
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{str(directory)!r} has no {MANIFEST_FILE}; it is not a vopt engine directory")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path} is not readable JSON ({exc}); rebuild the engine") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path} must hold a JSON object, got {type(data).__name__}; rebuild the engine")
    if data.get("format") != ENGINE_KIND:
        raise ManifestError(f"{path} describes {data.get('format')!r}, not a {ENGINE_KIND!r}; build one with "
                            "`vopt-compile build MODEL --format pt2|aoti|onnx --out DIR`")
    version = data.get("manifest_version")
    if version != MANIFEST_VERSION:
        raise ManifestError(f"{path} has manifest_version {version!r}; this vopt reads version {MANIFEST_VERSION} only. "
                            "Rebuild the engine with this vopt, or load it with the vopt that built it "
                            f"(vopt {data.get('versions', {}).get('vopt', '?')})")
    for key in ("engine_format", "programs", "inputs", "outputs"):
        if key not in data:
            raise ManifestError(f"{path} lacks the {key!r} key; rebuild the engine")
    return data
