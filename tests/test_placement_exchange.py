"""Exchange search: keeping pairs' best exchanges from earlier rounds and skipping pairs whose best
moves cannot gain give exactly the plans of evaluating every pair and size each round, on random
layers and on a DeepSeek-V3-size layer."""

import numpy as np
import pytest

from moecompile.placement import exchange
from moecompile.placement.decompose import Problem, layer_gains
from moecompile.placement.greedy import greedy_phy2log
from moecompile.placement.metrics import gpu_loads
from moecompile.placement.synthetic import synthetic_trace


def _every_pair_each_round(monkeypatch):
    """The plain search: every pair and every exchange size evaluated in every round."""
    monkeypatch.setattr(exchange, "_stale_gpus", lambda before, *_: np.ones(before.shape[0], dtype=bool))
    monkeypatch.setattr(exchange, "_worth_trying", lambda sent, _a, _b, sizes, _tol:
                        np.ones((sizes, sent[0].shape[0]), dtype=bool))


def _random_layer(rng):
    num_gpus = int(rng.choice([2, 4, 8, 16]))
    num_nodes = int(rng.choice([n for n in (1, 2, 4) if num_gpus % n == 0]))
    spg = int(rng.integers(1, 6))
    num_experts = int(rng.integers(max(spg, num_gpus * spg // 3), num_gpus * spg + 1))
    # every expert once, the other slots random experts not on that GPU yet
    rows = [list(r) for r in np.array_split(rng.permutation(num_experts), num_gpus)]
    rows = [r + [int(e) for e in rng.permutation(num_experts) if e not in r][:spg - len(r)] for r in rows]
    experts = np.array([e for r in rows for e in r], dtype=np.int64)
    weight = rng.gamma(1.0, 10.0, num_experts) / np.bincount(experts, minlength=num_experts)
    gain = rng.normal(size=(num_experts, num_gpus))
    if rng.random() < 0.5:  # near a local optimum: most moves lose, so many pairs are skipped
        gain[experts, np.arange(experts.size) // spg] += 3.0
    node_gain = rng.normal(size=(num_experts, num_nodes))
    cap = float(weight[experts].reshape(num_gpus, spg).sum(axis=1).max() * rng.choice([0.9, 1.0, 1.05, 1.5]))
    moved = max_moves = None
    if rng.random() < 0.4:  # a previous plan: a budget of a few moves more than the start's
        moved = rng.random((num_experts, num_gpus)) < 0.5
        max_moves = int(moved[experts, np.arange(experts.size) // spg].sum() + rng.integers(0, 4))
    return (experts, weight, gain, node_gain, cap, num_nodes), dict(moved=moved, max_moves=max_moves,
                                                                   max_size=int(rng.integers(1, 4)))


@pytest.mark.parametrize("seed", range(6))
def test_kept_pairs_match_recomputing_every_pair(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    cases = [_random_layer(rng) for _ in range(25)]
    kept = [exchange.exchange_layer(*args, **kwargs) for args, kwargs in cases]
    _every_pair_each_round(monkeypatch)
    full = [exchange.exchange_layer(*args, **kwargs) for args, kwargs in cases]
    for (args, _), a, b in zip(cases, kept, full):
        assert np.array_equal(a, b), args[0]


def test_kept_pairs_match_at_deepseek_v3_layer_size(monkeypatch):
    num_layers, num_experts, num_gpus, num_nodes, spg = 4, 256, 64, 8, 5
    trace = synthetic_trace(num_layers, num_experts, top_k=8, num_tokens=4096, skew=0.5, affinity=0.9, seed=0)
    start = greedy_phy2log(trace.load, num_gpus, spg, num_nodes, None)
    cap = gpu_loads(start, trace.load, num_gpus).max(axis=1)
    problem = Problem(load=trace.load, flow=trace.flow, num_gpus=num_gpus, num_nodes=num_nodes, cap=cap)
    gain_present, gain_share, node_gain, _ = layer_gains(problem, start, 1)
    count = np.bincount(start[1], minlength=num_experts)
    args = (start[1], trace.load[1] / count, gain_present + gain_share / count[:, None], node_gain, float(cap[1]),
            num_nodes)
    kept = [exchange.exchange_layer(*args, max_size=size) for size in (1, 2)]
    _every_pair_each_round(monkeypatch)
    full = [exchange.exchange_layer(*args, max_size=size) for size in (1, 2)]
    assert not np.array_equal(kept[0], start[1])  # the search moved something
    for a, b in zip(kept, full):
        assert np.array_equal(a, b)


def test_skipping_never_drops_an_exchange_worth_just_over_tol(monkeypatch):
    # one 3-for-3 exchange worth tol (1e-9 here) plus ~1e-16: summed in slot order it clears tol, summed
    # best-first (the skipping bound's order) it falls ~4e-16 short of it
    gain = np.zeros((6, 2))
    gain[[0, 1, 2], 1] = [1.0, 0.9999999999865958, 0.9999999999596887]  # experts 0-2 on GPU 0 prefer GPU 1
    gain[[3, 4, 5], 0] = [-0.9999999997463211, -0.9999999997404353, -0.9999999994595286]
    args = (np.arange(6), np.ones(6), gain, np.zeros((6, 1)), 10.0, 1)
    kept = exchange.exchange_layer(*args, max_size=3)
    _every_pair_each_round(monkeypatch)
    full = exchange.exchange_layer(*args, max_size=3)
    assert full.tolist() == [3, 4, 5, 0, 1, 2]
    assert np.array_equal(kept, full)
