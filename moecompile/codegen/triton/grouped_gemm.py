"""The routed experts as two persistent grouped GEMMs and a deterministic combine.

    Matches:   moe_torch._routed_experts_sorted (no capacity, no shared expert inside)
        xs  = x[perm // K]                                   (S, H)   rows grouped by expert
        h   = act(xs @ W_gate[e].T + b_g) * (xs @ W_up[e].T + b_u)   (S, I)
        y   = (h @ W_down[e].T + b_d) * w[t, k]              (S, H)
        out = sum_k y[(t, k)] (+ shared)                     (T, H)
    Rewrites to:
        a   = gemm_gate_up(x, sorted_pairs, tile_expert, W_gate_up)     (P, I)  x gathered in the prologue
        y   = gemm_down(a, sorted_pairs, tile_expert, W_down, topk_w)   (P, H)  fp32, top-k weight fused
        out = combine(y, inv)                                            (T, H)  k = 0..K-1 in order
    or, the top-k weight in the combine instead of GEMM 2's epilogue:
        y   = gemm_down(a, sorted_pairs, tile_expert, W_down)           (P, H)  a's dtype
        out = combine(y, inv, topk_w)                                    (T, H)  sum_k w[t, k] * y[(t, k)]

The routing metadata comes from the align stage: `sorted_pairs (P,) int32` holds the flat pair
p = t*K + k of each row, rows grouped by expert and each group padded to a multiple of tile_m with -1;
`tile_expert (P // tile_m,) int32` is each tile's expert (-1 past the last group); `inv (S,) int32`
is the row of each pair. P is a static bound, so nothing here syncs with the host.

What the rows hold: padding rows (-1) of a live tile are written as zeros by both GEMMs; tiles of
expert -1 are skipped and keep whatever `torch.empty` gave them. The combine reads only rows that
`inv` names, so neither matters to the output.

Numerics: both GEMMs accumulate in fp32 and round once, after bias, activation and top-k weight;
the torch path rounds each GEMM output and the activation to x's dtype. In bf16 the two differ by
a few bf16 ulps; in fp32 only by summation order. Each row is computed alone and the combine adds
a token's K rows in k order, so a token's output does not depend on the rest of the batch (for a
fixed config: the config must not depend on T).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import moe_torch, reference

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the forward GEMMs (plan.TRITON_DTYPES)
# the backward kernels and the combine also take float64, accumulating in float64 (`_acc`): the
# float64 gradcheck of the backward; the op sends float64 layers to the torch path
_GRAD_DTYPES = _DTYPES + (torch.float64,)
_LAYOUTS = ("concat", "interleaved", "separate")
# activation -> the ACT code the kernels branch on at compile time
_ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "clamped_swiglu": 4, "clamped_silu": 5, "relu2": 6,
              "softcap_swiglu": 7}
# Programs on a device without an SM count (the CPU interpreter): few enough that every program
# walks several work items, so tests exercise the strided loop.
_CPU_PROGRAMS = 4
# Shared memory a config may plan for its pipeline stages: H100 has 228 KiB per SM, minus room for
# the epilogue's layout conversion.
_SMEM_BUDGET = 192 << 10


# -- kernels ------------------------------------------------------------------------------------


@triton.jit
def _work_item(item, tile_expert_ptr, num_m_tiles, num_n_tiles, GROUP_M: tl.constexpr):
    """Work item -> (expert, m_tile, n_tile). Items walk GROUP_M row tiles down before moving to the
    next N tile, so programs running at once share weight tiles (one expert's rows are adjacent
    tiles) and x tiles in L2 (the grouped ordering of Triton's matmul tutorial)."""
    per_group = GROUP_M * num_n_tiles
    first_m = (item // per_group) * GROUP_M
    group_m = tl.minimum(num_m_tiles - first_m, GROUP_M)
    m_tile = first_m + (item % per_group) % group_m
    n_tile = (item % per_group) // group_m
    return tl.load(tile_expert_ptr + m_tile), m_tile, n_tile


@triton.jit
def _dot(a, b, acc, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b. INTERPRET (the launchers set it for CPU tensors, which only Triton's interpreter
    runs): the product as an elementwise multiply and a sum over K, in acc's dtype.

    NOTE: the interpreter's tl.dot is numpy's matmul, and on some CPUs OpenBLAS gives a row other
    bits at another position in the tile (its micro-kernels treat edge rows apart), which breaks the
    kernels' batch invariance under the interpreter only; it also multiplies bf16 as raw uint16 bit
    patterns (triton-lang/triton#11584). The sum over K has the same bits for a row wherever it
    sits, and fp32 products of bf16 values are exact, so this is what a bf16 MMA computes too."""
    if INTERPRET:
        return acc + tl.sum(a.to(acc.dtype)[:, :, None] * b.to(acc.dtype)[None, :, :], axis=1)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _activation(g, u, alpha, limit, ACT: tl.constexpr, GATED: tl.constexpr):
    """fp32 epilogue: act(g) * u, or act(g) alone when not gated (g is then the up projection)."""
    if ACT == 4:  # clamped_swiglu (GPT-OSS); needs gated experts
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        return (u + 1.0) * (g * tl.sigmoid(alpha * g))
    elif ACT == 5:  # clamped_silu (DeepSeek-V4); needs gated experts
        g = tl.minimum(g, limit)
        u = tl.minimum(tl.maximum(u, -limit), limit)
        return g * tl.sigmoid(g) * u
    elif ACT == 7:  # softcap_swiglu (Inkling-2): alpha, limit are the gate's and up's softcaps
        tg = 2.0 * tl.sigmoid(2.0 * g / alpha) - 1.0  # tanh(g / alpha)
        tu = 2.0 * tl.sigmoid(2.0 * u / limit) - 1.0
        return (alpha * tg) * tl.sigmoid(g) * (limit * tu)
    else:
        if ACT == 0:  # silu
            h = g * tl.sigmoid(g)
        elif ACT == 1:  # gelu (erf)
            h = 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
        elif ACT == 2:  # gelu_tanh: 0.5 * (1 + tanh(z)) == sigmoid(2z), z = sqrt(2/pi) (g + 0.044715 g^3)
            h = g * tl.sigmoid(1.5957691216057308 * (g + 0.044715 * g * g * g))
        elif ACT == 6:  # relu2
            h = tl.maximum(g, 0.0)
            h = h * h
        else:  # relu
            h = tl.maximum(g, 0.0)
        if GATED:
            h = h * u
        return h


@triton.jit
def _gate_up_kernel(
    x_ptr, pairs_ptr, tile_expert_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, a_ptr, pre_ptr,
    H, I, TOP_K, num_m_tiles, num_programs, alpha, limit,
    stride_xt, stride_xh, stride_wge, stride_wgn, stride_wgk, stride_wue, stride_wun, stride_wuk,
    stride_bge, stride_bgn, stride_bue, stride_bun, stride_ap, stride_ai, stride_pp,
    ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_PRE: tl.constexpr, INTERPRET: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """a[rows, n] = act(x[tok] @ Wg[e, n].T + bg) * (x[tok] @ Wu[e, n].T + bu)     (P, I)

    Each work item owns a BLOCK_M tile of sorted rows (one expert) times BLOCK_N of the I outputs:
    it gathers the tile's token rows of x, runs the gate and the up accumulators over the same N
    columns side by side, and stores the activated tile once. Not gated: Wg is the one projection.
    SAVE_PRE: the pre-activations [hg | hu] of live rows go to pre (P, 2I or I) too, for the backward.
    Program pid walks items pid, pid + num_programs, ...; tiles of expert -1 are skipped.
    """
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(I, BLOCK_N)
    for item in range(pid, num_m_tiles * num_n_tiles, num_programs):
        e, m_tile, n_tile = _work_item(item, tile_expert_ptr, num_m_tiles, num_n_tiles, GROUP_M)
        if e >= 0:
            rows = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
            pairs = tl.load(pairs_ptr + rows)
            live = pairs >= 0
            # int64: T*K*H and E*2I*H pass 2^31 at real sizes (e.g. 64K tokens x H = 7168); the
            # offsets within one row or one expert matrix stay int32 (checked by the launcher)
            x_rows = x_ptr + (tl.where(live, pairs, 0) // TOP_K).to(tl.int64)[:, None] * stride_xt
            cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < I
            e64 = e.to(tl.int64)
            wg_cols = wg_ptr + e64 * stride_wge + cols[None, :] * stride_wgn
            wu_cols = wu_ptr + e64 * stride_wue + cols[None, :] * stride_wun
            acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < H
                xt = tl.load(x_rows + ks[None, :] * stride_xh, mask=live[:, None] & k_ok[None, :], other=0.0)
                w_ok = k_ok[:, None] & col_ok[None, :]
                wg = tl.load(wg_cols + ks[:, None] * stride_wgk, mask=w_ok, other=0.0)  # (BLOCK_K, BLOCK_N)
                acc_g = _dot(xt, wg, acc_g, INTERPRET, PRECISION)
                if GATED:
                    wu = tl.load(wu_cols + ks[:, None] * stride_wuk, mask=w_ok, other=0.0)
                    acc_u = _dot(xt, wu, acc_u, INTERPRET, PRECISION)
            if HAS_BIAS:
                acc_g += tl.load(bg_ptr + e64 * stride_bge + cols * stride_bgn, mask=col_ok,
                                 other=0.0).to(tl.float32)[None, :]
                if GATED:
                    acc_u += tl.load(bu_ptr + e64 * stride_bue + cols * stride_bun, mask=col_ok,
                                     other=0.0).to(tl.float32)[None, :]
            if SAVE_PRE:  # concat order whatever the weight layout; padding rows are not written
                pre_rows = pre_ptr + rows.to(tl.int64)[:, None] * stride_pp
                pre_ok = live[:, None] & col_ok[None, :]
                tl.store(pre_rows + cols[None, :], acc_g.to(pre_ptr.dtype.element_ty), mask=pre_ok)
                if GATED:
                    tl.store(pre_rows + (I + cols)[None, :], acc_u.to(pre_ptr.dtype.element_ty), mask=pre_ok)
            h = _activation(acc_g, acc_u, alpha, limit, ACT, GATED)
            h = tl.where(live[:, None], h, 0.0)  # padding rows: zeros, not act(bias)
            a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_ap + cols[None, :] * stride_ai
            tl.store(a_ptrs, h.to(a_ptr.dtype.element_ty), mask=col_ok[None, :])


@triton.jit
def _down_kernel(
    a_ptr, pairs_ptr, tile_expert_ptr, w_ptr, b_ptr, topk_w_ptr, y_ptr,
    N, K_DIM, num_m_tiles, num_programs,
    stride_ap, stride_ak, stride_we, stride_wn, stride_wk, stride_be, stride_bn, stride_yp, stride_yn,
    HAS_BIAS: tl.constexpr, HAS_TOPK_W: tl.constexpr, INTERPRET: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y[rows, n] = (a[rows] @ Wd[e, n].T + bd) * topk_w.flat[pair]     (P, I) -> (P, H)

    Each work item owns a BLOCK_M tile of sorted rows (one expert) times BLOCK_N of the H outputs;
    a's rows are already in sorted order, so no gather. The top-k weight of each row's pair scales
    the fp32 accumulator before the one rounding to y's dtype. Same persistent loop as gate_up.
    """
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    for item in range(pid, num_m_tiles * num_n_tiles, num_programs):
        e, m_tile, n_tile = _work_item(item, tile_expert_ptr, num_m_tiles, num_n_tiles, GROUP_M)
        if e >= 0:
            rows = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
            pairs = tl.load(pairs_ptr + rows)
            live = pairs >= 0
            a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_ap  # int64: P*I passes 2^31
            cols = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
            col_ok = cols < N
            e64 = e.to(tl.int64)
            w_cols = w_ptr + e64 * stride_we + cols[None, :] * stride_wn
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K_DIM, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < K_DIM
                at = tl.load(a_rows + ks[None, :] * stride_ak, mask=k_ok[None, :], other=0.0)
                wt = tl.load(w_cols + ks[:, None] * stride_wk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                acc = _dot(at, wt, acc, INTERPRET, PRECISION)
            if HAS_BIAS:
                acc += tl.load(b_ptr + e64 * stride_be + cols * stride_bn, mask=col_ok,
                               other=0.0).to(tl.float32)[None, :]
            if HAS_TOPK_W:
                acc *= tl.load(topk_w_ptr + pairs, mask=live, other=0.0).to(tl.float32)[:, None]
            acc = tl.where(live[:, None], acc, 0.0)
            y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_yp + cols[None, :] * stride_yn
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=col_ok[None, :])


@triton.jit
def _combine_kernel(
    y_ptr, inv_ptr, topk_w_ptr, shared_ptr, out_ptr, T, H, TOP_K,
    stride_yp, stride_yh, stride_st, stride_sh, stride_ot, stride_oh,
    HAS_TOPK_W: tl.constexpr, HAS_SHARED: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """out[t] = ((w[t, 0] * y[inv[t*K]] + w[t, 1] * y[inv[t*K + 1]]) + ...) (+ shared[t])
                                                                         (P, H) -> (T, H)

    Each program owns BLOCK_T tokens times BLOCK_H columns and adds their K rows in k order in fp32,
    each row scaled by its top-k weight w (T, K) when HAS_TOPK_W: no atomics, so the result is
    bitwise reproducible and independent of the other tokens.
    """
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    tok_ok = toks < T
    ok = tok_ok[:, None] & (cols < H)[None, :]
    toks64 = toks.to(tl.int64)  # T*K and T*H pass 2^31 for long prefills
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=ACC)
    for k in range(0, TOP_K):
        rows = tl.load(inv_ptr + toks64 * TOP_K + k, mask=tok_ok, other=0).to(tl.int64)
        yk = tl.load(y_ptr + rows[:, None] * stride_yp + cols[None, :] * stride_yh, mask=ok,
                     other=0.0).to(ACC)
        if HAS_TOPK_W:  # topk_w is contiguous (T, K): pair t*K + k
            yk = yk * tl.load(topk_w_ptr + toks64 * TOP_K + k, mask=tok_ok, other=0.0).to(ACC)[:, None]
        acc += yk
    if HAS_SHARED:
        acc += tl.load(shared_ptr + toks64[:, None] * stride_st + cols[None, :] * stride_sh, mask=ok,
                       other=0.0).to(ACC)
    tl.store(out_ptr + toks64[:, None] * stride_ot + cols[None, :] * stride_oh,
             acc.to(out_ptr.dtype.element_ty), mask=ok)


# -- configs ------------------------------------------------------------------------------------

_KINDS = ("gate_up", "down", "combine")


def _block(n: int, cap: int, floor: int = 16) -> int:
    """Power of two covering n (at least tl.dot's 16), at most cap."""
    return max(floor, min(cap, triton.next_power_of_2(n)))


def default_config(kind: str, E: int, N: int, K_dim: int, dtype: torch.dtype) -> dict:
    """One known-good config: `gate_up` (N = I, K_dim = H), `down` (N = H, K_dim = I) or `combine`
    (N = H; BLOCK_M tokens x BLOCK_N columns per program, BLOCK_K unused).

    BLOCK_M of the GEMMs is the tile_m to build the routing with; it depends on E only, so both
    GEMMs of a layer agree. Each expert pads up to BLOCK_M - 1 rows, so many experts (few rows
    each at decode) take 32-row tiles, few experts 64 (wgmma's M per warpgroup on H100).
    """
    if kind not in _KINDS:
        raise ValueError(f"default_config: kind {kind!r} not in {_KINDS}")
    if kind == "combine":  # memory bound: wide rows, a few tokens per program
        return {"BLOCK_M": 16, "BLOCK_N": _block(N, 256), "BLOCK_K": 1, "num_warps": 4, "num_stages": 1}
    wide = dtype != torch.float32  # 16-bit operands: twice the K per byte of shared memory
    block_m = 64 if E <= 32 else 32
    # gate_up runs two accumulators (gate and up), so half the N of down for the same registers
    block_n = _block(N, 64 if kind == "gate_up" else 128)
    block_k = _block(K_dim, 64 if wide else 32)
    cfg = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8,
           "num_warps": 8 if block_m * block_n * (2 if kind == "gate_up" else 1) >= 8192 else 4,
           "num_stages": 4 if wide else 3}
    return cfg


def _smem_bytes(kind: str, cfg: dict, dtype: torch.dtype) -> int:
    weights = 2 if kind == "gate_up" else 1
    tile = cfg["BLOCK_M"] * cfg["BLOCK_K"] + weights * cfg["BLOCK_K"] * cfg["BLOCK_N"]
    return cfg["num_stages"] * tile * dtype.itemsize


def config_space(kind: str, E: int, N: int, K_dim: int, dtype: torch.dtype) -> list[dict]:
    """Candidate configs for autotuning, the default first. Keyed on power-of-two buckets of N and
    K_dim; BLOCK_M stays the default's (it is the routing's tile_m, shared by both GEMMs), and the
    pipeline stages must fit in shared memory."""
    base = default_config(kind, E, N, K_dim, dtype)
    if kind == "combine":
        space = [dict(base, BLOCK_M=bm, BLOCK_N=bn) for bm in (4, 16, 32)
                 for bn in sorted({_block(N, 128), _block(N, 256), _block(N, 512)})]
    else:
        space = [dict(base, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns)
                 for bn in sorted({_block(N, 32), _block(N, 64), _block(N, 128)})
                 for bk in sorted({_block(K_dim, 32), _block(K_dim, 64), _block(K_dim, 128)})
                 for nw in (4, 8) for ns in (2, 3, 4)]
        space = [c for c in space if _smem_bytes(kind, c, dtype) <= _SMEM_BUDGET]
    return [base] + [c for c in space if c != base]


def _resolve_config(kind: str, config: dict | None, tile_m: int | None, E: int, N: int, K_dim: int,
                    dtype: torch.dtype) -> dict:
    cfg = dict(default_config(kind, E, N, K_dim, dtype))
    if kind != "combine":
        cfg["BLOCK_M"] = tile_m  # the routing's tiles decide it
    cfg.update(config or {})
    if kind != "combine" and cfg["BLOCK_M"] != tile_m:
        raise ValueError(f"{kind}: config BLOCK_M={cfg['BLOCK_M']} must equal the routing's tile_m={tile_m}")
    floor = 1 if kind == "combine" else 16  # tl.dot needs 16 in every dim
    for name in ("BLOCK_M", "BLOCK_N") + (() if kind == "combine" else ("BLOCK_K",)):
        v = cfg[name]
        if v < floor or v & (v - 1):
            raise ValueError(f"{kind}: config {name}={v} must be a power of two >= {floor}")
    return cfg


# -- launchers ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_programs(device: torch.device, work_items: int) -> int:
    """Persistent grid: one program per SM on CUDA (the interpreter: a few), never more than items."""
    full = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else _CPU_PROGRAMS
    return max(1, min(full, work_items))


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for fp32 operands: tf32 only where torch's fp32 matmuls use it too."""
    return "ieee" if dtype != torch.float32 or torch.get_float32_matmul_precision() == "highest" else "tf32"


def _check_dtype(what: str, t: Tensor, dtypes: tuple = _DTYPES) -> None:
    if t.dtype not in dtypes:
        raise ValueError(f"{what}: dtype {t.dtype} not supported (one of {dtypes}); use the torch path")


def _acc(*dtypes: torch.dtype):
    """The accumulators' Triton dtype: float64 where an operand is float64, else float32."""
    return tl.float64 if torch.float64 in dtypes else tl.float32


def _check_routing(what: str, sorted_pairs: Tensor, tile_expert: Tensor, tile_m: int, device) -> int:
    """-> P. Values are trusted (checking them would sync with the host): experts < E, pairs < T*K."""
    if tile_m < 16 or tile_m & (tile_m - 1):
        raise ValueError(f"{what}: tile_m={tile_m} must be a power of two >= 16")
    for name, t in (("sorted_pairs", sorted_pairs), ("tile_expert", tile_expert)):
        if t.dim() != 1 or t.dtype != torch.int32 or t.device != device:
            raise ValueError(f"{what}: {name} must be a 1-D int32 tensor on {device}, got "
                             f"{tuple(t.shape)} {t.dtype} on {t.device}")
    P = sorted_pairs.shape[0]
    if P % tile_m or tile_expert.shape[0] != P // tile_m:
        raise ValueError(f"{what}: sorted_pairs has {P} rows and tile_expert {tile_expert.shape[0]} tiles; "
                         f"want P a multiple of tile_m={tile_m} and P // tile_m tiles")
    return P


def _check_weight(what: str, w: Tensor, shape: tuple, device, dtype) -> None:
    if tuple(w.shape) != shape or w.device != device or w.dtype != dtype:
        raise ValueError(f"{what}: expected {shape} {dtype} on {device}, got {tuple(w.shape)} {w.dtype} "
                         f"on {w.device}")
    if w.dim() == 3 and w[0].numel() >= 2 ** 31:
        raise ValueError(f"{what}: one expert's matrix has {w[0].numel()} elements; the kernels index "
                         "it in int32")


def _gate_up_views(x, w, w_up, bias, bias_up, *, activation, gated, layout, transposed, what="gemm_gate_up",
                   dtypes=_DTYPES):
    """(wg, wu, bg, bu, I): the gate and up weights as strided (E, I, H) views (out, in), biases as
    (E, I) views; no copies. Not gated: wg is up_proj and wu, bu are None. `what` names the caller
    in the error messages; `dtypes` those x may have."""
    _check_dtype(what, x, dtypes)
    if x.dim() != 2:
        raise ValueError(f"{what}: x must be (T, H), got {tuple(x.shape)}")
    if activation not in _ACT_CODES or layout not in _LAYOUTS:
        raise ValueError(f"{what}: activation {activation!r} / layout {layout!r} not in "
                         f"{tuple(_ACT_CODES)} / {_LAYOUTS}")
    if (not gated) and (layout != "concat" or activation in ("clamped_swiglu", "clamped_silu", "softcap_swiglu")):
        raise ValueError(f"{what}: layout {layout!r} and activation {activation!r} need gated experts")
    if (layout == "separate") != (w_up is not None):
        raise ValueError(f"{what}: w_up is given exactly when layout == 'separate' (layout {layout!r})")
    if w.dim() != 3:
        raise ValueError(f"{what}: w must be 3-D (E, out, in) or transposed (E, in, out), got {tuple(w.shape)}")
    H = x.shape[1]
    out_in = w.transpose(1, 2) if transposed else w  # (E, out, in) view
    E, rows = out_in.shape[0], out_in.shape[1]
    fused = gated and layout != "separate"
    if fused and rows % 2:
        raise ValueError(f"{what}: fused gate_up weight has {rows} output rows, want 2I")
    I = rows // 2 if fused else rows
    _check_weight(f"{what} w", w, (E, H, rows) if transposed else (E, rows, H), x.device, x.dtype)
    if bias is not None:
        _check_weight(f"{what} bias", bias, (E, rows), x.device, bias.dtype)
    if not gated:
        return out_in, None, bias, None, I
    if layout == "separate":
        _check_weight(f"{what} w_up", w_up, tuple(w.shape), x.device, x.dtype)
        if (bias is None) != (bias_up is None):
            raise ValueError(f"{what}: give both bias and bias_up, or neither")
        if bias_up is not None:
            _check_weight(f"{what} bias_up", bias_up, (E, I), x.device, bias_up.dtype)
        return out_in, (w_up.transpose(1, 2) if transposed else w_up), bias, bias_up, I
    pick = (slice(0, None, 2), slice(1, None, 2)) if layout == "interleaved" else (slice(0, I), slice(I, None))
    bg, bu = (None, None) if bias is None else (bias[:, pick[0]], bias[:, pick[1]])
    return out_in[:, pick[0]], out_in[:, pick[1]], bg, bu, I


def gemm_gate_up(x: Tensor, sorted_pairs: Tensor, tile_expert: Tensor, w: Tensor, bias: Tensor | None, *,
                 top_k: int, tile_m: int, activation: str, gated: bool, layout: str, transposed: bool,
                 act_alpha: float, act_limit: float, w_up: Tensor | None = None,
                 bias_up: Tensor | None = None, pre: Tensor | None = None, config: dict | None = None) -> Tensor:
    """First GEMM with the token gather and the activation fused: x (T, H) -> a (P, I) in x's dtype.

    w: the fused gate_up weight (E, 2I, H) (transposed (E, H, 2I)) for concat / interleaved; gate_proj
    (E, I, H) with w_up = up_proj for separate; up_proj (E, I, H) when not gated. bias (E, 2I) or
    (E, I), bias_up (E, I) for separate. Padding rows of live tiles hold zeros; tiles of expert -1 are
    not written. `pre` (P, 2I) (not gated: (P, I)) in x's dtype, if given, receives the live rows'
    pre-activations [hg | hu] in concat order (what down_backward reads instead of recomputing).
    """
    wg, wu, bg, bu, I = _gate_up_views(x, w, w_up, bias, bias_up, activation=activation, gated=gated,
                                       layout=layout, transposed=transposed)
    P = _check_routing("gemm_gate_up", sorted_pairs, tile_expert, tile_m, x.device)
    T, H = x.shape
    if pre is not None and (tuple(pre.shape) != (P, 2 * I if gated else I) or pre.dtype != x.dtype
                            or pre.device != x.device or pre.stride(-1) != 1):
        raise ValueError(f"gemm_gate_up: pre must be ({P}, {2 * I if gated else I}) {x.dtype} on {x.device} "
                         f"with unit column stride, got {tuple(pre.shape)} {pre.dtype} on {pre.device}")
    a = x.new_empty(P, I)
    if T == 0 or P == 0:  # no pairs: every tile is -1
        return a
    cfg = _resolve_config("gate_up", config, tile_m, wg.shape[0], I, H, x.dtype)
    num_m_tiles = P // tile_m
    items = num_m_tiles * triton.cdiv(I, cfg["BLOCK_N"])
    grid = (_num_programs(x.device, items),)
    wu = wg if wu is None else wu  # not gated: never read
    bg_ = bg if bg is not None else x  # no bias: a dummy pointer, never read
    bu_ = bu if bu is not None else bg_
    _gate_up_kernel[grid](
        x, sorted_pairs.contiguous(), tile_expert.contiguous(), wg, wu, bg_, bu_, a, pre if pre is not None else a,
        H, I, top_k, num_m_tiles, grid[0], float(act_alpha), float(act_limit),
        x.stride(0), x.stride(1), *wg.stride(), *wu.stride(),
        *(bg.stride() if bg is not None else (0, 0)), *(bu.stride() if bu is not None else (0, 0)),
        a.stride(0), a.stride(1), pre.stride(0) if pre is not None else 0,
        ACT=_ACT_CODES[activation], GATED=gated, HAS_BIAS=bias is not None, SAVE_PRE=pre is not None,
        INTERPRET=x.device.type == "cpu", PRECISION=_precision(x.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg.get("GROUP_M", 8),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return a


def _down_checks(a, sorted_pairs, tile_expert, w_down, bias, topk_w, top_k, tile_m, transposed, dtypes=_DTYPES):
    what = "gemm_down"
    _check_dtype(what, a, dtypes)
    P = _check_routing(what, sorted_pairs, tile_expert, tile_m, a.device)
    if a.dim() != 2 or a.shape[0] != P:
        raise ValueError(f"{what}: a must be (P, I) with P = {P} routing rows, got {tuple(a.shape)}")
    if w_down.dim() != 3:
        raise ValueError(f"{what}: w_down must be (E, H, I) or transposed (E, I, H), got {tuple(w_down.shape)}")
    out_in = w_down.transpose(1, 2) if transposed else w_down  # (E, H, I) view
    E, H, I = out_in.shape
    _check_weight(f"{what} w_down", w_down, (E, I, H) if transposed else (E, H, I), a.device, a.dtype)
    if a.shape[1] != I:
        raise ValueError(f"{what}: a has {a.shape[1]} columns, w_down takes I = {I}")
    if bias is not None:
        _check_weight(f"{what} bias", bias, (E, H), a.device, bias.dtype)
    if topk_w is not None and (topk_w.dim() != 2 or topk_w.shape[1] != top_k or not topk_w.is_floating_point()):
        raise ValueError(f"{what}: topk_w must be (T, {top_k}) float, got {tuple(topk_w.shape)} {topk_w.dtype}")
    return P, out_in


def gemm_down(a: Tensor, sorted_pairs: Tensor, tile_expert: Tensor, w_down: Tensor, bias: Tensor | None,
              topk_w: Tensor | None, *, top_k: int, tile_m: int, transposed: bool,
              config: dict | None = None) -> Tensor:
    """Second GEMM with the top-k weighting fused: a (P, I) -> y (P, H).

    w_down (E, H, I) (transposed (E, I, H)), bias (E, H). y is float32 when topk_w (T, K) is given
    (the combine sums the weighted rows in fp32, as the torch path promotes y * w), else a's dtype.
    Padding rows of live tiles hold zeros; tiles of expert -1 are not written. With topk_w of no
    tokens nothing launches; without topk_w T is unknown here, and the kernel skips every -1 tile.
    """
    P, wd = _down_checks(a, sorted_pairs, tile_expert, w_down, bias, topk_w, top_k, tile_m, transposed)
    E, H, I = wd.shape
    y = a.new_empty(P, H, dtype=torch.float32 if topk_w is not None else a.dtype)
    if P == 0 or (topk_w is not None and topk_w.shape[0] == 0):  # T = 0: every tile is -1
        return y
    cfg = _resolve_config("down", config, tile_m, E, H, I, a.dtype)
    num_m_tiles = P // tile_m
    items = num_m_tiles * triton.cdiv(H, cfg["BLOCK_N"])
    grid = (_num_programs(a.device, items),)
    topk_flat = topk_w.contiguous().view(-1) if topk_w is not None else a  # (T*K,), indexed by pair
    _down_kernel[grid](
        a, sorted_pairs.contiguous(), tile_expert.contiguous(), wd, bias if bias is not None else a,
        topk_flat, y,
        H, I, num_m_tiles, grid[0],
        a.stride(0), a.stride(1), *wd.stride(), *(bias.stride() if bias is not None else (0, 0)),
        y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, HAS_TOPK_W=topk_w is not None,
        INTERPRET=a.device.type == "cpu", PRECISION=_precision(a.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg.get("GROUP_M", 8),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y


def _combine_checks(y, inv, num_tokens, top_k, out_dtype, shared, topk_w):
    what = "combine"
    _check_dtype(what, y, _GRAD_DTYPES)
    if out_dtype not in _GRAD_DTYPES:
        raise ValueError(f"{what}: out_dtype {out_dtype} not supported (one of {_GRAD_DTYPES})")
    if y.dim() != 2 or inv.dim() != 1 or inv.dtype != torch.int32 or inv.shape[0] != num_tokens * top_k \
            or inv.device != y.device:
        raise ValueError(f"{what}: expected y (P, H) and inv ({num_tokens} * {top_k},) int32 on {y.device}, "
                         f"got {tuple(y.shape)} and {tuple(inv.shape)} {inv.dtype} on {inv.device}")
    if shared is not None:
        _check_dtype(f"{what} shared", shared, _GRAD_DTYPES)
        if tuple(shared.shape) != (num_tokens, y.shape[1]) or shared.device != y.device:
            raise ValueError(f"{what}: shared must be ({num_tokens}, {y.shape[1]}) on {y.device}, got "
                             f"{tuple(shared.shape)} on {shared.device}")
    if topk_w is not None and (tuple(topk_w.shape) != (num_tokens, top_k) or not topk_w.is_floating_point()
                               or topk_w.device != y.device):
        raise ValueError(f"{what}: topk_w must be ({num_tokens}, {top_k}) float on {y.device}, got "
                         f"{tuple(topk_w.shape)} {topk_w.dtype} on {topk_w.device}")


def combine(y: Tensor, inv: Tensor, *, num_tokens: int, top_k: int, out_dtype: torch.dtype,
            shared: Tensor | None = None, config: dict | None = None,
            topk_w: Tensor | None = None) -> Tensor:
    """Each token's K expert rows summed in k order in fp32: y (P, H) -> out (T, H) in out_dtype,
    plus shared (T, H) (a shared expert's output) added last. No atomics: deterministic.

    topk_w (T, K) float, when given, scales each row in fp32 before it is added:
    out[t] = sum_k topk_w[t, k] * y[inv[t*K + k]], for a y that gemm_down left unweighted.
    """
    _combine_checks(y, inv, num_tokens, top_k, out_dtype, shared, topk_w)
    H = y.shape[1]
    out = y.new_empty(num_tokens, H, dtype=out_dtype)
    if num_tokens == 0 or H == 0:
        return out
    cfg = _resolve_config("combine", config, None, 0, H, top_k, y.dtype)
    grid = (triton.cdiv(num_tokens, cfg["BLOCK_M"]), triton.cdiv(H, cfg["BLOCK_N"]))
    _combine_kernel[grid](
        y, inv.contiguous(), topk_w.contiguous() if topk_w is not None else y,
        shared if shared is not None else y, out, num_tokens, H, top_k,
        y.stride(0), y.stride(1), *(shared.stride() if shared is not None else (0, 0)),
        out.stride(0), out.stride(1),
        HAS_TOPK_W=topk_w is not None, HAS_SHARED=shared is not None, BLOCK_T=cfg["BLOCK_M"],
        ACC=_acc(y.dtype, out_dtype),
        BLOCK_H=cfg["BLOCK_N"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


# -- eager references (same signatures; fp32 math, one rounding, as the kernels) ----------------


def gemm_gate_up_reference(x, sorted_pairs, tile_expert, w, bias, *, top_k, tile_m, activation, gated, layout,
                           transposed, act_alpha, act_limit, w_up=None, bias_up=None, pre=None,
                           config=None) -> Tensor:
    """`gemm_gate_up` in torch, zeros in every row it does not compute. (P, I); `pre` as the kernel's."""
    wg, wu, bg, bu, I = _gate_up_views(x, w, w_up, bias, bias_up, activation=activation, gated=gated,
                                       layout=layout, transposed=transposed)
    a = x.new_zeros(sorted_pairs.shape[0], I)
    for e, rows in reference.tile_rows(sorted_pairs, tile_expert, tile_m):
        xs = x[sorted_pairs[rows].long() // top_k].float()
        g = xs @ wg[e].float().T + (bg[e].float() if bg is not None else 0)
        if pre is not None:
            pre[rows, :I] = g.to(pre.dtype)
        if not gated:
            h = moe_torch._ACTIVATIONS[activation](g)
        else:
            u = xs @ wu[e].float().T + (bu[e].float() if bu is not None else 0)
            if pre is not None:
                pre[rows, I:] = u.to(pre.dtype)
            h = moe_torch.gated_activation(g, u, activation, act_alpha, act_limit)
        a[rows] = h.to(x.dtype)
    return a


def gemm_down_reference(a, sorted_pairs, tile_expert, w_down, bias, topk_w, *, top_k, tile_m, transposed,
                        config=None) -> Tensor:
    """`gemm_down` in torch, zeros in every row it does not compute. (P, I) -> (P, H)"""
    _, wd = _down_checks(a, sorted_pairs, tile_expert, w_down, bias, topk_w, top_k, tile_m, transposed)
    y = a.new_zeros(a.shape[0], wd.shape[1], dtype=torch.float32 if topk_w is not None else a.dtype)
    for e, rows in reference.tile_rows(sorted_pairs, tile_expert, tile_m):
        out = a[rows].float() @ wd[e].float().T + (bias[e].float() if bias is not None else 0)
        if topk_w is not None:
            out = out * topk_w.reshape(-1)[sorted_pairs[rows].long()].float().unsqueeze(-1)
        y[rows] = out.to(y.dtype)
    return y


def combine_reference(y, inv, *, num_tokens, top_k, out_dtype, shared=None, config=None, topk_w=None) -> Tensor:
    """`combine` in torch: the same k order, fp32 products and sums. (P, H) -> (T, H)"""
    _combine_checks(y, inv, num_tokens, top_k, out_dtype, shared, topk_w)
    return reference.combine_rows(y, inv, topk_w, shared, num_tokens=num_tokens, top_k=top_k, out_dtype=out_dtype)
