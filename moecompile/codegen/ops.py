"""The `moecompile::moe` op: one call per MoE layer in a rewritten graph.

    moecompile::moe(Tensor x (T, H), Tensor[] weights, str program, str kernels, str layer) -> (T, H)

    moecompile::moe_saving(x, weights, program, kernels, layer, save) -> (y, ids, pre)

`moe_saving` is the op of training graphs whose backward runs on Triton: the same forward, also
returning what `save` keeps for the backward (codegen/train.py: "routing" the gate's expert ids
(T, K) int32, "activations" also GEMM 1's pre-activations); the graph reads y only.
`program` is the layer's `MoEProgram.text()` after the layer passes; `weights` follow its
`spec().weight_names()`; `kernels` picks what runs it (codegen.plan: "auto" is Triton on CUDA and
the torch path elsewhere); `layer` names the region for routing traces. The op is opaque to
Inductor; its fake implementation gives shapes under dynamic T, and its backward is a second opaque
op so AOTAutograd never looks inside either. One compiled graph serves every T: what depends on T
(decode path, tuned configs) is picked inside, per T bucket.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ir import MoEProgram, MoESpec
from . import moe_torch, plan, train

# Routing observers: callables (layer: str, topk_ids (T, K) int64, num_experts: int) -> None.
# Empty when no routing trace is being recorded.
routing_observers: list = []


def check_inputs(x: Tensor, weights: list[Tensor], spec: MoESpec) -> None:
    """Raise ValueError naming the first input the op cannot take."""
    if x.dim() != 2 or x.shape[-1] != spec.hidden:
        raise ValueError(f"moecompile::moe: x must be (T, {spec.hidden}), got {tuple(x.shape)}")
    moe_torch.named_weights(weights, spec)  # the weight count
    for name, w in zip(spec.weight_names(), weights):
        if name.startswith("routing_"):  # a traced router's top-k weights and ids, per token
            if tuple(w.shape) != (x.shape[0], spec.top_k) or w.is_floating_point() != (name == "routing_weights"):
                raise ValueError(f"moecompile::moe: {name} must be ({x.shape[0]}, {spec.top_k}) "
                                 f"{'float' if name == 'routing_weights' else 'integer'}, got "
                                 f"{tuple(w.shape)} {w.dtype}")
        elif w.dtype != x.dtype and not name.startswith("router"):
            raise ValueError(f"moecompile::moe: {name} is {w.dtype} but x is {x.dtype}")


def run_forward(x: Tensor, weights: list[Tensor], program: MoEProgram | MoESpec, kernels: str,
                on_route=None) -> Tensor:
    """What the op computes, callable without the op (verification runs exactly this)."""
    if isinstance(program, MoESpec):
        program = plan.program_of(program)
    check_inputs(x, weights, program.spec())
    return plan.forward(program, x, weights, kernels, on_route=on_route).contiguous()


@torch.library.custom_op("moecompile::moe", mutates_args=())
def moe(x: Tensor, weights: list[Tensor], program: str, kernels: str, layer: str) -> Tensor:
    parsed = MoEProgram.parse(program)
    return run_forward(x, weights, parsed, kernels, _on_route(layer, parsed, x.dtype))


# NOTE: outputs are contiguous in the real and the fake implementation alike; Inductor checks that
# the strides it planned for match what the op returns.
@moe.register_fake
def _moe_fake(x, weights, program, kernels, layer):
    return x.new_empty(x.shape)


def _on_route(layer: str, program: MoEProgram, dtype: torch.dtype):
    """The routing observers' callback for one call, or None when nobody records; observers also
    get the layer's H and dtype (what a routing trace records for the layer-time model)."""
    if not routing_observers:
        return None
    num_experts, hidden = program.dims.E, program.dims.H

    def on_route(topk_ids):
        for observe in routing_observers:
            observe(layer, topk_ids, num_experts, hidden=hidden, dtype=dtype)
    return on_route


@torch.library.custom_op("moecompile::moe_saving", mutates_args=())
def moe_saving(x: Tensor, weights: list[Tensor], program: str, kernels: str, layer: str,
               save: str) -> tuple[Tensor, Tensor, Tensor]:
    parsed = MoEProgram.parse(program)
    check_inputs(x, weights, parsed.spec())
    y, ids, pre = plan.forward_saving(parsed, x, weights, kernels, save, _on_route(layer, parsed, x.dtype))
    return y.contiguous(), ids, pre


@moe_saving.register_fake
def _moe_saving_fake(x, weights, program, kernels, layer, save):
    ids, pre = train.saved_shapes(MoEProgram.parse(program).spec(), x.shape[0], save)
    return x.new_empty(x.shape), x.new_empty(ids, dtype=torch.int32), x.new_empty(pre)


@torch.library.custom_op("moecompile::moe_backward", mutates_args=())
def moe_backward(grad: Tensor, x: Tensor, weights: list[Tensor], program: str, kernels: str,
                 saved: list[Tensor]) -> list[Tensor]:
    """Gradients of `moe` for (x, *weights): codegen.train picks the Triton backward kernels where
    the forward runs Triton, else recomputes the torch path's forward under torch.func.vjp.
    saved: moe_saving's (ids, pre), [] after `moe`."""
    grads = train.backward(grad, x, weights, MoEProgram.parse(program), kernels, saved)
    return [g.contiguous() for g in grads]


@moe_backward.register_fake
def _moe_backward_fake(grad, x, weights, program, kernels, saved):
    return [x.new_empty(x.shape)] + [w.new_empty(w.shape) for w in weights]


def _setup_context(ctx, inputs, output):
    x, weights, program, kernels, _layer = inputs
    ctx.save_for_backward(x, *weights)
    ctx.program, ctx.kernels = program, kernels


def _weight_grads(grads: list[Tensor], weights: list[Tensor]) -> list[Tensor | None]:
    """moe_backward's weight gradients for autograd: None for an integer input (a traced router's
    expert ids), which moe_backward fills with a placeholder of its dtype."""
    return [g if w.is_floating_point() else None for g, w in zip(grads, weights)]


def _backward(ctx, grad):
    x, *weights = ctx.saved_tensors
    grads = moe_backward(grad, x, weights, ctx.program, ctx.kernels, [])
    return grads[0], _weight_grads(grads[1:], weights), None, None, None


moe.register_autograd(_backward, setup_context=_setup_context)


def _setup_saving(ctx, inputs, output):
    x, weights, program, kernels, _layer, _save = inputs
    _, ids, pre = output
    ctx.save_for_backward(x, ids, pre, *weights)
    ctx.program, ctx.kernels = program, kernels
    ctx.mark_non_differentiable(ids, pre)


def _backward_saving(ctx, grad, _grad_ids, _grad_pre):
    x, ids, pre, *weights = ctx.saved_tensors
    grads = moe_backward(grad, x, weights, ctx.program, ctx.kernels, [ids, pre])
    return grads[0], _weight_grads(grads[1:], weights), None, None, None, None


moe_saving.register_autograd(_backward_saving, setup_context=_setup_saving)


def _no_double_backward(ctx, grads):
    raise RuntimeError("moecompile::moe: double backward (gradients of gradients, create_graph=True) is "
                       "not supported; leave this layer out of the compiled model "
                       "(skip_layers) to differentiate it twice")


def _setup_nothing(ctx, inputs, output):
    pass


moe_backward.register_autograd(_no_double_backward, setup_context=_setup_nothing)
