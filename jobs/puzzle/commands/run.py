"""``puzzle run CONFIG`` (or ``puzzle run --resume RUN_URI``): the whole pipeline on this machine.

Checks the config against the parent's config.json and prints the plan (units, memory per unit,
estimated GPU hours) before a run exists, so bad input leaves no run behind; then runs every step with
worker processes and progress bars, prints the results table and the run URI last. A failure names the
step and unit and leaves every completed artifact in place, and the message says the way out: for a
failure a retry can fix, ``puzzle run --resume RUN_URI``; for refused input, fix it and redo from the
step that read it: ``puzzle run --resume RUN_URI [--config FIXED.yaml] --redo STEP`` (the config change is
recorded in the run's ``history/``). Ctrl-C stops the workers and prints how to resume.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from puzzle.commands import run_uri
from puzzle.config import load_config
from puzzle.errors import EXIT_BAD_INPUT, EXIT_FAILED, UserError
from puzzle.run import create_run


def register(sub) -> None:
    p = sub.add_parser("run", help="run the whole pipeline locally (artifacts in the config's store)")
    p.add_argument("config", nargs="?", help="run config (YAML)")
    p.add_argument("--resume", metavar="RUN_URI", type=run_uri, help="continue an earlier run; nothing completed is redone")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: one per GPU, else 2 on CPU); several may share one GPU")
    p.add_argument("--run-id", default=None, help="use this run id instead of a fresh one")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config against the parent and print the plan (units, memory per unit, "
                        "estimated GPU hours per step) only")
    p.add_argument("--steps", default=None, metavar="NAMES",
                   help="run only these steps, comma-separated (e.g. prepare,bld); later ones stay pending")
    p.add_argument("--redo", default=None, metavar="STEP",
                   help="with --resume: run STEP and every step after it again (their outputs are removed)")
    p.add_argument("--config", dest="new_config", default=None, metavar="FILE",
                   help="with --resume --redo: replace the run's config (kept in history/); refused when it "
                        "changes what a step before STEP read")
    p.set_defaults(func=_main)


def _step_names(text: str | None, flag: str) -> list[str] | None:
    from puzzle.context import STEP_NAMES

    if text is None:
        return None
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in STEP_NAMES]
    if bad or not names:
        raise UserError(f"{flag}: {text!r} is not allowed; allowed: a comma-separated subset of {', '.join(STEP_NAMES)}")
    return names


def _main(args) -> int:
    from puzzle import pipeline
    from puzzle.local import UnitFailure, describe, interrupted_summary, run_pipeline

    if bool(args.config) == bool(args.resume):
        raise UserError("give a CONFIG file or --resume RUN_URI (one of them)")
    steps = _step_names(args.steps, "--steps")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers: {args.workers} is not allowed; allowed: an integer >= 1")
    if (args.redo or args.new_config) and not args.resume:
        raise UserError("--redo and --config go with --resume RUN_URI (a new run takes its config positionally)")
    if args.new_config and not args.redo:
        raise UserError("--config: a changed config needs --redo STEP (the first step whose inputs it changes)")
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
        if args.redo:
            _redo(run_uri, args.redo, args.new_config)
    print(f"run: {run_uri}", file=sys.stderr)
    try:
        run_pipeline(run_uri, workers=args.workers, steps=steps)
    except KeyboardInterrupt as err:  # Ctrl-C, or Stopped by SIGTERM / SIGHUP
        print(f"\n{interrupted_summary(run_uri)}", file=sys.stderr)
        return 128 + getattr(err, "signum", signal.SIGINT)
    except UnitFailure as err:
        if err.bad_input:
            first = pipeline.step(err.step).name
            print(f"error: {err}\nthe input was refused, so resuming as it is fails the same way: fix what the "
                  f"message names (the config, or the files it points to), then:\n  puzzle run --resume {run_uri} "
                  f"--config FIXED.yaml --redo {first}   (or without --config, if the fix was outside it)",
                  file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"error: {err}\nresume with: puzzle run --resume {run_uri}", file=sys.stderr)
        return EXIT_FAILED
    _print_summary(run_uri, steps)
    print(run_uri)
    return 0


def _redo(run_uri: str, step: str, new_config: str | None) -> None:
    from puzzle import pipeline
    from puzzle.run import open_run, redo

    _step_names(step, "--redo")
    run = open_run(run_uri)
    order = [s.name for s in pipeline.topological_order()]
    later = {step} | pipeline.descendants(step)
    text = Path(new_config).read_text(encoding="utf-8") if new_config else None
    if new_config and not Path(new_config).is_file():
        raise UserError(f"--config: {new_config!r} does not exist")
    done = redo(run, [s for s in order if s in later], text)
    what = f"; config changed: {', '.join(done['config_changed'])}" if done["config_changed"] else ""
    print(f"redo: {', '.join(done['redo'])} will run again ({done['removed_keys']} keys removed{what})",
          file=sys.stderr)


def _print_summary(run_uri: str, steps: list[str] | None) -> None:
    """The results table at the end of a whole run (what `puzzle report` prints)."""
    if steps is not None and "report" not in steps:
        return
    from puzzle import pipeline
    from puzzle.layout import REPORT_JSON
    from puzzle.report import summary_table
    from puzzle.run import format_unit_seconds, open_run, unit_seconds

    store = open_run(run_uri).store
    if store.exists(REPORT_JSON):
        print(summary_table(store.get_json(REPORT_JSON)), file=sys.stderr)
    print(format_unit_seconds(unit_seconds(store, [s.name for s in pipeline.topological_order()])),
          file=sys.stderr)
