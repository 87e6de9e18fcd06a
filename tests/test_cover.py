"""Structural cover: a layer is rewritten only if every node in it is something the spec models.

The near-MoE layers here compute exactly an MoE on small N(0, 1) inputs and something else on the
large activations real models carry; each must fall back with the op named, and the compiled model
must then match eager on those large inputs.
"""

from __future__ import annotations

import pytest
import torch

import moecompile
from conftest import assert_close
from helpers_moe import NearMoE, capture
from moecompile import config, detect
from moecompile import pipeline
from moecompile.detect import cover


def _compile_and_run(model, x):
    torch._dynamo.reset()
    moecompile.report.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="moe", options={"inner": "eager"})(x)
    (row,) = moecompile.last_report().regions
    return out, row


def _calibrated(site, op, scale_of_limit=1.5, **kwargs):
    """A NearMoE whose op at `site` never acts on N(0, 1) inputs (limit 1.5x the largest value
    seen there) but does on inputs 50x larger."""
    torch.manual_seed(0)
    probe = NearMoE(**kwargs)
    with torch.no_grad():
        probe(torch.randn(4, 16, 16))
    limit = probe.record[site] * scale_of_limit
    model = NearMoE(site=site, op=op, limit=limit, **kwargs)
    model.load_state_dict(probe.state_dict())
    return model, probe


@pytest.mark.parametrize("site, op, named", [
    ("gate", "clamp_max", "clamp"),      # clamped SwiGLU: g.clamp(max=c) ...
    ("up", "clamp", "clamp"),            # ... and u.clamp(-c, c)
    ("input", "clamp", "clamp"),         # expert input clamped: x.clamp(-8, 8)
    ("act", "where", "gt"),              # a select by value: the comparison is what is not modeled
    ("expert_out", "mask_mul", "abs"),   # t * (t.abs() < c)
    ("input", "soft_clamp", "tanh"),     # smooth, but still not an op the spec has
    ("up", "maximum", "maximum"),
])
def test_near_moe_falls_back_with_the_op_named(site, op, named):
    model, clean = _calibrated(site, op)
    x = torch.randn(4, 16, 16) * 50.0
    with torch.no_grad():
        eager, unperturbed = model(x), clean(x)
    assert (eager - unperturbed).abs().max() > 1e-3 * eager.abs().max(), "the op must act at this scale"
    out, row = _compile_and_run(model, x)
    assert row["status"] == "fallback", row
    assert row["reason"].startswith(f"{named} ("), row["reason"]
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


def test_routing_weight_threshold_falls_back_naming_the_comparison():
    """w.masked_fill(w < t, 0): the issue's masked routing weights."""
    model = NearMoE(site="weights", op="mask_below", limit=0.05, E=8, K=4)
    x = torch.randn(4, 16, 16)
    out, row = _compile_and_run(model, x)
    assert row["status"] == "fallback" and row["reason"].startswith("lt ("), row
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))


def test_the_plain_layer_is_covered_and_optimized():
    model, _ = _calibrated("gate", "clamp")
    model.site = None
    x = torch.randn(4, 16, 16) * 50.0
    out, row = _compile_and_run(model, x)
    assert row["status"] == "optimized", row
    with torch.no_grad():
        assert_close(out, model(x), torch.float32)


def test_routing_index_arithmetic_is_covered():
    """one_hot / cumsum / comparisons of expert ids are dispatch: covered (a capacity that never
    binds leaves the layer an exact MoE, so it is optimized)."""
    model = NearMoE(capacity=100.0)
    x = torch.randn(2, 16, 16)
    out, row = _compile_and_run(model, x)
    assert row["status"] == "optimized", row
    with torch.no_grad():
        assert_close(out, model(x), torch.float32)


class _MaskedBy(NearMoE):
    """Routing weights zeroed where `by` says: by expert id (routing) or by value."""

    def __init__(self, by):
        super().__init__()
        self.by = by

    def forward(self, x):
        B, S, H = x.shape
        flat = x.reshape(-1, H)
        w, ids = torch.topk(torch.softmax(self.router(flat).float(), dim=-1), self.K, dim=-1)
        w = w.masked_fill(ids == 3 if self.by == "routing" else w > 0.9, 0.0)
        rows = flat.repeat_interleave(self.K, dim=0)
        gu = torch.bmm(rows.unsqueeze(1), self.gate_up[ids.reshape(-1)].transpose(1, 2)).squeeze(1)
        g, u = gu.chunk(2, dim=-1)
        y = torch.bmm((torch.nn.functional.silu(g) * u).unsqueeze(1),
                      self.down[ids.reshape(-1)].transpose(1, 2)).squeeze(1)
        return (y.view(-1, self.K, H) * w.unsqueeze(-1)).sum(1).view(B, S, H)


def test_select_by_routing_passes_the_cover_select_by_value_does_not():
    gm, _ = capture(_MaskedBy("routing"), torch.randn(2, 8, 16))
    (cand,) = detect.find_candidates(gm)
    assert cand.reason is None and cand.options  # covered: verification decides (it differs)
    gm, _ = capture(_MaskedBy("value"), torch.randn(2, 8, 16))
    (cand,) = detect.find_candidates(gm)
    assert cand.reason.startswith("gt (") and "values" in cand.reason


def test_routing_select_not_in_the_spec_is_caught_by_verification():
    model, x = _MaskedBy("routing"), torch.randn(2, 8, 16)
    out, row = _compile_and_run(model, x)
    assert row["status"] == "fallback" and "differs from the traced layer" in row["reason"]
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))


def test_activation_the_spec_does_not_have_is_named():
    """relu(gate) before silu: each candidate spec has one activation, so one of the two is extra."""

    class ReluThenSilu(NearMoE):
        def _at(self, site, t):
            return torch.relu(t) if site == "gate" else t

    gm, _ = capture(ReluThenSilu(), torch.randn(2, 8, 16))
    (cand,) = detect.find_candidates(gm)
    assert cand.options == [] and cand.reason is not None
    assert "is not modeled by the spec" in cand.reason and cand.reason.split(" (")[0] in ("relu", "silu")


def test_grad_mode_change_inside_the_layer_is_left_as_traced():
    """The router under torch.no_grad: the op would give the router a gradient eager does not."""
    model, x = NearMoE(router_no_grad=True), torch.randn(2, 8, 16)
    gm, _ = capture(model, x)
    (cand,) = detect.find_candidates(gm)
    assert cand.reason is not None and "grad mode changes inside the layer" in cand.reason
    compiled = torch.compile(model, backend="moe", options={"inner": "aot_eager"})
    compiled(x).sum().backward()
    got = {n: p.grad for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    assert got["router.weight"] is None and model.router.weight.grad is None  # as in eager
    assert_close(got["gate_up"], model.gate_up.grad, torch.float32)


def test_cover_classes_and_counters_on_a_demo_model():
    from moecompile import models

    model, (ids,) = models.build("qwen2_moe", layers=1)
    gm, inputs = capture(model, ids)
    (cand,) = detect.find_candidates(gm)
    region_cover = cover.build(cand.nodes, cand.topk)
    classes = {k: c for _, k, c in region_cover.nodes}
    assert classes["histc"] == cover.INDEX and classes["sort"] == cover.INDEX  # dispatch
    assert classes["grouped_mm_fallback"] == cover.NUMERIC and region_cover.count("topk") == 1
    outcome = pipeline.run(gm, inputs, config.make({}), graph_id=0)
    verify_row = next(p for p in outcome.passes if p["name"] == "verify")
    assert verify_row["counters"]["probes"] >= 5 and verify_row["ms"] > 0
    assert outcome.regions[0]["verify_ms"] > 0
