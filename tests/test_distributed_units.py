"""The pieces of expert parallelism that need no process group: slot remapping, the chunk model,
the exchange statistics, row padding."""

from __future__ import annotations

import time

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
    def clock():
        timed = Clock()
        with timed.span("latency"):
            time.sleep(0.01)
        with timed.wait():
            time.sleep(0.04)
        with timed.compute():
            time.sleep(0.02)
        return timed

    stats.add_call(plan, dispatch_row=100, combine_row=80, clock=clock())
    assert (stats.rows_sent, stats.rows_received) == (7, 2)  # rank 0's own rows stay
    assert stats.bytes_sent == 7 * 100 + 2 * 80 and stats.bytes_received == 2 * 100 + 7 * 80
    assert stats.chunks == {2: 1} and stats.bandwidth is None  # no C = 1 call measured the link
    one = Route(order=torch.arange(4), bounds=[0, 4], send=[[1, 3]], recv=[[1, 1]])
    stats.add_call(one, 100, 80, clock())
    waited, computed, latency, whole = stats.last  # the counts exchange is a wait too
    assert 0.05 <= waited < 0.2 and 0.02 <= computed < 0.1 and 0.01 <= latency < waited
    assert stats.bandwidth == pytest.approx((3 * 100 + 1 * 80) / waited)  # the larger direction, over its waits
    summary = stats.summary()
    assert summary["calls"] == 2 and summary["chunks"] == 1 and stats.chunks == {2: 1, 1: 1}
    assert summary["exposed_s"] >= 2 * 0.05
    comm = max(stats.bytes_sent, stats.bytes_received) / stats.bandwidth
    assert summary["hidden_s"] == pytest.approx(max(comm - summary["exposed_s"], 0.0))


def test_padding_places_each_slots_rows_in_whole_tiles():
    slots = torch.tensor([2, 0, 2, 2, 0])
    order, pos, slot_p = _padding(slots, num_slots=3, tile=4)
    assert slot_p.tolist() == [0, 0, 0, 0, 2, 2, 2, 2]  # slot 1 has no rows, no tile
    assert order.tolist() == [1, 4, 0, 2, 3] and pos.tolist() == [0, 1, 4, 5, 6]
    assert torch.equal(slot_p[pos], slots[order])


@pytest.fixture
def one_rank(tmp_path):
    """A process group of this process alone (gloo, a file store), destroyed after the test."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_sharded_model_compiles_as_one_graph_and_reports_its_layers(one_rank):
    import copy

    import moecompile
    from moecompile import models
    from moecompile import report as reports
    from moecompile.distributed import shard_experts
    from moecompile.errors import UserInputError

    model, (ids,) = models.build("mixtral", layers=2, hidden=32)
    want = model(ids).logits
    sharded = shard_experts(copy.deepcopy(model))
    torch._dynamo.reset()
    reports.reset()
    got = torch.compile(sharded, backend="moe")(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    report = moecompile.last_report()
    rows = report.to_dict()["regions"]
    assert [(r["name"], r["status"], r["kernels"], r["num_experts"], r["top_k"], r["hidden"], r["intermediate"])
            for r in rows] == [("model.layers.0.mlp", "sharded", "distributed", 8, 2, 32, 64),
                               ("model.layers.1.mlp", "sharded", "distributed", 8, 2, 32, 64)]
    assert "experts sharded over 1 rank by moecompile.distributed" in rows[0]["reason"]
    assert len(report.to_dict()["graphs"]) == 1  # no graph break around the exchange
    assert "2 sharded, 0 left as traced" in report.table()
    fresh = shard_experts(copy.deepcopy(model))
    torch._dynamo.reset()
    torch.compile(fresh, backend="moe", options={"overlap_chunks": 3})(ids)  # the option reaches the layers
    assert [m.chosen for m in fresh.modules() if hasattr(m, "chosen")] == [3, 3]
    torch._dynamo.reset()  # layers that ran keep their setting: a recompile on one rank must not change C
    torch.compile(sharded, backend="moe", options={"overlap_chunks": 2})(ids)
    assert [m.overlap_chunks for m in sharded.modules() if hasattr(m, "chosen")] == ["auto", "auto"]
    with pytest.raises(UserInputError, match="option overlap_chunks=0 must be"):
        moecompile.Config(overlap_chunks=0)


def test_shard_experts_rejects_bad_requests(one_rank):
    from moecompile import models
    from moecompile.distributed import shard_experts
    from moecompile.errors import UserInputError

    model, _ = models.build("mixtral", layers=1, hidden=32)
    with pytest.raises(UserInputError, match="overlap_chunks must be"):
        shard_experts(model, overlap_chunks=0)
    with pytest.raises(UserInputError, match="plan must be a path, a Plan or None"):
        shard_experts(model, plan=3)
    with pytest.raises(UserInputError, match="no MoE layer found"):
        shard_experts(torch.nn.Linear(2, 2))
    shard_experts(model)
    with pytest.raises(UserInputError, match="already sharded"):
        shard_experts(model)


def test_shard_experts_needs_a_process_group():
    from moecompile import models
    from moecompile.distributed import shard_experts
    from moecompile.errors import UserInputError

    model, _ = models.build("mixtral", layers=1, hidden=32)
    with pytest.raises(UserInputError, match="needs torch.distributed initialized first"):
        shard_experts(model)


def test_a_deep_copy_of_a_sharded_model_runs_on_its_own(one_rank):
    import copy

    from moecompile import models
    from moecompile.distributed import moe_layers, shard_experts
    from moecompile.distributed.ops import layer_of

    model, (ids,) = models.build("mixtral", layers=1, hidden=32)
    want = model(ids).logits
    shard_experts(model)
    twin = copy.deepcopy(model)  # the process group is shared, not copied (it cannot be)
    torch.testing.assert_close(twin(ids).logits, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
    a, b = moe_layers(model)[0][1].experts, moe_layers(twin)[0][1].experts
    assert a.group is b.group and a.key != b.key and (a.stats.calls, b.stats.calls) == (1, 1)
    assert layer_of(a.key) is a and layer_of(b.key) is b
    assert a.local.gate_up_proj is not b.local.gate_up_proj


@pytest.mark.parametrize("trial_seconds, kept", [(0.07, True), (0.2, False)])
def test_auto_chunks_keep_the_models_choice_only_if_it_was_faster(one_rank, trial_seconds, kept):
    from moecompile import models
    from moecompile.distributed import moe_layers, shard_experts

    model, _ = models.build("mixtral", layers=1, hidden=32)
    layer = moe_layers(shard_experts(model))[0][1].experts
    stats = layer.stats
    assert layer.chunks() == 1 and layer.chunks() == 1  # the first two calls: C = 1, measured
    stats._last = (0.05, 0.05, 1e-4, 0.1)  # the second call: exchange as long as the experts, overlap pays
    stats.reset()  # a reset of the statistics (every rank, after warm-up) changes no step
    trial = layer.chunks()
    assert trial > 1 and layer.chosen is None
    stats._last = (0.01, 0.05, 1e-4, trial_seconds)  # the trial call
    assert layer.chunks() == (trial if kept else 1) == layer.chosen
    layer.set_chunks("auto")  # the same setting again keeps the choice
    assert layer.chosen == (trial if kept else 1)


class _Renormalizing(torch.nn.Module):
    """Experts that renormalize a token's K weights themselves: right as a whole layer, wrong when
    each (token, k) row runs alone, as a sharded layer runs them."""

    def __init__(self, num_experts=4, hidden=8):
        super().__init__()
        self.proj = torch.nn.Parameter(torch.randn(num_experts, hidden, hidden) / hidden)

    def forward(self, x, ids, w):
        w = w / w.sum(dim=-1, keepdim=True)
        return torch.einsum("tk,tkh->th", w, torch.einsum("th,tkhg->tkg", x, self.proj[ids]))


class _Plain(_Renormalizing):
    def forward(self, x, ids, w):
        return torch.einsum("tk,tkh->th", w, torch.einsum("th,tkhg->tkg", x, self.proj[ids]))


class _Block(torch.nn.Module):
    def __init__(self, experts):
        super().__init__()
        self.experts = experts


def test_a_layer_that_computes_otherwise_when_sharded_stays_whole(one_rank):
    from moecompile.distributed import ShardedExperts, shard_experts

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": _Block(_Renormalizing()), "b": _Block(_Plain())})
    x, ids, w = torch.randn(5, 8), torch.tensor([[0, 1], [2, 3], [1, 3], [0, 2], [3, 0]]), torch.rand(5, 2)
    want = {name: block.experts(x, ids, w) for name, block in model.items()}
    with pytest.warns(UserWarning, match="layer a left unsharded: its experts module gives other values"):
        shard_experts(model)
    assert not isinstance(model["a"].experts, ShardedExperts) and isinstance(model["b"].experts, ShardedExperts)
    for name, block in model.items():
        torch.testing.assert_close(block.experts(x, ids, w), want[name], rtol=1e-5, atol=1e-6)
