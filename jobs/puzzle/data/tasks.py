"""The tiny task's evaluation: in-context SCAN exact match on held-out commands.

Items are built exactly like the training episodes of :mod:`puzzle.data.corpus` (k demonstrations
from the train partition, those sharing a bigram with the query last), but their queries are
held out: ``part="valid"`` takes unseen commands of the training distribution, ``part="test"``
the split's compositional test part (for ``template``: every command with ``around right``).

``evaluate_exact_match(generate_fn, items)`` scores any generator; ``hf_generate_fn`` wraps a
transformers model + tokenizer as one (greedy, batched, stops at the end of the answer line).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from puzzle.data import corpus
from puzzle.data.prompts import exact_match, format_prompt, parse_answer

GenerateFn = Callable[[list[str]], list[str]]
# The longest SCAN target is 48 actions, one token each, plus the newline that ends it.
MAX_NEW_TOKENS = 56


@dataclass(frozen=True)
class TaskItem:
    """One evaluation episode: demonstrations (source, target), the query and its gold target."""

    demonstrations: tuple[tuple[str, str], ...]
    query: str
    gold: str

    @property
    def prompt(self) -> str:
        return format_prompt(self.demonstrations, self.query)


def scan_task_examples(
    n: int, seed: int = 0, split: str = "template", part: str = "valid", num_demonstrations: int | None = None
) -> list[TaskItem]:
    """``n`` distinct held-out SCAN queries of ``split``/``part`` with demonstrations from train.

    ``num_demonstrations`` fixes k; None draws it per item as training does. Deterministic in seed.
    """
    if part not in ("valid", "test"):
        raise ValueError(f"part {part!r} is not allowed; allowed: valid (held-out train distribution), test")
    if n < 1:
        raise ValueError(f"n: value {n} is not allowed; must be >= 1")
    if num_demonstrations is not None and not 1 <= num_demonstrations <= 64:
        raise ValueError(f"num_demonstrations: value {num_demonstrations} is not allowed; must be in [1, 64]")
    partition = corpus.scan_partition(split)
    queries = partition.part(part)
    if n > len(queries):
        raise ValueError(f"n: value {n} is not allowed; scan:{split} {part} has only {len(queries)} queries")
    rng = random.Random(f"tasks:{seed}:{split}:{part}")
    sampler = corpus.DemonstrationSampler(partition.train)
    items = []
    for q in rng.sample(queries, n):
        demos = sampler.demonstrations(q.source, rng, num_demonstrations)
        items.append(TaskItem(tuple((d.source, d.target) for d in demos), q.source, q.target))
    return items


def evaluate_exact_match(generate_fn: GenerateFn, items: Sequence[TaskItem], batch_size: int = 16) -> dict:
    """Exact match of ``generate_fn``'s continuations (parsed up to the first newline) on ``items``.

    Returns ``accuracy``, ``n``, ``correct`` and up to five ``errors`` (query, gold, prediction).
    """
    if not items:
        raise ValueError("items: empty; exact match needs at least one item")
    correct = 0
    errors = []
    for i in range(0, len(items), batch_size):
        batch = items[i : i + batch_size]
        outputs = generate_fn([it.prompt for it in batch])
        if len(outputs) != len(batch):
            raise ValueError(f"generate_fn returned {len(outputs)} continuations for {len(batch)} prompts")
        for it, out in zip(batch, outputs, strict=True):
            pred = parse_answer(out)
            if exact_match(pred, it.gold):
                correct += 1
            elif len(errors) < 5:
                errors.append({"query": it.query, "gold": it.gold, "prediction": pred})
    return {"accuracy": correct / len(items), "n": len(items), "correct": correct, "errors": errors}


def hf_generate_fn(model, tokenizer, max_new_tokens: int = MAX_NEW_TOKENS) -> GenerateFn:
    """Greedy batched generation with transformers' ``generate``, stopping at the answer's newline.

    Prompts are left-padded so every continuation starts right after its own prompt; generation
    stops per sequence at the first token containing a newline (or at eos).
    """
    import torch

    newline_ids = sorted({i for t, i in tokenizer.get_vocab().items() if "Ċ" in t or "\n" in t})
    stop = [tokenizer.eos_token_id, *newline_ids]
    device = next(model.parameters()).device

    def generate(prompts: list[str]) -> list[str]:
        tokenizer.padding_side = "left"
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        with torch.no_grad():
            out = model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=stop,
                pad_token_id=tokenizer.pad_token_id,
            )  # (B, T_prompt + T_new)
        new = out[:, enc["input_ids"].shape[1] :]
        return tokenizer.batch_decode(new, skip_special_tokens=True)

    return generate
