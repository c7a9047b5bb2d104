"""Engines (``vopt.engine``): build -> reload in a fresh process -> same outputs as the eager optimized model.

Tolerances (stated once, used everywhere): an engine runs the same float32 math as
the eager optimized model through other kernels (Inductor's C++, onnxruntime's
Attention/MatMul), so only summation order differs: we require
``max|engine - eager| <= ENGINE_ATOL + ENGINE_RTOL * max|eager|`` with 1e-5 / 1e-4
(measured <= 3e-6 relative on the zoo; a wrong mask, scale or dropped row moves
outputs by > 1e-2 relative). ONNX lowerings of single ops are compared with the
ops' torch references at ``OP_ATOL = 2e-6`` absolute on O(1) values (fp32 rounding
of a length-<=64 softmax-weighted sum; a wrong mask costs > 1e-1).

The default suite builds pt2 (llama, lvtr), onnx (llava-onevision) and aoti (llama,
~25-40 s of AOTInductor compile on 2 cores). The full matrix (every tiny zoo model x
3 formats) is marked ``slow`` and runs only with ``VOPT_SLOW=1`` (tests/conftest.py
registers the marker but does not skip it).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import vopt
import vopt.ops  # noqa: F401  (registers torch.ops.vopt.* for the single-op tests)
from vopt import zoo
from vopt.engine import build_engine
from vopt.engine.build import compare_outputs
from vopt.errors import ConfigError, EngineError, EngineInputError, ManifestError

ENGINE_ATOL, ENGINE_RTOL = 1e-5, 1e-4
OP_ATOL = 2e-6
ROOT = Path(__file__).resolve().parents[1]
SLOW = pytest.mark.skipif(os.environ.get("VOPT_SLOW") != "1", reason="full engine matrix: set VOPT_SLOW=1")


@pytest.fixture(autouse=True, scope="module")
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _fresh_process_run(engine_dir: Path, inputs: dict, tmp_path: Path) -> dict:
    """Load and run the engine in a new Python that imports only vopt (never the zoo or transformers)."""
    from safetensors.torch import load_file, save_file

    inp, out = tmp_path / "in.safetensors", tmp_path / "out.safetensors"
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(inp))
    code = (
        "import sys, vopt\n"
        "from safetensors.torch import load_file, save_file\n"
        f"engine = vopt.load_engine({str(engine_dir)!r})\n"
        f"outs = engine(**load_file({str(inp)!r}))\n"
        f"save_file({{k: v.contiguous() for k, v in outs.items()}}, {str(out)!r})\n"
        "leaked = [m for m in sys.modules if m.startswith(('vopt.zoo', 'transformers'))]\n"
        "assert not leaked, leaked\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return load_file(str(out))


def _eager_outputs(opt, inputs: dict, names: list) -> list:
    from torch.utils import _pytree as pytree

    with torch.no_grad():
        out = opt(**inputs)
    leaves = [v for v in pytree.tree_leaves(out) if isinstance(v, torch.Tensor)]
    assert len(leaves) == len(names)
    return leaves


def _check_against_eager(opt, manifest: dict, outs: dict, inputs: dict) -> None:
    names = [s["name"] for s in manifest["outputs"]]
    ref = _eager_outputs(opt, inputs, names)
    result = compare_outputs([outs[n] for n in names], ref, names, ENGINE_ATOL, ENGINE_RTOL)
    assert result["passed"], json.dumps(result, indent=1)


def _build(name: str, fmt: str, tmp_path: Path, passes=None):
    zm = zoo.build(name)
    inputs = zm.example_inputs()
    opt = vopt.optimize(zm.model, passes=passes, example_inputs=inputs)
    manifest = build_engine(opt, inputs, fmt, tmp_path / f"{name}-{fmt}", model_name=name)
    return zm, inputs, opt, manifest


def _fresh_inputs(name: str, inputs: dict, seed: int) -> dict:
    """Same shapes and dtypes, new values the engine never saw (token ids drawn where the model allows)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in inputs.items():
        if v.is_floating_point():
            out[k] = torch.randn(v.shape, generator=g, dtype=v.dtype) * 2.0
        elif name == "llama" and k == "input_ids":
            out[k] = torch.randint(0, 512, v.shape, generator=g)
        else:
            out[k] = v.clone()  # placeholder layouts / masks must keep their structure
    return out


# ---- one build per format, reloaded in a fresh process ----------------------------------


def test_pt2_llama_fresh_process(tmp_path):
    zm, inputs, opt, manifest = _build("llama", "pt2", tmp_path)
    assert manifest["validation"]["passed"] and manifest["route"] == "whole"
    assert manifest["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": [1, 12], "dynamic": {}}]
    fresh = _fresh_inputs("llama", inputs, seed=1)
    assert not torch.equal(fresh["input_ids"], inputs["input_ids"])
    outs = _fresh_process_run(tmp_path / "llama-pt2", fresh, tmp_path)
    _check_against_eager(opt, manifest, outs, fresh)


def test_pt2_multi_output_dataclass_model(tmp_path):
    # LVTR returns a custom output dataclass (spans, class_logits): the engine returns them by name,
    # and the fresh process does not need the class.
    zm, inputs, opt, manifest = _build("lvtr", "pt2", tmp_path)
    assert [s["name"] for s in manifest["outputs"]] == ["spans", "class_logits"]
    fresh = _fresh_inputs("lvtr", inputs, seed=2)
    outs = _fresh_process_run(tmp_path / "lvtr-pt2", fresh, tmp_path)
    _check_against_eager(opt, manifest, outs, fresh)


def test_onnx_llava_onevision_fresh_process(tmp_path):
    zm, inputs, opt, manifest = _build("llava-onevision", "onnx", tmp_path)
    lowering = manifest["lowering"]
    assert "vopt::attention.default" in lowering["translated_ops"] and lowering["attention_nodes"] >= 6
    assert len(manifest["stages"]) >= 3  # vision tower, projector, language model: all inside one program
    fresh = _fresh_inputs("llava-onevision", inputs, seed=3)
    outs = _fresh_process_run(tmp_path / "llava-onevision-onnx", fresh, tmp_path)
    _check_against_eager(opt, manifest, outs, fresh)


def test_aoti_llama_fresh_process(tmp_path):
    zm, inputs, opt, manifest = _build("llama", "aoti", tmp_path)
    assert manifest["validation"]["passed"]
    fresh = _fresh_inputs("llama", inputs, seed=4)
    outs = _fresh_process_run(tmp_path / "llama-aoti", fresh, tmp_path)
    _check_against_eager(opt, manifest, outs, fresh)


def test_onnx_ccam_block_sparse_in_a_model(tmp_path):
    # The ccam pass turns Video-CCAM's projector cross-attention into vopt::block_sparse_attention;
    # the ONNX engine lowers it (element mask rebuilt from the block mask) and matches on fresh features.
    zm, inputs, opt, manifest = _build("video-ccam", "onnx", tmp_path, passes=["canonicalize_attention", "ccam", "sdpa"])
    assert "vopt::block_sparse_attention.default" in manifest["lowering"]["translated_ops"]
    fresh = _fresh_inputs("video-ccam", inputs, seed=5)
    outs = _fresh_process_run(tmp_path / "video-ccam-onnx", fresh, tmp_path)
    _check_against_eager(opt, manifest, outs, fresh)


def test_pt2_keeps_quantized_attention_exactly(tmp_path):
    # SageAttention2 cannot go to ONNX (refused, see below) but a pt2 engine calls the same op: bit-identical.
    zm, inputs, opt, manifest = _build("llama", "pt2", tmp_path, passes=["canonicalize_attention", "sageattention2"])
    names = [s["name"] for s in manifest["outputs"]]
    fresh = _fresh_inputs("llama", inputs, seed=6)
    outs = _fresh_process_run(tmp_path / "llama-pt2", fresh, tmp_path)
    assert torch.equal(outs["logits"], _eager_outputs(opt, fresh, names)[0])
    with pytest.raises(EngineError, match="vopt::sage_attention cannot be lowered to ONNX"):
        build_engine(opt, inputs, "onnx", tmp_path / "sage-onnx", model_name="llama")
    assert not (tmp_path / "sage-onnx").exists()


# ---- ONNX lowerings of single ops vs their torch references ------------------------------


class _Call(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def _onnx_run(fn, tensors, tmp_path, name="op"):
    from vopt.engine import onnx_export

    ep = torch.export.export(_Call(fn), tuple(tensors), strict=False)
    path = tmp_path / f"{name}.onnx"
    notes = onnx_export.export(ep, path, [f"x{i}" for i in range(len(tensors))], ["out"])
    return onnx_export.load(path, "cpu")(*tensors)[0], notes


def _qkv(b, hq, hk, lq, lk, d, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, lq, d, generator=g), torch.randn(b, hk, lk, d, generator=g) * 3.0,
            torch.randn(b, hk, lk, d, generator=g))


def test_onnx_attention_adversarial_masks(tmp_path):
    from vopt.ops.attention import reference_attention

    q, k, v = _qkv(2, 4, 4, 7, 11, 16, seed=0)
    bool_mask = torch.rand(2, 1, 7, 11, generator=torch.Generator().manual_seed(1)) > 0.5
    bool_mask[0, 0, 3] = False  # a fully masked row: the op returns zeros there
    bool_mask[1, 0, :, 0] = True
    float_mask = torch.where(bool_mask, torch.zeros(()), torch.tensor(float("-inf")))
    pad_mask = torch.ones(2, 1, 1, 11, dtype=torch.bool)  # BERT-style [B,1,1,S]: broadcast over queries
    pad_mask[1, ..., 8:] = False
    cases = {
        "bool": (lambda q, k, v, m: torch.ops.vopt.attention(q, k, v, m), (q, k, v, bool_mask)),
        "float": (lambda q, k, v, m: torch.ops.vopt.attention(q, k, v, m), (q, k, v, float_mask)),
        "pad": (lambda q, k, v, m: torch.ops.vopt.attention(q, k, v, m, scale=0.3), (q, k, v, pad_mask)),
        "causal+mask": (lambda q, k, v, m: torch.ops.vopt.attention(q, k, v, m, is_causal=True), (q, k, v, bool_mask)),
        "causal": (lambda q, k, v: torch.ops.vopt.attention(q, k, v, is_causal=True), (q, k, v)),
    }
    for name, (fn, xs) in cases.items():
        got, notes = _onnx_run(fn, xs, tmp_path, name)
        want = reference_attention(*xs[:3], xs[3] if len(xs) > 3 else None, 0.0, "causal" in name,
                                   0.3 if name == "pad" else None)
        assert notes["attention_nodes"] == 1, name
        assert torch.isfinite(got).all(), name
        assert (got - want).abs().max().item() <= OP_ATOL, name
    assert got.abs().max() > 0.1  # not trivially zero


def test_onnx_attention_gqa_and_3d(tmp_path):
    from vopt.ops.attention import reference_attention

    q, k, v = _qkv(1, 8, 2, 5, 9, 8, seed=5)  # grouped-query: 8 query heads over 2 key/value heads
    got, _ = _onnx_run(lambda q, k, v: torch.ops.vopt.attention(q, k, v, enable_gqa=True), (q, k, v), tmp_path, "gqa")
    assert (got - reference_attention(q, k, v, enable_gqa=True)).abs().max().item() <= OP_ATOL
    q3, k3, v3 = q[0], k[0].repeat_interleave(4, 0), v[0].repeat_interleave(4, 0)  # 3-D [H, L, D]: MatMul/Softmax path
    mask = torch.ones(5, 9, dtype=torch.bool)
    mask[2] = False
    got, notes = _onnx_run(lambda q, k, v, m: torch.ops.vopt.attention(q, k, v, m), (q3, k3, v3, mask), tmp_path, "3d")
    assert notes["attention_nodes"] == 0
    assert (got - reference_attention(q3, k3, v3, mask)).abs().max().item() <= OP_ATOL


def test_onnx_block_sparse_attention_odd_sizes(tmp_path):
    from vopt.ops.block_sparse_attention import block_sparse_attention_reference

    q, k, v = _qkv(1, 2, 2, 13, 21, 8, seed=7)  # 13 x 21 with 4 x 8 blocks: partial last tiles
    block_mask = torch.rand(4, 3, generator=torch.Generator().manual_seed(8)) > 0.4
    block_mask[1] = False  # a query block with no live key block -> zeros
    block_mask[0, 0] = True
    dense = torch.rand(13, 21, generator=torch.Generator().manual_seed(9)) > 0.3
    fn = lambda q, k, v, d: torch.ops.vopt.block_sparse_attention(q, k, v, block_mask, 4, 8, d)
    got, _ = _onnx_run(fn, (q, k, v, dense), tmp_path, "bsa")
    want = block_sparse_attention_reference(q, k, v, block_mask, 4, 8, dense)
    assert (got[:, :, 4:8] == 0).all()
    assert (got - want).abs().max().item() <= OP_ATOL


def test_onnx_refuses_sage_attention_and_unknown_ops(tmp_path):
    from vopt.engine import onnx_registry

    q, k, v = _qkv(1, 2, 2, 4, 4, 8, seed=0)
    with pytest.raises(EngineError, match=r"vopt::sage_attention cannot be lowered to ONNX.*pt2 or aoti"):
        _onnx_run(lambda q, k, v: torch.ops.vopt.sage_attention(q, k, v), (q, k, v), tmp_path, "sage")
    x = torch.randn(5)
    with pytest.raises(EngineError, match=r"vopt::axpy.default has no ONNX translation registered.*vopt::attention"):
        _onnx_run(lambda a, b: torch.ops.vopt.axpy(a, b, 2.0), (x, x + 1), tmp_path, "axpy")

    # An op module registers its own lowering: the same export then works.
    def factory():
        from onnxscript import opset18 as op

        def axpy(x, y, alpha):
            return op.Add(op.Mul(x, op.CastLike(op.Constant(value_float=alpha), x)), y)

        return axpy

    onnx_registry.register_onnx_translation("vopt::axpy", factory)
    try:
        from vopt.ops.axpy import reference

        got, notes = _onnx_run(lambda a, b: torch.ops.vopt.axpy(a, b, 2.0), (x, x + 1), tmp_path, "axpy2")
        assert torch.equal(got, reference(x, x + 1, 2.0))  # one fp32 multiply, one fp32 add: bit-exact
        assert notes["translated_ops"] == ["vopt::axpy.default"]
    finally:
        onnx_registry._TRANSLATIONS.pop(("vopt::axpy", "default"), None)


# ---- errors --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_engine(tmp_path_factory):
    """A pt2 engine of a tiny attention module (fast), reused by the error tests (copied before damage)."""
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x, scale=1.0):
            return self.mha(x, x, x, need_weights=False)[0] * scale

    torch.manual_seed(0)
    model = Tiny().eval()
    inputs = {"x": torch.randn(1, 5, 16), "scale": 2.0}
    opt = vopt.optimize(model, example_inputs=inputs)
    out = tmp_path_factory.mktemp("eng") / "tiny"
    manifest = build_engine(opt, inputs, "pt2", out, model_name="tiny")
    return out, manifest, opt, inputs


def _copy(src: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_load_errors_paths_and_manifests(small_engine, tmp_path):
    out, manifest, _, _ = small_engine
    assert manifest["constants"] == {"scale": 2.0}
    with pytest.raises(ManifestError, match="does not exist"):
        vopt.load_engine(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ManifestError, match="is not a directory"):
        vopt.load_engine(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="has no manifest.json"):
        vopt.load_engine(tmp_path / "empty")
    eng = _copy(out, tmp_path)
    (eng / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not readable JSON"):
        vopt.load_engine(eng)
    data = dict(manifest, manifest_version=999)
    (eng / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="manifest_version 999; this vopt reads version 1"):
        vopt.load_engine(eng)
    (eng / "manifest.json").write_text(json.dumps(dict(manifest, format="vopt-report")))
    with pytest.raises(ManifestError, match="not a 'vopt-engine'"):
        vopt.load_engine(eng)
    (eng / "manifest.json").write_text(json.dumps(manifest))
    (eng / "model.pt2").unlink()
    with pytest.raises(EngineError, match="'model.pt2' named in the manifest is missing"):
        vopt.load_engine(eng)


def test_pt2_refuses_pickled_payloads(small_engine, tmp_path):
    out, _, _, _ = small_engine
    eng = _copy(out, tmp_path)
    src = eng / "model.pt2"
    patched = tmp_path / "patched.pt2"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(patched, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("_weights_config.json"):
                data = data.replace(b'"use_pickle": false', b'"use_pickle": true', 1)
            zout.writestr(item, data)
    patched.replace(src)
    with pytest.raises(EngineError, match="is pickled; vopt loads weights-only engines"):
        vopt.load_engine(eng)


def test_engine_input_errors(small_engine):
    out, _, opt, inputs = small_engine
    engine = vopt.load_engine(out)
    x = torch.randn(1, 5, 16)
    got = engine(x=x)["output"]
    with torch.no_grad():
        want = opt(x, scale=2.0)
    assert (got - want).abs().max().item() <= ENGINE_ATOL + ENGINE_RTOL * want.abs().max().item()
    assert torch.equal(engine(x)["output"], got) and torch.equal(engine(x=x, scale=2.0)["output"], got)
    with pytest.raises(EngineInputError, match=r"input 'x' has shape \[1, 6, 16\]; this engine was built for \[1, 5, 16\]"):
        engine(x=torch.randn(1, 6, 16))
    with pytest.raises(EngineInputError, match="input 'x' has dtype float64; the engine takes float32"):
        engine(x=x.double())
    with pytest.raises(EngineInputError, match="unknown input 'y'; the engine takes x"):
        engine(y=x)
    with pytest.raises(EngineInputError, match="missing input"):
        engine()
    with pytest.raises(EngineInputError, match="baked into the engine as 2.0"):
        engine(x=x, scale=3.0)


def test_build_errors(small_engine, tmp_path):
    out, _, opt, inputs = small_engine
    with pytest.raises(ConfigError, match="unsupported engine format 'trt'; accepted: pt2, aoti, onnx"):
        build_engine(opt, inputs, "trt", tmp_path / "x")
    with pytest.raises(ConfigError, match="exists and is not empty; pass --force"):
        build_engine(opt, inputs, "pt2", out)
    assert not any(p.name.startswith(".tiny.vopt-tmp") for p in out.parent.iterdir())

    class DataDependentGlue(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:  # glue that branches on a value: not exportable as one program
                return self.lin(x)
            return -self.lin(x)

    model = DataDependentGlue().eval()
    x = torch.ones(2, 4)
    opt2 = vopt.optimize(model, example_inputs=(x,))
    with pytest.raises(EngineError, match=r"model 'ddg': its Python glue between stages cannot be exported"):
        build_engine(opt2, (x,), "onnx", tmp_path / "ddg", model_name="ddg")
    assert not (tmp_path / "ddg").exists()


def test_validation_failure_is_recorded_not_hidden(small_engine, tmp_path):
    _, _, opt, inputs = small_engine
    manifest = build_engine(opt, inputs, "pt2", tmp_path / "strict", model_name="tiny", atol=-1.0, rtol=0.0)
    assert manifest["validation"]["passed"] is False
    on_disk = json.loads((tmp_path / "strict" / "manifest.json").read_text())
    assert on_disk["validation"]["passed"] is False and on_disk["manifest_version"] == 1


# ---- the full matrix (VOPT_SLOW=1) -----------------------------------------------------------

REFUSED = {"gpt4scene", "llm4vg", "t2vid"}  # data-dependent glue: see vopt/engine/glue.py


@pytest.mark.slow
@SLOW
@pytest.mark.parametrize("fmt", ["pt2", "onnx", "aoti"])
@pytest.mark.parametrize("name", [e.name for e in zoo.list()])
def test_zoo_matrix(name, fmt, tmp_path):
    if name in REFUSED:
        with pytest.raises(EngineError, match=f"model '{name}': its Python glue"):
            _build(name, fmt, tmp_path)
        return
    zm, inputs, opt, manifest = _build(name, fmt, tmp_path)
    assert manifest["validation"]["passed"], json.dumps(manifest["validation"], indent=1)
    outs = _fresh_process_run(tmp_path / f"{name}-{fmt}", inputs, tmp_path)
    _check_against_eager(opt, manifest, outs, inputs)


def test_onnx_grouped_gemm_empty_experts_bias_and_dropped_rows(tmp_path):
    from vopt.ops.grouped_gemm import reference

    g = torch.Generator().manual_seed(11)
    x, w, bias = torch.randn(9, 6, generator=g), torch.randn(4, 6, 5, generator=g), torch.randn(4, 5, generator=g)
    offsets = torch.tensor([1, 1, 4, 4, 8])          # row 0 and row 8 outside; experts 0 and 2 empty
    got, _ = _onnx_run(lambda x, w, b: torch.ops.vopt.grouped_gemm(x, w, offsets, b), (x, w, bias), tmp_path, "gg")
    want = reference(x, w, offsets, bias)
    assert (got[0] == 0).all() and (got[8] == 0).all()
    assert (got - want).abs().max().item() <= OP_ATOL * 10  # fp32 dot products of length 6: summation order only


@pytest.mark.parametrize("form", ["mm", "diff", "cdist"])
def test_onnx_vq_argmin_codes_and_distances(tmp_path, form):
    from vopt.engine import onnx_export
    from vopt.ops.vq_lookup import reference

    g = torch.Generator().manual_seed(12)
    codebook = torch.randn(40, 8, generator=g)
    codebook[7] = codebook[3]                       # duplicate code: the first index must win
    x = torch.cat([codebook[[3, 20]], torch.randn(30, 8, generator=g)])
    ep = torch.export.export(_Call(lambda x, c: torch.ops.vopt.vq_argmin(x, c, form)), (x, codebook), strict=False)
    path = tmp_path / f"vq_{form}.onnx"
    onnx_export.export(ep, path, ["x", "c"], ["codes", "dist"])
    codes, dist = onnx_export.load(path, "cpu")(x, codebook)
    want_codes, want_dist = reference(x, codebook, form)
    assert torch.equal(codes, want_codes) and int(codes[0]) == 3
    assert (dist - want_dist).abs().max().item() <= 1e-4 * (1 + want_dist.abs().max().item())
