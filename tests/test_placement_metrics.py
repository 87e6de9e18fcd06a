"""Plan metrics on small cases computed by hand."""

import numpy as np
import pytest

from moecompile.errors import UserInputError
from moecompile.placement import Plan, RoutingTrace, evaluate
from moecompile.placement.plot import gpu_traffic


def _plan(phy2log, num_gpus, num_nodes, num_experts):
    phy2log = np.asarray(phy2log)
    return Plan(num_gpus=num_gpus, num_nodes=num_nodes, num_experts=num_experts,
                slots_per_gpu=phy2log.shape[1] // num_gpus, phy2log=phy2log)


# Two GPUs with two slots each; layer 0: GPU0 {0, 1}, GPU1 {2, 0}; layer 1: GPU0 {1, 2}, GPU1 {0, 1}.
PHY2LOG = [[0, 1, 2, 0], [1, 2, 0, 1]]
LOAD = [[4.0, 2.0, 6.0], [3.0, 4.0, 5.0]]
FLOW = np.zeros((1, 3, 3))
FLOW[0, 0, 0], FLOW[0, 0, 2], FLOW[0, 1, 1], FLOW[0, 2, 0], FLOW[0, 2, 2] = 2, 4, 3, 5, 1


def test_imbalance_splits_replicas_evenly():
    m = evaluate(_plan(PHY2LOG, 2, 1, 3), RoutingTrace(load=LOAD))
    # layer 0: GPU0 = 4/2 + 2 = 4, GPU1 = 6 + 4/2 = 8 -> 8/6; layer 1: GPU0 = 4/2 + 5 = 7, GPU1 = 3 + 2 = 5 -> 7/6
    assert m["imbalance"] == pytest.approx([8 / 6, 7 / 6])
    assert m["imbalance_mean"] == pytest.approx(1.25) and m["imbalance_max"] == pytest.approx(8 / 6)
    assert m["cross_gpu_fraction"] is None and m["cross_node_fraction"] is None
    assert m["objective"] == pytest.approx(0.25)


def test_cross_gpu_fraction_by_hand():
    m = evaluate(_plan(PHY2LOG, 2, 1, 3), RoutingTrace(load=LOAD, flow=FLOW))
    # (0,0)=2: halves on GPU0/GPU1, e0 next only on GPU1 -> 1 local; (0,2)=4: e2 next on GPU0 -> 2 local;
    # (1,1)=3: e1 next on both -> 3 local; (2,0)=5: GPU1 -> 5 local; (2,2)=1: cross. Local 11 of 15.
    assert m["cross_gpu_fraction"] == pytest.approx(4 / 15)
    assert m["cross_node_fraction"] == pytest.approx(0.0)  # one node
    assert m["objective"] == pytest.approx(0.25 + 4 / 15)
    # one GPU per node: node hops are GPU hops, and they count again in the objective
    m2 = evaluate(_plan(PHY2LOG, 2, 2, 3), RoutingTrace(load=LOAD, flow=FLOW))
    assert m2["cross_node_fraction"] == pytest.approx(4 / 15)
    assert m2["objective"] == pytest.approx(0.25 + 8 / 15)


def test_cross_node_fraction_counts_any_gpu_of_the_node():
    # 4 GPUs on 2 nodes, one slot each. e0 on GPUs 0 and 2, then on GPUs 1 and 2.
    plan = _plan([[0, 1, 0, 1], [1, 0, 0, 1]], 4, 2, 2)
    flow = np.zeros((1, 2, 2))
    flow[0, 0, 0] = 8.0
    m = evaluate(plan, RoutingTrace(load=[[6.0, 2.0], [2.0, 10.0]], flow=flow))
    # piece on GPU0 (4) leaves the GPU but meets e0 on GPU1, same node; piece on GPU2 (4) stays
    assert m["cross_gpu_fraction"] == pytest.approx(0.5)
    assert m["cross_node_fraction"] == pytest.approx(0.0)
    assert m["imbalance"] == pytest.approx([1.5, 5 / 3])


def test_traffic_matrix_conserves_flow():
    traffic = gpu_traffic(np.asarray(PHY2LOG), FLOW, 2)
    assert traffic.sum() == pytest.approx(FLOW.sum())
    assert np.trace(traffic) == pytest.approx(11.0)  # the local weight of the hand-computed case


def test_empty_layer_and_zero_flow():
    m = evaluate(_plan([[0, 1], [1, 0]], 2, 1, 2), RoutingTrace(load=[[0.0, 0.0], [1.0, 3.0]], flow=np.zeros((1, 2, 2))))
    assert m["imbalance"] == pytest.approx([1.0, 1.5])
    assert m["cross_gpu_fraction"] == 0.0 and m["cross_node_fraction"] == 0.0


def test_evaluate_rejects_mismatched_trace():
    with pytest.raises(UserInputError, match="3 experts"):
        evaluate(_plan(PHY2LOG, 2, 1, 3), RoutingTrace(load=np.ones((2, 4))))
