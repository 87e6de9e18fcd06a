"""End to end on transformers MoE models: compiled with backend='moe' vs eager.

Every model x experts implementation x dtype: outputs and gradients (router and expert weights
included) match eager, for 1, 7 and 64 tokens and batch > 1, and the report lists every MoE layer
as optimized. Most cases compile the rewritten graph with aot_eager (same AOTAutograd path, seconds
instead of minutes on 2 cores); `test_inductor_*` run the real Inductor.
"""

from __future__ import annotations

import copy

import pytest
import torch

import moecompile
from conftest import assert_close
from moecompile import models
from tiers import cover, slow

MODELS = list(models.MOE_MODELS)
IMPLS = ["grouped_mm", "batched_mm"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EXPECTED_SPEC = {  # what the detector must read off each model's code (see models.py configs)
    "mixtral": dict(num_experts=8, top_k=2, intermediate=128, renormalize=True, shared_intermediate=0),
    "qwen3_moe": dict(num_experts=16, top_k=4, intermediate=32, renormalize=True, shared_intermediate=0),
    "olmoe": dict(num_experts=16, top_k=4, intermediate=64, renormalize=False, shared_intermediate=0),
    "qwen2_moe": dict(num_experts=8, top_k=2, intermediate=32, renormalize=False, shared_intermediate=64,
                      shared_gate=True),
    "deepseek_v3": dict(num_experts=16, top_k=4, intermediate=32, renormalize=True, shared_intermediate=32,
                        scoring="sigmoid", correction_bias=True, groups="2/4 by top2_sum", routed_scaling=2.5),
    "deepseek_v2": dict(num_experts=16, top_k=4, intermediate=32, renormalize=False, shared_intermediate=32,
                        groups="2/4 by max", routed_scaling=2.5),
    "gpt_oss": dict(num_experts=8, top_k=2, intermediate=32, renormalize=False, shared_intermediate=0,
                    topk_order="topk_then_score", activation="clamped_swiglu(alpha=1.702, limit=7)",
                    layout="interleaved", expert_bias=True),
}


def _compile(model, inner="aot_eager", **options):
    return torch.compile(model, backend="moe", options={"inner": inner, **options})


def _check_report(name, layers=2):
    report = moecompile.last_report()
    rows = report.regions
    assert len({r["name"] for r in rows}) == layers, rows
    assert all(r["status"] == "optimized" and r["reason"] is None for r in rows), rows
    assert all(r["passes"] == ["fuse_gate", "fuse_epilogues", "lower"] and r["kernels"] == "torch" for r in rows)
    for r in rows:
        assert r["family"] == name and r["idiom"].endswith(("grouped-gemm", "gathered-weights")), r
        assert (r["hidden"], r["num_experts"], r["top_k"], r["intermediate"]) == (
            64, EXPECTED_SPEC[name]["num_experts"], EXPECTED_SPEC[name]["top_k"],
            EXPECTED_SPEC[name]["intermediate"])
        spec = r["spec"]
        want = EXPECTED_SPEC[name]
        assert spec["scoring"] == want.get("scoring", "softmax")
        defaults = {"correction_bias": False, "groups": None, "routed_scaling": 1.0, "activation": "silu",
                    "layout": "concat", "topk_order": "score_then_topk", "expert_bias": False}
        for field, default in defaults.items():
            assert spec[field] == want.get(field, default), (name, field, spec[field])
        assert spec["renormalize"] == EXPECTED_SPEC[name]["renormalize"]
        assert spec["shared_expert"] == EXPECTED_SPEC[name]["shared_intermediate"]
        assert spec["shared_gate"] == EXPECTED_SPEC[name].get("shared_gate", False)
    return report


# Each model once per test in the default run, every (experts implementation, dtype) pair among them,
# forward and training on other pairs (salt); the whole product runs in the slow tier.
PRODUCT = dict(name=MODELS, impl=IMPLS, dtype=list(DTYPES), pairs=[("impl", "dtype")])


@pytest.mark.parametrize("name,impl,dtype", cover(**PRODUCT))
def test_forward_matches_eager(name, impl, dtype):
    dt = DTYPES[dtype]
    model, _ = models.build(name, dtype=dt, experts_impl=impl)
    compiled = _compile(model)
    gen = torch.Generator().manual_seed(17)
    with torch.no_grad():
        for batch, tokens in ((1, 1), (1, 7), (3, 7), (2, 64)):
            ids = torch.randint(0, models.VOCAB, (batch, tokens), generator=gen)
            assert_close(compiled(ids).logits, model(ids).logits, dt, what=f"{name} {impl} B{batch} T{tokens}")
    _check_report(name)


def _train_and_compare(name, impl, dt, inner, shapes, layers=2) -> None:
    """One loss.backward() per (batch, tokens) through eager and compiled twins; every gradient
    (router and expert weights of every layer among them) and the loss must match."""
    model, _ = models.build(name, dtype=dt, experts_impl=impl, layers=layers)
    model.train()
    twin = copy.deepcopy(model)
    compiled = _compile(twin, inner=inner)
    for batch, tokens in shapes:
        ids = torch.randint(0, models.VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(tokens))
        want = model(ids, labels=ids).loss
        got = compiled(ids, labels=ids).loss
        assert_close(got, want, dt, what=f"{name} {impl} loss")
        want.backward()
        got.backward()
        moe_grads = 0
        for (pname, p), q in zip(twin.named_parameters(), model.parameters()):
            assert p.grad is not None and q.grad is not None, pname
            assert_close(p.grad, q.grad, dt, kind="grad", what=f"{name} {impl} d{pname}")
            moe_grads += ".mlp." in pname
        assert moe_grads >= 3 * layers  # router + expert weights of every layer
        model.zero_grad()
        twin.zero_grad()


@pytest.mark.parametrize("name,impl,dtype", cover(**PRODUCT, salt="train"))
def test_training_gradients_match_eager(name, impl, dtype):
    _train_and_compare(name, impl, DTYPES[dtype], "aot_eager", shapes=((2, 7), (1, 64)))
    _check_report(name)


# Inductor's compile is the slow part: the default run takes the simplest model and the two with the
# most routing and expert options; the others in the slow tier.
INDUCTOR_DEFAULT = ("mixtral", "deepseek_v3", "gpt_oss")


@pytest.mark.parametrize("name", [n if n in INDUCTOR_DEFAULT else pytest.param(
    n, marks=slow("an Inductor compile per model; the default run compiles three")) for n in MODELS])
def test_inductor_forward(name):
    model, _ = models.build(name, experts_impl="grouped_mm")
    compiled = _compile(model, inner="inductor")
    ids = torch.randint(0, models.VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(compiled(ids).logits, model(ids).logits, torch.float32, what=name)
    _check_report(name)
    assert all(g["status"] == "rewritten" for g in moecompile.last_report().graphs)


def test_inductor_training_and_dynamic_tokens():
    """Inductor end to end with backward; new token counts reuse one dynamic graph."""
    _train_and_compare("qwen2_moe", "grouped_mm", torch.float32, "inductor", shapes=((2, 5), (2, 9), (2, 33)),
                       layers=1)  # one layer: half the graph for Inductor to compile, twice
    # 5 -> static graph; 9 -> one dynamic recompile; 33 -> reuses it
    assert len(moecompile.last_report().graphs) == 2


@pytest.mark.slow(reason="Inductor compiles forward + backward of every model x experts implementation x dtype, about a minute each")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", MODELS)
def test_inductor_training_every_model(name, impl, dtype):
    _train_and_compare(name, impl, DTYPES[dtype], "inductor", shapes=((2, 11),))
    _check_report(name)
