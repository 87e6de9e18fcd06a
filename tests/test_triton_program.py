"""Programs run on the Triton kernels (codegen/triton/launch.py), under TRITON_INTERPRET=1 on CPU.

Every spec variant, after the layer passes and in unfused forms, against the eager per-expert loop;
what Triton cannot run falls back to the torch path with the reason; the same token gives the same
bits in different batches; demo models compiled with kernels="triton" match eager, forward and
backward. Tolerances: conftest's table (fp32 tight, bf16 2%).
"""

from __future__ import annotations

import zlib

import pytest
import torch

from conftest import assert_close, assert_grads_close
from helpers_moe import SPECS
from tiers import cover
from moecompile import config, models, report
from moecompile.codegen import moe_torch, plan
from moecompile.ir import MoESpec, build
from moecompile.passes.layer import LAYER_PASSES, FuseGate

pytestmark = pytest.mark.skipif(plan.triton_unavailable(build(SPECS["mixtral"]), torch.device(
    "cuda" if torch.cuda.is_available() else "cpu")) is not None, reason="Triton cannot run here")

CPU = torch.device("cpu")


def _fused(spec: MoESpec, passes=LAYER_PASSES):
    program = build(spec)
    for cls in passes:
        program, _ = cls()(program)
    return program.check()


def _inputs(spec: MoESpec, T: int, dtype, seed: str):
    gen = torch.Generator().manual_seed(zlib.crc32(seed.encode()))
    x = torch.randn(T, spec.hidden, generator=gen).to(dtype)
    ws = [(torch.randn(s, generator=gen) / s[-1] ** 0.5).to(dtype) for s in spec.weight_shapes().values()]
    return x, ws


def _spec_in(name: str, dtype) -> MoESpec:
    import dataclasses
    return dataclasses.replace(SPECS[name], dtype=str(dtype).removeprefix("torch."))


# every spec, every T (1 and 4: the decode kernels, T*K <= max(E, 16)) with both dtypes
@pytest.mark.parametrize("name,T,dtype", cover(name=list(SPECS), T=[0, 1, 4, 37], dtype=[torch.float32, torch.bfloat16],
                                               pairs=[("T", "dtype")]))
def test_fused_program_on_triton_matches_eager(name, T, dtype):
    spec = _spec_in(name, dtype)
    program = _fused(spec)
    x, ws = _inputs(spec, T, dtype, f"{name}{T}")
    assert plan.describe(program, "triton", CPU).startswith("triton: gate, ")
    got = plan.forward(program, x, ws, "triton")
    assert got.shape == x.shape and got.dtype == dtype
    assert_close(got, moe_torch.moe_forward_reference(x, ws, spec), dtype, what=name)


@pytest.mark.parametrize("passes", [(), (FuseGate,)], ids=["canonical", "gate_only"])
@pytest.mark.parametrize("name", ["deepseek_v3", "gpt_oss", "separate_bias"])
def test_unfused_programs_mix_kernels_and_torch_stages(name, passes):
    spec = SPECS[name]
    program = _fused(spec, passes)
    x, ws = _inputs(spec, 19, torch.float32, name)
    kernels = plan.describe(program, "triton", CPU)
    assert "Gather(torch)" in kernels and "Activation(torch)" in kernels and "align" in kernels
    assert_close(plan.forward(program, x, ws, "triton"), moe_torch.moe_forward_reference(x, ws, spec),
                 torch.float32, what=f"{name} {kernels}")


@pytest.mark.parametrize("T, decodes", [(1, True), (8, True), (9, False), (40, False)])
def test_decode_kernels_take_a_handful_of_tokens(T, decodes, monkeypatch):
    from moecompile.codegen.triton import decode, grouped_gemm
    calls = {"decode": 0, "tiled": 0}
    for module, name, kind in ((decode, "decode_gate_up", "decode"), (grouped_gemm, "gemm_gate_up", "tiled")):
        real = getattr(module, name)

        def counted(*a, _real=real, _kind=kind, **k):
            calls[_kind] += 1
            return _real(*a, **k)
        monkeypatch.setattr(module, name, counted)
    spec = SPECS["mixtral"]  # E = 8, K = 2: decode up to T*K = 16
    program = _fused(spec)
    x, ws = _inputs(spec, T, torch.float32, f"decode{T}")
    assert_close(plan.forward(program, x, ws, "triton"), moe_torch.moe_forward_reference(x, ws, spec), torch.float32)
    assert calls == ({"decode": 1, "tiled": 0} if decodes else {"decode": 0, "tiled": 1})


@pytest.mark.parametrize("E, gate", [(256, "gate"), (260, "Gate(torch)")])
def test_many_experts(E, gate):
    spec = MoESpec(E, 8, 16, 16, scoring="sigmoid", renormalize=True)
    program = _fused(spec)
    assert plan.describe(program, "triton", CPU).split(", ")[0] == f"triton: {gate}"
    x, ws = _inputs(spec, 40, torch.float32, f"E{E}")
    assert_close(plan.forward(program, x, ws, "triton"), moe_torch.moe_forward_reference(x, ws, spec),
                 torch.float32, what=f"E={E}")


def test_capacity_routes_in_torch_and_the_experts_on_triton():
    spec = MoESpec(8, 2, 16, 8, capacity_factor=1.0)
    program = _fused(spec)
    assert plan.describe(program, "triton", CPU) == \
        "triton: Gate(torch), align, gemm_gate_up(gather, silu), gemm_down(topk_weight), combine; " \
        "decode (T <= 16, T*K <= max(E, 16)): decode_gate_up, decode_down"
    x, ws = _inputs(spec, 33, torch.float32, "capacity")
    assert_close(plan.forward(program, x, ws, "triton"), moe_torch.moe_forward_reference(x, ws, spec),
                 torch.float32, what="capacity")


def test_float64_falls_back_to_the_torch_path_with_the_reason():
    spec = MoESpec(8, 2, 16, 8, dtype="float64")
    program = _fused(spec)
    assert plan.choose(program, "triton", CPU) == ("torch", "float64 is not a Triton dtype (float32, bfloat16, float16)")
    assert plan.describe(program, "triton", CPU).startswith("torch (not triton: float64")
    x, ws = _inputs(spec, 9, torch.float64, "fp64")
    assert_close(plan.forward(program, x, ws, "triton"), moe_torch.moe_forward_reference(x, ws, spec), torch.float64)


def test_a_kernel_that_declines_at_run_time_falls_back_with_a_warning(monkeypatch):
    from moecompile.codegen.triton import grouped_gemm

    def declines(*args, **kwargs):
        raise ValueError("gemm_down: an input the kernel does not take")
    monkeypatch.setattr(grouped_gemm, "gemm_down", declines)
    spec = SPECS["mixtral"]
    x, ws = _inputs(spec, 30, torch.float32, "declines")
    with pytest.warns(UserWarning, match="declined a layer .*an input the kernel does not take.*torch path"):
        got = plan.forward(_fused(spec), x, ws, "triton")
    assert_close(got, moe_torch.moe_forward_reference(x, ws, spec), torch.float32)


def test_auto_is_the_torch_path_on_cpu():
    program = _fused(SPECS["mixtral"])
    assert plan.choose(program, "auto", CPU) == ("torch", None)
    assert plan.choose(program, "triton", CPU) == ("triton", None)
    assert config.KERNEL_CHOICES == plan.KERNELS
    with pytest.raises(ValueError, match="unknown kernels 'cuda'"):
        plan.choose(program, "cuda", CPU)


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3"])
def test_a_token_gets_the_same_bits_in_any_batch(name):
    spec = SPECS[name]
    program = _fused(spec)
    x, ws = _inputs(spec, 60, torch.float32, f"batch{name}")
    alone_in_a = plan.forward(program, x[:40], ws, "triton")
    # token 7 again, now at row 30 of another batch of other tokens
    other = torch.cat([x[40:], x[:7], x[7:8], x[8:10]])  # rows 20.. are x[0..9]
    in_b = plan.forward(program, other, ws, "triton")
    assert torch.equal(alone_in_a[7], in_b[27])
    assert torch.equal(alone_in_a[:10], in_b[20:30])


# -- end to end ---------------------------------------------------------------------------------


# every demo model once, both dtypes among them; gpt_oss in both (its bf16 gate runs in torch)
@pytest.mark.parametrize("name,dtype", cover(
    name=["mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v3", "deepseek_v2", "gpt_oss"],
    dtype=["float32", "bfloat16"], keep=["gpt_oss-float32", "gpt_oss-bfloat16"]))
def test_models_compiled_with_triton_kernels_match_eager(name, dtype):
    model, (ids,) = models.build(name, layers=1, dtype=dtype)
    with torch.no_grad():
        want = model(ids)[0] if isinstance(model(ids), tuple) else model(ids)
        compiled = torch.compile(model, backend="moe", options={"inner": "aot_eager", "kernels": "triton"})
        out = compiled(ids)
        got = out[0] if isinstance(out, tuple) else out
    got, want = getattr(got, "logits", got), getattr(want, "logits", want)
    assert_close(got, want, getattr(torch, dtype), what=name)
    rows = report.current().optimized()
    assert rows and all(r.kernels.startswith("triton: ") and "gemm_gate_up" in r.kernels for r in rows), \
        [r.kernels for r in rows]
    # GPT-OSS scores its router in the model's dtype: in bf16 that gate runs in torch
    gate = "Gate(torch)" if (name, dtype) == ("gpt_oss", "bfloat16") else "gate"
    assert all(r.kernels.startswith(f"triton: {gate}, ") for r in rows), [r.kernels for r in rows]


def test_triton_kernels_train_through_the_torch_backward():
    model, (ids,) = models.build("mixtral", layers=1)
    params = [p for p in model.parameters() if p.requires_grad]
    eager_loss = model(ids).logits.float().square().mean()
    want = torch.autograd.grad(eager_loss, params)
    compiled = torch.compile(model, backend="moe", options={"inner": "aot_eager", "kernels": "triton"})
    loss = compiled(ids).logits.float().square().mean()
    got = torch.autograd.grad(loss, params)
    assert_close(loss.detach(), eager_loss.detach(), torch.float32)
    assert_grads_close(list(got), list(want), [n for n, p in model.named_parameters() if p.requires_grad],
                       torch.float32, what="mixtral")
    assert all(r.kernels.startswith("triton") for r in report.current().optimized())


def test_dumps_name_the_kernels_their_configs_and_sources(tmp_path):
    import json
    model, (ids,) = models.build("qwen2_moe", layers=1)
    with torch.no_grad():
        torch.compile(model, backend="moe", options={"inner": "eager", "kernels": "triton",
                                                     "dump_dir": str(tmp_path)})(ids)
    layer = next(tmp_path.glob("graph_*/layers/*"))
    info = json.loads((layer / "kernels.json").read_text())
    assert info["kernels"].startswith("triton: gate, SharedMLP(torch), align, gemm_gate_up")
    assert info["configs"]["gate_up"]["BLOCK_M"] == info["tile_m"] and "decode" in info["configs"]
    assert info["autotune"]["cache"].endswith("autotune.json")
    sources = sorted(p.name for p in layer.glob("triton_*.py"))
    assert sources == ["triton_align.py", "triton_decode.py", "triton_gate.py", "triton_grouped_gemm.py"]
    assert "@triton.jit" in (layer / "triton_grouped_gemm.py").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the kernels run natively")
def test_moecompile_kernels_triton_forces_the_interpreter_on_cpu():
    """MOECOMPILE_KERNELS=triton in a fresh process, TRITON_INTERPRET unset: importing moecompile
    before triton loads turns the interpreter on, and the report names the kernels."""
    import os
    import subprocess
    import sys
    code = ("import os, torch, moecompile\n"
            "from moecompile import models\n"
            "model, (ids,) = models.build('olmoe', layers=1)\n"
            "r = moecompile.explain(model, ids, quiet=True, options={'inner': 'eager'})\n"
            "print(os.environ['TRITON_INTERPRET'], r.regions[0]['kernels'])\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MOECOMPILE_KERNELS"] = "triton"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1].startswith("1 triton: gate, align, gemm_gate_up"), out.stdout
