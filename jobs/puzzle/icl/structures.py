"""Local structures of programs (Levy, Bogin & Berant, ACL 2023, Sec. 3), in the benchmark's two modes.

Cover-LS chooses demonstrations that together cover the *local structures* of the test program.
Programs are trees (:class:`puzzle.data.programs.Tree`); a value leaf is written quoted (``'texas'``).

**paper** (:func:`local_structures`, the default; the authors' definition, n = 30 without finetuning).
The tree gets a root ``<s>`` above its top symbol. For a node v whose ancestors are a_1 = ``<s>``, ...,
a_d (its parent) and whose left siblings are l_1, ..., l_p (the top symbols of the arguments before v,
in order), every choice of the j nearest ancestors and the m nearest left siblings with j + m >= 1 and
j + m + 1 <= n gives the local structure (a_{d-j+1}, ..., a_d, l_{p-m+1}, ..., l_p, v), of size
j + m + 1, written ``p:`` ancestor, ``s:`` sibling, ``c:`` the node. There is no branching and no argument
slot. The structures of size 1 are the program's *atoms* (:func:`program_atoms`): its symbols and
values as written, read off the text, so a predicted program that does not parse still has atoms.
Worked example, ``around(walk,right)`` with n = 3::

    atoms:  around  walk  right
    size 2: p:<s> c:around   p:around c:walk   p:around c:right   s:walk c:right
    size 3: p:<s> p:around c:walk   p:<s> p:around c:right   p:around s:walk c:right

The chain is always the *nearest* ancestors, so ``p:<s> s:walk c:right`` (skipping the parent) is none.

A predicted program is first repaired (:func:`repair_parentheses`) as the authors do: a trailing ``.``
is dropped, missing ``)`` are appended, surplus trailing ``)`` are removed.

**fragments** (:func:`fragment_structures`, this project's earlier variant). The program graph has
parent -> child edges and sibling edges between consecutive arguments; a local structure is a
connected sub-graph of at most ``max_size`` nodes, where a sibling edge may join only nodes that are
leaves of the sub-graph. Every such structure is either a tree fragment written with ``_`` for
arguments not in it (``around(_, right)``, ``loc_2(stateid)``, ``walk``) or a run of consecutive sibling
leaves whose parent is outside it (``walk ~ right``). Values are anonymized to ``<v>`` on both sides.
"""

from __future__ import annotations

import functools
import itertools
import re
from typing import NamedTuple

from puzzle.data.programs import VALUE, Tree, anonymize, parse_program

__all__ = [
    "ROOT",
    "VALUE",
    "Structure",
    "Tree",
    "anonymize",
    "fragment_structures",
    "local_structures",
    "parse_program",
    "program_atoms",
    "repair_parentheses",
    "symbol",
]

ROOT = "<s>"

# A quoted value (to its closing quote, or to the end of a truncated text), a parenthesis or comma, or a
# run of anything else that is not blank: the program's text split the way the authors split it.
_ATOM_TOKEN = re.compile(r"'[^']*(?:'|$)|[(),]|[^\s(),']+")


class Structure(NamedTuple):
    """A local structure: its size (nodes) and its canonical text."""

    size: int
    text: str


def symbol(t: Tree) -> str:
    """A node as the program's text writes it: values quoted."""
    return f"'{t.label}'" if t.is_value else t.label


def program_atoms(text: str) -> list[str]:
    """The atoms of a program's text, sorted and distinct: every token but parentheses and commas.

    ``"answer(count(river(loc_2(stateid('texas')))))"`` -> ``["'texas'", 'answer', 'count', 'loc_2',
    'river', 'stateid']``; ``"answer(count("`` (does not parse) -> ``['answer', 'count']``.
    """
    return sorted({t for t in _ATOM_TOKEN.findall(text) if t not in "(),"})


def repair_parentheses(text: str) -> str:
    """The authors' repair of a predicted program: drop a trailing ``.``, then append the ``)`` that are
    missing or remove surplus ``)`` from the end (a surplus elsewhere is left, and the text won't parse)."""
    text = text.strip().removesuffix(".")
    missing = text.count("(") - text.count(")")
    if missing > 0:
        return text + ")" * missing
    while missing < 0 and text.endswith(")"):
        text = text[:-1].rstrip()
        missing += 1
    return text


@functools.lru_cache(maxsize=1 << 16)
def local_structures(tree: Tree, n: int = 30) -> frozenset[Structure]:
    """The paper's local structures of ``tree`` up to size ``n``: its atoms and every ancestor-chain +
    left-sibling + node sequence (see the module docstring). Anonymize the tree first for templates.

    Cached: the pool's programs are read again for every coverage figure."""
    if n < 1:
        raise ValueError(f"max_structure_size: value {n} is not allowed; must be an integer >= 1")
    out: set[Structure] = set()
    new = tuple.__new__  # Structure(...) without NamedTuple's keyword handling: this loop is the index build

    def visit(t: Tree, chains: list[str], left: list[str]) -> None:
        # chains[j]: the j nearest ancestors as text ("p:a p:b "), j = 0 .. min(n - 1, depth)
        me = symbol(t)
        out.add(new(Structure, (1, me)))
        node = "c:" + me
        runs = [""] + [" ".join("s:" + x for x in left[len(left) - m :]) + " " for m in range(1, min(n - 1, len(left)) + 1)]
        for m, run in enumerate(runs):
            for j in range(min(n - 1 - m, len(chains) - 1) + 1):
                if j + m:
                    out.add(new(Structure, (j + m + 1, chains[j] + run + node)))
        below = [""] + [c + "p:" + me + " " for c in chains[: n - 1]]
        kids = [symbol(c) for c in t.children]
        for i, c in enumerate(t.children):
            visit(c, below, kids[:i])

    visit(tree, ["", f"p:{ROOT} "][:n], [])
    return frozenset(out)


# ------------------------------------------------------------------------------------------ fragments


def _label(t: Tree) -> str:
    return VALUE if t.is_value else t.label


def _fragments(t: Tree, budget: int) -> list[tuple[int, str]]:
    """All parent->child fragments rooted at ``t`` with at most ``budget`` nodes: (size, text)."""
    if budget < 1:
        return []
    # Per argument: not included ("_", 0 nodes) or one of its own fragments.
    options: list[list[tuple[int, str | None]]] = [[(0, None)] for _ in t.children]
    for opts, c in zip(options, t.children):
        opts.extend((n, s) for n, s in _fragments(c, budget - 1))
    out: list[tuple[int, str]] = []
    for combo in itertools.product(*options):
        n = 1 + sum(k for k, _ in combo)
        if n > budget:
            continue
        if all(s is None for _, s in combo):
            out.append((1, _label(t)))
        else:
            out.append((n, f"{_label(t)}({', '.join('_' if s is None else s for _, s in combo)})"))
    return out


def fragment_structures(tree: Tree, max_size: int = 4) -> frozenset[Structure]:
    """Every fragment-mode local structure of ``tree`` with at most ``max_size`` nodes (values anonymized)."""
    if max_size < 1:
        raise ValueError(f"max_size: value {max_size} is not allowed; must be an integer >= 1")
    out: set[Structure] = set()
    for node in tree.nodes():
        for n, s in _fragments(node, max_size):
            out.add(Structure(n, s))
        kids = node.children
        # Runs of consecutive sibling leaves (their parent outside the sub-graph).
        for start in range(len(kids)):
            for end in range(start + 2, min(len(kids), start + max_size) + 1):
                out.add(Structure(end - start, " ~ ".join(_label(k) for k in kids[start:end])))
    return frozenset(out)
