"""FX graph utilities every pass may use: one name per op spelling, shapes without guards, in-place
tracking and mutation-aware dataflow.

    op_kind(node)   'linear' | 'topk' | 'softmax' | ... for every spelling (function, method, in-place)
    kind(node)      op_kind with in-place and overload suffixes folded ('index_add_' -> 'index_add')
    shape_of(node)  (T, H) with ints for static dims and the symbol's text for dynamic ones
    Flow(graph)     topological order and dependencies that include in-place writes
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

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


def kind(node: fx.Node) -> str:
    """op_kind with in-place and overload spellings folded: 'index_add_' -> 'index_add',
    aten 'clamp.default' -> 'clamp', operator '__lt__' -> 'lt', 'iadd' -> 'add'."""
    name = op_kind(node).split(".")[0]
    if name.startswith("__") and name.endswith("__"):  # operator dunders: __lt__ -> lt
        name = name[2:-2]
    if name.endswith("_") and not name.startswith("_") and name not in ("and_", "or_"):
        name = name[:-1]
    if name.startswith("i") and name[1:] in ("add", "mul", "truediv", "sub", "floordiv"):
        name = name[1:]  # operator.iadd and friends
    return name


def is_inplace(node: fx.Node) -> bool:
    """Writes into its first argument: x.add_(), operator.setitem / iadd, F.silu(x, inplace=True),
    torch.relu_(x), or an `out=` argument."""
    if node.kwargs.get("inplace") is True or "out" in node.kwargs:
        return True
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _INPLACE_FUNCTIONS or (name.endswith("_") and not name.startswith("_"))
    return node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_")


def is_grad_mode(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in (torch._C._set_grad_enabled,
                                                          torch.autograd.grad_mode._enter_inference_mode,
                                                          torch.autograd.grad_mode._exit_inference_mode)


def is_autocast(node: fx.Node) -> bool:
    return node.op == "call_function" and "autocast" in getattr(node.target, "__name__", "")


def meta_value(node):
    """What tracing saw for `node` (a tensor, a tuple of them, a SymInt, ...), or None."""
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None


def value_of(node) -> torch.Tensor | None:
    value = meta_value(node)
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


def module_parts(name: str) -> list[str] | None:
    """The module path in a Dynamo graph-input name (or in its part before `_parameters_`):
    'L_self_modules_model_modules_layers_modules_3_modules_mlp_modules_gate_parameters_weight_'
    -> ['model', 'layers', '3', 'mlp', 'gate']; [] for the compiled module's own parameters; None
    for a name that is not of a parameter or buffer of the compiled module."""
    owner = re.split(r"_parameters_|_buffers_", name)[0].rstrip("_")
    owner = re.sub(r"^[Ll]_self", "", owner)
    if not owner:
        return []
    if not owner.startswith("_modules_"):
        return None
    return owner[len("_modules_"):].split("_modules_")


def walk_back(node, kinds: tuple[str, ...]) -> tuple:
    """Follow first arguments back through nodes of `kinds`; return where it stops and the path."""
    path = []
    while isinstance(node, fx.Node) and op_kind(node) in kinds:
        path.append(node)
        node = node.args[0]
    return node, path


def topk_k(node: fx.Node):
    """k of a top-k node, positional or keyword (an int, or a node / SymInt when not constant)."""
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("k")


def getitem_users(node: fx.Node, index: int) -> list[fx.Node]:
    return [u for u in node.users if op_kind(u) == "getitem" and u.args[1] == index]


@dataclass
class Flow:
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

    def between(self, lo: int, hi: int) -> list[fx.Node]:
        """Graph nodes strictly after position lo and before position hi."""
        return [n for n, i in self.order.items() if lo < i < hi]
