"""The ILP solver's driver: the whole model when it is small, a decomposition when it is not.

    small model   one window over all layers (ilp.py), warm-started from the exchange search:
                  HiGHS proves a gap
    large model   block-coordinate descent over layers: with its neighbours fixed a layer's part
                  of the objective is linear (ilp.py's one-layer window), so
                    sweep 0      forward, each layer follows the flow from the layer before it
                    sweeps 1..   backward, forward, ...: each layer sees both neighbours; each
                                 sub-problem is improved by the exchange search (exchange.py),
                                 one-for-one in sweeps 0-1, then any k-for-k exchange that fits
                                 its array budget (all of them at 5 slots per GPU)
                    kick sweeps  once a sweep gains little: replica counts change too (transfer.py),
                                 by transfers that fit the cap, alternating with exchanges, then
                                 by transfers that break it, each repaired by 2-for-2 exchanges and
                                 kept only if the layer improves
                    polish       while time is left: HiGHS re-solves neighbourhoods of a few GPUs
                                 of a layer, where replica counts may change too
                  every sweep is scored exactly and the best plan so far is kept

Every layer keeps its largest GPU load at or under `cap` (greedy's, so balance never gets worse
than greedy's in any layer) and, with a previous plan and `max_moves`, its moves within the bound.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .exchange import exchange_layer
from .metrics import NODE_WEIGHT, gpu_loads, score, shares, to_nodes
from .plan import presence
from .transfer import kick_transfers, transfer_replicas

# The whole model goes to HiGHS when it has at most this many columns: measured, HiGHS proves such
# models optimal in well under a second, while at ~1500 columns (8 experts, 4 GPUs, 3 layers) its
# bound stays near zero after 10 s; DeepSeek-V3 would need ~10^9.
MONOLITHIC_MAX_COLUMNS = 400
# GPUs per polishing neighbourhood: 3 solves in ~0.1 s at E = 256; 4 already takes ~0.3 s.
POLISH_GPUS = 3
# Rounds of fitting replica transfers per layer visit in kick sweeps, each followed by exchanges.
# Not in earlier sweeps: measured at 58 layers x 64 GPUs, they slow the sweeps' descent (objective
# 0.9490 against 0.9461 after sweep 3) and end 0.2% worse; at 32 GPUs, 0.7201 against 0.7084 in 60 s.
TRANSFER_ROUNDS = 4
# Failed transfer kicks per layer visit before moving on (a kept one resets the count). Measured in
# 60 s: 4 against 2 gives objective 0.9131 against 0.9197 (DeepSeek-V3, 64 GPUs), 0.6939 against
# 0.7013 (32 GPUs), 0.8604 against 0.8733 (Qwen3-30B-A3B, 32 GPUs); 6 and 8 ended worse than 4. With
# the later, faster exchange search, 6 / 8 / 12 end at 0.9081 / 0.9078 / 0.9106 against 4's 0.9089
# (DeepSeek-V3, 64 GPUs): within run-to-run noise, so 4 stays.
KICKS = 4
# Exchange size of the repair after a kick: measured at 16 layers x 64 GPUs, 2-for-2 repairs reach
# a better objective in the same time than repairs with every exchange size (up to 5-for-5).
KICK_REPAIR_SIZE = 2
# Kick sweeps start once a sweep gains less than this share of the objective.
KICK_START = 0.003


@dataclass(frozen=True)
class Problem:
    load: np.ndarray  # (L, E) float64
    flow: np.ndarray | None  # (L-1, E, E) float64
    num_gpus: int
    num_nodes: int
    cap: np.ndarray  # (L,) float64 largest GPU load allowed per layer
    previous: np.ndarray | None = None  # (L, S) int64 phy2log of the plan in service
    move_cost: float = 0.0  # objective per moved slot share (moves / (L * S))
    max_moves: int | None = None  # per layer
    # objective = (imbalance_mean - 1) + hop_cost * cross_gpu_fraction + node_cost * cross_node_fraction:
    # 1 and NODE_WEIGHT for --objective hops, the layer-time model's prices for --objective time
    hop_cost: float = 1.0
    node_cost: float = NODE_WEIGHT

    @property
    def hop_weight(self) -> float:
        total = 0.0 if self.flow is None else float(self.flow.sum())
        return self.hop_cost / total if total > 0 else 0.0

    @property
    def node_weight(self) -> float:
        """Weight of a hop that stays on its node, relative to one that stays on its GPU."""
        return self.node_cost / self.hop_cost if self.num_nodes > 1 else 0.0


def within_caps(problem: Problem, phy2log: np.ndarray) -> bool:
    """Every layer's largest GPU load at or under its cap."""
    return bool(np.all(gpu_loads(phy2log, problem.load, problem.num_gpus).max(axis=1) <= problem.cap))


def total_objective(problem: Problem, phy2log: np.ndarray) -> tuple[float, dict, int]:
    """(objective incl. move cost, metrics, moves) of a full (L, S) phy2log."""
    metrics = score(phy2log, problem.load, problem.flow, problem.num_gpus, problem.num_nodes)
    moves = count_moves(problem, phy2log)
    hops = problem.hop_cost * (metrics["cross_gpu_fraction"] or 0.0) + problem.node_cost * (metrics["cross_node_fraction"] or 0.0)
    return metrics["imbalance_mean"] - 1.0 + hops + problem.move_cost * moves / phy2log.size, metrics, moves


def count_moves(problem: Problem, phy2log: np.ndarray) -> int:
    """Slots whose expert the previous plan did not hold on that GPU (weights to copy)."""
    if problem.previous is None:
        return 0
    num_experts = problem.load.shape[1]
    before = presence(problem.previous, num_experts, problem.num_gpus) > 0  # (L, E, G)
    after = presence(phy2log, num_experts, problem.num_gpus)
    return int((after * ~before).sum())


def solve_ilp(problem: Problem, start: np.ndarray, deadline: float,
              progress: Callable[[str], None] | None = None) -> tuple[np.ndarray, dict]:
    """Best (L, S) phy2log found by `deadline`, never worse than `start`, and solver info.

    `start` may break the caps (the block start does): the search repairs it, and only plans within
    every cap count as found; if none is, `start` itself comes back and the caller must check it.
    """
    say = progress or (lambda _msg: None)
    t0 = time.perf_counter()
    best = start
    best_obj = total_objective(problem, start)[0] if within_caps(problem, start) else np.inf
    info = {"method": "decomposition", "gap": None, "sweeps": 0, "polished": 0}
    # 1. exchange sweeps (also the warm start of the whole-model solve); once they stop improving,
    #    sweeps that also try replica transfers repaired by exchanges ("kicks")
    current, sweep, kicking = start.copy(), 0, False
    start_obj = total_objective(problem, start)[0]
    while time.perf_counter() < deadline:
        forward = sweep % 2 == 0
        for layer in (range(1 if sweep == 0 else 0, len(current)) if forward else range(len(current) - 1, -1, -1)):
            if time.perf_counter() >= deadline:
                break
            current[layer] = _exchange(problem, current, layer, use_next=sweep > 0,
                                       max_size=1 if sweep < 2 else problem.load.shape[1], deadline=deadline,
                                       kicks=KICKS if kicking else 0)
        obj = total_objective(problem, current)[0]
        say(f"sweep {sweep} {'forward' if forward else 'backward'}{' with kicks' if kicking else ''}: "
            f"objective {obj:.4f} (start {start_obj:.4f}), {time.perf_counter() - t0:.1f}s")
        info["sweeps"] = sweep = sweep + 1
        feasible = within_caps(problem, current)
        if np.isfinite(best_obj):
            improved = feasible and obj < best_obj - 1e-6 * max(1.0, abs(best_obj))
            stalling = obj > best_obj - KICK_START * max(1.0, abs(best_obj))
        else:  # from a start over its caps: the first plan within them is progress
            improved, stalling = feasible, False
        if feasible and obj < best_obj:
            best, best_obj = current.copy(), obj
        if sweep >= 3 and not improved and (kicking or not problem.hop_weight):
            break
        kicking = kicking or (sweep >= 3 and stalling and bool(problem.hop_weight))
    # 2. the whole model, or neighbourhood polishing, while time is left
    if monolithic(problem, start):
        best, gap = _solve_whole(problem, best, deadline)
        info.update(method="monolithic", gap=gap)
    elif problem.hop_weight or problem.move_cost:  # neighbourhoods cannot see a layer's max load
        best, info["polished"] = _polish(problem, best, deadline, say)
    return best, info


def layer_gains(problem: Problem, phy2log: np.ndarray, layer: int, use_next: bool = True
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Objective gains of one layer with its neighbours fixed.

    returns  gain_present (E, G)  flow from the layer before that stays local, minus move costs
             gain_share   (E, G)  flow to the layer after that stays local, to divide by logcnt
             node_gain    (E, N)  flow from the layer before that stays on the node
             moved        (E, G)  bool, a replica there would be a move (None without a previous plan)
    """
    num_layers, num_experts = problem.load.shape
    num_gpus, num_nodes = problem.num_gpus, problem.num_nodes
    hw, nw = problem.hop_weight, problem.node_weight
    gain_present = np.zeros((num_experts, num_gpus))
    gain_share = np.zeros((num_experts, num_gpus))
    node_gain = np.zeros((num_experts, num_nodes))
    if hw and layer > 0:
        share = shares(phy2log[layer - 1:layer], num_experts, num_gpus)[0][0]  # (E, G)
        gain_present += hw * problem.flow[layer - 1].T @ share
        node_gain += hw * nw * problem.flow[layer - 1].T @ to_nodes(share, num_nodes)
    if hw and use_next and layer < num_layers - 1:
        present = shares(phy2log[layer + 1:layer + 2], num_experts, num_gpus)[1][0]  # (E, G)
        on_node = np.minimum(to_nodes(present, num_nodes), 1.0)  # (E, N)
        gain_share += hw * problem.flow[layer] @ present
        gain_share += hw * nw * np.repeat(problem.flow[layer] @ on_node, num_gpus // num_nodes, axis=1)
    moved = None
    if problem.previous is not None:
        moved = presence(problem.previous[layer:layer + 1], num_experts, num_gpus)[0] == 0
        gain_present -= problem.move_cost / problem.previous.size * moved
    return gain_present, gain_share, node_gain, moved


def _exchange(problem: Problem, phy2log: np.ndarray, layer: int, use_next: bool, max_size: int,
              deadline: float, kicks: int = 0) -> np.ndarray:
    """Exchanges with replica counts fixed; with `kicks`, then replica transfers that fit the cap
    (alternating with exchanges while they help), then up to `kicks` failed cap-breaking ones."""
    gain_present, gain_share, node_gain, moved = layer_gains(problem, phy2log, layer, use_next)
    load, cap = problem.load[layer], float(problem.cap[layer])

    def repair(experts: np.ndarray, size: int = max_size) -> np.ndarray:
        logcnt = np.bincount(experts, minlength=load.shape[0])  # (E,)
        return exchange_layer(experts, load / logcnt, gain_present + gain_share / logcnt[:, None], node_gain,
                              cap, problem.num_nodes, moved=moved, max_moves=problem.max_moves,
                              max_size=size, deadline=deadline)

    experts = repair(phy2log[layer])
    for _ in range(TRANSFER_ROUNDS if kicks else 0):
        if time.perf_counter() >= deadline:
            break
        experts, applied = transfer_replicas(experts, load, gain_present, gain_share, node_gain, cap,
                                             problem.num_nodes, moved=moved, max_moves=problem.max_moves)
        if not applied:
            break
        experts = repair(experts)
    if kicks:
        experts, _ = kick_transfers(experts, load, gain_present, gain_share, node_gain, cap, problem.num_nodes,
                                    lambda x: repair(x, min(max_size, KICK_REPAIR_SIZE)), kicks, moved=moved,
                                    max_moves=problem.max_moves, deadline=deadline)
    return experts


def monolithic(problem: Problem, start: np.ndarray) -> bool:
    """Small enough for one HiGHS model over all layers (else the decomposition)."""
    return _monolithic_columns(problem, start) <= MONOLITHIC_MAX_COLUMNS


def _monolithic_columns(problem: Problem, start: np.ndarray) -> int:
    num_layers, num_experts = problem.load.shape
    counts = _count_range(problem, start)
    inner = 0 if problem.flow is None else int((problem.flow > 0).sum()) * problem.num_gpus
    return num_layers * num_experts * problem.num_gpus * counts + inner * (2 if problem.num_nodes > 1 else 1)


def _count_range(problem: Problem, start: np.ndarray) -> int:
    """Replica counts 1..C the whole-model solve may choose: C = min(G, redundant + 1)."""
    return min(problem.num_gpus, start.shape[1] - problem.load.shape[1] + 1)


def _solve_whole(problem: Problem, start: np.ndarray, deadline: float) -> tuple[np.ndarray, float | None]:
    """All layers in one HiGHS model; returns the plan and its proven relative gap (None if unknown)."""
    from .ilp import Window, solve_window

    num_layers, num_experts = problem.load.shape
    num_gpus, counts = problem.num_gpus, _count_range(problem, start)
    remaining = deadline - time.perf_counter()
    if remaining <= 0.05:
        return start, None
    mean = problem.load.sum(axis=1) / num_gpus  # (L,)
    zeros = np.zeros((num_layers, num_experts, num_gpus))
    gain_present = zeros.copy()
    moved = None
    if problem.previous is not None:
        moved = presence(problem.previous, num_experts, num_gpus) == 0
        gain_present -= problem.move_cost / problem.previous.size * moved
    count_options = np.zeros((num_layers, num_experts, counts + 1), dtype=bool)
    count_options[:, :, 1:] = True
    win = Window(load=problem.load, cap=problem.cap,
                 balance_weight=np.where(mean > 0, 1.0 / (num_layers * np.where(mean > 0, mean, 1.0)), 0.0),
                 start=start, candidates=np.ones((num_layers, num_experts, num_gpus), dtype=bool),
                 count_options=count_options, gain_present=gain_present, gain_share=zeros,
                 node_gain=np.zeros((num_layers, num_experts, problem.num_nodes)),
                 inner_flow=np.zeros((max(num_layers - 1, 0), num_experts, num_experts)) if problem.flow is None
                 else problem.flow, hop_weight=problem.hop_weight, node_weight=problem.node_weight,
                 num_nodes=problem.num_nodes, moved=moved,
                 max_moves=None if problem.max_moves is None else np.full(num_layers, problem.max_moves))
    result = solve_window(win, remaining)
    if result.bound is None:
        return result.phy2log, None
    # the model leaves out constants (the 1s of the fractions): shift its bound by what it leaves out
    bound = result.bound + total_objective(problem, start)[0] - result.start_objective
    bound = max(bound, 0.0)  # every term of the objective is >= 0
    best = total_objective(problem, result.phy2log)[0]
    # objectives are fractions of order 0.01-1: an absolute gap within solver tolerance is none
    return result.phy2log, 0.0 if best - bound <= 1e-9 else (best - bound) / max(abs(best), 1e-9)


def _polish(problem: Problem, phy2log: np.ndarray, deadline: float, say: Callable[[str], None]) -> tuple[np.ndarray, int]:
    """HiGHS over neighbourhoods of POLISH_GPUS GPUs, layer after layer, until the deadline."""
    from .ilp import Window, solve_window

    num_layers, num_experts = problem.load.shape
    num_gpus = problem.num_gpus
    rng = np.random.default_rng(0)
    improved = tried = since_improved = 0
    patience = num_layers * max(1, num_gpus // POLISH_GPUS)  # about every GPU of every layer once
    while time.perf_counter() < deadline - 0.2 and num_gpus >= 2 and since_improved < patience:
        layer = tried % num_layers
        tried += 1
        gain_present, gain_share, node_gain, moved = layer_gains(problem, phy2log, layer)
        present = presence(phy2log[layer:layer + 1], num_experts, num_gpus)[0] > 0  # (E, G)
        hood = _neighbourhood(rng, present, gain_present + gain_share, min(POLISH_GPUS, num_gpus))
        inside = present[:, hood].any(axis=1)  # (E,)
        candidates = present.copy()
        candidates[np.ix_(inside, hood)] = True
        logcnt = present.sum(axis=1)
        whole = inside & (present[:, hood].sum(axis=1) == logcnt)  # all replicas in the hood
        count_options = np.zeros((num_experts, max(int(logcnt.max()), len(hood)) + 1), dtype=bool)
        count_options[np.arange(num_experts), logcnt] = True
        count_options[whole, np.minimum(logcnt[whole] + 1, len(hood))] = True  # replicate once more
        count_options[whole, np.maximum(logcnt[whole] - 1, 1)] = True  # or drop a replica
        win = Window(load=problem.load[layer:layer + 1], cap=problem.cap[layer:layer + 1], balance_weight=np.zeros(1),
                     start=phy2log[layer:layer + 1], candidates=candidates[None], count_options=count_options[None],
                     gain_present=gain_present[None], gain_share=gain_share[None], node_gain=node_gain[None],
                     inner_flow=np.zeros((0, num_experts, num_experts)), hop_weight=problem.hop_weight,
                     node_weight=problem.node_weight, num_nodes=problem.num_nodes,
                     moved=None if moved is None else moved[None],
                     max_moves=None if problem.max_moves is None else np.array([problem.max_moves]))
        result = solve_window(win, min(0.5, deadline - time.perf_counter()))
        since_improved += 1
        if result.improved:
            phy2log = phy2log.copy()
            phy2log[layer] = result.phy2log[0]
            improved += 1
            since_improved = 0
    if tried:
        say(f"polish: {improved} of {tried} neighbourhoods improved")
    return phy2log, improved


def _neighbourhood(rng: np.random.Generator, present: np.ndarray, gain: np.ndarray, size: int) -> np.ndarray:
    """A random GPU and the GPUs its experts would most like to be on."""
    num_gpus = present.shape[1]
    first = int(rng.integers(num_gpus))
    pull = gain[present[:, first]].sum(axis=0)  # (G,)
    pull[first] = -np.inf
    return np.concatenate([[first], np.argsort(-pull, kind="stable")[:size - 1]])
