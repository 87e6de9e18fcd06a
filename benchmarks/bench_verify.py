"""What verification costs at compile time: per MoE layer, inference and training graphs.

    python benchmarks/bench_verify.py [--models mixtral qwen3_moe ...] [--tokens 64] [--batch 4]

For each built-in demo model (and dtype), compiles with backend='moe' once under torch.no_grad
(inference graph: forward probes) and once with grad enabled (training graph: forward probes plus
gradients), and prints per layer the verification time, the probes run and the whole compile time
for comparison. Writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch

import moecompile
from moecompile import models
from moecompile.tools import bench


def measure(name: str, dtype: str, batch: int, tokens: int, training: bool) -> dict:
    model, (ids,) = models.build(name, dtype=dtype, batch=batch, tokens=tokens)
    if training:
        model.train()
    torch._dynamo.reset()
    moecompile.report.reset()
    compiled = torch.compile(model, backend="moe", options={"inner": "eager"})
    t0 = time.perf_counter()
    with torch.set_grad_enabled(training):
        compiled(ids)
    compile_s = time.perf_counter() - t0
    report = moecompile.last_report()
    verify_rows = [p for p in report.passes if p["name"] == "verify"]
    layers = [r["verify_ms"] for r in report.regions]
    return {"model": name, "dtype": dtype, "training": training, "tokens": batch * tokens,
            "layers": len(layers), "optimized": len(report.optimized()),
            "verify_ms_per_layer": round(statistics.median(layers), 2) if layers else None,
            "verify_ms_total": round(sum(r["ms"] for r in verify_rows), 2),
            "probes": sum(r["counters"]["probes"] for r in verify_rows),
            "compile_s": round(compile_s, 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(models.MOE_MODELS))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/verify_<date>.json)")
    args = parser.parse_args(argv)
    rows = [measure(m, d, args.batch, args.tokens, training)
            for m in args.models for d in args.dtypes for training in (False, True)]
    head = f"{'model':<10} {'dtype':<9} {'graph':<9} {'T':>5} {'layers':>6} {'probes':>6} {'verify ms/layer':>15} {'verify ms':>9} {'compile s':>9} {'share':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        share = r["verify_ms_total"] / 1e3 / r["compile_s"] if r["compile_s"] else float("nan")
        print(f"{r['model']:<10} {r['dtype']:<9} {'training' if r['training'] else 'inference':<9} {r['tokens']:>5} "
              f"{r['layers']:>6} {r['probes']:>6} {r['verify_ms_per_layer']:>15} {r['verify_ms_total']:>9} "
              f"{r['compile_s']:>9} {share:>6.1%}")
    device = torch.device("cpu")
    out = Path(args.out or Path(__file__).parent / "results" / f"verify_{datetime.date.today().isoformat()}.json")
    out.write_text(json.dumps({"device": bench.device_name(device), "date": datetime.date.today().isoformat(),
                               "torch": torch.__version__, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
