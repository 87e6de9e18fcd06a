"""The IR: one vocabulary for detection, passes, kernels and the report.

spec     MoESpec (what a layer computes), MoERegion (where a captured graph computed it), PassResult
program  MoEProgram (how a layer's op computes it: typed stages that layer passes rewrite), build
"""

from .program import (STAGES, Activation, Align, Combine, Dims, Gate, Gather, GroupedGemm, MoEProgram,
                      ProgramError, Route, RouterGemm, SharedMLP, Stage, TopK, ValueType, build)
from .spec import (ACTIVATIONS, CAPACITY_ORDERS, DTYPES, GROUP_SCORES, LAYOUTS, ROUTERS, SCORINGS, TOPK_ORDERS,
                   WEIGHTS_FROM, MoERegion, MoESpec, PassResult)

__all__ = ["ACTIVATIONS", "CAPACITY_ORDERS", "DTYPES", "GROUP_SCORES", "LAYOUTS", "ROUTERS", "SCORINGS", "STAGES",
           "TOPK_ORDERS", "WEIGHTS_FROM", "Activation", "Align", "Combine", "Dims", "Gate", "Gather",
           "GroupedGemm", "MoEProgram", "MoERegion", "MoESpec", "PassResult", "ProgramError", "Route", "RouterGemm",
           "SharedMLP", "Stage", "TopK", "ValueType", "build"]
