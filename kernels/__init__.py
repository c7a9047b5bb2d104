"""vopt's Triton kernels (installed as ``vopt.kernels``).

Each module holds one op's ``@triton.jit`` kernel and a thin Python launcher.
They are imported lazily, by the op modules in :mod:`vopt.ops` when a Triton
backend actually runs, so ``import vopt`` never imports Triton. To run them on
CPU under the Triton interpreter, ``TRITON_INTERPRET=1`` must be set before a
kernel module is first imported (``@triton.jit`` decides at decoration time).
"""
