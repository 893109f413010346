"""score: replace_one_block_scores — what each library block costs in quality, one layer range per unit.

For every layer of the unit's range and every variant of the search space, the parent with that one
block swapped for the library block is compared with the parent on held-out tokens: KL divergence of
next-token distributions (``kl``, the default degradation), LM-loss increase (``lm_loss``), cosine
distance of the final hidden states (``cosine``).

One parent pass per batch feeds every candidate: the parent's layers run in order, streamed layer by
layer when they do not all fit (:class:`puzzle.model.streaming.ParentLayers`), and at each layer every
candidate's hidden state advances through it too (a candidate joins at its own layer, with its block in
place of the parent's), so each parent layer is read once per batch however many candidates there are.
Memory is the parent's resident layers, one hidden state per candidate and one candidate's logits at a
time. The unit also records how similar each layer's input and output hidden states are
(``scores/similarity/<layer>.json``), which the layer-dropping baseline uses. ``score.task_examples``
(exact match of the swapped model on the tiny task) generates with the whole parent in memory.

Writes ``scores/<layer>/<variant>.json``; the parent's own variants score 0 by definition.

On several GPUs of one pod (torchrun, :mod:`puzzle.distributed`) the held-out batches are dealt
round-robin over the ranks, each rank streaming the parent on its own GPU as above, and the sums are
added over ranks before rank 0 writes: the same batches as one process, so the same figures (summed
in another order), in about 1/N of the time. The memory per GPU stays what one GPU needs, which
streaming already bounds: the parent never has to fit one GPU. ``score.task_examples`` splits its
candidates over the ranks (each generating with the whole parent, as one process does).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from puzzle import distributed as dist
from puzzle import layout
from puzzle.context import StepContext
from puzzle.data.shards import load_tokens, sequences
from puzzle.errors import UnitError
from puzzle.library import Library
from puzzle.model import (
    AttentionVariant,
    BlockConfig,
    DeciLayer,
    FFNVariant,
    ModelConfig,
    coupled_name,
    load_parent,
    parent_config,
    parse_name,
)
from puzzle.model.io import torch_dtype
from puzzle.model.streaming import ParentLayers
from puzzle.planning import FILL, OVERHEAD_BYTES, non_block_bytes, parent_layer_bytes

log = logging.getLogger(__name__)


def _candidates(ctx: StepContext) -> list[tuple[str, str]]:
    """(kind, variant name) pairs scored at every layer: every variant of the plan."""
    variants = ctx.store.get_json(layout.VARIANTS_PLAN)
    if ctx.config.bld.mode == "coupled":
        return [("block", coupled_name(a, f)) for a in variants["attention"] for f in variants["ffn"]]
    return [("attention", v) for v in variants["attention"]] + [("ffn", v) for v in variants["ffn"]]


@dataclass
class Candidate:
    """One (layer, variant) with its block as a DeciLayer holding only the swapped sub-block(s)."""

    layer: int
    kind: str
    name: str
    block: DeciLayer

    @property
    def key(self) -> tuple[int, str, str]:
        return self.layer, self.kind, self.name

    def apply(self, parent_layer: DeciLayer, h: torch.Tensor, rope) -> torch.Tensor:
        """The layer with this candidate in place of the parent's sub-block(s)."""
        if self.kind == "attention":
            return parent_layer.ffn_sublayer(self.block.attn_sublayer(h, *rope))
        if self.kind == "ffn":
            return self.block.ffn_sublayer(parent_layer.attn_sublayer(h, *rope))
        return self.block.ffn_sublayer(self.block.attn_sublayer(h, *rope))


def _build_candidate(cfg: ModelConfig, lib: Library, layer: int, kind: str, name: str, device, dtype) -> Candidate:
    parts = parse_name(name, cfg.hidden_size)
    attn = next((p for p in parts if isinstance(p, AttentionVariant)), AttentionVariant.noop())
    ffn = next((p for p in parts if isinstance(p, FFNVariant)), FFNVariant.noop())
    with torch.device("meta"):
        block = DeciLayer(cfg, BlockConfig(attn, ffn))
    want = set(block.state_dict())
    sd = lib.load_block(layer, name, device, dtype) if want else {}
    if set(sd) != want:
        raise UnitError(f"library {lib.uri}: layer {layer}, variant {name!r} holds {sorted(sd)[:4]}..., the "
                        f"variant needs {sorted(want)[:4]}...; redo bld for it")
    block.load_state_dict(sd, assign=True)
    return Candidate(layer, kind, name, block.requires_grad_(False).eval())


def run(ctx: StepContext) -> None:
    cfg = ctx.config
    a, b = ctx.unit.get("layers", [None, None])
    dist.init()
    device = dist.device(ctx.device())
    dtype = torch_dtype(cfg.parent.dtype)
    # rank 0 fetches the parent (s3://, hf://); every rank of the pod streams it from that one folder
    parent_dir = Path(dist.from_main(lambda: str(ctx.parent_dir())))
    pcfg = parent_config(parent_dir)
    n = pcfg.num_hidden_layers
    if not (isinstance(a, int) and isinstance(b, int) and not isinstance(a, bool) and 0 <= a < b <= n):
        raise UnitError(f"layers: {ctx.unit.get('layers')!r} is not allowed; need [a, b] with 0 <= a < b <= {n}")
    # rank 0 records the run's library digest when nothing has yet; the other ranks then read it
    first: dict[str, Library] = {}

    def record_library() -> None:
        first["lib"] = Library.for_run(ctx.store, ctx.config, parent_dir)

    dist.from_main(record_library)
    lib = first.get("lib") or Library.for_run(ctx.store, ctx.config, parent_dir)
    own = {i: (bc.attention.name, bc.ffn.name) for i, bc in enumerate(pcfg.block_configs)}

    cands: list[Candidate] = []
    for layer in range(a, b):
        for kind, name in _candidates(ctx):
            parts = parse_name(name, pcfg.hidden_size)
            if all(p.name == own[layer][0 if isinstance(p, AttentionVariant) else 1] for p in parts):
                continue  # the parent's own variant: 0 by definition
            if not all(p.no_op for p in parts) and not lib.has(layer, name):
                raise UnitError(f"library {lib.uri} has no block for layer {layer}, variant {name!r}; run bld first")
            cands.append(_build_candidate(pcfg, lib, layer, kind, name, device, dtype))

    budget = cfg.compute.gpu_memory_gib * 2**30 * FILL - OVERHEAD_BYTES
    resident, used = [], non_block_bytes(pcfg, cfg.parent.dtype)
    for i in range(n):
        size = parent_layer_bytes(pcfg, i, cfg.parent.dtype)
        if used + size <= budget:
            resident.append(i)
            used += size
    # the pod's host memory is shared by its ranks' caches
    parent = ParentLayers(parent_dir, pcfg, dtype, device, resident=resident,
                          host_cache_bytes=int(cfg.compute.host_memory_gib * 2**30) // dist.world())
    sk = parent.skeleton
    seqs = sequences(load_tokens(ctx.store, "validation"), cfg.data.seq_len)
    n_seq = min(len(seqs), max(1, math.ceil(cfg.score.tokens / cfg.data.seq_len)))
    seqs = seqs[:n_seq]
    sums = {c.key: {"kl": 0.0, "ce": 0.0, "cos": 0.0} for c in cands}
    parent_ce = 0.0
    sim = {layer: 0.0 for layer in range(a, b)}
    tokens = 0
    started = time.time()
    bar = tqdm(total=n_seq, desc=f"score {ctx.unit_id}", unit="seq", leave=False, disable=not dist.is_main())
    # no collective inside the loop (nothing is sharded), so a rank short of a batch just stops
    mine = [span for span, counted in dist.rank_batches(n_seq, cfg.score.batch_size) if counted]
    try:
        with torch.no_grad():
            for span in mine:
                ids = seqs[span].to(device)  # (B, T)
                h = sk.embed(ids)  # (B, T, C)
                rope = sk.attention_inputs(h)
                states: dict[tuple[int, str, str], torch.Tensor] = {}
                for j, layer in parent.layers(0, n):
                    for key, hs in list(states.items()):  # candidates past their own layer run layer j
                        states[key] = layer.ffn_sublayer(layer.attn_sublayer(hs, *rope))
                    for c in cands:
                        if c.layer == j:
                            states[c.key] = c.apply(layer, h, rope)
                    out = layer.ffn_sublayer(layer.attn_sublayer(h, *rope))
                    if a <= j < b:
                        sim[j] += F.cosine_similarity(h.float(), out.float(), dim=-1).sum().item()
                    h = out
                final = sk.model.norm(h)  # (B, T, C)
                logp = F.log_softmax(sk.lm_head(final).float(), dim=-1)  # (B, T, V)
                targets = ids[:, 1:]
                parent_ce += F.nll_loss(logp[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum").item()
                tokens += ids.numel()
                for key, hh in states.items():
                    cfinal = sk.model.norm(hh)
                    clogp = F.log_softmax(sk.lm_head(cfinal).float(), dim=-1)
                    acc = sums[key]
                    acc["kl"] += F.kl_div(clogp, logp, log_target=True, reduction="sum").item()
                    acc["ce"] += F.nll_loss(clogp[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum").item()
                    acc["cos"] += (1 - F.cosine_similarity(cfinal.float(), final.float(), dim=-1)).sum().item()
                bar.update(len(ids) * dist.world())
    finally:
        bar.close()
        parent.close()
    # every rank's sums, in one order (the candidates are built in the same order on every rank)
    keys = list(sums)
    flat = [v for k in keys for v in sums[k].values()] + [sim[j] for j in range(a, b)] + [parent_ce, tokens]
    flat = dist.all_reduce_sum(flat)
    for i, k in enumerate(keys):
        sums[k] = dict(zip(("kl", "ce", "cos"), flat[3 * i : 3 * i + 3], strict=True))
    sim = {j: flat[3 * len(keys) + i] for i, j in enumerate(range(a, b))}
    parent_ce, tokens = flat[-2], round(flat[-1])
    n_pred = tokens - n_seq  # next-token targets: T - 1 per sequence
    task_drop = _task_accuracy_drops(ctx, parent_dir, cands, dtype, device) if cfg.score.task_examples > 0 else {}
    if not dist.is_main():
        return
    seconds = time.time() - started
    coupled = cfg.bld.mode == "coupled"
    for layer in range(a, b):
        zero = {"kl": 0.0, "lm_loss_delta": 0.0, "cosine_distance": 0.0, "tokens": tokens, "parent": True,
                **({"task_accuracy_drop": 0.0} if task_drop else {})}
        if coupled:
            _write(ctx, layer, "block", coupled_name(*own[layer]), **zero)
        else:
            _write(ctx, layer, "attention", own[layer][0], **zero)
            _write(ctx, layer, "ffn", own[layer][1], **zero)
        ctx.store.put_json(layout.similarity_key(layer),
                           {"layer": layer, "cosine_similarity": sim[layer] / tokens, "tokens": tokens})
    for (layer, kind, name), acc in sums.items():
        _write(ctx, layer, kind, name, kl=acc["kl"] / tokens, lm_loss_delta=(acc["ce"] - parent_ce) / n_pred,
               cosine_distance=acc["cos"] / tokens, tokens=tokens, parent=False,
               **({"task_accuracy_drop": task_drop[(layer, kind, name)]} if task_drop else {}))
        ctx.metrics.set("score_kl", acc["kl"] / tokens, help="Replace-1-block KL divergence (nats/token)",
                        layer=str(layer), variant=name)
    ctx.metrics.set("score_seconds", seconds, help="Seconds spent scoring the unit")
    log.info("scored %d blocks on %d tokens in %.1fs (%d parent layers streamed per batch)", len(cands), tokens,
             seconds, n - len(resident))


def _task_accuracy_drops(ctx: StepContext, parent_dir, cands: list[Candidate], dtype, device) -> dict:
    """Parent task exact match minus the swapped model's, per (layer, kind, variant) (score.task_examples).
    Sharded: rank r takes candidates r, r + N, ...; rank 0 gets every drop (the others an empty dict)."""
    from puzzle.evaluation import task_accuracy
    from puzzle.generation import DeciTextGenerator

    parent = load_parent(parent_dir, dtype=dtype, device=device).eval()
    n, seed = ctx.config.score.task_examples, ctx.config.seed
    gen = DeciTextGenerator(parent, parent_dir, batch_size=ctx.config.score.batch_size)
    accuracy = {}
    with torch.no_grad():
        base = task_accuracy(gen, n, seed=seed)["accuracy"] if dist.is_main() else 0.0
        for c in cands[dist.rank()::dist.world()]:
            original = parent.model.layers[c.layer]
            swapped = DeciLayer(parent.config, BlockConfig(
                c.block.attention_variant if c.kind != "ffn" else original.attention_variant,
                c.block.ffn_variant if c.kind != "attention" else original.ffn_variant)).to(device, dtype)
            if c.kind != "ffn":
                swapped.input_layernorm, swapped.self_attn = c.block.input_layernorm, c.block.self_attn
            else:
                swapped.input_layernorm, swapped.self_attn = original.input_layernorm, original.self_attn
            if c.kind != "attention":
                swapped.post_attention_layernorm, swapped.mlp = c.block.post_attention_layernorm, c.block.mlp
            else:
                swapped.post_attention_layernorm, swapped.mlp = original.post_attention_layernorm, original.mlp
            parent.model.layers[c.layer] = swapped
            parent.current_config()  # the KV cache is sized from the config: it must match the swapped block
            accuracy[c.key] = task_accuracy(gen, n, seed=seed)["accuracy"]
            parent.model.layers[c.layer] = original
            parent.current_config()
    every = dist.gather_object(accuracy)
    if every is None:
        return {}
    return {key: base - acc for part in every for key, acc in part.items()}


def _write(ctx: StepContext, layer: int, kind: str, name: str, *, parent: bool, **figures) -> None:
    ctx.store.put_json(layout.score_key(layer, name),
                       {"layer": layer, "kind": kind, "variant": name, "parent_variant": parent, **figures})
