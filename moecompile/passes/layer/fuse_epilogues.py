"""fuse_epilogues: the elementwise stages around the grouped GEMMs move into them.

    Matches:     xs = Gather(x, rows);  h = GroupedGemm(xs, ..; proj=gate_up);  a = Activation(h)
                 ys = GroupedGemm(a, ..; proj=down);  y = Combine(ys, inv, w[, s]; weighted=true)
    Rewrites to: a  = GroupedGemm(x, ..; proj=gate_up, prologue=gather, epilogue=activation, act..)
                 ys = GroupedGemm(a, .., w; proj=down, epilogue=topk_weight)      (P, H) f32
                 y  = Combine(ys, inv[, s]; weighted=false)

The gather becomes GEMM 1's prologue (rows loaded from x as the tile needs them: no (P, H)
permuted copy), the gated activation its epilogue (no (P, 2I) intermediate), and the top-k weight
moves into GEMM 2's epilogue, or stays in the combine (option topk_weight="combine"). Exact up to
rounding: fused stages round once where the unfused ones round at each stage boundary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ...errors import UserInputError
from ...ir import MoEProgram, PassResult

TOPK_WEIGHT_PLACES = ("down", "combine")


@dataclass(frozen=True)
class FuseEpilogues:
    name: str = "fuse_epilogues"
    gather: bool = True  # the gather into GEMM 1's prologue
    activation: bool = True  # the gated activation into GEMM 1's epilogue
    topk_weight: str = "down"  # where the top-k weight is applied: GEMM 2's epilogue or the combine

    def __post_init__(self) -> None:
        if self.topk_weight not in TOPK_WEIGHT_PLACES:
            raise UserInputError(f"fuse_epilogues: topk_weight={self.topk_weight!r} not in {TOPK_WEIGHT_PLACES}")

    def __call__(self, program: MoEProgram) -> tuple[MoEProgram, PassResult]:
        result = PassResult(self.name)
        steps = [("gather_fused", self.gather, _fuse_gather), ("activation_fused", self.activation, _fuse_activation),
                 ("topk_weight_fused", self.topk_weight == "down", _fuse_topk_weight)]
        for counter, wanted, step in steps:
            if not wanted:
                continue
            fused = step(program)
            if isinstance(fused, str):
                result.skip(fused)
            else:
                program = fused
                result.count(counter)
                result.changed = True
        return program, result


def _only_user(program: MoEProgram, value: str, op: str, **options) -> int | None:
    users = program.users(value)
    if len(users) == 1 and program.stages[users[0]].op == op and all(
            getattr(program.stages[users[0]], k) == v for k, v in options.items()):
        return users[0]
    return None


def _with(program: MoEProgram, changes: dict[int, object], drop: int) -> MoEProgram:
    stages = [changes.get(i, s) for i, s in enumerate(program.stages)]
    del stages[drop]
    return dataclasses.replace(program, stages=tuple(stages))


def _fuse_gather(program: MoEProgram) -> MoEProgram | str:
    for i in program.find("Gather"):
        g = program.stages[i]
        j = _only_user(program, g.outs[0], "GroupedGemm", proj="gate_up", prologue="none")
        if j is not None and program.stages[j].ins[0] == g.outs[0]:
            gemm = program.stages[j]
            return _with(program, {j: gemm.replace(ins=(g.ins[0],) + gemm.ins[1:], prologue="gather")}, i)
    return "no_gather_before_gate_up"


def _fuse_activation(program: MoEProgram) -> MoEProgram | str:
    for j in program.find("GroupedGemm", proj="gate_up", epilogue="none"):
        gemm = program.stages[j]
        k = _only_user(program, gemm.outs[0], "Activation")
        if k is None:
            continue
        act = program.stages[k]
        fused = gemm.replace(outs=act.outs, epilogue="activation", activation=act.activation,
                             act_alpha=act.act_alpha, act_limit=act.act_limit)
        return _with(program, {j: fused}, k)
    return "no_activation_after_gate_up"


def _fuse_topk_weight(program: MoEProgram) -> MoEProgram | str:
    for j in program.find("GroupedGemm", proj="down", epilogue="none"):
        gemm = program.stages[j]
        k = _only_user(program, gemm.outs[0], "Combine", weighted=True)
        if k is None:
            continue
        comb = program.stages[k]
        w = comb.ins[2]
        if program.producer(w) is None or program.producer(w) > j:
            continue  # the weights must exist when GEMM 2 runs
        stages = list(program.stages)
        stages[j] = gemm.replace(ins=gemm.ins + (w,), epilogue="topk_weight")
        stages[k] = comb.replace(ins=comb.ins[:2] + comb.ins[3:], weighted=False)
        return dataclasses.replace(program, stages=tuple(stages))
    return "no_weighted_combine_after_down"
