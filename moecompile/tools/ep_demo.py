"""Expert-parallel demo: a small transformers MoE model trained on several ranks, experts sharded by a
placement plan, beside the same training in one process.

    torchrun --nproc-per-node 2 -m moecompile.tools.ep_demo [--model mixtral] [--steps 20] [--json out.json]

On CPU the ranks talk over gloo; on GPUs (one per rank) over NCCL, the same code. Each rank:

1. builds the model (same seed everywhere) and records a routing trace of a few batches (the
   experts' top-k ids, as `moecompile trace` records them);
2. rank 0 plans the experts with `moecompile.placement.place` (the ILP, `--redundant` replica
   slots per rank, objective time; the same as `moecompile place trace.npz --gpus WORLD ...`) and
   sends the plan to every rank;
3. `shard_experts(model, plan)` keeps the rank's slots, `torch.compile(model, backend="moe")`;
4. trains `--steps` AdamW steps, each rank on its own batch, gradients averaged as data parallelism
   does (`average_gradients`); rank 0 first trains an unsharded copy on every rank's batch at once.

Rank 0 prints each step's loss (mean over ranks) beside the single process's, then what each layer's
exchanges moved and how much of their time was exposed (`exchange_report`, over the steps after the
first two, which compile).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
import time

import torch
import torch.distributed as dist

from .. import models
from ..errors import UserInputError
from ..files import check_output, write_json
from . import bench
from .train_demo import corpus

DEFAULTS = dict(model="mixtral", steps=20, batch=2, tokens=32, layers=2, hidden=64, lr=3e-3, seed=0,
                redundant=1, plan_seconds=10.0, overlap_chunks="auto")
WARMUP = 2  # steps that compile (the report counts the steps after)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m moecompile.tools.ep_demo",
                                     description=__doc__.splitlines()[0])
    for name, value in DEFAULTS.items():
        kind = type(value) if name != "overlap_chunks" else str
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=value)
    parser.add_argument("--json", default=None, help="write losses, times and the exchange report here (rank 0)")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="write a torch.profiler Chrome trace of the last two steps per rank: DIR/rank<r>.json")
    args = parser.parse_args(argv)
    try:
        _check(args)
        return run(args)
    except UserInputError as err:
        print(f"ep_demo: error: {err}", file=sys.stderr)
        return 2


def _check(args) -> None:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise UserInputError("launch it with torchrun, e.g. torchrun --nproc-per-node 2 -m moecompile.tools.ep_demo")
    check_output(args.json, "--json")
    models.check_sizes(batch=args.batch, tokens=args.tokens, layers=args.layers)
    if args.steps < 1 or args.redundant < 0 or args.plan_seconds <= 0 or not args.lr > 0:
        raise UserInputError("--steps must be >= 1, --redundant >= 0, --plan-seconds and --lr > 0")
    if args.overlap_chunks != "auto":
        if not args.overlap_chunks.isdigit() or not 1 <= int(args.overlap_chunks) <= 64:
            raise UserInputError(f"--overlap-chunks must be auto or 1..64, got {args.overlap_chunks!r}")
        args.overlap_chunks = int(args.overlap_chunks)


def run(args) -> int:
    from ..distributed import average_gradients, exchange_report, moe_layers, reset_exchange_stats, shard_experts

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    say = print if rank == 0 else (lambda *a, **k: None)
    try:
        model, _ = models.build(args.model, layers=args.layers, hidden=args.hidden, seed=args.seed)
        model = model.to(device).train()
        vocab = models.vocab_size(model)
        data = corpus(vocab, (args.steps + 4) * args.batch * world, args.tokens, seed=args.seed + 1).to(device)
        batches = data.view(args.steps + 4, world, args.batch, args.tokens)  # (step, rank, batch, tokens)
        say(f"== {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
            f"{len(moe_layers(model))} MoE layers, {world} ranks ({dist.get_backend()}), batch {args.batch} x "
            f"{args.tokens} tokens per rank")
        plan = _plan(model, batches[-4:], args, rank, world, say)
        reference = _one_process(copy.deepcopy(model), batches, args, world) if rank == 0 else None
        dist.barrier()  # the one-process run went first: it does not stall the ranks' exchanges
        shard_experts(model, plan=plan, overlap_chunks=args.overlap_chunks)
        compiled = torch.compile(model, backend="moe")
        optim = torch.optim.AdamW(model.parameters(), lr=args.lr)
        say(f"\n{'step':>5} {'sharded loss':>13} {'one-process':>12} {'|diff|':>9} {'step ms':>8}")
        steps = []
        profiler = None
        for step in range(args.steps):
            if args.profile and step == max(args.steps - 2, 0):
                profiler = torch.profiler.profile()
                profiler.__enter__()
            t0 = time.perf_counter()
            ids = batches[step, rank]
            loss = compiled(ids, labels=ids).loss
            loss.backward()
            average_gradients(model)
            optim.step()
            optim.zero_grad(set_to_none=True)
            if step == WARMUP - 1:
                reset_exchange_stats(model)  # the report leaves out the compiling steps
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            mean = mean.item() / world
            ms = (time.perf_counter() - t0) * 1e3
            if reference is not None:
                steps.append({"step": step, "loss": mean, "reference": reference[step], "ms": ms})
                say(f"{step:5d} {mean:13.5f} {reference[step]:12.5f} {abs(mean - reference[step]):9.2e} {ms:8.1f}")
        if profiler is not None:
            profiler.__exit__(None, None, None)
            os.makedirs(args.profile, exist_ok=True)
            profiler.export_chrome_trace(os.path.join(args.profile, f"rank{rank}.json"))
            say(f"wrote {args.profile}/rank<r>.json: each chunk's waits and experts are spans named after the layer")
        rows = exchange_report(model)
        if rank == 0:
            _print_report(rows, say)
            if args.json:
                record = {"date": datetime.date.today().isoformat(), "world": world, "backend": dist.get_backend(),
                          "device": bench.device_name(device), "versions": bench.versions(),
                          "config": {k: getattr(args, k) for k in DEFAULTS}, "plan": plan.metrics,
                          "steps": steps, "exchanges": rows}
                write_json(args.json, record)
                say(f"wrote {args.json}")
        # NOTE: ranks leave together: a rank tearing its gloo group down while a peer still holds the
        # connection can abort at exit ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


def _one_process(model, batches, args, world) -> list[float]:
    """The unsharded model trained on every rank's batch at once: each step's loss is the mean over
    ranks of each rank's mean loss (every rank's batch has as many tokens)."""
    optim = torch.optim.AdamW(model.parameters(), lr=args.lr)
    losses = []
    for step in range(args.steps):
        loss = torch.stack([model(b, labels=b).loss for b in batches[step]]).mean()
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _plan(model, batches, args, rank, world, say):
    """Rank 0 records routing on `batches` and places the experts; every rank gets the plan."""
    from ..distributed import moe_layers
    from ..placement import place
    from ..routing import RoutingRecorder

    plan = None
    if rank == 0:
        recorder = RoutingRecorder()
        hooks = []
        for name, module in moe_layers(model):
            # the experts see (x (T, H), top-k ids (T, K), weights (T, K)): what a routing trace records
            def seen(experts, inputs, name=name):
                x, ids = inputs[0], inputs[1]
                recorder(name, ids, next(experts.parameters()).shape[0], hidden=x.shape[-1], dtype=x.dtype)
            hooks.append(module.experts.register_forward_pre_hook(seen))
        with torch.no_grad():
            for b in batches.reshape(-1, batches.shape[-2], batches.shape[-1]):
                model(b)
        for h in hooks:
            h.remove()
        trace = recorder.trace()
        t0 = time.perf_counter()
        plan = place(trace, world, redundant=args.redundant * world, solver="ilp", time_limit=args.plan_seconds)
        m = plan.metrics
        say(f"plan: {world} ranks x {plan.slots_per_gpu} slots ({args.redundant} replica slot(s) per rank), "
            f"{time.perf_counter() - t0:.1f} s; predicted layer {plan.solver['greedy_layer_ms']:.4f} ms (greedy) -> "
            f"{plan.solver['layer_ms']:.4f} ms, cross-GPU hops {m['cross_gpu_fraction']:.1%}, imbalance "
            f"{m['imbalance_mean']:.3f}  (moecompile place trace.npz --gpus {world} --redundant "
            f"{args.redundant * world} --solver ilp)")
    box = [plan]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _print_report(rows: list[dict], say) -> None:
    say(f"\n{'layer':24} {'rank':>4} {'rows out':>9} {'rows in':>8} {'MB out':>7} {'MB in':>7} {'C':>3} "
        f"{'exposed ms':>10} {'experts ms':>10} {'hidden':>7}")
    for r in rows:
        hidden = "n/a" if r["hidden_fraction"] is None else f"{r['hidden_fraction']:.0%}"
        say(f"{r['layer'][:24]:24} {r['rank']:4d} {r['rows_sent']:9d} {r['rows_received']:8d} "
            f"{r['bytes_sent'] / 1e6:7.2f} {r['bytes_received'] / 1e6:7.2f} {r['chunks'] or 0:3d} "
            f"{r['exposed_s'] * 1e3:10.1f} {r['compute_s'] * 1e3:10.1f} {hidden:>7}")
    exposed = sum(r["exposed_s"] for r in rows)
    compute = sum(r["compute_s"] for r in rows)
    if exposed + compute > 0:
        say(f"exposed communication: {exposed / (exposed + compute):.0%} of the MoE layers' exchange + expert time")


if __name__ == "__main__":
    sys.exit(main())
