"""The backend as users meet it: entry point, fallback on errors, dense models, dumps, explain,
routing traces, options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import moecompile
from conftest import assert_close
from moecompile import config, models, routing
from moecompile.tools import trace as trace_tool
from moecompile.errors import UserInputError
from moecompile.passes import lower


def test_entry_point_works_in_a_fresh_process_without_import():
    code = (
        "import sys, torch\n"
        "from transformers import MixtralConfig, MixtralForCausalLM\n"
        "cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,\n"
        "    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)\n"
        "m = MixtralForCausalLM(cfg).eval()\n"
        "ids = torch.randint(0, 64, (2, 5))\n"
        "assert 'moecompile' not in sys.modules\n"
        "out = torch.compile(m, backend='moe', options={'inner': 'aot_eager'})(ids).logits\n"
        "torch.testing.assert_close(out, m(ids).logits, rtol=1e-4, atol=1e-5)\n"
        "import moecompile\n"
        "print([r['status'] for r in moecompile.last_report().regions])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "['optimized']"


def test_internal_error_falls_back_to_plain_compile(monkeypatch):
    def broken(self, gm, regions):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(lower.Lower, "__call__", broken)
    model, (ids,) = models.build("olmoe", layers=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = torch.compile(model, backend="moe", options={"inner": "aot_eager"})(ids).logits
    assert_close(out, model(ids).logits, torch.float32)
    assert any("injected failure" in str(w.message) for w in caught)
    report = moecompile.last_report()
    assert [g["status"] for g in report.graphs] == ["error"]
    assert "injected failure" in report.graphs[0]["reason"]


def test_a_dynamo_restart_is_not_reported_as_an_error(monkeypatch):
    """Inductor may ask dynamo to trace again (TensorifyScalarRestartAnalysis under dynamic=True):
    control flow that must reach dynamo, not a failure that compiles the captured graph instead."""
    from moecompile import backend
    inner = backend._inner_compile
    calls = []

    def restarting(gm, example_inputs, name):
        calls.append(name)
        if len(calls) == 1:
            raise torch._dynamo.exc.TensorifyScalarRestartAnalysis
        return inner(gm, example_inputs, name)

    monkeypatch.setattr(backend, "_inner_compile", restarting)
    model, (ids,) = models.build("olmoe", layers=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = torch.compile(model, backend="moe", options={"inner": "aot_eager"})(ids).logits
    assert_close(out, model(ids).logits, torch.float32)
    assert not [w for w in caught if "moecompile" in str(w.message)], [str(w.message) for w in caught]
    report = moecompile.last_report()
    assert len(calls) == 2 and [g["status"] for g in report.graphs] == ["rewritten"]
    assert [r["status"] for r in report.regions] == ["optimized"]


def test_dense_model_compiles_as_with_inductor():
    model, (ids,) = models.build("dense", layers=1)
    with torch.no_grad():
        moe_out = torch.compile(model, backend="moe")(ids).logits
        torch._dynamo.reset()
        inductor_out = torch.compile(model)(ids).logits
    report = moecompile.last_report()
    assert report.regions == []
    assert [g["status"] for g in report.graphs] == ["unchanged"]
    assert report.graphs[0]["nodes_after"] == report.graphs[0]["nodes_before"]
    torch.testing.assert_close(moe_out, inductor_out, rtol=0, atol=0)


def test_dump_dir_writes_report_and_pass_dumps(tmp_path):
    model, (ids,) = models.build("qwen2_moe", layers=2)
    with torch.no_grad():
        torch.compile(model, backend="moe", options={"inner": "aot_eager", "dump_dir": str(tmp_path)})(ids)
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["regions"]) == 2
    for row in report["regions"]:
        assert set(row) >= {"graph", "name", "num_experts", "top_k", "hidden", "intermediate", "status",
                            "reason", "kernels", "passes"}
        assert row["status"] == "optimized" and row["passes"] == ["fuse_gate", "fuse_epilogues", "lower"]
        assert row["kernels"] == "torch" and len(row["program_key"]) == 16
    assert {p["name"] for p in report["passes"]} == {"detect", "verify", "fuse_gate", "fuse_epilogues", "lower"}
    fused = next(p for p in report["passes"] if p["name"] == "fuse_epilogues")
    assert fused["counters"] == {"gather_fused": 2, "activation_fused": 2, "topk_weight_fused": 2}
    assert all(row["verify_ms"] > 0 for row in report["regions"])
    assert all(isinstance(p["ms"], float) and isinstance(p["changed"], bool) for p in report["passes"])
    graph_dir = tmp_path / "graph_000"
    before = (graph_dir / "01_lower.before.py").read_text()
    after = (graph_dir / "01_lower.after.py").read_text()
    assert "torch.topk" in before and "torch.topk" not in after
    assert after.count("torch.ops.moecompile.moe.default") == 2
    assert (graph_dir / "kernels_torch.py").exists()
    layer = graph_dir / "layers" / report["regions"][0]["name"]
    programs = sorted(p.name for p in layer.glob("*.moe"))
    assert programs == ["00_build.moe", "01_fuse_gate.moe", "02_fuse_epilogues.moe"]
    assert "RouterGemm(" in (layer / "00_build.moe").read_text()
    assert "Gate(" in (layer / "01_fuse_gate.moe").read_text()
    final = (layer / "02_fuse_epilogues.moe").read_text()
    assert "prologue=gather" in final and "epilogue=topk_weight" in final and "SharedMLP(" in final
    assert json.loads((layer / "kernels.json").read_text())["program_key"] == report["regions"][0]["program_key"]


def test_env_dump_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECOMPILE_DUMP_DIR", str(tmp_path))
    model, (ids,) = models.build("mixtral", layers=1)
    with torch.no_grad():
        torch.compile(model, backend="moe", options={"inner": "eager"})(ids)
    assert json.loads((tmp_path / "report.json").read_text())["regions"][0]["num_experts"] == 8


def test_explain_returns_report_and_prints_table(capsys):
    model, (ids,) = models.build("qwen3_moe", layers=2)
    report = moecompile.explain(model, ids, options={"inner": "eager"})
    printed = capsys.readouterr().out
    assert [r["name"] for r in report.regions] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert "model.layers.1.mlp" in printed and "2 MoE layer(s) found, 2 optimized" in printed


def test_unknown_option_is_a_clear_error():
    with pytest.raises(UserInputError, match="unknown moecompile option"):
        config.make({"kernel": "torch"})
    with pytest.raises(UserInputError, match="kernels='cuda'"):
        config.make({"kernels": "cuda"})


def test_verify_rtol_option_merges_with_defaults_and_is_checked():
    cfg = config.make({"verify_rtol": {"bfloat16": {"out": (0.1, 0.01)}}})
    assert cfg.verify_rtol["bfloat16"] == {"out": (0.1, 0.01), "grad": (6e-2, 6e-3)}
    assert cfg.verify_rtol["float32"]["out"] == (1e-4, 1e-5)
    for bad in ({"bfloat16": 0.1}, {"int8": {"out": (1, 1)}}, {"float32": {"out": (0.0, 1e-5)}},
                {"float32": {"fwd": (1, 1)}}, 0.1):
        with pytest.raises(UserInputError, match="verify_rtol"):
            config.make({"verify_rtol": bad})


def test_env_overrides_and_patch(monkeypatch):
    monkeypatch.setenv("MOECOMPILE_KERNELS", "reference")
    monkeypatch.setenv("MOECOMPILE_VERIFY", "0")
    assert config.make().kernels == "reference" and config.make().verify is False
    assert config.make({"kernels": "torch"}).kernels == "torch"  # explicit beats environment
    with config.patch(inner="eager"):
        assert config.make().inner == "eager"
    assert config.make().inner == "inductor"


def test_reference_kernels_option_runs_the_reference():
    model, (ids,) = models.build("mixtral", layers=1)
    with torch.no_grad():
        out = torch.compile(model, backend="moe", options={"inner": "eager", "kernels": "reference"})(ids)
    assert_close(out.logits, model(ids).logits, torch.float32)
    assert moecompile.last_report().regions[0]["kernels"] == "reference"


def test_routing_recorder_counts_load_and_flow():
    model, (ids,) = models.build("mixtral", layers=3, batch=2, tokens=8)
    trace = trace_tool.record_routing(model, [(ids,), (ids,)])
    assert trace.load.shape == (3, 8) and trace.flow.shape == (2, 8, 8)
    np.testing.assert_array_equal(trace.load.sum(1), [2 * 16 * 2] * 3)  # batches x tokens x K
    np.testing.assert_array_equal(trace.flow.sum((1, 2)), [2 * 16 * 2 * 2] * 2)  # x K' too
    # flow rows sum to the load of the layer before, scaled by K of the layer after
    np.testing.assert_allclose(trace.flow[0].sum(1), trace.load[0] * 2)
    np.testing.assert_allclose(trace.flow[1].sum(0), trace.load[2] * 2)


def test_routing_trace_option_writes_file(tmp_path):
    path = tmp_path / "run.npz"
    model, (ids,) = models.build("olmoe", layers=2)
    with torch.no_grad():
        torch.compile(model, backend="moe", options={"inner": "eager", "routing_trace": str(path)})(ids)
    routing.flush()
    from moecompile.placement import load_trace

    trace = load_trace(str(path))
    assert trace.load.shape == (2, 16) and trace.load[0].sum() == ids.numel() * 4
    routing._file_recorders.pop(str(path)).__exit__()


def test_cli_explain_and_errors(tmp_path):
    env = {**os.environ, "MOECOMPILE_INNER": "eager"}
    out = tmp_path / "r.json"
    ok = subprocess.run([sys.executable, "-m", "moecompile.tools.cli", "explain", "--model", "qwen2_moe",
                         "--json", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "2 MoE layer(s) found, 2 optimized" in ok.stdout
    assert len(json.loads(out.read_text())["regions"]) == 2
    bad = subprocess.run([sys.executable, "-m", "moecompile.tools.cli", "explain", "--model", "nope"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert bad.stderr.startswith("moecompile: error: unknown model 'nope'")


def test_cli_trace_writes_a_trace(tmp_path):
    out = tmp_path / "t.json"
    ok = subprocess.run([sys.executable, "-m", "moecompile.tools.cli", "trace", "--model", "mixtral", "--tokens", "8",
                         "--batch", "2", "--batches", "1", "--layers", "2", "--out", str(out)],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    data = json.loads(out.read_text())
    assert np.array(data["load"]).shape == (2, 8) and np.array(data["flow"]).shape == (1, 8, 8)
    assert (data["hidden"], data["dtype"]) == (64, "float32")  # what the layer-time model reads
    bad = subprocess.run([sys.executable, "-m", "moecompile.tools.cli", "trace", "--tokens", "missing.npy",
                          "--out", str(tmp_path / "x.npz")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "cannot read token ids" in bad.stderr
    assert not (tmp_path / "x.npz").exists()


def test_routing_is_recorded_with_reference_kernels_too():
    model, (ids,) = models.build("mixtral", layers=2, batch=1, tokens=4)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moe", options={"inner": "eager", "kernels": "reference"})
    with routing.RoutingRecorder() as rec, torch.no_grad():
        compiled(ids)
    assert rec.trace().load.sum() == 2 * 4 * 2  # layers x tokens x K
    assert (rec.trace().hidden, rec.trace().dtype) == (64, "float32")
    assert rec.trace().layers == ("model.layers.0.mlp", "model.layers.1.mlp")  # the report's names


def test_the_ops_schemas_join_inductors_cache_key(monkeypatch):
    """A graph Inductor cached while moecompile's ops had other signatures must not be reused: the
    backend compiles with a no-op post-grad pass whose uuid is the ops' schemas (part of the FX
    graph and AOTAutograd cache keys; checked by hand: another uuid misses the cache)."""
    from moecompile import backend
    from torch._inductor import compile_fx as compile_fx_module
    from torch._inductor import config as inductor_config
    seen = []
    monkeypatch.setattr(compile_fx_module, "compile_fx",
                        lambda gm, inputs: seen.append(inductor_config.post_grad_custom_pre_pass) or gm.forward)
    backend._inner_compile(torch.fx.symbolic_trace(torch.nn.Linear(2, 2)), [], "inductor")
    assert seen[0] is backend._ops_in_cache_key() and inductor_config.post_grad_custom_pre_pass is None
    assert seen[0].uuid() == backend._ops_identity()
    assert "moecompile::moe_backward(" in "".join(str(getattr(torch.ops.moecompile, n).default._schema)
                                                  for n in torch.ops.moecompile)
    mine = object()  # a user's own pass stays, unchanged (config.patch: monkeypatch would break the config module)
    with inductor_config.patch(post_grad_custom_pre_pass=mine):
        backend._inner_compile(torch.fx.symbolic_trace(torch.nn.Linear(2, 2)), [], "inductor")
    assert seen[1] is mine and inductor_config.post_grad_custom_pre_pass is None
