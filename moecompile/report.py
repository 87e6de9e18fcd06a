"""What the compiler did: report.json, per-pass graph dumps, and `explain()`.

report.json (stable; tests and users read it):

    {"regions": [{"graph": int, "name": str, "num_experts": E, "top_k": K, "hidden": H,
                  "intermediate": I, "status": "optimized" | "fallback", "reason": str | null,
                  "kernels": str, "passes": [str], "spec": {...}, "experts_impl": str,
                  "verify_ms": float}],
     "passes":  [{"graph": int, "name": str, "changed": bool, "ms": float, "counters": {...}}],
     "graphs":  [{"graph": int, "status": "rewritten" | "unchanged" | "error", "reason": str | null,
                  "nodes_before": int, "nodes_after": int, "compile_ms": float}]}
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserInputError
from .files import write_text


@dataclass
class Report:
    regions: list[dict[str, Any]] = field(default_factory=list)
    passes: list[dict[str, Any]] = field(default_factory=list)
    graphs: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"regions": self.regions, "passes": self.passes, "graphs": self.graphs}

    def write_json(self, path: str | os.PathLike) -> None:
        write_text(path, json.dumps(self.to_dict(), indent=2) + "\n", make_dirs=True)

    def optimized(self) -> list[dict[str, Any]]:
        return [r for r in self.regions if r["status"] == "optimized"]

    def table(self) -> str:
        """A short human table: one row per MoE layer found."""
        head = f"{'graph':>5}  {'layer':<28} {'E':>4} {'K':>3} {'H':>6} {'I':>6}  {'status':<9} {'kernels':<9} detail"
        rows = [head, "-" * len(head)]
        for r in self.regions:
            spec = r.get("spec", {})
            detail = r["reason"] or (
                f"{spec.get('scoring')}/{spec.get('topk_order', '')[:5]} "
                f"{'renorm ' if spec.get('renormalize') else ''}{spec.get('activation')} "
                f"{spec.get('layout')}{' +shared' if spec.get('shared_expert') else ''} "
                f"[{r.get('experts_impl', '')}]")
            rows.append(f"{r['graph']:>5}  {r['name'][:28]:<28} {r['num_experts']:>4} {r['top_k']:>3} "
                        f"{r['hidden']:>6} {r['intermediate']:>6}  {r['status']:<9} {r['kernels']:<9} {detail}")
        n_opt = len(self.optimized())
        rows.append(f"{len(self.regions)} MoE layer(s) found, {n_opt} optimized, "
                    f"{len(self.regions) - n_opt} left as traced; {len(self.graphs)} graph(s) compiled")
        errors = [g for g in self.graphs if g["status"] == "error"]
        rows += [f"graph {g['graph']}: compiled without moecompile passes: {g['reason']}" for g in errors]
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

    def pass_done(self, pass_name: str, before: str, after: str, changed: bool) -> None:
        self.step += 1
        if changed:  # unchanged passes would only repeat the same code
            self.write(f"{self.step:02d}_{pass_name}.before.py", before)
            self.write(f"{self.step:02d}_{pass_name}.after.py", after)


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


def record(graph: dict, regions: list[dict], passes: list[dict], dump_dir: str | None) -> None:
    with _lock:
        _current.graphs.append(graph)
        _current.regions.extend(regions)
        _current.passes.extend(passes)
        if dump_dir:
            _current.write_json(Path(dump_dir) / "report.json")


def explain(model, *args, options: dict | None = None, quiet: bool = False, **kwargs) -> Report:
    """Compile `model` with backend='moe', run it once on the example inputs, print a table of the
    MoE layers found and return the report (the same data report.json holds)."""
    import torch

    from .backend import moe_backend

    torch._dynamo.reset()
    reset()
    compiled = torch.compile(model, backend=moe_backend, options=options or None)
    with torch.no_grad():
        compiled(*args, **kwargs)
    report = Report(list(_current.regions), list(_current.passes), list(_current.graphs))
    if not quiet:
        print(report.table())
    return report
