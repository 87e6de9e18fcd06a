"""The decode path (decode_gate_up, decode_down, moe_decode) against its torch references, against
the grouped GEMMs it stands in for, and end to end against moe_torch.moe_forward_reference. On CPU
the kernels run under the Triton interpreter, so the shapes are small.

Tolerance per dtype, as (rtol, atol relative to the max |expected|):
  kernel vs its reference, and vs the grouped GEMMs: both accumulate in fp32 and round once.
    fp32: only the summation order differs                                         -> 1e-5
    bf16: an fp32 sum on either side of a rounding boundary moves it 1 ulp = 0.4%   -> 1e-2
  end to end vs moe_forward_reference: conftest's "out" table (bf16: the torch path also rounds
  each GEMM output and the activation to bf16).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest import assert_close  # noqa: E402
from helpers_moe import GATE_UP_CASES  # noqa: E402
from moecompile.codegen import moe_torch  # noqa: E402
from moecompile.codegen.triton import align, decode  # noqa: E402
from moecompile.codegen.triton import grouped_gemm as gg  # noqa: E402
from moecompile.ir import MoESpec  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# 16-wide blocks: H = 33 and I = 20 leave tails in every block dim
CFG = {"BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1}
CONFIGS = {"gate_up": CFG, "down": CFG, "combine": {"BLOCK_M": 4, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}}
GG_CFG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}
KERNEL_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 1e-2)}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def _close(actual, expected, tol, what=""):
    rtol, atol_rel = tol
    expected = expected.float()
    atol = atol_rel * max(expected.abs().max().item() if expected.numel() else 0.0, 1e-6)
    torch.testing.assert_close(actual.float(), expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


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


def _routing(T, E, K, seed=0, hot=None):
    """Random top-k routing: weights (T, K) fp32, ids (T, K) int32; `hot` experts get +30 on their
    logits, so every token picks them (several tokens to one expert)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g)
    if hot is not None:
        logits[:, hot] += 30.0
    top, ids = torch.topk(logits, K, dim=-1)
    return torch.softmax(top, -1).to(DEVICE), ids.to(torch.int32).to(DEVICE)


def _args(w, spec: MoESpec):
    """moe_decode's weight arguments for a spec: (w, bias, w_down, bias_down), kwargs."""
    first = "gate_proj" if spec.layout == "separate" else ("gate_up_proj" if spec.gated else "up_proj")
    kw = dict(activation=spec.activation, gated=spec.gated, layout=spec.layout, transposed=spec.transposed,
              act_alpha=spec.act_alpha, act_limit=spec.act_limit)
    if spec.layout == "separate":
        kw.update(w_up=w["up_proj"], bias_up=w.get("up_proj_bias"))
    return (w[first], w.get(first + "_bias"), w["down_proj"], w.get("down_proj_bias")), kw


def _grouped(x, topk_w, ids, w, spec: MoESpec):
    """combine(gemm_down(gemm_gate_up(x))) on align's routing: what the decode path must equal."""
    E, K = spec.num_experts, spec.top_k
    rows, tiles, inv = align.align(ids, torch.bincount(ids.reshape(-1).long(), minlength=E).to(torch.int32),
                                   E, GG_CFG["BLOCK_M"])
    (w1, b1, wd, bd), kw = _args(w, spec)
    a = gg.gemm_gate_up(x, rows, tiles, w1, b1, top_k=K, tile_m=16, **kw, config=GG_CFG)
    y = gg.gemm_down(a, rows, tiles, wd, bd, topk_w, top_k=K, tile_m=16, transposed=spec.transposed, config=GG_CFG)
    return gg.combine(y, inv, num_tokens=x.shape[0], top_k=K, out_dtype=x.dtype)




@DTYPES
@pytest.mark.parametrize("act,gated,layout,transposed,bias", GATE_UP_CASES,
                         ids=["-".join(map(str, c)) for c in GATE_UP_CASES])
def test_gate_up_matches_reference(act, gated, layout, transposed, bias, dtype):
    T, E, K, H, I = 5, 8, 2, 33, 20
    spec = _spec(E, K, H, I, dtype, activation=act, gated=gated, layout=layout, transposed=transposed,
                 expert_bias=bias)
    w = _weights(spec, dtype)
    x = torch.randn(T, H + 3).to(dtype).to(DEVICE)[:, :H]  # rows strided: the kernel reads x's strides
    _, ids = _routing(T, E, K, hot=3)  # expert 3: a run of all 5 tokens
    (w1, b1, _, _), kw = _args(w, spec)
    order, a = decode.decode_gate_up(x, ids, w1, b1, top_k=K, **kw, config=CFG)
    ref_order, ref = decode.decode_gate_up_reference(x, ids, w1, b1, top_k=K, **kw)
    assert order.dtype == torch.int32 and torch.equal(order, ref_order)
    assert torch.equal(order.long(), torch.sort(ids.reshape(-1), stable=True).indices)
    assert a.shape == (T * K, I) and a.dtype == dtype
    _close(a, ref, KERNEL_TOL[dtype], "decode_gate_up")  # every row: a comes from new_empty


@DTYPES
@pytest.mark.parametrize("weighted,transposed,bias", [(True, False, False), (True, True, True), (False, False, True)])
def test_down_matches_reference(weighted, transposed, bias, dtype):
    T, E, K, H, I = 5, 4, 3, 33, 20
    topk_w, ids = _routing(T, E, K)
    order = decode.sort_pairs(ids)
    a = torch.randn(T * K, I).to(dtype).to(DEVICE)
    w_down = (torch.randn((E, I, H) if transposed else (E, H, I)) / I ** 0.5).to(dtype).to(DEVICE)
    b = torch.randn(E, H).to(dtype).to(DEVICE) if bias else None
    args = (a, order, ids, w_down, b, topk_w if weighted else None)
    y = decode.decode_down(*args, top_k=K, transposed=transposed, config=CFG)
    ref = decode.decode_down_reference(*args, top_k=K, transposed=transposed)
    assert y.shape == (T * K, H) and y.dtype == (torch.float32 if weighted else dtype)
    _close(y, ref, KERNEL_TOL[dtype], "decode_down")


# (T, E, K, H, I, spec options, hot experts): decode edges, each with another expert variant
E2E_CASES = {
    "T1": (1, 4, 2, 32, 32, {}, None),
    "T2_gelu_bias": (2, 8, 2, 33, 20, {"activation": "gelu", "expert_bias": True}, None),
    "T5_odd_H_I": (5, 8, 2, 33, 20, {"activation": "gelu_tanh", "layout": "interleaved", "transposed": True,
                                     "expert_bias": True}, 1),
    # every expert takes every token: runs of 3 rows in a 4-row accumulator
    "K_eq_E": (3, 4, 4, 24, 40, {"layout": "separate", "expert_bias": True}, None),
    # all 5 tokens to expert 2, a run of 5 in 8 rows
    "all_to_one_expert": (5, 6, 1, 24, 20, {"gated": False, "activation": "relu"}, 2),
    "clamped_swiglu": (4, 8, 2, 32, 24, {"activation": "clamped_swiglu", "act_alpha": 1.702, "act_limit": 7.0,
                                         "layout": "interleaved", "transposed": True, "expert_bias": True}, None),
    "E256": (2, 256, 2, 16, 16, {"transposed": True}, None),
    "shared_expert": (3, 8, 2, 24, 16, {"shared_intermediate": 12, "expert_bias": True}, 5),
}


@DTYPES
@pytest.mark.parametrize("case", list(E2E_CASES))
def test_moe_decode_matches_moe_forward_reference(case, dtype):
    T, E, K, H, I, opts, hot = E2E_CASES[case]
    spec = _spec(E, K, H, I, dtype, router_bias=True, **opts)
    w = _weights(spec, dtype)
    if hot is not None:
        w["router_bias"] = torch.zeros(E).index_fill(0, torch.tensor([hot]), 30.0).to(dtype).to(DEVICE)
    x = torch.randn(T, H).to(dtype).to(DEVICE)
    topk_w, ids64 = moe_torch.route(x, w, spec)
    ids = ids64.to(torch.int32)
    if hot is not None:
        assert (ids == hot).any(dim=-1).all()
    want = moe_torch.moe_forward_reference(x, [w[n] for n in spec.weight_names()], spec)
    shared = moe_torch._shared_expert(x, w, spec) if spec.shared_intermediate else None
    args, kw = _args(w, spec)
    got = decode.moe_decode(x, ids, topk_w, *args, **kw, shared=shared, configs=CONFIGS)
    assert got.shape == (T, H) and got.dtype == dtype
    assert_close(got, want, dtype, what=case)
    # what it stands in for: the grouped GEMMs on padded tiles, and its own references chained
    if shared is None:
        _close(got, _grouped(x, topk_w, ids, w, spec), KERNEL_TOL[dtype], f"{case} vs grouped GEMMs")
    refs = decode.moe_decode_reference(x, ids, topk_w, *args, **kw, shared=shared)
    _close(got, refs, KERNEL_TOL[dtype], f"{case} vs references")


@DTYPES
def test_token_output_does_not_depend_on_the_batch(dtype):
    """Token 0 alone, then last of 4 tokens that share its experts (so it is no longer the first row
    of its runs, and the accumulators are 4 rows, not 1): bitwise the same."""
    E, K, H, I = 8, 2, 40, 36
    spec = _spec(E, K, H, I, dtype, expert_bias=True)
    w = _weights(spec, dtype)
    args, kw = _args(w, spec)
    x = torch.randn(4, H).to(dtype).to(DEVICE)
    topk_w = torch.rand(4, K, device=DEVICE)
    ids = torch.tensor([[1, 5], [1, 2], [5, 1], [3, 1]], dtype=torch.int32, device=DEVICE)
    run = lambda rows: decode.moe_decode(x[rows], ids[rows], topk_w[rows], *args, **kw, configs=CONFIGS)  # noqa: E731
    alone = run([0])
    batch = run([3, 2, 1, 0])
    assert torch.equal(alone[0], batch[3])
    assert torch.equal(batch, run([3, 2, 1, 0]))


def test_inactive_experts_are_not_read():
    """Experts no token picks hold NaN: the output stays finite, equal to the clean run."""
    T, E, K, H, I = 3, 16, 2, 24, 20
    spec = _spec(E, K, H, I, torch.float32, expert_bias=True)
    w = _weights(spec, torch.float32)
    topk_w, ids = _routing(T, E, K, seed=5)
    x = torch.randn(T, H, device=DEVICE)
    args, kw = _args(w, spec)
    clean = decode.moe_decode(x, ids, topk_w, *args, **kw, configs=CONFIGS)
    idle = torch.ones(E, dtype=torch.bool, device=DEVICE).index_fill(0, ids.reshape(-1).long(), False)
    poisoned = [t.clone() for t in args]
    for t in poisoned:
        t[idle] = float("nan")
    assert torch.equal(decode.moe_decode(x, ids, topk_w, *poisoned, **kw, configs=CONFIGS), clean)


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError(f"a kernel was launched with grid {grid}")


def test_no_tokens_returns_empty_outputs(monkeypatch):
    for mod, kernel in ((decode, "_decode_gate_up_kernel"), (decode, "_decode_down_kernel"), (gg, "_combine_kernel")):
        monkeypatch.setattr(mod, kernel, _NoLaunch())
    E, K, H, I = 4, 2, 24, 20
    spec = _spec(E, K, H, I, torch.float32)
    w = _weights(spec, torch.float32)
    args, kw = _args(w, spec)
    x = torch.randn(0, H, device=DEVICE)
    topk_w, ids = torch.zeros(0, K, device=DEVICE), torch.zeros(0, K, dtype=torch.int32, device=DEVICE)
    order, a = decode.decode_gate_up(x, ids, args[0], args[1], top_k=K, **kw)
    assert order.shape == (0,) and a.shape == (0, I)
    assert decode.moe_decode(x, ids, topk_w, *args, **kw).shape == (0, H)
    assert decode.moe_decode_reference(x, ids, topk_w, *args, **kw).shape == (0, H)


def test_applies_at_decode_sizes_only():
    assert decode.applies(1, 8, 256) and decode.applies(8, 8, 64)  # DeepSeek-like decode steps
    assert decode.applies(4, 2, 4)  # 8 rows: less than one 16-row tile even with 4 experts
    assert decode.applies(decode.MAX_TOKENS, 1, 16)
    assert not decode.applies(decode.MAX_TOKENS + 1, 1, 256)  # too many tokens
    assert not decode.applies(8, 8, 32)  # 64 rows for 32 experts: tiles fill up
    assert not decode.applies(1, 5, 4)  # K > E


def test_launchers_reject_bad_inputs():
    T, E, K, H, I = 3, 4, 2, 24, 20
    spec = _spec(E, K, H, I, torch.float32)
    w = _weights(spec, torch.float32)
    (w1, b1, wd, bd), kw = _args(w, spec)
    topk_w, ids = _routing(T, E, K)
    x = torch.randn(T, H, device=DEVICE)
    up = lambda x=x, ids=ids, top_k=K, **o: decode.decode_gate_up(x, ids, w1, b1, top_k=top_k, **kw, **o)  # noqa: E731
    with pytest.raises(ValueError, match="decode_gate_up: dtype"):
        up(x=x.double())
    with pytest.raises(ValueError, match="ids must be"):
        up(ids=ids.long())
    with pytest.raises(ValueError, match=r"ids must be \(2, 2\)"):
        up(x=x[:2])
    with pytest.raises(ValueError, match="top_k=5"):
        up(ids=torch.zeros(T, 5, dtype=torch.int32, device=DEVICE), top_k=5)
    many = decode.MAX_TOKENS + 1
    with pytest.raises(ValueError, match="at most"):
        up(x=torch.randn(many, H, device=DEVICE), ids=torch.zeros(many, K, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="power of two"):
        up(config=dict(CFG, BLOCK_N=24))
    order, a = up()
    with pytest.raises(ValueError, match="a must be"):
        decode.decode_down(a[:, :-1], order, ids, wd, bd, topk_w, top_k=K, transposed=False)
    with pytest.raises(ValueError, match="order must be"):
        decode.decode_down(a, order.long(), ids, wd, bd, topk_w, top_k=K, transposed=False)
    with pytest.raises(ValueError, match="topk_w must be"):
        decode.decode_down(a, order, ids, wd, bd, topk_w[:, :1], top_k=K, transposed=False)
    with pytest.raises(ValueError, match="same expert twice"):  # what the kernels trust
        decode.decode_gate_up_reference(x, torch.ones(T, K, dtype=torch.int32, device=DEVICE), w1, b1, top_k=K, **kw)


def test_configs_are_valid():
    for N, K_dim in ((2048, 7168), (20, 33), (7168, 2048)):
        for kind in ("gate_up", "down"):
            for dtype in (torch.float32, torch.bfloat16):
                c = decode.default_config(kind, N, K_dim, dtype)
                assert decode._resolve_config(kind, None, N, K_dim, dtype) == c
                assert all(c[b] >= 16 and not c[b] & (c[b] - 1) for b in ("BLOCK_N", "BLOCK_K"))


# Compiled for H100 (sm_90) in a subprocess without the interpreter, as test_triton_grouped_gemm's.
_COMPILE_H100 = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moecompile.codegen.triton import decode

def build(fn, types, consts):
    names = fn.arg_names
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 1})

bf, i32 = "*bf16", "*i32"
for act in range(5):
    for gated in (True, False):
        build(decode._decode_gate_up_kernel,
              dict.fromkeys(["x_ptr", "wg_ptr", "wu_ptr", "bg_ptr", "bu_ptr", "a_ptr"], bf)
              | {"order_ptr": i32, "ids_ptr": i32, "alpha": "fp32", "limit": "fp32"},
              dict(ACT=act, GATED=gated, HAS_BIAS=True, MAX_ROWS=8, BLOCK_N=64, BLOCK_K=64))
build(decode._decode_down_kernel, {"a_ptr": bf, "w_ptr": bf, "b_ptr": bf, "order_ptr": i32, "ids_ptr": i32,
                                   "topk_w_ptr": "*fp32", "y_ptr": "*fp32"},
      dict(HAS_BIAS=True, HAS_TOPK_W=True, MAX_ROWS=1, BLOCK_N=128, BLOCK_K=64))
print("compiled")
"""


def test_kernels_compile_for_h100(tmp_path):
    """The kernels as a GPU build sees them (no interpreter). Needs Triton's NVIDIA backend and its
    ptxas, not a GPU."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo, for `import moecompile`
    run = subprocess.run([sys.executable, "-c", _COMPILE_H100], env=env, cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]
