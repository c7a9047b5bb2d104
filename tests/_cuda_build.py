"""Shared by the CUDA-library tests: building libvopt_cuda.so and finding the SASS tools (see conftest.py)."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = ROOT / "tools" / "build_cuda.sh"
INSTALLED = ROOT / "vopt" / "_lib" / "libvopt_cuda.so"
EXPECTED_ARCHS = ["80", "89", "90a"]
#: The build directory tools/_setup.sh uses (reused when it was configured for EXPECTED_ARCHS).
SETUP_BUILD = ROOT / "build" / "cuda"


def find_nvcc() -> Optional[str]:
    cudacxx = os.environ.get("CUDACXX")
    if cudacxx and os.access(cudacxx, os.X_OK):
        return cudacxx
    found = shutil.which("nvcc")
    if found:
        return found
    return "/usr/local/cuda/bin/nvcc" if os.access("/usr/local/cuda/bin/nvcc", os.X_OK) else None


def find_cuobjdump() -> Optional[str]:
    """cuobjdump from the triton wheel, else PATH."""
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.submodule_search_locations:
        cand = Path(list(spec.submodule_search_locations)[0]) / "backends" / "nvidia" / "bin" / "cuobjdump"
        if cand.is_file():
            return str(cand)
    return shutil.which("cuobjdump")


def digest(path: Path) -> Optional[str]:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def build_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VOPT_CUDA_ARCHS", "VOPT_SKIP_CUDA_BUILD")}
    env.update(VOPT_CUDA_NO_INSTALL="1", PYTHON=sys.executable)
    return env


def build_dir_for_tests(tmp_dir: Path) -> Path:
    """Where the tests build: the setup's build/cuda when it is configured for the default archs (then the
    build is incremental: CI's set-up already compiled everything once), else a fresh ``tmp_dir``."""
    cache = SETUP_BUILD / "CMakeCache.txt"
    if cache.is_file():
        for line in cache.read_text(errors="replace").splitlines():
            if line.startswith("CMAKE_CUDA_ARCHITECTURES:") and line.split("=", 1)[1] == ";".join(EXPECTED_ARCHS):
                return SETUP_BUILD
    return tmp_dir


def build(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(BUILD_SCRIPT), str(out)], cwd=ROOT, env=build_env(), capture_output=True,
                          text=True)


def c_struct_layout(struct: str, fields: list, tmp_dir: Path) -> Optional[dict]:
    """``{field: offset, "sizeof": size}`` of C struct ``struct`` in cuda/vopt_cuda.h, printed by a compiled C
    program; ``None`` without a C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src = tmp_dir / f"{struct}_layout.c"
    src.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include \"vopt_cuda.h\"\nint main(void) {\n"
        + "".join(f'  printf("{f} %zu\\n", offsetof({struct}, {f}));\n' for f in fields)
        + f'  printf("sizeof %zu\\n", sizeof({struct}));\n  return 0;\n}}\n'
    )
    exe = tmp_dir / f"{struct}_layout"
    subprocess.run([cc, "-I", str(ROOT / "cuda"), str(src), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return {name: int(value) for name, value in (line.split() for line in out.splitlines())}


def assert_ctypes_matches_c(struct: str, ctype, tmp_dir: Path) -> None:
    """The ctypes Structure ``ctype`` has the C struct's size and every field's offset."""
    import ctypes

    import pytest

    fields = [f for f, _ in ctype._fields_]
    layout = c_struct_layout(struct, fields, tmp_dir)
    if layout is None:
        pytest.skip("no C compiler to print the C layout")
    for f in fields:
        assert layout[f] == getattr(ctype, f).offset, f
    assert layout["sizeof"] == ctypes.sizeof(ctype)


def sass_functions(lib: Path, arch: str, word: str) -> dict:
    """{mangled function name: SASS text} of the kernels whose name contains ``word`` (any case), for ``arch``
    (e.g. "sm_89"), from ``cuobjdump -sass``; skips the test without cuobjdump."""
    import re

    import pytest

    tool = find_cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (neither in the triton wheel nor on PATH)")
    out = subprocess.run([tool, "-sass", "-arch", arch, str(lib)], capture_output=True, text=True, check=True).stdout
    funcs, name = {}, None
    for line in out.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
            funcs[name] = []
        elif name is not None:
            funcs[name].append(line)
    return {n: "\n".join(body) for n, body in funcs.items() if word.lower() in n.lower()}


def cuda_include_dir() -> Optional[Path]:
    """The CUDA toolkit's include directory (for the host-side fp16/bf16/fp8 types), or None."""
    cands = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    nvcc = find_nvcc()
    if nvcc:
        cands.append(str(Path(os.path.realpath(nvcc)).parents[1]))
    for c in cands:
        if c and (Path(c) / "include" / "cuda_fp8.h").is_file():
            return Path(c) / "include"
    return None


def build_emulated(source: Path, harness: Path, out: Path, start: str, replace: tuple = ()):
    """Compile ``source``'s device code (from ``start`` to "// ---- host side ----", verbatim, as kern.inc) into the
    host-C++ emulation ``harness`` (tests/cuda_emu/) and load it with ctypes; skips the test without a C++20
    compiler or the CUDA headers. ``replace``: (old, new) edits of the extracted source (each must apply)."""
    import ctypes

    import pytest

    cxx = shutil.which("g++") or shutil.which("c++")
    inc = cuda_include_dir()
    if cxx is None or inc is None:
        pytest.skip("needs a C++20 compiler and the CUDA headers (cuda_fp16.h, cuda_bf16.h, cuda_fp8.h)")
    text = source.read_text()
    kern = text[text.index(start):text.index("\n// ---- host side ----")]
    for old, new in replace:
        assert old in kern, f"{source.name}: {old!r} not found: update the emulation harness"
        kern = kern.replace(old, new)
    (out / "kern.inc").write_text(kern + "\n}  // namespace\n")
    lib = out / f"lib{harness.stem}.so"
    subprocess.run([cxx, "-std=c++20", "-O1", "-ffp-contract=off", "-fPIC", "-shared", f"-I{out}", f"-I{inc}",
                    f"-I{ROOT / 'cuda'}", str(harness), "-o", str(lib), "-lpthread"], check=True, capture_output=True)
    return ctypes.CDLL(str(lib))
