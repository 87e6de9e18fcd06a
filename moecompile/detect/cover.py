"""Structural cover: a region is rewritten only if every node in it is something the spec models.

Verification on random inputs cannot see an op that changes nothing on those inputs: a clamp whose
limits typical values never reach, a mask whose threshold they never cross. So before verification
every node of a candidate region is given a class and must be an op that class allows:

    numeric  a tensor whose values come from x or the weights (logits, scores, routing weights,
             expert activations, outputs). Allowed: what the MoE formula spells -- GEMMs, the
             scoring and activation the spec names, top-k, mul / add / div / sum (weighting,
             renormalization, scaling, combine), casts, data movement (views, indexing, gather,
             scatter-add, cat), fresh buffers, and selects (where, masked_fill) whose condition is a
             routing decision.
    index    a tensor that depends on the values only through top-k's expert ids (dispatch:
             sort, histograms, cumsum, one-hot, comparisons of ids, nonzero, ...), or on no values
             at all (arange). Index arithmetic decides which rows go where; whether it does so
             exactly as the spec says (no capacity drops, say) is what verification's probes check,
             with inputs that send every token to a few experts.
    shape    Python / symbolic ints (sizes, views' arguments).

Anything else fails the cover and names the op: a comparison, clamp, max, abs or unknown op on
numeric values, a top-k beyond the layer's own, a sort of values, a scalar read out of a tensor. The
spec-dependent ops (softmax, sigmoid, silu, gelu, relu) must match the spec: `unexplained(cover,
spec)` is checked per candidate spec.

    Matches:     Candidate(nodes, x, topk)
    Rewrites to: Cover(kinds per node) | a reason naming the first op no spec models
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..fx import is_inplace, kind, meta_value
from .experts import clamp_bounds
from ..ir import MoESpec
from ..ir.spec import CLAMPED

NUMERIC, INDEX, SHAPE = "numeric", "index", "shape"

_GEMMS = {"linear", "matmul", "mm", "bmm", "einsum", "addmm", "baddbmm", "grouped_mm", "_grouped_mm",
          "grouped_mm_fallback"}
_MOVEMENT = {"reshape", "view_as", "reshape_as", "getitem", "permute", "transpose", "t", "unsqueeze",
             "squeeze", "expand", "expand_as", "repeat", "repeat_interleave", "index_select", "gather",
             "take_along_dim", "cat", "concat", "concatenate", "stack", "split", "chunk", "narrow",
             "select", "clone", "unflatten", "movedim", "moveaxis", "swapaxes", "unbind", "detach",
             "cast", "type_as", "to"}
_SCATTER = {"index_add", "scatter_add", "index_put", "setitem", "index_copy", "scatter"}
_CREATE = {"zeros", "empty", "zeros_like", "empty_like", "new_zeros", "new_empty", "arange"}
# Smooth arithmetic: an op spelled differently from the spec changes the output on almost every
# input, which verification sees.
_ARITH = {"mul", "add", "div", "truediv", "sum"}
# Value-level selects are routing when their condition is.
_SELECTS = {"where", "masked_fill"}
# Ops the spec decides (checked by `unexplained`).
_SPEC_OPS = {"softmax", "sigmoid", "silu", "gelu", "relu", "topk", "square", "pow", "tanh"}
# Clamps are numeric only where the spec models them (GPT-OSS's clamped SwiGLU, `unexplained`).
NUMERIC_OPS = _GEMMS | _MOVEMENT | _SCATTER | _CREATE | _ARITH | _SELECTS | _SPEC_OPS | {"dropout", "clamp"}

INDEX_OPS = _MOVEMENT | _SCATTER | _CREATE | _ARITH | _SELECTS | {
    "sort", "argsort", "cumsum", "histc", "bincount", "one_hot", "nonzero", "argwhere", "floordiv",
    "floor_divide", "remainder", "mod", "sub", "neg", "eq", "ne", "lt", "le", "gt", "ge",
    "logical_and", "logical_or", "logical_not", "invert", "and_", "or_", "bitwise_and", "bitwise_or",
    "bitwise_not", "any", "all", "max", "min", "amax", "amin", "clamp", "clamp_min", "clamp_max",
    "ones", "ones_like", "new_ones", "full", "full_like", "new_full", "masked_select", "searchsorted",
    "bucketize", "unique", "unique_consecutive", "scatter_reduce", "index_fill", "masked_scatter",
    "count_nonzero", "flip", "roll", "fill", "zero", "diff", "size", "dim", "numel", "getattr"}

_SHAPE_READS = {"size", "dim", "numel", "getattr", "sym_size", "sym_numel", "sym_stride", "stride"}


@dataclass(frozen=True)
class Cover:
    """Every region node with its kind and class; built once per candidate, checked per spec."""

    nodes: tuple  # (node, kind, cls) in graph order
    topk: fx.Node

    def count(self, op: str, cls: str = NUMERIC) -> int:
        return sum(1 for _, k, c in self.nodes if k == op and c == cls)


class Uncovered(Exception):
    """A node of the region that no MoE spec models; the message names it."""


def build(nodes, topk: fx.Node, explained=frozenset(), index_inputs=()) -> Cover:
    """Classify every node of a region (graph order); raise Uncovered at the first op no spec has.

    Inputs from outside the region (x, weights, sizes) are numeric if they are tensors, else shape.
    `explained` nodes were matched op by op against a form the spec models (the expert-group mask
    of a group-limited router, see router.match_selection): they are routing decisions (index).
    `index_inputs` come from outside as routing decisions: a traced router's expert ids."""
    cls: dict = dict.fromkeys(index_inputs, INDEX)  # node -> class, or a tuple of classes for tuple-valued nodes
    out = []
    for node in nodes:
        k = kind(node)
        if node in explained:
            cls[node] = INDEX
            out.append((node, k, INDEX))
            continue
        c = _classify(node, k, cls)
        cls[node] = c
        flat = c if isinstance(c, str) else (NUMERIC if NUMERIC in c else INDEX)
        if flat == SHAPE:
            if k not in _SHAPE_READS and _reads_numeric(node, cls):
                raise Uncovered(f"{k} ({node.name}) reads a number out of the layer's values")
            if k not in INDEX_OPS | _SHAPE_READS and not _is_operator(node):
                raise Uncovered(_describe(node, k, flat))
        elif k not in (NUMERIC_OPS if flat == NUMERIC else INDEX_OPS):
            raise Uncovered(_describe(node, k, flat))
        if flat == NUMERIC:
            _check_numeric(node, k, cls, topk)
            _mark_written(node, k, cls)
        out.append((node, k, flat))
    return Cover(tuple(out), topk)


def unexplained(cover: Cover, spec: MoESpec) -> str | None:
    """Why `spec` does not model every node of the cover, or None if it does."""
    fused = spec.router == "fused"
    if cover.count("topk") != fused:  # a traced router's top-k runs before the op
        return f"{cover.count('topk')} top-k ops on the layer's values; the spec models {int(fused)}"
    clamps = [(node, clamp_bounds(node)) for node, k, c in cover.nodes if k == "clamp" and c == NUMERIC]
    L = spec.act_limit
    # a clamped activation clamps gate and up: two clamps, four when the shared expert has it too
    # (the spec's shared expert runs the layer's activation)
    if clamps and (spec.activation not in CLAMPED or len(clamps) != 2 * (1 + bool(spec.shared_intermediate))
                   or {b for _, b in clamps} != {(None, L), (-L, L)}):
        node, bounds = clamps[0]
        return (f"clamp ({node.name}, min={bounds[0]}, max={bounds[1]}) on the layer's values is not part "
                f"of any MoE layer the compiler models")
    scoring_ok = {"softmax": fused and spec.scoring == "softmax",
                  # sigmoid: router scoring, the shared expert's gate, or silu spelled x * sigmoid(x)
                  "sigmoid": fused and spec.scoring == "sigmoid" or spec.shared_gate or spec.activation in (
                      "silu", "clamped_swiglu", "clamped_silu", "softcap_swiglu"),
                  "silu": spec.activation in ("silu", "clamped_silu"), "relu": spec.activation in ("relu", "relu2"),
                  # relu2 squares: square(h), or h ** 2 / pow(h, 2) (exponent checked below)
                  "square": spec.activation == "relu2", "pow": spec.activation == "relu2",
                  # the softcaps of softcap_swiglu: tanh(g / A), tanh(u / L) (their count checked below)
                  "tanh": spec.activation == "softcap_swiglu",
                  "gelu": spec.activation in ("gelu", "gelu_tanh")}
    for node, k, c in cover.nodes:
        if c != NUMERIC or k not in scoring_ok:
            continue
        if not scoring_ok[k]:
            return (f"{k} ({node.name}) is not modeled by the spec "
                    f"({spec.scoring} scoring, {spec.activation} experts)")
        if k == "tanh" and not _softcap_of(node, (spec.act_alpha, spec.act_limit)):
            return f"tanh ({node.name}) is not a softcap of the spec's {spec.activation} experts"
        if k == "pow" and node.args[1:2] != (2,):
            return f"pow ({node.name}) with exponent {node.args[1:2]} is not the spec's relu2"
        if k == "gelu":
            approx = node.kwargs.get("approximate", "none")
            if (approx == "tanh") != (spec.activation == "gelu_tanh"):
                return f"gelu ({node.name}, approximate={approx!r}) is not the spec's {spec.activation}"
    return None


# --- helpers ------------------------------------------------------------------------------------


def _softcap_of(node: fx.Node, caps: tuple) -> bool:
    """tanh(v / c) * c with c one of `caps`: the softcap form, not any tanh of the values."""
    div = node.args[0] if node.args else None
    if not isinstance(div, fx.Node) or kind(div) not in ("div", "truediv") or div.args[1] not in caps:
        return False
    return all(kind(u) == "mul" and div.args[1] in u.args for u in node.users)


def _class_of(arg: fx.Node, cls: dict, index=None) -> str:
    c = cls.get(arg)
    if c is None:  # from outside the region: x and weights are numeric, sizes are shape
        return NUMERIC if isinstance(meta_value(arg), torch.Tensor) else SHAPE
    if isinstance(c, tuple):
        if isinstance(index, int) and -len(c) <= index < len(c):
            return c[index]
        return NUMERIC if NUMERIC in c else INDEX
    return c


def _tensor_args(node: fx.Node, cls: dict) -> list:
    return [a for a in node.all_input_nodes if _class_of(a, cls) != SHAPE]


def _reads_numeric(node: fx.Node, cls: dict) -> bool:
    return any(_class_of(a, cls) == NUMERIC for a in _tensor_args(node, cls))


def _is_operator(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "__module__", "") in ("_operator", "operator")


def _classify(node: fx.Node, k: str, cls: dict):
    value = meta_value(node)
    if k == "getitem" and isinstance(node.args[0], fx.Node) and isinstance(cls.get(node.args[0]), tuple):
        return _class_of(node.args[0], cls, node.args[1])
    if k in ("topk", "sort", "max", "min") and isinstance(value, (tuple, list)):
        return (_class_of(node.args[0], cls), INDEX)  # values, indices
    is_tensor = isinstance(value, torch.Tensor) or (
        isinstance(value, (tuple, list)) and len(value) > 0 and all(isinstance(v, torch.Tensor) for v in value))
    if not is_tensor and not (value is None and (k in _SCATTER or is_inplace(node))):
        return SHAPE
    if k in _SELECTS and not (k == "where" and len(node.args) == 1):
        # the condition decides which values are kept; the data carries them
        data = [a for i, a in enumerate(node.args) if isinstance(a, fx.Node) and not _is_condition(k, i)]
        return NUMERIC if any(_class_of(a, cls) == NUMERIC for a in data) else INDEX
    return NUMERIC if _reads_numeric(node, cls) else INDEX


def _is_condition(k: str, position: int) -> bool:
    return (k == "where" and position == 0) or (k == "masked_fill" and position == 1)


def _check_numeric(node: fx.Node, k: str, cls: dict, topk: fx.Node) -> None:
    if k in _SELECTS and not (k == "where" and len(node.args) == 1):  # where(cond) is nonzero(cond)
        cond = node.args[0] if k == "where" else (node.args[1] if len(node.args) > 1 else node.kwargs.get("mask"))
        if isinstance(cond, fx.Node) and _class_of(cond, cls) == NUMERIC:
            raise Uncovered(f"{k} ({node.name}) selects by the layer's values, not by routing")
    if k == "topk" and node is not topk:
        raise Uncovered(f"a second top-k ({node.name}) on the layer's values is not modeled")
    if k == "dropout":
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        if training and p:
            raise Uncovered(f"dropout ({node.name}) in training mode is random; the op has none")


_VIEWS = {"reshape", "getitem", "transpose", "permute", "unsqueeze", "squeeze", "expand", "select",
          "narrow", "t"}


def _mark_written(node: fx.Node, k: str, cls: dict) -> None:
    """An in-place write of values into a buffer makes the buffer (and the base of a view) numeric."""
    if not (is_inplace(node) or k in _SCATTER) or not node.args:
        return
    target = node.args[0]
    while isinstance(target, fx.Node) and _class_of(target, cls) != NUMERIC:
        cls[target] = NUMERIC
        if kind(target) not in _VIEWS or not target.args:
            break
        target = target.args[0]


def _describe(node: fx.Node, k: str, flat: str) -> str:
    what = {NUMERIC: "the layer's values", INDEX: "routing indices", SHAPE: "sizes"}[flat]
    return f"{k} ({node.name}) on {what} is not part of any MoE layer the compiler models"
