"""`moecompile place`: solve or evaluate an expert placement from a routing trace.

    moecompile place TRACE --gpus G [--nodes N] [--redundant R] [--solver greedy|ilp] [--time-limit S]
                     [--previous PLAN [--max-moves M] [--move-cost C]] [--memory-cap SLOTS]
                     [--groups K] [--out PLAN] [--plot PNG] [hardware options]
    moecompile place --evaluate PLAN TRACE [--plot PNG] [hardware options]

Prints a table comparing the plan with greedy, with the layer time the cost model (cost.py) predicts
on the hardware profile (--hardware preset, --hardware-profile JSON, single fields as flags). Bad input raises UserInputError, which the top-level
CLI prints as one line and turns into exit code 2; outputs are written only after a successful
solve, each atomically.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import UserInputError
from ..files import check_output
from . import cost
from .metrics import evaluate
from .plan import Plan, load_plan, save_plan
from .solve import OBJECTIVES, SOLVERS, place
from .trace import load_trace

_PLOT_FORMATS = (".png", ".pdf", ".svg")


def register(subparsers) -> None:
    """Add the `place` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "place",
        help="place experts (and replicas) on GPUs from a routing trace",
        description="Place experts on GPUs from a routing trace (.npz or .json with load (L, E) and "
                    "optional flow (L-1, E, E)) and compare the plan with greedy balanced packing.",
        epilog="example: moecompile place trace.npz --gpus 64 --nodes 8 --redundant 64 --solver ilp "
               "--out plan.json --plot plan.png",
    )
    p.add_argument("trace", metavar="TRACE", help="routing trace, .npz or .json")
    p.add_argument("--gpus", type=int, metavar="G", help="number of GPUs (required unless --evaluate)")
    p.add_argument("--nodes", type=int, default=1, metavar="N", help="number of nodes, dividing G (default 1)")
    p.add_argument("--redundant", type=int, default=0, metavar="R",
                   help="redundant slots for replicas; E + R must be a multiple of G (default 0)")
    p.add_argument("--solver", choices=SOLVERS, default="greedy", help="greedy (default) or ilp")
    p.add_argument("--time-limit", type=float, default=60.0, metavar="S",
                   help="seconds for the whole ilp solve, greedy included (default 60)")
    p.add_argument("--previous", metavar="PLAN", help="plan in service; moves from it can be bounded or charged")
    p.add_argument("--max-moves", type=int, metavar="M", help="with --previous: at most M moved replicas per layer")
    p.add_argument("--move-cost", type=float, default=0.0, metavar="C",
                   help="with --previous: objective cost per share of slots moved (default 0)")
    p.add_argument("--memory-cap", type=int, metavar="SLOTS", help="most expert slots a GPU holds per layer")
    p.add_argument("--groups", type=int, metavar="K",
                   help="expert groups of a group-limited router; greedy then packs groups by node")
    p.add_argument("--objective", choices=OBJECTIVES, default="time",
                   help="what the ilp solver minimizes: time, the layer-time model on the hardware profile "
                        "(default), or hops, (imbalance - 1) + cross-GPU + cross-node hop fractions")
    p.add_argument("--max-imbalance", type=float, metavar="X",
                   help="let each layer's largest GPU load reach X times the mean (default: greedy's "
                        "balance) to trade balance for traffic")
    p.add_argument("--out", metavar="PLAN", help="write the plan as JSON")
    p.add_argument("--plot", metavar="PNG", help="draw per-GPU load per layer and the GPU traffic matrix")
    p.add_argument("--evaluate", metavar="PLAN", help="score an existing plan on TRACE instead of solving")
    hw = p.add_argument_group("hardware (the layer-time model; H and dtype come from the trace where it recorded them)")
    hw.add_argument("--hardware", choices=sorted(cost.PRESETS), default="h100",
                    help="preset: 8 GPUs a node, NVLink inside, one NIC per GPU (default h100)")
    hw.add_argument("--hardware-profile", metavar="JSON", help="a JSON object of profile fields over the preset")
    hw.add_argument("--hidden", type=int, metavar="H", help="hidden size (bytes per token moved = H x dtype bytes)")
    hw.add_argument("--intermediate", type=int, metavar="I", help="expert intermediate size (6 H I FLOPs a routing)")
    hw.add_argument("--dtype-bytes", type=int, metavar="B", help="bytes per activation element on the wire")
    hw.add_argument("--routings-per-gpu", type=float, metavar="T",
                    help="tokens per GPU per step x top-k (default 65536: 8192 tokens x 8)")
    hw.add_argument("--tflops", type=float, metavar="F", help="achieved expert GEMM TFLOP/s per GPU")
    hw.add_argument("--nvlink-gbps", type=float, metavar="B", help="NVLink GB/s per GPU, one direction")
    hw.add_argument("--network-gbps", type=float, metavar="B", help="network GB/s per GPU, one direction")
    hw.add_argument("--overlap", action="store_true", default=None,
                    help="all-to-all overlapped with compute: a layer takes the larger of the two")
    p.set_defaults(func=run_place)


def _hardware(args: argparse.Namespace, trace) -> cost.Hardware:
    """Preset, then the trace's H and dtype, then the profile file, then single-field flags."""
    scaled = {"flops": (args.tflops, 1e12), "nvlink_bw": (args.nvlink_gbps, 1e9), "network_bw": (args.network_gbps, 1e9)}
    flags = {"hidden": args.hidden, "intermediate": args.intermediate, "dtype_bytes": args.dtype_bytes,
             "routings_per_gpu": args.routings_per_gpu, "overlap": args.overlap,
             **{k: None if v is None else v * unit for k, (v, unit) in scaled.items()}}
    return cost.hardware(args.hardware, args.hardware_profile, trace, **flags)


def run_place(args: argparse.Namespace) -> int:
    # 1. check outputs before any work, so that a bad path never costs a solve
    check_output(args.out, "--out")
    check_output(args.plot, "--plot")
    if args.plot and not args.plot.lower().endswith(_PLOT_FORMATS):
        raise UserInputError(f"--plot {args.plot} must end in one of {', '.join(_PLOT_FORMATS)}")
    if args.plot:
        _require_matplotlib()
    trace = load_trace(args.trace)
    hw = _hardware(args, trace)  # a bad profile is refused before any solve
    # 2. evaluate an existing plan, or solve
    if args.evaluate:
        plan = load_plan(args.evaluate)
        plan = Plan(plan.num_gpus, plan.num_nodes, plan.num_experts, plan.slots_per_gpu, plan.phy2log,
                    metrics=evaluate(plan, trace), solver=plan.solver)
        redundant = plan.phy2log.shape[1] - plan.num_experts
        try:
            greedy = place(trace, plan.num_gpus, plan.num_nodes, redundant)
        except UserInputError:  # e.g. a plan with two replicas of an expert on one GPU
            greedy = None
    else:
        if args.gpus is None:
            raise UserInputError("--gpus is required (or use --evaluate PLAN)")
        previous = load_plan(args.previous) if args.previous else None
        greedy = place(trace, args.gpus, args.nodes, args.redundant, memory_cap=args.memory_cap,
                       num_groups=args.groups)
        plan = place(trace, args.gpus, args.nodes, args.redundant, solver=args.solver, time_limit=args.time_limit,
                     previous=previous, memory_cap=args.memory_cap, progress=_progress, num_groups=args.groups,
                     max_moves=args.max_moves, move_cost=args.move_cost, objective=args.objective, hardware=hw,
                     max_imbalance=args.max_imbalance)
    plan = _with_prediction(plan, trace, hw)
    greedy = _with_prediction(greedy, trace, hw) if greedy is not None else None
    # 3. outputs, each written atomically
    if args.out:
        save_plan(plan, args.out)
    if args.plot:
        from .plot import plot_plan

        plot_plan(plan, trace, args.plot)
    print(format_table(plan, greedy, evaluated=bool(args.evaluate)))
    print(f"layer ms: the cost model's mean MoE layer time (compute + all-to-all of the busiest GPU"
          f"{', overlapped' if hw.overlap else ''}) on {_profile_text(hw)}")
    return 0


def _with_prediction(plan: Plan, trace, hw: cost.Hardware) -> Plan:
    from .trace import normalized
    t = normalized(trace)
    predicted = cost.predict(plan.phy2log, t.load, t.flow, plan.num_gpus, plan.num_nodes, hw)
    return Plan(plan.num_gpus, plan.num_nodes, plan.num_experts, plan.slots_per_gpu, plan.phy2log,
                metrics={**plan.metrics, "predicted": predicted}, solver=plan.solver)


def _profile_text(hw: cost.Hardware) -> str:
    return (f"H {hw.hidden}, I {hw.intermediate}, {hw.dtype_bytes} B/elem, {hw.routings_per_gpu:g} routings/GPU, "
            f"{hw.flops / 1e12:g} TFLOP/s, NVLink {hw.nvlink_bw / 1e9:g} GB/s, network {hw.network_bw / 1e9:g} GB/s")


def format_table(plan: Plan, greedy: Plan | None, evaluated: bool = False) -> str:
    """Plan vs greedy: imbalance, hop fractions, objective, solve time."""
    name = "plan" if evaluated else f"{plan.solver.get('name', 'plan')}"
    rows = [("greedy", greedy)] if greedy is not None else []
    rows += [] if plan.solver.get("name") == "greedy" and not evaluated else [(name, plan)]
    head = (f"{'':8} {'imb mean':>9} {'imb max':>8} {'cross-GPU':>10} {'cross-node':>11} {'objective':>10} "
            f"{'layer ms':>9} {'seconds':>8}")
    lines = [f"{plan.num_layers} layers, {plan.num_experts} experts, {plan.num_gpus} GPUs on {plan.num_nodes} "
             f"node(s), {plan.slots_per_gpu} slots per GPU", head]
    for label, p in rows:
        m = p.metrics
        seconds = "" if evaluated and p is plan else f"{p.solver.get('seconds', 0.0):.2f}"
        layer_ms = f"{m['predicted']['layer_ms']:.3f}" if "predicted" in m else "n/a"
        lines.append(f"{label:8} {m['imbalance_mean']:9.4f} {m['imbalance_max']:8.4f} {_frac(m['cross_gpu_fraction']):>10} "
                     f"{_frac(m['cross_node_fraction']):>11} {m['objective']:10.4f} {layer_ms:>9} {seconds:>8}")
    notes = [] if greedy is not None else ["greedy: no plan of this shape (it never puts two replicas "
                                           "of an expert on one GPU)"]
    if not evaluated and plan.solver.get("name") == "ilp":
        gap = plan.solver.get("gap")
        gap_text = "unknown" if gap is None else (f"{gap:.1%}" if gap < 10 else "over 1000%")
        prices = plan.solver.get("prices", {})
        notes.append(f"objective {plan.solver.get('objective_kind', 'hops')}: the search prices a point of cross-GPU "
                     f"hops at {prices.get('hop', 1.0):.3g} and of cross-node hops at {prices.get('node', 1.0):.3g} more, "
                     f"a point of imbalance at 1" + ("; the layer-time model picks the plan" if plan.solver.get("objective_kind") == "time" else ""))
        notes.append(f"ilp: {plan.solver.get('method')}, gap {gap_text}"
                     + ("; kept the greedy plan (no better one found)" if plan.solver.get("source") == "greedy" else "")
                     + ("; kept the previous plan" if plan.solver.get("source") == "previous" else ""))
    starts = plan.solver.get("starts") if not evaluated else None
    if starts:
        notes.append("searched from: " + ", ".join(
            f"{origin} {s['layer_ms']:.3f} ms" + ("" if s["within_caps"] else " (over the caps)")
            for origin, s in starts.items()) + f"; kept: {plan.solver.get('start', 'none') if plan.solver.get('source') == 'ilp' else plan.solver.get('source')}")
    polished = plan.solver.get("polish") if not evaluated and plan.solver.get("source") == "ilp" else None
    if polished:
        notes.append(f"polished on the layer time: {polished['layer_ms_before']:.3f} -> {polished['layer_ms']:.3f} ms "
                     f"({polished['swaps']} exchanges in {polished['sweeps']} sweeps"
                     + (f"; then {polished['hop_swaps']} that keep flow on its GPUs at the same time"
                        if polished.get("hop_swaps") else "") + ")")
    if "moved" in plan.solver and not evaluated:
        notes.append(f"moved replicas vs previous plan: {plan.solver['moved']}")
    return "\n".join(lines + notes)


def _frac(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2%}"


def _progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserInputError("--plot needs matplotlib: pip install matplotlib") from None
