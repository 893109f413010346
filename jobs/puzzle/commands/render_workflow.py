"""``puzzle render-workflow``: write the Argo WorkflowTemplate rendered (Hera) from ``puzzle.pipeline``.

Writes ``k8s/workflowtemplate.yaml`` and the identical copy the Helm chart ships through ``.Files.Get``
(``charts/puzzle/files/workflowtemplate.yaml``). ``--check`` only compares and exits 1 when a committed
file is stale, which is what CI wants.
"""

from __future__ import annotations

import sys
from pathlib import Path

from puzzle.errors import UserError

DEFAULT_OUT = Path("k8s/workflowtemplate.yaml")
DEFAULT_CHART_COPY = Path("charts/puzzle/files/workflowtemplate.yaml")


def register(sub) -> None:
    p = sub.add_parser("render-workflow", help="render the Argo WorkflowTemplate from the pipeline definition")
    p.add_argument("--out", default=str(DEFAULT_OUT), metavar="PATH",
                   help=f"where to write it ('-' for stdout; default {DEFAULT_OUT})")
    p.add_argument("--chart-copy", default=str(DEFAULT_CHART_COPY), metavar="PATH",
                   help="the chart's copy, written too when its directory exists ('' to skip)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file differs from a fresh render")
    p.add_argument("--summary", action="store_true", help="print the pipeline's steps as JSON instead")
    p.set_defaults(func=_main)


def targets(out: str, chart_copy: str) -> list[Path]:
    paths = [Path(out)]
    if chart_copy and Path(chart_copy).parent.is_dir():
        paths.append(Path(chart_copy))
    return paths


def _main(args) -> int:
    from puzzle import argo, pipeline

    if args.summary:
        print(pipeline.dumps_summary())
        return 0
    text = argo.render_workflow_template_yaml()
    if args.out == "-":
        sys.stdout.write(text)
        return 0
    paths = targets(args.out, args.chart_copy)
    if args.check:
        stale = [p for p in paths if not p.is_file() or p.read_text(encoding="utf-8") != text]
        for p in stale:
            print(f"{p}: differs from a fresh render; run `puzzle render-workflow`", file=sys.stderr)
        return 1 if stale else 0
    for p in paths:
        if not p.parent.is_dir():
            raise UserError(f"--out: directory {str(p.parent)!r} does not exist")
        p.write_text(text, encoding="utf-8")
        print(f"wrote {p} ({argo.template_name()})")
    return 0
