"""`moecompile::grouped_mm`: rows sorted by expert times one weight per expert, as one opaque op.

    grouped_mm(a (S, in), w (E, in, out), offs (E,) int32) -> (S, out)
        out[offs[e-1]:offs[e]] = a[offs[e-1]:offs[e]] @ w[e]        (offs[-1] == S)

What `moecompile.prepare` traces in place of a Python loop over per-expert modules: the group
sizes are data-dependent, so the loop over groups stays inside the op, where neither Dynamo nor
Inductor sees it (the same reason transformers wraps its grouped_mm fallback in a custom op). It runs
torch's `F.grouped_mm` where the device supports it (`moe_torch.use_grouped_mm`) and one `mm` per
non-empty group otherwise; its backward is a second opaque op. Detection reads it as a GEMM like any
other grouped_mm; once the layer is lowered to `moecompile::moe` this op no longer runs at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import moe_torch


def _check(a: Tensor, w: Tensor, offs: Tensor) -> None:
    if a.dim() != 2 or w.dim() != 3 or offs.dim() != 1 or offs.shape[0] != w.shape[0]:
        raise ValueError(f"moecompile::grouped_mm: expected a (S, in), w (E, in, out), offs (E,); got "
                         f"{tuple(a.shape)}, {tuple(w.shape)}, {tuple(offs.shape)}")
    if a.shape[1] != w.shape[1]:
        raise ValueError(f"moecompile::grouped_mm: a has {a.shape[1]} columns, w takes {w.shape[1]}")


def _groups(offs: Tensor) -> list[tuple[int, int, int]]:
    """(expert, start, end) of every non-empty group; one host sync."""
    out, start = [], 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out.append((e, start, end))
        start = end
    return out


def _forward(a: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    if moe_torch.use_grouped_mm(a, w, a.shape[0], w.shape[0]):
        return F.grouped_mm(a.contiguous(), w, offs=offs.to(torch.int32))
    out = a.new_zeros(a.shape[0], w.shape[2])  # zeros: rows past offs[-1] (none when offs[-1] == S)
    for e, start, end in _groups(offs):
        torch.mm(a[start:end], w[e], out=out[start:end])
    return out


@torch.library.custom_op("moecompile::grouped_mm", mutates_args=())
def grouped_mm(a: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    _check(a, w, offs)
    return _forward(a, w, offs)


@grouped_mm.register_fake
def _grouped_mm_fake(a, w, offs):
    return a.new_empty(a.shape[0], w.shape[2])


@torch.library.custom_op("moecompile::grouped_mm_backward", mutates_args=())
def grouped_mm_backward(a: Tensor, w: Tensor, offs: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
    """(grad_a (S, in), grad_w (E, in, out)) for grad (S, out): grad_a = grad @ w[e].T and
    grad_w[e] = a_e.T @ grad_e per group; experts without rows get zero gradients."""
    grad_a = _forward(grad, w.transpose(1, 2), offs)
    grad_w = w.new_zeros(w.shape)  # contiguous, as the fake says, whatever w's strides
    for e, start, end in _groups(offs):
        torch.mm(a[start:end].t(), grad[start:end], out=grad_w[e])
    return grad_a, grad_w


@grouped_mm_backward.register_fake
def _grouped_mm_backward_fake(a, w, offs, grad):
    return a.new_empty(a.shape), w.new_empty(w.shape)


def _setup_context(ctx, inputs, output):
    a, w, offs = inputs
    ctx.save_for_backward(a, w, offs)


def _backward(ctx, grad):
    a, w, offs = ctx.saved_tensors
    grad_a, grad_w = grouped_mm_backward(a, w, offs, grad.contiguous())
    return grad_a, grad_w, None


grouped_mm.register_autograd(_backward, setup_context=_setup_context)
