"""The backward kernels (down_backward, dx_rows, weight_grad) against their torch references, and the
whole Triton backward (codegen.train.triton_backward) against autograd of moe_forward_reference.
On CPU they run under the Triton interpreter.

Tolerance per dtype, as (rtol, atol relative to the max |expected|):
  kernel vs its reference: both accumulate in fp32 and round once (as the forward's kernel tests).
    fp32 -> 1e-5; bf16: one final rounding, 1 ulp = 0.4% either side of a boundary   -> 1e-2
  whole backward vs autograd of the reference loop: conftest's "grad" tolerance (fp32 1e-4, bf16 5%:
  the reference rounds every GEMM output and activation to bf16, the kernels keep fp32 inside).
"""

from __future__ import annotations

import dataclasses
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest import assert_grads_close  # noqa: E402
from helpers_moe import GATE_UP_CASES, SPECS  # noqa: E402
from tiers import cover, slow  # noqa: E402
from moecompile import models, report  # noqa: E402
from moecompile.codegen import moe_torch, train  # noqa: E402
from moecompile.codegen.triton import backward as bwd  # noqa: E402
from test_triton_grouped_gemm import (DEVICE, KERNEL_TOL, TILE_M, _align, _close, _gate_up_args,  # noqa: E402
                                      _routing, _spec, _weights)

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
CFG = {"BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}


def _empty_expert_routing(T, E, K, empty, seed=0):
    """_routing over E experts with expert `empty` never picked: (T, K) fp32 weights, int32 ids."""
    topk_w, ids = _routing(T, E - 1, K, seed)
    return topk_w, torch.where(ids >= empty, ids + 1, ids)


def _kernel_inputs(spec, dtype, T, ids_fn=None):
    E, K = spec.num_experts, spec.top_k
    w = _weights(spec, dtype)
    topk_w, ids = (ids_fn or _routing)(T, E, K)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(T, spec.hidden, generator=g).to(dtype).to(DEVICE)
    dout = torch.randn(T, spec.hidden, generator=g).to(dtype).to(DEVICE)
    return x, dout, w, topk_w, ids


def _live_rows(sorted_pairs):
    return sorted_pairs >= 0


def _padding_rows(sorted_pairs, tile_expert):
    """Rows of an expert's tiles that hold no pair (the kernels write 0 there); the rows of tiles
    no expert owns are never written."""
    return (sorted_pairs < 0) & (tile_expert >= 0).repeat_interleave(TILE_M)


@DTYPES
@pytest.mark.parametrize("act,gated,layout,transposed,bias", GATE_UP_CASES,
                         ids=["-".join(map(str, c)) for c in GATE_UP_CASES])
def test_down_backward_and_dx_rows_match_their_references(act, gated, layout, transposed, bias, dtype):
    """H = 33 and I = 20 leave tails in every 16-wide block; expert 2 of 5 gets no token."""
    spec = _spec(5, 2, 33, 20, dtype, activation=act, gated=gated, layout=layout, transposed=transposed,
                 expert_bias=bias)
    x, dout, w, topk_w, ids = _kernel_inputs(spec, dtype, 13, lambda T, E, K: _empty_expert_routing(T, E, K, 2))
    rows, tiles, _ = _align(ids, spec.num_experts)
    w1, b1, kw = _gate_up_args(w, spec)
    args = (dout, x, rows, tiles, w1, b1, w["down_proj"], w.get("down_proj_bias"), topk_w)
    got = bwd.down_backward(*args, **kw, config=CFG)
    want = bwd.down_backward_reference(*args, **kw)
    live, padding = _live_rows(rows), _padding_rows(rows, tiles)
    assert padding.any()
    for name, g, r in zip(("dh", "a", "dw_rows"), got, want):
        _close(g[live], r[live], KERNEL_TOL[dtype], f"{act} {layout} {name}")
        assert not g[padding].any(), f"{name}: padding rows must be 0"
    dh = got[0]
    kw_dx = dict(hidden=spec.hidden, tile_m=TILE_M, gated=gated, layout=layout, transposed=transposed,
                 activation=act, w_up=kw.get("w_up"))
    dx = bwd.dx_rows(dh, rows, tiles, w1, **kw_dx, config=CFG)
    _close(dx[live], bwd.dx_rows_reference(dh, rows, tiles, w1, **kw_dx)[live], KERNEL_TOL[dtype], "dx_rows")
    assert not dx[padding].any()
    assert dx.dtype == torch.float32


def test_down_backward_reads_saved_pre_activations():
    """pre (P, 2I), the forward's [hg | hu], gives what recomputing GEMM 1 gives."""
    spec = _spec(4, 2, 24, 20, torch.float32)
    x, dout, w, topk_w, ids = _kernel_inputs(spec, torch.float32, 9)
    rows, tiles, _ = _align(ids, spec.num_experts)
    w1, b1, kw = _gate_up_args(w, spec)
    args = (dout, x, rows, tiles, w1, b1, w["down_proj"], None, topk_w)
    live = _live_rows(rows)
    pairs = rows.clamp(min=0).long()
    e_of_row = tiles.long().repeat_interleave(TILE_M).clamp(min=0)
    pre = torch.einsum("ph,pnh->pn", x[pairs // spec.top_k], w1[e_of_row]) * live[:, None]
    recomputed = bwd.down_backward(*args, **kw, config=CFG)
    read = bwd.down_backward(*args, **kw, pre=pre.contiguous(), config=CFG)
    for g, r in zip(read, recomputed):
        _close(g[live], r[live], KERNEL_TOL[torch.float32], "pre")
    # and it is read, not recomputed: other pre-activations give another a
    other = bwd.down_backward(*args, **kw, pre=(pre * 0.5).contiguous(), config=CFG)
    assert not torch.allclose(other[1][live], recomputed[1][live])


@DTYPES
@pytest.mark.parametrize("scaled,gather", [(False, "b"), (True, "a")], ids=["dW1", "dW2"])
def test_weight_grad_matches_its_reference_with_exact_zeros_for_empty_experts(scaled, gather, dtype):
    """Both uses: dW1 = dh.T @ x[tok] (B gathered) and dW2 = (w * dout[tok]).T @ a (A gathered,
    scaled by the top-k weight), written through a transposed view with a bias; experts 0 and 3 of
    6 get no token and must come out exactly 0, whatever the buffer held."""
    E, K, N, Kd, T = 6, 2, 20, 33, 11
    topk_w, ids = _routing(T, E - 2, K)
    ids = ids + 1  # experts 1..4
    ids = torch.where(ids >= 3, ids + 1, ids)  # 1, 2, 4, 5: 0 and 3 empty
    rows, tiles, _ = _align(ids, E)
    counts = torch.bincount(ids.reshape(-1).long(), minlength=E)
    start, count = bwd.expert_tiles(counts.to(DEVICE), TILE_M)
    g = torch.Generator().manual_seed(3)
    P = rows.shape[0]
    if gather == "b":
        a = torch.randn(P, N, generator=g).to(dtype)
        b = torch.randn(T, Kd, generator=g).to(dtype)
    else:
        a = torch.randn(T, N, generator=g).to(dtype)
        b = torch.randn(P, Kd, generator=g).to(dtype)
    a, b = a.to(DEVICE), b.to(DEVICE)
    flags = dict(a_gather=gather == "a", b_gather=gather == "b", top_k=K, tile_m=TILE_M)
    scale = topk_w if scaled else None
    got = torch.full((E, Kd, N), float("nan"), dtype=dtype, device=DEVICE).transpose(1, 2)  # (E, N, Kd) view
    got_b = torch.full((E, N), float("nan"), dtype=dtype, device=DEVICE)
    bwd.weight_grad(a, b, rows, start, count, got, got_b, scale, **flags, config=CFG)
    want, want_b = torch.zeros(E, N, Kd, dtype=dtype), torch.zeros(E, N, dtype=dtype)
    bwd.weight_grad_reference(a, b, rows, start, count, want, want_b, scale, **flags)
    for e in (0, 3):
        assert torch.equal(got[e], torch.zeros_like(got[e])) and torch.equal(got_b[e], torch.zeros_like(got_b[e]))
    _close(got, want, KERNEL_TOL[dtype], "dW")
    _close(got_b, want_b, KERNEL_TOL[dtype], "db")


def test_launchers_reject_bad_inputs():
    spec = _spec(4, 2, 24, 20, torch.float32)
    x, dout, w, topk_w, ids = _kernel_inputs(spec, torch.float32, 5)
    rows, tiles, _ = _align(ids, spec.num_experts)
    w1, b1, kw = _gate_up_args(w, spec)
    with pytest.raises(ValueError, match="not supported"):
        bwd.down_backward(dout.int(), x.int(), rows, tiles, w1, b1, w["down_proj"], None, topk_w, **kw)
    with pytest.raises(ValueError, match="power of two"):
        bwd.down_backward(dout, x, rows, tiles, w1, b1, w["down_proj"], None, topk_w, **kw,
                          config=dict(CFG, BLOCK_N=24))
    with pytest.raises(ValueError, match="dh"):
        bwd.dx_rows(torch.zeros(rows.shape[0], 7), rows, tiles, w1, hidden=24, tile_m=TILE_M, gated=True,
                    layout="concat", transposed=False, activation="silu")
    with pytest.raises(ValueError, match="kind"):
        bwd.default_config("gate_up", 4, 16, 16, torch.float32)


# -- the whole backward ---------------------------------------------------------------------------


def _inputs(spec, T, dtype, seed):
    gen = torch.Generator().manual_seed(zlib.crc32(seed.encode()))
    x = torch.randn(T, spec.hidden, generator=gen).to(dtype)
    ws = [(torch.randn(s, generator=gen) / s[-1] ** 0.5).to(dtype) for s in spec.weight_shapes().values()]
    grad = torch.randn(T, spec.hidden, generator=gen).to(dtype)
    return x, ws, grad


def _autograd_of_reference(x, ws, grad, spec):
    leaves = [t.detach().requires_grad_() for t in [x] + ws]
    out = moe_torch.moe_forward_reference(leaves[0], leaves[1:], spec)
    return list(torch.autograd.grad(out, leaves, grad, allow_unused=True))


def _in(spec, dtype):
    return dataclasses.replace(spec, dtype=str(dtype).removeprefix("torch."))


@pytest.mark.parametrize("name,T,dtype", cover(name=list(SPECS), T=[1, 37], dtype=[torch.float32, torch.bfloat16],
                                               pairs=[("T", "dtype")]))
def test_triton_backward_matches_autograd_of_the_reference(name, T, dtype):
    """bf16: GPT-OSS's clamp limit is the model's 7.0 rather than the spec's 0.5. The clamp's
    derivative jumps from 1 to 0 at the limit, and for a pre-activation within a bf16 ulp of it the
    reference (which rounds GEMM 1's output to bf16 before clamping) and the kernels (fp32
    accumulators) take different sides; at 0.5 a few elements of 8192 do. fp32 exercises the clamps."""
    spec = _in(SPECS[name], dtype)
    if dtype == torch.bfloat16 and spec.activation in ("clamped_swiglu", "clamped_silu"):
        spec = dataclasses.replace(spec, act_limit=7.0)
    x, ws, grad = _inputs(spec, T, dtype, f"bw{name}{T}")
    got = train.triton_backward(grad, x, ws, spec)
    want = _autograd_of_reference(x, ws, grad, spec)
    want = [w if w is not None else torch.zeros_like(t) for w, t in zip(want, [x] + ws)]
    assert [g.shape for g in got] == [t.shape for t in [x] + ws]
    assert all(g.dtype == t.dtype for g, t in zip(got, [x] + ws))
    assert_grads_close(got, want, ["x"] + list(spec.weight_names()), dtype, what=name)


@pytest.mark.parametrize("name", ["mixtral", "shared_gated", "gpt_oss", "deepseek_v3"])
def test_no_tokens_give_zero_gradients(name):
    spec = _in(SPECS[name], torch.float32)
    x, ws, grad = _inputs(spec, 0, torch.float32, "none")
    got = train.triton_backward(grad, x, ws, spec)
    assert [g.shape for g in got] == [t.shape for t in [x] + ws]
    assert all(torch.equal(g, torch.zeros_like(g)) for g in got)


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_all_tokens_to_one_expert_and_zero_grads_for_the_others(name):
    """A router that sends every token to experts 0..K-1 (expert 0 alone where K = 1): the experts no
    token reaches get exactly zero weight gradients, and the rest matches autograd."""
    spec = _in(SPECS[name], torch.float32)
    T, E, K = 21, spec.num_experts, spec.top_k
    x, ws, grad = _inputs(spec, T, torch.float32, f"one{name}")
    named = moe_torch.named_weights(ws, spec)
    r = named["router_weight"]  # (E, H): experts 0..K-1 point along x's mean
    direction = x.mean(0) / x.mean(0).norm()
    x = x * 0.05 + direction * 4
    with torch.no_grad():
        r.mul_(0.01)
        if "router_correction_bias" in named:  # a bias of -0.4 would outvote a sigmoid score of 0.98
            named["router_correction_bias"].mul_(0.01)
        for k, e in enumerate(range(K)):  # logits about 4 - 0.4 k: sigmoid does not saturate
            r[e] = direction * (1.0 - 0.1 * k)
    _, ids = moe_torch.route(x, named, spec)
    picked = set(ids.unique().tolist())
    assert picked == set(range(K)), picked
    got = train.triton_backward(grad, x, ws, spec)
    want = [w if w is not None else torch.zeros_like(t) for w, t in
            zip(_autograd_of_reference(x, ws, grad, spec), [x] + ws)]
    assert_grads_close(got, want, ["x"] + list(spec.weight_names()), torch.float32, what=name)
    grads = dict(zip(spec.weight_names(), got[1:]))
    unused = [e for e in range(E) if e not in picked]
    for n in spec.weight_names():
        if n.startswith(("router", "shared")):
            continue
        assert torch.equal(grads[n][unused], torch.zeros_like(grads[n][unused])), n


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss", "deepseek_v3", "separate_bias"])
def test_gradients_are_bitwise_deterministic(name):
    spec = _in(SPECS[name], torch.float32)
    x, ws, grad = _inputs(spec, 45, torch.float32, f"det{name}")
    first = train.triton_backward(grad, x, ws, spec)
    again = train.triton_backward(grad.clone(), x.clone(), [w.clone() for w in ws], spec)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


# The router's score in float64 end to end: the specs' fp32 router casts would put fp32 rounding
# into gradcheck's finite differences
GRADCHECK = ["mixtral", "odd_tails", "k_equals_e", "sigmoid_interleaved_transposed", "topk_then_softmax_gelu",
             "plain_mlp_relu", "separate_gate_up", "shared_gated", "gpt_oss", "separate_bias", "plain_bias",
             "deepseek_v3", "deepseek_v2"]


@pytest.mark.parametrize("name", [n if n in ("mixtral", "gpt_oss", "deepseek_v3") else
                                  pytest.param(n, marks=slow("float64 gradcheck of the remaining specs, seconds each")) for n in GRADCHECK])
def test_gradcheck_in_float64(name):
    """torch.autograd.gradcheck of (reference forward, Triton backward) on 6 tokens: the kernels'
    gradients are the forward's derivatives (finite differences of the reference loop in fp64)."""
    spec = dataclasses.replace(SPECS[name], router_fp32=False, router_gemm_fp32=False, dtype="float64")
    x, ws, _ = _inputs(spec, 6, torch.float64, f"gc{name}")

    class ReferenceWithTritonBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x_, *ws_):
            ctx.save_for_backward(x_, *ws_)
            return moe_torch.moe_forward_reference(x_, list(ws_), spec)

        @staticmethod
        def backward(ctx, g):
            x_, *ws_ = ctx.saved_tensors
            return tuple(train.triton_backward(g.contiguous(), x_, list(ws_), spec))

    leaves = [t.requires_grad_() for t in [x] + ws]
    assert torch.autograd.gradcheck(ReferenceWithTritonBackward.apply, leaves, eps=1e-6, atol=1e-6, rtol=1e-4,
                                    fast_mode=True)


# -- through the op and the backend ---------------------------------------------------------------


def test_report_says_how_each_backward_runs():
    model, (ids,) = models.build("mixtral", layers=1)
    compiled = torch.compile(model, backend="moe", options={"inner": "aot_eager", "kernels": "triton"})
    compiled(ids).logits.float().square().mean().backward()
    rows = report.current().optimized()
    assert rows and all(r.backward == "triton" for r in rows)
    assert report.current().to_dict()["regions"][0]["backward"] == "triton"
    torch._dynamo.reset()
    report.reset()
    compiled = torch.compile(model, backend="moe", options={"inner": "aot_eager", "kernels": "torch"})
    compiled(ids)
    rows = report.current().optimized()
    assert rows and all(r.backward == "recompute" for r in rows), [(r.kernels, r.backward) for r in rows]


def test_double_backward_is_refused_with_a_clear_error():
    """The op called directly (torch.compile's AOTAutograd refuses double backward itself)."""
    from moecompile.codegen import plan
    spec = SPECS["mixtral"]
    x, ws, grad = _inputs(spec, 9, torch.float32, "double")
    leaves = [t.requires_grad_() for t in [x] + ws]
    out = torch.ops.moecompile.moe(leaves[0], leaves[1:], plan.program_of(spec).text(), "torch", "layer")
    (gx,) = torch.autograd.grad(out, [leaves[0]], grad, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward .* not supported"):
        gx.square().sum().backward()


def test_choose_matches_the_forward():
    from moecompile.ir import build
    from moecompile.passes.layer import LAYER_PASSES
    program = build(SPECS["mixtral"])
    cpu = torch.device("cpu")
    assert train.choose(program, "torch", cpu) == "recompute"  # the torch path: vjp of its forward
    assert train.choose(program, "reference", cpu) == "recompute"
    for cls in LAYER_PASSES:
        program, _ = cls()(program)
    assert train.choose(program, "triton", cpu) == "triton"
    assert set(train.BACKWARDS) == {"triton", "recompute"}


def test_backward_kernel_configs_are_valid():
    for kind in bwd.KINDS:
        for dtype in (torch.float32, torch.bfloat16):
            space = bwd.config_space(kind, 8, 2048, 7168, dtype)
            assert space[0] == bwd.default_config(kind, 8, 2048, 7168, dtype)
            for c in space:
                assert all(c[b] >= 16 and not c[b] & (c[b] - 1) for b in ("BLOCK_N", "BLOCK_K"))
