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

from ..fx import Flow, kind, shape_of
from ..fx.names import param_name

_EXPERTISH = re.compile(r"expert|moe", re.IGNORECASE)
_LIST_EXPERT = re.compile(r"^(?:(.*?)\.)?(experts?|local_experts|expert_list|mlps?)\.(?:expert_)?(\d+)\.")


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
    (a 3D convolution weight of an attention block is neither); parameters of a list of expert
    modules; one expert's slice of a parameter (a frame-local of an experts loop)."""
    layers: dict[str, dict] = {}
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        if _EXPERTISH.search(node.meta.get("moe_view_of", "")):
            owner = node.meta["moe_view_of"].split(".")[:-1]
            layer = _layer_name(owner[:-1] if len(owner) > 1 else owner)
            entry = layers.setdefault(layer, {"nodes": [], "ids": set(), "E": 0, "H": 0, "slice": True})
            entry["nodes"].append(node)
            continue
        name = param_name(node)
        if name is None:
            continue
        shape = shape_of(node) or ()
        listed = _LIST_EXPERT.match(name)
        if listed:
            layer = listed.group(1) or "(model)"
            entry = layers.setdefault(layer, {"nodes": [], "ids": set(), "E": 0, "H": 0})
            entry["ids"].add(int(listed.group(3)))
            entry["E"] = len(entry["ids"])
            entry["mlps"] = listed.group(2).startswith("mlp")  # maybe dense sublayers (LongCat-Flash's)
        elif (len(shape) == 3 and all(isinstance(d, int) for d in shape) and shape[0] > 1
              and (_EXPERTISH.search(name) or shape[0] in routed_widths or _used_as_experts(node))):
            parts = name.split(".")[:-1]  # the module holding the parameter
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
    """Indexed by a tensor of ids (W[ids]: each token's experts), multiplied by a grouped GEMM, or
    read one leading slice at a time for every index (W[0], W[1], ...: a loop over the experts)."""
    slices = set()
    for user in node.users:
        k = kind(user)
        if "grouped_mm" in k:
            return True
        if k in ("getitem", "index_select") and len(user.args) > 1 and any(
                isinstance(a, fx.Node) for a in (user.args[1] if isinstance(user.args[1], tuple) else (user.args[1],))):
            return True
        if k == "getitem" and isinstance(user.args[1], int):
            slices.add(user.args[1])
        elif k == "select" and user.args[1:2] == (0,) and isinstance(user.args[2], int):
            slices.add(user.args[2])
    shape = shape_of(node) or ()
    return bool(shape) and shape[0] > 1 and slices == set(range(shape[0]))


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
    widths = {shape_of(c.topk.args[0])[-1] for c in candidates if kind(c.topk) == "topk"
              and isinstance(c.topk.args[0], fx.Node) and shape_of(c.topk.args[0])}
    for layer, entry in _expert_params(gm, widths).items():
        if layer in covered_names or any(n in after_routing or set(n.users) & after_routing
                                         for n in entry["nodes"]):
            continue
        if entry.get("mlps") and entry["E"] > 1 and entry["E"] not in widths:
            continue  # a list of MLPs as many as no top-k picks among: dense sublayers, not experts
        if entry.get("slice"):
            what = "expert weights read one expert at a time (a loop over the experts)"
        elif entry["ids"]:
            what = (f"a list of {entry['E']} expert modules" if entry["E"] > 1 else
                    f"expert module {min(entry['ids'])} of a list (each expert traced on its own)")
        else:
            what = f"3D expert weights (E={entry['E']})"
        if not has_topk:
            why = ("no top-k router in this graph reads them: the router ran in another graph (a "
                   "graph break inside the layer) or the layer routes without torch.topk")
        else:
            why = "no top-k router in this graph leads to them through a combine detection knows"
        out.append(UnmatchedLayer(layer, entry["E"], entry["H"], f"holds {what}, but {why}"))
    return out
