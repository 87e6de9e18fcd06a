"""Layer passes: MoEProgram -> MoEProgram, one file each, all registered here.

A layer pass is a frozen dataclass with a `name`, its options as fields, and
`__call__(program) -> (program, PassResult)`; it declines (returns the program unchanged, counting
`skipped:<reason>`) where it does not apply. The pipeline runs them in LAYER_PASSES order on each
layer's program and checks the program between passes.
"""

from __future__ import annotations

from .fuse_epilogues import FuseEpilogues
from .fuse_gate import FuseGate

# Order matters: fuse_gate gives Align its counts; fuse_epilogues then folds the elementwise stages
# into the GEMMs around them.
LAYER_PASSES = (FuseGate, FuseEpilogues)
REGISTRY = {cls.name: cls for cls in LAYER_PASSES}

__all__ = ["FuseEpilogues", "FuseGate", "LAYER_PASSES", "REGISTRY"]
