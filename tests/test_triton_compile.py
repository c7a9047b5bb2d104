"""Triton kernels compile for the GPU targets we ship (sm_80, sm_89, sm_90) without a GPU.

The interpreter runs kernels on CPU but never compiles them; this catches kernels
that only fail in the real compiler. Runs in a subprocess because compilation
needs ``TRITON_INTERPRET`` unset before the kernel module is imported (conftest
sets it for the other tests). Each case names the PTX instructions it must contain.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

# (module, kernel attribute, signature, constexprs, PTX substrings that must appear)
CASES = [
    ("vopt.kernels.axpy", "_axpy_kernel",
     {"x_ptr": "*fp16", "y_ptr": "*fp16", "out_ptr": "*fp16", "alpha": "fp32", "n": "i32", "BLOCK": "constexpr"},
     {"BLOCK": 1024}, ["ld.global", "st.global", "cvt.rn.f16.f32"]),
]

SCRIPT = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
mod, attr, sig, consts, arch = json.loads(sys.argv[1])
kernel = getattr(importlib.import_module(mod), attr)
src = ASTSource(fn=kernel, signature=sig, constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()})
out = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 2})
print(json.dumps({"ptx": out.asm["ptx"]}))
"""


@pytest.mark.parametrize("arch", [80, 89, 90])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}.{c[1]}")
def test_compiles_for_gpu_targets(case, arch):
    mod, attr, sig, consts, must = case
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps([mod, attr, sig, consts, arch])],
                         capture_output=True, text=True, env=env, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    ptx = json.loads(res.stdout.strip().splitlines()[-1])["ptx"]
    assert f".target sm_{arch}" in ptx
    for needle in must:
        assert needle in ptx, f"{needle!r} missing from the sm_{arch} PTX"
