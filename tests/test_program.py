"""MoE programs: build / text / parse / key / check, the layer passes, and the interpreter.

Structural first (stages, counters, declines), then numeric: the interpreter runs the canonical
program and the program after each layer pass on fresh random inputs; fp32 outputs agree to a few ulps
before and after each exact pass, and every program matches the eager per-expert loop.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import zlib
from pathlib import Path

import pytest
import torch

from conftest import assert_close
from helpers_moe import SPECS
from moecompile import models
from moecompile.codegen import moe_torch, reference
from moecompile.errors import UserInputError
from moecompile.ir import MoEProgram, MoESpec, ProgramError, build
from moecompile.passes.layer import LAYER_PASSES, FuseEpilogues, FuseGate

ALL_SPECS = {**SPECS, "capacity": MoESpec(8, 2, 16, 8, capacity_factor=1.25),
             "bf16_router_fp32": MoESpec(16, 4, 32, 16, scoring="sigmoid", correction_bias=True, groups=4,
                                         top_groups=2, router_gemm_fp32=True, weights_in_input_dtype=True,
                                         dtype="bfloat16")}
GOLDEN = Path(__file__).parent / "golden" / "programs"


def _after_passes(program: MoEProgram, passes=LAYER_PASSES) -> list[MoEProgram]:
    """The program after each pass in turn, the canonical one first."""
    out = [program]
    for cls in passes:
        program, _ = cls()(program)
        out.append(program.check())
    return out


def _inputs(spec: MoESpec, T: int, seed: str, dtype=None):
    dtype = dtype or getattr(torch, spec.dtype)
    gen = torch.Generator().manual_seed(zlib.crc32(seed.encode()))
    x = torch.randn(T, spec.hidden, generator=gen).to(dtype)
    ws = [(torch.randn(s, generator=gen) / s[-1] ** 0.5).to(dtype) for s in spec.weight_shapes().values()]
    return x, ws


# -- structure ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ALL_SPECS))
def test_text_parses_back_to_the_same_program_and_spec(name):
    spec = ALL_SPECS[name]
    for program in _after_passes(build(spec)):
        text = program.text()
        assert MoEProgram.parse(text) == program, text
        assert program.spec() == spec
        assert text.splitlines()[0] == (f"moe E={spec.num_experts} K={spec.top_k} H={spec.hidden} "
                                        f"I={spec.intermediate} dtype={spec.dtype}")
        assert len(text.splitlines()) == len(program.stages) + 1  # one stage a line


def test_canonical_and_fused_stages():
    spec = SPECS["shared_gated"]
    canonical, gated, fused = _after_passes(build(spec))
    assert [s.op for s in canonical.stages] == ["RouterGemm", "TopK", "SharedMLP", "Align", "Gather", "GroupedGemm",
                                                "Activation", "GroupedGemm", "Combine"]
    assert [s.op for s in gated.stages] == ["Gate", "SharedMLP", "Align", "Gather", "GroupedGemm", "Activation",
                                            "GroupedGemm", "Combine"]
    assert gated.stage("Align").ins == ("ids", "counts")
    assert [s.op for s in fused.stages] == ["Gate", "SharedMLP", "Align", "GroupedGemm", "GroupedGemm", "Combine"]
    up, down = [s for s in fused.stages if s.op == "GroupedGemm"]
    assert (up.prologue, up.epilogue, up.ins[0], up.outs) == ("gather", "activation", "x", ("a",))
    assert (down.epilogue, down.ins[-1]) == ("topk_weight", "w")
    assert fused.stage("Combine").weighted is False and fused.stage("Combine").ins == ("ys", "inv", "s")
    assert canonical.exact and fused.exact


def test_key_is_stable_and_tells_programs_apart():
    keys = {}
    for name, spec in ALL_SPECS.items():
        for i, program in enumerate(_after_passes(build(spec))):
            assert program.key() == MoEProgram.parse(program.text()).key() == build(spec).key() if i == 0 else True
            keys.setdefault(program.key(), []).append((name, i))
    assert all(len(v) == 1 for v in keys.values()), [v for v in keys.values() if len(v) > 1]


def _broken(program: MoEProgram, index: int, **changes) -> MoEProgram:
    stages = list(program.stages)
    stages[index] = stages[index].replace(**changes)
    return dataclasses.replace(program, stages=tuple(stages))


@pytest.mark.parametrize("change, message", [
    (lambda p: _broken(p, 1, ins=("logit",)), "input 'logit' is not defined before it"),
    (lambda p: _broken(p, 2, outs=("w", "tiles", "inv")), "output 'w' is defined twice"),
    (lambda p: _broken(p, 3, ins=("x", "inv")), r"input 'inv' is \(T\*K,\) i32, expected \(P,\) i32"),
    (lambda p: _broken(p, 4, ins=("xs", "rows")), "takes 4 inputs"),
    (lambda p: _broken(p, 4, transposed=True), "transposed=False but stage 4 says True"),
    (lambda p: _broken(p, 6, ins=("xs", "rows", "tiles", "down_proj")), r"input 'xs' is \(P, H\) f32, expected \(P, I\)"),
    (lambda p: dataclasses.replace(p, stages=p.stages[:-1]), "the last stage must give y"),
    (lambda p: _broken(p, 3, top_k=3), "top_k=3 but the header says 2"),
    # a program that chains but computes another layer
    (lambda p: _broken(p, 6, ins=("a", "rows", "tiles", "down_proj", "w"), epilogue="topk_weight"),
     r"input 'ys' is \(P, H\) f32, expected|applied 2 times"),
    (lambda p: _broken(p, 7, ins=("ys", "inv"), weighted=False), r"'w' is computed but never read|applied 0 times"),
])
def test_check_names_what_does_not_chain(change, message):
    program = build(SPECS["mixtral"])
    with pytest.raises(ProgramError, match=message):
        change(program).check()


@pytest.mark.parametrize("text, message", [
    ("", "not an MoE program"),
    ("moe E=8 K=2 H=4\n", "not an MoE program"),
    ("moe E=8 K=2 H=32 I=48 dtype=float32\n  y: (T, H) f32 = Mystery(x)\n", "line 2: cannot read"),
    ("moe E=8 K=2 H=32 I=48 dtype=float32\n  logits: (T, E) f32 = RouterGemm(x, router_weight; bias=true)\n",
     "RouterGemm has no option 'bias'"),
    ("moe E=8 K=2 H=32 I=48 dtype=float32\n  logits: (T, E) f32 = RouterGemm(x, router_weight; router_bias=yes)\n",
     "'yes' is not a bool"),
])
def test_parse_errors_are_one_line(text, message):
    with pytest.raises(ProgramError, match=message) as err:
        MoEProgram.parse(text)
    assert "\n" not in str(err.value)


# -- passes -------------------------------------------------------------------------------------


def test_passes_count_what_they_fuse_and_decline_the_second_time():
    program = build(SPECS["deepseek_v3"])
    gated, result = FuseGate()(program)
    assert result.changed and result.counters == {"gates_fused": 1}
    fused, result = FuseEpilogues()(gated)
    assert result.counters == {"gather_fused": 1, "activation_fused": 1, "topk_weight_fused": 1}
    again, result = FuseGate()(fused)
    assert again is fused and not result.changed and result.counters == {"skipped:no_router_gemm": 1}
    again, result = FuseEpilogues()(fused)
    assert again is fused and result.counters == {
        "skipped:no_gather_before_gate_up": 1, "skipped:no_activation_after_gate_up": 1,
        "skipped:no_weighted_combine_after_down": 1}


def test_fuse_gate_declines_when_logits_are_read_elsewhere():
    program = build(SPECS["mixtral"])
    # a second reader of the logits (a TopK of another layer's program would be one): Gate would
    # leave it without its input
    extra = program.stages[1].replace(outs=("w2", "ids2"))
    odd = dataclasses.replace(program, stages=program.stages[:2] + (extra,) + program.stages[2:])
    same, result = FuseGate()(odd)
    assert same is odd and result.counters == {"skipped:logits_read_by_other_stages": 1}


def test_a_dropped_shared_expert_or_double_weights_do_not_check():
    fused = _after_passes(build(SPECS["shared_gated"]))[-1]
    i = fused.find("Combine")[0]
    with pytest.raises(ProgramError, match="'s' is computed but never read"):
        _broken(fused, i, ins=("ys", "inv")).check()
    with pytest.raises(ProgramError, match="applied 2 times"):
        _broken(fused, i, ins=("ys", "inv", "w", "s"), weighted=True).check()


def test_fuse_gate_without_counts():
    program, result = FuseGate(counts=False)(build(SPECS["mixtral"]))
    program.check()
    assert program.stage("Gate").outs == ("w", "ids") and program.stage("Align").ins == ("ids",)
    x, ws = _inputs(SPECS["mixtral"], 11, "nocounts")
    torch.testing.assert_close(reference.run(program, x, ws), reference.run(build(SPECS["mixtral"]), x, ws))


def test_text_keeps_every_spec_field_and_float_spelling():
    odd = MoESpec(8, 2, 16, 8, routed_scaling=2, renorm_eps=1e-6, capacity_order="k_major", group_score="top2_sum")
    for program in _after_passes(build(odd)):
        again = MoEProgram.parse(program.text())
        assert again == program and again.key() == program.key() and again.spec() == odd


def test_fuse_epilogues_options():
    gated, _ = FuseGate()(build(SPECS["mixtral"]))
    in_combine, result = FuseEpilogues(topk_weight="combine")(gated)
    assert "topk_weight_fused" not in result.counters and in_combine.stage("Combine").weighted
    no_gather, result = FuseEpilogues(gather=False)(gated)
    assert no_gather.stage("Gather") is not None and result.counters == {"activation_fused": 1, "topk_weight_fused": 1}
    with pytest.raises(UserInputError, match="topk_weight='gemm'"):
        FuseEpilogues(topk_weight="gemm")


# -- the interpreter ----------------------------------------------------------------------------


@pytest.mark.parametrize("T", [0, 1, 37])
@pytest.mark.parametrize("name", list(ALL_SPECS))
def test_interpreter_matches_eager_before_and_after_each_pass(name, T):
    spec = ALL_SPECS[name]
    dtype = getattr(torch, spec.dtype)
    x, ws = _inputs(spec, T, f"{name}{T}")
    want = moe_torch.moe_forward_reference(x, ws, spec)
    outs = [reference.run(p, x, ws) for p in _after_passes(build(spec))]
    for out in outs:
        assert out.shape == (T, spec.hidden) and out.dtype == dtype
        assert_close(out, want, dtype, what=name)
    if dtype == torch.float32:  # exact passes: fused stages round where the unfused ones did
        # NOTE: not bitwise: torch's CPU elementwise kernels (sigmoid) take vectorized or scalar
        # paths by where a row starts, and a fused epilogue runs on other row sets (measured:
        # 3e-8 apart on GPT-OSS's clamped SwiGLU); a few fp32 ulps of the largest output.
        for before, after in itertools.pairwise(outs):
            scale = float(before.abs().max()) if before.numel() else 1.0
            torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6 * scale, msg=name)


def test_interpreter_pass_orders_and_subsets_agree():
    spec = SPECS["gpt_oss"]
    x, ws = _inputs(spec, 23, "orders")
    want = reference.run(build(spec), x, ws)
    for passes in ([FuseEpilogues], [FuseEpilogues, FuseGate], [FuseGate]):
        program = _after_passes(build(spec), passes)[-1]
        got = reference.run(program, x, ws)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


# -- golden programs of the demo models ---------------------------------------------------------


def _demo_programs(name: str, tmp_path: Path) -> str:
    """The programs the pipeline gives each MoE layer of demo model `name` (its .moe dumps)."""
    model, (ids,) = models.build(name, layers=1)
    with torch.no_grad():
        torch.compile(model, backend="moe", options={"inner": "eager", "dump_dir": str(tmp_path)})(ids)
    texts = [f"# {path.parent.name}: {path.stem}\n{path.read_text()}"
             for path in sorted(tmp_path.glob("graph_*/layers/*/*.moe"))]
    assert texts, f"no MoE layer optimized in {name}"
    return "\n".join(texts)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_golden_programs_of_the_demo_models(name, tmp_path):
    text = _demo_programs(name, tmp_path)
    path = GOLDEN / f"{name}.moe"
    if os.environ.get("MOECOMPILE_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path.name} missing: run with MOECOMPILE_UPDATE_GOLDEN=1 to write it"
    assert text == path.read_text(), f"the programs of {name} changed; if on purpose, rerun with " \
                                     "MOECOMPILE_UPDATE_GOLDEN=1 and review the diff"
