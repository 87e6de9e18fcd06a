"""One MoE layer's experts across the ranks of a process group: remap, dispatch, local experts, combine.

Per rank, for its tokens x (T, H), their top-k ids and weights (T, K):

    RemapSlots  ids (T, K)             -> slots (T, K)    logical expert -> one of its replicas: the
                                                          replica on this rank when there is one (no
                                                          traffic), else replica (t * K + k) mod count
    Dispatch    x rows, w, local slot  -> rows of every rank's slots, sorted by destination rank:
                                          per-rank counts exchanged, then all_to_all_single with
                                          uneven splits (the rows, their weights, their local slots)
    Experts     received rows (R, H)   -> w * expert(x) (R, H) by the family's own expert code over
                                          this rank's slots (each row: one slot, one weight)
    Combine     (R, H) back to their senders (the reverse all-to-all), then each token's K rows
                summed in k order: a token's output bits depend on its rows alone, not on the plan
                or the world size

Backward runs the exchanges in reverse: output gradients go out to the rows' ranks, the local
experts' vector-Jacobian product gives the rows' x and w gradients (sent back) and the local slots'
weight gradients; the gradients of a replicated expert are summed over every rank that holds it
(one all-reduce of the replicated experts' rows), so replicas stay identical after an optimizer step.

Host syncs, and why: the receive counts (`recv.tolist()`) size the received buffers and the uneven
splits of all_to_all_single, which take Python lists; one per layer and direction (the backward
reuses the forward's). Everything else stays on the device.

Every rank of the group must call each layer the same number of times in the same order (as in
any data-parallel step); a rank that fails or leaves makes the others' collectives fail when the
group's timeout expires, and the error names the layer and the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class LayerMap:
    """Where one layer's slots live: slot s on rank s // slots_per_rank (the plan's phy2log row).

    phy2log (S,) expert of each slot; log2phy (E, X) slots of each expert (-1 padded); logcnt (E,)."""

    name: str
    phy2log: np.ndarray
    num_experts: int
    world: int

    @property
    def slots_per_rank(self) -> int:
        return self.phy2log.shape[0] // self.world

    def local_experts(self, rank: int) -> np.ndarray:
        """(slots_per_rank,) the logical expert of each of `rank`'s slots."""
        spr = self.slots_per_rank
        return self.phy2log[rank * spr:(rank + 1) * spr].copy()

    def replicated(self) -> np.ndarray:
        """Experts with more than one slot, ascending."""
        return np.flatnonzero(np.bincount(self.phy2log, minlength=self.num_experts) > 1)

    def tables(self, rank: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(log2phy (E, X) int64, logcnt (E,) int64, here (E,) int64: the slot of each expert on
        `rank`, or -1) as tensors on `device`."""
        num_experts, slots = self.num_experts, self.phy2log.shape[0]
        counts = np.bincount(self.phy2log, minlength=num_experts)
        log2phy = np.full((num_experts, counts.max()), -1, dtype=np.int64)
        fill = np.zeros(num_experts, dtype=np.int64)
        here = np.full(num_experts, -1, dtype=np.int64)
        spr = self.slots_per_rank
        for s in range(slots):
            e = self.phy2log[s]
            log2phy[e, fill[e]] = s
            fill[e] += 1
            if s // spr == rank:
                here[e] = s
        as_t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
        return as_t(log2phy), as_t(counts.astype(np.int64)), as_t(here)


def remap_slots(ids: Tensor, log2phy: Tensor, logcnt: Tensor, here: Tensor) -> Tensor:
    """(T, K) logical expert ids -> (T, K) slots: the expert's slot on this rank where it has one,
    else its replica (t * K + k) mod its replica count."""
    ids = ids.long()
    num_tokens, top_k = ids.shape
    pair = torch.arange(num_tokens * top_k, device=ids.device).view(num_tokens, top_k)
    spread = log2phy[ids, pair % logcnt[ids]]
    local = here[ids]
    return torch.where(local >= 0, local, spread)


def _all_to_all(rows: Tensor, send: list[int], recv: list[int], group, what: str) -> Tensor:
    """all_to_all_single of `rows` (first dim split by `send`) -> the rows received, split by `recv`."""
    out = rows.new_empty((sum(recv), *rows.shape[1:]))
    try:
        dist.all_to_all_single(out, rows.contiguous(), recv, send, group=group)
    except RuntimeError as err:
        raise RuntimeError(f"moecompile.distributed: {what} failed on rank {dist.get_rank(group)} "
                           f"(another rank failed or left the group?): {str(err).splitlines()[0]}") from None
    return out


def _exchange_counts(send: Tensor, group, what: str) -> list[int]:
    """(world,) rows for each rank -> (world,) rows from each rank, as a list (a host sync)."""
    recv = torch.empty_like(send)
    try:
        dist.all_to_all_single(recv, send, group=group)
    except RuntimeError as err:
        raise RuntimeError(f"moecompile.distributed: {what} failed on rank {dist.get_rank(group)} "
                           f"(another rank failed or left the group?): {str(err).splitlines()[0]}") from None
    return recv.tolist()


class ExpertParallel(torch.autograd.Function):
    """(x (T, H), ids (T, K), w (T, K), *local expert weights) -> (T, H) over the group; see the
    module docstring. `run(x_rows, local_slots, w_rows, params)` computes the local experts."""

    @staticmethod
    def forward(ctx, x, ids, w, layer, run, group, *params):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        num_tokens, top_k = ids.shape
        log2phy, logcnt, here = layer.tables(rank, x.device)
        slots = remap_slots(ids, log2phy, logcnt, here).view(-1)  # (T*K,)
        spr = layer.slots_per_rank
        dest = slots // spr
        order = torch.sort(dest, stable=True).indices  # pairs by destination rank, in pair order
        send = torch.bincount(dest, minlength=world)
        what = f"dispatch of layer {layer.name}"
        send_list = send.tolist()
        recv_list = _exchange_counts(send, group, what)
        token = order // top_k
        x_rows = _all_to_all(x.index_select(0, token), send_list, recv_list, group, what)
        w_rows = _all_to_all(w.reshape(-1).index_select(0, order), send_list, recv_list, group, what)
        slot_rows = _all_to_all((slots.index_select(0, order) % spr), send_list, recv_list, group, what)
        y_rows = run(x_rows, slot_rows, w_rows, params)
        back = _all_to_all(y_rows, recv_list, send_list, group, f"combine of layer {layer.name}")
        y = _sum_in_k_order(back, order, num_tokens, top_k)
        ctx.save_for_backward(order, x_rows, w_rows, slot_rows, *params)
        ctx.meta = (layer, run, group, send_list, recv_list, num_tokens, top_k, x.dtype, w.dtype)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        order, x_rows, w_rows, slot_rows, *params = ctx.saved_tensors
        layer, run, group, send_list, recv_list, num_tokens, top_k, x_dtype, w_dtype = ctx.meta
        token = order // top_k
        g_rows = _all_to_all(grad.contiguous().index_select(0, token), send_list, recv_list, group,
                             f"backward dispatch of layer {layer.name}")
        with torch.enable_grad():
            xr = x_rows.detach().requires_grad_()
            wr = w_rows.detach().requires_grad_()
            ps = [p.detach().requires_grad_() for p in params]
            y_rows = run(xr, slot_rows, wr, ps)
            found = torch.autograd.grad(y_rows, [xr, wr, *ps], g_rows, allow_unused=True)
        gx_rows, gw_rows, *gparams = (torch.zeros_like(v) if g is None else g
                                      for g, v in zip(found, [xr, wr, *ps]))
        what = f"backward combine of layer {layer.name}"
        gx_back = _all_to_all(gx_rows, recv_list, send_list, group, what)
        gw_back = _all_to_all(gw_rows, recv_list, send_list, group, what)
        gx = _sum_in_k_order(gx_back, order, num_tokens, top_k).to(x_dtype)
        gw = torch.empty_like(gw_back)
        gw[order] = gw_back
        gparams = _sum_replicas(gparams, layer, group)
        return (gx, None, gw.view(num_tokens, top_k).to(w_dtype), None, None, None, *gparams)


def _sum_in_k_order(rows: Tensor, order: Tensor, num_tokens: int, top_k: int) -> Tensor:
    """(T*K, H) rows in `order` -> (T, H): each token's K rows put back in pair order and summed
    k = 0, 1, ... (the same additions whatever the plan, the world size or the chunks)."""
    pairs = torch.empty_like(rows)
    pairs[order] = rows
    pairs = pairs.view(num_tokens, top_k, rows.shape[-1])
    if top_k == 0 or num_tokens == 0:
        return pairs.sum(dim=1)
    out = pairs[:, 0].clone()
    for k in range(1, top_k):
        out += pairs[:, k]
    return out


def _sum_replicas(grads: list[Tensor], layer: LayerMap, group) -> list[Tensor]:
    """Each replicated expert's weight gradients summed over the ranks holding it (one all-reduce
    of (replicated experts, ...) per weight); other slots' gradients as they are."""
    replicated = layer.replicated()
    if not replicated.size or not grads:
        return grads
    rank = dist.get_rank(group)
    mine = layer.local_experts(rank)
    row = {int(e): i for i, e in enumerate(replicated)}
    slots = [s for s, e in enumerate(mine) if int(e) in row]
    out = []
    for g in grads:
        total = g.new_zeros((len(replicated), *g.shape[1:]))
        for s in slots:
            total[row[int(mine[s])]] += g[s]
        try:
            dist.all_reduce(total, group=group)
        except RuntimeError as err:
            raise RuntimeError(f"moecompile.distributed: replica gradients of layer {layer.name} failed on rank "
                               f"{rank} (another rank failed or left the group?): {str(err).splitlines()[0]}") from None
        g = g.clone()
        for s in slots:
            g[s] = total[row[int(mine[s])]]
        out.append(g)
    return out
