"""CLI subcommands: one module per subcommand, each with ``register(subparsers)``.

``puzzle.cli`` discovers every module in this package, so adding a subcommand never edits
a shared list. ``register`` adds a parser and sets ``func`` (called with the parsed args,
returning an exit code).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from puzzle.layout import CONFIG


def run_uri(text: str) -> str:
    """argparse ``type`` of every RUN_URI argument: ``file://...`` and ``s3://...`` as given; a plain path
    to a local run folder (``runs/tiny-...``, as ``ls`` shows it) as ``file://`` of that path."""
    if "://" in text:
        return text
    if (Path(text) / CONFIG).is_file():
        return f"file://{text}"
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a run: no run folder (with its config) at that path; give file://PATH, "
        "s3://BUCKET/PREFIX/RUN_ID or the path of a local run folder")
