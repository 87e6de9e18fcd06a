"""Why a top-k leads to no experts: the graph may simply end there.

A layer Dynamo cannot trace in one piece (an experts loop over `nonzero()`, a `torch.where(mask)`
per expert) reaches the backend cut in two: a graph that ends with the router's top-k among its
outputs, and the experts in later graphs. The reason detection gives for such a top-k says so.

    Matches:     output(..., w (T, K) | ids (T, K), ...)   a top-k result (or a value computed from
                                                            one, still (T, K)) leaves the graph
    Rewrites to: a hint appended to the candidate's reason
"""

from __future__ import annotations

import torch.fx as fx

from ..fx import Flow, shape_of

HINT = ("; the graph ends after the router's top-k (a graph break inside the layer, such as a Python "
        "loop over experts): moecompile.prepare(model) makes the loops it knows traceable")


def cut_after_topk(flow: Flow, topk: fx.Node) -> str:
    """HINT if a (T, K) value computed from `topk` is a graph output, else ''."""
    K = topk.args[1] if len(topk.args) > 1 else topk.kwargs.get("k")
    after = flow.descendants(topk)
    for out in (n for n in flow.graph.nodes if n.op == "output"):
        for value in out.all_input_nodes:
            shape = shape_of(value)
            if value in after and shape is not None and len(shape) == 2 and shape[-1] == K:
                return HINT
    return ""
