"""The torch.compile backend: `torch.compile(model, backend="moe", options={...})`.

Dynamo hands us one FX graph per captured region; we find its MoE layers, rewrite each into one
`moecompile::moe` op (pipeline.run) and let Inductor compile the result. Anything that goes wrong in
our passes makes that one graph compile exactly as plain Inductor would, with a warning and a
report entry; it never stops the model from running.
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.fx as fx

from . import config as config_mod
from .errors import UserInputError
from . import pipeline, report
from .codegen import ops  # noqa: F401  (registers torch.ops.moecompile.*)


def _inner_compile(gm: fx.GraphModule, example_inputs, inner: str):
    if inner == "inductor":
        from torch._inductor import config as inductor_config
        from torch._inductor.compile_fx import compile_fx

        if inductor_config.post_grad_custom_pre_pass is not None:  # the user's pass: theirs to key
            return compile_fx(gm, example_inputs)
        with inductor_config.patch(post_grad_custom_pre_pass=_ops_in_cache_key()):
            return compile_fx(gm, example_inputs)
    if inner == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, example_inputs)
    return gm.forward


def _ops_identity() -> str:
    """The schemas of moecompile's ops: what a compiled graph calling them depends on."""
    import hashlib

    schemas = sorted(str(getattr(torch.ops.moecompile, name).default._schema) for name in torch.ops.moecompile)
    return hashlib.sha256("\n".join(schemas).encode()).hexdigest()


_ops_pass = None


def _ops_in_cache_key():
    """A post-grad pass that changes nothing; its uuid, the ops' schemas, joins Inductor's and
    AOTAutograd's cache keys, so graphs cached by a moecompile whose ops took other arguments (a
    backward calling moe_backward without `saved`, say) are compiled again, never reused."""
    global _ops_pass
    if _ops_pass is None:
        from torch._inductor.custom_graph_pass import CustomGraphPass

        class OpsInCacheKey(CustomGraphPass):
            def __call__(self, graph) -> None:
                return None

            def uuid(self) -> str:
                return _ops_identity()

        _ops_pass = OpsInCacheKey()
    return _ops_pass


def moe_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    """Dynamo backend entry point (registered as 'moe')."""
    cfg = config_mod.make(options)
    graph_id = report.next_graph_id()
    t0 = time.perf_counter()
    nodes_before = len(gm.graph.nodes)
    rewritten = gm
    status, reason, outcome = "unchanged", None, None
    try:
        if cfg.routing_trace:
            from .routing import recorder_for_file

            recorder_for_file(cfg.routing_trace)
        rewritten = pipeline.copy_module(gm)
        outcome = pipeline.run(rewritten, example_inputs, cfg, graph_id)
        status = "rewritten" if outcome.changed else "unchanged"
    except Exception as err:  # noqa: BLE001 -- never let our passes break the user's model
        if not cfg.fallback_on_error:
            raise
        status, reason = "error", f"{type(err).__name__}: {err}"
        warnings.warn(f"moecompile: graph {graph_id}: {reason}; compiling it with plain {cfg.inner}",
                      stacklevel=2)

    compiled = None
    if status == "rewritten":
        try:
            compiled = _inner_compile(rewritten, example_inputs, cfg.inner)
        except torch._dynamo.exc.RestartAnalysis:
            raise  # dynamo's control flow, not a failure: it traces again and calls us with the new graph
        except Exception as err:  # noqa: BLE001
            if not cfg.fallback_on_error:
                raise
            status, reason = "error", f"{cfg.inner} failed on the rewritten graph: {type(err).__name__}: {err}"
            warnings.warn(f"moecompile: graph {graph_id}: {reason}; compiling the captured graph instead",
                          stacklevel=2)
    regions = outcome.regions if outcome else []
    if status == "error":
        regions = outcome.failed(reason) if outcome else []
    if compiled is None:
        compiled = _inner_compile(gm, example_inputs, cfg.inner)
    graph_row = report.GraphRecord(
        graph=graph_id, status=status, reason=reason, nodes_before=nodes_before,
        nodes_after=len(rewritten.graph.nodes) if status == "rewritten" else nodes_before,
        compile_ms=round((time.perf_counter() - t0) * 1e3, 1))
    try:
        report.record(graph_row, regions, outcome.passes if outcome else [], cfg.dump_dir)
    except (OSError, UserInputError) as err:  # an unwritable dump_dir must not stop the model
        warnings.warn(f"moecompile: could not write the report to {cfg.dump_dir}: {err}", stacklevel=2)
    return compiled


__all__ = ["moe_backend"]
