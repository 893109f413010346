"""What a step unit gets to work with: its run's store and config, its unit, metrics, scratch space.

Every pod (and every local worker) runs ``puzzle step NAME --run RUN_URI --unit JSON``; this module
turns those arguments into a :class:`StepContext`, runs the step module's ``run(ctx)`` and, only when it
returns, publishes the unit's done marker ``done/<step>/<unit-id>.json``. A unit whose marker exists is
not run again (``--force`` overrides), which is what makes retried pods and ``puzzle run --resume``
redo nothing that completed.

Exit codes (Argo's retryStrategy keys on them): 0 done, 2 bad input (never retried), 1 other errors.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from puzzle import pipeline
from puzzle.config import PuzzleConfig, load_config_text
from puzzle.errors import ConfigError, UnitError
from puzzle.metrics import StepMetrics
from puzzle.store import Store, join_uri, open_store

log = logging.getLogger(__name__)

STEP_NAMES = tuple(s.name for s in pipeline.STEPS)
CONFIG_KEY = "config.yaml"
UNIT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
RUN_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


__all__ = ["UnitError"]  # re-exported: steps raise it through their context


def new_run_id(name: str) -> str:
    """``<name>-<UTC timestamp>-<random>``: unique across concurrent runs in one bucket, DNS-safe."""
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%d-%H%M%S")
    return f"{name}-{stamp}-{secrets.token_hex(3)}"


def run_id_of(run_uri: str) -> str:
    path = run_uri.split("://", 1)[-1]
    if ".." in path.split("/"):
        # the library lives beside the run (its parent folder): a '..' would move both elsewhere
        raise ConfigError(f"run URI {run_uri!r}: '..' path segments are not allowed")
    run_id = run_uri.rstrip("/").rsplit("/", 1)[-1]
    if not RUN_ID_RE.match(run_id):
        raise ConfigError(
            f"run URI {run_uri!r}: the last path segment {run_id!r} is not a run id "
            "(lowercase letters, digits and '-', at most 63 characters)"
        )
    return run_id


def check_run_id(run_id: str) -> str:
    """A run id is one DNS label (a Workflow name too); the whole id is checked, so "a/b" cannot nest."""
    if not RUN_ID_RE.match(run_id):
        raise ConfigError(f"run id {run_id!r} is not a run id (lowercase letters, digits and '-', "
                          "at most 63 characters)")
    return run_id


def create_run(config: PuzzleConfig, config_text: str | None = None, run_id: str | None = None) -> str:
    """Make a new run in the config's store: writes ``config.yaml``; returns the run URI."""
    run_id = check_run_id(run_id or new_run_id(config.name))
    run_uri = join_uri(config.store.uri, run_id)
    store = open_store(run_uri, config.store)
    store.put_text(CONFIG_KEY, config_text if config_text is not None else config.to_yaml())
    return run_uri


def done_key(step: str, unit_id: str) -> str:
    return f"done/{step}/{unit_id}.json"


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


def load_run_config(store: Store, run_uri: str) -> PuzzleConfig:
    if not store.exists(CONFIG_KEY):
        raise ConfigError(f"run {run_uri!r} has no {CONFIG_KEY}; create runs with `puzzle run` or `puzzle submit`")
    return load_config_text(store.get_text(CONFIG_KEY), f"{run_uri}/{CONFIG_KEY}")


def parse_unit(text: str | None) -> dict[str, Any]:
    if text is None:
        return {"id": "all"}
    try:
        unit = json.loads(text)
    except json.JSONDecodeError as err:
        raise UnitError(f"--unit: not valid JSON ({err}): {text!r}") from None
    if not isinstance(unit, dict) or "id" not in unit:
        raise UnitError(f"--unit: must be a JSON object with an 'id' key, got {text!r}")
    if not UNIT_ID_RE.match(str(unit["id"])):
        raise UnitError(f"--unit: id {unit['id']!r} is not allowed (lowercase letters, digits, '.', '_', '-')")
    return unit


def run_step(
    step: str,
    run_uri: str,
    unit: dict[str, Any],
    outputs_dir: Path | None = None,
    force: bool = False,
    store_config=None,
) -> bool:
    """Run one unit of one step. Returns False when it had already completed (and was skipped)."""
    if step not in STEP_NAMES:
        raise UnitError(f"step {step!r} is unknown; allowed: {', '.join(STEP_NAMES)}")
    run_id = run_id_of(run_uri)
    store = open_store(run_uri, store_config)
    config = load_run_config(store, run_uri)
    if store_config is None and run_uri.startswith("s3://"):
        # the run's own store settings (endpoint, region, retry/backoff, multipart) apply to its units
        store = open_store(run_uri, config.store)
    key = done_key(step, str(unit["id"]))
    module = importlib.import_module(f"puzzle.steps.{step}")
    if store.exists(key) and not force:
        log.info("%s/%s already complete in %s; skipping", step, unit["id"], run_uri)
        if outputs_dir is not None and hasattr(module, "outputs"):
            # a retried pod still owes Argo its output parameters
            ctx = _context(step, run_uri, run_id, store, config, unit, outputs_dir)
            module.outputs(ctx)
        return False
    ctx = _context(step, run_uri, run_id, store, config, unit, outputs_dir)
    started = time.time()
    try:
        module.run(ctx)
        seconds = time.time() - started
        ctx.metrics.set("step_seconds", seconds, help="Wall-clock seconds of the step unit")
        ctx.metrics.set("step_success", 1, help="1 when the step unit completed")
        ctx.metrics.write(store)
        ctx.metrics.push()
        store.put_json(key, {"step": step, "unit": unit, "seconds": seconds,
                             "finished_at": _dt.datetime.now(_dt.UTC).isoformat(),
                             "host": os.uname().nodename})
    finally:
        ctx.cleanup()
    return True


def _context(step, run_uri, run_id, store, config, unit, outputs_dir) -> StepContext:
    # the workflow passes the Pushgateway through the environment; the config can name one too
    url = config.metrics.pushgateway_url or os.environ.get("PUZZLE_PUSHGATEWAY_URL") or None
    metrics = StepMetrics(run_id, step, str(unit["id"]), url)
    return StepContext(step, run_uri, run_id, store, config, unit, metrics, outputs_dir)
