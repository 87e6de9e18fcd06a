"""fuse_gate: the router GEMM, scoring, top-k and the per-expert histogram become one Gate stage.

    Matches:     logits: (T, E) = RouterGemm(x, router_weight[, router_bias])
                 w: (T, K), ids: (T, K) i32 = TopK(logits[, router_correction_bias]; routing options)
                 rows, tiles, inv = Align(ids)
    Rewrites to: w, ids, counts: (E,) i32 = Gate(x, router_weight[, router_bias][, router_correction_bias];
                                                 router and routing options)
                 rows, tiles, inv = Align(ids, counts)

Exact: the Gate computes the same logits, choice (DeepSeek's group-limited top-k with correction
bias included) and weights; the histogram Align took itself now comes with the gate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ...ir import Gate, MoEProgram, PassResult
from ...ir.program import _ROUTING


@dataclass(frozen=True)
class FuseGate:
    name: str = "fuse_gate"
    counts: bool = True  # hand the histogram to Align (False: Align takes it itself)

    def __call__(self, program: MoEProgram) -> tuple[MoEProgram, PassResult]:
        result = PassResult(self.name)
        found = _find(program)
        if isinstance(found, str):
            result.skip(found)
            return program, result
        i_router, i_topk = found
        router, topk = program.stages[i_router], program.stages[i_topk]
        extra_out = ("counts",) if self.counts else ()
        gate = Gate(outs=topk.outs + extra_out, ins=router.ins + topk.ins[1:], router_bias=router.router_bias,
                    router_gemm_fp32=router.router_gemm_fp32, **{f: getattr(topk, f) for f in _ROUTING})
        stages = list(program.stages)
        stages[i_topk] = gate
        del stages[i_router]
        if self.counts:
            ids = topk.outs[1]
            stages = [s.replace(ins=s.ins + ("counts",)) if s.op == "Align" and s.ins == (ids,) else s
                      for s in stages]
        result.count("gates_fused")
        result.changed = True
        return dataclasses.replace(program, stages=tuple(stages)), result


def _find(program: MoEProgram) -> tuple[int, int] | str:
    """(RouterGemm index, TopK index), or why the pass does not apply."""
    i_router = program.find("RouterGemm")
    if not i_router:
        return "no_router_gemm"
    logits = program.stages[i_router[0]].outs[0]
    users = program.users(logits)
    if len(users) != 1 or program.stages[users[0]].op != "TopK":
        return "logits_read_by_other_stages"
    return i_router[0], users[0]
