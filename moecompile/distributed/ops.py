"""The ops a sharded layer calls: `moecompile::ep_experts` and its backward, opaque to Dynamo,
AOTAutograd and Inductor (the exchange sizes its buffers from counts it receives), so a sharded
model compiles as one graph around them.

    moecompile::ep_experts(x (T, H), ids (T, K), w (T, K), params, layer) -> (T, H)
    moecompile::ep_experts_backward(grad, x, ids, w, params, layer) -> [grad x, grad w, *grad params]

`layer` is the key of a ShardedExperts in this process (what holds the slots' map, the process
group, the expert code and the statistics); `params` its local expert weights. The backward saves
the op's inputs alone and sends the rows out again (exchange.experts_backward).
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import Tensor

from . import exchange

_LAYERS: dict[str, weakref.ref] = {}
_SERIAL = itertools.count()


def register(module) -> str:
    """A key for `module` (a ShardedExperts) that the ops find it by, as long as it lives."""
    key = f"{module.layer.name}#{next(_SERIAL)}"
    _LAYERS[key] = weakref.ref(module, lambda _ref, key=key: _LAYERS.pop(key, None))
    return key


def layer_of(key: str):
    module = _LAYERS.get(key)
    module = module() if module is not None else None
    if module is None:
        raise RuntimeError(f"moecompile::ep_experts: no sharded layer {key!r} in this process (was its model freed?)")
    return module


@torch.library.custom_op("moecompile::ep_experts", mutates_args=())
def ep_experts(x: Tensor, ids: Tensor, w: Tensor, params: list[Tensor], layer: str) -> Tensor:
    m = layer_of(layer)
    m.calls += 1
    return exchange.experts_forward(m.layer, m.run_local, m.group, m.chunks(), m.stats, x, ids, w, params)


@ep_experts.register_fake
def _ep_experts_fake(x, ids, w, params, layer):
    return x.new_empty(x.shape)


@torch.library.custom_op("moecompile::ep_experts_backward", mutates_args=())
def ep_experts_backward(grad: Tensor, x: Tensor, ids: Tensor, w: Tensor, params: list[Tensor],
                        layer: str) -> list[Tensor]:
    m = layer_of(layer)
    chunks = m.chosen if m.chosen is not None else 1
    return exchange.experts_backward(m.layer, m.run_local, m.group, chunks, grad, x, ids, w, params)


@ep_experts_backward.register_fake
def _ep_experts_backward_fake(grad, x, ids, w, params, layer):
    return [x.new_empty(x.shape), w.new_empty(w.shape)] + [p.new_empty(p.shape) for p in params]


def _setup_context(ctx, inputs, output):
    x, ids, w, params, layer = inputs
    ctx.save_for_backward(x, ids, w, *params)
    ctx.layer = layer


def _backward(ctx, grad):
    x, ids, w, *params = ctx.saved_tensors
    gx, gw, *gparams = ep_experts_backward(grad, x, ids, w, params, ctx.layer)
    return gx, None, gw, gparams, None


ep_experts.register_autograd(_backward, setup_context=_setup_context)
