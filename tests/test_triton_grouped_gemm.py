"""The grouped-GEMM kernels (gate_up, down, combine) against their torch references and, end to end,
against moe_torch.moe_forward_reference. On CPU they run under the Triton interpreter.

Tolerance per dtype, as (rtol, atol relative to the max |expected|):
  kernel vs its reference: both accumulate in fp32 and round once.
    fp32: only the summation order differs (~1e-7 relative in practice)            -> 1e-5
    bf16: one final rounding, and an fp32 sum on either side of a rounding boundary
          moves the result by 1 ulp = 2^-8 = 0.4%                                   -> 1e-2
  end to end vs moe_forward_reference: the torch path also rounds each GEMM output and the
  activation to bf16 (three or four roundings the kernels skip, over two GEMMs)    -> 2e-2, as
  conftest's bf16 "out"; fp32 stays at 1e-5.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers_moe import GATE_UP_CASES  # noqa: E402
from moecompile.codegen import moe_torch  # noqa: E402
from moecompile.codegen.triton import grouped_gemm as gg  # noqa: E402
from moecompile.ir import MoESpec  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TILE_M = 16  # smallest tile tl.dot takes; keeps the interpreter fast
# 16-wide blocks: H = 33 and I = 20 leave tails in every block dim
CFG = {"BLOCK_M": TILE_M, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}
COMBINE_CFG = {"BLOCK_M": 4, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
KERNEL_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 1e-2)}
E2E_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def _close(actual, expected, tol, what=""):
    rtol, atol_rel = tol
    expected = expected.float()
    atol = atol_rel * max(expected.abs().max().item(), 1e-6)
    torch.testing.assert_close(actual.float(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _align(ids: torch.Tensor, E: int, tile_m: int = TILE_M):
    """The align stage's metadata for ids (T, K): sorted_pairs (P,), tile_expert (P // tile_m,), inv (S,)."""
    flat = ids.reshape(-1).long()
    S = flat.numel()
    counts = torch.bincount(flat, minlength=E)
    padded = (counts + tile_m - 1) // tile_m * tile_m
    starts = torch.cumsum(padded, 0) - padded  # (E,) first row of each expert's group
    P = (S + E * (tile_m - 1) + tile_m - 1) // tile_m * tile_m
    order = torch.sort(flat, stable=True).indices  # pairs grouped by expert, increasing p within
    rank = torch.arange(S) - (torch.cumsum(counts, 0) - counts)[flat[order]]
    rows = starts[flat[order]] + rank
    sorted_pairs = torch.full((P,), -1, dtype=torch.int32)
    sorted_pairs[rows] = order.to(torch.int32)
    inv = torch.empty(S, dtype=torch.int32)
    inv[order] = rows.to(torch.int32)
    tile_expert = torch.full((P // tile_m,), -1, dtype=torch.int32)
    for e in counts.nonzero().view(-1).tolist():
        tile_expert[starts[e] // tile_m:(starts[e] + padded[e]) // tile_m] = e
    return sorted_pairs.to(DEVICE), tile_expert.to(DEVICE), inv.to(DEVICE)


def _routing(T, E, K, seed=0):
    """Random top-k routing: weights (T, K) fp32 (softmax of the top logits), ids (T, K) int32."""
    g = torch.Generator().manual_seed(seed)
    top, ids = torch.topk(torch.randn(T, E, generator=g), K, dim=-1)
    return torch.softmax(top, -1).to(DEVICE), ids.to(torch.int32).to(DEVICE)


def _live(tile_expert):  # (P,) bool: rows of tiles the kernels compute
    return (tile_expert >= 0).repeat_interleave(TILE_M)


def _spec(E, K, H, I, dtype, **kw):
    if kw.get("activation") in ("clamped_swiglu", "clamped_silu"):
        kw = {"act_alpha": 1.702, "act_limit": 0.5, **kw}  # a limit the random gate/up values reach
    if kw.get("activation") == "softcap_swiglu":
        kw = {"act_alpha": 1.5, "act_limit": 2.0, **kw}  # softcaps the random gate/up values bend at
    return MoESpec(num_experts=E, top_k=K, hidden=H, intermediate=I, dtype=str(dtype).split(".")[1], **kw)


def _weights(spec: MoESpec, dtype, seed=1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in spec.weight_shapes().items():
        fan_in = shape[-1] if not spec.transposed or len(shape) < 3 else shape[-2]
        out[name] = (torch.randn(shape, generator=g) / fan_in ** 0.5).to(dtype).to(DEVICE)
    return out


def _gate_up_args(w, spec: MoESpec):
    """(w, bias, kwargs) of gemm_gate_up for a spec's weights."""
    first = "gate_proj" if spec.layout == "separate" else ("gate_up_proj" if spec.gated else "up_proj")
    kw = dict(top_k=spec.top_k, tile_m=TILE_M, activation=spec.activation, gated=spec.gated, layout=spec.layout,
              transposed=spec.transposed, act_alpha=spec.act_alpha, act_limit=spec.act_limit)
    if spec.layout == "separate":
        kw.update(w_up=w["up_proj"], bias_up=w.get("up_proj_bias"))
    return w[first], w.get(first + "_bias"), kw


def _pipeline(x, topk_w, ids, w, spec: MoESpec, fns=(gg.gemm_gate_up, gg.gemm_down, gg.combine)):
    """combine(gemm_down(gemm_gate_up(x))): the routed experts' (T, H)."""
    sorted_pairs, tile_expert, inv = _align(ids, spec.num_experts)
    w1, b1, kw = _gate_up_args(w, spec)
    cfg = {"config": CFG} if fns[0] is gg.gemm_gate_up else {}
    a = fns[0](x, sorted_pairs, tile_expert, w1, b1, **kw, **cfg)
    y = fns[1](a, sorted_pairs, tile_expert, w["down_proj"], w.get("down_proj_bias"), topk_w, top_k=spec.top_k,
               tile_m=TILE_M, transposed=spec.transposed, **cfg)
    return fns[2](y, inv, num_tokens=x.shape[0], top_k=spec.top_k, out_dtype=x.dtype,
                  **({"config": COMBINE_CFG} if cfg else {}))




@DTYPES
@pytest.mark.parametrize("act,gated,layout,transposed,bias", GATE_UP_CASES,
                         ids=["-".join(map(str, c)) for c in GATE_UP_CASES])
def test_gate_up_matches_reference(act, gated, layout, transposed, bias, dtype):
    T, E, K, H, I = 13, 4, 2, 33, 20
    spec = _spec(E, K, H, I, dtype, activation=act, gated=gated, layout=layout, transposed=transposed,
                 expert_bias=bias)
    w = _weights(spec, dtype)
    x = torch.randn(T, H + 3).to(dtype).to(DEVICE)[:, :H]  # rows strided: the kernel reads x's strides
    _, ids = _routing(T, E, K)
    sorted_pairs, tile_expert, _ = _align(ids, E)
    w1, b1, kw = _gate_up_args(w, spec)
    a = gg.gemm_gate_up(x, sorted_pairs, tile_expert, w1, b1, **kw, config=CFG)
    ref = gg.gemm_gate_up_reference(x, sorted_pairs, tile_expert, w1, b1, **kw)
    live = _live(tile_expert)
    assert a.shape == (sorted_pairs.shape[0], I) and a.dtype == dtype
    _close(a[live], ref[live], KERNEL_TOL[dtype], "gate_up")
    assert not a[live & (sorted_pairs < 0)].any(), "padding rows of live tiles must be zeros"


@DTYPES
@pytest.mark.parametrize("weighted,transposed,bias",
                         [(True, False, False), (True, True, True), (False, False, True)])
def test_down_matches_reference(weighted, transposed, bias, dtype):
    T, E, K, H, I = 11, 4, 2, 33, 20
    topk_w, ids = _routing(T, E, K)
    sorted_pairs, tile_expert, _ = _align(ids, E)
    P = sorted_pairs.shape[0]
    a = torch.randn(P, I).to(dtype).to(DEVICE)
    w_down = (torch.randn((E, I, H) if transposed else (E, H, I)) / I ** 0.5).to(dtype).to(DEVICE)
    b = torch.randn(E, H).to(dtype).to(DEVICE) if bias else None
    args = (a, sorted_pairs, tile_expert, w_down, b, topk_w if weighted else None)
    kw = dict(top_k=K, tile_m=TILE_M, transposed=transposed)
    y = gg.gemm_down(*args, **kw, config=CFG)
    ref = gg.gemm_down_reference(*args, **kw)
    assert y.dtype == (torch.float32 if weighted else dtype)
    live = _live(tile_expert)
    _close(y[live], ref[live], KERNEL_TOL[dtype], "down")
    assert not y[live & (sorted_pairs < 0)].any(), "padding rows of live tiles must be zeros"


@DTYPES
@pytest.mark.parametrize("K,shared", [(1, False), (3, True)])
def test_combine_matches_reference(K, shared, dtype):
    T, E, H = 9, 4, 33
    _, ids = _routing(T, E, K)
    sorted_pairs, _, inv = _align(ids, E)
    y = torch.randn(sorted_pairs.shape[0], H, device=DEVICE)
    s = torch.randn(T, H).to(dtype).to(DEVICE) if shared else None
    kw = dict(num_tokens=T, top_k=K, out_dtype=dtype, shared=s)
    out = gg.combine(y, inv, **kw, config=COMBINE_CFG)
    assert out.shape == (T, H) and out.dtype == dtype
    ref = gg.combine_reference(y, inv, **kw)
    if dtype == torch.float32 or DEVICE == "cuda":  # the same k order in fp32: bitwise equal
        assert torch.equal(out, ref)
    else:
        # NOTE: the interpreter's fp32 -> bf16 cast truncates (GPUs round to nearest even), so on
        # CPU a bf16 output can sit one ulp below torch's
        _close(out, ref, KERNEL_TOL[dtype], "combine")


@DTYPES
@pytest.mark.parametrize("K,shared,y_dtype", [(1, False, "fp32"), (3, True, "fp32"), (2, False, "same")])
def test_weighted_combine_matches_reference(K, shared, y_dtype, dtype):
    """out[t] = sum_k topk_w[t, k] * y[inv[t*K + k]]: fp32 products and sums in k order on both sides."""
    T, E, H = 9, 4, 33
    _, ids = _routing(T, E, K, seed=2)
    topk_w = (torch.rand(T, K) + 0.5).to(DEVICE)  # not softmax: at K = 1 that is all ones
    sorted_pairs, _, inv = _align(ids, E)
    y = torch.randn(sorted_pairs.shape[0], H).to(torch.float32 if y_dtype == "fp32" else dtype).to(DEVICE)
    s = torch.randn(T, H).to(dtype).to(DEVICE) if shared else None
    kw = dict(num_tokens=T, top_k=K, out_dtype=dtype, shared=s, topk_w=topk_w)
    out = gg.combine(y, inv, **kw, config=COMBINE_CFG)
    assert out.shape == (T, H) and out.dtype == dtype
    ref = gg.combine_reference(y, inv, **kw)
    if dtype == torch.float32 and DEVICE == "cpu":  # no FMA in the interpreter: bitwise equal
        assert torch.equal(out, ref)
    else:  # bf16: the interpreter's truncating cast (see above); CUDA may fuse w * y + acc
        _close(out, ref, KERNEL_TOL[dtype], "weighted combine")
    unweighted = gg.combine(y, inv, num_tokens=T, top_k=K, out_dtype=dtype, shared=s, config=COMBINE_CFG)
    assert not torch.equal(out, unweighted), "the weights must change the sum"


@pytest.mark.parametrize("bias", [False, True])
def test_weight_in_combine_equals_weight_in_gemm_down(bias):
    """gemm_down unweighted + weighted combine == gemm_down with topk_w + plain combine (fp32): the
    same fp32 products w * (acc + b), the same k order."""
    T, E, K, H, I = 11, 4, 2, 33, 20
    topk_w, ids = _routing(T, E, K, seed=4)
    sorted_pairs, tile_expert, inv = _align(ids, E)
    a = torch.randn(sorted_pairs.shape[0], I, device=DEVICE)
    w_down = (torch.randn(E, H, I) / I ** 0.5).to(DEVICE)
    b = torch.randn(E, H, device=DEVICE) if bias else None
    kw = dict(top_k=K, tile_m=TILE_M, transposed=False, config=CFG)
    ckw = dict(num_tokens=T, top_k=K, out_dtype=torch.float32, config=COMBINE_CFG)
    in_gemm = gg.combine(gg.gemm_down(a, sorted_pairs, tile_expert, w_down, b, topk_w, **kw), inv, **ckw)
    in_combine = gg.combine(gg.gemm_down(a, sorted_pairs, tile_expert, w_down, b, None, **kw), inv, **ckw,
                            topk_w=topk_w)
    if DEVICE == "cpu":
        assert torch.equal(in_gemm, in_combine)
    else:  # CUDA may fuse the multiply into an FMA on one side
        _close(in_combine, in_gemm, (1e-6, 1e-6), "weight in combine")


def test_combine_rejects_bad_topk_w():
    T, E, K, H = 5, 4, 2, 16
    topk_w, ids = _routing(T, E, K)
    sorted_pairs, _, inv = _align(ids, E)
    y = torch.randn(sorted_pairs.shape[0], H, device=DEVICE)
    kw = dict(num_tokens=T, top_k=K, out_dtype=torch.float32)
    for bad in (topk_w[:, :1], topk_w[:-1], ids):
        with pytest.raises(ValueError, match="topk_w must be"):
            gg.combine(y, inv, **kw, topk_w=bad)


# (T, E, K, H, I, spec options, router bias): edge shapes, each with a different expert variant
E2E_CASES = {
    "T1": (1, 4, 2, 32, 32, {}, None),
    "odd_H_I": (13, 4, 2, 33, 20, {"activation": "gelu_tanh", "expert_bias": True}, None),
    "K_eq_E": (7, 3, 3, 24, 40, {"layout": "interleaved", "transposed": True}, None),
    "strided_loop": (40, 8, 2, 72, 72, {"activation": "clamped_swiglu", "expert_bias": True}, None),
    # a router bias of -30 keeps every token off expert 0
    "expert_without_tokens": (20, 4, 1, 32, 24, {"layout": "separate", "expert_bias": True}, [-30.0, 0, 0, 0]),
    # +30 on expert 2: every token picks it
    "all_to_one_expert": (17, 6, 2, 32, 48, {"gated": False, "activation": "relu"}, [0, 0, 30.0, 0, 0, 0]),
    "E256": (3, 256, 2, 32, 16, {"transposed": True}, None),
}


@DTYPES
@pytest.mark.parametrize("case", list(E2E_CASES))
def test_end_to_end_matches_moe_forward_reference(case, dtype):
    T, E, K, H, I, opts, router_bias = E2E_CASES[case]
    spec = _spec(E, K, H, I, dtype, router_bias=router_bias is not None, **opts)
    w = _weights(spec, dtype)
    if router_bias is not None:
        w["router_bias"] = torch.tensor(router_bias).to(dtype).to(DEVICE)
    x = torch.randn(T, H).to(dtype).to(DEVICE)
    topk_w, ids = moe_torch.route(x, w, spec)
    if case == "expert_without_tokens":
        assert not (ids == 0).any()
    if case == "all_to_one_expert":
        assert (ids == 2).any(dim=-1).all()
    want = moe_torch.moe_forward_reference(x, [w[n] for n in spec.weight_names()], spec)
    got = _pipeline(x, topk_w, ids.to(torch.int32), w, spec)
    assert got.shape == (T, H) and got.dtype == dtype
    _close(got, want, E2E_TOL[dtype], case)
    # the references chained give the same result (they are what the kernels are held to)
    refs = _pipeline(x, topk_w, ids.to(torch.int32), w, spec,
                     (gg.gemm_gate_up_reference, gg.gemm_down_reference, gg.combine_reference))
    _close(got, refs, KERNEL_TOL[dtype], f"{case} vs references")


@DTYPES
def test_token_output_does_not_depend_on_the_batch(dtype):
    """Token 0 alone, then among 29 others: bitwise the same (fixed k order, rows computed alone)."""
    E, K, H, I = 8, 2, 40, 36
    spec = _spec(E, K, H, I, dtype, expert_bias=True)
    w = _weights(spec, dtype)
    x = torch.randn(30, H).to(dtype).to(DEVICE)
    topk_w, ids = _routing(30, E, K, seed=3)
    alone = _pipeline(x[:1], topk_w[:1], ids[:1], w, spec)
    # the token lands at another row of another tile: after 29 others, in reversed order
    perm = torch.arange(29, -1, -1, device=DEVICE)
    batch = _pipeline(x[perm], topk_w[perm], ids[perm], w, spec)
    assert torch.equal(alone[0], batch[-1])
    again = _pipeline(x[perm], topk_w[perm], ids[perm], w, spec)
    assert torch.equal(batch, again)


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError(f"a kernel was launched with grid {grid}")


def test_no_tokens_returns_empty_outputs(monkeypatch):
    for kernel in ("_gate_up_kernel", "_down_kernel", "_combine_kernel"):
        monkeypatch.setattr(gg, kernel, _NoLaunch())
    E, K, H, I = 4, 2, 24, 20
    spec = _spec(E, K, H, I, torch.float32)
    w = _weights(spec, torch.float32)
    x = torch.randn(0, H, device=DEVICE)
    topk_w, ids = torch.zeros(0, K, device=DEVICE), torch.zeros(0, K, dtype=torch.int32, device=DEVICE)
    sorted_pairs, tile_expert, inv = _align(ids, E)
    assert (tile_expert < 0).all() and sorted_pairs.shape[0] == 64  # round_up(0 + E * 15, 16)
    out = _pipeline(x, topk_w, ids, w, spec)
    assert out.shape == (0, H)


def test_launchers_reject_bad_inputs():
    E, K, H, I = 4, 2, 24, 20
    spec = _spec(E, K, H, I, torch.float32)
    w = _weights(spec, torch.float32)
    _, ids = _routing(5, E, K)
    sorted_pairs, tile_expert, _ = _align(ids, E)
    w1, b1, kw = _gate_up_args(w, spec)
    x = torch.randn(5, H, device=DEVICE)
    with pytest.raises(ValueError, match="not supported"):  # the caller falls back to torch
        gg.gemm_gate_up(x.double(), sorted_pairs, tile_expert, w1, b1, **kw)
    with pytest.raises(ValueError, match="expected"):
        gg.gemm_gate_up(torch.randn(5, H + 1, device=DEVICE), sorted_pairs, tile_expert, w1, b1, **kw)
    with pytest.raises(ValueError, match="tile_m"):
        gg.gemm_gate_up(x, sorted_pairs, tile_expert, w1, b1, **kw, config=dict(CFG, BLOCK_M=32))
    with pytest.raises(ValueError, match="power of two"):
        gg.gemm_gate_up(x, sorted_pairs, tile_expert, w1, b1, **kw, config=dict(CFG, BLOCK_N=24))
    with pytest.raises(ValueError, match="a has"):
        gg.gemm_down(torch.randn(sorted_pairs.shape[0], I + 1, device=DEVICE), sorted_pairs, tile_expert,
                     w["down_proj"], None, None, top_k=K, tile_m=TILE_M, transposed=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_configs_are_valid(dtype):
    for E, N, K_dim in ((8, 2048, 7168), (256, 20, 33), (4, 7168, 2048)):
        for kind in ("gate_up", "down", "combine"):
            space = gg.config_space(kind, E, N, K_dim, dtype)
            assert space[0] == gg.default_config(kind, E, N, K_dim, dtype)
            blocks = ("BLOCK_M", "BLOCK_N") + (("BLOCK_K",) if kind != "combine" else ())
            for c in space:
                assert all(c[b] >= (1 if kind == "combine" else 16) and not c[b] & (c[b] - 1) for b in blocks)
                if kind != "combine":
                    assert gg._smem_bytes(kind, c, dtype) <= gg._SMEM_BUDGET
        # both GEMMs of a layer share the routing's tile_m
        assert gg.default_config("gate_up", E, N, K_dim, dtype)["BLOCK_M"] == \
            gg.default_config("down", E, K_dim, N, dtype)["BLOCK_M"]
    if DEVICE == "cpu":  # few programs on CPU: the tests walk the persistent loop
        assert gg._num_programs(torch.device("cpu"), 100) == gg._CPU_PROGRAMS < 100


# Compiled for H100 (sm_90) in a subprocess without the interpreter (under it, triton.jit gives
# interpreted functions); strides of 1 and 16-divisible sizes as a real launch specializes them.
_COMPILE_H100 = r"""
import torch, triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moecompile.codegen.triton import grouped_gemm as gg

def build(fn, types, consts, cfg, div16=()):
    names = fn.arg_names
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in list(types) + list(div16) if n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
    return k.asm["ttgir"]

bf = "*bf16"
cfg = gg.default_config("gate_up", 8, 2048, 7168, torch.bfloat16)
blocks = {b: cfg[b] for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")}
for act, save_pre in [(act, False) for act in range(len(gg._ACT_CODES))] + [(0, True)]:  # save_pre: pre-activations kept
    ir = build(gg._gate_up_kernel, dict.fromkeys(["x_ptr", "wg_ptr", "wu_ptr", "bg_ptr", "bu_ptr", "a_ptr", "pre_ptr"], bf)
               | {"pairs_ptr": "*i32", "tile_expert_ptr": "*i32", "alpha": "fp32", "limit": "fp32"},
               dict(ACT=act, GATED=True, HAS_BIAS=True, SAVE_PRE=save_pre, INTERPRET=False, PRECISION="ieee", stride_xh=1,
                    stride_wgk=1, stride_wuk=1, stride_ai=1, stride_bgn=1, stride_bun=1, **blocks), cfg,
               ["H", "I", "stride_xt", "stride_wge", "stride_wgn", "stride_wue", "stride_wun", "stride_ap", "stride_pp"])
    assert "warp_group_dot" in ir and "async_copy_global_to_local" in ir, "gate_up: no wgmma / cp.async pipeline"
cfg = gg.default_config("down", 8, 7168, 2048, torch.bfloat16)
ir = build(gg._down_kernel, {"a_ptr": bf, "w_ptr": bf, "b_ptr": bf, "pairs_ptr": "*i32",
                             "tile_expert_ptr": "*i32", "topk_w_ptr": "*fp32", "y_ptr": "*fp32"},
           dict(HAS_BIAS=True, HAS_TOPK_W=True, INTERPRET=False, PRECISION="ieee", stride_ak=1, stride_wk=1,
                stride_yn=1, stride_bn=1, **{b: cfg[b] for b in blocks}), cfg,
           ["N", "K_DIM", "stride_ap", "stride_we", "stride_wn", "stride_yp"])
assert "warp_group_dot" in ir and "async_copy_global_to_local" in ir, "down: no wgmma / cp.async pipeline"
cfg = gg.default_config("combine", 8, 7168, 8, torch.bfloat16)
for weighted in (False, True):
    build(gg._combine_kernel, {"y_ptr": "*fp32", "inv_ptr": "*i32", "topk_w_ptr": "*fp32", "shared_ptr": bf,
                               "out_ptr": bf},
          dict(HAS_TOPK_W=weighted, HAS_SHARED=True, ACC=tl.float32, BLOCK_T=cfg["BLOCK_M"], BLOCK_H=cfg["BLOCK_N"]), cfg)
print("compiled")
"""


def test_kernels_compile_for_h100(tmp_path):
    """The kernels as a GPU build sees them (no interpreter): bf16 GEMMs use wgmma with a cp.async
    pipeline at the default configs. Needs Triton's NVIDIA backend and its ptxas, not a GPU."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo, for `import moecompile`
    run = subprocess.run([sys.executable, "-c", _COMPILE_H100], env=env, cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]
