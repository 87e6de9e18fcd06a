"""One MoE layer's experts across the ranks of a process group: remap, dispatch, local experts, combine.

Per rank, for its tokens x (T, H), their top-k ids and weights (T, K):

    RemapSlots  ids (T, K)             -> slots (T, K)    logical expert -> one of its replicas: the
                                                          replica on this rank when there is one (no
                                                          traffic), else replica (t * K + k) mod count
    Dispatch    x rows, w, local slot  -> rows of every rank's slots, sorted by destination rank:
                                          per-rank counts exchanged, then all_to_all_single with
                                          uneven splits of one message: each row's x, weight and
                                          local slot side by side as bytes
    Experts     received rows (R, H)   -> w * expert(x) (R, H) by the family's own expert code over
                                          this rank's slots (each row: one slot, one weight)
    Combine     (R, H) back to their senders (the reverse all-to-all), then each token's K rows
                summed in k order: a token's output bits depend on its rows alone, not on the plan
                or the world size

Backward (the op, ops.py, saves its inputs alone): the rows go out again, each with its output
gradient, the local experts' vector-Jacobian product (torch.func) gives the rows' x and w gradients,
which come back and are summed per token in k order, and the local slots' weight gradients; the
gradients of a replicated expert are summed over every rank that holds it (one all-reduce of the
replicated experts' rows), so replicas stay identical after an optimizer step. Sending x again costs
the backward one more H-wide row each way than keeping the received rows would, and keeps no
activation of the exchange alive between forward and backward.

Overlap (overlap.py): the tokens are cut into C chunks and the exchanges run asynchronously, so
chunk c's rows travel while chunk c-1's experts compute and chunk c-2's results travel back; each
slot's rows are padded to whole 16-row tiles before the experts, so a row's bits depend on nothing
else that arrived (on CPU, tested: outputs bit for bit the same for every C, plan and world size;
a GPU library may still pick another GEMM algorithm for 16 rows than for 32). A
torch.profiler trace shows each chunk's waits and experts as spans named after the layer.

Host syncs, and why: the send and receive counts of every chunk (`.tolist()`, one exchange per
call, forward and backward) size the received buffers and the uneven splits of all_to_all_single,
which take Python lists (on CUDA, bincount and repeat_interleave without a known size sync too).

Every rank of the group must call each layer the same number of times in the same order (as in
any data-parallel step); a rank that fails or leaves makes the others' collectives fail when the
group's timeout expires, and the error names the layer and the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.profiler import record_function

from .overlap import Clock


@dataclass(frozen=True)
class LayerMap:
    """Where one layer's slots live: slot s on rank s // slots_per_rank (the plan's phy2log row).

    phy2log (S,) expert of each slot; log2phy (E, X) slots of each expert (-1 padded); logcnt (E,)."""

    name: str
    phy2log: np.ndarray
    num_experts: int
    world: int
    _tables: dict = field(default_factory=dict, compare=False, repr=False)  # (rank, device) -> tables

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
        `rank`, or -1) as tensors on `device`; made once per rank and device."""
        key = (rank, str(device))
        if key not in self._tables:
            self._tables[key] = self._make_tables(rank, device)
        return self._tables[key]

    def _make_tables(self, rank: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
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


def _exchange_counts(send: Tensor, group, what: str) -> list[int]:
    """(world * n,) n counts for each rank -> (world * n,) n counts from each rank, as a list (a host sync)."""
    recv = torch.empty_like(send)
    try:
        dist.all_to_all_single(recv, send, group=group)
    except RuntimeError as err:
        raise _failed(what, group, err) from None
    return recv.tolist()


@dataclass
class Route:
    """How one call's (token, k) pairs travel: tokens cut into chunks, each chunk's pairs sorted by
    destination rank. order (T*K,) pairs, chunk after chunk; bounds (C+1,) each chunk's first pair
    in `order`; send[c][r] / recv[c][r] rows chunk c sends to / receives from rank r."""

    order: Tensor
    bounds: list[int]
    send: list[list[int]]
    recv: list[list[int]]

    @property
    def chunks(self) -> int:
        return len(self.send)

    def pairs(self, c: int) -> Tensor:
        return self.order[self.bounds[c]:self.bounds[c + 1]]


def route(slots: Tensor, top_k: int, slots_per_rank: int, chunks: int, group, what: str) -> Route:
    """The Route of (T*K,) slots cut into `chunks` chunks of tokens; every chunk's counts reach
    their ranks in one exchange (the one host sync of the forward)."""
    world = dist.get_world_size(group)
    num_tokens = slots.shape[0] // max(top_k, 1)
    cuts = [num_tokens * c // chunks * top_k for c in range(chunks + 1)]
    dest = slots // slots_per_rank
    parts, counts = [], []
    for c in range(chunks):
        d = dest[cuts[c]:cuts[c + 1]]
        parts.append(torch.sort(d, stable=True).indices + cuts[c])  # by destination rank, in pair order
        counts.append(torch.bincount(d, minlength=world))
    send = torch.stack(counts, dim=1) if counts else torch.zeros(world, 0, dtype=torch.long)  # (world, C)
    recv = _exchange_counts(send.reshape(-1), group, what)  # C entries from each rank
    send_rows = send.T.tolist()
    recv_rows = [[recv[r * chunks + c] for r in range(world)] for c in range(chunks)]
    order = torch.cat(parts) if parts else slots.new_zeros(0)
    return Route(order, cuts, send_rows, recv_rows)


def experts_forward(layer: LayerMap, run, group, chunks: int, stats, x: Tensor, ids: Tensor, w: Tensor,
                    params: list[Tensor]) -> Tensor:
    """(x (T, H), ids (T, K), w (T, K)) -> (T, H) over the group; see the module docstring.
    `run(x_rows, local_slots, w_rows, params)` computes the local experts; `chunks` pipelines the
    exchange; `stats` (overlap.Stats or None) collects what the call moved and waited."""
    num_tokens, top_k = ids.shape
    slots, plan, clock = _route(layer, group, chunks, ids, x.device, f"dispatch of layer {layer.name}")
    spr = layer.slots_per_rank
    w_flat = w.reshape(-1)

    def dispatch(c):  # one message a chunk: each row's x, weight and local slot side by side
        pairs = plan.pairs(c)
        rows = pack([x.index_select(0, pairs // top_k), w_flat.index_select(0, pairs)[:, None],
                     (slots.index_select(0, pairs) % spr).to(torch.int32)[:, None]])
        return [_start(rows, plan.send[c], plan.recv[c], group, f"dispatch of layer {layer.name}")]

    def compute(c, received):
        x_rows, w_rows, slot_rows = unpack(received[0], [(x.dtype, x.shape[1]), (w.dtype, 1), (torch.int32, 1)])
        return run(x_rows, slot_rows[:, 0].long(), w_rows[:, 0], params)

    with clock.span("rest"):  # the whole call but the counts exchange, which is timed as latency
        back = _pipeline(plan, dispatch, compute, group, f"combine of layer {layer.name}", clock)
        y = _sum_in_k_order(back, plan.order, num_tokens, top_k)
    if stats is not None:
        row = x.element_size() * x.shape[-1]
        stats.add_call(plan, row + w.element_size() + 4, row, clock)
    return y.to(x.dtype)


def experts_backward(layer: LayerMap, run, group, chunks: int, grad: Tensor, x: Tensor, ids: Tensor, w: Tensor,
                     params: list[Tensor]) -> list[Tensor]:
    """Gradients of experts_forward for (x, w, *params). The rows go out again with their output
    gradients (nothing of the forward's exchange is kept: the op's inputs are all it saves), the
    local experts' vector-Jacobian product gives the rows' x and w gradients, which come back and
    are summed per token in k order, and the local slots' weight gradients, summed over replicas."""
    num_tokens, top_k = ids.shape
    slots, plan, clock = _route(layer, group, chunks, ids, x.device, f"backward dispatch of layer {layer.name}")
    spr = layer.slots_per_rank
    w_flat = w.reshape(-1)
    grad = grad.contiguous()
    gparams = [torch.zeros_like(p) for p in params]
    hidden = x.shape[1]

    def dispatch(c):
        pairs = plan.pairs(c)
        token = pairs // top_k
        rows = pack([x.index_select(0, token), grad.index_select(0, token), w_flat.index_select(0, pairs)[:, None],
                     (slots.index_select(0, pairs) % spr).to(torch.int32)[:, None]])
        return [_start(rows, plan.send[c], plan.recv[c], group, f"backward dispatch of layer {layer.name}")]

    def compute(c, received):
        x_rows, g_rows, w_rows, slot_rows = unpack(received[0], [(x.dtype, hidden), (grad.dtype, hidden),
                                                                 (w.dtype, 1), (torch.int32, 1)])
        local = slot_rows[:, 0].long()
        # torch.func: autograd records nothing inside an op's implementation
        y_rows, vjp = torch.func.vjp(lambda xr, wr, *ps: run(xr, local, wr, list(ps)), x_rows, w_rows[:, 0], *params)
        gx, gw, *found = vjp(g_rows.to(y_rows.dtype))
        for total, g in zip(gparams, found):
            total += g
        return pack([gx.to(x.dtype), gw.to(w.dtype)[:, None]])  # one message back: x's and w's

    back = _pipeline(plan, dispatch, compute, group, f"backward combine of layer {layer.name}", clock)
    back_x, back_w = unpack(back, [(x.dtype, hidden), (w.dtype, 1)])
    gx = _sum_in_k_order(back_x, plan.order, num_tokens, top_k)
    gw = torch.empty(back_w.shape[0], dtype=w.dtype, device=back_w.device)
    gw[plan.order] = back_w[:, 0]
    return [gx, gw.view(num_tokens, top_k), *_sum_replicas(gparams, layer, group)]


def _route(layer: LayerMap, group, chunks: int, ids: Tensor, device, what: str):
    """(slots (T*K,), Route, Clock with the counts exchange timed) of one call."""
    rank = dist.get_rank(group)
    log2phy, logcnt, here = layer.tables(rank, device)
    slots = remap_slots(ids, log2phy, logcnt, here).view(-1)  # (T*K,)
    clock = Clock(device)
    with clock.span("latency"):
        plan = route(slots, ids.shape[1], layer.slots_per_rank, chunks, group, what)
    return slots, plan, clock


def pack(columns: list[Tensor]) -> Tensor:
    """(n, width) tensors of any dtypes -> (n, their bytes) uint8: one message for all of them."""
    return torch.cat([c.contiguous().view(torch.uint8) for c in columns], dim=1)


def unpack(rows: Tensor, layout: list[tuple[torch.dtype, int]]) -> list[Tensor]:
    """pack's inverse: (n, bytes) uint8 -> (n, width) tensors of the given (dtype, width)s."""
    out, at = [], 0
    for dtype, width in layout:
        size = width * torch.empty(0, dtype=dtype).element_size()
        # a fresh buffer: a slice of 0 or 1 rows counts as contiguous and keeps its byte offset,
        # which a wider dtype's view refuses when it is not a multiple of its size
        column = rows.new_empty((rows.shape[0], size)).copy_(rows[:, at:at + size])
        out.append(column.view(dtype))
        at += size
    return out


def _start(rows: Tensor, send: list[int], recv: list[int], group, what: str):
    """An asynchronous all_to_all_single of `rows` split by `send`: (buffer, work, what)."""
    out = rows.new_empty((sum(recv), *rows.shape[1:]))
    try:
        work = dist.all_to_all_single(out, rows.contiguous(), recv, send, group=group, async_op=True)
    except RuntimeError as err:
        raise _failed(what, group, err) from None
    return out, work, what


def _finish(started, group) -> Tensor:
    out, work, what = started
    try:
        work.wait()
    except RuntimeError as err:
        raise _failed(what, group, err) from None
    return out


def _failed(what: str, group, err: BaseException) -> RuntimeError:
    return RuntimeError(f"moecompile.distributed: {what} failed on rank {dist.get_rank(group)} "
                        f"(another rank failed or left the group?): {str(err).splitlines()[0]}")


def _pipeline(plan: Route, dispatch, compute, group, what: str, clock: "Clock") -> Tensor:
    """Chunk c's rows arrive while chunk c-1 computes and chunk c-2's results travel back:
    dispatch(c) starts chunk c's exchanges, compute(c, received) gives its (R_c, ...) results,
    which go back to their senders. Returns every pair's result, in plan.order."""
    # spans a torch.profiler trace shows: "moe experts model.layers.0.mlp chunk 1" (" backward" after the name)
    label = what.split(" of layer ")[-1] + (" backward" if what.startswith("backward") else "")
    pending = dispatch(0) if plan.chunks else []
    backs = []
    for c in range(plan.chunks):
        with clock.wait(), record_function(f"moe wait rows {label} chunk {c}"):
            received = [_finish(p, group) for p in pending]
        if c + 1 < plan.chunks:
            pending = dispatch(c + 1)
        with clock.compute(), record_function(f"moe experts {label} chunk {c}"):
            result = compute(c, received)
        backs.append(_start(result, plan.recv[c], plan.send[c], group, what))
    with clock.wait(), record_function(f"moe wait results {label}"):
        parts = [_finish(b, group) for b in backs]
    return torch.cat(parts)


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
            raise _failed(f"replica gradients of layer {layer.name}", group, err) from None
        g = g.clone()
        for s in slots:
            g[s] = total[row[int(mine[s])]]
        out.append(g)
    return out
