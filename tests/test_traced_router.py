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


def test_program_check_needs_the_routing_weights_applied_once():
    program = build(_spec())
    combine = program.stages[-1]
    broken = MoEProgram(program.dims, program.stages[:-1] + (combine.replace(ins=combine.ins[:2], weighted=False),))
    with pytest.raises(ProgramError, match="never read"):
        broken.check()
