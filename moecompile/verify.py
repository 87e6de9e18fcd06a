"""Verify a candidate region before any rewrite: run the traced subgraph and the moecompile op on the
same probe inputs (real weights) and keep the first spec that matches on every probe.

    Matches:     Candidate(nodes, x, weights options, output)
    Rewrites to: MoERegion(spec) if some option matches on all probes, else a reason naming the probe
                 and the closest error.

One random input is not enough: a layer can agree with the spec on N(0, 1) rows and not on the rows
real models carry. The structural cover (cover.py) refuses the ops that cause that; the probes are
the second guard, for the rest (capacity limits that drop tokens, say):

    randn        N(0, 1) rows
    large        N(0, 1) rows x 64 (activations of the size real residual streams carry), and rows
                 with a few channels x 1000 (the "massive activations" of large models)
    few_experts  every row near one of two router rows: the router sends all tokens to a few experts
    one_token    one random row repeated: every token to the same K experts
    small_t      where the graph has dynamic token counts: the smallest size it admits (T = 1 when
                 the graph allows it; Dynamo compiles T = 1 as its own static graph otherwise)

In a training graph (grad enabled and an input that requires grad) the gradients of x and every
weight are compared too, on the randn probe, against a random output gradient (in fp32 for a bf16
or fp16 layer, see `_grads_close`).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
import torch.fx as fx

from .codegen import ops, plan
from .config import Config
from .detect import Candidate, stacked
from .fx import value_of
from .ir import MoERegion

_GRAD_PROBES = ("randn",)


@dataclass
class Verdict:
    """What verification found for one candidate: the region, or why not; and what it cost."""

    region: MoERegion | None
    reason: str | None
    probes: int = 0  # probe inputs run (per spec tried)
    ms: float = 0.0


def _subgraph(cand: Candidate, inputs: list[fx.Node], upcast: torch.dtype | None = None) -> fx.GraphModule:
    """The candidate's nodes as a standalone module: f(*inputs) -> output. With `upcast`, casts the
    traced code spells to that dtype (`.to(torch.bfloat16)`, `.bfloat16()`) go to float32 instead."""
    graph = fx.Graph()
    env = {n: graph.placeholder(f"in{i}") for i, n in enumerate(inputs)}
    for node in cand.nodes:
        copy = graph.node_copy(node, lambda n: env[n])
        if upcast is not None:
            copy.args, copy.kwargs = _to_fp32(copy.args, upcast), _to_fp32(copy.kwargs, upcast)
            if copy.op == "call_method" and copy.target in _LOW_PRECISION_METHODS:
                copy.target = "float"
        env[node] = copy
    graph.output(env[cand.output])
    return fx.GraphModule(torch.nn.Module(), graph)


_LOW_PRECISION_METHODS = ("bfloat16", "half")


def _to_fp32(value, dtype: torch.dtype):
    return fx.node.map_aggregate(value, lambda v: torch.float32 if v is dtype else v)


def _concrete(value):
    """The value a symbolic int had when the graph was traced (its hint)."""
    if isinstance(value, torch.SymInt):
        hint = getattr(value.node, "hint", None)
        if hint is None:
            hint = value.node.shape_env.size_hint(value.node.expr)
        return int(hint)
    return value


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, mean_rtol: float | None = None,
          floor: float = 0.0) -> tuple[bool, float]:
    """err = (|a - b| - floor)+ / (|b| + mean|b|) (relative, with a floor at the output's scale;
    differences below the absolute `floor` count as none) must stay within rtol everywhere and, if
    given, within mean_rtol on average; returns (ok, max err).

    Non-finite entries must match exactly (NaN where the traced layer has NaN, the same infinities);
    the scale is taken over the finite ones."""
    a, b = actual.double(), expected.double()
    if a.shape != b.shape:
        return False, float("inf")
    finite, nan = torch.isfinite(b), torch.isnan(b)
    if not torch.equal(torch.isnan(a), nan) or not torch.equal(a[~finite & ~nan], b[~finite & ~nan]):
        return False, float("inf")
    a, b = a[finite], b[finite]
    if not torch.isfinite(a).all():
        return False, float("inf")
    if b.numel() == 0:
        return True, 0.0
    err = ((a - b).abs() - floor).clamp_min(0) / (b.abs() + b.abs().mean().clamp_min(1e-30))
    worst = err.max().item()
    return worst <= rtol and (mean_rtol is None or err.mean().item() <= mean_rtol), worst


def _probes(cand: Candidate, shapes: dict, router_weight: torch.Tensor | None, graph_id: int) -> list:
    """[(name, sizes, x)] probe inputs; `sizes` are the values of the graph's size inputs. A traced
    router's routing values come with each probe (`_routing_probe`)."""
    x_val = value_of(cand.x)
    dtype, device = x_val.dtype, x_val.device
    gen = torch.Generator(device="cpu").manual_seed(1234 + graph_id)
    traced, small = shapes["traced"], shapes.get("small")
    shape = traced["x"]
    H = shape[-1]
    T = 1
    for d in shape[:-1]:
        T *= d

    def make(rows: torch.Tensor, x_shape=shape) -> torch.Tensor:
        return rows.reshape(x_shape).to(dtype).to(device)

    def randn(*size):
        return torch.randn(*size, generator=gen, dtype=torch.float32)

    # large: even rows 64x, odd rows with a few channels 1000x
    large = randn(T, H)
    large[0::2] *= 64.0
    channels = torch.randperm(H, generator=gen)[:max(1, H // 64)]
    large[1::2, channels] *= 1000.0
    probes = [("randn", traced["sizes"], make(randn(T, H))), ("large", traced["sizes"], make(large))]
    if router_weight is not None:
        # rows along router rows e0 / e1: logit e0 (or e1) beats the rest by |W_e|^2 against W_e . W_j
        w = router_weight.detach().float().cpu()
        pick = torch.randperm(w.shape[0], generator=gen)[:2]
        directions = w[pick] / w[pick].norm(dim=-1, keepdim=True).clamp_min(1e-12) * H ** 0.5
        few = directions[torch.arange(T) % len(pick)] * 4.0 + 0.1 * randn(T, H)
    else:  # a traced router: the routing values send every token to a few experts
        few = randn(T, H)
    probes.append(("few_experts", traced["sizes"], make(few)))
    probes.append(("one_token", traced["sizes"], make(randn(1, H).expand(T, H).clone())))
    if small is not None:
        t_small = 1
        for d in small["x"][:-1]:
            t_small *= d
        probes.append(("small_t", small["sizes"], make(randn(t_small, H) * 8.0, small["x"])))
    return probes


def _routing_probe(cand: Candidate, spec, probe: str, x: torch.Tensor, graph_id: int) -> dict:
    """A traced router's routing values for one probe, {weights node: (T, K), ids node: (T, K)}
    ({} for a fused router): K distinct experts per token, positive weights; on few_experts every
    token picks among K + 1 experts, on one_token every token the same K experts and weights."""
    if not cand.routing:
        return {}
    w_node, ids_node = cand.routing
    E, K, T = spec.num_experts, spec.top_k, x.numel() // x.shape[-1]
    gen = torch.Generator(device="cpu").manual_seed(2024 + graph_id)
    pool = torch.randperm(E, generator=gen)[:K + 1] if probe == "few_experts" else torch.arange(E)
    rows = 1 if probe == "one_token" else T
    ids = torch.stack([pool[torch.randperm(len(pool), generator=gen)[:K]] for _ in range(rows)]).expand(T, K)
    w = (torch.rand(rows, K, generator=gen) + 0.1).expand(T, K)
    return {w_node: w.to(value_of(w_node).dtype).to(x.device).contiguous(),
            ids_node: ids.to(value_of(ids_node).dtype).to(x.device).contiguous()}


def _shapes(cand: Candidate, placeholder_values: dict) -> dict | None:
    """x's shape and the size inputs' values as traced, and at the smallest sizes the graph admits
    when x's dynamic dims are exactly the graph's size inputs (else only as traced)."""
    x_val = value_of(cand.x)
    traced_x = [_concrete(d) for d in x_val.shape]
    extra = list(cand.extra_inputs)
    try:
        traced_sizes = [_concrete(placeholder_values[n]) if n in placeholder_values
                        else _concrete(_val_or_meta(n)) for n in extra]
    except KeyError:
        return None
    out = {"traced": {"x": traced_x, "sizes": traced_sizes}}
    dynamic = [(i, d) for i, d in enumerate(x_val.shape) if isinstance(d, torch.SymInt) and d.node.expr.is_symbol]
    symbols = {str(d.node.expr): i for i, d in dynamic}
    if not symbols:
        return out
    exprs = []
    for n in extra:
        value = n.meta.get("example_value", n.meta.get("val"))
        exprs.append(str(value.node.expr) if isinstance(value, torch.SymInt) else None)
    if any(e not in symbols for e in exprs):
        return out  # a size input that is not one of x's dims: keep to the traced shape
    small_x = list(traced_x)
    for i, d in dynamic:
        small_x[i] = _lower_bound(d)
    out["small"] = {"x": small_x, "sizes": [small_x[symbols[e]] for e in exprs]}
    return out


def _lower_bound(size: torch.SymInt) -> int:
    """The smallest value Dynamo lets a size symbol take (2 for backed sizes: 0 and 1 recompile)."""
    shape_env = size.node.shape_env
    ranges = getattr(shape_env, "var_to_range", {})
    expr = size.node.expr
    lower = ranges[expr].lower if expr in ranges else 2
    try:
        return max(1, int(lower))
    except (TypeError, ValueError):
        return 2


def verify(cand: Candidate, graph_id: int, placeholder_values: dict, config: Config,
           training: bool = False) -> Verdict:
    """Pick the first spec option whose op matches the traced subgraph on every probe."""
    t0 = time.perf_counter()
    try:
        verdict = _verify(cand, graph_id, placeholder_values, config, training)
    except Exception as err:  # noqa: BLE001 -- the traced code failed on a probe: leave it as traced
        verdict = Verdict(None, f"verification could not run the layer: {type(err).__name__}: "
                                f"{(str(err).strip().splitlines() or [''])[0]}")
    verdict.ms = (time.perf_counter() - t0) * 1e3
    return verdict


def _verify(cand, graph_id, placeholder_values, config, training) -> Verdict:
    x_nodes = [cand.x] + sorted({w for _, ws in cand.options for w in ws}, key=lambda n: n.name)
    shapes = _shapes(cand, placeholder_values)
    try:  # a traced router's routing values are made per probe
        weights = {n: stacked.input_value(n, placeholder_values) for n in x_nodes[1:] if n not in cand.routing}
    except KeyError:
        weights = None
    if shapes is None or weights is None:
        return Verdict(None, "verification could not evaluate the layer's inputs")
    module = _subgraph(cand, x_nodes + list(cand.extra_inputs))
    router = None if cand.routing else weights[cand.options[0][1][0]]
    probes = _probes(cand, shapes, router, graph_id)
    runs, best, failed = 0, (1, float("inf"), ""), None
    for spec, spec_weights in cand.options:
        rtol, mean_rtol = config.verify_rtol[spec.dtype]["out"]
        grad_rtol = config.verify_rtol[spec.dtype]["grad"]
        failed = None
        for passed, (name, sizes, x) in enumerate(probes):
            runs += 1
            inputs = {**weights, **_routing_probe(cand, spec, name, x, graph_id)}
            with torch.no_grad():
                expected = module(x, *[inputs[n] for n in x_nodes[1:]], *sizes)
                try:
                    actual = ops.run_forward(x.reshape(-1, x.shape[-1]), [inputs[w] for w in spec_weights],
                                             spec, config.verify_kernels())
                except ValueError as err:
                    return Verdict(None, str(err), runs)
            if actual.dtype != expected.dtype:
                return Verdict(None, f"replacement returns {actual.dtype} where the layer returns "
                                     f"{expected.dtype}", runs)
            ok, err = close(actual.reshape(expected.shape), expected, rtol, mean_rtol)
            if ok and training and name in _GRAD_PROBES:
                ok, err, what = _grads_close(cand, module, x, sizes, inputs, x_nodes, spec, spec_weights,
                                             config, *grad_rtol)
                name = f"{name} ({what})" if not ok else name
            if not ok:
                failed = (-passed, err, name)  # the spec that passed most probes is the closest
                break
        if failed is None:
            region = MoERegion(graph_id=graph_id, name=cand.name, spec=spec, x=cand.x,
                               weights=tuple(spec_weights), output=cand.output, nodes=cand.nodes,
                               experts_impl=cand.experts_impl, op_input=cand.x2d if cand.routing else None)
            return Verdict(region, None, runs)
        best = min(best, failed)
    _, err, probe = best
    return Verdict(None, f"replacement differs from the traced layer for all {len(cand.options)} candidate "
                         f"specs (closest: max relative error {err:.3g} on probe {probe})", runs)


def _grads_close(cand, module, x, sizes, weights, x_nodes, spec, spec_weights, config, rtol, mean_rtol):
    """Gradients of x and every weight, traced layer vs the op's backward, for one output gradient.

    A bf16 / fp16 layer is differentiated in fp32 (x and weights upcast, the spec's dtype float32):
    the question is whether the traced layer's gradient is the spec's, and traced layers that gather
    weights per token sum their weight gradients in bf16, with noise that grows with the token count
    and says nothing about that question. The traced code's own casts to the low precision become
    casts to fp32; the dtype's gradient tolerance still applies."""
    if spec.dtype in ("bfloat16", "float16"):
        module = _subgraph(cand, x_nodes + list(cand.extra_inputs), upcast=x.dtype)
        x = x.float()
        weights = {n: w.float() if w.is_floating_point() else w for n, w in weights.items()}
        spec = dataclasses.replace(spec, dtype="float32")
    gen = torch.Generator(device="cpu").manual_seed(4321)
    leaves = [x.detach().requires_grad_()] + [weights[n].detach().requires_grad_(weights[n].is_floating_point())
                                              for n in x_nodes[1:]]
    with torch.enable_grad():
        out = module(*leaves, *sizes)
        grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(out)
        floating = [leaf for leaf in leaves if leaf.requires_grad]  # not a traced router's expert ids
        got = iter(torch.autograd.grad(out, floating, grad_out, allow_unused=True))
        traced = [next(got) if leaf.requires_grad else None for leaf in leaves]
    by_node = dict(zip(x_nodes, traced))
    x2d = x.reshape(-1, x.shape[-1])
    ours = ops.moe_backward(grad_out.reshape(x2d.shape).to(x2d.dtype), x2d, [weights[w] for w in spec_weights],
                            plan.program_of(spec).text(), config.verify_kernels(), [])
    names = ("x",) + spec.weight_names()
    wants = [by_node[node] for node in [x_nodes[0]] + list(spec_weights)]
    # NOTE: a gradient that is zero in exact arithmetic (the router's, when K = 1 and the weights are
    # renormalized: w = p / p) is rounding noise on both sides; it is compared on the scale of the
    # layer's largest gradient (64 ulps of it) instead of its own.
    largest = max((float(w.abs().max()) for w in wants if w is not None and w.numel()), default=0.0)
    floor = 64 * torch.finfo(getattr(torch, spec.dtype)).eps * largest  # bf16 / fp16: compared in fp32
    for name, want, got in zip(names, wants, ours):
        if not got.is_floating_point():  # a traced router's expert ids have no gradient
            continue
        want = torch.zeros_like(got) if want is None else want.reshape(got.shape)
        ok, err = close(got, want, rtol, mean_rtol, floor)
        if not ok:
            return False, err, f"gradient of {name}"
    return True, 0.0, ""


def _val_or_meta(node: fx.Node):
    value = node.meta.get("example_value", node.meta.get("val"))
    if value is None:
        raise KeyError(node.name)
    return value
