"""Local structures of hand-worked program trees (exact expected sets) and the program parser."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st
from puzzle.icl.datasets import scan_program
from puzzle.icl.structures import Structure, Tree, anonymize, local_structures, parse_program


def texts(tree: Tree, max_size: int) -> set[str]:
    return {s.text for s in local_structures(tree, max_size)}


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
    got = local_structures(t, 4)
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
    assert {s for s in got if s.size <= 2} == local_structures(t, 2)
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
    assert local_structures(t, 4) == local_structures(other, 4)
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
        local_structures(Tree("a"), 0)


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
    assert local_structures(tree, max_size) == _brute_force(tree, max_size)
