"""``puzzle step NAME --run RUN_URI [--unit JSON] [--outputs DIR] [--nproc-per-node N]``: run one unit.

This is what every pod of the Argo workflow runs, and what ``puzzle run`` runs in local worker
processes. Exit status: 0 done (or already done), 2 bad input (Argo does not retry it), 1 otherwise.

``--nproc-per-node N`` (distributed steps only; the workflow passes its ``gpu-count``): with N > 1 the
command relaunches itself as N torchrun workers, one per GPU, and exits with their status
(:mod:`puzzle.launch`); a worker, or N = 1, runs the unit in this process.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from puzzle import launch, pipeline
from puzzle.commands import run_uri
from puzzle.context import STEP_NAMES, parse_unit, run_step
from puzzle.errors import EXIT_BAD_INPUT, EXIT_FAILED, BadInputError, PuzzleError, describe_failure, exit_code

log = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser("step", help="run one unit of one pipeline step (what each pod runs)")
    p.add_argument("name", choices=STEP_NAMES, help="the step")
    p.add_argument("--run", required=True, metavar="RUN_URI", type=run_uri, help="the run's root: file://... or s3://.../RUN_ID")
    p.add_argument("--unit", default=None, metavar="JSON", help='the work unit, a JSON object with an "id"')
    p.add_argument("--outputs", type=Path, default=None, metavar="DIR",
                   help="also write fan-out lists here (Argo output parameters)")
    p.add_argument("--force", action="store_true", help="run even if the unit is already complete")
    p.add_argument("--nproc-per-node", type=_count, default=1, metavar="N",
                   help="processes (one per GPU) for a distributed step: N > 1 launches N torchrun workers")
    p.set_defaults(func=_main)


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; give a whole number >= 1 (processes per pod)")
    return int(text)


def _worker_argv(args) -> list[str]:
    """The command line each torchrun worker runs: this one (it sees LOCAL_RANK, so it does not relaunch)."""
    argv = ["-v"] if getattr(args, "verbose", False) else []
    argv += ["step", args.name, "--run", args.run, "--nproc-per-node", str(args.nproc_per_node)]
    if args.unit is not None:
        argv += ["--unit", args.unit]
    if args.outputs is not None:
        argv += ["--outputs", str(args.outputs)]
    if args.force:
        argv.append("--force")
    return argv


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _main(args) -> int:
    try:
        unit = parse_unit(args.unit)
    except BadInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT

    if launch.is_torchrun_worker():
        with launch.process_group() as (rank, world, backend):
            log.info("%s/%s: rank %d of %d (%s)", args.name, unit["id"], rank, world, backend)
            return _run(args, unit)
    if args.nproc_per_node > 1:
        launch.check_nproc(pipeline.step(args.name), args.nproc_per_node, _gpus())
        return launch.launch(_worker_argv(args), args.nproc_per_node)
    return _run(args, unit)


def _run(args, unit) -> int:
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
