"""Verification that probes: more than one random input, gradients for training graphs, its cost.

The cover refuses ops the spec does not model; these tests show the probes catch what the cover
lets through (index arithmetic that drops tokens) and what it would miss if it were switched off.
"""

from __future__ import annotations

import pytest
import torch

import moecompile
from conftest import assert_close
from helpers_moe import NearMoE, capture
from moecompile import config, detect
from moecompile import pipeline, verify
from moecompile.detect import cover
from moecompile.codegen import ops


def _run(model, *args, **options):
    gm, inputs = capture(model, *args)
    return gm, inputs, pipeline.run(gm, inputs, config.make(options), graph_id=0)


def test_capacity_drops_only_concentrated_routing_sees_are_caught(monkeypatch):
    """Capacity 2.5x the mean per-expert load: N(0, 1) inputs never reach it, routing every token
    to a few experts does. With capacity detection switched off (a spec without capacity), the
    layer must stay as traced, refused by a probe other than randn."""
    from moecompile.detect import match

    monkeypatch.setattr(match, "capacity_options", lambda *args: [{}])
    model = NearMoE(E=8, K=2, capacity=2.5)
    x = torch.randn(2, 32, 16)
    with torch.no_grad():
        full = NearMoE(E=8, K=2)
        full.load_state_dict(model.state_dict())
        assert torch.equal(model(x), full(x)), "random inputs must not reach the capacity"
        gm, inputs, outcome = _run(model, x)
    (row,) = outcome.regions
    assert row["status"] == "fallback", row
    assert "on probe" in row["reason"] and "probe randn" not in row["reason"], row["reason"]
    one_token = torch.randn(1, 1, 16).expand(2, 32, 16).contiguous()  # every token to one expert pair
    with torch.no_grad():
        assert not torch.equal(model(one_token), full(one_token))
        torch.testing.assert_close(gm(one_token, *inputs[1:])[0], model(one_token))


def test_capacity_is_modeled_and_drops_exactly_what_the_layer_drops():
    model = NearMoE(E=8, K=2, capacity=2.5)
    x = torch.randn(2, 32, 16)
    with torch.no_grad():
        gm, inputs, outcome = _run(model, x)
        (row,) = outcome.regions
        assert row["status"] == "optimized", row["reason"]
        assert row["spec"]["capacity"].endswith("(floor, token_major)"), row["spec"]
        for probe in (torch.randn(1, 1, 16).expand(2, 32, 16).contiguous(), torch.randn(2, 32, 16) * 50):
            assert_close(gm(probe, *inputs[1:])[0], model(probe), torch.float32, what="capacity probe")


@pytest.mark.parametrize("site, op", [("input", "clamp"), ("gate", "clamp_max"), ("act", "soft_clamp")])
def test_probes_catch_large_activation_ops_without_the_cover(monkeypatch, site, op):
    """Defence in depth: with the cover switched off, the large-activation probes still refuse."""
    torch.manual_seed(0)
    clean = NearMoE()
    with torch.no_grad():
        clean(torch.randn(4, 16, 16) * 2.0)  # limit above what 2x N(0, 1) inputs reach
    model = NearMoE(site=site, op=op, limit=clean.record[site] * 1.5)
    model.load_state_dict(clean.state_dict())
    monkeypatch.setattr(cover, "build", lambda nodes, topk, explained=(), index_inputs=(): cover.Cover((), topk))
    monkeypatch.setattr(cover, "unexplained", lambda c, spec: None)
    with torch.no_grad():  # forward probes only (a training graph would also compare gradients)
        gm, inputs, outcome = _run(model, torch.randn(4, 16, 16))
    (row,) = outcome.regions
    assert row["status"] == "fallback", row
    assert "probe randn" not in row["reason"], row["reason"]


def test_training_graph_compares_gradients(monkeypatch):
    """An op whose backward were off by 1% in one weight: caught in training graphs only."""
    real = ops.moe_backward

    def off(grad, x, weights, spec, kernels, saved):
        grads = list(real(grad, x, weights, spec, kernels, saved))
        grads[-1] = grads[-1] * 1.01  # down_proj
        return grads

    monkeypatch.setattr(ops, "moe_backward", off)
    model, x = NearMoE(), torch.randn(2, 8, 16)
    with torch.no_grad():
        _, _, inference = _run(model, x)
    assert inference.regions[0]["status"] == "optimized"  # forward probes only
    _, _, training = _run(model, x)
    (row,) = training.regions
    assert row["status"] == "fallback" and "gradient of down_proj" in row["reason"], row
    verify_row = next(p for p in training.passes if p["name"] == "verify")
    assert verify_row["counters"]["training"] == 1


def test_training_graph_with_the_real_backward_is_optimized():
    model, x = NearMoE(), torch.randn(2, 8, 16)
    compiled = torch.compile(model, backend="moe", options={"inner": "aot_eager"})
    compiled(x).square().sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    (row,) = moecompile.last_report().regions
    assert row["status"] == "optimized", row
    model.zero_grad()
    model(x).square().sum().backward()
    for g, p in zip(got, model.parameters()):
        assert_close(g, p.grad, torch.float32, "grad")


def test_dynamic_graph_is_probed_at_its_smallest_size():
    model, x = NearMoE(), torch.randn(2, 8, 16)
    gm, inputs = capture(model, x, dynamic=True)
    (cand,) = detect.find_candidates(gm)
    values = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], inputs))
    shapes = verify._shapes(cand, values)
    assert shapes["traced"]["x"] == [2, 8, 16] and shapes["small"]["x"] == [2, 2, 16]
    verdict = verify.verify(cand, 0, values, config.make({}))
    assert verdict.region is not None and verdict.probes == 5 and verdict.ms > 0


def test_static_graph_has_no_small_probe():
    model, x = NearMoE(), torch.randn(2, 8, 16)
    gm, inputs = capture(model, x)
    (cand,) = detect.find_candidates(gm)
    values = dict(zip([n for n in gm.graph.nodes if n.op == "placeholder"], inputs))
    assert "small" not in verify._shapes(cand, values)
    assert verify.verify(cand, 0, values, config.make({})).probes == 4


def test_close_treats_nan_and_inf_as_values():
    a = torch.tensor([1.0, float("nan"), float("inf"), 2.0])
    assert verify.close(a, a.clone(), 1e-6) == (True, 0.0)
    assert not verify.close(a, torch.tensor([1.0, 0.0, float("inf"), 2.0]), 1e-6)[0]  # NaN where eager has none
    assert not verify.close(torch.tensor([1.0, 3.0]), torch.tensor([1.0, float("nan")]), 1e-6)[0]
    assert not verify.close(a, torch.tensor([1.0, float("nan"), -float("inf"), 2.0]), 1e-6)[0]
    assert verify.close(torch.tensor([1.0, 2.0001]), torch.tensor([1.0, 2.0]), 1e-4)[0]
    assert not verify.close(torch.tensor([1.0, 2.01]), torch.tensor([1.0, 2.0]), 1e-4)[0]


def test_close_mean_bound_catches_a_small_change_everywhere():
    b = torch.randn(1000, dtype=torch.float64)
    assert verify.close(b * 1.02, b, 6e-2)[0]  # within the max bound alone
    assert not verify.close(b * 1.02, b, 6e-2, 6e-3)[0]
    noisy = b + 1e-3 * torch.randn(1000, dtype=torch.float64)  # rounding-like noise
    assert verify.close(noisy, b, 6e-2, 6e-3)[0]
