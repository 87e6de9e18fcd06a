"""Experts modules with stacked weights whose forward loops over the experts some token picked,
written outside transformers' `@use_experts_implementation` (DBRX, Step3p7 and LongCat-Flash in
transformers 5.x, and user code in the same style):

    def forward(self, hidden_states, top_k_index, top_k_weights):
        for e in torch.greater(one_hot(top_k_index).sum(...), 0).nonzero():   # a graph break
            slot, token = torch.where(mask[e])
            out.index_add_(0, token, expert_e(hidden_states[token]) * top_k_weights[token, slot, None])

    Matches:     a module (not prepared, not a @use_experts_implementation class) whose forward takes
                 (hidden_states, top_k_index, top_k_weights) and whose weights one of the layouts reads:
                   gate_up_proj (E, 2I, H) or (E, H, 2I) and down_proj (E, H, I) or (E, I, H), the gated
                   activation `_apply_gate(gate_up)` if the module has one, else act_fn(gate) * up
                   mlp.w1 / mlp.v1 / mlp.w2, each (E*I, H), act mlp.activation_fn (DBRX)
                 and ids past the E weight experts, up to a `zero_expert_num`, pass the token through
                 (LongCat-Flash's zero-compute experts)
    Rewrites to: module.forward = LoopFreeForward(module, form): under torch.compile

                     rows = x2d[sort(ids) // K]                                       (T*K, H)
                     y    = gm(gate(gm(rows, W_gu)), W_d) * w   (identity rows: rows * w)
                     out  = y unsorted, summed over K                                 (T, H)

                 with gm = moecompile::grouped_mm over views of the module's own parameters (no
                 copy); outside torch.compile, the module's own loop.

A form is kept only if it reproduces the module's own forward on probe inputs (random tokens, ids
with an expert no token picks, and the identity experts where there are some); a module that looks
like one but that no form reproduces is left as it is, with the reason.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..codegen import grouped_mm  # noqa: F401  (registers torch.ops.moecompile.grouped_mm)

# probe tolerance: max |form - loop| / max |loop|; the sums differ in order only
_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


@dataclass(frozen=True)
class Form:
    """How one module's weights read as grouped GEMM operands (a (S, in) @ w (E, in, out))."""

    layout: str  # "gate_up" | "w1_v1_w2"
    experts: int  # E: experts with weights
    identity: int  # zero-compute experts after them
    transpose_gate_up: bool  # gate_up_proj is (E, 2I, H): transposed to (E, H, 2I)
    transpose_down: bool  # down_proj is (E, H, I): transposed to (E, I, H)
    batch_view: bool = False  # the loop returns out.view(x.shape[0], -1, H) (DBRX)

    def describe(self) -> str:
        zero = f" + {self.identity} zero-compute experts" if self.identity else ""
        return f"{self.layout} weights, E={self.experts}{zero}"


def _forward_arity(module: nn.Module) -> bool:
    """forward(self, hidden_states, top_k_index, top_k_weights): three arguments, no more."""
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return False
    return len(params) == 3 and all(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def candidate_forms(module: nn.Module) -> list[Form]:
    """Every reading of the module's weights its shapes allow (each one checked on probes later)."""
    if not _forward_arity(module):
        return []
    zero = int(getattr(module, "zero_expert_num", 0) or 0)
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == down.dim() == 3:
        E = down.shape[0]
        if gate_up.shape[0] not in (E, E + zero):
            return []
        return [Form("gate_up", E, zero, tg, td) for tg in (True, False) for td in (True, False)]
    mlp = getattr(module, "mlp", None)
    if mlp is not None and all(isinstance(getattr(mlp, n, None), nn.Parameter) and getattr(mlp, n).dim() == 2
                               for n in ("w1", "v1", "w2")):
        experts = getattr(mlp, "moe_num_experts", None) or getattr(module, "num_experts", None)
        if isinstance(experts, int) and experts > 0 and mlp.w1.shape[0] % experts == 0:
            return [Form("w1_v1_w2", experts, 0, False, False, batch_view=bv) for bv in (True, False)]
    return []


def weights(module: nn.Module, form: Form) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(W_gate_or_gate_up (E, H, *), W_up (E, H, I) or None when fused, W_down (E, I, H)): views."""
    if form.layout == "gate_up":
        gu = module.gate_up_proj[: form.experts]
        gu = gu.transpose(1, 2) if form.transpose_gate_up else gu
        dn = module.down_proj.transpose(1, 2) if form.transpose_down else module.down_proj
        return gu, None, dn
    mlp, E = module.mlp, form.experts
    H = mlp.w1.shape[1]
    view = (E, mlp.w1.shape[0] // E, H)  # (E, I, H)
    return (mlp.w1.view(view).transpose(1, 2), mlp.v1.view(view).transpose(1, 2), mlp.w2.view(view))


def _gate(module: nn.Module, form: Form, h_gate: torch.Tensor, h_up: torch.Tensor | None) -> torch.Tensor:
    if form.layout == "w1_v1_w2":
        return module.mlp.activation_fn(h_gate) * h_up
    if hasattr(module, "_apply_gate"):
        return module._apply_gate(h_gate)
    gate, up = h_gate.chunk(2, dim=-1)
    return module.act_fn(gate) * up


def loop_free_forward(module: nn.Module, form: Form, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor):
    """The module's loop as sorted rows and grouped GEMMs (see the module docstring)."""
    H = x.shape[-1]
    x2d = x.reshape(-1, H)  # (T, H)
    T, K = x2d.shape[0], ids.shape[-1]
    E = form.experts
    w_gu, w_up, w_down = weights(module, form)
    flat = ids.reshape(-1)  # (T*K,)
    perm = torch.argsort(flat, stable=True)  # (T*K,) grouped by expert, identity experts last
    counts = torch.zeros(E + form.identity, dtype=torch.int64, device=x.device)
    counts = counts.index_add(0, flat, torch.ones_like(flat))
    offs = torch.cumsum(counts[:E], dim=0)
    offs[-1] = T * K  # rows of identity experts ride along in the last group and are replaced below
    offs = offs.to(torch.int32)
    rows = x2d[perm // K]  # (T*K, H)
    gmm = torch.ops.moecompile.grouped_mm
    h = _gate(module, form, gmm(rows, w_gu, offs), gmm(rows, w_up, offs) if w_up is not None else None)
    y = gmm(h.to(rows.dtype), w_down, offs)  # (T*K, H)
    if form.identity:
        y = torch.where((flat[perm] >= E).unsqueeze(-1), rows, y)
    y = (y * w.reshape(-1)[perm].unsqueeze(-1)).to(x.dtype)
    out = torch.empty_like(y).index_copy(0, perm, y).view(T, K, H).sum(dim=1)  # (T, H)
    return out.view(x.shape[0], -1, H) if form.batch_view else out.reshape(x.shape)


class LoopFreeForward:
    """`experts.forward` once prepared: the loop-free form under torch.compile, the module's own
    forward otherwise (and for any call the form does not model)."""

    def __init__(self, module: nn.Module, form: Form):
        self.module, self.form = module, form

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling() and len(args) == 3 and not kwargs:
            x, ids, w = args
            if torch.is_tensor(ids) and ids.dim() == 2 and (x.dim() == 2 or self.form.batch_view):
                return loop_free_forward(self.module, self.form, x, ids, w)
        return type(self.module).forward(self.module, *args, **kwargs)


def find_form(module: nn.Module) -> tuple[Form | None, str | None]:
    """(form, None); (None, None) for a module of no known layout; (None, why) when none reproduces it."""
    forms = candidate_forms(module)
    if not forms:
        return None, None
    param = next(module.parameters())
    dtype, device = param.dtype, param.device
    E, Z = forms[0].experts, forms[0].identity
    H = _hidden_size(module, forms[0])
    if not H:
        return None, "its hidden size is not known (no hidden_dim / hidden_size attribute)"
    probes = _probes(E, Z, H, dtype, device)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            wants = [type(module).forward(module, *p) for p in probes]
    except Exception as err:  # noqa: BLE001 -- the module's own code, on a probe
        return None, f"its forward fails on a probe: {type(err).__name__}: {err}"
    best = float("inf")
    for form in forms:
        err = _error(module, form, probes, wants)
        if err <= _TOLERANCE.get(dtype, 1e-4):
            return form, None
        best = min(best, err)
    return None, f"no loop-free form reproduces its forward (closest: relative error {best:.3g} on the probes)"


def _hidden_size(module: nn.Module, form: Form) -> int | None:
    if form.layout == "w1_v1_w2":
        return module.mlp.w1.shape[1]
    sizes = [getattr(module, a, None) for a in ("hidden_dim", "hidden_size")]
    return next((s for s in sizes if isinstance(s, int) and s > 0), None)


def _probes(E: int, Z: int, H: int, dtype, device) -> list[tuple]:
    """(x (T, H), ids (T, K), weights (T, K)): distinct ids per token, expert 0 never picked, and
    the identity experts among the picks when there are any."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for T, scale in ((7, 1.0), (3, 8.0)):
        K = min(2, max(1, E + Z - 1))
        choices = torch.stack([torch.randperm(E + Z - 1, generator=gen)[:K] + 1 for _ in range(T)])
        if Z:
            choices[0, 0] = E  # a zero-compute expert
        x = torch.randn(T, H, generator=gen) * scale
        w = torch.rand(T, K, generator=gen) + 0.1
        out.append((x.to(dtype=dtype, device=device), choices.to(device), w.to(dtype=dtype, device=device)))
    return out


def _error(module, form, probes, wants) -> float:
    worst = 0.0
    with torch.no_grad():
        for (x, ids, w), want in zip(probes, wants):
            try:
                got = loop_free_forward(module, form, x, ids, w)
            except (RuntimeError, ValueError, IndexError):  # shapes this reading does not chain
                return float("inf")
            if not torch.is_tensor(want) or got.shape != want.shape or got.dtype != want.dtype:
                return float("inf")
            scale = want.abs().max().double().clamp_min(1e-30)
            worst = max(worst, ((got.double() - want.double()).abs().max() / scale).item())
    return worst
