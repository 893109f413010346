"""``puzzle fetch RUN_URI [--solution ID] DEST``: copy an assembled child out of the run's store.

The child is ``child/<ID>/`` (default: the first Puzzle solution, ``sol-0``); it is copied only when
its ``complete.json`` exists, which assemble writes after every other file, and only the files that
record lists, each checked against its recorded sha256 (:func:`puzzle.run.download_child`, which the
evaluate step uses too). ``DEST`` then loads with ``puzzle.model.load_pretrained`` and with the serving
engines the run's ``search_space.serving`` names.
"""

from __future__ import annotations

from pathlib import Path

from puzzle.commands import run_uri
from puzzle.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("fetch", help="copy a complete child model out of a run's store")
    p.add_argument("run", metavar="RUN_URI", type=run_uri, help="the run's root: file://... or s3://BUCKET/PREFIX/RUN_ID")
    p.add_argument("dest", type=Path, metavar="DEST", help="local directory to write the model into")
    p.add_argument("--solution", default="sol-0", metavar="ID",
                   help="which model: sol-0, sol-1, ..., a baseline (baseline-uniform-ffn-m1.0, baseline-drop-3, ...: "
                        "`puzzle report` lists them) or parent (default: sol-0)")
    p.add_argument("--force", action="store_true", help="write into a DEST that is not empty")
    p.set_defaults(func=_main)


def fetch_child(store, solution: str, dest: Path, force: bool = False) -> list[Path]:
    """Copy ``child/<solution>/`` into ``dest``; returns the files written."""
    from puzzle.run import ChildError, download_child

    if dest.exists() and not dest.is_dir():
        raise UserError(f"DEST: {str(dest)!r} exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise UserError(f"DEST: {str(dest)!r} is not empty; choose another directory or pass --force")
    try:
        record = download_child(store, solution, dest)
    except ChildError as err:
        raise UserError(f"--solution: {err}") from None
    return [dest / name for name in sorted(record["files"])]


def _main(args) -> int:
    from puzzle.run import open_run

    run = open_run(args.run)
    files = fetch_child(run.store, args.solution, args.dest, args.force)
    size = sum(p.stat().st_size for p in files)
    print(f"fetched {args.solution}: {len(files)} files, {size / 2**20:.1f} MiB into {args.dest}")
    return 0
