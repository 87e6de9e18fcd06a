"""Verify a candidate region before any rewrite: run the original subgraph and the moecompile op on
the same random input (real weights) and keep the first spec whose output matches.

    Matches:   Candidate(nodes, x, weights options, output)
    Rewrites to: MoERegion(spec) if some option matches, else a reason naming the closest error.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .codegen import ops
from .config import Config
from .detect import Candidate, value_of
from .ir import MoERegion


def _subgraph(cand: Candidate, inputs: list[fx.Node]) -> fx.GraphModule:
    """The candidate's nodes as a standalone module: f(*inputs) -> output."""
    graph = fx.Graph()
    env = {n: graph.placeholder(f"in{i}") for i, n in enumerate(inputs)}
    for node in cand.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[cand.output])
    return fx.GraphModule(torch.nn.Module(), graph)


def _concrete(value):
    """The value a symbolic int had when the graph was traced (its hint)."""
    if isinstance(value, torch.SymInt):
        hint = getattr(value.node, "hint", None)
        if hint is None:
            hint = value.node.shape_env.size_hint(value.node.expr)
        return int(hint)
    return value


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> tuple[bool, float]:
    """|a - b| <= rtol * (|b| + mean|b|): relative, with an absolute floor at the output's scale."""
    a, b = actual.double(), expected.double()
    if not torch.isfinite(a).all() or a.shape != b.shape:
        return False, float("inf")
    scale = b.abs().mean().clamp_min(1e-30)
    err = ((a - b).abs() / (b.abs() + scale)).max().item()
    return err <= rtol, err


def verify(cand: Candidate, graph_id: int, placeholder_values: dict, config: Config
           ) -> tuple[MoERegion | None, str | None]:
    """Pick the first spec option whose op output matches the traced subgraph; else a reason."""
    x_val = value_of(cand.x)
    shape = [_concrete(d) for d in x_val.shape]
    generator = torch.Generator(device="cpu").manual_seed(1234 + graph_id)
    x = torch.randn(shape, generator=generator, dtype=torch.float32).to(x_val.dtype).to(x_val.device)
    x_inputs = [cand.x] + sorted({w for _, ws in cand.options for w in ws}, key=lambda n: n.name)
    extra = list(cand.extra_inputs)
    try:
        values = [x] + [placeholder_values[n] for n in x_inputs[1:]] + [
            _concrete(placeholder_values[n]) if n in placeholder_values else _concrete(_val_or_meta(n))
            for n in extra]
    except KeyError as missing:
        return None, f"verification could not evaluate input {missing}"
    module = _subgraph(cand, x_inputs + extra)
    with torch.no_grad():
        expected = module(*values)
        env = dict(zip(x_inputs, values))
        x2d = x.reshape(-1, x.shape[-1])
        best = float("inf")
        for spec, weights in cand.options:
            try:
                actual = ops.run_forward(x2d, [env[w] for w in weights], spec, config.op_kernels())
            except ValueError as err:
                return None, str(err)
            if actual.dtype != expected.dtype:
                return None, f"replacement returns {actual.dtype} where the layer returns {expected.dtype}"
            actual = actual.reshape(expected.shape)
            ok, err = _close(actual, expected, config.verify_rtol.get(spec.dtype, 1e-2))
            if ok:
                return MoERegion(graph_id=graph_id, name=cand.name, spec=spec, x=cand.x,
                                 weights=tuple(weights), output=cand.output, nodes=cand.nodes,
                                 experts_impl=cand.experts_impl), None
            best = min(best, err)
    return None, (f"replacement differs from the traced layer for all {len(cand.options)} candidate "
                  f"specs (smallest max relative error {best:.3g})")


def _val_or_meta(node: fx.Node):
    value = node.meta.get("example_value", node.meta.get("val"))
    if value is None:
        raise KeyError(node.name)
    return value
