"""``puzzle status RUN_URI``: per-step progress of a run, read from its artifacts.

Counts the done markers ``done/<step>/<unit-id>.json`` against the plan lists ``plan/<list>.json`` and
shows the units whose last attempt failed (``failed/<step>/<unit>.json``, with their error), so it works
the same for local and cluster runs and needs no cluster access. ``--record-final`` is what the
Workflow's exit handler runs: it writes the final status to ``status.json`` in the run.
"""

from __future__ import annotations

import json

from puzzle.commands import run_uri


def register(sub) -> None:
    p = sub.add_parser("status", help="show a run's per-step progress (from its artifacts)")
    p.add_argument("run", metavar="RUN_URI", type=run_uri, help="the run's root: file://... or s3://BUCKET/PREFIX/RUN_ID")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--record-final", default=None, metavar="STATUS",
                   help="record the workflow's final status in status.json (the exit handler uses this)")
    p.add_argument("--workflow", default=None, help="workflow name recorded with --record-final")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from puzzle import pipeline
    from puzzle.layout import STATUS
    from puzzle.run import format_progress, open_run, progress, record_final_status

    run = open_run(args.run)
    steps = pipeline.topological_order()
    if args.record_final is not None:
        record = record_final_status(run.store, steps, args.record_final, args.workflow)
        print(f"recorded final status {record['status']!r} in {run.store.uri}/{STATUS}")
        return 0
    rows = progress(run.store, steps)
    final = run.store.get_json(STATUS) if run.store.exists(STATUS) else None
    if args.json:
        print(json.dumps({
            "run": args.run,
            "steps": [{"step": p.step, "done": p.done, "total": p.total, "complete": p.complete,
                       "failed": list(p.failed)} for p in rows],
            "final": final,
        }, indent=2))
    else:
        print(f"run {args.run}")
        print(format_progress(rows, final))
    return 0
