"""Time eager, torch.compile(inductor) and torch.compile(backend="moe") in one run.

Used by `moecompile bench`, benchmarks/bench_moe.py, benchmarks/bench_moe_layer.py and the demo.
Speed claims come from here, never from tests. Each case is timed as the median of `iters` calls
after `warmup` calls, round-robin over the backends; by wall clock with a synchronize around each call,
or (`events=True`, CUDA) by CUDA events; `flush=True` overwrites a buffer larger than a GPU's L2
before each timed call, as triton.testing.do_bench does, so that every call reads its weights from
memory as a layer inside a model does. Compile time is the first call's wall time after a dynamo
reset.
The roofline probes (`peak_flops`, `copy_bandwidth`) time a large matmul and a large copy in the
same way, so a floor is computed from what this device does in this run.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

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


def saved_bytes(fn, args, exclude=()) -> int:
    """Bytes autograd keeps from fn(*args)'s forward for its backward: every tensor saved for
    backward (by eager autograd, a custom op's autograd or a compiled graph's), each storage counted
    once, leaving out the storages of `exclude` (the parameters and inputs, kept anyway). Call a
    compiled fn once before: compiling inside would count the compiler's own probes."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            ptr = t.untyped_storage().data_ptr()
            if ptr not in skip and ptr:
                seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    del out
    return sum(seen.values())


def peak_memory(fn, args, device) -> int:
    """Bytes above what was allocated before, at the peak of one fn(*args) call (compile fn first).

    CUDA: the allocator's max allocated. CPU: the profiler's memory events, each op's net
    allocation added in the order the ops started, the largest running total; an allocation freed
    inside the same op is not seen, so this is a lower bound of the true peak."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn(*args)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        return int(peak)
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _stderr_silenced():  # the profiler's C++ side prints a line at start and at stop
        prof.__enter__()
    try:
        out = fn(*args)
    finally:
        with _stderr_silenced():
            prof.__exit__(None, None, None)
    del out
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    running = peak = 0
    for e in events:
        running += e.self_cpu_memory_usage
        peak = max(peak, running)
    return int(peak)


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 to /dev/null for the block (output written by C++, which sys.stderr
    does not see)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


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
        ms = round_robin(fns, args, device, warmup, iters)
    return [Timing(case, b, ms[b], compile_s[b], errors[b]) for b in backends]


# triton.testing.do_bench writes 256 MB between calls: more than the L2 of any GPU so far (H100 and
# H200: 50 MB), so no call finds the previous call's weights in cache. Not a CPU's: some server
# CPUs (and the VMs on them) have last-level caches of hundreds of MB.
FLUSH_BYTES = 256 * 2**20


def round_robin(fns: dict[str, Callable], args: tuple, device, warmup: int, iters: int, events: bool = False,
                flush: bool = False, errors: dict[str, str] | None = None) -> dict[str, float]:
    """Median ms of each `fns[name](*args)`: `warmup` calls each, then `iters` rounds of one call
    of each, so that a drift of the machine's speed hits all of them alike.

    events=False: wall clock, synchronized around each call. events=True (CUDA only; wall clock
    elsewhere): CUDA events around each call, one synchronize per round.
    flush: overwrite FLUSH_BYTES before each timed call (not timed).
    errors: if given, a function that raises is recorded there ("Type: message") and dropped;
    otherwise the exception propagates.
    """
    events = events and torch.device(device).type == "cuda"
    scratch = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=device) if flush else None
    live = dict(fns)
    samples: dict[str, list[float]] = {name: [] for name in fns}

    def attempt(name, sample):
        try:
            sample(live[name])
        except Exception as err:  # noqa: BLE001 -- one failing column must not stop the others
            if errors is None:
                raise
            errors[name] = f"{type(err).__name__}: {err}"
            del live[name]
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()  # an out-of-memory error leaves the cache full

    for name in list(live):
        attempt(name, lambda fn: time_call(fn, args, device, warmup, 1))
    for _ in range(iters):
        pending = []
        for name in list(live):
            if scratch is not None:
                scratch.zero_()
            if events:
                attempt(name, lambda fn: pending.append((name, _event_sample(fn, args))))
            else:
                attempt(name, lambda fn: samples[name].append(time_call(fn, args, device, 0, 1)))
        if pending:
            torch.cuda.synchronize(device)
            for name, (start, end) in pending:
                samples[name].append(start.elapsed_time(end))
    return {name: statistics.median(samples[name]) for name in live}


def _event_sample(fn, args):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn(*args)
    end.record()
    return start, end


def peak_flops(device, dtype, sizes: tuple[int, ...] | None = None, iters: int = 10) -> dict:
    """The best FLOP/s of an (n, n) @ (n, n) matmul in `dtype` over `sizes`, timed as round_robin
    times (events on CUDA). {"flops": FLOP/s, "n": the size that reached it, "ms": its time}."""
    device = torch.device(device)
    # 8192^3 keeps an H100's tensor cores busy for ~1.5 ms; on a CPU 1024^3 takes tens of ms.
    sizes = sizes or ((4096, 8192) if device.type == "cuda" else (512, 1024))
    best = {"flops": 0.0, "n": 0, "ms": 0.0}
    for n in sizes:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        c = torch.empty(n, n, device=device, dtype=dtype)
        ms = round_robin({"mm": lambda: torch.mm(a, b, out=c)}, (), device, 3, iters, events=True)["mm"]
        if 2 * n**3 / (ms * 1e-3) > best["flops"]:
            best = {"flops": 2 * n**3 / (ms * 1e-3), "n": n, "ms": ms}
        del a, b, c
    return best


def copy_bandwidth(device, nbytes: int | None = None, iters: int = 10) -> dict:
    """Bytes per second of a device-to-device copy of `nbytes` (read + write counted), timed as
    round_robin times. {"bytes_per_s": B/s, "nbytes": the buffer size, "ms": one copy's time}."""
    device = torch.device(device)
    # 1 GiB on a GPU, far beyond its L2 (50 MB); 256 MiB on a CPU, beyond a laptop's L3 (a large
    # server L3 holds part of it, and the bandwidth comes out high)
    nbytes = nbytes or (2**30 if device.type == "cuda" else 2**28)
    src = torch.ones(nbytes, dtype=torch.int8, device=device)
    dst = torch.zeros_like(src)
    ms = round_robin({"copy": lambda: dst.copy_(src)}, (), device, 3, iters, events=True)["copy"]
    return {"bytes_per_s": 2 * nbytes / (ms * 1e-3), "nbytes": nbytes, "ms": ms}


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({_cpu_model()}, {torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """device_name in lower case, runs of other characters as "-": for result file names."""
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def versions() -> dict:
    """Versions of the packages a timing depends on; None for one not installed."""
    out = {}
    for package in ("torch", "triton", "transformers", "moecompile"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    out["torch"] = torch.__version__  # the imported one (a local build may not match its metadata)
    return out


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
