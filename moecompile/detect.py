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

import operator
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import cover
from .ir import DTYPES, MoESpec

# --- normalize: every spelling of an op we care about -> one kind -------------------------------

_FUNCTION_KINDS = {
    F.linear: "linear", torch.topk: "topk",
    torch.softmax: "softmax", F.softmax: "softmax", torch.Tensor.softmax: "softmax",
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
    F.silu: "silu", F.gelu: "gelu", F.relu: "relu", torch.relu: "relu",
    torch.sum: "sum", operator.truediv: "div", operator.itruediv: "div", torch.div: "div",
    operator.mul: "mul", operator.imul: "mul", torch.mul: "mul",
    operator.add: "add", operator.iadd: "add", torch.add: "add",
    operator.getitem: "getitem", torch.reshape: "reshape", torch.chunk: "chunk",
}
_METHOD_KINDS = {
    "topk": "topk", "softmax": "softmax", "sigmoid": "sigmoid", "sum": "sum",
    "div": "div", "div_": "div", "mul": "mul", "mul_": "mul", "add": "add", "add_": "add",
    "view": "reshape", "reshape": "reshape", "contiguous": "reshape", "flatten": "reshape",
    "float": "cast", "to": "cast", "type": "cast", "bfloat16": "cast", "half": "cast",
    "chunk": "chunk", "relu": "relu",
}
_INPLACE_FUNCTIONS = {operator.setitem, operator.itruediv, operator.imul, operator.iadd, operator.isub}


def op_kind(node: fx.Node) -> str:
    """One name for every spelling of an op (function / method / in-place): 'linear', 'topk', ..."""
    if node.op == "call_function":
        return _FUNCTION_KINDS.get(node.target, getattr(node.target, "__name__", str(node.target)))
    if node.op == "call_method":
        return _METHOD_KINDS.get(node.target, node.target)
    return node.op


def is_inplace(node: fx.Node) -> bool:
    """Writes into its first argument: x.add_(), operator.setitem / iadd, F.silu(x, inplace=True),
    torch.relu_(x), or an `out=` argument."""
    if node.kwargs.get("inplace") is True or "out" in node.kwargs:
        return True
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _INPLACE_FUNCTIONS or (name.endswith("_") and not name.startswith("_"))
    return node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_")


def _is_grad_mode(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (torch._C._set_grad_enabled,
                                                          torch.autograd.grad_mode._enter_inference_mode,
                                                          torch.autograd.grad_mode._exit_inference_mode)


def _nodes_between(flow, lo: int, hi: int) -> list[fx.Node]:
    """Graph nodes strictly after position lo and before position hi."""
    return [n for n, i in flow.order.items() if lo < i < hi]


def _is_autocast(node: fx.Node) -> bool:
    return node.op == "call_function" and "autocast" in getattr(node.target, "__name__", "")


def value_of(node) -> torch.Tensor | None:
    value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def shape_of(node) -> tuple | None:
    """Shape with ints for static dims and the symbol's text for dynamic ones.

    NOTE: comparing SymInts with == would add guards to the graph being compiled; text does not.
    """
    value = value_of(node)
    if value is None:
        return None
    return tuple(_dim(d) for d in value.shape)


def _dim(d) -> int | str:
    if isinstance(d, int):
        return d
    expr = d.node.expr
    return int(expr) if expr.is_number else str(d)  # a symbol Dynamo specialized is its number


class _Reject(Exception):
    """This top-k does not start an MoE layer we can take: the message says why."""


# --- dataflow helpers ---------------------------------------------------------------------------


@dataclass
class _Flow:
    """Topological order plus mutation-aware dependencies of one graph."""

    graph: fx.Graph
    order: dict = field(default_factory=dict)
    mutators: dict = field(default_factory=dict)  # node -> in-place nodes writing into it

    def __post_init__(self) -> None:
        for i, node in enumerate(self.graph.nodes):
            self.order[node] = i
            if is_inplace(node) and node.args and isinstance(node.args[0], fx.Node):
                self.mutators.setdefault(node.args[0], []).append(node)

    def deps(self, node: fx.Node) -> list[fx.Node]:
        """Inputs of `node`, plus the in-place writes into them that ran before it."""
        out = list(node.all_input_nodes)
        for inp in node.all_input_nodes:
            out += [m for m in self.mutators.get(inp, ()) if self.order[m] < self.order[node]]
        return out

    def ancestors(self, node: fx.Node) -> set[fx.Node]:
        seen, stack = {node}, [node]
        while stack:
            for dep in self.deps(stack.pop()):
                if dep not in seen:
                    seen.add(dep)
                    stack.append(dep)
        return seen

    def descendants(self, node: fx.Node) -> set[fx.Node]:
        seen, stack = {node}, [node]
        while stack:
            for user in stack.pop().users:
                if user not in seen:
                    seen.add(user)
                    stack.append(user)
        return seen


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


def region_name(weight: fx.Node, index: int) -> str:
    """'L_self_modules_model_modules_layers_modules_3_modules_mlp_modules_gate_parameters_weight_'
    -> 'model.layers.3.mlp' (the module holding the router)."""
    text = re.sub(r"^[Ll]_self_", "", weight.name).rstrip("_")
    text = text.split("_parameters_")[0]
    if not text.startswith("modules_"):
        return f"moe{index}"
    parts = text[len("modules_"):].split("_modules_")
    return ".".join(parts[:-1]) or f"moe{index}"


def find_candidates(gm: fx.GraphModule) -> list[Candidate]:
    """Every top-k node in the graph, matched as an MoE layer or rejected with a reason."""
    flow = _Flow(gm.graph)
    # NOTE: under autocast the traced ops run in another dtype than their inputs say, and the op has
    # no autocast rule; leave such graphs as traced.
    autocast = any(_is_autocast(n) for n in gm.graph.nodes)
    found = []
    for index, node in enumerate(n for n in gm.graph.nodes if op_kind(n) == "topk"):
        cand = Candidate(name=f"topk{index}", topk=node)
        try:
            _match(flow, cand, index)
        except _Reject as why:
            cand.reason = str(why)
        if autocast and cand.x is not None:
            cand.reason = "graph runs under torch.autocast, which the moe op does not follow yet"
        found.append(cand)
    return found


def _walk_back(node: fx.Node, kinds: tuple[str, ...]) -> tuple[fx.Node, list[fx.Node]]:
    """Follow first arguments back through nodes of `kinds`; return where it stops and the path."""
    path = []
    while isinstance(node, fx.Node) and op_kind(node) in kinds:
        path.append(node)
        node = node.args[0]
    return node, path


def _getitem_users(node: fx.Node, index: int) -> list[fx.Node]:
    return [u for u in node.users if op_kind(u) == "getitem" and u.args[1] == index]


def _match(flow: _Flow, cand: Candidate, index: int) -> None:
    topk = cand.topk
    # 1. Router: top-k's input goes back through scoring and casts to a linear over x.
    router, chain = _walk_back(topk.args[0], ("cast", "softmax", "sigmoid"))
    if not isinstance(router, fx.Node) or op_kind(router) != "linear":
        _reject_router_path(cand, router, index)
    w_router = router.args[1]
    b_router = router.args[2] if len(router.args) > 2 else router.kwargs.get("bias")
    router_shape = shape_of(w_router)
    if w_router.op != "placeholder" or router_shape is None or len(router_shape) != 2:
        raise _Reject("router weight is not a 2D graph input")
    E, H = router_shape
    K = topk.args[1] if len(topk.args) > 1 else topk.kwargs.get("k")
    if not isinstance(K, int):
        raise _Reject("top-k k is not a constant")
    cand.name = region_name(w_router, index)
    x2d = router.args[0]
    x, _ = _walk_back(x2d, ("reshape",))
    cand.x, cand.x2d = x, x2d
    x_shape = shape_of(x)
    if x_shape is None or x_shape[-1] != H:
        raise _Reject(f"router input shape {x_shape} does not end in H={H}")
    dtype_name = str(value_of(x).dtype).replace("torch.", "")
    if dtype_name not in DTYPES:
        raise _Reject(f"dtype {dtype_name} is not supported (supported: {', '.join(DTYPES)})")

    # 2. Output: the first value after top-k, shaped like x2d, that every expert weight feeds.
    x_anc = flow.ancestors(x)
    after_topk = flow.descendants(topk)
    x_numel = shape_of(x2d)
    expert_weights = None
    # The combine weights expert outputs by the top-k values when the layer uses them: with K = 1
    # (or T = 1) the unweighted expert output is already (T, H) and must not pass for the output.
    routing_weights = [v for v in _getitem_users(topk, 0) if v.users]
    for node in sorted(after_topk, key=flow.order.__getitem__):
        if shape_of(node) != x_numel or node is topk:
            continue
        anc = flow.ancestors(node) - x_anc
        if routing_weights and not any(v in anc for v in routing_weights):
            continue
        weights3d = [n for n in anc if n.op == "placeholder" and len(shape_of(n) or ()) == 3
                     and shape_of(n)[0] == E]
        if len(weights3d) >= 2:
            cand.output, expert_weights = node, weights3d
            break
    if cand.output is None:
        raise _Reject("no (T, H) value after top-k combines the outputs of 3D expert weights")
    while len(cand.output.users) == 1 and op_kind(next(iter(cand.output.users))) == "cast":
        cand.output = next(iter(cand.output.users))
    routed_out = cand.output

    # 3. Shared expert: routed + [sigmoid(linear(x, g)) *] mlp(x), all of it fed by x and 2D weights.
    shared = _match_shared(flow, routed_out, x_anc, topk)
    if shared is not None:
        cand.output = shared

    # 4. Region: what the output needs that x does not; its free inputs must be x and weights.
    nodes = [n for n in flow.ancestors(cand.output) - x_anc if n.op not in ("placeholder", "get_attr")]
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
            target, _ = _walk_back(n.args[0], ("reshape",))
            if n.args[0] not in inside or target is x or target.op == "placeholder":
                raise _Reject(f"{n.name} writes in place into {n.args[0].name}, which outlives the layer")
    lo, hi = flow.order[x2d] if x2d in flow.order else 0, flow.order[cand.output]
    for n in _nodes_between(flow, lo, hi):
        if _is_grad_mode(n):
            raise _Reject(f"grad mode changes inside the layer ({n.name}: torch.no_grad or "
                          "enable_grad), which the op does not follow")
    out_dtype = value_of(cand.output).dtype if value_of(cand.output) is not None else None
    if out_dtype != value_of(x).dtype:
        raise _Reject(f"layer output is {out_dtype} but its input is {value_of(x).dtype}")
    tensors = {n for n in free if value_of(n) is not None}
    params = {n for n in tensors if n.op == "placeholder" and n is not x
              and (_is_weight(n) or n is w_router or n is b_router or (shape_of(n) or (0,))[0] == E)}
    stray = tensors - params - {x} - x_anc
    if stray or (tensors & x_anc) - {x}:
        bad = sorted(n.name for n in (stray | ((tensors & x_anc) - {x})))
        raise _Reject(f"layer reads activations other than its input: {bad}")
    cand.extra_inputs = tuple(sorted(free - tensors, key=flow.order.__getitem__))
    cand.experts_impl = _experts_impl(nodes)

    # 5. Specs that fit.
    facts = _router_facts(flow, topk, chain, inside, router)
    expert_weights.sort(key=lambda n: min(flow.order[u] for u in n.users))
    shared_params = sorted(params - set(expert_weights) - {w_router, b_router},
                           key=lambda n: min(flow.order[u] for u in n.users))
    options = _spec_options(E, K, H, facts, nodes, expert_weights, shared_params,
                            w_router, b_router, shared is not None, value_of(x).dtype)
    if not options:
        shapes = [(n.name, shape_of(n)) for n in expert_weights + shared_params]
        raise _Reject(f"weights {shapes} fit no expert layout")

    # 6. Cover: every node must be something the spec models (verification cannot see a clamp
    #    that random inputs never reach).
    try:
        region_cover = cover.build(nodes, topk)
    except cover.Uncovered as why:
        raise _Reject(str(why)) from None
    cand.options = [(s, w) for s, w in options if cover.unexplained(region_cover, s) is None]
    if not cand.options:
        raise _Reject(cover.unexplained(region_cover, options[0][0]))


def _reject_router_path(cand: Candidate, stop, index: int) -> None:
    """Top-k's input does not come from a router linear by scoring and casts alone. If a router
    linear is a few ops further up, the layer is still reported, naming the op in between."""
    node, path = stop, []
    while isinstance(node, fx.Node) and node.args and len(path) < 8 and op_kind(node) != "linear":
        path.append(node)
        node = node.args[0]
    routes = any(ids.users for ids in _getitem_users(cand.topk, 1))  # the expert ids pick something
    if not (routes and isinstance(node, fx.Node) and op_kind(node) == "linear" and len(node.args) > 1
            and isinstance(node.args[1], fx.Node) and node.args[1].op == "placeholder"
            and len(shape_of(node.args[1]) or ()) == 2 and path):
        raise _Reject("top-k input is not a (scored) router linear")
    cand.name = region_name(node.args[1], index)
    cand.x2d = node.args[0]
    cand.x, _ = _walk_back(cand.x2d, ("reshape",))
    first = path[-1]
    for n in reversed(path):  # the op nearest the router that is not scoring or a cast
        if op_kind(n) not in ("cast", "softmax", "sigmoid"):
            first = n
            break
    raise _Reject(f"{cover.kind(first)} ({first.name}) between the router and top-k is not modeled")


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


def _match_shared(flow: _Flow, routed: fx.Node, x_anc: set, topk: fx.Node) -> fx.Node | None:
    """`routed + z` where z is computed from x and 2D weights alone -> the add node, else None."""
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


def _router_facts(flow: _Flow, topk, chain, inside, router) -> dict:
    """What the router chain and the top-k values path show: scoring, order, renormalize, casts."""
    facts = {"scoring_before": None, "scoring_after": None, "renormalize": False, "scale": 1.0,
             "to_input_dtype": False, "fp32": False}
    for n in chain:
        if op_kind(n) in ("softmax", "sigmoid"):
            facts["scoring_before"] = op_kind(n)
            facts["fp32"] |= n.kwargs.get("dtype") == torch.float32
        if op_kind(n) == "cast" and value_of(n) is not None and value_of(n).dtype == torch.float32:
            facts["fp32"] = True
    values_path = set()
    for v in _getitem_users(topk, 0):
        values_path |= flow.descendants(v)
    # Only the routing-weight math: stop where expert outputs join in.
    for n in sorted(values_path & inside, key=flow.order.__getitem__):
        kind = op_kind(n)
        if kind in ("softmax", "sigmoid") and facts["scoring_before"] is None:
            facts["scoring_after"] = kind
        elif kind == "sum" and shape_of(n) is not None and shape_of(n)[-1] == 1:
            facts["renormalize"] = True
        elif kind == "mul" and any(isinstance(a, float) for a in n.args):
            facts["scale"] = next(a for a in n.args if isinstance(a, float))
        elif kind == "cast" and value_of(n) is not None and value_of(n).dtype != torch.float32 \
                and value_of(n).dim() == 2 and value_of(n).shape[-1] == topk.args[1]:
            facts["to_input_dtype"] = True
    return facts


def _spec_options(E, K, H, facts, nodes, expert_weights, shared_params, w_router, b_router,
                  has_shared, dtype) -> list:
    """All (spec, weights) that fit the shapes and the ops seen; verification picks among them."""
    kinds = {op_kind(n) for n in nodes}
    acts = [a for a in ("silu", "gelu", "relu") if a in kinds]
    activations = []
    for a in acts or ["silu"]:
        if a == "gelu":
            approx = {n.kwargs.get("approximate", "none") for n in nodes if op_kind(n) == "gelu"}
            activations += ["gelu_tanh" if ap == "tanh" else "gelu" for ap in sorted(approx)]
        else:
            activations.append(a)
    scoring = facts["scoring_before"] or facts["scoring_after"]
    if scoring is None:
        return []
    base = dict(
        num_experts=E, top_k=K, hidden=H, intermediate=1, scoring=scoring,
        topk_order="score_then_topk" if facts["scoring_before"] else "topk_then_score",
        renormalize=facts["renormalize"], router_bias=b_router is not None,
        router_fp32=facts["fp32"] or dtype == torch.float32,
        weights_in_input_dtype=facts["to_input_dtype"], routed_scaling=facts["scale"],
        dtype=str(dtype).replace("torch.", ""),
    )
    router = [w_router] + ([b_router] if b_router is not None else [])
    layouts = ["interleaved", "concat"] if any(
        op_kind(n) == "getitem" and _has_step2(n) for n in nodes) else ["concat", "interleaved"]

    expert_options = []  # (fields, weights)
    if len(expert_weights) == 2:
        w1, w2 = (shape_of(w) for w in expert_weights)
        for transposed in (False, True):
            h_ax, i_ax = (2, 1) if transposed else (1, 2)
            if w2[h_ax] != H or w1[3 - h_ax] != H:
                continue
            inter, up_rows = w2[i_ax], w1[3 - i_ax]
            if up_rows == 2 * inter:
                expert_options += [(dict(intermediate=inter, transposed=transposed, layout=lay), expert_weights)
                                   for lay in layouts]
            elif up_rows == inter:
                expert_options.append((dict(intermediate=inter, transposed=transposed, gated=False),
                                       expert_weights))
    elif len(expert_weights) == 3:
        a, b, down = expert_weights
        for transposed in (False, True):
            inter = shape_of(down)[2 if not transposed else 1]
            for gate, up in ((a, b), (b, a)):
                expert_options.append((dict(intermediate=inter, transposed=transposed, layout="separate"),
                                       [gate, up, down]))

    shared_options = [({}, [])]
    if has_shared:
        shared_options = _shared_options(shared_params, H)
    elif shared_params:
        return []
    options = []
    for act in activations:
        for fields_e, weights_e in expert_options:
            for fields_s, weights_s in shared_options:
                try:
                    spec = MoESpec(**{**base, **fields_e, **fields_s, "activation": act})
                except ValueError:
                    continue
                weights = tuple(router + list(weights_e) + list(weights_s))
                if [shape_of(w) for w in weights] == list(spec.weight_shapes().values()):
                    options.append((spec, weights))
    return options


def _has_step2(node: fx.Node) -> bool:
    index = node.args[1] if len(node.args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(s, slice) and s.step == 2 for s in items)


def _shared_options(params, H) -> list:
    """Shared MLP weights (gate, up, down [, sigmoid gate]) in the orders their shapes allow."""
    gate_vec = [p for p in params if shape_of(p) == (1, H)]
    mats = [p for p in params if p not in gate_vec]
    if len(gate_vec) > 1 or len(mats) != 3:
        return []
    downs = [p for p in mats if shape_of(p)[0] == H]
    options = []
    for down in downs:
        a, b = [p for p in mats if p is not down]
        ish = shape_of(down)[1]
        for gate, up in ((a, b), (b, a)):
            options.append(({"shared_intermediate": ish, "shared_gate": bool(gate_vec)},
                            [gate, up, down] + gate_vec))
    return options
