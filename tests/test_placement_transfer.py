"""Replica transfers: exact deltas and cap checks against brute force, a case only a transfer improves."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moecompile.placement.exchange import exchange_layer
from moecompile.placement.transfer import _top, _transfer_values, kick_transfers, layer_value, transfer_replicas


def _loads(experts, load, num_gpus):
    count = np.bincount(experts, minlength=load.shape[0])
    return (load / np.maximum(count, 1))[experts].reshape(num_gpus, -1).sum(axis=1)  # (G,)


def _valid(experts, num_experts, num_gpus):
    slots = experts.reshape(num_gpus, -1)
    return (np.bincount(experts, minlength=num_experts) >= 1).all() and all(
        len(set(row.tolist())) == len(row) for row in slots)


@st.composite
def layers(draw):
    num_gpus = draw(st.sampled_from([2, 3, 4, 6]))
    num_nodes = draw(st.sampled_from([n for n in (1, 2, 3) if num_gpus % n == 0]))
    num_experts = draw(st.integers(2, 9))
    spg = draw(st.integers(-(-num_experts // num_gpus), num_experts))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    # a valid start: every expert once, the rest random distinct per GPU
    slots = [[] for _ in range(num_gpus)]
    for e in rng.permutation(num_experts):
        open_ = [g for g in range(num_gpus) if len(slots[g]) < spg]
        slots[min(open_, key=lambda g: (len(slots[g]), rng.random()))].append(e)
    for row in slots:
        free = [e for e in rng.permutation(num_experts) if e not in row]
        row.extend(free[:spg - len(row)])
    experts = np.array([e for row in slots for e in row], dtype=np.int64)
    load = rng.integers(0, 30, num_experts).astype(float)
    gains = [rng.normal(size=(num_experts, num_gpus)), rng.normal(size=(num_experts, num_gpus)),
             rng.normal(size=(num_experts, num_nodes))]
    slack = draw(st.sampled_from([0.0, 0.1, 0.5]))
    cap = float(_loads(experts, load, num_gpus).max()) * (1 + slack)
    return experts, load, gains, cap, num_gpus, num_nodes


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers())
def test_transfer_values_and_caps_are_exact(case):
    experts, load, (gain_present, gain_share, node_gain), cap, num_gpus, num_nodes = case
    num_experts = load.shape[0]
    value, feasible, _ = _transfer_values(experts.reshape(num_gpus, -1), load, gain_present, gain_share, node_gain,
                                          cap, num_nodes, None)
    before = layer_value(experts, gain_present, gain_share, node_gain, num_nodes)
    old = _loads(experts, load, num_gpus)
    count = np.bincount(experts, minlength=num_experts)
    for s in range(experts.size):
        for b in range(num_experts):
            a, g0 = experts[s], s // (experts.size // num_gpus)
            if count[a] < 2 or b in experts.reshape(num_gpus, -1)[g0]:
                assert not feasible[s, b]
                continue
            after = experts.copy()
            after[s] = b
            exact = layer_value(after, gain_present, gain_share, node_gain, num_nodes) - before
            assert abs(value[s, b] - exact) < 1e-9, (s, b, value[s, b], exact)
            margin = float((np.maximum(cap, old) - _loads(after, load, num_gpus)).min())
            if abs(margin) < 1e-7:
                continue  # exactly at the cap: either answer is float rounding
            assert feasible[s, b] == (margin > 0), (s, b, margin)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers())
def test_transfers_and_kicks_keep_plans_valid_and_within_cap(case):
    experts, load, (gain_present, gain_share, node_gain), cap, num_gpus, num_nodes = case
    num_experts = load.shape[0]
    before = layer_value(experts, gain_present, gain_share, node_gain, num_nodes)
    after, applied = transfer_replicas(experts, load, gain_present, gain_share, node_gain, cap, num_nodes,
                                       max_rounds=3)
    assert _valid(after, num_experts, num_gpus)
    assert _loads(after, load, num_gpus).max() <= cap + 1e-9
    value = layer_value(after, gain_present, gain_share, node_gain, num_nodes)
    assert value > before if applied else np.array_equal(np.sort(after.reshape(num_gpus, -1), axis=1).ravel(),
                                                         np.sort(experts.reshape(num_gpus, -1), axis=1).ravel())

    def repair(x):
        count = np.bincount(x, minlength=num_experts)
        return exchange_layer(x, load / count, gain_present + gain_share / count[:, None], node_gain, cap, num_nodes)

    kicked, kept = kick_transfers(after, load, gain_present, gain_share, node_gain, cap, num_nodes, repair, tries=3)
    assert _valid(kicked, num_experts, num_gpus)
    assert _loads(kicked, load, num_gpus).max() <= cap + 1e-9
    assert layer_value(kicked, gain_present, gain_share, node_gain, num_nodes) >= value
    assert kept == 0 or layer_value(kicked, gain_present, gain_share, node_gain, num_nodes) > value


def test_transfer_is_found_where_no_exchange_improves():
    # GPU 0: [0, 1], GPU 1: [0, 2]; expert 0 is replicated. Expert 2 wants GPU 0, but so does expert 1
    # more, so no exchange helps; giving expert 0's slot on GPU 0 to expert 2 does, and fits the cap:
    # loads 10 / 15 before, 10 / 15 after (0 alone on GPU 1 carries 10, 2 halves to 5 + 5).
    experts = np.array([0, 1, 0, 2])
    load = np.array([10.0, 5.0, 10.0])
    gain_present = np.zeros((3, 2))
    gain_present[2, 0], gain_present[1, 0] = 1.0, 2.0
    zeros, node_gain = np.zeros((3, 2)), np.zeros((3, 1))
    count = np.bincount(experts, minlength=3)
    same = exchange_layer(experts, load / count, gain_present, node_gain, 15.0, 1)
    assert np.array_equal(same, experts)
    after, applied = transfer_replicas(experts, load, gain_present, zeros, node_gain, 15.0, 1)
    assert applied == 1 and after.tolist() == [1, 2, 0, 2]
    assert _loads(after, load, 2).tolist() == [10.0, 15.0]
    # with expert 0 heavier, GPU 1 would grow from 7 + 10 to 14 + 5, over a cap of 17
    assert transfer_replicas(experts, np.array([14.0, 5.0, 10.0]), gain_present, zeros, node_gain, 17.0, 1)[1] == 0


def test_transfer_respects_the_move_budget():
    experts = np.array([0, 1, 0, 2])
    load = np.array([10.0, 5.0, 10.0])
    gain_present = np.zeros((3, 2))
    gain_present[2, 0] = 1.0
    moved = np.ones((3, 2), dtype=bool)  # nothing was held before: every replica is a move
    zeros, node_gain = np.zeros((3, 2)), np.zeros((3, 1))
    assert transfer_replicas(experts, load, gain_present, zeros, node_gain, 15.0, 1, moved=moved, max_moves=4)[1] == 1
    moved[0, 0] = False  # expert 0 on GPU 0 was held: swapping it for 2 adds a move past the budget of 3
    assert transfer_replicas(experts, load, gain_present, zeros, node_gain, 15.0, 1, moved=moved, max_moves=3)[1] == 0


def test_top_is_the_head_of_a_stable_argsort():
    rng = np.random.default_rng(0)
    for _ in range(500):  # few distinct values, many -inf, some NaN: ties everywhere, also at the cut
        size = int(rng.integers(1, 200))
        values = rng.integers(-3, 4, size).astype(float)
        values[rng.random(size) < 0.3] = -np.inf
        values[rng.random(size) < 0.05] = np.nan
        count = int(rng.integers(0, size + 3))
        assert np.array_equal(_top(values, count), np.argsort(-values, kind="stable")[:count])
