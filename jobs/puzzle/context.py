"""What a step unit gets to work with: its run's store and config, its unit, metrics, scratch space.

Every pod (and every local worker) runs ``puzzle step NAME --run RUN_URI --unit JSON``; this module
turns those arguments into a :class:`StepContext`, runs the step module's ``run(ctx)`` and, only when it
returns, publishes the unit's done marker ``done/<step>/<unit-id>.json``. A unit whose marker exists is
not run again (``--force`` overrides), which is what makes retried pods and ``puzzle run --resume``
redo nothing that completed. What a step hands to Argo (``--outputs DIR``) follows from its
:class:`puzzle.pipeline.Step`: the plan lists it ``produces`` and the run files it names as ``artifacts``.

Exit codes (Argo's retryStrategy keys on them) are :mod:`puzzle.errors`'.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from puzzle import layout, pipeline
from puzzle.config import PuzzleConfig, StoreConfig
from puzzle.errors import ConfigError, UnitError, exit_code
from puzzle.layout import done_key
from puzzle.metrics import StepMetrics
from puzzle.run import Run, check_unit_id, open_run, record_failure, relative_outputs
from puzzle.store import Store, open_store, recording

log = logging.getLogger(__name__)

STEP_NAMES = tuple(s.name for s in pipeline.STEPS)

__all__ = ["STEP_NAMES", "StepContext", "parse_unit", "run_step", "write_outputs"]


@dataclass
class StepContext:
    step: str
    run_uri: str
    run_id: str
    store: Store
    config: PuzzleConfig
    unit: dict[str, Any]
    metrics: StepMetrics
    outputs_dir: Path | None = None
    scratch: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="puzzle-")))

    @property
    def unit_id(self) -> str:
        return str(self.unit["id"])

    def device(self):
        """The torch device this unit runs on: the first CUDA device when present, else CPU."""
        import torch

        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def write_output(self, name: str, obj: Any) -> None:
        """A fan-out list for Argo's ``withParam`` (``--outputs DIR``); the local runner reads the store."""
        if self.outputs_dir is not None:
            self.outputs_dir.mkdir(parents=True, exist_ok=True)
            (self.outputs_dir / f"{name}.json").write_text(json.dumps(obj), encoding="utf-8")

    def parent_dir(self) -> Path:
        """A local directory holding the parent model, downloaded into scratch when it lives in S3."""
        uri = self.config.parent.uri
        if uri.startswith("s3://"):
            dest = self.scratch / "parent"
            if not dest.exists():
                open_store(uri, self.config.store).download_dir("", dest)
            return dest
        if uri.startswith("hf://"):
            from huggingface_hub import snapshot_download  # only where a hub is reachable

            return Path(snapshot_download(uri.removeprefix("hf://"), allow_patterns=["*.json", "*.safetensors"]))
        path = Path(uri.removeprefix("file://"))
        if not path.is_dir():
            raise ConfigError(f"parent.uri: {uri!r} is not a directory (use a local dir, s3://... or hf://org/name)")
        return path

    def cleanup(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


def parse_unit(text: str | None) -> dict[str, Any]:
    if text is None:
        return {"id": "all"}
    try:
        unit = json.loads(text)
    except json.JSONDecodeError as err:
        raise UnitError(f"--unit: not valid JSON ({err}): {text!r}") from None
    if not isinstance(unit, dict) or "id" not in unit:
        raise UnitError(f"--unit: must be a JSON object with an 'id' key, got {text!r}")
    check_unit_id(str(unit["id"]))
    return unit


def write_outputs(step: pipeline.Step, run: Run, outputs_dir: Path | None) -> None:
    """What the step owes Argo, from its declaration: each produced plan list as an output parameter
    file ``<list>.json`` and each artifact file copied from the run. A retried pod that skips its work
    still writes them."""
    if outputs_dir is None:
        return
    outputs_dir.mkdir(parents=True, exist_ok=True)
    for name in step.produces:
        (outputs_dir / f"{name}.json").write_text(json.dumps(run.store.get_json(layout.plan_key(name))),
                                                  encoding="utf-8")
    for name in step.artifacts:
        if run.store.exists(name):
            run.store.get_file(name, outputs_dir / name)


def run_step(
    step: str,
    run_uri: str,
    unit: dict[str, Any],
    outputs_dir: Path | None = None,
    force: bool = False,
    store_config: StoreConfig | None = None,
) -> bool:
    """Run one unit of one step. Returns False when it had already completed (and was skipped)."""
    if step not in STEP_NAMES:
        raise UnitError(f"step {step!r} is unknown; allowed: {', '.join(STEP_NAMES)}")
    run = open_run(run_uri, store_config)
    spec = pipeline.step(step)
    key = done_key(step, str(unit["id"]))
    module = importlib.import_module(f"puzzle.steps.{step}")
    from puzzle import distributed as dist  # torch: only once a step runs, not for every CLI command

    dist.init()  # a torchrun worker (puzzle step --nproc-per-node N) joins its group; nothing otherwise
    if run.store.exists(key) and not force:
        log.info("%s/%s already complete in %s; skipping", step, unit["id"], run_uri)
        if dist.is_main():
            write_outputs(spec, run, outputs_dir)
        return False
    ctx = _context(step, run, unit, outputs_dir)
    started = time.time()
    try:
        with recording() as written:
            module.run(ctx)
        if not dist.is_main():  # a torchrun worker of a sharded step: rank 0 alone writes (puzzle.distributed)
            return True
        seconds = time.time() - started
        ctx.metrics.set("step_seconds", seconds, help="Wall-clock seconds of the step unit")
        ctx.metrics.set("step_success", 1, help="1 when the step unit completed")
        ctx.metrics.write(run.store)
        ctx.metrics.push()
        write_outputs(spec, run, outputs_dir)
        # the marker lists what the unit left (relative to the runs root, sha256 each): resume checks them
        run.store.put_json(key, {"step": step, "unit": unit, "seconds": seconds,
                                 "finished_at": _dt.datetime.now(_dt.UTC).isoformat(),
                                 "host": os.uname().nodename, "outputs": relative_outputs(run, written)})
        run.store.delete(layout.failed_key(step, str(unit["id"])))
    except Exception as err:
        _remember_failure(run, step, unit, err)
        raise
    finally:
        ctx.cleanup()
    return True


def _remember_failure(run: Run, step: str, unit: dict[str, Any], err: Exception) -> None:
    """Best effort: a unit's last failure goes to ``failed/<step>/<unit>.json`` for `puzzle status`."""
    try:
        record_failure(run.store, step, unit, f"{type(err).__name__}: {err}", exit_code(err))
    except Exception as again:  # noqa: BLE001 - the store may be what failed; the original error matters
        log.debug("could not record the failure of %s/%s: %s", step, unit.get("id"), again)


def _context(step: str, run: Run, unit: dict[str, Any], outputs_dir: Path | None) -> StepContext:
    # the workflow passes the Pushgateway through the environment; the config can name one too
    url = run.config.metrics.pushgateway_url or os.environ.get("PUZZLE_PUSHGATEWAY_URL") or None
    metrics = StepMetrics(run.run_id, step, str(unit["id"]), url)
    return StepContext(step, run.uri, run.run_id, run.store, run.config, unit, metrics, outputs_dir)
