"""Expert parallelism on gloo: sharded models and layers on 2 and 4 local ranks against a single
process holding every expert (tests/dist_worker.py is one rank; each case checks itself)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from tiers import slow

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dist_worker.py")
TIMEOUT = 240  # seconds for a whole group; each collective times out after 60 s
FOUR = slow("four ranks on two cores: 20-40 s of process starts")
FAMILY = slow("one more family or plan: the default run keeps mixtral with replicas and deepseek_v3 shuffled")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, case: str, *args: str) -> list[tuple[int, str]]:
    """Start `world` ranks of `case` and wait for all: [(exit code, output)] per rank."""
    port = str(_free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1", MOECOMPILE_TEST_DIST_TIMEOUT="60")
    procs = [subprocess.Popen([sys.executable, WORKER, case, str(rank), str(world), port, *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    results = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{case} {args} on {world} ranks did not finish in {TIMEOUT} s")
        results.append((p.returncode, out))
    return results


def assert_all_pass(results: list[tuple[int, str]]) -> None:
    for rank, (code, out) in enumerate(results):
        assert code == 0, f"rank {rank} exited {code}:\n{out[-3000:]}"


@pytest.mark.parametrize("world, name, plan, chunks", [
    (2, "mixtral", "replicas", "1"),
    (2, "deepseek_v3", "shuffled", "3"),
    pytest.param(4, "mixtral", "replicas", "2", marks=FOUR),
    pytest.param(2, "mixtral", "even", "auto", marks=FAMILY),
    pytest.param(4, "qwen3_moe", "shuffled", "3", marks=FOUR),
    pytest.param(2, "qwen2_moe", "replicas", "2", marks=FAMILY),
    pytest.param(2, "olmoe", "replicas", "1", marks=FAMILY),
    pytest.param(2, "gpt_oss", "replicas", "2", marks=FAMILY),
])
def test_sharded_model_matches_one_process(world, name, plan, chunks):
    """Logits, the replicated weights' gradients (this rank's batch) and the experts' gradients
    (every rank's batch, replicas summed) of a sharded model, its exchange in `chunks` chunks; after
    average_gradients, the unsharded model's gradients of the mean loss over every rank's batch;
    full_state_dict loads into the unsharded model and equals it."""
    assert_all_pass(launch(world, "model", name, plan, "eager", chunks))


def test_sharded_model_in_bfloat16():
    """bfloat16 weights and activations: logits and gradients within 3e-2 of the largest value."""
    assert_all_pass(launch(2, "model", "qwen3_moe", "replicas", "eager", "2", "bfloat16"))


@slow("torch.compile of a sharded model on 2 ranks: about a minute")
def test_sharded_model_compiled():
    assert_all_pass(launch(2, "model", "mixtral", "replicas", "compiled"))


@pytest.mark.parametrize("world, plan, chunks", [(2, "replicas", "3"), pytest.param(4, "even", "1", marks=FOUR),
                                                 pytest.param(2, "shuffled", "2", marks=FAMILY)])
def test_layer_edge_cases(world, plan, chunks):
    """A rank with no tokens, every token to one rank, an expert no token chose: outputs and every
    gradient as the unsharded experts give them."""
    assert_all_pass(launch(world, "layer", plan, "plain,empty,one_rank,idle", chunks))


def test_layer_edge_cases_in_bfloat16():
    """bfloat16 rows and top-k weights (odd byte offsets in the packed message), a rank receiving
    no rows in a chunk: within 3e-2 of the largest value."""
    assert_all_pass(launch(2, "layer", "replicas", "plain,empty,one_rank,idle", "3", "bfloat16"))


def _digests(results) -> set:
    assert_all_pass(results)
    return {line.split()[1] for _, out in results for line in out.splitlines() if line.startswith("digest ")}


def test_outputs_bit_for_bit_whatever_the_chunks_and_plan():
    """One layer's outputs under C = 1, 2, 3 and "auto", under an even, a shuffled and a replicated
    plan: every one the same bits (each rank checks; the digest is of every rank's outputs)."""
    assert len(_digests(launch(2, "invariance"))) == 1


@FOUR
def test_outputs_bit_for_bit_whatever_the_world_size():
    assert _digests(launch(2, "invariance")) == _digests(launch(4, "invariance"))


def test_plans_that_do_not_fit_are_rejected_and_named_layers_matched():
    results = launch(2, "plans")
    assert_all_pass(results)
    for _, out in results:  # every rank says the same, in one line each
        assert "rejected: the plan places experts on 1 GPUs but the process group has 2 ranks" in out
        assert "rejected: the plan has 1 layers but the model has 2 MoE layers" in out
        assert "rejected: the plan has no layer 'model.layers.1.mlp'" in out


def test_a_rank_that_dies_fails_the_others_clearly():
    results = launch(2, "dies")
    assert results[1][0] == 3
    assert results[0][0] != 0
    assert "moecompile.distributed: dispatch of layer model.layers.0.mlp failed on rank 0" in results[0][1]


@slow("torchrun of the expert-parallel demo on 2 ranks: compiles the model on both, about 30 s")
def test_ep_demo_trains_like_one_process(tmp_path):
    out = tmp_path / "ep.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(_free_port()), "-m", "moecompile.tools.ep_demo", "--steps", "4", "--json", str(out),
                           "--overlap-chunks", "2", "--profile", str(tmp_path / "prof")],
                          capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert [s["step"] for s in record["steps"]] == [0, 1, 2, 3]
    for s in record["steps"]:
        assert abs(s["loss"] - s["reference"]) < 1e-4 * abs(s["reference"])
    assert record["steps"][-1]["loss"] < record["steps"][0]["loss"]  # it learns
    assert sorted((r["layer"], r["rank"]) for r in record["exchanges"]) == [
        ("model.layers.0.mlp", 0), ("model.layers.0.mlp", 1), ("model.layers.1.mlp", 0), ("model.layers.1.mlp", 1)]
    assert all(r["calls"] == 2 and r["bytes_sent"] > 0 for r in record["exchanges"])  # steps after the warm-up
    assert "sharded loss" in done.stdout and "exposed communication" in done.stdout
    assert all(r["chunks"] == 2 for r in record["exchanges"])
    spans = {e["name"] for e in json.loads((tmp_path / "prof" / "rank1.json").read_text())["traceEvents"]}
    assert {"moe experts model.layers.0.mlp chunk 1", "moe wait rows model.layers.1.mlp backward chunk 0"} <= spans


def test_ep_demo_outside_torchrun_is_a_one_line_error():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    done = subprocess.run([sys.executable, "-m", "moecompile.tools.ep_demo"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 2
    assert done.stderr.strip() == ("ep_demo: error: launch it with torchrun, e.g. torchrun --nproc-per-node 2 -m "
                                   "moecompile.tools.ep_demo")
