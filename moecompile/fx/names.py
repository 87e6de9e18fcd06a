"""Module names of a captured graph's inputs, relative to the model the user compiled.

Dynamo names a graph's parameter inputs after the module whose frame it traced: `L['self']` is the
compiled model for the first frame, but for a frame Dynamo resumes after a graph break, or a nested
forward it compiles on its own, `self` is that inner module ("experts", "router"), and the names say
nothing of which layer it is. Such a compiled graph also serves every module of the same class: the
next layer's call runs it with its own parameters, and the backend is not called again.

`annotate(gm, example_inputs)` finds the compiled model (the outermost module whose call is on the
Python stack while the backend runs), the traced frame's module in it (the `self` Dynamo's translator
holds, or else where the parameter inputs, matched by identity, sit), so

    gm.meta["moe_prefix"]   ['model', 'layers', '0', 'mlp']: the traced frame's module in the model
    gm.meta["moe_serves"]   ('model.layers.0.mlp', 'model.layers.1.mlp'): every module of its class
                            (only for a frame below the model; the graph runs for each of them)
    node.meta["moe_param"]    a parameter or buffer input's name in the model
    node.meta["moe_view_of"]  the parameter a non-parameter input is a view of ('...experts.w1')

`owner_parts(node)` is then the module path of a parameter input in the whole model. Nothing here
changes the graph; where no model is found (a graph compiled outside a module call) names stay as
Dynamo wrote them.
"""

from __future__ import annotations

import sys

import torch
import torch.fx as fx
import torch.nn as nn

from . import module_parts


def _compiled_model() -> nn.Module | None:
    """The outermost nn.Module whose method is running on the stack (an OptimizedModule's module)."""
    frame, outer = sys._getframe(1), None
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module):
            outer = owner
        frame = frame.f_back
    return getattr(outer, "_orig_mod", outer)


def _traced_self() -> nn.Module | None:
    """`self` of the frame Dynamo is compiling, where this torch shows it."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        owner = tx.f_locals.get("self") if tx is not None else None
    except Exception:  # noqa: BLE001 -- a private API; the parameters' names are the fallback
        return None
    return owner if isinstance(owner, nn.Module) else None


def annotate(gm: fx.GraphModule, example_inputs) -> None:
    model = _compiled_model()
    if model is None:
        return
    frame_module = _traced_self()
    prefix = None
    if frame_module is not None:
        for n, m in model.named_modules(remove_duplicate=False):
            if m is frame_module:
                prefix = n.split(".") if n else []
                break
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    names.update({id(b): n for n, b in model.named_buffers(remove_duplicate=False)})
    storages = {_storage(p): n for n, p in reversed(list(model.named_parameters()))}
    storages.pop(None, None)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        if not isinstance(value, torch.Tensor):
            continue
        full = names.get(id(value))
        if full is None:
            viewed = storages.get(_storage(value)) if not isinstance(value, nn.Parameter) else None
            if viewed is not None:
                node.meta["moe_view_of"] = viewed
            continue
        node.meta["moe_param"] = full
        relative, owner = module_parts(node.name), full.split(".")[:-1]  # the module holding it
        if prefix is None and relative is not None and owner[len(owner) - len(relative):] == relative:
            prefix = owner[:len(owner) - len(relative)]
    if not prefix:
        return
    gm.meta["moe_prefix"] = prefix
    frame_module = model.get_submodule(".".join(prefix))
    gm.meta["moe_serves"] = tuple(n for n, m in model.named_modules() if type(m) is type(frame_module))


def _storage(t: torch.Tensor):
    """Where a tensor's data lives (None for meta, fake or empty tensors): views share it."""
    if t.device.type == "meta":
        return None
    try:
        return t.untyped_storage().data_ptr() or None
    except (RuntimeError, NotImplementedError, TypeError):  # a subclass without storage
        return None


def owner_parts(node: fx.Node) -> list[str] | None:
    """module_parts(node.name) in the whole model: the traced frame's module path in front."""
    return in_model(node, module_parts(node.name))


def param_name(node: fx.Node) -> str | None:
    """A parameter input's dotted name in the model ('model.layers.0.mlp.experts.down_proj'), read
    off Dynamo's name where annotate found no model; None for other inputs."""
    if "moe_param" in node.meta:
        return node.meta["moe_param"]
    owner = module_parts(node.name)
    if owner is None or "_parameters_" not in node.name:
        return None
    return ".".join([*owner, node.name.split("_parameters_")[-1].strip("_")])


def in_model(node: fx.Node, relative: list[str] | None) -> list[str] | None:
    """A module path read off a graph input's name (relative to the traced frame), in the model."""
    if relative is None:
        return None
    owner = node.graph.owning_module
    prefix = owner.meta.get("moe_prefix", []) if owner is not None else []
    return [*prefix, *relative]


def serves(gm: fx.GraphModule, name: str) -> tuple[str, ...]:
    """Every layer a row named `name` stands for: the same path under each module of the frame's
    class when the graph was traced in a frame below the model, else just `name`."""
    prefix, modules = ".".join(gm.meta.get("moe_prefix", [])), gm.meta.get("moe_serves", ())
    if not prefix:
        return (name,)
    if name == prefix or name.startswith(prefix + "."):
        rest = name[len(prefix):]
        return tuple(m + rest for m in modules)
    if prefix.startswith(name + "."):  # a row named for a module above the frame's (a list of experts)
        up = prefix.count(".") - name.count(".")
        return tuple(dict.fromkeys(".".join(m.split(".")[:-up]) for m in modules))
    return (name,)
