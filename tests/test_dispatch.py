"""Kernel dispatch: order, forced backends, fallback warnings, typed errors."""
import logging

import pytest
import torch

from vopt.dispatch import Backend, BackendPreference, KernelOp, get_kernel_op
from vopt.errors import BackendUnavailableError, ConfigError, UnknownNameError


def make_op():
    op = KernelOp("test::op")
    op.register(Backend.CUDA, devices=("cuda",), available=lambda: "library not built")(lambda x: ("cuda", x))
    op.register(Backend.TRITON, devices=("cuda", "cpu"), dtypes=(torch.float16,),
                check=lambda x: "needs an even length" if x.shape[-1] % 2 else None)(lambda x: ("triton", x))
    op.register(Backend.REFERENCE, devices=("cpu", "cuda"))(lambda x: ("reference", x))
    return op


def test_auto_picks_first_accepting_backend(monkeypatch):
    monkeypatch.delenv("VOPT_BACKEND", raising=False)
    op = make_op()
    assert op(torch.zeros(4, dtype=torch.float16))[0] == "triton"
    assert op(torch.zeros(3, dtype=torch.float16))[0] == "reference"  # triton's check refused
    assert op(torch.zeros(4))[0] == "reference"  # dtype refused


def test_auto_fallback_warns_once_per_reason(monkeypatch, caplog):
    monkeypatch.delenv("VOPT_BACKEND", raising=False)
    op = make_op()
    with caplog.at_level(logging.WARNING, logger="vopt.dispatch"):
        op(torch.zeros(3, dtype=torch.float16))
        op(torch.zeros(3, dtype=torch.float16))
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("needs an even length" in m for m in msgs) == 1
    assert not any("backend cuda" in m for m in msgs)  # cuda never serves cpu: no warning


def test_forced_backend_error_lists_every_backend(monkeypatch):
    monkeypatch.setenv("VOPT_BACKEND", "cuda")
    op = make_op()
    with pytest.raises(BackendUnavailableError) as e:
        op(torch.zeros(4))
    msg = str(e.value)
    assert "library not built" in msg
    assert "triton: dtype float32 not supported (supports: float16)" in msg
    assert "reference: would run (not selected)" in msg
    assert "VOPT_BACKEND=cuda" in msg
    assert [b for b, _ in e.value.refusals] == ["cuda", "triton", "reference"]


def test_forced_backend_runs(monkeypatch):
    monkeypatch.setenv("VOPT_BACKEND", "REFERENCE")
    assert make_op()(torch.zeros(4, dtype=torch.float16))[0] == "reference"


def test_bad_env_value_is_a_config_error(monkeypatch):
    monkeypatch.setenv("VOPT_BACKEND", "tensorrt")
    with pytest.raises(ConfigError) as e:
        make_op()(torch.zeros(4))
    assert "VOPT_BACKEND='tensorrt'" in str(e.value) and "reference" in str(e.value)


def test_no_backend_at_all():
    op = KernelOp("test::empty")
    with pytest.raises(BackendUnavailableError, match="not implemented for this op"):
        op(torch.zeros(1))


def test_explicit_preference_argument_and_parse():
    assert BackendPreference.parse(None) is BackendPreference.AUTO
    assert BackendPreference.parse("Triton") is BackendPreference.TRITON
    assert make_op().select(torch.zeros(4, dtype=torch.float16), preference="reference").backend is Backend.REFERENCE


def test_registry_lookup():
    import vopt.ops  # noqa: F401

    assert get_kernel_op("vopt::attention").name == "vopt::attention"
    with pytest.raises(UnknownNameError, match="vopt::attention"):
        get_kernel_op("vopt::nope")
