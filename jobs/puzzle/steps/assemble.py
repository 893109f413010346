"""assemble: stitch one chosen architecture out of the parent and the BLD library; optional GKD uplift.

One unit per entry of ``plan/assemble.json`` (written by solve)::

    {"id": "sol-0", "kind": "puzzle"|"parent"|"uniform_ffn"|"layer_drop",
     "block_configs": [{"attention": "attn_g4", "ffn": "ffn_m0.5"}, ...one per layer],
     "predicted": {"<scenario>": {...}}}

Per layer: the parent's own variant keeps the parent's weights, a ``no_op`` is built empty, anything
else comes from the library (in coupled mode the ``<attn>+<ffn>`` block when the library has it).
With ``assemble.gkd.enabled`` every unit except ``parent`` is then distilled as a whole from the parent
(:mod:`puzzle.distill.gkd`; checkpointed in ``checkpoints/assemble/<id>/``, so a killed unit resumes), baselines with the same budget as Puzzle's children, so the report compares like
with like.

Writes ``child/<id>/`` in the nemotron-nas format (config.json, safetensors, generation_config.json,
tokenizer files), each file an atomic store write, and ``child/<id>/complete.json`` last: a child
without it is incomplete (a killed pod) and is neither evaluated nor fetched. A retried unit deletes
any half-written child first. Metrics: ``puzzle_gkd_loss``, ``puzzle_gkd_kl``, ``puzzle_gkd_steps``,
``puzzle_child_params``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from puzzle import distributed as dist
from puzzle import serving as serving_rules
from puzzle.context import StepContext
from puzzle.data.shards import load_tokens, sequences
from puzzle.errors import UnitError
from puzzle.layout import checkpoint_prefix, child_complete_key, child_prefix
from puzzle.library import Library, LibraryError, check_parent_unchanged
from puzzle.model import (
    AttentionVariant,
    BlockConfig,
    DeciLMForCausalLM,
    FFNVariant,
    ModelConfig,
    attention_variant_from_name,
    ffn_variant_from_name,
    load_parent,
    parent_config,
    save_pretrained,
)
from puzzle.model.io import torch_dtype
from puzzle.run import child_record, publish_child

log = logging.getLogger(__name__)

KINDS = ("parent", "puzzle", "uniform_ffn", "layer_drop")


def parse_block_configs(raw: Any, n_layers: int, hidden_size: int) -> list[tuple[AttentionVariant, FFNVariant]]:
    """The unit's per-layer (attention, FFN) variants; errors name the layer and the value."""
    if not isinstance(raw, list) or len(raw) != n_layers:
        got = len(raw) if isinstance(raw, list) else type(raw).__name__
        raise UnitError(f"block_configs: {got} entries is not allowed; the parent has {n_layers} layers, one each")
    out = []
    for i, b in enumerate(raw):
        if not isinstance(b, dict) or not isinstance(b.get("attention"), str) or not isinstance(b.get("ffn"), str):
            raise UnitError(f"block_configs[{i}]: {b!r} is not allowed; need {{'attention': NAME, 'ffn': NAME}}")
        try:
            out.append((attention_variant_from_name(b["attention"]), ffn_variant_from_name(b["ffn"], hidden_size)))
        except ValueError as err:
            raise UnitError(f"block_configs[{i}]: {err}") from None
    return out


def build_child(parent: DeciLMForCausalLM, blocks: list[tuple[AttentionVariant, FFNVariant]],
                library: Library | None, coupled: bool = False) -> DeciLMForCausalLM:
    """Turn ``parent`` (modified in place and returned) into the child with ``blocks``."""
    for i, (attn, ffn) in enumerate(blocks):
        layer = parent.model.layers[i]
        # by shape: the parent's ffn_i<size> and an ffn_m<mult> of that size are the same module
        own_attn = attn == layer.attention_variant
        own_ffn = ffn == layer.ffn_variant
        if own_attn and own_ffn:
            continue
        if coupled and library is not None and library.has(i, f"{attn.name}+{ffn.name}"):
            library.apply(parent, i, f"{attn.name}+{ffn.name}")
            continue
        for variant, own in ((attn, own_attn), (ffn, own_ffn)):
            if own:
                continue
            if variant.no_op:
                (parent.set_attention if isinstance(variant, AttentionVariant) else parent.set_ffn)(i, variant, None)
                continue
            if library is None or not library.has(i, variant.name):
                where = library.uri if library is not None else "(no library)"
                raise UnitError(f"library {where} has no block for layer {i}, variant {variant.name!r}; run bld first")
            try:
                library.apply(parent, i, variant.name)
            except LibraryError as err:
                raise UnitError(str(err)) from None
    parent.current_config()
    return parent



def run(ctx: StepContext) -> None:
    cfg = ctx.config
    unit = ctx.unit
    kind = unit.get("kind")
    if kind not in KINDS:
        raise UnitError(f"kind: {kind!r} is not allowed; allowed: {list(KINDS)}")
    prefix = child_prefix(ctx.unit_id)
    existing = child_record(ctx.store, ctx.unit_id)
    if existing is not None and existing.get("unit") == unit:
        log.info("%s already complete", prefix)  # killed after complete.json, before the done marker
        return
    started = time.time()
    dist.init()
    main, sharded = dist.is_main(), dist.world() > 1
    device = dist.device(ctx.device())
    dtype = torch_dtype(cfg.parent.dtype)

    def checked_parent_dir() -> str:
        parent_dir = ctx.parent_dir()
        check_parent_unchanged(ctx.store, parent_dir)
        return str(parent_dir)

    # rank 0 fetches the parent; the other ranks of the pod read its config from the same folder
    parent_dir = Path(dist.from_main(checked_parent_dir))
    pcfg = parent_config(parent_dir)
    blocks = parse_block_configs(unit.get("block_configs"), pcfg.num_hidden_layers, pcfg.hidden_size)
    # Before any GKD: a child the engines of search_space.serving cannot load is refused with the rule.
    serving = cfg.search_space.serving
    broken = serving_rules.block_violations(
        serving, [BlockConfig(a, f).to_json(pcfg.hidden_size) for a, f in blocks],
        pcfg.hidden_size, int(pcfg.head_dim))
    if broken and kind == "parent":
        # The parent is the reference the children are compared with, not a child to serve.
        if main:
            log.warning("the parent breaks search_space.serving %s (%s); saved without those rules",
                        serving, serving_rules.messages(broken))
        serving = ["any"]
    elif broken:
        raise UnitError(f"search_space.serving: {serving} cannot load unit {ctx.unit_id}: "
                        f"{serving_rules.messages(broken)}")
    own = pcfg.block_configs
    needs_library = any(
        not v.no_op and v != getattr(own[i], part)
        for i, b in enumerate(blocks) for v, part in zip(b, ("attention", "ffn"), strict=True)
    )
    library = Library.for_run(ctx.store, ctx.config, parent_dir) if needs_library and main else None
    # Rank 0 builds the child; sharded, on the host (the whole child need not fit one GPU) for
    # distribute() to spread over the ranks' GPUs, else on the device as it trains there.
    build_device = "cpu" if sharded else device
    built: dict[str, DeciLMForCausalLM] = {}

    def build() -> ModelConfig:
        built["child"] = build_child(load_parent(parent_dir, dtype=dtype, device=build_device), blocks, library,
                                     coupled=cfg.bld.mode == "coupled")
        return built["child"].config

    child_cfg = dist.from_main(build)
    child = built.pop("child", None)

    gkd: dict[str, Any] = {"enabled": False}
    if cfg.assemble.gkd.enabled and kind != "parent":
        from puzzle.distill.gkd import distill

        child = dist.distribute(child, lambda: DeciLMForCausalLM(child_cfg), device)
        teacher = dist.distribute(load_parent(parent_dir, dtype=dtype, device=build_device) if main else None,
                                  lambda: DeciLMForCausalLM(pcfg), device, frozen=True)
        train = sequences(load_tokens(ctx.store, "distillation"), cfg.data.seq_len)
        held = sequences(load_tokens(ctx.store, "validation"), cfg.data.seq_len)
        held = held[: max(1, math.ceil(cfg.eval.tokens / cfg.data.seq_len))]

        def on_step(step: int, point: dict[str, float]) -> None:
            ctx.metrics.observe("gkd_step_loss", point["loss"], help="GKD loss of each optimizer step")

        try:
            result = distill(child, teacher, train, cfg.assemble.gkd, seed=cfg.seed, eval_seqs=held,
                             on_step=on_step, desc=f"gkd {ctx.unit_id}",
                             checkpoints=ctx.store.child(checkpoint_prefix("assemble", ctx.unit_id)) if main else None,
                             resume_key=json.dumps(unit, sort_keys=True))
        except ValueError as err:  # a batch too small to share over the GPUs
            raise UnitError(str(err)) from None
        del teacher
        # the child is saved from one whole state dict, gathered on rank 0
        child = dist.gather_model(child, lambda: DeciLMForCausalLM(child_cfg))
        gkd = {"enabled": True, **result.to_dict()}
        ctx.metrics.set("gkd_loss", result.curve[-1]["loss"], help="GKD loss at the last step")
        ctx.metrics.set("gkd_kl", result.initial_kl, help="Held-out KL(parent||child) per token", when="before")
        ctx.metrics.set("gkd_kl", result.final_kl, help="Held-out KL(parent||child) per token", when="after")
        ctx.metrics.set("gkd_steps", result.steps, help="GKD optimizer steps")
        ctx.metrics.set("gkd_seconds", result.seconds, help="Seconds of GKD training")
    if not main:
        return
    assert child is not None

    out = ctx.scratch / "child"
    try:
        save_pretrained(child, out, tokenizer_dir=parent_dir, max_shard_bytes=cfg.assemble.max_shard_bytes,
                        serving=serving)
    except ValueError as err:
        raise UnitError(str(err)) from None
    # publish_child checks the directory holds what readers need, removes what an earlier attempt left,
    # and writes complete.json (every file's sha256) last.
    params = sum(p.numel() for p in child.parameters())
    record = publish_child(ctx.store, ctx.unit_id, out, {
        "unit": unit, "kind": kind,
        "block_configs": [{"attention": a.name, "ffn": f.name} for a, f in blocks],
        "params": params, "gkd": gkd, "seconds": time.time() - started,
        "library": library.digest if library is not None else None, "device": str(device),
        "world_size": dist.world(),
    })
    ctx.metrics.set("child_params", params, help="Parameters of the assembled child")
    log.info("assembled %s (%d params, %d files) in %.1fs", child_complete_key(ctx.unit_id), params,
             len(record["files"]), time.time() - started)


__all__ = ["build_child", "parse_block_configs", "run"]

