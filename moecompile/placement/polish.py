"""Polish: an exchange search on the exact layer time of cost.py.

The ILP prices hops linearly, as the mean GPU sees them; the layer time waits for the busiest GPU's
traffic and load, a max that a linear price cannot see (on a DeepSeek-V3 chain trace the ILP's plan
cut the mean GPU's network time by 7.4% and the all-to-all by 4.7%). This search exchanges slots of
one layer and scores every exchange on the model exactly, so it finishes what the ILP starts.

A swap in layer l (expert e on GPU a <-> expert f on GPU b) changes three things, all computed
exactly and for every candidate exchange of the layer at once:

    compute[l]   loads of a and b
    comm[l]      traffic into layer l: the routings sent from the GPUs of layer l-1 toward e and f
                 (fixed sources, layer l-1 does not move) now land on e's and f's new GPUs
    comm[l+1]    traffic out of layer l: e's and f's routings into layer l+1 now leave from b and a

Per GPU the all-to-all keeps four sums (sent and received, over NVLink and over the network); an
expert's part of them is a function of its replica set alone (incoming) or of the GPU of each of its
replicas (outgoing, one table per layer: R[e, g, h] = routings of e sent from g to h), so an
exchange's change is four (G,) vectors per side and per expert it moves. The candidates are every
swap of two slots on different GPUs and every 2-for-2 exchange between two GPUs of one node.

The exact max is flat wherever several GPUs tie near it, so the search descends a smoothed max
(log-sum-exp at a temperature of a share of the all-to-all time, SOFT, lowered once a sweep gains
nothing) and each layer keeps the arrangement with the lowest exact time it met. Layers are visited
hottest pair first; a layer whose search found nothing waits until a neighbour changes. Every
exchange keeps slots per GPU, replica counts, at most one replica of an expert per GPU and every GPU
load at or under the layer's cap, and a layer's arrangement changes only when the sum of the two
layer times it sets falls: the mean layer time never rises.

The last HOP_SHARE of the time (or all that is left once the smallest temperature gains nothing)
goes to exchanges that keep more flow on its GPUs (what the cross-GPU hop fraction counts) without
raising the two layer times (_hop_layer): at DeepSeek-V3 size it takes a chain trace's plan from
94.3% to 93.4% cross-GPU hops and a topic trace's from 81.5% to 78-80% at the same layer time.

The per-layer tables hold 4 (E, G, G) float64 arrays; above MAX_TABLE_BYTES (thousands of GPUs at
E = 256) the polish does nothing and says so.
"""

from __future__ import annotations

import itertools
import math
import time

import numpy as np

from . import cost
from .exchange import sort_slots
from .plan import presence

# temperature of the smoothed max the search descends, as a share of the all-to-all time: the exact
# max is flat wherever several GPUs tie near it, the smoothed one lowers all of them
SOFT = (0.01, 0.003, 0.001)
# share of the polish's time kept for the hop phase (it starts sooner when the descents gain nothing)
HOP_SHARE = 0.2
MAX_TABLE_BYTES = 512 << 20  # the largest per-layer tables the polish builds (see the docstring)
_MAX_EXCHANGES = 2_000_000  # 2-for-2 exchanges tried per layer at most (few GPUs with many slots: none)
_WALK = 256  # improving swaps of a round re-scored and made while they still gain
_CHUNK = 8192  # candidate swaps evaluated per array pass: (chunk, G) float64 arrays of 4 MB at G = 64


def polish(phy2log: np.ndarray, load: np.ndarray, flow: np.ndarray | None, num_gpus: int, num_nodes: int,
           hw: cost.Hardware, cap: np.ndarray, deadline: float) -> tuple[np.ndarray, dict]:
    """(L, S) plan within `cap` ((L,) largest GPU load per layer, in `load`'s units) -> an improved
    copy and {"swaps", "sweeps", "layer_ms_before", "layer_ms"}. Stops at `deadline` (perf_counter)."""
    plan = phy2log.copy()
    num_layers = plan.shape[0]
    ctx = _Context(load, flow, num_gpus, num_nodes, hw, cap)
    before = cost.layer_times(plan, load, flow, num_gpus, num_nodes, hw)["time"]
    times = before.copy()
    too_big = ("too many GPUs for the tables" if 4 * 8 * load.shape[1] * num_gpus**2 > MAX_TABLE_BYTES else
               "too many slots for the swaps" if plan.shape[1] ** 2 // 2 > 10 * _MAX_EXCHANGES else None)
    if too_big:
        return plan, {"swaps": 0, "sweeps": 0, "layer_ms_before": float(before.mean() * 1e3),
                      "layer_ms": float(before.mean() * 1e3), "skipped": too_big}
    swaps, sweeps, temperatures = 0, 0, list(SOFT)
    settled = np.zeros(num_layers, dtype=bool)  # found nothing, and neither it nor a neighbour changed since
    # the descents stop early enough to leave the hop phase its share (sooner if they gain nothing)
    descents_end = deadline - (HOP_SHARE * (deadline - time.perf_counter()) if flow is not None else 0.0)
    while time.perf_counter() < descents_end and num_gpus > 1 and temperatures:
        sweeps += 1
        ctx.soft = temperatures[0]
        pair = times + np.append(times[1:], 0.0)  # (L,) the two layer times a move of layer l changes
        gained = 0
        for layer in np.argsort(-pair, kind="stable"):
            if time.perf_counter() >= descents_end:
                break
            if settled[layer]:
                continue
            done = _polish_layer(plan, int(layer), ctx, descents_end)
            if done is None:
                settled[layer] = True
                continue
            gained += done[0]
            settled[max(layer - 1, 0):layer + 2] = False  # a layer's search sees the layers beside it
            times[layer] = done[1][0]
            if done[1][1] is not None:
                times[layer + 1] = done[1][1]
        swaps += gained
        if not gained:  # a local optimum of this smoothing: on to the next, closer to the exact max
            temperatures.pop(0)
            settled[:] = False
    # the time left keeps more flow on its GPUs at no cost in time
    hop_swaps = 0
    while time.perf_counter() < deadline and num_gpus > 1 and flow is not None:
        gained = 0
        for layer in range(num_layers):
            if time.perf_counter() >= deadline:
                break
            gained += _hop_layer(plan, layer, ctx, deadline)
        hop_swaps += gained
        if not gained:
            break
    if hop_swaps:
        times = cost.layer_times(plan, load, flow, num_gpus, num_nodes, hw)["time"]
    return plan, {"swaps": swaps, "sweeps": sweeps, "hop_swaps": hop_swaps,
                  "layer_ms_before": float(before.mean() * 1e3), "layer_ms": float(times.mean() * 1e3)}


class _Context:
    """What every layer visit shares: the trace in the cost model's units, and the model's constants."""

    def __init__(self, load, flow, num_gpus, num_nodes, hw, cap):
        self.load, self.flow, self.hw = load, flow, hw
        self.num_gpus, self.num_nodes = num_gpus, num_nodes
        totals = load.sum(axis=1)  # (L,)
        self.scale = np.divide(hw.routings_per_gpu * num_gpus, totals, out=np.zeros(totals.shape), where=totals > 0)
        self.cap = cap * self.scale  # (L,) routings
        self.soft = SOFT[0] if SOFT else 0.0  # the smoothing of the sweep under way
        self._exchanges = None
        if flow is not None and flow.shape[0]:
            pair_total = flow.sum(axis=(1, 2))  # (L-1,)
            self.per_routing = np.divide(load[1:].sum(axis=1), pair_total, out=np.zeros(pair_total.shape),
                                         where=pair_total > 0)
        else:
            self.per_routing = np.zeros(max(load.shape[0] - 1, 0))
        node = np.arange(num_gpus) // (num_gpus // num_nodes)
        self.same_node = node[:, None] == node[None, :]  # (G, G)
        self.nv = hw.bytes_per_routing / hw.nvlink_bw  # seconds per routing over NVLink
        self.net = hw.bytes_per_routing / hw.network_bw
        self.compute = hw.flops_per_routing / hw.flops  # seconds per routing of expert compute

    def exchanges(self, spg: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The exchanges tried, per size: every swap of two slots on different GPUs, and every 2-for-2
        exchange between two GPUs of one node (the mean network traffic stays; loads and the busiest
        GPU move, under caps too tight for most single swaps)."""
        if self._exchanges is None:
            self._exchanges = [_exchanges(self.num_gpus, spg, self.num_nodes, 1, same_node=False)]
            per_node = self.num_gpus // self.num_nodes
            count = self.num_nodes * per_node * (per_node - 1) // 2 * math.comb(spg, 2) ** 2
            if spg >= 2 and per_node > 1 and count <= _MAX_EXCHANGES:  # many slots a GPU: swaps only
                self._exchanges.append(_exchanges(self.num_gpus, spg, self.num_nodes, 2, same_node=True))
        return self._exchanges

    def layer_time(self, compute, comm):
        return np.maximum(compute, comm) if self.hw.overlap else compute + comm

    def comm(self, snv, rnv, snet, rnet, soft: float = 0.0):
        """(..., G) four sums -> (...) seconds: the busiest GPU's all-to-all; with `soft` > 0 the
        max is smoothed (soft * log sum exp(per GPU / soft), at most soft * log G above it)."""
        per_gpu = np.maximum(snv, rnv) * self.nv + np.maximum(snet, rnet) * self.net
        top = per_gpu.max(axis=-1)
        if not soft:
            return top
        return top + soft * np.log(np.exp((per_gpu - top[..., None]) / soft).sum(axis=-1))


def _polish_layer(plan: np.ndarray, layer: int, ctx: _Context, deadline: float,
                  rounds: int = 2) -> tuple[int, tuple[float, float | None]] | None:
    """Swaps of one layer down the smoothed time[layer] + time[layer + 1]; the layer keeps the
    arrangement met on the way with the lowest exact time. Returns (swaps kept, the two exact
    times) if that is below the start, else None (the layer unchanged).

    A round scores every swap of the layer at once, keeps the best improving ones, then makes the
    best of those as the layer now stands, scores the rest again, and so on while one gains: one
    pass over all swaps yields many (each swap changes the busiest GPU, so every step re-scores)."""
    search = _LayerSearch(plan, layer, ctx)
    if search.skip:
        return None
    start = search.now()
    best, best_row, best_times, kept, made = start, plan[layer].copy(), None, 0, 0
    tol = 1e-9 * start
    for _ in range(rounds):
        if time.perf_counter() >= deadline:
            break
        now = search.now(soft=True)
        found = {}  # per class of exchanges: the improving ones, (i, j, delta) chunks
        for size, i, j in search.candidates(deadline):
            delta = search.score(i, j, soft=True) - now
            gain = delta < -tol
            found.setdefault(size, []).append((i[gain], j[gain], delta[gain]))
        walks = []  # per class: its best improving exchanges, best first
        for chunks in found.values():
            i, j, delta = (np.concatenate(parts) for parts in zip(*chunks))
            if delta.size:
                order = np.argsort(delta, kind="stable")[:_WALK]
                walks.append((i[order], j[order]))
        if not walks:
            break
        while walks and time.perf_counter() < deadline:
            now = search.now(soft=True)
            best_step = None  # (delta, class, index) of the best exchange over the classes
            for w, (cand_i, cand_j) in enumerate(walks):
                cand_i, cand_j = search.valid(cand_i, cand_j)
                delta = search.score(cand_i, cand_j, soft=True) - now if cand_i.size else np.zeros(0)
                gain = delta < -tol
                walks[w] = (cand_i[gain], cand_j[gain])
                if gain.any():
                    k = int(np.flatnonzero(gain)[delta[gain].argmin()])
                    if best_step is None or delta[k] < best_step[0]:
                        best_step = (float(delta[k]), w, int(gain[:k].sum()))
            if best_step is None:
                break
            _, w, k = best_step
            cand_i, cand_j = walks[w]
            search.apply(cand_i[k], cand_j[k])
            walks[w] = (np.delete(cand_i, k, axis=0), np.delete(cand_j, k, axis=0))
            walks = [x for x in walks if x[0].size]
            made += 1
            exact = search.now()
            if exact < best - tol:
                best, best_row, best_times, kept = exact, plan[layer].copy(), search.times(), made
    plan[layer] = sort_slots(best_row.reshape(ctx.num_gpus, -1))  # the best arrangement met
    return None if best_times is None else (kept, best_times)


def _hop_layer(plan: np.ndarray, layer: int, ctx: _Context, deadline: float) -> int:
    """Exchanges of one layer that keep more flow on its GPUs without raising time[layer] +
    time[layer + 1]: the polish's last phase, once the time has stopped falling. Returns how many.

    A scan finds every such exchange as the layer stands; then the _WALK best of each class, by
    flow kept, are checked again one by one as the layer now stands and made where they still
    qualify; scans repeat while one makes an exchange."""
    search = _LayerSearch(plan, layer, ctx)
    if search.skip:
        return 0
    made = 0
    tol = 1e-9 * max(float(search.local_in.max(initial=0.0)), float(search.local_out.max(initial=0.0)), 1e-300)
    while time.perf_counter() < deadline:
        now = search.now()
        found = {}  # per class of exchanges: (i, j, gain) chunks of the qualifying ones
        for size, i, j in search.candidates(deadline):
            gain = search.local_gain(i, j)
            keep = gain > tol
            if not keep.any():
                continue
            i, j, gain = i[keep], j[keep], gain[keep]
            ok = search.score(i, j) - now <= 1e-12 * now  # only the gains get scored; rounding only
            found.setdefault(size, []).append((i[ok], j[ok], gain[ok]))
        before = made
        for chunks in found.values():
            i, j, gain = (np.concatenate(parts) for parts in zip(*chunks))
            for k in np.argsort(-gain, kind="stable")[:_WALK]:
                if time.perf_counter() >= deadline:
                    break
                ci, cj = search.valid(i[k:k + 1], j[k:k + 1])
                if not ci.size or search.local_gain(ci, cj)[0] <= tol:
                    continue
                now = search.now()
                if search.score(ci, cj)[0] - now <= 1e-12 * now:
                    search.apply(ci[0], cj[0])
                    made += 1
        if made == before:
            break
    if made:
        plan[layer] = sort_slots(plan[layer].reshape(ctx.num_gpus, -1))
    return made


class _LayerSearch:
    """One layer's swaps, scored exactly: the layer's loads and all-to-all sums, kept up to date."""

    def __init__(self, plan: np.ndarray, layer: int, ctx: _Context):
        num_layers, num_slots = plan.shape
        num_gpus, num_experts = ctx.num_gpus, ctx.load.shape[1]
        self.plan, self.layer, self.ctx = plan, layer, ctx
        self.spg = spg = num_slots // num_gpus
        count = presence(plan[layer:layer + 1], num_experts, num_gpus)[0]  # (E, G)
        self.skip = bool(count.max() > 1)  # two replicas of one expert on a GPU: not modelled here
        self.present = count
        self.reps = reps = count.sum(axis=1)  # (E,) replicas, fixed by swaps
        self.weight = np.divide(ctx.load[layer] * ctx.scale[layer], reps, out=np.zeros(num_experts), where=reps > 0)
        self.gpu_load = self.weight[plan[layer]].reshape(num_gpus, spg).sum(axis=1)  # (G,)
        # incoming: routings from each GPU of layer l-1 toward each expert, and the experts' four sums
        self.spread = layer == 0 or ctx.flow is None or ctx.per_routing[layer - 1] == 0
        if self.spread:  # tokens start spread evenly over the GPUs (cost.py)
            src = np.broadcast_to(ctx.load[layer] * ctx.scale[layer] / num_gpus, (num_gpus, num_experts)).T.copy()
        else:
            prev = presence(plan[layer - 1:layer], num_experts, num_gpus)[0]
            prev_share = prev / np.maximum(prev.sum(axis=1, keepdims=True), 1.0)  # (E, G)
            src = (ctx.flow[layer - 1].T @ prev_share) * (ctx.per_routing[layer - 1] * ctx.scale[layer])  # (E, G)
        self.src = src
        # flow weight (the hop metrics' units) that stays on a GPU: from GPU g's layer l-1 experts
        # toward e when e is on g, and from a replica of e on g toward the layer l+1 experts on g
        self.local_in = np.zeros((num_experts, num_gpus)) if self.spread else \
            src / (ctx.per_routing[layer - 1] * ctx.scale[layer])
        self.incoming = _incoming(src, count, reps[:, None], self.spread, ctx)  # (4, E, G)
        self.inn = self.incoming.sum(axis=1)  # (4, G): sent NVLink, received NVLink, sent network, received network
        # outgoing: R[e, g, h] routings of e (all replicas' worth) sent from GPU g to GPU h in layer l+1
        self.has_out = layer + 1 < num_layers and ctx.flow is not None and ctx.per_routing[layer] > 0
        if self.has_out:
            nxt = presence(plan[layer + 1:layer + 2], num_experts, num_gpus)[0]  # (E2, G)
            nxt_share = nxt / np.maximum(nxt.sum(axis=1, keepdims=True), 1.0)
            routed = ctx.flow[layer] * (ctx.per_routing[layer] * ctx.scale[layer + 1])  # (E, E2)
            # all of e's routings by destination GPU, less the pieces that stay on g (e2 held on g)
            held = plan[layer + 1].reshape(num_gpus, spg)  # (G, spg) experts of layer l+1 on each GPU
            first = ~np.triu(held[:, :, None] == held[:, None, :], 1).any(axis=1)  # (G, spg) once per GPU
            stays = np.matmul((routed[:, held] * first).transpose(1, 0, 2), nxt_share[held])  # (G, E, G)
            table = (routed @ nxt_share)[:, None, :] - stays.transpose(1, 0, 2)
            self.r_nv, self.r_net = table * ctx.same_node, table * ~ctx.same_node  # (E, G, G) each
            self.s_nv, self.s_net = self.r_nv.sum(axis=2), self.r_net.sum(axis=2)  # (E, G)
            per_slot = 1.0 / reps[plan[layer]]  # (S,)
            gpu_of = np.arange(num_slots) // spg
            out = np.zeros((4, num_gpus))
            np.add.at(out[0], gpu_of, self.s_nv[plan[layer], gpu_of] * per_slot)
            np.add.at(out[2], gpu_of, self.s_net[plan[layer], gpu_of] * per_slot)
            out[1] = (self.r_nv[plan[layer], gpu_of] * per_slot[:, None]).sum(axis=0)
            out[3] = (self.r_net[plan[layer], gpu_of] * per_slot[:, None]).sum(axis=0)
            self.out = out
            served = ctx.load[layer + 1] * ctx.scale[layer + 1] / np.maximum(nxt.sum(axis=1), 1.0)  # (E2,)
            self.next_compute = (served[:, None] * nxt).sum(axis=0).max() * ctx.compute
            self.local_out = ctx.flow[layer] @ (nxt > 0)  # (E, G) for all of e's routings
        else:
            self.local_out = np.zeros((num_experts, num_gpus))
        self.classes = ctx.exchanges(spg)
        # temperatures of the smoothed max, a fixed share of each side's all-to-all time
        self.soft = (ctx.soft * float(ctx.comm(*self.inn)), ctx.soft * float(ctx.comm(*self.out)) if self.has_out else 0.0)

    def times(self, soft: bool = False) -> tuple[float, float | None]:
        """(time[layer], time[layer + 1]) as the layer stands; with `soft`, the smoothed times the
        search descends. The second is None where this layer does not change it (the last layer, or
        no flow into the next)."""
        ctx = self.ctx
        first = ctx.layer_time(self.gpu_load.max() * ctx.compute, ctx.comm(*self.inn, soft=soft and self.soft[0]))
        second = None
        if self.has_out:
            second = ctx.layer_time(self.next_compute, ctx.comm(*self.out, soft=soft and self.soft[1]))
        return float(first), None if second is None else float(second)

    def now(self, soft: bool = False) -> float:
        first, second = self.times(soft)
        return first + (second or 0.0)

    def candidates(self, deadline: float):
        """(size, i, j) chunks of the valid exchanges of every class, until `deadline`."""
        for i_all, j_all in self.classes:
            for lo in range(0, i_all.shape[0], _CHUNK):
                if time.perf_counter() >= deadline:
                    return
                i, j = self.valid(i_all[lo:lo + _CHUNK], j_all[lo:lo + _CHUNK])
                if i.size:
                    yield i_all.shape[1], i, j

    def valid(self, i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The exchanges among (i, j) ((C, k) slots on one GPU, (C, k) on another) that keep one
        replica per GPU and every load within the cap."""
        e, f = self.plan[self.layer, i], self.plan[self.layer, j]  # (C, k) each
        a, b = i[:, 0] // self.spg, j[:, 0] // self.spg  # (C,)
        ok = (self.present[e, b[:, None]] == 0).all(axis=1) & (self.present[f, a[:, None]] == 0).all(axis=1)
        ok &= ~(e[:, :, None] == f[:, None, :]).any(axis=(1, 2))
        moved = self.weight[f].sum(axis=1) - self.weight[e].sum(axis=1)  # load a gains, b loses
        cap = self.ctx.cap[self.layer]
        ok &= (self.gpu_load[a] + moved <= cap) & (self.gpu_load[b] - moved <= cap)
        return i[ok], j[ok]

    def score(self, i: np.ndarray, j: np.ndarray, soft: bool = False) -> np.ndarray:
        """(C,) time[layer] + time[layer + 1] after each exchange (i[c], j[c]) alone (smoothed with
        `soft`): the experts in slots i[c] go to j[c]'s GPU and those in j[c] to i[c]'s."""
        ctx, num_gpus = self.ctx, self.ctx.num_gpus
        e, f = self.plan[self.layer, i], self.plan[self.layer, j]  # (C, k)
        a, b = i[:, 0] // self.spg, j[:, 0] // self.spg
        rows = np.arange(i.shape[0])
        loads = np.broadcast_to(self.gpu_load, (i.shape[0], num_gpus)).copy()
        moved = self.weight[f].sum(axis=1) - self.weight[e].sum(axis=1)
        loads[rows, a] += moved
        loads[rows, b] -= moved
        new = np.broadcast_to(self.inn[:, None, :], (4, i.shape[0], num_gpus)).copy()  # (4, C, G)
        for x, frm, to in ((e, a, b), (f, b, a)):
            for m in range(x.shape[1]):  # distinct experts: each one's part changes on its own
                p = self.present[x[:, m]].copy()  # (C, G)
                p[rows, frm], p[rows, to] = 0.0, 1.0
                new += _incoming(self.src[x[:, m]], p, self.reps[x[:, m]][:, None], self.spread, ctx)
                new -= self.incoming[:, x[:, m]]
        total = ctx.layer_time(loads.max(axis=1) * ctx.compute, ctx.comm(*new, soft=soft and self.soft[0]))
        if self.has_out:
            moved = self._out_after(e, f, a, b, rows)
            total = total + ctx.layer_time(self.next_compute, ctx.comm(*moved, soft=soft and self.soft[1]))
        return total

    def local_gain(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """(C,) flow weight kept on its GPU gained by each exchange, over the layer pairs (l-1, l)
        and (l, l+1): what the cross-GPU hop fraction counts."""
        e, f = self.plan[self.layer, i], self.plan[self.layer, j]
        a, b = (i[:, 0] // self.spg)[:, None], (j[:, 0] // self.spg)[:, None]
        gain = np.zeros(i.shape[0])
        for x, frm, to in ((e, a, b), (f, b, a)):
            gain += (self.local_in[x, to] - self.local_in[x, frm]
                     + (self.local_out[x, to] - self.local_out[x, frm]) / self.reps[x]).sum(axis=1)
        return gain

    def _out_after(self, e, f, a, b, rows) -> np.ndarray:
        """(4, C, G) outgoing sums after each exchange: e's leave from b instead of a, f's from a
        instead of b."""
        moved = np.broadcast_to(self.out[:, None, :], (4, rows.shape[0], self.ctx.num_gpus)).copy()
        for x, frm, to in ((e, a, b), (f, b, a)):
            for m in range(x.shape[1]):
                y = x[:, m]
                per = 1.0 / self.reps[y]  # (C,) a replica's share of the expert's routings
                for k, table in ((1, self.r_nv), (3, self.r_net)):
                    moved[k] += (table[y, to] - table[y, frm]) * per[:, None]
                for k, sent in ((0, self.s_nv), (2, self.s_net)):
                    moved[k][rows, frm] -= sent[y, frm] * per
                    moved[k][rows, to] += sent[y, to] * per
        return moved

    def apply(self, i: np.ndarray, j: np.ndarray) -> None:
        """Make exchange (i, j) ((k,) slots each) and update the sums by its exact change."""
        plan, layer = self.plan, self.layer
        e, f = plan[layer, i].copy(), plan[layer, j].copy()
        a, b = int(i[0]) // self.spg, int(j[0]) // self.spg
        if self.has_out:
            self.out = self._out_after(e[None], f[None], np.array([a]), np.array([b]), np.arange(1))[:, 0]
        for x, frm, to in ((e, a, b), (f, b, a)):
            for y in x:
                self.inn -= self.incoming[:, y]
                self.present[y, frm], self.present[y, to] = 0.0, 1.0
                self.incoming[:, y] = _incoming(self.src[y:y + 1], self.present[y:y + 1], self.reps[y:y + 1, None],
                                                self.spread, self.ctx)[:, 0]
                self.inn += self.incoming[:, y]
        moved = self.weight[f].sum() - self.weight[e].sum()
        self.gpu_load[a] += moved
        self.gpu_load[b] -= moved
        plan[layer, i], plan[layer, j] = f, e


def _incoming(src: np.ndarray, present: np.ndarray, reps: np.ndarray, spread: bool, ctx: _Context) -> np.ndarray:
    """(4, C, G) one expert's part of the incoming sums (sent over NVLink, received over NVLink, sent
    over the network, received over the network) for each of C (routings from each GPU toward it
    (C, G), its replica set (C, G) in {0, 1}, its replica count (C, 1)).

    Without `spread`, routings from a GPU holding a replica stay there, the rest split evenly over
    the replicas; with it (first layer) every GPU sends to every replica, keeping only its own share."""
    num_nodes = ctx.num_nodes
    c, n = src.shape
    to_node = lambda x: np.repeat(x.reshape(c, num_nodes, -1).sum(axis=2), n // num_nodes, axis=1)  # noqa: E731
    here = to_node(present)  # (C, G) replicas in each GPU's node
    leaving = src if spread else src * (1.0 - present)
    near = here - present if spread else here  # replicas a GPU reaches over NVLink
    in_node = to_node(leaving)  # (C, G) routings leaving GPUs of each GPU's node
    everywhere = leaving.sum(axis=1, keepdims=True)
    received_near = in_node - leaving if spread else in_node
    return np.stack([leaving * near / reps, present / reps * received_near,
                     leaving * (reps - here) / reps, present / reps * (everywhere - in_node)])


def _exchanges(num_gpus: int, spg: int, num_nodes: int, size: int, same_node: bool) -> tuple[np.ndarray, np.ndarray]:
    """(C, size) slots on GPU a and (C, size) on GPU b > a for every size-for-size exchange between
    two GPUs (of one node only, with `same_node`)."""
    a, b = np.triu_indices(num_gpus, 1)
    if same_node:
        keep = a // (num_gpus // num_nodes) == b // (num_gpus // num_nodes)
        a, b = a[keep], b[keep]
    members = np.array(list(itertools.combinations(range(spg), size)), dtype=np.int64)  # (Q, size)
    q, r = np.meshgrid(np.arange(len(members)), np.arange(len(members)), indexing="ij")
    q, r = q.ravel(), r.ravel()
    i = a[:, None, None] * spg + members[q][None, :, :]  # (P, Q*Q, size)
    j = b[:, None, None] * spg + members[r][None, :, :]
    return i.reshape(-1, size), j.reshape(-1, size)
