"""Expert-parallel benchmark: one MoE layer across ranks, with and without overlap.

    python benchmarks/bench_expert_parallel.py                 # gloo on 2 and 4 local ranks + simulation
    python benchmarks/bench_expert_parallel.py --quick         # small sizes, a smoke run
    python benchmarks/bench_expert_parallel.py --no-measure    # the simulation alone

Measured (gloo, CPU): `--world` ranks started on this machine, each holding its slots of one
transformers Mixtral experts layer (E, H, I below; grouped_mm experts), T tokens per rank routed
top-K at random; per chunk count C (1 = no overlap, then fixed counts and "auto"): the median
forward and forward+backward time of the layer after warm-up, and the seconds each call waited on
exchanges (exposed). Hidden communication = exposed with C = 1 less exposed with C.

Simulated (H100 nodes, `moecompile.placement.cost` h100 preset: NVLink 450 GB/s and network 50 GB/s
per GPU, 700 TFLOP/s achieved bf16; 8192 tokens x top-8 per GPU): at DeepSeek-V3 (H 7168, I 2048,
E 256, 58 layers) and Qwen3-30B-A3B (H 2048, I 768, E 128, 48 layers) shapes on 8 to 64 GPUs,
for greedy's plan and the ILP's (objective time) on a synthetic trace (topic generator, affinity
0.7), each layer's busiest-GPU compute and all-to-all time (dispatch and combine: twice the model's
one-way exchange) give its time with no overlap (compute + comm) and with overlap at the C that
overlap.choose_chunks picks (overlap.predicted_time, LATENCY per collective, 2 a chunk: rows out, results back).
Hidden = (no overlap - overlap) / comm. Target: at least 70% hidden wherever a chunk's compute
exceeds its transfer time (compute >= comm). The compute side is the preset's throughput, not a
measurement: no GPU ran this.

Prints tables; writes JSON (and a plot of hidden fraction per configuration) to
benchmarks/results/expert_parallel_<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from moecompile.files import check_output, write_json  # noqa: E402
from moecompile.tools import bench  # noqa: E402

LATENCY = 20e-6  # seconds a collective costs however small (NCCL all-to-all, order of magnitude)
MEASURE = dict(tokens=2048, top_k=2, experts=16, hidden=1024, intermediate=256, calls=8, warmup=3)
QUICK = dict(tokens=256, top_k=2, experts=8, hidden=128, intermediate=64, calls=3, warmup=2)
CHUNKS = ("1", "2", "4", "auto")
SHAPES = {"DeepSeek-V3": (58, 256, 7168, 2048), "Qwen3-30B-A3B": (48, 128, 2048, 768)}
GPUS = ((8, 1), (16, 2), (32, 4), (64, 8))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and short solves, for a smoke run")
    parser.add_argument("--world", nargs="+", type=int, default=[2, 4], help="rank counts measured on gloo")
    parser.add_argument("--no-measure", action="store_true", help="skip the gloo measurement")
    parser.add_argument("--no-simulate", action="store_true", help="skip the simulation")
    parser.add_argument("--plan-seconds", type=float, default=20.0, help="ILP seconds per simulated plan")
    parser.add_argument("--out", default=None)
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument("--worker", nargs=3, metavar=("RANK", "WORLD", "PORT"), help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(*(int(v) for v in args.worker), json.loads(args.sizes))
    sizes = QUICK if args.quick else MEASURE
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"expert_parallel{'_quick' if args.quick else ''}_{args.date}.json")
    check_output(out, "--out")
    result = {"date": args.date, "device": bench.device_name(torch.device("cpu")), "versions": bench.versions(),
              "measured": {"sizes": sizes, "rows": []},
              "simulated": {"latency_s": LATENCY, "rows": []}}
    if not args.no_measure:
        print(f"gloo, {sizes['tokens']} tokens x top-{sizes['top_k']} per rank, E {sizes['experts']}, "
              f"H {sizes['hidden']}, I {sizes['intermediate']}, fp32")
        print(f"{'ranks':>5} {'C':>5} {'fwd ms':>8} {'fwd+bwd ms':>10} {'exposed ms':>10} {'hidden ms':>9} {'hidden':>7}")
        for world in args.world:
            rows = _measure(world, sizes)
            base = next(r for r in rows if r["chunks"] == "1")
            for r in rows:
                r["hidden_ms"] = base["exposed_ms"] - r["exposed_ms"]
                r["hidden_fraction"] = r["hidden_ms"] / base["exposed_ms"] if base["exposed_ms"] > 0 else None
                result["measured"]["rows"].append(r)
                print(f"{world:5d} {r['chunks']:>5} {r['fwd_ms']:8.1f} {r['fwd_bwd_ms']:10.1f} {r['exposed_ms']:10.1f} "
                      f"{r['hidden_ms']:9.1f} {_pct(r['hidden_fraction']):>7}")
            write_json(out, result)
    if not args.no_simulate:
        print(f"\nsimulated H100 nodes (h100 preset), a collective costs {LATENCY * 1e6:.0f} us, 2 a chunk")
        print(f"{'shape':14} {'G':>3} {'N':>2} {'plan':7} {'compute ms':>10} {'comm ms':>8} {'serial ms':>9} "
              f"{'overlap ms':>10} {'C':>3} {'hidden':>7} {'compute-bound layers':>21}")
        for row in _simulate(args.quick, args.plan_seconds):
            result["simulated"]["rows"].append(row)
            print(f"{row['shape'][:14]:14} {row['gpus']:3d} {row['nodes']:2d} {row['plan']:7} {row['compute_ms']:10.3f} "
                  f"{row['comm_ms']:8.3f} {row['serial_ms']:9.3f} {row['overlap_ms']:10.3f} {row['chunks']:3d} "
                  f"{_pct(row['hidden_fraction']):>7} {row['compute_bound_layers']:>10d} {_pct(row['hidden_compute_bound']):>10}",
                  flush=True)
            write_json(out, result)
        bound = [r["hidden_compute_bound"] for r in result["simulated"]["rows"] if r["hidden_compute_bound"] is not None]
        result["simulated"]["target"] = {"min_hidden_where_compute_bound": min(bound) if bound else None,
                                         "met": bool(bound) and min(bound) >= 0.70}
        print(f"target: >= 70% of communication hidden wherever compute >= transfer: "
              f"{'met' if result['simulated']['target']['met'] else 'not met'} "
              f"(least {_pct(result['simulated']['target']['min_hidden_where_compute_bound'])})")
        _plot(result, out.removesuffix(".json") + ".png")
    write_json(out, result)
    print(f"wrote {out}")
    return 0


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _measure(world: int, sizes: dict) -> list[dict]:
    """Start `world` ranks of this script; rank 0 prints one JSON line of results."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(r), str(world), str(port),
                               "--sizes", json.dumps(sizes)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for r in range(world)]
    outs = [p.communicate(timeout=1800) for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode:
            raise SystemExit(f"a rank failed:\n{err[-3000:]}")
    line = [ln for ln in outs[0][0].splitlines() if ln.startswith("{")][-1]
    return [dict(r, world=world) for r in json.loads(line)["rows"]]


def _worker(rank: int, world: int, port: int, sizes: dict) -> int:
    import copy
    import datetime as dt

    import torch.distributed as dist
    from torch import nn
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    from moecompile.distributed import moe_layers, shard_experts

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=dt.timedelta(seconds=600))
    torch.manual_seed(0)
    config = MixtralConfig(hidden_size=sizes["hidden"], intermediate_size=sizes["intermediate"],
                           num_local_experts=sizes["experts"], num_experts_per_tok=sizes["top_k"])
    config._experts_implementation = "grouped_mm"

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = MixtralExperts(config)
            for p in self.experts.parameters():
                nn.init.normal_(p, std=0.02)

    base = Layer()
    g = torch.Generator().manual_seed(100 + rank)
    T, K, E = sizes["tokens"], sizes["top_k"], sizes["experts"]
    x = torch.randn(T, sizes["hidden"], generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    rows = []
    for chunks in CHUNKS:
        model = shard_experts(copy.deepcopy(base), overlap_chunks=chunks if chunks == "auto" else int(chunks))
        layer = moe_layers(model)[0][1].experts
        fwd, both, exposed = [], [], []
        for call in range(sizes["warmup"] + sizes["calls"]):
            xi = x.clone().requires_grad_()
            dist.barrier()
            t0 = time.perf_counter()
            with torch.no_grad():
                layer(xi, ids, w)
            t1 = time.perf_counter()
            waited = layer.stats.last[0]
            dist.barrier()
            t2 = time.perf_counter()
            layer(xi, ids, w).sum().backward()
            t3 = time.perf_counter()
            if call >= sizes["warmup"]:
                fwd.append(t1 - t0)
                both.append(t3 - t2)
                exposed.append(waited)
        chosen = layer.chosen
        times = torch.tensor([statistics.median(fwd), statistics.median(both), statistics.median(exposed)],
                             dtype=torch.float64)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)  # the slowest rank's: the layer waits for it
        rows.append({"chunks": chunks, "chosen": chosen, "fwd_ms": times[0].item() * 1e3,
                     "fwd_bwd_ms": times[1].item() * 1e3, "exposed_ms": times[2].item() * 1e3})
    if rank == 0:
        print(json.dumps({"rows": rows}), flush=True)
    dist.barrier()  # ranks leave together (gloo can abort at exit when one tears down first)
    dist.destroy_process_group()
    return 0


def _simulate(quick: bool, plan_seconds: float):
    import numpy as np

    from moecompile.distributed.overlap import choose_chunks, predicted_time
    from moecompile.placement import cost, place
    from moecompile.placement.synthetic import synthetic_trace
    from moecompile.placement.trace import normalized

    shapes = {"Qwen3-30B-A3B": (8, 128, 2048, 768)} if quick else SHAPES
    gpus = GPUS[:2] if quick else GPUS
    for shape, (layers, experts, hidden, intermediate) in shapes.items():
        trace = synthetic_trace(layers, experts, 8, num_tokens=8192, skew=0.5, affinity=0.7, seed=0)
        hw = cost.hardware("h100", trace=trace, hidden=hidden, intermediate=intermediate)
        for num_gpus, num_nodes in gpus:
            plans = {"greedy": place(trace, num_gpus, num_nodes, num_gpus),
                     "ilp": place(trace, num_gpus, num_nodes, num_gpus, solver="ilp",
                                  time_limit=2.0 if quick else plan_seconds, hardware=hw)}
            t = normalized(trace)
            for name, plan in plans.items():
                parts = cost.layer_times(plan.phy2log, t.load, t.flow, num_gpus, num_nodes, hw)
                compute, comm = parts["compute"], 2 * parts["comm"]  # dispatch and combine
                chunks = [choose_chunks(m, c, 2 * LATENCY) for c, m in zip(compute, comm)]
                overlap = np.array([predicted_time(k, m, c, 2 * LATENCY) for k, c, m in zip(chunks, compute, comm)])
                serial = compute + comm
                bound = compute >= comm
                hidden = (serial - overlap) / np.maximum(comm, 1e-30)
                yield {"shape": shape, "gpus": num_gpus, "nodes": num_nodes, "plan": name,
                       "compute_ms": float(compute.mean() * 1e3), "comm_ms": float(comm.mean() * 1e3),
                       "serial_ms": float(serial.mean() * 1e3), "overlap_ms": float(overlap.mean() * 1e3),
                       "chunks": int(np.bincount(chunks).argmax()), "hidden_fraction": float((serial - overlap).sum() / comm.sum()),
                       "compute_bound_layers": int(bound.sum()),
                       "hidden_compute_bound": float(hidden[bound].min()) if bound.any() else None}


def _plot(result: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    rows = result["simulated"]["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "serial_ms", "layer ms"), (axes[1], "hidden_fraction", "communication hidden")):
        for shape in dict.fromkeys(r["shape"] for r in rows):
            for plan, style in (("greedy", "--"), ("ilp", "-")):
                pts = [r for r in rows if r["shape"] == shape and r["plan"] == plan]
                if key == "serial_ms":
                    ax.plot([r["gpus"] for r in pts], [r["serial_ms"] for r in pts], style, marker="o",
                            label=f"{shape} {plan}, no overlap")
                    ax.plot([r["gpus"] for r in pts], [r["overlap_ms"] for r in pts], style, marker="x",
                            label=f"{shape} {plan}, overlap")
                else:
                    ax.plot([r["gpus"] for r in pts], [r[key] for r in pts], style, marker="o", label=f"{shape} {plan}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("GPUs")
        ax.set_ylabel(label)
        ax.legend(fontsize=6)
    fig.suptitle(f"MoE layer on H100 nodes, simulated ({result['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
