"""A run's lifecycle: how it is created (bound to its config) and opened (one rule), how far it got, and
how a step publishes a child that later steps trust and reads it back checked.

Every key is :mod:`puzzle.layout`'s. Open a run with :func:`open_run` (one rule for every command: the
run's own store settings apply) and create one with :func:`create_run`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from puzzle.config import PuzzleConfig, StoreConfig, load_config_text
from puzzle.errors import ConfigError, UnitError
from puzzle.layout import (
    COMPLETE,
    CONFIG,
    STATUS,
    child_complete_key,
    child_prefix,
    failed_key,
    history_key,
    plan_key,
)
from puzzle.store import ArtifactNotFoundError, Store, StoreError, file_sha256, join_uri, open_store

# ----- run ids and URIs -----------------------------------------------------------------------------------
UNIT_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
RUN_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def new_run_id(name: str) -> str:
    """``<name>-<UTC timestamp>-<random>``: unique across concurrent runs in one bucket, DNS-safe."""
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%d-%H%M%S")
    return f"{name}-{stamp}-{secrets.token_hex(3)}"


def check_run_id(run_id: str) -> str:
    """A run id is one DNS label (a Workflow name too); the whole id is checked, so "a/b" cannot nest."""
    if not RUN_ID_RE.match(run_id):
        raise ConfigError(f"run id {run_id!r} is not a run id (lowercase letters, digits and '-', "
                          "at most 63 characters)")
    return run_id


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


def runs_root_uri(run_uri: str) -> str:
    """The store root that holds the run (``<root>/<run-id>``): libraries live beside the runs."""
    root, sep, _ = run_uri.rstrip("/").rpartition("/")
    if not sep or "://" not in root or not root.split("://", 1)[1].strip("/"):
        raise ConfigError(f"run URI {run_uri!r}: has no parent folder to hold the library")
    return root


def check_unit_id(unit_id: str) -> str:
    if not UNIT_ID_RE.match(unit_id):
        raise UnitError(f"--unit: id {unit_id!r} is not allowed (lowercase letters, digits, '.', '_', '-')")
    return unit_id


# ----- opening and creating ---------------------------------------------------------------------------------
@dataclass
class Run:
    """One run: its URI, id, store (rooted at the run) and config."""

    uri: str
    run_id: str
    store: Store
    config: PuzzleConfig

    def root_store(self) -> Store:
        """The store that holds the runs (and the libraries) beside this one."""
        return open_store(runs_root_uri(self.uri), self.config.store)


def _load_config(store: Store, run_uri: str) -> PuzzleConfig:
    if not store.exists(CONFIG):
        raise ConfigError(f"run {run_uri!r} holds no run (no {CONFIG}); give <store.uri>/<run-id>, as "
                          "`puzzle run` or `puzzle submit` printed it")
    return load_config_text(store.get_text(CONFIG), f"{run_uri}/{CONFIG}")


def open_run(run_uri: str, store_config: StoreConfig | None = None) -> Run:
    """Open an existing run. The one rule: the run's own store settings (endpoint, region, retries,
    multipart) apply to everything read after its config, unless ``store_config`` is given."""
    run_id = run_id_of(run_uri)
    store = open_store(run_uri, store_config)
    config = _load_config(store, run_uri)
    if store_config is None and run_uri.startswith("s3://"):
        store = open_store(run_uri, config.store)
    return Run(run_uri, run_id, store, config)


def _config_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def create_run(config: PuzzleConfig, config_text: str | None = None, run_id: str | None = None) -> str:
    """Make a new run in the config's store: writes ``config.yaml``; returns the run URI.

    A run id is bound to its config: creating a run under an id that already holds a different config
    is refused (exit 2), so blocks trained under one config are never filed under another's settings.
    The same config again is accepted (a retried ``puzzle submit``) and changes nothing.
    """
    run_id = check_run_id(run_id or new_run_id(config.name))
    run_uri = join_uri(config.store.uri, run_id)
    store = open_store(run_uri, config.store)
    text = config_text if config_text is not None else config.to_yaml()
    if store.exists(CONFIG):
        old = store.get_text(CONFIG)
        if old != text and load_config_text(old, f"{run_uri}/{CONFIG}") != config:
            raise ConfigError(
                f"--run-id: run {run_id!r} already exists in {config.store.uri} with another config; choose "
                f"another run id, or change the run's config with `puzzle run --resume {run_uri} --config FILE "
                "--redo STEP`")
        return run_uri
    store.put_text(CONFIG, text)
    return run_uri


def record_config_change(run: Run, new_text: str, redo: str, reason: str = "") -> int:
    """Replace the run's config (for ``--redo``), keeping the old one in ``history/``; returns its number."""
    n = len([k for k in run.store.list("history") if k.endswith(".json")])
    old = run.store.get_text(CONFIG)
    run.store.put_json(history_key(n), {
        "n": n, "at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "redo": redo, "reason": reason,
        "old_sha256": _config_digest(old), "new_sha256": _config_digest(new_text), "old_config": old,
    })
    run.store.put_text(CONFIG, new_text)
    run.config = load_config_text(new_text, f"{run.uri}/{CONFIG}")
    return n


def changed_sections(old: PuzzleConfig, new: PuzzleConfig) -> list[str]:
    """Top-level config sections whose values differ."""
    a, b = old.model_dump(mode="json"), new.model_dump(mode="json")
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def redo(run: Run, steps: Sequence[str], new_config_text: str | None = None) -> dict[str, Any]:
    """Make ``steps`` (a step and everything after it, in the caller's DAG order) run again: their done and
    failed markers and their outputs in the run are removed; with ``new_config_text`` the run's config is
    replaced first, the old one kept in ``history/``. A config change that touches a section an earlier
    step read is refused (ConfigError naming the field and the step to redo from)."""
    from puzzle.layout import CONFIG_FIRST_STEP, STEP_OUTPUTS

    first = steps[0]
    changed: list[str] = []
    if new_config_text is not None:
        new = load_config_text(new_config_text, "--config")
        changed = changed_sections(run.config, new)
        if "store" in changed and new.store.uri != run.config.store.uri:
            raise ConfigError(f"--config: store.uri {new.store.uri!r} differs from the run's "
                              f"{run.config.store.uri!r}; a run cannot move; start a new run there")
        too_early = [c for c in changed if CONFIG_FIRST_STEP.get(c) not in (None, *steps)]
        if too_early:
            need = sorted({CONFIG_FIRST_STEP[c] for c in too_early})
            raise ConfigError(
                f"--config: {', '.join(too_early)} changed, which step(s) {', '.join(need)} read before "
                f"{first!r}; allowed: --redo {need[0]} (it redoes everything after it too)")
    removed = 0
    for step in steps:
        for prefix in STEP_OUTPUTS.get(step, ()):
            for key in run.store.list(prefix):
                run.store.delete(key)
                removed += 1
        for key in run.store.list(f"done/{step}") + run.store.list(f"failed/{step}"):
            run.store.delete(key)
            removed += 1
    n = None
    if new_config_text is not None:
        n = record_config_change(run, new_config_text, first, f"changed: {', '.join(changed) or 'nothing'}")
    return {"redo": list(steps), "removed_keys": removed, "config_changed": changed, "history": n}


def relative_outputs(run: Run, written: dict[str, str]) -> dict[str, str]:
    """``{key relative to the runs root: sha256}`` of what a unit wrote (in the run or the library)."""
    root = runs_root_uri(run.uri).rstrip("/") + "/"
    return {uri[len(root):]: sha for uri, sha in sorted(written.items()) if uri.startswith(root)}


def check_done(root: Store, marker: dict[str, Any]) -> list[str]:
    """Why a done unit cannot be trusted: each output it recorded that is missing now, or whose recorded
    sha256 changed (checked from the store's own checksum record, without reading the object)."""
    problems = []
    for key, sha in (marker.get("outputs") or {}).items():
        now = root.stored_sha256(key)
        if now is None:
            problems.append(f"{key} is missing")
        elif now != sha:
            problems.append(f"{key} changed since the unit wrote it (sha256 {now[:12]}..., was {sha[:12]}...)")
    return problems


# ----- progress -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepProgress:
    """How far one step got: units done out of the plan's total, and the units whose last attempt failed."""

    step: str
    done: int
    total: int | None  # None: the plan list that defines the units is not written yet
    failed: tuple[dict[str, Any], ...] = ()

    @property
    def complete(self) -> bool:
        return self.total is not None and self.done >= self.total


def plan_units(store: Store, plan_list: str | None) -> list[dict[str, Any]] | None:
    """The units of a step: ``[{"id": "all"}]`` for a single-unit step, the plan list's entries for a
    fanned-out one, None when that list is not written yet."""
    if plan_list is None:
        return [{"id": "all"}]
    key = plan_key(plan_list)
    if not store.exists(key):
        return None
    units = store.get_json(key)
    if not isinstance(units, list) or not all(isinstance(u, dict) and "id" in u for u in units):
        raise ConfigError(f"{key}: expected a JSON list of objects with an 'id', got {type(units).__name__}")
    return units


def done_ids(store: Store, step: str) -> set[str]:
    pre = f"done/{step}/"
    return {k[len(pre):-len(".json")] for k in store.list(f"done/{step}") if k.endswith(".json")}


def unit_seconds(store: Store, steps: Iterable[str]) -> dict[str, list[float]]:
    """Per step, the seconds each completed unit took (from the done markers): what a run cost in unit time."""
    out: dict[str, list[float]] = {}
    for step in steps:
        secs = []
        for k in store.list(f"done/{step}"):
            try:
                secs.append(float(store.get_json(k).get("seconds") or 0.0))
            except (ArtifactNotFoundError, StoreError, ValueError, TypeError, AttributeError):
                continue
        out[step] = secs
    return out


def format_unit_seconds(per_step: dict[str, list[float]]) -> str:
    """One line: ``unit time: prepare 4.5 s (1), bld 72.5 s (3), ...; sum over units 345 s``."""
    parts = [f"{step} {sum(v):.1f} s ({len(v)})" for step, v in per_step.items() if v]
    total = sum(sum(v) for v in per_step.values())
    return f"unit time: {', '.join(parts)}; sum over units {total:.0f} s"


def failures(store: Store, step: str) -> list[dict[str, Any]]:
    out = []
    for k in store.list(f"failed/{step}"):
        try:
            out.append(store.get_json(k))
        except (ArtifactNotFoundError, ValueError):
            continue
    return out


def progress(store: Store, steps: Iterable[Any]) -> list[StepProgress]:
    """Per step (objects with ``name`` and ``fan_out``, in order): done/total and failed units."""
    out = []
    for s in steps:
        done = done_ids(store, s.name)
        units = plan_units(store, s.fan_out)
        failed = tuple(f for f in failures(store, s.name) if str(f.get("unit", {}).get("id")) not in done)
        if units is None:
            out.append(StepProgress(s.name, len(done), None, failed))
        else:
            ids = {str(u["id"]) for u in units}
            out.append(StepProgress(s.name, len(done & ids), len(ids), failed))
    return out


def format_progress(progress_rows: Sequence[StepProgress], final: dict[str, Any] | None = None) -> str:
    width = max(len(p.step) for p in progress_rows)
    lines = []
    for p in progress_rows:
        total = "?" if p.total is None else str(p.total)
        state = "done" if p.complete else ("waiting for plan" if p.total is None else "")
        if p.failed:
            state = f"{len(p.failed)} failed"
        lines.append(f"{p.step:<{width}}  {p.done:>4}/{total:<4} {state}".rstrip())
        for f in p.failed:
            lines.append(f"{'':<{width}}    failed {f.get('unit', {}).get('id')}: {f.get('error', '?')} "
                         f"(exit {f.get('exit_code', '?')}, {f.get('at', '?')})")
    if final:
        lines.append(f"workflow {final.get('workflow', '?')}: {final.get('status', '?')} at "
                     f"{final.get('finished_at', '?')}")
    return "\n".join(lines)


def record_final_status(store: Store, steps: Iterable[Any], status: str, workflow: str | None = None) -> dict:
    """Write ``status.json``: the Workflow's final phase and per-step progress (the exit handler runs this)."""
    record = {
        "status": status,
        "workflow": workflow,
        "finished_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "progress": {p.step: {"done": p.done, "total": p.total, "failed": len(p.failed)}
                     for p in progress(store, steps)},
    }
    store.put_json(STATUS, record)
    return record


def record_failure(store: Store, step: str, unit: dict[str, Any], error: str, code: int) -> None:
    """Remember a unit's last failure so `puzzle status` can show it (cleared when the unit completes)."""
    store.put_json(failed_key(step, str(unit["id"])), {
        "step": step, "unit": unit, "error": error[:2000], "exit_code": code,
        "at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    })


# ----- children: published complete, read only when they match their record -------------------------------
#: Files a child directory must hold before it is published (a reader needs every one of them).
CHILD_REQUIRED = ("config.json", "tokenizer.json")


class ChildError(UnitError):
    """A child that is incomplete or does not match its completion record (names the file)."""


def check_child_dir(path: Path) -> list[str]:
    """What a child directory lacks for its readers (empty when it is whole): config, weights, tokenizer."""
    from puzzle.model.io import ModelLoadError, weight_files

    problems = [f"{name} is missing" for name in CHILD_REQUIRED if not (path / name).is_file()]
    try:
        weight_files(path)
    except ModelLoadError as err:
        problems.append(str(err))
    if (path / "config.json").is_file():
        try:
            json.loads((path / "config.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            problems.append(f"config.json is not valid JSON: {err}")
    return problems


def publish_child(store: Store, unit_id: str, local_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Upload a child and, last, ``complete.json`` with every file's size and sha256.

    Refuses (ChildError) a directory that lacks what readers need, so nothing half-made is ever published
    as complete. A retry first removes what an earlier attempt left.
    """
    problems = check_child_dir(local_dir)
    if problems:
        raise ChildError(f"{child_prefix(unit_id)}: not published, the child is incomplete: {'; '.join(problems)}")
    prefix = child_prefix(unit_id)
    store.delete(child_complete_key(unit_id))
    for key in store.list(prefix):
        store.delete(key)
    files = {p.relative_to(local_dir).as_posix(): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(local_dir.rglob("*")) if p.is_file()}
    store.upload_dir(prefix, local_dir)
    full = {**record, "id": unit_id, "files": files}
    store.put_json(child_complete_key(unit_id), full)
    return full


def child_record(store: Store, unit_id: str) -> dict[str, Any] | None:
    key = child_complete_key(unit_id)
    return store.get_json(key) if store.exists(key) else None


def download_child(store: Store, unit_id: str, dest: Path) -> dict[str, Any]:
    """Copy a complete child into ``dest``, each file checked against the sha256 its record lists; the
    record is returned. Files the record does not list are never read (a later writer's leftovers)."""
    prefix = child_prefix(unit_id)
    record = child_record(store, unit_id)
    if record is None:
        have = complete_children(store)
        state = "incomplete (its assemble unit has not finished)" if store.list(prefix) else "not in this run"
        raise ChildError(f"child {unit_id!r} is {state}: no {child_complete_key(unit_id)}; complete children: "
                         f"{have or 'none yet'}")
    files = record.get("files") or {}
    if not files:
        raise ChildError(f"{child_complete_key(unit_id)} lists no files; the child cannot be read")
    for name, meta in sorted(files.items()):
        path = store.get_file(f"{prefix}/{name}", dest / name)
        if file_sha256(path) != meta.get("sha256"):
            raise ChildError(
                f"{prefix}/{name}: its sha256 differs from the one {COMPLETE} recorded; the child was changed "
                f"after assembly (redo it: `puzzle step assemble --force` for unit {unit_id})")
    problems = check_child_dir(dest)
    if problems:
        raise ChildError(f"{prefix}: {'; '.join(problems)}")
    return record


def complete_children(store: Store) -> list[str]:
    return sorted({k.split("/")[1] for k in store.list("child") if k.endswith(f"/{COMPLETE}")})

