"""Replica transfer: the move of the exchange search that changes replica counts.

A slot on GPU g0 holding a replica of expert a (a has >= 2 replicas) is given to expert b (no
replica of b on g0 yet):

    GPU g0: [a x2 x3 x4 x5]   ->   GPU g0: [b x2 x3 x4 x5]      logcnt[a] -= 1, logcnt[b] += 1

Tokens of a replicated expert are split evenly, so the per-replica weights change on every GPU that
holds a or b: load[a] / (n_a - 1) on a's remaining GPUs (heavier), load[b] / (n_b + 1) on b's
(lighter, g0 included). The objective change is exact: a's flow-to-next-layer term is a share
(gain_share / n), so it is re-divided over a's remaining and b's grown set of GPUs; gain_present
and node_gain count presence on g0 and on g0's node.

Every transfer keeps each GPU load at or under `cap` (a GPU already over it may not grow) and the
move budget. Each round evaluates every (slot, b) pair at once, a (S, E) array, and applies the best
improving transfers whose experts and touched GPUs are disjoint, so every applied delta is exact.

Under caps as tight as greedy's (at 64 GPUs x 5 slots, about 1% over the mean GPU load, with
replicas of ~20% of a GPU's load) almost no transfer fits on its own. `kick_transfers` therefore
applies the best-valued transfers regardless of the cap, lets the exchange search repair the
overload (it removes overload before it seeks gain), and keeps the result only if the layer is
within the cap and strictly better.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np


def transfer_replicas(experts: np.ndarray, load: np.ndarray, gain_present: np.ndarray, gain_share: np.ndarray,
                      node_gain: np.ndarray, cap: float, num_nodes: int, moved: np.ndarray | None = None,
                      max_moves: int | None = None, max_rounds: int = 1) -> tuple[np.ndarray, int]:
    """Improve one layer's placement by moving replicas between experts.

    experts       (S,) int64      expert in each slot (slot s on GPU s // (S / G))
    load          (E,) float64    tokens of each expert in this layer
    gain_present  (E, G) float64  objective gain of a replica of e on g, whatever e's count
    gain_share    (E, G) float64  objective gain of all of e's tokens being served on g (/ logcnt)
    node_gain     (E, N) float64  objective gain of e having any replica on node n
    moved         (E, G) bool     True where a replica of e on g counts as a move
    returns       ((S,) int64 experts per slot, transfers applied)
    """
    num_experts, num_gpus = gain_present.shape
    num_slots = experts.shape[0]
    assert gain_share.shape == gain_present.shape and load.shape == (num_experts,), (gain_share.shape, load.shape)
    assert node_gain.shape == (num_experts, num_nodes) and num_slots % num_gpus == 0, (node_gain.shape, num_slots)
    assert max_moves is None or moved is not None, "max_moves needs moved"
    spg = num_slots // num_gpus
    slots = experts.reshape(num_gpus, spg).copy()
    scale = max(float(np.abs(gain_present).max(initial=0.0)), float(np.abs(gain_share).max(initial=0.0)),
                float(np.abs(node_gain).max(initial=0.0)))
    applied = 0
    for _ in range(max_rounds):
        value, feasible, d_moves = _transfer_values(slots, load, gain_present, gain_share, node_gain, cap,
                                                    num_nodes, moved)
        budget = None
        if max_moves is not None:
            budget = max_moves - int(moved[slots, np.arange(num_gpus)[:, None]].sum())
            feasible &= d_moves <= max(budget, 0)
        value[~feasible] = -np.inf
        done = _apply(slots, value, 1e-9 * scale, num_experts, d_moves, budget)
        applied += done
        if not done:
            break
    return np.sort(slots, axis=1).ravel(), applied


def _transfer_values(slots: np.ndarray, load: np.ndarray, gain_present: np.ndarray, gain_share: np.ndarray,
                     node_gain: np.ndarray, cap: float, num_nodes: int, moved: np.ndarray | None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(S, E) objective change of giving slot s to expert b, (S, E) bool feasibility under the cap,
    and (S, E) int64 change of the move count (None without a previous plan)."""
    num_experts, num_gpus = gain_present.shape
    spg = slots.shape[1]
    gpu_node = np.arange(num_gpus) // (num_gpus // num_nodes)  # (G,)
    here = np.repeat(np.arange(num_gpus), spg)  # (S,) GPU of each slot
    a = slots.ravel()  # (S,) expert giving the slot up
    present = np.zeros((num_experts, num_gpus), dtype=bool)
    present[slots, np.arange(num_gpus)[:, None]] = True
    count = present.sum(axis=1)  # (E,) logcnt
    on_node = present.reshape(num_experts, num_nodes, -1).sum(axis=2)  # (E, N)
    weight = load / count  # (E,) tokens per replica now
    gpu_load = weight[slots].sum(axis=1)  # (G,)
    share_sum = (gain_share * present).sum(axis=1)  # (E,)
    # 1. expert a loses its replica on g0 (needs another one to keep)
    n_a = count[a]
    keeps = n_a >= 2
    fewer = np.maximum(n_a - 1, 1)
    d_a = (-gain_present[a, here] + (share_sum[a] - gain_share[a, here]) / fewer - share_sum[a] / n_a
           - np.where(on_node[a, gpu_node[here]] == 1, node_gain[a, gpu_node[here]], 0.0))  # (S,)
    grow = load[a] / fewer - weight[a]  # (S,) on each of a's other GPUs
    # 2. expert b gains a replica on g0: (S, E)
    n_b = count[None, :]
    shrink = load / (count + 1) - weight  # (E,) on each of b's GPUs
    shared = gain_share[:, here].T  # (S, E) gain_share[b, g0]
    d_b = (gain_present[:, here].T + (share_sum[None, :] + shared) / (n_b + 1) - share_sum[None, :] / n_b
           + np.where(on_node[:, gpu_node[here]].T == 0, node_gain[:, gpu_node[here]].T, 0.0))
    new_g0 = gpu_load[here][:, None] - weight[a][:, None] + (load / (count + 1))[None, :]  # (S, E)
    feasible = keeps[:, None] & ~present[:, here].T & (new_g0 <= np.maximum(cap, gpu_load[here])[:, None])
    # a's other GPUs get heavier, unless they hold b too: check each of them, k-th other GPU at a time
    rank = np.cumsum(present[a], axis=1) - 1  # (S, G) index of each of a's GPUs among them
    rank = np.where(rank > rank[np.arange(a.size), here][:, None], rank - 1, rank)  # skip g0
    rank[~present[a]] = -1
    rank[np.arange(a.size), here] = -1
    for k in range(int(count.max()) - 1):
        rows, gpus = np.nonzero(rank == k)  # slots whose a has a k-th other GPU, and that GPU
        new = gpu_load[gpus][:, None] + grow[rows][:, None] + present[:, gpus].T * shrink[None, :]  # (R, E)
        feasible[rows] &= new <= np.maximum(cap, gpu_load[gpus])[:, None]
    d_moves = None
    if moved is not None:
        d_moves = moved[:, here].T.astype(np.int64) - moved[a, here].astype(np.int64)[:, None]
    return d_a[:, None] + d_b, feasible, d_moves


def _apply(slots: np.ndarray, value: np.ndarray, tol: float, num_experts: int, d_moves: np.ndarray | None,
           budget: int | None) -> int:
    """Apply improving transfers, best first, with disjoint experts and disjoint touched GPUs."""
    num_gpus, spg = slots.shape
    flat = np.flatnonzero(value.ravel() > tol)
    if flat.size == 0:
        return 0
    flat = flat[np.argsort(-value.ravel()[flat], kind="stable")][:4 * num_gpus]
    present = np.zeros((num_experts, num_gpus), dtype=bool)
    present[slots, np.arange(num_gpus)[:, None]] = True
    used_gpu = np.zeros(num_gpus, dtype=bool)
    used_expert = np.zeros(num_experts, dtype=bool)
    applied = 0
    for idx in flat:
        s, b = divmod(int(idx), num_experts)
        g0, j = divmod(s, spg)
        a = int(slots[g0, j])
        touched = present[a] | present[b]
        touched[g0] = True
        if used_expert[a] or used_expert[b] or (used_gpu & touched).any():
            continue
        if budget is not None:
            if d_moves[s, b] > max(budget, 0):
                continue
            budget -= int(d_moves[s, b])
        slots[g0, j] = b
        used_expert[[a, b]] = True
        used_gpu |= touched
        applied += 1
    return applied


def kick_transfers(experts: np.ndarray, load: np.ndarray, gain_present: np.ndarray, gain_share: np.ndarray,
                   node_gain: np.ndarray, cap: float, num_nodes: int, repair: Callable[[np.ndarray], np.ndarray],
                   tries: int, moved: np.ndarray | None = None, max_moves: int | None = None,
                   deadline: float | None = None, batch: int = 4) -> tuple[np.ndarray, int]:
    """Transfers that break the cap on their own, each followed by `repair` (the exchange search,
    which removes overload first); kept only when the repaired layer is within the cap and the move
    budget and strictly better. Tries the best-valued transfers first; returns (experts, kept)."""
    num_experts, num_gpus = gain_present.shape
    spg = experts.shape[0] // num_gpus
    best = layer_value(experts, gain_present, gain_share, node_gain, num_nodes)
    tol = 1e-9 * max(abs(best), 1e-300)
    kept = failed = 0
    tried: set[tuple[int, int, int]] = set()  # (GPU, a, b) already tried from this placement
    while failed < tries and (deadline is None or time.perf_counter() < deadline):
        slots = experts.reshape(num_gpus, spg)
        value, _, _ = _transfer_values(slots, load, gain_present, gain_share, node_gain, cap, num_nodes, None)
        present = np.zeros((num_experts, num_gpus), dtype=bool)
        present[slots, np.arange(num_gpus)[:, None]] = True
        here = np.repeat(np.arange(num_gpus), spg)
        value[np.bincount(experts, minlength=num_experts)[experts] < 2] = -np.inf  # a keeps a replica
        value[present[:, here].T] = -np.inf  # b not on g0 yet
        picks = _disjoint_picks(value, experts, present, num_experts, spg, tried, batch)
        if not picks:
            break
        trial = experts.copy()
        for pick in picks:
            tried.add(_key(pick, experts, num_experts, spg))
            s, b = divmod(pick, num_experts)
            trial[s] = b
        trial = repair(trial)
        trial_value = layer_value(trial, gain_present, gain_share, node_gain, num_nodes)
        weight = load / np.bincount(trial, minlength=num_experts)
        fits = weight[trial].reshape(num_gpus, spg).sum(axis=1).max() <= cap
        if max_moves is not None:
            fits &= int(moved[trial, np.arange(trial.size) // spg].sum()) <= max_moves
        if fits and trial_value > best + tol:
            experts, best, kept, failed = trial, trial_value, kept + len(picks), 0
            tried.clear()
        else:
            failed += 1
            batch = max(1, batch // 2)
    return experts, kept


def _disjoint_picks(value: np.ndarray, experts: np.ndarray, present: np.ndarray, num_experts: int, spg: int,
                    tried: set, batch: int) -> list[int]:
    """Up to `batch` best finite (slot, b) transfers, not tried yet, on disjoint GPUs and experts."""
    picks: list[int] = []
    used_gpu: set[int] = set()
    used_expert: set[int] = set()
    flat = value.ravel()
    for i in _top(flat, 64 * batch + 4 * len(tried)):
        if not np.isfinite(flat[i]) or len(picks) == batch:
            break
        key = _key(i, experts, num_experts, spg)
        g0, a, b = key
        touched = set(np.flatnonzero(present[a] | present[b]).tolist()) | {g0}
        if key in tried or a in used_expert or b in used_expert or used_gpu & touched:
            continue
        picks.append(int(i))
        used_gpu |= touched
        used_expert.update((a, b))
    return picks


def _top(values: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` largest values, largest first, ties in index order: the head of a
    stable argsort of -values, without sorting the rest (np.partition would put NaN first, argsort
    puts it last: with a NaN, the whole sort)."""
    if count >= values.size or count <= 0 or np.isnan(values).any():
        return np.argsort(-values, kind="stable")[:max(count, 0)]
    threshold = np.partition(values, values.size - count)[values.size - count]  # the count-th largest
    head = np.flatnonzero(values >= threshold)  # every index the head can hold, in index order
    return head[np.argsort(-values[head], kind="stable")][:count]


def layer_value(experts: np.ndarray, gain_present: np.ndarray, gain_share: np.ndarray, node_gain: np.ndarray,
                num_nodes: int) -> float:
    """The layer's objective gain of a placement (higher is better), exact for any replica counts."""
    num_experts, num_gpus = gain_present.shape
    present = np.zeros((num_experts, num_gpus), dtype=bool)
    present[experts, np.arange(experts.size) // (experts.size // num_gpus)] = True
    count = np.maximum(present.sum(axis=1), 1)
    on_node = present.reshape(num_experts, num_nodes, -1).any(axis=2)
    return float((gain_present * present).sum() + ((gain_share * present).sum(axis=1) / count).sum()
                 + (node_gain * on_node).sum())


def _key(flat: int, experts: np.ndarray, num_experts: int, spg: int) -> tuple[int, int, int]:
    s, b = divmod(int(flat), num_experts)
    return s // spg, int(experts[s]), b
