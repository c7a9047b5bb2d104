"""Pass registry, ordering constraints, requires/provides, strict mode."""
import pytest
import torch

from vopt.errors import ConfigError, PassOrderError, StrictModeError, UnknownNameError
from vopt.pass_manager import PassManager, _order
from vopt.pass_protocol import Match, Pass, PassContext, PassKind, PassResult, StageGraph, get_pass, registered_passes


def make(name, kind=PassKind.GRAPH, after=(), before=(), requires=(), provides=(), skip=False):
    class P(Pass):
        def run_graph(self, graph, ctx):
            return PassResult(self.name, graph.stage, [Match("s:n", "x", rewritten=not skip, reason="nope" if skip else None)])

        def run_runtime(self, model, ctx):
            return PassResult(self.name, "model", [])

    P.name, P.kind, P.after, P.before = name, kind, tuple(after), tuple(before)
    P.requires, P.provides = frozenset(requires), frozenset(provides)
    return P()


def test_registry_has_builtin_passes_and_rejects_unknown():
    assert {"sdpa", "canonicalize_attention"} <= set(registered_passes())
    with pytest.raises(UnknownNameError) as e:
        get_pass("sdpaa")
    assert "sdpa" in str(e.value) and "canonicalize_attention" in str(e.value)


def test_default_pipeline_is_ordered():
    assert PassManager.default().names.index("canonicalize_attention") < PassManager.default().names.index("sdpa")


def test_explicit_wrong_order_names_culprits():
    with pytest.raises(PassOrderError) as e:
        PassManager.from_names(["sdpa", "canonicalize_attention"])
    msg = str(e.value)
    assert "'canonicalize_attention' must run before 'sdpa'" in msg
    assert "['canonicalize_attention', 'sdpa']" in msg


def test_requires_must_be_provided_earlier():
    a = make("a", provides={"fact:a"})
    b = make("b", requires={"fact:a"})
    PassManager([a, b])
    with pytest.raises(PassOrderError, match="'b' requires 'fact:a'"):
        PassManager([b, a])


def test_runtime_after_graph_is_refused():
    with pytest.raises(PassOrderError, match="runtime pass 'r' is listed after graph pass 'g'"):
        PassManager([make("g"), make("r", kind=PassKind.RUNTIME)])


def test_duplicate_and_cycle():
    with pytest.raises(PassOrderError, match="listed twice"):
        PassManager([make("a"), make("a")])
    with pytest.raises(PassOrderError, match="cyclic"):
        _order([make("a", after=["b"]), make("b", after=["a"])])


def test_topological_order_is_stable():
    ps = [make("x"), make("y", before=["x"]), make("z")]
    assert [p.name for p in _order(ps)] == ["y", "x", "z"]


def test_strict_mode_raises_on_skip():
    gm = torch.fx.symbolic_trace(torch.nn.ReLU())
    graph = StageGraph("stage", "whole", gm)
    PassManager([make("s", skip=True)]).run_graph(graph, PassContext())  # not strict: fine
    with pytest.raises(StrictModeError, match="skipped 1 match"):
        PassManager([make("s", skip=True)], strict=True).run_graph(graph, PassContext())


def test_pass_config_type_is_checked():
    with pytest.raises(ConfigError, match="takes a SdpaConfig"):
        PassManager.from_names(["sdpa"], {"sdpa": get_pass("canonicalize_attention").config_cls()})
    pm = PassManager.from_names(["sdpa"], {"sdpa": {"stages": ["language_model"]}})
    assert pm.passes[0].config.stages == ["language_model"]


def test_uuid_changes_with_config():
    sdpa = get_pass("sdpa")
    assert sdpa().uuid() == sdpa().uuid()
    assert sdpa().uuid() != sdpa(sdpa.config_cls(stages=["x"])).uuid()
