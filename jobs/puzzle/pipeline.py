"""The Puzzle pipeline DAG, defined once: steps, fan-out, dependencies, GPU or CPU, deadlines.

Two consumers read this module and nothing else for the shape of a run:

- the local runner (``puzzle run``, :mod:`puzzle.local`) walks :func:`topological_order` and, for a
  fanned-out step, reads the unit list ``plan/<fan_out>.json`` from the run's store;
- :mod:`puzzle.argo` renders the same table as the Argo ``WorkflowTemplate`` (with Hera), which
  ``puzzle render-workflow`` writes to ``charts/puzzle/files/workflowtemplate.yaml``.

This module is data and graph checks only: it imports nothing of Hera or Kubernetes, and step code
never imports it; business logic stays in ``puzzle.steps``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Step:
    """One kind of pod in the pipeline.

    ``fan_out`` names the plan list (``plan/<fan_out>.json`` in the store, a JSON list of unit objects
    each with an ``"id"``) whose units this step runs, one pod per unit; ``None`` means a single pod.
    ``same_unit_as`` pairs units: unit *i* of this step waits only for unit *i* of that step (evaluate
    waits for its own assemble, not for every assemble).
    ``distributed`` steps may shard one unit over several GPUs of one pod: they are launched with
    ``--nproc-per-node <gpu-count>`` and run as that many torchrun workers when it is above 1
    (:mod:`puzzle.launch`); every other step is one process.
    """

    name: str
    description: str
    fan_out: str | None
    depends: tuple[str, ...]
    gpu: bool
    active_deadline_seconds: int
    cpu: str
    memory: str
    produces: tuple[str, ...] = ()
    same_unit_as: str | None = None
    artifacts: tuple[str, ...] = field(default=())
    distributed: bool = False


#: The pipeline, in an order that is also a valid topological order.
STEPS: tuple[Step, ...] = (
    Step(
        name="prepare",
        description="tokenize distillation/validation text into shards; expand the search space into work units",
        fan_out=None, depends=(), gpu=False, active_deadline_seconds=4 * 3600,
        cpu="2", memory="8Gi", produces=("bld", "profile", "score"),
    ),
    Step(
        name="bld",
        description="blockwise local distillation of one variant over a layer range",
        fan_out="bld", depends=("prepare",), gpu=True, active_deadline_seconds=24 * 3600,
        cpu="8", memory="64Gi",
    ),
    Step(
        name="profile",
        description="measure prefill/decode time and memory of one variant on the target hardware",
        fan_out="profile", depends=("prepare",), gpu=True, active_deadline_seconds=4 * 3600,
        cpu="8", memory="32Gi",
    ),
    Step(
        name="score",
        description="replace_one_block_scores: the parent with one library block swapped in, against the parent",
        fan_out="score", depends=("prepare", "bld"), gpu=True, active_deadline_seconds=12 * 3600,
        cpu="8", memory="64Gi", distributed=True,
    ),
    Step(
        name="solve",
        description="MIP: one variant per layer, minimal degradation under throughput/memory/latency limits",
        fan_out=None, depends=("score", "profile"), gpu=False, active_deadline_seconds=2 * 3600,
        cpu="4", memory="8Gi", produces=("assemble",),
    ),
    Step(
        name="assemble",
        description="stitch library blocks into the child (optional GKD uplift); save as nemotron-nas",
        fan_out="assemble", depends=("solve",), gpu=True, active_deadline_seconds=12 * 3600,
        cpu="8", memory="64Gi", distributed=True,
    ),
    Step(
        name="evaluate",
        description="parent vs child: KL, perplexity, tasks, ICL (random/top-k/cover-ls), measured throughput",
        fan_out="assemble", depends=("assemble",), gpu=True, active_deadline_seconds=12 * 3600,
        cpu="8", memory="64Gi", same_unit_as="assemble", distributed=True,
    ),
    Step(
        name="report",
        description="collect every solution's evaluation into report.json and report.html",
        fan_out=None, depends=("evaluate",), gpu=False, active_deadline_seconds=3600,
        cpu="1", memory="4Gi", artifacts=("report.html", "report.json"),
    ),
)

STEP_BY_NAME: dict[str, Step] = {s.name: s for s in STEPS}


def step(name: str) -> Step:
    try:
        return STEP_BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown step {name!r}; allowed: {', '.join(STEP_BY_NAME)}") from None


def producer_of(plan_list: str) -> Step:
    """The step that writes ``plan/<plan_list>.json``."""
    for s in STEPS:
        if plan_list in s.produces:
            return s
    raise KeyError(f"no step produces plan list {plan_list!r}")


def topological_order(steps: Iterable[Step] = STEPS) -> list[Step]:
    """Steps so that each comes after everything it depends on; ties keep the order of ``steps``."""
    steps = list(steps)
    names = {s.name for s in steps}
    done: list[Step] = []
    placed: set[str] = set()
    while len(done) < len(steps):
        ready = [s for s in steps if s.name not in placed and all(d in placed for d in s.depends)]
        if not ready:
            stuck = sorted(s.name for s in steps if s.name not in placed)
            raise ValueError(f"pipeline has a dependency cycle or an unknown dependency among {stuck}")
        for s in ready:
            done.append(s)
            placed.add(s.name)
    assert placed == names
    return done


def ancestors(name: str) -> set[str]:
    """Every step that must finish before ``name`` can start."""
    out: set[str] = set()
    todo = list(step(name).depends)
    while todo:
        d = todo.pop()
        if d not in out:
            out.add(d)
            todo.extend(step(d).depends)
    return out


def descendants(name: str) -> set[str]:
    """Every step that (directly or not) depends on ``name``: what redoing ``name`` must redo too."""
    return {s.name for s in STEPS if name in ancestors(s.name)}


def validate_pipeline(steps: tuple[Step, ...] = STEPS) -> None:
    """Reject a malformed pipeline at import time, so both runners see only a consistent DAG."""
    by_name = {s.name: s for s in steps}
    if len(by_name) != len(steps):
        raise ValueError("pipeline: step names must be unique")
    for s in steps:
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,40}", s.name):
            raise ValueError(f"pipeline: step name {s.name!r} must be a short DNS label")
        if s.distributed and not s.gpu:
            raise ValueError(f"pipeline: step {s.name!r} is distributed (one process per GPU) but gets no GPU")
        for d in s.depends:
            if d not in by_name:
                raise ValueError(f"pipeline: step {s.name!r} depends on unknown step {d!r}")
        if s.fan_out is not None:
            producers = [p for p in steps if s.fan_out in p.produces]
            if len(producers) != 1:
                raise ValueError(f"pipeline: plan list {s.fan_out!r} of step {s.name!r} needs exactly one producer")
        if s.same_unit_as is not None:
            other = by_name.get(s.same_unit_as)
            if other is None or other.fan_out != s.fan_out or s.depends != (other.name,):
                raise ValueError(
                    f"pipeline: step {s.name!r}: same_unit_as={s.same_unit_as!r} needs a step with the same "
                    "fan_out that is its only dependency"
                )
    topological_order(steps)
    for s in steps:
        if s.fan_out is not None:
            producer = next(p for p in steps if s.fan_out in p.produces)
            if producer.name not in ancestors(s.name) and producer.name != s.same_unit_as:
                raise ValueError(f"pipeline: step {s.name!r} must depend (directly or not) on {producer.name!r}")


validate_pipeline()


def pipeline_summary() -> list[dict[str, Any]]:
    """JSON-able description of the DAG (``puzzle render-workflow --summary``)."""
    return [
        {
            "name": s.name, "fan_out": s.fan_out, "depends": list(s.depends), "gpu": s.gpu,
            "active_deadline_seconds": s.active_deadline_seconds, "produces": list(s.produces),
            "same_unit_as": s.same_unit_as, "distributed": s.distributed,
        }
        for s in STEPS
    ]


def dumps_summary() -> str:
    return json.dumps(pipeline_summary(), indent=2)
