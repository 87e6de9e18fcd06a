"""Every MoE family of the installed transformers, tiny (moecompile.families), compiled vs eager.

One test id per family that `families.moe_families()` enumerates from transformers, so a family a
new transformers adds shows up as a new id. Default run: forward under no_grad with the rewritten
graph run without Inductor (`inner="eager"`), outputs within fp32 tolerance of eager, nothing
crashes. `-m slow`: forward + backward (every parameter's gradient, the token embeddings among them)
for each experts implementation the family can switch to.

With MOECOMPILE_FAMILY_RESULTS=<dir>, each family's result goes to <dir>/<family>.json: its expert
modules, the report rows (name, status, reason), the top-k ops detection passed over without a row,
the graphs compiled, and whether the outputs matched. `scripts/family_table.py` builds the support
table from those files.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import time
import warnings

import pytest
import torch

import moecompile
import moecompile.report
from conftest import TOLERANCE, assert_close, assert_grads_close
from moecompile import detect
from moecompile.tools import families
from moecompile.files import write_text
from tiers import slow

FAMILIES = families.moe_families()
# Families with expert modules the report does not list yet, and why (open work, not accepted):
# family -> why a module holding expert weights that ran still has no report row (none today: every
# family's expert layers are reported, optimized or with the reason); an entry that stops being
# silent fails, so the list only shrinks
KNOWN_SILENT: dict[str, str] = {}
RESULTS = os.environ.get("MOECOMPILE_FAMILY_RESULTS")
# The default run's families: the demo models' (optimized, switchable experts), every family whose
# experts are its own module class (each a different traced form), and one family per kind of
# fallback or graph split the support table shows. The other families repeat these code paths with
# other names and sizes; they run in the slow tier (CI runs both), as does every family a new
# transformers adds.
DEFAULT_FAMILIES = {
    # demo models
    "mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v3", "deepseek_v2", "gpt_oss",
    # experts as their own module classes
    "dbrx", "doge", "jetmoe", "llama4", "longcat_flash", "nllb-moe", "step3p7", "switch_transformers",
    # fallbacks, partial optimization, graph splits, shared experts, hybrid stacks
    "cohere2_moe", "granitemoehybrid", "deepseek_v4", "laguna", "zaya", "phimoe", "ernie4_5_moe", "hy_v4",
    "inkling2", "openai_privacy_filter", "qwen4_exp", "granitemoeshared", "jamba", "nemotron_h",
    "vitpose_backbone",
}
TIERED = [name if name in DEFAULT_FAMILIES else pytest.param(
    name, marks=slow("one of the families that repeat the default set's code paths")) for name in FAMILIES]
SWITCHABLE = "eager/grouped_mm/batched_mm"  # families.experts_kind of @use_experts_implementation experts


def _build(name: str, record: bool = False, **kwargs):
    try:
        return families.build_family(name, **kwargs)
    except families.FamilyUnavailable as err:
        if record:
            _write_result(name, {"family": name, "unavailable": err.reason})
        pytest.skip(err.reason)


def _module_path(node) -> str:
    """The module a traced node came from: "L['self'].model.layers[0].mlp.gate" -> "model.layers.0.mlp.gate"."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = re.sub(r"\[(\d+)\]", r".\1", re.sub(r"^L\['self'\]\.?", "", path))
    return re.sub(r"\['([^']+)'\]", r".\1", path).strip(".")


def _record_candidates(monkeypatch) -> list[dict]:
    """Every top-k the detector looks at, with the module it came from and why it was declined:
    the ones without a router get no report row, and the table must still show them."""
    seen: list[dict] = []
    find = detect.find_candidates

    def recording(gm):
        found = find(gm)
        seen.extend({"module": _module_path(c.topk), "topk": c.topk.name, "reported": c.x is not None,
                     "reason": c.reason} for c in found)
        return found

    monkeypatch.setattr(detect, "find_candidates", recording)
    return seen


@contextlib.contextmanager
def _modules_that_run(model, names: list[str]):
    """The modules of `names` that the forward inside the block calls (filled in as they run): the
    vision experts of a text-only input hold expert weights, but no graph can read them."""
    ran: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda _m, _a, n=n: ran.append(n) if n not in ran else None)
             for n in names for m in model.get_submodule(n).modules()]  # a ModuleList is never called
    try:
        yield ran
    finally:
        for h in hooks:
            h.remove()


def _matches(got: torch.Tensor, want: torch.Tensor) -> bool:
    try:
        assert_close(got, want, torch.float32)
    except AssertionError:
        return False
    return True


def _write_result(name: str, result: dict) -> None:
    if RESULTS:  # one file per family: safe under parallel or repeated runs
        write_text(os.path.join(RESULTS, f"{name}.json"), json.dumps(result, indent=1, default=str) + "\n",
                   make_dirs=True)


def test_the_default_families_are_enumerated():
    """A default-run family transformers no longer has (or a typo) would drop out unnoticed."""
    assert DEFAULT_FAMILIES <= set(FAMILIES), sorted(DEFAULT_FAMILIES - set(FAMILIES))


@pytest.mark.parametrize("name", TIERED)
def test_family_forward_matches_eager(name, monkeypatch):
    t0 = time.perf_counter()
    model, inputs = _build(name, record=True)
    experts = families.expert_modules(model)
    candidates = _record_candidates(monkeypatch)
    torch._dynamo.reset()
    moecompile.report.reset()
    compiled = torch.compile(model, backend="moe", options={"inner": "eager"})
    with torch.no_grad(), _modules_that_run(model, experts) as ran:
        want = model(**inputs)[0]
    with torch.no_grad():
        got = compiled(**inputs)[0]
    report = moecompile.last_report()
    _write_result(name, {
        "family": name, "model_class": type(model).__name__, "experts_kind": families.experts_kind(model),
        "expert_modules": experts, "expert_modules_run": ran,
        "regions": [{"name": r["name"], "serves": list(r["serves"]), "status": r["status"], "reason": r["reason"],
                     "experts_impl": r.get("experts_impl"), "router": (r.get("spec") or {}).get("router")}
                    for r in report.regions],
        "unreported_topk": [c for c in candidates if not c["reported"]],
        "graphs": [{"status": g["status"], "reason": g["reason"]} for g in report.graphs],
        "match": _matches(got, want), "max_abs_diff": (got.float() - want.float()).abs().max().item(),
        "seconds": round(time.perf_counter() - t0, 2),
    })
    assert experts, f"{name}: no module holds expert weights"
    assert_close(got, want, torch.float32, what=name)
    assert not [g for g in report.graphs if g["status"] == "error"], report.graphs
    # never silent: every module holding expert weights that ran has a row (optimized, or the
    # reason); a row of a graph traced below the model stands for each layer its graph serves
    names = [n for r in report.regions for n in (r["serves"] or [r["name"]])]
    silent = [m for m in ran if not any(m == n or m.startswith(n + ".") for n in names)]
    if name in KNOWN_SILENT:
        assert silent, f"{name} is reported now: drop it from KNOWN_SILENT"
        pytest.xfail(f"{name}: {KNOWN_SILENT[name]}")
    assert not silent, (name, silent, names)
    assert all(r["status"] == "optimized" or r["reason"] for r in report.regions)
    # every family's MoE layers optimized, but those the table leaves as traced (and says why)
    left = [(r["name"], r["reason"]) for r in report.regions if r["status"] != "optimized"]
    if name in families.LEFT_AS_TRACED:
        assert left, f"{name} is optimized now: drop it from families.LEFT_AS_TRACED"
    elif name not in families.PREPARED:
        assert report.regions and not left, (name, left)


@pytest.mark.parametrize("name", TIERED)
def test_family_prepared_forward_matches_eager(name):
    """After moecompile.prepare (graph-breaking experts swapped for traceable forms): eager is bit for
    bit what it was, compiled matches it, and the rows are recorded for the support table."""
    model, inputs = _build(name)
    with torch.no_grad():
        before = model(**inputs)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a block prepare cannot reproduce: left as it is, it warns why
        moecompile.prepare(model)
    changed = [p.name for p in moecompile.prepared(model)]
    if not changed:
        pytest.skip("prepare changes nothing in this family")
    torch._dynamo.reset()
    moecompile.report.reset()
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], before), f"{name}: prepare changed eager results"
        got = torch.compile(model, backend="moe", options={"inner": "eager"})(**inputs)[0]
    report = moecompile.last_report()
    _write_result(f"{name}.prepare", {"family": name, "prepare": {
        "prepared": changed, "graphs": len(report.graphs),
        "regions": [{"name": r["name"], "serves": list(r["serves"]), "status": r["status"],
                     "reason": r["reason"]} for r in report.regions]}})
    assert_close(got, before, torch.float32, what=f"{name} after prepare")
    assert all(r["status"] == "optimized" or r["reason"] for r in report.regions)
    if name in families.PREPARED:
        assert report.regions and all(r["status"] == "optimized" for r in report.regions), report.regions


@pytest.mark.parametrize("name", sorted(families.PREPARED))
def test_prepared_family_trains_like_eager(name):
    """The families optimized after moecompile.prepare, forward + backward: the loss and every
    parameter's gradient match eager, every MoE layer optimized."""
    model, inputs = _build(name)
    moecompile.prepare(model)
    twin, got_out, want_out = _twins_trained(model, inputs)
    assert_close(got_out, want_out, torch.float32, what=f"{name} prepared")
    # an expert no token reached has no gradient in eager and a zero one once prepared (its weight
    # is read through torch.stack): the same values, compared as such
    for p, q in zip(twin.parameters(), model.parameters()):
        if q.grad is None and p.grad is not None and not p.grad.any():
            p.grad = None
    assert _same_grads(twin, model, f"{name} prepared")
    rows = moecompile.last_report().regions
    assert rows and all(r["status"] == "optimized" for r in rows), [(r["name"], r["reason"]) for r in rows]


def _twins_trained(model, inputs: dict):
    """(compiled twin, its output, eager output), each after backward of the same loss probe."""
    twin = copy.deepcopy(model)
    torch._dynamo.reset()
    moecompile.report.reset()
    got_out = torch.compile(twin, backend="moe", options={"inner": "aot_eager"})(**inputs)[0]
    want_out = model(**inputs)[0]
    probe = _loss_probe(want_out)
    (got_out.float() * probe).sum().backward()
    (want_out.float() * probe).sum().backward()
    return twin, got_out, want_out


# bf16 in the default run: one family per router or expert form the traced-router path added
BF16_DEFAULT = {"mixtral", "deepseek_v4", "ernie4_5_moe", "inkling2", "nemotron_h", "phimoe", "zaya"}


# Families whose bf16 run sends a token to other experts than eager bf16 does: a near tie in a
# router's top-k that rounding-level differences in the layers before tip over (each layer alone
# matches eager on eager's inputs). Measured, not assumed; strict, so a change shows.
BF16_NEAR_TIES = {
    "beam": "layer 1, token 5: expert scores 0.54589 and 0.54570 (a 2e-4 margin) change order after "
            "layer 0's bf16 output differs from eager's by 1e-4; layer 0 and 1 alone match eager to 1e-4",
}


def _bf16_param(name: str):
    marks = [] if name in BF16_DEFAULT else [
        slow("bf16 forward + backward of every family; the default run covers each router and expert form")]
    if name in BF16_NEAR_TIES:
        marks.append(pytest.mark.xfail(reason=BF16_NEAR_TIES[name], strict=True))
    return pytest.param(name, marks=marks)


@pytest.mark.parametrize("name", [_bf16_param(n) for n in FAMILIES])
def test_family_bf16_matches_eager(name):
    """bf16 weights and activations, forward + backward: the output and every parameter's gradient
    within bf16 tolerance of eager bf16 (conftest.TOLERANCE). (Which layers are optimized is the
    fp32 forward test's to hold: a layer may decline in bf16 alone, as Hunyuan-V3's, whose experts
    return float32 for a bf16 input.)"""
    model, inputs = _build(name, dtype=torch.bfloat16)
    with _unless_torch_fails_alone(name, inputs, dtype=torch.bfloat16):
        twin, got_out, want_out = _twins_trained(model, inputs)
    assert_close(got_out, want_out, torch.bfloat16, what=f"{name} bf16")
    names = [n for n, _ in twin.named_parameters()]
    assert_grads_close([p.grad for p in twin.parameters()], [q.grad for q in model.parameters()], names,
                       torch.bfloat16, what=f"{name} bf16")
    rows = moecompile.last_report().regions
    assert all(r["status"] == "optimized" or r["reason"] for r in rows), rows


@pytest.mark.slow(reason="75 families under the Triton interpreter; the default run puts the demo models on the kernels")
@pytest.mark.parametrize("name", FAMILIES)
def test_family_on_triton_kernels_matches_eager(name):
    """kernels="triton" (the Triton interpreter on CPU): every optimized layer of every family runs
    on the kernels, and the model matches eager."""
    model, inputs = _build(name)
    torch._dynamo.reset()
    moecompile.report.reset()
    with torch.no_grad():
        want = model(**inputs)[0]
        got = torch.compile(model, backend="moe", options={"inner": "eager", "kernels": "triton"})(**inputs)[0]
    report = moecompile.last_report()
    assert_close(got, want, torch.float32, what=f"{name} on triton")
    kernels = [r["kernels"] for r in report.optimized()]
    assert all(k.startswith("triton: ") for k in kernels), (name, kernels)


@pytest.mark.slow(reason="forward + backward of 75 families under the Triton interpreter; the default run trains the demo models on the kernels")
@pytest.mark.parametrize("name", FAMILIES)
def test_family_trains_on_triton_kernels(name):
    """kernels="triton", forward + backward: every parameter's gradient matches eager, and each
    layer whose forward fuses its experts runs the Triton backward (report's "backward")."""
    model, inputs = _build(name)
    torch._dynamo.reset()
    moecompile.report.reset()
    twin = copy.deepcopy(model)
    got_out = torch.compile(twin, backend="moe", options={"inner": "aot_eager", "kernels": "triton"})(**inputs)[0]
    want_out = model(**inputs)[0]
    probe = _loss_probe(want_out)
    with _unless_torch_fails_alone(name, inputs):
        (got_out.float() * probe).sum().backward()
    (want_out.float() * probe).sum().backward()
    assert_close(got_out, want_out, torch.float32, what=f"{name} on triton")
    assert _same_grads(twin, model, f"{name} on triton")
    rows = moecompile.last_report().optimized()
    assert all(r.backward == ("triton" if "gemm_gate_up" in r.kernels else "recompute") for r in rows), \
        [(r.kernels, r.backward) for r in rows]


@contextlib.contextmanager
def _unless_torch_fails_alone(name: str, inputs: dict, impl: str | None = None, dtype=torch.float32):
    """A backward that raises is a failure, unless the same family under plain
    torch.compile(backend="aot_eager"), without moecompile, raises too: then it is PyTorch's
    (doge in torch 2.13: a view of a non-contiguous softplus gradient), an xfail that names it."""
    try:
        yield
    except RuntimeError as err:
        torch._dynamo.reset()
        model, _ = _build(name, experts_impl=impl, dtype=dtype)
        try:
            out = torch.compile(model, backend="aot_eager")(**inputs)[0]
            (out.float() * _loss_probe(out)).sum().backward()
        except RuntimeError as alone:
            if str(alone).split("\n")[0] == str(err).split("\n")[0]:
                pytest.xfail(f"{name}: PyTorch's aot_eager backward fails without moecompile: "
                             f"{str(err).splitlines()[0][:120]}")
        raise


def _same_grads(compiled: torch.nn.Module, eager: torch.nn.Module, what: str) -> int:
    """Every parameter's gradient, compiled twin vs eager, within fp32 tolerance (one that is zero
    in exact arithmetic, as an attention key bias's, on the scale of the largest); -> how many."""
    names = [n for n, _ in compiled.named_parameters()]
    got = [p.grad for p in compiled.parameters()]
    want = [q.grad for q in eager.parameters()]
    assert_grads_close(got, want, names, torch.float32, what=what)
    return sum(w is not None for w in want)


def _loss_probe(out: torch.Tensor) -> torch.Tensor:
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float32)


@pytest.mark.slow(reason="forward + backward of 75 families x 3 experts implementations through AOTAutograd; the default run trains the demo models")
@pytest.mark.parametrize("impl", [None, "batched_mm", "eager"], ids=["default", "batched_mm", "eager"])
@pytest.mark.parametrize("name", FAMILIES)
def test_family_gradients_match_eager(name, impl):
    """Forward + backward through eager and compiled twins: the loss and every parameter's gradient
    (token embeddings, routers, experts) match."""
    model, inputs = _build(name, experts_impl=impl)
    if impl is not None and families.experts_kind(model) != SWITCHABLE:
        pytest.skip(f"experts are {families.experts_kind(model)}, not switchable")
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="moe", options={"inner": "aot_eager"})
    want_out = model(**inputs)[0]
    got_out = compiled(**inputs)[0]
    probe = _loss_probe(want_out)
    want, got = (want_out.float() * probe).sum(), (got_out.float() * probe).sum()
    assert_close(got_out, want_out, torch.float32, what=f"{name} {impl} output")
    want.backward()
    with _unless_torch_fails_alone(name, inputs, impl):
        got.backward()
    if name in EAGER_SPREAD:
        _within_eager_spread(name, twin, model, inputs, impl)
    else:
        assert _same_grads(twin, model, f"{name} {impl}"), f"{name}: no gradients"


# Families whose eager implementations disagree with one another beyond the fp32 gradient
# tolerance on some parameter (measured: eager grouped_mm vs batched_mm vs eager loop); their
# compiled gradients are held to no more than twice that spread, parameter by parameter.
EAGER_SPREAD = {
    "deepseek_v4": "the hyper-connection head's hc_fn gradient (max 0.033) differs by 5e-7 between "
                   "transformers' own experts implementations (mHC's Sinkhorn steps amplify the order "
                   "of additions), against an fp32 tolerance of 3.3e-7",
}


def _within_eager_spread(name: str, compiled, eager, inputs: dict, impl: str | None) -> None:
    """Each gradient within 2x the largest difference between two eager experts implementations
    of the same model (or within the usual tolerance where that is looser)."""
    grads = []
    for other in ("grouped_mm", "batched_mm", "eager"):
        if other == (impl or "grouped_mm"):
            continue
        model, _ = _build(name, experts_impl=other)
        out = model(**inputs)[0]
        (out.float() * _loss_probe(out)).sum().backward()
        grads.append([p.grad for p in model.parameters()])
    names = [n for n, _ in eager.named_parameters()]
    for i, (n, p, q) in enumerate(zip(names, compiled.parameters(), eager.parameters())):
        assert (p.grad is None) == (q.grad is None), n
        if q.grad is None:
            continue
        spread = max(float((g[i] - q.grad).abs().max()) for g in grads)
        rtol, atol_rel = TOLERANCE[torch.float32]["grad"]
        atol = max(2 * spread, atol_rel * float(q.grad.abs().max()))
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol, msg=lambda m: f"{name} d{n}: {m}")
