"""``puzzle status RUN_URI``: per-step progress of a run, read from its artifacts.

Counts the done markers ``done/<step>/<unit-id>.json`` against the plan lists ``plan/<list>.json``,
so it works the same for local and cluster runs and needs no cluster access. ``--record-final`` is
what the Workflow's exit handler runs: it writes the final status to ``status.json`` in the run.
"""

from __future__ import annotations

import json

from puzzle.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("status", help="show a run's per-step progress (from its artifacts)")
    p.add_argument("run", metavar="RUN_URI", help="the run's root: file://... or s3://BUCKET/PREFIX/RUN_ID")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--record-final", default=None, metavar="STATUS",
                   help="record the workflow's final status in status.json (the exit handler uses this)")
    p.add_argument("--workflow", default=None, help="workflow name recorded with --record-final")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from puzzle import k8s
    from puzzle.store import open_store

    store = open_store(args.run)
    if not store.exists("config.yaml"):
        raise UserError(f"RUN_URI: {args.run!r} holds no run (no config.yaml); give <store.uri>/<run-id>")
    if args.record_final is not None:
        record = k8s.record_final_status(store, args.record_final, args.workflow)
        print(f"recorded final status {record['status']!r} in {store.uri}/{k8s.FINAL_STATUS_KEY}")
        return 0
    progress = k8s.run_progress(store)
    final = store.get_json(k8s.FINAL_STATUS_KEY) if store.exists(k8s.FINAL_STATUS_KEY) else None
    if args.json:
        print(json.dumps({
            "run": args.run,
            "steps": [{"step": p.step, "done": p.done, "total": p.total, "complete": p.complete} for p in progress],
            "final": final,
        }, indent=2))
    else:
        print(f"run {args.run}")
        print(k8s.format_progress(progress, final))
    return 0
