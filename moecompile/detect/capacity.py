"""Capacity (Switch / GShard dispatch): read the capacity a layer compares positions against.

    Matches:     position = cumsum(one_hot(ids)) ...;  keep = position < C  (or <=, >, >=; C an int,
                 or a size Dynamo traced)
    Rewrites to: candidate spec fields {capacity_factor, capacity_order, capacity_rounding}

C is what the graph shows at the traced token count T; the factor is C * E / (T * K). Whether
positions count from 0 or 1, and whether pairs queue token by token or first choices first, the
graph does not say plainly, so every reading is a candidate and verification (its few-experts
probes fill experts past C) keeps the one that drops exactly the pairs the layer drops.
"""

from __future__ import annotations

import torch

from ..fx import kind, meta_value

_COMPARE = {"lt", "le", "gt", "ge"}


def _as_int(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, torch.SymInt):
        hint = getattr(value.node, "hint", None)
        return int(hint) if hint is not None else None
    return None


def capacity_options(nodes, tokens: int | None, top_k: int, num_experts: int) -> list[dict]:
    """Spec fields for each capacity reading; [{}] when the layer has no capacity."""
    if not tokens or not any(kind(n) == "cumsum" for n in nodes):
        return [{}]
    seen = set()
    for n in nodes:
        if kind(n) not in _COMPARE:
            continue
        for a in n.args:
            c = _as_int(meta_value(a) if hasattr(a, "meta") else a)
            if c is not None and c > 0:
                seen.add(c)
    out = []
    for c in sorted(seen):
        for cap in (c, c + 1, c - 1):  # 0-based <, 1-based <= (or 0-based <=), 1-based <
            if cap < 1:
                continue
            factor = cap * num_experts / (tokens * top_k)
            for order in ("token_major", "k_major"):
                for rounding in ("floor", "ceil"):
                    out.append({"capacity_factor": factor, "capacity_order": order, "capacity_rounding": rounding})
    return out + [{}]
