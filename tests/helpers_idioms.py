"""MoE layers as popular code writes them by hand (not transformers): each a small module with the
same router (linear -> softmax -> top-k [-> renormalize]) and SwiGLU experts, dispatched differently.

    GatheredEinsum   each token indexes its experts' weights: W[ids] (T, K, 2I, H), einsum
    SortedGroupedMM  torchtitan: tokens sorted by expert, counts -> offsets, grouped_mm
    DenseMasked      every expert on every token, outputs weighted by a dense (T, E) gate
    CapacityDispatch GShard / Switch: one-hot dispatch (T, E, C) with a capacity, einsum dispatch and
                     combine; (token, expert) pairs beyond the capacity are dropped
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Base(nn.Module):
    def __init__(self, E=8, K=2, H=16, I=12, renormalize=True):
        super().__init__()
        self.E, self.K, self.renormalize = E, K, renormalize
        self.router = nn.Linear(H, E, bias=False)
        self.w_gate_up = nn.Parameter(torch.randn(E, 2 * I, H) / H**0.5)  # (E, 2I, H)
        self.w_down = nn.Parameter(torch.randn(E, H, I) / I**0.5)  # (E, H, I)

    def route(self, flat):
        probs = torch.softmax(self.router(flat), dim=-1, dtype=torch.float32)
        w, ids = torch.topk(probs, self.K, dim=-1)
        if self.renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
        return w.to(flat.dtype), ids


class GatheredEinsum(_Base):
    def forward(self, x):
        B, S, H = x.shape
        flat = x.reshape(-1, H)
        w, ids = self.route(flat)
        gate_up = torch.einsum("th,tkoh->tko", flat, self.w_gate_up[ids])  # (T, K, 2I)
        gate, up = gate_up.chunk(2, dim=-1)
        y = torch.einsum("tki,tkhi->tkh", F.silu(gate) * up, self.w_down[ids])  # (T, K, H)
        return torch.einsum("tkh,tk->th", y, w).view(B, S, H)


class SortedGroupedMM(_Base):
    """grouped_mm wants bf16 and 16-byte aligned rows, as torchtitan's sizes are."""

    def __init__(self, E=8, K=2, H=16, I=16, renormalize=True):
        super().__init__(E, K, H, I, renormalize)

    def forward(self, x):
        B, S, H = x.shape
        flat = x.reshape(-1, H)
        w, ids = self.route(flat)
        flat_ids = ids.view(-1)
        counts = torch.zeros(self.E, dtype=torch.int64).scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
        order = torch.argsort(ids.view(-1), stable=True)
        rows = flat[order // self.K]  # (T*K, H) grouped by expert
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        gate_up = F.grouped_mm(rows, self.w_gate_up.transpose(-2, -1), offs=offs)
        gate, up = gate_up.chunk(2, dim=-1)
        y = F.grouped_mm(F.silu(gate) * up, self.w_down.transpose(-2, -1), offs=offs)  # (T*K, H)
        y = y * w.view(-1)[order].unsqueeze(-1)
        out = torch.zeros_like(flat).index_add_(0, order // self.K, y)
        return out.view(B, S, H)


class DenseMasked(_Base):
    def forward(self, x):
        B, S, H = x.shape
        flat = x.reshape(-1, H)
        w, ids = self.route(flat)
        gates = torch.zeros(flat.shape[0], self.E, dtype=w.dtype).scatter(1, ids, w)  # (T, E)
        gate_up = torch.einsum("th,eoh->eto", flat, self.w_gate_up)  # every expert, every token
        gate, up = gate_up.chunk(2, dim=-1)
        y = torch.einsum("eti,ehi->eth", F.silu(gate) * up, self.w_down)  # (E, T, H)
        return torch.einsum("eth,te->th", y, gates).view(B, S, H)


class CapacityDispatch(_Base):
    """Switch (K = 1) / GShard (K = 2) dispatch with capacity C = ceil(factor * T * K / E): each
    expert takes its first C (token, k) pairs, first choices of all tokens before second choices."""

    def __init__(self, E=8, K=2, H=16, I=12, capacity_factor=1.25, renormalize=True):
        super().__init__(E, K, H, I, renormalize)
        self.capacity_factor = capacity_factor

    def forward(self, x):
        B, S, H = x.shape
        flat = x.reshape(-1, H)
        T = flat.shape[0]
        w, ids = self.route(flat)
        C = math.ceil(self.capacity_factor * T * self.K / self.E)
        mask = F.one_hot(ids.t().reshape(-1), self.E)  # (K*T, E), k-major: first choices first
        position = (torch.cumsum(mask, dim=0) - 1) * mask  # slot of each pair in its expert
        keep = mask * (position < C)
        slot = F.one_hot((position * keep).sum(-1), C) * keep.sum(-1, keepdim=True)  # (K*T, C)
        dispatch = (keep.unsqueeze(-1) * slot.unsqueeze(1)).view(self.K, T, self.E, C).sum(0)  # (T, E, C)
        combine = (keep.unsqueeze(-1) * slot.unsqueeze(1)).view(self.K, T, self.E, C).to(w.dtype)
        combine = (combine * w.t().reshape(self.K, T, 1, 1)).sum(0)  # (T, E, C)
        expert_in = torch.einsum("tec,th->ech", dispatch.to(flat.dtype), flat)  # (E, C, H)
        gate, up = torch.einsum("ech,eoh->eco", expert_in, self.w_gate_up).chunk(2, dim=-1)
        expert_out = torch.einsum("eci,ehi->ech", F.silu(gate) * up, self.w_down)
        return torch.einsum("tec,ech->th", combine, expert_out).view(B, S, H)


IDIOMS = {"gathered_einsum": GatheredEinsum, "sorted_grouped_mm": SortedGroupedMM,
          "dense_masked": DenseMasked, "capacity_dispatch": CapacityDispatch}
