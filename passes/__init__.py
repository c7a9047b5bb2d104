"""vopt's passes (installed as ``vopt.passes``). Importing registers them.

One pattern family per module, each readable top to bottom:

* :mod:`.attention_canonicalize`: eager ``bmm -> softmax -> bmm`` attention -> SDPA.
* :mod:`.sdpa`: SDPA -> ``vopt::attention``.
"""
from . import attention_canonicalize, sdpa  # noqa: F401
