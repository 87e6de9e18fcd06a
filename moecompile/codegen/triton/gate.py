"""The router as one Triton kernel: logits, scores, expert choice, top-k and per-expert counts.

    Matches:   moe_torch.route with router_fp32 and no capacity
        logits = x @ W_router.T (+ b_router)                   (T, E)   in x's dtype or fp32
        scores = softmax | sigmoid(logits.float())              (T, E)   fp32
        choice = scores (+ correction bias), groups masked       (T, E)
        w, ids = topk(choice, K)  [w = scores[ids] if gather]   (T, K)
        w      = w / (w.sum(-1) + eps) * routed_scaling          (T, K)
    Rewrites to:
        _gate_kernel[cdiv(T, BLOCK_T)]                          one program per BLOCK_T token rows
            -> w (T, K) fp32 (logits dtype if weights_in_input_dtype), ids (T, K) int32,
               counts (E,) int32 = histogram of ids (one integer atomic add per expert and program)

Each program owns BLOCK_T whole rows: it reduces H in BLOCK_H chunks into a (BLOCK_T, BLOCK_E) fp32
tile of logits, so every later step (softmax over E, groups, K rounds of argmax) is row-local and
needs no other program. E is padded to BLOCK_E with columns that are never picked.

Ties: every argmax (top-k, top groups) takes the lowest index among equal values. torch.topk leaves
the order of equal values unspecified (on CPU it is not lowest-first), so where a row's values tie
at the K-th place (or its group scores tie) the kernel may pick other experts than route; ties
within the K picked only reorder equal weights. Untied inputs give route's ids exactly, in its
order. NaN scores are not ordered as torch orders them (largest) and are not supported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...ir import MoESpec
from ..moe_torch import route
from .grouped_gemm import _dot

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# One program holds several (BLOCK_T, BLOCK_E) fp32 tiles in registers; past 256 experts they no
# longer fit at BLOCK_T = 16 (256 x 16 / 128 threads = 32 registers per tile and thread).
MAX_EXPERTS = 256


@dataclass(frozen=True)
class GateConfig:
    block_t: int  # token rows per program
    block_h: int  # hidden columns per GEMM step
    block_e: int  # experts, padded to a power of two
    num_warps: int = 4


def config(num_experts: int, hidden: int, element_bytes: int = 2) -> GateConfig:
    """The one known-good config per shape bucket (no autotuning: the router is a small GEMM).
    element_bytes: of x and the router weight (the upcast to fp32 happens after the load)."""
    block_e = max(16, triton.next_power_of_2(num_experts))  # tl.dot wants N >= 16
    # Registers: keep BLOCK_T * BLOCK_E at 4096 or less for the wide routers (DeepSeek's 256);
    # compiled for sm_90 at E = 16..256 these use 96..255 registers and spill none.
    block_t = 16 if block_e >= 128 else 32
    # The W tile (BLOCK_H, BLOCK_E) is kept at 32 KiB or less so three pipeline stages fit in
    # shared memory (sm_90 compile at E = 256: 34 KiB in bf16 with BLOCK_H = 64, 68 KiB in fp32
    # with 32). A small H takes one chunk; >= 32 for tl.dot's K dim.
    block_h = min(128, (32 << 10) // (block_e * element_bytes), max(32, triton.next_power_of_2(hidden)))
    return GateConfig(block_t=block_t, block_h=max(32, block_h), block_e=block_e)


# -- kernel -------------------------------------------------------------------------------------


@triton.jit
def _round_to(v, dtype: tl.constexpr):
    """fp32 v rounded to dtype (bf16 or fp16) to nearest even, returned as fp32.

    NOTE: bf16 rounds with integer ops, not v.to(tl.bfloat16): the interpreter's fp32 -> bf16 cast
    truncates (and its "rtne" mode rounds half up), which moved ~half the logits one bf16 ulp off
    torch's. The integer form is the same rounding on every backend (NaN is not kept NaN)."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # keep the top 16 bits, ties to even
        return bits.to(tl.float32, bitcast=True)
    else:
        return v.to(dtype).to(tl.float32)


@triton.jit
def _router_logits(x_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H, stride_xt, stride_xh,
                   stride_we, stride_wh, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   INTERPRET: tl.constexpr, ROUND_TO_X: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_E: tl.constexpr):
    """(BLOCK_T, BLOCK_E) fp32 logits of the program's rows; padded columns are -inf."""
    # int64 row offsets: T * H passes 2^31 at 512K tokens of H = 4096
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xt
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_we
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_ok = hs < H
        xt = tl.load(x_rows + hs[None, :] * stride_xh, mask=row_ok[:, None] & h_ok[None, :], other=0.0)
        wt = tl.load(w_cols + hs[:, None] * stride_wh, mask=h_ok[:, None] & col_ok[None, :], other=0.0)
        # NOTE: 16-bit operands go in upcast, through tf32: bf16 and fp16 values are exact in
        # tf32 and their products exact in fp32, so this is the same GEMM as a 16-bit tl.dot (still
        # on tensor cores), and one the interpreter runs (it multiplies raw bf16 bit patterns in
        # tl.dot: triton-lang/triton#11584). fp32 operands take ieee: torch's fp32 F.linear does
        # not use TF32 by default either. INTERPRET: grouped_gemm._dot's row-invariant product.
        acc = _dot(xt.to(tl.float32), wt.to(tl.float32), acc, INTERPRET, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if ROUND_TO_X:
        # F.linear in x's (16-bit) dtype returns its logits rounded to that dtype; route upcasts after
        acc = _round_to(acc, x_ptr.dtype.element_ty)
    return tl.where(col_ok[None, :], acc, float("-inf"))


@triton.jit
def _softmax_rows(v):
    """Softmax along axis 1; -inf entries (padding) get 0."""
    p = tl.exp(v - tl.max(v, axis=1)[:, None])
    return p / tl.sum(p, axis=1)[:, None]


@triton.jit
def _first_max(v, avail, cols, BLOCK_E: tl.constexpr):
    """Per row: the largest v among avail columns and the lowest column holding it (torch.topk's tie
    rule). Compares with == rather than tl.argmax so a row whose available values are all -inf
    (masked groups) still picks an available column."""
    best = tl.max(tl.where(avail, v, float("-inf")), axis=1)
    idx = tl.min(tl.where(avail & (v == best[:, None]), cols[None, :], BLOCK_E), axis=1)
    return best, idx


@triton.jit
def _limit_groups(choice, cols, col_ok, group_size, masked_score, GROUPS: tl.constexpr,
                  TOP_GROUPS: tl.constexpr, TOP2_SUM: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_E: tl.constexpr):
    """choice with the experts outside each row's TOP_GROUPS best groups set to masked_score."""
    gid = cols // group_size  # (BLOCK_E,) group of each expert column
    # each column holds its group's score, so picking groups is the same argmax as picking experts
    group_score = tl.full((BLOCK_T, BLOCK_E), float("-inf"), dtype=tl.float32)
    for g in range(GROUPS):
        member = col_ok & (gid == g)
        best, first = _first_max(choice, member[None, :], cols, BLOCK_E)
        if TOP2_SUM:
            second, _ = _first_max(choice, member[None, :] & (cols[None, :] != first[:, None]), cols, BLOCK_E)
            best = best + second
        group_score = tl.where(member[None, :], best[:, None], group_score)
    keep = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
    for _ in range(TOP_GROUPS):
        # groups are contiguous, so the lowest column holding the top score is in the lowest group
        _, col = _first_max(group_score, col_ok[None, :] & ~keep, cols, BLOCK_E)
        keep = keep | (gid[None, :] == (col // group_size)[:, None])
    return tl.where(keep, choice, masked_score)


@triton.jit
def _topk(choice, src, cols, col_ok, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
          BLOCK_K: tl.constexpr):
    """K rounds of argmax over choice, in descending order as torch.topk returns them.

    Returns ids (BLOCK_T, BLOCK_K) int32, src at those ids (BLOCK_T, BLOCK_K) fp32 (0 past K) and
    the (BLOCK_T, BLOCK_E) mask of picked experts."""
    kcols = tl.arange(0, BLOCK_K)
    ids = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.int32)
    vals = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    taken = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
    for k in range(K):
        _, idx = _first_max(choice, col_ok[None, :] & ~taken, cols, BLOCK_E)
        pick = cols[None, :] == idx[:, None]
        # a masked sum reads src at the picked column exactly (every other term is +0)
        val = tl.sum(tl.where(pick, src, 0.0), axis=1)
        ids = tl.where(kcols[None, :] == k, idx[:, None], ids)
        vals = tl.where(kcols[None, :] == k, val[:, None], vals)
        taken = taken | pick
    return ids, vals, taken


@triton.jit
def _gate_kernel(
    x_ptr, w_ptr, b_ptr, cb_ptr, out_w_ptr, out_ids_ptr, counts_ptr,
    T, H, E, group_size, stride_xt, stride_xh, stride_we, stride_wh,
    renorm_eps, routed_scaling, masked_score,
    K: tl.constexpr, SOFTMAX: tl.constexpr, SCORE_FIRST: tl.constexpr, GATHER: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_CB: tl.constexpr, GROUPS: tl.constexpr, TOP_GROUPS: tl.constexpr,
    TOP2_SUM: tl.constexpr, RENORM: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
    ROUND_TO_X: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program p owns token rows [p * BLOCK_T, (p + 1) * BLOCK_T): their K weights and ids, and adds
    their picks to counts (E,)."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < E
    kcols = tl.arange(0, BLOCK_K)
    k_ok = kcols < K
    logits = _router_logits(x_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, H, stride_xt, stride_xh,
                            stride_we, stride_wh, HAS_BIAS, DOT_PRECISION, INTERPRET, ROUND_TO_X,
                            BLOCK_T, BLOCK_H, BLOCK_E)
    if SCORE_FIRST:
        if SOFTMAX:
            scores = _softmax_rows(logits)
        else:
            scores = tl.sigmoid(logits)
        choice = scores
        if HAS_CB:
            # the correction bias steers which experts are chosen, never their weights
            choice += tl.load(cb_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if GROUPS > 1:
            choice = _limit_groups(choice, cols, col_ok, group_size, masked_score, GROUPS, TOP_GROUPS,
                                   TOP2_SUM, BLOCK_T, BLOCK_E)
        if GATHER:
            ids, w, taken = _topk(choice, scores, cols, col_ok, K, BLOCK_T, BLOCK_E, BLOCK_K)
        else:
            ids, w, taken = _topk(choice, choice, cols, col_ok, K, BLOCK_T, BLOCK_E, BLOCK_K)
    else:
        ids, top_logits, taken = _topk(logits, logits, cols, col_ok, K, BLOCK_T, BLOCK_E, BLOCK_K)
        if SOFTMAX:
            w = _softmax_rows(tl.where(k_ok[None, :], top_logits, float("-inf")))
        else:
            w = tl.where(k_ok[None, :], tl.sigmoid(top_logits), 0.0)
    if RENORM:
        w = w / (tl.sum(w, axis=1) + renorm_eps)[:, None]  # columns past K hold 0
    w = w * routed_scaling

    out = rows.to(tl.int64)[:, None] * K + kcols[None, :]
    out_ok = row_ok[:, None] & k_ok[None, :]
    if out_w_ptr.dtype.element_ty != tl.float32:
        w = _round_to(w, out_w_ptr.dtype.element_ty)  # exact in the output dtype: the store only narrows
    tl.store(out_w_ptr + out, w.to(out_w_ptr.dtype.element_ty), mask=out_ok)
    tl.store(out_ids_ptr + out, ids, mask=out_ok)
    # ids within a row are distinct, so a column sum of the picked mask is this block's histogram:
    # one atomic per expert and program, and integer adds are exact in any order
    per_expert = tl.sum((taken & row_ok[:, None]).to(tl.int32), axis=0)
    tl.atomic_add(counts_ptr + cols, per_expert, mask=col_ok & (per_expert > 0))


# -- launcher -----------------------------------------------------------------------------------


def _spec(x: Tensor, router_weight: Tensor, router_bias: Tensor | None, correction_bias: Tensor | None,
          **router) -> MoESpec:
    """The router's arguments as the spec route() reads; MoESpec validates the combination."""
    E, H = router_weight.shape
    return MoESpec(num_experts=E, hidden=H, intermediate=1, router_bias=router_bias is not None,
                   router_fp32=True, correction_bias=correction_bias is not None,
                   dtype=str(x.dtype).removeprefix("torch."), **router)


def _check(x: Tensor, router_weight: Tensor, router_bias: Tensor | None, correction_bias: Tensor | None,
           router_gemm_fp32: bool) -> None:
    if x.dim() != 2 or router_weight.dim() != 2 or x.shape[1] != router_weight.shape[1]:
        raise ValueError(f"gate: expected x (T, H) and router_weight (E, H); got {tuple(x.shape)} and "
                         f"{tuple(router_weight.shape)}")
    E = router_weight.shape[0]
    if not 1 <= E <= MAX_EXPERTS:
        raise ValueError(f"gate: {E} experts; the kernel handles 1..{MAX_EXPERTS}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"gate: x is {x.dtype}; the kernel takes {_DTYPES} (use gate_reference)")
    for name, t in (("router_bias", router_bias), ("correction_bias", correction_bias)):
        if t is not None and (t.shape != (E,) or t.dtype not in _DTYPES):
            raise ValueError(f"gate: {name} must be ({E},) in one of {_DTYPES}; got {tuple(t.shape)} {t.dtype}")
    if not router_gemm_fp32:  # F.linear in x's dtype needs its operands in that dtype
        for name, t in (("router_weight", router_weight), ("router_bias", router_bias)):
            if t is not None and t.dtype != x.dtype:
                raise ValueError(f"gate: {name} is {t.dtype} but x is {x.dtype} (router_gemm_fp32=False)")
    for name, t in (("router_weight", router_weight), ("router_bias", router_bias),
                    ("correction_bias", correction_bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"gate: {name} is on {t.device}, x on {x.device}")
    if x.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(f"gate: x is on {x.device}; Triton runs there only with TRITON_INTERPRET=1 set "
                         "before triton is imported")


def gate(x: Tensor, router_weight: Tensor, router_bias: Tensor | None, correction_bias: Tensor | None, *,
         top_k: int, scoring: str, topk_order: str, renormalize: bool, renorm_eps: float,
         routed_scaling: float, groups: int, top_groups: int, group_score: str, masked_score: float,
         weights_from: str, router_gemm_fp32: bool, weights_in_input_dtype: bool
         ) -> tuple[Tensor, Tensor, Tensor]:
    """x (T, H) -> w (T, K) fp32 (logits dtype if weights_in_input_dtype), ids (T, K) int32 and
    counts (E,) int32, as gate_reference; raises ValueError for what the kernel does not take."""
    _check(x, router_weight, router_bias, correction_bias, router_gemm_fp32)
    spec = _spec(x, router_weight, router_bias, correction_bias, top_k=top_k, scoring=scoring,
                 topk_order=topk_order, renormalize=renormalize, renorm_eps=renorm_eps,
                 routed_scaling=routed_scaling, groups=groups, top_groups=top_groups,
                 group_score=group_score, masked_score=masked_score, weights_from=weights_from,
                 router_gemm_fp32=router_gemm_fp32, weights_in_input_dtype=weights_in_input_dtype)
    (T, H), E, K = x.shape, spec.num_experts, spec.top_k
    if spec.groups > 1 and spec.group_score == "top2_sum" and E // spec.groups < 2:
        raise ValueError(f"gate: group_score='top2_sum' needs 2 or more experts per group; {E} experts "
                         f"in {spec.groups} groups")
    logits_dtype = torch.float32 if router_gemm_fp32 else x.dtype
    w = torch.empty((T, K), dtype=logits_dtype if weights_in_input_dtype else torch.float32, device=x.device)
    ids = torch.empty((T, K), dtype=torch.int32, device=x.device)
    counts = torch.zeros(E, dtype=torch.int32, device=x.device)
    if T == 0:
        return w, ids, counts
    cfg = config(E, H, x.element_size())
    bias = router_bias.contiguous() if router_bias is not None else router_weight  # unread if absent
    cbias = correction_bias.contiguous() if correction_bias is not None else router_weight
    grid = (triton.cdiv(T, cfg.block_t),)
    _gate_kernel[grid](
        x, router_weight, bias, cbias, w, ids, counts,
        T, H, E, E // spec.groups, x.stride(0), x.stride(1), router_weight.stride(0), router_weight.stride(1),
        float(spec.renorm_eps), float(spec.routed_scaling), float(spec.masked_score),
        K=K, SOFTMAX=spec.scoring == "softmax", SCORE_FIRST=spec.topk_order == "score_then_topk",
        GATHER=spec.weights_from == "gather", HAS_BIAS=router_bias is not None,
        HAS_CB=correction_bias is not None, GROUPS=spec.groups, TOP_GROUPS=spec.top_groups,
        TOP2_SUM=spec.group_score == "top2_sum", RENORM=spec.renormalize,
        DOT_PRECISION="ieee" if router_gemm_fp32 or x.dtype == torch.float32 else "tf32",
        INTERPRET=x.device.type == "cpu",
        ROUND_TO_X=not router_gemm_fp32 and x.dtype != torch.float32,
        BLOCK_T=cfg.block_t, BLOCK_H=cfg.block_h, BLOCK_E=cfg.block_e,
        BLOCK_K=triton.next_power_of_2(K), num_warps=cfg.num_warps,
    )
    return w, ids, counts


def gate_reference(x: Tensor, router_weight: Tensor, router_bias: Tensor | None,
                   correction_bias: Tensor | None, *, top_k: int, scoring: str, topk_order: str,
                   renormalize: bool, renorm_eps: float, routed_scaling: float, groups: int,
                   top_groups: int, group_score: str, masked_score: float, weights_from: str,
                   router_gemm_fp32: bool, weights_in_input_dtype: bool) -> tuple[Tensor, Tensor, Tensor]:
    """gate in eager torch: moe_torch.route itself, ids as int32 and counts = bincount(ids)."""
    spec = _spec(x, router_weight, router_bias, correction_bias, top_k=top_k, scoring=scoring,
                 topk_order=topk_order, renormalize=renormalize, renorm_eps=renorm_eps,
                 routed_scaling=routed_scaling, groups=groups, top_groups=top_groups,
                 group_score=group_score, masked_score=masked_score, weights_from=weights_from,
                 router_gemm_fp32=router_gemm_fp32, weights_in_input_dtype=weights_in_input_dtype)
    weights = {"router_weight": router_weight}
    if router_bias is not None:
        weights["router_bias"] = router_bias
    if correction_bias is not None:
        weights["router_correction_bias"] = correction_bias
    w, ids = route(x, weights, spec)
    counts = torch.bincount(ids.reshape(-1), minlength=spec.num_experts).to(torch.int32)
    return w, ids.to(torch.int32), counts


# Decided when the kernel was decorated: triton.jit reads TRITON_INTERPRET at that moment.
_INTERPRETED = type(_gate_kernel).__name__ == "InterpretedFunction"
