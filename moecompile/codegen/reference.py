"""The program interpreter: any MoEProgram run stage by stage in plain torch.

    run(program, x (T, H), weights per spec.weight_names()) -> y (T, H)

Each stage has one function here, with the data formats the Triton kernels use between stages
(routing rows padded per expert to tiles of `tile_m`, -1 on padding; fp32 accumulation, one
rounding per stage output), so the interpreter is both the meaning of a program and the eager
reference of every kernel's stage. Tests run it before and after each layer pass: an exact pass
leaves its output unchanged. Routing options are read off `program.spec()`, which `check()` proves
equal to the stages' own options.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..ir import MoEProgram, MoESpec
from . import moe_torch

# Rows per tile when the interpreter runs alone: small, so a test's few tokens still pad.
TILE_M = 16


class Context:
    """What stage functions share: the layer, the tile size, the named weights and T; `keep`, the
    values run returns beside y, and `kept`, where a stage function leaves those that are not
    program values (GEMM 1's pre-activations, "pre")."""

    def __init__(self, program: MoEProgram, weights: dict[str, Tensor], num_tokens: int, tile_m: int,
                 keep: tuple[str, ...] = ()):
        self.program, self.spec, self.weights = program, program.spec(), weights
        self.T, self.tile_m = num_tokens, tile_m
        self.keep, self.kept = keep, {}


StageFn = Callable[..., tuple]


def run(program: MoEProgram, x: Tensor, weights: list[Tensor], *, tile_m: int = TILE_M,
        stage_fns: dict[str, StageFn] | None = None, on_route=None, keep: tuple[str, ...] = ()):
    """y (T, H) of `program` on x (T, H). `stage_fns` (op -> function) overrides the torch function
    of some stages (codegen's Triton launches); the rest run here. With `keep` (value names, or
    names a stage function fills in ctx.kept): (y, *kept values) instead."""
    spec = program.spec()
    named = moe_torch.named_weights(weights, spec)
    ctx = Context(program, named, x.shape[0], tile_m, keep)
    env: dict[str, Tensor] = {"x": x, **named}
    fns = {**STAGE_FNS, **(stage_fns or {})}
    for stage in program.stages:
        outs = fns[stage.op](ctx, stage, *(env[n] for n in stage.ins))
        env.update(zip(stage.outs, outs))
        if on_route is not None and "ids" in stage.outs:
            on_route(env["ids"].long())
    if not keep:
        return env["y"]
    missing = [k for k in keep if k not in env and k not in ctx.kept]
    if missing:
        raise ValueError(f"program run: no stage computed {missing} (asked to keep {keep})")
    return (env["y"], *(ctx.kept[k] if k in ctx.kept else env[k] for k in keep))


# -- routing ------------------------------------------------------------------------------------


def router_gemm(ctx: Context, stage, x, router_weight, router_bias=None):
    weights = {"router_weight": router_weight} | ({"router_bias": router_bias} if router_bias is not None else {})
    return (moe_torch.router_logits(x, weights, ctx.spec),)


def topk(ctx: Context, stage, logits, correction_bias=None):
    weights = {"router_correction_bias": correction_bias} if correction_bias is not None else {}
    w, ids = moe_torch.topk_of_logits(logits, weights, ctx.spec)
    return w, ids.to(torch.int32)


def route(ctx: Context, stage, routing_weights, routing_ids):
    return routing_weights, routing_ids.to(torch.int32)


def gate(ctx: Context, stage, x, router_weight, *biases):
    names = (["router_bias"] if stage.router_bias else []) + (["router_correction_bias"] if stage.correction_bias else [])
    weights = {"router_weight": router_weight, **dict(zip(names, biases))}
    (logits,) = router_gemm(ctx, stage, x, router_weight, weights.get("router_bias"))
    w, ids = topk(ctx, stage, logits, weights.get("router_correction_bias"))
    return w, ids, histogram(ids, ctx.spec.num_experts)


def histogram(ids: Tensor, num_experts: int) -> Tensor:
    """counts (E,) int32 of ids (T, K), on device with no host sync (bincount reads the max)."""
    counts = torch.zeros(num_experts, dtype=torch.int32, device=ids.device)
    return counts.index_add_(0, ids.reshape(-1).long(), torch.ones_like(ids.reshape(-1), dtype=torch.int32))


def padded_rows(num_pairs: int, num_experts: int, tile_m: int) -> int:
    """P: sum over e of round_up(counts[e], tile_m) <= S + E * (tile_m - 1), rounded up to a tile;
    a static bound, so every shape is known from T, K, E and tile_m alone."""
    return -(-(num_pairs + num_experts * (tile_m - 1)) // tile_m) * tile_m


def align_rows(ids: Tensor, counts: Tensor, num_experts: int, tile_m: int) -> tuple[Tensor, Tensor, Tensor]:
    """ids (T, K), counts (E,) -> rows (P,), tiles (P / tile_m,), inv (T*K,) int32: a stable argsort
    of the ids, each expert's rows padded to whole tiles (-1), experts in order."""
    flat = ids.reshape(-1).long()
    S = flat.numel()
    counts = counts.long()
    P = padded_rows(S, num_experts, tile_m)
    full = lambda n: torch.full((n,), -1, dtype=torch.int32, device=ids.device)  # noqa: E731
    rows_out, tiles_out, inv = full(P), full(P // tile_m), full(S)
    padded = (counts + tile_m - 1) // tile_m * tile_m
    row_start = torch.cumsum(padded, 0) - padded  # (E,) first padded row of each expert
    pair_start = torch.cumsum(counts, 0) - counts  # (E,) first position in the unpadded sort
    order = torch.argsort(flat, stable=True)  # (S,) pairs grouped by expert, increasing p within
    expert = flat[order]
    rows = row_start[expert] + torch.arange(S, device=ids.device) - pair_start[expert]
    rows_out[rows] = order.to(torch.int32)
    inv[order] = rows.to(torch.int32)
    tiles = torch.repeat_interleave(torch.arange(num_experts, device=ids.device, dtype=torch.int32),
                                    padded // tile_m)
    tiles_out[:tiles.numel()] = tiles
    return rows_out, tiles_out, inv


def align(ctx: Context, stage, ids, counts=None):
    E = ctx.spec.num_experts
    return align_rows(ids, histogram(ids, E) if counts is None else counts, E, ctx.tile_m)


# -- experts ------------------------------------------------------------------------------------


def gather_rows(x: Tensor, rows: Tensor, top_k: int) -> Tensor:
    """xs (P, H) = x[rows // K], zeros on padding rows."""
    xs = x.new_zeros(rows.shape[0], x.shape[1])
    live = rows >= 0
    xs[live] = x[rows[live].long() // top_k]
    return xs


def gather(ctx: Context, stage, x, rows):
    return (gather_rows(x, rows, stage.top_k),)


def activate(h: Tensor, activation: str, gated: bool, layout: str, alpha: float, limit: float) -> Tensor:
    """act(gate) * up of h (.., 2I) split by layout (separate: as concat), or act(h) if not gated."""
    if not gated:
        return moe_torch._ACTIVATIONS[activation](h)
    g, u = (h[..., ::2], h[..., 1::2]) if layout == "interleaved" else h.chunk(2, dim=-1)
    return moe_torch.gated_activation(g, u, activation, alpha, limit)


def activation(ctx: Context, stage, h):
    a = activate(h.float(), stage.activation, stage.gated, stage.layout, stage.act_alpha, stage.act_limit)
    return (a.to(h.dtype),)


def _expert_matrices(stage, ws: tuple[Tensor, ...]) -> tuple[Tensor, Tensor | None]:
    """The GEMM's weight as one (E, out, in) tensor and its bias (E, out): separate gate and up
    weights stacked as [gate; up] (the concat layout, as Activation splits them)."""
    n = 2 if stage.proj == "gate_up" and stage.layout == "separate" else 1
    mats = [w.transpose(1, 2) if stage.transposed else w for w in ws[:n]]
    biases = ws[n:2 * n] if stage.expert_bias else ()
    w = mats[0] if n == 1 else torch.cat(mats, dim=1)
    bias = (biases[0] if n == 1 else torch.cat(biases, dim=1)) if biases else None
    return w, bias


def tile_rows(rows: Tensor, tiles: Tensor, tile_m: int):
    """(expert, row indices) of every expert with live rows (pair >= 0 in a tile of that expert)."""
    row_expert = tiles.long().repeat_interleave(tile_m)  # (P,)
    live = (rows >= 0) & (row_expert >= 0)
    for e in row_expert[live].unique().tolist():
        yield e, (live & (row_expert == e)).nonzero().view(-1)


def grouped_gemm(ctx: Context, stage, first, rows, tiles, *rest):
    """out[r] = epilogue(prologue(first)[r] @ W[e].T + b[e]) per expert e of row r; zeros on rows
    no expert owns. fp32 accumulation, one rounding (fp32 out with the top-k weight)."""
    n_weights = (2 if stage.layout == "separate" and stage.proj == "gate_up" else 1) * (1 + stage.expert_bias)
    ws, extra = rest[:n_weights], rest[n_weights:]
    w, bias = _expert_matrices(stage, ws)
    inp = gather_rows(first, rows, ctx.spec.top_k) if stage.prologue == "gather" else first
    width = w.shape[1] // 2 if stage.epilogue == "activation" and stage.gated else w.shape[1]
    out_dtype = torch.float32 if stage.epilogue == "topk_weight" else first.dtype
    out = torch.zeros(rows.shape[0], width, dtype=out_dtype, device=first.device)
    if "pre" in ctx.keep and stage.epilogue == "activation":
        ctx.kept["pre"] = first.new_zeros(rows.shape[0], w.shape[1])
    for e, r in tile_rows(rows, tiles, ctx.tile_m):
        acc = inp[r].float() @ w[e].float().T + (bias[e].float() if bias is not None else 0)
        if stage.epilogue == "activation":
            if "pre" in ctx.keep:  # GEMM 1's pre-activations, concat order, as the Triton kernel keeps them
                pre = ctx.kept["pre"]
                concat = stage.gated and stage.layout == "interleaved"
                pre[r] = (torch.cat([acc[:, ::2], acc[:, 1::2]], dim=1) if concat else acc).to(pre.dtype)
            acc = activate(acc, stage.activation, stage.gated, stage.layout, stage.act_alpha, stage.act_limit)
        elif stage.epilogue == "topk_weight":
            acc = acc * extra[0].reshape(-1)[rows[r].long()].float().unsqueeze(-1)
        out[r] = acc.to(out_dtype)
    return (out,)


def shared_mlp(ctx: Context, stage, x, *ws):
    names = ["shared_gate_proj", "shared_up_proj", "shared_down_proj", "shared_expert_gate"]
    return (moe_torch._shared_expert(x, dict(zip(names, ws)), ctx.spec),)


def combine_rows(ys: Tensor, inv: Tensor, topk_w: Tensor | None, shared: Tensor | None, *, num_tokens: int,
                 top_k: int, out_dtype: torch.dtype) -> Tensor:
    """out[t] = sum over k in order of [w[t, k] *] ys[inv[t*K + k]] (+ shared[t]), in fp32."""
    pick = inv.long().view(num_tokens, top_k)
    acc = ys.new_zeros(num_tokens, ys.shape[1], dtype=torch.float32)
    for k in range(top_k):
        row = ys[pick[:, k]].float()
        acc = acc + (row * topk_w[:, k:k + 1].float() if topk_w is not None else row)
    if shared is not None:
        acc = acc + shared.float()
    return acc.to(out_dtype)


def combine(ctx: Context, stage, ys, inv, *rest):
    topk_w = rest[0] if stage.weighted else None
    shared = rest[-1] if len(rest) > stage.weighted else None
    return (combine_rows(ys, inv, topk_w, shared, num_tokens=ctx.T, top_k=ctx.spec.top_k,
                         out_dtype=_dtype(ctx.spec)),)


def _dtype(spec: MoESpec) -> torch.dtype:
    return getattr(torch, spec.dtype)


STAGE_FNS: dict[str, StageFn] = {
    "RouterGemm": router_gemm, "TopK": topk, "Gate": gate, "Route": route, "Align": align, "Gather": gather,
    "Activation": activation, "GroupedGemm": grouped_gemm, "SharedMLP": shared_mlp, "Combine": combine,
}
