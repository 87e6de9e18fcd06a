"""Where the routing enters an experts module: the graph facts a traced router is matched by.

transformers writes every MoE block's experts as one module called as

    experts(hidden_states (T, H), top_k_index (T, K), top_k_weights (T, K)) -> (T, H)

Dynamo's module stack (node.meta["nn_module_stack"]) says which nodes that module ran, so the values
entering it from outside are exactly the layer's (T, H) input and the routing, whatever computed
the routing.

    Matches:     the nodes of one module that reads 3D expert weights (parameters, stacks or views
                 of them), and what enters it from outside
    Rewrites to: (x2d, w, ids, 3D weights, output) or None
"""

from __future__ import annotations

import re

import torch.fx as fx

from ..fx import Flow, op_kind, shape_of, value_of
from ..fx.names import owner_parts
from .stacked import is_weight_input


_EXPERTS_PART = re.compile(r"experts?|local_experts|expert_list")


def experts_block_name(weights3d: list) -> str | None:
    """The block holding the experts, from the parameters under the expert weights (a 3D parameter,
    the 2D ones a stack or a view reads): their common module path cut before its `experts` part."""
    params = []
    for w in weights3d:
        while w.op != "placeholder" and w.args:  # a view chain, or a stack of per-expert parameters
            w = w.args[0][0] if isinstance(w.args[0], (list, tuple)) else w.args[0]
        params.append(w)
    common = common_module(params)
    if not common:
        return None
    cut = max((i for i, part in enumerate(common) if _EXPERTS_PART.fullmatch(part)), default=len(common) - 1)
    return ".".join(common[:cut]) or None


def experts_entry(flow: Flow, topk: fx.Node) -> tuple | None:
    """(x2d, w, ids, 3D weights, output) where top-k's choice enters the module that holds the
    expert weights (transformers' `experts(hidden_states, top_k_index, top_k_weights)`) and the
    value it returns, or None."""
    entry = first_experts(flow, topk)
    # the top-k chooses the ids, and is not upstream of the layer's input (an attention indexer's is)
    if entry is None or topk not in flow.ancestors(entry[2]) or topk in flow.ancestors(entry[0]):
        return None
    return entry


def first_experts(flow: Flow, topk: fx.Node) -> tuple | None:
    """experts_module of the first experts module after `topk`: the module of the first node after
    it that reads a 3D weight (or a view of one: values of weights alone)."""
    after = flow.descendants(topk)
    derived: set = set()
    first = None
    for n in flow.graph.nodes:
        reads = not derived.isdisjoint(n.all_input_nodes)
        if is_weight_input(n) and len(shape_of(n) or ()) == 3:
            derived.add(n)
        elif n in after and reads:
            first = n
            break
        elif reads and all(a in derived or value_of(a) is None for a in n.all_input_nodes):
            derived.add(n)
    key = module_key(first) if first is not None else None
    return experts_module(flow, key) if key is not None else None


def experts_module(flow: Flow, key: str) -> tuple | None:
    """(x2d, w, ids, 3D weights, output) of the module `key` (in Dynamo's module stack) when it holds
    3D expert weights and takes exactly a (T, H) input, (T, K) weights and (T, K) integer ids."""
    inside = {n for n in flow.graph.nodes if key in (n.meta.get("nn_module_stack") or {})}
    weights3d = sorted({d for n in inside for d in n.all_input_nodes if is_weight_input(d)
                        and len(shape_of(d) or ()) == 3}, key=lambda n: n.name)
    if len(weights3d) < 2:
        return None
    entering = {d for n in inside for d in flow.deps(n) if d not in inside and value_of(d) is not None
                and not is_weight_input(d)}
    ints = [d for d in entering if not value_of(d).is_floating_point()]
    floats = [d for d in entering if value_of(d).is_floating_point()]
    if len(ints) != 1 or len(floats) != 2 or len(shape_of(ints[0]) or ()) != 2:
        return None
    ids = ints[0]
    w = [d for d in floats if shape_of(d) == shape_of(ids)]
    hidden = [d for d in floats if d not in w]
    E = shape_of(weights3d[0])[0]
    leaving = [n for n in inside if any(u not in inside for u in n.users)]
    if (len(w) != 1 or len(hidden) != 1 or not isinstance(shape_of(ids)[1], int)
            or any(shape_of(d)[0] != E for d in weights3d)
            or len(leaving) != 1 or shape_of(leaving[0]) != shape_of(hidden[0])):
        return None
    x2d = hidden[0]
    if len(shape_of(x2d) or ()) != 2:  # (B, S, H) in, flattened inside (DBRX): the op reads the (T, H) view
        flat = [u for u in x2d.users if u in inside and op_kind(u) == "reshape" and len(shape_of(u) or ()) == 2
                and shape_of(u)[-1] == shape_of(x2d)[-1]]
        if len(flat) != 1:
            return None
        x2d = flat[0]
    return x2d, w[0], ids, weights3d, leaving[0]


def module_key(node: fx.Node) -> str | None:
    """The innermost module whose forward ran `node` (its key in Dynamo's module stack)."""
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack), None) if stack else None


def common_module(params: list) -> list[str] | None:
    """The longest module path all `params` (graph inputs) sit under; None if one has no name."""
    paths = [owner_parts(p) if isinstance(p, fx.Node) else None for p in params]
    if not paths or any(not p for p in paths):
        return None
    common = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return common
