"""``puzzle fetch RUN_URI [--solution ID] DEST``: copy an assembled child out of the run's store.

The child is ``child/<ID>/`` (default: the first Puzzle solution, ``sol-0``); it is copied only when
its ``complete.json`` exists, which assemble writes after every other file, and only the files that
record lists, each checked against its recorded sha256. ``DEST`` then loads with
``puzzle.model.load_pretrained`` (and, without linear replacements, with vLLM's nemotron_nas).
"""

from __future__ import annotations

from pathlib import Path

from puzzle.errors import UserError
from puzzle.store import file_sha256

COMPLETE = "complete.json"


def register(sub) -> None:
    p = sub.add_parser("fetch", help="copy a complete child model out of a run's store")
    p.add_argument("run", metavar="RUN_URI", help="the run's root: file://... or s3://BUCKET/PREFIX/RUN_ID")
    p.add_argument("dest", type=Path, metavar="DEST", help="local directory to write the model into")
    p.add_argument("--solution", default="sol-0", metavar="ID",
                   help="which model: sol-0, sol-1, ..., baseline-uniform-ffn, baseline-layer-drop, parent "
                        "(default: sol-0)")
    p.add_argument("--force", action="store_true", help="write into a DEST that is not empty")
    p.set_defaults(func=_main)



def open_run(run_uri: str):
    """The run's store, with the endpoint/region its config names (as ``puzzle step`` opens it)."""
    from puzzle.context import load_run_config
    from puzzle.store import InvalidKeyError, open_store

    try:
        store = open_store(run_uri)
    except InvalidKeyError as err:
        raise UserError(f"RUN_URI: {err}") from None
    if not store.exists("config.yaml"):
        raise UserError(f"RUN_URI: {run_uri!r} holds no run (no config.yaml); give <store.uri>/<run-id>")
    config = load_run_config(store, run_uri)
    if config.store.endpoint_url or config.store.region:
        store = open_store(run_uri, config.store)
    return store, config


def fetch_child(store, solution: str, dest: Path, force: bool = False) -> list[Path]:
    """Copy ``child/<solution>/`` into ``dest``; returns the files written."""
    prefix = f"child/{solution}"
    if not store.exists(f"{prefix}/{COMPLETE}"):
        have = sorted({k.split("/")[1] for k in store.list("child") if k.endswith(f"/{COMPLETE}")})
        if store.list(prefix):
            raise UserError(
                f"--solution: child {solution!r} is incomplete (no {prefix}/{COMPLETE}: its assemble unit has not "
                f"finished); complete children: {have or 'none yet'}"
            )
        raise UserError(f"--solution: {solution!r} has no child in this run; complete children: {have or 'none yet'}")
    record = store.get_json(f"{prefix}/{COMPLETE}")
    files = record.get("files") or {}
    if not files:
        raise UserError(f"{prefix}/{COMPLETE} lists no files; the child cannot be fetched")
    if dest.exists() and not dest.is_dir():
        raise UserError(f"DEST: {str(dest)!r} exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()) and not force:
        raise UserError(f"DEST: {str(dest)!r} is not empty; choose another directory or pass --force")
    out = []
    for name, meta in sorted(files.items()):
        path = store.get_file(f"{prefix}/{name}", dest / name)
        if file_sha256(path) != meta["sha256"]:
            raise UserError(
                f"{prefix}/{name}: its sha256 differs from the one {COMPLETE} recorded; the child was changed after "
                "assembly (run `puzzle step assemble --force` for it)"
            )
        out.append(path)
    return out


def _main(args) -> int:
    store, _ = open_run(args.run)
    files = fetch_child(store, args.solution, args.dest, args.force)
    size = sum(p.stat().st_size for p in files)
    print(f"fetched {args.solution}: {len(files)} files, {size / 2**20:.1f} MiB into {args.dest}")
    return 0
