"""transformers experts classes (`@use_experts_implementation`) whose implementation is "eager".

transformers 5 keeps experts as 3D weights and picks their forward from
`config._experts_implementation`: "grouped_mm" (its default), "batched_mm", or "eager", a Python loop
`for expert_idx in expert_mask.sum(...).nonzero()` that Dynamo cannot trace: it breaks the graph at
the `nonzero()` and once more per expert (10 breaks, 11 graphs for one Mixtral layer), and no Dynamo
config removes the breaks (a loop over a tensor of data-dependent length cannot be unrolled).

    Matches:     an experts module of a @use_experts_implementation class
    Rewrites to: module.forward = ExpertsForward(module): while the module's config says "eager" (or
                 None), transformers' own "grouped_mm" forward under torch.compile, and the class's
                 forward (the loop) outside it; any other implementation is the class's forward always

The config is not changed: it is shared by every layer of the model (and by the user's eager runs),
and the eager loop stays what eager execution runs, so a prepared model computes exactly what it did.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

EAGER = ("eager", None)


def is_experts(module: nn.Module) -> bool:
    """An instance of a class decorated with transformers' `@use_experts_implementation`."""
    forward = type(module).forward
    return (hasattr(forward, "__wrapped__") and hasattr(module, "has_gate") and hasattr(module, "is_transposed")
            and hasattr(module, "_is_expert_parallel")
            and hasattr(getattr(module, "config", None), "_experts_implementation"))


def implementation(module: nn.Module) -> str | None:
    return module.config._experts_implementation


def grouped_mm_forward():
    """transformers' grouped_mm experts forward, or None if this transformers has none."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return None
    return ALL_EXPERTS_FUNCTIONS.get("grouped_mm")


class ExpertsForward:
    """`experts.forward` once prepared (see the module docstring)."""

    def __init__(self, module: nn.Module, traced_forward):
        self.module, self.traced_forward = module, traced_forward
        # the experts forward's argument names: keyword calls become positional for grouped_mm's
        self.arg_names = tuple(inspect.signature(type(module).forward.__wrapped__).parameters)[1:]

    def __call__(self, *args, **kwargs):
        module = self.module
        if torch.compiler.is_compiling() and implementation(module) in EAGER and len(args) <= 3:
            rest = self.arg_names[len(args):3]
            if set(kwargs) <= set(rest) and len(args) + len(kwargs) == 3:
                return self.traced_forward(module, *args, *(kwargs[n] for n in rest))
        return type(module).forward(module, *args, **kwargs)
