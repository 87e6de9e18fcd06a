"""Training demo: a small transformers MoE language model trained with backend='moe' beside eager.

    python -m moecompile.tools.train_demo [--model qwen3_moe] [--steps 200] [--json out.json] [--plot out.png]
    moecompile train-demo ...                                   (the same)

Both copies start from the same random init and see the same batches of a fixed synthetic corpus
(a random "grammar": each token is followed by one of a few tokens, with Zipf probabilities, so a
model can learn it and the loss falls toward the corpus's entropy). Every step runs forward,
`loss.backward()` and an AdamW step on each copy; losses are printed side by side with their
difference and the time of each step. The compiled copy's backward runs on moecompile's kernels
(the torch path on CPU; Triton on CUDA, or on CPU under the interpreter with `--kernels triton`).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import sys
import time

import torch

from .. import models
from ..errors import UserInputError
from . import bench

DEFAULTS = dict(model="qwen3_moe", steps=200, batch=8, tokens=64, layers=2, hidden=64, lr=3e-3, seed=0,
                kernels="auto", every=10)


def corpus(vocab: int, num_seqs: int, length: int, seed: int = 0, branching: int = 4) -> torch.Tensor:
    """(num_seqs, length) int64 token ids from a fixed random grammar: token t is followed by one of
    `branching` successors drawn once per token, with probabilities ~ 1 / rank. Its entropy per
    token (the loss a perfect model reaches) is `corpus_entropy(branching)` nats."""
    gen = torch.Generator().manual_seed(seed)
    successors = torch.stack([torch.randperm(vocab, generator=gen)[:branching] for _ in range(vocab)])  # (V, b)
    probs = _zipf(branching)
    seqs = torch.empty(num_seqs, length, dtype=torch.int64)
    seqs[:, 0] = torch.randint(0, vocab, (num_seqs,), generator=gen)
    for pos in range(1, length):
        pick = torch.multinomial(probs.expand(num_seqs, -1), 1, generator=gen)[:, 0]  # (num_seqs,)
        seqs[:, pos] = successors[seqs[:, pos - 1], pick]
    return seqs


def corpus_entropy(branching: int = 4) -> float:
    p = _zipf(branching)
    return float(-(p * p.log()).sum())


def _zipf(n: int) -> torch.Tensor:
    p = 1.0 / torch.arange(1, n + 1, dtype=torch.float64)
    return (p / p.sum()).float()


def train(args: argparse.Namespace, say=print) -> dict:
    """Train both copies; returns the record written as JSON (losses, step times, summary)."""
    _check(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = models.build(args.model, layers=args.layers, hidden=args.hidden, seed=args.seed)
    vocab = models.vocab_size(model)
    eager = model.to(device).train()
    moe = copy.deepcopy(eager)
    from .. import report

    torch._dynamo.reset()
    report.reset()
    compiled = torch.compile(moe, backend="moe", options={"kernels": args.kernels})
    data = corpus(vocab, args.steps * args.batch, args.tokens, seed=args.seed + 1).to(device)
    optims = {name: torch.optim.AdamW(m.parameters(), lr=args.lr) for name, m in (("eager", eager), ("moe", moe))}
    record = {"date": datetime.date.today().isoformat(), "device": bench.device_name(device),
              "versions": bench.versions(), "config": {k: getattr(args, k) for k in DEFAULTS},
              "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
              "corpus_entropy": corpus_entropy(), "steps": []}
    say(f"== {args.model}: {record['params_m']:.2f}M parameters, {args.layers} layers, batch {args.batch} x "
        f"{args.tokens} tokens, AdamW lr {args.lr:g}, {args.steps} steps on {record['device']}")
    say(f"corpus entropy {record['corpus_entropy']:.3f} nats per token (the loss a perfect model reaches)\n")
    say(f"{'step':>5} {'eager loss':>11} {'moe loss':>10} {'|diff|':>9} {'eager ms':>9} {'moe ms':>9}")
    for step in range(args.steps):
        batch = data[step * args.batch:(step + 1) * args.batch]
        row = {"step": step + 1}
        for name, fn in (("eager", eager), ("moe", compiled)):
            t0 = time.perf_counter()
            loss = fn(input_ids=batch, labels=batch).loss
            loss.backward()
            optims[name].step()
            optims[name].zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            row[f"{name}_ms"] = (time.perf_counter() - t0) * 1e3
            row[f"{name}_loss"] = float(loss.detach())
            if not math.isfinite(row[f"{name}_loss"]):
                raise RuntimeError(f"{name} loss is {row[f'{name}_loss']} at step {step + 1}")
        record["steps"].append(row)
        if step == 0 or (step + 1) % args.every == 0 or step + 1 == args.steps:
            say(f"{step + 1:>5} {row['eager_loss']:>11.4f} {row['moe_loss']:>10.4f} "
                f"{abs(row['eager_loss'] - row['moe_loss']):>9.2e} {row['eager_ms']:>9.1f} {row['moe_ms']:>9.1f}"
                + ("   (moe: compile)" if step == 0 else ""))
        if step == 0:
            record["layers"] = _layers(report.current(), say)
    record["summary"] = _summary(record["steps"])
    s = record["summary"]
    say(f"\nfinal loss: eager {s['final_eager_loss']:.4f}, moe {s['final_moe_loss']:.4f} (first step "
        f"{s['first_loss']:.4f}); largest |diff| {s['max_abs_diff']:.2e}")
    say(f"median step after the first: eager {s['eager_ms']:.1f} ms, moe {s['moe_ms']:.1f} ms "
        f"({s['moe_vs_eager']:.2f}x eager's time); the first moe step compiled in {s['compile_s']:.1f} s")
    return record


def _layers(rep, say) -> list[dict]:
    """What the compiler did to each MoE layer of the training graphs, printed in one line."""
    layers = [{"name": r.name, "status": r.status, "kernels": r.kernels, "backward": r.backward, "saved": r.saved,
               "reason": r.reason} for r in rep.regions]
    optimized = [x for x in layers if x["status"] == "optimized"]
    kinds = sorted({f"backward {x['backward'] or 'autograd'}, keeps {x['saved'] or 'what autograd keeps'}"
                    for x in optimized})
    say(f"       moe: {len(layers)} MoE layer(s) found, {len(optimized)} optimized"
        + (f" ({'; '.join(kinds)})" if kinds else ""))
    return layers


def _summary(steps: list[dict]) -> dict:
    import statistics

    later = steps[1:] or steps
    eager_ms = statistics.median(r["eager_ms"] for r in later)
    moe_ms = statistics.median(r["moe_ms"] for r in later)
    return {"first_loss": steps[0]["eager_loss"], "final_eager_loss": steps[-1]["eager_loss"],
            "final_moe_loss": steps[-1]["moe_loss"],
            "max_abs_diff": max(abs(r["eager_loss"] - r["moe_loss"]) for r in steps),
            "eager_ms": eager_ms, "moe_ms": moe_ms, "moe_vs_eager": moe_ms / eager_ms,
            "compile_s": steps[0]["moe_ms"] / 1e3}


def _check(args: argparse.Namespace) -> None:
    if args.model not in models.MOE_MODELS:
        raise UserInputError(f"unknown MoE model {args.model!r}; choose one of {', '.join(models.MOE_MODELS)}")
    for name in ("steps", "batch", "tokens", "layers", "hidden", "every"):
        value = getattr(args, name)
        if not isinstance(value, int) or value < 1:
            raise UserInputError(f"--{name} must be a whole number >= 1, got {value!r}")
    if args.hidden % 32 or not 32 <= args.hidden <= 4096:
        raise UserInputError(f"--hidden must be a multiple of 32 from 32 to 4096 (4 attention heads of even size), "
                             f"got {args.hidden}")
    if args.steps * args.batch * args.tokens > 1 << 26:
        raise UserInputError(f"--steps x --batch x --tokens is the corpus: at most {1 << 26} tokens, got "
                             f"{args.steps * args.batch * args.tokens}")
    if args.tokens < 2:
        raise UserInputError("--tokens must be at least 2 (a language model predicts the next token)")
    if not math.isfinite(args.lr) or args.lr <= 0:
        raise UserInputError(f"--lr must be a positive number, got {args.lr!r}")
    models.check_sizes(batch=args.batch, tokens=args.tokens, layers=args.layers)


def plot(record: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in record["steps"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r["eager_loss"] for r in record["steps"]], label="eager", lw=2)
    ax.plot(steps, [r["moe_loss"] for r in record["steps"]], label='torch.compile(backend="moe")', lw=1, ls="--")
    ax.axhline(record["corpus_entropy"], color="gray", lw=0.8, ls=":", label="corpus entropy")
    cfg = record["config"]
    ax.set(xlabel="step", ylabel="loss (nats per token)",
           title=f"{cfg['model']}, {cfg['layers']} layers, batch {cfg['batch']}x{cfg['tokens']} ({record['device']})")
    ax.legend()
    fig.tight_layout()
    from ..files import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument("--model", default=d["model"], help=f"built-in MoE model ({', '.join(models.MOE_MODELS)})")
    p.add_argument("--steps", type=int, default=d["steps"], help=f"optimizer steps (default {d['steps']})")
    p.add_argument("--batch", type=int, default=d["batch"], help="sequences per step")
    p.add_argument("--tokens", type=int, default=d["tokens"], help="tokens per sequence")
    p.add_argument("--layers", type=int, default=d["layers"], help="decoder layers")
    p.add_argument("--hidden", type=int, default=d["hidden"], help="hidden size")
    p.add_argument("--lr", type=float, default=d["lr"], help="AdamW learning rate")
    p.add_argument("--seed", type=int, default=d["seed"], help="init and corpus seed")
    p.add_argument("--kernels", default=d["kernels"], choices=["auto", "torch", "triton"],
                   help="moecompile's kernels option for the compiled copy")
    p.add_argument("--every", type=int, default=d["every"], help="print every N steps")
    p.add_argument("--json", metavar="PATH", help="write losses and step times as JSON")
    p.add_argument("--plot", metavar="PATH", help="write the loss curves as PNG (needs matplotlib)")


def run(args: argparse.Namespace) -> int:
    from ..files import check_output, write_json

    check_output(args.json, "--json")
    check_output(args.plot, "--plot")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserInputError("--plot needs matplotlib: pip install matplotlib") from None
    record = train(args)
    if args.json:
        write_json(args.json, record)
        print(f"wrote {args.json}")
    if args.plot:
        plot(record, args.plot)
        print(f"wrote {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m moecompile.tools.train_demo ...` is `moecompile train-demo ...`: one set of options,
    one error path (one-line errors, the CLI's exit codes)."""
    from .cli import main as cli_main

    return cli_main(["train-demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
