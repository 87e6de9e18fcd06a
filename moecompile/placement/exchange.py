"""Exchange search: the fast exact-delta improver for one layer whose neighbours are fixed.

With the layers before and after fixed, the objective of one layer is linear in "expert e has a
replica on GPU g" (the flow to and from fixed neighbours, and moves against a previous plan), plus
a node-presence term ("e has a replica somewhere on node n"). Replica counts, hence per-replica
weights, stay fixed, so the moves are exchanges between two GPUs:

    GPU a: [x1 x2 x3 x4 x5]        GPU a: [y1 y2 x3 x4 x5]
    GPU b: [y1 y2 y3 y4 y5]  ->    GPU b: [x1 x2 y3 y4 y5]       (k-for-k, k <= max_size)

Every exchange keeps slots per GPU equal, never puts two replicas of one expert on one GPU, keeps
every GPU load at or under `cap` (a GPU already over it may only get lighter, and reducing
overload is rewarded above any gain), and respects the move budget. Each round
evaluates the best exchange of every GPU pair at once (a (G(G-1)/2, Qk, Qk) array per size k), then
applies the best ones that touch disjoint GPUs and disjoint experts, so that every applied delta
is exact. The objective strictly improves each round, so the search ends.

Two shortcuts keep rounds cheap without changing the result. After the first round only pairs
with a GPU that the round changed are evaluated again (most rounds apply a few exchanges); the
other pairs' best exchanges are still exact. And a pair's k-for-k exchanges are only evaluated
when its k best single moves a -> b plus its k best b -> a could gain, which bounds every k-for-k
exchange of the pair (unless a or b is over the cap, where removing overload is worth more).
"""

from __future__ import annotations

import itertools
import time

import numpy as np

# Bound on G^2 * Qk^2 for the exchange sizes a round tries (its (G(G-1)/2, Qk, Qk) arrays hold about
# half of that): 4M float64 entries is 32 MB.
_MAX_ENTRIES = 4_000_000


def exchange_layer(experts: np.ndarray, weight: np.ndarray, gain: np.ndarray, node_gain: np.ndarray, cap: float,
                   num_nodes: int, moved: np.ndarray | None = None, max_moves: int | None = None,
                   max_size: int = 2, deadline: float | None = None) -> np.ndarray:
    """Improve one layer's placement.

    experts    (S,) int64       expert in each slot (slot s on GPU s // (S / G))
    weight     (E,) float64     tokens per replica (load / logcnt), fixed
    gain       (E, G) float64   objective gain of a replica of e on g (already / logcnt where due)
    node_gain  (E, N) float64   objective gain of e having any replica on node n
    moved      (E, G) bool      True where a replica of e on g counts as a move (not held before)
    returns    (S,) int64       improved experts per slot, GPUs' experts in increasing id order
    """
    num_experts, num_gpus = gain.shape
    num_slots = experts.shape[0]
    assert weight.shape == (num_experts,) and node_gain.shape == (num_experts, num_nodes), (weight.shape, node_gain.shape)
    assert num_slots % num_gpus == 0 and num_gpus % num_nodes == 0, (num_slots, num_gpus, num_nodes)
    assert max_moves is None or moved is not None, "max_moves needs moved"
    spg = num_slots // num_gpus
    slots = experts.reshape(num_gpus, spg).copy()  # (G, spg) working copy
    subsets = _subsets(spg, num_gpus, max_size)
    scale = max(float(np.abs(gain).max(initial=0.0)), float(np.abs(node_gain).max(initial=0.0)))
    if num_gpus < 2 or (scale == 0.0 and _overload(slots, weight, cap).sum() == 0):
        return sort_slots(slots)
    tol = 1e-9 * scale
    penalty = 1e6 * max(scale, 1e-300) / max(cap, 1e-300)  # reward per token of overload removed
    pair_a, pair_b = np.triu_indices(num_gpus, 1)  # (P,) every GPU pair a < b
    best_val = np.full(pair_a.shape, -np.inf)  # (P,) best exchange of each pair: value,
    best = np.zeros((3, pair_a.shape[0]), dtype=np.int64)  # and (size index, member sets on a and b)
    stale = np.ones(num_gpus, dtype=bool)  # GPUs whose pairs' best exchanges must be recomputed
    gpu_node = np.arange(num_gpus) // (num_gpus // num_nodes)  # (G,)
    state = _presence(slots, num_experts, gpu_node, num_nodes)
    while deadline is None or time.perf_counter() < deadline:
        load = weight[slots].sum(axis=1)  # (G,)
        budget = None if max_moves is None else max_moves - int(moved[slots, np.arange(num_gpus)[:, None]].sum())
        # 1. pairs with a stale GPU: the value of sending each slot's replica across, alone (exact)
        sel = np.flatnonzero(stale[pair_a] | stale[pair_b])
        sel_val = np.full(sel.shape, -np.inf)
        a, b = pair_a[sel], pair_b[sel]
        sent = _sent_values(slots, gain, node_gain, gpu_node, state, a, b), \
            _sent_values(slots, gain, node_gain, gpu_node, state, b, a)  # (P, spg) each
        sent_moves = None if budget is None else (_sent_moves(slots, moved, a, b), _sent_moves(slots, moved, b, a))
        # 2. their best exchanges, over all exchange sizes; the other pairs keep theirs
        slot_w, room = weight[slots], cap - load  # (G, spg), (G,)
        worth = _worth_trying(sent, room[a], room[b], len(subsets), tol)  # (K, P)
        for size, members in enumerate(subsets):  # members: (Qk, k) slot indices within a GPU
            rows = np.flatnonzero(worth[size])
            if rows.size == 0:
                continue
            val, pick = _best_exchanges(members, a[rows], b[rows], (sent[0][rows], sent[1][rows]),
                                        None if sent_moves is None else (sent_moves[0][rows], sent_moves[1][rows]),
                                        slot_w, room, penalty, budget)
            better = val > sel_val[rows]
            sel_val[rows[better]] = val[better]
            best[:, sel[rows[better]]] = np.concatenate([np.full((1, int(better.sum())), size), pick[:, better]])
        best_val[sel] = sel_val
        # 3. apply the best exchanges on disjoint GPUs and experts
        before, on_node_before = slots.copy(), state[1]
        if not _apply(slots, pair_a, pair_b, best_val, best, subsets, tol, moved, budget):
            break
        state = _presence(slots, num_experts, gpu_node, num_nodes)
        stale = _stale_gpus(before, slots, on_node_before, state[1], max_moves is not None)
    return sort_slots(slots)


def _presence(slots: np.ndarray, num_experts: int, gpu_node: np.ndarray, num_nodes: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """(E, G) bool, e has a replica on g, and (E, N) int, e's replicas per node."""
    present = np.zeros((num_experts, gpu_node.shape[0]), dtype=bool)
    present[slots, np.arange(gpu_node.shape[0])[:, None]] = True
    return present, present.reshape(num_experts, num_nodes, -1).sum(axis=2)


def _sent_values(slots: np.ndarray, gain: np.ndarray, node_gain: np.ndarray, gpu_node: np.ndarray,
                 state: tuple[np.ndarray, np.ndarray], src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(P, spg) objective change of moving the replica in each slot of GPU src[p] to GPU dst[p]
    alone: -inf where dst holds that expert already."""
    present, on_node = state
    e = slots[src]  # (P, spg)
    to, home = dst[:, None], src[:, None]
    value = gain[e, to] - gain[e, home]
    # node presence: the target node gains e if it had none; the own node loses e if this was its last
    to_node, home_node = gpu_node[to], gpu_node[home]
    enter = np.where(on_node[e, to_node] == 0, node_gain[e, to_node], 0.0)
    leave = np.where(on_node[e, home_node] == 1, node_gain[e, home_node], 0.0)
    value = value + np.where(to_node != home_node, enter - leave, 0.0)
    value[present[e, to]] = -np.inf
    return value


def _sent_moves(slots: np.ndarray, moved: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(P, spg) change of the move count of moving each slot's replica from GPU src[p] to dst[p]."""
    e = slots[src]
    return moved[e, dst[:, None]].astype(np.float64) - moved[e, src[:, None]]


def _worth_trying(sent: tuple[np.ndarray, np.ndarray], room_a: np.ndarray, room_b: np.ndarray, sizes: int,
                  tol: float) -> np.ndarray:
    """(K, P) bool: pairs whose k-for-k exchanges may improve. Without overload on a or b, no
    k-for-k exchange of a pair beats its k best moves a -> b plus its k best moves b -> a, whatever
    the cap allows; pairs where that bound is no gain are skipped (their best stays no gain). The
    bound adds its terms in another order than an exchange's value does, so it is held to half of
    `tol`: rounding (~1e-16 of the terms) never skips an exchange worth just over `tol`."""
    top = [-np.sort(-rows, axis=1)[:, :sizes].cumsum(axis=1) for rows in sent]  # (P, K) sums of the k best
    bound = (top[0] + top[1]).T  # (K, P)
    return (bound > 0.5 * tol) | (room_a < 0) | (room_b < 0)


def _best_exchanges(members: np.ndarray, a: np.ndarray, b: np.ndarray, sent: tuple[np.ndarray, np.ndarray],
                    sent_moves: tuple[np.ndarray, np.ndarray] | None, slot_w: np.ndarray, room: np.ndarray,
                    penalty: float, budget: int | None) -> tuple[np.ndarray, np.ndarray]:
    """For k-for-k exchanges with the given member sets: (P,) best value of each pair (a, b), a < b,
    and (2, P) the chosen member-set indices on a and on b."""
    send_ab, send_ba = sent[0][:, members].sum(axis=2), sent[1][:, members].sum(axis=2)  # (P, Qk) each
    out_w = slot_w[:, members].sum(axis=2)  # (G, Qk) tokens leaving with members q
    w_a, w_b = out_w[a], out_w[b]  # (P, Qk)
    gets = w_b[:, None, :] - w_a[:, :, None]  # (P, q, r) tokens a gains (b loses) by trading q for r
    room_a, room_b = room[a], room[b]  # (P,)
    total = send_ab[:, :, None] + send_ba[:, None, :]
    if room_a.min() >= 0 and room_b.min() >= 0:  # nobody over the cap: an exchange must keep it so
        total[(gets > room_a[:, None, None]) | (gets < -room_b[:, None, None])] = -np.inf
    else:  # remove overload first (rewarded above any gain), never add any
        over_a, over_b = np.maximum(-room_a, 0.0), np.maximum(-room_b, 0.0)
        d_over = (np.maximum(gets - room_a[:, None, None], 0.0) + np.maximum(-gets - room_b[:, None, None], 0.0)
                  - (over_a + over_b)[:, None, None])
        total -= penalty * d_over
        total[d_over > 0] = -np.inf
    if budget is not None:  # exchanges that would exceed the move budget on their own
        d_moves = sent_moves[0][:, members].sum(axis=2)[:, :, None] + sent_moves[1][:, members].sum(axis=2)[:, None, :]
        total[d_moves > max(budget, 0)] = -np.inf
    flat = total.reshape(total.shape[0], -1)
    arg = flat.argmax(axis=1)
    qk = members.shape[0]
    return flat[np.arange(flat.shape[0]), arg], np.stack([arg // qk, arg % qk])


def _apply(slots: np.ndarray, pair_a: np.ndarray, pair_b: np.ndarray, best_val: np.ndarray, best: np.ndarray,
           subsets: list[np.ndarray], tol: float, moved: np.ndarray | None, budget: int | None) -> bool:
    """Apply improving exchanges, best first, on disjoint GPUs and experts; False if none improves."""
    improving = np.flatnonzero(best_val > tol)
    if improving.size == 0:
        return False
    used_gpu: set[int] = set()
    used_expert: set[int] = set()
    applied = False
    for p in improving[np.argsort(-best_val[improving], kind="stable")]:
        a, b = int(pair_a[p]), int(pair_b[p])
        if a in used_gpu or b in used_gpu:
            continue
        size, q, r = (int(x) for x in best[:, p])
        on_a, on_b = subsets[size][q], subsets[size][r]
        exps = [int(x) for x in slots[a, on_a]] + [int(x) for x in slots[b, on_b]]
        if used_expert.intersection(exps):
            continue
        if budget is not None:
            rows = _sent_moves(slots, moved, np.array([a, b]), np.array([b, a]))  # (2, spg)
            d = float(rows[0, on_a].sum() + rows[1, on_b].sum())
            if d > max(budget, 0) + 1e-9:
                continue
            budget -= d
        slots[a, on_a], slots[b, on_b] = slots[b, on_b].copy(), slots[a, on_a].copy()
        used_gpu.update((a, b))
        used_expert.update(exps)
        applied = True
    return applied


def _stale_gpus(before: np.ndarray, after: np.ndarray, on_node_before: np.ndarray, on_node_after: np.ndarray,
                budgeted: bool) -> np.ndarray:
    """(G,) GPUs whose pairs' best exchanges may differ after a round: those that exchanged, and
    those holding a replica of an expert whose replicas per node changed (its node presence terms
    did). A pair of other GPUs sees the same slots, loads and per-slot values as before, so its best
    exchange stands. A move budget is shared by all pairs: with one, every pair is recomputed."""
    changed = (before != after).any(axis=1)  # (G,)
    if budgeted:
        return np.ones_like(changed)
    touched = (on_node_before != on_node_after).any(axis=1)  # (E,)
    return changed | touched[after].any(axis=1)


def _subsets(spg: int, num_gpus: int, max_size: int) -> list[np.ndarray]:
    """Member sets per exchange size k = 1..K: (Qk, k) int arrays, K bounded by _MAX_ENTRIES."""
    out = []
    for k in range(1, min(max_size, spg) + 1):
        members = np.array(list(itertools.combinations(range(spg), k)), dtype=np.int64)
        if k > 1 and num_gpus**2 * members.shape[0] ** 2 > _MAX_ENTRIES:
            break
        out.append(members)
    return out


def _overload(slots: np.ndarray, weight: np.ndarray, cap: float) -> np.ndarray:
    return np.maximum(weight[slots].sum(axis=1) - cap, 0.0)


def sort_slots(slots: np.ndarray) -> np.ndarray:
    """(G, spg) experts per GPU -> (S,) phy2log row, each GPU's experts in increasing order (as every
    solver writes them)."""
    return np.sort(slots, axis=1).ravel()
