"""``puzzle report RUN_URI [--open] [--json]``: a run's results as text, or its HTML report.

Reads ``report.json`` (written by the report step); a run whose report step has not run yet gets a
report built on the spot from whatever has been evaluated so far (not written to the store). The text
is :func:`puzzle.report.summary_table`, the same ``puzzle run`` prints at its end: the targets of solve
met or missed, one row per model, the baselines compared at equal measured speed, the ICL sentences and
the legend of variant codes, in at most 110 columns. ``--open`` opens ``report.html`` in the browser
(downloaded first when the run is in S3); ``--json`` prints report.json.
"""

from __future__ import annotations

import json
import tempfile
import webbrowser
from pathlib import Path

from puzzle.commands import run_uri
from puzzle.errors import UserError


def register(sub) -> None:
    p = sub.add_parser("report", help="print a run's results (targets, table, comparisons) or open its HTML report")
    p.add_argument("run", metavar="RUN_URI", type=run_uri, help="the run's root: file://... or s3://BUCKET/PREFIX/RUN_ID")
    p.add_argument("--open", action="store_true", help="open report.html in a browser")
    p.add_argument("--json", action="store_true", help="print report.json")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from puzzle.layout import REPORT_HTML, REPORT_JSON
    from puzzle.report import build_report, render_html, summary_table
    from puzzle.run import open_run
    from puzzle.store import FileStore

    run = open_run(args.run)
    store = run.store
    stored = store.exists(REPORT_JSON)
    report = store.get_json(REPORT_JSON) if stored else build_report(store, run.config, run.run_id)
    if not report["solutions"] and not report.get("parent"):
        raise UserError(f"run {args.run!r} has nothing evaluated yet (no eval/*/report.json); see `puzzle status`")
    if args.open:
        if stored and store.exists(REPORT_HTML) and isinstance(store, FileStore):
            path = store.root / REPORT_HTML
        else:
            path = Path(tempfile.mkdtemp(prefix="puzzle-report-")) / REPORT_HTML
            path.write_text(store.get_text(REPORT_HTML) if store.exists(REPORT_HTML) else render_html(report),
                            encoding="utf-8")
        print(f"opening {path}")
        if not webbrowser.open(path.resolve().as_uri()):
            print(f"no browser available here; open {path} yourself")
        return 0
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if not stored:
        print("(report step not run yet: built from the evaluations so far)")
    print(summary_table(report))
    return 0
