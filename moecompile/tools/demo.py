"""The demo: compile a built-in MoE model with backend='moe', print what was found and how fast it runs.

    python -m moecompile.tools.demo [--model mixtral] [--batch 4] [--tokens 64]
"""

from __future__ import annotations

import argparse

import torch

from .. import models
from . import bench
from .explain import explain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moecompile.tools.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mixtral", choices=list(models.MOE_MODELS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, (ids,) = models.build(args.model, dtype=args.dtype, batch=args.batch, tokens=args.tokens)
    model, ids = model.to(device), ids.to(device)
    print(f"== {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"input ({args.batch}, {args.tokens}) on {bench.device_name(device)}\n")
    print("MoE layers found by torch.compile(model, backend='moe'):")
    explain(model, ids)
    print("\nTime per forward (median):")
    print(bench.table(bench.compare(f"{args.model} B{args.batch} S{args.tokens}", model, (ids,), device)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
