"""``puzzle step NAME --run RUN_URI [--unit JSON] [--outputs DIR]``: run one unit of one step.

This is what every pod of the Argo workflow runs, and what ``puzzle run`` runs in local worker
processes. Exit status: 0 done (or already done), 2 bad input (Argo does not retry it), 1 otherwise.
"""

from __future__ import annotations

import errno
import logging
import sys
from pathlib import Path

from puzzle.config import ConfigError
from puzzle.context import STEP_NAMES, UnitError, parse_unit, run_step
from puzzle.store import InvalidKeyError, StoreError

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
    except UnitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        ran = run_step(args.name, args.run, unit, outputs_dir=args.outputs, force=args.force)
    except (UnitError, ConfigError, InvalidKeyError) as err:
        print(f"error: step {args.name}, unit {unit['id']}: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - name the step and unit on every failure
        if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
            print(f"error: step {args.name}, unit {unit['id']}: out of memory ({str(err)[:300]}); "
                  "lower the step's batch_size in the config", file=sys.stderr)
            return 1
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            print(f"error: step {args.name}, unit {unit['id']}: no space left on device ({err.filename or ''}); "
                  "free disk space or give the pod a larger scratch volume, then retry", file=sys.stderr)
            return 1
        if isinstance(err, StoreError):
            print(f"error: step {args.name}, unit {unit['id']}: {err}", file=sys.stderr)
            return 1
        raise
    if not ran:
        print(f"{args.name}/{unit['id']}: already complete")
    return 0
