"""Programs as trees and their local structures (Levy, Bogin & Berant, ACL 2023, Sec. 3).

Cover-LS chooses demonstrations that together cover the *local structures* of the test program.
A program is a tree (:class:`Tree`) written in a FunQL-like syntax::

    answer(count(river(loc_2(stateid('texas')))))

Quoted leaves are *values* (entity names, numbers); everything else is a grammar symbol.

The program graph has two kinds of edges: parent -> child, and sibling edges between consecutive
arguments of one node. A local structure is a connected sub-graph of at most ``max_size`` nodes,
where a sibling edge may be used only between nodes that are leaves of the sub-graph (they have
no child inside it). Because two siblings in different parent-child components share a parent
outside the sub-graph, every structure is one of two shapes:

* a tree fragment, connected by parent -> child edges, written with ``_`` for arguments that are
  not in the fragment: ``around(_, right)``, ``loc_2(stateid)``, ``walk``;
* a run of consecutive sibling leaves whose parent is not in the sub-graph: ``walk ~ right``.

Values are anonymized to ``<v>`` so that "rivers in texas" and "rivers in ohio" share
structures; the anonymized program (:func:`anonymize`) is what Cover-LS uses as a template.
Size-1 structures are the program's symbols.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

VALUE = "<v>"

_TOKEN = re.compile(r"\s*(?:('[^']*')|([A-Za-z_][A-Za-z0-9_.]*)|([(),]))")


@dataclass(frozen=True)
class Tree:
    """One program node: a symbol with ordered arguments, or a value leaf (``is_value``)."""

    label: str
    children: tuple[Tree, ...] = ()
    is_value: bool = False

    def __str__(self) -> str:
        if self.is_value:
            return f"'{self.label}'"
        if not self.children:
            return self.label
        return f"{self.label}({','.join(str(c) for c in self.children)})"

    def nodes(self) -> Iterator[Tree]:
        """Pre-order traversal."""
        yield self
        for c in self.children:
            yield from c.nodes()

    def size(self) -> int:
        return sum(1 for _ in self.nodes())


def parse_program(text: str) -> Tree:
    """Parse ``label(arg, ...)`` / ``'value'`` syntax; raises ValueError naming the position."""
    tokens: list[tuple[str, int]] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"program {text!r}: unexpected character at position {pos}: {text[pos]!r}")
        tokens.append((m.group(0).strip(), pos))
        pos = m.end()
    if not tokens:
        raise ValueError("program '': empty program")
    i = 0

    def node() -> Tree:
        nonlocal i
        if i >= len(tokens):
            raise ValueError(f"program {text!r}: ended where an argument was expected")
        tok, at = tokens[i]
        i += 1
        if tok.startswith("'"):
            return Tree(tok[1:-1], (), True)
        if tok in "(),":
            raise ValueError(f"program {text!r}: expected a symbol at position {at}, got {tok!r}")
        if i < len(tokens) and tokens[i][0] == "(":
            i += 1
            args = [node()]
            while i < len(tokens) and tokens[i][0] == ",":
                i += 1
                args.append(node())
            if i >= len(tokens) or tokens[i][0] != ")":
                raise ValueError(f"program {text!r}: missing ')' for {tok!r} opened at position {at}")
            i += 1
            return Tree(tok, tuple(args))
        return Tree(tok)

    tree = node()
    if i != len(tokens):
        raise ValueError(f"program {text!r}: trailing text at position {tokens[i][1]}")
    return tree


def anonymize(tree: Tree) -> Tree:
    """The program with every value replaced by ``<v>``: the example's template."""
    if tree.is_value:
        return Tree(VALUE, (), True)
    return Tree(tree.label, tuple(anonymize(c) for c in tree.children), False)


class Structure(NamedTuple):
    """A local structure: number of nodes and its canonical text."""

    size: int
    text: str


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


def local_structures(tree: Tree, max_size: int = 4) -> frozenset[Structure]:
    """Every local structure of ``tree`` with at most ``max_size`` nodes (values anonymized)."""
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
