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

Geo (``geo:iid|template|compound``): questions about US geography with FunQL programs in the style
of GeoQuery (Zelle & Mooney 1996; FunQL of Kate et al. 2005), e.g. "how many rivers in states
bordering texas" -> ``answer(count(river(loc_2(state(next_to_2(stateid('texas')))))))``,
enumerated from the synchronous grammar below up to nesting depth 2. It is synthetic (the
original GeoQuery data is not downloadable here) but uses GeoQuery's predicate names and
composition. Splits: ``iid`` random 80/20; ``template`` (Finegan-Dollak et al. 2018) holds out
20% of anonymized programs; ``compound`` (TMCD-like, Keysers et al. 2020) holds out
parent->child symbol pairs so every test program contains a compound never seen in training
while all its atoms are. All generation is deterministic in the seed and takes well under a
second.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from puzzle.data import scan
from puzzle.icl.structures import Tree, anonymize, parse_program


@dataclass(frozen=True)
class Item:
    """One example: ``source`` utterance, ``target`` the model must produce, ``program_tree``."""

    source: str
    target: str
    program_tree: Tree


@dataclass(frozen=True)
class ICLDataset:
    """Train (demonstration pool) and test (queries) of one dataset:split.

    ``parse_target`` maps a (predicted) target string to its program tree, or None when it is
    not a program of this dataset; predicted local structures come from it.
    """

    train: list[Item]
    test: list[Item]
    name: str = ""
    parse_target: Callable[[str], Tree | None] = field(default=lambda s: None, repr=False, compare=False)


DATASETS = ("scan", "geo")
GEO_SPLITS = ("iid", "template", "compound")


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
        )
    if split_name not in GEO_SPLITS:
        raise ValueError(
            f"dataset {name!r}: geo split {split_name!r} is unknown; allowed: {', '.join(GEO_SPLITS)}"
        )
    train, test = geo_split(split_name, seed)
    return ICLDataset(train, test, name, parse_target=parse_geo_target)


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


# ------------------------------------------------------------------------------------------ Geo

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


def parse_geo_target(target: str) -> Tree | None:
    """The FunQL tree of a predicted target, or None when it does not parse."""
    try:
        return parse_program(target)
    except ValueError:
        return None


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
    raise ValueError(f"geo split {name!r} is unknown; allowed: {', '.join(GEO_SPLITS)}")


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
