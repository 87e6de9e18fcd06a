"""`moecompile.prepare(model)`: MoE layers whose code breaks Dynamo's graph, made traceable.

Two common ways of writing an MoE layer never reach the backend as one graph: transformers' "eager"
experts implementation (a loop over the experts some token picked) and a block with one module per
expert (`nn.ModuleList`) and a Python loop over them (`torch.where(expert_mask[e])` per expert).
Dynamo breaks the graph inside either loop, so no captured graph holds a whole layer.

    model = moecompile.prepare(model)          # before torch.compile
    compiled = torch.compile(model, backend="moe")
    moecompile.prepared(model)                 # [Prepared(name, what), ...]: what prepare changed

    Matches:     hf_experts.is_experts(m)          transformers @use_experts_implementation experts
                 expert_loop.find_form(m)          stacked experts with a loop over the experts hit
                 dispatch_mask.find_form(m)        a router handing a list of experts a dispatch mask
                 expert_list.find_layout(m)        router Linear + ModuleList of per-expert MLPs
    Rewrites to: m.forward = a callable that runs, under torch.compile only, a formulation without
                 a Python loop (transformers' grouped_mm; stacked weights + moecompile::grouped_mm),
                 and the module's own forward otherwise

What stays as it was: every Parameter object (an optimizer built before prepare keeps working),
state_dict keys, the model's config, and eager execution, bit for bit. Under torch.compile the layer
computes the same function up to the order of additions; gradients reach the same parameters.
prepare is idempotent, and a no-op (it says so in the log) on models where it finds nothing it knows.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from dataclasses import dataclass

import torch.nn as nn

from . import dispatch_mask, expert_list, expert_loop, hf_experts

log = logging.getLogger("moecompile.prepare")


@dataclass(frozen=True)
class Prepared:
    """One module prepare changed: its name in the model and what it does under torch.compile now."""

    name: str
    what: str


_done: "weakref.WeakKeyDictionary[nn.Module, list[Prepared]]" = weakref.WeakKeyDictionary()


def prepare(model: nn.Module) -> nn.Module:
    """Make the model's graph-breaking MoE layers traceable by Dynamo; returns `model` itself.

    A block prepare recognizes but cannot reproduce exactly (see `expert_list.find_routing`) is left
    as it is, with a warning that says why. See `prepared(model)` for what was changed."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"moecompile.prepare takes a torch.nn.Module, got {type(model).__name__}")
    rows = list(_done.get(model, []))
    seen = {r.name for r in rows}
    grouped_mm = None
    for name, module in model.named_modules():
        name = name or "(model)"
        if name in seen or _is_prepared(module):
            continue
        if hf_experts.is_experts(module):
            # other implementations trace as they are; a module prepared here follows later switches
            if hf_experts.implementation(module) not in hf_experts.EAGER:
                continue
            grouped_mm = grouped_mm or hf_experts.grouped_mm_forward()
            if grouped_mm is None:
                continue
            module.forward = hf_experts.ExpertsForward(module, grouped_mm)
            rows.append(Prepared(name, f"transformers experts ({type(module).__name__}): with the 'eager' "
                                       "implementation, runs transformers' grouped_mm under torch.compile"))
            continue
        form, why = expert_loop.find_form(module) if not hf_experts.is_experts(module) else (None, None)
        if form is not None:
            module.forward = expert_loop.LoopFreeForward(module, form)
            rows.append(Prepared(name, f"experts loop ({type(module).__name__}, {form.describe()}): "
                                       "sorted rows and grouped GEMMs under torch.compile"))
            continue
        if why is not None:
            warnings.warn(f"moecompile.prepare: {name} ({type(module).__name__}) looks like an experts "
                          f"module with a loop over the experts, but {why}; left as it is", stacklevel=2)
            continue
        mask_form, why = dispatch_mask.find_form(module)
        if mask_form is not None:
            dispatch_mask.install(module, mask_form)
            seen.add(f"{name}.experts")
            rows.append(Prepared(name, f"router + {len(dispatch_mask._experts_of(module))} experts given a dispatch "
                                       f"mask ({type(module).__name__}, {mask_form.describe()}): the router as it is, "
                                       "the experts stacked, without a Python loop under torch.compile"))
            continue
        if why is not None:
            warnings.warn(f"moecompile.prepare: {name} ({type(module).__name__}) looks like an MoE block "
                          f"whose router hands its experts a dispatch mask, but {why}; left as it is",
                          stacklevel=2)
            continue
        layout, why = expert_list.find_layout(module)
        if layout is None and why is None:
            continue
        routing = None
        if layout is not None:
            routing, why = expert_list.find_routing(module, layout)
        if routing is None:
            warnings.warn(f"moecompile.prepare: {name} ({type(module).__name__}) looks like an MoE block "
                          f"with one module per expert, but {why}; left as it is", stacklevel=2)
            continue
        module.forward = expert_list.ListForward(module, layout, routing)
        experts = getattr(module, layout.experts)
        names = "/".join(n for n in (layout.gate, layout.up, layout.down) if n)
        rows.append(Prepared(name, f"{len(experts)} {type(experts[0]).__name__} experts ({names}) in "
                                   f"{layout.experts}: stacked, without a Python loop under torch.compile "
                                   f"({routing.describe()})"))
    _done[model] = rows
    if rows:
        log.info("moecompile.prepare: %d module(s) of %s prepared: %s", len(rows), type(model).__name__,
                 "; ".join(f"{r.name}: {r.what}" for r in rows))
    else:
        log.info("moecompile.prepare: no MoE module it knows of in %s; returned unchanged", type(model).__name__)
    return model


def prepared(model: nn.Module) -> list[Prepared]:
    """What `prepare(model)` changed, in module order (empty: nothing, or prepare never ran)."""
    return list(_done.get(model, []))


def _is_prepared(module: nn.Module) -> bool:
    return isinstance(module.__dict__.get("forward"), (hf_experts.ExpertsForward, expert_list.ListForward,
                                                          expert_loop.LoopFreeForward, dispatch_mask.MaskForward,
                                                          dispatch_mask.StackedExpertsForward))


__all__ = ["Prepared", "prepare", "prepared"]
