"""What a layer's op runs, as dump files: the kernel per stage, the configs, the kernel sources.

    kernels.json          {"kernels": "triton: gate, align, ...", "program_key": ..., "tile_m": ..,
                           "configs": {kind: config}, "autotune": {...}}  (the known-good configs;
                           tuned ones are in the autotune cache, keyed per tokens-per-expert bucket)
    triton_<module>.py    the Triton source of each kernel module the program launches (the
                           templates its constexpr options specialize)
"""

from __future__ import annotations

import inspect
import json

import torch

from ..ir import MoEProgram


def files(program: MoEProgram, kernels: str) -> dict[str, str]:
    info: dict = {"kernels": kernels, "program_key": program.key()}
    out: dict[str, str] = {}
    if kernels.startswith("triton"):
        from . import autotune
        from .triton import align, decode, gate, grouped_gemm, launch

        spec, dtype = program.spec(), getattr(torch, program.dims.dtype)
        E, H, I = spec.num_experts, spec.hidden, spec.intermediate
        info["tile_m"] = launch.tile_m(spec)
        info["configs"] = {"gate_up": grouped_gemm.default_config("gate_up", E, I, H, dtype),
                           "down": grouped_gemm.default_config("down", E, H, I, dtype),
                           "combine": grouped_gemm.default_config("combine", E, H, spec.top_k, dtype),
                           "gate": vars(gate.config(E, H, dtype.itemsize))}
        info["autotune"] = {"enabled": autotune.enabled(), "cache": autotune.cache_path()}
        if "decode_gate_up" in kernels:
            info["configs"]["decode"] = {"gate_up": decode.default_config("gate_up", I, H, dtype),
                                         "down": decode.default_config("down", H, I, dtype)}
        used = [m for m, name in ((gate, "gate,"), (align, "align"), (grouped_gemm, "gemm_"), (decode, "decode_"))
                if name in kernels]
        for module in used:
            out[f"triton_{module.__name__.rsplit('.', 1)[-1]}.py"] = inspect.getsource(module)
    out["kernels.json"] = json.dumps(info, indent=2, default=str) + "\n"
    return out
