"""The Triton stages chained as a layer runs them (gate -> align -> grouped GEMM 1 -> grouped GEMM 2
with the top-k weight -> combine) against the eager per-expert loop, under TRITON_INTERPRET=1 on CPU.
fp32: only summation order differs (rtol 1e-4, atol 1e-5 of the largest output, conftest's table)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest import assert_close  # noqa: E402
from moecompile.codegen import moe_torch  # noqa: E402
from moecompile.codegen.triton import align, gate, grouped_gemm  # noqa: E402
from moecompile.ir import MoESpec  # noqa: E402

TILE_M = 16


def _chain(x, ws, spec: MoESpec):
    w, ids, counts = gate.gate(
        x, ws["router_weight"], ws.get("router_bias"), ws.get("router_correction_bias"), top_k=spec.top_k,
        scoring=spec.scoring, topk_order=spec.topk_order, renormalize=spec.renormalize,
        renorm_eps=spec.renorm_eps, routed_scaling=spec.routed_scaling, groups=spec.groups,
        top_groups=spec.top_groups, group_score=spec.group_score, masked_score=spec.masked_score,
        weights_from=spec.weights_from, router_gemm_fp32=spec.router_gemm_fp32,
        weights_in_input_dtype=spec.weights_in_input_dtype)
    rows, tiles, inv = align.align(ids, counts, spec.num_experts, TILE_M)
    a = grouped_gemm.gemm_gate_up(
        x, rows, tiles, ws["gate_up_proj" if spec.gated else "up_proj"], ws.get("gate_up_proj_bias"),
        top_k=spec.top_k, tile_m=TILE_M, activation=spec.activation, gated=spec.gated, layout=spec.layout,
        transposed=spec.transposed, act_alpha=spec.act_alpha, act_limit=spec.act_limit)
    y = grouped_gemm.gemm_down(a, rows, tiles, ws["down_proj"], ws.get("down_proj_bias"), w, top_k=spec.top_k,
                               tile_m=TILE_M, transposed=spec.transposed)
    return grouped_gemm.combine(y, inv, num_tokens=x.shape[0], top_k=spec.top_k, out_dtype=x.dtype)


SPECS = {
    "mixtral-like": dict(num_experts=8, top_k=2, hidden=48, intermediate=40, renormalize=True),
    "deepseek-like": dict(num_experts=16, top_k=4, hidden=33, intermediate=20, scoring="sigmoid",
                          correction_bias=True, groups=4, top_groups=2, group_score="top2_sum",
                          renormalize=True, renorm_eps=1e-20, routed_scaling=2.5),
    "gpt-oss-like": dict(num_experts=4, top_k=4, hidden=32, intermediate=24, topk_order="topk_then_score",
                         router_bias=True, activation="clamped_swiglu", act_alpha=1.702, act_limit=7.0,
                         layout="interleaved", transposed=True, expert_bias=True),
}


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("T", [1, 37])
def test_triton_stages_chained_match_the_eager_loop(name, T):
    spec = MoESpec(**SPECS[name])
    gen = torch.Generator().manual_seed(T)
    x = torch.randn(T, spec.hidden, generator=gen)
    ws = {n: torch.randn(*s, generator=gen) / s[-1] ** 0.5 for n, s in spec.weight_shapes().items()}
    want = moe_torch.moe_forward_reference(x, [ws[n] for n in spec.weight_names()], spec)
    assert_close(_chain(x, ws, spec), want, torch.float32, what=name)
