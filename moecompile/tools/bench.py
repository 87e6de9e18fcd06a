"""Time eager, torch.compile(inductor) and torch.compile(backend="moe") in one run.

Used by `moecompile bench`, benchmarks/bench_moe.py and the demo. Speed claims come from here, never
from tests. Each case is timed as the median of `iters` calls after `warmup` calls; on CUDA with a
synchronize around each call. Compile time is the first call's wall time after a dynamo reset.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
from dataclasses import dataclass

import torch

from ..errors import UserInputError


@dataclass
class Timing:
    case: str
    backend: str
    ms: float
    compile_s: float
    max_abs_err: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, args, device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn(*args)
    _sync(device)
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn(*args)
        _sync(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _output(value):
    return value.logits if hasattr(value, "logits") else value


def compare(case: str, module: torch.nn.Module, args: tuple, device, warmup=3, iters=10,
            backends=("eager", "inductor", "moe")) -> list[Timing]:
    """Time `module(*args)` under each backend; error is max |out - eager out|.

    Compile time is each backend's first call. The timed calls then go round-robin over the
    backends, `iters` rounds, so that a drift of the machine's speed hits all of them alike; each
    backend's time is its median.
    """
    import torch._inductor.config as inductor_config

    # NOTE: no on-disk graph cache, so each backend's compile time is a cold compile of its own graph.
    with torch.no_grad(), inductor_config.patch(fx_graph_cache=False):
        reference = _output(module(*args)).float()
        torch._dynamo.reset()
        fns, compile_s, errors = {}, {}, {}
        for backend in backends:
            fns[backend] = module if backend == "eager" else torch.compile(module, backend=backend)
            t0 = time.perf_counter()
            out = _output(fns[backend](*args)).float()
            _sync(device)
            compile_s[backend] = 0.0 if backend == "eager" else time.perf_counter() - t0
            errors[backend] = (out - reference).abs().max().item()
        samples: dict[str, list[float]] = {b: [] for b in backends}
        for backend in backends:
            time_call(fns[backend], args, device, warmup, 1)
        for _ in range(iters):
            for backend in backends:
                samples[backend].append(time_call(fns[backend], args, device, 0, 1))
    return [Timing(case, b, statistics.median(samples[b]), compile_s[b], errors[b]) for b in backends]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({_cpu_model()}, {torch.get_num_threads()} threads)"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def table(rows: list[Timing]) -> str:
    """One line per case: times per backend and the ratios moe/inductor, moe/eager."""
    cases = list(dict.fromkeys(r.case for r in rows))
    head = (f"{'case':<34} {'eager ms':>9} {'inductor':>9} {'moe ms':>9} {'moe/ind':>8} {'moe/eag':>8}"
            f" {'ind comp s':>10} {'moe comp s':>10} {'moe err':>9}")
    lines = [head, "-" * len(head)]
    for case in cases:
        by = {r.backend: r for r in rows if r.case == case}
        e, i, m = by.get("eager"), by.get("inductor"), by.get("moe")
        lines.append(
            f"{case:<34} {e.ms if e else float('nan'):>9.3f} {i.ms if i else float('nan'):>9.3f} "
            f"{m.ms if m else float('nan'):>9.3f} {(m.ms / i.ms) if m and i else float('nan'):>8.3f} "
            f"{(m.ms / e.ms) if m and e else float('nan'):>8.3f} {i.compile_s if i else float('nan'):>10.2f} "
            f"{m.compile_s if m else float('nan'):>10.2f} {m.max_abs_err if m else float('nan'):>9.2e}")
    return "\n".join(lines)


def to_json(rows: list[Timing], device, extra: dict | None = None) -> dict:
    return {
        "device": device_name(device), "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, **(extra or {}),
        "results": [r.__dict__ for r in rows],
        "ratios": {case: {
            "moe_over_inductor": _ratio(rows, case, "moe", "inductor"),
            "moe_over_eager": _ratio(rows, case, "moe", "eager"),
            "moe_compile_over_inductor_compile": _ratio(rows, case, "moe", "inductor", "compile_s"),
        } for case in dict.fromkeys(r.case for r in rows)},
    }


def _ratio(rows, case, a, b, field="ms"):
    by = {r.backend: getattr(r, field) for r in rows if r.case == case}
    return round(by[a] / by[b], 4) if a in by and b in by and by[b] else None


def add_bench_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="time eager, inductor and moe on a built-in model",
                              description="Time a built-in demo model under eager, inductor and moe.")
    p.add_argument("--model", default="mixtral")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.set_defaults(func=_run_bench)


def _run_bench(args) -> int:
    from .. import models
    from ..files import check_output, write_text

    if not 1 <= args.iters <= 10_000:
        raise UserInputError(f"--iters must be between 1 and 10000, got {args.iters}")
    models.check_sizes(batch=args.batch, tokens=args.tokens)
    check_output(args.json, "--json")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, (ids,) = models.build(args.model, dtype=args.dtype, batch=args.batch, tokens=args.tokens)
    with models.user_code(args.model):
        rows = compare(f"{args.model} B{args.batch} S{args.tokens} {args.dtype}", model.to(device),
                       (ids.to(device),), device, iters=args.iters)
    print(f"device: {device_name(device)}")
    print(table(rows))
    if args.json:
        write_text(args.json, json.dumps(to_json(rows, device), indent=2) + "\n")
    return 0
