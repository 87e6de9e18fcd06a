"""What the compiler did: report.json, per-pass graph dumps, and `explain()`.

report.json (stable; tests and users read it):

    {"regions": [{"graph": int, "name": str, "num_experts": E, "top_k": K, "hidden": H,
                  "intermediate": I, "status": "optimized" | "fallback" | "sharded", "reason": str | null,
                  "kernels": str, "passes": [str], "spec": {...}, "experts_impl": str,
                  "verify_ms": float, "serves": [str], "program_key": str,
                  "router": "fused" | "traced" | "",
                  "backward": "triton" | "recompute" | "",
                  "saved": "inputs" | "routing" | "activations" | ""}],
     "passes":  [{"graph": int, "name": str, "changed": bool, "ms": float, "counters": {...}}],
     "graphs":  [{"graph": int, "status": "rewritten" | "unchanged" | "error", "reason": str | null,
                  "nodes_before": int, "nodes_after": int, "compile_ms": float}]}
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserInputError
from .files import write_text


class _Row:
    """Records read like the report.json rows they serialize to: `row["passes"]` is the JSON list,
    `row.get(...)`; attributes are the typed fields."""

    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        value = getattr(self, key)
        return list(value) if isinstance(value, tuple) else value

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self.__dataclass_fields__ else default

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


@dataclass(frozen=True)
class RegionRecord(_Row):
    """One MoE layer found (or a layer holding expert weights that was not): a report.json row."""

    graph: int
    name: str
    num_experts: int
    top_k: int
    hidden: int
    intermediate: int
    status: str  # optimized | fallback | sharded (experts run by moecompile.distributed)
    reason: str | None
    kernels: str  # the op's kernels, or "traced" for a layer left as it was
    passes: tuple[str, ...] = ()
    spec: dict = field(default_factory=dict)  # MoESpec.summary() (full spec in spec_full)
    experts_impl: str = ""
    verify_ms: float = 0.0
    idiom: str = ""  # the pattern detection recognized, "router + dispatch" (detect/idioms.py)
    family: str = ""  # the transformers model family of the layer's code ("" for one's own)
    spec_full: dict = field(default_factory=dict)  # every MoESpec field
    # every layer this row stands for: a graph traced in a frame below the model (resumed after a
    # graph break) runs again, unreported, for each module of that frame's class (fx/names.py)
    serves: tuple[str, ...] = ()
    program_key: str = ""  # MoEProgram.key() of the program the op runs (its .moe dump)
    backward: str = ""  # how the op's backward runs (codegen.train): triton | recompute; "" when traced
    # what the op keeps for its backward (codegen.train.SAVES): inputs | routing | activations; ""
    # when traced. Beyond inputs only in training graphs whose backward runs on Triton.
    saved: str = ""
    # fused: the spec's router, run by the op (the Gate kernel); traced: the model's own routing code,
    # left in the graph, hands the op its top-k weights and ids; "" when the layer is traced whole
    router: str = ""

    def fallback(self, reason: str) -> "RegionRecord":
        return dataclasses.replace(self, status="fallback", reason=reason, kernels="traced", program_key="",
                                   passes=(), backward="", saved="", router="")


@dataclass(frozen=True)
class PassRecord(_Row):
    graph: int
    name: str
    changed: bool
    ms: float
    counters: dict = field(default_factory=dict)


@dataclass(frozen=True)
class GraphRecord(_Row):
    graph: int
    status: str  # rewritten | unchanged | error
    reason: str | None
    nodes_before: int
    nodes_after: int
    compile_ms: float


@dataclass
class Report:
    regions: list[RegionRecord] = field(default_factory=list)
    passes: list[PassRecord] = field(default_factory=list)
    graphs: list[GraphRecord] = field(default_factory=list)

    def copy(self) -> "Report":
        return Report(list(self.regions), list(self.passes), list(self.graphs))

    def to_dict(self) -> dict[str, Any]:
        return {"regions": [r.to_dict() for r in self.regions], "passes": [p.to_dict() for p in self.passes],
                "graphs": [g.to_dict() for g in self.graphs]}

    def write_json(self, path: str | os.PathLike) -> None:
        write_text(path, json.dumps(self.to_dict(), indent=2) + "\n", make_dirs=True)

    def optimized(self) -> list[RegionRecord]:
        return [r for r in self.regions if r.status == "optimized"]

    def table(self) -> str:
        """A short human table: one row per MoE layer found."""
        head = f"{'graph':>5}  {'layer':<28} {'E':>4} {'K':>3} {'H':>6} {'I':>6}  {'status':<9} {'kernels':<9} detail"
        rows = [head, "-" * len(head)]
        for r in self.regions:
            spec = r.spec
            routing = ("traced router " if r.router == "traced" else
                       f"{spec.get('scoring')}/{spec.get('topk_order', '')[:5]} {'renorm ' if spec.get('renormalize') else ''}")
            detail = r.reason or (
                f"{r.idiom + ': ' if r.idiom else ''}{routing}{spec.get('activation')} "
                f"{spec.get('layout')}{' +shared' if spec.get('shared_expert') else ''} "
                f"[{r.experts_impl}]")
            rows.append(f"{r.graph:>5}  {r.name[:28]:<28} {r.num_experts:>4} {r.top_k:>3} "
                        f"{r.hidden:>6} {r.intermediate:>6}  {r.status:<9} {r.kernels.split(':')[0]:<9} {detail}")
        n_opt = len(self.optimized())
        n_sharded = sum(r.status == "sharded" for r in self.regions)
        rows.append(f"{len(self.regions)} MoE layer(s) found, {n_opt} optimized, "
                    + (f"{n_sharded} sharded, " if n_sharded else "")
                    + f"{len(self.regions) - n_opt - n_sharded} left as traced; {len(self.graphs)} graph(s) compiled")
        errors = [g for g in self.graphs if g.status == "error"]
        rows += [f"graph {g.graph}: compiled without moecompile passes: {g.reason}" for g in errors]
        return "\n".join(rows)


class Dumper:
    """Writes per-graph, per-pass before/after code under dump_dir; does nothing when it is None."""

    def __init__(self, dump_dir: str | None, graph_id: int):
        self.root = Path(dump_dir) / f"graph_{graph_id:03d}" if dump_dir else None
        self.step = 0

    def write(self, name: str, text: str) -> None:
        if self.root is None:
            return
        try:
            write_text(self.root / name, text, make_dirs=True)
        except UserInputError as err:  # an unwritable dump_dir must not change what is compiled
            warnings.warn(f"moecompile: dumps stop: {err}", stacklevel=2)
            self.root = None

    def layer_program(self, layer: str, step: str, text: str) -> None:
        """A layer's program after one layer pass (`.moe` text), also as a tlparse artifact."""
        _trace_artifact(f"moecompile_{layer}_{step}.moe", text)
        self.write(f"layers/{layer}/{step}.moe", text)

    def kernels(self, layer: str, program, kernels: str) -> None:
        """What the layer's op runs: the kernel choice per stage and, for Triton, the kernels'
        sources (the templates the constexpr options specialize) with their configs."""
        from .codegen import kernel_dump

        for name, text in kernel_dump.files(program, kernels).items():
            _trace_artifact(f"moecompile_{layer}_{name}", text)
            self.write(f"layers/{layer}/{name}", text)

    def pass_done(self, pass_name: str, before: str, after: str, changed: bool) -> None:
        self.step += 1
        if changed:  # unchanged passes would only repeat the same code
            self.write(f"{self.step:02d}_{pass_name}.before.py", before)
            self.write(f"{self.step:02d}_{pass_name}.after.py", after)


def _trace_artifact(name: str, text: str) -> None:
    """The same dump through torch's structured trace (tlparse); free when that log is off."""
    from torch._logging import trace_structured

    trace_structured("artifact", metadata_fn=lambda: {"name": name, "encoding": "string"}, payload_fn=lambda: text)


# The report of everything compiled in this process since the last reset(); one per dump_dir.
_lock = threading.Lock()
_current = Report()
_graph_counter = [0]


def next_graph_id() -> int:
    with _lock:
        _graph_counter[0] += 1
        return _graph_counter[0] - 1


def current() -> Report:
    return _current


def reset() -> None:
    global _current
    with _lock:
        _current = Report()
        _graph_counter[0] = 0


def record(graph: GraphRecord, regions: list[RegionRecord], passes: list[PassRecord],
           dump_dir: str | None) -> None:
    with _lock:
        _current.graphs.append(graph)
        _current.regions.extend(regions)
        _current.passes.extend(passes)
        if dump_dir:
            _current.write_json(Path(dump_dir) / "report.json")
