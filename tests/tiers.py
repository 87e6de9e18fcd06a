"""Which cases of a cross product the default run keeps, and which wait for the slow tier.

A test over every spec x every T x both dtypes (or every model x experts implementation x dtype)
catches a bug in one value of one axis as well as the whole product does, as long as each value
appears somewhere: the default run keeps a covering subset (every value of every axis at least once,
and every pair of values of the axis pairs named in `pairs`), the rest is marked slow with the reason.
`scripts/test.sh -m slow` runs the rest; CI runs both tiers.

    @pytest.mark.parametrize("name,T,dtype", cover(name=list(SPECS), T=[0, 1, 37], dtype=DTYPES,
                                                   pairs=[("T", "dtype")]))

The choice is greedy and deterministic (the same cases on every machine): at each step the case
that covers the most values and pairs not yet covered, ties broken by a hash of the case's id and
`salt`, so two tests over the same axes can keep different cases (`salt="train"`).
"""

from __future__ import annotations

import itertools
import zlib
from typing import Any, Sequence

import pytest


def slow(reason: str) -> pytest.MarkDecorator:
    """The slow tier's marker; the reason is one line, shown by `pytest --markers` users and checked
    present by conftest."""
    return pytest.mark.slow(reason=reason)


def _id(value: Any) -> str:
    if hasattr(value, "is_floating_point"):  # a torch dtype
        return {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16",
                "torch.float64": "fp64"}.get(str(value), str(value))
    return str(value)


def cover(*, pairs: Sequence[tuple[str, str]] = (), keep: Sequence[str] = (), salt: str = "",
          reason: str = "", **axes: Sequence[Any]) -> list:
    """-> pytest.param per case of the product of `axes` (in their order), ids joined by "-"; the
    cases outside the covering subset carry the slow marker. `keep`: ids the default run keeps
    whatever the cover needs (a case that is its own edge)."""
    names = list(axes)
    for a, b in pairs:
        if a not in axes or b not in axes:
            raise ValueError(f"cover: pair ({a}, {b}) names an axis not among {names}")
    cases = list(itertools.product(*(range(len(axes[n])) for n in names)))

    def units(case) -> set:
        got = {(n, i) for n, i in zip(names, case)}
        got |= {(a, b, case[names.index(a)], case[names.index(b)]) for a, b in pairs}
        return got

    need = set().union(*(units(c) for c in cases)) if cases else set()
    ids = {c: "-".join(_id(axes[n][i]) for n, i in zip(names, c)) for c in cases}
    kept = [c for c in cases if ids[c] in keep]
    if len(kept) != len(set(keep)):
        raise ValueError(f"cover: keep names ids not in the product: {sorted(set(keep) - set(ids.values()))}")
    for c in kept:
        need -= units(c)
    while need:
        best = max(cases, key=lambda c: (len(units(c) & need), -zlib.crc32(f"{salt}{ids[c]}".encode())))
        kept.append(best)
        need -= units(best)
    why = reason or f"the rest of the {' x '.join(names)} product; the default run keeps a covering subset"
    return [pytest.param(*(axes[n][i] for n, i in zip(names, c)), id=ids[c],
                         marks=() if c in kept else slow(why)) for c in cases]
