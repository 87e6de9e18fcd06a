"""The same end-to-end checks on CUDA (bf16 and fp32); skipped where there is no GPU."""

from __future__ import annotations

import copy

import pytest
import torch

import moecompile
from conftest import assert_close
from moecompile import models

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(models.MOE_MODELS))
def test_cuda_forward_and_backward_match_eager(name, dtype):
    model, _ = models.build(name, dtype=dtype, experts_impl="grouped_mm")
    model = model.cuda().train()
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="moe")
    for tokens in (1, 7, 64):
        ids = torch.randint(0, models.VOCAB, (2, tokens), device="cuda")
        assert_close(compiled(ids).logits, model(ids).logits, dtype, what=f"{name} T{tokens}")
    ids = torch.randint(0, models.VOCAB, (2, 33), device="cuda")
    model(ids, labels=ids).loss.backward()
    compiled(ids, labels=ids).loss.backward()
    for (pname, p), q in zip(twin.named_parameters(), model.parameters()):
        assert_close(p.grad, q.grad, dtype, kind="grad", what=f"{name} d{pname}")
    assert all(r["status"] == "optimized" for r in moecompile.last_report().regions)
