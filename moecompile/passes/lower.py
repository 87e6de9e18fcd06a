"""lower: replace each verified MoE region by one `moecompile::moe` call.

    Matches:     x (..., H) -> [router, top-k, dispatch, expert GEMMs, combine, shared expert] -> y
    Rewrites to: y = torch.ops.moecompile.moe(x2d (T, H), [weights...], program_text, kernels, name)
                 (then `.reshape_as(x)` when y had x's shape rather than (T, H))
                 or, in a training graph keeping more than the inputs for a Triton backward,
                 y = torch.ops.moecompile.moe_saving(..., name, saved)[0]

Nodes of the region that nothing else reads are erased, in-place writes included; nodes the rest of
the graph still reads (router logits returned for an aux loss, say) stay and are computed as before.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..codegen import ops  # noqa: F401  (registers torch.ops.moecompile.moe)
from ..fx import is_inplace, kind, shape_of
from ..ir import MoERegion, PassResult, build


@dataclass(frozen=True)
class Lower:
    name: str = "lower"
    kernels: str = "auto"

    def __call__(self, gm: fx.GraphModule, regions: list[MoERegion]) -> PassResult:
        result = PassResult(self.name)
        for region in regions:
            reason = _cannot_lower(region)
            if reason:
                result.skip(reason, region)
                continue
            _rewrite(gm.graph, region, self.kernels)
            result.count("regions_lowered")
            result.changed = True
        if result.changed:
            gm.graph.lint()
            gm.recompile()
        return result


def _op_input(region: MoERegion) -> fx.Node | None:
    """The (T, H) view of x the op takes: the router's input, which the region already computes,
    before any cast (DeepSeek's router reads `x.view(-1, H).type(torch.float32)`); with a traced
    router, the view its experts read."""
    if region.op_input is not None:
        return region.op_input
    inside = set(region.nodes)
    users = list(region.weights[0].users)
    while users and all(kind(u) == "cast" for u in users):  # self.weight.type(torch.float32)
        users = [v for u in users for v in u.users]
    linears = [u for u in users if u in inside and kind(u) == "linear"]
    if not linears:
        return None
    x2d = linears[0].args[0]
    while isinstance(x2d, fx.Node) and kind(x2d) == "cast" and x2d in inside:
        x2d = x2d.args[0]
    return x2d


def _cannot_lower(region: MoERegion) -> str | None:
    x2d = _op_input(region)
    if x2d is None or len(shape_of(x2d) or ()) != 2:
        return "router_input_not_2d"
    if shape_of(region.output) not in (shape_of(x2d), shape_of(region.x)):
        return "output_shape_unlike_input"
    return None


def _rewrite(graph: fx.Graph, region: MoERegion, kernels: str) -> None:
    x2d = _op_input(region)
    # Right after its inputs: the op reads x where the traced router read it, before any later
    # write (and a traced router's weights and ids, which come later).
    args = (x2d, list(region.weights), (region.program or build(region.spec)).text(), kernels, region.name)
    order = {n: i for i, n in enumerate(graph.nodes)}
    last = max([x2d] + [w for w in region.weights if w.op != "placeholder"], key=order.__getitem__)
    if region.op_input is not None:
        # a traced router: where the experts' first node after its inputs ran (a router's
        # `torch.no_grad()` around the ids ends before it; detection checked the experts' grad mode)
        after = [n for n in region.nodes if order[n] > order[last]]
        first = min(after, key=order.__getitem__) if after else region.output
        insert = graph.inserting_before(first)
    else:
        insert = graph.inserting_after(last)
    with insert:
        if region.saved == "inputs":
            out = graph.call_function(torch.ops.moecompile.moe.default, args)
        else:  # (y, ids, pre): autograd keeps ids and pre for the backward; the graph reads y
            outs = graph.call_function(torch.ops.moecompile.moe_saving.default, args + (region.saved,))
            with graph.inserting_after(outs):
                out = graph.call_function(operator.getitem, (outs, 0))
    if shape_of(region.output) != shape_of(x2d):
        with graph.inserting_after(out):
            out = graph.call_method("reshape_as", (out, region.x))
    out.meta.update({k: v for k, v in region.output.meta.items() if k in ("example_value", "val")})
    region.output.replace_all_uses_with(out)
    _erase_dead(graph, region)


def _erase_dead(graph: fx.Graph, region: MoERegion) -> None:
    """Erase region nodes nobody reads, last first. An in-place write into a region tensor goes too,
    unless something outside the region still reads that tensor."""
    inside = set(region.nodes)
    for node in reversed(region.nodes):
        if node.users:
            continue
        if is_inplace(node) and any(u not in inside for u in node.args[0].users):
            continue
        graph.erase_node(node)
