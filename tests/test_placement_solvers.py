"""Greedy and ILP solvers: valid plans on random inputs, ILP never worse than greedy, exact on tiny cases."""

import itertools
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moecompile.errors import UserInputError
from moecompile.placement import Plan, RoutingTrace, evaluate
from moecompile.placement import solve as _solve
from moecompile.placement.metrics import gpu_loads
from moecompile.placement.plan import presence
from moecompile.placement.synthetic import synthetic_trace


def place(*args, **kwargs):
    """The solvers on the hop objective, which these tests check (test_placement_cost.py: time)."""
    return _solve.place(*args, **{"objective": "hops", **kwargs})


def assert_valid(plan, trace, num_gpus, num_nodes, redundant):
    num_layers, num_experts = trace.load.shape
    spg = (num_experts + redundant) // num_gpus
    assert (plan.num_gpus, plan.num_nodes, plan.num_experts, plan.slots_per_gpu) == (num_gpus, num_nodes, num_experts, spg)
    assert plan.phy2log.shape == (num_layers, num_gpus * spg)
    count = presence(plan.phy2log, num_experts, num_gpus)  # (L, E, G)
    assert count.max() <= 1, "two replicas of one expert on one GPU"
    assert count.sum(axis=2).min() >= 1, "an expert without a slot"
    assert evaluate(plan, trace) == plan.metrics


@st.composite
def problems(draw, max_experts=10, with_flow=True):
    num_gpus = draw(st.sampled_from([1, 2, 3, 4, 6]))
    num_nodes = draw(st.sampled_from([n for n in (1, 2, 3) if num_gpus % n == 0]))
    num_experts = draw(st.integers(1, max_experts))
    spg = draw(st.integers(-(-num_experts // num_gpus), num_experts))
    num_layers = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    load = rng.integers(0, 30, size=(num_layers, num_experts)) * (rng.random((num_layers, num_experts)) < 0.8)
    flow = None
    if with_flow and draw(st.booleans()):
        flow = rng.integers(0, 6, size=(num_layers - 1, num_experts, num_experts)).astype(float)
    return RoutingTrace(load=load.astype(float), flow=flow), num_gpus, num_nodes, num_gpus * spg - num_experts


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_greedy_plans_are_valid(case):
    trace, num_gpus, num_nodes, redundant = case
    plan = place(trace, num_gpus, num_nodes, redundant)
    assert_valid(plan, trace, num_gpus, num_nodes, redundant)
    # replicas go to the hottest experts: an expert's last replica was worth at least any other
    # expert's current per-replica load (experts already on every GPU cannot take more)
    for layer in range(trace.num_layers):
        load, logcnt = trace.load[layer], plan.logcnt[layer]
        donors, takers = logcnt > 1, logcnt < num_gpus
        if donors.any() and takers.any():
            assert (load[donors] / (logcnt[donors] - 1)).min() >= (load[takers] / logcnt[takers]).max() - 1e-9


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_experts=8))
def test_ilp_valid_and_never_worse_than_greedy(case):
    trace, num_gpus, num_nodes, redundant = case
    greedy = place(trace, num_gpus, num_nodes, redundant)
    plan = place(trace, num_gpus, num_nodes, redundant, solver="ilp", time_limit=0.6)
    assert_valid(plan, trace, num_gpus, num_nodes, redundant)
    assert plan.metrics["objective"] <= greedy.metrics["objective"] + 1e-12
    # balance is never traded away: every layer's largest GPU load stays within greedy's
    ilp_max = gpu_loads(plan.phy2log, trace.load, num_gpus).max(axis=1)
    greedy_max = gpu_loads(greedy.phy2log, trace.load, num_gpus).max(axis=1)
    assert np.all(ilp_max <= greedy_max * (1 + 1e-9) + 1e-12)


def _brute_force_best(trace, num_gpus, num_nodes, redundant):
    """Lowest objective over every plan whose layers keep greedy's largest GPU load."""
    num_layers, num_experts = trace.load.shape
    spg = (num_experts + redundant) // num_gpus
    cap = gpu_loads(place(trace, num_gpus, num_nodes, redundant).phy2log, trace.load, num_gpus).max(axis=1)
    layer_options = []
    for layer in range(num_layers):
        rows = set()
        for row in itertools.product(range(num_experts), repeat=num_gpus * spg):
            gpus = [tuple(sorted(row[g * spg:(g + 1) * spg])) for g in range(num_gpus)]
            if any(len(set(g)) < spg for g in gpus) or len(set(row)) < num_experts:
                continue
            arr = np.array([x for g in gpus for x in g])
            if gpu_loads(arr[None], trace.load[layer:layer + 1], num_gpus).max() <= cap[layer] * (1 + 1e-12):
                rows.add(tuple(arr))
        layer_options.append(sorted(rows))
    best = np.inf
    for combo in itertools.product(*layer_options):
        plan = Plan(num_gpus, num_nodes, num_experts, spg, np.array(combo))
        best = min(best, evaluate(plan, trace)["objective"])
    return best


@pytest.mark.parametrize("num_layers, num_experts, num_gpus, num_nodes, redundant, seed", [
    (2, 3, 2, 1, 1, 0),
    (3, 3, 2, 2, 1, 1),
    (2, 4, 2, 2, 2, 2),
])
def test_ilp_matches_brute_force_on_tiny_models(num_layers, num_experts, num_gpus, num_nodes, redundant, seed):
    trace = synthetic_trace(num_layers, num_experts, top_k=1, num_tokens=40, skew=0.8, affinity=0.7, seed=seed)
    plan = place(trace, num_gpus, num_nodes, redundant, solver="ilp", time_limit=20)
    assert plan.solver["method"] == "monolithic" and plan.solver["gap"] is not None
    assert plan.solver["gap"] <= 1e-6
    assert plan.metrics["objective"] == pytest.approx(_brute_force_best(trace, num_gpus, num_nodes, redundant), abs=1e-9)


def test_ilp_cuts_hops_on_a_structured_trace():
    trace = synthetic_trace(8, 32, top_k=4, num_tokens=3000, skew=0.5, affinity=0.9, seed=5)
    greedy = place(trace, 8, 2, 8)
    plan = place(trace, 8, 2, 8, solver="ilp", time_limit=4)
    assert plan.solver["source"] == "ilp"
    assert plan.metrics["cross_gpu_fraction"] < 0.8 * greedy.metrics["cross_gpu_fraction"]
    assert plan.metrics["cross_node_fraction"] < 0.5 * greedy.metrics["cross_node_fraction"]
    assert plan.metrics["imbalance_mean"] <= greedy.metrics["imbalance_mean"] + 1e-9


def test_ilp_keeps_time_limit():
    trace = synthetic_trace(16, 64, top_k=4, num_tokens=4000, seed=1)
    t0 = time.perf_counter()
    plan = place(trace, 16, 2, 16, solver="ilp", time_limit=1.5)
    assert time.perf_counter() - t0 < 2.5
    assert plan.solver["seconds"] <= 2.5


def test_previous_plan_moves_are_bounded_and_charged():
    old = synthetic_trace(4, 16, top_k=2, num_tokens=1500, seed=2)
    new = synthetic_trace(4, 16, top_k=2, num_tokens=1500, seed=3)
    previous = place(old, 4, 2, 4)
    free = place(new, 4, 2, 4, solver="ilp", time_limit=1.0, previous=previous)
    frozen = place(new, 4, 2, 4, solver="ilp", time_limit=1.0, previous=previous, max_moves=0)
    assert frozen.solver["moved"] == 0 and np.array_equal(frozen.phy2log, previous.phy2log)
    bounded = place(new, 4, 2, 4, solver="ilp", time_limit=1.0, previous=previous, max_moves=2)
    before = presence(previous.phy2log, 16, 4) > 0
    per_layer = (presence(bounded.phy2log, 16, 4) * ~before).sum(axis=(1, 2))
    assert per_layer.max() <= 2 and bounded.solver["moved"] == per_layer.sum()
    charged = place(new, 4, 2, 4, solver="ilp", time_limit=1.0, previous=previous, move_cost=50.0)
    assert charged.solver["moved"] < free.solver["moved"]


def test_hierarchical_greedy_keeps_groups_on_one_node():
    trace = synthetic_trace(3, 16, top_k=2, num_tokens=800, seed=4)
    plan = place(trace, 4, 2, 4, num_groups=4)
    node = (np.arange(plan.phy2log.shape[1]) // plan.slots_per_gpu) // 2  # (S,)
    for layer in range(3):
        for group in range(4):
            on = {int(node[s]) for s, e in enumerate(plan.phy2log[layer]) if e // 4 == group}
            assert len(on) == 1


def test_no_flow_trace_still_solves():
    trace = RoutingTrace(load=np.random.default_rng(0).integers(1, 50, size=(5, 12)).astype(float))
    plan = place(trace, 4, 1, 4, solver="ilp", time_limit=1.0)
    assert plan.metrics["cross_gpu_fraction"] is None
    assert plan.metrics["objective"] <= place(trace, 4, 1, 4).metrics["objective"] + 1e-12


@pytest.mark.parametrize("kwargs, words", [
    (dict(num_gpus=3), "cannot be split evenly over 3 GPUs"),
    (dict(num_gpus=2, redundant=6), "more replicas than GPUs"),
    (dict(num_gpus=2, redundant=-2), "redundant"),
    (dict(num_gpus=4, num_nodes=3), "evenly over 3 nodes"),
    (dict(num_gpus=0), "num_gpus >= 1"),
    (dict(num_gpus=2, memory_cap=1), "memory cap is 1"),
    (dict(num_gpus=2, solver="magic"), "unknown solver"),
    (dict(num_gpus=2, solver="ilp", time_limit=0), "time limit"),
    (dict(num_gpus=2, solver="ilp", time_limit=float("nan")), "time limit"),
    (dict(num_gpus=2, max_moves=1), "needs a previous plan"),
    (dict(num_gpus=2, num_nodes=2, num_groups=3), "expert groups"),
])
def test_place_rejects_impossible_requests(kwargs, words):
    trace = RoutingTrace(load=np.ones((2, 4)))
    with pytest.raises(UserInputError, match=words):
        place(trace, **kwargs)


def test_place_rejects_mismatched_previous_plan():
    trace = RoutingTrace(load=np.ones((2, 4)))
    other = place(RoutingTrace(load=np.ones((3, 4))), 2)
    with pytest.raises(UserInputError, match="previous plan is for 3 layers"):
        place(trace, 2, solver="ilp", previous=other)
    with pytest.raises(UserInputError, match="only the ilp solver"):
        place(trace, 2, previous=place(trace, 2), max_moves=1)
    doubled = Plan(num_gpus=2, num_nodes=1, num_experts=4, slots_per_gpu=3, phy2log=[[0, 0, 1, 2, 3, 1]] * 2)
    with pytest.raises(UserInputError, match="two replicas of expert 0 on GPU 0 in layer 0"):
        place(trace, 2, redundant=2, solver="ilp", previous=doubled)


def test_synthetic_flow_is_consistent_with_load():
    trace = synthetic_trace(4, 16, top_k=4, num_tokens=500, seed=0)
    assert trace.load.sum(axis=1) == pytest.approx(np.full(4, 500 * 4))
    assert trace.flow.sum(axis=2) == pytest.approx(4 * trace.load[:-1])  # every routing pairs with K next ones
    assert trace.flow.sum(axis=1) == pytest.approx(4 * trace.load[1:])


def test_synthetic_affinity_concentrates_flow():
    def top_share(affinity):
        flow = synthetic_trace(3, 32, top_k=4, num_tokens=2000, affinity=affinity, seed=0).flow
        rows = np.sort(flow, axis=2)[:, :, ::-1]
        return rows[:, :, :4].sum() / flow.sum()  # share of each expert's flow to its 4 favourite successors

    assert top_share(0.9) > 2 * top_share(0.0)


@pytest.mark.slow(reason="the ILP at DeepSeek-V3 size (58 layers x 256 experts) runs to its time limit")
def test_deepseek_v3_scale_within_time_limit():
    trace = synthetic_trace(58, 256, top_k=8, num_tokens=8192, skew=0.5, affinity=0.9, seed=0)
    greedy = place(trace, 64, 8, 64)
    t0 = time.perf_counter()
    plan = place(trace, 64, 8, 64, solver="ilp", time_limit=60)
    assert time.perf_counter() - t0 < 65
    assert plan.metrics["imbalance_mean"] <= min(1.05, greedy.metrics["imbalance_mean"] + 1e-9)
    assert plan.metrics["cross_gpu_fraction"] < 0.8 * greedy.metrics["cross_gpu_fraction"]
    assert plan.metrics["cross_node_fraction"] < 0.5 * greedy.metrics["cross_node_fraction"]


def _pack_by_scanning(load, logcnt, num_gpus, slots_per_gpu):
    """The packing rule written plainly (each replica scans every GPU): the reference for the heap."""
    from moecompile.placement.greedy import _make_room

    experts = np.repeat(np.arange(load.shape[0]), logcnt)
    weight = load[experts] / logcnt[experts]
    gpu_load, held = np.zeros(num_gpus), [[] for _ in range(num_gpus)]
    for item in np.lexsort((experts, -weight)):
        e, w = int(experts[item]), float(weight[item])
        open_ = [g for g in range(num_gpus) if len(held[g]) < slots_per_gpu and e not in held[g]]
        g = min(open_, key=lambda g: (gpu_load[g], g)) if open_ else _make_room(
            e, held, gpu_load, load, logcnt, slots_per_gpu)
        held[g].append(e)
        gpu_load[g] += w
    return np.array([sorted(h) for h in held], dtype=np.int64)


def test_heap_packing_equals_the_plain_rule():
    """Random replica counts, including the ones that need _make_room, and ties."""
    from moecompile.placement.greedy import pack_replicas

    rng = np.random.default_rng(2)
    checked = 0
    for _ in range(3000):
        G, spg = int(rng.integers(2, 6)), int(rng.integers(1, 5))
        S = G * spg
        E = int(rng.integers(-(-S // G), S + 1))
        logcnt = np.ones(E, dtype=np.int64)
        for _ in range(S - E):
            room = np.flatnonzero(logcnt < G)
            if not room.size:
                break
            logcnt[rng.choice(room)] += 1
        if logcnt.sum() != S:
            continue
        load = np.round(rng.random(E) * 4) * logcnt ** rng.uniform(-1, 1)  # rounding makes ties
        np.testing.assert_array_equal(pack_replicas(load, logcnt, G, spg), _pack_by_scanning(load, logcnt, G, spg))
        checked += 1
    assert checked > 2000
