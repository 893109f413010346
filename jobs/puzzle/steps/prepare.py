"""prepare: tokenize the distillation and validation text into shards, and plan every later fan-out.

Writes ``data/distillation/`` and ``data/validation/`` (int32 token shards + manifest),
``plan/variants.json`` (the expanded search space), and the unit lists ``plan/bld.json``,
``plan/profile.json`` and ``plan/score.json``. Units are deterministic functions of the config
and the parent's shape, so a retried prepare writes the same plan.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from puzzle.config import ConfigError, PuzzleConfig
from puzzle.context import StepContext
from puzzle.data.shards import load_tokenizer, read_uri_bytes, sha256, tokenize_text, write_shards
from puzzle.model import ModelConfig, ModelLoadError, expand_search_space
from puzzle.model.io import _weight_files, parent_model_config

log = logging.getLogger(__name__)


def read_parent_config(parent_dir: Path) -> ModelConfig:
    path = parent_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"parent.uri: {str(parent_dir)!r} has no config.json (expected a Hugging Face model directory)")
    raw = json.loads(path.read_text(encoding="utf-8"))
    try:
        # no weights, or pickle-only weights, are refused here, before any plan a later step would trust
        _weight_files(parent_dir)
        if raw.get("model_type") == "nemotron-nas":
            return ModelConfig.from_json_file(path)
        return parent_model_config(raw, str(path))
    except ModelLoadError as err:
        raise ConfigError(f"parent.uri: {err}") from None


def _ranges(n_layers: int, per_unit: int) -> list[tuple[int, int]]:
    return [(a, min(a + per_unit, n_layers)) for a in range(0, n_layers, per_unit)]


def plan_units(config: PuzzleConfig, parent: ModelConfig) -> dict[str, list[dict]]:
    """The bld, profile and score unit lists (see DESIGN.md's run layout)."""
    attn, ffn = expand_search_space(config.search_space, parent)
    parent_attn = {b.attention for b in parent.block_configs}
    parent_ffn = {b.ffn for b in parent.block_configs}
    n = parent.num_hidden_layers
    bld: list[dict] = []
    if config.bld.mode == "decoupled":
        trained = [("attention", v) for v in attn if v not in parent_attn] + [
            ("ffn", v) for v in ffn if v not in parent_ffn
        ]
        for kind, v in trained:
            for a, b in _ranges(n, config.bld.layers_per_unit):
                bld.append({"id": f"{v.name}.l{a:03d}-{b:03d}", "kind": kind, "variant": v.name, "layers": [a, b]})
    else:
        for va in attn:
            for vf in ffn:
                if va in parent_attn and vf in parent_ffn:
                    continue
                name = f"{va.name}+{vf.name}"
                for a, b in _ranges(n, config.bld.layers_per_unit):
                    bld.append({"id": f"{name}.l{a:03d}-{b:03d}".replace("+", "_"), "kind": "block",
                                "variant": name, "layers": [a, b]})
    profile: list[dict] = []
    for sc in config.profile.scenarios:
        for kind, variants in (("attention", attn), ("ffn", ffn)):
            for v in variants:
                profile.append({"id": f"{sc.name}.{v.name}", "scenario": sc.name, "kind": kind, "variant": v.name})
        profile.append({"id": f"{sc.name}.non_block", "scenario": sc.name, "kind": "non_block", "variant": "non_block"})
    score = [{"id": f"score.l{a:03d}-{b:03d}", "layers": [a, b]} for a, b in _ranges(n, config.score.layers_per_unit)]
    return {
        "variants": {"attention": [v.name for v in attn], "ffn": [v.name for v in ffn],
                     "parent": [{"attention": b.attention.name, "ffn": b.ffn.name} for b in parent.block_configs]},
        "bld": bld,
        "profile": profile,
        "score": score,
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
        prefix = f"data/{split}"
        raw = read_uri_bytes(uri, cfg.store, field=f"data.{split}_uri")
        source = {"uri": uri, "sha256": sha256(raw), "max_tokens": budget}
        if ctx.store.exists(f"{prefix}/manifest.json") and ctx.store.get_json(f"{prefix}/manifest.json")["source"] == source:
            continue  # a retried prepare: shards already complete
        tokens = tokenize_text(raw, uri, tokenizer, eos_id, budget)
        if len(tokens) < cfg.data.seq_len:
            raise ConfigError(
                f"data.{split}_uri: {uri!r} gives {len(tokens)} tokens, fewer than one sequence "
                f"(data.seq_len={cfg.data.seq_len})"
            )
        manifest = write_shards(ctx.store, prefix, tokens, cfg.data.shard_tokens, source)
        ctx.metrics.set("prepare_tokens", manifest["tokens"], help="Tokens written per split", split=split)
        log.info("%s: %d tokens in %d shard(s)", split, manifest["tokens"], len(manifest["shards"]))
    ctx.store.put_json("plan/variants.json", plans["variants"])
    for name in ("bld", "profile", "score"):
        ctx.store.put_json(f"plan/{name}.json", plans[name])
        ctx.metrics.set("prepare_units", len(plans[name]), help="Work units planned per step", plan=name)
    outputs(ctx)


def outputs(ctx: StepContext) -> None:
    for name in ("bld", "profile", "score"):
        ctx.write_output(name, ctx.store.get_json(f"plan/{name}.json"))
