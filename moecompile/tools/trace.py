"""`moecompile trace`: run a model through backend='moe' and write its routing trace for `place`."""

from __future__ import annotations

import sys
import time
import warnings

import numpy as np
import torch

from ..errors import UserInputError
from ..routing import RoutingRecorder


def record_routing(model: torch.nn.Module, batches, progress=None) -> "object":
    """Run `model` over `batches` (each a tuple of positional args) through backend='moe' and return
    the `RoutingTrace` of what its MoE layers did. `progress(done)` is called after each batch."""
    from ..backend import moe_backend

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=moe_backend, options={"inner": "eager"})
    with RoutingRecorder() as rec, torch.no_grad():
        for done, args in enumerate(batches, 1):
            compiled(*args)
            if progress:
                progress(done)
    return rec.trace()


def _progress_every(seconds: float, total: int):
    """A progress callback that prints 'batch i / n' to stderr at most every `seconds`."""
    last = [time.monotonic()]

    def report(done: int) -> None:
        now = time.monotonic()
        if now - last[0] >= seconds and done < total:
            last[0] = now
            print(f"  batch {done} / {total}", file=sys.stderr, flush=True)

    return report


def _token_batches(spec: str, vocab: int, batch: int, batches: int):
    """--tokens: a count of random tokens per sequence, or a .npy / .pt file of token ids (B, S).
    Random batches are made one at a time, as the run asks for them."""
    from ..models import check_sizes

    if spec.strip().isascii() and spec.strip().isdigit():
        n = int(spec) if len(spec.strip()) <= 18 else 10**18  # any longer number is out of bounds
        check_sizes(batch=batch, tokens=n)

        def random_batches():
            gen = torch.Generator().manual_seed(0)
            for _ in range(batches):
                yield (torch.randint(0, vocab, (batch, n), generator=gen),)

        return random_batches()
    if not spec.endswith((".npy", ".pt")):
        raise UserInputError(f"--tokens {spec!r}: expected a number or a .npy / .pt file of token ids")
    ids = _read_ids(spec)
    ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
    check_sizes(batch=ids.shape[0], tokens=ids.shape[1])
    if ids.numel() == 0 or ids.min() < 0 or ids.max() >= vocab:
        raise UserInputError(f"token ids in {spec!r} must lie in [0, {vocab}) and not be empty")
    return [(ids,)]


def _read_ids(spec: str) -> torch.Tensor:
    """A (S,) or (B, S) int64 tensor of token ids from a .npy or .pt file, or a one-line error."""
    what = f"token ids in {spec!r} must be an integer array of shape (S,) or (B, S)"
    try:
        if spec.endswith(".npy"):
            array = np.load(spec, allow_pickle=False)
            if not isinstance(array, np.ndarray) or array.dtype.kind not in "iub":
                raise UserInputError(f"{what}, got {getattr(array, 'dtype', type(array).__name__)}")
            if array.dtype.kind == "u" and array.size and array.max() > np.iinfo(np.int64).max:
                raise UserInputError(f"token ids in {spec!r} do not fit int64")
            return _ids_shape(torch.from_numpy(array.astype(np.int64)), what)
        with warnings.catch_warnings():  # torch warns about old pickles; the error below says it all
            warnings.simplefilter("ignore")
            ids = torch.load(spec, weights_only=True, map_location="cpu")
    except UserInputError:
        raise
    except MemoryError:
        raise UserInputError(f"token ids in {spec!r} are too large to load") from None
    except Exception as err:  # noqa: BLE001 -- unpickling reports a bad file in many ways
        raise UserInputError(f"cannot read token ids from {spec!r}: {type(err).__name__}: "
                             f"{(str(err).strip().splitlines() or [''])[0]}") from None
    if (not isinstance(ids, torch.Tensor) or ids.layout != torch.strided or ids.is_quantized or ids.is_nested
            or ids.device.type != "cpu" or ids.dtype.is_floating_point or ids.dtype.is_complex):
        kind = "nested " if isinstance(ids, torch.Tensor) and ids.is_nested else ""
        raise UserInputError(f"{what}, got a {kind}{type(ids).__name__}"
                             + (f" of {ids.dtype}" if isinstance(ids, torch.Tensor) else ""))
    return _ids_shape(ids.to(torch.int64), what)


def _ids_shape(ids: torch.Tensor, what: str) -> torch.Tensor:
    if ids.dim() not in (1, 2):
        raise UserInputError(f"{what}, got shape {tuple(ids.shape)}")
    return ids


def add_trace_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "trace", help="record routing statistics (expert load and inter-layer flow) of a model run",
        description="Run a model through backend='moe' and write its routing trace (.npz or .json) "
                    "for `moecompile place`.")
    p.add_argument("--model", default="mixtral",
                   help="built-in demo model name, or package.module:factory returning a model")
    p.add_argument("--tokens", default="256",
                   help="random tokens per sequence (a number), or a .npy/.pt file of token ids")
    p.add_argument("--batch", type=int, default=4, help="sequences per batch (random tokens)")
    p.add_argument("--batches", type=int, default=4, help="batches to run (random tokens)")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of a built-in model")
    p.add_argument("--out", required=True, help="trace file to write (.npz or .json)")
    p.set_defaults(func=_run_trace)


def _run_trace(args) -> int:
    from .. import models
    from ..files import check_output
    from ..placement.trace import save_trace

    if not args.out.endswith((".npz", ".json")):
        raise UserInputError(f"--out {args.out!r}: a trace file ends in .npz or .json")
    check_output(args.out, "--out")
    if args.batch < 1 or args.batches < 1 or args.layers < 1:
        raise UserInputError("--batch, --batches and --layers must be at least 1")
    models.check_sizes(batches=args.batches, layers=args.layers)
    model, (ids,) = models.build(args.model, layers=args.layers, batch=1, tokens=1)
    vocab = models.vocab_size(model)
    batches = _token_batches(args.tokens, vocab, args.batch, args.batches)
    with models.user_code(args.model):
        trace = record_routing(model, batches, progress=_progress_every(5.0, args.batches))
    save_trace(trace, args.out)
    tokens = int(trace.load[0].sum())
    print(f"wrote {args.out}: {trace.num_layers} MoE layers x {trace.num_experts} experts, "
          f"{tokens} routings per layer, flow {'recorded' if trace.flow is not None else 'absent'}")
    return 0
