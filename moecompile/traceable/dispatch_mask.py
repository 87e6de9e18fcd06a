"""MoE blocks whose router hands the experts a one-hot dispatch mask (Switch Transformers): the
router keeps its own capacity logic, the experts are a ModuleDict / ModuleList of plain MLPs visited
by a Python loop over the experts some token was dispatched to.

    def forward(self, hidden_states):                         # the block
        mask, probs, logits = self.router(hidden_states)      # (B, S, E) one-hot, 0 rows dropped; (B, S, 1)
        out = self.experts(x2d, mask.view(-1, 1, E), probs.view(-1, 1))   # a loop: graph breaks
        return out.reshape(B, S, H)

    Matches:     a block with a `router` child and an `experts` ModuleDict / ModuleList of E >= 2
                 modules of one class, each two Linear layers without bias (wi / wo, fc1 / fc2, w1 / w2,
                 up_proj / down_proj) and an activation module, whose router returns (mask, probs, ...)
                 with `mask` one-hot or all-zero per token over E experts and `probs` one weight per token
    Rewrites to: block.forward = MaskForward(block, form): under torch.compile

                     mask, probs = router(x)[:2]                                   (the router as it is)
                     ids = mask.argmax(-1)                                         (T, 1)
                     w   = probs * mask.sum(-1)                                    (T, 1): 0 if dropped
                     out = experts(x2d, ids, w)                                    (T, H)

                 and experts.forward, given (T, K) ids, the stacked form (one grouped GEMM per
                 projection over torch.stack of the experts' weights); outside torch.compile, and in
                 training with expert dropout, the modules' own forwards.

The router stays as the model wrote it (capacity, jitter, its own dtype), so the compiled layer
routes exactly as eager does; detection then takes it as a traced router. A form is kept only if it
reproduces the block's own forward on probe inputs; else the block is left as it is, with the reason.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..codegen import grouped_mm  # noqa: F401  (registers torch.ops.moecompile.grouped_mm)

_PLAIN = (("wi", "wo"), ("fc1", "fc2"), ("w1", "w2"), ("up_proj", "down_proj"))  # (up, down)
_ACT_ATTRS = ("act", "act_fn", "activation_fn", "activation")
# probe tolerance: max |form - block| / max |block|; the sums differ in order only
_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


@dataclass(frozen=True)
class Form:
    """Where the experts' projections and activation are, by attribute name."""

    up: str
    down: str
    act: str

    def describe(self) -> str:
        return f"{self.up} / {self.down}, one-hot dispatch mask"


def _experts_of(block: nn.Module) -> list[nn.Module]:
    experts = getattr(block, "experts", None)
    if isinstance(experts, nn.ModuleDict):
        return list(experts.values())
    return list(experts) if isinstance(experts, nn.ModuleList) else []


def find_form(block: nn.Module) -> tuple[Form | None, str | None]:
    """The block's form; (None, None) if it is not such a block at all, (None, reason) if it looks
    like one but no form reproduces it."""
    experts = _experts_of(block)
    if len(experts) < 2 or not isinstance(getattr(block, "router", None), nn.Module) \
            or len({type(e) for e in experts}) != 1:
        return None, None
    linears = {n for n, c in experts[0].named_children() if isinstance(c, nn.Linear)}
    names = next((t for t in _PLAIN if set(t) == linears), None)
    act = next((a for a in _ACT_ATTRS if callable(getattr(experts[0], a, None))), None)
    params = list(inspect.signature(type(block).forward).parameters)[1:]
    if names is None or act is None or len(params) != 1:
        return None, None
    for i, e in enumerate(experts):
        for n in names:
            lin = getattr(e, n)
            if lin.bias is not None:
                return None, f"expert {i}'s {n} has a bias, which this form does not stack"
            if lin.weight.shape != getattr(experts[0], n).weight.shape:
                return None, f"expert {i}'s {n} is {tuple(lin.weight.shape)}, expert 0's another shape"
    form = Form(*names, act)
    why = _probe(block, form)
    return (form, None) if why is None else (None, why)


# --- the traced forward ---------------------------------------------------------------------------


def mask_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block with the experts called on (T, 1) ids and weights instead of the dispatch mask."""
    lead, H = x.shape[:-1], x.shape[-1]
    mask, probs = block.router(x)[:2]
    E = mask.shape[-1]
    mask = mask.reshape(-1, E)  # (T, E): one-hot, or all zero where the capacity dropped the token
    ids = mask.argmax(dim=-1, keepdim=True)  # (T, 1); 0 for a dropped token, which weighs 0
    w = probs.reshape(-1, 1) * mask.sum(dim=-1, keepdim=True).to(probs.dtype)  # (T, 1)
    return block.experts(x.reshape(-1, H), ids, w).reshape(*lead, H)


def stacked_experts(experts: list[nn.Module], form: Form, hidden: torch.Tensor, ids: torch.Tensor,
                    w: torch.Tensor) -> torch.Tensor:
    """sum_k w[t, k] * expert_{ids[t, k]}(hidden[t]) (T, H): one grouped GEMM per projection."""
    w_up = torch.stack([getattr(e, form.up).weight for e in experts])  # (E, I, H)
    w_down = torch.stack([getattr(e, form.down).weight for e in experts])  # (E, H, I)
    (T, K), H, E = ids.shape, hidden.shape[-1], len(experts)
    flat_ids = ids.reshape(-1)  # (T*K,)
    perm = torch.argsort(flat_ids)  # pairs grouped by expert
    counts = torch.zeros(E, dtype=torch.int64, device=hidden.device).index_add_(0, flat_ids, torch.ones_like(flat_ids))
    offs = torch.cumsum(counts, dim=0).to(torch.int32)  # (E,)
    gmm = torch.ops.moecompile.grouped_mm
    h = getattr(experts[0], form.act)(gmm(hidden[perm // K], w_up.transpose(1, 2), offs))  # (T*K, I)
    y = gmm(h.to(w_down.dtype), w_down.transpose(1, 2), offs) * w.reshape(-1)[perm].unsqueeze(-1)  # (T*K, H)
    out = torch.empty_like(y).index_copy(0, perm, y).view(T, K, H).sum(dim=1)
    return out.to(hidden.dtype)


def _drops(block: nn.Module) -> bool:
    """Expert dropout that would act now (training with p > 0): the stacked form has none."""
    return block.training and any(isinstance(m, nn.Dropout) and m.p > 0 for e in _experts_of(block)
                                  for m in e.modules())


class MaskForward:
    """`block.forward` once prepared: the form under torch.compile, the block's own otherwise."""

    def __init__(self, block: nn.Module, form: Form):
        self.block, self.form = block, form

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling() and len(args) == 1 and not kwargs and not _drops(self.block):
            return mask_forward(self.block, args[0])
        return type(self.block).forward(self.block, *args, **kwargs)


class StackedExpertsForward:
    """`experts.forward` once prepared: given (T, K) integer ids (the prepared block's call), the
    stacked form; given anything else (the block's own forward: a dispatch mask), its own loop."""

    def __init__(self, block: nn.Module, form: Form):
        self.block, self.form = block, form

    def __call__(self, hidden, ids, w):
        if ids.dim() == 2 and not ids.is_floating_point():
            return stacked_experts(_experts_of(self.block), self.form, hidden, ids, w)
        experts = self.block.experts
        return type(experts).forward(experts, hidden, ids, w)


def install(block: nn.Module, form: Form) -> None:
    block.forward = MaskForward(block, form)
    block.experts.forward = StackedExpertsForward(block, form)


def _probe(block: nn.Module, form: Form) -> str | None:
    """Why the form does not reproduce the block on probe inputs in eval mode, or None."""
    experts = _experts_of(block)
    H = getattr(experts[0], form.up).in_features
    weight = getattr(experts[0], form.up).weight
    gen = torch.Generator().manual_seed(0)
    probes = [torch.randn(2, 5, H, generator=gen), torch.randn(1, 7, H, generator=gen) * 8.0]
    modes = {m: m.training for m in block.modules()}
    saved = block.experts.__dict__.get("forward")
    try:
        block.eval()
        block.experts.forward = StackedExpertsForward(block, form)
        with torch.no_grad():
            for x in probes:
                x = x.to(dtype=weight.dtype, device=weight.device)
                routed = block.router(x)
                if not (isinstance(routed, (tuple, list)) and len(routed) >= 2 and torch.is_tensor(routed[0])
                        and routed[0].shape[-1] == len(experts) and routed[0].shape[:-1] == x.shape[:-1]
                        and not routed[0].is_floating_point() and int(routed[0].sum(-1).max()) <= 1):
                    return "its router does not return a one-hot dispatch mask over the experts first"
                want = type(block).forward(block, x)
                got = mask_forward(block, x)
                if not torch.is_tensor(want) or got.shape != want.shape:
                    return "its forward does not return the layer output alone"
                scale = want.abs().max().double().clamp_min(1e-30)
                err = ((got.double() - want.double()).abs().max() / scale).item()
                if err > _TOLERANCE.get(weight.dtype, 1e-4):
                    return f"the stacked form differs from its forward on a probe (relative error {err:.3g})"
    except Exception as err:  # noqa: BLE001 -- the block's own code, on a probe
        return f"its forward fails on a probe: {type(err).__name__}: {err}"
    finally:
        if saved is None:
            block.experts.__dict__.pop("forward", None)
        else:
            block.experts.forward = saved
        for m, training in modes.items():
            m.training = training
    return None
