"""The placement ILP over a window of consecutive layers, modelled in PuLP and solved by HiGHS.

Given the placements of the layers just before and just after the window (fixed), it chooses, for
every layer of the window, how many replicas each expert gets and which GPUs hold them:

    variables  p[l, e, g, c] in {0, 1}   expert e has a replica on GPU g and c replicas in all
               y[l, e, c]    in {0, 1}   expert e has c replicas (only where several c are allowed)
               q[l, e, n]    in [0, 1]   expert e has a replica on node n (only where it pays)
               u[l, e, e2, g], v[l, e, e2, n] >= 0   flow between consecutive window layers that
                                                     stays on GPU g / node n
               m[l]          >= 0        largest GPU load of layer l
    subject to sum_c y[l, e, c] = 1;   sum_g p[l, e, g, c] = c * y[l, e, c]   (count options)
               sum_c p[l, e, g, c] <= 1                         (no two replicas of e on one GPU)
               sum_{e, c} p[l, e, g, c] = slots_per_gpu        (equal slots per GPU)
               sum_{e, c} load[l, e] / c * p[l, e, g, c] <= m[l] <= cap[l]
               q[l, e, n] <= sum_{g in n, c} p[l, e, g, c]
               u <= flow * share(l, e, g), u <= flow * present(l+1, e2, g); v likewise per node
               sum of p on slots the previous plan did not hold <= max_moves   (optional)
    minimize   sum_l balance_weight[l] * m[l] + move_cost * moves
               - sum p * (gain_present + gain_share / c) - sum q * node_gain - hop_weight * (sum u + node_weight * sum v)

The gains hold the flow to and from the fixed neighbours (linear in p because the neighbours are
fixed), already scaled to objective units by the caller. With the whole model as the window this is
exactly the objective of metrics.py (under the caps); with one layer it is the exact change of that
objective when only this layer moves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Window:
    """One sub-problem. W layers, E experts, G GPUs, N nodes, C count options."""

    load: np.ndarray  # (W, E) float64
    cap: np.ndarray  # (W,) float64 largest allowed GPU load
    balance_weight: np.ndarray  # (W,) objective per token of the largest GPU load
    start: np.ndarray  # (W, S) int64 phy2log, feasible: the warm start
    candidates: np.ndarray  # (W, E, G) bool  GPUs that may hold e (includes start's)
    count_options: np.ndarray  # (W, E, C+1) bool  allowed replica counts (includes start's)
    gain_present: np.ndarray  # (W, E, G) gain when e has a replica on g
    gain_share: np.ndarray  # (W, E, G) gain / c when e has a replica on g and c replicas
    node_gain: np.ndarray  # (W, E, N) gain when e has a replica on node n
    inner_flow: np.ndarray  # (W-1, E, E) flow between consecutive window layers
    hop_weight: float
    node_weight: float
    num_nodes: int
    moved_cost: np.ndarray | None = None  # (W, E, G) cost of a replica of e on g (not held before)
    max_moves: np.ndarray | None = None  # (W,) bound on replicas not held before, or None


@dataclass(frozen=True)
class WindowResult:
    phy2log: np.ndarray  # (W, S) int64
    objective: float  # model objective of phy2log
    bound: float | None  # best proven lower bound, None if unknown
    status: str
    seconds: float


def solve_window(win: Window, time_limit: float, **options) -> WindowResult:
    """Solve one window; never returns worse than `win.start` on the model objective."""
    import pulp

    num_layers, num_slots = win.start.shape
    num_experts, num_gpus = win.candidates.shape[1:]
    assert win.load.shape == (num_layers, num_experts) and win.cap.shape == (num_layers,), win.load.shape
    assert win.inner_flow.shape == (num_layers - 1, num_experts, num_experts), win.inner_flow.shape
    assert time_limit > 0, time_limit
    t0 = time.perf_counter()
    spg = num_slots // num_gpus
    gpus_per_node = num_gpus // win.num_nodes
    start_present = _presence(win.start, num_experts, num_gpus)  # (W, E, G)
    start_count = start_present.sum(axis=2).astype(np.int64)  # (W, E)
    prob = pulp.LpProblem("placement", pulp.LpMinimize)
    objective: list[tuple] = []
    warm: dict = {}
    # 1. placement and count variables; p_by[l][e] = [(g, c, var)]
    p_by: list[list[list]] = []
    for layer in range(num_layers):
        rows = []
        for e in range(num_experts):
            counts = np.flatnonzero(win.count_options[layer, e])
            gpus = np.flatnonzero(win.candidates[layer, e])
            cells = [(int(g), int(c), pulp.LpVariable(f"p{layer}_{e}_{g}_{c}", cat="Binary"))
                     for c in counts if c <= gpus.size for g in gpus]
            for g, c, var in cells:
                warm[var] = float(start_present[layer, e, g] > 0 and start_count[layer, e] == c)
                gain = win.gain_present[layer, e, g] + win.gain_share[layer, e, g] / c
                cost = 0.0 if win.moved_cost is None else win.moved_cost[layer, e, g]
                if cost - gain:
                    objective.append((var, cost - gain))
            if counts.size > 1:
                ys = {c: pulp.LpVariable(f"y{layer}_{e}_{c}", cat="Binary") for c in counts if c <= gpus.size}
                prob += pulp.LpAffineExpression([(v, 1) for v in ys.values()]) == 1
                for c, yv in ys.items():
                    warm[yv] = float(start_count[layer, e] == c)
                    prob += pulp.LpAffineExpression([(v, 1) for _, cc, v in cells if cc == c] + [(yv, -c)]) == 0
                for g in gpus:
                    prob += pulp.LpAffineExpression([(v, 1) for gg, _, v in cells if gg == g]) <= 1
            else:
                prob += pulp.LpAffineExpression([(v, 1) for _, _, v in cells]) == int(counts[0])
            rows.append(cells)
        p_by.append(rows)
    # 2. slots, loads and balance per GPU
    for layer in range(num_layers):
        m = pulp.LpVariable(f"m{layer}", 0, float(win.cap[layer]))
        warm[m] = float(_gpu_load(win.start[layer], win.load[layer], num_gpus).max())
        objective.append((m, float(win.balance_weight[layer])))
        on_gpu: list[list] = [[] for _ in range(num_gpus)]
        for e, cells in enumerate(p_by[layer]):
            for g, c, var in cells:
                on_gpu[g].append((var, win.load[layer, e] / c))
        for g in range(num_gpus):
            prob += pulp.LpAffineExpression([(v, 1) for v, _ in on_gpu[g]]) == spg
            prob += pulp.LpAffineExpression([(v, w) for v, w in on_gpu[g] if w] + [(m, -1)]) <= 0
        if win.max_moves is not None and win.moved_cost is not None:
            moved = [(v, 1) for e, cells in enumerate(p_by[layer]) for g, c, v in cells if win.moved_cost[layer, e, g] > 0]
            prob += pulp.LpAffineExpression(moved) <= int(win.max_moves[layer])
    # 3. node presence where a fixed neighbour or an inner pair rewards it
    q = {}
    for layer in range(num_layers):
        for e in range(num_experts):
            for n in np.flatnonzero(win.node_gain[layer, e] > 0):
                q[layer, e, n] = _node_presence(pulp, prob, p_by[layer][e], layer, e, int(n), gpus_per_node, warm)
                objective.append((q[layer, e, n], -float(win.node_gain[layer, e, n])))
    # 4. flow that stays local between consecutive layers inside the window
    for layer in range(num_layers - 1):
        _add_inner_pair(pulp, prob, win, layer, p_by, q, objective, warm, gpus_per_node)
    prob += pulp.LpAffineExpression(objective)
    # 5. solve from the warm start
    solver = _warm_highs(pulp)(msg=False, timeLimit=max(time_limit - (time.perf_counter() - t0), 0.05), threads=1, **options)
    for var, val in warm.items():
        var.setInitialValue(val)
    import os
    if os.environ.get('DUMP'): prob.writeMPS(os.environ['DUMP'])
    prob.solve(solver)
    start_obj = _eval(objective, warm)
    info = prob.solverModel.getInfo()
    found = prob.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)
    new_obj = _eval(objective, {v: (v.varValue or 0.0) for v in warm}) if found else np.inf
    bound = float(info.mip_dual_bound) if np.isfinite(info.mip_dual_bound) else None
    if found and new_obj < start_obj - 1e-12:
        phy2log = _decode(p_by, num_gpus, spg)
        return WindowResult(phy2log, new_obj, bound, pulp.LpStatus[prob.status], time.perf_counter() - t0)
    return WindowResult(win.start.copy(), start_obj, bound, "kept start", time.perf_counter() - t0)


def _node_presence(pulp, prob, cells: list, layer: int, e: int, n: int, gpus_per_node: int, warm: dict):
    """q[l, e, n] <= replicas of e on node n (q is pushed up by the objective, so q = min(1, count))."""
    q = pulp.LpVariable(f"q{layer}_{e}_{n}", 0, 1)
    on_node = [(v, 1) for g, _, v in cells if g // gpus_per_node == n]
    prob += pulp.LpAffineExpression(on_node + [(q, -1)]) >= 0
    warm[q] = min(1.0, sum(warm[v] for v, _ in on_node))
    return q


def _add_inner_pair(pulp, prob, win: Window, layer: int, p_by: list, q: dict, objective: list, warm: dict,
                    gpus_per_node: int) -> None:
    """Local flow between window layers `layer` and `layer + 1`: u per GPU, v per node."""
    flow = win.inner_flow[layer]
    for e, e2 in zip(*np.nonzero(flow)):
        weight = float(flow[e, e2])
        src = {}  # g -> [(var, 1/c)]: share of e's tokens on g
        for g, c, v in p_by[layer][e]:
            src.setdefault(g, []).append((v, weight / c))
        dst = {}  # g -> [var]: e2 present on g
        for g, _, v in p_by[layer + 1][e2]:
            dst.setdefault(g, []).append(v)
        for g in src.keys() & dst.keys():
            u = pulp.LpVariable(f"u{layer}_{e}_{e2}_{g}", 0)
            prob += pulp.LpAffineExpression(src[g] + [(u, -1)]) >= 0
            prob += pulp.LpAffineExpression([(v, weight) for v in dst[g]] + [(u, -1)]) >= 0
            warm[u] = min(_eval(src[g], warm), weight * sum(warm[v] for v in dst[g]))
            objective.append((u, -win.hop_weight))
        if win.num_nodes == 1 or not win.node_weight:
            continue
        for n in {g // gpus_per_node for g in src} & {g // gpus_per_node for g in dst}:
            key = (layer + 1, int(e2), n)
            if key not in q:
                q[key] = _node_presence(pulp, prob, p_by[layer + 1][e2], *key, gpus_per_node, warm)
            v = pulp.LpVariable(f"v{layer}_{e}_{e2}_{n}", 0)
            share = [t for g, terms in src.items() if g // gpus_per_node == n for t in terms]
            prob += pulp.LpAffineExpression(share + [(v, -1)]) >= 0
            prob += pulp.LpAffineExpression([(q[key], weight), (v, -1)]) >= 0
            warm[v] = min(_eval(share, warm), weight * warm[q[key]])
            objective.append((v, -win.hop_weight * win.node_weight))


_WARM_HIGHS = None


def _warm_highs(pulp):
    """pulp.HiGHS that hands HiGHS the variables' initial values as a starting solution."""
    global _WARM_HIGHS
    if _WARM_HIGHS is None:
        import highspy

        class WarmHiGHS(pulp.HiGHS):
            def callSolver(self, lp):
                start = highspy.HighsSolution()
                start.col_value = [v.varValue or 0.0 for v in lp.variables()]
                start.value_valid = True
                lp.solverModel.setSolution(start)
                lp.solverModel.run()

        _WARM_HIGHS = WarmHiGHS
    return _WARM_HIGHS


def _eval(terms: list, values: dict) -> float:
    return float(sum(coef * values[var] for var, coef in terms))


def _decode(p_by: list, num_gpus: int, spg: int) -> np.ndarray:
    """Binary solution -> (W, S) int64 phy2log (experts of each GPU in increasing id order)."""
    rows = []
    for layer_cells in p_by:
        held: list[list[int]] = [[] for _ in range(num_gpus)]
        for e, cells in enumerate(layer_cells):
            for g, _, v in cells:
                if (v.varValue or 0.0) > 0.5:
                    held[g].append(e)
        assert all(len(h) == spg for h in held), [len(h) for h in held]
        rows.append(np.array([sorted(h) for h in held], dtype=np.int64).ravel())
    return np.stack(rows)


def _presence(phy2log: np.ndarray, num_experts: int, num_gpus: int) -> np.ndarray:
    from .plan import presence

    return presence(phy2log, num_experts, num_gpus)


def _gpu_load(phy2log_row: np.ndarray, load_row: np.ndarray, num_gpus: int) -> np.ndarray:
    from .metrics import gpu_loads

    return gpu_loads(phy2log_row[None], load_row[None], num_gpus)[0]
