"""Trace and plan files: round trips, validation with one-line errors, atomic writes."""

import json
import os

import numpy as np
import pytest

from moecompile.errors import UserInputError
from moecompile.placement import Plan, RoutingTrace, load_plan, load_trace, place, save_plan, save_trace
from moecompile.placement.plan import log2phy_of, logcnt_of


def _trace(rng, layers=3, experts=6):
    load = rng.integers(0, 50, size=(layers, experts)).astype(float)
    flow = rng.integers(0, 9, size=(layers - 1, experts, experts)).astype(float)
    return RoutingTrace(load=load, flow=flow)


@pytest.mark.parametrize("ext", ["npz", "json"])
@pytest.mark.parametrize("with_flow", [True, False])
def test_trace_round_trip(tmp_path, ext, with_flow):
    rng = np.random.default_rng(0)
    trace = _trace(rng)
    if not with_flow:
        trace = RoutingTrace(load=trace.load)
    path = tmp_path / f"t.{ext}"
    save_trace(trace, path)
    back = load_trace(path)
    assert np.array_equal(back.load, trace.load) and back.load.dtype == np.float64
    assert (back.flow is None) == (not with_flow)
    if with_flow:
        assert np.array_equal(back.flow, trace.flow)
    assert os.listdir(tmp_path) == [f"t.{ext}"]  # no temporary file left behind


@pytest.mark.parametrize("load, flow, words", [
    ([[1.0, -2.0]], None, "negative"),
    ([[1.0, float("nan")]], None, "NaN"),
    ([[1.0, float("inf")]], None, "infinite"),
    ([1.0, 2.0], None, "2-d"),
    ([[1.0], [1.0, 2.0]], None, "equal length"),
    ([["a", "b"]], None, "numbers"),
    ([[]], None, "at least one"),
    ([[1.0, 2.0], [3.0, 4.0]], np.ones((2, 2, 2)), "expected (1, 2, 2)"),
    ([[1.0, 2.0], [3.0, 4.0]], np.ones((1, 3, 3)), "expected (1, 2, 2)"),
    ([[1.0, 2.0], [3.0, 4.0]], -np.ones((1, 2, 2)), "negative"),
])
def test_trace_rejects_bad_arrays(tmp_path, load, flow, words):
    with pytest.raises(UserInputError, match=None) as err:
        RoutingTrace(load=load, flow=flow)
    assert words in str(err.value) and "\n" not in str(err.value)
    # the same through a JSON file, with the file named in the message
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"load": load, "flow": None if flow is None else np.asarray(flow).tolist()},
                               allow_nan=True))
    with pytest.raises(UserInputError) as err:
        load_trace(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name, content, words", [
    ("t.json", "{not json", "not valid JSON"),
    ("t.json", "[1, 2]", "JSON object"),
    ("t.json", '{"flow": null}', "no 'load'"),
    ("t.npz", "garbage", "not a valid .npz"),
    ("t.txt", "1 2 3", "must end in .npz or .json"),
])
def test_trace_rejects_bad_files(tmp_path, name, content, words):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserInputError, match=words):
        load_trace(path)


def test_trace_missing_file_and_npz_without_load(tmp_path):
    with pytest.raises(UserInputError, match="cannot read trace"):
        load_trace(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", flow=np.ones((1, 2, 2)))
    with pytest.raises(UserInputError, match="no 'load'"):
        load_trace(tmp_path / "other.npz")


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path):
    from moecompile.files import atomic_write

    target = tmp_path / "t.npz"
    target.write_bytes(b"old")

    def half_then_fail(f):
        f.write(b"half of a file")
        raise OSError("disk full")

    with pytest.raises(UserInputError, match="disk full"):  # one line for the CLI, naming the file
        atomic_write(target, half_then_fail)
    assert os.listdir(tmp_path) == ["t.npz"] and target.read_bytes() == b"old"
    with pytest.raises(UserInputError, match="does not exist"):
        save_trace(_trace(np.random.default_rng(1)), tmp_path / "nope" / "t.npz")


def test_plan_round_trip_and_derived_maps(tmp_path):
    rng = np.random.default_rng(2)
    trace = _trace(rng, layers=4, experts=6)
    plan = place(trace, num_gpus=4, num_nodes=2, redundant=2)
    save_plan(plan, tmp_path / "p.json")
    back = load_plan(tmp_path / "p.json")
    assert np.array_equal(back.phy2log, plan.phy2log)
    assert (back.num_gpus, back.num_nodes, back.num_experts, back.slots_per_gpu) == (4, 2, 6, 2)
    assert back.metrics == plan.metrics
    obj = json.loads((tmp_path / "p.json").read_text())
    for layer in range(4):
        row = obj["phy2log"][layer]
        assert len(row) == 8
        for e in range(6):
            slots = [s for s in obj["log2phy"][layer][e] if s >= 0]
            assert sorted(slots) == [s for s, x in enumerate(row) if x == e]
            assert obj["logcnt"][layer][e] == len(slots)


@pytest.mark.parametrize("ext", ["npz", "json"])
def test_layer_names_go_from_trace_to_plan(tmp_path, ext):
    rng = np.random.default_rng(3)
    names = ("model.layers.0.mlp", "model.layers.1.mlp", "model.layers.2.mlp")
    trace = RoutingTrace(load=_trace(rng).load, layers=names)
    save_trace(trace, tmp_path / f"t.{ext}")
    back = load_trace(tmp_path / f"t.{ext}")
    assert back.layers == names
    plan = place(back, num_gpus=2)
    save_plan(plan, tmp_path / "p.json")
    assert load_plan(tmp_path / "p.json").layers == names
    assert load_plan(tmp_path / "p.json").solver == plan.solver
    save_trace(RoutingTrace(load=trace.load), tmp_path / f"u.{ext}")
    assert load_trace(tmp_path / f"u.{ext}").layers is None  # unnamed traces stay so


@pytest.mark.parametrize("layers, words", [
    (["a", "b"], "each of its 3 layers once, got 2 names"),
    (["a", "a", "b"], "(2 distinct)"),
    (["a", "", "b"], "list of layer names"),
    ("abc", "list of layer names"),
    ([1, 2, 3], "list of layer names"),
])
def test_bad_layer_names_are_one_line_errors(tmp_path, layers, words):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"load": [[1, 2], [3, 4], [5, 6]], "layers": layers}))
    with pytest.raises(UserInputError) as err:
        load_trace(path)
    assert words in str(err.value) and "\n" not in str(err.value)
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps(_plan_json(phy2log=[[0, 1, 2, 0]] * 3, layers=layers)))
    with pytest.raises(UserInputError) as err:
        load_plan(plan)
    assert words in str(err.value)


def test_log2phy_pads_with_minus_one():
    phy2log = np.array([[0, 1, 1, 2], [2, 2, 0, 1]])
    assert logcnt_of(phy2log, 3).tolist() == [[1, 2, 1], [1, 1, 2]]
    assert log2phy_of(phy2log, 3).tolist() == [[[0, -1], [1, 2], [3, -1]], [[2, -1], [3, -1], [0, 1]]]


def _plan_json(**over):
    obj = {"num_gpus": 2, "num_nodes": 1, "num_experts": 3, "slots_per_gpu": 2, "phy2log": [[0, 1, 2, 0]]}
    obj.update(over)
    return obj


@pytest.mark.parametrize("over, words", [
    ({"phy2log": [[0, 1, 2]]}, "expected (L, 4)"),
    ({"phy2log": [[0, 1, 3, 0]]}, "outside [0, 3)"),
    ({"phy2log": [[0, 1, 1, 0]]}, "expert 2 without a slot in layer 0"),
    ({"phy2log": [[0, 1.5, 2, 0]]}, "whole-number"),
    ({"num_gpus": 3, "num_nodes": 2}, "evenly over 2 nodes"),
    ({"num_gpus": "2"}, "whole number"),
    ({"logcnt": [[1, 1, 1]]}, "logcnt does not match"),
    ({"num_layers": 2}, "num_layers 2"),
])
def test_plan_rejects_inconsistent_json(tmp_path, over, words):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_plan_json(**over)))
    with pytest.raises(UserInputError, match=None) as err:
        load_plan(path)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_plan_missing_fields(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"num_gpus": 2}))
    with pytest.raises(UserInputError, match="lacks field"):
        load_plan(path)


def test_plan_is_read_only():
    plan = Plan(num_gpus=1, num_nodes=1, num_experts=2, slots_per_gpu=2, phy2log=[[0, 1]])
    with pytest.raises(ValueError):
        plan.phy2log[0, 0] = 1


def test_import_loads_no_solver_or_plotting_library():
    import subprocess
    import sys

    code = ("import sys, moecompile.placement; "
            "print(sorted(m for m in ('pulp', 'highspy', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
