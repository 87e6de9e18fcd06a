"""Idioms as data: what a matched layer is called in the report, and what each family's code
suggests about its spec.

Two tables, read top to bottom; the first row whose test fits names the layer:

    ROUTERS    how experts are chosen (the model's own routing code kept as traced, plain top-k,
               top-k of logits, DeepSeek's biased group choice, capacity drops)
    DISPATCH   how tokens reach experts, from the ops of the region (grouped GEMM, batched GEMM over
               gathered weights, every expert on every token, one-hot dispatch einsums)

FAMILY_HINTS maps a model family (the transformers module its MoE block comes from, read off the
graph's module stack) to spec fields its code is known to use; candidate specs that agree with them
are verified first, so the usual layer costs one verification, not one per candidate.

    Matches:     Candidate (its nodes' module stack, its spec options, its ops)
    Rewrites to: idiom "router + dispatch", family name, options in the order to verify
"""

from __future__ import annotations

import re

from ..fx import kind, shape_of
from ..ir import MoESpec

ROUTERS = (
    ("traced-router", lambda s: s.router == "traced"),
    ("capacity", lambda s: s.capacity_factor > 0),
    ("group-limited", lambda s: s.groups > 1),
    ("biased-choice", lambda s: s.correction_bias),
    ("topk-of-logits", lambda s: s.topk_order == "topk_then_score"),
    ("topk", lambda s: True),
)

DISPATCH = (  # tests over (op kinds of the region, whether it indexes 3D weights by expert id)
    ("grouped-gemm", lambda k, gathers: bool(k & {"grouped_mm", "_grouped_mm", "grouped_mm_fallback"})),
    ("one-hot-dispatch", lambda k, gathers: "one_hot" in k and "einsum" in k),
    ("gathered-weights", lambda k, gathers: gathers and bool(k & {"bmm", "einsum", "matmul"})),
    ("dense-all-experts", lambda k, gathers: bool(k & {"einsum", "matmul", "bmm"})),
    ("expert-loop", lambda k, gathers: True),
)

FAMILY_HINTS: dict[str, dict] = {
    "mixtral": {"renormalize": True, "layout": "concat"},
    "qwen2_moe": {"shared_gate": True},
    "qwen3_moe": {"layout": "concat"},
    "olmoe": {"layout": "concat"},
    "deepseek_v2": {"scoring": "softmax"},
    "deepseek_v3": {"scoring": "sigmoid", "weights_from": "gather"},
    "gpt_oss": {"layout": "interleaved", "transposed": True, "expert_bias": True},
}

_FAMILY = re.compile(r"transformers\.models\.([a-z0-9_]+)\.")


def family_of(node) -> str:
    """The transformers model family whose module ran `node` ('' for code of one's own)."""
    for _, cls in reversed(list((node.meta.get("nn_module_stack") or {}).values())):
        match = _FAMILY.search(f"{getattr(cls, '__module__', '')}.")
        if match:
            return match.group(1)
    return ""


def idiom_of(spec: MoESpec, nodes) -> str:
    kinds = {kind(n) for n in nodes}
    gathers = any(kind(n) in ("getitem", "index_select") and n.args and getattr(n.args[0], "op", "") == "placeholder"
                  and len(shape_of(n.args[0]) or ()) == 3 for n in nodes)
    router = next(name for name, fits in ROUTERS if fits(spec))
    dispatch = next(name for name, fits in DISPATCH if fits(kinds, gathers))
    return f"{router} + {dispatch}"


def by_hints(options: list, family: str) -> list:
    """Options that agree with the family's hints first (stable otherwise)."""
    hints = FAMILY_HINTS.get(family, {})
    return sorted(options, key=lambda o: -sum(getattr(o[0], k) == v for k, v in hints.items()))
