"""codegen.plan: what runs a layer's program, on which device.

    kernels   runs
    auto      Triton on CUDA where the program's dtype allows, the torch path elsewhere
    triton    Triton (on CPU under TRITON_INTERPRET=1: how CI tests the kernels); the torch path,
              with the reason in the report, for what Triton cannot run (float64)
    torch     the sorted torch path (moe_torch): grouped GEMMs over rows sorted by expert
    reference the eager per-expert loop (debugging)
    interpreter  the program stage by stage in torch (codegen.reference)

`describe` says for the report what `choose` decides; the op calls `forward`, which decides the
same way at every call (a few dict lookups). Under Triton each stage runs on its kernel when it
has one for that stage's form (codegen/triton/launch.py), else on its torch function.
"""

from __future__ import annotations

import os
import warnings
from functools import lru_cache

import torch
from torch import Tensor

from ..ir import MoEProgram, MoESpec, build
from . import moe_torch, reference

KERNELS = ("auto", "triton", "torch", "reference", "interpreter")
TRITON_DTYPES = ("float32", "bfloat16", "float16")


@lru_cache(maxsize=512)
def program_of(spec: MoESpec) -> MoEProgram:
    """The canonical program of a spec (callers that hold a spec and no program)."""
    return build(spec)


def triton_unavailable(program: MoEProgram, device: torch.device) -> str | None:
    """Why Triton cannot run this program on `device`, or None."""
    if program.dims.dtype not in TRITON_DTYPES:
        return f"{program.dims.dtype} is not a Triton dtype ({', '.join(TRITON_DTYPES)})"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"Triton runs on CUDA, or on {device.type} only under TRITON_INTERPRET=1"
    try:
        from .triton import launch
    except ImportError as e:  # triton not installed
        return f"triton is not importable ({e})"
    return launch.unavailable(device)


def choose(program: MoEProgram, kernels: str, device: torch.device) -> tuple[str, str | None]:
    """(what runs: triton | torch | reference | interpreter, why not Triton where it was asked for)."""
    if kernels not in KERNELS:
        raise ValueError(f"moecompile::moe: unknown kernels {kernels!r}; expected one of {KERNELS}")
    if kernels not in ("auto", "triton"):
        return kernels, None
    if kernels == "auto" and device.type != "cuda":
        return "torch", None
    why = triton_unavailable(program, device)
    return ("torch", why) if why else ("triton", None)


def describe(program: MoEProgram, kernels: str, device: torch.device) -> str:
    """The kernels a region runs, for the report: "triton: gate, align, ..." or "torch (...)"."""
    what, why = choose(program, kernels, device)
    if what == "triton":
        from .triton import launch
        return "triton: " + launch.describe(program)
    return what + (f" (not triton: {why})" if why else "")


def forward(program: MoEProgram, x: Tensor, weights: list[Tensor], kernels: str, on_route=None) -> Tensor:
    what, _ = choose(program, kernels, x.device)
    spec = program.spec()
    if what == "torch":
        # below autograd nothing records intermediates, so the forward may reuse its buffers
        return moe_torch.moe_forward(x, weights, spec, on_route=on_route, inplace=True)
    if what == "reference":
        return moe_torch.moe_forward_reference(x, weights, spec, on_route=on_route)
    if what == "interpreter":
        return reference.run(program, x, weights, on_route=on_route)
    from .triton import launch
    routed: list = []  # routing seen once, whichever path computes the output
    try:
        out = launch.run(program, x, weights, on_route=routed.append if on_route else None)
    except ValueError as err:  # a launcher's input check: never a crash, the torch path instead
        warn_once(program, str(err))
        return moe_torch.moe_forward(x, weights, spec, on_route=on_route, inplace=True)
    for ids in routed:
        on_route(ids)
    return out


def forward_saving(program: MoEProgram, x: Tensor, weights: list[Tensor], kernels: str, save: str,
                   on_route=None) -> tuple[Tensor, Tensor, Tensor]:
    """-> (y, ids (T, K) int32, pre): the forward keeping what `save` names for the Triton backward
    (codegen/train.py): the gate's expert ids, and for "activations" GEMM 1's pre-activations
    (P, 2I or I) in the tiles' row order, else an empty (0,). Where Triton does not run the
    forward (a launcher declined it), the interpreter computes the same values, slowly: the
    backward needs them in the tiled layout whichever path ran."""
    spec = program.spec()
    keep = ("ids", "pre") if save == "activations" else ("ids",)
    if choose(program, kernels, x.device)[0] == "triton":
        from .triton import launch
        routed: list = []
        try:
            y, ids, pre = launch.run_saving(program, x, weights, save,
                                            on_route=routed.append if on_route else None)
        except ValueError as err:
            warn_once(program, str(err))
        else:
            for r in routed:
                on_route(r)
            return y, ids, pre if pre is not None else x.new_empty(0)
    from .triton.launch import tile_m  # moe_saving is only emitted where triton imports
    y, ids, *pre = reference.run(program, x, weights, tile_m=tile_m(spec), on_route=on_route, keep=keep)
    return y, ids.to(torch.int32).contiguous(), pre[0] if pre else x.new_empty(0)


_warned: set = set()


def warn_once(program: MoEProgram, reason: str) -> None:
    launcher = reason.split(":")[0]  # the message's shapes vary with T; one warning per launcher
    if (program.key(), launcher) not in _warned:
        _warned.add((program.key(), launcher))
        warnings.warn(f"moecompile: the Triton kernels declined a layer (program {program.key()}): {reason}; "
                      "it runs on the torch path", stacklevel=3)


def differentiable_forward(kernels: str):
    """The forward the backward recomputes under torch.func.vjp: the eager loop for kernels
    "reference", the torch path for every other choice (kernels are not differentiable)."""
    return moe_torch.moe_forward_reference if kernels == "reference" else moe_torch.moe_forward
