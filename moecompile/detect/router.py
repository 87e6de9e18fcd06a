"""Read the router off the graph: scoring, top-k order, renormalization, scaling and casts, and
DeepSeek-style expert choice (correction bias, group-limited top-k).

    Matches:     top-k's input chain back to the router linear, and the top-k values' uses
    Rewrites to: facts {scoring_before, scoring_after, renormalize, renorm_eps, scale,
                 to_input_dtype, fp32, weights_from}

Group-limited choice (DeepSeek-V2 / V3, GLM-4.5, dots1, ...):

    Matches:     scores  = sigmoid | softmax(linear(x, W))                        (T, E)
                 choice  = scores [+ bias (E,)]
                 grouped = choice.view(T, G, E/G); gs = grouped.topk(2)[0].sum(-1) | grouped.max(-1)
                 keep    = topk(gs, top_groups)[1]; mask = zeros_like(gs).scatter_(1, keep, 1)
                 choice  = choice.masked_fill(~mask.expand..reshape(T, E).bool(), -inf | 0.0)
                 ids     = topk(choice, K)[1];  w = scores.gather(1, ids) | topk values
    Rewrites to: Selection(scores, bias, G, top_groups, group_score, masked_score, explained nodes)

The nodes between `choice` and the mask are checked op by op against that form (`_GROUP_OPS`); what
they compute is modeled by the spec fields groups / top_groups / group_score and checked numerically
by verification.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..fx import Flow, getitem_users, kind, op_kind, shape_of, topk_k, value_of

# what the group mask is built of: views, the group scores (top-2 sum or max), the group top-k,
# a fresh mask and its scatter, the cast to bool and its negation
_GROUP_OPS = {"reshape", "getitem", "topk", "sum", "max", "amax", "zeros_like", "new_zeros", "zeros", "scatter",
              "unsqueeze", "expand", "expand_as", "cast", "bool", "invert", "logical_not", "eq", "ones_like",
              "size", "sym_size"}


@dataclass(frozen=True)
class Selection:
    """How top-k's input was built from the router's scores, when it is more than the scores."""

    scores: fx.Node  # the scored router output (T, E)
    correction_bias: fx.Node | None = None  # (E,) graph input added to the scores for the choice
    groups: int = 1
    top_groups: int = 1
    group_score: str = "max"
    masked_score: float = -math.inf
    explained: frozenset = frozenset()  # nodes of the group mask, modeled by the spec's group fields
    reason: str | None = None  # why this choice is not one the spec models


def match_selection(flow: Flow, topk: fx.Node) -> "Selection | None":
    """The DeepSeek-style choice feeding `topk`, or None for a plain router. A choice that is
    neither has `reason` set (its `scores` and `explained` still say where the router is)."""
    node, masked = topk.args[0], None
    if isinstance(node, fx.Node) and kind(node) == "masked_fill":
        masked, node = node, node.args[0]
    bias = None
    if isinstance(node, fx.Node) and kind(node) == "add" and len(node.args) == 2:
        for a, b in (node.args, node.args[::-1]):
            if isinstance(b, fx.Node) and b.op == "placeholder" and len(shape_of(b) or ()) == 1:
                node, bias = a, b
                break
    if masked is None and bias is None:
        return None
    choice = masked.args[0] if masked is not None else None
    scores = node
    if masked is None:
        return Selection(scores, bias)
    value = masked.args[2] if len(masked.args) > 2 else masked.kwargs.get("value")
    cond = masked.args[1] if len(masked.args) > 1 else masked.kwargs.get("mask")
    if not isinstance(value, (int, float)) or not isinstance(cond, fx.Node):
        return Selection(scores, bias, reason="masked_fill before top-k with a mask or value the "
                                               "group-limited router does not have")
    explained = frozenset((flow.ancestors(cond) & flow.descendants(choice)) - {choice})
    bad = sorted(kind(n) for n in explained if kind(n) not in _GROUP_OPS)
    if bad:
        return Selection(scores, bias, explained=explained,
                         reason=f"{bad[0]} in the expert-group mask before top-k is not modeled")
    view = [n for n in explained if len(shape_of(n) or ()) == 3 and choice in n.all_input_nodes]
    tops = [n for n in explained if kind(n) == "topk"]
    group_topk = [n for n in tops if len(shape_of(n.args[0]) or ()) == 2]
    pair_topk = [n for n in tops if len(shape_of(n.args[0]) or ()) == 3]
    if (len(view) != 1 or not isinstance(shape_of(view[0])[1], int) or len(group_topk) != 1
            or len(pair_topk) > 1 or (pair_topk and topk_k(pair_topk[0]) != 2)):
        return Selection(scores, bias, explained=explained,
                         reason="expert-group mask before top-k picks groups in a way the spec does not model")
    G = shape_of(view[0])[1]
    return Selection(scores, bias, G, int(topk_k(group_topk[0])), "top2_sum" if pair_topk else "max",
                     float(value), explained)


def router_facts(flow: Flow, topk, chain, inside, router, scores=None) -> dict:
    """What the router chain and the top-k values path show: scoring, order, renormalize, casts.
    With `scores` (a DeepSeek-style choice), routing weights may be the scores gathered at the ids."""
    facts = {"scoring_before": None, "scoring_after": None, "renormalize": False, "scale": 1.0,
             "to_input_dtype": False, "fp32": False, "renorm_eps": 0.0, "weights_from": "topk"}
    for n in chain:
        if op_kind(n) in ("softmax", "sigmoid"):
            facts["scoring_before"] = op_kind(n)
            facts["fp32"] |= n.kwargs.get("dtype") == torch.float32
        if op_kind(n) == "cast" and value_of(n) is not None and value_of(n).dtype == torch.float32:
            facts["fp32"] = True
    values_path = set()
    for v in getitem_users(topk, 0):
        values_path |= flow.descendants(v)
    ids = getitem_users(topk, 1)
    gathers = [n for i in ids for n in i.users if kind(n) == "gather" and n in inside
               and scores is not None and n.args[0] is scores]
    if gathers and not any(v.users for v in getitem_users(topk, 0)):
        facts["weights_from"] = "gather"
        for g in gathers:
            values_path |= flow.descendants(g)
    # Only the routing-weight math: stop where expert outputs join in.
    for n in sorted(values_path & inside, key=flow.order.__getitem__):
        kind_ = op_kind(n)
        if kind_ in ("softmax", "sigmoid") and facts["scoring_before"] is None:
            facts["scoring_after"] = kind_
        elif kind_ == "sum" and shape_of(n) is not None and shape_of(n)[-1] == 1:
            facts["renormalize"] = True
            for u in n.users:  # the denominator's epsilon: w.sum(-1, keepdim=True) + 1e-20
                if op_kind(u) == "add" and any(isinstance(a, float) for a in u.args):
                    facts["renorm_eps"] = next(a for a in u.args if isinstance(a, float))
        elif kind_ == "mul" and any(isinstance(a, float) for a in n.args):
            facts["scale"] = next(a for a in n.args if isinstance(a, float))
        elif (kind_ == "cast" and facts["scoring_before"] is None and facts["scoring_after"] is None
              and value_of(n) is not None and value_of(n).dtype == torch.float32 and isinstance(n.args[0], fx.Node)
              and value_of(n.args[0]) is not None and value_of(n.args[0]).dtype != torch.float32):
            facts["fp32"] = True  # top-k logits scored in float32: score(top.float())
        elif kind_ == "cast" and value_of(n) is not None and value_of(n).dtype != torch.float32 \
                and value_of(n).dim() == 2 and value_of(n).shape[-1] == topk_k(topk):
            facts["to_input_dtype"] = True
    return facts
