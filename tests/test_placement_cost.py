"""The layer-time model (placement/cost.py) on cases computed by hand, the hardware profile and its
errors, and what `moecompile place` reports of it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moecompile.errors import UserInputError
from moecompile.placement import cost
from moecompile.placement.trace import RoutingTrace, load_trace, save_trace
from moecompile.tools.cli import main

# unit sizes: one routing = 6 FLOPs at 6 FLOP/s (1 s of compute) and 1 byte on the wire
UNIT = cost.Hardware(hidden=1, intermediate=1, dtype_bytes=1, routings_per_gpu=2, flops=6, nvlink_bw=1,
                     network_bw=0.5)


def test_two_gpus_by_hand():
    """Layer 0: loads (3, 1) -> compute 3 s; tokens start spread evenly, so each GPU sends half its
    tokens' routings to each GPU: 0.5 to GPU 1 from GPU 0, 1.5 to GPU 0 from GPU 1; the busiest
    direction is 1.5. Layer 1: the flow keeps 2 + 1 local and sends 1 from GPU 0 to GPU 1."""
    phy2log = np.array([[0, 1], [0, 1]])
    load = np.array([[3.0, 1.0], [2.0, 2.0]])
    flow = np.array([[[2.0, 1.0], [0.0, 1.0]]])  # K = 1: rows sum to load[0], columns to load[1]
    one_node = cost.layer_times(phy2log, load, flow, num_gpus=2, num_nodes=1, hw=UNIT)
    np.testing.assert_allclose(one_node["compute"], [3.0, 2.0])
    np.testing.assert_allclose(one_node["comm"], [1.5, 1.0])  # NVLink, 1 B/s
    np.testing.assert_allclose(one_node["time"], [4.5, 3.0])
    two_nodes = cost.layer_times(phy2log, load, flow, num_gpus=2, num_nodes=2, hw=UNIT)
    np.testing.assert_allclose(two_nodes["comm"], [3.0, 2.0])  # the network, 0.5 B/s
    overlapped = cost.layer_times(phy2log, load, flow, 2, 2, cost.Hardware(**{**UNIT.__dict__, "overlap": True}))
    np.testing.assert_allclose(overlapped["time"], [3.0, 2.0])  # max(compute, comm)


def test_top2_flow_and_a_placement_that_follows_it():
    """Token A picks experts {0, 1} in both layers, token B {2, 3}; K = 2, so the flow counts
    K * K = 4 pairs per token and each routing has 2 sources (weight 1/2 each). Layer 0 holds {0, 1}
    on GPU 0: with layer 1 split {0, 2} | {1, 3}, A's routing to expert 1 crosses to GPU 1 and B's
    to expert 2 to GPU 0 (1 routing each way); grouped {0, 1} | {2, 3}, nothing crosses."""
    load = np.ones((2, 4))
    flow = np.zeros((1, 4, 4))
    for group in ((0, 1), (2, 3)):
        for e in group:
            for e2 in group:
                flow[0, e, e2] = 1.0
    split = cost.layer_times(np.array([[0, 1, 2, 3], [0, 2, 1, 3]]), load, flow, 2, 1, UNIT)
    grouped = cost.layer_times(np.array([[0, 1, 2, 3], [0, 1, 2, 3]]), load, flow, 2, 1, UNIT)
    np.testing.assert_allclose(split["comm"], [1.0, 1.0])
    np.testing.assert_allclose(grouped["comm"], [1.0, 0.0])
    np.testing.assert_allclose(grouped["compute"], [2.0, 2.0])  # 2 routings a GPU, 1 s each
    assert cost.predict(np.array([[0, 1, 2, 3], [0, 1, 2, 3]]), load, flow, 2, 1, UNIT)["layer_ms"] == pytest.approx(2500.0)


def test_replicas_split_their_tokens_and_traffic_is_conserved():
    """An expert with two replicas serves half its load on each; every routing of a layer arrives
    somewhere (local or not), whatever the placement."""
    rng = np.random.default_rng(0)
    load = rng.random((3, 6)) * 10
    flow = rng.random((2, 6, 6))
    flow *= (load[1:].sum(axis=1) * 2 / flow.sum(axis=(1, 2)))[:, None, None]  # K = 2
    phy2log = np.array([[0, 1, 2, 3, 4, 5, 0, 1], [5, 4, 3, 2, 1, 0, 5, 2], [0, 2, 4, 1, 3, 5, 1, 0]])
    traffic = cost._traffic(phy2log, load, flow, num_gpus=4)
    np.testing.assert_allclose(traffic.sum(axis=(1, 2)), load.sum(axis=1))
    # layer 0, expert 0 on GPUs 0 and 3: each serves half of load[0, 0]
    from moecompile.placement.metrics import gpu_loads
    np.testing.assert_allclose(gpu_loads(phy2log, load, 4)[0, 0], load[0, 0] / 2 + load[0, 1] / 2)


def test_h100_preset_prices_hops_against_imbalance_as_the_issue_computed():
    """DeepSeek-V3 on H100 nodes: one point of cross-node hop fraction costs about what 2.3 points
    of imbalance do, one point of cross-GPU traffic inside a node about 0.25, measured through the
    model: 2 GPUs, one per node or both in one node, balanced loads, then 1% of routings crossing
    or 1% more load on one GPU."""
    hw = cost.PRESETS["h100"]

    def mean_time(num_nodes, cross=0.0, skew=0.0):
        load = np.array([[1.0 + skew, 1.0 - skew], [1.0, 1.0]])
        flow = np.array([[[1.0 - cross, cross], [cross, 1.0 - cross]]])
        t = cost.layer_times(np.array([[0, 1], [0, 1]]), load, flow, 2, num_nodes, hw)
        return t["compute"][0], t["comm"][1]

    base_compute, _ = mean_time(2)
    point_imbalance = mean_time(2, skew=0.01)[0] - base_compute
    assert mean_time(2, cross=0.01)[1] / point_imbalance == pytest.approx(2.28, abs=0.02)
    assert mean_time(1, cross=0.01)[1] / point_imbalance == pytest.approx(0.253, abs=0.005)


@pytest.mark.parametrize("field, value, words", [
    ("flops", 0.0, "flops must be a positive number"),
    ("nvlink_bw", -1.0, "nvlink_bw must be a positive number"),
    ("network_bw", float("nan"), "network_bw must be a positive number"),
    ("hidden", 7.5, "hidden must be a whole number"),
    ("hidden", True, "hidden must be a positive number"),
    ("overlap", "yes", "overlap must be true or false"),
])
def test_bad_profile_fields_are_one_line_errors(field, value, words):
    with pytest.raises(UserInputError, match=words):
        cost.Hardware(**{field: value})


def test_profile_precedence_preset_trace_file_flags(tmp_path):
    trace = RoutingTrace(load=np.ones((2, 4)), hidden=4096, dtype="float32")
    assert (cost.hardware("h100", trace=trace).hidden, cost.hardware("h100", trace=trace).dtype_bytes) == (4096, 4)
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"hidden": 2048, "network_bw": 25e9}))
    hw = cost.hardware("a100", str(profile), trace, network_bw=None, flops=1e12)
    assert (hw.hidden, hw.dtype_bytes, hw.network_bw, hw.flops, hw.nvlink_bw) == (2048, 4, 25e9, 1e12, 300e9)
    for text, words in (("{", "is not JSON"), ("[1, 2]", "must be a JSON object"),
                        ('{"hiden": 1}', "unknown field\\(s\\) hiden")):
        profile.write_text(text)
        with pytest.raises(UserInputError, match=words):
            cost.hardware("h100", str(profile))
    with pytest.raises(UserInputError, match="cannot read hardware profile"):
        cost.hardware("h100", str(tmp_path / "missing.json"))
    with pytest.raises(UserInputError, match="unknown hardware preset"):
        cost.hardware("tpu")


@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_traces_keep_hidden_and_dtype(tmp_path, suffix):
    path = tmp_path / f"t{suffix}"
    save_trace(RoutingTrace(load=np.ones((2, 3)), flow=np.ones((1, 3, 3)), hidden=7168, dtype="bfloat16"), path)
    back = load_trace(path)
    assert (back.hidden, back.dtype) == (7168, "bfloat16")
    save_trace(RoutingTrace(load=np.ones((2, 3))), path)
    assert (load_trace(path).hidden, load_trace(path).dtype) == (None, None)
    for bad, words in (({"hidden": -3}, "hidden must be a positive whole number"),
                       ({"dtype": "int8"}, "dtype 'int8' is not one of")):
        with pytest.raises(UserInputError, match=words):
            RoutingTrace(load=np.ones((2, 3)), **bad)


def _trace_file(tmp_path) -> str:
    from moecompile.placement.synthetic import synthetic_trace
    path = str(tmp_path / "trace.npz")
    save_trace(synthetic_trace(3, 16, top_k=2, num_tokens=256, seed=1), path)
    return path


def test_place_reports_predicted_layer_time_for_greedy_and_the_plan(tmp_path, capsys):
    trace, out = _trace_file(tmp_path), tmp_path / "plan.json"
    assert main(["place", trace, "--gpus", "4", "--nodes", "2", "--solver", "ilp", "--time-limit", "5",
                 "--out", str(out), "--hidden", "1024"]) == 0
    text = capsys.readouterr().out
    head, greedy, ilp = text.splitlines()[1:4]
    assert "layer ms" in head and greedy.startswith("greedy") and ilp.startswith("ilp")
    assert "H 1024" in text
    plan = json.loads(out.read_text())
    predicted = plan["metrics"]["predicted"]
    assert predicted["layer_ms"] == pytest.approx(float(ilp.split()[-2]), abs=1e-3)
    assert predicted["layer_ms"] == pytest.approx(predicted["compute_ms"] + predicted["comm_ms"])
    assert ("polished on the layer time" in text) == (plan["solver"]["source"] == "ilp")


@pytest.mark.parametrize("flags, words", [
    (["--tflops", "-1"], "flops must be a positive number"),
    (["--hardware-profile", "missing.json"], "cannot read hardware profile"),
    (["--hidden", "0"], "hidden must be a positive number"),
])
def test_place_refuses_a_bad_profile_before_solving_and_writes_nothing(tmp_path, capsys, flags, words):
    trace, out = _trace_file(tmp_path), tmp_path / "plan.json"
    assert main(["place", trace, "--gpus", "4", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_prices_of_the_h100_preset():
    hop, node = cost.prices(cost.PRESETS["h100"])
    assert hop == pytest.approx(0.253, abs=0.002) and node == pytest.approx(2.28 - 0.253, abs=0.02)
    # a network faster than NVLink would make a node hop no dearer than a GPU hop, never a gain
    assert cost.prices(cost.Hardware(network_bw=900e9))[1] == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_time_objective_is_never_slower_than_greedy_and_keeps_the_caps(seed):
    from moecompile.placement import place
    from moecompile.placement.metrics import gpu_loads
    from moecompile.placement.synthetic import synthetic_trace
    trace = synthetic_trace(4, 16, top_k=2, num_tokens=800, skew=0.5, affinity=0.5 + 0.2 * seed, seed=seed)
    greedy = place(trace, 8, 2, 8)
    plan = place(trace, 8, 2, 8, solver="ilp", time_limit=1.5)
    assert plan.solver["objective_kind"] == "time"
    assert plan.solver["layer_ms"] < plan.solver["greedy_layer_ms"]  # strictly: no silent fallback
    hw = cost.hardware("h100", trace=trace)
    want = cost.predict(plan.phy2log, trace.load, trace.flow, 8, 2, hw)["layer_ms"]
    assert plan.solver["layer_ms"] == pytest.approx(want)  # the exact model, not the search's prices
    caps = gpu_loads(greedy.phy2log, trace.load, 8).max(axis=1)
    assert np.all(gpu_loads(plan.phy2log, trace.load, 8).max(axis=1) <= caps * (1 + 1e-9))


def test_max_imbalance_trades_balance_for_traffic_within_the_bound():
    from moecompile.placement import place
    from moecompile.placement.synthetic import synthetic_trace
    trace = synthetic_trace(4, 32, top_k=4, num_tokens=2000, skew=0.3, affinity=0.9, seed=4)
    tight = place(trace, 8, 2, 8, solver="ilp", time_limit=1.5, objective="hops")
    loose = place(trace, 8, 2, 8, solver="ilp", time_limit=1.5, objective="hops", max_imbalance=1.25)
    assert max(loose.metrics["imbalance"]) <= 1.25 + 1e-9
    assert max(loose.metrics["imbalance"]) > max(tight.metrics["imbalance"])  # the room was used
    assert loose.metrics["cross_gpu_fraction"] < tight.metrics["cross_gpu_fraction"]
    for bad in (0.9, float("nan"), True):
        with pytest.raises(UserInputError, match="max imbalance must be a number >= 1"):
            place(trace, 8, 2, 8, max_imbalance=bad)
    with pytest.raises(UserInputError, match="unknown objective 'latency'"):
        place(trace, 8, 2, 8, objective="latency")


def test_a_search_result_slower_than_greedy_is_not_returned(monkeypatch):
    """The search's prices are an average; the exact model has the last word. With caps loose
    enough for any plan (max_imbalance 2), a start that is fast (a solved plan posing as greedy's)
    and a search that returns a slower plan (the real greedy's), the start comes back."""
    from moecompile.placement import place, solve
    from moecompile.placement.synthetic import synthetic_trace
    trace = synthetic_trace(4, 16, top_k=2, num_tokens=800, skew=0.5, affinity=0.7, seed=0)
    slow_plan = place(trace, 8, 2, 8).phy2log
    fast_plan = place(trace, 8, 2, 8, solver="ilp", time_limit=1.5).phy2log
    hw = cost.hardware("h100", trace=trace)
    ms = [cost.predict(p, trace.load, trace.flow, 8, 2, hw)["layer_ms"] for p in (slow_plan, fast_plan)]
    assert ms[1] < ms[0]
    monkeypatch.setattr(solve, "greedy_phy2log", lambda *a: fast_plan.copy())
    monkeypatch.setattr(solve, "solve_ilp", lambda problem, start, deadline, progress: (slow_plan.copy(), {}))
    monkeypatch.setattr(solve, "block_start", lambda *a: None)
    monkeypatch.setattr(solve, "polish", lambda found, *a: (found, {}))  # the search's plan as it came
    plan = place(trace, 8, 2, 8, solver="ilp", time_limit=1.0, max_imbalance=2.0)
    assert plan.solver["source"] == "greedy" and np.array_equal(plan.phy2log, fast_plan)


@pytest.mark.parametrize("seed", [0, 1])
def test_every_start_is_searched_and_the_best_within_the_caps_is_kept(seed):
    """At affinity 0.9 the block start's search stays over the caps on these traces; greedy's
    start still gives a plan strictly faster than greedy (one failed start no longer returns greedy)."""
    from moecompile.placement import place
    trace = _small(seed, affinity=0.9)
    plan = place(trace, 8, 2, 8, solver="ilp", time_limit=1.5)
    starts = plan.solver["starts"]
    assert set(starts) == {"block", "greedy"}
    kept = [s["layer_ms"] for s in starts.values() if s["within_caps"]]
    assert plan.solver["source"] == "ilp" and plan.solver["layer_ms"] == pytest.approx(min(kept))
    assert plan.solver["layer_ms"] < plan.solver["greedy_layer_ms"]


def test_starts_run_in_parallel_processes_with_enough_time(monkeypatch):
    from moecompile.placement import place, solve
    monkeypatch.setattr(solve, "PARALLEL_MIN_SECONDS", 0.0)
    said = []
    plan = place(_small(0, affinity=0.7), 8, 2, 8, solver="ilp", time_limit=8.0, progress=said.append)
    assert any("2 starts in parallel processes" in s for s in said), said
    assert set(plan.solver["starts"]) == {"block", "greedy"} and plan.solver["source"] == "ilp"


def _small(seed, affinity):
    from moecompile.placement.synthetic import synthetic_trace
    return synthetic_trace(4, 16, top_k=2, num_tokens=800, skew=0.5, affinity=affinity, seed=seed)


def test_chain_traces_count_every_pair_and_follow_chains_per_slot():
    from moecompile.placement.synthetic import chain_trace
    trace = chain_trace(5, 16, top_k=4, num_tokens=600, skew=0.8, affinity=0.6, seed=2)
    np.testing.assert_allclose(trace.load.sum(axis=1), 600 * 4)  # K distinct picks a token
    np.testing.assert_allclose(trace.flow.sum(axis=2), 4 * trace.load[:-1])  # all K*K pairs
    np.testing.assert_allclose(trace.flow.sum(axis=1), 4 * trace.load[1:])
    chained = chain_trace(3, 16, top_k=4, num_tokens=600, affinity=1.0, vary=0.0, seed=2)
    # every pick follows its slot's chain: an expert's tokens all go on to its successor
    np.testing.assert_allclose(chained.flow.max(axis=2), chained.load[:-1])
    # at affinity 0 (uniform popularity) an expert's tokens spread over the next layer's experts
    loose = chain_trace(3, 16, top_k=4, num_tokens=600, skew=0.0, affinity=0.0, vary=0.0, seed=2)
    assert loose.flow.max(axis=2).sum() < 0.5 * loose.load[:-1].sum()


def test_bounds_by_hand_and_below_every_plan():
    """E = 2 on 2 GPUs, one slot each: of each expert's flow at most its largest entry stays, 6 of 8."""
    flow = np.array([[[3.0, 1.0], [1.0, 3.0]]])
    load = np.array([[4.0, 4.0], [4.0, 4.0]])
    b = cost.bounds(load, flow, 2, 1, 1, UNIT)
    assert b["cross_gpu"] == pytest.approx(0.25) and b["cross_node"] == pytest.approx(0.0)
    # identity placement reaches it: its traffic is the bound's (compute 2 s a layer; layer 0: half
    # of each GPU's 2 routings come from the other GPU, layer 1: a quarter)
    t = cost.layer_times(np.array([[0, 1], [0, 1]]), load, flow, 2, 1, UNIT)
    assert b["layer_ms"] == pytest.approx(t["time"].mean() * 1e3)
    from moecompile.placement import place
    from moecompile.placement.synthetic import chain_trace
    trace = chain_trace(4, 32, top_k=4, num_tokens=1500, skew=0.5, affinity=0.7, seed=5)
    hw = cost.hardware("h100", trace=trace)
    bound = cost.bounds(trace.load, trace.flow, 8, 2, 5, hw)
    rng = np.random.default_rng(1)
    plans = [place(trace, 8, 2, 8).phy2log, place(trace, 8, 2, 8, solver="ilp", time_limit=1.0).phy2log]
    plans += [np.stack([rng.permutation(40) % 32 for _ in range(4)]) for _ in range(5)]
    from moecompile.placement.metrics import score
    for phy2log in plans:
        m = score(phy2log, trace.load, trace.flow, 8, 2)
        assert m["cross_gpu_fraction"] >= bound["cross_gpu"] - 1e-12
        assert m["cross_node_fraction"] >= bound["cross_node"] - 1e-12
        assert cost.predict(phy2log, trace.load, trace.flow, 8, 2, hw)["layer_ms"] >= bound["layer_ms"] - 1e-9
