"""Benchmark one MoE layer and a small full model: eager vs torch.compile(inductor) vs backend='moe'.

    python benchmarks/bench_moe.py                 # CPU-sized shapes (fp32), writes JSON
    python benchmarks/bench_moe.py --gpu-shapes    # the real H100 shapes (bf16), needs CUDA

Layers are the transformers MoE blocks themselves (router + experts + combine), built from configs
with random weights and the default `grouped_mm` experts implementation. Every backend runs in one
process on the same inputs; the table shows medians and the ratios moe/inductor and moe/eager, and
on CUDA the roofline floor max(FLOPs / peak, bytes / bandwidth). Results go to
benchmarks/results/<device>_<date>.json unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moecompile import models
from moecompile.tools import bench  # noqa: E402

# (name, E, K, H, I, shared I) -- shapes of the real models, and CPU-sized versions of them.
GPU_LAYERS = [("mixtral-8x7b", 8, 2, 4096, 14336, 0), ("qwen3-30b-a3b", 128, 8, 2048, 768, 0),
              ("olmoe", 64, 8, 2048, 1024, 0), ("qwen2-57b-a14b", 64, 8, 3584, 2560, 20480)]
CPU_LAYERS = [("mixtral-like", 8, 2, 512, 1024, 0), ("qwen3-like", 32, 8, 256, 128, 0),
              ("olmoe-like", 16, 4, 256, 256, 0), ("qwen2-like", 16, 4, 256, 128, 512)]
GPU_TOKENS = [1, 128, 2048, 16384]
CPU_TOKENS = [1, 32, 512]


def moe_block(name: str, E: int, K: int, H: int, I: int, shared: int, dtype, device):
    """The transformers MoE block of the model family `name`, with random weights."""
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    if name.startswith("mixtral"):
        cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K)
        block_cls = MixtralSparseMoeBlock
    elif shared:
        cfg = Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=I, shared_expert_intermediate_size=shared,
                             num_experts=E, num_experts_per_tok=K, norm_topk_prob=False)
        block_cls = Qwen2MoeSparseMoeBlock
    else:  # qwen3 and olmoe blocks compute the same function; olmoe without renormalization
        cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K,
                             norm_topk_prob=not name.startswith("olmoe"))
        block_cls = Qwen3MoeSparseMoeBlock
    cfg._experts_implementation = "grouped_mm"
    block = block_cls(cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
    return block.to(device=device, dtype=dtype).eval()


def roofline_ms(T, E, K, H, I, shared, itemsize, peak_flops, bandwidth) -> float:
    """max(FLOPs / peak, bytes / bandwidth) for one layer: each weight an active expert needs read
    once, x read once, y written once."""
    active = min(E, T * K)
    flops = 2 * T * H * E + 2 * T * K * 3 * H * I + 2 * T * 3 * H * shared
    weight_bytes = (active * 3 * H * I + 3 * H * shared + E * H) * itemsize
    io_bytes = 2 * T * H * itemsize
    return max(flops / peak_flops, (weight_bytes + io_bytes) / bandwidth) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-shapes", action="store_true", help="the real model shapes (CUDA, bf16)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    parser.add_argument("--tokens", type=int, nargs="*", default=None)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="measured bf16 GEMM peak (H100)")
    parser.add_argument("--bandwidth-tbs", type=float, default=3.0, help="measured copy bandwidth (H100)")
    parser.add_argument("--skip-model", action="store_true", help="layers only")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.gpu_shapes and device.type != "cuda":
        parser.error("--gpu-shapes needs a CUDA device")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    layers = GPU_LAYERS if args.gpu_shapes else CPU_LAYERS
    token_counts = args.tokens or (GPU_TOKENS if args.gpu_shapes else CPU_TOKENS)
    rows, floors = [], {}
    for name, E, K, H, I, shared in layers:
        block = moe_block(name, E, K, H, I, shared, dtype, device)
        for T in token_counts:
            x = torch.randn(1, T, H, device=device, dtype=dtype)
            case = f"layer {name} T{T}"
            rows += bench.compare(case, block, (x,), device, iters=args.iters)
            if device.type == "cuda":
                floors[case] = roofline_ms(T, E, K, H, I, shared, x.element_size(),
                                           args.peak_tflops * 1e12, args.bandwidth_tbs * 1e12)
            print(bench.table([r for r in rows if r.case == case]).splitlines()[-1], flush=True)
        del block
    if not args.skip_model:
        for name in models.MOE_MODELS:
            model, (ids,) = models.build(name, dtype=dtype, batch=4, tokens=128, hidden=256, layers=4)
            rows += bench.compare(f"model {name} B4 S128", model.to(device), (ids.to(device),), device,
                                  iters=args.iters)
            print(bench.table([r for r in rows if r.case.startswith(f"model {name}")]).splitlines()[-1],
                  flush=True)

    print(f"\ndevice: {bench.device_name(device)}, dtype {str(dtype)[6:]}, torch {torch.__version__}")
    print(bench.table(rows))
    if floors:
        print("\nroofline floor (ms) and moe / floor:")
        for case, floor in floors.items():
            moe = next(r.ms for r in rows if r.case == case and r.backend == "moe")
            print(f"  {case:<34} {floor:9.4f}  {moe / floor:7.2f}x")
    data = bench.to_json(rows, device, {"dtype": str(dtype)[6:], "roofline_ms": floors})
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / (
        f"moe_{re.sub(r'[^a-z0-9]+', '-', bench.device_name(device).lower()).strip('-')}_"
        f"{datetime.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
