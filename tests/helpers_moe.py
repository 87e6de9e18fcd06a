"""Small hand-written modules for detection tests: MoE variants a user might write, and near-misses."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F


class TinyMoE(nn.Module):
    """A user-written MoE: top-k over logits then softmax over the K picks, plain GELU experts stored
    transposed (E, H, I) / (E, I, H), gathered per (token, k) and multiplied with bmm.

    `combine` picks how expert outputs are merged: "sum" is the real MoE; "max" is a near-miss the
    compiler must refuse (same ops up to the last one). `forward(x, scale)` with a scale (B, S, 1)
    multiplies the expert inputs by another activation: not a function of x alone, also refused.
    """

    def __init__(self, E=6, K=2, H=16, I=12, combine="sum"):
        super().__init__()
        self.K, self.combine = K, combine
        self.router = nn.Linear(H, E, bias=False)
        self.w_up = nn.Parameter(torch.randn(E, H, I) / H**0.5)
        self.w_down = nn.Parameter(torch.randn(E, I, H) / I**0.5)

    def forward(self, x, scale=None):  # x (B, S, H)
        B, S, H = x.shape
        flat = x.view(-1, H)
        logits = self.router(flat)
        top_logits, ids = torch.topk(logits, self.K, dim=-1)
        weights = torch.softmax(top_logits, dim=-1)
        rep = flat.repeat_interleave(self.K, dim=0)  # (T*K, H)
        if scale is not None:
            rep = rep * scale.reshape(-1, 1).repeat_interleave(self.K, dim=0)
        h = F.gelu(torch.bmm(rep.unsqueeze(1), self.w_up[ids.reshape(-1)]).squeeze(1))
        y = torch.bmm(h.unsqueeze(1), self.w_down[ids.reshape(-1)]).squeeze(1)  # (T*K, H)
        y = (y * weights.reshape(-1, 1)).view(-1, self.K, H)
        out = y.sum(dim=1) if self.combine == "sum" else y.max(dim=1).values
        return out.view(B, S, H)


class TopkNotRouter(nn.Module):
    """top-k over activations, no router: not an MoE layer at all."""

    def __init__(self, H=16):
        super().__init__()
        self.proj = nn.Linear(H, H)

    def forward(self, x):
        vals, _ = torch.topk(self.proj(x).relu(), 3, dim=-1)
        return vals.sum(-1)


def capture(model, *args, dynamic=False) -> tuple[fx.GraphModule, list]:
    """The first FX graph Dynamo captures for model(*args), and its example inputs."""
    got = []

    def backend(gm, example_inputs):
        got.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend, dynamic=dynamic)(*args)
    return got[0]
