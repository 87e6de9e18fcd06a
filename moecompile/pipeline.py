"""The ordered passes over one captured graph, top to bottom.

    detect   -> candidates (router -> top-k -> experts -> combine), or reasons they are not MoE
    verify   -> regions whose replacement computes the same function (never a wrong answer)
    layer passes on each region's MoEProgram (build(spec), then fuse_gate, fuse_epilogues; the
             program checked after each)
    lower    -> each region becomes one moecompile::moe call that carries its program

round_tokens, place_experts and overlap_comm join the layer passes.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import time
import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx

from . import detect, verify
from .codegen import moe_torch, plan, train
from .config import Config
from .fx import names, shape_of
from .ir import MoERegion, PassResult, ProgramError, build
from .passes import Lower
from .passes.layer import LAYER_PASSES
from .report import Dumper, PassRecord, RegionRecord


def passes_for(config: Config) -> list:
    return [
        Lower(kernels=config.op_kernels()),  # one op per region; always last
    ]


@dataclass
class GraphOutcome:
    regions: list[RegionRecord]
    passes: list[PassRecord]
    changed: bool

    def failed(self, reason: str) -> list[RegionRecord]:
        """The region records once the whole graph fell back (an error after the passes ran)."""
        return [r.fallback(reason) for r in self.regions]


def _record(graph_id, cand: detect.Candidate, spec, status, reason, kernels, verify_ms=0.0) -> RegionRecord:
    E, K, H, I = (spec.num_experts, spec.top_k, spec.hidden, spec.intermediate) if spec else _candidate_shape(cand)
    return RegionRecord(graph=graph_id, name=cand.name, num_experts=E, top_k=K, hidden=H, intermediate=I,
                        status=status, reason=reason, kernels=kernels, spec=spec.summary() if spec else {},
                        experts_impl=cand.experts_impl, verify_ms=round(verify_ms, 1),
                        idiom=_idiom(cand, spec), family=cand.family,
                        spec_full=_json_safe(dataclasses.asdict(spec)) if spec else {},
                        router=spec.router if spec and status == "optimized" else "")


def _idiom(cand: detect.Candidate, spec) -> str:
    """The idiom of the spec verification chose (detection named it after its first option)."""
    return detect.idioms.idiom_of(spec, cand.nodes) if spec is not None else cand.idiom


def _json_safe(fields: dict) -> dict:
    """report.json is strict JSON: a non-finite float (masked_score -inf) is written as text."""
    return {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in fields.items()}


def _candidate_shape(cand: detect.Candidate) -> tuple:
    """(E, K, H, I) as far as a rejected candidate shows them; 0 where unknown."""
    if cand.options:
        s = cand.options[0][0]
        return s.num_experts, s.top_k, s.hidden, s.intermediate
    return cand.shape


def run(gm: fx.GraphModule, example_inputs: list, config: Config, graph_id: int) -> GraphOutcome:
    dumper = Dumper(config.dump_dir, graph_id)
    dumper.write("00_captured.py", gm.code)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = dict(zip(placeholders, example_inputs))

    t0 = time.perf_counter()
    names.annotate(gm, example_inputs)  # module names in the whole model, also in resumed frames
    candidates = detect.find_candidates(gm)
    detect_ms = (time.perf_counter() - t0) * 1e3
    # a training graph: the rewrite must give the same gradients too
    training = torch.is_grad_enabled() and any(
        isinstance(v, torch.Tensor) and v.requires_grad for v in example_inputs)
    regions: list[MoERegion] = []  # in the order of `records`' optimized rows
    records: list[RegionRecord] = []
    row_of: dict = {}  # region output node -> index of its record
    verify_ms, probes = 0.0, 0
    for cand in candidates:
        if cand.x is None and cand.reason is not None:
            continue  # a top-k that no router feeds: not an MoE layer, not reported
        reason = cand.reason
        if reason is None and config.skips(cand.name):
            reason = "skipped by option skip_layers"
        region, ms = None, 0.0
        if reason is None and config.verify and config.pass_enabled("verify", cand.name):
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
            row_of[region.output] = len(records)
            records.append(_record(graph_id, cand, region.spec, "optimized", None, config.op_kernels(), ms))
        else:  # it looked like an MoE layer: reported, left as traced
            records.append(_record(graph_id, cand, None, "fallback", reason, "traced", ms))
    pass_rows = [PassRecord(graph_id, "detect", False, round(detect_ms, 3),
                            {"candidates": len(candidates), "verified": len(regions)}),
                 PassRecord(graph_id, "verify", False, round(verify_ms, 3),
                            {"probes": probes, "training": int(training)})]

    device = next((v.device for v in example_inputs if isinstance(v, torch.Tensor)), torch.device("cpu"))
    regions, layer_rows = _run_layer_passes(regions, records, row_of, config, dumper, graph_id, device, training)
    pass_rows += layer_rows

    changed = False
    for p in passes_for(config):
        # a pass switched off for a layer leaves it as traced from here on
        for region in [r for r in regions if not config.pass_enabled(p.name, r.name)]:
            records[row_of[region.output]] = records[row_of[region.output]].fallback(
                f"pass {p.name} switched off by option disable_passes")
            regions.remove(region)
        before = gm.code if config.dump_dir else ""
        t0 = time.perf_counter()
        result: PassResult = p(gm, regions)
        result.ms = (time.perf_counter() - t0) * 1e3
        dumper.pass_done(p.name, before, gm.code if config.dump_dir else "", result.changed)
        changed |= result.changed
        pass_rows.append(PassRecord(graph_id, p.name, result.changed, round(result.ms, 3), dict(result.counters)))
        for region in list(regions):
            i = row_of[region.output]
            if region.output.name in result.declined:  # left as traced from here on
                records[i] = records[i].fallback(f"{p.name}: {result.declined[region.output.name]}")
                regions.remove(region)
            else:
                records[i] = dataclasses.replace(records[i], passes=records[i].passes + (p.name,))
    records += [_unmatched_record(graph_id, layer) for layer in detect.unmatched_expert_layers(gm, candidates)]
    records = _sharded(gm, records, graph_id, config.overlap_chunks)
    records = [dataclasses.replace(r, serves=names.serves(gm, r.name)) for r in records]
    if regions and config.dump_dir:
        dumper.write("kernels_torch.py", inspect.getsource(moe_torch))  # the torch path, for every layer
    return GraphOutcome(records, pass_rows, changed)


def _run_layer_passes(regions, records, row_of, config: Config, dumper: Dumper, graph_id: int, device,
                      training: bool):
    """Each region's program through the layer passes enabled for it; its record gets the passes
    that changed it, the program's key, the kernels it will run, how its backward runs and what it
    keeps for it (in a training graph). -> (regions with programs, one PassRecord per layer pass,
    counters summed over the regions)."""
    totals = {cls.name: PassRecord(graph_id, cls.name, False, 0.0, {}) for cls in LAYER_PASSES}
    out = []
    for region in regions:
        program = build(region.spec)
        dumper.layer_program(region.name, "00_build", program.text())
        done = []
        for step, cls in enumerate(LAYER_PASSES, start=1):
            if not config.pass_enabled(cls.name, region.name):
                continue
            t0 = time.perf_counter()
            try:
                rewritten, result = cls(**config.pass_options.get(cls.name, {}))(program)
                program = rewritten.check()
            except ProgramError as err:  # the pass broke its own invariant: this layer keeps the program before it
                result = PassResult(cls.name)
                result.skip("program_error")
                warnings.warn(f"moecompile: layer pass {cls.name} on {region.name}: {err}; the pass is skipped there",
                              stacklevel=2)
            ms = (time.perf_counter() - t0) * 1e3
            if result.changed:
                done.append(cls.name)
                dumper.layer_program(region.name, f"{step:02d}_{cls.name}", program.text())
            row = totals[cls.name]
            counters = dict(row.counters)
            for k, v in result.counters.items():
                counters[k] = counters.get(k, 0) + v
            totals[cls.name] = dataclasses.replace(row, changed=row.changed or result.changed,
                                                   ms=round(row.ms + ms, 3), counters=counters)
        i = row_of[region.output]
        kernels = plan.describe(program, config.op_kernels(), device)
        saved = (train.saved_mode(program, config.op_kernels(), device, config.save_for_backward)
                 if training else "inputs")
        records[i] = dataclasses.replace(records[i], passes=records[i].passes + tuple(done), kernels=kernels,
                                         program_key=program.key(),
                                         backward=train.choose(program, config.op_kernels(), device), saved=saved)
        dumper.kernels(region.name, program, kernels)
        out.append(dataclasses.replace(region, program=program, saved=saved))
    return out, list(totals.values()) if regions else []


def _sharded(gm: fx.GraphModule, records: list[RegionRecord], graph_id: int, chunks) -> list[RegionRecord]:
    """Layers whose experts moecompile.distributed sharded: the graph calls moecompile::ep_experts
    for them (router traced around it). One row each, status "sharded", in place of what the
    detectors made of the router and the local expert weights; option overlap_chunks (`chunks`,
    unless None) is given to each such layer that has not run yet (every rank compiles before its
    first call; a later recompile, maybe on one rank only, must not change C)."""
    calls = [n for n in gm.graph.nodes
             if n.op == "call_function" and str(n.target) in ("moecompile.ep_experts", "moecompile.ep_experts.default")]
    if not calls:
        return records
    from .distributed import ops as ep_ops

    rows = {}
    for node in calls:
        try:
            m = ep_ops.layer_of(node.args[4])
        except RuntimeError:
            continue
        if chunks is not None and not m.calls:
            m.set_chunks(chunks)  # before the layer's first call only: a recompile on one rank changes nothing
        name, world = m.layer.name, m.layer.world
        world_word = "rank" if world == 1 else "ranks"
        ids, x = shape_of(node.args[1]), shape_of(node.args[0])
        hidden = int(x[-1]) if x else 0
        down = m.full_shapes.get("down_proj", ())  # (E, H, I) or (E, I, H)
        intermediate = next((int(d) for d in down[1:] if d != hidden), 0) if len(down) == 3 else 0
        rows[name] = RegionRecord(
            graph=graph_id, name=name, num_experts=m.layer.num_experts, top_k=int(ids[-1]) if ids else 0,
            hidden=hidden, intermediate=intermediate, status="sharded", kernels="distributed",
            reason=f"experts sharded over {world} {world_word} by moecompile.distributed ({m.layer.slots_per_rank} slots on "
                   f"each, overlap_chunks {m.overlap_chunks!r}): moecompile::ep_experts exchanges the rows and runs "
                   f"the family's expert code on them; the router is compiled with the rest of the graph")
    kept = [r for r in records if not any(r.name == n or r.name.startswith(n + ".") for n in rows)]
    return kept + list(rows.values())


def _unmatched_record(graph_id: int, layer) -> RegionRecord:
    """A layer holding expert weights that no candidate covers: never silent."""
    return RegionRecord(graph=graph_id, name=layer.name, num_experts=layer.num_experts, top_k=0,
                        hidden=layer.hidden, intermediate=0, status="fallback", reason=layer.reason,
                        kernels="traced")


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


