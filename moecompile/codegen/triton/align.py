"""Token-expert pairs sorted by expert and padded to whole GEMM tiles, without a host sync.

    Matches:   ids (T, K) int32, counts (E,) int32 = bincount(ids)          (from gate)
    Rewrites to:
        _align_kernel[E]                        one program per expert
            -> sorted_pairs (P,) int32   flat pair p = t * K + k of each padded row, -1 on padding
               tile_expert  (P // tile_m,) int32   expert of each tile_m rows, -1 past the end
               inv          (S,) int32   row of each pair: sorted_pairs[inv[p]] == p

    rows [start_e, start_e + round_up(counts[e], tile_m))  belong to expert e, in expert order,
    start_e = sum over e' < e of round_up(counts[e'], tile_m); within an expert pairs keep
    increasing p (a stable sort). S = T * K and P = padded_rows(S, E, tile_m), the most that
    padding can take, so every shape is known from T, K, E and tile_m alone.

Program e owns expert e's rows and tiles: it takes its start from a prefix sum over counts, then
scans all S ids in BLOCK_S chunks and gives each of its pairs its rank with a cumsum. That reads the
ids E times (E * S * 4 bytes, mostly from L2: 32 MB at E = 256, S = 32K), the price of needing
no second kernel and no atomics; the output is the same on every run.

Index widths: rows and pair indices are int32 (the launcher checks P < 2^31). A consumer that turns
a pair into an address (row t = p // K times H) must widen to int64 first: T * H passes 2^31 at
512K tokens of H = 4096.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import align_rows, padded_rows

# Rows of ids one scan step covers: a 1024-wide int32 cumsum is 8 registers per thread at 4 warps.
_BLOCK_S = 1024
_INT32_MAX = 2**31 - 1


# -- kernel -------------------------------------------------------------------------------------


@triton.jit
def _align_kernel(ids_ptr, counts_ptr, sorted_ptr, tile_expert_ptr, inv_ptr, S, E,
                  TILE_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr):
    """Program e writes expert e's pairs into sorted_pairs and inv, and its tiles into tile_expert."""
    e = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + experts, mask=experts < E, other=0)
    padded = (counts + TILE_M - 1) // TILE_M * TILE_M
    start = tl.sum(tl.where(experts < e, padded, 0), axis=0)
    placed = 0
    for s0 in range(0, S, BLOCK_S):
        p = s0 + tl.arange(0, BLOCK_S)
        hit = tl.load(ids_ptr + p, mask=p < S, other=-1) == e
        rank = placed + tl.cumsum(hit.to(tl.int32), axis=0) - 1  # stable: ranks follow p
        row = start + rank
        tl.store(sorted_ptr + row, p, mask=hit)
        tl.store(inv_ptr + p, row, mask=hit)
        # every tile of e holds at least one pair (padding < TILE_M), so the pair starting a tile
        # writes it: each tile written once, no loop over a data-dependent tile count
        tl.store(tile_expert_ptr + row // TILE_M, tl.zeros_like(p) + e,
                 mask=hit & (rank % TILE_M == 0))
        placed += tl.sum(hit.to(tl.int32), axis=0)


# -- launcher -----------------------------------------------------------------------------------


def _check(ids: Tensor, counts: Tensor, num_experts: int, tile_m: int) -> None:
    if ids.dim() != 2 or ids.dtype != torch.int32:
        raise ValueError(f"align: ids must be (T, K) int32; got {tuple(ids.shape)} {ids.dtype}")
    if num_experts < 1 or counts.shape != (num_experts,) or counts.dtype != torch.int32:
        raise ValueError(f"align: counts must be ({num_experts},) int32; got {tuple(counts.shape)} "
                         f"{counts.dtype}")
    if counts.device != ids.device:
        raise ValueError(f"align: counts on {counts.device}, ids on {ids.device}")
    # tile_m is the grouped GEMM's M tile: tl.dot wants >= 16 and Triton blocks are powers of two
    if tile_m < 16 or tile_m & (tile_m - 1):
        raise ValueError(f"align: tile_m must be a power of two >= 16; got {tile_m}")
    P = padded_rows(ids.numel(), num_experts, tile_m)
    if P > _INT32_MAX:
        raise ValueError(f"align: {P} padded rows do not fit the int32 row indices")
    if ids.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(f"align: ids are on {ids.device}; Triton runs there only with TRITON_INTERPRET=1 "
                         "set before triton is imported")


def _outputs(S: int, num_experts: int, tile_m: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """sorted_pairs (P,), tile_expert (P // tile_m,), inv (S,), all -1: the padding value (and, in
    inv, what a pair with an id outside [0, E) keeps)."""
    P = padded_rows(S, num_experts, tile_m)
    full = lambda n: torch.full((n,), -1, dtype=torch.int32, device=device)  # noqa: E731
    return full(P), full(P // tile_m), full(S)


def align(ids: Tensor, counts: Tensor, num_experts: int, tile_m: int) -> tuple[Tensor, Tensor, Tensor]:
    """ids (T, K) int32, counts (E,) int32 -> sorted_pairs (P,), tile_expert (P // tile_m,), inv (S,)
    int32 on ids' device. counts must equal bincount(ids) (gate's counts do); not checked here, as
    that would sync with the host."""
    _check(ids, counts, num_experts, tile_m)
    S = ids.numel()
    sorted_pairs, tile_expert, inv = _outputs(S, num_experts, tile_m, ids.device)
    if S == 0:
        return sorted_pairs, tile_expert, inv
    _align_kernel[(num_experts,)](
        ids.contiguous(), counts.contiguous(), sorted_pairs, tile_expert, inv, S, num_experts,
        TILE_M=tile_m, BLOCK_S=min(_BLOCK_S, triton.next_power_of_2(S)),
        BLOCK_E=triton.next_power_of_2(num_experts),
    )
    return sorted_pairs, tile_expert, inv


def align_reference(ids: Tensor, counts: Tensor, num_experts: int, tile_m: int) -> tuple[Tensor, Tensor, Tensor]:
    """align in eager torch (codegen.reference.align_rows: a stable argsort of the ids, rows shifted
    by each expert's padding); checks what the kernel trusts, counts == bincount(ids)."""
    if not torch.equal(counts.long(), torch.bincount(ids.reshape(-1).long(), minlength=num_experts)):
        raise ValueError("align_reference: counts are not bincount(ids)")
    return align_rows(ids, counts, num_experts, tile_m)


# Decided when the kernel was decorated: triton.jit reads TRITON_INTERPRET at that moment.
_INTERPRETED = type(_align_kernel).__name__ == "InterpretedFunction"
