"""Launching one step unit as several processes of one machine (torchrun), for steps that shard a model.

A pod of a ``distributed`` step (:class:`puzzle.pipeline.Step`: score, assemble with GKD, evaluate) runs
``puzzle step NAME ... --nproc-per-node N`` with N the workflow's ``gpu-count``. With N = 1 the unit
runs in-process, as every other step. With N > 1 the command hands itself to PyTorch's elastic launcher
(:func:`launch`: ``torch.distributed.run``, what the ``torchrun`` script runs, single node,
``--standalone``), which starts N copies of the same command; each copy finds ``LOCAL_RANK`` and
``WORLD_SIZE`` in its environment (:func:`is_torchrun_worker`), so it does not launch again but runs the
unit inside :func:`process_group`: its GPU selected, the default process group initialised (NCCL on
GPUs, gloo on CPU). How a step splits its work over the ranks is the step's business (FSDP2); this
module only launches.

Exit status: torchrun itself exits 1 whatever its workers returned, so :func:`launch` reads the
workers' exit codes instead (:func:`exit_status`): bad input (2) in any worker is 2, never retried;
otherwise the first failure's code, a signal as 128 + its number (137: killed, e.g. out of memory).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from puzzle.errors import EXIT_BAD_INPUT, UserError

log = logging.getLogger(__name__)

#: Set by torchrun in each worker's environment; either one means "already launched".
WORKER_ENV = ("LOCAL_RANK", "WORLD_SIZE")


def is_torchrun_worker(environ: Mapping[str, str] = os.environ) -> bool:
    return any(k in environ for k in WORKER_ENV)


def check_nproc(step, nproc: int, gpus: int) -> None:
    """Refuse a process count the step or the machine cannot take (bad input, exit 2).

    ``step`` is a :class:`puzzle.pipeline.Step`; ``gpus`` the CUDA devices visible (0: CPU, gloo).
    """
    if nproc < 1:
        raise UserError(f"--nproc-per-node: {nproc} is not allowed; give a whole number >= 1")
    if nproc > 1 and not step.distributed:
        raise UserError(
            f"--nproc-per-node: {nproc} processes for step {step.name!r}, which runs in one process; "
            "only distributed steps take more than 1"
        )
    if gpus and nproc > gpus:
        raise UserError(
            f"--nproc-per-node: {nproc} processes, one per GPU, but {gpus} GPU(s) are visible; "
            f"give at most {gpus} (on a cluster, gpu-count sets both)"
        )


def exit_status(exitcodes: Mapping[int, int]) -> int:
    """The launch's exit status from its failed workers' exit codes (rank -> code, in failure order).

    Bad input in any worker wins: the other ranks' failures follow from it (their peer went away), and a
    retry cannot help. Else the first failure's code; a worker killed by signal S (code -S) gives 128 + S,
    as a shell reports it.
    """
    if not exitcodes:
        return 0
    if EXIT_BAD_INPUT in exitcodes.values():
        return EXIT_BAD_INPUT
    code = next(iter(exitcodes.values()))
    return 128 - code if code < 0 else code


def launch(argv: list[str], nproc: int) -> int:
    """Run ``python -m puzzle.cli *argv`` as ``nproc`` workers under ``torch.distributed.run``.

    Returns the exit status of the launch (:func:`exit_status`); the workers' output goes to this
    process's stdout and stderr, unprefixed, as torchrun does by default.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(["--standalone", "--nproc-per-node", str(nproc), "-m", "puzzle.cli"])
    # Set apart from the launcher's own options: its parser would take our `--run` for an abbreviation
    # of its `--run-path`.
    args.training_script_args = list(argv)
    # The launcher sets OMP_NUM_THREADS for its workers in our own environment, and installs signal
    # handlers that turn SIGTERM/SIGINT into its SignalException: both are put back afterwards, so a
    # caller that goes on (`puzzle run`) keeps its environment and its Ctrl-C.
    omp = os.environ.get("OMP_NUM_THREADS")
    if omp is None:
        os.environ["OMP_NUM_THREADS"] = "1"  # the launcher's own choice for N > 1, without its warning
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)}
    try:
        run(args)
    except ChildFailedError as err:
        failures = sorted(err.failures.items(), key=lambda kv: (kv[1].timestamp, kv[0]))
        codes = {rank: f.exitcode for rank, f in failures}
        status = exit_status(codes)
        print(f"error: {nproc} torchrun workers of `puzzle {' '.join(argv[:2])}`: exit codes by rank {codes} "
              f"(see their messages above); exit {status}", file=sys.stderr)
        return status
    except SignalException as err:
        # The launcher has stopped its workers. Ctrl-C stays a KeyboardInterrupt (`puzzle run` prints
        # how to resume); anything else (SIGTERM: the pod is being stopped) says how we died.
        if err.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        return 128 + int(err.sigval)
    finally:
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp
        if threading.current_thread() is threading.main_thread():  # the only thread that may set them
            for sig, handler in handlers.items():
                if handler is not None:
                    signal.signal(sig, handler)
    return 0


@contextmanager
def process_group() -> Iterator[tuple[int, int, str]]:
    """In a torchrun worker: select this rank's GPU and initialise the default process group.

    Yields (rank, world size, backend). ``torch.device("cuda")`` then means this rank's GPU, so steps
    need no rank arithmetic to place tensors.
    """
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    else:
        dist.init_process_group("gloo")
    try:
        yield dist.get_rank(), dist.get_world_size(), dist.get_backend()
    finally:
        dist.destroy_process_group()
