"""Expert parallelism on torch.distributed: a model's MoE layers across the ranks of a process group.

    model = moecompile.distributed.shard_experts(model, plan="plan.json")   # plan optional
    loss.backward(); moecompile.distributed.average_gradients(model)       # data-parallel step
    state = moecompile.distributed.full_state_dict(model)                   # rank 0: unsharded
    rows = moecompile.distributed.exchange_report(model)                    # rank 0: per layer, rank
"""

from .exchange import LayerMap, remap_slots
from .shard import (ShardedExperts, average_gradients, exchange_report, full_state_dict, moe_layers,
                    reset_exchange_stats, shard_experts)

__all__ = ["LayerMap", "ShardedExperts", "average_gradients", "exchange_report", "full_state_dict", "moe_layers",
           "remap_slots", "reset_exchange_stats", "shard_experts"]
