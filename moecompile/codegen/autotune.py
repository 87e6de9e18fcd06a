"""Autotuning of the kernels' launch configs, per shape and tokens-per-expert bucket, cached on disk.

    cfg = pick("gate_up", E=8, N=14336, K_dim=4096, dtype=torch.bfloat16, device=x.device,
               tokens_per_expert=T * K / E, run=lambda config: launch(..., config=config))

Candidates come from one function per kernel kind (`register`; grouped_gemm's "gate_up", "down" and
"combine" and the backward's "down_backward", "dx_rows" and "weight_grad" are registered here,
imported only when first used). On CUDA each candidate is timed with
triton.testing.do_bench; one that raises (out of resources, a compile error) is skipped and counted;
the fastest wins, and if every one fails the default is used (for this process only, not saved).

Key: (kind, E, N, K_dim, dtype, device name, Triton version, tokens-per-expert bucket[, flags: the
kernel's compile-time variant]), never the
token count T: one compiled graph serves every T, and the caller passes the tokens per expert it
sees at run time. Bucket b holds tokens_per_expert in (b/2, b], b = 1, 2, 4, ..., MAX_BUCKET (the
last also holds everything above it).

Cache: in memory, and as JSON in

    $MOECOMPILE_CACHE_DIR/autotune.json       if set, else
    $XDG_CACHE_HOME/moecompile/autotune.json  if set (an absolute path), else
    ~/.cache/moecompile/autotune.json

    {"format": 1, "entries": {"<key>": {"kind": .., "E": .., "N": .., "K_dim": .., "dtype": ..,
                                         "device": .., "triton": .., "tpe_bucket": ..,
                                         "config": {..}, "ms": .., "tried": .., "failed": {..}}}}

A save re-reads the file under a lock (`autotune.json.lock`, where the platform has flock), adds its
entry to what is there and moves a temporary file over it, so entries other processes wrote meanwhile
stay and no reader sees half a file. A file that cannot be read or parsed gives one warning naming
it and is ignored (the next save replaces it); an entry whose config is no longer in its kind's
space (the code changed) is ignored and tuned again.

Environment (read in `_environment`, at every call):

    MOECOMPILE_AUTOTUNE=0|false   pin each kind's known-good default config: nothing is timed, and
                                  the cache file is neither read nor written (also off, no; any case)
    MOECOMPILE_CACHE_DIR=<dir>    the folder of autotune.json

Off CUDA (the CPU interpreter) nothing is timed either, unless the caller gives its own `timer`:
times under the interpreter say nothing about a GPU.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import math
import os
import warnings
from typing import Callable

import torch

from .. import files
from ..errors import UserInputError

log = logging.getLogger("moecompile.autotune")

# 4096 tokens per expert fill every tile of every config in the spaces (BLOCK_M <= 64); more only
# repeats the same tiles, so the timings stop changing.
MAX_BUCKET = 4096
_FORMAT = 1
_FILE = "autotune.json"
# do_bench's budgets in ms: candidates run for microseconds to a millisecond, so 25 ms of
# repetitions averages hundreds of launches; the 5 ms warmup follows the compile (outside the timing).
_WARMUP_MS, _REP_MS = 5, 25
_SHORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}

# fn(kind, E, N, K_dim, dtype) -> the default config / the candidate configs (default first)
ConfigFn = Callable[[str, int, int, int, torch.dtype], dict]
SpaceFn = Callable[[str, int, int, int, torch.dtype], list]

_registry: dict[str, tuple[ConfigFn, SpaceFn]] = {}
_memory: dict[str, dict] = {}  # key -> entry, each checked against its kind's current space
_warned: set[str] = set()  # cache files already warned about
_counters: collections.Counter = collections.Counter()


def register(kind: str, default_fn: ConfigFn, space_fn: SpaceFn) -> None:
    """Tune `kind` over `space_fn(kind, E, N, K_dim, dtype)`; `default_fn` (same arguments) is the
    config used untuned. Registering a kind again replaces it."""
    if not isinstance(kind, str) or not kind or not callable(default_fn) or not callable(space_fn):
        raise ValueError(f"autotune.register: want a kind name and two functions, got {kind!r}, "
                         f"{default_fn!r}, {space_fn!r}")
    _registry[kind] = (default_fn, space_fn)


def _gemm_default(kind, E, N, K_dim, dtype):
    from .triton import grouped_gemm  # imports triton: only once a kernel is configured

    return grouped_gemm.default_config(kind, E, N, K_dim, dtype)


def _gemm_space(kind, E, N, K_dim, dtype):
    from .triton import grouped_gemm

    return grouped_gemm.config_space(kind, E, N, K_dim, dtype)


for _kind in ("gate_up", "down", "combine"):
    register(_kind, _gemm_default, _gemm_space)


def _backward_default(kind, E, N, K_dim, dtype):
    from .triton import backward

    return backward.default_config(kind, E, N, K_dim, dtype)


def _backward_space(kind, E, N, K_dim, dtype):
    from .triton import backward

    return backward.config_space(kind, E, N, K_dim, dtype)


for _kind in ("down_backward", "dx_rows", "weight_grad"):
    register(_kind, _backward_default, _backward_space)


def bucket(tokens_per_expert: float) -> int:
    """The power of two b with b/2 < tokens_per_expert <= b, from 1 up to MAX_BUCKET."""
    tpe = float(tokens_per_expert)
    if isinstance(tokens_per_expert, bool) or not tpe >= 0:  # `not >=` also catches NaN
        raise ValueError(f"autotune.bucket: tokens_per_expert={tokens_per_expert!r} must be a number >= 0")
    b = 1
    while b < tpe and b < MAX_BUCKET:
        b *= 2
    return b


def key(kind: str, E: int, N: int, K_dim: int, dtype, device, tpe_bucket: int) -> str:
    """The cache key, e.g. "gate_up|E=8|N=14336|K=4096|bfloat16|NVIDIA H100 80GB HBM3|triton=3.1.0|tpe<=64"
    (tpe_bucket: `bucket(tokens_per_expert)`)."""
    return _key_of(_fields(kind, E, N, K_dim, dtype, device, tpe_bucket))


def _fields(kind, E, N, K_dim, dtype, device, tpe_bucket, flags: str = "") -> dict:
    fields = {"kind": kind, "E": int(E), "N": int(N), "K_dim": int(K_dim), "dtype": _dtype_name(dtype),
              "device": _device_name(device), "triton": _triton_version(), "tpe_bucket": int(tpe_bucket)}
    return dict(fields, flags=flags) if flags else fields


def _key_of(f: dict) -> str:
    return (f"{f['kind']}|E={f['E']}|N={f['N']}|K={f['K_dim']}|{f['dtype']}|{f['device']}"
            f"|triton={f['triton']}|tpe<={f['tpe_bucket']}" + (f"|{f['flags']}" if f.get("flags") else ""))


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _device_name(device) -> str:
    d = torch.device(device)
    if d.type != "cuda":
        return d.type
    return _cuda_name(d.index if d.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.lru_cache(maxsize=None)
def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


def _environment(environ=None) -> tuple[bool, str]:
    """(tuning enabled, cache file) from MOECOMPILE_AUTOTUNE, MOECOMPILE_CACHE_DIR, XDG_CACHE_HOME."""
    env = os.environ if environ is None else environ
    enabled = env.get("MOECOMPILE_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")
    folder = env.get("MOECOMPILE_CACHE_DIR")
    if not folder:
        xdg = env.get("XDG_CACHE_HOME")  # the XDG spec: a relative value is invalid, ignore it
        folder = os.path.join(xdg if xdg and os.path.isabs(xdg) else os.path.join("~", ".cache"), "moecompile")
    return enabled, os.path.join(os.path.expanduser(folder), _FILE)


def enabled() -> bool:
    """False when MOECOMPILE_AUTOTUNE pins the default configs."""
    return _environment()[0]


def cache_path() -> str:
    """The cache file this process reads and writes now (see the module docstring)."""
    return _environment()[1]


def pick(kind: str, *, E: int, N: int, K_dim: int, dtype, device, tokens_per_expert: float,
         run: Callable[[dict], None], timer: Callable[[Callable, dict], float] | None = None,
         flags: str = "") -> dict:
    """The config to launch `kind` with: cached, tuned now, or the default (see the module docstring).

    run(config) launches the kernel once on real inputs; timer(run, config) -> ms replaces
    do_bench (tests; it also makes a non-CUDA device tune); `flags` names the kernel's compile-time
    variant (layout, activation, epilogue: they change its cost) and joins the key. Returns a fresh dict."""
    if kind not in _registry:
        raise ValueError(f"autotune.pick: kind {kind!r} is not registered; known: {sorted(_registry)}")
    default_fn, space_fn = _registry[kind]
    on, path = _environment()
    if not on or (timer is None and torch.device(device).type != "cuda"):
        _counters["default"] += 1
        return dict(default_fn(kind, E, N, K_dim, dtype))
    fields = _fields(kind, E, N, K_dim, dtype, device, bucket(tokens_per_expert), flags)
    k = _key_of(fields)
    if k in _memory:
        _counters["memory"] += 1
        return dict(_memory[k]["config"])
    space = space_fn(kind, E, N, K_dim, dtype)
    entry = _read(path).get(k)
    if entry is not None and entry["config"] in space:
        _counters["disk"] += 1
        _memory[k] = dict(entry, source="disk")
        return dict(entry["config"])
    entry = dict(fields, **_tune(run, space, timer or _bench))
    if entry["ms"] is None:  # every candidate failed: the default, not saved (it may work next run)
        log.warning("autotune %s: all %d configs failed (%s); using the default", _describe_key(fields),
                    entry["tried"], _failures(entry["failed"]))
        _memory[k] = dict(entry, config=dict(default_fn(kind, E, N, K_dim, dtype)), source="default")
        return dict(_memory[k]["config"])
    _counters["tuned"] += 1
    _memory[k] = dict(entry, source="tuned")
    saved = _save(path, k, entry)
    failed = sum(entry["failed"].values())
    log.info("autotune %s: %d configs%s, best %.3f ms (%s), %s", _describe_key(fields), entry["tried"],
             f" ({failed} failed: {_failures(entry['failed'])})" if failed else "", entry["ms"],
             " ".join(f"{n}={v}" for n, v in entry["config"].items()),
             f"cached in {path}" if saved else "not saved")
    return dict(entry["config"])


def _bench(run: Callable[[dict], None], config: dict) -> float:
    from triton.testing import do_bench

    return do_bench(lambda: run(config), warmup=_WARMUP_MS, rep=_REP_MS)


def _tune(run, space: list[dict], timer) -> dict:
    """{"config", "ms", "tried", "failed": {error type: count}} of the fastest candidate; ms is None
    when none ran."""
    best, best_ms, failed = None, math.inf, collections.Counter()
    for config in space:
        try:
            ms = float(timer(run, dict(config)))
        except Exception as err:  # noqa: BLE001 -- a candidate's failure (resources, compile) skips it
            log.debug("autotune: config %s failed: %s: %s", config, type(err).__name__, err)
            failed[type(err).__name__] += 1
            continue
        if not math.isfinite(ms) or ms < 0:
            failed["bad time"] += 1
            continue
        if ms < best_ms:
            best, best_ms = config, ms
    _counters["configs_failed"] += sum(failed.values())
    return {"config": dict(best) if best is not None else None, "ms": best_ms if best is not None else None,
            "tried": len(space), "failed": dict(failed)}


def _describe_key(f: dict) -> str:
    top = f"tpe>{MAX_BUCKET // 2}" if f["tpe_bucket"] >= MAX_BUCKET else f"tpe<={f['tpe_bucket']}"
    return (f"{f['kind']} E={f['E']} N={f['N']} K={f['K_dim']} {_SHORT_DTYPES.get(f['dtype'], f['dtype'])} "
            f"{top}")


def _failures(failed: dict) -> str:
    return ", ".join(f"{n} x{c}" for n, c in sorted(failed.items()))


# -- the cache file -----------------------------------------------------------------------------


def _read(path: str) -> dict[str, dict]:
    """The file's well-formed entries; {} when it is missing; {} and one warning when it is corrupt."""
    if not os.path.lexists(path):
        return {}
    try:
        data = files.read_json(path, "autotune cache")
    except UserInputError as err:
        _warn(path, f"{err}; ignoring it")
        return {}
    if not isinstance(data, dict) or data.get("format") != _FORMAT or not isinstance(data.get("entries"), dict):
        _warn(path, f"autotune cache {path} is not a format-{_FORMAT} cache file; ignoring it")
        return {}
    return {k: e for k, e in data["entries"].items() if _is_entry(e)}


def _is_entry(e) -> bool:
    if not isinstance(e, dict) or not isinstance(e.get("config"), dict):
        return False
    ms = e.get("ms")
    return isinstance(ms, (int, float)) and not isinstance(ms, bool) and math.isfinite(ms)


def _save(path: str, k: str, entry: dict) -> bool:
    """Add entry k to the file, keeping what other processes wrote meanwhile; False (and one
    warning) when the file system refuses."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with _locked(path):
            entries = _read(path)
            entries[k] = entry
            text = json.dumps({"format": _FORMAT, "entries": entries}, indent=1, sort_keys=True, allow_nan=False)
            files.write_text(path, text + "\n")
    except UserInputError as err:  # the write failed; it names the file
        _warn(path, f"autotune cache not saved: {err}")
        return False
    except OSError as err:  # the folder or the lock file
        _warn(path, f"autotune cache not saved: cannot write {path}: {err.strerror or err}")
        return False
    return True


@contextlib.contextmanager
def _locked(path: str):
    """An exclusive flock on `path`.lock for one read-merge-replace. Without flock (Windows, some
    network file systems) the save runs unlocked: two saves in the same instant may then keep only
    one of the two entries, and the other kind is tuned again next run."""
    fd = None
    try:
        import fcntl

        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        fcntl.flock(fd, fcntl.LOCK_EX)
    except (ImportError, OSError):
        pass
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _warn(path: str, message: str) -> None:
    if path not in _warned:
        _warned.add(path)
        warnings.warn(f"moecompile: {message}", stacklevel=4)  # _warn, _read/_save, pick, its caller


# -- inspection ---------------------------------------------------------------------------------


def describe() -> list[dict]:
    """The entries this process uses, by key: the key fields, config, ms, tried, failed and source
    ("tuned" here, read from "disk", or "default" when every candidate failed)."""
    return [dict(_memory[k], key=k, config=dict(_memory[k]["config"])) for k in sorted(_memory)]


def counters() -> dict[str, int]:
    """picks answered from "memory", from "disk", "tuned" now, or "default" (pinned, not timed);
    "configs_failed": candidates that raised while tuning."""
    return dict(_counters)


def clear() -> None:
    """Forget the in-memory cache, the counters and which files were warned about (the file stays)."""
    _memory.clear()
    _counters.clear()
    _warned.clear()
