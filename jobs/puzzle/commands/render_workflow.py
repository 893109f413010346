"""``puzzle render-workflow``: write the Argo WorkflowTemplate that ``puzzle.argo`` renders from the DAG.

The one committed copy is ``charts/puzzle/files/workflowtemplate.yaml`` (the Helm chart ships it through
``.Files.Get``, which cannot read outside the chart). Run it from the repository root after changing
``jobs/puzzle/pipeline.py`` or ``jobs/puzzle/argo.py``; ``--check`` writes nothing and exits 1 when the
committed file is stale, which is what CI runs. ``--out -`` prints it, ``--summary`` prints the DAG.
"""

from __future__ import annotations

import sys
from pathlib import Path

from puzzle.errors import UserError

#: The one committed render, inside the chart because ``.Files.Get`` cannot read outside it.
DEFAULT_OUT = "charts/puzzle/files/workflowtemplate.yaml"


def register(sub) -> None:
    p = sub.add_parser("render-workflow", help="render the Argo WorkflowTemplate from the pipeline definition")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="PATH",
                   help=f"where to write it ('-' for stdout; default {DEFAULT_OUT}, the chart's copy)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if PATH differs from a fresh render")
    p.add_argument("--summary", action="store_true", help="print the pipeline's steps as JSON instead")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from puzzle import argo, pipeline

    if args.summary:
        print(pipeline.dumps_summary())
        return 0
    text = argo.render_workflow_template_yaml()
    if args.out == "-":
        sys.stdout.write(text)
        return 0
    path = Path(args.out)
    if args.check:
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            print(f"{path}: differs from a fresh render; run `puzzle render-workflow`", file=sys.stderr)
            return 1
        return 0
    if not path.parent.is_dir():
        raise UserError(
            f"--out: directory {str(path.parent)!r} does not exist; run from the repository root or give --out PATH"
        )
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path} ({argo.template_name()})")
    return 0
