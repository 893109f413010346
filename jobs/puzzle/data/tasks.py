"""The tiny task's evaluation: in-context SCAN exact match on held-out commands.

Items are built exactly like the training episodes of :mod:`puzzle.data.corpus` (k demonstrations
from the train partition, those sharing a bigram with the query last), but their queries are
held out: ``part="valid"`` takes unseen commands of the training distribution, ``part="test"``
the split's compositional test part (for ``template``: every command with ``around right``).

``evaluate_exact_match(generator, items)`` scores any :class:`puzzle.generation.TextGenerator` (greedy;
the generator stops at the end of the answer line), the one generation interface of the project.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from puzzle.data import corpus
from puzzle.data.prompts import exact_match, format_prompt, parse_answer
from puzzle.generation import TextGenerator

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


def evaluate_exact_match(
    generator: TextGenerator, items: Sequence[TaskItem], batch_size: int = 16, max_new_tokens: int = MAX_NEW_TOKENS
) -> dict:
    """Exact match of ``generator``'s greedy continuations (parsed up to the first newline) on ``items``.

    Returns ``accuracy``, ``n``, ``correct`` and up to five ``errors`` (query, gold, prediction).
    """
    if not items:
        raise ValueError("items: empty; exact match needs at least one item")
    correct = 0
    errors = []
    for i in range(0, len(items), batch_size):
        batch = items[i : i + batch_size]
        outputs = generator.generate([it.prompt for it in batch], max_new_tokens)
        if len(outputs) != len(batch):
            raise ValueError(f"the generator returned {len(outputs)} continuations for {len(batch)} prompts")
        for it, out in zip(batch, outputs, strict=True):
            pred = parse_answer(out[0])
            if exact_match(pred, it.gold):
                correct += 1
            elif len(errors) < 5:
                errors.append({"query": it.query, "gold": it.gold, "prediction": pred})
    return {"accuracy": correct / len(items), "n": len(items), "correct": correct, "errors": errors}
