"""score: replace_one_block_scores — what each library block costs in quality, one layer range per unit.

For every layer of the unit's range and every variant of the search space, the parent with that one
block swapped for the library block is compared with the parent on held-out tokens: KL divergence of
next-token distributions (``kl``, the default degradation), LM-loss increase (``lm_loss``), cosine
distance of the final hidden states (``cosine``). Memory stays bounded: per batch the parent runs once,
the hidden states entering each layer of the range are kept, and each swapped model only reruns from
its layer on. The unit also records how similar each layer's input and output hidden states are
(``scores/similarity/<layer>.json``), which the layer-dropping baseline uses.

Writes ``scores/<layer>/<variant>.json``; the parent's own variants score 0 by definition.
"""

from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from puzzle.context import StepContext, UnitError
from puzzle.data.shards import load_tokens, sequences
from puzzle.library import Library, parse_variants
from puzzle.model import AttentionVariant, DeciLMForCausalLM, load_parent
from puzzle.model.io import torch_dtype

log = logging.getLogger(__name__)


def _candidates(ctx: StepContext, n_layers: int) -> list[tuple[str, str]]:
    """(kind, variant name) pairs scored at every layer: every non-parent variant of the plan."""
    variants = ctx.store.get_json("plan/variants.json")
    if ctx.config.bld.mode == "coupled":
        return [("block", f"{a}+{f}") for a in variants["attention"] for f in variants["ffn"]]
    return [("attention", v) for v in variants["attention"]] + [("ffn", v) for v in variants["ffn"]]


def _swap(model: DeciLMForCausalLM, layer: int, state: dict) -> None:
    lyr = model.model.layers[layer]
    lyr.input_layernorm, lyr.self_attn = state["attention"]
    lyr.post_attention_layernorm, lyr.mlp = state["ffn"]


def _state(model: DeciLMForCausalLM, layer: int) -> dict:
    lyr = model.model.layers[layer]
    return {"attention": (lyr.input_layernorm, lyr.self_attn), "ffn": (lyr.post_attention_layernorm, lyr.mlp)}


def run(ctx: StepContext) -> None:
    cfg = ctx.config
    a, b = ctx.unit.get("layers", [None, None])
    device = ctx.device()
    dtype = torch_dtype(cfg.parent.dtype)
    parent = load_parent(ctx.parent_dir(), dtype=dtype, device=device).eval()
    n = len(parent.model.layers)
    if not (isinstance(a, int) and isinstance(b, int) and 0 <= a < b <= n):
        raise UnitError(f"layers: {ctx.unit.get('layers')!r} is not allowed; need [a, b] with 0 <= a < b <= {n}")
    lib = Library.for_run(ctx)
    parent_names = {i: (lyr.attention_variant.name, lyr.ffn_variant.name) for i, lyr in enumerate(parent.model.layers)}

    # Build every (layer, variant) block once; scoring swaps module references, never copies weights.
    blocks: dict[tuple[int, str, str], dict] = {}
    for layer in range(a, b):
        original = _state(parent, layer)
        for kind, name in _candidates(ctx, n):
            parts = parse_variants(name, parent.config.hidden_size)
            is_parent = all(
                p.name == parent_names[layer][0 if isinstance(p, AttentionVariant) else 1] for p in parts
            )
            if is_parent:
                continue
            noop_only = all(p.no_op for p in parts)
            if not noop_only and not lib.has(layer, name):
                raise UnitError(f"library {lib.uri} has no block for layer {layer}, variant {name!r}; run bld first")
            if noop_only:
                for p in parts:
                    if isinstance(p, AttentionVariant):
                        parent.set_attention(layer, p, None)
                    else:
                        parent.set_ffn(layer, p, None)
            else:
                lib.apply(parent, layer, name)
            blocks[(layer, kind, name)] = _state(parent, layer)
            _swap(parent, layer, original)
        parent.current_config()

    seqs = sequences(load_tokens(ctx.store, "data/validation"), cfg.data.seq_len)
    n_seq = min(len(seqs), max(1, math.ceil(cfg.score.tokens / cfg.data.seq_len)))
    seqs = seqs[:n_seq]
    sums = {key: {"kl": 0.0, "ce": 0.0, "cos": 0.0} for key in blocks}
    parent_ce = 0.0
    sim = {layer: 0.0 for layer in range(a, b)}
    tokens = 0
    started = time.time()
    bar = tqdm(total=n_seq, desc=f"score {ctx.unit_id}", unit="seq", leave=False)
    with torch.no_grad():
        for s in range(0, n_seq, cfg.score.batch_size):
            ids = seqs[s : s + cfg.score.batch_size].to(device)  # (B, T)
            h = parent.run_layers(parent.embed(ids), 0, a)
            entering = {}
            for layer in range(a, b):
                entering[layer] = h
                out = parent.run_layers(h, layer, layer + 1)
                sim[layer] += F.cosine_similarity(h.float(), out.float(), dim=-1).sum().item()
                h = out
            final = parent.model.norm(parent.run_layers(h, b, n))  # (B, T, C)
            logp = F.log_softmax(parent.lm_head(final).float(), dim=-1)  # (B, T, V)
            targets = ids[:, 1:]
            parent_ce += F.nll_loss(logp[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum").item()
            n_tok = ids.numel()
            tokens += n_tok
            for (layer, kind, name), state in blocks.items():
                original = _state(parent, layer)
                _swap(parent, layer, state)
                hh = parent.run_layers(entering[layer], layer, n)
                _swap(parent, layer, original)
                cfinal = parent.model.norm(hh)
                clogp = F.log_softmax(parent.lm_head(cfinal).float(), dim=-1)
                acc = sums[(layer, kind, name)]
                acc["kl"] += F.kl_div(clogp, logp, log_target=True, reduction="sum").item()
                acc["ce"] += F.nll_loss(clogp[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum").item()
                acc["cos"] += (1 - F.cosine_similarity(cfinal.float(), final.float(), dim=-1)).sum().item()
            bar.update(len(ids))
    bar.close()
    n_pred = tokens - n_seq  # next-token targets: T - 1 per sequence
    task_drop = _task_accuracy_drops(ctx, parent, blocks) if cfg.score.task_examples > 0 else {}
    seconds = time.time() - started
    for layer in range(a, b):
        for kind, names in (("attention", [parent_names[layer][0]]), ("ffn", [parent_names[layer][1]])):
            if cfg.bld.mode == "coupled":
                continue
            for name in names:
                _write(ctx, layer, kind, name, kl=0.0, lm_loss_delta=0.0, cosine_distance=0.0, tokens=tokens,
                       parent=True, **({"task_accuracy_drop": 0.0} if task_drop else {}))
        if cfg.bld.mode == "coupled":
            _write(ctx, layer, "block", "+".join(parent_names[layer]), kl=0.0, lm_loss_delta=0.0,
                   cosine_distance=0.0, tokens=tokens, parent=True,
                   **({"task_accuracy_drop": 0.0} if task_drop else {}))
        ctx.store.put_json(f"scores/similarity/{layer:03d}.json",
                           {"layer": layer, "cosine_similarity": sim[layer] / tokens, "tokens": tokens})
    for (layer, kind, name), acc in sums.items():
        _write(ctx, layer, kind, name, kl=acc["kl"] / tokens, lm_loss_delta=(acc["ce"] - parent_ce) / n_pred,
               cosine_distance=acc["cos"] / tokens, tokens=tokens, parent=False,
               **({"task_accuracy_drop": task_drop[(layer, kind, name)]} if task_drop else {}))
        ctx.metrics.set("score_kl", acc["kl"] / tokens, help="Replace-1-block KL divergence (nats/token)",
                        layer=str(layer), variant=name)
    ctx.metrics.set("score_seconds", seconds, help="Seconds spent scoring the unit")
    log.info("scored %d blocks on %d tokens in %.1fs", len(blocks), tokens, seconds)


def _task_accuracy_drops(ctx: StepContext, parent: DeciLMForCausalLM, blocks: dict) -> dict:
    """Parent task exact match minus the swapped model's, per (layer, kind, variant) (score.task_examples)."""
    from puzzle.evaluation import task_accuracy
    from puzzle.generation import DeciTextGenerator

    n, seed = ctx.config.score.task_examples, ctx.config.seed
    gen = DeciTextGenerator(parent, ctx.parent_dir(), batch_size=ctx.config.score.batch_size)
    with torch.no_grad():
        base = task_accuracy(gen, n, seed=seed)["accuracy"]
        drops = {}
        for key, state in blocks.items():
            layer = key[0]
            original = _state(parent, layer)
            _swap(parent, layer, state)
            parent.current_config()  # the KV cache is sized from the config: it must match the swapped block
            drops[key] = base - task_accuracy(gen, n, seed=seed)["accuracy"]
            _swap(parent, layer, original)
            parent.current_config()
    return drops


def _write(ctx: StepContext, layer: int, kind: str, name: str, *, parent: bool, **figures) -> None:
    ctx.store.put_json(f"scores/{layer:03d}/{name}.json",
                       {"layer": layer, "kind": kind, "variant": name, "parent_variant": parent, **figures})
