"""A GeoQuery-like FunQL language: questions about US geography with their programs, and its splits.

"how many rivers in states bordering texas" -> ``answer(count(river(loc_2(state(next_to_2(stateid('texas')))))))``,
enumerated from a synchronous grammar up to nesting depth 2 (:func:`geo_items`). It is synthetic (the
original GeoQuery data is not downloadable here) but uses GeoQuery's predicate names and composition
(Zelle & Mooney 1996; FunQL of Kate et al. 2005). Splits (:func:`geo_split`): ``iid`` random 80/20;
``template`` (Finegan-Dollak et al. 2018) holds out 20% of anonymized programs; ``compound`` (TMCD-like,
Keysers et al. 2020) holds out parent->child symbol pairs so every test program contains a compound never
seen in training while all its atoms are. All generation is deterministic in the seed and takes well under
a second.

It lives in :mod:`puzzle.data` beside SCAN because both the tiny parent's training text
(:mod:`puzzle.data.corpus`) and the ICL benchmark (:mod:`puzzle.icl.datasets`) read it.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

from puzzle.data.programs import Item, Tree, anonymize

SPLITS = ("iid", "template", "compound")

STATES = ("texas", "ohio", "utah", "oregon", "maine", "kansas")
CITIES = ("austin", "boston", "denver", "seattle")
RIVERS = ("mississippi", "colorado", "red")
# type -> (singular, plural, superlatives)
TYPES = {
    "state": ("state", "states", ("largest", "smallest")),
    "city": ("city", "cities", ("largest", "smallest")),
    "river": ("river", "rivers", ("longest", "shortest")),
    "lake": ("lake", "lakes", ("largest",)),
    "mountain": ("mountain", "mountains", ("highest",)),
}
_ENTITY = {"state": ("stateid", STATES), "city": ("cityid", CITIES), "river": ("riverid", RIVERS)}
MAX_DEPTH = 2


@dataclass(frozen=True)
class _NP:
    tree: Tree
    text: str  # as an argument ("texas", "states bordering texas", "the largest state")
    sg: str = ""  # singular head for a set ("state bordering texas"); "" for non-sets


def _entities(t: str) -> list[_NP]:
    if t not in _ENTITY:
        return []
    pred, names = _ENTITY[t]
    suffix = " river" if t == "river" else ""
    return [_NP(Tree(pred, (Tree(n, (), True),)), f"the {n}{suffix}" if suffix else n) for n in names]


def _filters(t: str) -> list[tuple[str, str, str]]:
    """(predicate, argument type, phrase with {} for the argument) restricting a set of type t."""
    out = []
    if t != "state":
        out.append(("loc_2", "state", "in {}"))
    if t == "state":
        out += [
            ("next_to_2", "state", "bordering {}"),
            ("traverse_1", "river", "crossed by {}"),
            ("loc_1", "city", "containing {}"),
        ]
    if t == "river":
        out.append(("traverse_2", "state", "crossing {}"))
    return out


@functools.cache
def _sets(t: str, depth: int) -> tuple[_NP, ...]:
    """Sets of type t with at most ``depth`` nested filters."""
    sg, pl, _ = TYPES[t]
    out = [_NP(Tree(t, (Tree("all"),)), pl, sg)]
    if depth > 0:
        for pred, arg_t, phrase in _filters(t):
            for a in _args(arg_t, depth - 1):
                rest = phrase.format(a.text)
                out.append(_NP(Tree(t, (Tree(pred, (a.tree,)),)), f"{pl} {rest}", f"{sg} {rest}"))
    return tuple(out)


@functools.cache
def _args(t: str, depth: int) -> tuple[_NP, ...]:
    """Noun phrases of type t usable as an argument: entities, sets and superlatives of sets."""
    out = list(_entities(t))
    sets = _sets(t, depth)
    out += [_NP(s.tree, s.text) for s in sets]
    for sup in TYPES[t][2]:
        out += [_NP(Tree(sup, (s.tree,)), f"the {sup} {s.sg}") for s in sets]
    return tuple(out)


@functools.lru_cache(maxsize=1)
def geo_items() -> tuple[Item, ...]:
    """Every question of the grammar with its FunQL program, in a fixed order."""
    qs: list[tuple[str, Tree]] = []
    for t in TYPES:
        for s in _sets(t, MAX_DEPTH):
            qs.append((f"what are the {s.text}", Tree("answer", (s.tree,))))
            qs.append((f"how many {s.text}", Tree("answer", (Tree("count", (s.tree,)),))))
            for sup in TYPES[t][2]:
                qs.append((f"what is the {sup} {s.sg}", Tree("answer", (Tree(sup, (s.tree,)),))))
    for t, attrs in (("state", ("population_1", "area_1")), ("city", ("population_1",))):
        for a in _args(t, MAX_DEPTH - 1):
            for attr in attrs:
                word = attr.removesuffix("_1")
                qs.append((f"what is the {word} of {a.text}", Tree("answer", (Tree(attr, (a.tree,)),))))
    for a in _args("state", MAX_DEPTH - 1):
        qs.append(
            (
                f"what is the capital of {a.text}",
                Tree("answer", (Tree("capital", (Tree("loc_2", (a.tree,)),)),)),
            )
        )
    seen: set[str] = set()
    out = []
    for text, tree in qs:
        if text in seen:
            continue
        seen.add(text)
        out.append(Item(text, str(tree), tree))
    return tuple(out)


def compounds(tree: Tree) -> set[tuple[str, str]]:
    """Parent->child symbol pairs of the anonymized program (the TMCD sense of a compound)."""
    a = anonymize(tree)
    return {(n.label, c.label) for n in a.nodes() for c in n.children if not c.is_value}


def atoms(tree: Tree) -> set[str]:
    return {n.label for n in anonymize(tree).nodes()}


def geo_split(name: str, seed: int = 0, test_fraction: float = 0.2) -> tuple[list[Item], list[Item]]:
    """(train, test) of a geo split, deterministic in seed."""
    pool = list(geo_items())
    rng = random.Random(seed)
    if name == "iid":
        idx = list(range(len(pool)))
        rng.shuffle(idx)
        cut = int((1 - test_fraction) * len(idx))
        return [pool[i] for i in sorted(idx[:cut])], [pool[i] for i in sorted(idx[cut:])]
    if name == "template":
        held = _held_out_templates(pool, rng, test_fraction)
        test = [it for it in pool if str(anonymize(it.program_tree)) in held]
        train = [it for it in pool if str(anonymize(it.program_tree)) not in held]
        return train, test
    if name == "compound":
        return _compound_split(pool, rng, test_fraction)
    raise ValueError(f"geo split {name!r} is unknown; allowed: {', '.join(SPLITS)}")


def _held_out_templates(pool: list[Item], rng: random.Random, test_fraction: float) -> set[str]:
    """A seeded ``test_fraction`` of the templates, skipping any whose removal would take an atom
    out of training (the split tests new combinations, not unseen symbols)."""
    atoms_of = {str(anonymize(it.program_tree)): atoms(it.program_tree) for it in pool}
    templates = sorted(atoms_of)
    rng.shuffle(templates)
    count: dict[str, int] = {}
    for t in templates:
        for a in atoms_of[t]:
            count[a] = count.get(a, 0) + 1
    held: set[str] = set()
    for t in templates:
        if len(held) >= int(test_fraction * len(templates)):
            break
        if all(count[a] > 1 for a in atoms_of[t]):
            held.add(t)
            for a in atoms_of[t]:
                count[a] -= 1
    return held


def _compound_split(
    pool: list[Item], rng: random.Random, test_fraction: float
) -> tuple[list[Item], list[Item]]:
    comps = [compounds(it.program_tree) for it in pool]
    at = [atoms(it.program_tree) for it in pool]
    # The root answer(...) edge and edges into 'all' occur in nearly every program; holding one out
    # would empty the training set, so candidates are the other compounds.
    candidates = sorted({c for cs in comps for c in cs if c[0] != "answer" and c[1] != "all"})
    rng.shuffle(candidates)
    held: set[tuple[str, str]] = set()
    is_test = [False] * len(pool)
    for c in candidates:
        if sum(is_test) >= test_fraction * len(pool):
            break
        trial = [t or (c in comps[i]) for i, t in enumerate(is_test)]
        # Keep the split compositional: every atom of a test program must still occur in train.
        train_atoms = set().union(*(at[i] for i, t in enumerate(trial) if not t))
        test_atoms = set().union(*(at[i] for i, t in enumerate(trial) if t))
        if not test_atoms <= train_atoms or sum(trial) > 2 * test_fraction * len(pool):
            continue
        held.add(c)
        is_test = trial
    return [it for it, t in zip(pool, is_test) if not t], [it for it, t in zip(pool, is_test) if t]


def funql_split(split: str = "compound", seed: int = 0) -> tuple[list[Item], list[Item]]:
    """(train, test) of the FunQL (geo) language, the entry point the training corpus looks for.

    ``"compositional"`` names the compound (TMCD-like) split, the geo split whose test programs
    are compositional by construction.
    """
    return geo_split("compound" if split == "compositional" else split, seed)
