"""Local structures of hand-worked program trees in both modes (exact expected sets), atoms of program texts,
the repair of predicted programs, and the program parser."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st
from puzzle.icl.datasets import scan_program
from puzzle.icl.structures import (
    Structure,
    Tree,
    anonymize,
    fragment_structures,
    local_structures,
    parse_program,
    program_atoms,
    repair_parentheses,
)


def texts(tree: Tree, max_size: int) -> set[str]:
    return {s.text for s in fragment_structures(tree, max_size)}


def paper(tree: Tree, n: int) -> dict[str, int]:
    return {s.text: s.size for s in local_structures(tree, n)}


# ------------------------------------------------------------------ paper mode (the authors' definition)


def test_paper_structures_of_around_walk_right_by_hand():
    # <s> -> around -> (walk, right). around: ancestors (<s>); walk: (<s>, around); right: (<s>, around) and
    # its left sibling walk. Each takes its j nearest ancestors and m nearest left siblings, j + m + 1 <= 3.
    assert paper(parse_program("around(walk,right)"), 3) == {
        "around": 1, "walk": 1, "right": 1,
        "p:<s> c:around": 2,
        "p:around c:walk": 2, "p:<s> p:around c:walk": 3,
        "p:around c:right": 2, "p:<s> p:around c:right": 3,
        "s:walk c:right": 2, "p:around s:walk c:right": 3,
    }


def test_paper_structures_of_a_scan_command_by_hand():
    t = parse_program("and(twice(around(walk,right)),jump)")
    got = paper(t, 30)
    want = {
        # atoms
        "and": 1, "twice": 1, "around": 1, "walk": 1, "right": 1, "jump": 1,
        "p:<s> c:and": 2,
        "p:and c:twice": 2, "p:<s> p:and c:twice": 3,
        "p:twice c:around": 2, "p:and p:twice c:around": 3, "p:<s> p:and p:twice c:around": 4,
        "p:around c:walk": 2, "p:twice p:around c:walk": 3, "p:and p:twice p:around c:walk": 4,
        "p:<s> p:and p:twice p:around c:walk": 5,
        "p:around c:right": 2, "p:twice p:around c:right": 3, "p:and p:twice p:around c:right": 4,
        "p:<s> p:and p:twice p:around c:right": 5,
        "s:walk c:right": 2, "p:around s:walk c:right": 3, "p:twice p:around s:walk c:right": 4,
        "p:and p:twice p:around s:walk c:right": 5, "p:<s> p:and p:twice p:around s:walk c:right": 6,
        # jump's left sibling is the argument before it, named by its top symbol: twice
        "p:and c:jump": 2, "p:<s> p:and c:jump": 3,
        "s:twice c:jump": 2, "p:and s:twice c:jump": 3, "p:<s> p:and s:twice c:jump": 4,
    }
    assert got == want
    # a size limit n keeps exactly the structures of at most n nodes; n = 1 leaves the atoms
    assert paper(t, 3) == {k: v for k, v in want.items() if v <= 3}
    assert paper(t, 1) == {k: 1 for k, v in want.items() if v == 1}


def test_paper_structures_take_the_nearest_siblings_and_never_branch():
    got = paper(parse_program("p(a,b,c)"), 30)
    assert {"s:b c:c", "s:a s:b c:c", "p:p s:a s:b c:c", "p:<s> p:p s:a s:b c:c"} <= set(got)
    assert "s:a c:c" not in got, "the m siblings are the m nearest"
    assert "p:<s> s:b c:c" not in got, "the j ancestors are the j nearest"
    assert not any("(" in k or "_" in k for k in got), "no branching, no argument slots"
    got = paper(parse_program("f(g(x),y)"), 30)
    assert "s:g c:y" in got and not any("s:x" in k for k in got), "a sibling is the top of the argument before"


def test_paper_structures_write_values_quoted_and_anonymize_to_v():
    t = parse_program("answer(loc_2(stateid('texas')))")
    raw = paper(t, 30)
    assert "'texas'" in raw and "p:stateid c:'texas'" in raw
    anon = paper(anonymize(t), 30)
    assert "'<v>'" in anon and "p:loc_2 p:stateid c:'<v>'" in anon and not any("texas" in k for k in anon)
    assert local_structures(anonymize(t)) == local_structures(anonymize(parse_program("answer(loc_2(stateid('ohio')))")))
    with pytest.raises(ValueError, match="max_structure_size: value 0"):
        local_structures(t, 0)


def test_program_atoms_come_from_the_text_even_when_it_does_not_parse():
    assert program_atoms("answer(count(river(loc_2(stateid('texas')))))") == [
        "'texas'", "answer", "count", "loc_2", "river", "stateid"]
    assert program_atoms("answer(count(") == ["answer", "count"]
    assert program_atoms("answer(state(all) river") == ["all", "answer", "river", "state"]
    assert program_atoms("cityid('new york', _)") == ["'new york'", "_", "cityid"]
    assert program_atoms("stateid('tex") == ["'tex", "stateid"], "a value cut off by the answer budget"
    assert program_atoms("") == []
    # the atoms of a program that parses are its node symbols
    t = parse_program("answer(count(river(all)))")
    assert program_atoms(str(t)) == sorted(s.text for s in local_structures(t) if s.size == 1)


@pytest.mark.parametrize(
    ("beam", "repaired"),
    [
        ("answer(count(river(all)", "answer(count(river(all)))"),  # missing ) appended
        ("answer(river(all)))))", "answer(river(all))"),  # surplus ) removed from the end
        ("answer(river(all)).", "answer(river(all))"),  # the trailing dot goes first
        (" answer(all)) ) ", "answer(all)"),
        ("answer(x)) y", "answer(x)) y"),  # a surplus not at the end stays (and does not parse)
        ("answer(river(all))", "answer(river(all))"),
    ],
)
def test_repair_parentheses(beam, repaired):
    assert repair_parentheses(beam) == repaired


# ------------------------------------------------------------------ fragments mode (this project's variant)


def test_scan_around_right_exact_set():
    t = parse_program("around(walk,right)")
    assert texts(t, 3) == {
        "around",
        "walk",
        "right",
        "around(walk, _)",
        "around(_, right)",
        "walk ~ right",
        "around(walk, right)",
    }


def test_sizes_are_node_counts_and_grow_with_max_size():
    t = parse_program("twice(around(walk,right))")
    got = fragment_structures(t, 4)
    assert {s.text: s.size for s in got} == {
        "twice": 1,
        "around": 1,
        "walk": 1,
        "right": 1,
        "twice(around)": 2,
        "around(walk, _)": 2,
        "around(_, right)": 2,
        "walk ~ right": 2,
        "twice(around(walk, _))": 3,
        "twice(around(_, right))": 3,
        "around(walk, right)": 3,
        "twice(around(walk, right))": 4,
    }
    assert {s for s in got if s.size <= 2} == fragment_structures(t, 2)
    assert texts(t, 1) == {"twice", "around", "walk", "right"}


def test_three_arguments_sibling_edges_only_between_consecutive_arguments():
    t = parse_program("p(a,b,c)")
    assert texts(t, 3) == {
        "p",
        "a",
        "b",
        "c",
        "p(a, _, _)",
        "p(_, b, _)",
        "p(_, _, c)",
        "a ~ b",
        "b ~ c",
        "p(a, b, _)",
        "p(a, _, c)",
        "p(_, b, c)",
        "a ~ b ~ c",
    }
    assert "a ~ c" not in texts(t, 4)


def test_sibling_edge_needs_both_ends_to_be_leaves_of_the_subgraph():
    # {a, x, b} is connected only through the sibling edge a~b, but a has its child x in the
    # sub-graph, so it is not a leaf: that set is not a local structure.
    t = parse_program("p(a(x),b)")
    assert texts(t, 3) == {
        "p",
        "a",
        "x",
        "b",
        "p(a, _)",
        "p(_, b)",
        "a(x)",
        "a ~ b",
        "p(a(x), _)",
        "p(a, b)",
    }


def test_values_are_anonymized():
    t = parse_program("answer(river(loc_2(stateid('texas'))))")
    got = texts(t, 2)
    assert "<v>" in got and "stateid(<v>)" in got
    assert not any("texas" in s for s in got)
    other = parse_program("answer(river(loc_2(stateid('ohio'))))")
    assert fragment_structures(t, 4) == fragment_structures(other, 4)
    assert str(anonymize(t)) == "answer(river(loc_2(stateid('<v>'))))"


def test_scan_command_program():
    assert str(scan_program("walk around right twice and jump")) == "and(twice(around(walk,right)),jump)"
    assert str(scan_program("turn left after look opposite right thrice")) == (
        "after(dir(turn,left),thrice(opposite(look,right)))"
    )
    with pytest.raises(ValueError, match="outside the grammar"):
        scan_program("walk sideways")


def test_parse_round_trip_and_errors():
    s = "answer(count(river(loc_2(stateid('texas')))))"
    assert str(parse_program(s)) == s
    assert parse_program(" f( a , 'b c' ) ") == Tree("f", (Tree("a"), Tree("b c", (), True)))
    for bad in ["", "f(a", "f(a))", "f(,)", "f(a) g", "f(a;b)"]:
        with pytest.raises(ValueError):
            parse_program(bad)


def test_max_size_must_be_positive():
    with pytest.raises(ValueError, match="max_size: value 0"):
        fragment_structures(Tree("a"), 0)


def test_structure_is_sortable_tuple():
    assert min([Structure(2, "b"), Structure(1, "z")]) == Structure(1, "z")


# ------------------------------------------------------------------ brute force over node subsets


def _trees(max_leaves: int = 6):
    leaf = st.sampled_from(["a", "b", "c"]).map(Tree)
    return st.recursive(
        leaf,
        lambda kids: st.tuples(st.sampled_from(["f", "g"]), st.lists(kids, min_size=1, max_size=3)).map(
            lambda t: Tree(t[0], tuple(t[1]))
        ),
        max_leaves=max_leaves,
    )


def _brute_force(tree: Tree, max_size: int) -> set[Structure]:
    """Every node subset of at most max_size nodes that is connected by parent->child edges and
    by sibling edges between consecutive arguments that are both leaves of the subset."""
    nodes, parent, pos = [], {}, {}

    def walk(t, par, i):
        me = len(nodes)
        nodes.append(t)
        parent[me], pos[me] = par, i
        for j, c in enumerate(t.children):
            walk(c, me, j)

    walk(tree, None, 0)
    n = len(nodes)
    out: set[Structure] = set()

    def find(comp: dict[int, int], v: int) -> int:
        while comp[v] != v:
            v = comp[v]
        return v

    def render(v: int, s: set[int]) -> str:
        kids = [u for u in range(n) if parent[u] == v]
        if not any(u in s for u in kids):
            return nodes[v].label
        return f"{nodes[v].label}({', '.join(render(u, s) if u in s else '_' for u in kids)})"

    for size in range(1, max_size + 1):
        for sub in itertools.combinations(range(n), size):
            s = set(sub)
            has_child = {v for v in s if any(parent[u] == v for u in s)}
            edges = [(u, parent[u]) for u in s if parent[u] in s]
            edges += [
                (u, v)
                for u in s
                for v in s
                if u < v
                and parent[u] == parent[v]
                and parent[u] is not None
                and abs(pos[u] - pos[v]) == 1
                and u not in has_child
                and v not in has_child
            ]
            comp = {v: v for v in s}
            for u, v in edges:
                comp[find(comp, u)] = find(comp, v)
            if len({find(comp, v) for v in s}) != 1:
                continue
            roots = [v for v in s if parent[v] not in s]
            if len(roots) == 1:
                out.add(Structure(size, render(roots[0], s)))
            else:
                # Only a run of consecutive sibling leaves can connect several roots.
                assert all(parent[v] == parent[roots[0]] for v in roots) and not has_child
                out.add(Structure(size, " ~ ".join(nodes[v].label for v in sorted(roots, key=pos.get))))
    return out


@given(_trees(), st.integers(1, 4))
def test_local_structures_equal_brute_force_enumeration(tree, max_size):
    assert fragment_structures(tree, max_size) == _brute_force(tree, max_size)
