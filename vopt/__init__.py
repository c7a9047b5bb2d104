"""vopt: a compiler-style optimization toolkit for video large language models.

    import vopt
    opt = vopt.optimize(model, example_inputs=inputs)   # a new module; `model` is untouched
    print(opt.report)                                   # what was captured and rewritten

See README.md for the passes, the CLI (``vopt-compile``) and the layout.
"""
from .config import VoptConfig, config_from_dict
from .capture import CaptureConfig
from .dispatch import Backend, BackendPreference
from .errors import (
    BackendUnavailableError,
    CaptureError,
    ConfigError,
    CudaLibraryError,
    EngineError,
    EngineInputError,
    ManifestError,
    PassOrderError,
    StrictModeError,
    UnknownNameError,
    VoptError,
)
from .optimize import OptimizeConfig, OptimizedModel, optimize
from .pass_manager import PassManager
from .pass_protocol import Match, Pass, PassContext, PassKind, PassResult, register_pass, registered_passes
from .report import Report

__version__ = "0.1.0"


def load_engine(path, device=None):
    """Load an engine directory written by ``vopt-compile build --format pt2|aoti|onnx`` (see :mod:`vopt.engine.load`).

    Returns a callable ``engine(**inputs) -> {output name: tensor}`` that runs the whole model, stage glue
    included, without the model's Python code. Imported lazily: ``import vopt`` stays light.
    """
    from .engine.load import load_engine as _load_engine

    return _load_engine(path, device)


__all__ = [
    "Backend", "BackendPreference", "BackendUnavailableError", "CaptureConfig", "CaptureError", "ConfigError",
    "CudaLibraryError", "EngineError", "EngineInputError", "ManifestError", "Match", "OptimizeConfig", "OptimizedModel", "Pass", "PassContext", "PassKind",
    "PassManager", "PassOrderError", "PassResult", "Report", "StrictModeError", "UnknownNameError", "VoptConfig",
    "VoptError", "config_from_dict", "load_engine", "optimize", "register_pass", "registered_passes",
]
