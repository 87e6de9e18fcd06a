"""Undecorated experts loops (prepare's expert_loop) and rows of graphs Dynamo resumed after a break.

An experts module with stacked weights and its own loop over the experts some token picked (DBRX,
LongCat-Flash, user code) breaks Dynamo's graph; prepare swaps in a loop-free form only where that
form reproduces the module's forward. A graph traced in a frame below the model (after a graph
break) still names the layer it belongs to, and its row stands for every layer it serves.
CPU, tiny shapes, `inner="eager"`.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moecompile
from conftest import assert_close
from moecompile.traceable import expert_loop

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class LoopExperts(nn.Module):
    """User-style experts: stacked (E, 2I, H) / (E, H, I) weights, a Python loop over the experts hit."""

    def __init__(self, E=6, H=20, I=12, act="silu", extra=0.0):
        super().__init__()
        self.num_experts, self.hidden_dim, self.extra = E, H, extra
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * I, H) / H**0.5)
        self.down_proj = nn.Parameter(torch.randn(E, H, I) / I**0.5)
        self.act_fn = {"silu": F.silu, "gelu": F.gelu}[act]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        hit = torch.nonzero(F.one_hot(top_k_index, self.num_experts).sum(dim=(0, 1)))
        for e in hit.flatten().tolist():
            token, slot = torch.where(top_k_index == e)
            gate, up = F.linear(hidden_states[token], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(self.act_fn(gate) * up + self.extra, self.down_proj[e])
            out.index_add_(0, token, y * top_k_weights[token, slot, None])
        return out


class LoopBlock(nn.Module):
    def __init__(self, E=6, K=2, H=20, I=12, **kw):
        super().__init__()
        self.K = K
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = LoopExperts(E, H, I, **kw)

    def forward(self, x):
        B, S, H = x.shape
        flat = x.reshape(-1, H)
        probs = torch.softmax(self.gate(flat), dim=-1)
        w, ids = torch.topk(probs, self.K, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        return self.experts(flat, ids, w.to(x.dtype)).view(B, S, H)


class Stack(nn.Module):
    """Two layers (residual) of a block class, so one graph traced below the model serves both."""

    def __init__(self, block, layers=2, H=20, **kw):
        super().__init__()
        self.layers = nn.ModuleList(block(H=H, **kw) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


LAYERS = {"layers.0", "layers.1"}


def _compiled_rows(model, x):
    torch._dynamo.reset()
    moecompile.report.reset()
    got = torch.compile(model, backend="moe", options={"inner": "eager"})(x)
    return got, moecompile.last_report().regions


def _rows_of_eager_equal_run(block) -> list:
    """Report rows of a two-layer stack of `block`, compiled; its output must match eager."""
    torch.manual_seed(0)
    model = Stack(block)
    x = torch.randn(2, 5, 20)
    with torch.no_grad():
        want = model(x)
        got, rows = _compiled_rows(model, x)
    assert_close(got, want, torch.float32)
    return rows


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_prepared_experts_loop_is_one_optimized_region_fwd_and_bwd(dtype):
    dt = DTYPES[dtype]
    torch.manual_seed(0)
    model = Stack(LoopBlock).to(dt)
    x = torch.randn(2, 7, 20, dtype=dt, requires_grad=True)
    twin = copy.deepcopy(model)
    params = dict(model.named_parameters())
    moecompile.prepare(model)
    assert [p.name for p in moecompile.prepared(model)] == ["layers.0.experts", "layers.1.experts"]
    assert dict(model.named_parameters()) == params  # the same Parameter objects
    want = twin(x)
    with torch.no_grad():
        assert torch.equal(model(x), want)  # eager: the module's own loop
    got, rows = _compiled_rows(model, x)
    assert {r["name"] for r in rows} == LAYERS and all(r["status"] == "optimized" for r in rows), rows
    assert_close(got, want, dt, what="output")
    probe = torch.randn(want.shape, generator=torch.Generator().manual_seed(1)).to(dt)
    g_want = torch.autograd.grad((want.float() * probe).sum(), [x, *twin.parameters()])
    g_got = torch.autograd.grad((got.float() * probe).sum(), [x, *model.parameters()])
    for name, a, b in zip(["x", *params], g_got, g_want):
        assert_close(a, b, dt, what=f"grad {name}")


def test_experts_loop_without_prepare_is_reported_with_the_reason():
    rows = _rows_of_eager_equal_run(LoopBlock)
    # the graph breaks inside the loop; every layer still has rows (its router, its experts' slices)
    served = {n for r in rows for n in (r["serves"] or [r["name"]])}
    assert all(any(s == layer or s.startswith(layer + ".") for s in served) for layer in LAYERS), rows
    assert rows and all(r["status"] == "fallback" and r["reason"] for r in rows), rows
    assert any("prepare" in r["reason"] for r in rows), rows


def test_experts_loop_with_another_activation_uses_its_act_fn():
    torch.manual_seed(0)
    model = Stack(LoopBlock, act="gelu")
    moecompile.prepare(model)
    assert len(moecompile.prepared(model)) == 2
    x = torch.randn(1, 6, 20)
    with torch.no_grad():
        got, rows = _compiled_rows(model, x)
        assert_close(got, model(x), torch.float32)
    assert all(r["status"] == "optimized" for r in rows), rows


def test_experts_loop_no_form_reproduces_is_left_as_is():
    """The loop adds a constant after the activation, which no form models: prepare must not swap it."""
    torch.manual_seed(0)
    model = Stack(LoopBlock, extra=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        moecompile.prepare(model)
    assert moecompile.prepared(model) == []
    assert any("no loop-free form reproduces" in str(w.message) for w in caught), [str(w.message) for w in caught]


def test_loop_free_forward_handles_zero_compute_experts():
    """LongCat-Flash style: ids past the E weight experts pass the token through, times its weight."""

    class WithIdentity(LoopExperts):
        def __init__(self):
            super().__init__(E=4, H=8, I=6)
            self.zero_expert_num = 2

        def forward(self, hidden_states, top_k_index, top_k_weights):
            out = torch.zeros_like(hidden_states)
            for e in range(self.num_experts + self.zero_expert_num):
                token, slot = torch.where(top_k_index == e)
                if e >= self.num_experts:
                    y = hidden_states[token]
                else:
                    gate, up = F.linear(hidden_states[token], self.gate_up_proj[e]).chunk(2, dim=-1)
                    y = F.linear(self.act_fn(gate) * up, self.down_proj[e])
                out.index_add_(0, token, y * top_k_weights[token, slot, None])
            return out

    torch.manual_seed(0)
    module = WithIdentity()
    form, why = expert_loop.find_form(module)
    assert why is None and form.identity == 2 and form.experts == 4
    x, w = torch.randn(9, 8), torch.rand(9, 2)
    ids = torch.stack([torch.randperm(6)[:2] for _ in range(9)])
    ids[0] = torch.tensor([4, 5])  # a token sent only to zero-compute experts
    with torch.no_grad():
        assert_close(expert_loop.loop_free_forward(module, form, x, ids, w), module(x, ids, w), torch.float32)
    # the mutation the identity path guards against: treated as weight experts, the result differs
    plain = expert_loop.Form("gate_up", 4, 0, form.transpose_gate_up, form.transpose_down)
    with pytest.raises((AssertionError, IndexError, RuntimeError)):
        with torch.no_grad():
            assert_close(expert_loop.loop_free_forward(module, plain, x, ids, w), module(x, ids, w), torch.float32)


# --- rows of graphs resumed after a break -----------------------------------------------------------


class BrokenRouterBlock(nn.Module):
    """An MoE block whose router sends counts to Python (a graph break) before the experts run."""

    def __init__(self, E=4, K=2, H=20, I=10):
        super().__init__()
        self.K = K
        self.router = nn.Linear(H, E, bias=False)
        self.experts = nn.Module()
        self.experts.w_up = nn.Parameter(torch.randn(E, H, I) / H**0.5)
        self.experts.w_down = nn.Parameter(torch.randn(E, I, H) / I**0.5)

    def forward(self, x):
        B, S, H = x.shape
        flat = x.reshape(-1, H)
        w, ids = torch.topk(torch.softmax(self.router(flat), dim=-1), self.K, dim=-1)
        torch._dynamo.graph_break()
        h = F.gelu(torch.bmm(flat.repeat_interleave(self.K, 0).unsqueeze(1), self.experts.w_up[ids.reshape(-1)]))
        y = torch.bmm(h, self.experts.w_down[ids.reshape(-1)]).squeeze(1).view(-1, self.K, H)
        return (y * w.unsqueeze(-1)).sum(1).view(B, S, H)


def test_resumed_frame_rows_name_the_layer_and_serve_every_layer():
    rows = _rows_of_eager_equal_run(BrokenRouterBlock)
    experts_rows = [r for r in rows if "3D expert weights" in (r["reason"] or "")]
    assert experts_rows, rows
    for r in experts_rows:
        # named in the whole model (not "experts" relative to the resumed frame) ...
        assert r["name"] in LAYERS, r
        # ... and standing for both layers: the second layer runs the same compiled graph
        assert set(r["serves"]) == LAYERS, r
