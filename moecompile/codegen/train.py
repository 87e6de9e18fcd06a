"""codegen.train: how a layer's backward runs (the `moecompile::moe_backward` op calls `backward`).

    backward   runs                                                               when
    triton     the routed experts on the Triton backward kernels                  the forward runs
               (codegen/triton/backward.py); the router's and the shared          Triton and GEMM 1
               expert's gradients by torch.func.vjp on the device               is fused
    recompute  the torch path's forward again under torch.func.vjp                everywhere else
               (the eager loop for kernels="reference")

What is kept between forward and backward (option `save_for_backward`, report.json's "saved"):

    saved        kept beside the op's inputs          the backward recomputes            bytes kept
    inputs       nothing                              the routing (router GEMM, top-k,   0
                                                      align) and GEMM 1 (H*2I per row)
    routing      the gate's expert ids (T, K) int32   the router GEMM and scoring (no    4*T*K
    (default)                                         top-k), align; GEMM 1
    activations  the ids and GEMM 1's pre-activations the router GEMM and scoring,       4*T*K +
                 [hg | hu] (P, 2I) in x's dtype       align                              P*2I*bytes

x and the weights are kept in every mode (autograd keeps them for the rest of the model anyway),
and nothing (T*K, H)-sized ever lives from forward to backward. P = T*K + E*(tile_m - 1) rounded
to a tile (codegen.reference.padded_rows). "routing" costs 8 bytes per token at K = 2 and makes the
backward use exactly the forward's choice: recomputing it, a tie between two experts' scores to the
last bit may go the other way in the torch top-k than in the forward's gate kernel. "activations"
skips GEMM 1's recompute (2 of the backward's 8 T*K*H*I GEMM units: dout @ Wd 1, GEMM 1 again 2,
dx 2, dW_gate_up 2, dW_down 1) at the price of a (P, 2I) tensor per layer, about what inductor
keeps of GEMM 1's output; the backward then reads the
pre-activations rounded to x's dtype instead of recomputing them in fp32. Only layers whose backward
runs on Triton save anything ("recompute" layers recompute everything under torch.func.vjp), and
only in training graphs; the forward then always takes the tiled path (never the decode kernels),
since the backward walks its tiles. The backward's own temporaries are dh (P, 2I), a (P, I) and
the dx rows (P, H).

Determinism: no kernel uses atomics; each expert's weight gradient is one program per tile walking
the expert's rows in order, and dx adds a token's K rows in k order (the forward's combine), so two
runs give the same bits.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from ..ir import MoEProgram, MoESpec
from . import moe_torch, plan, reference

BACKWARDS = ("triton", "recompute")
SAVES = ("inputs", "routing", "activations")


def choose(program: MoEProgram, kernels: str, device: torch.device) -> str:
    """The backward a layer runs: "triton" or "recompute" (see the module docstring)."""
    what, _ = plan.choose(program, kernels, device)
    if what != "triton":
        return "recompute"
    from .triton import launch
    return "triton" if launch.fused_experts(program) else "recompute"


def saved_mode(program: MoEProgram, kernels: str, device: torch.device, save: str) -> str:
    """What a layer keeps for its backward (one of SAVES): `save` where the backward runs on
    Triton, "inputs" where it recomputes on the torch path. A traced router's expert ids are an
    input already: "routing" keeps nothing more for it."""
    if save not in SAVES:
        raise ValueError(f"save_for_backward must be one of {SAVES}, got {save!r}")
    if choose(program, kernels, device) != "triton" or (save == "routing" and program.spec().router == "traced"):
        return "inputs"
    return save


def saved_shapes(spec: MoESpec, num_tokens, save: str) -> tuple[tuple, tuple]:
    """Shapes of (ids, pre) that moecompile::moe_saving returns for `save` (pre (0,) unless
    "activations"); num_tokens may be symbolic."""
    from .triton import launch
    ids = (num_tokens, spec.top_k)
    if save != "activations":
        return ids, (0,)
    P = reference.padded_rows(num_tokens * spec.top_k, spec.num_experts, launch.tile_m(spec))
    return ids, (P, 2 * spec.intermediate if spec.gated else spec.intermediate)


@contextlib.contextmanager
def hooks_set_aside():
    """Within: no saved-tensor hooks (torch.autograd.graph.saved_tensors_hooks, save_on_cpu), which
    torch.func.vjp refuses; after: the caller's again. What vjp saves here are the op's own
    temporaries, freed before it returns; the caller's hooks are for the model's activations."""
    hooks = []
    while (top := torch._C._autograd._top_saved_tensors_default_hooks(True)) is not None:
        hooks.append(top)
        torch._C._autograd._pop_saved_tensors_default_hooks()
    try:
        yield
    finally:
        for pack, unpack in reversed(hooks):
            torch._C._autograd._push_saved_tensors_default_hooks(pack, unpack)


def backward(grad: Tensor, x: Tensor, weights: list[Tensor], program: MoEProgram, kernels: str,
             saved: list[Tensor] = ()) -> list[Tensor]:
    """Gradients of the op's output for (x, *weights), given grad (T, H). `saved`: (ids, pre) that
    moecompile::moe_saving kept ([] when the forward kept nothing; pre (0,) when it kept routing)."""
    with hooks_set_aside():
        return _backward(grad, x, weights, program, kernels, saved)


def _backward(grad, x, weights, program, kernels, saved):
    spec = program.spec()
    if choose(program, kernels, x.device) == "triton":
        ids = saved[0] if len(saved) else None
        pre = saved[1] if len(saved) > 1 and saved[1].dim() == 2 else None
        try:
            return triton_backward(grad.to(x.dtype).contiguous(), x, weights, spec, ids=ids, pre=pre)
        except ValueError as err:  # a launcher's input check: never a crash, the recompute instead
            plan.warn_once(program, f"backward {err}")
    forward = plan.differentiable_forward(kernels)
    # only floating inputs are differentiated; an integer one (a traced router's expert ids) gets
    # a zero placeholder of its dtype, which the op's autograd formula turns into None
    floating = [i for i, w in enumerate(weights) if w.is_floating_point()]

    def f(x_, *ws):
        full = list(weights)
        for i, w in zip(floating, ws):
            full[i] = w
        return forward(x_, full, spec)

    _, vjp = torch.func.vjp(f, x, *[weights[i] for i in floating])
    dx, *dws = vjp(grad.to(x.dtype))
    grads = [torch.zeros_like(w) for w in weights]
    for i, g in zip(floating, dws):
        grads[i] = g
    return [dx] + grads


_ROUTER = ("router_weight", "router_bias", "router_correction_bias", "routing_weights")


def triton_backward(grad: Tensor, x: Tensor, weights: list[Tensor], spec: MoESpec, *, ids: Tensor | None = None,
                    pre: Tensor | None = None) -> list[Tensor]:
    """The routed experts' gradients on the backward kernels, the router's and the shared
    expert's by torch.func.vjp; dx sums all three in the combine kernel. -> [dx, *d(weights)]
    ids (T, K): the forward's expert choice (else top-k again); pre: GEMM 1's pre-activations in
    the forward's tile order (else GEMM 1 again)."""
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

    fixed = {"routing_ids": named["routing_ids"]} if spec.router == "traced" else {}

    def routed(x_, *side_):
        side = dict(zip(side_names, side_), **fixed)
        topk_w, ids_ = moe_torch.route(x_, side, spec, ids)
        if spec.shared_intermediate:
            return (topk_w, moe_torch._shared_expert(x_, side, spec)), ids_
        return (topk_w,), ids_

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
                                       bias_up=bias_up, pre=pre, **shape)
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
            grads[n] = (torch.empty_like if named[n].is_floating_point() else torch.zeros_like)(named[n])
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
