"""Never silent, and under the user's control: every layer holding expert weights is in the report
(optimized or with the reason), also when Dynamo splits it; layers and passes can be switched off."""

from __future__ import annotations

import pytest
import torch

import moecompile
from conftest import assert_close
from helpers_moe import NearMoE
from moecompile import config, models
from moecompile.errors import UserInputError


def _explain(model, *args, **options):
    return moecompile.explain(model, *args, options={"inner": "eager", **options}, quiet=True)


class _BrokenMoE(NearMoE):
    """The router's decision crosses a graph break before the experts run (a print, a .item())."""

    def forward(self, x):
        B, S, H = x.shape
        flat = x.reshape(-1, H)
        w, ids = torch.topk(torch.softmax(self.router(flat), dim=-1), self.K, dim=-1)
        torch._dynamo.graph_break()
        rows = flat.repeat_interleave(self.K, dim=0)
        gate, up = torch.bmm(rows.unsqueeze(1), self.gate_up[ids.reshape(-1)].transpose(1, 2)).squeeze(1).chunk(2, -1)
        y = torch.bmm((torch.nn.functional.silu(gate) * up).unsqueeze(1),
                      self.down[ids.reshape(-1)].transpose(1, 2)).squeeze(1)
        return (y.view(-1, self.K, H) * w.unsqueeze(-1)).sum(1).view(B, S, H)


def test_layer_split_by_a_graph_break_is_reported_with_the_reason():
    model = _BrokenMoE()
    x = torch.randn(2, 8, 16)
    report = _explain(model, x)
    assert len(report.graphs) == 2
    rows = report.regions
    assert rows and all(r["status"] == "fallback" for r in rows), rows
    router_row = next(r for r in rows if r["graph"] == 0)  # router and top-k, experts gone
    experts_row = next(r for r in rows if r["graph"] == 1)  # experts, no router
    assert router_row["top_k"] == 2 and "graph break" in router_row["reason"], router_row
    assert experts_row["num_experts"] == 8 and "graph break" in experts_row["reason"], experts_row
    compiled = torch.compile(model, backend="moe", options={"inner": "eager"})
    assert_close(compiled(x), model(x), torch.float32)


def test_skip_layers_leaves_the_named_layers_as_traced():
    model, (ids,) = models.build("mixtral", layers=2)
    report = _explain(model, ids, skip_layers=["model.layers.1.*"])
    status = {r["name"]: (r["status"], r["reason"]) for r in report.regions}
    assert status["model.layers.0.mlp"] == ("optimized", None)
    assert status["model.layers.1.mlp"] == ("fallback", "skipped by option skip_layers")


def test_disable_passes_per_layer_and_everywhere():
    model, (ids,) = models.build("mixtral", layers=2)
    report = _explain(model, ids, disable_passes={"model.layers.0.mlp": ["lower"]})
    status = {r["name"]: r["status"] for r in report.regions}
    assert status == {"model.layers.0.mlp": "fallback", "model.layers.1.mlp": "optimized"}
    assert "switched off" in next(r["reason"] for r in report.regions if r["status"] == "fallback")
    report = _explain(model, ids, disable_passes=["verify"])
    assert all(r["status"] == "optimized" and r["verify_ms"] == 0 for r in report.regions)
    verify_row = next(p for p in report.passes if p["name"] == "verify")
    assert verify_row["counters"]["probes"] == 0


def test_layer_passes_switched_off_per_layer_and_their_options(tmp_path):
    model, (ids,) = models.build("mixtral", layers=2)
    report = _explain(model, ids, disable_passes={"model.layers.0.mlp": ["fuse_epilogues"]},
                      pass_options={"fuse_epilogues": {"topk_weight": "combine"}}, dump_dir=str(tmp_path))
    passes = {r["name"]: r["passes"] for r in report.regions}
    assert passes == {"model.layers.0.mlp": ["fuse_gate", "lower"],
                      "model.layers.1.mlp": ["fuse_gate", "fuse_epilogues", "lower"]}
    assert all(r["status"] == "optimized" for r in report.regions)
    layers = tmp_path / "graph_000" / "layers"
    unfused = (layers / "model.layers.0.mlp" / "01_fuse_gate.moe").read_text()
    assert not (layers / "model.layers.0.mlp" / "02_fuse_epilogues.moe").exists() and "Gather(" in unfused
    fused = (layers / "model.layers.1.mlp" / "02_fuse_epilogues.moe").read_text()
    assert "epilogue=topk_weight" not in fused and "weighted=true" in fused  # the option: weights in the combine
    counters = next(p for p in report.passes if p["name"] == "fuse_epilogues")["counters"]
    assert counters == {"gather_fused": 1, "activation_fused": 1}  # layer 1 only
    compiled = torch.compile(model, backend="moe", options={
        "inner": "eager", "disable_passes": {"model.layers.0.mlp": ["fuse_epilogues"]}})
    with torch.no_grad():
        assert_close(compiled(ids).logits, model(ids).logits, torch.float32)


def test_a_layer_pass_that_breaks_its_program_is_skipped_for_that_layer(monkeypatch):
    import dataclasses
    from moecompile.passes.layer import FuseEpilogues

    def breaks(self, program):  # drops the combine: the program no longer gives y
        return dataclasses.replace(program, stages=program.stages[:-1]), moecompile.ir.PassResult(self.name, True)
    monkeypatch.setattr(FuseEpilogues, "__call__", breaks)
    model, (ids,) = models.build("mixtral", layers=1)
    with pytest.warns(UserWarning, match="layer pass fuse_epilogues on model.layers.0.mlp: the last stage must give y"):
        report = _explain(model, ids)
    row = report.regions[0]
    assert row["status"] == "optimized" and row["passes"] == ["fuse_gate", "lower"]
    counters = next(p for p in report.passes if p["name"] == "fuse_epilogues")["counters"]
    assert counters == {"skipped:program_error": 1}
    compiled = torch.compile(model, backend="moe", options={"inner": "eager"})
    with torch.no_grad():
        assert_close(compiled(ids).logits, model(ids).logits, torch.float32)


def test_layer_programs_go_to_the_structured_trace(monkeypatch):
    seen = []

    def record(kind, metadata_fn=None, payload_fn=None, **_):
        if kind == "artifact" and metadata_fn()["name"].startswith("moecompile_"):
            seen.append((metadata_fn()["name"], payload_fn()))

    monkeypatch.setattr(torch._logging, "trace_structured", record)
    model, (ids,) = models.build("olmoe", layers=1)
    _explain(model, ids)
    names = [n for n, _ in seen]
    assert names == ["moecompile_model.layers.0.mlp_00_build.moe", "moecompile_model.layers.0.mlp_01_fuse_gate.moe",
                     "moecompile_model.layers.0.mlp_02_fuse_epilogues.moe", "moecompile_model.layers.0.mlp_kernels.json"]
    assert seen[2][1].startswith("moe E=") and '"kernels": "torch"' in seen[3][1]


@pytest.mark.parametrize("options", [{"disable_passes": ["fuse_everything"]}, {"skip_layers": [3]},
                                     {"disable_passes": {"model.*": "nope"}},
                                     {"pass_options": {"fuse_gates": {}}},
                                     {"pass_options": {"fuse_epilogues": {"topk": "down"}}},
                                     {"pass_options": {"fuse_epilogues": {"topk_weight": "gemm"}}},
                                     {"pass_options": {"fuse_epilogues": {"gather": "no"}}},
                                     {"kernels": "cuda"}])
def test_bad_options_are_one_line_errors(options):
    with pytest.raises(UserInputError) as err:
        config.make(options)
    assert "\n" not in str(err.value)


def test_report_json_has_idiom_family_and_full_spec(tmp_path):
    model, (ids,) = models.build("deepseek_v3", layers=1)
    import json

    _explain(model, ids, dump_dir=str(tmp_path))
    (row,) = json.loads((tmp_path / "report.json").read_text())["regions"]
    assert row["family"] == "deepseek_v3" and row["idiom"] == "group-limited + grouped-gemm"
    assert row["spec_full"]["groups"] == 4 and row["spec_full"]["masked_score"] == "-inf"
