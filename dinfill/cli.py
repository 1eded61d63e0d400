"""The ``dinfill`` command: ``infill | eval | score | compare | bench | sweep | report`` (contract names).

Each area registers its own subcommands (``register(subparsers)`` in ``dinfill.<area>.cli``), so this
file stays a table of contents. Handlers return an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# modules that add subcommands, in the order they appear in --help
_COMMAND_MODULES = ("dinfill.sampler.cli", "dinfill.eval.cli", "dinfill.eval.compare", "dinfill.bench.cli")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="dinfill",
        description="Fast code infilling with diffusion and AR FIM models: infill, eval, score, compare, bench, sweep, "
        "report.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is loaded and decided")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    # -v after the subcommand too; SUPPRESS keeps a -v given before it when the subcommand has none
    for command in sub.choices.values():
        command.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log what is loaded and decided"
        )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, OSError, KeyError) as err:  # user errors: one clear line, no traceback
        print(f"dinfill {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:  # a dependency missing from the Python that runs dinfill: say which, and where
        if not err.name or err.name.split(".")[0] == "dinfill":
            raise
        print(
            f"dinfill {args.command}: error: this command needs the package {err.name.split('.')[0]!r}, which "
            f"{sys.executable} cannot import; install dinfill's requirements into that Python (`pip install "
            "torch==2.13.0` first for the CPU build of torch, then `pip install -e .`), or run dinfill from the "
            "environment it was installed into",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
