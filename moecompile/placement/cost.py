"""A model of one MoE layer's time under a placement: the busiest GPU's expert compute plus the
all-to-all time of the busiest GPU's traffic, from a routing trace and a hardware profile.

Per layer l, with the trace's counts scaled so the layer carries `routings_per_gpu * G` routings
(tokens per GPU per step x top-k; replicas split their expert's tokens evenly):

    compute[l] = max_g load[l, g] * flops_per_routing / flops         flops_per_routing = 6 H I
                                                                      (gate, up and down GEMMs)
    traffic[l] (G, G) routings from GPU g to GPU g2 into layer l:
        l = 0, or no flow: tokens start spread evenly over the GPUs   g -> g2: load[0, g2] / G
        l >= 1: a token goes from its experts' GPUs in layer l-1 straight to its experts' GPUs
                in layer l (flow[l-1] / K: K sources per routing); a piece stays on GPU g when the
                expert it goes to has a replica on g, else it splits over that expert's replicas
                (the convention of the hop fractions in metrics.py)
    bytes = routings x hidden x dtype_bytes
    comm[l]    = max_g  max(sent_g, received_g) over NVLink (same node, g2 != g) / nvlink_bw
                      + max(sent_g, received_g) over the network (other nodes) / network_bw
    time[l]    = compute[l] + comm[l], or max(compute[l], comm[l]) with overlap

Links are full duplex (a GPU sends and receives at once, so the larger direction counts), and
NVLink and network transfers of one GPU are added: the all-to-all of one layer finishes when the
busiest GPU's last byte arrives. With the H100 preset and DeepSeek-V3's sizes, one point of
cross-node hop fraction costs as much as ~2.3 points of imbalance, one point of intra-node cross-GPU
fraction ~0.25 (tested).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from ..errors import UserInputError
from .metrics import gpu_loads, shares
from .trace import DTYPE_BYTES, RoutingTrace


@dataclass(frozen=True)
class Hardware:
    """Sizes and speeds the time model needs; every field positive. Bandwidths are per GPU, one
    direction. The defaults are the `h100` preset with DeepSeek-V3's layer."""

    hidden: int = 7168  # H: bytes per routing moved = H x dtype_bytes
    intermediate: int = 2048  # I of one expert: 6 H I FLOPs per routing
    dtype_bytes: int = 2  # bf16 activations on the wire
    routings_per_gpu: float = 8192 * 8  # tokens per GPU per step x top-k
    flops: float = 700e12  # achieved bf16 dense matmul FLOP/s (H100 SXM: 989 peak)
    nvlink_bw: float = 450e9  # bytes/s (NVLink 4: 900 GB/s both directions)
    network_bw: float = 50e9  # bytes/s (one 400 Gb/s NIC per GPU)
    overlap: bool = False  # all-to-all hidden behind compute: a layer takes the larger of the two

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "overlap":
                if not isinstance(value, bool):
                    raise UserInputError(f"hardware overlap must be true or false, got {value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise UserInputError(f"hardware {f.name} must be a positive number, got {value!r}")
            if f.type == "int" and value != int(value):
                raise UserInputError(f"hardware {f.name} must be a whole number, got {value!r}")

    @property
    def flops_per_routing(self) -> float:
        return 6.0 * self.hidden * self.intermediate

    @property
    def bytes_per_routing(self) -> float:
        return float(self.hidden * self.dtype_bytes)


PRESETS = {
    # 8 H100 SXM per node: NVLink 4 within the node, one 400 Gb/s InfiniBand NIC per GPU
    "h100": Hardware(),
    # 8 A100 SXM per node: NVLink 3 (300 GB/s a direction), 200 Gb/s per GPU, ~250 TFLOP/s achieved
    "a100": Hardware(flops=250e12, nvlink_bw=300e9, network_bw=25e9),
}


def hardware(preset: str = "h100", profile: str | None = None, trace: RoutingTrace | None = None,
             **overrides) -> Hardware:
    """A preset, then the hidden size and dtype the trace recorded, then the fields of a JSON profile
    file, then explicit overrides (None = unset): what the user writes wins over what was recorded."""
    if preset not in PRESETS:
        raise UserInputError(f"unknown hardware preset {preset!r}; presets: {', '.join(PRESETS)}")
    values = asdict(PRESETS[preset])
    if trace is not None:
        if trace.hidden is not None:
            values["hidden"] = trace.hidden
        if trace.dtype is not None:
            values["dtype_bytes"] = DTYPE_BYTES[trace.dtype]
    if profile is not None:
        values.update(_read_profile(profile))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Hardware(**values)


def _read_profile(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as err:
        raise UserInputError(f"cannot read hardware profile {path}: {err.strerror or err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserInputError(f"hardware profile {path} is not JSON: {err}") from None
    if not isinstance(data, dict):
        raise UserInputError(f"hardware profile {path} must be a JSON object of fields")
    known = {f.name for f in fields(Hardware)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserInputError(f"hardware profile {path} has unknown field(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")
    return data


def prices(hw: Hardware) -> tuple[float, float]:
    """(hop_cost, node_cost) of the solvers' linear objective that prices hops as this model does on
    average: a layer's time is about C * imbalance + A * (cross_gpu - cross_node) + B * cross_node,
    with C the mean GPU's compute, A (B) the time for all its routings to cross NVLink (the network);
    divided by C, (imbalance - 1) + A / C * cross_gpu + (B - A) / C * cross_node plus a constant.
    The busiest GPU's traffic is left to the exact model, which picks the plan at the end."""
    compute = hw.flops_per_routing / hw.flops
    nvlink = hw.bytes_per_routing / hw.nvlink_bw
    network = hw.bytes_per_routing / hw.network_bw
    return nvlink / compute, max(network - nvlink, 0.0) / compute


def layer_times(phy2log: np.ndarray, load: np.ndarray, flow: np.ndarray | None, num_gpus: int,
                num_nodes: int, hw: Hardware) -> dict:
    """(L,) seconds per layer: {"compute", "comm", "time"} float64 arrays (see the module docstring)."""
    num_layers = load.shape[0]
    totals = load.sum(axis=1)  # (L,)
    scale = np.divide(hw.routings_per_gpu * num_gpus, totals, out=np.zeros(num_layers), where=totals > 0)
    loads = gpu_loads(phy2log, load, num_gpus) * scale[:, None]  # (L, G) routings
    compute = loads.max(axis=1) * hw.flops_per_routing / hw.flops
    traffic = _traffic(phy2log, load, flow, num_gpus) * scale[:, None, None]  # (L, G, G) routings
    per_node = num_gpus // num_nodes
    node = np.arange(num_gpus) // per_node
    same_node = node[:, None] == node[None, :]
    off_diag = ~np.eye(num_gpus, dtype=bool)
    seconds = 0.0
    for mask, bw in ((same_node & off_diag, hw.nvlink_bw), (~same_node, hw.network_bw)):
        moved = traffic * mask  # (L, G, G)
        busiest = np.maximum(moved.sum(axis=2), moved.sum(axis=1))  # (L, G): larger of sent, received
        seconds = seconds + busiest * hw.bytes_per_routing / bw
    comm = np.asarray(seconds).max(axis=1) if num_gpus > 0 else np.zeros(num_layers)
    time = np.maximum(compute, comm) if hw.overlap else compute + comm
    return {"compute": compute, "comm": comm, "time": time}


def _traffic(phy2log: np.ndarray, load: np.ndarray, flow: np.ndarray | None, num_gpus: int) -> np.ndarray:
    """(L, G, G) routings sent from GPU g to GPU g2 for layer l, in the trace's counts."""
    num_layers, num_experts = load.shape
    share, present = shares(phy2log, num_experts, num_gpus)  # (L, E, G) each
    dest = np.einsum("le,leg->lg", load, share)  # (L, G) routings each GPU serves
    out = np.broadcast_to(dest[:, None, :] / num_gpus, (num_layers, num_gpus, num_gpus)).copy()
    if flow is None or num_layers < 2:
        return out
    pair_total = flow.sum(axis=(1, 2))  # (L-1,) = K * load[l].sum(): K sources per routing
    per_routing = np.divide(load[1:].sum(axis=1), pair_total, out=np.zeros(num_layers - 1), where=pair_total > 0)
    # source mass: from GPU g toward expert e2 of layer l (l >= 1)
    src = np.einsum("leg,lef->lgf", share[:-1], flow) * per_routing[:, None, None]  # (L-1, G, E)
    here = present[1:].transpose(0, 2, 1)  # (L-1, G, E): e2 has a replica on g
    remote = np.einsum("lgf,lfh->lgh", src * (1.0 - here), share[1:])  # (L-1, G, G), zero diagonal
    local = (src * here).sum(axis=2)  # (L-1, G)
    idx = np.arange(num_gpus)
    remote[:, idx, idx] += local
    has_flow = pair_total > 0
    out[1:][has_flow] = remote[has_flow]
    return out


def predict(phy2log: np.ndarray, load: np.ndarray, flow: np.ndarray | None, num_gpus: int, num_nodes: int,
            hw: Hardware) -> dict:
    """Plan-level summary in milliseconds: mean layer time and its compute and all-to-all parts."""
    t = layer_times(phy2log, load, flow, num_gpus, num_nodes, hw)
    return {"layer_ms": float(t["time"].mean() * 1e3), "compute_ms": float(t["compute"].mean() * 1e3),
            "comm_ms": float(t["comm"].mean() * 1e3), "overlap": hw.overlap}


def bounds(load: np.ndarray, flow: np.ndarray | None, num_gpus: int, num_nodes: int, slots_per_gpu: int,
           hw: Hardware) -> dict:
    """Lower bounds that hold for every plan, cheap to compute:

        cross_gpu   a GPU holds at most slots_per_gpu experts of layer l+1, so of the flow out of
                    expert e at most its slots_per_gpu largest entries stay on e's GPU(s)
                    (a replica's share of them, summed over the replicas): cross >= 1 - sum_e
                    top_spg(flow[l, e]) / total
        cross_node  the same with slots_per_gpu x GPUs per node
        layer_ms    the mean GPU's compute (imbalance 1) plus, per layer, the mean GPU's traffic at
                    those hop bounds (the first layer's tokens start spread evenly, so (G/N - 1) / G
                    of its routings cross NVLink and (N - 1) / N the network, whatever the plan);
                    with overlap, the larger of the two
    """
    per_node = num_gpus // num_nodes
    out = {"cross_gpu": None, "cross_node": None}
    nvlink, network = hw.bytes_per_routing / hw.nvlink_bw, hw.bytes_per_routing / hw.network_bw
    compute = hw.routings_per_gpu * hw.flops_per_routing / hw.flops
    comm = [hw.routings_per_gpu * (nvlink * (per_node - 1) / num_gpus + network * (num_nodes - 1) / num_nodes)]
    if flow is not None and flow.size:
        total = flow.sum(axis=(1, 2))  # (L-1,)
        kept = {}
        for name, size in (("cross_gpu", slots_per_gpu), ("cross_node", slots_per_gpu * per_node)):
            size = min(size, flow.shape[2])
            top = -np.partition(-flow, size - 1, axis=2)[:, :, :size]  # (L-1, E, size)
            kept[name] = top.sum(axis=(1, 2))  # (L-1,) at most this much stays
            out[name] = 1.0 - float(kept[name].sum()) / float(total.sum()) if total.sum() > 0 else 0.0
        safe = np.where(total > 0, total, 1.0)
        x_gpu = np.where(total > 0, 1.0 - kept["cross_gpu"] / safe, 0.0)
        x_node = np.where(total > 0, 1.0 - kept["cross_node"] / safe, 0.0)
        comm += list(hw.routings_per_gpu * (nvlink * (x_gpu - x_node) + network * x_node))
    else:
        comm += [0.0] * (load.shape[0] - 1)
    comm = np.asarray(comm)
    time = np.maximum(compute, comm) if hw.overlap else compute + comm
    out["layer_ms"] = float(time.mean() * 1e3)
    return out
