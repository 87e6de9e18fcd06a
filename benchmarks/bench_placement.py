"""Placement benchmark: greedy vs ILP on synthetic traces at DeepSeek-V3 and Qwen3-30B-A3B sizes,
and on any recorded traces.

    python benchmarks/bench_placement.py                      # synthetic suite, 60 s per ILP solve
    python benchmarks/bench_placement.py --quick              # smaller, for a smoke run
    python benchmarks/bench_placement.py --trace a.npz b.npz  # recorded traces (moecompile trace)
    python benchmarks/bench_placement.py --grid --sizes DeepSeek-V3 --gpus 64 --generators topic chain \
        --seeds 0 1 2 --affinities 0.5 0.7                    # the layer-time grid (below)

--grid: greedy vs the ILP (objective time, h100 preset) on every size x GPU count x generator
(`topic`: synthetic_trace; `chain`: chain_trace, per-slot chains with all K*K pairs counted) x
seed x affinity; per row the predicted layer time of both and the cut, imbalance, the hop
fractions with their lower bounds (cost.bounds) and which start the kept plan came from. Rows are
printed and the JSON rewritten as each finishes; a plot of the time cut against affinity per
generator goes beside the JSON. The targets it checks (DeepSeek-V3, G = 64, N = 8, R = 64): at
affinity 0.7, predicted layer time >= 5% below greedy's, mean imbalance no worse, cross-node hops
<= 0.90 x greedy's; at affinity 0.5, every plan strictly faster than greedy's.

Synthetic traces come from `moecompile.placement.synthetic.synthetic_trace`: tokens with a
Zipf-popular topic (exponent `skew`), per layer disjoint topic sets of K experts shuffled
independently, lognormal expert popularity (sigma = `skew`), and each of a token's K picks taken
from its topic's set with probability `affinity` (the inter-layer affinity knob), else by
popularity. The suite runs every size at the default affinity and sweeps affinity at the target
configuration (DeepSeek-V3, G = 64, N = 8, 64 redundant slots).

Targets checked at DeepSeek-V3 size, G = 64, N = 8, 64 redundant slots, 60 s: ILP mean imbalance
<= 1.05, and cross-GPU hop fraction at least 30% below greedy's at no worse mean imbalance.
Prints a table; writes JSON (machine, date, generator, every run) to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moecompile.placement import cost, load_trace, place  # noqa: E402
from moecompile.placement.synthetic import chain_trace, synthetic_trace  # noqa: E402

# (name, layers, experts, top_k, [(gpus, nodes, redundant), ...])
SIZES = [
    ("DeepSeek-V3", 58, 256, 8, [(64, 8, 64), (32, 4, 32)]),
    ("Qwen3-30B-A3B", 48, 128, 8, [(32, 4, 32), (16, 2, 16)]),
]
# each model's hidden size and expert intermediate size: the layer-time model's bytes and FLOPs per routing
DIMS = {"DeepSeek-V3": (7168, 2048), "Qwen3-30B-A3B": (2048, 768)}
TARGET = ("DeepSeek-V3", 64, 8, 64)
GENERATOR = {"num_tokens": 8192, "skew": 0.5, "affinity": 0.9, "seed": 0}
AFFINITY_SWEEP = (0.0, 0.5, 0.8, 0.95)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", nargs="+", default=[], metavar="FILE", help="recorded trace files to benchmark")
    parser.add_argument("--config", nargs="+", default=None, metavar="G:N:R",
                        help="GPU/node/redundant configurations for --trace (default: 4:2:4 and 8:2:8)")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per ILP solve (default 60)")
    parser.add_argument("--quick", action="store_true", help="small sizes and 10 s solves, for a smoke run")
    parser.add_argument("--no-sweep", action="store_true", help="skip the affinity sweep")
    parser.add_argument("--out", default=None, help="results JSON (default benchmarks/results/placement_<kind>.json)")
    parser.add_argument("--date", default=datetime.date.today().isoformat(), help="date recorded in the JSON")
    parser.add_argument("--grid", action="store_true", help="the layer-time grid (see the module docstring)")
    parser.add_argument("--sizes", nargs="+", default=[s[0] for s in SIZES], choices=[s[0] for s in SIZES])
    parser.add_argument("--gpus", nargs="+", type=int, default=None, help="GPU counts of --grid (default: each size's)")
    parser.add_argument("--generators", nargs="+", default=list(GENERATORS), choices=list(GENERATORS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--affinities", nargs="+", type=float, default=[0.0, 0.5, 0.7, 0.95])
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="--grid: no solves; merge the rows of these grid results into --out (table, targets, plot)")
    parser.add_argument("--compare-hops", action="store_true",
                        help="--grid: also solve with --objective hops (the plans before the time objective)")
    args = parser.parse_args(argv)
    if args.grid:
        return _grid(args)
    time_limit = 10.0 if args.quick and args.time_limit == 60.0 else args.time_limit
    runs = []
    if args.trace:
        configs = [tuple(int(x) for x in c.split(":")) for c in (args.config or ["4:2:4", "8:2:8"])]
        for path in args.trace:
            trace = load_trace(path)
            for gpus, nodes, redundant in configs:
                runs.append(_compare(os.path.basename(path), trace, gpus, nodes, redundant, time_limit,
                                     {"file": os.path.basename(path)}))
    else:
        for name, layers, experts, top_k, configs in _sizes(args.quick):
            trace = synthetic_trace(layers, experts, top_k, **GENERATOR)
            for gpus, nodes, redundant in configs:
                runs.append(_compare(name, trace, gpus, nodes, redundant, time_limit, dict(GENERATOR, top_k=top_k)))
        if not args.no_sweep and not args.quick:
            name, gpus, nodes, redundant = TARGET
            _, layers, experts, top_k, _ = next(s for s in SIZES if s[0] == name)
            for affinity in AFFINITY_SWEEP:
                gen = dict(GENERATOR, affinity=affinity)
                trace = synthetic_trace(layers, experts, top_k, **gen)
                runs.append(_compare(name, trace, gpus, nodes, redundant, time_limit, dict(gen, top_k=top_k)))
    targets = _targets(runs, time_limit)
    print(_table(runs))
    for line in targets["lines"]:
        print(line)
    kind = "recorded" if args.trace else ("quick" if args.quick else "synthetic")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"placement_{kind}.json")
    result = {"date": args.date, "machine": _machine(), "time_limit_s": time_limit, "generator_defaults": GENERATOR,
              "runs": runs, "targets": {k: v for k, v in targets.items() if k != "lines"}}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(out + ".tmp", out)
    print(f"wrote {out}")
    return 0


GENERATORS = {"topic": synthetic_trace, "chain": chain_trace}


def _grid(args) -> int:
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"placement_time_{args.date}.json")
    result = {"date": args.date, "machine": _machine(), "time_limit_s": args.time_limit, "hardware": "h100",
              "generator_defaults": {"num_tokens": GENERATOR["num_tokens"], "skew": GENERATOR["skew"]}, "rows": [],
              "targets": {"lines": [], "checks": {}}}
    print(_grid_head())
    if args.merge:
        for path in args.merge:
            with open(path) as f:
                result["rows"] += json.load(f)["rows"]
        for row in result["rows"]:
            print(_grid_line(row))
        result["targets"] = _grid_targets(result["rows"])
        _write(out, result)
    for name, layers, experts, top_k, configs in [] if args.merge else _sizes(args.quick):
        if not args.quick and name not in args.sizes:
            continue
        for gpus, nodes, redundant in configs:
            if args.gpus and gpus not in args.gpus:
                continue
            for generator in args.generators:
                for affinity in args.affinities:
                    for seed in args.seeds:
                        trace = GENERATORS[generator](layers, experts, top_k, num_tokens=GENERATOR["num_tokens"],
                                                      skew=GENERATOR["skew"], affinity=affinity, seed=seed)
                        row = _grid_row(name, trace, gpus, nodes, redundant, args.time_limit,
                                        dict(generator=generator, affinity=affinity, seed=seed), args.compare_hops)
                        result["rows"].append(row)
                        print(_grid_line(row), flush=True)
                        result["targets"] = _grid_targets(result["rows"])
                        _write(out, result)  # as it goes: a long grid keeps what it finished
    for line in result["targets"]["lines"]:
        print(line)
    _grid_plot(result["rows"], out.removesuffix(".json") + ".png")
    print(f"wrote {out}")
    return 0


def _grid_row(name, trace, gpus, nodes, redundant, time_limit, source, compare_hops=False) -> dict:
    print(f"{name} G={gpus} {source}: ilp for {time_limit:g} s ...", file=sys.stderr, flush=True)
    hidden, intermediate = DIMS.get(name, (None, None))
    hw = cost.hardware("h100", trace=trace, hidden=hidden, intermediate=intermediate)
    greedy = place(trace, gpus, nodes, redundant)
    ilp = place(trace, gpus, nodes, redundant, solver="ilp", time_limit=time_limit, hardware=hw)
    spg = (trace.num_experts + redundant) // gpus
    bound = cost.bounds(trace.load, trace.flow, gpus, nodes, spg, hw)
    g_ms, i_ms = ilp.solver["greedy_layer_ms"], ilp.solver["layer_ms"]
    hops = None
    if compare_hops:
        plan = place(trace, gpus, nodes, redundant, solver="ilp", time_limit=time_limit, hardware=hw, objective="hops")
        hops = {**_summary(plan.metrics), "layer_ms": plan.solver["layer_ms"]}
    return {"hops_ilp": hops, "name": name, "layers": trace.num_layers, "experts": trace.num_experts, "gpus": gpus, "nodes": nodes,
            "redundant": redundant, "source": source, "greedy": {**_summary(greedy.metrics), "layer_ms": g_ms},
            "ilp": {**_summary(ilp.metrics), "layer_ms": i_ms, "seconds": ilp.solver["seconds"],
                    "kept": ilp.solver["source"], "start": ilp.solver.get("start"), "starts": ilp.solver.get("starts")},
            "bound": bound, "time_cut": 1.0 - i_ms / g_ms, "hidden": hw.hidden, "intermediate": hw.intermediate}


def _grid_head() -> str:
    return (f"{'trace':14} {'G':>3} {'gen':5} {'aff':>4} {'seed':>4} {'greedy ms':>9} {'ilp ms':>8} {'bound':>7} "
            f"{'cut':>6} {'imb g':>6} {'imb i':>6} {'x-GPU g/i/bound':>20} {'x-node g/i/bound':>20} {'kept':>12} "
            f"{'hops-ILP ms/x-GPU':>17}")


def _grid_line(r: dict) -> str:
    g, i, b, s = r["greedy"], r["ilp"], r["bound"], r["source"]
    kept = i["kept"] if i["kept"] != "ilp" else f"ilp/{i['start']}"
    return (f"{r['name'][:14]:14} {r['gpus']:3} {s['generator']:5} {s['affinity']:4.2f} {s['seed']:4} "
            f"{g['layer_ms']:9.3f} {i['layer_ms']:8.3f} {b['layer_ms']:7.3f} {r['time_cut']:6.1%} "
            f"{g['imbalance_mean']:6.3f} {i['imbalance_mean']:6.3f} "
            f"{_trio(g['cross_gpu_fraction'], i['cross_gpu_fraction'], b['cross_gpu']):>20} "
            f"{_trio(g['cross_node_fraction'], i['cross_node_fraction'], b['cross_node']):>20} {kept:>12} "
            + ("" if not r.get("hops_ilp") else f"{r['hops_ilp']['layer_ms']:8.3f}/{r['hops_ilp']['cross_gpu_fraction']:.1%}"))


def _trio(*xs) -> str:
    return "/".join("n/a" if x is None else f"{x:.1%}" for x in xs)


def _grid_targets(rows: list[dict]) -> dict:
    name, gpus, nodes, redundant = TARGET
    at = [r for r in rows if (r["name"], r["gpus"], r["nodes"], r["redundant"]) == TARGET]
    lines, checks = [f"targets ({name}, G={gpus}, N={nodes}, R={redundant}):"], {}
    for generator in sorted({r["source"]["generator"] for r in at}):
        mine = [r for r in at if r["source"]["generator"] == generator]
        hi = [r for r in mine if r["source"]["affinity"] == 0.7]
        if hi:
            cut = min(r["time_cut"] for r in hi)
            balance = all(r["ilp"]["imbalance_mean"] <= r["greedy"]["imbalance_mean"] + 1e-12 for r in hi)
            node = max(r["ilp"]["cross_node_fraction"] / r["greedy"]["cross_node_fraction"] for r in hi)
            ok = cut >= 0.05 and balance and node <= 0.90
            checks[f"{generator}_0.7"] = {"min_time_cut": cut, "imbalance_no_worse": balance,
                                          "max_cross_node_ratio": node, "met": ok, "seeds": len(hi)}
            lines.append(f"  {generator}, affinity 0.7, {len(hi)} seed(s): time cut >= 5%: min {cut:.1%}; imbalance "
                         f"no worse: {balance}; cross-node <= 0.90 x greedy: max {node:.3f} -> {'met' if ok else 'MISSED'}")
        mid = [r for r in mine if r["source"]["affinity"] == 0.5]
        if mid:
            ok = all(r["ilp"]["layer_ms"] < r["greedy"]["layer_ms"] for r in mid)
            checks[f"{generator}_0.5"] = {"all_strictly_better": ok, "seeds": len(mid)}
            lines.append(f"  {generator}, affinity 0.5, {len(mid)} seed(s): every plan strictly faster than greedy "
                         f"-> {'met' if ok else 'MISSED'}")
    return {"lines": lines, "checks": checks}


def _grid_plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no plot", file=sys.stderr)
        return
    generators = sorted({r["source"]["generator"] for r in rows})
    fig, axes = plt.subplots(1, len(generators), figsize=(6 * len(generators), 4.2), squeeze=False)
    for ax, generator in zip(axes[0], generators):
        for (name, gpus) in sorted({(r["name"], r["gpus"]) for r in rows if r["source"]["generator"] == generator}):
            mine = [r for r in rows if (r["name"], r["gpus"], r["source"]["generator"]) == (name, gpus, generator)]
            affs = sorted({r["source"]["affinity"] for r in mine})
            at = [[r for r in mine if r["source"]["affinity"] == a] for a in affs]  # the seeds of each affinity
            cuts = [100 * sum(r["time_cut"] for r in rs) / len(rs) for rs in at]
            bound = [100 * sum(1 - r["bound"]["layer_ms"] / r["greedy"]["layer_ms"] for r in rs) / len(rs) for rs in at]
            line, = ax.plot(affs, cuts, marker="o", label=f"{name} G={gpus}")
            ax.plot(affs, bound, linestyle=":", marker="x", color=line.get_color())
        ax.set_xlabel("affinity")
        ax.set_ylabel("predicted layer time below greedy (%)")
        ax.set_title(f"{generator} traces: ILP (objective time) vs greedy; dotted: the bound", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)


def _sizes(quick: bool):
    if not quick:
        return SIZES
    return [("DeepSeek-V3/4", 15, 64, 8, [(16, 2, 16)]), ("Qwen3-30B-A3B/4", 12, 32, 8, [(8, 2, 8)])]


def _compare(name: str, trace, gpus: int, nodes: int, redundant: int, time_limit: float, source: dict) -> dict:
    """Greedy and ILP on one trace and configuration."""
    t0 = time.perf_counter()
    greedy = place(trace, gpus, nodes, redundant)
    greedy_s = time.perf_counter() - t0
    print(f"{name}: L={trace.num_layers} E={trace.num_experts} G={gpus} N={nodes} R={redundant} "
          f"affinity={source.get('affinity', '-')}: ilp for {time_limit:g} s ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    ilp = place(trace, gpus, nodes, redundant, solver="ilp", time_limit=time_limit)
    ilp_s = time.perf_counter() - t0
    g, m = greedy.metrics, ilp.metrics
    reduction = None
    if g["cross_gpu_fraction"]:
        reduction = 1.0 - m["cross_gpu_fraction"] / g["cross_gpu_fraction"]
    return {
        "name": name, "layers": trace.num_layers, "experts": trace.num_experts, "gpus": gpus, "nodes": nodes,
        "redundant": redundant, "source": source,
        "greedy": {**_summary(g), "seconds": round(greedy_s, 3)},
        "ilp": {**_summary(m), "seconds": round(ilp_s, 3), "method": ilp.solver.get("method"),
                "gap": ilp.solver.get("gap"), "sweeps": ilp.solver.get("sweeps"), "kept": ilp.solver.get("source")},
        "cross_gpu_reduction": reduction,
        "cross_node_reduction": (1.0 - m["cross_node_fraction"] / g["cross_node_fraction"])
        if g["cross_node_fraction"] else None,
    }


def _summary(metrics: dict) -> dict:
    keys = ("imbalance_mean", "imbalance_max", "cross_gpu_fraction", "cross_node_fraction", "objective")
    return {k: metrics[k] for k in keys}


def _targets(runs: list[dict], time_limit: float) -> dict:
    name, gpus, nodes, redundant = TARGET
    hits = [r for r in runs if (r["name"], r["gpus"], r["nodes"], r["redundant"]) == TARGET
            and r["source"].get("affinity") == GENERATOR["affinity"]]
    if not hits:
        return {"lines": ["targets: the target configuration was not run"], "checked": False}
    r = hits[0]
    imb_ok = r["ilp"]["imbalance_mean"] <= 1.05
    no_worse = r["ilp"]["imbalance_mean"] <= r["greedy"]["imbalance_mean"] + 1e-12
    cut_ok = r["cross_gpu_reduction"] is not None and r["cross_gpu_reduction"] >= 0.30
    lines = [
        f"target ({name}, G={gpus}, N={nodes}, R={redundant}, {time_limit:g} s, affinity {GENERATOR['affinity']}):",
        f"  mean imbalance <= 1.05: {r['ilp']['imbalance_mean']:.4f} -> {'met' if imb_ok else 'MISSED'}",
        f"  no worse than greedy's {r['greedy']['imbalance_mean']:.4f}: {'met' if no_worse else 'MISSED'}",
        f"  cross-GPU hops >= 30% below greedy: {r['cross_gpu_reduction']:.1%} lower "
        f"({r['greedy']['cross_gpu_fraction']:.2%} -> {r['ilp']['cross_gpu_fraction']:.2%}) -> "
        f"{'met' if cut_ok else 'MISSED'}",
    ]
    return {"lines": lines, "checked": True, "imbalance_le_1_05": imb_ok, "imbalance_no_worse_than_greedy": no_worse,
            "cross_gpu_reduction": r["cross_gpu_reduction"], "cross_gpu_reduction_ge_30pct": cut_ok}


def _table(runs: list[dict]) -> str:
    head = (f"{'trace':16} {'L':>3} {'E':>4} {'G':>3} {'N':>2} {'R':>3} {'aff':>4} {'solver':6} {'imb mean':>8} "
            f"{'imb max':>7} {'x-GPU':>7} {'x-node':>7} {'obj':>7} {'sec':>6} {'x-GPU cut':>9} {'x-node cut':>10}")
    lines = [head, "-" * len(head)]
    for r in runs:
        aff = r["source"].get("affinity")
        for solver in ("greedy", "ilp"):
            s = r[solver]
            cut = "" if solver == "greedy" else _pct(r["cross_gpu_reduction"])
            node_cut = "" if solver == "greedy" else _pct(r["cross_node_reduction"])
            lines.append(f"{r['name'][:16]:16} {r['layers']:3} {r['experts']:4} {r['gpus']:3} {r['nodes']:2} "
                         f"{r['redundant']:3} {'-' if aff is None else f'{aff:.2f}':>4} {solver:6} "
                         f"{s['imbalance_mean']:8.4f} {s['imbalance_max']:7.4f} {_pct(s['cross_gpu_fraction']):>7} "
                         f"{_pct(s['cross_node_fraction']):>7} {s['objective']:7.4f} {s['seconds']:6.1f} "
                         f"{cut:>9} {node_cut:>10}")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _machine() -> dict:
    return {"processor": platform.processor(), "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
            "machine": platform.machine(), "system": platform.system(), "python": platform.python_version()}


def _cpu_model() -> str:
    """platform.processor() is often empty on Linux; the kernel's cpuinfo names the model."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
