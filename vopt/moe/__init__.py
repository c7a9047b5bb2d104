"""Sparse mixture-of-experts dispatch: routing, grouped expert bodies (installed as ``vopt.moe``).

* :mod:`.routing`: top-k choices -> assignments sorted by expert (offsets, inverse, capacity) -> gate-weighted combine.
* :mod:`.grouped_mlp`: the common block (linear gate + ``experts`` ModuleList of MLPs) as grouped GEMMs.
* :mod:`.vrd`: the zoo's MoE-VRD relation experts as grouped GEMMs.

The GEMMs are ``vopt::grouped_gemm`` (:mod:`vopt.ops.grouped_gemm`); the ``moe_dispatch`` pass applies the rewrite.
"""
from .routing import Routing, capacity_for, combine, route  # noqa: F401
