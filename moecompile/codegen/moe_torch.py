"""The MoE layer in plain torch: a fast sorted path and an eager reference with the same signature.

Both take `(x (T, H), weights: list per spec.weight_names(), spec)` and return `(T, H)` in x's dtype.
The fast path is what the `moecompile::moe` op runs when no Triton kernel applies:

    Matches:   per-token top-k routing, then K expert MLPs per token, weighted and summed
    Rewrites to:
        w, ids   = route(x)                          (T, K) float, (T, K) int64
        perm     = argsort(ids.flatten())            (T*K,)  token-expert pairs grouped by expert
        xs       = x.index_select(0, perm // K)      (T*K, H)
        h        = grouped_mm(xs, W_gate_up, offs)   (T*K, 2I)   one GEMM per expert, no padding
        y        = grouped_mm(act(g) * u, W_down)    (T*K, H)
        out[t]   = sum_k w[t, k] * y[inv_perm][t, k] (T, H)      gather + sum: deterministic

The op's forward (`inplace`) reuses its buffers: the activation runs in place, and on CPU the
intermediates live in per-thread scratch buffers (`_Scratch`) that the GEMMs write into, the routing
weights scale the I-wide rows before the down GEMM, and the combine is an `index_add_` (in index
order on CPU, so still deterministic), into the shared expert's output when there is one.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from ..ir import MoESpec


def route(x: torch.Tensor, weights: dict[str, torch.Tensor], spec: MoESpec, ids: torch.Tensor | None = None):
    """Router: (T, H) -> top-k weights (T, K) and expert ids (T, K) int64, as the traced code did.
    With `ids` (the forward's choice, saved for the backward) the experts are those: the weights are
    the same function of the logits, and their gradient the same, as when top-k picks them.
    A traced router (spec.router == "traced") computed them outside the op: they are its inputs."""
    if spec.router == "traced":
        return weights["routing_weights"], (weights["routing_ids"] if ids is None else ids).long()
    return topk_of_logits(router_logits(x, weights, spec), weights, spec, ids)


def router_logits(x: torch.Tensor, weights: dict[str, torch.Tensor], spec: MoESpec) -> torch.Tensor:
    """(T, H) -> (T, E): the router GEMM, in float32 when the spec says so (DeepSeek)."""
    if spec.router_gemm_fp32:
        bias = weights.get("router_bias")
        return F.linear(x.float(), weights["router_weight"].float(), None if bias is None else bias.float())
    return F.linear(x, weights["router_weight"], weights.get("router_bias"))


def topk_of_logits(logits: torch.Tensor, weights: dict[str, torch.Tensor], spec: MoESpec,
                   ids: torch.Tensor | None = None):
    """(T, E) logits -> top-k weights (T, K) and expert ids (T, K) int64: scoring, the choice,
    renormalization, routed scaling, capacity. `ids` given: those experts instead of top-k's (the
    values top-k returns are the gathered ones, so weights and gradients are the same)."""
    scores_in = logits.float() if spec.router_fp32 else logits
    score = torch.softmax if spec.scoring == "softmax" else (lambda t, dim: torch.sigmoid(t))

    def top(values):
        if ids is None:
            return torch.topk(values, spec.top_k, dim=-1)
        return values.gather(1, ids.long()), ids.long()

    if spec.topk_order == "score_then_topk":
        scores = score(scores_in, dim=-1)  # (T, E)
        choice = _choice(scores, weights, spec)
        topk_w, topk_ids = top(choice)
        if spec.weights_from == "gather":
            topk_w = scores.gather(1, topk_ids)
    else:
        top_logits, topk_ids = top(scores_in)
        topk_w = score(top_logits, dim=-1)
    if spec.renormalize:
        total = topk_w.sum(dim=-1, keepdim=True)
        topk_w = topk_w / (total + spec.renorm_eps if spec.renorm_eps else total)
    if spec.routed_scaling != 1.0:
        topk_w = topk_w * spec.routed_scaling
    if spec.weights_in_input_dtype:
        topk_w = topk_w.to(logits.dtype)
    if spec.capacity_factor:
        topk_w = topk_w * _within_capacity(topk_ids, spec).to(topk_w.dtype)
    return topk_w, topk_ids


def _within_capacity(topk_ids: torch.Tensor, spec: MoESpec) -> torch.Tensor:
    """(T, K) bool: the (token, k) pairs each expert takes before it is full (Switch / GShard)."""
    T, K = topk_ids.shape
    flat = (topk_ids.t() if spec.capacity_order == "k_major" else topk_ids).reshape(-1)  # pairs in order
    _, order = torch.sort(flat, stable=True)  # (T*K,) grouped by expert, in pair order within each
    counts = torch.bincount(flat, minlength=spec.num_experts)
    starts = torch.cumsum(counts, 0) - counts  # (E,) first sorted position of each expert
    rank = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]  # position in its expert
    position = torch.empty_like(rank).scatter_(0, order, rank)
    keep = position < spec.capacity(T)
    return keep.view(K, T).t() if spec.capacity_order == "k_major" else keep.view(T, K)


def _choice(scores: torch.Tensor, weights: dict[str, torch.Tensor], spec: MoESpec) -> torch.Tensor:
    """(T, E) values top-k picks experts by: scores [+ correction bias], experts outside the
    `top_groups` best groups set to `masked_score` (DeepSeek's group-limited routing)."""
    choice = scores + weights["router_correction_bias"] if spec.correction_bias else scores
    if spec.groups == 1:
        return choice
    T, G = choice.shape[0], spec.groups
    grouped = choice.view(T, G, spec.num_experts // G)  # (T, G, E/G)
    if spec.group_score == "top2_sum":
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (T, G)
    else:
        group_scores = grouped.amax(dim=-1)
    keep = torch.topk(group_scores, spec.top_groups, dim=-1).indices  # (T, top_groups)
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter(1, keep, True)
    expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(T, spec.num_experts)
    return choice.masked_fill(~expert_mask, spec.masked_score)


_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
    "relu2": lambda t: F.relu(t).square(),
}


def _split_gate_up(h: torch.Tensor, spec: MoESpec):
    if spec.layout == "interleaved":
        return h[..., ::2], h[..., 1::2]
    gate, up = h.chunk(2, dim=-1)
    return gate, up


def _as_in_out(w: torch.Tensor, spec: MoESpec) -> torch.Tensor:
    """Expert weight as (E, in, out), the layout grouped_mm multiplies by."""
    return w if spec.transposed else w.transpose(-2, -1)


# Gate and up as two GEMMs (so act(gate) * up runs in place on contiguous rows) pays from about
# I = 256 on CPU; below, the extra per-expert GEMM calls cost more than the strided multiply saves
# (measured on the demo models' layers, 2-core Xeon, 2026-11-23).
_SPLIT_MIN_I = 256
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def use_grouped_mm(a: torch.Tensor, w: torch.Tensor, rows: int, num_experts: int) -> bool:
    """torch's grouped_mm or a loop of one mm per active expert?

    NOTE: grouped_mm wants 16-byte aligned rows and, on CUDA, bf16 on sm80+; anything else (odd H/I
    tails, fp32 on CUDA) takes the loop, which is just as exact. On CPU grouped_mm walks all E
    groups in C++; with fewer (token, expert) rows than experts (decode) most groups are empty and
    the loop over the active ones is faster (measured: benchmarks/results/README.md).
    """
    if not hasattr(F, "grouped_mm") or a.dtype not in _GROUPED_MM_DTYPES or not _aligned(a, w):
        return False
    if a.device.type == "cuda":
        return a.dtype == torch.bfloat16 and torch.cuda.get_device_capability(a.device) >= (8, 0)
    return a.device.type == "cpu" and rows >= num_experts


def _aligned(a: torch.Tensor, w: torch.Tensor) -> bool:
    """grouped_mm's layout rules: 16-byte aligned rows, and a weight that is row- or column-major
    per expert (a strided view, e.g. the gate half of an interleaved weight, is neither)."""
    if 1 not in (w.stride(-1), w.stride(-2)):
        return False
    return not any((d * a.element_size()) % 16 for d in (a.shape[-1], w.shape[-2], w.shape[-1]))


class _Groups:
    """Rows sorted by expert: offsets for grouped_mm, or per-expert counts for the loop."""

    def __init__(self, counts: torch.Tensor, grouped: bool):  # counts (E,) int64
        self.grouped = grouped
        self.offs = torch.cumsum(counts, dim=0).to(torch.int32) if grouped else None  # (E,)
        self._counts_t = counts
        self._counts: list[int] | None = None

    def linear(self, a: torch.Tensor, w_in_out: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """(S, in) rows grouped by expert @ (E, in, out) -> (S, out), into `out` if given."""
        if out is None and self.grouped and _aligned(a, w_in_out):
            if a.stride(-1) != 1 or (a.stride(0) * a.element_size()) % 16:
                a = a.contiguous()
            return F.grouped_mm(a, w_in_out, offs=self.offs)
        if self._counts is None:
            self._counts = self._counts_t.tolist()  # one host sync, shared by both GEMMs
        if out is not None:  # no autograd through out=: only the op's forward passes `out`
            start = 0
            for e, n in enumerate(self._counts):
                if n:
                    torch.mm(a[start:start + n], w_in_out[e], out=out[start:start + n])
                    start += n
            return out
        pieces, start = [], 0
        for e, n in enumerate(self._counts):
            if n:
                pieces.append(a[start:start + n] @ w_in_out[e])
                start += n
        if not pieces:
            return a.new_zeros(a.shape[0], w_in_out.shape[-1])
        return torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0]


# Average rows per expert from which the GEMMs write into the scratch buffers (a loop of mm): the
# page faults a fresh output costs then outweigh the loop's Python cost per expert (about 3 us);
# below, grouped_mm (fresh output) is faster (measured at E = 16..128, 2-core Xeon, 2026-11-23).
_SCRATCH_GEMM_MIN_ROWS = 16
# Largest buffer the CPU scratch keeps per slot and thread; bigger ones are allocated per call.
SCRATCH_MAX_BYTES = 64 << 20


class _Scratch(threading.local):
    """Per-thread CPU buffers for the op's intermediates, kept between calls.

    NOTE: a fresh multi-MB CPU tensor costs a page fault per 4 KiB page on first write, which at
    512 tokens is as much as the elementwise work around the GEMMs (measured on the demo models,
    2-core Xeon VM, 2026-11-23: about 0.3 ms per MB). The op's forward writes its sorted rows and
    expert activations here instead; nothing it returns aliases these buffers. CUDA needs none of
    this: its caching allocator already reuses memory.
    """

    def __init__(self):
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def take(self, slot: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        """A (rows, cols) tensor of like's dtype; its contents are garbage."""
        numel = rows * cols
        if numel * like.element_size() > SCRATCH_MAX_BYTES:
            return like.new_empty(rows, cols)
        buf = self.buffers.get((slot, like.dtype))
        if buf is None or buf.numel() < numel:
            # a normal tensor even under inference_mode, so later calls outside it may write into it
            with torch.inference_mode(False):
                buf = self.buffers[(slot, like.dtype)] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel].view(rows, cols)


_scratch = _Scratch()


def release_scratch() -> None:
    """Free the calling thread's CPU scratch buffers (they are reallocated on the next call)."""
    _scratch.buffers.clear()


def _gated(spec: MoESpec, gate: torch.Tensor, up: torch.Tensor, inplace: bool) -> torch.Tensor:
    """act(gate) * up; with `inplace` (gate a view of a fresh GEMM output, rows of unit stride),
    written over gate: no (T*K, I) allocation, the costly part of an elementwise op on CPU."""
    act_name = spec.activation
    if act_name not in _ACTIVATIONS:  # the clamped and softcapped forms, with their constants
        return gated_activation(gate, up, act_name, spec.act_alpha, spec.act_limit)
    if inplace and gate.stride(-1) == 1:
        act = F.silu(gate, inplace=True) if act_name == "silu" else _ACTIVATIONS[act_name](gate)
        return act.mul_(up)
    return _ACTIVATIONS[act_name](gate) * up


def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str, alpha: float = 1.0,
                     limit: float = 0.0) -> torch.Tensor:
    """act(gate) * up for every gated activation of the spec, the clamped ones included."""
    if activation == "clamped_swiglu":
        return clamped_swiglu(gate, up, alpha, limit)
    if activation == "clamped_silu":
        return F.silu(gate.clamp(max=limit)) * up.clamp(-limit, limit)
    if activation == "softcap_swiglu":
        return alpha * torch.tanh(gate / alpha) * torch.sigmoid(gate) * (limit * torch.tanh(up / limit))
    return _ACTIVATIONS[activation](gate) * up


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS's gated activation: (up.clamp(-limit, limit) + 1) * g * sigmoid(alpha * g), with
    g = gate.clamp(max=limit)."""
    g = gate.clamp(max=limit)
    return (up.clamp(-limit, limit) + 1) * (g * torch.sigmoid(g * alpha))


def _plus_bias(h: torch.Tensor, bias: torch.Tensor | None, expert: torch.Tensor, inplace: bool) -> torch.Tensor:
    """h (S, N) rows of experts `expert` (S,) + bias[expert] (E, N); h unchanged without a bias."""
    if bias is None:
        return h
    rows = bias.index_select(0, expert)
    return h.add_(rows) if inplace else h + rows


def _gate_up_weights(w: torch.Tensor, spec: MoESpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the gate and the up halves of a fused (E, 2I, H) weight (or (E, H, 2I) transposed)."""
    axis = -1 if spec.transposed else -2
    if spec.layout == "interleaved":
        index = [slice(None)] * 3
        gate, up = list(index), list(index)
        gate[axis], up[axis] = slice(0, None, 2), slice(1, None, 2)
        return w[tuple(gate)], w[tuple(up)]
    gate, up = w.chunk(2, dim=axis)
    return gate, up


def _routed_experts_sorted(x, topk_w, topk_ids, weights, spec: MoESpec, inplace: bool = False,
                           acc: torch.Tensor | None = None) -> torch.Tensor:
    """(T, H) weighted sum of each token's K expert outputs, in x's dtype; with `acc` (T, H) in
    x's dtype, that sum added into acc (which is returned)."""
    T, K = topk_ids.shape
    H, I = spec.hidden, spec.intermediate
    flat_ids = topk_ids.reshape(-1)  # (T*K,)
    # any order within an expert is fine: every (token, k) row is computed alone and put back in place
    perm = torch.sort(flat_ids).indices  # (T*K,)
    token = perm // K  # (T*K,) token of each sorted row
    expert = flat_ids[perm] if spec.expert_bias else None  # (T*K,) expert of each sorted row
    bias = (lambda name: weights[name]) if spec.expert_bias else (lambda name: None)  # noqa: E731
    first = weights["gate_proj" if spec.layout == "separate" else ("gate_up_proj" if spec.gated else "up_proj")]
    # inplace on CPU: intermediates go to the scratch buffers; with enough rows per expert the
    # GEMMs write into them too, through a loop of mm (grouped_mm has no out=)
    scratch = inplace and x.device.type == "cpu"
    gemm_into_scratch = scratch and T * K >= _SCRATCH_GEMM_MIN_ROWS * spec.num_experts
    groups = _Groups(torch.bincount(flat_ids, minlength=spec.num_experts),
                     not gemm_into_scratch and use_grouped_mm(x, first, T * K, spec.num_experts))
    rows = _scratch.take("rows", T * K, H, x) if scratch else None
    # (T*K, H); index_select is several times faster than x[token] on CPU
    xs = torch.index_select(x, 0, token, out=rows) if scratch else x.index_select(0, token)

    def into(cols: int, half: int = 0):  # scratch for a GEMM output: the whole (T*K, 2I) or a half
        if not gemm_into_scratch:
            return None
        buf = _scratch.take("inner", 2 * T * K, cols, x) if half else _scratch.take("inner", T * K, cols, x)
        return buf[(half - 1) * T * K: half * T * K] if half else buf

    def project(name: str, w: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:  # (T*K, out) + bias
        return _plus_bias(groups.linear(xs, _as_in_out(w, spec), out), bias(name + "_bias"), expert, inplace)

    if spec.layout == "separate":
        gate = project("gate_proj", weights["gate_proj"], into(I, 1))
        h = _gated(spec, gate, project("up_proj", weights["up_proj"], into(I, 2)), inplace)
    elif spec.gated and inplace and I >= _SPLIT_MIN_I and not spec.expert_bias:
        # two half-width GEMMs give contiguous gate and up, so act(gate) * up needs no new buffer
        w_gate, w_up = _gate_up_weights(weights["gate_up_proj"], spec)
        gate = groups.linear(xs, _as_in_out(w_gate, spec), into(I, 1))
        h = _gated(spec, gate, groups.linear(xs, _as_in_out(w_up, spec), into(I, 2)), inplace)
    elif spec.gated:
        gate, up = _split_gate_up(project("gate_up_proj", weights["gate_up_proj"], into(2 * I)), spec)
        h = _gated(spec, gate, up, inplace)
    else:
        h = _ACTIVATIONS[spec.activation](project("up_proj", weights["up_proj"], into(I)))
    w_sorted = topk_w.reshape(-1)[perm].unsqueeze(-1)  # (T*K, 1)
    if inplace and x.device.type == "cpu" and h.dtype == torch.promote_types(h.dtype, w_sorted.dtype):
        # (w * h) @ W_down + w * b == w * (h @ W_down + b): scaling the I-wide rows costs less than
        # the H-wide ones, and CPU index_add_ adds rows in index order, so the combine is
        # deterministic. The sorted rows of x are dead by now: the down GEMM writes over them.
        # NOTE: on CUDA index_add_ uses atomics, hence the gather + sum below there.
        y = groups.linear(h.mul_(w_sorted), _as_in_out(weights["down_proj"], spec),
                          rows if gemm_into_scratch else None)  # (T*K, H)
        if spec.expert_bias:
            y.add_(weights["down_proj_bias"].index_select(0, expert).mul_(w_sorted))
        return (y.new_zeros(T, H) if acc is None else acc).index_add_(0, token, y)
    y = _plus_bias(groups.linear(h, _as_in_out(weights["down_proj"], spec)), bias("down_proj_bias"), expert,
                   inplace)  # (T*K, H)
    y = y * w_sorted  # promotes to the weights' dtype, as traced code does
    unsorted = torch.empty_like(y).index_copy(0, perm, y)  # (T*K, H) back in (token, k) order
    out = unsorted.view(T, K, H).sum(dim=1).to(x.dtype)
    return out if acc is None else acc.add_(out)


def _shared_expert(x, weights, spec: MoESpec) -> torch.Tensor:
    h = _gated(spec, F.linear(x, weights["shared_gate_proj"]), F.linear(x, weights["shared_up_proj"]), False)
    out = F.linear(h, weights["shared_down_proj"])  # (T, H)
    if spec.shared_gate:
        out = torch.sigmoid(F.linear(x, weights["shared_expert_gate"])) * out
    return out


def _shared_expert_cpu(x, weights, spec: MoESpec) -> torch.Tensor:
    """`_shared_expert` for the op's forward on CPU: intermediates in the scratch buffers, the down
    GEMM straight into a fresh (T, H) output that the routed experts then add into."""
    T, Ish = x.shape[0], spec.shared_intermediate
    inner = _scratch.take("inner", 2 * T, Ish, x)
    gate = torch.mm(x, weights["shared_gate_proj"].t(), out=inner[:T])
    h = _gated(spec, gate, torch.mm(x, weights["shared_up_proj"].t(), out=inner[T:]), True)
    out = torch.mm(h, weights["shared_down_proj"].t(), out=x.new_empty(T, spec.hidden))
    if spec.shared_gate:
        out.mul_(torch.sigmoid(F.linear(x, weights["shared_expert_gate"])))
    return out


def named_weights(weights, spec: MoESpec) -> dict[str, torch.Tensor]:
    names = spec.weight_names()
    if len(weights) != len(names):
        raise ValueError(f"moe op for this spec takes {len(names)} weights {names}, got {len(weights)}")
    return dict(zip(names, weights))


def moe_forward(x: torch.Tensor, weights: list[torch.Tensor], spec: MoESpec,
                on_route=None, inplace: bool = False) -> torch.Tensor:
    """Fast torch path: (T, H) -> (T, H). Differentiable with torch autograd / torch.func unless
    `inplace`, which reuses intermediate buffers (the op's forward, where nothing records them).

    `on_route(topk_ids (T, K) int64)`, if given, sees the routing decision (routing traces).
    """
    w = named_weights(weights, spec)
    topk_w, topk_ids = route(x, w, spec)
    if on_route is not None:
        on_route(topk_ids)
    # NOTE: a sum screens for NaN / Inf without a (T, H) mask (isfinite(x).all() costs 2.4 ms at
    # 512 x 4096 fp32 on 2 cores, the sum 0.17 ms); a sum that overflows only costs the exact check.
    if x.device.type == "cpu" and x.numel() and not bool(torch.isfinite(x.sum())):
        bad = ~torch.isfinite(x).all(dim=-1)  # (T,)
        if bool(bad.any()):
            return _nonfinite_rows_alone(x, w, spec, topk_w, topk_ids, inplace, bad)
    return _experts(x, w, spec, topk_w, topk_ids, inplace)


def _experts(x, w, spec: MoESpec, topk_w, topk_ids, inplace: bool) -> torch.Tensor:
    """The routed experts (and the shared one) for a routing decision: (T, H)."""
    if spec.shared_intermediate and inplace and x.device.type == "cpu":
        # the shared expert first, computed into the output; the routed experts add into it
        return _routed_experts_sorted(x, topk_w, topk_ids, w, spec, inplace, acc=_shared_expert_cpu(x, w, spec))
    out = _routed_experts_sorted(x, topk_w, topk_ids, w, spec, inplace)
    if spec.shared_intermediate:
        out = out + _shared_expert(x, w, spec)
    return out


def _nonfinite_rows_alone(x, w, spec: MoESpec, topk_w, topk_ids, inplace: bool, bad) -> torch.Tensor:
    """A token's expert outputs depend on that token alone, NaN or Inf included.

    NOTE: CPU GEMM kernels can carry a NaN from one row into its neighbours (bf16 kernels pack rows
    in pairs; measured on torch 2.13 CPU: a NaN in row 46 of 92 gave NaN in rows 45 and 46 of
    x @ W.T), and the sorted path puts other tokens' rows next to it. The routing is the traced
    layer's (the same router GEMM over the same rows); the experts run on the rows with non-finite
    entries zeroed (`bad` (T,) bool), and those rows are then computed one at a time by the reference.
    """
    out = _experts(x.masked_fill(bad.unsqueeze(-1), 0), w, spec, topk_w, topk_ids, inplace)
    rows = bad.nonzero().view(-1)
    weights = list(w.values())
    alone = torch.cat([moe_forward_reference(x[r:r + 1], weights, spec) for r in rows.tolist()])
    return out.index_copy(0, rows, alone.to(out.dtype))


def moe_forward_reference(x: torch.Tensor, weights: list[torch.Tensor], spec: MoESpec,
                          on_route=None, inplace: bool = False) -> torch.Tensor:
    """Eager reference: the textbook per-token, per-expert loop. Slow; for tests and benchmarks.
    Same signature as `moe_forward`; `inplace` changes nothing here."""
    w = named_weights(weights, spec)
    topk_w, topk_ids = route(x, w, spec)
    if on_route is not None:
        on_route(topk_ids)
    acc = torch.zeros(x.shape[0], x.shape[1], dtype=torch.promote_types(x.dtype, topk_w.dtype),
                      device=x.device)

    def linear(xe, name, e):  # one expert's projection, with its bias if the spec has biases
        out = xe @ _as_in_out(w[name], spec)[e]
        return out + w[name + "_bias"][e] if spec.expert_bias else out

    for e in range(spec.num_experts):
        tok, slot = torch.where(topk_ids == e)
        if tok.numel() == 0:
            continue
        xe = x[tok]
        if spec.layout == "separate":
            h = _gated(spec, linear(xe, "gate_proj", e), linear(xe, "up_proj", e), False)
        elif spec.gated:
            gate, up = _split_gate_up(linear(xe, "gate_up_proj", e), spec)
            h = _gated(spec, gate, up, False)
        else:
            h = _ACTIVATIONS[spec.activation](linear(xe, "up_proj", e))
        y = linear(h, "down_proj", e)
        acc = acc.index_add(0, tok, y * topk_w[tok, slot].unsqueeze(-1))
    out = acc.to(x.dtype)
    if spec.shared_intermediate:
        out = out + _shared_expert(x, w, spec)
    return out
