"""Read the router off the graph: scoring, top-k order, renormalization, scaling and casts.

    Matches:     top-k's input chain back to the router linear, and the top-k values' uses
    Rewrites to: facts {scoring_before, scoring_after, renormalize, scale, to_input_dtype, fp32}
"""

from __future__ import annotations

import torch

from ..fx import Flow, getitem_users, op_kind, shape_of, value_of


def router_facts(flow: Flow, topk, chain, inside, router) -> dict:
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
    for v in getitem_users(topk, 0):
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
