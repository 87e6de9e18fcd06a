"""One MoE layer (router + experts + combine): eager, inductor and backend="moe" per kernel choice,
against the roofline floor measured in the same run.

    python benchmarks/bench_moe_layer.py                      # CUDA: the real shapes, bf16; else CPU shapes
    python benchmarks/bench_moe_layer.py --shapes cpu --tokens 1 16 128
    python benchmarks/bench_moe_layer.py --layers deepseek-v3 --kernels triton --iters 50

Layers are the transformers MoE blocks (MixtralSparseMoeBlock, Qwen3MoeSparseMoeBlock,
OlmoeSparseMoeBlock, DeepseekV3MoE with its shared expert), `grouped_mm` experts, random weights
made on the device. Each block is compiled once per column and called at every T (the token dim
is marked dynamic; T=1 is its own graph): columns are the eager block, torch.compile(inductor) of
it, and torch.compile(backend="moe", options={"kernels": k}) for each kernel choice k. A choice the
installed moecompile rejects, or one that does not run on this device (the report says which
kernels ran), is skipped with a note; a column that fails records its error and drops out for the
larger T of that layer, never stopping the run. Times are medians over round-robin rounds of the
columns: on a GPU by CUDA events, each call after a 256 MiB write that evicts the L2 (a layer inside
a model finds its weights in memory, not in cache); on a CPU by wall clock, nothing flushed (a
CPU's last-level cache can hold the small CPU shapes' weights, so there the floor is indicative).

Floor of a point = max(FLOPs / peak, bytes / bandwidth), with
    FLOPs = 2 T K 3 H I  (+ 2 T 3 H I_shared)
    bytes = (hit 3 H I + 3 H I_shared) * weight itemsize + 2 T H * activation itemsize
where hit = distinct experts in the router's top-k on this very input, peak = the best matmul in
the run's dtype and bandwidth = a large device copy, both timed at the start of the run. The
router's (E, H) weight and GEMM are left out: under 1% of any point's bytes and FLOPs at these
shapes (DeepSeek's router computes in fp32, so its time share at large T is larger than that).

Targets (per point, of the best moe kernel): within 2x of the floor at T=1, 1.15x at T=16 and 128,
1.35x at T>=1024; over inductor: geomean speedup >= 1.6x and no point below 0.95x.
Results: a table, JSON (default benchmarks/results/moe_layer_<device>_<date>.json) and a PNG plot.

--backward times a training step's part of the layer instead: forward, then the gradients of the
input and of every parameter for a fixed random output gradient (torch.autograd.grad, nothing
accumulated), at T = 4096 and 16384 on the GPU shapes (128 and 1024 on the CPU ones). Beside each
column's time: its peak memory over one step (bench.peak_memory: CUDA's max allocated; on a CPU the
profiler's memory events, a lower bound) and the bytes its forward keeps for the backward
(bench.saved_bytes). The floor counts 3x the forward's FLOPs and the expert weights read twice and
their gradients written once; no floor targets. Targets: over inductor, geomean >= 1.5x; the best
moe column's peak memory no more than inductor's at every point. JSON: moe_layer_bwd_<device>_<date>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moecompile  # noqa: E402
from moecompile.tools import bench  # noqa: E402


@dataclass(frozen=True)
class Layer:
    name: str
    family: str  # mixtral | qwen3 | olmoe | deepseek_v3
    E: int
    K: int
    H: int
    I: int
    shared_I: int = 0  # intermediate size of the shared expert(s), 0 for none
    groups: int = 1  # DeepSeek's group-limited top-k: n_group, topk_group
    top_groups: int = 1


GPU_LAYERS = [Layer("mixtral-8x7b", "mixtral", 8, 2, 4096, 14336),
              Layer("qwen3-30b-a3b", "qwen3", 128, 8, 2048, 768),
              Layer("olmoe", "olmoe", 64, 8, 2048, 1024),
              Layer("deepseek-v3", "deepseek_v3", 256, 8, 7168, 2048, shared_I=2048, groups=8, top_groups=4)]
# The same families with E and K kept and H, I divided (Mixtral by 16, Qwen3 and OLMoE by 8,
# DeepSeek by 32): a 2-core CPU runs all of them at T <= 1024 in a few minutes.
CPU_LAYERS = [Layer("mixtral-cpu", "mixtral", 8, 2, 256, 896),
              Layer("qwen3-cpu", "qwen3", 128, 8, 256, 96),
              Layer("olmoe-cpu", "olmoe", 64, 8, 256, 128),
              Layer("deepseek-v3-cpu", "deepseek_v3", 256, 8, 224, 64, shared_I=64, groups=8, top_groups=4)]
# Seconds to compile and run: the smoke test's size.
TINY_LAYERS = [Layer("mixtral-tiny", "mixtral", 4, 2, 32, 64),
               Layer("qwen3-tiny", "qwen3", 8, 2, 32, 16),
               Layer("olmoe-tiny", "olmoe", 8, 2, 32, 16),
               Layer("deepseek-v3-tiny", "deepseek_v3", 16, 4, 32, 16, shared_I=16, groups=4, top_groups=2)]
SHAPES = {"gpu": GPU_LAYERS, "cpu": CPU_LAYERS, "tiny": TINY_LAYERS}
TOKENS = {"gpu": [1, 16, 128, 1024, 4096, 16384], "cpu": [1, 16, 128, 1024], "tiny": [1, 5]}
BACKWARD_TOKENS = {"gpu": [4096, 16384], "cpu": [128, 1024], "tiny": [5]}
KERNELS = ("torch", "triton")
SPEEDUP_GEOMEAN, SPEEDUP_MIN = 1.6, 0.95  # the targets over inductor
BACKWARD_SPEEDUP_GEOMEAN = 1.5  # forward + backward over inductor's
LEGEND = ("hit: distinct experts routed to; <k> spd: inductor ms / moe ms; <k> /fl: moe ms / floor ms; "
          "fl target: best moe / floor allowed at this T")


def floor_target(T: int) -> float | None:
    """Allowed moe / floor at T (the issue's targets); None where none is set."""
    if T == 1:
        return 2.0
    if T in (16, 128):
        return 1.15
    return 1.35 if T >= 1024 else None


@contextlib.contextmanager
def _default_dtype(dtype):
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def build_block(layer: Layer, dtype, device, seed: int = 0) -> torch.nn.Module:
    """The transformers block of `layer`, made on `device` with random weights N(0, 1/in).

    Built on the meta device and then allocated where it runs: DeepSeek-V3's experts are 22 GB in
    bf16, too big to initialize on the host first. Parameters the model keeps in fp32 (DeepSeek's
    router) stay fp32, as transformers loads them."""
    from transformers import DeepseekV3Config, MixtralConfig, OlmoeConfig, Qwen3MoeConfig
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    L = layer
    if L.family == "mixtral":
        cls, cfg = MixtralSparseMoeBlock, MixtralConfig(hidden_size=L.H, intermediate_size=L.I,
                                                         num_local_experts=L.E, num_experts_per_tok=L.K)
    elif L.family == "qwen3":
        cls, cfg = Qwen3MoeSparseMoeBlock, Qwen3MoeConfig(hidden_size=L.H, moe_intermediate_size=L.I, num_experts=L.E,
                                                           num_experts_per_tok=L.K, norm_topk_prob=True)
    elif L.family == "olmoe":
        cls, cfg = OlmoeSparseMoeBlock, OlmoeConfig(hidden_size=L.H, intermediate_size=L.I, num_experts=L.E,
                                                     num_experts_per_tok=L.K, norm_topk_prob=False)
    elif L.family == "deepseek_v3":
        assert L.shared_I % L.I == 0, (L.shared_I, L.I)
        cls, cfg = DeepseekV3MoE, DeepseekV3Config(
            hidden_size=L.H, moe_intermediate_size=L.I, n_routed_experts=L.E, num_experts_per_tok=L.K,
            n_group=L.groups, topk_group=L.top_groups, n_shared_experts=L.shared_I // L.I,
            routed_scaling_factor=2.5, norm_topk_prob=True)
    else:
        raise ValueError(f"unknown family {L.family!r} of layer {L.name}")
    cfg._experts_implementation = "grouped_mm"
    with _default_dtype(dtype), torch.device("meta"):
        block = cls(cfg)
    block.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)
        for b in block.buffers():  # DeepSeek's score-correction bias: zeros, transformers' init
            b.zero_()
    return block.eval()


def experts_hit(block: torch.nn.Module, x: torch.Tensor) -> int:
    """Distinct experts in the router's top-k on `x` (every family's gate returns ids last)."""
    with torch.no_grad():
        ids = block.gate(x.reshape(-1, x.shape[-1]))[-1]
    return int(torch.unique(ids).numel())


def roofline(layer: Layer, T: int, hit: int, w_itemsize: int, x_itemsize: int, peak: float, bandwidth: float,
             backward: bool = False) -> dict:
    L = layer
    flops = 2 * T * L.K * 3 * L.H * L.I + 2 * T * 3 * L.H * L.shared_I
    nbytes = (hit * 3 * L.H * L.I + 3 * L.H * L.shared_I) * w_itemsize + 2 * T * L.H * x_itemsize
    if backward:  # dX and dW GEMMs: 2x the forward's FLOPs; weights read again, their grads written
        flops, nbytes = 3 * flops, 3 * (nbytes - 2 * T * L.H * x_itemsize) + 4 * T * L.H * x_itemsize
    compute_ms, memory_ms = flops / peak * 1e3, nbytes / bandwidth * 1e3
    return {"flops": flops, "bytes": nbytes, "floor_ms": max(compute_ms, memory_ms),
            "bound": "compute" if compute_ms >= memory_ms else "memory"}


def usable_kernels(asked) -> tuple[list[str], dict[str, str]]:
    """The kernel choices the installed moecompile accepts, and a note for each one it rejects."""
    from moecompile import config

    known = getattr(config, "KERNEL_CHOICES", None)
    ok, notes = [], {}
    for k in asked:
        if known is not None and k not in known:
            notes[f"moe:{k}"] = f"skipped: not a kernel choice of this moecompile {tuple(known)}"
            continue
        try:
            config.make({"kernels": k})
        except Exception as err:  # noqa: BLE001 -- an older moecompile: UserInputError
            notes[f"moe:{k}"] = f"skipped: {err}"
            continue
        ok.append(k)
    return ok, notes


def _compiled(block, column: str):
    if column == "eager":
        return block
    if column == "inductor":
        return torch.compile(block, backend="inductor")
    return torch.compile(block, backend="moe", options={"kernels": column.split(":", 1)[1]})


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _kernels_note(column: str, regions) -> str | None:
    """Why a moe column's time is not that of its kernel choice (None: it is)."""
    if not regions:
        return "skipped: no MoE layer found in the compiled graph"
    asked = column.split(":", 1)[1]
    bad = [r for r in regions if r.status != "optimized"]
    if bad:
        return f"fallback: {bad[0].reason}"
    if asked not in ("auto", "interpreter") and not all(r.kernels.startswith(asked) for r in regions):
        return f"skipped: ran {regions[0].kernels}"
    return None


@dataclass
class _Column:
    """One column of one layer: what it calls and what its first calls found."""

    name: str  # eager | inductor | moe:<kernels>
    fn: Callable  # the (compiled) block
    call: Callable | None = None  # what is timed: the block, or with --backward a step through it
    compiles: int = 0  # graphs Dynamo compiled for it, over all T
    compile_s: float = 0.0  # wall time of the calls that compiled
    kernels_ran: list | None = None  # moe: the report's kernels of its regions
    note: str | None = None
    dropped: str | None = None  # why it no longer runs for this layer


def _first_call(col: _Column, x, reference, device, point: dict) -> str | None:
    """Call `col` once at this T (compiling if this T needs a graph); record its compiles and
    error into `point`. Returns why the column is not to be timed, None if it is."""
    regions_before, graphs_before, t0 = len(moecompile.last_report().regions), _graphs(), time.perf_counter()
    try:
        out = col.call(*x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as err:  # noqa: BLE001 -- a failing column never stops the run
        col.dropped = f"skipped: failed at T={point['T']}"
        return f"{type(err).__name__}: {err}"[:2000]
    new_graphs = _graphs() - graphs_before
    point["compiles"][col.name] = new_graphs
    col.compiles += new_graphs
    col.compile_s += (time.perf_counter() - t0) if new_graphs else 0.0
    point["max_abs_err"][col.name] = (out.float() - reference).abs().max().item()
    if col.name.startswith("moe:") and new_graphs:
        regions = moecompile.last_report().regions[regions_before:]
        col.kernels_ran = sorted({r.kernels for r in regions})
        col.note = _kernels_note(col.name, regions) or col.note
        if col.note and col.note.startswith("skipped"):
            col.dropped = col.note
            return col.note
    return None


def _grads(fn: Callable, x, grad, params) -> tuple:
    """A training step's part of a layer: (fn(x) detached, the gradients of x and of every
    parameter for the output gradient `grad`: returned, not accumulated, None where unused)."""
    out = fn(x)
    return out.detach(), list(torch.autograd.grad(out, (x, *params), grad, allow_unused=True))


def _step(fn: Callable, params: list) -> Callable:
    """What --backward times: `_grads`, returning the output."""
    return lambda x, grad: _grads(fn, x, grad, params)[0]


def _grad_err(got: list, want: list) -> float:
    """Largest absolute difference over all gradients; inf where one side has none."""
    err = 0.0
    for a, b in zip(got, want):
        if (a is None) != (b is None):
            return float("inf")
        if a is not None:
            err = max(err, (a.float() - b.float()).abs().max().item())
    return err


def bench_layer(layer: Layer, tokens, kernels, dtype, device, probe, warmup, iters, log, backward=False) -> dict:
    """Every column of one layer at every T: {"layer", "compiles", "compile_s", "kernels_ran",
    "notes", "points"}; `log` gets each point's table row as it is done."""
    block = build_block(layer, dtype, device)
    w_itemsize = block.experts.down_proj.element_size()
    names = ["eager", "inductor"] + [f"moe:{k}" for k in kernels]
    params = [p for p in block.parameters() if p.requires_grad]
    cols = [_Column(c, fn, _step(fn, params) if backward else fn) for c, fn in ((c, _compiled(block, c)) for c in names)]
    points = []
    gen = torch.Generator(device).manual_seed(1)
    for T in tokens:
        x = torch.randn(1, T, layer.H, device=device, dtype=dtype, generator=gen).requires_grad_(backward)
        if T >= 2:  # sizes 0 and 1 are always specialized; every T >= 2 shares one graph
            torch._dynamo.mark_dynamic(x, 1)
        hit = experts_hit(block, x)
        point = {"layer": layer.name, "T": T, "experts_hit": hit,
                 **roofline(layer, T, hit, w_itemsize, x.element_size(), probe["peak_flops"], probe["bandwidth"],
                            backward),
                 "ms": {}, "errors": {}, "compiles": {}, "max_abs_err": {}}
        args = (x, torch.randn(x.shape, device=device, dtype=dtype, generator=gen)) if backward else (x,)
        with torch.no_grad():
            reference = block(x).float()
        with contextlib.nullcontext() if backward else torch.no_grad():
            for col in cols:
                why_not = col.dropped or _first_call(col, args, reference, device, point)
                if why_not:
                    point["errors"][col.name] = why_not
            if backward:  # every column's gradients against eager's, before any is timed
                want = _grads(block, x, args[1], params)[1]
                point["max_grad_err"] = {}
                for col in cols:
                    if col.name not in point["errors"]:
                        try:
                            point["max_grad_err"][col.name] = _grad_err(_grads(col.fn, x, args[1], params)[1], want)
                        except Exception as err:  # noqa: BLE001 -- a failing column never stops the run
                            point["errors"][col.name] = f"{type(err).__name__}: {err}"[:2000]
                            col.dropped = f"skipped: failed at T={T}"
            live = {c.name: c.call for c in cols if c.name not in point["errors"]}
            errors: dict[str, str] = {}
            point["ms"] = bench.round_robin(live, args, device, warmup, iters, events=True,
                                            flush=device.type == "cuda", errors=errors)
            if backward:  # memory of one step, and what each forward keeps for its backward
                point["peak_mb"], point["saved_mb"] = {}, {}
                for c in cols:
                    if c.name not in point["ms"]:
                        continue
                    try:
                        point["peak_mb"][c.name] = bench.peak_memory(c.call, args, device) / 2**20
                        point["saved_mb"][c.name] = bench.saved_bytes(c.fn, (x,), exclude=[x, *params]) / 2**20
                    except Exception as err:  # noqa: BLE001 -- a failing measurement never stops the run
                        point["errors"][c.name] = f"memory: {type(err).__name__}: {err}"[:2000]
                        point["peak_mb"].pop(c.name, None)
        for col in cols:
            if col.name in errors:
                point["errors"][col.name] = errors[col.name][:2000]
                col.dropped = f"skipped: failed at T={T}"
        points.append(_ratios(point, backward))
        log(format_row(point, names))
        del x, reference
    result = {"layer": asdict(layer), "compiles": {c.name: c.compiles for c in cols},
              "compile_s": {c.name: round(c.compile_s, 3) for c in cols},
              "kernels_ran": {c.name: c.kernels_ran for c in cols if c.kernels_ran},
              "notes": {c.name: c.note for c in cols if c.note}, "points": points}
    del cols, block
    _free(device)
    return result


def _free(device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _ratios(point: dict, backward: bool = False) -> dict:
    """Adds over_inductor (ms / inductor ms), over_floor (ms / floor), the best moe column, its
    speedup over inductor and whether the targets hold (with `backward`: no floor target; the best
    moe column's peak memory against inductor's)."""
    ms, floor = point["ms"], point["floor_ms"]
    ind = ms.get("inductor")
    moe = {c: t for c, t in ms.items() if c.startswith("moe:")}
    point["over_inductor"] = {c: t / ind for c, t in moe.items()} if ind else {}
    point["over_floor"] = {c: t / floor for c, t in ms.items()}
    best = min(moe, key=moe.get) if moe else None
    target = None if backward else floor_target(point["T"])
    point["best"] = best
    if backward:
        peak = point.get("peak_mb", {})
        point["meets_memory"] = (peak[best] <= peak["inductor"]) if best in peak and "inductor" in peak else None
    point["speedup"] = ind / moe[best] if best and ind else None
    point["floor_target"] = target
    point["meets_floor"] = None if target is None or best is None else moe[best] / floor <= target
    point["meets_speedup_min"] = None if point["speedup"] is None else point["speedup"] >= SPEEDUP_MIN
    return point


def summarize(points: list[dict], backward: bool = False) -> dict:
    rated = [p for p in points if p["speedup"]]
    target = BACKWARD_SPEEDUP_GEOMEAN if backward else SPEEDUP_GEOMEAN
    floor_rated = [p for p in points if p["meets_floor"] is not None]
    worst = min(rated, key=lambda p: p["speedup"]) if rated else None
    geomean = bench.geomean(p["speedup"] for p in rated) if rated else None
    return {
        "points": len(points), "rated_points": len(rated),
        "geomean_speedup": geomean,
        "worst": {"layer": worst["layer"], "T": worst["T"], "speedup": worst["speedup"]} if worst else None,
        "below_speedup_min": [(p["layer"], p["T"]) for p in rated if p["speedup"] < SPEEDUP_MIN],
        "target_geomean": target,
        "meets_geomean": None if geomean is None else geomean >= target,
        "meets_memory": None if not backward else all(p.get("meets_memory") for p in rated) if rated else None,
        "meets_speedup_min": None if not rated else all(p["meets_speedup_min"] for p in rated),
        "floor_met": sum(p["meets_floor"] for p in floor_rated), "floor_rated": len(floor_rated),
        "floor_missed": [(p["layer"], p["T"], round(p["over_floor"][p["best"]], 3)) for p in floor_rated
                         if not p["meets_floor"]],
    }


def _x(ratio) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _cell(p: dict, column: str) -> str:
    if column in p["ms"]:
        return f"{p['ms'][column]:.4f}"
    return "skipped" if p["errors"].get(column, "").startswith("skipped") else "error"


def _ok(flag) -> str:
    return "-" if flag is None else ("ok" if flag else "NO")


def format_header(columns, backward: bool = False) -> str:
    moe = [c for c in columns if c.startswith("moe:")]
    head = f"{'layer':<16} {'T':>6} {'hit':>4} " + " ".join(f"{c + ' ms':>12}" for c in columns)
    if backward:
        head += " " + " ".join(f"{c + ' MB':>12}" for c in columns)
    head += f" {'floor ms':>10} {'bound':>7} "
    head += " ".join(f"{c[4:] + ' spd':>11} {c[4:] + ' /fl':>11}" for c in moe)
    return head + f" {'fl target':>10} {'spd>=' + str(SPEEDUP_MIN):>9}"


def format_row(p: dict, columns) -> str:
    moe = [c for c in columns if c.startswith("moe:")]
    row = f"{p['layer'][:16]:<16} {p['T']:>6} {p['experts_hit']:>4} "
    row += " ".join(f"{_cell(p, c):>12}" for c in columns)
    if "peak_mb" in p:  # --backward: peak memory of one step, then what the forward keeps
        row += " " + " ".join(f"{p['peak_mb'][c]:>6.1f}/{p['saved_mb'][c]:<5.1f}" if c in p["saved_mb"] else f"{'-':>12}"
                              for c in columns)
    row += f" {p['floor_ms']:>10.4f} {p['bound']:>7} "
    row += " ".join(f"{_x(1 / p['over_inductor'][c] if c in p['over_inductor'] else None):>11} "
                    f"{_x(p['over_floor'].get(c)):>11}" for c in moe)
    target = f"<={p['floor_target']} {_ok(p['meets_floor'])}" if p["floor_target"] else "-"
    return row + f" {target:>10} {_ok(p['meets_speedup_min']):>9}"


def summary_line(s: dict) -> str:
    if not s["rated_points"]:
        return "summary: no point with both an inductor and a moe time"
    worst = s["worst"]
    memory = "" if s.get("meets_memory") is None else f"; peak memory <= inductor's: {_ok(s['meets_memory'])}"
    return (f"summary: moe(best kernel) over inductor: geomean {s['geomean_speedup']:.3f}x over "
            f"{s['rated_points']} points (target >= {s['target_geomean']}x: {_ok(s['meets_geomean'])}), worst "
            f"{worst['speedup']:.3f}x at {worst['layer']} T={worst['T']} (no point below {SPEEDUP_MIN}x: "
            f"{_ok(s['meets_speedup_min'])}, {len(s['below_speedup_min'])} below); floor targets met at "
            f"{s['floor_met']}/{s['floor_rated']} points{memory}")


def plot(data: dict, path: Path) -> str:
    """Time over T per column and the floor, one panel per layer; returns a one-line note."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    layers = data["layers"]
    cols = min(2, len(layers))
    rows = (len(layers) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False)
    for ax, layer in zip(axes.flat, layers):
        pts = layer["points"]
        for c in data["columns"]:
            xy = [(p["T"], p["ms"][c]) for p in pts if c in p["ms"]]
            if xy:
                ax.plot(*zip(*xy), marker="o", label=c)
        ax.plot([p["T"] for p in pts], [p["floor_ms"] for p in pts], "k--", label="floor")
        L = layer["layer"]
        ax.set(xscale="log", yscale="log", xlabel="T (tokens)", ylabel="ms",
               title=f"{L['name']}  E{L['E']} K{L['K']} H{L['H']} I{L['I']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.suptitle(f"MoE layer, {data['dtype']}, {data['device']} ({data['date']})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


def _load() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--shapes", choices=sorted(SHAPES), default=None,
                   help="gpu: the real models (default on CUDA); cpu: scaled down (default elsewhere); tiny: seconds")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="T values (default per --shapes)")
    p.add_argument("--layers", nargs="+", default=None, help="subset by name, family or name prefix")
    p.add_argument("--kernels", nargs="+", default=list(KERNELS), help="moe kernel choices (one column each)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bf16 on CUDA, else fp32")
    p.add_argument("--warmup", type=int, default=None, help="calls per column before timing (default 5 CUDA, 2 CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed rounds (default 20 CUDA, 5 CPU)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/moe_layer_<device>_<date>.json)")
    p.add_argument("--plot", default=None, help="PNG path (default: the JSON path with .png)")
    p.add_argument("--backward", action="store_true",
                   help="time forward + backward, with peak memory and the bytes kept for backward")
    return p


def _settings(parser, argv) -> argparse.Namespace:
    """The parsed flags with every default resolved for this machine (parser.error on bad ones)."""
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = args.device.type == "cuda"
    args.shapes = args.shapes or ("gpu" if cuda else "cpu")
    if args.shapes == "gpu" and not cuda:
        parser.error("--shapes gpu needs a CUDA device (DeepSeek-V3's layer alone is 22 GB); try --shapes cpu")
    table = SHAPES[args.shapes]
    wanted = args.layers or [L.name for L in table]
    args.layers = [L for L in table if any(a in (L.name, L.family) or L.name.startswith(a) for a in wanted)]
    if not args.layers:
        parser.error(f"--layers {wanted} matches none of {[L.name for L in table]}")
    args.tokens = args.tokens or (BACKWARD_TOKENS if args.backward else TOKENS)[args.shapes]
    args.warmup = (5 if cuda else 2) if args.warmup is None else args.warmup
    args.iters = (20 if cuda else 5) if args.iters is None else args.iters
    if min(args.tokens) < 1 or args.warmup < 0 or args.iters < 1:
        parser.error("--tokens and --iters must be >= 1, --warmup >= 0")
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    args.out = Path(args.out) if args.out else Path(__file__).parent / "results" / (
        f"moe_layer{'_bwd' if args.backward else ''}_{bench.device_slug(args.device)}_{datetime.date.today().isoformat()}.json")
    args.plot = Path(args.plot) if args.plot else args.out.with_suffix(".png")
    return args


def run(args, command: str) -> dict:
    """Probe the device, time every layer; the JSON document."""
    t_start, load_start, device = time.perf_counter(), _load(), args.device
    kernels, kernel_notes = usable_kernels(args.kernels)
    columns = ["eager", "inductor"] + [f"moe:{k}" for k in kernels]
    peak, bw = bench.peak_flops(device, args.dtype), bench.copy_bandwidth(device)
    print(f"device: {bench.device_name(device)}, {str(args.dtype)[6:]}, {bench.versions()}")
    print(f"measured: peak {peak['flops'] / 1e12:.2f} TFLOP/s ({peak['n']}^3 matmul), "
          f"bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s ({bw['nbytes'] >> 20} MiB copy)")
    legend = LEGEND + ("; <col> MB: peak MB of one step / MB the forward keeps for backward" if args.backward else "")
    print("".join(f"{c}: {note}\n" for c, note in kernel_notes.items())
          + f"\n{legend}\n{format_header(columns, args.backward)}", flush=True)
    probe = {"peak_flops": peak["flops"], "bandwidth": bw["bytes_per_s"]}
    # a recompile per T must show in the compile counts, not be cut short by the cache limit
    with torch._dynamo.config.patch(recompile_limit=64):
        results = [bench_layer(layer, args.tokens, kernels, args.dtype, device, probe, args.warmup, args.iters,
                               lambda line: print(line, flush=True), args.backward) for layer in args.layers]
    return {
        "benchmark": "moe_layer", "mode": "forward+backward" if args.backward else "forward", "command": command, "device": bench.device_name(device),
        "date": datetime.date.today().isoformat(), **bench.versions(), "dtype": str(args.dtype)[6:],
        "shapes": args.shapes, "tokens": args.tokens, "warmup": args.warmup, "iters": args.iters,
        "timing": f"CUDA events, {bench.FLUSH_BYTES >> 20} MiB written before each call" if device.type == "cuda"
                  else "wall clock, caches not flushed",
        "peak_tflops": peak["flops"] / 1e12, "bandwidth_gbs": bw["bytes_per_s"] / 1e9,
        "probes": {"matmul": peak, "copy": bw}, "columns": columns, "kernel_notes": kernel_notes,
        "targets": ({"speedup_geomean": BACKWARD_SPEEDUP_GEOMEAN, "peak_memory": "best moe <= inductor"}
                    if args.backward else {"floor": {"T=1": 2.0, "T=16,128": 1.15, "T>=1024": 1.35},
                                           "speedup_geomean": SPEEDUP_GEOMEAN, "speedup_min": SPEEDUP_MIN}),
        "layers": results, "summary": summarize([p for r in results for p in r["points"]], args.backward),
        "runtime_s": round(time.perf_counter() - t_start, 1),
        "load_avg": {"start": load_start, "end": _load()},  # other work on the machine skews the times
    }


def print_report(data: dict) -> None:
    """The whole table again, compile counts, notes and errors, and the summary line."""
    columns, backward = data["columns"], data.get("mode") == "forward+backward"
    print(f"\n{LEGEND}\n{format_header(columns, backward)}")
    for r in data["layers"]:
        print("\n".join(format_row(p, columns) for p in r["points"]))
    for r in data["layers"]:
        print(f"{r['layer']['name']}: compiles " + ", ".join(f"{c} {n}" for c, n in r["compiles"].items())
              + "".join(f"; {c}: {note}" for c, note in r["notes"].items()))
        for p in r["points"]:
            for c, err in p["errors"].items():
                if not err.startswith("skipped"):
                    print(f"  error {c} T={p['T']}: {err.splitlines()[0][:200]}")
    print("".join(f"{c}: {note}\n" for c, note in data["kernel_notes"].items()) + summary_line(data["summary"]))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _settings(_parser(), argv)
    data = run(args, "python benchmarks/bench_moe_layer.py " + shlex.join(argv))
    print_report(data)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nwrote {args.out}\n{plot(data, args.plot)}\nruntime {data['runtime_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
