"""Routing traces: how many tokens each expert of each layer received, and where they went next.

File formats (both hold the same two arrays, and optionally the layers' sizes):

    .npz   arrays `load` (L, E) and optionally `flow` (L-1, E, E), `hidden` and `dtype` (0-d),
           `layers` (L,) strings; other arrays are ignored
    .json  {"load": [[...], ...], "flow": [[[...]]] | null, "hidden": H | null, "dtype": "bfloat16" | null,
            "layers": ["model.layers.0.mlp", ...] | null}

`layers` names the MoE layers (their module paths, as the report names them): a plan made from the
trace carries them, and `moecompile.distributed.shard_experts` matches the model's layers by them.
`hidden` (the layers' H) and `dtype` (their activations' dtype) are what a token costs on the wire;
`moecompile trace` and option routing_trace record them, and the layer-time model (cost.py) reads them.

`load[l, e]` counts the tokens routed to expert e in MoE layer l. `flow[l, e, e2]` counts the
(token, k, k2) routings that went to expert e in layer l and to expert e2 in layer l+1, so with top-k
routing each token adds K*K to one layer's flow. Counts may be fractional (averaged traces) but must
be finite and non-negative.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass

import numpy as np

from ..errors import UserInputError
from ..files import atomic_write, read_json, write_json


# Token counts far beyond any run (1e15 tokens through one expert); sums of counts then stay far
# from float64's 1.8e308.
MAX_COUNT = 1e15
# bytes per element of the activations' dtypes a trace may name
DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}


@dataclass(frozen=True)
class RoutingTrace:
    """Routing statistics of one model run; arrays are validated float64 copies, read-only."""

    load: np.ndarray  # (L, E) float64
    flow: np.ndarray | None = None  # (L-1, E, E) float64
    hidden: int | None = None  # H of the layers, where recorded
    dtype: str | None = None  # their activations' dtype (a DTYPE_BYTES key), where recorded
    layers: tuple[str, ...] | None = None  # the layers' names (module paths), where recorded

    def __post_init__(self) -> None:
        if self.hidden is not None:
            if isinstance(self.hidden, bool) or not isinstance(self.hidden, (int, np.integer)) or self.hidden < 1:
                raise UserInputError(f"trace hidden must be a positive whole number, got {self.hidden!r}")
            object.__setattr__(self, "hidden", int(self.hidden))
        if self.dtype is not None and self.dtype not in DTYPE_BYTES:
            raise UserInputError(f"trace dtype {self.dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
        load = _as_counts(self.load, "load", ndim=2)
        num_layers, num_experts = load.shape
        if num_layers < 1 or num_experts < 1:
            raise UserInputError(f"trace load must have at least one layer and one expert, got shape {load.shape}")
        object.__setattr__(self, "load", load)
        if self.flow is not None:
            flow = _as_counts(self.flow, "flow", ndim=3)
            want = (num_layers - 1, num_experts, num_experts)
            if flow.shape != want:
                raise UserInputError(f"trace flow has shape {flow.shape}, expected {want} from load {load.shape}")
            object.__setattr__(self, "flow", flow)
        if self.layers is not None:
            object.__setattr__(self, "layers", layer_names(self.layers, num_layers, "trace"))

    @property
    def num_layers(self) -> int:
        return self.load.shape[0]

    @property
    def num_experts(self) -> int:
        return self.load.shape[1]


def normalized(trace: RoutingTrace) -> RoutingTrace:
    """The trace with load and flow each scaled by a power of two so that its largest count lies in
    [0.5, 1). Every metric is a ratio and a power-of-two scaling is exact, so metrics are unchanged
    bit for bit; the solvers then see the same numbers for a trace of 1e-300 or of 1e14 per count
    (HiGHS fails on coefficients far from 1, and tolerances are absolute in places)."""

    def scaled(arr):
        if arr is None or not arr.size or arr.max() <= 0:
            return arr
        return np.ldexp(arr, -np.frexp(arr.max())[1])

    return RoutingTrace(load=scaled(trace.load), flow=scaled(trace.flow), hidden=trace.hidden, dtype=trace.dtype,
                        layers=trace.layers)


def layer_names(names: object, num_layers: int, what: str) -> tuple[str, ...]:
    """`names` checked to be `num_layers` distinct non-empty strings; a one-line UserInputError if not."""
    if isinstance(names, np.ndarray):
        names = names.tolist()
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not all(
            isinstance(n, str) and n for n in names):
        raise UserInputError(f"{what} layers must be a list of layer names")
    if len(names) != num_layers or len(set(names)) != len(names):
        raise UserInputError(f"{what} layers must name each of its {num_layers} layers once, got {len(names)} names "
                             f"({len(set(names))} distinct)")
    return tuple(names)


def load_trace(path: str | os.PathLike) -> RoutingTrace:
    """Read a trace from .npz or .json; any defect becomes a one-line UserInputError."""
    path = os.fspath(path)
    if path.endswith(".npz"):
        arrays = _read_npz(path)
    elif path.endswith(".json"):
        obj = read_json(path, "trace")
        if not isinstance(obj, dict):
            raise UserInputError(f"trace {path} must be a JSON object with a 'load' field")
        arrays = {k: obj[k] for k in _FIELDS if obj.get(k) is not None}
    else:
        raise UserInputError(f"trace {path} must end in .npz or .json")
    if "load" not in arrays:
        raise UserInputError(f"trace {path} has no 'load' array")
    try:
        return RoutingTrace(load=arrays["load"], flow=arrays.get("flow"), hidden=_scalar(arrays.get("hidden")),
                            dtype=_scalar(arrays.get("dtype")), layers=arrays.get("layers"))
    except UserInputError as err:
        raise UserInputError(f"trace {path}: {err}") from None


def save_trace(trace: RoutingTrace, path: str | os.PathLike) -> None:
    """Write a trace as .npz or .json (by the name's ending), atomically."""
    path = os.fspath(path)
    if path.endswith(".npz"):
        arrays = {"load": trace.load}
        for name in ("flow", "hidden", "dtype", "layers"):
            if getattr(trace, name) is not None:
                arrays[name] = np.asarray(getattr(trace, name))
        atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
    elif path.endswith(".json"):
        flow = None if trace.flow is None else trace.flow.tolist()
        write_json(path, {"load": trace.load.tolist(), "flow": flow, "hidden": trace.hidden, "dtype": trace.dtype,
                          "layers": None if trace.layers is None else list(trace.layers)})
    else:
        raise UserInputError(f"trace file {path} must end in .npz or .json")


def _read_npz(path: str) -> dict[str, np.ndarray]:
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy array under a .npz name
            raise UserInputError(f"trace {path} is a single .npy array, not a .npz archive with 'load'")
        with data:
            return {k: data[k] for k in _FIELDS if k in data.files}
    except OSError as err:
        raise UserInputError(f"cannot read trace {path}: {err.strerror or err}") from None
    except (ValueError, zipfile.BadZipFile, EOFError) as err:
        raise UserInputError(f"trace {path} is not a valid .npz file ({_first_line(err)})") from None
    except MemoryError:
        raise UserInputError(f"trace {path} declares arrays too large to load") from None


_FIELDS = ("load", "flow", "hidden", "dtype", "layers")


def _scalar(value):
    """A 0-d array (from .npz) or a JSON value -> a Python scalar; other shapes pass through to be refused."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _as_counts(values: object, name: str, ndim: int) -> np.ndarray:
    """A read-only float64 copy of `values`, checked to be a finite, non-negative `ndim`-d array."""
    try:
        raw = np.asarray(values)
    except (TypeError, ValueError):  # ragged nested lists
        raise UserInputError(f"{name} must be a {ndim}-d array of numbers (rows of equal length)") from None
    if raw.dtype.kind not in "iuf":
        raise UserInputError(f"{name} must hold numbers, got {raw.dtype.name} values")
    arr = np.array(raw, dtype=np.float64)
    if arr.ndim != ndim:
        raise UserInputError(f"{name} must be a {ndim}-d array, got {arr.ndim}-d with shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise UserInputError(f"{name} has NaN or infinite counts")
    if np.any(arr < 0):
        raise UserInputError(f"{name} has negative counts (min {arr.min():g})")
    if arr.size and arr.max() > MAX_COUNT:
        raise UserInputError(f"{name} has counts up to {arr.max():g}; at most {MAX_COUNT:g} are taken "
                             "(scale the trace down: every metric is a ratio)")
    arr.setflags(write=False)
    return arr


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
