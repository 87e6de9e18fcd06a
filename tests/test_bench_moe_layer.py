"""benchmarks/bench_moe_layer.py: the floor arithmetic, the targets, and a smoke run of main() on CPU."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_moe_layer.py"
_spec = importlib.util.spec_from_file_location("bench_moe_layer", _PATH)
bml = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bml  # dataclasses look their module up there
_spec.loader.exec_module(bml)


def _has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def test_floor_targets_follow_the_issue():
    assert [bml.floor_target(T) for T in (1, 5, 16, 128, 512, 1024, 16384)] == [2.0, None, 1.15, 1.15, None, 1.35, 1.35]


def test_roofline_of_deepseek_v3_at_one_token():
    # T=1, 8 experts hit, plus the shared expert (I=2048); bf16 weights and activations
    ds = next(L for L in bml.GPU_LAYERS if L.name == "deepseek-v3")
    r = bml.roofline(ds, T=1, hit=8, w_itemsize=2, x_itemsize=2, peak=1e15, bandwidth=4e12)
    assert r["flops"] == 2 * 8 * 3 * 7168 * 2048 + 2 * 3 * 7168 * 2048
    assert r["bytes"] == (8 + 1) * 3 * 7168 * 2048 * 2 + 2 * 7168 * 2
    assert r["bound"] == "memory"
    assert r["floor_ms"] == pytest.approx(r["bytes"] / 4e12 * 1e3)


def test_a_kernel_choice_moecompile_rejects_is_skipped_with_a_note():
    ok, notes = bml.usable_kernels(["torch", "no-such-kernels"])
    assert ok == ["torch"]
    assert notes["moe:no-such-kernels"].startswith("skipped")


def test_summary_geomean_worst_and_targets():
    def point(T, ind, moe, floor):
        return bml._ratios({"layer": "l", "T": T, "ms": {"inductor": ind, "moe:torch": moe}, "floor_ms": floor})

    points = [point(1, 2.0, 1.0, 0.6), point(16, 1.0, 1.25, 1.0)]  # speedups 2.0 and 0.8
    s = bml.summarize(points)
    assert s["geomean_speedup"] == pytest.approx((2.0 * 0.8) ** 0.5)
    assert s["worst"] == {"layer": "l", "T": 16, "speedup": pytest.approx(0.8)}
    assert s["below_speedup_min"] == [("l", 16)] and s["meets_speedup_min"] is False
    assert (s["floor_met"], s["floor_rated"]) == (1, 2)  # T=1: 1.67x <= 2; T=16: 1.25x > 1.15


def _run(tmp_path, *argv) -> dict:
    out, png = tmp_path / "layer.json", tmp_path / "layer.png"
    assert bml.main(["--device", "cpu", "--shapes", "tiny", "--iters", "1", "--warmup", "0",
                     "--out", str(out), "--plot", str(png), *argv]) == 0
    if _has_matplotlib():
        assert png.stat().st_size > 0
    return json.loads(out.read_text())


def test_smoke_one_tiny_layer_on_cpu(tmp_path):
    data = _run(tmp_path, "--layers", "olmoe-tiny", "--tokens", "1", "5", "--kernels", "torch")
    for key in ("device", "date", "torch", "triton", "transformers", "dtype", "peak_tflops", "bandwidth_gbs",
                "columns", "layers", "summary"):
        assert key in data, key
    assert data["peak_tflops"] > 0 and data["bandwidth_gbs"] > 0
    assert data["columns"] == ["eager", "inductor", "moe:torch"]
    (layer,) = data["layers"]
    assert layer["layer"]["name"] == "olmoe-tiny"
    assert layer["compiles"]["eager"] == 0
    assert 1 <= layer["compiles"]["moe:torch"] <= 2  # T=1 specialized, T=5 dynamic; never one per T
    assert layer["kernels_ran"]["moe:torch"] == ["torch"]
    assert [p["T"] for p in layer["points"]] == [1, 5]
    for p in layer["points"]:
        assert p["errors"] == {}
        assert set(p["ms"]) == set(data["columns"]) and all(ms > 0 for ms in p["ms"].values())
        assert 1 <= p["experts_hit"] <= layer["layer"]["E"] and p["floor_ms"] > 0
        assert p["best"] == "moe:torch" and p["speedup"] > 0
        assert p["over_floor"]["moe:torch"] == pytest.approx(p["ms"]["moe:torch"] / p["floor_ms"])
    assert data["summary"]["rated_points"] == 2 and data["summary"]["geomean_speedup"] > 0


@pytest.mark.slow(reason="the benchmark over four families and both kernel choices; the default run times one tiny layer")
def test_every_tiny_family_and_both_kernel_choices(tmp_path):
    data = _run(tmp_path, "--tokens", "1", "7", "--kernels", "torch", "triton")
    assert [L["layer"]["family"] for L in data["layers"]] == ["mixtral", "qwen3", "olmoe", "deepseek_v3"]
    for layer in data["layers"]:
        for p in layer["points"]:
            assert p["ms"]["moe:torch"] > 0
            # Triton runs here only in the interpreter; either it ran or the column says why not
            assert "moe:triton" in p["ms"] or p["errors"]["moe:triton"]


def test_backward_times_a_step_with_its_memory(tmp_path):
    """--backward: forward + input and weight gradients per column, each with its peak memory over
    one step and what its forward keeps for the backward; no floor targets."""
    data = _run(tmp_path, "--layers", "qwen3-tiny", "--tokens", "5", "--kernels", "torch", "--backward")
    assert data["mode"] == "forward+backward" and data["targets"]["speedup_geomean"] == 1.5
    (layer,) = data["layers"]
    (p,) = layer["points"]
    assert p["errors"] == {} and set(p["ms"]) == set(data["columns"])
    assert p["floor_target"] is None and p["meets_floor"] is None
    for column in data["columns"]:
        assert p["peak_mb"][column] > 0 and p["max_abs_err"][column] < 1e-4, column  # the forward's output
        assert p["max_grad_err"][column] < 1e-4, column  # input and weight gradients against eager's
    # eager and inductor keep activations; the torch path's layer op keeps only its inputs
    # (backward "recompute"), which saved_bytes leaves out: nothing more
    assert p["saved_mb"]["eager"] > 0 and p["saved_mb"]["inductor"] > 0 and p["saved_mb"]["moe:torch"] == 0
    assert p["meets_memory"] == (p["peak_mb"]["moe:torch"] <= p["peak_mb"]["inductor"])
    assert data["summary"]["meets_memory"] == p["meets_memory"]


def test_peak_memory_counts_what_a_call_allocates():
    import torch

    from moecompile.tools import bench

    def alloc(n):
        a = torch.ones(n)  # 4n bytes
        b = a * 2  # another 4n
        return (a + b).sum()

    cpu = torch.device("cpu")
    small, big = bench.peak_memory(alloc, (1000,), cpu), bench.peak_memory(alloc, (100000,), cpu)
    assert big >= 8 * 100000 and big > 50 * small
