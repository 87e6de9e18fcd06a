"""`moecompile place`: round trip trace -> plan -> evaluate, and one-line errors that write nothing."""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from moecompile.errors import UserInputError
from moecompile.placement import evaluate, load_plan, place, save_plan, save_trace
from moecompile.placement.cli import register
from moecompile.placement.synthetic import synthetic_trace


def run_cli(argv):
    """What the top-level CLI does with our subcommand: run it, one line and exit code 2 on bad input."""
    parser = argparse.ArgumentParser(prog="moecompile")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserInputError as err:
        print(f"moecompile: error: {err}", file=sys.stderr)
        return 2


@pytest.fixture
def trace_file(tmp_path):
    path = tmp_path / "trace.npz"
    save_trace(synthetic_trace(4, 16, top_k=2, num_tokens=1500, skew=0.5, affinity=0.9, seed=0), path)
    return path


@pytest.mark.parametrize("ext", ["npz", "json"])
def test_round_trip_trace_plan_evaluate(tmp_path, capsys, ext):
    trace = synthetic_trace(4, 16, top_k=2, num_tokens=1500, skew=0.5, affinity=0.9, seed=0)
    trace_path = tmp_path / f"trace.{ext}"
    save_trace(trace, trace_path)
    out = tmp_path / "plan.json"
    rc = run_cli(["place", str(trace_path), "--gpus", "4", "--nodes", "2", "--redundant", "4",
                  "--solver", "ilp", "--time-limit", "1", "--out", str(out)])
    solved = capsys.readouterr()
    assert rc == 0
    assert "sweep 0" in solved.err  # progress during the solve
    rows = {line.split()[0]: line.split() for line in solved.out.splitlines()[2:4]}
    assert set(rows) == {"greedy", "ilp"}
    plan = load_plan(out)
    predicted = plan.metrics.pop("predicted")  # the layer-time model's (test_placement_cost.py)
    assert plan.metrics == evaluate(plan, trace) and plan.solver["name"] == "ilp"
    assert rows["ilp"][6] == f"{predicted['layer_ms']:.3f}"
    assert rows["ilp"][3] == f"{plan.metrics['cross_gpu_fraction']:.2%}"
    assert run_cli(["place", "--evaluate", str(out), str(trace_path)]) == 0
    evaluated = capsys.readouterr().out.splitlines()
    plan_row = next(line.split() for line in evaluated if line.startswith("plan"))
    assert plan_row[1] == f"{plan.metrics['imbalance_mean']:.4f}"
    assert plan_row[3] == rows["ilp"][3] and plan_row[5] == rows["ilp"][5] and plan_row[6] == rows["ilp"][6]
    greedy_row = next(line.split() for line in evaluated if line.startswith("greedy"))
    assert greedy_row[1:6] == rows["greedy"][1:6]


def _write_bad_trace(tmp_path, kind):
    path = tmp_path / "bad.json"
    load = [[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]
    obj = {"load": load, "flow": None}
    if kind == "negative":
        obj["load"][0][1] = -1.0
    elif kind == "nan":
        path.write_text('{"load": [[1.0, NaN, 3.0, 4.0]]}')
        return path
    elif kind == "flow-shape":
        obj["flow"] = np.ones((2, 4, 4)).tolist()
    elif kind == "ragged":
        obj["load"] = [[1.0, 2.0], [3.0]]
    path.write_text(json.dumps(obj))
    return path


@pytest.mark.parametrize("case, extra, words", [
    ("negative", [], "negative counts"),
    ("nan", [], "NaN"),
    ("flow-shape", [], "flow has shape"),
    ("ragged", [], "equal length"),
    ("good", ["--gpus", "3"], "cannot be split evenly over 3 GPUs"),
    ("good", ["--gpus", "4", "--nodes", "3"], "evenly over 3 nodes"),
    ("good", ["--gpus", "2", "--redundant", "6"], "more replicas than GPUs"),
    ("good", ["--gpus", "2", "--memory-cap", "1"], "memory cap is 1"),
    ("good", ["--gpus", "2", "--time-limit", "-1", "--solver", "ilp"], "time limit"),
    ("good", ["--gpus", "2", "--max-moves", "3"], "needs a previous plan"),
    ("good", ["--gpus", "2", "--plot", "x.bmp"], "must end in"),
    ("good", [], "--gpus is required"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case, extra, words):
    trace_path = _write_bad_trace(tmp_path, case)
    before = set(os.listdir(tmp_path))
    rc = run_cli(["place", str(trace_path), "--out", str(tmp_path / "plan.json")] + extra)
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moecompile: error:") and words in lines[0]
    assert set(os.listdir(tmp_path)) == before


def test_output_folder_must_exist_before_solving(tmp_path, capsys, trace_file):
    rc = run_cli(["place", str(trace_file), "--gpus", "4", "--out", str(tmp_path / "no" / "plan.json")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_evaluate_rejects_plan_for_another_model(tmp_path, capsys, trace_file):
    other = place(synthetic_trace(3, 8, top_k=2, num_tokens=100), 4)
    save_plan(other, tmp_path / "other.json")
    rc = run_cli(["place", "--evaluate", str(tmp_path / "other.json"), str(trace_file)])
    assert rc == 2 and "3 layers x 8 experts" in capsys.readouterr().err


def test_previous_plan_with_move_bound(tmp_path, capsys, trace_file):
    first = tmp_path / "first.json"
    assert run_cli(["place", str(trace_file), "--gpus", "4", "--redundant", "4", "--out", str(first)]) == 0
    capsys.readouterr()
    rc = run_cli(["place", str(trace_file), "--gpus", "4", "--redundant", "4", "--solver", "ilp",
                  "--time-limit", "1", "--previous", str(first), "--max-moves", "0"])
    assert rc == 0 and "moved replicas vs previous plan: 0" in capsys.readouterr().out
    rc = run_cli(["place", str(trace_file), "--gpus", "8", "--previous", str(first), "--solver", "ilp"])
    assert rc == 2 and "previous plan is for" in capsys.readouterr().err


def test_plot_writes_an_image(tmp_path, capsys, trace_file):
    pytest.importorskip("matplotlib")
    png = tmp_path / "plan.png"
    assert run_cli(["place", str(trace_file), "--gpus", "4", "--redundant", "4", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["plan.png", "trace.npz"]


def test_top_level_cli_runs_place(tmp_path, trace_file):
    out = tmp_path / "plan.json"
    ok = subprocess.run([sys.executable, "-m", "moecompile.tools.cli", "place", str(trace_file), "--gpus", "4",
                         "--out", str(out)], capture_output=True, text=True)
    assert ok.returncode == 0 and out.exists() and "greedy" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "moecompile.tools.cli", "place", str(trace_file), "--gpus", "5"],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "moecompile: error: 16 experts + 0 redundant = 16 slots cannot be split evenly over 5 GPUs"]


def test_ilp_output_is_only_the_table(tmp_path, trace_file):
    """HiGHS prints a banner on its first instance; the CLI's stdout must stay the plan table."""
    out = tmp_path / "plan.json"
    run = subprocess.run([sys.executable, "-m", "moecompile.tools.cli", "place", str(trace_file), "--gpus", "4",
                          "--nodes", "2", "--redundant", "4", "--solver", "ilp", "--time-limit", "3", "--out", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("4 layers, 16 experts, 4 GPUs on 2 node(s)"), lines
    assert not any("HiGHS" in line for line in lines), lines
