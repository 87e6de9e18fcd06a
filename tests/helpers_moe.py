"""Small hand-written modules for detection tests: MoE variants a user might write, and near-misses."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from moecompile.ir import MoESpec


class TinyMoE(nn.Module):
    """A user-written MoE: top-k over logits then softmax over the K picks, plain GELU experts stored
    transposed (E, H, I) / (E, I, H), gathered per (token, k) and multiplied with bmm.

    `combine` picks how expert outputs are merged: "sum" is the real MoE; "max" is a near-miss the
    compiler must refuse (same ops up to the last one). `forward(x, scale)` with a scale (B, S, 1)
    multiplies the expert inputs by another activation: not a function of x alone, also refused.
    """

    def __init__(self, E=6, K=2, H=16, I=12, combine="sum"):
        super().__init__()
        self.K, self.combine = K, combine
        self.router = nn.Linear(H, E, bias=False)
        self.w_up = nn.Parameter(torch.randn(E, H, I) / H**0.5)
        self.w_down = nn.Parameter(torch.randn(E, I, H) / I**0.5)

    def forward(self, x, scale=None):  # x (B, S, H)
        B, S, H = x.shape
        flat = x.view(-1, H)
        logits = self.router(flat)
        top_logits, ids = torch.topk(logits, self.K, dim=-1)
        weights = torch.softmax(top_logits, dim=-1)
        rep = flat.repeat_interleave(self.K, dim=0)  # (T*K, H)
        if scale is not None:
            rep = rep * scale.reshape(-1, 1).repeat_interleave(self.K, dim=0)
        h = F.gelu(torch.bmm(rep.unsqueeze(1), self.w_up[ids.reshape(-1)]).squeeze(1))
        y = torch.bmm(h.unsqueeze(1), self.w_down[ids.reshape(-1)]).squeeze(1)  # (T*K, H)
        y = (y * weights.reshape(-1, 1)).view(-1, self.K, H)
        out = y.sum(dim=1) if self.combine == "sum" else y.max(dim=1).values
        return out.view(B, S, H)


class TopkNotRouter(nn.Module):
    """top-k over activations, no router: not an MoE layer at all."""

    def __init__(self, H=16):
        super().__init__()
        self.proj = nn.Linear(H, H)

    def forward(self, x):
        vals, _ = torch.topk(self.proj(x).relu(), 3, dim=-1)
        return vals.sum(-1)


def capture(model, *args, dynamic=False) -> tuple[fx.GraphModule, list]:
    """The first FX graph Dynamo captures for model(*args), and its example inputs."""
    got = []

    def backend(gm, example_inputs):
        got.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend, dynamic=dynamic)(*args)
    return got[0]


# --- near-MoE layers: an MoE with one extra op that changes results only for some inputs ----------

SITES = ("logits", "weights", "input", "gate", "up", "act", "expert_out")


def perturb(op: str, t: torch.Tensor, limit: float) -> torch.Tensor:
    """An op that leaves values within +-limit (or above limit, for masks) alone."""
    if op == "clamp":
        return t.clamp(-limit, limit)
    if op == "clamp_max":
        return t.clamp(max=limit)
    if op == "masked_fill":  # small entries zeroed: |t| < 1 / limit never happens below the limit scale
        return t.masked_fill(t.abs() > limit, 0.0)
    if op == "mask_below":  # the routing-weight threshold of the issue: w.masked_fill(w < t, 0)
        return t.masked_fill(t < limit, 0.0)
    if op == "where":
        return torch.where(t > limit, torch.zeros_like(t), t)
    if op == "soft_clamp":  # smooth, but only bends values of the limit's size
        return torch.tanh(t / (limit * 10)) * (limit * 10)
    if op == "maximum":
        return torch.maximum(t, torch.zeros_like(t) + (-limit))
    if op == "mask_mul":  # a comparison turned into a multiplier
        return t * (t.abs() < limit).to(t.dtype)
    raise ValueError(op)


class NearMoE(nn.Module):
    """A hand-written top-k SwiGLU MoE, optionally with `op` applied at `site` (see SITES).

    With `capacity` set, (token, k) pairs beyond `capacity * T * K / E` per expert are dropped, as
    Switch/GShard layers do: index arithmetic only, data dependent through routing.
    """

    def __init__(self, E=8, K=2, H=16, I=12, site=None, op=None, limit=1.0, scoring="softmax",
                 renormalize=True, capacity=None, router_no_grad=False, split_experts=False):
        super().__init__()
        self.E, self.K, self.site, self.op, self.limit = E, K, site, op, limit
        self.scoring, self.renormalize, self.capacity = scoring, renormalize, capacity
        self.router_no_grad = router_no_grad  # the router's logits computed under torch.no_grad
        self.router = nn.Linear(H, E, bias=False)
        gate_up = nn.Parameter(torch.randn(E, 2 * I, H) / H**0.5)
        down = nn.Parameter(torch.randn(E, H, I) / I**0.5)
        # split_experts: the experts in a module of their own called as experts(x2d, ids, w), as
        # transformers writes them (detection then keeps an unmodeled router as traced)
        self.experts = _NearExperts(gate_up, down, self._at) if split_experts else None
        if not split_experts:
            self.gate_up, self.down = gate_up, down
        self.record: dict[str, float] = {}  # site -> max |value| seen (for calibrating limits)

    def _at(self, site: str, t: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            self.record[site] = max(self.record.get(site, 0.0), t.detach().abs().max().item())
        return perturb(self.op, t, self.limit) if site == self.site else t

    def forward(self, x):
        B, S, H = x.shape
        flat = x.reshape(-1, H)
        T = flat.shape[0]
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.router_no_grad):
            logits = self._at("logits", self.router(flat))
        probs = torch.softmax(logits.float(), dim=-1) if self.scoring == "softmax" else torch.sigmoid(logits.float())
        w, ids = torch.topk(probs, self.K, dim=-1)
        if self.renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
        if self.capacity is not None:
            onehot = F.one_hot(ids.reshape(-1), self.E)  # (T*K, E)
            position = (torch.cumsum(onehot, dim=0) * onehot).sum(-1)  # (T*K,) 1-based slot in its expert
            keep = position <= int(self.capacity * T * self.K / self.E)
            w = w * keep.reshape(T, self.K).to(w.dtype)
        w = self._at("weights", w)
        experts = self.experts if self.experts is not None else self._experts
        return experts(flat, ids, w).view(B, S, H)

    def _experts(self, flat, ids, w):
        return _experts_forward(self.gate_up, self.down, self._at, flat, ids, w)


def _experts_forward(gate_up_w, down_w, at, flat, ids, w):
    T, K = ids.shape
    H = flat.shape[-1]
    rows = at("input", flat).repeat_interleave(K, dim=0)  # (T*K, H)
    gate_up = torch.bmm(rows.unsqueeze(1), gate_up_w[ids.reshape(-1)].transpose(1, 2)).squeeze(1)
    gate, up = gate_up.chunk(2, dim=-1)
    h = at("act", F.silu(at("gate", gate)) * at("up", up))
    y = torch.bmm(h.unsqueeze(1), down_w[ids.reshape(-1)].transpose(1, 2)).squeeze(1)
    y = at("expert_out", y)  # (T*K, H)
    return (y.view(T, K, H) * w.unsqueeze(-1).to(y.dtype)).sum(dim=1)


class _NearExperts(nn.Module):
    """NearMoE's experts as a module of their own: experts(x2d (T, H), ids (T, K), w (T, K))."""

    def __init__(self, gate_up, down, at):
        super().__init__()
        self.gate_up, self.down, self.at = gate_up, down, at

    def forward(self, flat, ids, w):
        return _experts_forward(self.gate_up, self.down, self.at, flat, ids, w)


class GroupedRouterMoE(nn.Module):
    """A DeepSeek-V3-style layer written by hand: sigmoid scores, a score-correction bias that steers
    the choice, top-`top_groups` of `groups` expert groups (by top-2 sum, or by max as in V2), weights
    gathered from the unbiased scores, renormalized with an epsilon, scaled. `tamper` puts a clamp
    into the group scores (a near-miss the compiler must refuse)."""

    def __init__(self, E=16, K=4, H=16, I=8, groups=4, top_groups=2, group_score="top2_sum", tamper=False):
        super().__init__()
        self.E, self.K, self.groups, self.top_groups = E, K, groups, top_groups
        self.group_score, self.tamper = group_score, tamper
        self.router = nn.Linear(H, E, bias=False)
        self.register_buffer("e_score_correction_bias", torch.randn(E) * 0.1)
        self.gate_up = nn.Parameter(torch.randn(E, 2 * I, H) / H**0.5)
        self.down = nn.Parameter(torch.randn(E, H, I) / I**0.5)

    def forward(self, x):
        B, S, H = x.shape
        flat = x.reshape(-1, H)
        T = flat.shape[0]
        scores = self.router(flat).sigmoid()
        choice = scores + self.e_score_correction_bias
        grouped = choice.view(T, self.groups, self.E // self.groups)
        if self.group_score == "top2_sum":
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
        else:
            group_scores = grouped.max(dim=-1).values
        if self.tamper:
            group_scores = group_scores.clamp(max=0.9)
        group_idx = torch.topk(group_scores, k=self.top_groups, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(T, self.groups, self.E // self.groups).reshape(T, self.E)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        ids = torch.topk(choice, k=self.K, dim=-1, sorted=False)[1]
        w = scores.gather(1, ids)
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20) * 2.5
        rows = flat.repeat_interleave(self.K, dim=0)
        gate, up = torch.bmm(rows.unsqueeze(1), self.gate_up[ids.reshape(-1)].transpose(1, 2)).squeeze(1).chunk(2, -1)
        y = torch.bmm((F.silu(gate) * up).unsqueeze(1), self.down[ids.reshape(-1)].transpose(1, 2)).squeeze(1)
        out = (y.view(T, self.K, H) * w.unsqueeze(-1)).sum(dim=1)
        return out.view(B, S, H)


class ClampedSwiGLUMoE(nn.Module):
    """GPT-OSS-style experts by hand: router with bias, top-k then softmax, interleaved (E, H, 2I)
    gate/up with biases, gate.clamp(max=L), up.clamp(-L, L), (up + 1) * g * sigmoid(alpha * g).
    `up_limit` other than `limit` is a near-miss: clamps the spec does not model."""

    def __init__(self, E=8, K=2, H=16, I=8, limit=1.0, up_limit=None, alpha=1.702):
        super().__init__()
        self.K, self.limit, self.alpha = K, limit, alpha
        self.up_limit = limit if up_limit is None else up_limit
        self.router = nn.Linear(H, E)
        self.gate_up = nn.Parameter(torch.randn(E, H, 2 * I) / H**0.5)
        self.gate_up_bias = nn.Parameter(torch.randn(E, 2 * I) * 0.1)
        self.down = nn.Parameter(torch.randn(E, I, H) / I**0.5)
        self.down_bias = nn.Parameter(torch.randn(E, H) * 0.1)

    def forward(self, x):
        B, S, H = x.shape
        flat = x.reshape(-1, H)
        top, ids = torch.topk(self.router(flat), self.K, dim=-1)
        w = torch.softmax(top, dim=-1)
        rows = flat.repeat_interleave(self.K, dim=0)
        e = ids.reshape(-1)
        h = torch.bmm(rows.unsqueeze(1), self.gate_up[e]).squeeze(1) + self.gate_up_bias[e]
        gate, up = h[..., ::2].clamp(max=self.limit), h[..., 1::2].clamp(-self.up_limit, self.up_limit)
        h = (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
        y = torch.bmm(h.unsqueeze(1), self.down[e]).squeeze(1) + self.down_bias[e]
        return (y.view(-1, self.K, H) * w.unsqueeze(-1)).sum(dim=1).view(B, S, H)

# --- per-expert modules: an nn.ModuleList of MLPs and a Python loop over experts -----------------


class SwiGLUExpert(nn.Module):
    """One expert as older transformers (Mixtral 4.x) and many user models write it."""

    def __init__(self, H: int, I: int, act=F.silu):
        super().__init__()
        self.w1 = nn.Linear(H, I, bias=False)  # gate
        self.w2 = nn.Linear(I, H, bias=False)  # down
        self.w3 = nn.Linear(H, I, bias=False)  # up
        self.act_fn = act

    def forward(self, x):
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class ListMoE(nn.Module):
    """A user-written MoE block with one module per expert: router Linear, softmax in fp32, top-k,
    renormalization, then a loop over experts that picks each expert's tokens with torch.where and
    adds the weighted outputs back with index_add_.

    `loop="range"` visits every expert (`for e in range(E)`); `loop="hit"` only the experts some
    token picked (`expert_mask.sum(...).nonzero()`, transformers >= 4.48). `router_logits=True`
    returns `(out, logits)` as Mixtral-4.x blocks do.
    """

    def __init__(self, E=8, K=2, H=16, I=12, loop="range", renormalize=True, router_logits=False,
                 order="score_then_topk"):
        super().__init__()
        self.num_experts, self.top_k, self.loop = E, K, loop
        self.renormalize, self.router_logits, self.order = renormalize, router_logits, order
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList([SwiGLUExpert(H, I) for _ in range(E)])

    def forward(self, x):
        B, S, H = x.shape
        flat = x.view(-1, H)
        logits = self.gate(flat)  # (T, E)
        if self.order == "score_then_topk":
            w = F.softmax(logits, dim=1, dtype=torch.float)
            w, ids = torch.topk(w, self.top_k, dim=-1)
        else:
            w, ids = torch.topk(logits, self.top_k, dim=-1)
            w = F.softmax(w, dim=1, dtype=torch.float)
        if self.renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
        w = w.to(x.dtype)
        out = torch.zeros_like(flat)
        expert_mask = F.one_hot(ids, num_classes=self.num_experts).permute(2, 1, 0)  # (E, K, T)
        if self.loop == "range":
            visit = range(self.num_experts)
        else:
            visit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in visit:
            e = e if isinstance(e, int) else e[0]
            slot, token = torch.where(expert_mask[e])
            y = self.experts[e](flat[token]) * w[token, slot, None]
            out.index_add_(0, token, y.to(x.dtype))
        out = out.view(B, S, H)
        return (out, logits) if self.router_logits else out


# Specs over every MoESpec variant, small enough for the interpreter (ops, programs, Triton tests).
SPECS = {
    "mixtral": MoESpec(8, 2, 32, 48, renormalize=True),
    "odd_tails": MoESpec(5, 2, 33, 17),
    "k_equals_e": MoESpec(4, 4, 16, 8, renormalize=True),
    "sigmoid_interleaved_transposed": MoESpec(6, 3, 24, 12, scoring="sigmoid", layout="interleaved",
                                              transposed=True, renormalize=True, routed_scaling=2.5),
    "topk_then_softmax_gelu": MoESpec(6, 2, 16, 8, topk_order="topk_then_score", activation="gelu_tanh"),
    "plain_mlp_relu": MoESpec(4, 1, 16, 8, gated=False, activation="relu"),
    "separate_gate_up": MoESpec(5, 2, 16, 8, layout="separate"),
    "shared_gated": MoESpec(8, 2, 32, 16, shared_intermediate=24, shared_gate=True),
    # I >= 256: the op's forward splits gate and up into two GEMMs (moe_torch._SPLIT_MIN_I)
    "wide_split": MoESpec(4, 2, 16, 256, renormalize=True),
    "wide_split_interleaved": MoESpec(4, 2, 16, 256, layout="interleaved", transposed=True),
    # GPT-OSS: router bias, top-k then softmax, interleaved (E, H, 2I) with biases, clamped SwiGLU
    # (a limit of 0.5 is reached by many of these random activations, so both clamps are exercised)
    "gpt_oss": MoESpec(8, 2, 32, 16, topk_order="topk_then_score", router_bias=True, layout="interleaved",
                       transposed=True, expert_bias=True, activation="clamped_swiglu", act_alpha=1.702,
                       act_limit=0.5),
    "separate_bias": MoESpec(5, 2, 16, 8, layout="separate", expert_bias=True),
    # DeepSeek-V4: SiLU of the gate clamped at the limit, up clamped both ways, in the shared expert too
    "clamped_silu_shared": MoESpec(6, 2, 16, 8, activation="clamped_silu", act_limit=0.5, shared_intermediate=12),
    # Nemotron-H: relu(h)^2, not gated
    "relu2": MoESpec(4, 2, 16, 8, gated=False, activation="relu2"),
    # Inkling-2: tanh softcaps on the gate (1.5) and up (2.0) factors, sigmoid of the raw gate
    "softcap_swiglu": MoESpec(6, 2, 16, 8, activation="softcap_swiglu", act_alpha=1.5, act_limit=2.0),
    "plain_bias": MoESpec(4, 2, 16, 8, gated=False, activation="relu", expert_bias=True),
    # DeepSeek-V3: sigmoid, correction bias, 2 of 4 groups by top-2 sum, gathered weights, fp32 router
    "deepseek_v3": MoESpec(16, 4, 32, 16, scoring="sigmoid", correction_bias=True, groups=4, top_groups=2,
                           group_score="top2_sum", weights_from="gather", renormalize=True, renorm_eps=1e-20,
                           routed_scaling=2.5, shared_intermediate=16, router_gemm_fp32=True),
    # DeepSeek-V2: softmax, 1 of 4 groups by max, dropped groups score 0 (K = 6 > 4 experts per group:
    # some picks come from dropped groups, with weight 0)
    "deepseek_v2": MoESpec(16, 6, 32, 16, groups=4, top_groups=1, masked_score=0.0, routed_scaling=2.5),
}


# (activation, gated, layout, transposed, expert_bias): every activation, layout, orientation and bias
GATE_UP_CASES = [
    ("silu", True, "concat", False, False),
    ("gelu", True, "concat", True, True),
    ("gelu_tanh", True, "interleaved", False, True),
    ("relu", True, "interleaved", True, False),
    ("clamped_swiglu", True, "interleaved", False, True),
    ("silu", True, "separate", True, True),
    ("clamped_swiglu", True, "separate", False, False),
    ("gelu", False, "concat", False, True),
    ("relu", False, "concat", True, False),
    ("clamped_silu", True, "concat", True, False),
    ("relu2", False, "concat", False, True),
    ("softcap_swiglu", True, "interleaved", False, True),
]
