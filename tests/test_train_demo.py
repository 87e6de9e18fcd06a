"""The training demo: eager and backend='moe' trained side by side from one init on one corpus."""

from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():  # the Triton kernels run on CPU under the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tiers import slow  # noqa: E402
from moecompile.tools import train_demo  # noqa: E402
from moecompile.tools.cli import main  # noqa: E402


def test_corpus_is_a_fixed_grammar_with_the_stated_entropy():
    a = train_demo.corpus(50, 40, 30, seed=3)
    assert torch.equal(a, train_demo.corpus(50, 40, 30, seed=3)) and not torch.equal(a, train_demo.corpus(50, 40, 30, seed=4))
    successors = {}
    for seq in a.tolist():
        for t, nxt in zip(seq, seq[1:]):
            successors.setdefault(t, set()).add(nxt)
    assert max(len(s) for s in successors.values()) <= 4  # each token is followed by one of 4
    p = torch.tensor([1, 1 / 2, 1 / 3, 1 / 4]) / sum([1, 1 / 2, 1 / 3, 1 / 4])
    assert train_demo.corpus_entropy() == pytest.approx(float(-(p * p.log()).sum()), rel=1e-6)


def test_short_run_tracks_eager_and_learns(tmp_path, capsys):
    """20 steps on the torch path at the demo's learning rate: every loss within 1e-4 of eager's
    (fp32; measured: within 3e-6), both falling; JSON and plot written. At a learning rate 3x higher
    (1e-2) the two copies drift apart from step 4 (to 5e-2 by step 17): Adam's first steps move
    every weight by about the learning rate whatever its gradient's size, so rounding-level
    differences in tiny gradients become weight differences, and a top-k near-tie that then resolves
    differently sends tokens to other experts."""
    out, png = tmp_path / "run.json", tmp_path / "run.png"
    assert main(["train-demo", "--steps", "20", "--batch", "4", "--tokens", "24", "--every", "10",
                 "--kernels", "torch", "--json", str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "2 MoE layer(s) found, 2 optimized" in text and "final loss" in text
    record = json.loads(out.read_text())
    steps = record["steps"]
    assert [r["step"] for r in steps] == list(range(1, 21))
    assert record["summary"]["max_abs_diff"] < 1e-4
    for name in ("eager", "moe"):
        assert steps[-1][f"{name}_loss"] < steps[0][f"{name}_loss"] - 0.5  # it learns the grammar
    assert all(layer["status"] == "optimized" for layer in record["layers"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@slow("two training steps with the forward and backward on the Triton kernels under the interpreter")
def test_two_steps_on_the_triton_kernels(tmp_path, capsys):
    out = tmp_path / "run.json"
    assert main(["train-demo", "--steps", "2", "--batch", "2", "--tokens", "16", "--kernels", "triton",
                 "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert all(layer["status"] == "optimized" and layer["backward"] == "triton" for layer in record["layers"])
    assert record["layers"] and record["summary"]["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("argv, words", [
    (["--steps", "0"], "--steps must be a whole number >= 1"),
    (["--model", "dense"], "unknown MoE model 'dense'"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--tokens", "1"], "--tokens must be at least 2"),
    (["--hidden", "48"], "--hidden must be a multiple of 32"),
    (["--steps", "100000", "--batch", "64"], "--steps x --batch x --tokens is the corpus"),
])
def test_bad_options_are_one_line_errors_and_write_nothing(tmp_path, capsys, argv, words):
    out = tmp_path / "run.json"
    assert main(["train-demo", *argv, "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_unwritable_output_fails_before_training(tmp_path, capsys):
    assert main(["train-demo", "--json", str(tmp_path / "missing" / "run.json")]) == 2
    assert "cannot write --json" in capsys.readouterr().err
