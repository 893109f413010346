"""The ``puzzle`` command line. Subcommands live in ``puzzle.commands`` (one module each).

Run ``puzzle --help`` for the list. Errors a user can act on (bad config, bad input) are
printed as one message and exit with status 2; bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from puzzle import __version__, commands
from puzzle.errors import PuzzleError, exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="puzzle",
        description="Puzzle: distill a parent LLM into a faster child for a hardware target.",
    )
    parser.add_argument("--version", action="version", version=f"puzzle {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PuzzleError as err:
        # bad input exits 2; storage trouble after its retries exits 1, so Argo retries the pod
        print(f"error: {err}", file=sys.stderr)
        return exit_code(err)


if __name__ == "__main__":
    sys.exit(main())
