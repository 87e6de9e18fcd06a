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
    # CI machines have 2 cores; more threads than cores only adds noise. Under pytest-xdist each
    # worker takes one core: most of the time here is Dynamo tracing and Python, single-threaded.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
    else:
        torch.set_num_threads(min(2, os.cpu_count() or 1))


# -- tiers ----------------------------------------------------------------------------------------
# The default run is the fast tier (at most 10 minutes on 2 cores); `-m slow` is the rest. Every slow
# case says why in one line (tiers.slow(reason)), and a default-run test over SLOW_AFTER seconds is a
# defect, listed at the end of the run.
SLOW_AFTER = 20.0


def pytest_addoption(parser):
    parser.addoption("--sample", type=float, default=None, metavar="FRACTION",
                     help="run a sample of the selected tests: every value of every parameter of each test "
                          "function at least once (every family, model, spec, experts implementation, dtype), "
                          "plus FRACTION of the other cases; CI uses it for the slow tier")
    parser.addoption("--sample-seed", default="", metavar="SEED",
                     help="which sample (CI passes the commit hash, so the rest rotates across commits)")


def pytest_collection_modifyitems(config, items):
    unexplained = [item.nodeid for item in items
                   if any(not m.kwargs.get("reason") for m in item.iter_markers("slow"))]
    if unexplained:
        raise pytest.UsageError(f"slow marker without a reason (use tiers.slow(reason)): {unexplained[0]}"
                                + (f" and {len(unexplained) - 1} more" if len(unexplained) > 1 else ""))
    fraction = config.getoption("sample")
    if fraction is not None:
        if not 0.0 <= fraction <= 1.0:
            raise pytest.UsageError(f"--sample takes a fraction in [0, 1], got {fraction}")
        kept = set(_sample(items, fraction, config.getoption("sample_seed")))
        config.hook.pytest_deselected(items=[item for item in items if item.nodeid not in kept])
        items[:] = [item for item in items if item.nodeid in kept]


def _sample(items, fraction: float, seed: str) -> list[str]:
    """The node ids of a sample of `items` that keeps, per test function, every value of each of
    its parameters at least once; visiting cases in an order set by the seed, a case is kept if it
    brings a value not yet covered or if its hash falls within the fraction."""
    import zlib

    def rank(nodeid: str) -> int:
        return zlib.crc32(f"{seed}:{nodeid}".encode())

    covered: set = set()
    kept = []
    for item in sorted(items, key=lambda it: rank(it.nodeid)):
        params = getattr(getattr(item, "callspec", None), "params", {})
        units = {(item.module.__name__, item.originalname, name, str(value)) for name, value in params.items()}
        if not params:
            units = {(item.nodeid,)}  # a test without parameters is always kept
        if units - covered or rank(item.nodeid) % 10_000 < fraction * 10_000:
            kept.append(item.nodeid)
            covered |= units
    return kept


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if "slow" in (config.getoption("markexpr") or "").replace("not slow", ""):
        return  # the slow tier has no time limit per test
    over = sorted(((r.duration, r.nodeid) for r in terminalreporter.stats.get("passed", []) +
                   terminalreporter.stats.get("failed", []) if r.when == "call" and r.duration > SLOW_AFTER),
                  reverse=True)
    if over:
        terminalreporter.section(f"default-run tests over {SLOW_AFTER:.0f} s (move them to the slow tier or make them faster)")
        for duration, nodeid in over:
            terminalreporter.write_line(f"{duration:6.1f} s  {nodeid}")
