"""The `moecompile` command line: place | trace | explain | bench.

Every subcommand turns bad user input into one line on stderr and exit code 2
(`moecompile: error: ...`); it never prints a traceback for it.
"""

from __future__ import annotations

import argparse
import sys

from .errors import UserInputError

EXIT_USAGE = 2


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
    from . import models
    from .report import explain

    if args.list:
        for name in models.names():
            print(name)
        return 0
    if args.tokens < 1 or args.batch < 1:
        raise UserInputError("--tokens and --batch must be at least 1")
    model, inputs = models.build(args.model, dtype=args.dtype, experts_impl=args.experts_impl,
                                 batch=args.batch, tokens=args.tokens)
    report = explain(model, *inputs)
    if args.json:
        report.write_json(args.json)
    return 0


def _add_placement(subparsers) -> None:
    # place / trace live with the placement package; imported here so `--help` lists them.
    from .placement import cli as placement_cli

    placement_cli.register(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moecompile", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_placement(subparsers)
    from .routing import add_trace_parser

    add_trace_parser(subparsers)
    _add_explain(subparsers)
    from .bench import add_bench_parser

    add_bench_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserInputError as err:
        print(f"moecompile: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("moecompile: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
