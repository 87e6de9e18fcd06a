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
        _count(chosen, prev, layer, load, flow)
        prev = chosen
    return RoutingTrace(load=load, flow=flow if num_layers > 1 else None)


def _count(chosen: np.ndarray, prev: np.ndarray | None, layer: int, load: np.ndarray, flow: np.ndarray) -> None:
    """Into load[layer] the (T, K) picks' counts per expert; into flow[layer - 1] all K*K (pick in
    the layer before, pick here) pairs of each token."""
    num_experts = load.shape[1]
    load[layer] = np.bincount(chosen.ravel(), minlength=num_experts)
    if prev is not None:
        pairs = prev[:, :, None] * num_experts + chosen[:, None, :]  # (T, K, K)
        flow[layer - 1] = np.bincount(pairs.ravel(), minlength=num_experts**2).reshape(num_experts, num_experts)


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


def chain_trace(num_layers: int, num_experts: int, top_k: int = 8, num_tokens: int = 8192, skew: float = 1.0,
                affinity: float = 0.8, seed: int = 0, vary: float = 0.2) -> RoutingTrace:
    """A trace of another kind than `synthetic_trace`: per-slot affinity chains.

        - Expert popularity is Zipf (p ~ 1 / rank^skew) over a fresh random order in every layer.
        - Between layers l and l+1 every expert e has one successor succ_l(e) (a random permutation).
        - In layer 0 a token picks K distinct experts by popularity. In layer l+1 its pick in slot k
          is, with probability a_l, the successor of its slot-k pick in layer l; otherwise (or if
          that expert is already taken) an expert drawn by popularity.
        - a_l varies by layer: affinity + vary * u_l with u_l uniform in [-1, 1], clipped to [0, 1].

    The flow counts all K*K (pick in l, pick in l+1) pairs of each token, and only the K same-slot
    pairs carry affinity: most of the flow is unstructured, as in the traces of real routers where a
    token's k-th expert in one layer predicts its k-th (not its k2-th) in the next.
    """
    assert num_layers >= 1 and 1 <= top_k <= num_experts, (num_experts, top_k)
    assert num_tokens >= 1 and skew >= 0 and 0.0 <= affinity <= 1.0 and vary >= 0, (num_tokens, skew, affinity, vary)
    rng = np.random.default_rng(seed)
    load = np.zeros((num_layers, num_experts))
    flow = np.zeros((max(num_layers - 1, 0), num_experts, num_experts))
    rank_p = 1.0 / np.arange(1, num_experts + 1) ** skew
    prev = None
    for layer in range(num_layers):
        log_pop = np.log(rank_p[rng.permutation(num_experts)] / rank_p.sum())  # (E,)
        score = log_pop[None, :] + rng.gumbel(size=(num_tokens, num_experts))  # (T, E)
        by_popularity = _top_k_sorted(score, top_k)  # (T, K) distinct
        if prev is None:
            chosen = by_popularity
        else:
            succ = rng.permutation(num_experts)
            a = float(np.clip(affinity + vary * rng.uniform(-1.0, 1.0), 0.0, 1.0))
            follow = rng.random((num_tokens, top_k)) < a
            chosen = _fill_distinct(np.where(follow, succ[prev], -1), score, top_k)
        _count(chosen, prev, layer, load, flow)
        prev = chosen
    return RoutingTrace(load=load, flow=flow if num_layers > 1 else None)


def _fill_distinct(wanted: np.ndarray, score: np.ndarray, top_k: int) -> np.ndarray:
    """(T, K) experts wanted per slot (-1: none) -> (T, K) distinct experts: the wanted ones (the
    successors are a permutation of distinct picks, so they never collide), the free slots filled
    by the best-scored experts not yet taken, in slot order."""
    num_tokens, num_experts = score.shape
    taken = np.zeros((num_tokens, num_experts), dtype=bool)
    rows, cols = np.nonzero(wanted >= 0)
    taken[rows, wanted[rows, cols]] = True
    fill = _top_k_sorted(np.where(taken, -np.inf, score), top_k)  # (T, K) best free experts
    free = wanted < 0  # (T, K)
    order = np.cumsum(free, axis=1) - 1  # the i-th free slot takes the i-th best free expert
    return np.where(free, np.take_along_axis(fill, np.clip(order, 0, top_k - 1), axis=1), wanted)
