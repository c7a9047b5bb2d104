"""Two things every Triton launcher here needs: launch on the tensors' device, and know whether Triton interprets."""
from __future__ import annotations

import torch


def launch(kernel, grid, device: torch.device, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)`` with ``device`` made current (Triton launches on the current CUDA device)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def is_interpreted(kernel) -> bool:
    """Whether ``kernel`` was created under ``TRITON_INTERPRET=1`` (it then runs on CPU tensors)."""
    import triton

    return not isinstance(kernel, triton.runtime.JITFunction)
