"""The ordered passes over one captured graph, top to bottom.

    detect   -> candidates (router -> top-k -> experts -> combine), or reasons they are not MoE
    verify   -> regions whose replacement computes the same function (never a wrong answer)
    lower    -> each region becomes one moecompile::moe call

fuse_gate, round_tokens, place_experts and overlap_comm slot in between verify and lower.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass

import torch
import torch.fx as fx

from . import detect, verify
from .codegen import moe_torch
from .config import Config
from .ir import MoERegion, PassResult
from .passes import Lower
from .report import Dumper


def passes_for(config: Config) -> list:
    return [
        Lower(kernels=config.op_kernels()),  # one op per region; always last
    ]


@dataclass
class GraphOutcome:
    regions: list[dict]
    passes: list[dict]
    changed: bool


def _region_row(graph_id, name, spec, status, reason, kernels, passes, impl, shape=None) -> dict:
    E, K, H, I = (spec.num_experts, spec.top_k, spec.hidden, spec.intermediate) if spec else shape
    return {"graph": graph_id, "name": name, "num_experts": E, "top_k": K, "hidden": H,
            "intermediate": I, "status": status, "reason": reason, "kernels": kernels,
            "passes": passes, "spec": spec.summary() if spec else {}, "experts_impl": impl}


def _candidate_shape(cand: detect.Candidate) -> tuple:
    """(E, K, H, I) as far as a rejected candidate shows them; 0 where unknown."""
    if cand.options:
        s = cand.options[0][0]
        return s.num_experts, s.top_k, s.hidden, s.intermediate
    w = cand.topk.args[0]
    e = detect.shape_of(w)[-1] if detect.shape_of(w) else 0
    k = cand.topk.args[1] if len(cand.topk.args) > 1 and isinstance(cand.topk.args[1], int) else 0
    h = detect.shape_of(cand.x)[-1] if cand.x is not None and detect.shape_of(cand.x) else 0
    return e, k, h, 0


def run(gm: fx.GraphModule, example_inputs: list, config: Config, graph_id: int) -> GraphOutcome:
    dumper = Dumper(config.dump_dir, graph_id)
    dumper.write("00_captured.py", gm.code)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = dict(zip(placeholders, example_inputs))

    t0 = time.perf_counter()
    candidates = detect.find_candidates(gm)
    detect_ms = (time.perf_counter() - t0) * 1e3
    # a training graph: the rewrite must give the same gradients too
    training = torch.is_grad_enabled() and any(
        isinstance(v, torch.Tensor) and v.requires_grad for v in example_inputs)
    regions: list[MoERegion] = []
    rows: dict[int, dict] = {}  # candidate index -> report row
    region_index: dict[int, int] = {}
    verify_ms, probes = 0.0, 0
    for index, cand in enumerate(candidates):
        reason = cand.reason
        region, ms = None, 0.0
        if reason is None and config.verify:
            verdict = verify.verify(cand, graph_id, values, config, training)
            region, reason, ms = verdict.region, verdict.reason, verdict.ms
            verify_ms += verdict.ms
            probes += verdict.probes
        elif reason is None:
            spec, weights = cand.options[0]
            region = MoERegion(graph_id, cand.name, spec, cand.x, tuple(weights), cand.output,
                               cand.nodes, cand.experts_impl)
        if region is not None:
            regions.append(region)
            region_index[id(region)] = index
            rows[index] = _region_row(graph_id, cand.name, region.spec, "optimized", None,
                                          config.op_kernels(), [], cand.experts_impl)
        elif cand.x is not None:
            # a router feeds this top-k, so it looked like an MoE layer: reported, left as traced
            rows[index] = _region_row(graph_id, cand.name, None, "fallback", reason, "traced", [],
                                          cand.experts_impl, _candidate_shape(cand))
        if index in rows:
            rows[index]["verify_ms"] = round(ms, 1)
    pass_rows = [{"graph": graph_id, "name": "detect", "changed": False, "ms": round(detect_ms, 3),
                  "counters": {"candidates": len(candidates), "verified": len(regions)}},
                 {"graph": graph_id, "name": "verify", "changed": False, "ms": round(verify_ms, 3),
                  "counters": {"probes": probes, "training": int(training)}}]

    changed = False
    for p in passes_for(config):
        before = gm.code if config.dump_dir else ""
        t0 = time.perf_counter()
        result: PassResult = p(gm, regions)
        result.ms = (time.perf_counter() - t0) * 1e3
        dumper.pass_done(p.name, before, gm.code if config.dump_dir else "", result.changed)
        changed |= result.changed
        pass_rows.append({"graph": graph_id, "name": p.name, "changed": result.changed,
                          "ms": round(result.ms, 3), "counters": dict(result.counters)})
        for region in list(regions):
            row = rows[region_index[id(region)]]
            if region.output.name in result.declined:  # left as traced from here on
                row.update(status="fallback", kernels="traced",
                           reason=f"{p.name}: {result.declined[region.output.name]}")
                regions.remove(region)
            else:
                row["passes"].append(p.name)
    if regions and config.dump_dir:
        dumper.write("kernels_torch.py", inspect.getsource(moe_torch))
    return GraphOutcome(list(rows.values()), pass_rows, changed)


def copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy whose graph the passes may rewrite while `gm` stays as captured (for fallback)."""
    graph = fx.Graph()
    value_map: dict = {}
    out = graph.graph_copy(gm.graph, value_map)
    graph.output(out)
    graph._codegen = gm.graph._codegen
    copy = fx.GraphModule(gm, graph)
    copy.meta = dict(getattr(gm, "meta", {}))
    return copy


