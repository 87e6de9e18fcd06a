"""MoESpec and MoERegion: what one MoE layer computes, and where a captured graph computed it.

Dimensions: T tokens, E experts, K top-k, H hidden size, I expert intermediate size.

An MoE layer computes, per token row x (H,):

    logits = x @ W_router.T (+ b_router)                      (T, E)
    w, ids = route(logits)                                     (T, K) float, (T, K) int64
             (scoring, top-k, optionally among the best expert groups by scores + correction bias)
    y[t]   = sum_k w[t, k] * expert_{ids[t, k]}(x[t])          (T, H)
    y     += [sigmoid(x @ w_shared_gate.T) *] shared_mlp(x)    (optional shared expert)

`MoESpec` pins down every choice in that formula; `MoERegion` ties a spec to the FX nodes that
computed it in a captured graph.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

SCORINGS = ("softmax", "sigmoid")
TOPK_ORDERS = ("score_then_topk", "topk_then_score")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "clamped_swiglu", "clamped_silu", "relu2", "softcap_swiglu")
CLAMPED = ("clamped_swiglu", "clamped_silu")  # gated activations that clamp gate and up at act_limit
LAYOUTS = ("concat", "interleaved", "separate")
DTYPES = ("float32", "bfloat16", "float16", "float64")
GROUP_SCORES = ("max", "top2_sum")
WEIGHTS_FROM = ("topk", "gather")
CAPACITY_ORDERS = ("token_major", "k_major")
ROUTERS = ("fused", "traced")
# The routing fields a traced router leaves at their defaults: the model's own code decides them.
ROUTING_FIELDS = ("scoring", "topk_order", "renormalize", "router_bias", "router_fp32", "router_gemm_fp32",
                  "weights_in_input_dtype", "routed_scaling", "renorm_eps", "correction_bias", "groups",
                  "top_groups", "group_score", "masked_score", "weights_from", "capacity_factor",
                  "capacity_order", "capacity_rounding")


@dataclass(frozen=True)
class MoESpec:
    """Everything that decides what one MoE layer computes (weights aside)."""

    num_experts: int  # E
    top_k: int  # K
    hidden: int  # H
    intermediate: int  # I (per expert)
    # -- router --
    # fused: the router is the one the fields below describe (RouterGemm + TopK, the Gate kernel).
    # traced: the model's own routing code stays in the graph as traced (softplus, soft-capping, a
    # separately normalized router input, ...) and hands the op its top-k weights and ids
    # (`routing_weights`, `routing_ids`, both (T, K)); the routing fields below keep their defaults.
    router: str = "fused"
    scoring: str = "softmax"  # softmax | sigmoid over the E logits (or over the K selected ones)
    topk_order: str = "score_then_topk"  # score all E then top-k | top-k logits then score those K
    renormalize: bool = False  # w /= w.sum(-1) after top-k
    router_bias: bool = False  # F.linear(x, W_router, b_router)
    router_fp32: bool = True  # scores computed in float32 whatever the input dtype
    router_gemm_fp32: bool = False  # the router GEMM itself in float32 (x and W upcast; DeepSeek)
    weights_in_input_dtype: bool = False  # top-k weights cast back to the logits dtype before combine
    routed_scaling: float = 1.0  # w *= routed_scaling
    renorm_eps: float = 0.0  # w /= (w.sum(-1) + renorm_eps) (DeepSeek-V3 adds 1e-20)
    # DeepSeek-style selection (score_then_topk only): experts are chosen by `scores + bias` (a
    # correction bias that steers choice, not weights), among the `top_groups` best of `groups`
    # equal groups of experts, each group scored by its max or by the sum of its top 2.
    correction_bias: bool = False  # choice = scores + e_score_correction_bias (E,)
    groups: int = 1
    top_groups: int = 1
    group_score: str = "max"  # max | top2_sum
    masked_score: float = float("-inf")  # what experts of dropped groups score (V3 -inf, V2 0.0)
    weights_from: str = "topk"  # topk: the selected choice values | gather: scores at the chosen ids
    # Capacity (Switch / GShard): each expert takes at most C = round(capacity_factor * T * K / E)
    # (token, k) pairs, in `capacity_order` (token_major: t then k; k_major: every token's first
    # choice before any second choice); the weights of the pairs beyond are zero. 0: no capacity.
    capacity_factor: float = 0.0
    capacity_order: str = "token_major"
    capacity_rounding: str = "floor"  # floor | ceil
    # -- experts --
    activation: str = "silu"
    # clamped_swiglu (GPT-OSS): g = gate.clamp(max=act_limit), u = up.clamp(-act_limit, act_limit),
    # h = (u + 1) * g * sigmoid(act_alpha * g); clamped_silu (DeepSeek-V4, Hunyuan-V4): the same
    # clamps, h = silu(g) * u; relu2 (Nemotron-H): relu(h)^2, not gated; softcap_swiglu (Inkling-2):
    # h = A tanh(g / A) * sigmoid(g) * L tanh(u / L), A = act_alpha, L = act_limit (the two softcaps)
    act_alpha: float = 1.0
    act_limit: float = 0.0
    expert_bias: bool = False  # gate/up and down projections add a per-expert bias (E, out)
    gated: bool = True  # act(gate) * up (SwiGLU / GeGLU) vs act(up)
    layout: str = "concat"  # gate_up as [gate; up] | rows interleaved g0 u0 g1 u1 .. | two tensors
    transposed: bool = False  # weights stored (E, H, 2I) / (E, I, H) instead of (E, 2I, H) / (E, H, I)
    # -- shared expert (Qwen2-MoE style: one dense MLP beside the routed ones) --
    shared_intermediate: int = 0  # 0: no shared expert
    shared_gate: bool = False  # output scaled by sigmoid(x @ w_shared_gate.T) (T, 1)
    dtype: str = "float32"  # dtype of the layer's input and weights

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "hidden", "intermediate"):
            if getattr(self, name) < 1:
                raise ValueError(f"MoESpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.top_k > self.num_experts:
            raise ValueError(f"MoESpec.top_k={self.top_k} exceeds num_experts={self.num_experts}")
        for name, allowed in (("scoring", SCORINGS), ("topk_order", TOPK_ORDERS),
                              ("activation", ACTIVATIONS), ("layout", LAYOUTS), ("dtype", DTYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"MoESpec.{name}={getattr(self, name)!r} not in {allowed}")
        if self.groups < 1 or self.num_experts % self.groups or not 1 <= self.top_groups <= self.groups:
            raise ValueError(f"MoESpec: {self.groups} groups / {self.top_groups} top groups do not "
                             f"divide {self.num_experts} experts")
        if self.group_score not in GROUP_SCORES or self.weights_from not in WEIGHTS_FROM:
            raise ValueError(f"MoESpec.group_score={self.group_score!r} not in {GROUP_SCORES} or "
                             f"weights_from={self.weights_from!r} not in {WEIGHTS_FROM}")
        if self.capacity_factor < 0 or self.capacity_order not in CAPACITY_ORDERS or \
                self.capacity_rounding not in ("floor", "ceil"):
            raise ValueError(f"MoESpec: capacity_factor={self.capacity_factor}, capacity_order="
                             f"{self.capacity_order!r}, capacity_rounding={self.capacity_rounding!r}")
        if (self.groups > 1 or self.correction_bias) and self.topk_order != "score_then_topk":
            raise ValueError("MoESpec: grouped or biased expert choice needs topk_order='score_then_topk'")
        if self.activation in CLAMPED and not (self.gated and self.act_limit > 0):
            raise ValueError(f"MoESpec: {self.activation} needs gated experts and act_limit > 0")
        if self.activation == "softcap_swiglu" and not (self.gated and self.act_limit > 0 and self.act_alpha > 0):
            raise ValueError("MoESpec: softcap_swiglu needs gated experts and softcaps act_alpha, act_limit > 0")
        if self.layout != "concat" and not self.gated:
            raise ValueError(f"MoESpec.layout={self.layout!r} needs gated experts")
        if self.router not in ROUTERS:
            raise ValueError(f"MoESpec.router={self.router!r} not in {ROUTERS}")
        if self.router == "traced":
            said = [f for f in ROUTING_FIELDS if _differs(getattr(self, f), _DEFAULTS[f])]
            if said:
                raise ValueError(f"MoESpec: a traced router leaves the routing fields at their defaults; "
                                 f"{said[0]}={getattr(self, said[0])!r}")

    def capacity(self, tokens: int) -> int:
        """C for `tokens` tokens (capacity_factor > 0)."""
        exact = self.capacity_factor * tokens * self.top_k / self.num_experts
        # NOTE: the factor is read off a traced C as C * E / (T * K); the tolerance keeps the float
        # round trip from moving C by one
        return math.ceil(exact - 1e-9) if self.capacity_rounding == "ceil" else math.floor(exact + 1e-9)

    def weight_names(self) -> tuple[str, ...]:
        """Names of the op's weight list, in order; shapes are in `weight_shapes`. A traced router's
        list starts with its routing inputs instead of router weights: `routing_weights` (T, K) and
        `routing_ids` (T, K) integer, computed per call by the router code left in the graph."""
        if self.router == "traced":
            names = ["routing_weights", "routing_ids"]
        else:
            names = ["router_weight"] + (["router_bias"] if self.router_bias else [])
            names += ["router_correction_bias"] if self.correction_bias else []
        if self.layout == "separate":
            names += ["gate_proj", "up_proj"] + (["gate_proj_bias", "up_proj_bias"] if self.expert_bias else [])
        else:
            first = "gate_up_proj" if self.gated else "up_proj"
            names += [first] + ([first + "_bias"] if self.expert_bias else [])
        names += ["down_proj"] + (["down_proj_bias"] if self.expert_bias else [])
        if self.shared_intermediate:
            names += ["shared_gate_proj", "shared_up_proj", "shared_down_proj"]
            names += ["shared_expert_gate"] if self.shared_gate else []
        return tuple(names)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the weights in `weight_names()` order; a traced router's routing inputs, whose
        first dimension is T, are not weights and are left out."""
        E, H, I, Ish = self.num_experts, self.hidden, self.intermediate, self.shared_intermediate
        up_rows = 2 * I if (self.gated and self.layout != "separate") else I

        def expert(rows: int, cols: int) -> tuple[int, ...]:
            # stored (E, out, in) as nn.Linear does, or (E, in, out) when transposed
            return (E, cols, rows) if self.transposed else (E, rows, cols)

        shapes = {
            "router_weight": (E, H), "router_bias": (E,), "router_correction_bias": (E,),
            "gate_up_proj": expert(up_rows, H), "up_proj": expert(up_rows, H),
            "gate_proj": expert(I, H), "down_proj": expert(H, I),
            "gate_up_proj_bias": (E, up_rows), "up_proj_bias": (E, up_rows), "gate_proj_bias": (E, I),
            "down_proj_bias": (E, H),
            "shared_gate_proj": (Ish, H), "shared_up_proj": (Ish, H), "shared_down_proj": (H, Ish),
            "shared_expert_gate": (1, H),
        }
        return {name: shapes[name] for name in self.weight_names() if name in shapes}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "MoESpec":
        return _spec_from_json(text)

    def summary(self) -> dict[str, Any]:
        """The fields a person wants in a report row."""
        return {
            "router": self.router, "scoring": self.scoring, "topk_order": self.topk_order, "renormalize": self.renormalize,
            "activation": self.activation + (f"(alpha={self.act_alpha:g}, limit={self.act_limit:g})"
                                             if self.activation in ("clamped_swiglu", "softcap_swiglu") else
                                             f"(limit={self.act_limit:g})" if self.activation in CLAMPED else ""),
            "gated": self.gated, "layout": self.layout, "expert_bias": self.expert_bias,
            "transposed": self.transposed, "shared_expert": self.shared_intermediate,
            "shared_gate": self.shared_gate, "dtype": self.dtype,
            "routed_scaling": self.routed_scaling, "correction_bias": self.correction_bias,
            "groups": f"{self.top_groups}/{self.groups} by {self.group_score}" if self.groups > 1 else None,
            "capacity": (f"{self.capacity_factor:g} x T*K/E ({self.capacity_rounding}, {self.capacity_order})"
                         if self.capacity_factor else None),
        }


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(MoESpec)}


def _differs(a, b) -> bool:
    return a != b and not (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


@lru_cache(maxsize=256)
def _spec_from_json(text: str) -> MoESpec:
    return MoESpec(**json.loads(text))


@dataclass(frozen=True)
class MoERegion:
    """One MoE layer found in a captured FX graph; what rewrites consume.

    `nodes` are the graph nodes the layer's output depends on that the rest of the graph does not
    feed in (router, dispatch, experts, combine, shared expert), in graph order. `x` is the layer
    input (..., H); `weights` line up with `spec.weight_names()`; `output` is the node whose value
    the replacement takes over.
    """

    graph_id: int
    name: str
    spec: MoESpec
    x: Any  # torch.fx.Node
    weights: tuple[Any, ...]  # torch.fx.Node per spec.weight_names()
    output: Any  # torch.fx.Node
    nodes: tuple[Any, ...] = ()
    experts_impl: str = ""  # how the traced code ran its experts (grouped_mm, batched_mm, loop, ...)
    program: Any = None  # the layer's MoEProgram once the layer passes ran (lower calls the op with it)
    saved: str = "inputs"  # what the op keeps for the backward (codegen.train.SAVES); lower picks the op by it
    op_input: Any = None  # the (T, H) view of x the op takes, where no router linear in the region reads it


@dataclass
class PassResult:
    """What one pass did: counters are the contract with tests and the report."""

    name: str
    changed: bool = False
    counters: dict[str, int] = field(default_factory=dict)
    ms: float = 0.0
    declined: dict[str, str] = field(default_factory=dict)  # region output node name -> reason


    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def skip(self, reason: str, region: "MoERegion | None" = None) -> None:
        """Count a decline; with a region, the report shows the reason on that region's row."""
        self.count(f"skipped:{reason}")
        if region is not None:
            self.declined[region.output.name] = reason
