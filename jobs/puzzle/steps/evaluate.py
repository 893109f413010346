"""evaluate: one assembled model (a Puzzle child, a baseline, or the parent itself) against the parent.

Same unit as assemble (``plan/assemble.json``; the pipeline pairs each evaluate unit with its own
assemble unit). Reads ``child/<id>/`` (refused unless ``complete.json`` is there) and the parent, then
measures, on the same data for every unit:

- quality: KL(parent || child) per token and the perplexities of both on ``eval.tokens`` held-out
  tokens of ``data/validation``;
- task: exact match on ``eval.task_examples`` held-out tiny-task (SCAN) episodes;
- throughput: tokens/s measured per profile scenario (``puzzle.profiling.bench``) next to the
  prediction solve made for this architecture, and the parent's measured in turns with it in the same
  unit, ``eval.throughput_repeats`` generations each (``paired_speedup``: the median of the pairs'
  ratios, both under the same load, with its 95% interval);
- ICL (``eval.icl.enabled``): exact match per dataset:split x selection method; the query programs come
  from the structure predictor (the parent's beams by default, the same for every unit) and the prompt
  budget from the parent's context, so parent and child are shown the same prompts;
- lm-evaluation-harness tasks (``eval.lm_eval_tasks``) through its Python API.

The parent's own task/ICL/throughput figures are the ``parent`` unit's; the report divides by them
(retention, measured speedup). Writes ``eval/<id>/report.json``.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from puzzle import distributed as dist
from puzzle.context import StepContext
from puzzle.data.shards import load_tokens, sequences
from puzzle.errors import UnitError
from puzzle.evaluation import (
    compare_to_parent,
    icl_results,
    lm_eval_results,
    task_accuracy,
    throughput_figures,
)
from puzzle.generation import DeciTextGenerator
from puzzle.layout import digest_of, eval_report_key, icl_beams_key
from puzzle.library import check_parent_unchanged
from puzzle.model import DeciLMForCausalLM, ModelConfig, load_parent, load_pretrained
from puzzle.model.io import torch_dtype
from puzzle.run import download_child
from puzzle.store import open_store

log = logging.getLogger(__name__)


def run(ctx: StepContext) -> None:
    cfg = ctx.config
    ev = cfg.eval
    uid = ctx.unit_id
    started = time.time()
    dist.init()
    main, sharded = dist.is_main(), dist.world() > 1
    device = dist.device(ctx.device())
    dtype = torch_dtype(cfg.parent.dtype)
    child_dir = ctx.scratch / "child"

    def fetch() -> tuple[dict[str, Any], str]:
        # every file checked against the sha256 its completion record lists, as fetch does
        record = download_child(ctx.store, uid, child_dir)
        check_parent_unchanged(ctx.store, ctx.parent_dir())
        return record, str(ctx.parent_dir())

    record, parent_dir = dist.from_main(fetch)
    is_parent = record.get("kind") == "parent"
    # Rank 0 reads each model; sharded, on the host, and distribute() spreads it over the ranks' GPUs,
    # one model at a time so the host holds one whole model at most.
    load_device = "cpu" if sharded else device
    child, _, params = _distributed(lambda: load_pretrained(child_dir, dtype=dtype, device=load_device), device)
    parent = None if is_parent else _distributed(
        lambda: load_parent(parent_dir, dtype=dtype, device=load_device), device)[0]

    out: dict[str, Any] = {
        "id": uid, "kind": record.get("kind"), "block_configs": record.get("block_configs"),
        "predicted": ctx.unit.get("predicted"), "params": params,
        "gkd": record.get("gkd"), "device": str(device), "world_size": dist.world(),
    }

    seqs = sequences(load_tokens(ctx.store, "validation"), cfg.data.seq_len)
    seqs = seqs[: max(1, math.ceil(ev.tokens / cfg.data.seq_len))]
    # the full-model forwards: sharded over every rank
    out["quality"] = compare_to_parent(child, parent, seqs, batch_size=cfg.score.batch_size)
    if sharded:
        # Generation, throughput and lm-eval stay on rank 0 with whole models on its GPU: a decode loop
        # under FSDP2 would need every rank in lockstep for every token, and throughput is a one-GPU
        # figure by definition (the profile's scenarios). The shards are freed first; a model is loaded
        # again only when a figure needs it.
        del child, parent
        if not main:
            return
        icl = ev.icl.enabled and record.get("kind") in ev.icl_models
        generates = ev.task_examples > 0 or ev.measure_throughput or icl or bool(ev.lm_eval_tasks)
        child = load_pretrained(child_dir, dtype=dtype, device=device) if generates else None
        parent = None if is_parent or not (ev.measure_throughput or icl) else load_parent(
            parent_dir, dtype=dtype, device=device)
    ctx.metrics.set("eval_kl", out["quality"]["kl"], help="KL(parent||model) per held-out token")
    ctx.metrics.set("eval_perplexity", out["quality"]["perplexity"], help="Held-out perplexity")

    gen = DeciTextGenerator(child, child_dir, batch_size=ev.generation_batch_size) if child is not None else None
    out["task"] = None
    if ev.task_examples > 0:
        out["task"] = task_accuracy(gen, ev.task_examples, seed=cfg.seed)
        ctx.metrics.set("eval_task_accuracy", out["task"]["accuracy"], help="Tiny-task exact match")

    out["throughput"] = {}
    if ev.measure_throughput:
        out["throughput"] = throughput_figures(child, cfg.profile.scenarios, cfg.profile, ctx.unit.get("predicted"),
                                               seed=cfg.seed, reference=parent, repeats=ev.throughput_repeats)
        for sc, t in out["throughput"].items():
            if t["measured"] is not None:
                ctx.metrics.set("eval_tokens_per_s", t["measured"]["tokens_per_s"],
                                help="Measured generation throughput", scenario=sc)

    out["icl"] = None
    if ev.icl.enabled and record.get("kind") in ev.icl_models:
        # The parent both predicts the query programs (structure_predictor: parent) and sets the prompt
        # budget, so every unit is shown the same prompts; only the answering model differs.
        parent_gen = (DeciTextGenerator(parent, ctx.parent_dir(), batch_size=ev.generation_batch_size)
                      if parent is not None else gen)
        out["icl"] = icl_results(gen, ev.icl, _structure_predictor(ctx, parent_gen, dtype, device), parent_gen,
                                 beams_cache=_beams_cache(ctx))

    out["lm_eval"] = None
    if ev.lm_eval_tasks:
        out["lm_eval"] = lm_eval_results(child, child_dir, ev.lm_eval_tasks, seed=cfg.seed)

    out["seconds"] = time.time() - started
    ctx.store.put_json(eval_report_key(uid), out)
    log.info("evaluated %s in %.1fs: kl %.4f, ppl %.2f", uid, out["seconds"], out["quality"]["kl"],
             out["quality"]["perplexity"])


def _beams_cache(ctx: StepContext):
    """The structure predictor's beams per query, kept in the run (``eval/icl-beams/``) under a digest of the
    ICL config, the parent and the dataset: the first evaluate unit generates them, every later one (and a
    retry) reads them, so the parent predicts each query's programs once per run instead of once per model.
    A record that does not match its key or its shape is generated again, never used."""
    icl = ctx.config.eval.icl.model_dump(mode="json")

    def cached(name: str, compute):
        ident = {"icl": icl, "dataset": name, "parent": ctx.config.parent.uri}
        key = icl_beams_key(digest_of(ident))
        if ctx.store.exists(key):
            rec = ctx.store.get_json(key)
            beams = rec.get("beams") if isinstance(rec, dict) and rec.get("ident") == ident else None
            if isinstance(beams, list) and all(isinstance(b, list) and all(isinstance(x, str) for x in b)
                                                for b in beams):
                return beams
            log.warning("%s does not match its ICL config or shape; generating the beams again", key)
        beams = compute()
        ctx.store.put_json(key, {"ident": ident, "beams": beams})
        return beams

    return cached


def _structure_predictor(ctx: StepContext, parent_gen: DeciTextGenerator, dtype, device) -> DeciTextGenerator | None:
    """eval.icl.structure_predictor: the parent's generator, the model at predictor_uri, or None (oracle)."""
    icl = ctx.config.eval.icl
    if icl.structure_predictor == "oracle":
        return None
    if icl.structure_predictor == "parent":
        return parent_gen
    uri = icl.predictor_uri or ""
    if uri.startswith("s3://"):
        path = ctx.scratch / "structure-predictor"
        if not path.exists():
            open_store(uri, ctx.config.store).download_dir("", path)
    else:
        path = Path(uri.removeprefix("file://"))
        if not (path / "config.json").is_file():
            raise UnitError(f"eval.icl.predictor_uri: {uri!r} is not a Hugging Face model directory (no config.json)")
    return DeciTextGenerator(load_parent(path, dtype=dtype, device=device), path,
                             batch_size=ctx.config.eval.generation_batch_size)


def _distributed(load, device) -> tuple[DeciLMForCausalLM, ModelConfig, int]:
    """(the model sharded over the ranks, its config, its parameter count); ``load`` runs on rank 0."""
    full: dict[str, DeciLMForCausalLM] = {}

    def read() -> tuple[ModelConfig, int]:
        full["m"] = load()
        return full["m"].config, sum(p.numel() for p in full["m"].parameters())

    cfg, params = dist.from_main(read)
    model = dist.distribute(full.pop("m", None), lambda: DeciLMForCausalLM(cfg), device, frozen=True)
    return model, cfg, params


__all__ = ["run"]
