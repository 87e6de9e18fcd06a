"""Routing traces from real runs: per-layer expert load (L, E) and inter-layer flow (L-1, E, E).

The `moecompile::moe` op reports each layer's top-k expert ids to the observers registered in
`codegen.ops.routing_observers`; a `RoutingRecorder` turns them into the trace the placement solver
reads. Two ways in:

    moecompile trace --model mixtral --tokens 256 --out trace.npz        # CLI (tools/trace.py)
    torch.compile(model, backend="moe", options={"routing_trace": "trace.npz"})  # during normal runs
"""

from __future__ import annotations

import atexit
import threading

import numpy as np
import torch

from .codegen import ops
from .errors import UserInputError


class RoutingRecorder:
    """Accumulates load and flow from the op's routing decisions.

    Layers are numbered in the order they first run. Flow pairs layer l with layer l+1 when l+1 runs
    right after l on the same tokens (same T), as in one forward pass of a decoder stack.
    """

    def __init__(self) -> None:
        self.layers: dict[str, int] = {}
        self.load: list[np.ndarray] = []  # per layer (E,) float64
        self.flow: dict[int, np.ndarray] = {}  # l -> (E, E) float64
        self._previous: tuple[int, torch.Tensor] | None = None  # (layer, (T, E) counts)
        self.sizes: set = set()  # (hidden, dtype) of the layers seen
        self._lock = threading.Lock()

    def __call__(self, layer: str, topk_ids: torch.Tensor, num_experts: int, hidden: int | None = None,
                 dtype: torch.dtype | None = None) -> None:
        ids = topk_ids.detach().to("cpu", torch.int64)
        per_token = torch.zeros(ids.shape[0], num_experts, dtype=torch.float64)
        per_token.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float64))  # (T, E)
        with self._lock:
            if hidden is not None and dtype is not None:
                self.sizes.add((int(hidden), str(dtype).removeprefix("torch.")))
            index = self.layers.setdefault(layer, len(self.layers))
            if index == len(self.load):
                self.load.append(np.zeros(num_experts))
            self.load[index] += per_token.sum(0).numpy()
            prev = self._previous
            if prev is not None and prev[0] == index - 1 and prev[1].shape[0] == ids.shape[0]:
                pair = (prev[1].T @ per_token).numpy()  # (E, E): sum over tokens of K x K' routings
                self.flow[index - 1] = self.flow.get(index - 1, 0) + pair
            self._previous = (index, per_token)

    def trace(self):
        """The recorded `RoutingTrace`; raises UserInputError if nothing was recorded."""
        from .placement.trace import RoutingTrace

        with self._lock:
            if not self.load:
                raise UserInputError("no MoE layer ran through moecompile, so no routing was recorded")
            widths = {len(v) for v in self.load}
            if len(widths) != 1:
                raise UserInputError(f"layers have different expert counts {sorted(widths)}; "
                                     "a trace needs one E for all layers")
            load = np.stack(self.load)
            L, E = load.shape
            flow = None
            if L > 1 and all(l in self.flow for l in range(L - 1)):
                flow = np.stack([self.flow[l] for l in range(L - 1)])
            # the layers' H and dtype where they agree (they do in every model we know)
            hidden, dtype = next(iter(self.sizes)) if len(self.sizes) == 1 else (None, None)
            names = tuple(sorted(self.layers, key=self.layers.get))
            return RoutingTrace(load=load, flow=flow, hidden=hidden, dtype=dtype, layers=names)

    def __enter__(self) -> "RoutingRecorder":
        ops.routing_observers.append(self)
        return self

    def __exit__(self, *exc) -> None:
        ops.routing_observers.remove(self)


_file_recorders: dict[str, RoutingRecorder] = {}


def recorder_for_file(path: str) -> RoutingRecorder:
    """The recorder behind option `routing_trace=path`: starts observing now, writes at exit
    (or on `flush()`)."""
    if path not in _file_recorders:
        rec = RoutingRecorder()
        ops.routing_observers.append(rec)
        _file_recorders[path] = rec
        if len(_file_recorders) == 1:
            atexit.register(flush)
    return _file_recorders[path]


def flush() -> None:
    """Write every routing trace asked for with option `routing_trace` (also runs at exit)."""
    from .placement.trace import save_trace

    for path, rec in _file_recorders.items():
        if rec.load:
            save_trace(rec.trace(), path)
