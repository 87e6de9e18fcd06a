"""`shard_experts`: a model's MoE layers across the ranks of a process group, by a placement plan.

    dist.init_process_group("gloo")        # or "nccl"; torchrun sets rank and world size
    model = moecompile.distributed.shard_experts(model, plan="plan.json")
    compiled = torch.compile(model, backend="moe")
    ...
    state = moecompile.distributed.full_state_dict(model)   # rank 0: the unsharded checkpoint

A layer is a module with an `experts` child called as `experts(x (T, H), top_k_ids (T, K),
top_k_weights (T, K)) -> (T, H)` whose parameters stack the experts on their first dimension (E, ...):
the form of transformers' MoE models. The child is replaced by `ShardedExperts`, which holds this
rank's slots (a replica is a copy) as parameters of the same names, (slots per rank, ...), and runs
the layer over the group (exchange.py) with the family's own expert code on them. The router, the
shared experts and everything else stay replicated.

Plan: `moecompile place`'s JSON (or a Plan); its layers are the model's MoE layers in order, or by
name where the plan names them. No plan: the experts split evenly in order (E divisible by the
group's size). A plan that does not fit the model is rejected on every rank, before any weight moves.
"""

from __future__ import annotations

import copy
import os
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import UserInputError
from . import exchange, ops
from .exchange import LayerMap
from .overlap import Stats, choose_chunks


class ShardedExperts(nn.Module):
    """One layer's experts on this rank: `local` is the family's experts module over this rank's
    slots; `layer` says where every slot lives; `stats` what its exchanges did (overlap.Stats)."""

    def __init__(self, local: nn.Module, layer: LayerMap, group, expert_params: tuple[str, ...],
                 full_shapes: dict[str, tuple[int, ...]], overlap_chunks: int | str = "auto"):
        super().__init__()
        self.local = local
        self.layer = layer
        self.group = group
        self.expert_params = expert_params  # names of `local`'s parameters that hold slots
        self.full_shapes = full_shapes  # their logical shapes (E, ...)
        self.set_chunks(overlap_chunks)
        self.stats = Stats(rank=dist.get_rank(group))
        self.calls = 0  # forward calls, counted by the op (statistics can be reset; this is not)
        self.key = ops.register(self)  # how moecompile::ep_experts finds this layer

    def forward(self, hidden_states, top_k_index, top_k_weights):
        params = [getattr(self.local, n) for n in self.expert_params]
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        ids = top_k_index.reshape(-1, top_k_index.shape[-1])
        w = top_k_weights.reshape(-1, top_k_weights.shape[-1])
        y = torch.ops.moecompile.ep_experts(x, ids, w, params, self.key)
        return y.view(hidden_states.shape)

    def __deepcopy__(self, memo):
        """A copy with its own slots' weights, statistics and op key, on the same process group
        (which cannot be copied)."""
        clone = ShardedExperts.__new__(ShardedExperts)
        memo[id(self)] = clone
        memo[id(self.group)] = self.group
        for name, value in self.__dict__.items():
            clone.__dict__[name] = copy.deepcopy(value, memo)
        clone.key = ops.register(clone)
        return clone

    def set_chunks(self, overlap_chunks: int | str) -> None:
        """"auto" or a count (every rank must set the same, before the same call); setting what is
        already set keeps the count "auto" chose."""
        if getattr(self, "overlap_chunks", None) == overlap_chunks:
            return
        self.overlap_chunks = overlap_chunks
        self.chosen = None if overlap_chunks == "auto" else int(overlap_chunks)
        self.trial = None  # "auto": (C the model picked, the slowest rank's whole call with C = 1)
        self.auto_calls = 0  # "auto": calls since the setting

    def chunks(self) -> int:
        """C for this call: the option, or with "auto" (overlap.py) 1 for the first two calls, the
        model's choice for the third, then that choice if the third call was faster, else 1. The
        steps count this layer's calls (not its statistics, which a reset clears), so every rank
        takes each step at the same call, and each step is agreed by the group."""
        if self.chosen is not None:
            return self.chosen
        step, self.auto_calls = self.auto_calls, self.auto_calls + 1
        if step < 2:
            return 1
        device = next(iter(self.local.parameters()), torch.empty(0)).device  # NCCL reduces CUDA tensors
        if step == 2:  # the second call's measurements pick a C
            waited, computed, latency, whole = self.stats.last
            measured = torch.tensor([waited - latency, -computed, latency, -whole], dtype=torch.float64,
                                    device=device)
            dist.all_reduce(measured, op=dist.ReduceOp.MIN, group=self.group)
            comm, computed, latency, whole = measured.tolist()
            self.trial = (choose_chunks(max(comm, 0.0), -computed, 2 * latency), -whole)  # 2 messages a chunk
            if self.trial[0] == 1:
                self.chosen = 1
            return self.trial[0]
        slowest = torch.tensor([self.stats.last[3]], dtype=torch.float64, device=device)  # the trial call
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=self.group)
        self.chosen = self.trial[0] if slowest.item() < self.trial[1] else 1
        return self.chosen

    def run_local(self, x_rows, slot_rows, w_rows, params):
        """w * expert(x) for each received row, by the family's code over the local slots, each
        slot's rows padded to a multiple of TILE rows: the GEMMs then see the same shapes whatever
        else arrived, so a row's bits do not depend on the chunks, the plan or the world size
        (float32 GEMMs on CPU give other bits for a row in a batch of 1-11 rows than in one of 12+)."""
        spr = self.layer.slots_per_rank
        order, pos, slot_p = _padding(slot_rows, spr, TILE)
        x_p = x_rows.new_zeros((slot_p.shape[0], x_rows.shape[1]))
        x_p = x_p.index_copy(0, pos, x_rows.index_select(0, order))
        w_p = w_rows.new_zeros(slot_p.shape[0]).index_copy(0, pos, w_rows.index_select(0, order))
        values = dict(zip(self.expert_params, params))
        y_p = torch.func.functional_call(self.local, values, (x_p, slot_p[:, None], w_p[:, None]))
        return y_p.new_empty((x_rows.shape[0], y_p.shape[1])).index_copy(0, order, y_p.index_select(0, pos))

    def extra_repr(self) -> str:
        rank = dist.get_rank(self.group)
        return (f"layer={self.layer.name!r}, rank={rank}, experts={self.layer.local_experts(rank).tolist()}, "
                f"overlap_chunks={self.overlap_chunks!r}")


TILE = 16  # rows per slot are padded to a multiple of this


def _padding(slot_rows: torch.Tensor, num_slots: int, tile: int):
    """(order (R,) rows sorted by slot, pos (R,) each sorted row's place among the padded rows,
    slot of each padded row (P,)) with every slot's rows padded to a multiple of `tile`."""
    counts = torch.bincount(slot_rows, minlength=num_slots)
    padded = (counts + tile - 1) // tile * tile
    order = torch.sort(slot_rows, stable=True).indices
    sorted_slots = slot_rows.index_select(0, order)
    first = torch.cumsum(counts, 0) - counts
    start = torch.cumsum(padded, 0) - padded
    pos = start[sorted_slots] + torch.arange(slot_rows.shape[0], device=slot_rows.device) - first[sorted_slots]
    slot_p = torch.repeat_interleave(torch.arange(num_slots, device=slot_rows.device), padded)
    return order, pos, slot_p


def moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every MoE layer in `model`, in module order: modules with an `experts`
    child whose parameters all stack experts on their first dimension, or already sharded."""
    found = []
    for name, module in model.named_modules():
        experts = getattr(module, "experts", None)
        if isinstance(experts, ShardedExperts) or (isinstance(experts, nn.Module) and _num_experts(experts) is not None):
            found.append((name, module))
    return found


def _num_experts(experts: nn.Module) -> int | None:
    """E when every parameter of `experts` is (E, ...) with one E (and no child holds any), else None."""
    params = list(experts.parameters(recurse=False))
    if not params or any(_has_params(child) for child in experts.children()):
        return None
    firsts = {p.shape[0] if p.dim() else None for p in params}
    return firsts.pop() if len(firsts) == 1 and None not in firsts else None


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def shard_experts(model: nn.Module, plan=None, group=None, overlap_chunks: int | str = "auto") -> nn.Module:
    """Keep only this rank's expert slots of every MoE layer of `model` (in place; returns it).
    `plan`: a path to `moecompile place`'s JSON, a Plan, or None (experts split evenly in order).
    `group`: the process group (default: the whole world). `overlap_chunks`: "auto" (overlap.py) or
    how many chunks each layer's exchange is cut into (1: no overlap). Raises UserInputError when the
    plan does not fit the model, on every rank, before any weight moves."""
    from ..placement.plan import Plan, load_plan

    if not dist.is_available() or not dist.is_initialized():
        raise UserInputError("shard_experts needs torch.distributed initialized first "
                             "(dist.init_process_group, under torchrun)")
    group = group or dist.group.WORLD
    if overlap_chunks != "auto" and (isinstance(overlap_chunks, bool) or not isinstance(overlap_chunks, int)
                                     or not 1 <= overlap_chunks <= 64):
        raise UserInputError(f"overlap_chunks must be \"auto\" or a whole number in 1..64, got {overlap_chunks!r}")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    layers = moe_layers(model)
    sharded = [name for name, module in layers if isinstance(module.experts, ShardedExperts)]
    if sharded:
        raise UserInputError(f"{sharded[0] or 'the model'} is already sharded")
    if not layers:
        raise UserInputError("no MoE layer found: shard_experts looks for modules with an `experts` child "
                             "whose parameters stack the experts (E, ...)")
    if isinstance(plan, (str, os.PathLike)):
        plan = load_plan(plan)
    if plan is not None and not isinstance(plan, Plan):
        raise UserInputError(f"plan must be a path, a Plan or None, got {type(plan).__name__}")
    maps = _layer_maps(layers, plan, world)
    for (name, module), layer in zip(layers, maps):
        experts = module.experts
        params = [n for n, p in experts.named_parameters(recurse=False)]
        full_shapes = {n: tuple(getattr(experts, n).shape) for n in params}
        local = copy.copy(experts)  # the family's module, sharing nothing that changes below
        local._parameters = dict(experts._parameters)
        local._buffers = dict(experts._buffers)
        local._modules = dict(experts._modules)
        mine = torch.from_numpy(layer.local_experts(rank))
        for n in params:
            full = getattr(experts, n)
            shard = full.detach().index_select(0, mine.to(full.device)).clone()
            local._parameters[n] = nn.Parameter(shard, requires_grad=full.requires_grad)
        for attr in ("num_experts", "num_local_experts"):
            if isinstance(getattr(local, attr, None), int):
                setattr(local, attr, layer.slots_per_rank)
        sharded = ShardedExperts(local, layer, group, tuple(params), full_shapes, overlap_chunks)
        why = _differs(sharded, experts, group)
        if why:  # never a wrong answer: this layer keeps every expert on every rank
            warnings.warn(f"moecompile.distributed: layer {name} left unsharded: {why}", stacklevel=2)
            continue
        module.experts = sharded
    return model


PROBE_TOKENS = 8  # tokens per rank of the check every sharded layer passes before it replaces the original
PROBE_RTOL = {torch.float32: 1e-4, torch.float64: 1e-9}  # of the largest value; bf16 / fp16: 3e-2


def _differs(sharded: ShardedExperts, experts: nn.Module, group) -> str | None:
    """Why the sharded layer does not compute what `experts` computes, or None: every rank runs
    PROBE_TOKENS random tokens (the same generator everywhere, each its own) through both, and the
    group agrees on the largest error. It catches an experts module whose rows are not independent
    (one that renormalizes a token's K weights itself, say): sharded, each row runs alone."""
    rank = dist.get_rank(group)
    weight = next(iter(experts.parameters()))
    num_experts, top_k = sharded.layer.num_experts, min(2, sharded.layer.num_experts)
    hidden = _hidden_size(experts, sharded.full_shapes)
    if hidden is None:  # the same on every rank: the same module and weights' shapes
        return "its hidden size is not an attribute (hidden_dim, hidden_size) nor a size it takes as (1, H) -> (1, H)"
    gen = torch.Generator().manual_seed(1234 + rank)
    x = torch.randn(PROBE_TOKENS, hidden, generator=gen).to(weight.device, weight.dtype)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(PROBE_TOKENS)]).to(weight.device)
    w = torch.rand(PROBE_TOKENS, top_k, generator=gen).to(weight.device)
    params = [getattr(sharded.local, n) for n in sharded.expert_params]
    error = torch.zeros(1, dtype=torch.float64, device=weight.device)
    try:
        with torch.no_grad():
            want = experts(x, ids, w)
            got = exchange.experts_forward(sharded.layer, sharded.run_local, group, 1, None, x, ids, w, params)
        scale = want.double().abs().max().clamp_min(1e-30)
        error[0] = (got.double() - want.double()).abs().max() / scale if got.shape == want.shape else float("inf")
        error = torch.nan_to_num(error, nan=float("inf"))
    except (RuntimeError, ValueError, TypeError, IndexError) as err:  # the module refused one-row calls
        if "moecompile.distributed:" in str(err):
            raise  # a failed collective is not the module's fault: every rank must hear of it
        error[0] = float("inf")
    dist.all_reduce(error, op=dist.ReduceOp.MAX, group=group)
    tolerance = PROBE_RTOL.get(weight.dtype, 3e-2)
    if error.item() <= tolerance:
        return None
    return (f"its experts module gives other values when each of a token's rows runs alone on its slot's rank "
            f"(largest error {error.item():.3g} of the largest value, over {tolerance:g} allowed)")


def _hidden_size(experts: nn.Module, shapes: dict) -> int | None:
    """H of an experts module: its hidden_dim / hidden_size, else the first of its weights' sizes
    (past the expert dimension) that it takes as (1, H) -> (1, H); None if none does."""
    for attr in ("hidden_dim", "hidden_size"):
        if isinstance(getattr(experts, attr, None), int):
            return getattr(experts, attr)
    weight = next(iter(experts.parameters()))
    one = torch.zeros(1, 1, dtype=torch.long, device=weight.device)
    for size in dict.fromkeys(d for shape in shapes.values() for d in shape[1:]):
        try:
            with torch.no_grad():
                y = experts(torch.zeros(1, size, dtype=weight.dtype, device=weight.device), one,
                            torch.ones(1, 1, device=weight.device))
        except (RuntimeError, ValueError, TypeError, IndexError):
            continue
        if isinstance(y, torch.Tensor) and tuple(y.shape) == (1, size):
            return size
    return None


def _layer_maps(layers: list[tuple[str, nn.Module]], plan, world: int) -> list[LayerMap]:
    """One LayerMap per layer, from the plan or the even split; the plan checked against the model."""
    counts = [_num_experts(m.experts) for _, m in layers]
    names = [n for n, _ in layers]
    if plan is None:
        maps = []
        for name, num_experts in zip(names, counts):
            if num_experts % world:
                raise UserInputError(f"layer {name} has {num_experts} experts, which {world} ranks cannot split "
                                     "evenly; give a plan (moecompile place) with redundant slots")
            maps.append(LayerMap(name, np.arange(num_experts, dtype=np.int64), num_experts, world))
        return maps
    if plan.num_gpus != world:
        raise UserInputError(f"the plan places experts on {plan.num_gpus} GPUs but the process group has {world} ranks")
    rows = list(range(plan.num_layers))
    plan_names = list(plan.layers) if plan.layers else None
    if plan_names:
        missing = [n for n in names if n not in plan_names]
        if missing:
            raise UserInputError(f"the plan has no layer {missing[0]!r} (it names {', '.join(plan_names[:3])}"
                                 f"{', ...' if len(plan_names) > 3 else ''})")
        rows = [plan_names.index(n) for n in names]
    elif plan.num_layers != len(layers):
        raise UserInputError(f"the plan has {plan.num_layers} layers but the model has {len(layers)} MoE layers")
    maps = []
    for name, num_experts, row in zip(names, counts, rows):
        if plan.num_experts != num_experts:
            raise UserInputError(f"the plan is for {plan.num_experts} experts but layer {name} has {num_experts}")
        phy2log = np.asarray(plan.phy2log[row], dtype=np.int64)
        per_rank = phy2log.reshape(world, -1)
        for r in range(world):
            if len(set(per_rank[r].tolist())) != per_rank.shape[1]:
                raise UserInputError(f"the plan puts two replicas of one expert on rank {r} in layer {name}")
        maps.append(LayerMap(name, phy2log, num_experts, world))
    return maps


def full_state_dict(model: nn.Module, rank: int = 0) -> dict | None:
    """The model's state dict with every sharded layer's experts gathered back to their logical
    (E, ...) form, on global rank `rank` (None on the others): it loads into the unsharded model.
    Every rank must call it."""
    state = {}
    for name, tensor in model.state_dict().items():
        state[name] = tensor
    for mod_name, module in model.named_modules():
        if not isinstance(module, ShardedExperts):
            continue
        group, layer = module.group, module.layer
        world, me = dist.get_world_size(group), dist.get_rank()  # `rank` is a global rank
        first = np.full(layer.num_experts, -1, dtype=np.int64)
        for s in range(layer.phy2log.shape[0] - 1, -1, -1):
            first[layer.phy2log[s]] = s  # each expert's first slot
        prefix = f"{mod_name}.local."
        for n in module.expert_params:
            shard = getattr(module.local, n).detach()
            parts = [torch.empty_like(shard) for _ in range(world)]
            dist.all_gather(parts, shard.contiguous(), group=group)
            del state[prefix + n]
            if me == rank:
                slots = torch.cat(parts)  # (S, ...) in slot order
                state[f"{mod_name}.{n}"] = slots.index_select(0, torch.from_numpy(first).to(slots.device)).clone()
    if dist.get_rank() != rank:
        return None
    return state


def exchange_report(model: nn.Module, group=None) -> list[dict] | None:
    """What every sharded layer's exchanges did on every rank of `group`, on its first rank (None
    on the others): one dict per layer and rank, `layer` and overlap.Stats.summary()'s fields
    (rows and bytes sent and received, chunks, seconds exposed and computed, hidden estimate).
    Every rank must call it."""
    group = group or dist.group.WORLD
    mine = [{"layer": m.layer.name, **m.stats.summary()} for m in model.modules() if isinstance(m, ShardedExperts)]
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    if dist.get_rank(group) != 0:
        return None
    return sorted((row for rows in everyone for row in rows), key=lambda r: (r["layer"], r["rank"]))


def reset_exchange_stats(model: nn.Module) -> None:
    """Forget what the sharded layers' exchanges did so far (warm-up calls wait for compilation).
    Call it on every rank at the same step; the "auto" chunk choice does not depend on it."""
    for m in model.modules():
        if isinstance(m, ShardedExperts):
            m.stats.reset()


def average_gradients(model: nn.Module, group=None) -> None:
    """Data-parallel gradients of a sharded model, after backward and before the optimizer step:
    every replicated weight's gradient averaged over the group (as DistributedDataParallel does),
    every expert slot's divided by the group's size (its gradient already sums every rank's
    tokens). Then each rank's step equals one step of the unsharded model on all ranks' batches.
    A replicated weight no rank used gets a zero gradient (every rank must send the same list).
    `group` must be the one the experts were sharded over."""
    group = group or dist.group.WORLD
    world = dist.get_world_size(group)
    experts = {id(p) for m in model.modules() if isinstance(m, ShardedExperts) for p in m.local.parameters()}
    shared = []
    for p in model.parameters():
        if id(p) in experts:
            if p.grad is not None:
                p.grad.div_(world)
        elif p.requires_grad:
            if p.grad is None:  # unused on this rank, maybe not on others: every rank sends the same list
                p.grad = torch.zeros_like(p)
            shared.append(p.grad)
    for grads in _buckets(shared):  # one all-reduce per dtype and device, not one per weight
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def _buckets(grads: list[torch.Tensor], limit: int = 256 << 20) -> list[list[torch.Tensor]]:
    """Runs of consecutive gradients of one dtype and device, each at most `limit` bytes (a
    gradient larger than that alone): the same buckets on every rank."""
    out, current, size, key = [], [], 0, None
    for g in grads:
        k = (g.dtype, g.device)
        nbytes = g.numel() * g.element_size()
        if current and (k != key or size + nbytes > limit):
            out.append(current)
            current, size = [], 0
        current.append(g)
        size += nbytes
        key = k
    if current:
        out.append(current)
    return out
