"""moecompile: a torch.compile backend for Mixture-of-Experts models.

    model = moecompile.prepare(model)                    # experts loops Dynamo cannot trace: first this
    model = torch.compile(model, backend="moe")          # every MoE layer -> one fused op
    moecompile.explain(model, *example_args)             # what was found, as a table + report
"""

from .config import Config, interpret_triton_if_forced, patch
from .ir import MoERegion, MoESpec, PassResult
from .report import Report
from .tools.explain import explain
from .traceable import Prepared, prepare, prepared

__all__ = ["Config", "MoERegion", "MoESpec", "PassResult", "Prepared", "Report", "explain", "last_report", "patch",
           "prepare", "prepared"]
__version__ = "0.1.0"

interpret_triton_if_forced()  # MOECOMPILE_KERNELS=triton on a machine without CUDA: the interpreter


def last_report() -> Report:
    """Everything compiled with backend='moe' in this process since the last explain()."""
    from . import report

    return report.current()
