"""The specs a layer's weights and ops allow: expert layouts (concat / interleaved / separate,
stored either way round), activations, shared experts. Verification picks the one that computes the
same function.
"""

from __future__ import annotations

import itertools

import torch
import torch.fx as fx

from ..fx import kind, op_kind, shape_of
from ..ir import MoESpec


def spec_options(E, K, H, facts, nodes, expert_weights, shared_params, router, router_bias: bool,
                 has_shared, dtype) -> list:
    """All (spec, weights) that fit the shapes and the ops seen; verification picks among them.
    `router` is the router's weight inputs in `MoESpec.weight_names()` order, or with
    facts["router"] == "traced" the routing values (top-k weights, ids) the experts read."""
    kinds = {kind(n) for n in nodes}
    acts = [a for a in ("silu", "gelu", "relu") if a in kinds]
    activations = []  # names, or (name, {fields})
    clamped = _clamped_swiglu(nodes)
    if clamped is not None:  # silu of the clamped gate (DeepSeek-V4), else GPT-OSS's own form
        activations.append(("clamped_silu", {"act_limit": clamped["act_limit"]}) if "silu" in kinds
                           else ("clamped_swiglu", clamped))
    softcaps = _softcaps(nodes)
    if softcaps is not None:
        activations.append(("softcap_swiglu", softcaps))
    if "relu" in kinds and kinds & {"square", "pow"}:
        activations.append("relu2")  # relu(h)^2 (Nemotron-H); the cover checks the exponent
    for a in acts or ([] if clamped else ["silu"]):
        if a == "gelu":
            approx = {n.kwargs.get("approximate", "none") for n in nodes if op_kind(n) == "gelu"}
            activations += ["gelu_tanh" if ap == "tanh" else "gelu" for ap in sorted(approx)]
        else:
            activations.append(a)
    if facts.get("router") == "traced":
        base = dict(num_experts=E, top_k=K, hidden=H, intermediate=1, router="traced",
                    dtype=str(dtype).replace("torch.", ""))
    else:
        base = _routing_fields(E, K, H, facts, router, router_bias, dtype)
        if base is None:
            return []
    router = list(router)
    layouts = ["interleaved", "concat"] if any(
        op_kind(n) == "getitem" and _has_step2(n) for n in nodes) else ["concat", "interleaved"]

    biases = [p for p in shared_params if _is_expert_bias(p, E)]  # (E, out) rows picked by expert id
    shared_params = [p for p in shared_params if p not in biases]
    expert_options = []  # (fields, weights)
    if len(expert_weights) == 2:
        w1, w2 = (shape_of(w) for w in expert_weights)
        for transposed in (False, True):
            h_ax, i_ax = (2, 1) if transposed else (1, 2)
            if w2[h_ax] != H or w1[3 - h_ax] != H:
                continue
            inter, up_rows = w2[i_ax], w1[3 - i_ax]
            if up_rows == 2 * inter:
                expert_options += [(dict(intermediate=inter, transposed=transposed, layout=lay), expert_weights)
                                   for lay in layouts]
            elif up_rows == inter:
                expert_options.append((dict(intermediate=inter, transposed=transposed, gated=False),
                                       expert_weights))
    elif len(expert_weights) == 3:
        a, b, down = expert_weights
        for transposed in (False, True):
            inter = shape_of(down)[2 if not transposed else 1]
            for gate, up in ((a, b), (b, a)):
                expert_options.append((dict(intermediate=inter, transposed=transposed, layout="separate"),
                                       [gate, up, down]))

    shared_options = [({}, [])]
    if has_shared:
        shared_options = _shared_options(shared_params, H)
    elif shared_params:
        return []
    if biases:
        expert_options = [({**f, "expert_bias": True}, _with_biases(w, biases)) for f, w in expert_options]
        expert_options = [(f, w) for f, w in expert_options if w is not None]
    options = []
    acts = [{"activation": a} if isinstance(a, str) else {"activation": a[0], **a[1]} for a in activations]
    for act_fields, (fields_e, weights_e), (fields_s, weights_s), fields_c in itertools.product(
            acts, expert_options, shared_options, facts.get("capacities", [{}])):
        try:
            spec = MoESpec(**{**base, **fields_e, **fields_s, **act_fields, **fields_c})
        except ValueError:
            continue
        weights = tuple(router + list(weights_e) + list(weights_s))
        params = weights[2:] if spec.router == "traced" else weights  # routing inputs are not weights
        if [shape_of(w) for w in params] == list(spec.weight_shapes().values()):
            options.append((spec, weights))
    return options


def _routing_fields(E, K, H, facts, router, router_bias: bool, dtype) -> dict | None:
    """The spec fields of a fused router, from what the router chain shows; None without a scoring."""
    scoring = facts["scoring_before"] or facts["scoring_after"]
    if scoring is None:
        return None
    return dict(
        num_experts=E, top_k=K, hidden=H, intermediate=1, scoring=scoring,
        topk_order="score_then_topk" if facts["scoring_before"] else "topk_then_score",
        renormalize=facts["renormalize"], router_bias=router_bias,
        router_fp32=facts["fp32"] or dtype == torch.float32, router_gemm_fp32=facts.get("gemm_fp32", False),
        weights_in_input_dtype=facts["to_input_dtype"], routed_scaling=facts["scale"],
        dtype=str(dtype).replace("torch.", ""), renorm_eps=facts["renorm_eps"],
        weights_from=facts["weights_from"], correction_bias=len(router) > 1 + router_bias,
        **{k: facts[k] for k in ("groups", "top_groups", "group_score", "masked_score") if k in facts},
    )


def _is_expert_bias(node: fx.Node, E: int) -> bool:
    """A 2D weight (E, out) that the layer indexes by expert id (bias[expert_ids]), not a matrix."""
    shape = shape_of(node) or ()
    return len(shape) == 2 and shape[0] == E and any(
        kind(u) in ("getitem", "index_select", "index", "embedding", "gather") for u in node.users)


def _with_biases(weights: list, biases: list) -> list | None:
    """Expert weights with their biases in `MoESpec.weight_names()` order (biases in order of use)."""
    if len(weights) == 2 and len(biases) == 2:
        return [weights[0], biases[0], weights[1], biases[1]]
    if len(weights) == 3 and len(biases) == 3:
        return [weights[0], weights[1], biases[0], biases[1], weights[2], biases[2]]
    return None


def _clamped_swiglu(nodes) -> dict | None:
    """alpha and limit of GPT-OSS's activation when the layer has its two clamps:
    gate.clamp(max=L), up.clamp(-L, L), gate * sigmoid(gate * alpha)."""
    bounds = [clamp_bounds(n) for n in nodes if kind(n) == "clamp"]
    limits = {hi for lo, hi in bounds if lo is None} & {hi for lo, hi in bounds if lo is not None and lo == -hi}
    if len(bounds) not in (2, 4) or len(limits) != 1:  # 4: the shared expert clamps too (the cover checks)
        return None
    alphas = [a for n in nodes if kind(n) == "mul" and any(kind(u) == "sigmoid" for u in n.users)
              for a in n.args if isinstance(a, float)]
    return {"act_limit": float(limits.pop()), "act_alpha": alphas[0] if len(set(alphas)) == 1 else 1.0}


def _softcaps(nodes) -> dict | None:
    """Inkling-2's softcapped SwiGLU, A tanh(g / A) * sigmoid(g) * L tanh(u / L): the caps A (of the
    gate, whose tanh input also feeds a sigmoid) and L, read off the tanh nodes' divisions."""
    caps = {}
    for n in nodes:
        if kind(n) != "tanh" or not isinstance(n.args[0], fx.Node) or kind(n.args[0]) not in ("div", "truediv"):
            continue
        value, cap = n.args[0].args[:2]
        if not isinstance(cap, (int, float)) or not isinstance(value, fx.Node):
            return None
        sources = {value} | ({value.args[0]} if kind(value) == "cast" and value.args else set())
        gate = any(kind(u) == "sigmoid" for v in sources for u in v.users)
        caps.setdefault("act_alpha" if gate else "act_limit", set()).add(float(cap))
    if set(caps) != {"act_alpha", "act_limit"} or any(len(v) != 1 for v in caps.values()):
        return None
    return {k: v.pop() for k, v in caps.items()}


def clamp_bounds(node: fx.Node) -> tuple:
    """(min, max) of a clamp node, None where unbounded: clamp(x, lo, hi), clamp(min=, max=)."""
    args = list(node.args[1:]) + [None, None]
    lo = node.kwargs.get("min", args[0])
    hi = node.kwargs.get("max", args[1])
    return (lo if isinstance(lo, (int, float)) else None, hi if isinstance(hi, (int, float)) else None)


def _has_step2(node: fx.Node) -> bool:
    index = node.args[1] if len(node.args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(s, slice) and s.step == 2 for s in items)


def _shared_options(params, H) -> list:
    """Shared MLP weights (gate, up, down [, sigmoid gate]) in the orders their shapes allow."""
    gate_vec = [p for p in params if shape_of(p) == (1, H)]
    mats = [p for p in params if p not in gate_vec]
    if len(gate_vec) > 1 or len(mats) != 3:
        return []
    downs = [p for p in mats if shape_of(p)[0] == H]
    options = []
    for down in downs:
        a, b = [p for p in mats if p is not down]
        ish = shape_of(down)[1]
        for gate, up in ((a, b), (b, a)):
            options.append(({"shared_intermediate": ish, "shared_gate": bool(gate_vec)},
                            [gate, up, down] + gate_vec))
    return options
