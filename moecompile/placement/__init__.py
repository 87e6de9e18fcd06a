"""Expert placement: which experts (and replicas) sit on which GPU, for every MoE layer.

One public entry, `place(trace, num_gpus, ...) -> Plan`, and one scorer, `evaluate(plan, trace)`.
File formats: `load_trace`/`save_trace` (routing statistics) and `load_plan`/`save_plan` (plans).
Heavy optional imports (pulp, highspy, matplotlib) happen inside the functions that need them.
"""

from .metrics import evaluate
from .plan import Plan, load_plan, save_plan
from .solve import place
from .trace import RoutingTrace, load_trace, save_trace

__all__ = ["Plan", "RoutingTrace", "evaluate", "load_plan", "load_trace", "place", "save_plan", "save_trace"]
