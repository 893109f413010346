"""``puzzle run CONFIG`` (or ``puzzle run --resume RUN_URI``): the whole pipeline on this machine.

Prints what will run, runs every step with worker processes and progress bars, and prints the
run URI last. A failure names the step and unit and leaves every completed artifact in place:
``puzzle run --resume RUN_URI`` continues from there.
"""

from __future__ import annotations

import sys
from pathlib import Path

from puzzle.config import load_config
from puzzle.run import create_run


def register(sub) -> None:
    p = sub.add_parser("run", help="run the whole pipeline locally (artifacts in the config's store)")
    p.add_argument("config", nargs="?", help="run config (YAML)")
    p.add_argument("--resume", metavar="RUN_URI", help="continue an earlier run; nothing completed is redone")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: one per GPU, else 2 on CPU)")
    p.add_argument("--run-id", default=None, help="use this run id instead of a fresh one")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config against the parent and print the plan (units, memory per unit, "
                        "estimated GPU hours per step) only")
    p.add_argument("--steps", default=None, metavar="NAMES",
                   help="run only these steps, comma-separated (e.g. prepare,bld); later ones stay pending")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from puzzle.local import UnitFailure, describe, run_pipeline

    if bool(args.config) == bool(args.resume):
        print("error: give a CONFIG file or --resume RUN_URI (one of them)", file=sys.stderr)
        return 2
    steps = None
    if args.steps is not None:
        from puzzle.context import STEP_NAMES

        steps = [s.strip() for s in args.steps.split(",") if s.strip()]
        bad = [s for s in steps if s not in STEP_NAMES]
        if bad or not steps:
            print(f"error: --steps: {args.steps!r} is not allowed; allowed: a comma-separated subset of "
                  f"{', '.join(STEP_NAMES)}", file=sys.stderr)
            return 2
    if args.workers is not None and args.workers < 1:
        print(f"error: --workers: {args.workers} is not allowed; allowed: an integer >= 1", file=sys.stderr)
        return 2
    if args.config:
        from puzzle.planning import format_plan, preflight

        config = load_config(args.config)
        print(describe(config), file=sys.stderr)
        # everything the config and the parent's config.json can tell, before a run exists
        checked = preflight(config)
        if checked is not None:
            print(format_plan(checked.cost), file=sys.stderr)
        else:
            print("plan: the parent is a hub name; prepare checks it and writes plan/cost.json", file=sys.stderr)
        if args.dry_run:
            return 0
        run_uri = create_run(config, Path(args.config).read_text(encoding="utf-8"), run_id=args.run_id)
    else:
        run_uri = args.resume
    print(f"run: {run_uri}", file=sys.stderr)
    try:
        run_pipeline(run_uri, workers=args.workers, steps=steps)
    except UnitFailure as err:
        print(f"error: {err}\nresume with: puzzle run --resume {run_uri}", file=sys.stderr)
        return 2 if err.bad_input else 1  # as `puzzle step` exits: 2 for input a retry cannot fix
    print(run_uri)
    return 0
