"""``puzzle step NAME --run RUN_URI [--unit JSON] [--outputs DIR]``: run one unit of one step.

This is what every pod of the Argo workflow runs, and what ``puzzle run`` runs in local worker
processes. Exit status: 0 done (or already done), 2 bad input (Argo does not retry it), 1 otherwise.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from puzzle.context import STEP_NAMES, parse_unit, run_step
from puzzle.errors import EXIT_BAD_INPUT, EXIT_FAILED, BadInputError, PuzzleError, describe_failure, exit_code

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("step", help="run one unit of one pipeline step (what each pod runs)")
    p.add_argument("name", choices=STEP_NAMES, help="the step")
    p.add_argument("--run", required=True, metavar="RUN_URI", help="the run's root: file://... or s3://.../RUN_ID")
    p.add_argument("--unit", default=None, metavar="JSON", help='the work unit, a JSON object with an "id"')
    p.add_argument("--outputs", type=Path, default=None, metavar="DIR",
                   help="also write fan-out lists here (Argo output parameters)")
    p.add_argument("--force", action="store_true", help="run even if the unit is already complete")
    p.set_defaults(func=_main)


def _main(args) -> int:
    try:
        unit = parse_unit(args.unit)
    except BadInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT

    try:
        ran = run_step(args.name, args.run, unit, outputs_dir=args.outputs, force=args.force)
    except Exception as err:
        where = f"step {args.name}, unit {unit['id']}"
        described = describe_failure(err, args.name)
        if described is not None:
            print(f"error: {where}: {described}", file=sys.stderr)
            return EXIT_FAILED
        if isinstance(err, PuzzleError):
            print(f"error: {where}: {err}", file=sys.stderr)
            return exit_code(err)
        raise
    if not ran:
        print(f"{args.name}/{unit['id']}: already complete")
    return 0
