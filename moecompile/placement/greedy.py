"""Greedy balanced packing with replication of the hottest experts (the usual EPLB-style baseline).

Per layer, independently:

    1. replicas:  start with one slot per expert; give each redundant slot to the expert with the
                  largest load per replica (this minimizes the largest per-replica load)
    2. packing:   place replicas heaviest first, each on the least-loaded GPU that has a free slot and
                  no replica of the same expert yet (longest-processing-time rule)

With `num_groups` (experts in contiguous groups, as group-limited routers use) and N > 1 nodes, the
packing is hierarchical: groups are first packed onto nodes, then steps 1-2 run inside each node, so
that a token's routing group stays within one node.
"""

from __future__ import annotations

import heapq

import numpy as np


def greedy_phy2log(load: np.ndarray, num_gpus: int, slots_per_gpu: int, num_nodes: int = 1,
                   num_groups: int | None = None) -> np.ndarray:
    """(L, E) load -> (L, S) int64 phy2log, S = num_gpus * slots_per_gpu."""
    num_layers, num_experts = load.shape
    num_slots = num_gpus * slots_per_gpu
    assert num_experts <= num_slots <= num_experts * num_gpus, (num_experts, num_slots, num_gpus)
    if _can_pack_by_node(num_experts, num_gpus, slots_per_gpu, num_nodes, num_groups):
        return np.stack([_hierarchical_layer(row, num_gpus, slots_per_gpu, num_nodes, num_groups) for row in load])
    return np.stack([_flat_layer(row, num_gpus, slots_per_gpu) for row in load])


def replica_counts(load: np.ndarray, num_slots: int, max_replicas: int) -> np.ndarray:
    """(E,) load -> (E,) int64 logcnt summing to num_slots, each in [1, max_replicas]."""
    num_experts = load.shape[0]
    assert num_experts <= num_slots <= num_experts * max_replicas, (num_experts, num_slots, max_replicas)
    logcnt = np.ones(num_experts, dtype=np.int64)
    # the expert with the largest load per replica first, the lowest id on ties
    heap = [(-float(load[e]), e) for e in range(num_experts) if max_replicas > 1]
    heapq.heapify(heap)
    for _ in range(num_slots - num_experts):
        _, e = heapq.heappop(heap)
        logcnt[e] += 1
        if logcnt[e] < max_replicas:
            heapq.heappush(heap, (-float(load[e]) / int(logcnt[e]), e))
    return logcnt


def pack_replicas(load: np.ndarray, logcnt: np.ndarray, num_gpus: int, slots_per_gpu: int) -> np.ndarray:
    """(E,) load, (E,) logcnt -> (G, slots_per_gpu) int64 experts per GPU, no expert twice on a GPU."""
    num_experts = load.shape[0]
    assert int(logcnt.sum()) == num_gpus * slots_per_gpu and logcnt.max() <= num_gpus, (logcnt.sum(), num_gpus)
    experts = np.repeat(np.arange(num_experts), logcnt)  # (S,) one entry per replica
    weight = load[experts] / logcnt[experts]
    order = np.lexsort((experts, -weight))  # heaviest first, ties by expert id
    gpu_load = np.zeros(num_gpus)
    held = [[] for _ in range(num_gpus)]  # experts on each GPU
    holds = [set() for _ in range(num_gpus)]
    # GPUs with a free slot, least loaded first (ties by id); a GPU that holds the expert being
    # placed is set aside and comes back after the pick
    open_gpus = [(0.0, g) for g in range(num_gpus)]
    for item in order:
        e, w = int(experts[item]), float(weight[item])
        skipped = []
        while open_gpus and e in holds[open_gpus[0][1]]:
            skipped.append(heapq.heappop(open_gpus))
        if open_gpus:
            _, g = heapq.heappop(open_gpus)
            for entry in skipped:
                heapq.heappush(open_gpus, entry)
        else:  # rare: moves one expert, so the open GPUs are listed anew
            g = _make_room(e, held, gpu_load, load, logcnt, slots_per_gpu)
            holds = [set(h) for h in held]
            open_gpus = [(gpu_load[h], h) for h in range(num_gpus) if len(held[h]) < slots_per_gpu and h != g]
            heapq.heapify(open_gpus)
        held[g].append(e)
        holds[g].add(e)
        gpu_load[g] += w
        if len(held[g]) < slots_per_gpu:
            heapq.heappush(open_gpus, (gpu_load[g], g))
    return np.array([sorted(h) for h in held], dtype=np.int64)


def _make_room(e: int, held: list[list[int]], gpu_load: np.ndarray, load: np.ndarray, logcnt: np.ndarray,
               slots_per_gpu: int) -> int:
    """Every GPU with a free slot already holds e: move some expert x from a full GPU g without e to
    a GPU h with a free slot and without x, and return g for e. Such g, x, h always exist: e has
    fewer than G replicas placed, and g's slots_per_gpu distinct experts cannot all be on h, which
    holds e and fewer than slots_per_gpu experts."""
    h = next(h for h in range(len(held)) if len(held[h]) < slots_per_gpu)
    full = sorted((g for g in range(len(held)) if e not in held[g]), key=lambda g: gpu_load[g])
    for g in full:
        movable = [x for x in held[g] if x not in held[h]]
        if movable:
            x = min(movable, key=lambda x: load[x] / logcnt[x])
            held[g].remove(x)
            held[h].append(x)
            gpu_load[g] -= load[x] / logcnt[x]
            gpu_load[h] += load[x] / logcnt[x]
            return g
    raise AssertionError(f"no GPU can take a replica of expert {e}")  # unreachable, see docstring


def _flat_layer(load: np.ndarray, num_gpus: int, slots_per_gpu: int) -> np.ndarray:
    logcnt = replica_counts(load, num_gpus * slots_per_gpu, num_gpus)
    return pack_replicas(load, logcnt, num_gpus, slots_per_gpu).ravel()


def _can_pack_by_node(num_experts: int, num_gpus: int, slots_per_gpu: int, num_nodes: int,
                      num_groups: int | None) -> bool:
    if num_nodes == 1 or not num_groups or num_groups % num_nodes or num_experts % num_groups:
        return False
    experts_per_node, gpus_per_node = num_experts // num_nodes, num_gpus // num_nodes
    return experts_per_node <= gpus_per_node * slots_per_gpu <= experts_per_node * gpus_per_node


def _hierarchical_layer(load: np.ndarray, num_gpus: int, slots_per_gpu: int, num_nodes: int,
                        num_groups: int) -> np.ndarray:
    num_experts = load.shape[0]
    group_size, gpus_per_node = num_experts // num_groups, num_gpus // num_nodes
    # 1. groups onto nodes: heaviest group first onto the lightest node with room
    group_load = load.reshape(num_groups, group_size).sum(axis=1)
    node_groups: list[list[int]] = [[] for _ in range(num_nodes)]
    node_load = np.zeros(num_nodes)
    for grp in np.lexsort((np.arange(num_groups), -group_load)):
        n = min((n for n in range(num_nodes) if len(node_groups[n]) < num_groups // num_nodes),
                key=lambda n: (node_load[n], n))
        node_groups[n].append(int(grp))
        node_load[n] += group_load[grp]
    # 2. replicate and pack inside each node
    rows = []
    for n in range(num_nodes):
        experts = np.concatenate([np.arange(g * group_size, (g + 1) * group_size) for g in sorted(node_groups[n])])
        logcnt = replica_counts(load[experts], gpus_per_node * slots_per_gpu, gpus_per_node)
        rows.append(experts[pack_replicas(load[experts], logcnt, gpus_per_node, slots_per_gpu)])
    return np.concatenate(rows).ravel()
