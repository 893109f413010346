"""Compositional-generalization datasets for the ICL benchmark: SCAN splits and a GeoQuery-like FunQL set.

``load_dataset("scan:template")`` or ``load_dataset("geo:compound")`` returns an
:class:`ICLDataset` of :class:`Item` (source utterance, target the model must emit, program tree).
The tiny parent trains on the ``train`` parts; the ICL benchmark draws demonstrations from
``train`` and queries from ``test``.

SCAN (``scan:simple|add_primitive|length|template``): the target is the action sequence (what the
tiny parent learns to emit), but an action sequence is flat and has no local structures. The
program tree is therefore the *command*-side semantic program, read off the grammar of
``puzzle.data.scan``: ``walk around right twice and jump`` -> ``and(twice(around(walk,right)),jump)``
(``and``/``after`` keep their surface argument order; ``dir(walk,left)`` is "walk left";
``turn`` is a primitive). This is the program the action sequence denotes, so Cover-LS covers
``around(_, right)``, which is exactly the compound the template split withholds. SCAN has no
values (its primitives are the atoms the splits test, so anonymizing them would hide what must
be covered). A predicted action sequence is parsed back into a program by inverting the
semantics over the whole grammar (:func:`scan_program_of_actions`); several commands denote the
same actions ("jump twice" / "jump and jump"), and the one with the fewest nodes is taken.

Geo (``geo:iid|template|compound``): the GeoQuery-like FunQL language of :mod:`puzzle.data.geo`
(questions about US geography with their programs, iid / template / compound splits); the target
*is* the program's text.

``ICLDataset.program_text`` maps a predicted target to the text of the program it stands for (geo:
the target itself, parsable or not; SCAN: the inverted program, or None) and ``parse_target`` to
its tree; ``target_atoms`` gives the atoms the paper mode's retriever reads off a predicted target
(geo: the program text's tokens, parsable or not; SCAN: the inverted program's, else the primitives
and directions the actions name).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from puzzle.data import scan
from puzzle.data.geo import SPLITS as GEO_SPLITS
from puzzle.data.geo import geo_items, geo_split
from puzzle.data.programs import Item, Tree, parse_program
from puzzle.icl.structures import program_atoms

__all__ = [
    "DATASETS",
    "GEO_SPLITS",
    "ICLDataset",
    "Item",
    "geo_items",
    "geo_split",
    "load_dataset",
    "parse_geo_target",
    "scan_atoms_of_actions",
    "scan_item",
    "scan_program",
    "scan_program_of_actions",
    "scan_program_text_of_actions",
]


@dataclass(frozen=True)
class ICLDataset:
    """Train (demonstration pool) and test (queries) of one dataset:split.

    ``parse_target`` maps a (predicted) target string to its program tree, or None when it is
    not a program of this dataset; ``program_text`` maps it to the text of its program (None where
    the dataset's targets are not programs and the target denotes none). Predicted local structures
    come from them.
    """

    train: list[Item]
    test: list[Item]
    name: str = ""
    parse_target: Callable[[str], Tree | None] = field(default=lambda s: None, repr=False, compare=False)
    program_text: Callable[[str], str | None] = field(default=lambda s: None, repr=False, compare=False)
    target_atoms: Callable[[str], list[str]] = field(default=lambda s: [], repr=False, compare=False)


DATASETS = ("scan", "geo")


def load_dataset(name: str, seed: int = 0) -> ICLDataset:
    """``"scan:<split>"`` or ``"geo:<split>"``; raises ValueError naming the allowed values."""
    family, sep, split_name = name.partition(":")
    if not sep or family not in DATASETS:
        raise ValueError(
            f"dataset {name!r} is unknown; use 'scan:<split>' ({', '.join(scan.SPLITS)}) "
            f"or 'geo:<split>' ({', '.join(GEO_SPLITS)})"
        )
    if family == "scan":
        if split_name not in scan.SPLITS:
            raise ValueError(
                f"dataset {name!r}: SCAN split {split_name!r} is unknown; allowed: {', '.join(scan.SPLITS)}"
            )
        train, test = scan.split(split_name, seed)
        return ICLDataset(
            [scan_item(e) for e in train],
            [scan_item(e) for e in test],
            name,
            parse_target=scan_program_of_actions,
            program_text=scan_program_text_of_actions,
            target_atoms=scan_atoms_of_actions,
        )
    if split_name not in GEO_SPLITS:
        raise ValueError(
            f"dataset {name!r}: geo split {split_name!r} is unknown; allowed: {', '.join(GEO_SPLITS)}"
        )
    train, test = geo_split(split_name, seed)
    return ICLDataset(train, test, name, parse_target=parse_geo_target, program_text=lambda t: t,
                      target_atoms=program_atoms)


# ----------------------------------------------------------------------------------------- SCAN


def scan_program(command: str) -> Tree:
    """Semantic program of a SCAN command (ValueError outside the grammar)."""
    words = command.split()
    for conj in ("and", "after"):
        if conj in words:
            i = words.index(conj)
            return Tree(conj, (_scan_s(words[:i], command), _scan_s(words[i + 1 :], command)))
    return _scan_s(words, command)


def _scan_s(words: list[str], command: str) -> Tree:
    if words and words[-1] in ("twice", "thrice"):
        return Tree(words[-1], (_scan_v(words[:-1], command),))
    return _scan_v(words, command)


def _scan_v(words: list[str], command: str) -> Tree:
    verbs = (*scan.PRIMITIVES, "turn")
    if len(words) == 1 and words[0] in scan.PRIMITIVES:
        return Tree(words[0])
    if len(words) == 2 and words[0] in verbs and words[1] in scan.DIRECTIONS:
        return Tree("dir", (Tree(words[0]), Tree(words[1])))
    if (
        len(words) == 3
        and words[0] in verbs
        and words[1] in ("opposite", "around")
        and words[2] in scan.DIRECTIONS
    ):
        return Tree(words[1], (Tree(words[0]), Tree(words[2])))
    raise ValueError(f"SCAN command {command!r}: phrase {' '.join(words)!r} is outside the grammar")


def scan_item(e: scan.Example) -> Item:
    return Item(e.command, e.actions, scan_program(e.command))


@functools.lru_cache(maxsize=1)
def _actions_to_program() -> dict[str, Tree]:
    best: dict[str, Tree] = {}
    for e in scan.all_examples():
        p = scan_program(e.command)
        cur = best.get(e.actions)
        # Fewest nodes wins; ties keep the grammar's enumeration order, so the choice is fixed.
        if cur is None or p.size() < cur.size():
            best[e.actions] = p
    return best


def scan_program_of_actions(actions: str) -> Tree | None:
    """The smallest SCAN program denoting ``actions``, or None when no command does."""
    return _actions_to_program().get(" ".join(actions.split()))


def scan_program_text_of_actions(actions: str) -> str | None:
    """The text of :func:`scan_program_of_actions`, or None."""
    tree = scan_program_of_actions(actions)
    return None if tree is None else str(tree)


_PRIMITIVE_OF_ACTION = {**{a: p for p, a in scan.ACTION.items()}, "I_TURN_LEFT": "left", "I_TURN_RIGHT": "right"}


def scan_atoms_of_actions(actions: str) -> list[str]:
    """The atoms a predicted action sequence stands for: its program's where it has one, else the
    primitives and directions its actions name (``I_TURN_LEFT I_JUMP`` -> ``jump``, ``left``), so an
    answer no command denotes still tells the retriever something, as an unparsable program's text does."""
    text = scan_program_text_of_actions(actions)
    if text is not None:
        return program_atoms(text)
    return sorted({_PRIMITIVE_OF_ACTION[a] for a in actions.split() if a in _PRIMITIVE_OF_ACTION})


# ------------------------------------------------------------------------------------------ Geo

def parse_geo_target(target: str) -> Tree | None:
    """The FunQL tree of a predicted target, or None when it does not parse."""
    try:
        return parse_program(target)
    except ValueError:
        return None


