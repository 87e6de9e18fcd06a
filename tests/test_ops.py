"""The moecompile::moe op: fast torch path vs the eager reference, forward and backward.

Shapes are chosen for edges: T=1, odd H and I tails, K == E, an expert with no tokens, all tokens
to one expert; fresh random inputs every case, never zeros.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from conftest import assert_close
from moecompile.codegen import moe_torch
from moecompile.codegen import ops  # noqa: F401
from moecompile.ir import MoESpec, build

from helpers_moe import SPECS


def _weights(spec: MoESpec, dtype, gen) -> list[torch.Tensor]:
    return [(torch.randn(shape, generator=gen) / shape[-1] ** 0.5).to(dtype)
            for shape in spec.weight_shapes().values()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T", [1, 7, 64])
@pytest.mark.parametrize("name", list(SPECS))
def test_fast_path_matches_reference(name, T, dtype):
    spec = SPECS[name]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}{T}".encode()))
    x = torch.randn(T, spec.hidden, generator=gen).to(dtype)
    weights = _weights(spec, dtype, gen)
    want = moe_torch.moe_forward_reference(x, weights, spec)
    assert_close(moe_torch.moe_forward(x, weights, spec), want, dtype, what=name)
    # the op's forward reuses its buffers (inplace path): same numbers
    assert_close(torch.ops.moecompile.moe(x, weights, build(spec).text(), "torch", "l"), want, dtype, what=f"{name} op")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(SPECS))
def test_op_gradients_match_reference(name, dtype):
    spec = SPECS[name]
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(9, spec.hidden, generator=gen).to(dtype)
    weights = _weights(spec, dtype, gen)
    grad_out = torch.randn(9, spec.hidden, generator=gen).to(dtype)

    def grads(fn):
        xs = x.clone().requires_grad_()
        ws = [w.clone().requires_grad_() for w in weights]
        fn(xs, ws).backward(grad_out)
        return [xs.grad] + [w.grad for w in ws]

    got = grads(lambda xs, ws: torch.ops.moecompile.moe(xs, ws, build(spec).text(), "torch", "layer"))
    want = grads(lambda xs, ws: moe_torch.moe_forward_reference(xs, ws, spec))
    for wname, g, w in zip(("x",) + spec.weight_names(), got, want):
        assert g is not None and torch.isfinite(g).all(), wname
        if w is None:  # the correction bias only steers the discrete choice: its gradient is zero
            assert wname == "router_correction_bias" and not g.any(), (wname, g)
            continue
        assert_close(g, w, dtype, kind="grad", what=f"{name} d{wname}")


def _routing_weights(spec, dtype, gen, hot_expert=None):
    weights = _weights(spec, dtype, gen)
    if hot_expert is not None:
        # a large router bias toward one expert through its weight row: every token picks it first
        weights[0] = weights[0].clone()
        weights[0][hot_expert] += 50.0
    return weights


def test_all_tokens_to_one_expert_and_idle_experts():
    spec = MoESpec(8, 1, 16, 8)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(12, 16, generator=gen).abs() + 0.5  # positive rows: x @ (row + 50) is large
    weights = _routing_weights(spec, torch.float32, gen, hot_expert=5)
    topk_w, ids = moe_torch.route(x, moe_torch.named_weights(weights, spec), spec)
    assert (ids == 5).all()  # the case under test really happens
    assert_close(moe_torch.moe_forward(x, weights, spec), moe_torch.moe_forward_reference(x, weights, spec),
                 torch.float32, what="one hot expert")


@pytest.mark.parametrize("name", ["mixtral", "shared_gated", "wide_split", "separate_gate_up"])
def test_op_outputs_survive_later_calls(name):
    """The op's forward keeps CPU scratch buffers between calls (moe_torch._Scratch): an output it
    returned must not change when later calls, at other token counts, reuse them."""
    spec = SPECS[name]
    gen = torch.Generator().manual_seed(17)
    weights = _weights(spec, torch.float32, gen)
    kept = []
    for T in (64, 200, 3, 64):  # grow, shrink, then the small grouped path, then back
        x = torch.randn(T, spec.hidden, generator=gen)
        x_before = x.clone()
        out = torch.ops.moecompile.moe(x, weights, build(spec).text(), "torch", "l")
        assert torch.equal(x, x_before)
        kept.append((out, moe_torch.moe_forward_reference(x, weights, spec)))
    for out, want in kept:
        assert_close(out, want, torch.float32, what=name)


def test_op_across_inference_mode_and_autograd():
    """Scratch buffers first made under inference_mode must stay writable outside it (an inference
    tensor refuses in-place writes there), and the other way round."""
    spec = SPECS["shared_gated"]
    gen = torch.Generator().manual_seed(23)
    weights = _weights(spec, torch.float32, gen)
    x = torch.randn(64, spec.hidden, generator=gen)
    want = moe_torch.moe_forward_reference(x, weights, spec)
    moe_torch.release_scratch()
    with torch.inference_mode():
        assert_close(torch.ops.moecompile.moe(x, weights, build(spec).text(), "torch", "l"), want, torch.float32)
    with torch.no_grad():
        assert_close(torch.ops.moecompile.moe(x, weights, build(spec).text(), "torch", "l"), want, torch.float32)
    xr = x.clone().requires_grad_()
    torch.ops.moecompile.moe(xr, weights, build(spec).text(), "torch", "l").sum().backward()
    assert xr.grad is not None and torch.isfinite(xr.grad).all()
    with torch.inference_mode():
        assert_close(torch.ops.moecompile.moe(x, weights, build(spec).text(), "torch", "l"), want, torch.float32)


def test_op_past_the_scratch_cap(monkeypatch):
    """Buffers over SCRATCH_MAX_BYTES are allocated per call; the numbers stay the same."""
    spec = SPECS["shared_gated"]
    gen = torch.Generator().manual_seed(19)
    weights = _weights(spec, torch.float32, gen)
    x = torch.randn(96, spec.hidden, generator=gen)
    monkeypatch.setattr(moe_torch, "SCRATCH_MAX_BYTES", 64)
    moe_torch.release_scratch()
    assert_close(torch.ops.moecompile.moe(x, weights, build(spec).text(), "torch", "l"),
                 moe_torch.moe_forward_reference(x, weights, spec), torch.float32)
    assert not moe_torch._scratch.buffers  # nothing was kept


def test_reference_matches_dense_formula():
    """The reference itself against a direct dense computation of the MoE formula."""
    spec = MoESpec(4, 2, 8, 6, renormalize=True)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(5, 8, generator=gen)
    wr, w1, w2 = _weights(spec, torch.float32, gen)
    probs = torch.softmax(x @ wr.T, dim=-1)
    vals, ids = probs.topk(2, dim=-1)
    vals = vals / vals.sum(-1, keepdim=True)
    want = torch.zeros(5, 8)
    for t in range(5):
        for k in range(2):
            e = ids[t, k]
            g, u = (w1[e] @ x[t]).chunk(2)
            want[t] += vals[t, k] * (w2[e] @ (torch.nn.functional.silu(g) * u))
    assert_close(moe_torch.moe_forward_reference(x, [wr, w1, w2], spec), want, torch.float32)


def test_op_under_compile_with_dynamic_tokens():
    spec = MoESpec(4, 2, 16, 8)
    gen = torch.Generator().manual_seed(5)
    weights = _weights(spec, torch.float32, gen)
    program = build(spec).text()  # the graph carries the text, as lower writes it

    def f(x):
        return torch.ops.moecompile.moe(x, weights, program, "torch", "l") * 2

    compiled = torch.compile(f, backend="aot_eager", dynamic=True)
    for T in (3, 17):
        x = torch.randn(T, 16, generator=gen)
        assert_close(compiled(x), 2 * moe_torch.moe_forward_reference(x, weights, spec), torch.float32)


def test_op_rejects_wrong_shapes_with_clear_message():
    spec = MoESpec(4, 2, 16, 8)
    weights = _weights(spec, torch.float32, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"x must be \(T, 16\)"):
        torch.ops.moecompile.moe(torch.randn(3, 15), weights, build(spec).text(), "torch", "l")
    with pytest.raises(ValueError, match="takes 3 weights"):
        torch.ops.moecompile.moe(torch.randn(3, 16), weights[:2], build(spec).text(), "torch", "l")


@pytest.mark.parametrize("name", ["mixtral", "sigmoid_interleaved_transposed", "shared_gated"])
def test_opcheck_fake_and_autograd_registration(name):
    """torch.library.opcheck: fake shapes and strides, schema, autograd registration agree with
    the real op (the strides matter: Inductor asserts them)."""
    spec = SPECS[name]
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(6, spec.hidden, generator=gen)
    weights = _weights(spec, torch.float32, gen)
    args = (x, weights, build(spec).text(), "torch", "l")
    torch.library.opcheck(torch.ops.moecompile.moe.default, args)
    # NOTE: with grads, the schema check would wrap the torch.func.vjp inside moe_backward, whose
    # functorch wrappers have no storage to inspect; the other checks run the backward for real.
    grad_args = (x.clone().requires_grad_(), [w.clone().requires_grad_() for w in weights]) + args[2:]
    torch.library.opcheck(torch.ops.moecompile.moe.default, grad_args,
                          test_utils=("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"))
    # The backward op: its fake outputs have the real outputs' shapes and strides.
    g = torch.randn(6, spec.hidden, generator=gen)
    real = torch.ops.moecompile.moe_backward(g, x, weights, build(spec).text(), "torch", [])
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = torch.ops.moecompile.moe_backward(mode.from_tensor(g), mode.from_tensor(x),
                                                 [mode.from_tensor(w) for w in weights], build(spec).text(), "torch",
                                                 [])
    assert [(t.shape, t.stride(), t.dtype) for t in real] == [(t.shape, t.stride(), t.dtype) for t in fake]
