"""The one prompt format shared by the tiny parent's training text and every task evaluation.

A demonstration is two lines, ``source: ...`` and ``target: ...``; demonstrations are separated
by a blank line; the query ends with ``target:`` and the model's answer runs to the end of line.
"""

from __future__ import annotations

from collections.abc import Sequence

SEPARATOR = "\n\n"


def format_example(source: str, target: str) -> str:
    return f"source: {source}\ntarget: {target}"


def format_prompt(demonstrations: Sequence[tuple[str, str]], query: str) -> str:
    """Demonstrations (in the given order, most similar last) then the query awaiting its target."""
    parts = [format_example(s, t) for s, t in demonstrations]
    parts.append(f"source: {query}\ntarget:")
    return SEPARATOR.join(parts)


def parse_answer(generated: str) -> str:
    """The model's target: the text up to the first newline, whitespace-normalized."""
    return " ".join(generated.split("\n", 1)[0].split())


def exact_match(prediction: str, gold: str) -> bool:
    return " ".join(prediction.split()) == " ".join(gold.split())
