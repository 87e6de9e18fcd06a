"""Hand-written MoE idioms from popular code (tests/helpers_idioms.py): each is found, optimized,
and matches eager forward and backward on inputs verification never saw; capacity layers drop
exactly the (token, expert) pairs the original drops.
"""

from __future__ import annotations

import pytest
import torch

import moecompile
from conftest import assert_close, assert_grads_close
from helpers_idioms import IDIOMS, CapacityDispatch

IDIOM = {"gathered_einsum": "topk + gathered-weights", "sorted_grouped_mm": "topk + grouped-gemm",
         "dense_masked": "topk + dense-all-experts", "capacity_dispatch": "capacity + one-hot-dispatch",
         "switch_top1": "capacity + one-hot-dispatch", "gshard_top2_tight": "capacity + one-hot-dispatch"}
CASES = {**{name: (cls, {}) for name, cls in IDIOMS.items()},
         "switch_top1": (CapacityDispatch, {"K": 1, "capacity_factor": 1.0}),
         "gshard_top2_tight": (CapacityDispatch, {"K": 2, "capacity_factor": 0.5, "renormalize": False})}
# grouped_mm runs in bf16 only (its CPU kernel and its fake implementation ask for it)
DTYPE = {"sorted_grouped_mm": torch.bfloat16}


def _inputs(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 12, 16, generator=gen) * 4
    same = torch.randn(1, 1, 16, generator=gen).expand(2, 12, 16).contiguous()  # every token alike
    return [t.to(dtype) for t in (x, same)]


@pytest.mark.parametrize("name", list(CASES))
def test_idiom_is_optimized_and_matches_eager(name):
    cls, kwargs = CASES[name]
    dtype = DTYPE.get(name, torch.float32)
    torch.manual_seed(0)
    model = cls(**kwargs).to(dtype)
    moecompile.report.reset()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="moe", options={"inner": "aot_eager"})
    for x in _inputs(dtype, 1):
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        got, want = compiled(xc), model(xe)
        assert_close(got, want, dtype, what=f"{name} forward")
        grads = [torch.autograd.grad(out.float().square().sum(), [inp, *model.parameters()])
                 for out, inp in ((got, xc), (want, xe))]
        assert_grads_close(*grads, ["x"] + [n for n, _ in model.named_parameters()], dtype, what=name)
    rows = moecompile.last_report().regions
    assert rows and all(r["status"] == "optimized" for r in rows), rows
    assert rows[0]["idiom"] == IDIOM[name] and rows[0]["family"] == ""
    if cls is CapacityDispatch:  # GShard queues every token's first choice before second choices
        assert rows[0]["spec"]["capacity"] is not None
        assert rows[0]["spec_full"]["capacity_order"] == ("k_major" if model.K > 1 else "token_major")


def test_capacity_drops_are_real_on_concentrated_inputs():
    """The check above is not vacuous: on tokens that all pick the same experts the capacity drops
    pairs, and a layer without capacity gives another answer."""
    model = CapacityDispatch(K=2, capacity_factor=1.0)
    free = CapacityDispatch(K=2, capacity_factor=100.0)
    free.load_state_dict(model.state_dict())
    _, same = _inputs(torch.float32, 1)
    with torch.no_grad():
        assert not torch.allclose(model(same), free(same))
