"""Find MoE layers in a Dynamo FX graph: normalize spellings, then match router -> top-k -> experts.

Matches (torch-level ops, any spelling `op_kind` knows):

    logits  = linear(x2d, W_router)                       (T, E)      x2d a view of x (..., H)
    w, ids  = topk(score(logits), K)  |  score(topk(logits, K))
    ...       dispatch + expert GEMMs over 3D weights (E, *, *) + weighted combine
    y       = <first (T, H) value depending on top-k and on every expert weight>
    y       = y + [sigmoid(linear(x2d, g)) *] mlp(x2d)   (optional shared expert)

Returns one `Candidate` per top-k node: the region's nodes, inputs, output and the specs that fit
what was seen (verification picks the one that computes the same function), or the reason it
does not look like an MoE layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..fx import (Flow, getitem_users, is_autocast, is_grad_mode, is_inplace, kind, op_kind,
                  shape_of, topk_k, value_of, walk_back)
from ..fx.names import owner_parts
from ..ir import DTYPES
from . import cover, idioms
from .capacity import capacity_options
from .experts import spec_options
from .experts_module import common_module, experts_block_name, experts_entry, experts_module, first_experts, module_key
from .graph_break import cut_after_topk
from .router import Selection, match_selection, router_facts
from .stacked import is_derived_weight, is_weight_input


class _Reject(Exception):
    """This top-k does not start an MoE layer we can take: the message says why."""


# --- the match ----------------------------------------------------------------------------------


@dataclass
class Candidate:
    """A matched MoE layer before verification: several specs may fit what the graph shows."""

    name: str
    topk: fx.Node
    x: fx.Node | None = None
    x2d: fx.Node | None = None
    output: fx.Node | None = None
    nodes: tuple = ()
    options: list = field(default_factory=list)  # [(MoESpec, weight nodes per spec.weight_names())]
    experts_impl: str = ""
    reason: str | None = None  # set when this is not (or not safely) an MoE layer
    extra_inputs: tuple = ()  # free inputs that are neither x nor weights (symbolic sizes)
    idiom: str = ""  # which known pattern matched (detect/idioms.py)
    family: str = ""  # the transformers model family the layer's code comes from, if any
    selection: Selection | None = None  # a DeepSeek-style expert choice before top-k
    # a traced router: (top-k weights (T, K), expert ids (T, K)) as the experts read them; the nodes
    # that compute them stay in the graph (router_nodes), the op takes both as inputs
    routing: tuple = ()
    router_nodes: frozenset = frozenset()

    @property
    def shape(self) -> tuple:
        """(E, K, H, I) as far as the graph shows them before a spec fits; 0 where unknown."""
        w = self.topk.args[0]
        e = shape_of(w)[-1] if shape_of(w) else 0
        k = topk_k(self.topk) if isinstance(topk_k(self.topk), int) else 0
        h = shape_of(self.x)[-1] if self.x is not None and shape_of(self.x) else 0
        return e, k, h, 0


def region_name(weight: fx.Node, index: int) -> str:
    """'L_self_modules_model_modules_layers_modules_3_modules_mlp_modules_gate_parameters_weight_'
    -> 'model.layers.3.mlp' (the module holding the router)."""
    parts = owner_parts(weight)
    return ".".join(parts[:-1]) if parts and len(parts) > 1 else f"moe{index}"


def find_candidates(gm: fx.GraphModule) -> list[Candidate]:
    """Every top-k node in the graph, matched as an MoE layer or rejected with a reason."""
    flow = Flow(gm.graph)
    # NOTE: under autocast the traced ops run in another dtype than their inputs say, and the op has
    # no autocast rule; leave such graphs as traced.
    autocast = any(is_autocast(n) for n in gm.graph.nodes)
    found = []
    for index, node in enumerate(n for n in gm.graph.nodes if op_kind(n) == "topk"):
        cand = Candidate(name=f"topk{index}", topk=node)
        try:
            _match(flow, cand, index)
        except _Reject as why:
            cand.reason = str(why)
            # the router is not one the fused gate models: keep it as traced, if the experts show
            # where its choice enters them
            cand = _match_traced_router(flow, node, index) or cand
        found.append(cand)
    found += _routed_without_topk(flow, found)
    for cand in found:
        if autocast and cand.x is not None:
            cand.reason = "graph runs under torch.autocast, which the moe op does not follow yet"
    inner = {n for c in found if c.selection for n in c.selection.explained}
    # a traced router's other top-ks (expert groups, say) are part of its routing: the layer is
    # the candidate of the last top-k before its experts
    traced = sorted((c for c in found if c.routing), key=lambda c: flow.order[c.topk])
    for c in reversed(traced):
        if c.topk not in inner:
            inner |= {n for n in c.router_nodes - flow.ancestors(c.x) if op_kind(n) == "topk"} - {c.topk}
    return [c for c in found if c.topk not in inner]  # group top-ks belong to their layer


def _match(flow: Flow, cand: Candidate, index: int) -> None:
    topk = cand.topk
    # 1. Router: top-k's input goes back through scoring and casts to a linear over x, maybe by
    #    a DeepSeek-style choice (scores + correction bias, masked to the best expert groups).
    selection = cand.selection = match_selection(flow, topk)
    router, chain = walk_back(selection.scores if selection else topk.args[0], ("cast", "softmax", "sigmoid"))
    if selection is not None and selection.reason is not None:
        if isinstance(router, fx.Node) and op_kind(router) == "linear":  # reported under the router's name
            cand.name = region_name(walk_back(router.args[1], ("cast",))[0], index)
            cand.x2d = router.args[0]
            cand.x = _layer_input(cand.x2d)
        raise _Reject(selection.reason)
    if not isinstance(router, fx.Node) or op_kind(router) != "linear":
        _reject_router_path(flow, cand, router, index)
    w_router, _ = walk_back(router.args[1], ("cast",))  # DeepSeek: self.weight.type(torch.float32)
    b_router = router.args[2] if len(router.args) > 2 else router.kwargs.get("bias")
    router_shape = shape_of(w_router)
    if w_router.op != "placeholder" or router_shape is None or len(router_shape) != 2:
        raise _Reject("router weight is not a 2D graph input")
    E, H = router_shape
    K = topk_k(topk)
    if not isinstance(K, int):
        raise _Reject("top-k k is not a constant")
    cand.name = region_name(w_router, index)
    x2d = router.args[0]
    x = _layer_input(x2d)
    cand.x, cand.x2d = x, x2d
    x_shape = shape_of(x)
    if x_shape is None or x_shape[-1] != H:
        raise _Reject(f"router input shape {x_shape} does not end in H={H}")
    dtype_name = str(value_of(x).dtype).replace("torch.", "")
    if dtype_name not in DTYPES:
        raise _Reject(f"dtype {dtype_name} is not supported (supported: {', '.join(DTYPES)})")

    # 2. Output: the first value after top-k, shaped like x2d, that every expert weight feeds.
    x_anc = flow.ancestors(x)
    # The combine weights expert outputs by the top-k values when the layer uses them: with K = 1
    # (or T = 1) the unweighted expert output is already (T, H) and must not pass for the output.
    routing_weights = [v for v in getitem_users(topk, 0) if v.users]
    expert_weights = _find_output(flow, cand, E, x_anc, routing_weights, w_router)
    routed_out = cand.output

    # 3. Shared expert: routed + [sigmoid(linear(x, g)) *] mlp(x), all of it fed by x and 2D weights.
    shared = _match_shared(flow, routed_out, x_anc, topk)
    if shared is not None:
        cand.output = shared

    # 4. Region: what the output needs that x does not; its free inputs must be x and weights.
    #    (What looked like a shared expert may read more: a parallel block's attention added to
    #    the same sum. The layer is then the routed experts alone.)
    try:
        params = _region(flow, cand, x_anc, E, {w_router, b_router})
    except _Reject:
        if shared is None:
            raise
        cand.output, shared = routed_out, None
        params = _region(flow, cand, x_anc, E, {w_router, b_router})
    nodes, inside = list(cand.nodes), set(cand.nodes)

    # 5. Specs that fit.
    facts = router_facts(flow, topk, chain, inside, router, selection.scores if selection else None)
    facts["gemm_fp32"] = value_of(x2d).dtype == torch.float32 != value_of(x).dtype
    facts["capacities"] = capacity_options(nodes, _traced_tokens(x2d), K, E)
    bias = selection.correction_bias if selection else None
    if selection:
        facts.update(groups=selection.groups, top_groups=selection.top_groups,
                     group_score=selection.group_score, masked_score=selection.masked_score)
    expert_weights.sort(key=lambda n: min(flow.order[u] for u in n.users))
    shared_params = sorted(params - set(expert_weights) - {w_router, b_router, bias},
                           key=lambda n: min(flow.order[u] for u in n.users))
    options = spec_options(E, K, H, facts, nodes, expert_weights, shared_params,
                           [w_router] + [b for b in (b_router, bias) if b is not None],
                           b_router is not None, shared is not None, value_of(x).dtype)
    if not options:
        shapes = [(n.name, shape_of(n)) for n in expert_weights + shared_params]
        raise _Reject(f"weights {shapes} fit no expert layout")

    # 6. Cover: every node must be something the spec models (verification cannot see a clamp
    #    that random inputs never reach).
    _keep_covered(cand, options, selection.explained if selection else frozenset())


def _keep_covered(cand: Candidate, options: list, explained=frozenset()) -> None:
    """cand.options: the spec options whose cover explains every node of the region, in the order
    the family's hints prefer; else the reason the first option leaves."""
    try:
        region_cover = cover.build(cand.nodes, cand.topk, explained, index_inputs=cand.routing[1:])
    except cover.Uncovered as why:
        raise _Reject(str(why)) from None
    cand.options = [(s, w) for s, w in options if cover.unexplained(region_cover, s) is None]
    if not cand.options:
        raise _Reject(cover.unexplained(region_cover, options[0][0]))
    cand.family = idioms.family_of(cand.topk)
    cand.options = idioms.by_hints(cand.options, cand.family)
    cand.idiom = idioms.idiom_of(cand.options[0][0], cand.nodes)


def _find_output(flow: Flow, cand: Candidate, E: int, x_anc: set, routing_weights: list, named_by) -> list:
    """Set cand.output: the first (T, H) value after the routing (cand.topk's choice) that at least
    two 3D expert weights (E, *, *) feed, weighted by `routing_weights` when given. -> those weights."""
    topk, x = cand.topk, cand.x
    after_topk = flow.descendants(topk)
    x_numel = shape_of(cand.x2d)
    for node in sorted(after_topk, key=flow.order.__getitem__):
        if shape_of(node) != x_numel or node is topk:
            continue
        anc = flow.ancestors(node) - x_anc
        if routing_weights and not any(v in anc for v in routing_weights):
            continue
        # graph inputs the layer's own nodes read (a weight x also depends on, when layers share
        # weights or one layer runs twice, is still this layer's weight); stacked per-expert
        # weights (moecompile.prepare) count as inputs
        weights3d = list({d for n in anc for d in n.all_input_nodes if is_weight_input(d) and d is not x
                          and len(shape_of(d) or ()) == 3 and shape_of(d)[0] == E})
        if len(weights3d) >= 2:
            cand.output = node
            cand.name = _block_name(named_by, weights3d, cand.name)
            break
    else:
        if not any(len(shape_of(n) or ()) == 3 and (shape_of(n) or (0,))[0] == E and is_weight_input(n)
                   for d in after_topk for n in d.all_input_nodes):
            raise _Reject("top-k's routing leaves this graph before any 3D expert weight is used: the "
                          "layer is split across graphs (a graph break inside it)" + cut_after_topk(flow, topk))
        raise _Reject("no (T, H) value after top-k combines the outputs of 3D expert weights"
                      + cut_after_topk(flow, topk))
    while len(cand.output.users) == 1 and op_kind(next(iter(cand.output.users))) == "cast":
        cand.output = next(iter(cand.output.users))
    return weights3d


def _region(flow: Flow, cand: Candidate, x_anc: set, E: int, router_params: set,
            routing: tuple = (), outside: frozenset = frozenset()) -> set:
    """cand.nodes: what the output needs that x (and a traced router: its routing values and the
    nodes computing them, `outside`) does not. Checks that nothing writes into the layer from
    outside or out of it, grad mode stays, the output keeps x's dtype, and the free inputs are x,
    its (T, H) view, the routing values and weights. -> the weights among the free inputs."""
    x, x2d = cand.x, cand.x2d
    nodes = [n for n in flow.ancestors(cand.output) - x_anc - outside
             if n.op not in ("placeholder", "get_attr") and not is_derived_weight(n)]
    nodes.sort(key=flow.order.__getitem__)
    cand.nodes = tuple(nodes)
    inside = set(nodes)
    free = {d for n in nodes for d in flow.deps(n) if d not in inside}
    for n in nodes:
        for m in flow.mutators.get(n, ()):
            if m not in inside:
                raise _Reject(f"{m.name} writes into {n.name} from outside the layer")
    for n in nodes:
        if is_inplace(n):
            # a write into x, a weight or a view of them would be seen outside the layer
            target, _ = walk_back(n.args[0], ("reshape",))
            if n.args[0] not in inside or target is x or target.op == "placeholder":
                raise _Reject(f"{n.name} writes in place into {n.args[0].name}, which outlives the layer")
    if routing:  # a traced router may change grad mode (its own no_grad), the experts may not
        changed = _grad_mode_changed(flow, inside)
        if changed is not None:
            raise _Reject(f"grad mode changes inside the layer ({changed.name}: torch.no_grad or "
                          "enable_grad), which the op does not follow")
    else:
        lo, hi = flow.order[x2d] if x2d in flow.order else 0, flow.order[cand.output]
        for n in flow.between(lo, hi):
            if is_grad_mode(n):
                raise _Reject(f"grad mode changes inside the layer ({n.name}: torch.no_grad or "
                              "enable_grad), which the op does not follow")
    out_dtype = value_of(cand.output).dtype if value_of(cand.output) is not None else None
    if out_dtype != value_of(x).dtype:
        raise _Reject(f"layer output is {out_dtype} but its input is {value_of(x).dtype}")
    tensors = {n for n in free if value_of(n) is not None}
    params = {n for n in tensors if is_weight_input(n) and n is not x
              and (_is_weight(n) or n in router_params or (shape_of(n) or (0,))[0] == E)}
    given = {x, *routing} | ({x2d} if routing else set())
    stray = tensors - params - given - x_anc
    if stray or (tensors & x_anc) - given - params:
        bad = sorted(n.name for n in (stray | ((tensors & x_anc) - given - params)))
        raise _Reject(f"layer reads activations other than its input: {bad}")
    cand.extra_inputs = tuple(sorted(free - tensors, key=flow.order.__getitem__))
    cand.experts_impl = _experts_impl(nodes)
    return params


def _grad_mode_changed(flow: Flow, nodes: set) -> fx.Node | None:
    """The grad-mode node under which some node of `nodes` runs in another mode than the graph's
    own (torch.is_grad_enabled() while it compiles), or None: a router's `with torch.no_grad()`
    before or around the experts' inputs is fine, the experts' nodes inside it are not."""
    outer = ("grad", torch.is_grad_enabled())
    mode, since, stack = outer, None, []
    for n in flow.graph.nodes:
        if is_grad_mode(n):
            if n.target is torch._C._set_grad_enabled:
                mode, since = ("grad", bool(n.args[0])), n
            elif "enter" in n.target.__name__:
                stack.append((mode, since))
                mode, since = ("inference", True), n
            elif stack:
                mode, since = stack.pop()
        elif n in nodes and mode != outer:
            return since
    return None


# --- a traced router ----------------------------------------------------------------------------


def _match_traced_router(flow: Flow, topk: fx.Node, index: int) -> Candidate | None:
    """The layer of `topk` with its router kept as traced, or None where its experts do not show
    where the routing enters them (then the fused match's reason stands).

    Matches:     <any routing code reading x2d (or another input)> -> w (T, K) float, ids (T, K) int
                 experts(x2d (T, H), ids, w): the nodes of one module holding the 3D expert weights,
                 whose inputs from outside are exactly x2d, ids and w
                 y = combine [+ shared expert(x2d)]
    Rewrites to: Candidate(routing=(w, ids), router_nodes=what computes them, nodes=the rest)"""
    entry = experts_entry(flow, topk)
    if entry is None:
        return None
    return _traced_candidate(flow, Candidate(name=f"topk{index}", topk=topk), entry, index)


def _traced_candidate(flow: Flow, cand: Candidate, entry: tuple, index: int) -> Candidate:
    """`cand` matched from an experts entry (experts_module's tuple), or with the reason it is not."""
    hidden, w, ids, weights3d, out = entry
    cand.routing = (w, ids)
    # what computes the routing from the layer's input (x2d and what makes it stay in the region)
    cand.router_nodes = frozenset((flow.ancestors(w) | flow.ancestors(ids)) - flow.ancestors(hidden))
    cand.x2d, cand.x = hidden, _layer_input(hidden)
    cand.name = experts_block_name(weights3d) or region_name(weights3d[0], index)
    try:
        _match_traced(flow, cand, weights3d, out)
    except _Reject as why:
        cand.reason = str(why)
    return cand


def _routed_without_topk(flow: Flow, found: list) -> list[Candidate]:
    """Traced-router candidates for expert modules whose ids no top-k chose (DeepSeek-V4's hash
    routing by token id, PhiMoE's sparsemixer): the ids node stands in for the top-k."""
    claimed = {c.routing[1] for c in found if c.routing} | {n for c in found for n in c.nodes}
    taken = {w for c in found for _, ws in c.options for w in ws}  # layers matched already: not rescanned
    keys = []
    for n in flow.graph.nodes:
        if is_weight_input(n) and len(shape_of(n) or ()) == 3 and n not in taken:
            keys += [k for k in (module_key(u) for u in n.users) if k is not None and k not in keys]
    out = []
    for index, key in enumerate(keys):
        entry = experts_module(flow, key)
        if entry is None or entry[2] in claimed or any(op_kind(n) == "topk" for n in flow.ancestors(entry[2])
                                                         - flow.ancestors(entry[0])):
            continue
        out.append(_traced_candidate(flow, Candidate(name=f"experts{index}", topk=entry[2]), entry, index))
    return out


def _match_traced(flow: Flow, cand: Candidate, weights3d: list, out: fx.Node) -> None:
    w, ids = cand.routing
    x, x2d = cand.x, cand.x2d
    E, K, H = shape_of(weights3d[0])[0], shape_of(ids)[1], shape_of(x2d)[-1]
    dtype_name = str(value_of(x).dtype).replace("torch.", "")
    if dtype_name not in DTYPES:
        raise _Reject(f"dtype {dtype_name} is not supported (supported: {', '.join(DTYPES)})")
    x_anc = flow.ancestors(x)
    # the experts module's output, not the first (T, H) value after top-k: with K = 1 the weighted
    # rows before they are put back in token order have that shape too
    while len(out.users) == 1 and op_kind(next(iter(out.users))) == "cast":
        out = next(iter(out.users))
    cand.output = routed = out
    expert_weights = sorted(weights3d, key=lambda n: min(flow.order[u] for u in n.users))
    shared = _match_shared(flow, routed, x_anc, cand.topk)
    # the shared expert joins the op where the spec has its form; else it stays as traced beside it
    # (what looks like one may be more: a parallel block's attention added to the same sum)
    for output in ([shared] if shared is not None else []) + [routed]:
        cand.output = output
        try:
            _traced_options(flow, cand, x_anc, E, K, H, expert_weights, with_shared=output is not routed)
            return
        except _Reject:
            if output is routed:
                raise


def _traced_options(flow: Flow, cand: Candidate, x_anc: set, E: int, K: int, H: int, expert_weights: list,
                    with_shared: bool) -> None:
    """cand.nodes and cand.options of a traced-router layer ending at cand.output; _Reject if none."""
    # x2d and the views making it stay in the region (the op reads x); the router reads them too
    params = _region(flow, cand, x_anc, E, set(), cand.routing, cand.router_nodes)
    shared_params = sorted(params - set(expert_weights), key=lambda n: min(flow.order[u] for u in n.users))
    options = spec_options(E, K, H, {"router": "traced"}, cand.nodes, expert_weights, shared_params,
                           list(cand.routing), False, with_shared, value_of(cand.x).dtype)
    if not options:
        shapes = [(n.name, shape_of(n)) for n in expert_weights + shared_params]
        raise _Reject(f"weights {shapes} fit no expert layout")
    _keep_covered(cand, options)


def _layer_input(x2d: fx.Node) -> fx.Node:
    """The layer input behind the router's input: back through views, and through the router's own
    upcast to float32 (DeepSeek's `x.view(-1, H).type(torch.float32)`), but not through a cast that
    made the layer input (a norm's `.to(input_dtype)` back to bf16)."""
    node = x2d
    while isinstance(node, fx.Node) and node.args and isinstance(node.args[0], fx.Node):
        k = op_kind(node)
        if k == "reshape" or (k == "cast" and _is_upcast(node)):
            node = node.args[0]
        else:
            break
    return node


def _block_name(w_router: fx.Node, experts: list, default: str) -> str:
    """The module holding both the router and the experts ('model.layers.3.mlp'), read off the
    graph inputs' names; `default` when they share no module."""
    return ".".join(common_module([w_router, *experts]) or []) or default


def _traced_tokens(x2d: fx.Node) -> int | None:
    """T the graph was traced at (a dynamic size's hint)."""
    value = value_of(x2d)
    if value is None or value.dim() != 2:
        return None
    T = value.shape[0]
    return T if isinstance(T, int) else getattr(T.node, "hint", None)


def _is_upcast(cast: fx.Node) -> bool:
    out, src = value_of(cast), value_of(cast.args[0])
    return out is not None and src is not None and out.dtype == torch.float32 and src.dtype in (
        torch.float32, torch.bfloat16, torch.float16)


def _reject_router_path(flow: Flow, cand: Candidate, stop, index: int) -> None:
    """Top-k's input does not come from a router linear by scoring and casts alone. If a router
    linear is a few ops further up, the layer is still reported, naming the op in between."""
    node, path = stop, []
    while isinstance(node, fx.Node) and node.args and len(path) < 8 and op_kind(node) != "linear":
        path.append(node)
        node = node.args[0]
    routes = any(ids.users for ids in getitem_users(cand.topk, 1))  # the expert ids pick something
    experts = first_experts(flow, cand.topk)
    if experts is not None and cand.topk in flow.ancestors(experts[0]):
        routes = False  # upstream of the experts' input, not their router (an attention indexer)
    if not (routes and isinstance(node, fx.Node) and op_kind(node) == "linear" and len(node.args) > 1
            and isinstance(node.args[1], fx.Node) and node.args[1].op == "placeholder"
            and len(shape_of(node.args[1]) or ()) == 2 and path):
        raise _Reject("top-k input is not a (scored) router linear")
    cand.name = region_name(node.args[1], index)
    cand.x2d = node.args[0]
    cand.x, _ = walk_back(cand.x2d, ("reshape",))
    first = path[-1]
    for n in reversed(path):  # the op nearest the router that is not scoring or a cast
        if op_kind(n) not in ("cast", "softmax", "sigmoid"):
            first = n
            break
    raise _Reject(f"{kind(first)} ({first.name}) between the router and top-k is not modeled")


def _is_weight(node: fx.Node) -> bool:
    """A graph input that holds a module's parameter or buffer (Dynamo names and types them so)."""
    return node.type is torch.nn.Parameter or "_parameters_" in node.name or "_buffers_" in node.name


def _experts_impl(nodes) -> str:
    kinds = {op_kind(n) for n in nodes}
    if kinds & {"grouped_mm", "_grouped_mm", "transformers.grouped_mm_fallback.default"} or any(
            "grouped_mm" in str(n.target) for n in nodes):
        return "grouped_mm"
    if "bmm" in kinds:
        return "batched_mm"
    return "other"


def _match_shared(flow: Flow, routed: fx.Node, x_anc: set, topk: fx.Node) -> fx.Node | None:
    """`routed + z` where z is computed from x and 2D weights alone -> the add node, else None.
    `routed` may first be viewed back to x's shape (DeepSeek: `experts(...).view(*orig_shape)`)."""
    while len(routed.users) == 1 and op_kind(next(iter(routed.users))) == "reshape":
        routed = next(iter(routed.users))
    if len(routed.users) != 1:
        return None
    add = next(iter(routed.users))
    if op_kind(add) != "add" or len(add.args) != 2:
        return None
    other = add.args[1] if add.args[0] is routed else add.args[0]
    if not isinstance(other, fx.Node) or other in x_anc or topk in flow.ancestors(other):
        return None
    private = flow.ancestors(other) - x_anc
    if not any(op_kind(n) == "linear" for n in private):
        return None
    for n in private:
        if n.op == "placeholder" and len(shape_of(n) or ()) != 2 and value_of(n) is not None:
            return None
    return add
