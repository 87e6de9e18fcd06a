"""The pieces of expert parallelism that need no process group: slot remapping, the chunk model,
the exchange statistics, row padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moecompile.distributed.exchange import LayerMap, Route, remap_slots
from moecompile.distributed.overlap import Clock, Stats, choose_chunks, predicted_time
from moecompile.distributed.shard import _padding


def test_remap_prefers_the_local_replica_and_spreads_the_rest():
    # 2 ranks x 3 slots; expert 0 on slots 0 and 3 (both ranks), 1 on slot 1, 2 on slot 4, 3 on 2, 4 on 5
    layer = LayerMap("l", np.array([0, 1, 3, 0, 2, 4]), num_experts=5, world=2)
    ids = torch.tensor([[0, 1], [0, 2], [4, 0], [0, 3]])
    log2phy, logcnt, here = layer.tables(rank=1, device=torch.device("cpu"))
    assert log2phy.tolist() == [[0, 3], [1, -1], [4, -1], [2, -1], [5, -1]] and here.tolist() == [3, -1, 4, -1, 5]
    slots = remap_slots(ids, log2phy, logcnt, here)
    assert slots.tolist() == [[3, 1], [3, 4], [5, 3], [3, 2]]  # expert 0 always rank 1's own replica
    log2phy, logcnt, here = layer.tables(rank=0, device=torch.device("cpu"))
    assert remap_slots(ids, log2phy, logcnt, here)[:, 0].tolist() == [0, 0, 5, 0]
    # a rank without the expert: pair p = t * K + k picks replica p mod 2
    far = LayerMap("l", np.array([1, 0, 2, 0]), num_experts=3, world=2)  # expert 0 on slots 1 and 3
    log2phy, logcnt, _ = far.tables(rank=0, device=torch.device("cpu"))
    nowhere = torch.full((3,), -1)
    got = remap_slots(torch.tensor([[0, 2], [2, 0], [0, 1]]), log2phy, logcnt, nowhere)
    assert got.tolist() == [[1, 2], [2, 3], [1, 0]]  # pairs 0, 3, 4 -> replicas 0, 1, 0: slots 1, 3, 1


def test_chunk_model_by_hand():
    # comm 4, compute 4, latency 0.1: C = 2 -> 8/2 + 1/2 * 4 + 0.2 = 6.2
    assert predicted_time(2, 4.0, 4.0, 0.1) == pytest.approx(6.2)
    assert predicted_time(1, 4.0, 4.0, 0.1) == pytest.approx(8.1)
    assert choose_chunks(4.0, 4.0, 0.1) == 6  # 8/6 + 5/6*4 + 0.6 = 5.27 < C=8: 1 + 3.5 + 0.8
    assert choose_chunks(0.0, 4.0, 0.1) == 1  # nothing to hide
    assert choose_chunks(1.0, 1.0, 1.0) == 1  # a chunk costs more than it hides
    assert choose_chunks(4.0, 0.5, 0.01) > 1  # transfer-bound: the compute still hides


def test_stats_count_other_ranks_rows_and_bytes():
    stats = Stats(rank=0)
    plan = Route(order=torch.arange(10), bounds=[0, 4, 10], send=[[1, 3], [2, 4]], recv=[[1, 2], [2, 0]])
    clock = Clock()
    clock.waited, clock.computed, clock.latency = 0.5, 0.25, 0.01
    stats.add_call(plan, dispatch_row=100, combine_row=80, clock=clock)
    assert (stats.rows_sent, stats.rows_received) == (7, 2)  # rank 0's own rows stay
    assert stats.bytes_sent == 7 * 100 + 2 * 80 and stats.bytes_received == 2 * 100 + 7 * 80
    assert stats.chunks == [2] and stats.bandwidth is None  # no C = 1 call measured the link
    one = Route(order=torch.arange(4), bounds=[0, 4], send=[[1, 3]], recv=[[1, 1]])
    stats.add_call(one, 100, 80, clock)
    assert stats.bandwidth == pytest.approx((3 * 100 + 1 * 80) / 0.5)  # the larger direction, over its waits
    summary = stats.summary()
    assert summary["calls"] == 2 and summary["chunks"] == 1 and summary["exposed_s"] == pytest.approx(1.0)
    comm = max(stats.bytes_sent, stats.bytes_received) / stats.bandwidth
    assert summary["hidden_s"] == pytest.approx(max(comm - 1.0, 0.0))


def test_padding_places_each_slots_rows_in_whole_tiles():
    slots = torch.tensor([2, 0, 2, 2, 0])
    order, pos, slot_p = _padding(slots, num_slots=3, tile=4)
    assert slot_p.tolist() == [0, 0, 0, 0, 2, 2, 2, 2]  # slot 1 has no rows, no tile
    assert order.tolist() == [1, 4, 0, 2, 3] and pos.tolist() == [0, 1, 4, 5, 6]
    assert torch.equal(slot_p[pos], slots[order])
