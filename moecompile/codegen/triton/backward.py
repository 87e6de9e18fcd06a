"""The routed experts' backward as three grouped GEMM kernels and the forward's combine.

    Matches:   the forward of grouped_gemm.py, for an output gradient dout (T, H)
        a   = act(hg) * hu,  [hg | hu] = x[tok] @ [Wg | Wu][e].T + b        (S, I)  GEMM 1
        z   = a @ Wd[e].T + bd;  out[t] = sum_k w[t, k] * z[(t, k)]          (S, H)  GEMM 2 + combine
    Rewrites to (rows in the forward's sorted, tile-padded order; no atomics anywhere):
        dh, a, dwp = down_backward(dout, x, rows, tiles, Wg, Wu, Wd, w)     (P, 2I), (P, I), (P, n)
            g = dout[tok] @ Wd[e]; [hg | hu] recomputed (or read back); a = act(hg) * hu
            dw partial = sum_i g * a (+ dout[tok] . bd[e]); dh = w * g * [da/dhg | da/dhu]
        dxr = dx_rows(dh, rows, tiles, Wg, Wu)                              (P, H)
            dx = combine(dxr, inv, shared=dx_router_and_shared)             (T, H)  k in order
        dWg[e], dWu[e] = sum over e's rows of dh[:, half].T @ x[tok]        weight_grad, (E, I, H)
        dWd[e]         = sum over e's rows of (w * dout[tok]).T @ a         weight_grad, (E, H, I)
        (bias gradients are the same sums without the second operand)
        dw[t, k] = sum of dwp over its row                                  (T, K)

Each weight-gradient program owns one expert's (N, K) tile and walks that expert's row tiles in
order, so an expert with no tokens gets exact zeros and two runs give the same bits. The dw partials
are per (row, I tile) and summed in torch in a fixed order. Every kernel has an eager reference of
the same signature below.

Numerics: fp32 accumulation everywhere; dh and a are stored in x's dtype, as the forward rounds a
before GEMM 2. In "recompute" mode GEMM 1's pre-activations are recomputed inside down_backward
(fp32, the forward's math); with saved pre-activations they are read back in x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import moe_torch, reference
from .grouped_gemm import (_ACT_CODES, _GRAD_DTYPES, _acc, _activation, _check_dtype, _check_routing, _dot,
                           _down_checks, _gate_up_views, _precision, _work_item)


@triton.jit
def _act_backward(g, u, alpha, limit, ACT: tl.constexpr, GATED: tl.constexpr):
    """fp32: (da/dg, da/du) of a = act(g) * u (da/du unused when not gated), with torch's clamp
    gradient (1 inside [min, max], ends included, 0 outside)."""
    if ACT == 4:  # clamped_swiglu: a = (clamp(u) + 1) * gc * sigmoid(alpha * gc), gc = min(g, limit)
        gc = tl.minimum(g, limit)
        s = tl.sigmoid(alpha * gc)
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        dg = tl.where(g <= limit, (uc + 1.0) * (s + alpha * gc * s * (1.0 - s)), 0.0)
        du = tl.where((u >= -limit) & (u <= limit), gc * s, 0.0)
        return dg, du
    elif ACT == 5:  # clamped_silu: a = silu(gc) * clamp(u), gc = min(g, limit)
        gc = tl.minimum(g, limit)
        s = tl.sigmoid(gc)
        uc = tl.minimum(tl.maximum(u, -limit), limit)
        dg = tl.where(g <= limit, uc * s * (1.0 + gc * (1.0 - s)), 0.0)
        du = tl.where((u >= -limit) & (u <= limit), gc * s, 0.0)
        return dg, du
    elif ACT == 7:  # softcap_swiglu: a = A tanh(g / A) * sigmoid(g) * L tanh(u / L)
        tg = 2.0 * tl.sigmoid(2.0 * g / alpha) - 1.0
        tu = 2.0 * tl.sigmoid(2.0 * u / limit) - 1.0
        s = tl.sigmoid(g)
        cg, cu = alpha * tg, limit * tu
        return cu * ((1.0 - tg * tg) * s + cg * s * (1.0 - s)), cg * s * (1.0 - tu * tu)
    else:
        if ACT == 0:  # silu
            s = tl.sigmoid(g)
            act = g * s
            dact = s * (1.0 + g * (1.0 - s))
        elif ACT == 1:  # gelu (erf)
            cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
            act = g * cdf
            dact = cdf + g * tl.exp(-0.5 * g * g) * 0.3989422804014327  # 1 / sqrt(2 pi)
        elif ACT == 2:  # gelu_tanh, tanh(z) = 2 sigmoid(2z) - 1
            inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
            act = 0.5 * g * (1.0 + t)
            dact = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
        elif ACT == 6:  # relu2
            r = tl.maximum(g, 0.0)
            act = r * r
            dact = 2.0 * r
        else:  # relu
            act = tl.maximum(g, 0.0)
            dact = tl.where(g > 0.0, 1.0, 0.0)
        if GATED:
            return dact * u, act
        return dact, act


@triton.jit
def _down_backward_kernel(
    dout_ptr, x_ptr, pairs_ptr, tile_expert_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, wd_ptr, bd_ptr, topk_w_ptr,
    pre_ptr, dh_ptr, a_ptr, dwp_ptr,
    H, I, TOP_K, num_m_tiles, alpha, limit,
    stride_dt, stride_dh, stride_xt, stride_xh, stride_wge, stride_wgn, stride_wgk, stride_wue, stride_wun,
    stride_wuk, stride_bge, stride_bgn, stride_bue, stride_bun, stride_wde, stride_wdh, stride_wdi,
    stride_bde, stride_bdh, stride_pp, stride_hp, stride_ap, stride_wp,
    ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DOWN_BIAS: tl.constexpr,
    HAS_PRE: tl.constexpr, ACC: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Program pid owns one (expert, BLOCK_M rows, BLOCK_N of I) work item:

        g      = dout[tok] @ Wd[e][:, n]                       (BLOCK_M, BLOCK_N)   K-loop over H
        hg, hu = x[tok] @ Wg[e][n].T + bg, ... (or pre[rows])  the forward's GEMM 1, recomputed
        a      = act(hg) * hu        -> a[rows, n]             x's dtype, as the forward stored it
        dwp[rows, n_tile] = sum_n g * a  (+ dout[tok] . bd[e] on n_tile 0)
        dh[rows, n], dh[rows, I + n] = w * g * da/dhg, w * g * da/dhu    (concat, x's dtype)

    Padding rows (-1) store zeros; tiles of expert -1 are skipped.
    """
    num_n_tiles = tl.cdiv(I, BLOCK_N)
    e, m_tile, n_tile = _work_item(tl.program_id(0), tile_expert_ptr, num_m_tiles, num_n_tiles, GROUP_M)
    if e >= 0:
        rows = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rows64 = rows.to(tl.int64)
        pairs = tl.load(pairs_ptr + rows)
        live = pairs >= 0
        tok64 = (tl.where(live, pairs, 0) // TOP_K).to(tl.int64)
        cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < I
        e64 = e.to(tl.int64)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        acc_hg = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        acc_hu = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        dbias = tl.zeros((BLOCK_M,), dtype=ACC)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < H
            row_ok = live[:, None] & k_ok[None, :]
            w_ok = k_ok[:, None] & col_ok[None, :]
            do = tl.load(dout_ptr + tok64[:, None] * stride_dt + ks[None, :] * stride_dh, mask=row_ok, other=0.0)
            wd = tl.load(wd_ptr + e64 * stride_wde + ks[:, None] * stride_wdh + cols[None, :] * stride_wdi,
                         mask=w_ok, other=0.0)  # (BLOCK_K of H, BLOCK_N of I)
            acc_g = _dot(do, wd, acc_g, INTERPRET, PRECISION)
            if HAS_DOWN_BIAS:
                if n_tile == 0:  # dw's bias term, added once per row
                    bd = tl.load(bd_ptr + e64 * stride_bde + ks * stride_bdh, mask=k_ok, other=0.0)
                    dbias += tl.sum(do.to(ACC) * bd.to(ACC)[None, :], axis=1)
            if not HAS_PRE:
                xt = tl.load(x_ptr + tok64[:, None] * stride_xt + ks[None, :] * stride_xh, mask=row_ok, other=0.0)
                wg = tl.load(wg_ptr + e64 * stride_wge + cols[None, :] * stride_wgn + ks[:, None] * stride_wgk,
                             mask=w_ok, other=0.0)
                acc_hg = _dot(xt, wg, acc_hg, INTERPRET, PRECISION)
                if GATED:
                    wu = tl.load(wu_ptr + e64 * stride_wue + cols[None, :] * stride_wun + ks[:, None] * stride_wuk,
                                 mask=w_ok, other=0.0)
                    acc_hu = _dot(xt, wu, acc_hu, INTERPRET, PRECISION)
        ok = live[:, None] & col_ok[None, :]
        if HAS_PRE:  # the forward's pre-activations, concat (P, 2I)
            acc_hg = tl.load(pre_ptr + rows64[:, None] * stride_pp + cols[None, :], mask=ok, other=0.0).to(ACC)
            if GATED:
                acc_hu = tl.load(pre_ptr + rows64[:, None] * stride_pp + (I + cols)[None, :], mask=ok,
                                 other=0.0).to(ACC)
        else:
            if HAS_BIAS:
                acc_hg += tl.load(bg_ptr + e64 * stride_bge + cols * stride_bgn, mask=col_ok,
                                  other=0.0).to(ACC)[None, :]
                if GATED:
                    acc_hu += tl.load(bu_ptr + e64 * stride_bue + cols * stride_bun, mask=col_ok,
                                      other=0.0).to(ACC)[None, :]
        a = _activation(acc_hg, acc_hu, alpha, limit, ACT, GATED)
        a = tl.where(ok, a, 0.0).to(a_ptr.dtype.element_ty)
        tl.store(a_ptr + rows64[:, None] * stride_ap + cols[None, :], a, mask=col_ok[None, :])
        part = tl.sum(acc_g * a.to(ACC), axis=1) + dbias
        tl.store(dwp_ptr + rows64 * stride_wp + n_tile, tl.where(live, part, 0.0))
        w = tl.load(topk_w_ptr + pairs, mask=live, other=0.0).to(ACC)
        da = acc_g * w[:, None]
        d_g, d_u = _act_backward(acc_hg, acc_hu, alpha, limit, ACT, GATED)
        dh_rows = dh_ptr + rows64[:, None] * stride_hp
        tl.store(dh_rows + cols[None, :], tl.where(ok, da * d_g, 0.0).to(dh_ptr.dtype.element_ty),
                 mask=col_ok[None, :])
        if GATED:
            tl.store(dh_rows + (I + cols)[None, :], tl.where(ok, da * d_u, 0.0).to(dh_ptr.dtype.element_ty),
                     mask=col_ok[None, :])


@triton.jit
def _dx_rows_kernel(
    dh_ptr, pairs_ptr, tile_expert_ptr, wg_ptr, wu_ptr, dxr_ptr,
    H, I, num_m_tiles,
    stride_hp, stride_wge, stride_wgn, stride_wgk, stride_wue, stride_wun, stride_wuk, stride_xp,
    GATED: tl.constexpr, ACC: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dxr[rows, n] = dh[rows, :I] @ Wg[e][:, n] + dh[rows, I:] @ Wu[e][:, n]     (P, 2I) -> (P, H)

    Program pid owns one (expert, BLOCK_M rows, BLOCK_N of H) work item, K-loop over I; the combine
    then sums each token's K rows in k order. Padding rows store zeros.
    """
    num_n_tiles = tl.cdiv(H, BLOCK_N)
    e, m_tile, n_tile = _work_item(tl.program_id(0), tile_expert_ptr, num_m_tiles, num_n_tiles, GROUP_M)
    if e >= 0:
        rows = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rows64 = rows.to(tl.int64)
        live = tl.load(pairs_ptr + rows) >= 0
        cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < H
        e64 = e.to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for k0 in range(0, I, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < I
            w_ok = k_ok[:, None] & col_ok[None, :]
            dg = tl.load(dh_ptr + rows64[:, None] * stride_hp + ks[None, :], mask=k_ok[None, :], other=0.0)
            wg = tl.load(wg_ptr + e64 * stride_wge + ks[:, None] * stride_wgn + cols[None, :] * stride_wgk,
                         mask=w_ok, other=0.0)  # (BLOCK_K of I, BLOCK_N of H)
            acc = _dot(dg, wg, acc, INTERPRET, PRECISION)
            if GATED:
                du = tl.load(dh_ptr + rows64[:, None] * stride_hp + (I + ks)[None, :], mask=k_ok[None, :],
                             other=0.0)
                wu = tl.load(wu_ptr + e64 * stride_wue + ks[:, None] * stride_wun + cols[None, :] * stride_wuk,
                             mask=w_ok, other=0.0)
                acc = _dot(du, wu, acc, INTERPRET, PRECISION)
        acc = tl.where(live[:, None], acc, 0.0)
        tl.store(dxr_ptr + rows64[:, None] * stride_xp + cols[None, :], acc.to(dxr_ptr.dtype.element_ty),
                 mask=col_ok[None, :])


@triton.jit
def _weight_grad_kernel(
    a_ptr, b_ptr, pairs_ptr, tile_start_ptr, tile_count_ptr, topk_w_ptr, dw_ptr, db_ptr,
    N, K_DIM, TOP_K,
    stride_ar, stride_an, stride_br, stride_bk, stride_we, stride_wn, stride_wk, stride_be, stride_bn,
    A_GATHER: tl.constexpr, A_SCALE: tl.constexpr, B_GATHER: tl.constexpr, HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dW[e][n, k] = sum over e's rows r of A[r, n] * B[r, k]        (E, N, K), any strides
       db[e][n]    = sum over e's rows r of A[r, n]                  (E, N), when HAS_BIAS

    Program (e, tile) owns expert e's (BLOCK_N, BLOCK_K) output tile and walks e's row tiles
    tile_start[e] .. + tile_count[e] in order: deterministic, and exact zeros for an expert with no
    rows. A row is the sorted row itself, or with *_GATHER its token's row pair // TOP_K; A_SCALE
    multiplies A's row by the pair's top-k weight. Padding rows (-1) count as zeros.
    """
    e = tl.program_id(0)
    num_k_tiles = tl.cdiv(K_DIM, BLOCK_K)
    n_tile, k_tile = tl.program_id(1) // num_k_tiles, tl.program_id(1) % num_k_tiles
    ns = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = k_tile * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok, k_ok = ns < N, ks < K_DIM
    first, count = tl.load(tile_start_ptr + e), tl.load(tile_count_ptr + e)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
    bias = tl.zeros((BLOCK_N,), dtype=ACC)
    for t in range(0, count):
        rows = (first + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        pairs = tl.load(pairs_ptr + rows)
        live = pairs >= 0
        tok64 = (tl.where(live, pairs, 0) // TOP_K).to(tl.int64)
        a_rows = tok64 if A_GATHER else rows.to(tl.int64)
        b_rows = tok64 if B_GATHER else rows.to(tl.int64)
        at = tl.load(a_ptr + a_rows[:, None] * stride_ar + ns[None, :] * stride_an,
                     mask=live[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_N)
        if A_SCALE:
            w = tl.load(topk_w_ptr + pairs, mask=live, other=0.0).to(ACC)
            at = (at.to(ACC) * w[:, None]).to(a_ptr.dtype.element_ty)
        bt = tl.load(b_ptr + b_rows[:, None] * stride_br + ks[None, :] * stride_bk,
                     mask=live[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        acc = _dot(tl.trans(at), bt, acc, INTERPRET, PRECISION)
        if HAS_BIAS:
            bias += tl.sum(at.to(ACC), axis=0)
    e64 = e.to(tl.int64)
    tl.store(dw_ptr + e64 * stride_we + ns[:, None] * stride_wn + ks[None, :] * stride_wk,
             acc.to(dw_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])
    if HAS_BIAS:
        if k_tile == 0:
            tl.store(db_ptr + e64 * stride_be + ns * stride_bn, bias.to(db_ptr.dtype.element_ty), mask=n_ok)


# -- configs ------------------------------------------------------------------------------------

KINDS = ("down_backward", "dx_rows", "weight_grad")


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def default_config(kind: str, E: int, N: int, K_dim: int, dtype: torch.dtype) -> dict:
    """A known-good config per kernel (BLOCK_M of down_backward and dx_rows is the routing's tile_m,
    set by the launcher; weight_grad's BLOCK_M is that tile too). N is the output width (I for
    down_backward, H for dx_rows, the gradient's N for weight_grad), K_dim the reduction."""
    if kind not in KINDS:
        raise ValueError(f"backward default_config: kind {kind!r} not in {KINDS}")
    wide = dtype != torch.float32
    # down_backward keeps three accumulators (g, hg, hu): a narrower N than the forward's gate_up
    block_n = _block(N, 32 if kind == "down_backward" else 64)
    block_k = _block(K_dim, 64 if wide else 32)
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8, "num_warps": 4, "num_stages": 3 if wide else 2}


def config_space(kind: str, E: int, N: int, K_dim: int, dtype: torch.dtype) -> list[dict]:
    """Candidates for autotune, the default first: power-of-two N and K tiles, warps and stages."""
    base = default_config(kind, E, N, K_dim, dtype)
    space = [dict(base, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)
             for bn in sorted({_block(N, 32), _block(N, 64), _block(N, 128)})
             for bk in sorted({_block(K_dim, 32), _block(K_dim, 64)})
             for nw in (4, 8) for ns in (2, 3)]
    return [base] + [c for c in space if c != base]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulators' torch dtype (grouped_gemm._acc): float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _config(kind, config, E, N, K_dim, dtype) -> dict:
    cfg = dict(default_config(kind, E, N, K_dim, dtype), **(config or {}))
    for name in ("BLOCK_N", "BLOCK_K"):
        if cfg[name] < 16 or cfg[name] & (cfg[name] - 1):
            raise ValueError(f"{kind}: config {name}={cfg[name]} must be a power of two >= 16")
    return cfg


# -- launchers ----------------------------------------------------------------------------------


def _check_like(what: str, name: str, t: Tensor, shape: tuple, like: Tensor) -> None:
    if tuple(t.shape) != shape or t.device != like.device:
        raise ValueError(f"{what}: {name} must be {shape} on {like.device}, got {tuple(t.shape)} on {t.device}")


def down_backward(dout: Tensor, x: Tensor, sorted_pairs: Tensor, tile_expert: Tensor, w: Tensor,
                  bias: Tensor | None, w_down: Tensor, bias_down: Tensor | None, topk_w: Tensor, *, top_k: int,
                  tile_m: int, activation: str, gated: bool, layout: str, transposed: bool, act_alpha: float,
                  act_limit: float, w_up: Tensor | None = None, bias_up: Tensor | None = None,
                  pre: Tensor | None = None, config: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """GEMM 2's backward with GEMM 1's activation backward fused: -> dh (P, 2I or I), a (P, I) in
    x's dtype, dw_rows (P,) in acc_dtype (the top-k weight's gradient per sorted row).

    Weights as for gemm_gate_up and gemm_down; topk_w (T, K) float; pre (P, 2I) or (P, I), the
    forward's pre-activations [hg | hu] in concat order, read instead of recomputing GEMM 1.
    """
    what = "down_backward"
    wg, wu, bg, bu, I = _gate_up_views(x, w, w_up, bias, bias_up, activation=activation, gated=gated,
                                       layout=layout, transposed=transposed, what=what,
                                       dtypes=_GRAD_DTYPES)
    P = _check_routing(what, sorted_pairs, tile_expert, tile_m, x.device)
    T, H = x.shape
    _check_like(what, "dout", dout, (T, H), x)
    _check_dtype(what, dout, _GRAD_DTYPES)
    dh, a = x.new_empty(P, 2 * I if gated else I), x.new_empty(P, I)
    _, wd = _down_checks(a, sorted_pairs, tile_expert, w_down, bias_down, topk_w, top_k, tile_m, transposed,
                         _GRAD_DTYPES)
    if tuple(topk_w.shape) != (T, top_k):
        raise ValueError(f"{what}: topk_w must be ({T}, {top_k}), got {tuple(topk_w.shape)}")
    width = 2 * I if gated else I
    if pre is not None:
        _check_like(what, "pre", pre, (P, width), x)
        if pre.stride(-1) != 1:
            raise ValueError(f"{what}: pre must have unit column stride")
    E = wg.shape[0]
    cfg = _config(what, config, E, I, H, x.dtype)
    n_tiles = triton.cdiv(I, cfg["BLOCK_N"])
    dwp = torch.zeros(P, n_tiles, dtype=acc_dtype(x.dtype), device=x.device)
    if T == 0 or P == 0:
        return dh.zero_(), a.zero_(), dwp.sum(1)
    num_m_tiles = P // tile_m
    wu_, bg_ = (wu if wu is not None else wg), (bg if bg is not None else x)
    bu_, bd_ = (bu if bu is not None else bg_), (bias_down if bias_down is not None else x)
    _down_backward_kernel[(num_m_tiles * n_tiles,)](
        dout, x, sorted_pairs.contiguous(), tile_expert.contiguous(), wg, wu_, bg_, bu_, wd, bd_,
        topk_w.contiguous().view(-1), pre if pre is not None else x, dh, a, dwp,
        H, I, top_k, num_m_tiles, float(act_alpha), float(act_limit),
        dout.stride(0), dout.stride(1), x.stride(0), x.stride(1), *wg.stride(), *wu_.stride(),
        *(bg.stride() if bg is not None else (0, 0)), *(bu.stride() if bu is not None else (0, 0)),
        *wd.stride(), *(bias_down.stride() if bias_down is not None else (0, 0)),
        pre.stride(0) if pre is not None else 0, dh.stride(0), a.stride(0), dwp.stride(0),
        ACT=_ACT_CODES[activation], GATED=gated, HAS_BIAS=bias is not None, HAS_DOWN_BIAS=bias_down is not None,
        HAS_PRE=pre is not None, ACC=_acc(x.dtype), INTERPRET=x.device.type == "cpu",
        PRECISION=_precision(x.dtype), BLOCK_M=tile_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return dh, a, dwp.sum(1)


def dx_rows(dh: Tensor, sorted_pairs: Tensor, tile_expert: Tensor, w: Tensor, *, hidden: int, tile_m: int,
            gated: bool, layout: str, transposed: bool, activation: str, w_up: Tensor | None = None,
            config: dict | None = None) -> Tensor:
    """GEMM 1's input gradient per sorted row: dh (P, 2I or I) -> (P, H) in acc_dtype: an
    expert's padding rows 0, the rows of tiles no expert owns (past the last group) unwritten."""
    what = "dx_rows"
    _check_dtype(what, dh, _GRAD_DTYPES)
    probe = dh.new_empty(0, hidden)  # _gate_up_views reads H and the dtype off x
    wg, wu, _, _, I = _gate_up_views(probe, w, w_up, None, None, activation=activation, gated=gated,
                                     layout=layout, transposed=transposed, what=what, dtypes=_GRAD_DTYPES)
    P = _check_routing(what, sorted_pairs, tile_expert, tile_m, dh.device)
    _check_like(what, "dh", dh, (P, 2 * I if gated else I), dh)
    if dh.stride(-1) != 1:
        raise ValueError(f"{what}: dh must have unit column stride")
    out = dh.new_empty(P, hidden, dtype=acc_dtype(dh.dtype))
    if P == 0:
        return out
    cfg = _config(what, config, wg.shape[0], hidden, I, dh.dtype)
    num_m_tiles = P // tile_m
    wu_ = wu if wu is not None else wg
    _dx_rows_kernel[(num_m_tiles * triton.cdiv(hidden, cfg["BLOCK_N"]),)](
        dh, sorted_pairs.contiguous(), tile_expert.contiguous(), wg, wu_, out, hidden, I, num_m_tiles,
        dh.stride(0), *wg.stride(), *wu_.stride(), out.stride(0),
        GATED=gated, ACC=_acc(dh.dtype), INTERPRET=dh.device.type == "cpu",
        PRECISION=_precision(dh.dtype), BLOCK_M=tile_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def expert_tiles(counts: Tensor, tile_m: int) -> tuple[Tensor, Tensor]:
    """counts (E,) -> (first tile, number of tiles) of each expert's rows (E,) int32, on device."""
    n = (counts.long() + tile_m - 1) // tile_m
    return (torch.cumsum(n, 0) - n).to(torch.int32), n.to(torch.int32)


def weight_grad(a: Tensor, b: Tensor, sorted_pairs: Tensor, tile_start: Tensor, tile_count: Tensor,
                out: Tensor, bias_out: Tensor | None = None, topk_w: Tensor | None = None, *, top_k: int,
                tile_m: int, a_gather: bool = False, b_gather: bool = False,
                config: dict | None = None) -> Tensor:
    """out[e] = sum over e's rows of A.T @ B, written into out (E, N, K) (any strides, e.g. a view
    of a weight's gradient); bias_out (E, N) gets the sums of A's rows. A row is a sorted row of a,
    or its token's row with a_gather (likewise b); topk_w (T, K) scales A's rows. Returns out."""
    what = "weight_grad"
    for name, t in (("a", a), ("b", b), ("out", out)):
        _check_dtype(f"{what} {name}", t, _GRAD_DTYPES)
    if out.dim() != 3 or a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"{what}: want a (R, N), b (R, K), out (E, N, K); got {tuple(a.shape)}, "
                         f"{tuple(b.shape)}, {tuple(out.shape)}")
    E, N, K_dim = out.shape
    if a.shape[1] != N or b.shape[1] != K_dim:
        raise ValueError(f"{what}: a has {a.shape[1]} columns and b {b.shape[1]}; out wants {N} and {K_dim}")
    for name, t in (("tile_start", tile_start), ("tile_count", tile_count)):
        _check_like(what, name, t, (E,), a)
    if bias_out is not None:
        _check_like(what, "bias_out", bias_out, (E, N), a)
    if out.numel() == 0:
        return out
    cfg = _config(what, config, E, N, K_dim, a.dtype)
    grid = (E, triton.cdiv(N, cfg["BLOCK_N"]) * triton.cdiv(K_dim, cfg["BLOCK_K"]))
    _weight_grad_kernel[grid](
        a, b, sorted_pairs.contiguous(), tile_start.contiguous(), tile_count.contiguous(),
        topk_w.contiguous().view(-1) if topk_w is not None else a, out, bias_out if bias_out is not None else out,
        N, K_dim, top_k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), *out.stride(),
        *(bias_out.stride() if bias_out is not None else (0, 0)),
        A_GATHER=a_gather, A_SCALE=topk_w is not None, B_GATHER=b_gather, HAS_BIAS=bias_out is not None,
        ACC=_acc(a.dtype),
        INTERPRET=a.device.type == "cpu", PRECISION=_precision(a.dtype),
        BLOCK_M=tile_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


# -- eager references (same signatures; fp32 math, the kernels' roundings) ------------------------


def _act_backward_reference(g: Tensor, u: Tensor | None, activation: str, alpha: float, limit: float):
    """(a, da/dg, da/du) in fp32 by autograd of the forward's activation."""
    g = g.detach().requires_grad_()
    u = u.detach().requires_grad_() if u is not None else None
    with torch.enable_grad():
        if u is not None:
            a = moe_torch.gated_activation(g, u, activation, alpha, limit)
        else:
            a = moe_torch._ACTIVATIONS[activation](g)
        grads = torch.autograd.grad(a.sum(), [g] + ([u] if u is not None else []))
    return a.detach(), grads[0], grads[1] if u is not None else None


def down_backward_reference(dout, x, sorted_pairs, tile_expert, w, bias, w_down, bias_down, topk_w, *, top_k,
                            tile_m, activation, gated, layout, transposed, act_alpha, act_limit, w_up=None,
                            bias_up=None, pre=None, config=None):
    """`down_backward` in torch, one expert tile at a time. -> dh, a, dw_rows"""
    wg, wu, bg, bu, I = _gate_up_views(x, w, w_up, bias, bias_up, activation=activation, gated=gated,
                                       layout=layout, transposed=transposed, what="down_backward",
                                       dtypes=_GRAD_DTYPES)
    wd = w_down.transpose(1, 2) if transposed else w_down  # (E, H, I)
    P = sorted_pairs.shape[0]
    dh, a = x.new_zeros(P, 2 * I if gated else I), x.new_zeros(P, I)
    dw_rows = torch.zeros(P, dtype=torch.float32, device=x.device)
    for e, rows in reference.tile_rows(sorted_pairs, tile_expert, tile_m):
        pairs = sorted_pairs[rows].long()
        xs, do = x[pairs // top_k].float(), dout[pairs // top_k].float()
        if pre is not None:
            hg = pre[rows, :I].float()
            hu = pre[rows, I:].float() if gated else None
        else:
            hg = xs @ wg[e].float().T + (bg[e].float() if bg is not None else 0)
            hu = xs @ wu[e].float().T + (bu[e].float() if bu is not None else 0) if gated else None
        act, d_g, d_u = _act_backward_reference(hg, hu, activation, act_alpha, act_limit)
        a_r = act.to(x.dtype)
        g = do @ wd[e].float()  # (rows, I)
        dw_rows[rows] = (g * a_r.float()).sum(1) + ((do * bias_down[e].float()).sum(1) if bias_down is not None else 0)
        da = g * topk_w.reshape(-1)[pairs].float().unsqueeze(1)
        a[rows] = a_r
        dh[rows, :I] = (da * d_g).to(x.dtype)
        if gated:
            dh[rows, I:] = (da * d_u).to(x.dtype)
    return dh, a, dw_rows


def dx_rows_reference(dh, sorted_pairs, tile_expert, w, *, hidden, tile_m, gated, layout, transposed, activation,
                      w_up=None, config=None):
    """`dx_rows` in torch. (P, 2I or I) -> (P, H) float32"""
    probe = dh.new_empty(0, hidden)
    wg, wu, _, _, I = _gate_up_views(probe, w, w_up, None, None, activation=activation, gated=gated,
                                     layout=layout, transposed=transposed, what="dx_rows", dtypes=_GRAD_DTYPES)
    out = torch.zeros(dh.shape[0], hidden, dtype=torch.float32, device=dh.device)
    for e, rows in reference.tile_rows(sorted_pairs, tile_expert, tile_m):
        acc = dh[rows, :I].float() @ wg[e].float()
        if gated:
            acc = acc + dh[rows, I:].float() @ wu[e].float()
        out[rows] = acc
    return out


def weight_grad_reference(a, b, sorted_pairs, tile_start, tile_count, out, bias_out=None, topk_w=None, *, top_k,
                          tile_m, a_gather=False, b_gather=False, config=None):
    """`weight_grad` in torch: per expert, its rows' A.T @ B in fp32 (zeros for an expert with none)."""
    E = out.shape[0]
    starts, ns = tile_start.tolist(), tile_count.tolist()
    for e in range(E):
        rows = torch.arange(starts[e] * tile_m, (starts[e] + ns[e]) * tile_m, device=a.device)
        pairs = sorted_pairs[rows].long()
        rows, pairs = rows[pairs >= 0], pairs[pairs >= 0]
        at = (a[pairs // top_k] if a_gather else a[rows]).float()
        if topk_w is not None:
            at = (at * topk_w.reshape(-1)[pairs].float().unsqueeze(1)).to(a.dtype).float()
        bt = (b[pairs // top_k] if b_gather else b[rows]).float()
        out[e] = (at.T @ bt).to(out.dtype)
        if bias_out is not None:
            bias_out[e] = at.sum(0).to(bias_out.dtype)
    return out
