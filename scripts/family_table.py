"""Support table of every MoE family of the installed transformers: what moecompile finds in each.

    python scripts/family_table.py                 # run tests/test_families.py, print the table,
                                                   # write benchmarks/results/families.{md,json}
    python scripts/family_table.py --results DIR   # keep the per-family files in DIR
    python scripts/family_table.py --results DIR --reuse   # table from an earlier run's files
    python scripts/family_table.py -- -k qwen      # pass arguments on to pytest

Per family: the modules that hold expert weights (the MoE layers), how many of them the report
marks optimized, the fallback reasons, the expert modules with no report row at all (and the top-k
ops detection passed over without one), the graphs Dynamo captured, and whether the compiled
outputs match eager.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moecompile.files import write_text  # noqa: E402


def run_sweep(results: str, pytest_args: list[str]) -> int:
    env = {**os.environ, "MOECOMPILE_FAMILY_RESULTS": results,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_families.py", *pytest_args]
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def short(reason: str | None) -> str:
    """A reason without graph node names, weight lists or placeholder names."""
    text = reason or ""
    text = re.sub(r"weights \[.*\] fit no expert layout", "expert weights fit no expert layout", text)
    text = re.sub(r": \[[^\]]*\]", "", text)
    text = re.sub(r" \([a-z_]+\d*\)", "", text)
    return text.strip()[:90]


def _parts(path: str) -> list[str]:
    return path.split(".") if path else []


def _covers(row_name: str, expert: str) -> bool:
    """A report row names the layer of an expert module: the row's module is on the expert's path,
    or shares the expert's parent (router and experts side by side)."""
    row, exp = _parts(row_name), _parts(expert)
    common = 0
    while common < min(len(row), len(exp)) and row[common] == exp[common]:
        common += 1
    return common == len(row) or common >= len(exp) - 1


def _pattern(names: list[str]) -> str:
    """'model.layers.0.mlp.experts', 'model.layers.1.mlp.experts' -> 'model.layers.*.mlp.experts x2'."""
    counts = Counter(re.sub(r"\.\d+\.", ".*.", f".{n}.").strip(".") for n in names)
    return ", ".join(f"{p} x{c}" if c > 1 else p for p, c in counts.items()) or "-"


def _after_prepare(prepare: dict | None, experts: list[str]) -> dict | None:
    """What the report says once moecompile.prepare has run (None: prepare changes nothing)."""
    if prepare is None:
        return None
    rows = prepare["regions"]
    optimized = sum(any(r["status"] == "optimized" and any(_covers(n, e) for n in (r["serves"] or [r["name"]]))
                        for r in rows) for e in experts)
    reasons = Counter(short(r["reason"]) for r in rows if r["status"] == "fallback")
    return {"prepared": prepare["prepared"], "optimized": optimized, "graphs": prepare["graphs"],
            "fallback_reasons": dict(reasons)}


def summarize(result: dict, prepare: dict | None = None) -> dict:
    if "unavailable" in result:
        return {"family": result["family"], "builds": False, "unavailable": result["unavailable"]}
    experts, regions = result["expert_modules"], result["regions"]
    ran = result.get("expert_modules_run", experts)

    def names(r):  # a row of a graph traced below the model stands for every layer that graph serves
        return r.get("serves") or [r["name"]]

    covered = {e: [r for r in regions if any(_covers(n, e) for n in names(r))] for e in experts}
    extra = [r for r in regions if not any(r in rows for rows in covered.values())]
    silent = [e for e in ran if not covered[e]]
    # the layers that ran (a vision MoE does not run on the text input the table compiles with)
    optimized = sum(any(r["status"] == "optimized" for r in covered[e]) for e in ran)
    reasons = Counter(short(r["reason"]) for r in regions if r["status"] == "fallback")
    passed_over = Counter(f"{_pattern([c['module']]) if c['module'] else '?'}: {short(c['reason'])}"
                          for c in result["unreported_topk"])
    return {
        "family": result["family"], "builds": True, "model_class": result["model_class"],
        "experts_kind": result["experts_kind"], "expert_modules": experts,
        "moe_layers": len(ran), "optimized": min(optimized, len(ran)),
        "fallback_reasons": dict(reasons), "not_reported": silent,
        "rows_on_other_modules": [{"name": r["name"], "status": r["status"], "reason": short(r["reason"])}
                                  for r in extra],
        "unreported_topk": dict(passed_over), "graphs": len(result["graphs"]),
        "graph_errors": [g["reason"] for g in result["graphs"] if g["status"] == "error"],
        "match": result["match"], "max_abs_diff": result["max_abs_diff"], "seconds": result["seconds"],
        "regions": result["regions"], "after_prepare": _after_prepare(prepare, ran),
        "routers": sorted({r.get("router") for r in regions if r["status"] == "optimized" and r.get("router")}),
    }


def _prepare_cell(r: dict) -> str:
    p = r["after_prepare"]
    if p is None:
        return "-"
    reasons = "; ".join(f"{why} (x{n})" if n > 1 else why for why, n in p["fallback_reasons"].items())
    return f"{p['optimized']}/{r['moe_layers']}, {p['graphs']} graphs" + (f": {reasons}" if reasons else "")


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# MoE families of transformers {meta['transformers']} (moecompile support, {meta['date']})", "",
             f"**{meta['optimized_all'] + meta['prepared_all']} of {meta['builds']} families optimized** (every MoE "
             f"layer; {meta['prepared_all']} of them after `moecompile.prepare`), {meta['left']} left as traced "
             "(below: why, and whether it is a limit of what the op computes or work to do).", "",
             f"{meta['families']} families enumerated from transformers; {meta['builds']} build tiny "
             f"(hidden 64, 2 layers, 8 experts top-2), {meta['optimized_all']} have every MoE layer optimized "
             "as they are. Compiled with `backend=\"moe\", options={\"inner\": \"eager\"}`, fp32, 2 x 8 tokens.", "",
             "Columns: *experts* is how transformers writes them (`eager/grouped_mm/batched_mm`: "
             "`@use_experts_implementation`, switchable); *optimized* counts the expert modules that ran (a vision MoE "
             "does not run on text input) with an optimized row; *router* is how the optimized layers route (fused: the Gate kernel computes the router the spec "
             "names; traced: the model's own routing code runs as traced and hands the op its top-k weights and "
             "ids); *not reported* counts expert modules that ran and have no report row, with the top-k ops detection passed over without a row; *graphs* is the "
             "number of graphs Dynamo captured (more than 1: graph breaks); *after prepare* is the same run "
             "after `moecompile.prepare(model)` where prepare changes something (optimized, graphs, reasons).",
             "", "| family | experts | MoE layers found (expert modules) | optimized | router | fallback reasons | "
             "not reported | graphs | matches eager | after prepare |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["builds"]:
            lines.append(f"| {r['family']} | - | does not build: {r['unavailable']} | - | - | - | - | - | - | - |")
            continue
        reasons = "; ".join(f"{why} (x{n})" if n > 1 else why for why, n in r["fallback_reasons"].items()) or "-"
        silent = str(len(r["not_reported"]))
        if r["unreported_topk"]:
            silent += " [top-k passed over: " + "; ".join(
                f"{n}x {why}" for why, n in r["unreported_topk"].items()) + "]"
        if r["rows_on_other_modules"]:
            reasons += "; rows on modules without experts: " + ", ".join(
                sorted({_pattern([x["name"]]) for x in r["rows_on_other_modules"]}))
        lines.append(f"| {r['family']} | {r['experts_kind']} | {_pattern(r['expert_modules'])} | "
                     f"{r['optimized']}/{r['moe_layers']} | {'+'.join(r['routers']) or '-'} | {reasons} | {silent} | {r['graphs']} | "
                     f"{'yes' if r['match'] else 'NO'} | {_prepare_cell(r)} |")
    lines += ["", "## Left as traced", "", "| family | kind | why |", "|---|---|---|"]
    lines += [f"| {family} | {kind} | {why} |" for family, (kind, why) in sorted(meta["left_as_traced"].items())]
    if meta["dropped"]:
        lines += ["", "Modeling code names an expert count but the tiny build holds no expert weights: "
                  + ", ".join(meta["dropped"]) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", help="folder for the per-family JSON files (default: a temporary one)")
    parser.add_argument("--reuse", action="store_true", help="do not run the tests; read --results")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for families.md/.json")
    parser.add_argument("pytest_args", nargs="*", help="arguments passed on to pytest (after --)")
    args = parser.parse_args(argv)
    import transformers

    from moecompile.tools import families

    rc = 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.results or tmp
        if args.reuse and not args.results:
            parser.error("--reuse needs --results")
        if not args.reuse:
            for old in Path(folder).glob("*.json"):  # no family of an earlier run mixed in
                old.unlink()
            rc = run_sweep(folder, args.pytest_args)
        results = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]
    prepared = {r["family"]: r["prepare"] for r in results if "prepare" in r}
    rows = [summarize(r, prepared.get(r["family"])) for r in sorted(results, key=lambda r: r["family"])
            if "prepare" not in r]
    built = [r for r in rows if r["builds"]]
    meta = {"transformers": transformers.__version__, "date": datetime.date.today().isoformat(),
            "families": len(rows), "builds": len(built),
            "optimized_all": sum(r["optimized"] == r["moe_layers"] for r in built),
            "prepared_all": sum(r["optimized"] < r["moe_layers"] and (r["after_prepare"] or {}).get("optimized")
                                == r["moe_layers"] for r in built),
            "left": sum(r["optimized"] < r["moe_layers"] and (r["after_prepare"] or {}).get("optimized")
                        != r["moe_layers"] for r in built),
            "left_as_traced": families.LEFT_AS_TRACED,
            "dropped": sorted(set(families.candidate_families()) - set(families.moe_families()))}
    text = markdown(rows, meta)
    print(text)
    write_text(Path(args.out) / "families.md", text, make_dirs=True)
    write_text(Path(args.out) / "families.json", json.dumps({**meta, "rows": rows}, indent=1) + "\n",
               make_dirs=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
