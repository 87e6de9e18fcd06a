"""The exchange search on the exact layer time (placement/polish.py): every swap it scores is scored
as cost.py scores the plan after it, and what it returns is valid, within the caps, and never slower."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from moecompile.placement import cost
from moecompile.placement.greedy import greedy_phy2log
from moecompile.placement.metrics import gpu_loads
from moecompile.placement.plan import presence
from moecompile.placement.polish import _Context, _LayerSearch, polish
from moecompile.placement.synthetic import chain_trace, synthetic_trace
from moecompile.placement.trace import RoutingTrace, normalized

HW = cost.Hardware(hidden=64, intermediate=32, routings_per_gpu=100, flops=1e9, nvlink_bw=2e6, network_bw=4e5)


def _case(seed: int, flow: bool = True):
    """A 4-layer trace of 12 experts on 6 GPUs in 3 nodes, 6 replicas (3 slots a GPU)."""
    trace = normalized(chain_trace(4, 12, top_k=3, num_tokens=300, skew=0.7, affinity=0.6, seed=seed))
    if not flow:
        trace = RoutingTrace(load=trace.load, flow=None)
    plan = greedy_phy2log(trace.load, 6, 3, 3, None)
    return trace, plan


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_every_swap_is_scored_as_the_model_scores_the_plan_after_it(seed, overlap):
    """For every layer (the first, whose tokens start spread, included) and every valid swap, the
    search's score is time[l] + time[l+1] of cost.layer_times on the swapped plan."""
    trace, plan = _case(seed)
    hw = dataclasses.replace(HW, overlap=overlap)
    rng = np.random.default_rng(seed)
    plan = np.stack([rng.permutation(row) for row in plan])  # replicas anywhere, not greedy's layout
    plan = np.stack([_no_doubles(row, 6) for row in plan])
    cap = np.full(trace.load.shape[0], np.inf)
    ctx = _Context(trace.load, trace.flow, 6, 3, hw, cap)
    checked = {1: 0, 2: 0}
    for layer in range(plan.shape[0]):
        search = _LayerSearch(plan, layer, ctx)
        assert not search.skip
        base = cost.layer_times(plan, trace.load, trace.flow, 6, 3, hw)["time"]
        assert search.now() == pytest.approx(base[layer:layer + 2].sum(), rel=1e-12)
        assert [c[0].shape[1] for c in search.classes] == [1, 2]  # swaps, 2-for-2 inside a node
        for i_all, j_all in search.classes:
            i, j = search.valid(i_all, j_all)
            scores = search.score(i, j)
            for k in range(0, len(i), 7 if i.shape[1] == 1 else 2):  # a spread of them
                swapped = plan.copy()
                swapped[layer, i[k]], swapped[layer, j[k]] = plan[layer, j[k]], plan[layer, i[k]]
                want = cost.layer_times(swapped, trace.load, trace.flow, 6, 3, hw)["time"]
                assert scores[k] == pytest.approx(want[layer:layer + 2].sum(), rel=1e-12)
                checked[i.shape[1]] += 1
    assert checked[1] > 50 and checked[2] > 10


def test_applied_swaps_keep_the_sums_exact():
    trace, plan = _case(3)
    ctx = _Context(trace.load, trace.flow, 6, 3, HW, np.full(4, np.inf))
    search = _LayerSearch(plan, 1, ctx)
    rng = np.random.default_rng(0)
    for step in range(20):
        i, j = search.valid(*search.classes[step % 2])
        k = int(rng.integers(len(i)))
        search.apply(i[k], j[k])
        want = cost.layer_times(plan, trace.load, trace.flow, 6, 3, HW)["time"]
        assert search.now() == pytest.approx(want[1:3].sum(), rel=1e-10)


@pytest.mark.parametrize("flow", [True, False])
def test_polish_is_valid_within_caps_and_never_slower(flow):
    trace, plan = _case(5, flow=flow)
    cap = gpu_loads(plan, trace.load, 6).max(axis=1) * (1 + 1e-12)
    before = cost.predict(plan, trace.load, trace.flow, 6, 3, HW)["layer_ms"]
    found, info = polish(plan, trace.load, trace.flow, 6, 3, HW, cap, time.perf_counter() + 5.0)
    after = cost.predict(found, trace.load, trace.flow, 6, 3, HW)["layer_ms"]
    assert info["layer_ms"] == pytest.approx(after) and info["layer_ms_before"] == pytest.approx(before)
    assert after <= before
    if flow:
        assert after < before and info["swaps"] > 0
    assert np.all(gpu_loads(found, trace.load, 6).max(axis=1) <= cap)
    # replica counts kept, one replica per GPU at most, each GPU's slots in increasing order
    np.testing.assert_array_equal(presence(found, 12, 6).sum(axis=2), presence(plan, 12, 6).sum(axis=2))
    assert presence(found, 12, 6).max() <= 1
    assert np.all(np.diff(found.reshape(4, 6, 3), axis=2) > 0)


def test_polish_stops_at_its_deadline():
    trace = normalized(synthetic_trace(6, 64, top_k=4, num_tokens=3000, skew=0.5, affinity=0.8, seed=1))
    plan = greedy_phy2log(trace.load, 16, 5, 4, None)
    cap = gpu_loads(plan, trace.load, 16).max(axis=1) * (1 + 1e-12)
    t0 = time.perf_counter()
    polish(plan, trace.load, trace.flow, 16, 4, HW, cap, t0 + 0.3)
    assert time.perf_counter() - t0 < 2.0


def test_place_polishes_the_time_objective_only():
    from moecompile.placement import place
    trace = chain_trace(4, 16, top_k=2, num_tokens=800, skew=0.5, affinity=0.7, seed=0)
    timed = place(trace, 8, 2, 8, solver="ilp", time_limit=1.5)
    polished = timed.solver["polish"]
    assert polished["layer_ms"] <= polished["layer_ms_before"]
    assert timed.solver["layer_ms"] <= polished["layer_ms"] * (1 + 1e-12)
    hops = place(trace, 8, 2, 8, solver="ilp", time_limit=1.5, objective="hops")
    assert "polish" not in hops.solver


def _no_doubles(row: np.ndarray, num_gpus: int) -> np.ndarray:
    """Swap slots until no GPU holds two replicas of one expert."""
    row = row.copy()
    spg = row.size // num_gpus
    for _ in range(1000):
        grid = row.reshape(num_gpus, spg)
        bad = [(g, s) for g in range(num_gpus) for s in range(spg) if (grid[g] == grid[g, s]).sum() > 1]
        if not bad:
            return row
        g, s = bad[0]
        for t in range(row.size):
            h = t // spg
            if h != g and row[t] not in grid[g] and row[g * spg + s] not in grid[h]:
                row[g * spg + s], row[t] = row[t], row[g * spg + s]
                break
    raise AssertionError("could not spread replicas")


def test_polish_skips_tables_too_big_and_takes_integer_counts(monkeypatch):
    import moecompile.placement.polish as polish_module
    trace, plan = _case(6)
    load, flow = np.rint(trace.load * 10).astype(np.int64), np.rint(trace.flow * 10).astype(np.int64)
    cap = gpu_loads(plan, load, 6).max(axis=1) * (1 + 1e-12)
    found, info = polish(plan, load, flow, 6, 3, HW, cap, time.perf_counter() + 2.0)  # integer counts work
    assert info["layer_ms"] <= info["layer_ms_before"] and "skipped" not in info
    monkeypatch.setattr(polish_module, "MAX_TABLE_BYTES", 1000)
    found, info = polish(plan, load, flow, 6, 3, HW, cap, time.perf_counter() + 2.0)
    assert info["skipped"] == "too many GPUs for the tables" and np.array_equal(found, plan)


def test_exchanges_tried_by_layout():
    """Swaps across GPUs always; 2-for-2 exchanges inside a node where a node has two GPUs or more
    and their number stays bounded (8 GPUs of 40 slots in one node would be 17M: swaps only)."""
    def sizes(num_gpus, num_nodes, spg):
        ctx = _Context(np.ones((2, 8)), None, num_gpus, num_nodes, HW, np.full(2, np.inf))
        return [i.shape[1] for i, _ in ctx.exchanges(spg)]
    assert sizes(6, 3, 3) == [1, 2]
    assert sizes(4, 4, 3) == [1]  # one GPU per node
    assert sizes(8, 1, 40) == [1]
    i, j = _Context(np.ones((2, 8)), None, 4, 1, HW, np.full(2, np.inf)).exchanges(2)[0]
    assert len(i) == 4 * 3 // 2 * 4 and np.all(i // 2 < j // 2)  # every slot pair on two different GPUs


def test_local_gain_is_the_change_of_the_flow_kept_on_gpus():
    """The hop phase's gain of an exchange in layer l is the change of metrics.local_flow's
    GPU-local flow summed over the pairs (l-1, l) and (l, l+1)."""
    from moecompile.placement.metrics import local_flow
    trace, plan = _case(2)
    ctx = _Context(trace.load, trace.flow, 6, 3, HW, np.full(4, np.inf))
    for layer in range(plan.shape[0]):
        search = _LayerSearch(plan, layer, ctx)
        for i_all, j_all in search.classes:
            i, j = search.valid(i_all, j_all)
            gains = search.local_gain(i, j)
            base = local_flow(plan, trace.flow, 6, 3)[0].sum()
            for k in range(0, len(i), 5):
                swapped = plan.copy()
                swapped[layer, i[k]], swapped[layer, j[k]] = plan[layer, j[k]], plan[layer, i[k]]
                assert gains[k] == pytest.approx(local_flow(swapped, trace.flow, 6, 3)[0].sum() - base, abs=1e-9)


def test_hop_phase_keeps_flow_local_without_raising_the_time(monkeypatch):
    """With time left after the smoothed descents, the polish raises GPU-local flow by exchanges
    that leave the layer time as it is: fewer cross-GPU hops, the same predicted time."""
    import moecompile.placement.polish as polish_module
    from moecompile.placement.metrics import score
    trace, plan = _case(4)
    cap = gpu_loads(plan, trace.load, 6).max(axis=1) * (1 + 1e-12)
    monkeypatch.setattr(polish_module, "SOFT", ())  # straight to the hop phase
    found, info = polish(plan, trace.load, trace.flow, 6, 3, HW, cap, time.perf_counter() + 5.0)
    assert info["swaps"] == 0 and info["hop_swaps"] > 0
    assert info["layer_ms"] <= info["layer_ms_before"] * (1 + 1e-9)
    before, after = (score(p, trace.load, trace.flow, 6, 3)["cross_gpu_fraction"] for p in (plan, found))
    assert after < before
    assert np.all(gpu_loads(found, trace.load, 6).max(axis=1) <= cap)
