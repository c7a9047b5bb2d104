"""vopt.eval: fidelity harness (synthetic video tasks, real activations, stress inputs, model scoring).

Submodules are imported on first use (``vopt.eval.stress``, ``vopt.eval.minilm``,
``vopt.eval.video_task``, ``vopt.eval.scoring``, ``vopt.eval.agreement``), so importing
``vopt.eval`` loads nothing heavy. So are its three entry points:

* ``video_qa(model, split="test", n=200, ...)``: accuracy on the synthetic video-QA task, with bootstrap CIs,
  overall and per question type (:mod:`vopt.eval.scoring`);
* ``grounding(model, split="test", n=100, ...)``: temporal grounding R@1 at IoU 0.3/0.5/0.7 and mIoU
  (:mod:`vopt.eval.scoring`);
* ``compare(baseline, optimized, ...)``: answer agreement, accuracy delta, logit cos / KL, and per-stage /
  per-layer drift of an optimized model against its baseline (:mod:`vopt.eval.agreement`).

Usage::

    import vopt, vopt.eval, vopt.zoo
    base = vopt.zoo.build("llava-onevision").model
    opt = vopt.optimize(base, passes=["sdpa"])
    print(vopt.eval.video_qa(base).table())
    print(vopt.eval.compare(base, opt).table())
"""
import importlib

_SUBMODULES = ("agreement", "minilm", "scoring", "stress", "video_task")
#: Public function -> the submodule defining it.
_FUNCTIONS = {"video_qa": "scoring", "grounding": "scoring", "compare": "agreement"}


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _FUNCTIONS:
        return getattr(importlib.import_module(f"{__name__}.{_FUNCTIONS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES) | set(_FUNCTIONS))
