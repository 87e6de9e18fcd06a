"""The `moecompile` command line: place | trace | explain | bench | train-demo.

Every subcommand turns bad user input into one line on stderr and exit code 2
(`moecompile: error: ...`), checks its output paths before any work and writes outputs atomically,
so a failed run leaves no file behind. An error we did not foresee is one line too
(`moecompile: internal error: ...`, exit code 1); MOECOMPILE_DEBUG=1 adds the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
import warnings

from ..errors import UserInputError

EXIT_USAGE = 2
EXIT_INTERNAL = 1


def _add_explain(subparsers) -> None:
    p = subparsers.add_parser(
        "explain",
        help="compile a built-in demo model and show which MoE layers were found and how",
        description="Compile a built-in demo model with backend='moe' and print its report.",
    )
    p.add_argument("--model", default="mixtral", help="built-in model name (see --list)")
    p.add_argument("--list", action="store_true", help="list the built-in models and exit")
    p.add_argument("--tokens", type=int, default=16, help="tokens per sequence of the example input")
    p.add_argument("--batch", type=int, default=2, help="sequences in the example input")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--experts-impl", default="grouped_mm", choices=["grouped_mm", "batched_mm"],
                   help="transformers experts implementation to trace")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    p.set_defaults(func=_run_explain)


def _run_explain(args) -> int:
    from .. import models
    from ..files import check_output
    from .explain import explain

    if args.list:
        for name in models.names():
            print(name)
        return 0
    models.check_sizes(batch=args.batch, tokens=args.tokens)
    check_output(args.json, "--json")
    model, inputs = models.build(args.model, dtype=args.dtype, experts_impl=args.experts_impl,
                                 batch=args.batch, tokens=args.tokens)
    with models.user_code(args.model):
        report = explain(model, *inputs)
    if args.json:
        report.write_json(args.json)
    return 0


def _add_placement(subparsers) -> None:
    # place / trace live with the placement package; imported here so `--help` lists them.
    from ..placement import cli as placement_cli

    placement_cli.register(subparsers)


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (subcommand parsers inherit the class)."""

    def error(self, message: str):
        where = self.prog.removeprefix("moecompile").strip()
        self.exit(EXIT_USAGE, f"moecompile: error: {where + ': ' if where else ''}{message} "
                              f"(see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moecompile", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_placement(subparsers)
    from .trace import add_trace_parser

    add_trace_parser(subparsers)
    _add_explain(subparsers)
    from .bench import add_bench_parser

    add_bench_parser(subparsers)
    _add_train_demo(subparsers)
    return parser


def _add_train_demo(subparsers) -> None:
    from . import train_demo

    p = subparsers.add_parser("train-demo", help="train a small MoE language model with backend='moe' beside eager",
                              description=train_demo.__doc__.splitlines()[0])
    train_demo.add_arguments(p)
    p.set_defaults(func=train_demo.run)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(os.environ.get("MOECOMPILE_DEBUG"))
    try:
        with _quiet(not debug):
            return int(args.func(args) or 0)
    except UserInputError as err:
        return _fail(str(err))
    except MemoryError:
        return _fail(f"not enough memory for this {args.command} request; ask for fewer tokens, "
                     "layers or GPUs")
    except RuntimeError as err:
        if "alloc" in str(err).lower() or "out of memory" in str(err).lower():
            return _fail(f"not enough memory for this {args.command} request ({_first_line(err)})")
        return _internal(err)
    except KeyboardInterrupt:
        print("moecompile: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 -- a bug of ours: still one line, never a traceback
        return _internal(err)


@contextlib.contextmanager
def _quiet(enabled: bool):
    """Keep library warnings and torch's error logs off stderr, whose last line is our one-line
    error if the command fails (the report table says what a warning would have)."""
    if not enabled:
        yield
        return
    torch_log = logging.getLogger("torch")
    level = torch_log.level
    torch_log.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch_log.setLevel(level)


def _fail(message: str) -> int:
    print(f"moecompile: error: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_USAGE


def _internal(err: BaseException) -> int:
    """An error we did not foresee. One line (MOECOMPILE_DEBUG=1 prints the traceback too)."""
    if os.environ.get("MOECOMPILE_DEBUG"):
        traceback.print_exc()
    print(f"moecompile: internal error: {type(err).__name__}: {_first_line(err)} "
          "(please report it; MOECOMPILE_DEBUG=1 shows the traceback)", file=sys.stderr)
    return EXIT_INTERNAL


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
