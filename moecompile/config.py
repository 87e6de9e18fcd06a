"""Options of the moe backend: typed, documented, validated on creation.

Set them with `torch.compile(model, backend="moe", options={...})`, or the environment variables
below, read in exactly one place (`from_env`); explicit options win over the environment.

    MOECOMPILE_DUMP_DIR=<dir>      dump_dir
    MOECOMPILE_KERNELS=<name>      kernels
    MOECOMPILE_VERIFY=0|1          verify
    MOECOMPILE_INNER=<name>        inner
    MOECOMPILE_ROUTING_TRACE=<path> routing_trace
    MOECOMPILE_SAVE_FOR_BACKWARD=<mode> save_for_backward
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import UserInputError

# codegen.plan.KERNELS (a test keeps them equal; config does not import codegen)
KERNEL_CHOICES = ("auto", "triton", "torch", "reference", "interpreter")

VERIFY_RTOL = {
    # dtype -> {"out": (max, mean), "grad": (max, mean)} of err = |a - b| / (|b| + mean|b|).
    # fp32: sorted grouped GEMMs sum in another order than the traced code -> ~1e-6 relative;
    # gradients go through as many roundings again.
    "float32": {"out": (1e-4, 1e-5), "grad": (2.5e-4, 2.5e-5)},
    # bf16: one rounding is 2^-8 = 0.4%; a layer rounds its intermediates (gate/up, activation,
    # expert outputs, weighted sum) to bf16 in another order than the traced code. Measured on the
    # demo models at 256 tokens, right specs: max 2.2e-2, mean 1.6e-3; wrong ones: mean > 0.3. The
    # max bound allows a longer tail at more tokens; the mean bound catches a small change to every
    # element that the max bound would let through. Gradients of bf16 layers are compared in fp32
    # (verify._grads_close), where only the casts the traced code spells out round to bf16.
    "bfloat16": {"out": (6e-2, 6e-3), "grad": (6e-2, 6e-3)},
    "float16": {"out": (1e-2, 1e-3), "grad": (1e-2, 1e-3)},  # 3 more mantissa bits than bf16
    "float64": {"out": (1e-8, 1e-9), "grad": (2.5e-8, 2.5e-9)},
}
INNER_CHOICES = ("inductor", "aot_eager", "eager")
# codegen.train.SAVES (a test keeps them equal)
SAVE_CHOICES = ("inputs", "routing", "activations")
# Passes a user can switch off (option disable_passes); the pipeline runs them in this order.
# "verify" off rewrites without probing (the structural cover still applies); "lower" off leaves
# every layer as traced, reported.
# "fuse_gate" / "fuse_epilogues" off leave the layer's program unfused (it still runs, slower).
PASS_NAMES = ("verify", "fuse_gate", "fuse_epilogues", "lower")


@dataclass(frozen=True)
class Config:
    kernels: str = "auto"
    """Implementation of each MoE op: auto (Triton on CUDA, the torch path elsewhere), triton (also
    on CPU under TRITON_INTERPRET=1), torch (sorted grouped GEMMs), reference (the eager per-expert
    loop, for debugging), interpreter (the layer's program stage by stage in torch)."""

    dump_dir: str | None = None
    """If set, write report.json, per-pass before/after graph code and kernel sources there."""

    verify: bool = True
    """Check every rewrite against the original subgraph on random inputs before applying it."""

    inner: str = "inductor"
    """Compiler for the rewritten graph: inductor (default), aot_eager or eager (debugging, tests)."""

    fallback_on_error: bool = True
    """An internal error in our passes falls back to plain `inner` on that graph, with a warning."""

    routing_trace: str | None = None
    """If set, record every MoE layer's routing (expert load, inter-layer flow) and write it to this
    .npz / .json path at exit or on `moecompile.routing.flush()`, for `moecompile place`."""

    skip_layers: tuple = ()
    """Layers to leave as traced, by module name ("model.layers.3.mlp") or fnmatch pattern
    ("model.layers.1*.mlp"); each is reported as a fallback with reason "skipped by option"."""

    disable_passes: tuple = ()
    """Passes to switch off, by name (PASS_NAMES); a layer a required pass is switched off
    for ("lower") stays as traced. A dict {layer pattern: [pass names]} switches passes off per layer."""

    pass_options: dict = field(default_factory=dict)
    """Options of the layer passes, {pass name: {option: value}}: e.g. {"fuse_epilogues":
    {"topk_weight": "combine"}} applies the top-k weights in the combine instead of GEMM 2."""

    save_for_backward: str = "routing"
    """What a layer whose backward runs on Triton keeps from forward to backward (codegen/train.py):
    inputs (nothing more: the backward recomputes the routing and GEMM 1), routing (the expert ids,
    4*T*K bytes) or activations (also GEMM 1's pre-activations, about T*K*2I values: the least
    recompute, the most memory). Layers whose backward recomputes on the torch path keep inputs."""

    overlap_chunks: Any = None
    """Layers sharded by moecompile.distributed: how many chunks their exchange is cut into to
    overlap it with the experts, "auto" (a cost model calibrated on the layer's calls) or a count
    1..64 (1: no overlap), given to each layer before its first call; None keeps what shard_experts
    was given. Output bits do not depend on it."""

    verify_rtol: dict = field(default_factory=dict)
    """Tolerance of the verification: {dtype: {"out" | "grad": (max, mean)}} of |a - b| / (|b| +
    mean|b|); what is not given keeps its default (VERIFY_RTOL)."""

    def __post_init__(self) -> None:
        if self.kernels not in KERNEL_CHOICES:
            raise UserInputError(f"option kernels={self.kernels!r} is not one of {KERNEL_CHOICES}")
        if self.inner not in INNER_CHOICES:
            raise UserInputError(f"option inner={self.inner!r} is not one of {INNER_CHOICES}")
        if self.save_for_backward not in SAVE_CHOICES:
            raise UserInputError(f"option save_for_backward={self.save_for_backward!r} is not one of {SAVE_CHOICES}")

        chunks = self.overlap_chunks
        if chunks not in (None, "auto") and (isinstance(chunks, bool) or not isinstance(chunks, int) or not 1 <= chunks <= 64):
            raise UserInputError(f"option overlap_chunks={chunks!r} must be \"auto\" or a whole number in 1..64")
        object.__setattr__(self, "verify_rtol", _rtol_table(self.verify_rtol))
        object.__setattr__(self, "skip_layers", _names("skip_layers", self.skip_layers))
        object.__setattr__(self, "disable_passes", _disabled(self.disable_passes))
        _check_pass_options(self.pass_options)
        if self.routing_trace is not None and not str(self.routing_trace).endswith((".npz", ".json")):
            raise UserInputError(f"option routing_trace={self.routing_trace!r} must end in .npz or .json")

    def skips(self, layer: str) -> bool:
        return any(fnmatch.fnmatchcase(layer, pattern) for pattern in self.skip_layers)

    def pass_enabled(self, name: str, layer: str | None = None) -> bool:
        """False if pass `name` is switched off everywhere, or for `layer`."""
        for pattern, names in self.disable_passes:
            if name in names and (pattern == "*" or (layer is not None and fnmatch.fnmatchcase(layer, pattern))):
                return False
        return True

    def op_kernels(self) -> str:
        """The `kernels` argument the moe op is called with ("auto" is decided per device)."""
        return self.kernels

    def verify_kernels(self) -> str:
        """What verification runs the spec with: it asks whether the spec is the traced layer's
        (kernels answer to their own tests against the same reference)."""
        return "reference" if self.kernels == "reference" else "torch"


def _names(option: str, given) -> tuple[str, ...]:
    if isinstance(given, str):
        given = (given,)
    if not isinstance(given, (tuple, list)) or not all(isinstance(g, str) and g for g in given):
        raise UserInputError(f"option {option} must be a list of names, got {given!r}")
    return tuple(given)


def _disabled(given) -> tuple:
    """disable_passes as ((layer pattern | "*", (pass names)), ...), names checked."""
    pairs = given.items() if isinstance(given, dict) else [("*", given)]
    out = []
    for pattern, names in pairs:
        names = _names("disable_passes", names)
        unknown = sorted(set(names) - set(PASS_NAMES))
        if unknown or not isinstance(pattern, str):
            raise UserInputError(f"option disable_passes: unknown pass(es) {unknown}; known: {list(PASS_NAMES)}")
        out.append((pattern, names))
    return tuple(out)


def _check_pass_options(given) -> None:
    from .passes.layer import REGISTRY  # passes import config: not at module level

    if not isinstance(given, dict):
        raise UserInputError(f"option pass_options must be a dict {{pass name: {{option: value}}}}, got {given!r}")
    for name, opts in given.items():
        if name not in REGISTRY or not isinstance(opts, dict):
            raise UserInputError(f"option pass_options: {name!r} is not a layer pass with options; "
                                 f"known: {sorted(REGISTRY)}")
        fields = {f.name: type(f.default) for f in dataclasses.fields(REGISTRY[name]) if f.name != "name"}
        unknown = sorted(set(opts) - set(fields))
        if unknown:
            raise UserInputError(f"option pass_options[{name!r}]: unknown option(s) {unknown}; known: {sorted(fields)}")
        for opt, value in opts.items():
            if type(value) is not fields[opt]:
                raise UserInputError(f"option pass_options[{name!r}][{opt!r}]={value!r}: expected a {fields[opt].__name__}")
        REGISTRY[name](**opts)  # validates values (UserInputError)


def _rtol_table(given) -> dict:
    """VERIFY_RTOL with the entries of `given` in place of the defaults, checked."""
    if not isinstance(given, dict):
        raise UserInputError(f"option verify_rtol must be a dict, got {given!r}")
    table = {dtype: dict(kinds) for dtype, kinds in VERIFY_RTOL.items()}
    for dtype, kinds in given.items():
        if dtype not in table or not isinstance(kinds, dict):
            raise UserInputError(f"option verify_rtol[{dtype!r}]: expected a dtype of {tuple(VERIFY_RTOL)} "
                                 'mapped to {"out": (max, mean), "grad": (max, mean)}')
        for kind, bounds in kinds.items():
            if kind not in ("out", "grad") or not (isinstance(bounds, (tuple, list)) and len(bounds) == 2 and all(
                    isinstance(b, (int, float)) and not isinstance(b, bool) and b > 0 for b in bounds)):
                raise UserInputError(f"option verify_rtol[{dtype!r}][{kind!r}]={bounds!r}: expected "
                                     '"out" or "grad" -> (max, mean), both > 0')
            table[dtype][kind] = (float(bounds[0]), float(bounds[1]))
    return table


def from_env(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The options set through MOECOMPILE_* environment variables."""
    env = os.environ if environ is None else environ
    options: dict[str, Any] = {}
    if env.get("MOECOMPILE_DUMP_DIR"):
        options["dump_dir"] = env["MOECOMPILE_DUMP_DIR"]
    if env.get("MOECOMPILE_KERNELS"):
        options["kernels"] = env["MOECOMPILE_KERNELS"]
    if env.get("MOECOMPILE_VERIFY"):
        options["verify"] = env["MOECOMPILE_VERIFY"] not in ("0", "false", "False")
    if env.get("MOECOMPILE_ROUTING_TRACE"):
        options["routing_trace"] = env["MOECOMPILE_ROUTING_TRACE"]
    if env.get("MOECOMPILE_INNER"):
        options["inner"] = env["MOECOMPILE_INNER"]
    if env.get("MOECOMPILE_SAVE_FOR_BACKWARD"):
        options["save_for_backward"] = env["MOECOMPILE_SAVE_FOR_BACKWARD"]
    return options


def interpret_triton_if_forced(environ=None) -> bool:
    """MOECOMPILE_KERNELS=triton without CUDA means Triton's CPU interpreter: set TRITON_INTERPRET=1
    while triton is not loaded yet (triton reads it once, when it loads). True if it is set now."""
    import sys

    import torch

    env = os.environ if environ is None else environ
    if from_env(env).get("kernels") != "triton" or "triton" in sys.modules or torch.cuda.is_available():
        return False
    env.setdefault("TRITON_INTERPRET", "1")
    return env["TRITON_INTERPRET"] == "1"


_overrides: dict[str, Any] = {}


def make(options: dict[str, Any] | None = None) -> Config:
    """Config from (in rising priority) defaults, environment, `patch()` and explicit options."""
    merged = {**from_env(), **_overrides, **(options or {})}
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(merged) - known)
    if unknown:
        raise UserInputError(f"unknown moecompile option(s) {unknown}; known: {sorted(known)}")
    return Config(**merged)


@contextlib.contextmanager
def patch(**options: Any):
    """Temporarily set options for every compile in the block (tests)."""
    saved = dict(_overrides)
    _overrides.update(options)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)
