"""Block start: valid plans on random inputs, co-routed experts gathered, and the ILP from it within greedy's caps."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moecompile.placement import solve as _solve
from moecompile.placement.blocks import block_start
from moecompile.placement.greedy import greedy_phy2log
from moecompile.placement.metrics import gpu_loads, score
from moecompile.placement.plan import presence
from moecompile.placement.synthetic import synthetic_trace


def place(*args, **kwargs):
    """The solvers on the hop objective, which these tests check (test_placement_cost.py: time)."""
    return _solve.place(*args, **{"objective": "hops", **kwargs})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_experts=st.integers(4, 40), num_gpus=st.sampled_from([2, 4, 8]), extra=st.integers(0, 3),
       num_layers=st.integers(2, 4), seed=st.integers(0, 2**31))
def test_block_start_is_a_valid_plan(num_experts, num_gpus, extra, num_layers, seed):
    spg = -(-num_experts // num_gpus) + extra
    if num_gpus * spg > num_experts * num_gpus:
        spg = num_experts
    rng = np.random.default_rng(seed)
    load = rng.integers(0, 40, size=(num_layers, num_experts)) * (rng.random((num_layers, num_experts)) < 0.9)
    flow = rng.integers(0, 9, size=(num_layers - 1, num_experts, num_experts)) * (rng.random((num_layers - 1, num_experts, num_experts)) < 0.3)
    plan = block_start(load.astype(float), flow.astype(float), num_gpus, spg)
    if load.sum(axis=1).min() == 0:
        assert plan is None  # a layer without tokens: nothing to follow
        return
    if plan is None:
        return  # no packing found: the solver then starts from greedy
    assert plan.shape == (num_layers, num_gpus * spg)
    count = presence(plan, num_experts, num_gpus)  # (L, E, G)
    assert count.max() <= 1, "two replicas of one expert on one GPU"
    assert count.sum(axis=2).min() >= 1, "an expert without a slot"


def test_block_start_gathers_co_routed_experts():
    trace = synthetic_trace(6, 64, top_k=8, num_tokens=4096, skew=0.5, affinity=0.9, seed=3)
    greedy = greedy_phy2log(trace.load, 16, 5)
    blocks = block_start(trace.load, trace.flow, 16, 5)
    hops = [score(p, trace.load, trace.flow, 16, 2)["cross_gpu_fraction"] for p in (greedy, blocks)]
    assert hops[1] < 0.8 * hops[0], hops


def test_ilp_from_the_block_start_keeps_greedy_caps_and_cuts_hops():
    trace = synthetic_trace(6, 64, top_k=8, num_tokens=4096, skew=0.5, affinity=0.9, seed=4)
    greedy = place(trace, 16, 2, 16, solver="greedy")
    ilp = place(trace, 16, 2, 16, solver="ilp", time_limit=6)
    assert ilp.solver["start"] == "block" and ilp.solver["source"] == "ilp"
    caps = gpu_loads(greedy.phy2log, trace.load, 16).max(axis=1)
    assert np.all(gpu_loads(ilp.phy2log, trace.load, 16).max(axis=1) <= caps * (1 + 1e-9))
    assert ilp.metrics["imbalance_mean"] <= greedy.metrics["imbalance_mean"] + 1e-12
    assert ilp.metrics["cross_gpu_fraction"] < 0.85 * greedy.metrics["cross_gpu_fraction"]
    assert ilp.metrics["objective"] < greedy.metrics["objective"]
