"""Detection: find MoE layers in a captured FX graph.

    match.py    router -> top-k -> experts -> combine, anchored on each top-k (the region)
    router.py   scoring, order, renormalization, scaling read off the router chain
    experts.py  the specs the expert weights' shapes and ops allow
    cover.py    every node of a region must be an op the spec models
    unmatched.py  layers holding expert weights that no candidate covers (never silent)
    stacked.py  `torch.stack` of E per-expert 2D parameters taken as a 3D expert weight
    graph_break.py  a top-k whose graph ends right after it: the reason says so
"""

from . import idioms
from .match import Candidate, find_candidates, region_name
from .unmatched import UnmatchedLayer, unmatched_expert_layers

__all__ = ["Candidate", "UnmatchedLayer", "find_candidates", "idioms", "region_name", "unmatched_expert_layers"]
