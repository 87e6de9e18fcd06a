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

import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from .plan import presence


@dataclass(frozen=True)
class Window:
    """One sub-problem: W layers, E experts, G GPUs, N nodes, C the largest replica count.

    An expert whose only candidates are the GPUs it holds in `start`, with a single count option,
    is fixed: it enters the model as constants, so a neighbourhood of a few GPUs stays small.
    """

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
    moved: np.ndarray | None = None  # (W, E, G) bool  a replica of e on g counts as a move
    max_moves: np.ndarray | None = None  # (W,) int  bound on moves per layer


@dataclass(frozen=True)
class WindowResult:
    phy2log: np.ndarray  # (W, S) int64
    objective: float  # model objective of phy2log (without the constants of fixed experts)
    start_objective: float  # model objective of the start
    bound: float | None  # proven lower bound on the same scale, None if unknown
    improved: bool
    seconds: float


def solve_window(win: Window, time_limit: float) -> WindowResult:
    """Solve one window with HiGHS from `win.start`; never returns worse than the start."""
    import pulp

    num_layers, num_slots = win.start.shape
    num_experts, num_gpus = win.candidates.shape[1:]
    assert win.load.shape == (num_layers, num_experts) and win.cap.shape == (num_layers,), win.load.shape
    assert win.inner_flow.shape == (max(num_layers - 1, 0), num_experts, num_experts), win.inner_flow.shape
    assert time_limit > 0, time_limit
    t0 = time.perf_counter()
    spg = num_slots // num_gpus
    gpus_per_node = num_gpus // win.num_nodes
    start_present = presence(win.start, num_experts, num_gpus) > 0  # (W, E, G)
    start_count = start_present.sum(axis=2)  # (W, E)
    prob = pulp.LpProblem("placement", pulp.LpMinimize)
    objective: list[tuple] = []
    warm: dict = {}
    # 1. placement and count variables of free experts; cells[l][e] = [(g, c, var)], [] if fixed
    cells = [[_expert_cells(pulp, prob, win, layer, e, start_present, start_count, objective, warm)
              for e in range(num_experts)] for layer in range(num_layers)]
    assert num_layers == 1 or all(c for row in cells for c in row), "multi-layer windows fix no expert"
    # 2. equal slots and capped loads per GPU (fixed experts are constants)
    for layer in range(num_layers):
        _add_gpu_rows(pulp, prob, win, layer, cells[layer], start_present[layer], spg, objective, warm)
    # 3. node presence where a fixed neighbour rewards it
    q: dict = {}
    for layer in range(num_layers):
        for e, n in zip(*np.nonzero(win.node_gain[layer] > 0)):
            if cells[layer][e]:
                q[layer, e, n] = _node_presence(pulp, prob, cells[layer][e], layer, e, int(n), gpus_per_node, warm)
                objective.append((q[layer, e, n], -float(win.node_gain[layer, e, n])))
    # 4. flow that stays local between consecutive layers inside the window
    for layer in range(num_layers - 1):
        _add_inner_pair(pulp, prob, win, layer, cells, q, objective, warm, gpus_per_node)
    prob += pulp.LpAffineExpression(objective)
    # 5. solve from the warm start; keep the start unless HiGHS found strictly better
    for var, val in warm.items():
        var.setInitialValue(val)
    remaining = max(time_limit - (time.perf_counter() - t0), 0.01)
    prob.solve(_warm_highs(pulp)(msg=False, timeLimit=remaining, threads=1))
    start_obj = _eval(objective, warm)
    info = prob.solverModel.getInfo()
    bound = float(info.mip_dual_bound) if np.isfinite(info.mip_dual_bound) else None
    found = prob.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)
    values = {v: (v.varValue or 0.0) for v in warm}
    if found and _eval(objective, values) < start_obj - 1e-9 * max(1.0, abs(start_obj)):
        phy2log = _decode(cells, start_present, num_gpus, spg)
        return WindowResult(phy2log, _eval(objective, values), start_obj, bound, True, time.perf_counter() - t0)
    return WindowResult(win.start.copy(), start_obj, start_obj, bound, False, time.perf_counter() - t0)


def _expert_cells(pulp, prob, win: Window, layer: int, e: int, start_present: np.ndarray, start_count: np.ndarray,
                  objective: list, warm: dict) -> list:
    """Variables p[l, e, g, c] (and y[l, e, c]) of one expert; [] when the expert is fixed."""
    counts = np.flatnonzero(win.count_options[layer, e])
    gpus = np.flatnonzero(win.candidates[layer, e])
    counts = counts[counts <= gpus.size]
    if counts.size == 1 and counts[0] == start_count[layer, e] and gpus.size == counts[0] and win.load.shape[0] == 1:
        return []
    cells = [(int(g), int(c), _var(pulp, prob, f"p{layer}_{e}_{g}_{c}", 0, 1, "Binary")) for c in counts for g in gpus]
    for g, c, var in cells:
        warm[var] = float(start_present[layer, e, g] and start_count[layer, e] == c)
        coef = -(win.gain_present[layer, e, g] + win.gain_share[layer, e, g] / c)
        if coef:
            objective.append((var, float(coef)))
    if counts.size == 1:
        prob += pulp.LpAffineExpression([(v, 1) for _, _, v in cells]) == int(counts[0])
        return cells
    ys = {int(c): _var(pulp, prob, f"y{layer}_{e}_{c}", 0, 1, "Binary") for c in counts}
    prob += pulp.LpAffineExpression([(y, 1) for y in ys.values()]) == 1
    for c, y in ys.items():
        warm[y] = float(start_count[layer, e] == c)
        prob += pulp.LpAffineExpression([(v, 1) for _, cc, v in cells if cc == c] + [(y, -c)]) == 0
    for g in gpus:  # no two replicas of e on one GPU
        prob += pulp.LpAffineExpression([(v, 1) for gg, _, v in cells if gg == g]) <= 1
    return cells


def _add_gpu_rows(pulp, prob, win: Window, layer: int, cells: list, start_present: np.ndarray, spg: int,
                  objective: list, warm: dict) -> None:
    num_experts, num_gpus = start_present.shape
    fixed = np.array([not c for c in cells])  # (E,)
    const_slots = start_present[fixed].sum(axis=0)  # (G,)
    per_replica = win.load[layer] / np.maximum(start_present.sum(axis=1), 1)  # (E,) for fixed experts
    const_load = (start_present[fixed] * per_replica[fixed, None]).sum(axis=0)  # (G,)
    m = _var(pulp, prob, f"m{layer}", 0, float(win.cap[layer]))
    warm[m] = float((start_present * per_replica[:, None]).sum(axis=0).max())
    objective.append((m, float(win.balance_weight[layer])))
    on_gpu: list[list] = [[] for _ in range(num_gpus)]
    moved: list[tuple] = []
    for e, expert_cells in enumerate(cells):
        for g, c, var in expert_cells:
            on_gpu[g].append((var, win.load[layer, e] / c))
            if win.max_moves is not None and win.moved[layer, e, g]:
                moved.append((var, 1))
    for g in range(num_gpus):
        if not on_gpu[g]:
            continue
        prob += pulp.LpAffineExpression([(v, 1) for v, _ in on_gpu[g]]) == int(spg - const_slots[g])
        prob += pulp.LpAffineExpression([(v, w) for v, w in on_gpu[g] if w] + [(m, -1)]) <= -float(const_load[g])
    if win.max_moves is not None:
        const_moves = int((start_present[fixed] & win.moved[layer][fixed]).sum())
        prob += pulp.LpAffineExpression(moved) <= int(win.max_moves[layer]) - const_moves


def _node_presence(pulp, prob, cells: list, layer: int, e: int, n: int, gpus_per_node: int, warm: dict):
    """q[l, e, n] <= replicas of e on node n (q is pushed up by the objective, so q = min(1, count))."""
    q = _var(pulp, prob, f"q{layer}_{e}_{n}", 0, 1)
    on_node = [(v, 1) for g, _, v in cells if g // gpus_per_node == n]
    prob += pulp.LpAffineExpression(on_node + [(q, -1)]) >= 0
    warm[q] = min(1.0, sum(warm[v] for v, _ in on_node))
    return q


def _add_inner_pair(pulp, prob, win: Window, layer: int, cells: list, q: dict, objective: list, warm: dict,
                    gpus_per_node: int) -> None:
    """Local flow between window layers `layer` and `layer + 1`: u per GPU, v per node."""
    flow = win.inner_flow[layer]
    for e, e2 in zip(*np.nonzero(flow)):
        weight = float(flow[e, e2])
        src = {}  # g -> [(var, 1/c)]: share of e's tokens on g
        for g, c, v in cells[layer][e]:
            src.setdefault(g, []).append((v, weight / c))
        dst = {}  # g -> [var]: e2 present on g
        for g, _, v in cells[layer + 1][e2]:
            dst.setdefault(g, []).append(v)
        for g in src.keys() & dst.keys():
            u = _var(pulp, prob, f"u{layer}_{e}_{e2}_{g}", 0)
            prob += pulp.LpAffineExpression(src[g] + [(u, -1)]) >= 0
            prob += pulp.LpAffineExpression([(v, weight) for v in dst[g]] + [(u, -1)]) >= 0
            warm[u] = min(_eval(src[g], warm), weight * sum(warm[v] for v in dst[g]))
            objective.append((u, -win.hop_weight))
        if win.num_nodes == 1 or not win.node_weight:
            continue
        for n in {g // gpus_per_node for g in src} & {g // gpus_per_node for g in dst}:
            key = (layer + 1, int(e2), n)
            if key not in q:
                q[key] = _node_presence(pulp, prob, cells[layer + 1][e2], *key, gpus_per_node, warm)
            v = _var(pulp, prob, f"v{layer}_{e}_{e2}_{n}", 0)
            share = [t for g, terms in src.items() if g // gpus_per_node == n for t in terms]
            prob += pulp.LpAffineExpression(share + [(v, -1)]) >= 0
            prob += pulp.LpAffineExpression([(q[key], weight), (v, -1)]) >= 0
            warm[v] = min(_eval(share, warm), weight * warm[q[key]])
            objective.append((v, -win.hop_weight * win.node_weight))


def _var(pulp, prob, name: str, low: float | None = None, up: float | None = None, cat: str = "Continuous"):
    """A variable of `prob`; PuLP 3 attaches it on creation, older PuLP builds it standalone."""
    if hasattr(prob, "add_variable"):
        return prob.add_variable(name, low, up, cat=cat)
    return pulp.LpVariable(name, low, up, cat=cat)


_WARM_HIGHS = None


def _warm_highs(pulp):
    """pulp.HiGHS that hands HiGHS the variables' initial values as a starting solution."""
    global _WARM_HIGHS
    if _WARM_HIGHS is None:
        import highspy

        _quiet_first_instance(highspy)

        class WarmHiGHS(pulp.HiGHS):
            def callSolver(self, lp):
                start = highspy.HighsSolution()
                start.col_value = [v.varValue or 0.0 for v in lp.variables()]
                start.value_valid = True
                lp.solverModel.setSolution(start)
                lp.solverModel.run()

        _WARM_HIGHS = WarmHiGHS
    return _WARM_HIGHS


def _quiet_first_instance(highspy) -> None:
    """HiGHS prints a banner to the process's stdout when its first instance is made, whatever the
    options; make that instance with stdout (file descriptor 1) pointed at /dev/null, so that the
    CLI's table stays the only output."""
    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _eval(terms: list, values: dict) -> float:
    return float(sum(coef * values[var] for var, coef in terms))


def _decode(cells: list, start_present: np.ndarray, num_gpus: int, spg: int) -> np.ndarray:
    """Binary solution (fixed experts from the start) -> (W, S) int64 phy2log, GPU rows sorted."""
    rows = []
    for layer, layer_cells in enumerate(cells):
        held: list[list[int]] = [[] for _ in range(num_gpus)]
        for e, expert_cells in enumerate(layer_cells):
            gpus = [g for g, _, v in expert_cells if (v.varValue or 0.0) > 0.5] if expert_cells \
                else np.flatnonzero(start_present[layer, e])
            for g in gpus:
                held[int(g)].append(e)
        assert all(len(h) == spg for h in held), [len(h) for h in held]
        rows.append(np.array([sorted(h) for h in held], dtype=np.int64).ravel())
    return np.stack(rows)
