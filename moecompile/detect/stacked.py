"""Expert weights stacked in the graph: one (E, *, *) weight made of E per-expert 2D parameters.

A model whose experts are E separate modules (an `nn.ModuleList` of MLPs) has no 3D weight among
its graph inputs; `moecompile.prepare` gives such a block a traced forward that stacks the experts'
weights, so the graph shows

    Matches:     W = torch.stack([p_0, ..., p_{E-1}])     p_e 2D parameters (graph inputs) of one shape
    Treated as:  a 3D expert weight input (E, rows, cols): outside the region, passed to the op as is

Detection takes such a node wherever it takes a 3D parameter; it stays in the graph after
lowering (the op reads it), so gradients still reach every p_e through the stack.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..fx import shape_of


def is_stacked_weight(node) -> bool:
    """`torch.stack([p_0, ..., p_{E-1}], dim=0)` over E >= 2 2D parameters of one shape."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target is not torch.stack:
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    items = node.args[0] if node.args else None
    if dim != 0 or not isinstance(items, (list, tuple)) or len(items) < 2:
        return False
    shapes = {shape_of(p) if isinstance(p, fx.Node) else None for p in items}
    if len(shapes) != 1 or len(next(iter(shapes)) or ()) != 2:
        return False
    return all(p.op == "placeholder" and (p.type is torch.nn.Parameter or "_parameters_" in p.name)
               for p in items)


# views that keep a weight a weight: W.view(E, I, H), W.view(...).transpose(1, 2)
_VIEWS = {"view", "reshape", "transpose", "permute"}


def _view_root(node) -> fx.Node | None:
    """The 2D parameter input `node` is a chain of views of (DBRX's (E*I, H) matrices viewed
    (E, I, H), then transposed), or None."""
    chain = 0
    while isinstance(node, fx.Node) and node.op in ("call_method", "call_function") and node.args \
            and getattr(node.target, "__name__", node.target) in _VIEWS \
            and all(not isinstance(a, fx.Node) for a in node.args[1:]) and not node.kwargs:
        node, chain = node.args[0], chain + 1
    if chain and isinstance(node, fx.Node) and node.op == "placeholder" and len(shape_of(node) or ()) == 2 \
            and (node.type is torch.nn.Parameter or "_parameters_" in node.name):
        return node
    return None


def is_viewed_weight(node) -> bool:
    """A 3D view of a 2D parameter (the expert dimension made by the view) that something other than
    another view reads: the end of the chain, which detection treats as the weight."""
    return (_view_root(node) is not None and len(shape_of(node) or ()) == 3
            and any(_view_root(u) is None for u in node.users))


def is_derived_weight(node) -> bool:
    """A stacked weight, or any link of a chain of views of a 2D parameter: weights, not layer nodes."""
    return is_stacked_weight(node) or _view_root(node) is not None


def is_weight_input(node) -> bool:
    """A graph input, or a stacked or viewed expert weight (which detection treats as one)."""
    return isinstance(node, fx.Node) and (node.op == "placeholder" or is_stacked_weight(node)
                                          or is_viewed_weight(node))


def input_value(node: fx.Node, placeholder_values: dict):
    """The value of a graph input or of a stacked weight, from the graph's example inputs;
    KeyError if it cannot be computed from them."""
    if node in placeholder_values:
        return placeholder_values[node]
    if _view_root(node) is not None:
        base = input_value(node.args[0], placeholder_values)
        fn = getattr(torch.Tensor, node.target) if node.op == "call_method" else node.target
        return fn(base, *node.args[1:])
    if not is_stacked_weight(node):
        raise KeyError(node.name)
    with torch.no_grad():
        return torch.stack([placeholder_values[p] for p in node.args[0]])
