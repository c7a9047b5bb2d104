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

__all__ = [
    "Backend", "BackendPreference", "BackendUnavailableError", "CaptureConfig", "CaptureError", "ConfigError",
    "CudaLibraryError", "Match", "OptimizeConfig", "OptimizedModel", "Pass", "PassContext", "PassKind",
    "PassManager", "PassOrderError", "PassResult", "Report", "StrictModeError", "UnknownNameError", "VoptConfig",
    "VoptError", "config_from_dict", "optimize", "register_pass", "registered_passes",
]
