"""MoE-VRD zoo entry: distinct experts, top-k gates, dense dispatch == per-sample routing, export, full dims."""
import pytest
import torch

from vopt import zoo
from vopt.errors import ConfigError
from vopt.zoo import moe_vrd
from vopt.zoo.moe_vrd import MoEVRD

HOST_SYNC_OPS = {"nonzero", "nonzero_static", "_local_scalar_dense", "item", "masked_select", "unique"}  # data-dependent sizes


@pytest.fixture(scope="module")
def tiny():
    return zoo.build("moe-vrd")


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)


def naive_routing(model, inputs, weighted=True):
    """Per pair: run only the top-k experts the gate selects, sum (gate-weighted) their outputs."""
    gates = model.gates(inputs["sf"])
    rows = []
    for b in range(gates.shape[0]):
        one = {k: v[b:b + 1] for k, v in inputs.items()}
        acc = None
        for e in gates[b].topk(model.top_k).indices.tolist():
            w = gates[b, e] if weighted else 1.0
            outs = [w * o for o in model.experts[e](**one)]
            acc = outs if acc is None else [a + o for a, o in zip(acc, outs)]
        rows.append(acc)
    return [torch.cat([r[i] for r in rows]) for i in range(3)]


def test_experts_are_distinct_instances_with_distinct_weights(tiny):
    experts = tiny.model.experts
    assert len(experts) == 4 and len({id(e) for e in experts}) == 4
    for a in range(4):
        for b in range(a + 1, 4):
            for pa, pb in zip(experts[a].parameters(), experts[b].parameters()):
                assert pa.data_ptr() != pb.data_ptr() and not torch.equal(pa, pb)


def test_gate_rows_have_exactly_k_nonzeros_summing_to_one(tiny):
    inputs = tiny.example_inputs(pairs=64, seed=3)
    with torch.no_grad():
        gates = tiny.model.gates(inputs["sf"])
    assert gates.shape == (64, 4)
    assert ((gates > 0).sum(1) == 2).all()
    torch.testing.assert_close(gates.sum(1), torch.ones(64))
    assert len(set(map(tuple, (gates > 0).int().tolist()))) > 1, "routing should vary across pairs"


@pytest.mark.parametrize("combine", ["weighted", "unweighted"])
def test_dense_dispatch_equals_naive_per_sample_routing(combine):
    torch.manual_seed(0)
    model = MoEVRD(**moe_vrd.TINY, combine=combine).eval()
    inputs = zoo.get("moe-vrd").build("tiny", torch.device("cpu"), torch.float32).example_inputs(pairs=12)
    out = run(model, inputs)
    with torch.no_grad():
        ref = naive_routing(model, inputs, weighted=combine == "weighted")
    for got, want in zip(out[:3], ref):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_weighted_combination_is_a_mixture_and_unweighted_a_sum(tiny):
    inputs = tiny.example_inputs()
    weighted = run(tiny.model, inputs)
    torch.testing.assert_close(weighted.subject.sum(1), torch.ones(16))       # convex mix of softmax outputs
    unweighted_model = moe_vrd.build("tiny", torch.device("cpu"), torch.float32, combine="unweighted").model
    unweighted_model.load_state_dict(tiny.model.state_dict())
    unweighted = run(unweighted_model.eval(), inputs)
    torch.testing.assert_close(unweighted.subject.sum(1), torch.full((16,), 2.0))  # k = 2 softmax outputs summed
    torch.testing.assert_close(unweighted.gates, weighted.gates)
    assert not torch.allclose(unweighted.predicate, weighted.predicate)


def test_eval_is_deterministic_and_training_adds_noise_and_the_aux_loss():
    torch.manual_seed(0)
    model = MoEVRD(**moe_vrd.TINY).eval()
    inputs = zoo.build("moe-vrd").example_inputs(pairs=32)
    a, b = run(model, inputs), run(model, inputs)
    assert torch.equal(a.gates, b.gates) and a.aux_loss is None
    model.train()
    torch.manual_seed(1)
    t1 = run(model, inputs)
    torch.manual_seed(2)
    t2 = run(model, inputs)
    assert not torch.equal(t1.gates, t2.gates)                                 # noisy gating in training
    assert ((t1.gates > 0).sum(1) == 2).all()
    assert t1.aux_loss.dim() == 0 and t1.aux_loss >= 0


def test_aux_loss_without_noise_is_cv_squared_of_importance_and_load():
    torch.manual_seed(0)
    model = MoEVRD(**moe_vrd.TINY, noisy_gating=False).train()
    inputs = zoo.build("moe-vrd").example_inputs(pairs=32)
    out = run(model, inputs)
    cv2 = lambda x: x.var() / x.mean() ** 2
    importance, load = out.gates.sum(0), (out.gates > 0).sum(0).float()
    torch.testing.assert_close(out.aux_loss, 1e-2 * (cv2(importance) + cv2(load)))


def test_whole_model_exports_without_host_syncs(tiny):
    inputs = tiny.example_inputs()
    ep = torch.export.export(tiny.model, (), inputs, strict=False)
    names = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert not [n for n in names if n.startswith("aten.") and n.split(".")[1] in HOST_SYNC_OPS], names
    assert any("topk" in n for n in names)
    got = ep.module()(**inputs)
    for g, r in zip(got[:4], run(tiny.model, inputs)[:4]):
        torch.testing.assert_close(g, r)


def test_errors_name_the_argument(tiny):
    with pytest.raises(ConfigError, match="combine"):
        MoEVRD(**moe_vrd.TINY, combine="max")
    with pytest.raises(ConfigError, match="top_k"):
        MoEVRD(**dict(moe_vrd.TINY, top_k=5))
    inputs = tiny.example_inputs()
    with pytest.raises(ValueError, match="pvf"):
        tiny.model(**dict(inputs, pvf=inputs["pvf"][:, :10]))
    with pytest.raises(ConfigError, match="pairs"):
        tiny.example_inputs(pairs=0)


def test_full_size_dims_are_the_published_ones():
    zm = zoo.build("moe-vrd", "full")
    m = zm.model
    assert all(p.device.type == "meta" for p in m.parameters())
    assert m.num_experts == 4 and m.top_k == 2 and tuple(m.w_gate.shape) == (1536, 4)   # E, k: assumptions
    e = m.experts[0]
    # Object head 1536 -> 768 -> 35 + 1; predicate head 3072 -> 768, (+12) 780 -> 768 -> 132; 3 steps.
    assert (e.object_predictor[0].in_features, e.object_predictor[0].out_features) == (1536, 768)
    assert e.object_predictor[3].out_features == 35 + 1
    assert (e.predicate_vis_feat_emb[0].in_features, e.predicate_vis_feat_emb[0].out_features) == (3072, 768)
    assert (e.predicate_feat_emb[0].in_features, e.predicate_feat_emb[0].out_features) == (780, 768)
    assert e.predicate_predictor.out_features == 132 and e.steps == 3
    assert tuple(e.po2s.shape) == (132, 36, 36) and tuple(e.sp2o.shape) == (36, 132, 36)
    assert tuple(e.so2p.shape) == (36, 36, 132)
    o, p, h = 36, 132, 768
    per_expert = (1536 * h + h + h * o) + (3072 * h + h) + (780 * h + h) + h * p + 3 * o * o * p
    assert sum(x.numel() for x in m.parameters()) == 4 * per_expert + 2 * 1536 * 4
