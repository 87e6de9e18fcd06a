"""Never silent: layers that hold expert weights but that no candidate covers.

A layer whose router is not found (a graph break between router and experts, an op detection does
not know, an expert loop Dynamo could not trace as one graph) would otherwise leave no trace in the
report. Every graph input that is a module's expert weights is one of:

    a 3D parameter (E, *, *)                        experts stored stacked (transformers >= 5)
    a parameter of `...experts.<i>.<name>`           a ModuleList of per-expert modules

and each such layer that no candidate's region reads gets a record with the reason.

    Matches:     placeholders named like module parameters, grouped by the module holding the experts
    Rewrites to: UnmatchedLayer(name, num_experts, hidden, reason) per layer no candidate covers
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch.fx as fx

from ..fx import Flow, kind, module_parts, shape_of

_EXPERTISH = re.compile(r"expert|moe", re.IGNORECASE)
_LIST_EXPERT = re.compile(r"^(.*?)_modules_(experts?|local_experts|expert_list|mlps?)_modules_(?:expert_)?(\d+)_")


@dataclass(frozen=True)
class UnmatchedLayer:
    name: str  # the module holding the experts' container, as candidates are named
    num_experts: int
    hidden: int
    reason: str


def _layer_name(parts: list[str] | None) -> str:
    return ".".join(parts) if parts else "(model)"  # "(model)": the compiled module's own parameters


def _expert_params(gm: fx.GraphModule, routed_widths: set) -> dict[str, dict]:
    """Layer name -> {'nodes': [...], 'E': int, 'H': int} for every expert weight input of the graph:
    3D parameters named like experts, or whose leading size is the width of a top-k in the graph
    (a 3D convolution weight of an attention block is neither)."""
    layers: dict[str, dict] = {}
    for node in gm.graph.nodes:
        if node.op != "placeholder" or "_parameters_" not in node.name:
            continue
        shape = shape_of(node) or ()
        listed = _LIST_EXPERT.match(node.name)
        if listed:
            layer = _layer_name(module_parts(listed.group(1)))
            entry = layers.setdefault(layer, {"nodes": [], "ids": set(), "E": 0, "H": 0})
            entry["ids"].add(int(listed.group(3)))
            entry["E"] = len(entry["ids"])
        elif (len(shape) == 3 and all(isinstance(d, int) for d in shape) and shape[0] > 1
              and (_EXPERTISH.search(node.name) or shape[0] in routed_widths or _used_as_experts(node))):
            parts = module_parts(node.name) or []
            layer = _layer_name(parts[:-1] if len(parts) > 1 else parts)  # the block holding `experts`
            entry = layers.setdefault(layer, {"nodes": [], "ids": set(), "E": shape[0], "H": 0})
            entry["E"] = shape[0]
        else:
            continue
        entry["nodes"].append(node)
        if len(shape) >= 2 and not entry["H"]:
            entry["H"] = min(d for d in shape[-2:] if isinstance(d, int)) if listed else 0
    return layers


def _used_as_experts(node: fx.Node) -> bool:
    """Indexed by a tensor of ids (W[ids]: each token's experts) or multiplied by a grouped GEMM."""
    for user in node.users:
        k = kind(user)
        if "grouped_mm" in k:
            return True
        if k in ("getitem", "index_select") and len(user.args) > 1 and any(
                isinstance(a, fx.Node) for a in (user.args[1] if isinstance(user.args[1], tuple) else (user.args[1],))):
            return True
    return False


def unmatched_expert_layers(gm: fx.GraphModule, candidates) -> list[UnmatchedLayer]:
    """Layers with expert weights in `gm` that no candidate (optimized or reported) accounts for."""
    reported = [c for c in candidates if c.x is not None]  # every one of them has a report row
    covered_names = {c.name for c in reported}
    flow = Flow(gm.graph)
    after_routing = set()  # expert weights read after a reported top-k belong to that layer
    for c in reported:
        after_routing |= flow.descendants(c.topk)
        for _, weights in c.options:
            after_routing.update(weights)
    has_topk = any(c.topk is not None for c in candidates)
    out = []
    widths = {shape_of(c.topk.args[0])[-1] for c in candidates
              if isinstance(c.topk.args[0], fx.Node) and shape_of(c.topk.args[0])}
    for layer, entry in _expert_params(gm, widths).items():
        if layer in covered_names or any(n in after_routing or set(n.users) & after_routing
                                         for n in entry["nodes"]):
            continue
        if entry["ids"]:
            what = f"a list of {entry['E']} expert modules"
        else:
            what = f"3D expert weights (E={entry['E']})"
        if not has_topk:
            why = ("no top-k router in this graph reads them: the router ran in another graph (a "
                   "graph break inside the layer) or the layer routes without torch.topk")
        else:
            why = "no top-k router in this graph leads to them through a combine detection knows"
        out.append(UnmatchedLayer(layer, entry["E"], entry["H"], f"holds {what}, but {why}"))
    return out
