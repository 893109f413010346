"""Launching a distributed step over several processes (jobs/puzzle/launch.py, `puzzle step --nproc-per-node`).

Real torchrun (``torch.distributed.run``, gloo on CPU) with two workers of the real ``puzzle step``: a
unit whose done marker exists (each worker checks it and stops), and a run that does not exist (bad
input in every worker). The local runner's choice of GPUs per unit is tested as a decision, without GPUs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from puzzle import launch, local, pipeline
from puzzle.cli import main
from puzzle.errors import UserError
from puzzle.store import open_store

ROOT = Path(__file__).resolve().parents[1]
UNIT = json.dumps({"id": "u0"})


@pytest.fixture
def run_uri(tmp_path) -> str:
    """A run with score unit u0 already done: each worker finds the marker, says so and exits 0."""
    text = (ROOT / "examples" / "tiny" / "puzzle.yaml").read_text().replace(
        "uri: file://./runs", f"uri: file://{tmp_path}/runs")
    store = open_store(f"file://{tmp_path}/runs/tiny-launch")
    store.put_text("config.yaml", text)
    store.put_json("done/score/u0.json", {"step": "score", "unit": {"id": "u0"}})
    return store.uri


def test_two_torchrun_workers_run_the_unit(run_uri, capfd):
    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT), os.environ.get("OMP_NUM_THREADS"))
    assert main(["step", "score", "--run", run_uri, "--unit", UNIT, "--nproc-per-node", "2"]) == 0
    out, err = capfd.readouterr()  # the workers write to this process's stdout/stderr
    assert out.count("score/u0: already complete") == 2, out
    assert "score/u0: rank 0 of 2 (gloo)" in err and "score/u0: rank 1 of 2 (gloo)" in err, err
    # `puzzle run` launches from its own process and goes on: its signal handlers and env are its own again
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT),
            os.environ.get("OMP_NUM_THREADS")) == before


def test_one_process_runs_in_process(run_uri, capfd):
    assert main(["step", "score", "--run", run_uri, "--unit", UNIT, "--nproc-per-node", "1"]) == 0
    out, err = capfd.readouterr()
    assert out.count("score/u0: already complete") == 1 and "rank" not in err


def test_bad_input_in_a_worker_exits_2(tmp_path):
    """torchrun exits 1 whatever its workers returned; `puzzle step` must still exit 2 (never retried)."""
    r = subprocess.run(
        [sys.executable, "-m", "puzzle.cli", "step", "score", "--run", f"file://{tmp_path}/runs/no-such-run",
         "--unit", UNIT, "--nproc-per-node", "2"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.count("holds no run") == 2, r.stderr[-3000:]  # both workers refused it
    assert "2 torchrun workers of `puzzle step score`" in r.stderr and "exit 2" in r.stderr


def test_a_step_that_runs_in_one_process_refuses_more(tmp_path, capsys):
    assert main(["step", "prepare", "--run", f"file://{tmp_path}/runs/r", "--nproc-per-node", "2"]) == 2
    assert "2 processes for step 'prepare', which runs in one process" in capsys.readouterr().err


@pytest.mark.parametrize("count", ["0", "two", "-1"])
def test_a_count_that_is_not_a_whole_number_exits_2(tmp_path, capsys, count):
    with pytest.raises(SystemExit) as exit_:
        main(["step", "score", "--run", f"file://{tmp_path}/runs/r", f"--nproc-per-node={count}"])
    assert exit_.value.code == 2
    assert f"--nproc-per-node: {count!r} is not allowed; give a whole number >= 1" in capsys.readouterr().err


def test_more_processes_than_gpus_is_refused():
    with pytest.raises(UserError, match="4 processes, one per GPU, but 2 GPU"):
        launch.check_nproc(pipeline.step("assemble"), 4, gpus=2)
    launch.check_nproc(pipeline.step("assemble"), 2, gpus=2)
    launch.check_nproc(pipeline.step("assemble"), 2, gpus=0)  # CPU: gloo, any count


def test_exit_status_of_failed_workers():
    assert launch.exit_status({}) == 0
    assert launch.exit_status({1: 1, 0: 2}) == 2  # bad input anywhere: never retried
    assert launch.exit_status({1: -9}) == 137  # killed (out of memory): 128 + SIGKILL, retried
    assert launch.exit_status({0: 1, 1: -15}) == 1  # the first failure's code


def test_torchrun_workers_are_recognised_by_their_environment():
    assert not launch.is_torchrun_worker({})
    assert launch.is_torchrun_worker({"LOCAL_RANK": "0"}) and launch.is_torchrun_worker({"WORLD_SIZE": "2"})


def test_local_runner_gives_a_lone_distributed_unit_every_gpu():
    by = pipeline.STEP_BY_NAME
    assert {s.name for s in pipeline.STEPS if s.distributed} == {"score", "assemble", "evaluate"}
    assert local.unit_gpus(by["assemble"], gpus=8, pending=1) == 8  # one solution: all GPUs, 8 workers
    assert local.unit_gpus(by["evaluate"], gpus=2, pending=1) == 2
    assert local.unit_gpus(by["score"], gpus=8, pending=40) == 1  # many units: one GPU each
    assert local.unit_gpus(by["bld"], gpus=8, pending=1) == 1  # not distributed
    assert local.unit_gpus(by["assemble"], gpus=1, pending=1) == 1
    assert local.unit_gpus(by["assemble"], gpus=0, pending=1) == 1  # CPU: in-process


def test_step_arguments_reach_the_workers_unchanged():
    args = SimpleNamespace(verbose=True, name="assemble", run="s3://b/r", nproc_per_node=4,
                           unit='{"id": "a"}', outputs=Path("/tmp/outputs"), force=True)
    from puzzle.commands.step import _worker_argv

    assert _worker_argv(args) == ["-v", "step", "assemble", "--run", "s3://b/r", "--nproc-per-node", "4",
                                  "--unit", '{"id": "a"}', "--outputs", "/tmp/outputs", "--force"]


def test_local_runner_launches_a_lone_distributed_unit_on_every_gpu(run_uri, monkeypatch):
    """`puzzle run` on a machine with 2 GPUs, played on CPU: the only pretend part is the GPU count the
    runner reads (``local._gpu_count``); the launch is real torchrun with gloo workers. The lone assemble
    unit refers to no solution, so both workers refuse it: bad input, reported as such by the runner."""
    open_store(run_uri).put_json("plan/assemble.json", [{"id": "sol-0"}])
    monkeypatch.setattr(local, "_gpu_count", lambda: 2)
    with pytest.raises(local.UnitFailure) as failure:
        local.run_pipeline(run_uri, steps=["assemble"], progress=False)
    assert failure.value.step == "assemble" and failure.value.unit_id == "sol-0"
    assert failure.value.message == "its 2 torchrun workers exited with status 2"
    assert failure.value.bad_input
