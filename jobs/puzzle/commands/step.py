"""``puzzle step NAME --run RUN_URI [--unit JSON] [--outputs DIR]``: run one unit of one step.

This is what every pod of the Argo workflow runs, and what ``puzzle run`` runs in local worker
processes. Exit status: 0 done (or already done), 2 bad input (Argo does not retry it), 1 otherwise.
"""

from __future__ import annotations

import errno
import logging
import sys
from pathlib import Path

from puzzle.context import BAD_INPUT_ERRORS, STEP_NAMES, UnitError, parse_unit, run_step
from puzzle.store import StoreError

# Disk full, quota exceeded, or the file-size limit (RLIMIT_FSIZE) reached: retrying on the same
# node fails the same way, so the message says what to give the pod.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# torch's CPU allocator reports exhausted memory as a RuntimeError with this text, not MemoryError
_CPU_OOM = "DefaultCPUAllocator: can't allocate memory"
# the config field that sets each step's memory-hungry batch
_BATCH_FIELD = {"bld": "bld.batch_size", "score": "score.batch_size", "assemble": "assemble.gkd.batch_size",
                "profile": "profile.scenarios[].batch_size", "evaluate": "score.batch_size"}


def _causes(err: BaseException):
    """``err`` and the exceptions it was raised from (the store wraps OSErrors in StoreError)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _is_oom(err: BaseException) -> bool:
    return any(isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
               or (isinstance(e, RuntimeError) and _CPU_OOM in str(e)) for e in _causes(err))


def _no_space(err: BaseException) -> OSError | None:
    return next((e for e in _causes(err) if isinstance(e, OSError) and e.errno in _NO_SPACE), None)

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
    except BAD_INPUT_ERRORS as err:
        print(f"error: step {args.name}, unit {unit['id']}: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if _is_oom(err):
            knob = _BATCH_FIELD.get(args.name, "the step's batch_size")
            print(f"error: step {args.name}, unit {unit['id']}: out of memory ({str(err)[:300]}); "
                  f"lower the step's batch_size in the config ({knob})", file=sys.stderr)
            return 1
        full = _no_space(err)
        if full is not None:
            where = str(err) if isinstance(err, StoreError) else (full.filename or "")
            print(f"error: step {args.name}, unit {unit['id']}: no space left on device "
                  f"({errno.errorcode.get(full.errno, full.errno)}: {where}); "
                  "free disk space or give the pod a larger scratch volume, then retry", file=sys.stderr)
            return 1
        if isinstance(err, StoreError):
            print(f"error: step {args.name}, unit {unit['id']}: {err}", file=sys.stderr)
            return 1
        raise
    if not ran:
        print(f"{args.name}/{unit['id']}: already complete")
    return 0
