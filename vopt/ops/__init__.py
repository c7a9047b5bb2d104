"""vopt's custom ops (``torch.ops.vopt.*``).

Each module defines one op: its exact torch reference, its backend registry
(:mod:`vopt.dispatch`) and the opaque ``torch.library`` custom op with a fake
implementation, so ``torch.export`` and ``torch.compile`` see through it.
Importing this package registers the ops (needed before loading an exported
program that uses them).
"""
from . import attention, axpy, block_sparse_attention, grouped_gemm, sage_attention, vq_lookup  # noqa: F401  (registers torch.ops.vopt.*)
