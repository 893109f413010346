"""Programs as trees, and the examples that pair an utterance with one (SCAN commands, FunQL questions).

A program is a tree (:class:`Tree`) written in a FunQL-like syntax::

    answer(count(river(loc_2(stateid('texas')))))

Quoted leaves are *values* (entity names, numbers); everything else is a grammar symbol.
:func:`parse_program` reads that syntax back, :func:`anonymize` replaces every value by ``<v>`` (the
example's *template*). The task languages of :mod:`puzzle.data` build their examples (:class:`Item`) on
these trees, and the ICL benchmark (:mod:`puzzle.icl`) reads local structures off them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Item:
    """One example: ``source`` utterance, ``target`` the model must produce, ``program_tree``."""

    source: str
    target: str
    program_tree: Tree
