"""Synthetic routing traces with skewed expert popularity and tunable inter-layer affinity.

Generative model (documented in the README, used by tests and benchmarks):

    - Every token has a topic t in [0, E / K), drawn with Zipf popularity p(t) ~ 1 / (rank + 1)^skew.
    - In every layer the experts are shuffled and cut into E / K disjoint topic sets of K experts,
      independently per layer, so expert ids carry no information across layers.
    - Every expert also has a layer-local popularity, lognormal with sigma = skew.
    - In layer l a token picks K distinct experts: each pick, with probability `affinity`, is one of
      its topic's experts, otherwise any expert drawn by popularity (Gumbel top-k sampling).

A token thus tends to meet the same topic's experts layer after layer: with affinity a, about a^2 of
the (k, k2) routing pairs between two layers join the two layers' sets of the token's topic. With
affinity 0 there is no inter-layer structure and no placement can beat random on hops. Topic and
expert popularity both skew the per-expert load.
"""

from __future__ import annotations

import numpy as np

from .trace import RoutingTrace


def synthetic_trace(num_layers: int, num_experts: int, top_k: int = 8, num_tokens: int = 8192,
                    skew: float = 1.0, affinity: float = 0.8, seed: int = 0) -> RoutingTrace:
    """A trace of `num_tokens` tokens routed top-`top_k` through `num_layers` MoE layers."""
    assert num_layers >= 1 and 1 <= top_k <= num_experts and num_experts % top_k == 0, (num_experts, top_k)
    assert num_tokens >= 1 and skew >= 0 and 0.0 <= affinity <= 1.0, (num_tokens, skew, affinity)
    rng = np.random.default_rng(seed)
    num_topics = num_experts // top_k
    # 1. topic of every token, Zipf-skewed
    topic_p = 1.0 / np.arange(1, num_topics + 1) ** skew
    topic = rng.choice(num_topics, size=num_tokens, p=topic_p / topic_p.sum())  # (T,)
    load = np.zeros((num_layers, num_experts))
    flow = np.zeros((max(num_layers - 1, 0), num_experts, num_experts))
    prev = None
    for layer in range(num_layers):
        # 2. this layer's topic sets and expert popularity
        topic_sets = rng.permutation(num_experts).reshape(num_topics, top_k)  # (E/K, K)
        log_pop = rng.normal(0.0, skew, size=num_experts)  # (E,)
        chosen = _route_layer(rng, topic_sets[topic], log_pop, top_k, affinity)  # (T, K)
        # 3. counts: load per expert, and all K*K (e, e2) pairs of each token between layers
        load[layer] = np.bincount(chosen.ravel(), minlength=num_experts)
        if prev is not None:
            pairs = prev[:, :, None] * num_experts + chosen[:, None, :]  # (T, K, K)
            flow[layer - 1] = np.bincount(pairs.ravel(), minlength=num_experts**2).reshape(num_experts, num_experts)
        prev = chosen
    return RoutingTrace(load=load, flow=flow if num_layers > 1 else None)


def _route_layer(rng: np.random.Generator, own_set: np.ndarray, log_pop: np.ndarray, top_k: int,
                 affinity: float) -> np.ndarray:
    """(T, K) topic experts of each token -> (T, K) int64 distinct experts chosen by each token."""
    num_tokens = own_set.shape[0]
    num_experts = log_pop.shape[0]
    if num_experts == top_k:  # every token takes every expert
        return own_set
    # n_in picks from the topic set, the rest from all other experts; each by Gumbel top-k on popularity
    n_in = rng.binomial(top_k, affinity, size=num_tokens)  # (T,)
    score = log_pop[None, :] + rng.gumbel(size=(num_tokens, num_experts))  # (T, E)
    in_set = np.zeros((num_tokens, num_experts), dtype=bool)
    np.put_along_axis(in_set, own_set, True, axis=1)
    best_in = _top_k_sorted(np.where(in_set, score, -np.inf), top_k)  # (T, K)
    best_out = _top_k_sorted(np.where(in_set, -np.inf, score), top_k)  # (T, K)
    col = np.arange(top_k)[None, :]
    from_out = np.take_along_axis(best_out, np.clip(col - n_in[:, None], 0, top_k - 1), axis=1)
    return np.where(col < n_in[:, None], best_in, from_out)


def _top_k_sorted(score: np.ndarray, k: int) -> np.ndarray:
    """(T, E) scores -> (T, k) column ids of the k largest, largest first."""
    top = np.argpartition(-score, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(score, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)
