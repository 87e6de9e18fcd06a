"""moecompile.prepare: MoE layers whose code breaks Dynamo's graph compile as one MoE region.

Two spellings never reach the backend whole: transformers' "eager" experts implementation (a loop
over `nonzero()`) and blocks with one module per expert (`nn.ModuleList`, a loop with torch.where).
Without prepare the report says why; with it every layer is one region, eager execution is exactly
what it was, and compiled outputs and gradients match eager. CPU, tiny shapes, `inner="eager"`.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch

import moecompile
from conftest import assert_close
from helpers_moe import ListMoE, NearMoE, capture
from moecompile import config, detect, models, pipeline
from moecompile.detect.stacked import is_stacked_weight
from moecompile.fx import op_kind

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LAYERS = {"model.layers.0.mlp", "model.layers.1.mlp"}


def _compile(model):
    return torch.compile(model, backend="moe", options={"inner": "eager"})


def _rows():
    return moecompile.last_report().regions


def _gpt_oss():
    """A 2-layer GPT-OSS (transformers 5) with the eager experts loop: biases, clamped SwiGLU."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GptOssConfig(
        vocab_size=models.VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=256, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"])
    cfg._experts_implementation, cfg.use_cache = "eager", False
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its default rope config warns about YaRN factors
        return transformers.GptOssForCausalLM(cfg).eval()


def _ids(batch, tokens):
    return torch.randint(0, models.VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(tokens))


def _same_parameters(model, before: dict) -> None:
    """Same Parameter objects under the same state_dict keys as before prepare."""
    now = dict(model.named_parameters())
    assert now.keys() == before.keys() and all(now[k] is p for k, p in before.items())
    state = model.state_dict()
    assert state.keys() == before.keys() and all(state[k].data_ptr() == p.data_ptr() for k, p in before.items())


def _compare_training(eager, compiled, twin, loss_of, dt, shapes) -> None:
    """loss and every gradient, compiled twin vs eager, one backward per shape."""
    for shape in shapes:
        want, got = loss_of(eager, shape), loss_of(compiled, shape)
        assert_close(got, want, dt, what=f"loss {shape}")
        want.backward()
        got.backward()
        for (name, p), q in zip(twin.named_parameters(), eager.parameters()):
            # NOTE: a loop over the experts some token picked leaves the others without a gradient
            # (None); the stacked form gives them zeros, as a 3D expert weight does
            want_grad = torch.zeros_like(q) if q.grad is None else q.grad
            assert p.grad is not None, name
            assert_close(p.grad, want_grad, dt, kind="grad", what=f"d{name} {shape}")
        eager.zero_grad()
        twin.zero_grad()


# --- the grouped GEMM op the stacked form calls ------------------------------------------------


def test_grouped_mm_op_matches_per_expert_products_and_gradients():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(7, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    for counts in ([2, 0, 4, 1], [0, 7, 0, 0]):  # an expert without rows; every row to one expert
        offs = torch.tensor(counts).cumsum(0).to(torch.int32)
        got = torch.ops.moecompile.grouped_mm(a, w, offs)
        ends = offs.tolist()
        want = torch.cat([a[s:e] @ w[i] for i, (s, e) in enumerate(zip([0] + ends[:-1], ends))])
        torch.testing.assert_close(got, want)
        assert torch.autograd.gradcheck(lambda a_, w_: torch.ops.moecompile.grouped_mm(a_, w_, offs), (a, w))
    # the stacked form passes transposed views of (E, out, in) weights
    w_t = torch.randn(4, 3, 5, generator=gen).transpose(1, 2).requires_grad_()
    a32 = a.detach().float().requires_grad_()
    torch.library.opcheck(torch.ops.moecompile.grouped_mm.default, (a32, w_t, offs))
    # the real backward returns what the fake says: contiguous gradients, whatever w's strides
    grads = torch.ops.moecompile.grouped_mm_backward(a.detach().float(), w_t.detach(), offs, torch.randn(7, 3))
    assert all(g.is_contiguous() for g in grads)


def test_prepared_block_also_compiles_with_plain_inductor():
    """Without the moe backend the stacked form is what Inductor compiles (grouped_mm opaque)."""
    torch.manual_seed(0)
    model = ListMoE(H=32, I=24)
    twin = copy.deepcopy(model)
    moecompile.prepare(twin)
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(0))
    _compare_training(model, torch.compile(twin, backend="inductor"), twin,
                      lambda m, _: (m(x) ** 2).mean(), torch.float32, shapes=(0,))


# --- prepare itself -----------------------------------------------------------------------------


class _LayersAndHead(torch.nn.Module):
    """A list of E modules and a Linear with E outputs that is no MoE block: no warning either."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(4, 4)) for _ in range(2)])
        self.head = torch.nn.Linear(4, 2)


def test_prepare_is_a_noop_on_models_it_does_not_know():
    for model in (models.build("dense", layers=1)[0], models.build("mixtral", layers=1)[0], NearMoE(),
                  _LayersAndHead()):
        params = dict(model.named_parameters())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert moecompile.prepare(model) is model
        assert moecompile.prepared(model) == []
        assert not any("forward" in m.__dict__ for m in model.modules())
        _same_parameters(model, params)


def test_prepare_is_idempotent_and_survives_deepcopy_and_pickle():
    model = ListMoE()
    moecompile.prepare(model)
    rows = moecompile.prepared(model)
    assert len(rows) == 1 and rows[0].name == "(model)" and "8 SwiGLUExpert experts (w1/w3/w2)" in rows[0].what
    moecompile.prepare(model)
    assert moecompile.prepared(model) == rows
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert twin.forward.block is twin  # the copy's forward runs the copy, not the original
        with torch.no_grad():
            twin.gate.weight.mul_(2.0)  # the copy's own weights are the ones it runs
            assert_close(_compile(twin)(x), ListMoE.forward(twin, x), torch.float32)
        assert [r["status"] for r in _rows()] == ["optimized"]
        torch._dynamo.reset()
        moecompile.report.reset()


def test_block_prepare_cannot_reproduce_is_left_as_is_with_a_warning():
    class Scaled(ListMoE):  # routed outputs scaled by 2.5: no formulation prepare knows
        def forward(self, x):
            return super().forward(x) * 2.5

    class Biased(ListMoE):
        def __init__(self):
            super().__init__()
            for e in self.experts:
                e.w2 = torch.nn.Linear(12, 16)

    for cls, why in ((Scaled, "no formulation prepare knows"), (Biased, "has a bias")):
        model = cls()
        with pytest.warns(UserWarning, match=why):
            assert moecompile.prepare(model) is model
        assert moecompile.prepared(model) == [] and "forward" not in model.__dict__


# --- transformers' eager experts loop -------------------------------------------------------------


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_eager_experts_without_prepare_break_the_graph_and_say_so(name):
    model, (ids,) = models.build(name, experts_impl="eager")
    with torch.no_grad():
        assert_close(_compile(model)(ids).logits, model(ids).logits, torch.float32)
    # 12 graphs for 2 layers: the router's top-k ends a graph, then one break per expert hit
    assert len(moecompile.last_report().graphs) > 5
    rows = _rows()
    assert rows and all(r["status"] == "fallback" for r in rows)
    assert any("graph ends after the router's top-k" in r["reason"] and "moecompile.prepare" in r["reason"]
               for r in rows)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_prepared_eager_experts_compile_as_one_region(name, dtype):
    dt = DTYPES[dtype]
    model, _ = models.build(name, dtype=dt, experts_impl="eager")
    model.train()
    twin = copy.deepcopy(model)
    params = dict(twin.named_parameters())
    assert moecompile.prepare(twin) is twin
    assert [r.name for r in moecompile.prepared(twin)] == [f"model.layers.{i}.mlp.experts" for i in (0, 1)]
    _same_parameters(twin, params)
    assert twin.config._experts_implementation == "eager"  # the config is left alone
    with torch.no_grad():  # eager execution is exactly what it was
        for shape in ((1, 1), (3, 7)):
            assert torch.equal(twin(_ids(*shape)).logits, model(_ids(*shape)).logits)
    compiled = _compile(twin)
    _compare_training(model, compiled, twin, lambda m, s: m(_ids(*s), labels=_ids(*s)).loss, dt,
                      shapes=((2, 7), (1, 12)))
    rows = _rows()
    assert {r["name"] for r in rows} == LAYERS
    assert all(r["status"] == "optimized" and r["reason"] is None for r in rows), rows
    # one graph per shape signature (static, then dynamic T), every one whole
    assert len(moecompile.last_report().graphs) == 2


def test_gpt_oss_eager_experts_prepared_trace_whole_and_are_optimized():
    model = _gpt_oss()
    ids = _ids(2, 9)
    with torch.no_grad():
        want = model(ids).logits
        assert_close(_compile(model)(ids).logits, want, torch.float32)
    assert len(moecompile.last_report().graphs) > 5  # without prepare: broken up by the loop
    torch._dynamo.reset()
    moecompile.report.reset()
    moecompile.prepare(model)
    assert [r.name for r in moecompile.prepared(model)] == [f"model.layers.{i}.mlp.experts" for i in (0, 1)]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
        assert_close(_compile(model)(ids).logits, want, torch.float32)
    assert len(moecompile.last_report().graphs) == 1  # one graph: nothing breaks it any more
    rows = _rows()
    assert {r["name"] for r in rows} == LAYERS
    # expert biases and the clamped SwiGLU are in the spec: optimized
    assert all(r["status"] == "optimized" and r["spec"]["expert_bias"] for r in rows), rows


# --- per-expert ModuleList blocks -------------------------------------------------------------------


def test_expert_list_without_prepare_never_reaches_the_backend_as_a_layer():
    x = torch.randn(2, 5, 16)
    # range(E): the break at torch.where inside the loop skips the whole block's frame; only the
    # experts' MLPs are compiled, as graphs of their own, so no graph shows a router. Never silent:
    # each such graph's row names the block and says it holds one expert of a list
    model = ListMoE(loop="range")
    with torch.no_grad():
        assert_close(_compile(model)(x), model(x), torch.float32)
    graphs, rows = moecompile.last_report().graphs, _rows()
    assert graphs and all(g["status"] == "unchanged" for g in graphs)
    assert rows and all(r["status"] == "fallback" and r["name"] == "(model)"
                        and "expert module" in r["reason"] for r in rows), rows
    torch._dynamo.reset()
    moecompile.report.reset()
    # a loop over nonzero(): the graph ends after top-k, and the report says so
    model = ListMoE(loop="hit")
    with torch.no_grad():
        assert_close(_compile(model)(x), model(x), torch.float32)
    rows = _rows()
    # (and the experts' graphs after the break have rows of their own, each with its reason)
    assert rows and all(r["status"] == "fallback" and r["reason"] for r in rows), rows
    assert sum("moecompile.prepare" in r["reason"] for r in rows) == 1, rows


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("variant", [
    dict(loop="range"),
    dict(loop="hit"),
    dict(loop="range", renormalize=False, router_logits=True),
    dict(loop="hit", order="topk_then_score", renormalize=False),
])
def test_prepared_expert_list_compiles_as_one_region(variant, dtype):
    dt = DTYPES[dtype]
    torch.manual_seed(0)
    model = ListMoE(H=32, I=24, **variant).to(dt)
    twin = copy.deepcopy(model)
    params = dict(twin.named_parameters())
    moecompile.prepare(twin)
    assert len(moecompile.prepared(twin)) == 1
    _same_parameters(twin, params)

    def loss_of(m, tokens):
        x = torch.randn(2, tokens, 32, generator=torch.Generator().manual_seed(tokens)).to(dt)
        out = m(x)
        out = out[0] + out[1].sum() if isinstance(out, tuple) else out  # router logits feed the loss too
        return (out.float() ** 2).mean()

    with torch.no_grad():
        assert torch.equal(loss_of(twin, 5), loss_of(model, 5))  # eager: exactly as before
    _compare_training(model, _compile(twin), twin, loss_of, dt, shapes=(5, 9))
    rows = _rows()
    assert rows and all(r["status"] == "optimized" for r in rows), rows
    # a softmax over the top-k logits is the renormalized top-k of the softmax: the same function,
    # and prepare keeps the first formulation that fits
    renormalized = variant.get("renormalize", True) or variant.get("order") == "topk_then_score"
    spec = rows[0]["spec"]
    assert (spec["layout"], spec["activation"], spec["renormalize"]) == ("separate", "silu", renormalized)


def test_optimizer_built_before_prepare_keeps_training_the_same_parameters():
    torch.manual_seed(0)
    model = ListMoE()
    twin = copy.deepcopy(model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin)]
    moecompile.prepare(twin)
    compiled = _compile(twin)
    x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(0))
    for m, opt in ((model, opts[0]), (compiled, opts[1])):
        (m(x) ** 2).mean().backward()
        opt.step()
    for p, q in zip(twin.parameters(), model.parameters()):
        assert_close(p, q, torch.float32)
    assert not torch.equal(twin.gate.weight, ListMoE().gate.weight)


def test_stacked_weights_are_the_layer_inputs_and_stay_in_the_graph():
    model = ListMoE()
    moecompile.prepare(model)
    x = torch.randn(2, 5, 16)

    gm, inputs = capture(model, x)
    (cand,) = detect.find_candidates(gm)
    assert cand.reason is None, cand.reason
    _, weights = cand.options[0]
    assert [is_stacked_weight(w) for w in weights] == [False, True, True, True]  # router, gate, up, down
    assert not any(is_stacked_weight(n) for n in cand.nodes)
    outcome = pipeline.run(gm, inputs, config.make({}), graph_id=0)
    assert outcome.changed and [r["status"] for r in outcome.regions] == ["optimized"]
    targets = [str(n.target) for n in gm.graph.nodes]
    assert targets.count("moecompile.moe.default") == 1
    assert sum(op_kind(n) == "stack" for n in gm.graph.nodes) == 3  # the op reads the stacked weights
    assert not any(op_kind(n) == "topk" or "grouped_mm" in t for n, t in zip(gm.graph.nodes, targets))
    with torch.no_grad():
        assert_close(gm(*inputs)[0], ListMoE.forward(model, x), torch.float32)
