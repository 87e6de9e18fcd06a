"""`moecompile.explain(model, *args)`: compile, run once, print the table of MoE layers found."""

from __future__ import annotations

from ..report import Report


def explain(model, *args, options: dict | None = None, quiet: bool = False, **kwargs) -> Report:
    """Compile `model` with backend='moe', run it once on the example inputs, print a table of the
    MoE layers found and return the report (the same data report.json holds)."""
    import torch

    from .. import report
    from ..backend import moe_backend

    torch._dynamo.reset()
    report.reset()
    compiled = torch.compile(model, backend=moe_backend, options=options or None)
    with torch.no_grad():
        compiled(*args, **kwargs)
    result = report.current().copy()
    if not quiet:
        print(result.table())
    return result
