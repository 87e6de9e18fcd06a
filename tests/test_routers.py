"""DeepSeek-style routers: correction bias, group-limited top-k, weights gathered from the scores.

Structural first (the spec detection reads off the graph, a tampered group mask refused with the op
named), then verification refusing a wrong group count, then compiled vs eager forward and backward.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moecompile
from conftest import assert_close
from helpers_moe import ClampedSwiGLUMoE, GroupedRouterMoE, capture
from moecompile import config, detect, pipeline


def _compile_and_check(model, x, dtype=torch.float32):
    moecompile.report.reset()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moe", options={"inner": "eager"})
    assert_close(compiled(x), model(x), dtype, what="forward")
    return moecompile.last_report().regions


@pytest.mark.parametrize("group_score", ["top2_sum", "max"])
def test_group_limited_router_is_read_off_the_graph(group_score):
    model = GroupedRouterMoE(group_score=group_score)
    gm, _ = capture(model, torch.randn(2, 8, 16))
    (cand,) = detect.find_candidates(gm)  # the two group top-ks belong to the layer
    assert cand.reason is None, cand.reason
    spec = cand.options[0][0]
    assert (spec.groups, spec.top_groups, spec.group_score) == (4, 2, group_score)
    assert spec.correction_bias and spec.weights_from == "gather" and spec.scoring == "sigmoid"
    assert (spec.renormalize, spec.renorm_eps, spec.routed_scaling) == (True, 1e-20, 2.5)
    assert spec.weight_names()[:2] == ("router_weight", "router_correction_bias")


def test_group_limited_router_compiles_and_matches_eager():
    torch.manual_seed(0)
    model = GroupedRouterMoE()
    x = torch.randn(2, 8, 16, requires_grad=True)
    (row,) = _compile_and_check(model, x)
    assert row["status"] == "optimized", row["reason"]
    assert row["spec"]["groups"] == "2/4 by top2_sum" and row["spec_full"]["masked_score"] == "-inf"
    # gradients, on inputs verification never saw
    x2 = (torch.randn(3, 5, 16) * 30).requires_grad_()
    twin = GroupedRouterMoE()
    twin.load_state_dict(model.state_dict())
    compiled = torch.compile(twin, backend="moe", options={"inner": "aot_eager"})
    compiled(x2).square().sum().backward()
    x3 = x2.detach().clone().requires_grad_()
    model(x3).square().sum().backward()
    assert_close(x2.grad, x3.grad, torch.float32, kind="grad", what="dx")
    for (name, p), q in zip(twin.named_parameters(), model.parameters()):
        assert_close(p.grad, q.grad, torch.float32, kind="grad", what=name)


def test_tampered_group_mask_falls_back_naming_the_op():
    (row,) = _compile_and_check(GroupedRouterMoE(tamper=True), torch.randn(2, 8, 16))
    assert row["status"] == "fallback" and "clamp" in row["reason"], row["reason"]


def test_verification_refuses_a_wrong_group_count(monkeypatch):
    from moecompile.detect import match

    real = match.spec_options

    def wrong(*args, **kwargs):
        return [(dataclasses.replace(s, top_groups=s.top_groups + 1), w) for s, w in real(*args, **kwargs)]

    monkeypatch.setattr(match, "spec_options", wrong)
    model = GroupedRouterMoE()
    gm, inputs = capture(model, torch.randn(2, 8, 16))
    outcome = pipeline.run(gm, inputs, config.make({}), graph_id=0)
    (row,) = outcome.regions
    assert row["status"] == "fallback" and "differs" in row["reason"]


def test_clamped_swiglu_with_biases_compiles_and_matches_eager_where_clamps_bite():
    torch.manual_seed(0)
    model = ClampedSwiGLUMoE()
    (row,) = _compile_and_check(model, torch.randn(2, 8, 16))
    assert row["status"] == "optimized", row["reason"]
    assert row["spec_full"]["activation"] == "clamped_swiglu" and row["spec_full"]["act_limit"] == 1.0
    assert row["spec_full"]["expert_bias"] and row["spec_full"]["router_bias"]
    compiled = torch.compile(model, backend="moe", options={"inner": "eager"})
    x = torch.randn(3, 5, 16) * 20  # most gate/up values beyond the limit
    assert_close(compiled(x), model(x), torch.float32, what="large inputs")


def test_clamped_swiglu_with_other_limits_falls_back_naming_the_clamp():
    (row,) = _compile_and_check(ClampedSwiGLUMoE(up_limit=2.0), torch.randn(2, 8, 16))
    assert row["status"] == "fallback" and "clamp" in row["reason"], row["reason"]
