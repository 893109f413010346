"""The run's layout: every key a step reads or writes, relative to the run's root or the library's.

A run lives at ``<store.uri>/<run-id>/`` (``file://./runs/tiny-20261201-101500-ab12cd`` or
``s3://bucket/puzzle/<run-id>``); the content-addressed BLD library lives beside the runs, at
``<store.uri>/library/<digest>/``, so later runs reuse its blocks. No other module spells a key::

    config.yaml                          the run's config (bound to the run id: see create_run)
    history/<n>.json                     each config change accepted by `puzzle run --resume --redo`
    library.json                         which library digest the run uses, and what it was computed from
    data/<split>/manifest.json, shard-NNNNN.safetensors    token shards (prepare)
    plan/<list>.json                     unit lists (prepare, solve) and plan/variants.json, plan/cost.json
    done/<step>/<unit>.json              a unit's done marker: written last, after everything it produced
    failed/<step>/<unit>.json            the last failure of a unit (removed when it completes)
    profile/<scenario>/<variant>.json    per-variant profiles
    scores/<layer>/<variant>.json, scores/similarity/<layer>.json     replace-1-block scores
    solve/solutions.json, solve/pareto.json
    child/<id>/...  child/<id>/complete.json     an assembled model; complete.json (with every file's
                                         sha256) written last
    checkpoints/<step>/<unit>/...        resumable training state of a unit of the run (GKD)
    eval/<id>/report.json                one model's evaluation
    eval/icl-beams/<digest>.json         the ICL structure predictor's beams per query, shared by every model
    report.json, report.html, status.json, metrics/<step>-<unit>.prom

    library/<digest>/key.json, <layer>/<variant>/{weights.safetensors, meta.json}, checkpoints/<unit>/...
    profiles/<digest>/key.json, <entry>.json     measured profiles shared across runs (the profile cache)

This module imports nothing from the project, so every floor may name a key through it; the run's
lifecycle (creating, opening, progress, publishing) is :mod:`puzzle.run`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

#: 96 bits of sha256: collision-free for any realistic number of libraries, profile sets or ICL records
DIGEST_CHARS = 24


def digest_of(key: Mapping[str, Any]) -> str:
    """The ``<digest>`` of a content-addressed key (``library/<digest>/``, ``profiles/<digest>/``,
    ``eval/icl-beams/<digest>.json``): sha256 of the key as canonical JSON."""
    blob = json.dumps(key, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    return hashlib.sha256(blob).hexdigest()[:DIGEST_CHARS]


CONFIG = "config.yaml"
LIBRARY_RECORD = "library.json"
STATUS = "status.json"
REPORT_JSON = "report.json"
REPORT_HTML = "report.html"
VARIANTS_PLAN = "plan/variants.json"
COST_PLAN = "plan/cost.json"
SOLUTIONS = "solve/solutions.json"
PARETO = "solve/pareto.json"
COMPLETE = "complete.json"
DATA_SPLITS = ("distillation", "validation")

LIBRARY_PREFIX = "library"
LIBRARY_KEY = "key.json"
LIBRARY_WEIGHTS = "weights.safetensors"
LIBRARY_META = "meta.json"

PROFILE_CACHE_PREFIX = "profiles"
PROFILE_CACHE_KEY = "key.json"


def plan_key(name: str) -> str:
    """``plan/<name>.json``: a unit list (bld, profile, score, assemble) or variants / cost."""
    return f"plan/{name}.json"


def done_key(step: str, unit_id: str) -> str:
    return f"done/{step}/{unit_id}.json"


def failed_key(step: str, unit_id: str) -> str:
    return f"failed/{step}/{unit_id}.json"


def data_prefix(split: str) -> str:
    if split not in DATA_SPLITS:
        raise ValueError(f"split: {split!r} is not allowed; allowed: {list(DATA_SPLITS)}")
    return f"data/{split}"


def data_manifest_key(split: str) -> str:
    return f"{data_prefix(split)}/manifest.json"


def data_shard_key(split: str, index: int) -> str:
    return f"{data_prefix(split)}/shard-{index:05d}.safetensors"


def profile_prefix(scenario: str) -> str:
    return f"profile/{scenario}"


def profile_key(scenario: str, variant: str) -> str:
    return f"{profile_prefix(scenario)}/{variant}.json"


def score_key(layer: int, variant: str) -> str:
    return f"scores/{layer:03d}/{variant}.json"


def similarity_key(layer: int) -> str:
    return f"scores/similarity/{layer:03d}.json"


def child_prefix(unit_id: str) -> str:
    return f"child/{unit_id}"


def child_complete_key(unit_id: str) -> str:
    return f"{child_prefix(unit_id)}/{COMPLETE}"


def eval_report_key(unit_id: str) -> str:
    return f"eval/{unit_id}/report.json"


def icl_beams_key(digest: str) -> str:
    """``eval/icl-beams/<digest>.json``: the predictor's beams of one dataset under one ICL config."""
    return f"eval/icl-beams/{digest}.json"


def checkpoint_prefix(step: str, unit_id: str) -> str:
    return f"checkpoints/{step}/{unit_id}"


_FILE_SAFE = re.compile(r"[^A-Za-z0-9._=-]+")


def metrics_key(step: str, unit_id: str) -> str:
    """``metrics/<step>-<unit>.prom``, both made file-name safe."""
    return f"metrics/{_FILE_SAFE.sub('_', step)}-{_FILE_SAFE.sub('_', unit_id)}.prom"


def history_key(n: int) -> str:
    return f"history/{n:04d}.json"


def library_root(digest: str) -> str:
    return f"{LIBRARY_PREFIX}/{digest}"


def library_entry_prefix(layer: int, variant: str) -> str:
    return f"{layer:03d}/{variant}"


def library_checkpoint_prefix(unit_id: str) -> str:
    return f"checkpoints/{unit_id}"


def parse_library_entry(key: str) -> tuple[int, str] | None:
    """(layer, variant) of a library key ``<layer>/<variant>/meta.json``; None for any other key."""
    parts = key.split("/")
    if len(parts) == 3 and parts[2] == LIBRARY_META and parts[0].isdigit():
        return int(parts[0]), parts[1]
    return None


def profile_cache_root(digest: str) -> str:
    """``profiles/<digest>``, beside the runs: one (parent shapes, scenario, device, settings) measured."""
    return f"{PROFILE_CACHE_PREFIX}/{digest}"


def profile_cache_entry(entry: str) -> str:
    """``<entry>.json`` under a profile-cache root: one variant's shape (``attn_g4``, ``ffn_i512``, ``non_block``)."""
    return f"{entry}.json"


#: What each step writes into the run (key prefixes and keys), removed when the step is redone. BLD's blocks
#: live in the shared, content-addressed library and are never removed; the run's record of which library it
#: uses is, since what the blocks are keyed on may have changed.
STEP_OUTPUTS: dict[str, tuple[str, ...]] = {
    "prepare": ("data", "plan", LIBRARY_RECORD),
    "bld": (LIBRARY_RECORD,),
    "profile": ("profile",),
    "score": ("scores",),
    "solve": ("solve", "plan/assemble.json"),
    "assemble": ("child", "checkpoints/assemble"),
    "evaluate": ("eval",),
    "report": (REPORT_JSON, REPORT_HTML),
}

#: The first step that reads each config section: changing a section means redoing from that step on.
#: None: the section changes nothing a step computed (names, metrics endpoints).
CONFIG_FIRST_STEP: dict[str, str | None] = {
    "name": None, "seed": "prepare", "parent": "prepare", "data": "prepare", "search_space": "prepare",
    "compute": "prepare", "bld": "bld", "profile": "profile", "score": "score", "solve": "solve",
    "assemble": "assemble", "eval": "evaluate", "store": "prepare", "metrics": None,
}
