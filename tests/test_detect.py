"""Detection, verification and the lower pass on captured graphs: structure first, no GPU."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close
from helpers_moe import TinyMoE, TopkNotRouter, capture
from moecompile import config, detect, models, pipeline
from moecompile.fx import op_kind


def _run(gm, example_inputs, **options):
    return pipeline.run(gm, example_inputs, config.make(options), graph_id=0)


def _count(gm, kind):
    return sum(1 for n in gm.graph.nodes if op_kind(n) == kind or str(n.target) == kind)


def test_mixtral_graph_becomes_one_op_per_layer():
    model, (ids,) = models.build("mixtral", layers=2)
    gm, inputs = capture(model, ids)
    assert _count(gm, "topk") == 2
    outcome = _run(gm, inputs)
    assert outcome.changed
    assert _count(gm, "moecompile.moe.default") == 2
    assert _count(gm, "topk") == 0 and _count(gm, "sort") == 0  # routing and dispatch are gone
    lower = next(p for p in outcome.passes if p["name"] == "lower")
    assert lower["counters"] == {"regions_lowered": 2}
    detect_row = next(p for p in outcome.passes if p["name"] == "detect")
    assert detect_row["counters"] == {"candidates": 2, "verified": 2}
    with torch.no_grad():
        assert_close(gm(*inputs)[0], model(ids).logits, torch.float32)


def test_no_moe_graph_is_left_unchanged():
    model, (ids,) = models.build("dense", layers=1)
    gm, inputs = capture(model, ids)
    before = gm.code
    outcome = _run(gm, inputs)
    assert not outcome.changed and outcome.regions == []
    assert gm.code == before


def test_topk_without_router_is_not_reported():
    gm, inputs = capture(TopkNotRouter(), torch.randn(2, 5, 16))
    before = gm.code
    outcome = _run(gm, inputs)
    assert outcome.regions == [] and gm.code == before


def test_user_written_moe_is_detected_with_its_spec():
    model = TinyMoE()
    x = torch.randn(2, 5, 16)
    gm, inputs = capture(model, x)
    outcome = _run(gm, inputs)
    (row,) = outcome.regions
    assert row["status"] == "optimized", row
    assert (row["num_experts"], row["top_k"], row["hidden"], row["intermediate"]) == (6, 2, 16, 12)
    spec = row["spec"]
    assert spec["topk_order"] == "topk_then_score" and spec["scoring"] == "softmax"
    assert spec["activation"] == "gelu" and spec["gated"] is False and spec["transposed"] is True
    with torch.no_grad():
        assert_close(gm(*inputs)[0], model(x), torch.float32)


def test_near_moe_with_other_combine_is_rejected_with_reason():
    model = TinyMoE(combine="max")
    x = torch.randn(2, 5, 16)
    gm, inputs = capture(model, x)
    before = gm.code
    outcome = _run(gm, inputs)
    (row,) = outcome.regions
    # the cover refuses the max before verification has to find the difference
    assert row["status"] == "fallback" and row["reason"].startswith("max (")
    assert gm.code == before and not outcome.changed


def test_layer_reading_other_activations_is_rejected_with_reason():
    gm, inputs = capture(TinyMoE(), torch.randn(2, 5, 16), torch.rand(2, 5, 1))
    before = gm.code
    (row,) = _run(gm, inputs).regions
    assert row["status"] == "fallback"
    assert row["reason"].startswith("layer reads activations other than its input")
    assert gm.code == before


def test_residual_add_after_the_layer_stays_outside():
    """y = moe(x) + x: the add is not part of the layer; the layer is still taken."""

    class Residual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = TinyMoE()

        def forward(self, x):
            return self.moe(x) + x

    model, x = Residual(), torch.randn(2, 5, 16)
    gm, inputs = capture(model, x)
    (row,) = _run(gm, inputs).regions
    assert row["status"] == "optimized"
    assert _count(gm, "add") == 1
    with torch.no_grad():
        assert_close(gm(*inputs)[0], model(x), torch.float32)


def test_verification_refuses_a_wrong_spec(monkeypatch):
    """If detection guessed a wrong spec, verification must catch it: the region stays as traced."""
    from moecompile.detect import match

    real = match.spec_options

    def wrong(*args, **kwargs):
        return [(s.__class__(**{**s.__dict__, "renormalize": not s.renormalize}), w)
                for s, w in real(*args, **kwargs)]

    monkeypatch.setattr(match, "spec_options", wrong)
    model, (ids,) = models.build("mixtral", layers=1)
    gm, inputs = capture(model, ids)
    outcome = _run(gm, inputs)
    assert [r["status"] for r in outcome.regions] == ["fallback"]
    assert "differs" in outcome.regions[0]["reason"]
    assert not outcome.changed


def test_router_logits_used_outside_stay_computed():
    """output_router_logits=True: the aux loss reads router logits; they survive the rewrite."""
    model, (ids,) = models.build("mixtral", layers=1)
    model.config.output_router_logits = True
    gm, inputs = capture(model, ids)
    outcome = _run(gm, inputs)
    assert outcome.regions[0]["status"] == "optimized"
    assert _count(gm, "linear") >= 1
    with torch.no_grad():
        eager = model(ids)
        hidden = model.model(ids).last_hidden_state
        outs = {tuple(o.shape): o for o in gm(*inputs)}  # this graph ends at the decoder's output
    assert_close(outs[tuple(hidden.shape)], hidden, torch.float32)
    assert_close(outs[tuple(eager.router_logits[0].shape)], eager.router_logits[0], torch.float32)


@pytest.mark.parametrize("dynamic", [False, True])
def test_dynamic_shapes_graph(dynamic):
    model, (ids,) = models.build("qwen2_moe", layers=1)
    gm, inputs = capture(model, ids, dynamic=dynamic)
    outcome = _run(gm, inputs)
    assert [r["status"] for r in outcome.regions] == ["optimized"]


def test_region_names_come_from_module_paths():
    model, (ids,) = models.build("olmoe", layers=2)
    gm, inputs = capture(model, ids)
    names = [c.name for c in detect.find_candidates(gm)]
    assert names == ["model.layers.0.mlp", "model.layers.1.mlp"]


def test_region_a_pass_declines_is_reported_as_fallback(monkeypatch):
    from moecompile.passes import lower

    monkeypatch.setattr(lower, "_cannot_lower", lambda region: "forced_decline")
    model, (ids,) = models.build("mixtral", layers=1)
    gm, inputs = capture(model, ids)
    before = gm.code
    outcome = _run(gm, inputs)
    (row,) = outcome.regions
    assert row["status"] == "fallback" and row["reason"] == "lower: forced_decline"
    assert next(p for p in outcome.passes if p["name"] == "lower")["counters"] == {"skipped:forced_decline": 1}
    assert gm.code == before


def test_float64_model_is_supported():
    model = TinyMoE().double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    gm, inputs = capture(model, x)
    (row,) = _run(gm, inputs).regions
    assert row["status"] == "optimized" and row["spec"]["dtype"] == "float64"
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs)[0], model(x), rtol=1e-10, atol=1e-12)


def test_output_dtype_unlike_input_is_left_as_traced():
    """A bf16 layer whose routing weights stay fp32 returns fp32: the op (x's dtype) must not take it."""

    class Fp32Out(TinyMoE):
        def forward(self, x):
            B, S, H = x.shape
            flat = x.view(-1, H)
            top_logits, ids = torch.topk(self.router(flat), self.K, dim=-1)
            weights = torch.softmax(top_logits.float(), dim=-1)
            rep = flat.repeat_interleave(self.K, dim=0)
            h = torch.nn.functional.gelu(torch.bmm(rep.unsqueeze(1), self.w_up[ids.reshape(-1)]).squeeze(1))
            y = torch.bmm(h.unsqueeze(1), self.w_down[ids.reshape(-1)]).squeeze(1)
            return (y * weights.reshape(-1, 1)).view(-1, self.K, H).sum(dim=1).view(B, S, H)

    model = Fp32Out().to(torch.bfloat16)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    gm, inputs = capture(model, x)
    (row,) = _run(gm, inputs).regions
    assert row["status"] == "fallback" and "float32" in row["reason"]
    with torch.no_grad():
        assert gm(*inputs)[0].dtype == model(x).dtype == torch.float32


def test_autocast_graph_is_left_as_traced():
    class Autocast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = TinyMoE()

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.moe(x)

    model, x = Autocast(), torch.randn(2, 5, 16)
    gm, inputs = capture(model, x)
    before = gm.code
    (row,) = _run(gm, inputs).regions
    assert row["status"] == "fallback" and "autocast" in row["reason"]
    assert gm.code == before


def test_write_into_layer_input_after_the_layer_keeps_results():
    """x is written in place after the layer ran: the op reads x where the router did, before it."""

    class WritesInput(TinyMoE):
        def forward(self, x):
            out = super().forward(x)
            x.view(-1, x.shape[-1]).mul_(2.0)  # the caller sees this write
            return out

    model, x = WritesInput(), torch.randn(2, 5, 16)
    gm, inputs = capture(model, x.clone())
    outcome = _run(gm, inputs)
    assert [r["status"] for r in outcome.regions] == ["optimized"]
    x_eager, x_graph = x.clone(), x.clone()
    with torch.no_grad():
        want = model(x_eager)
        args = [x_graph if a.shape == x.shape and not isinstance(a, torch.nn.Parameter) else a for a in inputs]
        got = gm(*args)[0]
    assert_close(got, want, torch.float32)
    torch.testing.assert_close(x_graph, x_eager)
