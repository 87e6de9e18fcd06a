"""What a layer keeps from forward to backward (option save_for_backward, codegen/train.py): GEMM 1's
kernel writes the pre-activations its reference computes; moecompile::moe_saving returns the ids and
pre-activations its forward used, and its backward from them equals autograd of the reference loop
in every mode; the backend picks the op and reports "saved"; the kept bytes grow inputs < routing <
activations. On CPU the kernels run under the Triton interpreter.

Tolerances: kernel vs reference as test_triton_grouped_gemm's KERNEL_TOL; whole backward vs autograd
of the reference as conftest's "grad" tolerance (bf16: the reference rounds each GEMM output to bf16,
the kernels accumulate in fp32; with "activations" the backward reads pre-activations rounded to bf16).
"""

from __future__ import annotations

import dataclasses
import os
from unittest import mock

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest import assert_close, assert_grads_close  # noqa: E402
from helpers_moe import GATE_UP_CASES, SPECS  # noqa: E402
from moecompile import config, models, report  # noqa: E402
from moecompile.codegen import moe_torch, plan, reference, train  # noqa: E402
from moecompile.codegen.triton import grouped_gemm as gg  # noqa: E402
from moecompile.codegen.triton import launch  # noqa: E402
from moecompile.errors import UserInputError  # noqa: E402
from moecompile.ir import build  # noqa: E402
from moecompile.passes.layer import LAYER_PASSES  # noqa: E402
from moecompile.tools.bench import saved_bytes  # noqa: E402
from test_triton_backward import _inputs  # noqa: E402
from tiers import cover  # noqa: E402
from test_triton_grouped_gemm import (CFG, DEVICE, KERNEL_TOL, TILE_M, _align, _close, _gate_up_args,  # noqa: E402
                                      _live, _routing, _spec, _weights)

MODES = pytest.mark.parametrize("save", train.SAVES)


@pytest.mark.parametrize("act,gated,layout,transposed,bias", GATE_UP_CASES,
                         ids=["-".join(map(str, c)) for c in GATE_UP_CASES])
def test_gate_up_kernel_keeps_the_pre_activations_of_its_reference(act, gated, layout, transposed, bias):
    """pre [hg | hu] in concat order whatever the weight layout, on every live row; the output a
    is what it is without pre. H = 33, I = 20: tails in every 16-wide block."""
    T, E, K, H, I = 13, 4, 2, 33, 20
    spec = _spec(E, K, H, I, torch.float32, activation=act, gated=gated, layout=layout, transposed=transposed,
                 expert_bias=bias)
    w = _weights(spec, torch.float32)
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    _, ids = _routing(T, E, K)
    rows, tiles, _ = _align(ids, E)
    w1, b1, kw = _gate_up_args(w, spec)
    width = 2 * I if gated else I
    pre = torch.full((rows.shape[0], width), float("nan"), device=DEVICE)
    want_pre = torch.zeros_like(pre)
    a = gg.gemm_gate_up(x, rows, tiles, w1, b1, **kw, pre=pre, config=CFG)
    want_a = gg.gemm_gate_up_reference(x, rows, tiles, w1, b1, **kw, pre=want_pre)
    live = rows >= 0
    _close(pre[live], want_pre[live], KERNEL_TOL[torch.float32], "pre")
    _close(a[live], want_a[live], KERNEL_TOL[torch.float32], "a")
    owned = _live(tiles)  # rows of the tiles an expert owns; the others are never written
    assert torch.equal(a[owned], gg.gemm_gate_up(x, rows, tiles, w1, b1, **kw, config=CFG)[owned])
    # the gate half is the gate projection alone: a swapped half would fail here
    expert = tiles.long().repeat_interleave(TILE_M)[live]
    hg = torch.einsum("lh,lih->li", x[rows[live].long() // K], _gate_matrix(w, spec)[expert])
    _close(pre[live][:, :I], hg + _gate_bias(w, spec, expert), KERNEL_TOL[torch.float32], "hg")


def _gate_matrix(w, spec):
    """(E, I, H): the gate projection (the only one when not gated)."""
    if spec.layout == "separate":
        m = w["gate_proj"]
    else:
        m = w["gate_up_proj"] if spec.gated else w["up_proj"]
    m = m.transpose(1, 2) if spec.transposed else m  # (E, out, H)
    if spec.gated and spec.layout == "interleaved":
        return m[:, ::2]
    return m[:, :spec.intermediate]


def _gate_bias(w, spec, expert):
    if not spec.expert_bias:
        return 0.0
    name = "gate_proj_bias" if spec.layout == "separate" else ("gate_up_proj_bias" if spec.gated else "up_proj_bias")
    b = w[name]
    b = b[:, ::2] if spec.gated and spec.layout == "interleaved" else b[:, :spec.intermediate]
    return b[expert]


def test_gate_up_rejects_a_wrong_pre_buffer():
    spec = _spec(4, 2, 24, 20, torch.float32)
    w = _weights(spec, torch.float32)
    _, ids = _routing(5, 4, 2)
    rows, tiles, _ = _align(ids, 4)
    w1, b1, kw = _gate_up_args(w, spec)
    x = torch.randn(5, 24, device=DEVICE)
    with pytest.raises(ValueError, match=r"pre must be \(\d+, 40\)"):
        gg.gemm_gate_up(x, rows, tiles, w1, b1, **kw, pre=torch.empty(rows.shape[0], 20, device=DEVICE))
    with pytest.raises(ValueError, match="pre must be"):
        gg.gemm_gate_up(x, rows, tiles, w1, b1, **kw, pre=torch.empty(rows.shape[0], 40, dtype=torch.bfloat16))


# -- the op: forward with what it keeps, backward from it ----------------------------------------


def _fused(spec):
    program = build(spec)
    for cls in LAYER_PASSES:
        program, _ = cls()(program)
    return program


def _in(spec, dtype):
    return dataclasses.replace(spec, dtype=str(dtype).removeprefix("torch."))


def _op_grads(program, x, ws, grad, save):
    leaves = [t.detach().clone().requires_grad_() for t in [x] + ws]
    if save == "inputs":
        y = torch.ops.moecompile.moe(leaves[0], leaves[1:], program.text(), "triton", "l")
    else:
        y, ids, pre = torch.ops.moecompile.moe_saving(leaves[0], leaves[1:], program.text(), "triton", "l", save)
        assert not ids.requires_grad and not pre.requires_grad
    return y, list(torch.autograd.grad(y, leaves, grad))


def _reference_grads(spec, x, ws, grad, ids=None):
    """(y, grads) of the eager loop; with ids (T, K), routed to those experts (their weights still
    the router's, differentiable) instead of its own top-k."""
    leaves = [t.detach().clone().requires_grad_() for t in [x] + ws]
    route = moe_torch.route
    forced = (lambda x_, w_, s_: route(x_, w_, s_, ids.long())) if ids is not None else route
    with mock.patch.object(moe_torch, "route", forced):
        y = moe_torch.moe_forward_reference(leaves[0], leaves[1:], spec)
    grads = torch.autograd.grad(y, leaves, grad, allow_unused=True)
    return y, [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, leaves)]


TOKENS = {"mixtral": 37, "gpt_oss": 37, "deepseek_v3": 37, "separate_bias": 1, "plain_mlp_relu": 37, "odd_tails": 1}


# every spec, dtype and mode, every (dtype, mode) pair; the whole product in the slow tier
@pytest.mark.parametrize("name,dtype,save", cover(name=list(TOKENS), dtype=[torch.float32, torch.bfloat16],
                                                  save=list(train.SAVES), pairs=[("dtype", "save")]))
def test_backward_from_what_the_forward_kept_matches_autograd_of_the_reference(name, dtype, save):
    T = TOKENS[name]
    spec = _in(SPECS[name], dtype)
    if dtype == torch.bfloat16 and spec.activation == "clamped_swiglu":
        spec = dataclasses.replace(spec, act_limit=7.0)  # see test_triton_backward: the clamp's jump
    program = _fused(spec)
    assert train.saved_mode(program, "triton", torch.device(DEVICE), save) == save
    x, ws, grad = _inputs(spec, T, dtype, f"saved{name}{T}")
    y, got = _op_grads(program, x, ws, grad, save)
    # in bf16 two experts' scores may tie to the last bit, and the gate kernel and torch's top-k
    # break the tie apart: y follows the gate's choice, the backward the gate's where it kept the
    # routing and torch's top-k where it recomputes it ("inputs")
    gate_ids = launch.run_saving(program, x, ws, "routing")[1]
    assert_close(y, _reference_grads(spec, x, ws, grad, gate_ids)[0], dtype, what=f"{name} y")
    _, want = _reference_grads(spec, x, ws, grad, None if save == "inputs" else gate_ids)
    assert_grads_close(got, want, ["x"] + list(spec.weight_names()), dtype, what=f"{name} {save}")


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss", "deepseek_v3", "plain_mlp_relu"])
def test_kept_values_are_those_of_the_forward(name):
    """ids are the gate's choice (the reference's top-k); pre holds GEMM 1's pre-activations on the
    live rows of the tiles the backward's align rebuilds from those ids, as the interpreter computes
    them; the interpreter keeps the same (the forward's fallback)."""
    spec = _in(SPECS[name], torch.float32)
    program = _fused(spec)
    x, ws, _ = _inputs(spec, 29, torch.float32, f"kept{name}")
    y, ids, pre = launch.run_saving(program, x, ws, "activations")
    _, want_ids = moe_torch.route(x, moe_torch.named_weights(ws, spec), spec)
    assert ids.dtype == torch.int32 and torch.equal(ids.long(), want_ids)
    want_y, want_ids2, want_pre = reference.run(program, x, ws, tile_m=launch.tile_m(spec), keep=("ids", "pre"))
    rows, _, _ = reference.align_rows(ids, reference.histogram(ids, spec.num_experts), spec.num_experts,
                                      launch.tile_m(spec))
    live = rows >= 0
    assert pre.shape == want_pre.shape == train.saved_shapes(spec, 29, "activations")[1]
    assert torch.equal(want_ids2.to(torch.int32), ids)
    assert_close(pre[live], want_pre[live], torch.float32, what="pre")
    assert_close(y, want_y, torch.float32, what="y")


def test_the_backward_uses_the_kept_values():
    """Other ids or other pre-activations give other gradients: they are read, not recomputed."""
    spec = _in(SPECS["mixtral"], torch.float32)
    program = _fused(spec)
    x, ws, grad = _inputs(spec, 23, torch.float32, "uses")
    _, ids, pre = launch.run_saving(program, x, ws, "activations")
    base = train.backward(grad, x, ws, program, "triton", [ids, pre])
    assert_grads_close(base, train.backward(grad, x, ws, program, "triton", []), ["x"] + list(spec.weight_names()),
                       torch.float32, what="kept vs recomputed")
    other_ids = (ids + 1) % spec.num_experts
    moved = train.backward(grad, x, ws, program, "triton", [other_ids, x.new_empty(0)])
    assert not torch.allclose(moved[0], base[0])
    scaled = train.backward(grad, x, ws, program, "triton", [ids, pre * 1.5])
    assert not torch.allclose(scaled[0], base[0])


def test_forward_falls_back_to_the_interpreter_with_the_same_kept_values(monkeypatch):
    """A launcher declining the layer: the forward still returns the ids and pre-activations the
    backward needs, from the interpreter, with a warning."""
    spec = _in(SPECS["mixtral"], torch.float32)
    program = _fused(spec)
    x, ws, grad = _inputs(spec, 17, torch.float32, "declined")

    def declined(*args, **kwargs):
        raise ValueError("gemm_gate_up: declined for the test")

    monkeypatch.setattr(launch, "run_saving", declined)
    with pytest.warns(UserWarning, match="declined for the test"):
        y, ids, pre = plan.forward_saving(program, x, ws, "triton", "activations")
    monkeypatch.undo()
    want = launch.run_saving(program, x, ws, "activations")
    assert torch.equal(ids, want[1])
    assert_close(y, want[0], torch.float32, what="y")
    got = train.backward(grad, x, ws, program, "triton", [ids, pre])
    _, ref = _reference_grads(spec, x, ws, grad)
    assert_grads_close(got, ref, ["x"] + list(spec.weight_names()), torch.float32, what="fallback")


def test_saving_op_fake_and_autograd_registration():
    spec = _in(SPECS["shared_gated"], torch.float32)
    program = _fused(spec)
    x, ws, _ = _inputs(spec, 6, torch.float32, "opcheck")
    for save in ("routing", "activations"):
        args = (x, ws, program.text(), "triton", "l", save)
        torch.library.opcheck(torch.ops.moecompile.moe_saving.default, args,
                              test_utils=("test_schema", "test_faketensor"))
        grad_args = (x.clone().requires_grad_(), [w.clone().requires_grad_() for w in ws]) + args[2:]
        torch.library.opcheck(torch.ops.moecompile.moe_saving.default, grad_args,
                              test_utils=("test_faketensor", "test_autograd_registration"))


def test_saving_op_under_dynamic_shapes():
    """One graph for every T: the fake's ids (T, K) and pre (P(T), 2I) follow T symbolically."""
    spec = _in(SPECS["mixtral"], torch.float32)
    program = _fused(spec)
    _, ws, _ = _inputs(spec, 1, torch.float32, "dyn")
    leaves = [w.clone().requires_grad_() for w in ws]

    def f(x):
        y, ids, pre = torch.ops.moecompile.moe_saving(x, leaves, program.text(), "triton", "l", "activations")
        return y * 2

    compiled = torch.compile(f, backend="aot_eager", dynamic=True)
    for T in (3, 17):
        x, _, grad = _inputs(spec, T, torch.float32, f"dyn{T}")
        x.requires_grad_()
        got = torch.autograd.grad(compiled(x), [x, *leaves], grad)
        _, want = _reference_grads(spec, x, ws, grad * 2)
        assert_grads_close(got, want, ["x"] + list(spec.weight_names()), torch.float32, what=f"T={T}")


# -- through the backend --------------------------------------------------------------------------


def _train_step(model, ids):
    loss = model(ids).logits.float().square().mean()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@MODES
def test_backend_keeps_what_the_option_says_and_the_gradients_match_eager(save):
    model, (ids,) = models.build("mixtral", layers=1)
    want_loss, want = _train_step(model, ids)
    compiled = torch.compile(model, backend="moe",
                             options={"inner": "aot_eager", "kernels": "triton", "save_for_backward": save})
    loss, got = _train_step(compiled, ids)
    rows = report.current().optimized()
    assert rows and all(r.saved == save and r.backward == "triton" for r in rows), [r.saved for r in rows]
    assert report.current().to_dict()["regions"][0]["saved"] == save
    assert_close(loss, want_loss, torch.float32, what="loss")
    assert_grads_close(got, want, [str(i) for i in range(len(want))], torch.float32, what=save)


def test_kept_bytes_grow_with_the_mode_and_inference_keeps_nothing():
    """saved_tensors_hooks count what autograd keeps beside the parameters: "routing" adds 4*T*K
    bytes per layer to "inputs", "activations" also a (P, 2I) tensor."""
    model, (ids,) = models.build("mixtral", layers=1)
    params = list(model.parameters())
    kept = {}
    for save in train.SAVES:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="moe",
                                 options={"inner": "aot_eager", "kernels": "triton", "save_for_backward": save})
        compiled(ids)  # compiled (and verified) outside the count
        kept[save] = saved_bytes(lambda i: compiled(i).logits, (ids,), exclude=params)
    spec = report.current().optimized()[0]
    T, K = ids.numel(), spec.top_k
    assert kept["routing"] - kept["inputs"] == 4 * T * K
    P = reference.padded_rows(T * K, spec.num_experts, 16)
    assert kept["activations"] - kept["routing"] >= P * 2 * spec.intermediate * 4
    torch._dynamo.reset()
    report.reset()
    compiled = torch.compile(model, backend="moe", options={"inner": "aot_eager", "kernels": "triton"})
    with torch.no_grad():
        compiled(ids)
    assert all(r.saved == "inputs" for r in report.current().optimized())


def test_layers_that_recompute_keep_inputs():
    model, (ids,) = models.build("mixtral", layers=1)
    compiled = torch.compile(model, backend="moe", options={"inner": "aot_eager", "kernels": "torch",
                                                            "save_for_backward": "activations"})
    _train_step(compiled, ids)
    rows = report.current().optimized()
    assert rows and all(r.saved == "inputs" and r.backward == "recompute" for r in rows)


def test_save_option_is_validated_and_read_from_the_environment():
    assert config.SAVE_CHOICES == train.SAVES
    with pytest.raises(UserInputError, match="save_for_backward='all' is not one of"):
        config.Config(save_for_backward="all")
    assert config.from_env({"MOECOMPILE_SAVE_FOR_BACKWARD": "inputs"}) == {"save_for_backward": "inputs"}
    assert config.Config().save_for_backward == "routing"
    with pytest.raises(ValueError, match="save_for_backward must be one of"):
        train.saved_mode(_fused(SPECS["mixtral"]), "triton", torch.device("cpu"), "all")


@pytest.mark.parametrize("kernels", ["triton", "torch"])
def test_compiles_and_trains_under_saved_tensor_hooks(kernels):
    """Activation offloading (save_on_cpu) around forward and backward: verification and both
    backwards run their torch.func.vjp with the hooks set aside, and the layer is optimized."""
    model, (ids,) = models.build("mixtral", layers=1)
    want_loss, want = _train_step(model, ids)
    compiled = torch.compile(model, backend="moe", options={"inner": "aot_eager", "kernels": kernels})
    with torch.autograd.graph.save_on_cpu():
        loss, got = _train_step(compiled, ids)
    rows = report.current().optimized()
    assert rows, [(r.status, r.reason) for r in report.current().regions]
    assert_close(loss, want_loss, torch.float32, what="loss")
    assert_grads_close(got, want, [str(i) for i in range(len(want))], torch.float32, what=kernels)
