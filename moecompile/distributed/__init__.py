"""Expert parallelism on torch.distributed: a model's MoE layers across the ranks of a process group.

    model = moecompile.distributed.shard_experts(model, plan="plan.json")   # plan optional
    state = moecompile.distributed.full_state_dict(model)                   # rank 0: unsharded
"""

from .exchange import LayerMap, remap_slots
from .shard import ShardedExperts, full_state_dict, moe_layers, shard_experts

__all__ = ["LayerMap", "ShardedExperts", "full_state_dict", "moe_layers", "remap_slots", "shard_experts"]
