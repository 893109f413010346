"""The local runner: the pipeline's DAG on one machine, units fanned out to worker processes.

``puzzle run CONFIG`` creates a run in the config's store (default ``file://./runs``) and runs every
step of :mod:`puzzle.pipeline` in dependency order; the units of one step go to a pool of worker
processes (one per GPU by default; ``--workers N`` shares the GPUs round-robin). A unit that completed
has a done marker in the store and is never run again, so ``puzzle run --resume RUN_URI`` picks up where
a failed or killed run stopped. The run URI is printed last. On a machine with several GPUs, a
distributed step's unit that is alone in its level (one solution: assemble, then evaluate) gets all the
GPUs the run uses instead, as torchrun workers (:func:`unit_gpus`).

Units that time the target (profile, evaluate) run alone, and hold a machine-wide lock while they do, so
two runs on one machine never measure at the same time (the second waits, and says so). Ctrl-C stops
the workers; what completed stays, and the command prints how to resume.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import fcntl
import json
import logging
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from puzzle import pipeline
from puzzle.config import PuzzleConfig
from puzzle.layout import done_key
from puzzle.run import check_done, done_ids, open_run, plan_units

log = logging.getLogger(__name__)


@dataclass
class UnitFailure(Exception):
    step: str
    unit_id: str
    message: str
    bad_input: bool = False  # the unit's input was refused (exit 2 for `puzzle step`): a retry cannot help

    def __str__(self) -> str:
        return f"step {self.step}, unit {self.unit_id}: {self.message}"


class Stopped(KeyboardInterrupt):
    """`puzzle run` was told to stop by a signal other than Ctrl-C (SIGTERM: `kill`, SIGHUP: the terminal
    closed). Handled as Ctrl-C is: the workers are stopped, completed units keep their markers."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop_on(signum: int, _frame) -> None:
    raise Stopped(signum)


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this worker when the process that started it dies, even by SIGKILL: a worker
    left behind would go on training and writing into a run nobody is running."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _worker_init(threads: int, gpu_queue) -> None:
    _die_with_parent()
    # one progress bar for the whole run: the units' own bars would interleave on the same terminal
    os.environ["TQDM_DISABLE"] = "1"
    # Ctrl-C is the parent's to handle: it stops the workers itself, so none dies mid-write on its own
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if gpu_queue is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu_queue.get())
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _worker_run(step: str, run_uri: str, unit: dict[str, Any]) -> tuple[str, str, float]:
    from puzzle.context import run_step
    from puzzle.errors import is_bad_input

    started = time.time()
    try:
        run_step(step, run_uri, unit)
    except Exception as err:  # noqa: BLE001 - reported to the parent with the unit named
        kind = "bad_input" if is_bad_input(err) else "error"
        return (kind, f"{type(err).__name__}: {err}", time.time() - started)
    finally:
        _release_gpu_cache()
    return ("ok", "", time.time() - started)


def _release_gpu_cache() -> None:
    # A pool worker outlives its unit: give its cached GPU memory back, so a later unit that runs on
    # all GPUs as torchrun workers (unit_gpus) finds it free.
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


#: Steps whose units time the target device: each runs alone, under the machine-wide measuring lock.
TIMED_STEPS = frozenset({"profile", "evaluate"})
#: The lock two runs on one machine share while measuring (one file per machine and user).
MEASURE_LOCK = os.path.join(tempfile.gettempdir(), f"puzzle-measure-{os.getuid()}.lock")


@contextlib.contextmanager
def measuring_lock(path: str = MEASURE_LOCK, say=lambda m: print(m, file=sys.stderr)):
    """Hold the machine-wide measuring lock; if another run holds it, say so and wait."""
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            who = fh.read().strip() or "another process"
            say(f"another puzzle run is measuring on this machine ({who}); waiting for it, so the two do "
                "not skew each other's timings")
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)


def levels() -> list[list[pipeline.Step]]:
    """Steps grouped so every step's dependencies lie in earlier groups (bld and profile share one)."""
    depth: dict[str, int] = {}
    for s in pipeline.topological_order():
        depth[s.name] = 1 + max((depth[d] for d in s.depends), default=-1)
    out: list[list[pipeline.Step]] = [[] for _ in range(max(depth.values()) + 1)]
    for s in pipeline.topological_order():
        out[depth[s.name]].append(s)
    return out


def unit_gpus(step: pipeline.Step, gpus: int, pending: int) -> int:
    """GPUs that one unit of ``step`` gets from ``puzzle run`` when the run uses ``gpus`` GPUs and
    ``pending`` units are all its level has to run.

    All of them for a distributed step whose unit is alone (the other GPUs would idle): it runs as one
    torchrun worker per GPU, as in a pod with ``gpu-count`` GPUs. Otherwise one: units fan out over the
    GPUs, one each, which is the faster use of them whenever there are several units.
    """
    return gpus if step.distributed and gpus > 1 and pending == 1 else 1


def pending_units(store, step: pipeline.Step, root=None) -> list[dict[str, Any]]:
    """The units of ``step`` still to run: not done, or done but with an output that is missing or changed
    since (resume verifies, it does not just trust a marker; ``root``: the store holding the runs)."""
    units = plan_units(store, step.fan_out)
    if units is None:
        raise RuntimeError(f"plan list {step.fan_out!r} of step {step.name!r} is missing although its producer ran")
    done = done_ids(store, step.name)
    out = []
    for u in units:
        uid = str(u["id"])
        if uid not in done:
            out.append(u)
            continue
        if root is None:
            continue
        problems = check_done(root, store.get_json(done_key(step.name, uid)))
        if problems:
            print(f"redoing {step.name}/{uid}: its done marker cannot be trusted: {'; '.join(problems[:3])}"
                  f"{' ...' if len(problems) > 3 else ''}", file=sys.stderr)
            store.delete(done_key(step.name, uid))
            out.append(u)
    return out


def default_workers() -> int:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except ImportError:
        pass
    return min(2, os.cpu_count() or 1)


def run_pipeline(run_uri: str, workers: int | None = None, steps: list[str] | None = None,
                 progress: bool = True) -> None:
    """Run (or resume) every pending unit of the run at ``run_uri``. Raises UnitFailure on the first failure."""
    run = open_run(run_uri)
    store = run.store
    root = run.root_store()
    workers = workers or default_workers()
    if workers < 1:
        raise ValueError(f"workers: {workers} is not allowed; allowed: an integer >= 1")
    gpus = _gpu_count()
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = mp.get_context("spawn")
    gpu_queue = None
    if gpus:
        # worker i runs on GPU i % gpus: several workers may share a GPU (small models, CPU-bound steps)
        gpu_queue = ctx.Queue()
        for i in range(workers):
            gpu_queue.put(i % gpus)
    pool = cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(threads, gpu_queue))
    # signal handlers belong to the main thread (the CLI's); a caller on another thread keeps its own
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, _stop_on) for sig in (signal.SIGTERM, signal.SIGHUP)} if main else {}
    try:
        for level in levels():
            todo = [(s, u) for s in level if steps is None or s.name in steps
                    for u in pending_units(store, s, root)]
            if not todo:
                continue
            # Units that time the target (profile, evaluate) run alone: a unit timed while another one
            # computes on the same cores or GPU measures the contention, not the model.
            alone = [t for t in todo if t[0].name in TIMED_STEPS]
            shared = [t for t in todo if t not in alone]
            names = "+".join(s.name for s in level)
            bar = tqdm(total=len(todo), desc=names, unit="unit", disable=not progress, file=sys.stderr)
            # the GPUs this run uses: workers share them round-robin, so fewer workers use fewer GPUs
            lone = unit_gpus(todo[0][0], min(workers, gpus), len(todo))
            try:
                if lone > 1:
                    lock = measuring_lock() if todo[0][0].name in TIMED_STEPS else contextlib.nullcontext()
                    with lock:
                        _run_on_all_gpus(*todo[0], run_uri, lone, bar)
                else:
                    _run_units(pool, shared, run_uri, bar)
                    if alone:
                        with measuring_lock():
                            for t in alone:
                                _run_units(pool, [t], run_uri, bar)
            finally:
                bar.close()
    except KeyboardInterrupt:
        # stop now: no worker finishes a unit it cannot publish; completed units keep their markers
        _kill_workers(pool)
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        pool.shutdown(wait=True, cancel_futures=True)


def _kill_workers(pool: cf.ProcessPoolExecutor) -> None:
    for p in list(getattr(pool, "_processes", {}).values()):
        with contextlib.suppress(Exception):
            p.terminate()


def _run_units(pool, todo, run_uri: str, bar) -> None:
    """Run units on the pool; on the first failure cancel the rest and raise it (completed units stay done)."""
    futures = {pool.submit(_worker_run, s.name, run_uri, u): (s, u) for s, u in todo}
    failure: UnitFailure | None = None
    for fut in cf.as_completed(futures):
        s, u = futures[fut]
        try:
            status, message, _ = fut.result()
        except cf.process.BrokenProcessPool:
            status, message = "error", "the worker process died (killed, or out of memory)"
        except cf.CancelledError:
            continue
        if status != "ok" and failure is None:
            failure = UnitFailure(s.name, str(u["id"]), message, bad_input=status == "bad_input")
            for f in futures:
                f.cancel()
        bar.update(1)
        bar.set_postfix_str(f"{s.name}/{u['id']}")
    if failure is not None:
        raise failure


def _run_on_all_gpus(step: pipeline.Step, unit: dict[str, Any], run_uri: str, gpus: int, bar) -> None:
    """One unit as ``gpus`` torchrun workers, launched from this process as `puzzle step` would be."""
    from puzzle import launch
    from puzzle.errors import EXIT_BAD_INPUT

    argv = ["step", step.name, "--run", run_uri, "--unit", json.dumps(unit), "--nproc-per-node", str(gpus)]
    status = launch.launch(argv, gpus)
    bar.update(1)
    bar.set_postfix_str(f"{step.name}/{unit['id']} on {gpus} GPUs")
    if status != 0:
        raise UnitFailure(step.name, str(unit["id"]), f"its {gpus} torchrun workers exited with status {status}",
                          bad_input=status == EXIT_BAD_INPUT)


def interrupted_summary(run_uri: str) -> str:
    """What a Ctrl-C left: units done per step, and the command that resumes the run."""
    from puzzle.run import progress

    run = open_run(run_uri)
    rows = progress(run.store, pipeline.topological_order())
    done = ", ".join(f"{p.step} {p.done}/{'?' if p.total is None else p.total}" for p in rows if p.done or p.total)
    return (f"interrupted: completed units are saved in {run_uri} ({done}); training units resume from their "
            f"last checkpoint\nresume with: puzzle run --resume {run_uri}")


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def describe(config: PuzzleConfig) -> str:
    """What a run of this config will do, step by step (printed before running)."""
    lines = [f"run {config.name!r}: parent {config.parent.uri}, store {config.store.uri}"]
    for level in levels():
        for s in level:
            fan = f"one unit per entry of plan/{s.fan_out}.json" if s.fan_out else "one unit"
            lines.append(f"  {s.name:<9} {fan}; after {', '.join(s.depends) or '-'}")
    return "\n".join(lines)


__all__ = ["UnitFailure", "describe", "run_pipeline"]
