"""The MoE program: what one layer's op runs, as a short typed list of stages.

`build(spec)` gives the canonical program, one stage per step of the layer's formula:

    moe E=8 K=2 H=64 I=128 dtype=float32
      logits: (T, E) f32 = RouterGemm(x, router_weight; router_bias=false, router_gemm_fp32=false)
      w: (T, K) f32, ids: (T, K) i32 = TopK(logits; scoring=softmax, topk_order=score_then_topk, ...)
      rows: (P,) i32, tiles: (P/tile_m,) i32, inv: (T*K,) i32 = Align(ids)
      xs: (P, H) f32 = Gather(x, rows; top_k=2)
      h: (P, 2I) f32 = GroupedGemm(xs, rows, tiles, gate_up_proj; proj=gate_up, prologue=none, ...)
      a: (P, I) f32 = Activation(h; activation=silu, gated=true, layout=concat, ...)
      ys: (P, H) f32 = GroupedGemm(a, rows, tiles, down_proj; proj=down, epilogue=none, ...)
      y: (T, H) f32 = Combine(ys, inv, w; weighted=true)

Values are named, each defined once, with a symbolic shape (T tokens, P padded rows, the header's
E K H I) and a dtype; program inputs are `x (T, H)` and the weights of `spec.weight_names()`. Layer
passes (moecompile.passes.layer) rewrite programs into programs; `check()` proves after each that
the values still chain and that the program still says the same layer (its `spec()`).

Stage options reuse MoESpec's field names wherever they mean the same thing, so the layer's spec is
read back off any program (`spec()`), and a stage can stand in for a spec in the torch helpers.

`text()` is the op's string argument and the `.moe` dump; `parse(text)` reads it back exactly
(`parse(p.text()) == p`); `key()` hashes the text: the cache key of generated kernels and configs.

Room to grow: a new stage is a frozen dataclass subclass of `Stage` with a `signature`, listed in
STAGES (token rounding, slot remapping after placement and dispatch across ranks come this way).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

from .spec import MoESpec


class ProgramError(ValueError):
    """A program that does not chain, or text that is not a program."""


# -- value types --------------------------------------------------------------------------------

_SHORT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "float64": "f64", "int32": "i32"}
_LONG = {v: k for k, v in _SHORT.items()}


@dataclass(frozen=True)
class ValueType:
    """A value's symbolic shape and dtype: ("T", "K"), "int32"; `any` dtype for weights whose
    dtype the program does not pin (router weights may stay fp32 in a bf16 model)."""

    shape: tuple[str, ...]
    dtype: str

    def __str__(self) -> str:
        dims = ", ".join(self.shape) + ("," if len(self.shape) == 1 else "")
        return f"({dims}) {_SHORT.get(self.dtype, self.dtype)}"

    def accepts(self, given: "ValueType") -> bool:
        return self.shape == given.shape and "any" in (self.dtype, given.dtype) or self == given


def _t(*shape, dtype: str) -> ValueType:
    return ValueType(tuple(str(d) for d in shape), dtype)


@dataclass(frozen=True)
class Dims:
    """What stage signatures may refer to: the program header."""

    E: int
    K: int
    H: int
    I: int  # noqa: E741  (the vocabulary's name)
    dtype: str


# -- stages -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One step of a program: `outs = Op(ins; options)`. Subclasses add their options as fields
    and say what types they take and give (`signature`)."""

    outs: tuple[str, ...]
    ins: tuple[str, ...]

    op: ClassVar[str] = ""
    exact: ClassVar[bool] = True  # False: the stage changes what the layer computes (token rounding)

    def options(self) -> dict:
        """The option fields shown in text, in declaration order; float fields as floats (a spec's
        routed_scaling=2 prints and hashes as 2.0, as it parses back)."""
        shown = self.shown()
        return {f.name: float(getattr(self, f.name)) if isinstance(f.default, float) else getattr(self, f.name)
                for f in dataclasses.fields(self) if f.name in shown}

    def _at_default(self, name: str) -> bool:
        return getattr(self, name) == next(f.default for f in dataclasses.fields(self) if f.name == name)

    def shown(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self) if f.name not in ("outs", "ins"))

    def signature(self, d: Dims) -> tuple[tuple[ValueType, ...], tuple[ValueType, ...]]:
        raise NotImplementedError

    def replace(self, **changes) -> "Stage":
        return dataclasses.replace(self, **changes)


def _router_weights(d: Dims, router_bias: bool, correction_bias: bool = False) -> tuple[ValueType, ...]:
    return ((_t("E", "H", dtype="any"),) + ((_t("E", dtype="any"),) if router_bias else ())
            + ((_t("E", dtype="any"),) if correction_bias else ()))


def _logits_dtype(d: Dims, router_gemm_fp32: bool) -> str:
    return "float32" if router_gemm_fp32 else d.dtype


def _weights_dtype(d: Dims, router_gemm_fp32: bool, weights_in_input_dtype: bool, router_fp32: bool) -> str:
    """Top-k weights are fp32 when scores are (router_fp32), else in the logits' dtype."""
    return _logits_dtype(d, router_gemm_fp32) if weights_in_input_dtype or not router_fp32 else "float32"


@dataclass(frozen=True)
class RouterGemm(Stage):
    """logits (T, E) = x (T, H) @ router_weight.T (+ router_bias), in fp32 if router_gemm_fp32."""

    router_bias: bool = False
    router_gemm_fp32: bool = False
    op: ClassVar[str] = "RouterGemm"

    def signature(self, d):
        ins = (_t("T", "H", dtype=d.dtype),) + _router_weights(d, self.router_bias)
        return ins, (_t("T", "E", dtype=_logits_dtype(d, self.router_gemm_fp32)),)


# The routing fields of MoESpec, as TopK and Gate carry them.
_ROUTING = ("scoring", "topk_order", "renormalize", "renorm_eps", "routed_scaling", "router_fp32",
            "correction_bias", "groups", "top_groups", "group_score", "masked_score", "weights_from",
            "weights_in_input_dtype", "capacity_factor", "capacity_order", "capacity_rounding")


@dataclass(frozen=True)
class _Routing(Stage):
    scoring: str = "softmax"
    topk_order: str = "score_then_topk"
    renormalize: bool = False
    renorm_eps: float = 0.0
    routed_scaling: float = 1.0
    router_fp32: bool = True
    correction_bias: bool = False
    groups: int = 1
    top_groups: int = 1
    group_score: str = "max"
    masked_score: float = float("-inf")
    weights_from: str = "topk"
    weights_in_input_dtype: bool = False
    capacity_factor: float = 0.0
    capacity_order: str = "token_major"
    capacity_rounding: str = "floor"

    def shown(self):
        hidden = set()
        if self.groups == 1:
            hidden |= {"top_groups", "group_score", "masked_score"}
        if not self.capacity_factor:
            hidden |= {"capacity_order", "capacity_rounding"}
        if not self.renormalize:
            hidden.add("renorm_eps")
        # a field that does not matter here is hidden only at its default: the text says the spec whole
        return tuple(n for n in super().shown() if n not in hidden or not self._at_default(n))


@dataclass(frozen=True)
class TopK(_Routing):
    """Scores and top-k of the logits: w (T, K) (fp32 unless weights_in_input_dtype), ids (T, K)
    int32; DeepSeek's choice by scores + correction bias among the best groups, renormalize,
    routed scaling, capacity."""

    router_gemm_fp32: bool = False  # the logits' dtype; shown only when true (RouterGemm says it)
    op: ClassVar[str] = "TopK"

    def shown(self):
        return tuple(n for n in super().shown() if n != "router_gemm_fp32" or self.router_gemm_fp32)

    def signature(self, d):
        ins = (_t("T", "E", dtype=_logits_dtype(d, self.router_gemm_fp32)),)
        ins += (_t("E", dtype="any"),) if self.correction_bias else ()
        wd = _weights_dtype(d, self.router_gemm_fp32, self.weights_in_input_dtype, self.router_fp32)
        return ins, (_t("T", "K", dtype=wd), _t("T", "K", dtype="int32"))


@dataclass(frozen=True)
class Gate(_Routing):
    """RouterGemm + TopK + the per-expert histogram in one stage (fuse_gate):
    x (T, H) -> w (T, K), ids (T, K) int32 [, counts (E,) int32]."""

    router_bias: bool = False
    router_gemm_fp32: bool = False
    op: ClassVar[str] = "Gate"

    def signature(self, d):
        ins = (_t("T", "H", dtype=d.dtype),) + _router_weights(d, self.router_bias, self.correction_bias)
        wd = _weights_dtype(d, self.router_gemm_fp32, self.weights_in_input_dtype, self.router_fp32)
        outs = (_t("T", "K", dtype=wd), _t("T", "K", dtype="int32"))
        return ins, outs + ((_t("E", dtype="int32"),) if len(self.outs) > 2 else ())  # counts: optional


@dataclass(frozen=True)
class Route(Stage):
    """The routing a traced router computed, as the op's inputs: routing_weights (T, K) and
    routing_ids (T, K) integer -> w (T, K) as given, ids (T, K) int32. The router's code runs
    outside the op, as the model wrote it, compiled with the rest of the graph; this stage only
    says where w and ids come from (router=traced, the spec's field)."""

    router: str = "traced"
    op: ClassVar[str] = "Route"

    def signature(self, d):
        ins = (_t("T", "K", dtype="any"), _t("T", "K", dtype="any"))
        return ins, (_t("T", "K", dtype="any"), _t("T", "K", dtype="int32"))


@dataclass(frozen=True)
class Align(Stage):
    """Pairs sorted by expert, each expert padded to whole tiles of tile_m rows:
    ids (T, K) [, counts (E,)] -> rows (P,) int32 (pair t*K+k per row, -1 padding),
    tiles (P/tile_m,) int32 (expert per tile, -1 past the end), inv (T*K,) int32 (row of each pair).
    Without counts, Align takes the histogram itself. tile_m is codegen's choice (per kernel
    config), not the program's: it changes no value the layer computes."""

    op: ClassVar[str] = "Align"

    def signature(self, d):
        ins = (_t("T", "K", dtype="int32"),) + ((_t("E", dtype="int32"),) if len(self.ins) > 1 else ())
        return ins, (_t("P", dtype="int32"), _t("P/tile_m", dtype="int32"), _t("T*K", dtype="int32"))


@dataclass(frozen=True)
class Gather(Stage):
    """xs (P, H) = x[rows // K] (zeros on padding rows): the permuted copy fuse_epilogues removes."""

    top_k: int = 1
    op: ClassVar[str] = "Gather"

    def signature(self, d):
        return (_t("T", "H", dtype=d.dtype), _t("P", dtype="int32")), (_t("P", "H", dtype=d.dtype),)


def _act_shown(names, activation: str) -> tuple[str, ...]:
    """`names` without act_alpha / act_limit unless the activation reads them (clamped SwiGLU)."""
    keep = {"clamped_swiglu": ("act_alpha", "act_limit"), "clamped_silu": ("act_limit",),
            "softcap_swiglu": ("act_alpha", "act_limit")}.get(activation, ())
    return tuple(n for n in names if n in keep or n not in ("act_alpha", "act_limit"))


@dataclass(frozen=True)
class Activation(Stage):
    """a (P, I) = act(gate) * up of h (P, 2I) (split by layout), or act(h) (P, I) if not gated."""

    activation: str = "silu"
    gated: bool = True
    layout: str = "concat"
    act_alpha: float = 1.0
    act_limit: float = 0.0
    op: ClassVar[str] = "Activation"

    def shown(self):
        return _act_shown(super().shown(), self.activation)

    def signature(self, d):
        width = "2I" if self.gated else "I"
        return (_t("P", width, dtype=d.dtype),), (_t("P", "I", dtype=d.dtype),)


PROJECTIONS = ("gate_up", "down")
PROLOGUES = ("none", "gather")
EPILOGUES = ("none", "activation", "topk_weight")


@dataclass(frozen=True)
class GroupedGemm(Stage):
    """One GEMM per expert over the aligned rows: out[r] = in[r] @ W[tiles[r // tile_m]].T (+ bias).

    proj gate_up: in is xs (P, H), or x (T, H) with prologue=gather (rows gathered as they load);
    out (P, 2I), or (P, I) with epilogue=activation. proj down: in is a (P, I), out (P, H); with
    epilogue=topk_weight each row is scaled by its pair's weight w (T, K) and kept in fp32.
    Weights in `ins` follow spec.weight_names() (gate_up_proj | up_proj | gate_proj, up_proj; biases).
    """

    proj: str = "gate_up"
    prologue: str = "none"
    epilogue: str = "none"
    expert_bias: bool = False
    transposed: bool = False
    gated: bool = True
    layout: str = "concat"
    activation: str = "silu"
    act_alpha: float = 1.0
    act_limit: float = 0.0
    op: ClassVar[str] = "GroupedGemm"

    def shown(self):
        keep = ["proj", "prologue", "epilogue", "expert_bias", "transposed"]
        if self.proj == "gate_up":
            keep += ["gated", "layout"]
        if self.epilogue == "activation":
            keep += ["activation", "act_alpha", "act_limit"]
        return _act_shown(keep, self.activation)

    def _weights(self, d: Dims) -> tuple[ValueType, ...]:
        def expert(rows, cols):
            return _t("E", cols, rows, dtype=d.dtype) if self.transposed else _t("E", rows, cols, dtype=d.dtype)

        if self.proj == "down":
            return (expert("H", "I"),) + ((_t("E", "H", dtype=d.dtype),) if self.expert_bias else ())
        if self.layout == "separate":
            ws = (expert("I", "H"), expert("I", "H"))
            return ws + ((_t("E", "I", dtype=d.dtype),) * 2 if self.expert_bias else ())
        rows = "2I" if self.gated else "I"
        return (expert(rows, "H"),) + ((_t("E", rows, dtype=d.dtype),) if self.expert_bias else ())

    def signature(self, d):
        routing = (_t("P", dtype="int32"), _t("P/tile_m", dtype="int32"))
        if self.proj == "gate_up":
            first = _t("T", "H", dtype=d.dtype) if self.prologue == "gather" else _t("P", "H", dtype=d.dtype)
            width = "I" if self.epilogue == "activation" or not self.gated else "2I"
            return (first,) + routing + self._weights(d), (_t("P", width, dtype=d.dtype),)
        ins = (_t("P", "I", dtype=d.dtype),) + routing + self._weights(d)
        if self.epilogue == "topk_weight":
            return ins + (_t("T", "K", dtype="any"),), (_t("P", "H", dtype="float32"),)
        return ins, (_t("P", "H", dtype=d.dtype),)


@dataclass(frozen=True)
class SharedMLP(Stage):
    """s (T, H) = down(act(gate(x)) * up(x)) [* sigmoid(x @ shared_expert_gate.T)]: the dense
    shared expert, scheduled beside the routed ones and added by the Combine."""

    shared_intermediate: int = 0
    shared_gate: bool = False
    activation: str = "silu"
    act_alpha: float = 1.0
    act_limit: float = 0.0
    op: ClassVar[str] = "SharedMLP"

    def shown(self):
        return _act_shown(super().shown(), self.activation)

    def signature(self, d):
        Ish = str(self.shared_intermediate)
        ins = (_t("T", "H", dtype=d.dtype), _t(Ish, "H", dtype=d.dtype), _t(Ish, "H", dtype=d.dtype),
               _t("H", Ish, dtype=d.dtype)) + ((_t(1, "H", dtype=d.dtype),) if self.shared_gate else ())
        return ins, (_t("T", "H", dtype=d.dtype),)


@dataclass(frozen=True)
class Combine(Stage):
    """y (T, H) = sum over k in order of [w[t, k] *] ys[inv[t*K + k]] (+ s): fp32 sums, no atomics.
    ins: ys, inv [, w if weighted] [, s]."""

    weighted: bool = True
    op: ClassVar[str] = "Combine"

    def signature(self, d):
        ys_dtype = d.dtype if self.weighted else "float32"
        ins = (_t("P", "H", dtype=ys_dtype), _t("T*K", dtype="int32"))
        ins += (_t("T", "K", dtype="any"),) if self.weighted else ()
        ins += (_t("T", "H", dtype=d.dtype),) if len(self.ins) > len(ins) else ()
        return ins, (_t("T", "H", dtype=d.dtype),)


STAGES: dict[str, type[Stage]] = {cls.op: cls for cls in (
    RouterGemm, TopK, Gate, Route, Align, Gather, Activation, GroupedGemm, SharedMLP, Combine)}

_SPEC_FIELDS = {f.name for f in dataclasses.fields(MoESpec)}


# -- the program --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoEProgram:
    """A layer's stages over a header (E, K, H, I, dtype). Frozen: passes return new programs."""

    dims: Dims
    stages: tuple[Stage, ...]

    # -- reading --

    def stage(self, op: str) -> Stage | None:
        """The first stage of kind `op`, or None."""
        return next((s for s in self.stages if s.op == op), None)

    def find(self, op: str, **options) -> list[int]:
        """Indices of the stages of kind `op` whose options equal `options`."""
        return [i for i, s in enumerate(self.stages)
                if s.op == op and all(getattr(s, k) == v for k, v in options.items())]

    def producer(self, value: str) -> int | None:
        return next((i for i, s in enumerate(self.stages) if value in s.outs), None)

    def users(self, value: str) -> list[int]:
        return [i for i, s in enumerate(self.stages) if value in s.ins]

    def inputs(self) -> dict[str, ValueType]:
        """x and the weights, with their types."""
        spec, d = self.spec(), self.dims
        return {"x": _t("T", "H", dtype=d.dtype), **_weight_types(spec, d.dtype)}

    @property
    def exact(self) -> bool:
        """False once a stage changes what the layer computes (token rounding): passes that
        compare interpreter outputs before and after only apply to exact programs."""
        return all(s.exact for s in self.stages)

    def spec(self) -> MoESpec:
        """The layer this program computes, read off its stages' options."""
        return _spec_of(self)

    # -- text --

    def text(self) -> str:
        d = self.dims
        lines = [f"moe E={d.E} K={d.K} H={d.H} I={d.I} dtype={d.dtype}"]
        for s in self.stages:
            _, out_types = s.signature(d)
            outs = ", ".join(f"{n}: {t}" for n, t in zip(s.outs, out_types))
            opts = ", ".join(f"{k}={_fmt(v)}" for k, v in s.options().items())
            lines.append(f"  {outs} = {s.op}({', '.join(s.ins)}{'; ' + opts if opts else ''})")
        return "\n".join(lines) + "\n"

    def key(self) -> str:
        """A stable hash of the text (16 hex digits)."""
        return hashlib.sha256(self.text().encode()).hexdigest()[:16]

    @staticmethod
    def parse(text: str) -> "MoEProgram":
        return _parse(text)

    def __str__(self) -> str:
        return self.text()

    # -- checking --

    def check(self) -> "MoEProgram":
        """Raise ProgramError unless every value is defined once before use with the type its user
        expects, the last stage gives y (T, H), and the stages agree on one spec. Returns self."""
        d = self.dims
        self.spec()  # raises on disagreeing options
        known = self.inputs()
        for i, s in enumerate(self.stages):
            in_types, out_types = s.signature(d)
            if len(s.ins) != len(in_types) or len(s.outs) != len(out_types):
                raise ProgramError(f"stage {i} {s.op}: takes {len(in_types)} inputs and gives {len(out_types)} "
                                   f"outputs, has {len(s.ins)} and {len(s.outs)}")
            for name, want in zip(s.ins, in_types):
                if name not in known:
                    raise ProgramError(f"stage {i} {s.op}: input {name!r} is not defined before it")
                if not want.accepts(known[name]):
                    raise ProgramError(f"stage {i} {s.op}: input {name!r} is {known[name]}, expected {want}")
            for name, t in zip(s.outs, out_types):
                if name in known:
                    raise ProgramError(f"stage {i} {s.op}: output {name!r} is defined twice")
                known[name] = t
        if not self.stages or self.stages[-1].outs != ("y",) or known["y"] != _t("T", "H", dtype=d.dtype):
            raise ProgramError(f"the last stage must give y: (T, H) {_SHORT[d.dtype]}")
        read = {n for s in self.stages for n in s.ins}
        unread = [n for s in self.stages for n in s.outs if n not in read and n != "y"]
        if unread:  # a dropped shared expert, a weight nobody applies: the program says another layer
            raise ProgramError(f"value {unread[0]!r} is computed but never read")
        weights = next((s.outs[0] for s in self.stages if s.op in ("TopK", "Gate", "Route")), None)
        applied = sum(1 for s in self.stages if weights in s.ins and (
            (s.op == "GroupedGemm" and s.epilogue == "topk_weight") or (s.op == "Combine" and s.weighted)))
        if applied != 1:
            raise ProgramError(f"the top-k weights {weights!r} are applied {applied} times; exactly once expected")
        return self


def _weight_types(spec: MoESpec, dtype: str) -> dict[str, ValueType]:
    """spec.weight_shapes() in symbols (E, H, I, 2I), router weights of any dtype."""
    up_rows = "2I" if spec.gated and spec.layout != "separate" else "I"
    Ish = str(spec.shared_intermediate)

    def expert(rows, cols):  # stored (E, out, in), or (E, in, out) when transposed
        return ("E", cols, rows) if spec.transposed else ("E", rows, cols)

    shapes = {
        "router_weight": ("E", "H"), "router_bias": ("E",), "router_correction_bias": ("E",),
        "gate_up_proj": expert(up_rows, "H"), "up_proj": expert(up_rows, "H"), "gate_proj": expert("I", "H"),
        "down_proj": expert("H", "I"), "gate_up_proj_bias": ("E", up_rows), "up_proj_bias": ("E", up_rows),
        "gate_proj_bias": ("E", "I"), "down_proj_bias": ("E", "H"),
        "shared_gate_proj": (Ish, "H"), "shared_up_proj": (Ish, "H"), "shared_down_proj": ("H", Ish),
        "shared_expert_gate": ("1", "H"), "routing_weights": ("T", "K"), "routing_ids": ("T", "K"),
    }
    return {n: ValueType(shapes[n], "any" if n.startswith("rout") else dtype) for n in spec.weight_names()}


@lru_cache(maxsize=512)
def _spec_of(program: MoEProgram) -> MoESpec:
    d = program.dims
    fields: dict = {"num_experts": d.E, "top_k": d.K, "hidden": d.H, "intermediate": d.I, "dtype": d.dtype}
    said: dict = dict.fromkeys(fields, "the header")
    for i, s in enumerate(program.stages):
        for name, value in s.options().items():
            if name not in _SPEC_FIELDS:
                continue
            if name in said and fields[name] != value and not _same_float(fields[name], value):
                raise ProgramError(f"stage {i} {s.op}: {name}={value!r} but {said[name]} says {fields[name]!r}")
            fields[name], said[name] = value, f"stage {i}"
    if program.stage("SharedMLP") is None:
        fields["shared_intermediate"] = 0
    # a router bias is said by the router stage; expert bias / layout / gated only by the GEMMs
    try:
        return MoESpec(**fields)
    except ValueError as e:
        raise ProgramError(f"the program's stages say no valid layer: {e}") from None


def _same_float(a, b) -> bool:
    return isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return str(v)


_LINE = re.compile(r"^\s*(?P<outs>.+?) = (?P<op>\w+)\((?P<ins>[^;)]*)(?:; (?P<opts>.*))?\)\s*$")
_OUT = re.compile(r"(\w+): \([^)]*\) \w+")
_HEADER = re.compile(r"^moe E=(\d+) K=(\d+) H=(\d+) I=(\d+) dtype=(\w+)\s*$")


@lru_cache(maxsize=256)
def _parse(text: str) -> MoEProgram:
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    head = _HEADER.match(lines[0]) if lines else None
    if head is None:
        raise ProgramError(f"not an MoE program: the first line must be 'moe E=.. K=.. H=.. I=.. dtype=..', "
                           f"got {lines[0] if lines else ''!r}")
    E, K, H, I = (int(g) for g in head.groups()[:4])
    dims = Dims(E, K, H, I, head.group(5))
    stages = []
    for n, line in enumerate(lines[1:], start=2):
        m = _LINE.match(line)
        if m is None or m.group("op") not in STAGES:
            raise ProgramError(f"program line {n}: cannot read {line.strip()!r}")
        cls = STAGES[m.group("op")]
        types = {f.name: type(f.default) for f in dataclasses.fields(cls) if f.name not in ("outs", "ins")}
        options = {}
        for item in filter(None, (m.group("opts") or "").split(", ")):
            name, _, raw = item.partition("=")
            if name not in types:
                raise ProgramError(f"program line {n}: {cls.op} has no option {name!r}")
            options[name] = _value(raw, types[name], n)
        outs = tuple(_OUT.findall(m.group("outs")))
        ins = tuple(v.strip() for v in m.group("ins").split(",") if v.strip())
        stages.append(cls(outs=outs, ins=ins, **options))
    return MoEProgram(dims, tuple(stages))


def _value(raw: str, kind: type, line: int):
    try:
        if kind is bool:
            if raw not in ("true", "false"):
                raise ValueError(raw)
            return raw == "true"
        return kind(raw)
    except ValueError:
        raise ProgramError(f"program line {line}: {raw!r} is not a {kind.__name__}") from None


# -- the canonical program ----------------------------------------------------------------------


def build(spec: MoESpec) -> MoEProgram:
    """The canonical program of `spec`: one stage per step, nothing fused yet."""
    dims = Dims(spec.num_experts, spec.top_k, spec.hidden, spec.intermediate, spec.dtype)
    names = spec.weight_names()
    router = ("router_weight",) + (("router_bias",) if spec.router_bias else ())
    routing = {f: getattr(spec, f) for f in _ROUTING}
    if spec.router == "traced":
        stages: list[Stage] = [Route(("w", "ids"), ("routing_weights", "routing_ids"))]
    else:
        stages = [
            RouterGemm(("logits",), ("x",) + router, spec.router_bias, spec.router_gemm_fp32),
            TopK(("w", "ids"), ("logits",) + (("router_correction_bias",) if spec.correction_bias else ()),
                 router_gemm_fp32=spec.router_gemm_fp32, **routing),
        ]
    shared = ()
    if spec.shared_intermediate:
        stages.append(SharedMLP(("s",), ("x",) + tuple(n for n in names if n.startswith("shared_")),
                                spec.shared_intermediate, spec.shared_gate, spec.activation, spec.act_alpha,
                                spec.act_limit))
        shared = ("s",)
    expert = dict(expert_bias=spec.expert_bias, transposed=spec.transposed)
    up_weights = tuple(n for n in names if n.startswith(("gate_", "up_")))
    down_weights = tuple(n for n in names if n.startswith("down_"))
    stages += [
        Align(("rows", "tiles", "inv"), ("ids",)),
        Gather(("xs",), ("x", "rows"), spec.top_k),
        GroupedGemm(("h",), ("xs", "rows", "tiles") + up_weights, "gate_up", gated=spec.gated,
                    layout=spec.layout, **expert),
    ]
    stages += [
        Activation(("a",), ("h",), spec.activation, spec.gated, spec.layout, spec.act_alpha, spec.act_limit),
        GroupedGemm(("ys",), ("a", "rows", "tiles") + down_weights, "down", **expert),
        Combine(("y",), ("ys", "inv", "w") + shared, weighted=True),
    ]
    return MoEProgram(dims, tuple(stages)).check()
