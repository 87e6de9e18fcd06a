"""The op with a traced router (spec.router == "traced"): the model's routing code computes the top-k
weights and ids outside the op, which takes them as its first two inputs (`routing_weights`,
`routing_ids`). Checked here without detection: the program's form, and every kernel choice against
a dense eager formula on fresh random inputs, forward and backward (the routing weights get their
gradient, the ids none)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close
from moecompile.codegen import ops  # noqa: F401  (registers the op)
from moecompile.ir import MoEProgram, MoESpec, ProgramError, Route, build
from moecompile.passes.layer import LAYER_PASSES

E, K, H, I = 6, 2, 16, 12


def _spec(dtype="float32", **fields) -> MoESpec:
    return MoESpec(E, K, H, I, router="traced", dtype=dtype, **fields)


def _inputs(spec: MoESpec, T: int, seed: int, ids_dtype=torch.int64):
    """x, routing weights (fp32, positive), distinct expert ids per token, expert weights."""
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, spec.dtype)
    x = torch.randn(T, H, generator=gen).to(dtype)
    w = torch.rand(T, K, generator=gen) + 0.1
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).to(ids_dtype)
    experts = [(torch.randn(*shape, generator=gen) / shape[-1] ** 0.5).to(dtype)
               for shape in spec.weight_shapes().values()]
    return x, w, ids, experts


def _dense(x, w, ids, experts, spec: MoESpec):
    """sum_k w[t, k] * down(silu(gate(x)) * up(x)) of expert ids[t, k], one token at a time."""
    gate_up, down = experts
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros(H, dtype=torch.float32)
        for k in range(K):
            e = int(ids[t, k])
            h = x[t].float() @ gate_up[e].float().T
            a = F.silu(h[:I]) * h[I:]
            acc = acc + w[t, k].float() * (a @ down[e].float().T)
        rows.append(acc)
    return torch.stack(rows).to(x.dtype)


def test_program_of_a_traced_router():
    spec = _spec()
    program = build(spec)
    assert isinstance(program.stages[0], Route)
    assert spec.weight_names()[:2] == ("routing_weights", "routing_ids")
    assert program.spec() == spec
    assert MoEProgram.parse(program.text()) == program
    assert "Route(routing_weights, routing_ids; router=traced)" in program.text()
    fused = program
    for p in (cls() for cls in LAYER_PASSES):
        fused, _ = p(fused)
    fused.check()
    assert fused.stage("Gate") is None and fused.stage("Route") is not None
    with pytest.raises(ValueError, match="traced router leaves the routing fields"):
        _spec(scoring="sigmoid")
    with pytest.raises(ValueError, match="router="):
        MoESpec(E, K, H, I, router="learned")


@pytest.mark.parametrize("kernels", ["torch", "reference", "interpreter", "triton"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_and_backward_match_the_dense_formula(kernels, dtype):
    spec = _spec(dtype)
    program = build(spec)
    for p in (cls() for cls in LAYER_PASSES):
        program, _ = p(program)
    torch_dtype = getattr(torch, dtype)
    x, w, ids, experts = _inputs(spec, T=23, seed=7)
    leaves = [t.clone().requires_grad_() for t in (x, w, *experts)]
    y = torch.ops.moecompile.moe(leaves[0], [leaves[1], ids, *leaves[2:]], program.text(), kernels, "layer")
    ref_leaves = [t.clone().float().requires_grad_() for t in (x, w, *experts)]
    want = _dense(ref_leaves[0], ref_leaves[1], ids, ref_leaves[2:], spec)
    assert_close(y, want, torch_dtype, what=f"{kernels} forward")
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(torch_dtype)
    got = torch.autograd.grad(y, leaves, grad)
    ref = torch.autograd.grad(want, ref_leaves, grad.float())
    for name, g, r in zip(["x", "routing_weights", "gate_up_proj", "down_proj"], got, ref):
        assert_close(g, r, torch_dtype, "grad", what=f"{kernels} gradient of {name}")


def test_ids_of_any_integer_dtype_and_bad_routing_inputs():
    spec = _spec()
    text = build(spec).text()
    x, w, ids, experts = _inputs(spec, T=5, seed=1)
    want = torch.ops.moecompile.moe(x, [w, ids, *experts], text, "torch", "l")
    got = torch.ops.moecompile.moe(x, [w, ids.to(torch.int32), *experts], text, "torch", "l")
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match=r"routing_weights must be \(5, 2\) float"):
        torch.ops.moecompile.moe(x, [w[:4], ids, *experts], text, "torch", "l")
    with pytest.raises(ValueError, match=r"routing_ids must be \(5, 2\) integer"):
        torch.ops.moecompile.moe(x, [w, ids.float(), *experts], text, "torch", "l")


def test_program_check_refuses_routing_weights_left_unapplied():
    program = build(_spec())
    combine = program.stages[-1]
    broken = MoEProgram(program.dims, program.stages[:-1] + (combine.replace(ins=combine.ins[:2], weighted=False),))
    with pytest.raises(ProgramError, match="never read"):
        broken.check()


# --- detection: routers the fused gate does not model, kept as traced ---------------------------

import torch.nn as nn  # noqa: E402

import moecompile  # noqa: E402
from helpers_moe import capture  # noqa: E402
from moecompile import detect  # noqa: E402


class Experts(nn.Module):
    """transformers' form: experts(hidden (T, H), top_k_index (T, K), top_k_weights (T, K)), here
    over expert weights gathered per (token, k); `tamper` adds an op the spec does not model."""

    def __init__(self, tamper=False):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(E, 2 * I, H) / H ** 0.5)
        self.down_proj = nn.Parameter(torch.randn(E, H, I) / I ** 0.5)
        self.tamper = tamper

    def forward(self, hidden, top_k_index, top_k_weights):
        T = hidden.shape[0]
        flat_ids = top_k_index.reshape(-1)
        rows = hidden.repeat_interleave(K, dim=0).unsqueeze(1)  # (T*K, 1, H)
        gate, up = torch.bmm(rows, self.gate_up_proj[flat_ids].transpose(1, 2)).squeeze(1).chunk(2, dim=-1)
        y = torch.bmm((F.silu(gate) * up).unsqueeze(1), self.down_proj[flat_ids].transpose(1, 2)).squeeze(1)
        if self.tamper:
            y = y.clamp(-0.5, 0.5)
        return (y * top_k_weights.reshape(-1, 1)).view(T, K, H).sum(dim=1)


class OddRouterMoE(nn.Module):
    """A router no fused gate models: softplus scores with tanh soft-capping of the logits, or a
    router that reads its own normalized input ("other_input"); the experts as transformers writes
    them, with a shared expert."""

    def __init__(self, router="softcap", tamper=False):
        super().__init__()
        self.router_kind = router
        self.router = nn.Linear(H, E, bias=False)
        self.router_norm = nn.LayerNorm(H)
        self.experts = Experts(tamper)
        self.shared_gate = nn.Linear(H, I, bias=False)
        self.shared_up = nn.Linear(H, I, bias=False)
        self.shared_down = nn.Linear(I, H, bias=False)

    def shared(self, x):
        return self.shared_down(F.silu(self.shared_gate(x)) * self.shared_up(x))

    def forward(self, x):  # (B, S, H)
        flat = x.view(-1, H)
        if self.router_kind == "softcap":
            scores = F.softplus(torch.tanh(self.router(flat) / 3.0) * 3.0)
        elif self.router_kind == "no_grad_choice":  # PhiMoE-style: the choice made under no_grad, last
            scores = torch.sigmoid(self.router(flat))
            w = torch.topk(scores, K, dim=-1).values
            with torch.no_grad():
                ids = torch.topk(scores, K, dim=-1).indices
            return self.experts(flat, ids, w).view(x.shape) + self.shared(x)
        else:
            scores = torch.softmax(self.router(self.router_norm(flat)), dim=-1)
        w, ids = torch.topk(scores, K, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        return self.experts(flat, ids, w).view(x.shape) + self.shared(x)


@pytest.mark.parametrize("router", ["softcap", "other_input"])
def test_an_unmodeled_router_is_kept_as_traced(router):
    torch.manual_seed(0)
    model = OddRouterMoE(router)
    gm, _ = capture(model, torch.randn(2, 8, H))
    (cand,) = detect.find_candidates(gm)
    assert cand.reason is None, cand.reason
    spec = cand.options[0][0]
    assert spec.router == "traced" and spec.shared_intermediate == I
    w, ids = cand.routing
    assert [n.name for n in cand.options[0][1][:2]] == [w.name, ids.name]
    assert not any(n in cand.router_nodes for n in cand.nodes)  # the router stays out of the op


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("router", ["softcap", "other_input", "no_grad_choice"])
def test_traced_router_layer_matches_eager_forward_and_backward(router, dtype):
    torch.manual_seed(1)
    model = OddRouterMoE(router).to(dtype)
    twin = OddRouterMoE(router).to(dtype)
    twin.load_state_dict(model.state_dict())
    moecompile.report.reset()
    torch._dynamo.reset()
    compiled = torch.compile(twin, backend="moe", options={"inner": "aot_eager"})
    x = (torch.randn(3, 7, H) * 2).to(dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = compiled(x1)
    want = model(x2)
    report = moecompile.last_report()
    (row,) = report.regions
    assert row["status"] == "optimized", row["reason"]
    assert row["spec"]["router"] == row["router"] == "traced"
    assert "traced router" in report.table()
    assert_close(got, want, dtype, what="forward")
    gen = torch.Generator().manual_seed(5)
    grad = torch.randn(got.shape, generator=gen).to(dtype)
    got.backward(grad)
    want.backward(grad)
    assert_close(x1.grad, x2.grad, dtype, "grad", what="dx")
    for (name, p), q in zip(twin.named_parameters(), model.parameters()):
        assert (p.grad is None) == (q.grad is None), name  # the unused norm of the softcap router
        if q.grad is not None:
            assert_close(p.grad, q.grad, dtype, "grad", what=name)  # the router's weight among them


def test_an_unmodeled_op_inside_the_experts_still_falls_back():
    torch.manual_seed(0)
    model = OddRouterMoE("softcap", tamper=True)
    moecompile.report.reset()
    torch._dynamo.reset()
    x = torch.randn(2, 8, H)
    with torch.no_grad():
        got = torch.compile(model, backend="moe", options={"inner": "eager"})(x)
        assert torch.equal(got, model(x))
    (row,) = moecompile.last_report().regions
    assert row["status"] == "fallback" and "clamp" in row["reason"], row


class HashRoutedMoE(nn.Module):
    """DeepSeek-V4's hash layers: no top-k at all, each token's experts looked up by its token id."""

    def __init__(self, vocab=11):
        super().__init__()
        self.router = nn.Linear(H, E, bias=False)
        self.register_buffer("table", torch.stack([torch.randperm(E)[:K] for _ in range(vocab)]))
        self.experts = Experts()

    def forward(self, x, token_ids):
        flat = x.view(-1, H)
        ids = self.table[token_ids.reshape(-1)]
        w = torch.sigmoid(self.router(flat)).gather(1, ids)
        return self.experts(flat, ids, w / w.sum(-1, keepdim=True)).view(x.shape)


def test_experts_routed_without_a_topk_are_optimized():
    torch.manual_seed(2)
    model, twin = HashRoutedMoE(), HashRoutedMoE()
    twin.load_state_dict(model.state_dict())
    x, token_ids = torch.randn(2, 9, H), torch.randint(0, 11, (2, 9))
    gm, _ = capture(model, x, token_ids)
    (cand,) = [c for c in detect.find_candidates(gm) if c.x is not None]
    assert cand.reason is None and cand.options[0][0].router == "traced", cand.reason
    moecompile.report.reset()
    torch._dynamo.reset()
    compiled = torch.compile(twin, backend="moe", options={"inner": "aot_eager"})
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = compiled(x1, token_ids), model(x2, token_ids)
    (row,) = moecompile.last_report().regions
    assert row["status"] == "optimized", row["reason"]
    assert_close(got, want, torch.float32, what="forward")
    got.sum().backward()
    want.sum().backward()
    assert_close(x1.grad, x2.grad, torch.float32, "grad", what="dx")
    for (name, p), q in zip(twin.named_parameters(), model.parameters()):
        assert_close(p.grad, q.grad, torch.float32, "grad", what=name)


def test_a_known_router_stays_fused():
    """The traced path is a fallback: a router the Gate kernel models is fused, as before."""
    from helpers_moe import TinyMoE

    torch.manual_seed(0)
    model = TinyMoE()
    moecompile.report.reset()
    torch._dynamo.reset()
    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        assert_close(torch.compile(model, backend="moe", options={"inner": "eager"})(x), model(x), torch.float32)
    (row,) = moecompile.last_report().regions
    assert row["status"] == "optimized" and row["router"] == "fused" and row["spec"]["router"] == "fused"


@pytest.mark.parametrize("router", ["softcap", "no_grad_choice"])
def test_traced_router_layer_on_triton_kernels(router):
    """kernels="triton" (the interpreter on CPU): the experts of a traced-router layer run on the
    kernels forward and backward, and the model matches eager, the router's gradient included."""
    torch.manual_seed(3)
    model, twin = OddRouterMoE(router), OddRouterMoE(router)
    twin.load_state_dict(model.state_dict())
    moecompile.report.reset()
    torch._dynamo.reset()
    compiled = torch.compile(twin, backend="moe", options={"inner": "aot_eager", "kernels": "triton"})
    x = torch.randn(2, 9, H)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = compiled(x1), model(x2)
    (row,) = moecompile.last_report().regions
    assert row["status"] == "optimized" and row["router"] == "traced", row["reason"]
    assert row["kernels"].startswith("triton: Route(torch)") and "gemm_gate_up" in row["kernels"], row
    assert row["backward"] == "triton", row
    assert row["saved"] == "inputs", row  # the expert ids are an input already: nothing more kept
    assert_close(got, want, torch.float32, what="forward")
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(4))
    got.backward(grad)
    want.backward(grad)
    assert_close(x1.grad, x2.grad, torch.float32, "grad", what="dx")
    for (name, p), q in zip(twin.named_parameters(), model.parameters()):
        if q.grad is not None:
            assert_close(p.grad, q.grad, torch.float32, "grad", what=name)
