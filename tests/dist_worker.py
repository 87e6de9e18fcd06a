"""One rank of the expert-parallel tests (test_distributed.py starts `world` of these on gloo).

    python tests/dist_worker.py CASE RANK WORLD PORT [ARGS...]

Each case compares a sharded model or layer on this rank with a single-process model holding every
expert, and raises (exit 1, the message on stderr) on a mismatch. Every rank builds the same
reference from the same seeds, and every rank's inputs, so no rank needs another's results.
"""

from __future__ import annotations

import copy
import datetime
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from moecompile import models  # noqa: E402
from moecompile.distributed import average_gradients, full_state_dict, moe_layers, shard_experts  # noqa: E402
from moecompile.placement.plan import Plan  # noqa: E402

TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("MOECOMPILE_TEST_DIST_TIMEOUT", "60")))


def plan_for(kind: str, world: int, num_experts: int, num_layers: int) -> Plan | None:
    """'even': no plan; 'shuffled': a permutation per layer; 'replicas': world extra slots, experts
    0.. replicated onto other ranks."""
    if kind == "even":
        return None
    rng = np.random.default_rng(7)
    rows = []
    for _ in range(num_layers):
        if kind == "shuffled":
            rows.append(rng.permutation(num_experts))
            continue
        # replicas: one extra slot per rank; rank r's extra holds an expert that lives elsewhere
        spr = num_experts // world
        base = rng.permutation(num_experts).reshape(world, spr)
        extra = [base[(r + 1) % world][0] for r in range(world)]
        rows.append(np.concatenate([np.append(base[r], extra[r]) for r in range(world)]))
    spg = len(rows[0]) // world
    return Plan(num_gpus=world, num_nodes=1, num_experts=num_experts, slots_per_gpu=spg, phy2log=np.stack(rows))


def close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    scale = want.double().abs().max().item() if want.numel() else 0.0
    if got.shape != want.shape or not err <= tol * max(scale, 1.0):
        raise AssertionError(f"rank {dist.get_rank()}: {name}: max error {err:.3g} (scale {scale:.3g}, "
                             f"shapes {tuple(got.shape)} vs {tuple(want.shape)})")


def case_model(world: int, rank: int, name: str, kind: str, compiled: str = "eager", chunks: str = "auto",
               dtype: str = "float32") -> None:
    """A sharded model's logits and gradients against the single-process model: every rank's batch
    through the reference, the expert gradients summed over all of them. Tolerances: float32 1e-5
    (logits) and 1e-4 (gradients) of the largest value; bfloat16 3e-2 (the experts' sums run in
    another order: a few bf16 roundings)."""
    tight = dtype == "float32"
    tol, gtol = (1e-5, 1e-4) if tight else (3e-2, 3e-2)
    reference, _ = models.build(name, layers=2, hidden=32, seed=0, dtype=dtype)
    reference.train()
    batches = [torch.randint(0, models.VOCAB, (2, 6), generator=torch.Generator().manual_seed(100 + r))
               for r in range(world)]
    sharded = copy.deepcopy(reference)
    layers = moe_layers(sharded)
    num_experts = next(layers[0][1].experts.parameters()).shape[0]
    plan = plan_for(kind, world, num_experts, len(layers))
    shard_experts(sharded, plan=plan, overlap_chunks=chunks if chunks == "auto" else int(chunks))
    run = torch.compile(sharded, backend="moe") if compiled == "compiled" else sharded
    out = run(batches[rank], labels=batches[rank])
    out.loss.backward()
    own = copy.deepcopy(reference)  # this rank's batch alone: the replicated weights' gradients
    ref = own(batches[rank], labels=batches[rank])
    ref.loss.backward()
    ref_logits = ref.logits.detach()
    own_grads = {n: p.grad for n, p in own.named_parameters()}
    for batch in batches:  # every rank's batch: the experts' gradients
        reference(batch, labels=batch).loss.backward()
    close("logits", out.logits.detach(), ref_logits, tol)
    full = dict(reference.named_parameters())
    averaged = {}  # what average_gradients must give: the unsharded model's gradient of the mean loss
    for pname, p in sharded.named_parameters():
        if ".experts.local." not in pname:
            close(f"grad {pname}", p.grad, own_grads[pname], gtol)
            averaged[pname] = None if full[pname].grad is None else full[pname].grad / world
            continue
        owner = pname.split(".experts.local.")[0]
        sharded_layer = sharded.get_submodule(owner).experts
        mine = sharded_layer.layer.local_experts(rank)
        want = full[pname.replace(".experts.local.", ".experts.")].grad.index_select(0, torch.from_numpy(mine))
        close(f"grad {pname}", p.grad, want, gtol)
        averaged[pname] = want / world
    average_gradients(sharded)
    for pname, p in sharded.named_parameters():
        if averaged[pname] is not None:
            close(f"averaged grad {pname}", p.grad, averaged[pname], gtol)
    state = full_state_dict(sharded)
    if rank == 0:
        fresh, _ = models.build(name, layers=2, hidden=32, seed=1, dtype=dtype)
        fresh.load_state_dict(state)  # strict: every name and shape of the unsharded model
        for n, p in reference.state_dict().items():
            if not torch.equal(fresh.state_dict()[n], p):
                raise AssertionError(f"full_state_dict: {n} differs from the unsharded model's")


def case_layer(world: int, rank: int, kind: str, scenarios: str, chunks: str = "1", dtype: str = "float32") -> None:
    """One layer's experts with chosen routings (comma-separated): `plain`, `empty` (rank 1 has no
    tokens), `one_rank` (every token to experts only rank 0 holds), `idle` (expert 0 gets no token
    anywhere). Tolerance: float32 1e-5 of the largest value, bfloat16 3e-2."""
    for scenario in scenarios.split(","):
        _layer(world, rank, kind, scenario, int(chunks), dtype)


def _layer(world: int, rank: int, kind: str, scenario: str, chunks: int, dtype: str) -> None:
    tol = 1e-5 if dtype == "float32" else 3e-2
    reference, _ = models.build("mixtral", layers=1, hidden=32, seed=0, dtype=dtype)
    experts = moe_layers(reference)[0][1].experts
    num_experts, top_k, hidden = experts.gate_up_proj.shape[0], 2, 32
    plan = plan_for(kind, world, num_experts, 1)
    sharded = shard_experts(copy.deepcopy(reference), plan=plan, overlap_chunks=chunks)
    layer = moe_layers(sharded)[0][1].experts
    xs, ids, ws = [], [], []
    for r in range(world):
        g = torch.Generator().manual_seed(200 + r)
        tokens = 0 if scenario == "empty" and r == 1 else 5 + r
        x = torch.randn(tokens, hidden, generator=g).to(getattr(torch, dtype))
        choice = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(tokens)]) \
            if tokens else torch.zeros(0, top_k, dtype=torch.long)
        if scenario == "one_rank":  # experts with no replica elsewhere: no rank keeps these rows
            alone = np.bincount(layer.layer.phy2log, minlength=num_experts) == 1
            on_zero = [e for e in layer.layer.local_experts(0) if alone[e]]
            choice = torch.tensor(on_zero[:top_k]).repeat(tokens, 1)
        if scenario == "idle":  # experts 1.. only
            choice = torch.stack([torch.randperm(num_experts - 1, generator=g)[:top_k] + 1 for _ in range(tokens)])
        xs.append(x)
        ids.append(choice)
        ws.append(torch.rand(tokens, top_k, generator=g).to(getattr(torch, dtype)))  # bf16 weights: odd byte offsets
    x = xs[rank].clone().requires_grad_()
    w = ws[rank].clone().requires_grad_()
    y = layer(x, ids[rank], w)
    proj = torch.randn(hidden, generator=torch.Generator().manual_seed(300 + rank)).to(y.dtype)
    (y * proj).sum().backward()
    # the reference: every rank's rows through the unsharded experts
    for r in range(world):
        xr = xs[r].clone().requires_grad_()
        wr = ws[r].clone().requires_grad_()
        yr = experts(xr, ids[r], wr)
        (yr * torch.randn(hidden, generator=torch.Generator().manual_seed(300 + r)).to(yr.dtype)).sum().backward()
        if r == rank:
            close("layer output", y.detach(), yr.detach(), tol)
            close("x grad", x.grad, xr.grad, tol)
            close("w grad", w.grad, wr.grad, tol)
    mine = torch.from_numpy(layer.layer.local_experts(rank))
    for n in layer.expert_params:
        close(f"grad {n}", getattr(layer.local, n).grad, getattr(experts, n).grad.index_select(0, mine), tol)


def case_plans(world: int, rank: int) -> None:
    """Plans that do not fit are rejected with the same one line on every rank, weights untouched;
    a plan naming its layers is matched by name, in any order."""
    from moecompile.errors import UserInputError

    model, _ = models.build("mixtral", layers=2, hidden=32, seed=0)
    before = {n: p.clone() for n, p in model.named_parameters()}
    good = plan_for("shuffled", world, 8, 2)
    bad = [plan_for("shuffled", 1, 8, 2),  # another group size
           Plan(num_gpus=world, num_nodes=1, num_experts=8, slots_per_gpu=8 // world, phy2log=good.phy2log[:1]),
           Plan(num_gpus=world, num_nodes=1, num_experts=8, slots_per_gpu=8 // world, phy2log=good.phy2log,
                layers=("model.layers.0.mlp", "model.layers.7.mlp"))]
    for plan in bad:
        try:
            shard_experts(model, plan=plan)
        except UserInputError as err:
            print(f"rejected: {err}", flush=True)
        else:
            raise AssertionError("a plan that does not fit was accepted")
    for n, p in model.named_parameters():
        if not torch.equal(p, before[n]):
            raise AssertionError(f"{n} changed although the plan was rejected")
    named = Plan(num_gpus=world, num_nodes=1, num_experts=8, slots_per_gpu=8 // world, phy2log=good.phy2log,
                 layers=("model.layers.1.mlp", "model.layers.0.mlp"))
    shard_experts(model, plan=named)
    for (name, module), row in zip(moe_layers(model), (1, 0)):
        if not np.array_equal(module.experts.layer.phy2log, good.phy2log[row]):
            raise AssertionError(f"{name} did not get the plan's row named for it")
        want = before[f"{name}.experts.down_proj"].index_select(0, torch.from_numpy(good.phy2log[row].reshape(world, -1)[rank].copy()))
        if not torch.equal(module.experts.local.down_proj, want):
            raise AssertionError(f"{name} holds other experts than its plan row gives rank {rank}")


def case_invariance(world: int, rank: int) -> None:
    """A layer's outputs bit for bit the same under every chunk count and plan (and, the test
    compares the printed digests, every world size); "auto" picks a C after its first call."""
    import hashlib

    reference, _ = models.build("mixtral", layers=1, hidden=32, seed=0)
    g = torch.Generator().manual_seed(400)
    x = torch.randn(200, 32, generator=g)  # the same 200 tokens, split over the ranks: slots of 1-4 tiles
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(200)])
    w = torch.rand(200, 2, generator=g)
    mine = slice(rank * 200 // world, (rank + 1) * 200 // world)
    outs = {}
    for kind in ("even", "shuffled", "replicas"):
        for chunks in (1, 2, 3, "auto"):
            model = shard_experts(copy.deepcopy(reference), plan=plan_for(kind, world, 8, 1), overlap_chunks=chunks)
            layer = moe_layers(model)[0][1].experts
            for _ in range(4 if chunks == "auto" else 1):
                y = layer(x[mine], ids[mine], w[mine])
            outs[(kind, chunks)] = y
            if chunks == "auto" and (layer.chosen is None or layer.stats.chunks.get(1, 0) < 2):
                raise AssertionError(f"auto: calls per C {layer.stats.chunks}, then chose {layer.chosen}")
    first = next(iter(outs.values()))
    for key, y in outs.items():
        if not torch.equal(y, first):
            raise AssertionError(f"rank {rank}: output under {key} differs from {next(iter(outs))} by "
                                 f"{(y - first).abs().max().item():.3g}")
    gathered = [torch.empty(0)] * world
    dist.all_gather_object(gathered, first)
    print("digest", hashlib.sha256(torch.cat(gathered).detach().numpy().tobytes()).hexdigest(), flush=True)


def case_dies(world: int, rank: int) -> None:
    """Rank 1 leaves before the first exchange; the others must fail with a clear error."""
    model, (ids,) = models.build("mixtral", layers=2, hidden=32, seed=0)
    shard_experts(model)
    if rank == 1:
        os._exit(3)
    model(ids)
    raise AssertionError("the exchange returned although rank 1 had left")


def main() -> None:
    case, rank, world, port, *args = sys.argv[1:]
    rank, world = int(rank), int(world)
    torch.manual_seed(0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=TIMEOUT)
    try:
        {"model": case_model, "layer": case_layer, "plans": case_plans, "dies": case_dies,
         "invariance": case_invariance}[case](world, rank, *args)
    finally:
        if case != "dies":
            # NOTE: ranks leave together; a rank destroying its gloo group while a peer still holds
            # the connection open aborted now and then at exit ("terminate called without an active
            # exception", about 1 run in 3 of the model case)
            dist.barrier()
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
