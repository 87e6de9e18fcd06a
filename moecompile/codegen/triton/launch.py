"""A program's stages as Triton launches: the codegen of the `triton` kernel choice.

    Matches:   a MoEProgram (after fuse_gate and fuse_epilogues, or any other form)
    Rewrites to, per stage:
        Gate                                   -> gate.gate              (T, H) -> w, ids, counts
        Align(ids, counts)                     -> align.align            -> rows, tiles, inv
        GroupedGemm(gate_up, gather, activation) -> grouped_gemm.gemm_gate_up   (P, I)
        GroupedGemm(down[, topk_weight])       -> grouped_gemm.gemm_down       (P, H)
        Combine                                -> grouped_gemm.combine         (T, H)
        anything else (RouterGemm, TopK, Gather, Activation, an unfused GEMM, SharedMLP, a Gate
        with capacity or more than gate.MAX_EXPERTS experts) -> its torch function in
        codegen.reference, on the same device, in the same data formats.

The tile height (tile_m) is the grouped GEMMs' BLOCK_M, fixed per layer by E (default_config), so
the routing metadata Align builds fits both GEMMs whatever config the autotuner picks per
tokens-per-expert bucket (codegen.autotune; MOECOMPILE_AUTOTUNE=0 pins the defaults). A token's
output bits depend on its own row only for a fixed config and one path: across buckets a tuned
BLOCK_K may add in another order, and the decode kernels (T <= 16) reduce differently from the
tiled ones.

The shared expert runs before the routed experts (torch GEMMs) and the combine kernel adds it: no
extra (T, H) pass.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ...ir import MoEProgram, MoESpec
from .. import autotune, reference
from . import align as align_k
from . import decode as decode_k
from . import gate as gate_k
from . import grouped_gemm as gemm_k


def unavailable(device: torch.device) -> str | None:
    """Why the kernels cannot launch on `device` (the interpreter was not on when triton loaded)."""
    if device.type != "cuda" and not align_k._INTERPRETED:
        return "TRITON_INTERPRET=1 was set after triton was imported"
    return None


def tile_m(spec: MoESpec) -> int:
    return gemm_k.default_config("gate_up", spec.num_experts, spec.intermediate, spec.hidden,
                                 getattr(torch, spec.dtype))["BLOCK_M"]


def run(program: MoEProgram, x: Tensor, weights: list[Tensor], on_route=None) -> Tensor:
    spec = program.spec()
    decoding = fused_experts(program) and decode_k.applies(x.shape[0], spec.top_k, spec.num_experts)
    return reference.run(program, x, weights, tile_m=tile_m(spec), stage_fns=DECODE_FNS if decoding else STAGE_FNS,
                         on_route=on_route)


def run_saving(program: MoEProgram, x: Tensor, weights: list[Tensor], save: str,
               on_route=None) -> tuple[Tensor, Tensor, Tensor | None]:
    """-> (y, ids (T, K) int32, pre (P, 2I or I) or None): the tiled path (never the decode kernels:
    the backward walks the forward's tiles) keeping what `save` names for the backward: "routing"
    the gate's expert ids, "activations" also GEMM 1's pre-activations (codegen/train.py)."""
    spec = program.spec()
    keep = ("ids", "pre") if save == "activations" else ("ids",)
    y, ids, *pre = reference.run(program, x, weights, tile_m=tile_m(spec), stage_fns=STAGE_FNS,
                                 on_route=on_route, keep=keep)
    return y, ids.to(torch.int32).contiguous(), (pre[0] if pre else None)


def describe(program: MoEProgram) -> str:
    """One name per stage in order: the kernel, or "<op>(torch)" where a stage runs in torch; then
    the decode variant where the program has one."""
    spec = program.spec()
    names = ", ".join(_kernel_name(s, spec) or f"{s.op}(torch)" for s in program.stages)
    if fused_experts(program):
        names += f"; decode (T <= {decode_k.MAX_TOKENS}, T*K <= max(E, 16)): decode_gate_up, decode_down"
    return names


def fused_experts(program: MoEProgram) -> bool:
    """GEMM 1 fused (gather, activation) and a down GEMM: the form the decode kernels (which replace
    Align and both GEMMs) and the backward kernels take."""
    gemms = [s for s in program.stages if s.op == "GroupedGemm"]
    return len(gemms) == 2 and _fused_gate_up(gemms[0]) and gemms[1].proj == "down"


def _kernel_name(stage, spec: MoESpec) -> str | None:
    if stage.op == "Gate":
        return "gate" if _gate_kernel_fits(spec) else None
    if stage.op == "Align":
        return "align"
    if stage.op == "GroupedGemm" and _fused_gate_up(stage):
        return f"gemm_gate_up(gather, {stage.activation})"
    if stage.op == "GroupedGemm" and stage.proj == "down":
        return "gemm_down" + ("(topk_weight)" if stage.epilogue == "topk_weight" else "")
    if stage.op == "Combine":
        return "combine" + ("(weighted)" if stage.weighted else "") + ("(+shared)" if len(stage.ins) > 2 + stage.weighted else "")
    return None


def _gate_kernel_fits(spec: MoESpec) -> bool:
    top2_ok = spec.groups == 1 or spec.group_score != "top2_sum" or spec.num_experts // spec.groups >= 2
    # the kernel scores in fp32 (router_fp32); a layer scoring in bf16 runs its gate in torch
    fp32_scores = spec.router_fp32 or spec.router_gemm_fp32 or spec.dtype == "float32"
    return spec.num_experts <= gate_k.MAX_EXPERTS and not spec.capacity_factor and top2_ok and fp32_scores


def _fused_gate_up(stage) -> bool:
    return stage.proj == "gate_up" and stage.prologue == "gather" and stage.epilogue == "activation"


# -- stage functions (ctx, stage, *inputs) -> outputs, as codegen.reference's ------------------


def _gate(ctx, stage, x, router_weight, *biases):
    if not _gate_kernel_fits(ctx.spec):
        return reference.gate(ctx, stage, x, router_weight, *biases)
    names = (["router_bias"] if stage.router_bias else []) + (["correction"] if stage.correction_bias else [])
    b = dict(zip(names, biases))
    s = ctx.spec
    return gate_k.gate(x, router_weight, b.get("router_bias"), b.get("correction"), top_k=s.top_k,
                       scoring=s.scoring, topk_order=s.topk_order, renormalize=s.renormalize,
                       renorm_eps=s.renorm_eps, routed_scaling=s.routed_scaling, groups=s.groups,
                       top_groups=s.top_groups, group_score=s.group_score, masked_score=s.masked_score,
                       weights_from=s.weights_from, router_gemm_fp32=s.router_gemm_fp32,
                       weights_in_input_dtype=s.weights_in_input_dtype)


def _align(ctx, stage, ids, counts=None):
    E = ctx.spec.num_experts
    counts = reference.histogram(ids, E) if counts is None else counts
    return align_k.align(ids.to(torch.int32), counts, E, ctx.tile_m)


def _launch(ctx, stage, kind: str, N: int, K_dim: int, like: Tensor, launch):
    """launch(config) with the config autotune picks for this layer's shapes, the stage's variant
    and the tokens per expert of this call (a bucket of them: never T itself)."""
    s = ctx.spec
    cfg = autotune.pick(kind, E=s.num_experts, N=N, K_dim=K_dim, dtype=like.dtype, device=like.device,
                        tokens_per_expert=ctx.T * s.top_k / s.num_experts, run=launch, flags=_variant(stage))
    return (launch(cfg),)


@functools.lru_cache(maxsize=1024)
def _variant(stage) -> str:
    """The stage's compile-time variant for the autotune key (once per stage, not per call)."""
    options = ",".join(f"{k}={v}" for k, v in stage.options().items() if k not in ("act_alpha", "act_limit"))
    return f"{options},inputs={len(stage.ins)}"


def _grouped_gemm(ctx, stage, first, rows, tiles, *rest):
    s = ctx.spec
    if stage.proj == "gate_up" and not _fused_gate_up(stage):
        return reference.grouped_gemm(ctx, stage, first, rows, tiles, *rest)
    separate = stage.proj == "gate_up" and stage.layout == "separate"
    n = 2 if separate else 1
    ws, biases, extra = rest[:n], rest[n:n + n * stage.expert_bias], rest[n + n * stage.expert_bias:]
    if stage.proj == "gate_up":
        pre = None
        if "pre" in ctx.keep:  # for the backward: (P, 2I or I), the live rows written by the kernel
            pre = first.new_empty(rows.shape[0], 2 * s.intermediate if stage.gated else s.intermediate)
            ctx.kept["pre"] = pre
        return _launch(ctx, stage, "gate_up", s.intermediate, s.hidden, first, lambda cfg: gemm_k.gemm_gate_up(
            first, rows, tiles, ws[0], biases[0] if biases else None, top_k=s.top_k, tile_m=ctx.tile_m,
            activation=stage.activation, gated=stage.gated, layout=stage.layout, transposed=stage.transposed,
            act_alpha=stage.act_alpha, act_limit=stage.act_limit, w_up=ws[1] if separate else None,
            bias_up=biases[1] if separate and biases else None, pre=pre, config=cfg))
    topk_w = extra[0] if stage.epilogue == "topk_weight" else None
    return _launch(ctx, stage, "down", s.hidden, s.intermediate, first, lambda cfg: gemm_k.gemm_down(
        first, rows, tiles, ws[0], biases[0] if biases else None, topk_w, top_k=s.top_k, tile_m=ctx.tile_m,
        transposed=stage.transposed, config=cfg))


def _combine(ctx, stage, ys, inv, *rest):
    topk_w = rest[0] if stage.weighted else None
    shared = rest[-1] if len(rest) > stage.weighted else None
    weighting = {"topk_w": topk_w} if topk_w is not None else {}
    return _launch(ctx, stage, "combine", ctx.spec.hidden, ctx.spec.top_k, ys, lambda cfg: gemm_k.combine(
        ys, inv, num_tokens=ctx.T, top_k=ctx.spec.top_k, out_dtype=getattr(torch, ctx.spec.dtype), shared=shared,
        config=cfg, **weighting))


STAGE_FNS = {"Gate": _gate, "Align": _align, "GroupedGemm": _grouped_gemm, "Combine": _combine}


# -- the decode variant: a handful of tokens, each active expert's weights read once, no tiles ---


def _decode_align(ctx, stage, ids, counts=None):
    """rows: the pairs sorted by expert (S,), no padding; tiles: unused by the decode GEMMs (the
    same order); inv: the row of each pair, for the combine."""
    ctx.ids = ids.to(torch.int32)
    order = decode_k.sort_pairs(ctx.ids)
    return order, order, decode_k.inverse(order)


def _decode_gemm(ctx, stage, first, rows, tiles, *rest):
    s = ctx.spec
    separate = stage.proj == "gate_up" and stage.layout == "separate"
    n = 2 if separate else 1
    ws, biases, extra = rest[:n], rest[n:n + n * stage.expert_bias], rest[n + n * stage.expert_bias:]
    if stage.proj == "gate_up":
        _, a = decode_k.decode_gate_up(
            first, ctx.ids, ws[0], biases[0] if biases else None, top_k=s.top_k, activation=stage.activation,
            gated=stage.gated, layout=stage.layout, transposed=stage.transposed, act_alpha=stage.act_alpha,
            act_limit=stage.act_limit, w_up=ws[1] if separate else None,
            bias_up=biases[1] if separate and biases else None)
        return (a,)
    topk_w = extra[0] if stage.epilogue == "topk_weight" else None
    return (decode_k.decode_down(first, rows, ctx.ids, ws[0], biases[0] if biases else None, topk_w,
                                 top_k=s.top_k, transposed=stage.transposed),)


DECODE_FNS = dict(STAGE_FNS, Align=_decode_align, GroupedGemm=_decode_gemm)
