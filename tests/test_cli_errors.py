"""The CLI never traces back: every bad input is one line `moecompile: error: ...`, exit code 2, and
no output file (or temporary file) left behind. Cases found by fuzzing `place`, `trace`, `explain`
and `bench`."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from moecompile.tools import cli
from moecompile.placement import place, save_plan, save_trace
from moecompile.placement.synthetic import synthetic_trace

FACTORIES = "cli_factories"  # a module of model factories written into tmp_path


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A folder with a good trace, a good plan, a plain file and a module of model factories."""
    trace = synthetic_trace(3, 8, top_k=2, num_tokens=200, skew=0.5, affinity=0.5, seed=0)
    save_trace(trace, tmp_path / "good.npz")
    save_plan(place(trace, num_gpus=4, redundant=4), tmp_path / "plan.json")
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / f"{FACTORIES}.py").write_text(
        "import torch\n"
        "def returns_str():\n    return 'x'\n"
        "def raises():\n    raise RuntimeError('factory boom')\n"
        "class Boom(torch.nn.Module):\n"
        "    def forward(self, ids):\n        raise ValueError('forward boom')\n"
        "def boom():\n    return Boom()\n"
        "class BadVocab(torch.nn.Module):\n"
        "    class config:\n        vocab_size = 0\n"
        "def bad_vocab():\n    return BadVocab()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop(FACTORIES, None)
    return tmp_path


def _run(argv, capsys, work, outputs=()):
    before = set(os.listdir(work))
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("moecompile: error: "), err
    assert "Traceback" not in err
    for out in outputs:
        assert not os.path.exists(out), f"{out} was left behind"
    assert set(os.listdir(work)) <= before, f"left behind: {set(os.listdir(work)) - before}"
    return lines[0]


def _npz_with_huge_header(path):
    """A .npz whose 'load' array claims 10^10 float64 values (74 GiB) but holds a few bytes."""
    import zipfile

    header = "{'descr': '<f8', 'fortran_order': False, 'shape': (10000000000,), }"
    header += " " * (63 - len(header) % 64) + "\n"
    blob = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + b"\0" * 64
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("load.npy", blob)


# --- output paths, for every subcommand that writes one -----------------------------------------

BAD_OUTPUTS = {
    "under a file": "afile/out.json",
    "a folder": ".",
    "a trailing slash": "newdir/",
    "a dot": "p.json/.",
    "a name too long": "a" * 300 + ".json",
    "an unwritable folder": "/proc/out.json",
    "a missing folder": "missing/out.json",
}


@pytest.mark.parametrize("case", list(BAD_OUTPUTS))
def test_place_bad_output_path(case, work, capsys):
    out = BAD_OUTPUTS[case]
    line = _run(["place", "good.npz", "--gpus", "4", "--out", out], capsys, work)
    assert "cannot write" in line


def test_place_bad_plot_path_leaves_no_plan(work, capsys):
    pytest.importorskip("matplotlib")
    _run(["place", "good.npz", "--gpus", "4", "--out", "p.json", "--plot", "/proc/x.png"], capsys, work,
         outputs=["p.json"])


@pytest.mark.parametrize("case", ["a folder", "a name too long", "an unwritable folder", "under a file"])
def test_trace_bad_output_path(case, work, capsys):
    out = BAD_OUTPUTS[case].replace(".json", ".npz")
    if not out.endswith((".npz", ".json")):
        out = out.rstrip("/") + "/t.npz" if case == "a folder" else out
    os.makedirs("d.npz", exist_ok=True)
    out = "d.npz" if case == "a folder" else out
    _run(["trace", "--model", "mixtral", "--tokens", "4", "--batch", "1", "--batches", "1", "--layers", "1",
          "--out", out], capsys, work)


def test_explain_and_bench_bad_json_path(work, capsys):
    _run(["explain", "--model", "mixtral", "--json", "afile/r.json"], capsys, work)
    _run(["bench", "--model", "mixtral", "--json", "/proc/b.json"], capsys, work)


# --- trace files and plans ----------------------------------------------------------------------


def _write(work, name, content):
    path = work / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize("name, make, words", [
    ("huge.json", lambda p: p.write_text(json.dumps({"load": [[1e308, 1e308], [1.0, 2.0]]})), "at most 1e+15"),
    ("huge_flow.npz", lambda p: np.savez(p, load=np.ones((2, 4)), flow=np.full((1, 4, 4), 1e300)), "at most"),
    ("header.npz", _npz_with_huge_header, "too large"),
    ("array.npz", lambda p: open(p, "wb").write(_npy_bytes(np.ones((2, 4)))), "single .npy array"),
    ("deep.json", lambda p: p.write_text("[" * 100_000 + "]" * 100_000), "nests too deeply"),
    ("digits.json", lambda p: p.write_text('{"load": [[' + "9" * 5000 + "]]}"), "not valid JSON"),
    ("binary.json", lambda p: p.write_bytes(b"\xff\xfe\x00garbage"), "not valid JSON"),
])
def test_place_bad_trace(name, make, words, work, capsys):
    make(work / name)
    line = _run(["place", name, "--gpus", "1", "--out", "p.json"], capsys, work, outputs=["p.json"])
    assert words in line, line


def _npy_bytes(array):
    import io

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize("change, words", [
    (lambda p: p.update(metrics=3), "metrics must be a JSON object"),
    (lambda p: p.update(solver="x"), "solver must be a JSON object"),
    (lambda p: p.update(num_experts=2 * 10**12), "need experts <= slots"),
    (lambda p: p["phy2log"][0].__setitem__(0, 1e19), "ids beyond"),
    (lambda p: p.update(num_gpus=10**7), "at most 65536"),
])
def test_evaluate_and_previous_bad_plan(change, words, work, capsys):
    plan = json.loads((work / "plan.json").read_text())
    change(plan)
    (work / "bad.json").write_text(json.dumps(plan))
    assert words in _run(["place", "--evaluate", "bad.json", "good.npz"], capsys, work)
    assert words in _run(["place", "good.npz", "--gpus", "4", "--redundant", "4", "--solver", "ilp",
                          "--previous", "bad.json", "--max-moves", "1", "--out", "p.json"], capsys, work,
                         outputs=["p.json"])


@pytest.mark.parametrize("argv", [
    ["place"],
    ["place", "good.npz", "--gpus", "abc"],
    ["place", "good.npz", "--gpus", "4", "--time-limit", "-inf"],
    ["place", "good.npz", "--gpus", "1000000", "--redundant", "999992"],
    ["nope"],
    [],
])
def test_usage_errors_are_one_line(argv, work, capsys):
    with pytest.raises(SystemExit) as exit_info:
        code = cli.main(argv)
        raise SystemExit(code)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("moecompile: error: "), err


# --- sizes, token files, model factories --------------------------------------------------------


@pytest.mark.parametrize("flags, words", [
    (["--tokens", "10000000000"], "tokens per batch"),
    (["--tokens", "256", "--batch", "100000000"], "tokens per batch"),
    (["--tokens", "\u00b2"], "expected a number"),
    (["--tokens", "1", "--batches", "1000000000"], "--batches"),
    (["--tokens", "1", "--layers", "1000000"], "--layers"),
])
def test_trace_sizes(flags, words, work, capsys):
    line = _run(["trace", "--model", "mixtral", "--out", "t.npz", *flags], capsys, work, outputs=["t.npz"])
    assert words in line, line


@pytest.mark.parametrize("name, make, words", [
    ("dict.pt", lambda p: torch.save({"ids": torch.arange(4)}, p), "must be an integer array"),
    ("list.pt", lambda p: torch.save([1, 2, 3], p), "must be an integer array"),
    ("float.npy", lambda p: np.save(p, np.ones(4)), "must be an integer array"),
    ("text.npy", lambda p: np.save(p, np.array(["a", "b"])), "must be an integer array"),
    ("cube.npy", lambda p: np.save(p, np.zeros((2, 2, 2), dtype=np.int64)), "shape"),
    ("empty.pt", lambda p: p.write_bytes(b""), "cannot read token ids"),
    ("empty.npy", lambda p: p.write_bytes(b""), "cannot read token ids"),
    ("garbage.pt", lambda p: p.write_bytes(b"\x80\x02}q\x00garbage"), "cannot read token ids"),
    ("u16.npy", lambda p: np.save(p, np.array([[1, 2, 3]], dtype=np.uint16)), None),
    ("big.npy", lambda p: np.save(p, np.array([[1, 500]], dtype=np.int32)), "must lie in"),
    ("complex.pt", lambda p: torch.save(torch.ones(3, dtype=torch.complex64), p), "must be an integer array"),
    ("sparse.pt", lambda p: torch.save(torch.eye(3, dtype=torch.int64).to_sparse(), p), "must be an integer array"),
])
def test_trace_token_files(name, make, words, work, capsys):
    make(work / name)
    argv = ["trace", "--model", "mixtral", "--layers", "1", "--tokens", name, "--out", "t.npz"]
    if words is None:  # a good file: unsigned ids are fine
        assert cli.main(argv) == 0 and (work / "t.npz").exists()
        return
    assert words in _run(argv, capsys, work, outputs=["t.npz"])


@pytest.mark.parametrize("model, words", [
    ("os:getcwd", "returned str, not a torch.nn.Module"),
    (f"{FACTORIES}:returns_str", "returned str"),
    (f"{FACTORIES}:raises", "failed: RuntimeError: factory boom"),
    (f"{FACTORIES}:bad_vocab", "vocab_size"),
    (f"{FACTORIES}:boom", "failed: ValueError: forward boom"),  # a model that fails on token ids
    (f"{FACTORIES}:missing", "has no 'missing'"),
    ("json:dumps", "failed: TypeError"),
    (":x", "expected a built-in name"),
    ("..:x", "expected a built-in name"),
    ("no_such_module_here:x", "cannot import"),
])
def test_model_that_is_not_a_model_factory(model, words, work, capsys):
    for command in (["trace", "--tokens", "4", "--batch", "1", "--batches", "1", "--out", "t.npz"],
                    ["explain", "--tokens", "4", "--batch", "1"]):
        line = _run([command[0], "--model", model, *command[1:]], capsys, work, outputs=["t.npz"])
        assert words in line, line


def test_bench_bad_sizes(work, capsys):
    assert "--iters" in _run(["bench", "--iters", "0"], capsys, work)
    assert "tokens per batch" in _run(["bench", "--tokens", "100000000", "--batch", "4"], capsys, work)
    assert "returned str" in _run(["bench", "--model", "os:getcwd"], capsys, work)


# --- found by a second fuzzing round ------------------------------------------------------------


@pytest.mark.parametrize("exponent", [-1030, -20, 46, 49])  # counts of 1e-310 (denormal), 1e-6, 1e14, 1e15
def test_ilp_at_any_count_scale(exponent, work):
    """The solvers see counts normalized by a power of two: no HiGHS failure at 1e14, no cap
    tolerance failure at 1e-6, no overflow at denormal counts, and (away from denormals, where a
    power-of-two scaling is exact) exactly the plans of the unscaled trace."""
    from moecompile.placement import RoutingTrace, evaluate

    base = synthetic_trace(3, 8, top_k=2, num_tokens=200, skew=0.5, affinity=0.5, seed=1)
    shift = exponent - np.frexp(max(base.load.max(), base.flow.max()))[1]
    trace = RoutingTrace(np.ldexp(base.load, shift), np.ldexp(base.flow, shift))
    with np.errstate(all="raise"):
        plan = place(trace, num_gpus=2, redundant=6, solver="ilp", time_limit=2)
    assert plan.metrics == evaluate(plan, trace) and np.isfinite(plan.metrics["objective"])
    if exponent > -1000:
        assert place(trace, num_gpus=2, redundant=6).metrics == place(base, num_gpus=2, redundant=6).metrics


def test_special_files_are_not_replaced(work, capsys):
    os.mkfifo(work / "fifo.json")
    assert "not a regular file" in _run(["place", "good.npz", "--gpus", "4", "--out", "fifo.json"], capsys, work)


def test_long_legal_names_are_written(work):
    name = "a" * 250 + ".json"  # 255 bytes: legal, the temporary file must not lengthen it
    assert cli.main(["place", "good.npz", "--gpus", "4", "--out", name]) == 0 and (work / name).exists()


def test_symlinked_output_is_written_through(work):
    os.symlink(work / "target.json", work / "link.json")
    assert cli.main(["place", "good.npz", "--gpus", "4", "--out", "link.json"]) == 0
    assert os.path.islink(work / "link.json") and json.loads((work / "target.json").read_text())["num_gpus"] == 4


def test_evaluate_a_plan_greedy_cannot_make(work, capsys):
    plan = json.loads((work / "plan.json").read_text())
    doubled = {**plan, "num_gpus": 1, "slots_per_gpu": 16, "phy2log": [row + row[:4] for row in plan["phy2log"]]}
    for key in ("log2phy", "logcnt"):
        doubled.pop(key)
    (work / "doubled.json").write_text(json.dumps(doubled))
    assert cli.main(["place", "--evaluate", "doubled.json", "good.npz"]) == 0
    out = capsys.readouterr().out
    assert "greedy: no plan of this shape" in out and "redundant" not in out


@pytest.mark.parametrize("make, words", [
    (lambda p: torch.save(torch.nested.nested_tensor([torch.arange(3), torch.arange(2)]), p), "nested"),
    (lambda p: open(p, "wb").write(__import__("pickle").dumps([1, 2, 3], protocol=4)), "cannot read token ids"),
])
def test_trace_odd_token_files(make, words, work, capsys):
    make(work / "ids.pt")
    line = _run(["trace", "--model", "mixtral", "--layers", "1", "--tokens", "ids.pt", "--out", "t.npz"],
                capsys, work, outputs=["t.npz"])
    assert words in line, line


def test_trace_token_count_with_thousands_of_digits(work, capsys):
    line = _run(["trace", "--tokens", "1" * 5000, "--out", "t.npz"], capsys, work, outputs=["t.npz"])
    assert "tokens per batch" in line


def test_factory_that_exits(work, capsys):
    (work / "exits.py").write_text("import sys\ndef f():\n    sys.exit(5)\n")
    sys.modules.pop("exits", None)
    line = _run(["trace", "--model", "exits:f", "--tokens", "2", "--out", "t.npz"], capsys, work, outputs=["t.npz"])
    assert "called exit(5)" in line
