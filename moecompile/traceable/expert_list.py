"""MoE blocks whose experts are E modules (`nn.ModuleList` of MLPs) visited by a Python loop.

Older transformers (Mixtral, Qwen-MoE, OLMoE before 5.0) and many user models write

    for e in range(E):                       # or: for e in expert_mask.sum(...).nonzero()
        slot, token = torch.where(expert_mask[e])
        out.index_add_(0, token, experts[e](x[token]) * w[token, slot, None])

`torch.where(mask)` has a data-dependent size: Dynamo breaks the graph there, and a break inside a
loop runs the whole block eagerly (only each expert's MLP is compiled, as a graph of its own).

    Matches:     a module with one router nn.Linear (H -> E) and one nn.ModuleList of E experts of one
                 class, each a gated MLP (w1 / w3 / w2, gate_proj / up_proj / down_proj) or a plain one
                 (w1 / w2, fc1 / fc2, up_proj / down_proj) of Linear layers without bias, and no other
                 parameters
    Rewrites to: block.forward = ListForward(block, layout, routing); under torch.compile:

                     W_g, W_u, W_d = stack(e.w1.weight), stack(e.w3.weight), stack(e.w2.weight)
                                                                      (E, I, H), (E, I, H), (E, H, I)
                     logits = router(x2d)                                            (T, E)
                     w, ids = route(logits)                                          (T, K)
                     rows   = x2d[sorted(ids) // K]                                  (T*K, H)
                     y      = gm(act(gm(rows, W_g)) * gm(rows, W_u), W_d) * w        (T*K, H)
                     out    = y unsorted, summed over K                              (T, H)

                 with gm = moecompile::grouped_mm; outside torch.compile the block's own forward.

The routing (scoring, top-k order, renormalization, K) is not read from the code: prepare runs the
block's own forward and each candidate formulation on probe inputs, in train and eval mode, and keeps
the first that gives the same output and sends as many rows to every expert. If none does, the block
is left as it is, with the reason.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..codegen import grouped_mm  # noqa: F401  (registers torch.ops.moecompile.grouped_mm)

_GATED = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))  # (gate, up, down)
_PLAIN = (("w1", "w2"), ("fc1", "fc2"), ("up_proj", "down_proj"))  # (up, down)
_EXPERTS_NAME = re.compile(r"experts?|local_experts|expert_list|mlps?")
_ACT_ATTRS = ("act_fn", "act", "activation_fn", "activation")
_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
                "relu": F.relu}
# Probe tolerance: max |candidate - block| / max |block|. The candidate sums in another order than
# the loop (fp32: ~1e-7 relative); a wrong routing or activation is off by O(1).
_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


@dataclass(frozen=True)
class Layout:
    """Where a block keeps its router and experts, by attribute name."""

    router: str
    experts: str
    gate: str | None  # None: plain act(up) experts
    up: str
    down: str
    act: str | None  # the experts' activation attribute; None: Routing.activation


@dataclass(frozen=True)
class Routing:
    """What the block computes, as found on the probes."""

    top_k: int
    scoring: str = "softmax"  # softmax | sigmoid, in fp32
    order: str = "score_then_topk"  # | topk_then_score
    renormalize: bool = False
    activation: str = ""  # used when Layout.act is None
    returns_logits: bool = False  # forward returns (out, router_logits (T, E))
    flat_output: bool = False  # forward returns (T, H) whatever x's shape

    def describe(self) -> str:
        norm = ", renormalized" if self.renormalize else ""
        act = f", {self.activation}" if self.activation else ""
        return f"{self.scoring} {self.order.replace('_', ' ')}, top-{self.top_k}{norm}{act}"


def find_layout(block: nn.Module) -> tuple[Layout | None, str | None]:
    """The block's layout; (None, None) if it is not a router + expert list block at all, (None,
    reason) if it looks like one but does not fit."""
    lists = [(n, c) for n, c in block.named_children() if isinstance(c, nn.ModuleList) and len(c) >= 2
             and len({type(e) for e in c}) == 1
             and (_EXPERTS_NAME.fullmatch(n) or _linear_names(c[0]) is not None)]
    routers = [(n, c) for n, c in block.named_children() if isinstance(c, nn.Linear)
               and any(c.out_features == len(lst) for _, lst in lists)]
    if not lists or not routers:
        return None, None
    if len(routers) != 1 or len(lists) != 1:
        return None, (f"{len(routers)} router Linear(s) and {len(lists)} expert list(s); prepare takes "
                      "one of each")
    (router_name, router), (experts_name, experts) = routers[0], lists[0]
    E, H = router.out_features, router.in_features
    if E != len(experts):
        return None, f"router {router_name} has {E} outputs for {len(experts)} experts"
    names = _linear_names(experts[0])
    if names is None:
        linears = sorted(n for n, c in experts[0].named_children() if isinstance(c, nn.Linear))
        return None, (f"experts hold Linear layers {linears}; prepare knows {list(_GATED)} "
                      f"(gated) and {list(_PLAIN)} (plain)")
    gate, up, down = names if len(names) == 3 else (None, *names)
    shapes = {n: tuple(getattr(experts[0], n).weight.shape) for n in names}
    for i, e in enumerate(experts):
        for n in names:
            lin = getattr(e, n)
            if lin.bias is not None:
                return None, f"expert {i}'s {n} has a bias, which the MoE op does not model"
            if tuple(lin.weight.shape) != shapes[n]:
                return None, f"expert {i}'s {n} is {tuple(lin.weight.shape)}, expert 0's {shapes[n]}"
    inter = shapes[down][1]
    if shapes[down][0] != H or shapes[up] != (inter, H) or (gate and shapes[gate] != (inter, H)):
        return None, f"expert weights {shapes} do not chain H={H} -> I -> H"
    known = {id(p) for p in router.parameters()} | {id(getattr(e, n).weight) for e in experts for n in names}
    extra = [n for n, p in block.named_parameters() if id(p) not in known]
    if extra:
        return None, f"the block holds parameters besides its router and experts' Linears: {extra[:3]}"
    act = next((a for a in _ACT_ATTRS if callable(getattr(experts[0], a, None))), None)
    return Layout(router_name, experts_name, gate, up, down, act), None


def _linear_names(expert: nn.Module) -> tuple[str, ...] | None:
    """The expert's Linear children as one of the known (gate, up, down) / (up, down) sets, or None."""
    linears = {n for n, c in expert.named_children() if isinstance(c, nn.Linear)}
    return next((t for t in _GATED + _PLAIN if set(t) == linears), None)


# --- the traced forward ---------------------------------------------------------------------------


def _route(logits: torch.Tensor, r: Routing):
    """(T, E) logits -> top-k weights (T, K) in the logits' dtype, expert ids (T, K)."""
    def score(t):
        return F.softmax(t, dim=-1, dtype=torch.float) if r.scoring == "softmax" else torch.sigmoid(t.float())

    if r.order == "score_then_topk":
        w, ids = torch.topk(score(logits), r.top_k, dim=-1)
    else:
        top, ids = torch.topk(logits, r.top_k, dim=-1)
        w = score(top)
    if r.renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return w.to(logits.dtype), ids


def stacked_forward(block: nn.Module, layout: Layout, routing: Routing, x: torch.Tensor):
    """The block without a Python loop: one grouped GEMM per projection over stacked weights."""
    experts = getattr(block, layout.experts)
    # stacked before anything reads x: the op that replaces the layer goes right after x2d and reads them
    w_up = torch.stack([getattr(e, layout.up).weight for e in experts])  # (E, I, H)
    w_gate = torch.stack([getattr(e, layout.gate).weight for e in experts]) if layout.gate else None
    w_down = torch.stack([getattr(e, layout.down).weight for e in experts])  # (E, H, I)
    E, K, H = len(experts), routing.top_k, x.shape[-1]
    x2d = x.reshape(-1, H)  # (T, H)
    T = x2d.shape[0]
    logits = getattr(block, layout.router)(x2d)  # (T, E)
    w, ids = _route(logits, routing)
    flat_ids = ids.reshape(-1)  # (T*K,)
    perm = torch.argsort(flat_ids)  # (T*K,) (token, k) pairs grouped by expert
    counts = torch.zeros(E, dtype=torch.int64, device=x.device).index_add_(0, flat_ids, torch.ones_like(flat_ids))
    offs = torch.cumsum(counts, dim=0).to(torch.int32)  # (E,)
    rows = x2d[perm // K]  # (T*K, H)
    act = getattr(experts[0], layout.act) if layout.act else _ACTIVATIONS[routing.activation]
    gmm = torch.ops.moecompile.grouped_mm
    up = gmm(rows, w_up.transpose(1, 2), offs)  # (T*K, I)
    h = act(gmm(rows, w_gate.transpose(1, 2), offs)) * up if w_gate is not None else act(up)
    y = gmm(h, w_down.transpose(1, 2), offs) * w.reshape(-1)[perm].unsqueeze(-1)  # (T*K, H)
    out = torch.empty_like(y).index_copy(0, perm, y).view(T, K, H).sum(dim=1)  # (T, H)
    out = out if routing.flat_output else out.reshape(x.shape)
    return (out, logits) if routing.returns_logits else out


class ListForward:
    """`block.forward` once prepared: the stacked form under torch.compile, the block's own forward
    otherwise (and for any call with more than the hidden states)."""

    def __init__(self, block: nn.Module, layout: Layout, routing: Routing):
        self.block, self.layout, self.routing = block, layout, routing

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling() and len(args) == 1 and not kwargs:
            return stacked_forward(self.block, self.layout, self.routing, args[0])
        return type(self.block).forward(self.block, *args, **kwargs)


# --- finding the routing ------------------------------------------------------------------------


def find_routing(block: nn.Module, layout: Layout) -> tuple[Routing | None, str | None]:
    """Run the block and the candidate formulations on probes; the first that matches, else why not."""
    router = getattr(block, layout.router)
    experts = getattr(block, layout.experts)
    E, H = router.out_features, router.in_features
    dtype, device = router.weight.dtype, router.weight.device
    gen = torch.Generator().manual_seed(0)
    probes = [torch.randn(2, 5, H, generator=gen), torch.randn(1, 3, H, generator=gen) * 8.0]
    probes = [p.to(dtype=dtype, device=device) for p in probes]
    runs, why = _run_block(block, experts, probes)
    if runs is None:  # some blocks take (T, H) only
        runs, _ = _run_block(block, experts, [p.reshape(-1, H) for p in probes])
    if runs is None:
        return None, why
    first, T = runs[0], runs[0][0].shape[:-1].numel()
    K, rest = divmod(sum(first[3]), T)
    if rest or not 1 <= K <= E:
        return None, f"its experts saw {sum(first[3])} rows for {T} tokens: not a top-k routing"
    shape = _output_kind(first[2], first[0], E)
    if shape is None:
        return None, "its forward returns neither (..., H) nor (out, router_logits (T, E))"
    acts = ("",) if layout.act else tuple(_ACTIVATIONS)
    best = float("inf")
    for scoring, order, renorm, act in itertools.product(
            ("softmax", "sigmoid"), ("score_then_topk", "topk_then_score"), (True, False), acts):
        routing = Routing(K, scoring, order, renorm, act, *shape)
        err = _error(block, layout, routing, runs)
        if err <= _TOLERANCE.get(dtype, 1e-4):
            return routing, None
        best = min(best, err)
    return None, (f"no formulation prepare knows reproduces its forward (closest: relative error "
                  f"{best:.3g} on the probes)")


def _run_block(block, experts, probes) -> tuple[list | None, str | None]:
    """[(x, training, output, rows per expert)] of the block's own forward on every probe, in eval
    and train mode (modes and the random state are restored), or (None, why it failed)."""
    E = len(experts)
    rows = [0] * E

    def count(i):
        def hook(module, args):
            if args and torch.is_tensor(args[0]):
                rows[i] += args[0].shape[:-1].numel()
        return hook

    hooks = [e.register_forward_pre_hook(count(i)) for i, e in enumerate(experts)]
    modes = {m: m.training for m in block.modules()}
    device = probes[0].device
    cuda = []  # the CUDA generators fork_rng saves and restores
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    runs = []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            for x, training in itertools.product(probes, (False, True)):
                block.train(training)
                rows[:] = [0] * E
                runs.append((x, training, type(block).forward(block, x), list(rows)))
    except Exception as err:  # noqa: BLE001 -- the block's own code, on a probe
        return None, f"its forward fails on a probe {tuple(probes[0].shape)}: {type(err).__name__}: {err}"
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return runs, None


def _output_kind(out, x, E) -> tuple[bool, bool] | None:
    """(returns_logits, flat_output) for the block's output on probe x, or None if unknown."""
    T, H = x.shape[:-1].numel(), x.shape[-1]
    logits = isinstance(out, (tuple, list)) and len(out) == 2
    if logits:
        if not (torch.is_tensor(out[1]) and tuple(out[1].shape) == (T, E)):
            return None
        out = out[0]
    if not torch.is_tensor(out):
        return None
    if out.shape == x.shape:
        return logits, False
    return (logits, True) if tuple(out.shape) == (T, H) else None


def _error(block, layout, routing, runs) -> float:
    """Largest relative error of the candidate over the probe runs; inf on a structural mismatch."""
    worst = 0.0
    with torch.no_grad():
        for x, _, want, want_rows in runs:
            got = stacked_forward(block, layout, routing, x)
            _, ids = _route(getattr(block, layout.router)(x.reshape(-1, x.shape[-1])), routing)
            if torch.bincount(ids.reshape(-1), minlength=len(want_rows)).tolist() != want_rows:
                return float("inf")
            pairs = zip(got, want) if routing.returns_logits else [(got, want)]
            for a, b in pairs:
                if a.shape != b.shape or a.dtype != b.dtype:
                    return float("inf")
                scale = b.detach().abs().max().double().clamp_min(1e-30)
                worst = max(worst, ((a.double() - b.double()).abs().max() / scale).item())
    return worst
