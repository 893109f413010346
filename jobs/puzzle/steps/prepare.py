"""prepare: tokenize the distillation and validation text into shards, and plan every later fan-out.

Writes ``data/distillation/`` and ``data/validation/`` (int32 token shards + manifest),
``plan/variants.json`` (the expanded search space), the unit lists ``plan/bld.json`` (BLD's stages,
:func:`puzzle.planning.plan_stages`), ``plan/profile.json`` and ``plan/score.json``, and the cost plan
``plan/cost.json`` (units, memory per unit and estimated GPU hours per step). Units are deterministic
functions of the config and the parent's shape, so a retried prepare writes the same plan.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from puzzle import layout
from puzzle.config import PuzzleConfig
from puzzle.context import StepContext
from puzzle.data.shards import load_tokenizer, read_uri_bytes, sha256, tokenize_text, write_shards
from puzzle.errors import ConfigError
from puzzle.model import ModelConfig, ModelLoadError, expand_search_space, parent_config, weight_files
from puzzle.planning import check_against_parent, cost_plan, plan_stages

log = logging.getLogger(__name__)


def read_parent_config(parent_dir: Path) -> ModelConfig:
    try:
        cfg = parent_config(parent_dir)
        # no weights, or pickle-only weights, are refused here, before any plan a later step would trust
        weight_files(parent_dir)
        return cfg
    except ModelLoadError as err:
        raise ConfigError(f"parent.uri: {err}") from None


def _ranges(n_layers: int, per_unit: int) -> list[tuple[int, int]]:
    return [(a, min(a + per_unit, n_layers)) for a in range(0, n_layers, per_unit)]


def plan_units(config: PuzzleConfig, parent: ModelConfig) -> dict[str, Any]:
    """The bld, profile and score unit lists and the cost plan (see :mod:`puzzle.layout`)."""
    attn_names, ffn_names = check_against_parent(config, parent)
    attn, ffn = expand_search_space(config.search_space, parent)
    stages = plan_stages(config, parent, attn_names, ffn_names)
    bld = [p.unit() for p in stages if p.blocks]
    profile: list[dict] = []
    for sc in config.profile.scenarios:
        pairs = [(kind, v.name) for kind, variants in (("attention", attn), ("ffn", ffn)) for v in variants]
        pairs.append(("non_block", "non_block"))
        if sc.device.split(":")[0] == "cpu":
            # one process times them all, in turns (see puzzle.steps.profile)
            profile.append({"id": sc.name, "scenario": sc.name, "kind": "scenario",
                            "variants": [{"kind": k, "variant": n} for k, n in pairs]})
        else:
            profile += [{"id": f"{sc.name}.{n}", "scenario": sc.name, "kind": k, "variant": n} for k, n in pairs]
    n = parent.num_hidden_layers
    score = [{"id": f"score.l{a:03d}-{b:03d}", "layers": [a, b]} for a, b in _ranges(n, config.score.layers_per_unit)]
    return {
        "variants": {"attention": attn_names, "ffn": ffn_names,
                     "parent": [{"attention": b.attention.name, "ffn": b.ffn.name} for b in parent.block_configs]},
        "bld": bld,
        "profile": profile,
        "score": score,
        "cost": cost_plan(config, parent, attn_names, ffn_names, stages),
    }


def run(ctx: StepContext) -> None:
    cfg = ctx.config
    parent_dir = ctx.parent_dir()
    parent = read_parent_config(parent_dir)
    plans = plan_units(cfg, parent)  # validates the search space against the parent before any work
    tokenizer, eos_id = load_tokenizer(parent_dir)
    if tokenizer.get_vocab_size() > parent.vocab_size:
        raise ConfigError(
            f"parent.uri: the tokenizer has {tokenizer.get_vocab_size()} tokens but the model's vocab_size is "
            f"{parent.vocab_size}; they do not belong together"
        )
    for split, uri, budget in (
        ("distillation", cfg.data.distillation_uri, cfg.data.distillation_tokens),
        ("validation", cfg.data.validation_uri, cfg.data.validation_tokens),
    ):
        raw = read_uri_bytes(uri, cfg.store, field=f"data.{split}_uri")
        source = {"uri": uri, "sha256": sha256(raw), "max_tokens": budget}
        manifest_key = layout.data_manifest_key(split)
        if ctx.store.exists(manifest_key):
            manifest = ctx.store.get_json(manifest_key)
            if manifest["source"] == source and all(ctx.store.exists(sh["key"]) for sh in manifest["shards"]):
                continue  # a retried prepare: shards already complete
        tokens = tokenize_text(raw, uri, tokenizer, eos_id, budget)
        if len(tokens) < cfg.data.seq_len:
            raise ConfigError(
                f"data.{split}_uri: {uri!r} gives {len(tokens)} tokens, fewer than one sequence "
                f"(data.seq_len={cfg.data.seq_len})"
            )
        manifest = write_shards(ctx.store, split, tokens, cfg.data.shard_tokens, source)
        ctx.metrics.set("prepare_tokens", manifest["tokens"], help="Tokens written per split", split=split)
        log.info("%s: %d tokens in %d shard(s)", split, manifest["tokens"], len(manifest["shards"]))
    ctx.store.put_json(layout.VARIANTS_PLAN, plans["variants"])
    ctx.store.put_json(layout.COST_PLAN, plans["cost"])
    for name in ("bld", "profile", "score"):
        ctx.store.put_json(layout.plan_key(name), plans[name])
        ctx.metrics.set("prepare_units", len(plans[name]), help="Work units planned per step", plan=name)
