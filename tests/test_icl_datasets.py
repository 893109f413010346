"""ICL datasets: split disjointness, the compositional property, determinism and program parsing."""

from __future__ import annotations

import pytest
from puzzle.data import scan
from puzzle.data.geo import atoms, compounds, funql_split
from puzzle.data.prompts import exact_match
from puzzle.icl.datasets import (
    GEO_SPLITS,
    geo_items,
    load_dataset,
    parse_geo_target,
    scan_program,
    scan_program_of_actions,
)
from puzzle.icl.structures import anonymize, fragment_structures


@pytest.mark.parametrize("split", GEO_SPLITS)
def test_geo_split_disjoint_and_complete(split):
    d = load_dataset(f"geo:{split}")
    train = {it.target for it in d.train}
    test = {it.target for it in d.test}
    assert d.train and d.test
    assert not train & test, "a test program occurs in train"
    assert len(d.train) + len(d.test) == len(geo_items())
    assert 0.1 <= len(d.test) / len(geo_items()) <= 0.4


@pytest.mark.parametrize("split", ["template", "compound"])
def test_geo_compositional_splits_hold_out_templates_but_not_atoms(split):
    d = load_dataset(f"geo:{split}")
    train_templates = {str(anonymize(it.program_tree)) for it in d.train}
    train_atoms = set().union(*(atoms(it.program_tree) for it in d.train))
    for it in d.test:
        assert str(anonymize(it.program_tree)) not in train_templates
        assert atoms(it.program_tree) <= train_atoms, it.target


def test_geo_compound_split_every_test_program_has_an_unseen_compound():
    d = load_dataset("geo:compound")
    seen = set().union(*(compounds(it.program_tree) for it in d.train))
    assert all(compounds(it.program_tree) - seen for it in d.test)


def test_scan_template_split_is_compositional():
    d = load_dataset("scan:template")
    key = next(
        s for s in fragment_structures(scan_program("walk around right"), 2) if s.text == "around(_, right)"
    )
    # Programs are disjoint; action sequences may not be ("jump right" x4 == "jump around right").
    assert not {str(it.program_tree) for it in d.train} & {str(it.program_tree) for it in d.test}
    assert all(key in fragment_structures(it.program_tree, 2) for it in d.test)
    assert not any(key in fragment_structures(it.program_tree, 2) for it in d.train)
    train_atoms = set().union(*(atoms(it.program_tree) for it in d.train))
    assert set().union(*(atoms(it.program_tree) for it in d.test)) <= train_atoms


def test_scan_items_pair_command_actions_and_program():
    d = load_dataset("scan:add_primitive")
    for it in d.test[:50] + d.train[:50]:
        assert scan.interpret(it.source) == it.target
        assert it.program_tree == scan_program(it.source)


def test_scan_actions_parse_to_a_smallest_program_with_the_same_meaning():
    programs = {}
    for e in scan.all_examples():
        programs.setdefault(e.actions, []).append(scan_program(e.command))
    for actions, ps in list(programs.items())[::97]:
        got = scan_program_of_actions(actions)
        assert got in ps
        assert got.size() == min(p.size() for p in ps)
    assert scan_program_of_actions("I_JUMP I_FLY") is None
    assert scan_program_of_actions(" I_TURN_RIGHT   I_WALK ") == scan_program("walk right")


def test_parse_target_of_datasets():
    geo = load_dataset("geo:iid")
    it = geo.test[0]
    assert geo.parse_target(it.target) == it.program_tree
    assert geo.parse_target("answer(count(") is None
    s = load_dataset("scan:simple")
    assert s.parse_target(s.test[0].target) is not None


def test_deterministic_in_seed():
    a, b, c = (
        load_dataset("geo:template", 0),
        load_dataset("geo:template", 0),
        load_dataset("geo:template", 1),
    )
    assert a.test == b.test and a.train == b.train
    assert a.test != c.test
    assert load_dataset("geo:iid", 3).test == load_dataset("geo:iid", 3).test


def test_geo_items_are_well_formed():
    items = geo_items()
    assert len({it.source for it in items}) == len(items)
    for it in items[::37]:
        assert parse_geo_target(it.target) == it.program_tree
        assert it.program_tree.label == "answer"
        assert exact_match(it.target, str(it.program_tree))


def test_funql_split_alias():
    train, test = funql_split("compositional")
    d = load_dataset("geo:compound")
    assert train == d.train and test == d.test


@pytest.mark.parametrize(
    "name,msg",
    [
        ("scan", "unknown; use 'scan:<split>'"),
        ("cogs:gen", "unknown"),
        ("scan:jump", "allowed: simple"),
        ("geo:random", "allowed: iid, template, compound"),
    ],
)
def test_unknown_names_are_rejected_with_allowed_values(name, msg):
    with pytest.raises(ValueError, match=msg):
        load_dataset(name)
