"""benchmarks/bench_expert_parallel.py on small sizes: the simulation's rows and JSON, and the
gloo measurement on 2 ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, *flags):
    out = tmp_path / "ep.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_expert_parallel.py"), "--quick",
                          *flags, "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(out.read_text())


def test_simulation_smoke(tmp_path):
    data = _run(tmp_path, "--no-measure")
    rows = data["simulated"]["rows"]
    assert [(r["gpus"], r["plan"]) for r in rows] == [(8, "greedy"), (8, "ilp"), (16, "greedy"), (16, "ilp")]
    for r in rows:  # overlap never costs more than it hides
        assert r["overlap_ms"] <= r["serial_ms"] and 0.0 <= r["hidden_fraction"] <= 1.0
        assert abs(r["serial_ms"] - r["compute_ms"] - r["comm_ms"]) < 1e-9
    assert set(data["simulated"]["target"]) == {"min_hidden_where_compute_bound", "met"}
    assert (tmp_path / "ep.png").stat().st_size > 0


def test_gloo_measurement_smoke(tmp_path):
    data = _run(tmp_path, "--no-simulate", "--world", "2")
    rows = data["measured"]["rows"]
    assert [r["chunks"] for r in rows] == ["1", "2", "4", "auto"] and {r["world"] for r in rows} == {2}
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > r["fwd_ms"] * 0.5 for r in rows)
    assert rows[0]["hidden_ms"] == 0.0 and rows[1]["chosen"] == 2
