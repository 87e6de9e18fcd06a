"""tests/tiers.py and the --sample option: what the default tier keeps of a product covers it."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest

from tiers import cover

AXES = dict(name=["a", "b", "c", "d", "e"], T=[0, 1, 37], dtype=["fp32", "bf16"])


def _kept(params):
    return [p.values for p in params if not p.marks]


def test_cover_keeps_every_value_and_every_named_pair_and_marks_the_rest_slow():
    params = cover(**AXES, pairs=[("T", "dtype")])
    assert len(params) == 5 * 3 * 2 and len({p.id for p in params}) == len(params)
    kept = _kept(params)
    for i, axis in enumerate(AXES.values()):
        assert {k[i] for k in kept} == set(axis)
    assert {(k[1], k[2]) for k in kept} == set(itertools.product(AXES["T"], AXES["dtype"]))
    assert len(kept) <= 6  # the 6 (T, dtype) pairs already hold every name
    slow = [p for p in params if p.marks]
    assert all(m.name == "slow" and m.kwargs["reason"] for p in slow for m in p.marks)
    assert cover(**AXES, pairs=[("T", "dtype")]) == params  # the same cases on every run


def test_salt_picks_other_cases_and_keep_forces_one():
    plain, salted = _kept(cover(**AXES)), _kept(cover(**AXES, salt="train"))
    assert plain != salted
    assert ("e", 37, "bf16") in _kept(cover(**AXES, keep=["e-37-bf16"]))
    with pytest.raises(ValueError, match="keep names ids not in the product"):
        cover(**AXES, keep=["z-0-fp32"])
    with pytest.raises(ValueError, match="names an axis"):
        cover(**AXES, pairs=[("T", "layout")])


def _items():
    """Stand-ins for pytest items: a function over 10 names x 3 implementations, and one plain test."""
    module = SimpleNamespace(__name__="test_s")
    items = [SimpleNamespace(nodeid=f"test_s.py::test_p[{n}-{i}]", originalname="test_p", module=module,
                             callspec=SimpleNamespace(params={"name": n, "impl": i}))
             for n in range(10) for i in "xyz"]
    return items + [SimpleNamespace(nodeid="test_s.py::test_plain", originalname="test_plain", module=module)]


def test_sample_keeps_every_parameter_value_and_rotates_the_rest():
    from conftest import _sample
    kept = {seed: _sample(_items(), 0.0, seed) for seed in ("one", "two")}
    for ids in kept.values():
        params = [i.split("[")[1].rstrip("]").split("-") for i in ids if "[" in i]
        assert {n for n, _ in params} == {str(n) for n in range(10)} and {i for _, i in params} == set("xyz")
        assert "test_s.py::test_plain" in ids and len(ids) < 31
    assert kept["one"] != kept["two"]
    assert len(_sample(_items(), 1.0, "one")) == 31
    assert 10 < len(_sample(_items(), 0.5, "one")) < 31
