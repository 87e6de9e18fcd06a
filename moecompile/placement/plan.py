"""Placement plans: for every MoE layer, which logical expert each physical slot holds.

Vocabulary (DeepSeek EPLB's): G GPUs on N nodes, `slots_per_gpu` slots per GPU, S = G * slots_per_gpu
physical slots. Slot s lives on GPU s // slots_per_gpu; GPU g on node g // (G / N).

    phy2log  (L, S) int64       logical expert held by each slot
    logcnt   (L, E) int64       replicas of each expert (>= 1)
    log2phy  (L, E, X) int64    slots of each expert, padded with -1 to X = max replicas

Plan JSON (written atomically by `save_plan`; `log2phy` and `logcnt` are redundant and checked on load):

    {"num_gpus": G, "num_nodes": N, "num_experts": E, "slots_per_gpu": s, "num_layers": L,
     "phy2log": [[...S ids...], ...L rows], "log2phy": [...], "logcnt": [...],
     "metrics": {...see metrics.evaluate...}, "solver": {"name": ..., "seconds": ..., "gap": ...},
     "layers": ["model.layers.0.mlp", ...] | null}    the layers' names, where the trace had them
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import UserInputError
from ..files import read_json, write_json
from .trace import layer_names


@dataclass(frozen=True)
class Plan:
    """A checked placement; `phy2log` is a read-only (L, S) int64 copy."""

    num_gpus: int
    num_nodes: int
    num_experts: int
    slots_per_gpu: int
    phy2log: np.ndarray  # (L, S) int64
    metrics: dict = field(default_factory=dict, compare=False)
    solver: dict = field(default_factory=dict, compare=False)
    layers: tuple[str, ...] | None = None  # the layers' names, from the trace, where it had them

    def __post_init__(self) -> None:
        check_topology(self.num_gpus, self.num_nodes)
        if self.num_experts < 1 or self.slots_per_gpu < 1:
            raise UserInputError(f"plan needs num_experts >= 1 and slots_per_gpu >= 1, "
                                 f"got {self.num_experts} and {self.slots_per_gpu}")
        want = self.num_gpus * self.slots_per_gpu
        if want > MAX_SLOTS or self.num_experts > want:
            raise UserInputError(f"plan has {self.num_gpus} GPUs x {self.slots_per_gpu} slots for "
                                 f"{self.num_experts} experts; need experts <= slots <= {MAX_SLOTS}")
        phy2log = _as_ids(self.phy2log)
        if phy2log.ndim != 2 or phy2log.shape[0] < 1 or phy2log.shape[1] != want:
            raise UserInputError(f"plan phy2log has shape {phy2log.shape}, expected (L, {want}) "
                                 f"for {self.num_gpus} GPUs x {self.slots_per_gpu} slots")
        if phy2log.min() < 0 or phy2log.max() >= self.num_experts:
            raise UserInputError(f"plan phy2log holds expert ids outside [0, {self.num_experts})")
        missing = np.flatnonzero(logcnt_of(phy2log, self.num_experts).min(axis=0) == 0)
        if missing.size:
            layer = int(np.flatnonzero(logcnt_of(phy2log, self.num_experts)[:, missing[0]] == 0)[0])
            raise UserInputError(f"plan leaves expert {int(missing[0])} without a slot in layer {layer}")
        phy2log.setflags(write=False)
        object.__setattr__(self, "phy2log", phy2log)
        if self.layers is not None:
            object.__setattr__(self, "layers", layer_names(self.layers, phy2log.shape[0], "plan"))

    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def logcnt(self) -> np.ndarray:  # (L, E) int64
        return logcnt_of(self.phy2log, self.num_experts)

    @property
    def log2phy(self) -> np.ndarray:  # (L, E, X) int64, -1 padded
        return log2phy_of(self.phy2log, self.num_experts)

    def to_json(self) -> dict:
        return {
            "num_gpus": self.num_gpus, "num_nodes": self.num_nodes, "num_experts": self.num_experts,
            "slots_per_gpu": self.slots_per_gpu, "num_layers": self.num_layers,
            "phy2log": self.phy2log.tolist(), "log2phy": self.log2phy.tolist(), "logcnt": self.logcnt.tolist(),
            "metrics": self.metrics, "solver": self.solver,
            "layers": None if self.layers is None else list(self.layers),
        }


# Far beyond any deployment (DeepSeek-V3 serves 256 experts on 320 slots over 64 GPUs); bounds that
# keep a mistyped size from running for hours or allocating terabytes.
MAX_GPUS = 65536
MAX_SLOTS = 1 << 20


def check_topology(num_gpus: int, num_nodes: int) -> None:
    """G >= 1 GPUs spread evenly over N >= 1 nodes."""
    if not (_is_int(num_gpus) and _is_int(num_nodes)) or num_gpus < 1 or num_nodes < 1:
        raise UserInputError(f"need whole numbers num_gpus >= 1 and num_nodes >= 1, got {num_gpus} and {num_nodes}")
    if num_gpus > MAX_GPUS:
        raise UserInputError(f"{num_gpus} GPUs: at most {MAX_GPUS} are supported")
    if num_gpus % num_nodes:
        raise UserInputError(f"{num_gpus} GPUs cannot be spread evenly over {num_nodes} nodes")


def logcnt_of(phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """(L, S) slot -> expert  ->  (L, E) int64 replica counts."""
    num_layers = phy2log.shape[0]
    flat = phy2log + num_experts * np.arange(num_layers)[:, None]
    return np.bincount(flat.ravel(), minlength=num_layers * num_experts).reshape(num_layers, num_experts)


def log2phy_of(phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """(L, S) slot -> expert  ->  (L, E, X) int64 slots of each expert in increasing order, -1 padded."""
    num_layers, num_slots = phy2log.shape
    logcnt = logcnt_of(phy2log, num_experts)
    out = np.full((num_layers, num_experts, int(logcnt.max())), -1, dtype=np.int64)
    for layer in range(num_layers):
        order = np.argsort(phy2log[layer], kind="stable")  # slots grouped by expert, increasing
        experts = phy2log[layer, order]
        starts = np.concatenate([[0], np.cumsum(logcnt[layer])[:-1]])
        rank = np.arange(num_slots) - starts[experts]
        out[layer, experts, rank] = order
    return out


def presence(phy2log: np.ndarray, num_experts: int, num_gpus: int) -> np.ndarray:
    """(L, S) slot -> expert  ->  (L, E, G) float64: replicas of expert e on GPU g."""
    num_layers, num_slots = phy2log.shape
    gpu = np.arange(num_slots) // (num_slots // num_gpus)  # (S,)
    flat = (np.arange(num_layers)[:, None] * num_experts + phy2log) * num_gpus + gpu[None, :]
    counts = np.bincount(flat.ravel(), minlength=num_layers * num_experts * num_gpus)
    return counts.reshape(num_layers, num_experts, num_gpus).astype(np.float64)


def save_plan(plan: Plan, path: str | os.PathLike) -> None:
    """Write a plan as JSON, atomically."""
    write_json(path, plan.to_json())


def load_plan(path: str | os.PathLike) -> Plan:
    """Read and check a plan JSON; any defect becomes a one-line UserInputError."""
    path = os.fspath(path)
    obj = read_json(path, "plan")
    try:
        return plan_from_json(obj)
    except UserInputError as err:
        raise UserInputError(f"plan {path}: {err}") from None


def plan_from_json(obj: object) -> Plan:
    if not isinstance(obj, dict):
        raise UserInputError("plan must be a JSON object")
    keys = ("num_gpus", "num_nodes", "num_experts", "slots_per_gpu", "phy2log")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise UserInputError(f"plan lacks field(s) {', '.join(missing)}")
    for k in keys[:-1]:
        if not _is_int(obj[k]):
            raise UserInputError(f"plan field {k} must be a whole number, got {obj[k]!r}")
    for k in ("metrics", "solver"):
        if obj.get(k) is not None and not isinstance(obj[k], dict):
            raise UserInputError(f"plan field {k} must be a JSON object, got {type(obj[k]).__name__}")
    plan = Plan(num_gpus=obj["num_gpus"], num_nodes=obj["num_nodes"], num_experts=obj["num_experts"],
                slots_per_gpu=obj["slots_per_gpu"], phy2log=obj["phy2log"],
                metrics=dict(obj.get("metrics") or {}), solver=dict(obj.get("solver") or {}),
                layers=obj.get("layers"))
    if "num_layers" in obj and obj["num_layers"] != plan.num_layers:
        raise UserInputError(f"plan says num_layers {obj['num_layers']} but phy2log has {plan.num_layers} rows")
    for name in ("logcnt", "log2phy"):
        if name in obj and not _same(obj[name], getattr(plan, name)):
            raise UserInputError(f"plan {name} does not match its phy2log")
    return plan


def _as_ids(values: object) -> np.ndarray:
    try:
        raw = np.asarray(values)
    except (TypeError, ValueError):
        raise UserInputError("plan phy2log must be a list of equal-length lists of expert ids") from None
    if raw.size and (raw.dtype.kind not in "iuf" or not np.all(np.isfinite(raw)) or np.any(raw != np.round(raw))):
        raise UserInputError("plan phy2log must hold whole-number expert ids")
    if raw.size and np.abs(raw).max() > MAX_SLOTS:  # ids beyond int64 would wrap on conversion
        raise UserInputError(f"plan phy2log holds expert ids beyond {MAX_SLOTS}")
    return np.array(raw, dtype=np.int64)


def _same(values: object, expected: np.ndarray) -> bool:
    try:
        got = np.asarray(values)
    except (TypeError, ValueError):
        return False
    return got.shape == expected.shape and got.dtype.kind in "iuf" and bool(np.all(got == expected))


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)
