"""vopt.eval: fidelity harness (synthetic video tasks, real activations, stress inputs).

Submodules are imported on first use (``vopt.eval.stress``, ``vopt.eval.minilm``,
``vopt.eval.video_task``), so importing ``vopt.eval`` loads nothing heavy.
"""
import importlib

_SUBMODULES = ("minilm", "stress", "video_task")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
