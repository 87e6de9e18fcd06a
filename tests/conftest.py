"""Shared test helpers: tolerances, model builders, a dynamo reset between tests."""

from __future__ import annotations

import os

import pytest
import torch

# The Triton kernels run on CPU in the interpreter; torch (inductor) may import triton before any
# kernel test module does, and triton reads TRITON_INTERPRET when it first loads, so set it here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tolerance per dtype for compiled-vs-eager comparisons: (rtol, atol relative to the max |eager|).
# fp32: the sorted grouped GEMMs add in another order than the traced code; ~1e-6 relative in
#       practice, the bar is rtol 1e-4.
# bf16: 8 mantissa bits -> one rounding is 2^-8 = 0.4%; a few roundings in a different order over two
#       layers stay within 2%; gradients go through twice as many roundings, so 5%.
TOLERANCE = {
    torch.float32: {"out": (1e-4, 1e-5), "grad": (1e-4, 1e-5)},
    torch.bfloat16: {"out": (2e-2, 2e-2), "grad": (5e-2, 5e-2)},
    # fp64: the same reordering argument as fp32, 2^-52 instead of 2^-23 per rounding.
    torch.float64: {"out": (1e-10, 1e-12), "grad": (1e-10, 1e-12)},
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, kind: str = "out",
                 what: str = "") -> None:
    rtol, atol_rel = TOLERANCE[dtype][kind]
    expected = expected.float()
    atol = atol_rel * max(expected.abs().max().item() if expected.numel() else 0.0, 1e-6)
    torch.testing.assert_close(actual.float(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_grads_close(got: list, want: list, names: list, dtype: torch.dtype, what: str = "") -> None:
    """Gradients of one loss, compiled vs eager. A gradient that is zero in exact arithmetic (the
    router's when K = 1 and weights are renormalized: w = p / p) is rounding noise on both sides, of
    the size of 64 ulps of the largest gradient; it is compared on that scale, not its own."""
    scale = max((float(w.abs().max()) for w in want if w is not None), default=0.0)
    noise = 64 * torch.finfo(dtype).eps * scale
    for g, w, name in zip(got, want, names):
        assert (g is None) == (w is None), name
        if w is None:
            continue
        if float(w.abs().max()) <= noise:
            assert float(g.abs().max()) <= noise, (what, name, float(g.abs().max()), noise)
        else:
            assert_close(g, w, dtype, kind="grad", what=f"{what} d{name}")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    import moecompile.report

    torch._dynamo.reset()
    moecompile.report.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="session", autouse=True)
def _threads():
    # CI machines have 2 cores; more threads than cores only adds noise.
    torch.set_num_threads(min(2, os.cpu_count() or 1))
