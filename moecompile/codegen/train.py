"""codegen.train: how a layer's backward runs (the `moecompile::moe_backward` op calls `backward`).

    backward   runs                                                               when
    triton     the routed experts on the Triton backward kernels                  the forward runs
               (codegen/triton/backward.py); the router's and the shared          Triton and GEMM 1
               expert's gradients by torch.func.vjp on the device               is fused
    recompute  the torch path's forward again under torch.func.vjp                everywhere else
               (the eager loop for kernels="reference")

What the Triton backward keeps between forward and backward: the op's inputs only (x and the
weights, which autograd keeps anyway). It recomputes the routing (router GEMM, top-k, the align
metadata: O(T*K) work) and, inside down_backward, GEMM 1's pre-activations, so no (T*K, I) tensor
lives from forward to backward; its own temporaries are dh (P, 2I), a (P, I) and the dx rows
(P, H) in fp32. The routing is recomputed with the torch functions, as the recompute path does:
where two experts' scores tie to the last bit, the torch top-k may pick another expert than the
forward's gate kernel did, and that token's gradient follows the torch choice.

Determinism: no kernel uses atomics; each expert's weight gradient is one program per tile walking
the expert's rows in order, and dx adds a token's K rows in k order (the forward's combine), so two
runs give the same bits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ir import MoEProgram, MoESpec
from . import moe_torch, plan, reference

BACKWARDS = ("triton", "recompute")


def choose(program: MoEProgram, kernels: str, device: torch.device) -> str:
    """The backward a layer runs: "triton" or "recompute" (see the module docstring)."""
    what, _ = plan.choose(program, kernels, device)
    if what != "triton":
        return "recompute"
    from .triton import launch
    return "triton" if launch.fused_experts(program) else "recompute"


def backward(grad: Tensor, x: Tensor, weights: list[Tensor], program: MoEProgram, kernels: str) -> list[Tensor]:
    """Gradients of the op's output for (x, *weights), given grad (T, H)."""
    spec = program.spec()
    if choose(program, kernels, x.device) == "triton":
        return triton_backward(grad.to(x.dtype).contiguous(), x, weights, spec)
    forward = plan.differentiable_forward(kernels)

    def f(x_, *ws):
        return forward(x_, list(ws), spec)

    _, vjp = torch.func.vjp(f, x, *weights)
    return list(vjp(grad.to(x.dtype)))


_ROUTER = ("router_weight", "router_bias", "router_correction_bias")


def triton_backward(grad: Tensor, x: Tensor, weights: list[Tensor], spec: MoESpec) -> list[Tensor]:
    """The routed experts' gradients on the backward kernels, the router's and the shared
    expert's by torch.func.vjp; dx sums all three in the combine kernel. -> [dx, *d(weights)]"""
    from .triton import align as align_k
    from .triton import backward as bwd
    from .triton import grouped_gemm as gemm_k
    from .triton import launch

    named = moe_torch.named_weights(weights, spec)
    T, H, K, E, I = x.shape[0], spec.hidden, spec.top_k, spec.num_experts, spec.intermediate
    tm = launch.tile_m(spec)
    # 1. the routing and the shared expert again, under torch.func.vjp (both cheap next to the
    # experts); vjp rather than torch.autograd, which records nothing inside a custom op's kernel
    side_names = [n for n in named if n in _ROUTER or n.startswith("shared")]

    def routed(x_, *side_):
        side = dict(zip(side_names, side_))
        topk_w, ids = moe_torch.route(x_, side, spec)
        if spec.shared_intermediate:
            return (topk_w, moe_torch._shared_expert(x_, side, spec)), ids
        return (topk_w,), ids

    outs, side_vjp, ids = torch.func.vjp(routed, x, *[named[n] for n in side_names], has_aux=True)
    ids = ids.to(torch.int32)
    counts = reference.histogram(ids, E)
    rows, tiles, inv = align_k.align(ids, counts, E, tm)
    topk_w = outs[0]
    w = topk_w.detach()
    # 2. GEMM 2 and the activation backward, then GEMM 1's input gradient per row
    name = _first_name(spec)  # the gate (separate), fused gate_up or up weight
    first, bias = named[name], named.get(name + "_bias")
    w_up, bias_up = (named["up_proj"], named.get("up_proj_bias")) if spec.layout == "separate" else (None, None)
    shape = dict(activation=spec.activation, gated=spec.gated, layout=spec.layout, transposed=spec.transposed)
    dh, a, dw_rows = bwd.down_backward(grad, x, rows, tiles, first, bias, named["down_proj"],
                                       named.get("down_proj_bias"), w, top_k=K, tile_m=tm,
                                       act_alpha=spec.act_alpha, act_limit=spec.act_limit, w_up=w_up,
                                       bias_up=bias_up, **shape)
    dw = dw_rows[inv.long()].view(T, K)
    dxr = bwd.dx_rows(dh, rows, tiles, first, hidden=H, tile_m=tm, w_up=w_up, **shape)
    # 3. the router's and the shared expert's gradients, then dx = the experts' rows + theirs
    got = side_vjp((dw.to(topk_w.dtype), grad)[:len(outs)])
    side_grads = dict(zip(["x"] + side_names, got))
    dx = gemm_k.combine(dxr, inv, num_tokens=T, top_k=K, out_dtype=x.dtype, shared=side_grads.pop("x").to(x.dtype))
    # 4. the experts' weight gradients, one deterministic reduction per expert, written through
    # views of each gradient laid out as its weight (interleaved, transposed, biases)
    start, count = bwd.expert_tiles(counts, tm)
    grads = dict(side_grads)
    for n in spec.weight_names():
        if n not in grads:
            grads[n] = torch.empty_like(named[n])
    dwg, dwu, dbg, dbu, _ = gemm_k._gate_up_views(x, grads[name], grads.get("up_proj") if w_up is not None else None,
                                                  grads.get(name + "_bias"),
                                                  grads.get("up_proj_bias") if bias_up is not None else None,
                                                  what="backward", dtypes=gemm_k._GRAD_DTYPES, **shape)
    routing = dict(top_k=K, tile_m=tm)
    bwd.weight_grad(dh[:, :I], x, rows, start, count, dwg, dbg, b_gather=True, **routing)
    if spec.gated:
        bwd.weight_grad(dh[:, I:], x, rows, start, count, dwu, dbu, b_gather=True, **routing)
    d_down = grads["down_proj"]
    bwd.weight_grad(grad, a, rows, start, count, d_down.transpose(1, 2) if spec.transposed else d_down,
                    grads.get("down_proj_bias"), w, a_gather=True, **routing)
    return [dx] + [grads[n].to(named[n].dtype) for n in spec.weight_names()]


def _first_name(spec: MoESpec) -> str:
    return "gate_proj" if spec.layout == "separate" else ("gate_up_proj" if spec.gated else "up_proj")
