"""The ``profile`` step: on a GPU one unit per (scenario, variant) plus one ``non_block`` unit per
scenario; on a CPU one unit per scenario that measures every variant together.

Units (written by prepare)::

    {"id": "<scenario>.<variant>", "scenario": NAME, "kind": "attention" | "ffn" | "non_block", "variant": NAME}
    {"id": "<scenario>", "scenario": NAME, "kind": "scenario", "variants": [{"kind": ..., "variant": ...}, ...]}

A variant unit measures the variant on the scenario's device with
``puzzle.profiling.profiler.profile_unit`` (prefill, decode steps across the output range, exact weight
and KV-cache bytes); when the scenario's device is absent here it writes the roofline estimate instead,
marked ``"estimate": true``. A scenario unit (CPU scenarios) measures all of them in one process, taken
in turns over ``profile.rebuilds`` rounds, each variant timed as a whole model (it in every layer)
less a model of no-op layers (``profile_scenario``): on a shared CPU the machine's speed drifts between
processes by more than variants differ, and a part timed alone does not cost what it costs in a model. Either writes ``profile/<scenario>/<variant>.json`` per
variant. Only the parent's config.json is read: variants are timed with random weights of the right
shapes, since time does not depend on the values.

Each timing whose spread is above ``profile.max_rel_spread`` is taken again (``profile.attempts``); the
record carries its ``stability`` and solve refuses one that never came within the bound. With
``profile.reuse`` (default) the unit first looks in the profile cache beside the runs
(``profiles/<digest>/``, :mod:`puzzle.profiling.cache`) and copies stable records an earlier run
measured on the same device, shapes and settings (a scenario unit: only a whole set measured
together); what it measures itself, stable, it adds there.

Run one unit by hand::

    puzzle step profile --run file://./runs/tiny-... --unit '{"id": "gpu-b8.attn_g4", "scenario": "gpu-b8",
        "kind": "attention", "variant": "attn_g4"}'
"""

from __future__ import annotations

import logging

from puzzle import layout
from puzzle.context import StepContext
from puzzle.errors import ConfigError, UnitError
from puzzle.model import ModelConfig, ModelLoadError, parent_config
from puzzle.profiling.cache import profile_scenario_cached, profile_unit_cached
from puzzle.profiling.profiler import parse_variant
from puzzle.run import runs_root_uri
from puzzle.store import Store, open_store

log = logging.getLogger(__name__)


def _parent_config(ctx: StepContext) -> ModelConfig:
    try:
        return parent_config(ctx.parent_dir())
    except ModelLoadError as err:
        raise UnitError(f"parent.uri: cannot read the parent's config.json ({err})") from None


def _cache_root(ctx: StepContext) -> Store | None:
    """The store that holds the runs (the profile cache lives there), or None when reuse is off."""
    if not ctx.config.profile.reuse:
        return None
    try:
        return open_store(runs_root_uri(ctx.run_uri), ctx.config.store)
    except ConfigError as err:  # a run at the root of a bucket has no folder beside it
        log.warning("profile cache off for this unit: %s", err)
        return None


def _check_unit(unit: dict) -> list[tuple[str, str]]:
    """The (kind, variant) pairs a unit measures; UnitError names a malformed field."""
    if unit.get("kind") == "scenario":
        vs = unit.get("variants")
        if not isinstance(vs, list) or not vs or not all(
                isinstance(v, dict) and isinstance(v.get("kind"), str) and isinstance(v.get("variant"), str)
                for v in vs):
            raise UnitError(f"unit {unit.get('id')!r}: field 'variants' must be a non-empty list of "
                            f"{{'kind': ..., 'variant': ...}} (got {vs!r})")
        return [(v["kind"], v["variant"]) for v in vs]
    for field in ("kind", "variant"):
        if not isinstance(unit.get(field), str):
            raise UnitError(f"unit {unit.get('id')!r}: field {field!r} is missing or not a string (got {unit.get(field)!r})")
    return [(unit["kind"], unit["variant"])]


def run(ctx: StepContext) -> None:
    unit = ctx.unit
    if not isinstance(unit.get("scenario"), str):
        raise UnitError(f"unit {unit.get('id')!r}: field 'scenario' is missing or not a string (got {unit.get('scenario')!r})")
    pairs = _check_unit(unit)
    scenarios = {s.name: s for s in ctx.config.profile.scenarios}
    scenario = scenarios.get(unit["scenario"])
    if scenario is None:
        raise UnitError(f"unit {unit['id']!r}: scenario {unit['scenario']!r} is not in profile.scenarios; "
                        f"allowed: {sorted(scenarios)}")
    cfg = _parent_config(ctx)
    for kind, name in pairs:
        try:
            parse_variant(kind, name, cfg)
        except ValueError as err:
            raise UnitError(f"unit {unit['id']!r}: {err}") from None
    origin = {"run": ctx.run_id, "unit": ctx.unit_id}
    if unit.get("kind") == "scenario":
        recs = profile_scenario_cached(cfg, pairs, scenario, ctx.config.profile, _cache_root(ctx),
                                       seed=ctx.config.seed, origin=origin)
    else:
        recs = [profile_unit_cached(cfg, pairs[0][0], pairs[0][1], scenario, ctx.config.profile, _cache_root(ctx),
                                    seed=ctx.config.seed, origin=origin)]
    for rec in recs:
        _write(ctx, scenario.name, rec)


def _write(ctx: StepContext, scenario: str, rec: dict) -> None:
    variant = rec["variant"]
    ctx.store.put_json(layout.profile_key(scenario, variant), rec)
    labels = {"scenario": scenario, "variant": variant, "estimate": str(rec["estimate"]).lower()}
    ctx.metrics.set("profile_prefill_seconds", rec["prefill_s"],
                    help="Prefill of the scenario's batch through one block of this variant", **labels)
    ctx.metrics.set("profile_decode_seconds", rec["decode_s"],
                    help="All decode steps of one generation through one block of this variant", **labels)
    ctx.metrics.set("profile_rel_spread", float(rec["stability"].get("rel_spread", 0.0)),
                    help="Worst (p90 - p10) / median of the unit's timings (0 when nothing was measured)", **labels)
    how = "estimate" if rec["estimate"] else ("reused " + rec["reused"]["from"] if rec.get("reused") else rec["device"])
    if rec["method"]["kind"] == "whole_model" and not rec.get("reused"):
        how += f", timed as whole models of {rec['method']['layers']} layers"
    log.info("profile %s/%s: prefill %.3g s, decode %.3g s (%s)", scenario, variant,
             rec["prefill_s"], rec["decode_s"], how)
    if not rec["stability"]["stable"]:
        st = rec["stability"]
        log.warning("profile %s/%s: never stable: %s spread %.0f%% after %d attempts (bound %.0f%%); solve will "
                    "refuse it; re-run this unit with --force on a quieter machine", scenario, variant,
                    st["worst"], st["rel_spread"] * 100, st["attempts"], st["max_rel_spread"] * 100)
