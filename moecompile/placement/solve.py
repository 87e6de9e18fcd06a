"""`place`: the one public entry of the placement solvers."""

from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Callable

import numpy as np

from ..errors import UserInputError
from . import cost
from .blocks import block_start
from .decompose import Problem, monolithic, solve_ilp, total_objective, within_caps
from .greedy import greedy_phy2log
from .metrics import NODE_WEIGHT, gpu_loads
from .plan import MAX_SLOTS, Plan, check_topology, presence
from .polish import polish
from .trace import RoutingTrace, normalized

SOLVERS = ("greedy", "ilp")
OBJECTIVES = ("time", "hops")
# With the time objective, this share of a search's time polishes its plan on the exact layer time
# (polish.py); the ILP before it prices hops as the mean GPU sees them, and stops gaining early
# (DeepSeek-V3 chain trace, 2 cores: the same layer time after 18 s as after 240 s).
POLISH_SHARE = 0.8
# Starts are searched in parallel processes (one per start, up to the cores) when at least this much
# time is left: a spawned process needs ~3 s to import what the search needs.
PARALLEL_MIN_SECONDS = 10.0


def place(trace: RoutingTrace, num_gpus: int, num_nodes: int = 1, redundant: int = 0, solver: str = "greedy",
          time_limit: float = 60.0, previous: Plan | None = None, memory_cap: int | None = None,
          progress: Callable[[str], None] | None = None, *, num_groups: int | None = None,
          max_moves: int | None = None, move_cost: float = 0.0, objective: str = "time",
          hardware: cost.Hardware | None = None, max_imbalance: float | None = None) -> Plan:
    """Place E experts plus `redundant` replicas on `num_gpus` GPUs for every layer of `trace`.

    solver      "greedy" (balanced packing, fast) or "ilp" (greedy, then the ILP within `time_limit`
                seconds in all; returns greedy's plan unless it finds a better objective)
    previous    the plan in service: with `max_moves` (per layer) or `move_cost` (objective per
                share of slots moved) the ilp solver limits or charges moved experts
    memory_cap  most expert slots one GPU can hold per layer
    num_groups  contiguous expert groups of a group-limited router: greedy packs groups by node
    progress    called with one line of text as a long solve advances
    objective   "time": the layer time of cost.py on `hardware` (default: the h100 preset with the
                trace's H and dtype); the search prices hops by cost.prices and the exact model
                picks between the found plan and the start. "hops": (imbalance_mean - 1) +
                cross_gpu_fraction + NODE_WEIGHT * cross_node_fraction, as metrics.objective
    max_imbalance  each layer's largest GPU load may reach this times the layer's mean GPU load
                (default: greedy's largest, the tightest balance it reaches; never below it)
    Raises UserInputError for inconsistent or impossible inputs.
    """
    t0 = time.perf_counter()
    # 1. check the request
    spg = _check_request(trace, num_gpus, num_nodes, redundant, solver, time_limit, memory_cap, num_groups)
    _check_previous(trace, num_gpus, spg, solver, previous, max_moves, move_cost)
    if objective not in OBJECTIVES:
        raise UserInputError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if max_imbalance is not None and (isinstance(max_imbalance, bool) or not isinstance(max_imbalance, (int, float))
                                      or not math.isfinite(max_imbalance) or max_imbalance < 1.0):
        raise UserInputError(f"max imbalance must be a number >= 1 (largest GPU load / mean), got {max_imbalance!r}")
    hw = hardware if hardware is not None else cost.hardware("h100", trace=trace)
    hop_cost, node_cost = cost.prices(hw) if objective == "time" else (1.0, NODE_WEIGHT)
    trace = normalized(trace)  # counts near 1 whatever the trace's scale; every metric is unchanged
    # 2. greedy: the baseline, the warm start, and the balance every layer must keep
    greedy = greedy_phy2log(trace.load, num_gpus, spg, num_nodes, num_groups)  # (L, S)
    cap = gpu_loads(greedy, trace.load, num_gpus).max(axis=1)  # (L,)
    prev = None if previous is None else previous.phy2log
    if prev is not None:  # the plan in service must stay a feasible start
        cap = np.maximum(cap, gpu_loads(prev, trace.load, num_gpus).max(axis=1))
    if max_imbalance is not None:  # balance traded for traffic, explicitly
        cap = np.maximum(cap, max_imbalance * trace.load.sum(axis=1) / num_gpus)
    problem = Problem(load=trace.load, flow=trace.flow, num_gpus=num_gpus, num_nodes=num_nodes,
                      cap=cap * (1 + 1e-12), previous=prev, move_cost=move_cost, max_moves=max_moves,
                      hop_cost=hop_cost, node_cost=node_cost)

    def layer_ms(phy2log: np.ndarray) -> float:
        return cost.predict(phy2log, trace.load, trace.flow, num_gpus, num_nodes, hw)["layer_ms"]

    def better(found: np.ndarray, than: np.ndarray) -> bool:
        """Strictly better on the objective: the exact layer time for "time" (the search's linear
        prices are its average), the search's objective for "hops"."""
        if objective == "time":
            return layer_ms(found) < layer_ms(than) * (1 - 1e-9)
        return total_objective(problem, found)[0] < total_objective(problem, than)[0]

    greedy_obj = total_objective(problem, greedy)[0]
    info = {"name": solver, "objective_kind": objective, "greedy_objective": greedy_obj, "gap": None,
            "prices": {"hop": hop_cost, "node": node_cost}, "greedy_layer_ms": layer_ms(greedy)}
    best, source = greedy, "greedy"
    # 3. the ILP, from the better feasible start
    if solver == "ilp":
        starts = []  # feasible starts: greedy unless it breaks the move bound, and the plan in service
        if max_moves is None or _moves_per_layer_ok(problem, greedy):
            starts.append((greedy_obj, greedy, "greedy"))
        if prev is not None:
            starts.append((total_objective(problem, prev)[0], prev, "previous"))
        _, start, source = min(starts, key=lambda c: layer_ms(c[1]) if objective == "time" else c[0])
        deadline = t0 + time_limit - min(2.0, 0.1 * time_limit)  # room to score and write the plan
        searches = {source: start}  # the best feasible start, and where the search may also begin
        if prev is None and trace.flow is not None and not monolithic(problem, greedy):
            # co-routed experts gathered from the start (not balanced: the search brings it under
            # the caps, or fails to, which is why it is not the only start)
            blocks = block_start(trace.load, trace.flow, num_gpus, spg)
            if blocks is not None:
                searches = {"block": blocks, **searches}
        # polishing on the layer time knows no moves: not when a previous plan bounds or charges them
        moves_count = max_moves is not None or bool(move_cost)
        exact = (hw, problem.cap) if objective == "time" and not moves_count else None
        results = _search_all(problem, searches, deadline, progress, exact)
        info["starts"] = {origin: {"within_caps": within_caps(problem, found), "layer_ms": layer_ms(found),
                                   "objective": total_objective(problem, found)[0]}
                          for origin, (found, _) in results.items()}
        winner = next(iter(results))  # the search whose plan within every cap is best
        for origin, (found, _) in results.items():
            if within_caps(problem, found) and (not within_caps(problem, results[winner][0])
                                                or better(found, results[winner][0])):
                winner = origin
        found, solve_info = results[winner]
        info.update(solve_info, start=winner)
        if within_caps(problem, found) and better(found, start):
            best, source = found, "ilp"
        else:
            best = start
    # 4. the plan, scored the same way for every solver
    value, metrics, moves = total_objective(problem, best)
    info.update(source=source, objective=value, layer_ms=layer_ms(best), seconds=round(time.perf_counter() - t0, 3))
    if prev is not None:
        info["moved"] = moves
    return Plan(num_gpus=num_gpus, num_nodes=num_nodes, num_experts=trace.num_experts, slots_per_gpu=spg,
                phy2log=best, metrics=metrics, solver=info, layers=trace.layers)


def _search_all(problem: Problem, searches: dict, deadline: float,
                progress: Callable[[str], None] | None, exact: tuple | None = None) -> dict:
    """{origin: (plan, solver info)} of the search from each start: in parallel processes while
    there is time for them and a core for each, else one after the other on shares of the time.
    With `exact` (hardware, (L,) caps) each search ends polishing its plan on the layer time."""
    remaining = deadline - time.perf_counter()
    say = progress or (lambda _msg: None)
    for origin, begin in searches.items():
        say(f"ilp from the {origin} plan (objective {total_objective(problem, begin)[0]:.4f})")
    if len(searches) > 1 and remaining >= PARALLEL_MIN_SECONDS and (os.cpu_count() or 1) >= 2:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        say(f"{len(searches)} starts in parallel processes, {remaining:.0f} s")
        wall_deadline = time.time() + remaining
        workers = min(len(searches), os.cpu_count() or 1)
        try:
            with _one_blas_thread(), ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {origin: pool.submit(_search_until, problem, begin, wall_deadline, exact)
                           for origin, begin in searches.items()}
                return {origin: f.result() for origin, f in futures.items()}
        except (OSError, RuntimeError) as err:  # no processes here (a sandbox): one after the other
            say(f"parallel starts unavailable ({err}); searching them in turn")
            remaining = deadline - time.perf_counter()
    results = {}
    for i, (origin, begin) in enumerate(searches.items()):
        share = (deadline - time.perf_counter()) / (len(searches) - i)
        say(f"searching from the {origin} plan, {max(share, 0):.0f} s")
        results[origin] = _search(problem, begin, time.perf_counter() + share, progress, exact)
    return results


@contextlib.contextmanager
def _one_blas_thread():
    """Processes started inside see one BLAS/OpenMP thread each: with one process per core, a BLAS
    pool per process would oversubscribe the cores (measured: the polish made 2.5x fewer sweeps)."""
    names = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({name: "1" for name in names})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _search_until(problem: Problem, begin: np.ndarray, wall_deadline: float, exact: tuple | None
                  ) -> tuple[np.ndarray, dict]:
    """_search in a worker process, to a deadline given in wall-clock time."""
    return _search(problem, begin, time.perf_counter() + (wall_deadline - time.time()), None, exact)


def _search(problem: Problem, begin: np.ndarray, deadline: float, progress: Callable[[str], None] | None,
            exact: tuple | None) -> tuple[np.ndarray, dict]:
    """The ILP from `begin`; with `exact`, its last POLISH_SHARE of the time polishes the plan it
    found on the exact layer time (a plan still over a cap goes back to the ILP for that time)."""
    if exact is None:
        return solve_ilp(problem, begin, deadline, progress)
    now = time.perf_counter()
    found, info = solve_ilp(problem, begin, deadline - POLISH_SHARE * max(deadline - now, 0.0), progress)
    if not within_caps(problem, found):  # nothing to polish yet: the ILP keeps the whole time
        return solve_ilp(problem, found, deadline, progress)
    hw, cap = exact
    found, info["polish"] = polish(found, problem.load, problem.flow, problem.num_gpus, problem.num_nodes,
                                   hw, cap, deadline)
    if progress:
        p = info["polish"]
        progress(f"polished on layer time: {p['layer_ms_before']:.3f} -> {p['layer_ms']:.3f} ms, "
                 f"{p['swaps']} swaps")
    return found, info


def _check_request(trace: RoutingTrace, num_gpus: int, num_nodes: int, redundant: int, solver: str,
                   time_limit: float, memory_cap: int | None, num_groups: int | None) -> int:
    """All preconditions on the request; returns slots per GPU."""
    if not isinstance(trace, RoutingTrace):
        raise UserInputError(f"trace must be a RoutingTrace, got {type(trace).__name__}")
    check_topology(num_gpus, num_nodes)
    if solver not in SOLVERS:
        raise UserInputError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if not _is_count(redundant):
        raise UserInputError(f"redundant slots must be a whole number >= 0, got {redundant!r}")
    if not isinstance(time_limit, (int, float)) or not math.isfinite(time_limit) or time_limit <= 0:
        raise UserInputError(f"time limit must be a positive number of seconds, got {time_limit!r}")
    num_experts = trace.num_experts
    num_slots = num_experts + redundant
    if num_slots > MAX_SLOTS:
        raise UserInputError(f"{num_experts} experts + {redundant} redundant = {num_slots} slots per layer; "
                             f"at most {MAX_SLOTS} are supported")
    if num_slots % num_gpus:
        raise UserInputError(f"{num_experts} experts + {redundant} redundant = {num_slots} slots cannot be split "
                             f"evenly over {num_gpus} GPUs")
    if num_slots > num_experts * num_gpus:
        raise UserInputError(f"{redundant} redundant slots need more replicas than GPUs: at most "
                             f"{num_experts * (num_gpus - 1)} fit without two replicas of one expert on a GPU")
    spg = num_slots // num_gpus
    if memory_cap is not None and (not _is_count(memory_cap) or spg > memory_cap):
        raise UserInputError(f"each GPU needs {spg} expert slots per layer but the memory cap is {memory_cap}")
    if num_groups is not None and (not _is_count(num_groups) or num_groups < 1 or num_experts % num_groups
                                   or num_groups % num_nodes):
        raise UserInputError(f"{num_groups} expert groups must divide {num_experts} experts and be a multiple "
                             f"of {num_nodes} nodes")
    return spg


def _check_previous(trace: RoutingTrace, num_gpus: int, spg: int, solver: str, previous: Plan | None,
                    max_moves: int | None, move_cost: float) -> None:
    if previous is None:
        if max_moves is not None or move_cost:
            raise UserInputError("a move bound or move cost needs a previous plan")
        return
    if not isinstance(previous, Plan):
        raise UserInputError(f"previous must be a Plan, got {type(previous).__name__}")
    want = (trace.num_layers, trace.num_experts, num_gpus, spg)
    got = (previous.num_layers, previous.num_experts, previous.num_gpus, previous.slots_per_gpu)
    if got != want:
        raise UserInputError("previous plan is for {} layers, {} experts, {} GPUs x {} slots; this request is "
                             "for {} layers, {} experts, {} GPUs x {} slots".format(*got, *want))
    if max_moves is not None and not _is_count(max_moves):
        raise UserInputError(f"max moves must be a whole number >= 0, got {max_moves!r}")
    if not isinstance(move_cost, (int, float)) or not math.isfinite(move_cost) or move_cost < 0:
        raise UserInputError(f"move cost must be a number >= 0, got {move_cost!r}")
    if solver != "ilp" and (max_moves is not None or move_cost):
        raise UserInputError("only the ilp solver limits or charges moves from a previous plan")
    doubled = np.argwhere(presence(previous.phy2log, previous.num_experts, num_gpus) > 1)
    if solver == "ilp" and doubled.size:
        layer, expert, gpu = (int(x) for x in doubled[0])
        raise UserInputError(f"previous plan puts two replicas of expert {expert} on GPU {gpu} in layer {layer}; "
                             "the ilp solver needs at most one per GPU")


def _moves_per_layer_ok(problem: Problem, phy2log: np.ndarray) -> bool:
    num_experts = problem.load.shape[1]
    before = presence(problem.previous, num_experts, problem.num_gpus) > 0
    moves = (presence(phy2log, num_experts, problem.num_gpus) * ~before).sum(axis=(1, 2))
    return bool(np.all(moves <= problem.max_moves))


def _is_count(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 0
