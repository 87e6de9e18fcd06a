"""The routed experts for a few tokens (decode): each active expert's weights read once, no tiles.

    Matches:   the grouped path at small T*K (decode, T*K <= E: about one row per active expert)
        a   = gemm_gate_up(x, sorted_pairs, tile_expert, W_gate_up)     (P, I)  rows padded to tile_m
        y   = gemm_down(a, sorted_pairs, tile_expert, W_down, topk_w)   (P, H)
        out = combine(y, inv)                                            (T, H)
    Rewrites to:
        order, a = decode_gate_up(x, ids, W_gate_up)                     (S,) int32, (S, I)  no padding
        y        = decode_down(a, order, ids, W_down, topk_w)            (S, H)  fp32, top-k weight fused
        out      = combine(y, inv = order^-1)                            (T, H)  grouped_gemm's, k in order
    or the three at once: out = moe_decode(x, ids, topk_w, W_gate_up, ..., W_down, ...)

`order (S,) int32` is the flat pairs p = t*K + k sorted by expert (a stable device sort, no host
sync), so the rows of one expert are a run of adjacent sorted rows, in increasing p. Row i of a and y
is pair order[i]. A token picks an expert at most once (top-k does), so a run has at most T rows.

Program (i, n) owns sorted row i's run times BLOCK_N output columns, if row i starts a run (i = 0
or its expert differs from row i-1's); every other program returns at once. It walks K_dim in
BLOCK_K steps, loads each (BLOCK_K, BLOCK_N) weight tile of the run's expert once, and multiplies
it by each of the run's rows in turn (broadcast multiply + tl.sum: a GEMV, with no 16-row minimum
as tl.dot has). So the weights of an active expert are read once per layer, and nothing is padded.

Numerics, as the grouped GEMMs': fp32 accumulation, one rounding per GEMM output, after bias,
activation and top-k weight; the two differ only in summation order. Each row's sums run over the
same weight tiles in the same order whatever the run holds, so a token's output does not depend on
the other tokens in the batch (for a fixed config: the config must not depend on T).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import moe_torch
from . import grouped_gemm as gg
from .grouped_gemm import _ACT_CODES, _activation

# Most tokens the decode path takes: a run's rows sit in (MAX_ROWS, BLOCK_N) fp32 accumulators,
# MAX_ROWS = next_power_of_2(T), 16 x 64 x 2 (gate and up) = 16 registers a thread at 4 warps.
# From 16 rows on, one expert's rows fill tl.dot's 16-row minimum and the grouped GEMMs pay.
MAX_TOKENS = 16
_KINDS = ("gate_up", "down")


def applies(num_tokens: int, top_k: int, num_experts: int) -> bool:
    """Whether the decode path should run this call instead of the grouped GEMMs: at most
    MAX_TOKENS tokens and about one row per active expert (T*K <= E), or so few rows (<= 16) that
    even one expert's tile would be mostly padding."""
    return 0 < top_k <= num_experts and num_tokens <= MAX_TOKENS and num_tokens * top_k <= max(num_experts, 16)


# -- kernels ------------------------------------------------------------------------------------


@triton.jit
def _run(i, order_ptr, ids_ptr, S, MAX_ROWS: tl.constexpr):
    """Sorted row i -> (expert, whether row i starts its run, the run's rows). The rows of one
    expert are adjacent in sorted order, so the run is the rows i + j whose expert is e."""
    e = tl.load(ids_ptr + tl.load(order_ptr + i))
    prev = tl.load(ids_ptr + tl.load(order_ptr + tl.maximum(i - 1, 0)))
    j = i + tl.arange(0, MAX_ROWS)
    j_ok = j < S
    same = tl.load(ids_ptr + tl.load(order_ptr + j, mask=j_ok, other=0), mask=j_ok, other=-1) == e
    return e, (i == 0) | (prev != e), tl.sum((same & j_ok).to(tl.int32), axis=0)


@triton.jit
def _decode_gate_up_kernel(
    x_ptr, order_ptr, ids_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, a_ptr,
    S, H, I, TOP_K, alpha, limit,
    stride_xt, stride_xh, stride_wge, stride_wgn, stride_wgk, stride_wue, stride_wun, stride_wuk,
    stride_bge, stride_bgn, stride_bue, stride_bun, stride_as, stride_ai,
    ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, MAX_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """a[i + j, n] = act(x[tok] @ Wg[e, n].T + bg) * (x[tok] @ Wu[e, n].T + bu)     (S, I)

    Program (i, n_tile) owns the run starting at sorted row i (rows of expert e, tok = order // K)
    times BLOCK_N of the I outputs; it loads each gate and up weight tile once and applies it to
    every row of the run. Not gated: Wg is the one projection.
    """
    i = tl.program_id(0)
    e, leads, n_rows = _run(i, order_ptr, ids_ptr, S, MAX_ROWS)
    if leads:
        r = tl.arange(0, MAX_ROWS)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < I
        e64 = e.to(tl.int64)
        wg_cols = wg_ptr + e64 * stride_wge + cols[None, :] * stride_wgn
        wu_cols = wu_ptr + e64 * stride_wue + cols[None, :] * stride_wun
        acc_g = tl.zeros((MAX_ROWS, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((MAX_ROWS, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < H
            w_ok = k_ok[:, None] & col_ok[None, :]
            wg = tl.load(wg_cols + ks[:, None] * stride_wgk, mask=w_ok, other=0.0).to(tl.float32)  # (BLOCK_K, BLOCK_N)
            if GATED:
                wu = tl.load(wu_cols + ks[:, None] * stride_wuk, mask=w_ok, other=0.0).to(tl.float32)
            for j in range(0, n_rows):
                # int64: T*H passes 2^31 in general; offsets within a row stay int32
                tok = (tl.load(order_ptr + i + j) // TOP_K).to(tl.int64)
                xr = tl.load(x_ptr + tok * stride_xt + ks * stride_xh, mask=k_ok, other=0.0).to(tl.float32)
                row = (r == j)[:, None]
                acc_g = tl.where(row, acc_g + tl.sum(xr[:, None] * wg, axis=0)[None, :], acc_g)
                if GATED:
                    acc_u = tl.where(row, acc_u + tl.sum(xr[:, None] * wu, axis=0)[None, :], acc_u)
        if HAS_BIAS:
            acc_g += tl.load(bg_ptr + e64 * stride_bge + cols * stride_bgn, mask=col_ok,
                             other=0.0).to(tl.float32)[None, :]
            if GATED:
                acc_u += tl.load(bu_ptr + e64 * stride_bue + cols * stride_bun, mask=col_ok,
                                 other=0.0).to(tl.float32)[None, :]
        h = _activation(acc_g, acc_u, alpha, limit, ACT, GATED)
        a_ptrs = a_ptr + (i + r).to(tl.int64)[:, None] * stride_as + cols[None, :] * stride_ai
        tl.store(a_ptrs, h.to(a_ptr.dtype.element_ty), mask=(r < n_rows)[:, None] & col_ok[None, :])


@triton.jit
def _decode_down_kernel(
    a_ptr, order_ptr, ids_ptr, w_ptr, b_ptr, topk_w_ptr, y_ptr,
    S, N, K_DIM,
    stride_as, stride_ak, stride_we, stride_wn, stride_wk, stride_be, stride_bn, stride_ys, stride_yn,
    HAS_BIAS: tl.constexpr, HAS_TOPK_W: tl.constexpr, MAX_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y[i + j, n] = (a[i + j] @ Wd[e, n].T + bd) * topk_w.flat[order[i + j]]     (S, I) -> (S, H)

    Program (i, n_tile) owns the run starting at sorted row i times BLOCK_N of the H outputs, as
    in gate_up; a's rows are already in sorted order, so no gather.
    """
    i = tl.program_id(0)
    e, leads, n_rows = _run(i, order_ptr, ids_ptr, S, MAX_ROWS)
    if leads:
        r = tl.arange(0, MAX_ROWS)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        e64 = e.to(tl.int64)
        w_cols = w_ptr + e64 * stride_we + cols[None, :] * stride_wn
        acc = tl.zeros((MAX_ROWS, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K_DIM, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K_DIM
            wt = tl.load(w_cols + ks[:, None] * stride_wk, mask=k_ok[:, None] & col_ok[None, :],
                         other=0.0).to(tl.float32)  # (BLOCK_K, BLOCK_N)
            for j in range(0, n_rows):
                ar = tl.load(a_ptr + (i + j).to(tl.int64) * stride_as + ks * stride_ak, mask=k_ok,
                             other=0.0).to(tl.float32)
                acc = tl.where((r == j)[:, None], acc + tl.sum(ar[:, None] * wt, axis=0)[None, :], acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + e64 * stride_be + cols * stride_bn, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        live = r < n_rows
        if HAS_TOPK_W:
            pairs = tl.load(order_ptr + i + r, mask=live, other=0)
            acc *= tl.load(topk_w_ptr + pairs, mask=live, other=0.0).to(tl.float32)[:, None]
        y_ptrs = y_ptr + (i + r).to(tl.int64)[:, None] * stride_ys + cols[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=live[:, None] & col_ok[None, :])


# -- configs ------------------------------------------------------------------------------------


def default_config(kind: str, N: int, K_dim: int, dtype: torch.dtype) -> dict:
    """One config per kernel: `gate_up` (N = I, K_dim = H) or `down` (N = H, K_dim = I). It does not
    depend on T, so a token's output bits do not either.

    NOTE: not tuned on a GPU yet. A (BLOCK_K, BLOCK_N) fp32 product is 32 registers a thread at
    64 x 64 and 4 warps; gate_up holds two (gate and up), down one, so down takes twice the N.
    The grid is (S, N / BLOCK_N): a decode step of K = 8 on I = 2048 already gives 256 programs.
    """
    if kind not in _KINDS:
        raise ValueError(f"decode default_config: kind {kind!r} not in {_KINDS}")
    block_n = gg._block(N, 64 if kind == "gate_up" else 128)
    block_k = gg._block(K_dim, 64 if dtype != torch.float32 else 32)
    # NOTE: the K loop holds the row loop, so the pipeliner leaves it alone; stages buy nothing
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": 4, "num_stages": 1}


def _resolve_config(kind: str, config: dict | None, N: int, K_dim: int, dtype: torch.dtype) -> dict:
    cfg = dict(default_config(kind, N, K_dim, dtype), **(config or {}))
    for name in ("BLOCK_N", "BLOCK_K"):
        v = cfg[name]
        if v < 1 or v & (v - 1):
            raise ValueError(f"decode_{kind}: config {name}={v} must be a power of two")
    return cfg


# -- launchers ----------------------------------------------------------------------------------


def _check_ids(what: str, ids: Tensor, top_k: int, num_experts: int, num_tokens: int, device) -> None:
    """Values are trusted (checking them would sync with the host): ids in [0, E), distinct per token."""
    if ids.dim() != 2 or ids.dtype != torch.int32 or ids.device != device:
        raise ValueError(f"{what}: ids must be (T, K) int32 on {device}, got {tuple(ids.shape)} {ids.dtype} "
                         f"on {ids.device}")
    if tuple(ids.shape) != (num_tokens, top_k):
        raise ValueError(f"{what}: ids must be ({num_tokens}, {top_k}) for {num_tokens} tokens and "
                         f"top_k={top_k}, got {tuple(ids.shape)}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"{what}: top_k={top_k} must be in [1, E = {num_experts}]")
    if num_tokens > MAX_TOKENS:
        raise ValueError(f"{what}: {num_tokens} tokens; the decode path takes at most {MAX_TOKENS} "
                         "(applies() says when), use the grouped GEMMs")


def _max_rows(num_tokens: int) -> int:
    """Rows one run can hold: a token picks an expert once, so at most T."""
    return triton.next_power_of_2(max(num_tokens, 1))


def sort_pairs(ids: Tensor) -> Tensor:
    """ids (T, K) -> order (S,) int32: the flat pairs t*K + k sorted by expert, stable (increasing
    p within an expert), on ids' device without a host sync."""
    return torch.sort(ids.reshape(-1), stable=True).indices.to(torch.int32)


def inverse(order: Tensor) -> Tensor:
    """order (S,) -> inv (S,) int32, the sorted row of each pair (combine's inv), on the device."""
    inv = torch.empty_like(order)
    inv[order.long()] = torch.arange(order.shape[0], dtype=torch.int32, device=order.device)
    return inv


def _gate_up_checks(x, ids, w, bias, top_k, activation, gated, layout, transposed, w_up, bias_up):
    views = gg._gate_up_views(x, w, w_up, bias, bias_up, activation=activation, gated=gated, layout=layout,
                              transposed=transposed, what="decode_gate_up")
    _check_ids("decode_gate_up", ids, top_k, views[0].shape[0], x.shape[0], x.device)
    return views


def decode_gate_up(x: Tensor, ids: Tensor, w: Tensor, bias: Tensor | None, *, top_k: int, activation: str,
                   gated: bool, layout: str, transposed: bool, act_alpha: float, act_limit: float,
                   w_up: Tensor | None = None, bias_up: Tensor | None = None,
                   config: dict | None = None) -> tuple[Tensor, Tensor]:
    """First GEMM with the token gather and the activation fused, for T <= MAX_TOKENS:
    x (T, H), ids (T, K) int32 -> order (S,) int32, a (S, I) in x's dtype, row i for pair order[i].

    Weights as gemm_gate_up takes them: the fused gate_up (E, 2I, H) (transposed (E, H, 2I)) for
    concat / interleaved; gate_proj (E, I, H) with w_up = up_proj for separate; up_proj (E, I, H)
    when not gated. bias (E, 2I) or (E, I), bias_up (E, I) for separate.
    """
    wg, wu, bg, bu, I = _gate_up_checks(x, ids, w, bias, top_k, activation, gated, layout, transposed,
                                        w_up, bias_up)
    T, H = x.shape
    order = sort_pairs(ids)
    S = order.shape[0]
    a = x.new_empty(S, I)
    if S == 0 or I == 0:
        return order, a
    cfg = _resolve_config("gate_up", config, I, H, x.dtype)
    grid = (S, triton.cdiv(I, cfg["BLOCK_N"]))
    wu = wg if wu is None else wu  # not gated: never read
    bg_ = bg if bg is not None else x  # no bias: a dummy pointer, never read
    bu_ = bu if bu is not None else bg_
    _decode_gate_up_kernel[grid](
        x, order, ids.contiguous(), wg, wu, bg_, bu_, a,
        S, H, I, top_k, float(act_alpha), float(act_limit),
        x.stride(0), x.stride(1), *wg.stride(), *wu.stride(),
        *(bg.stride() if bg is not None else (0, 0)), *(bu.stride() if bu is not None else (0, 0)),
        a.stride(0), a.stride(1),
        ACT=_ACT_CODES[activation], GATED=gated, HAS_BIAS=bias is not None, MAX_ROWS=_max_rows(T),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return order, a


def _down_checks(a, order, ids, w_down, bias, topk_w, top_k, transposed):
    what = "decode_down"
    gg._check_dtype(what, a)
    if w_down.dim() != 3:
        raise ValueError(f"{what}: w_down must be (E, H, I) or transposed (E, I, H), got {tuple(w_down.shape)}")
    out_in = w_down.transpose(1, 2) if transposed else w_down  # (E, H, I) view
    E, H, I = out_in.shape
    gg._check_weight(f"{what} w_down", w_down, (E, I, H) if transposed else (E, H, I), a.device, a.dtype)
    T = ids.shape[0] if ids.dim() == 2 else -1
    _check_ids(what, ids, top_k, E, T, a.device)
    S = T * top_k
    if order.dim() != 1 or order.dtype != torch.int32 or order.shape[0] != S or order.device != a.device:
        raise ValueError(f"{what}: order must be ({S},) int32 on {a.device} (decode_gate_up's), got "
                         f"{tuple(order.shape)} {order.dtype} on {order.device}")
    if tuple(a.shape) != (S, I):
        raise ValueError(f"{what}: a must be ({S}, {I}) (S = T*K rows, w_down takes I = {I}), got {tuple(a.shape)}")
    if bias is not None:
        gg._check_weight(f"{what} bias", bias, (E, H), a.device, bias.dtype)
    if topk_w is not None and (tuple(topk_w.shape) != (T, top_k) or not topk_w.is_floating_point()
                               or topk_w.device != a.device):
        raise ValueError(f"{what}: topk_w must be ({T}, {top_k}) float on {a.device}, got {tuple(topk_w.shape)} "
                         f"{topk_w.dtype} on {topk_w.device}")
    return out_in


def decode_down(a: Tensor, order: Tensor, ids: Tensor, w_down: Tensor, bias: Tensor | None,
                topk_w: Tensor | None, *, top_k: int, transposed: bool, config: dict | None = None) -> Tensor:
    """Second GEMM with the top-k weighting fused: a (S, I) in sorted order -> y (S, H).

    w_down (E, H, I) (transposed (E, I, H)), bias (E, H). y is float32 when topk_w (T, K) is given
    (as gemm_down: the combine sums the weighted rows in fp32), else a's dtype.
    """
    wd = _down_checks(a, order, ids, w_down, bias, topk_w, top_k, transposed)
    E, H, I = wd.shape
    S = order.shape[0]
    y = a.new_empty(S, H, dtype=torch.float32 if topk_w is not None else a.dtype)
    if S == 0 or H == 0:
        return y
    cfg = _resolve_config("down", config, H, I, a.dtype)
    grid = (S, triton.cdiv(H, cfg["BLOCK_N"]))
    _decode_down_kernel[grid](
        a, order.contiguous(), ids.contiguous(), wd, bias if bias is not None else a,
        topk_w.contiguous() if topk_w is not None else a, y,
        S, H, I,
        a.stride(0), a.stride(1), *wd.stride(), *(bias.stride() if bias is not None else (0, 0)),
        y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, HAS_TOPK_W=topk_w is not None, MAX_ROWS=_max_rows(ids.shape[0]),
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y


def moe_decode(x: Tensor, ids: Tensor, topk_w: Tensor, w: Tensor, bias: Tensor | None, w_down: Tensor,
               bias_down: Tensor | None, *, activation: str, gated: bool, layout: str, transposed: bool,
               act_alpha: float, act_limit: float, w_up: Tensor | None = None, bias_up: Tensor | None = None,
               shared: Tensor | None = None, configs: dict | None = None) -> Tensor:
    """The routed experts of T <= MAX_TOKENS tokens: x (T, H), ids (T, K) int32, topk_w (T, K) float
    -> out (T, H) in x's dtype, plus shared (T, H) (a shared expert's output) added last.

    decode_gate_up, decode_down with the top-k weight, then grouped_gemm.combine (k in order, fp32).
    Weights as decode_gate_up and decode_down take them; configs: {"gate_up": .., "down": ..,
    "combine": ..}, each optional.
    """
    return _chain((decode_gate_up, decode_down, gg.combine), x, ids, topk_w, w, bias, w_down, bias_down,
                  activation=activation, gated=gated, layout=layout, transposed=transposed, act_alpha=act_alpha,
                  act_limit=act_limit, w_up=w_up, bias_up=bias_up, shared=shared, configs=configs)


def _chain(fns, x, ids, topk_w, w, bias, w_down, bias_down, *, activation, gated, layout, transposed, act_alpha,
           act_limit, w_up, bias_up, shared, configs) -> Tensor:
    """moe_decode through fns = (gate_up, down, combine): the kernels or their references."""
    gate_up, down, comb = fns
    configs = configs or {}
    if ids.dim() != 2 or topk_w is None:
        raise ValueError(f"moe_decode: ids (T, K) int32 and topk_w (T, K) float are required, got ids "
                         f"{tuple(ids.shape)} and topk_w {None if topk_w is None else tuple(topk_w.shape)}")
    T, K = ids.shape
    order, a = gate_up(x, ids, w, bias, top_k=K, activation=activation, gated=gated, layout=layout,
                       transposed=transposed, act_alpha=act_alpha, act_limit=act_limit, w_up=w_up,
                       bias_up=bias_up, config=configs.get("gate_up"))
    y = down(a, order, ids, w_down, bias_down, topk_w, top_k=K, transposed=transposed,
             config=configs.get("down"))
    return comb(y, inverse(order), num_tokens=T, top_k=K, out_dtype=x.dtype, shared=shared,
                config=configs.get("combine"))


# -- eager references (same signatures; fp32 math, one rounding, as the kernels) ----------------


def _runs(order: Tensor, ids: Tensor):
    """(expert, sorted rows) of each active expert; checks what the kernels trust."""
    T, K = ids.shape
    if T and (ids < 0).any():
        raise ValueError("decode reference: negative expert ids")
    if K > 1 and T and (torch.sort(ids.long(), dim=1).values.diff(dim=1) == 0).any():
        raise ValueError("decode reference: a token picks the same expert twice; the kernels need "
                         "distinct experts per token (top-k gives them)")
    experts = ids.reshape(-1)[order.long()].long()  # (S,) expert of each sorted row
    for e in experts.unique().tolist():
        yield e, (experts == e).nonzero().view(-1)


def decode_gate_up_reference(x, ids, w, bias, *, top_k, activation, gated, layout, transposed, act_alpha,
                             act_limit, w_up=None, bias_up=None, config=None) -> tuple[Tensor, Tensor]:
    """`decode_gate_up` in torch, one expert at a time. -> order (S,), a (S, I)"""
    wg, wu, bg, bu, I = _gate_up_checks(x, ids, w, bias, top_k, activation, gated, layout, transposed,
                                        w_up, bias_up)
    if ids.numel() and int(ids.max()) >= wg.shape[0]:
        raise ValueError(f"decode_gate_up_reference: expert id {int(ids.max())} >= E = {wg.shape[0]}")
    order = sort_pairs(ids)
    a = x.new_empty(order.shape[0], I)
    for e, rows in _runs(order, ids):
        xs = x[order[rows].long() // top_k].float()
        g = xs @ wg[e].float().T + (bg[e].float() if bg is not None else 0)
        if not gated:
            h = moe_torch._ACTIVATIONS[activation](g)
        else:
            u = xs @ wu[e].float().T + (bu[e].float() if bu is not None else 0)
            h = moe_torch.gated_activation(g, u, activation, act_alpha, act_limit)
        a[rows] = h.to(x.dtype)
    return order, a


def decode_down_reference(a, order, ids, w_down, bias, topk_w, *, top_k, transposed, config=None) -> Tensor:
    """`decode_down` in torch, one expert at a time. (S, I) -> (S, H)"""
    wd = _down_checks(a, order, ids, w_down, bias, topk_w, top_k, transposed)
    y = a.new_empty(a.shape[0], wd.shape[1], dtype=torch.float32 if topk_w is not None else a.dtype)
    for e, rows in _runs(order, ids):
        out = a[rows].float() @ wd[e].float().T + (bias[e].float() if bias is not None else 0)
        if topk_w is not None:
            out = out * topk_w.reshape(-1)[order[rows].long()].float().unsqueeze(-1)
        y[rows] = out.to(y.dtype)
    return y


def moe_decode_reference(x, ids, topk_w, w, bias, w_down, bias_down, *, activation, gated, layout, transposed,
                         act_alpha, act_limit, w_up=None, bias_up=None, shared=None, configs=None) -> Tensor:
    """`moe_decode` from the references. (T, H) -> (T, H)"""
    return _chain((decode_gate_up_reference, decode_down_reference, gg.combine_reference), x, ids, topk_w, w,
                  bias, w_down, bias_down, activation=activation, gated=gated, layout=layout,
                  transposed=transposed, act_alpha=act_alpha, act_limit=act_limit, w_up=w_up, bias_up=bias_up,
                  shared=shared, configs=configs)
