"""The Triton gate and align kernels against their eager references (TRITON_INTERPRET=1 on CPU).

Tolerances (gate; align is integer and compared exactly):

    dtype | ids                                  | w (rtol, atol)             | why
    fp32  | exact, in order                      | (1e-5, 1e-5)               | the same fp32 math summed
          |                                      |                            | in another order (GEMM
          |                                      |                            | over H, softmax): <= 4e-7
          |                                      |                            | seen
    bf16  | per-row id sets equal, except rows   | (1e-5, 1e-5) on >= 90% of  | logits are rounded to bf16
          | whose bf16 logits hold a tie; and    | the rows whose sets agree, | as F.linear rounds them,
          | >= 90% of rows equal                 | (2e-2, 1e-2) on all of     | so w agrees as in fp32
          |                                      | them                       | (<= 1e-6 seen), except
          |                                      |                            | where a GEMM summed in
          |                                      |                            | another order rounds a
          |                                      |                            | logit one ulp (2^-8) the
          |                                      |                            | other way
    fp16  | as bf16 (10 bits: fewer ties)        | as bf16                    | the same reasons

In bf16 and fp16 both sides start from the same 16-bit inputs. Ties are the one place the two may rightly
differ: the kernel takes the lowest index among equal values, torch.topk's order among them on CPU
is unspecified (and is not lowest-first), so ids are compared as sets per row and a row whose
logits tie may pick other experts (seen: 2 of 40 rows at E = 16, K = 4). fp32 inputs are random
enough never to tie, so there ids are compared exactly, order included.
"""

from __future__ import annotations

import os
import zlib

import torch

if not torch.cuda.is_available():  # before triton is imported: triton.jit reads it when decorating
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from moecompile.codegen.triton import align as align_mod  # noqa: E402
from moecompile.codegen.triton import gate as gate_mod  # noqa: E402
from moecompile.codegen.triton.align import align, align_reference, padded_rows  # noqa: E402
from moecompile.codegen.triton.gate import gate, gate_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not (gate_mod._INTERPRETED and align_mod._INTERPRETED),
    reason="no CUDA and the kernels were decorated before TRITON_INTERPRET=1 was set")

# rtol, atol of w; see the table above
W_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 1e-2), torch.float16: (2e-2, 1e-2)}
TIGHT = (1e-5, 1e-5)
BF16_MIN_AGREE = 0.9  # of rows: ids (sets) equal; and of those, w within TIGHT

BASE = dict(top_k=2, scoring="softmax", topk_order="score_then_topk", renormalize=False, renorm_eps=0.0,
            routed_scaling=1.0, groups=1, top_groups=1, group_score="max", masked_score=float("-inf"),
            weights_from="topk", router_gemm_fp32=False, weights_in_input_dtype=False)


def _router(T: int, H: int, E: int, dtype: torch.dtype, seed: int, bias: bool = False, cb: bool = False,
            favor: int | None = None):
    """x (T, H), router weight (E, H), bias (E,) | None, correction bias (E,) | None.

    Logits are about N(0, 4): spread enough that bf16 rarely rounds two of a row's best to one
    value. favor: every token's logit for that expert exceeds the others by ~10 standard deviations.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    w = torch.randn(E, H, generator=g) * (2.0 / H**0.5)
    if favor is not None:
        x = x + 2.0
        w[favor] = w[favor].abs() + 2.0 / H**0.5
    b = torch.randn(E, generator=g) * 0.5 if bias else None
    c = torch.randn(E, generator=g) * 0.1 if cb else None  # on the scale of the scores, as trained
    to = lambda t: None if t is None else t.to(dtype=dtype, device=DEVICE)  # noqa: E731
    return to(x), to(w), to(b), (None if c is None else c.to(DEVICE))


# (name, T, H, E, router overrides, _router options)
GATE_CASES = [
    ("softmax", 37, 64, 8, {}, {}),
    ("T1_oddH", 1, 33, 8, {}, {}),
    ("K_eq_E_renorm", 20, 65, 8, dict(top_k=8, renormalize=True), {}),
    ("E1", 9, 32, 1, dict(top_k=1), {}),
    ("sigmoid", 33, 48, 16, dict(top_k=4, scoring="sigmoid"), {}),
    ("topk_then_softmax", 40, 64, 16, dict(top_k=4, topk_order="topk_then_score"), {}),
    ("topk_then_sigmoid", 17, 40, 16, dict(top_k=3, topk_order="topk_then_score", scoring="sigmoid",
                                           renormalize=True), {}),
    ("renorm_eps_scaled", 25, 64, 16, dict(top_k=4, renormalize=True, renorm_eps=1e-6, routed_scaling=2.5), {}),
    ("correction_bias", 30, 64, 16, dict(top_k=4, scoring="sigmoid"), dict(cb=True)),
    ("groups_max_neginf", 30, 64, 16, dict(top_k=4, groups=4, top_groups=2), {}),
    ("groups_top2_zero", 30, 64, 16, dict(top_k=3, groups=4, top_groups=2, group_score="top2_sum",
                                          masked_score=0.0, scoring="sigmoid"), dict(cb=True)),
    ("gather", 30, 64, 16, dict(top_k=4, scoring="sigmoid", weights_from="gather", renormalize=True),
     dict(cb=True)),
    ("router_bias", 21, 96, 16, dict(top_k=2), dict(bias=True)),
    ("gemm_fp32", 21, 96, 16, dict(top_k=2, router_gemm_fp32=True), dict(bias=True)),
    ("weights_in_input_dtype", 21, 64, 16, dict(top_k=2, renormalize=True, weights_in_input_dtype=True), {}),
    ("deepseek_v3_E256", 5, 64, 256, dict(top_k=8, scoring="sigmoid", groups=8, top_groups=4,
                                          group_score="top2_sum", weights_from="gather", renormalize=True,
                                          renorm_eps=1e-20, routed_scaling=2.5), dict(cb=True)),
]


def _has_tie(x, w, b, router_gemm_fp32: bool) -> torch.Tensor:
    """(T,) bool: rows whose logits, as route computes them, hold two equal values."""
    if router_gemm_fp32:
        x, w, b = x.float(), w.float(), None if b is None else b.float()
    logits = torch.nn.functional.linear(x, w, b).float().cpu()
    return (logits.sort(dim=1).values.diff(dim=1) == 0).any(dim=1)


def _assert_gate_close(got, want, dtype: torch.dtype, E: int, tied: torch.Tensor | None = None) -> None:
    """got and want are (w, ids, counts); tied (T,) bool marks rows whose bf16 logits tie."""
    (w, ids, counts), (w_ref, ids_ref, counts_ref) = got, want
    assert w.dtype == w_ref.dtype and ids.dtype == ids_ref.dtype == torch.int32 and counts.dtype == torch.int32
    assert w.shape == w_ref.shape and ids.shape == ids_ref.shape and counts.shape == (E,)
    assert torch.equal(counts.cpu(), torch.bincount(ids.reshape(-1).long().cpu(), minlength=E).int())
    rtol, atol = W_TOL[dtype]
    if dtype == torch.float32:
        assert torch.equal(ids, ids_ref)
        assert torch.equal(counts, counts_ref)
        torch.testing.assert_close(w, w_ref, rtol=rtol, atol=atol)
        return
    ids_s, order = ids.sort(dim=1)
    ids_ref_s, order_ref = ids_ref.sort(dim=1)
    agree = (ids_s == ids_ref_s).all(dim=1).cpu()
    assert bool((agree | tied).all()), ("rows without tied logits pick other experts", ids[~agree], ids_ref[~agree])
    assert float(agree.float().mean()) >= BF16_MIN_AGREE, agree
    w_s, w_ref_s = w.gather(1, order)[agree].float().cpu(), w_ref.gather(1, order_ref)[agree].float().cpu()
    torch.testing.assert_close(w_s, w_ref_s, rtol=rtol, atol=atol)
    tight = (w_s - w_ref_s).abs() <= TIGHT[1] + TIGHT[0] * w_ref_s.abs()
    assert float(tight.all(dim=1).float().mean()) >= BF16_MIN_AGREE, (w_s - w_ref_s).abs().max(dim=1).values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name,T,H,E,router,opts", GATE_CASES, ids=[c[0] for c in GATE_CASES])
def test_gate_matches_reference(name, T, H, E, router, opts, dtype):
    x, w, b, cb = _router(T, H, E, dtype, seed=zlib.crc32(name.encode()), **opts)
    kw = {**BASE, **router}
    tied = _has_tie(x, w, b, kw["router_gemm_fp32"])
    _assert_gate_close(gate(x, w, b, cb, **kw), gate_reference(x, w, b, cb, **kw), dtype, E, tied)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gate_all_tokens_to_one_expert(dtype):
    # K = 1: the other experts' softmax scores underflow to 0 and would tie for a second slot
    x, w, b, cb = _router(50, 64, 8, dtype, seed=7, favor=3)
    kw = {**BASE, "top_k": 1}
    got = gate(x, w, b, cb, **kw)
    _assert_gate_close(got, gate_reference(x, w, b, cb, **kw), dtype, 8, _has_tie(x, w, b, False))
    assert got[2].tolist() == [0, 0, 0, 50, 0, 0, 0, 0]  # and seven experts with no tokens


def test_gate_counts_over_many_programs():
    # 300 rows: ten programs of 32 rows and a ragged last one, all adding into the same counts
    x, w, b, cb = _router(300, 32, 16, torch.float32, seed=11)
    _, ids, counts = gate(x, w, b, cb, **{**BASE, "top_k": 4})
    assert torch.equal(counts.cpu(), torch.bincount(ids.reshape(-1).long().cpu(), minlength=16).int())
    assert int(counts.sum()) == 300 * 4


def test_gate_no_tokens():
    x, w, b, cb = _router(0, 64, 8, torch.float32, seed=3)
    for fn in (gate, gate_reference):
        wt, ids, counts = fn(x, w, b, cb, **{**BASE, "top_k": 3})
        assert wt.shape == ids.shape == (0, 3) and ids.dtype == torch.int32
        assert counts.tolist() == [0] * 8


def test_gate_rejects_what_it_cannot_run():
    x, w, b, cb = _router(4, 32, 8, torch.float32, seed=5)
    with pytest.raises(ValueError, match="float64"):
        gate(x.double(), w.double(), None, None, **BASE)
    with pytest.raises(ValueError, match="router_weight"):
        gate(x, w[:, :16], None, None, **BASE)
    with pytest.raises(ValueError, match="x is torch.float32"):
        gate(x, w.bfloat16(), None, None, **BASE)
    with pytest.raises(ValueError, match="experts"):
        gate(x, torch.randn(512, 32, device=DEVICE), None, None, **BASE)
    with pytest.raises(ValueError, match="top2_sum"):
        gate(x, w, None, None, **{**BASE, "groups": 8, "top_groups": 2, "group_score": "top2_sum"})
    with pytest.raises(ValueError, match="top_k"):  # MoESpec's own check
        gate(x, w, None, None, **{**BASE, "top_k": 9})


# -- align ------------------------------------------------------------------------------------------


def _ids(T: int, K: int, E: int, pattern: str, seed: int) -> torch.Tensor:
    """(T, K) int32: distinct experts per row as gate gives them, all in expert 0 ("one"), none in
    expert 1 ("hole"), or with repeats within a row ("repeats": align does not need distinct)."""
    g = torch.Generator().manual_seed(seed)
    if pattern == "one":
        return torch.zeros(T, K, dtype=torch.int32, device=DEVICE)
    if pattern == "repeats":
        return torch.randint(0, E, (T, K), generator=g, dtype=torch.int32).to(DEVICE)
    pool = [e for e in range(E) if not (pattern == "hole" and e == 1)]
    rows = [torch.tensor(pool)[torch.randperm(len(pool), generator=g)[:K]] for _ in range(T)]
    return torch.stack(rows).to(torch.int32).reshape(T, K).to(DEVICE)


ALIGN_CASES = [  # (T, K, E, tile_m, pattern)
    (37, 2, 8, 16, "distinct"),
    (1, 1, 4, 16, "distinct"),
    (6, 4, 4, 16, "distinct"),  # K == E
    (13, 1, 1, 32, "one"),  # E == 1
    (40, 1, 8, 16, "one"),  # all pairs in one expert, seven empty
    (29, 3, 8, 64, "hole"),
    (300, 4, 16, 16, "repeats"),  # S = 1200: the scan takes two blocks of 1024
    (64, 6, 64, 32, "distinct"),
]


def _check_invariants(ids, counts, sorted_pairs, tile_expert, inv, tile_m) -> None:
    flat = ids.reshape(-1).long().cpu()
    sp, te, inv = sorted_pairs.long().cpu(), tile_expert.long().cpu(), inv.long().cpu()
    S = flat.numel()
    real = sp >= 0
    assert int(real.sum()) == S and torch.equal(sp[real].sort().values, torch.arange(S))  # each pair once
    assert torch.equal(sp[inv], torch.arange(S))
    row_tile = torch.arange(sp.numel()) // tile_m
    assert torch.equal(te[row_tile[real]], flat[sp[real]])  # a tile holds one expert's pairs
    used = te >= 0
    assert torch.equal(used, torch.arange(te.numel()) < int(used.sum()))  # -1 tiles only at the end
    assert torch.equal(te[used], te[used].sort().values)  # experts in order
    padded = (counts.long().cpu() + tile_m - 1) // tile_m
    assert torch.equal(torch.bincount(te[used], minlength=counts.numel()), padded)
    for e in range(counts.numel()):  # stable: increasing p within an expert
        pe = sp[real][flat[sp[real]] == e]
        assert torch.equal(pe, pe.sort().values)


@pytest.mark.parametrize("T,K,E,tile_m,pattern", ALIGN_CASES)
def test_align_matches_reference(T, K, E, tile_m, pattern):
    ids = _ids(T, K, E, pattern, seed=T * 31 + E)
    counts = torch.bincount(ids.reshape(-1).long(), minlength=E).to(torch.int32)
    got = align(ids, counts, E, tile_m)
    want = align_reference(ids, counts, E, tile_m)
    P = padded_rows(T * K, E, tile_m)
    assert [t.shape for t in got] == [(P,), (P // tile_m,), (T * K,)]
    for g, w, what in zip(got, want, ("sorted_pairs", "tile_expert", "inv")):
        assert g.dtype == torch.int32 and torch.equal(g, w), what
    _check_invariants(ids, counts, *got, tile_m)


def test_gate_then_align():
    """gate's counts feed align directly, as the MoE program chains them."""
    x, w, b, cb = _router(45, 64, 16, torch.float32, seed=13, cb=True)
    _, ids, counts = gate(x, w, b, cb, **{**BASE, "top_k": 4, "scoring": "sigmoid"})
    got = align(ids, counts, 16, 16)
    for g, want in zip(got, align_reference(ids, counts, 16, 16)):
        assert torch.equal(g, want)
    _check_invariants(ids, counts, *got, 16)


def test_align_no_tokens():
    ids = torch.empty(0, 2, dtype=torch.int32, device=DEVICE)
    counts = torch.zeros(8, dtype=torch.int32, device=DEVICE)
    for fn in (align, align_reference):
        sp, te, inv = fn(ids, counts, 8, 16)
        assert sp.shape == (padded_rows(0, 8, 16),) and bool((sp == -1).all()) and bool((te == -1).all())
        assert inv.shape == (0,)


def test_align_rejects_bad_inputs():
    ids = _ids(4, 2, 8, "distinct", seed=1)
    counts = torch.bincount(ids.reshape(-1).long(), minlength=8).to(torch.int32)
    with pytest.raises(ValueError, match="int32"):
        align(ids.long(), counts, 8, 16)
    with pytest.raises(ValueError, match="counts"):
        align(ids, counts[:4], 8, 16)
    for tile_m in (8, 24):
        with pytest.raises(ValueError, match="power of two"):
            align(ids, counts, 8, tile_m)
