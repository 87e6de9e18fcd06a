"""`--plot`: per-GPU load per layer and the GPU-to-GPU traffic matrix of a plan (matplotlib)."""

from __future__ import annotations

import os

import numpy as np

from ..files import atomic_write
from .metrics import gpu_loads, shares
from .plan import Plan
from .trace import RoutingTrace


def plot_plan(plan: Plan, trace: RoutingTrace, path: str | os.PathLike) -> None:
    """Draw the two panels and write them atomically to `path` (format from its ending)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    loads = gpu_loads(plan.phy2log, trace.load, plan.num_gpus)  # (L, G)
    mean = loads.mean(axis=1, keepdims=True)
    relative = np.divide(loads, mean, out=np.ones_like(loads), where=mean > 0)
    fig, (ax_load, ax_traffic) = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    im = ax_load.imshow(relative, aspect="auto", cmap="viridis", interpolation="nearest")
    ax_load.set(title="GPU load / layer mean", xlabel="GPU", ylabel="MoE layer")
    fig.colorbar(im, ax=ax_load)
    if trace.flow is None:
        ax_traffic.text(0.5, 0.5, "the trace has no flow", ha="center", va="center")
        ax_traffic.set_axis_off()
    else:
        traffic = gpu_traffic(plan.phy2log, trace.flow, plan.num_gpus)  # (G, G)
        im = ax_traffic.imshow(np.log10(1.0 + traffic), cmap="magma", interpolation="nearest")
        ax_traffic.set(title="routings GPU -> GPU between layers (log10 1+x)", xlabel="to GPU", ylabel="from GPU")
        fig.colorbar(im, ax=ax_traffic)
    fmt = os.fspath(path).rsplit(".", 1)[-1].lower()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=100))
    finally:
        plt.close(fig)


def gpu_traffic(phy2log: np.ndarray, flow: np.ndarray, num_gpus: int) -> np.ndarray:
    """(G, G) routings from GPU g to GPU h between consecutive layers, summed over layers.

    A piece of flow (e, e2) on GPU g stays on g when e2 has a replica there; otherwise it is sent
    to e2's replicas evenly (the same split as the metrics use)."""
    share, present = shares(phy2log, flow.shape[1], num_gpus)  # (L, E, G) each
    out = np.zeros((num_gpus, num_gpus))
    for layer in range(flow.shape[0]):
        to_expert = share[layer].T @ flow[layer]  # (G, E): from GPU g to expert e2
        out += np.diag((to_expert * present[layer + 1].T).sum(axis=1))
        out += (to_expert * (1.0 - present[layer + 1].T)) @ share[layer + 1]
    return out
