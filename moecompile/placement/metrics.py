"""Plan metrics, computed the same way for every solver (and by `moecompile place --evaluate`).

Tokens of an expert with c replicas are split evenly: each replica serves load / c.

    imbalance[l]        max GPU load / mean GPU load in layer l (1.0 for a layer with no tokens)
    cross_gpu_fraction  share of the flow weight w(e, e2) between layers l and l+1 that leaves its GPU:
                        w is split evenly over e's replicas; the piece on GPU g stays local when e2 has
                        a replica on g
    cross_node_fraction the same with "a replica on a GPU of g's node"
    objective           what the solvers minimize and compare on (lower is better):
                        (imbalance_mean - 1) + cross_gpu_fraction + NODE_WEIGHT * cross_node_fraction

The hop fractions are None for a trace without flow and 0.0 for a flow that sums to zero.
"""

from __future__ import annotations

import numpy as np

from ..errors import UserInputError
from .plan import Plan, presence
from .trace import RoutingTrace, normalized

# A hop that leaves the node also counts as a GPU hop, so with weight 1 it costs twice a hop over
# NVLink; inter-node links are slower still, but the weight stays modest so that GPU-level locality,
# which every hop benefits from, is not traded away for node-level locality.
NODE_WEIGHT = 1.0


def evaluate(plan: Plan, trace: RoutingTrace) -> dict:
    """Score `plan` on `trace`; the two must agree on L and E."""
    if (plan.num_layers, plan.num_experts) != trace.load.shape:
        raise UserInputError(f"plan is for {plan.num_layers} layers x {plan.num_experts} experts "
                             f"but the trace has {trace.load.shape[0]} x {trace.load.shape[1]}")
    trace = normalized(trace)  # the numbers the solvers score, exactly
    return score(plan.phy2log, trace.load, trace.flow, plan.num_gpus, plan.num_nodes)


def score(phy2log: np.ndarray, load: np.ndarray, flow: np.ndarray | None, num_gpus: int, num_nodes: int) -> dict:
    """Metrics of a (L, S) phy2log on (L, E) load and (L-1, E, E) flow."""
    imbalance = layer_imbalance(phy2log, load, num_gpus)  # (L,)
    out = {"imbalance": [round(float(x), 6) for x in imbalance],
           "imbalance_mean": float(imbalance.mean()), "imbalance_max": float(imbalance.max()),
           "cross_gpu_fraction": None, "cross_node_fraction": None}
    if flow is not None:
        local_gpu, local_node = local_flow(phy2log, flow, num_gpus, num_nodes)  # (L-1,) each
        total = float(flow.sum())
        out["cross_gpu_fraction"] = 1.0 - float(local_gpu.sum()) / total if total > 0 else 0.0
        out["cross_node_fraction"] = 1.0 - float(local_node.sum()) / total if total > 0 else 0.0
    out["objective"] = objective(out)
    return out


def objective(metrics: dict) -> float:
    """The scalar every solver minimizes; see the module docstring."""
    hops = (metrics["cross_gpu_fraction"] or 0.0) + NODE_WEIGHT * (metrics["cross_node_fraction"] or 0.0)
    return float(metrics["imbalance_mean"] - 1.0 + hops)


def gpu_loads(phy2log: np.ndarray, load: np.ndarray, num_gpus: int) -> np.ndarray:
    """(L, S) phy2log, (L, E) load  ->  (L, G) float64 tokens per GPU (even split over replicas)."""
    num_layers, num_slots = phy2log.shape
    num_experts = load.shape[1]
    rows = np.arange(num_layers)[:, None]
    logcnt = np.zeros((num_layers, num_experts))
    np.add.at(logcnt, (rows, phy2log), 1.0)
    per_slot = load[rows, phy2log] / logcnt[rows, phy2log]  # (L, S)
    return per_slot.reshape(num_layers, num_gpus, num_slots // num_gpus).sum(axis=2)


def layer_imbalance(phy2log: np.ndarray, load: np.ndarray, num_gpus: int) -> np.ndarray:
    """(L,) max GPU load / mean GPU load; 1.0 where a layer has no tokens."""
    loads = gpu_loads(phy2log, load, num_gpus)  # (L, G)
    mean = loads.mean(axis=1)
    return np.where(mean > 0, loads.max(axis=1) / np.where(mean > 0, mean, 1.0), 1.0)


def shares(phy2log: np.ndarray, num_experts: int, num_gpus: int) -> tuple[np.ndarray, np.ndarray]:
    """(L, S) phy2log -> share (L, E, G): fraction of e's tokens served on g; present (L, E, G) in {0, 1}."""
    count = presence(phy2log, num_experts, num_gpus)  # (L, E, G)
    return count / count.sum(axis=2, keepdims=True), (count > 0).astype(np.float64)


def to_nodes(per_gpu: np.ndarray, num_nodes: int) -> np.ndarray:
    """(..., G) -> (..., N) by summing the GPUs of each node."""
    *lead, num_gpus = per_gpu.shape
    return per_gpu.reshape(*lead, num_nodes, num_gpus // num_nodes).sum(axis=-1)


def local_flow(phy2log: np.ndarray, flow: np.ndarray, num_gpus: int, num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """(L-1,) flow weight that stays on its GPU, and (L-1,) that stays on its node, per layer pair."""
    share, present = shares(phy2log, flow.shape[1], num_gpus)  # (L, E, G) each
    share_node = to_nodes(share, num_nodes)  # (L, E, N)
    present_node = np.minimum(to_nodes(present, num_nodes), 1.0)  # (L, E, N)
    # local[l] = sum_{e, e2, g} flow[l, e, e2] * share[l, e, g] * present[l+1, e2, g]
    local_gpu = (share[:-1] * (flow @ present[1:])).sum(axis=(1, 2))
    local_node = (share_node[:-1] * (flow @ present_node[1:])).sum(axis=(1, 2))
    return local_gpu, local_node
