"""benchmarks/bench_placement.py --grid on small sizes: rows, the bound under every plan, JSON and plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_grid_smoke(tmp_path):
    out = tmp_path / "grid.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_placement.py"), "--grid", "--quick",
                          "--generators", "topic", "chain", "--seeds", "0", "--affinities", "0.7",
                          "--time-limit", "2", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 4  # 2 quick sizes x 2 generators
    for row in data["rows"]:
        assert row["bound"]["layer_ms"] <= row["ilp"]["layer_ms"] <= row["greedy"]["layer_ms"]
        assert row["bound"]["cross_gpu"] <= row["ilp"]["cross_gpu_fraction"]
        assert row["time_cut"] == 1 - row["ilp"]["layer_ms"] / row["greedy"]["layer_ms"]
    assert (tmp_path / "grid.png").stat().st_size > 0
    lines = run.stdout.splitlines()
    assert "greedy ms" in lines[0] and len([line for line in lines if line.startswith(("DeepSeek", "Qwen"))]) == 4
