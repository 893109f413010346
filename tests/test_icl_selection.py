"""Demonstration selection: BM25 against hand-computed scores, and the properties of Random, Top-K,
Cover-Utt and Cover-LS (coverage, distinct templates, ascending similarity, seeded determinism)."""

from __future__ import annotations

import functools
import math

import pytest
from puzzle.icl.datasets import Item, load_dataset, scan_program
from puzzle.icl.selection import BM25, METHODS, DemonstrationSelector, tokenize
from puzzle.icl.structures import local_structures

K = 8


@functools.cache
def geo():
    d = load_dataset("geo:compound")
    return d, DemonstrationSelector(d.train, 4)


@functools.cache
def scan_small():
    # A slice of the template split's train part keeps the index build fast.
    d = load_dataset("scan:template")
    return d, DemonstrationSelector(d.train[::6], 4)


def test_bm25_hand_computed():
    bm = BM25([["a", "b"], ["a", "c", "c"], ["d"]])
    # N = 3, avgdl = 2, k1 = 1.5, b = 0.75; idf(t) = ln(1 + (N - n + 0.5) / (n + 0.5)).
    idf_a, idf_c = math.log(1 + 1.5 / 2.5), math.log(1 + 2.5 / 1.5)
    norm0 = 1.5 * (0.25 + 0.75 * 2 / 2)  # = 1.5
    norm1 = 1.5 * (0.25 + 0.75 * 3 / 2)  # = 2.0625
    want = [
        idf_a * 1 * 2.5 / (1 + norm0),
        idf_a * 1 * 2.5 / (1 + norm1) + idf_c * 2 * 2.5 / (2 + norm1),
        0.0,
    ]
    assert bm.scores(["a", "c"]) == pytest.approx(want, rel=1e-12)
    assert want[0] == pytest.approx(0.4700036292457356)
    # Repeated query tokens count again; unknown tokens add nothing.
    assert bm.scores(["c", "c", "zzz"]) == pytest.approx([0.0, 2 * idf_c * 5 / (2 + norm1), 0.0])


def test_bm25_rejects_empty_collection():
    with pytest.raises(ValueError, match="empty"):
        BM25([])


def test_topk_is_the_k_best_in_ascending_order():
    d, sel = geo()
    q = d.test[5].source
    scores = sel.similarity(q)
    got = sel.topk(q, K)
    assert len(got) == K
    best = sorted(scores, reverse=True)[:K]
    assert sorted(scores[i] for i in got) == sorted(best)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_orders_by_ascending_similarity_and_is_seeded(method):
    d, sel = geo()
    for item in d.test[:40:8]:
        ls = local_structures(item.program_tree, 4)
        got = sel.select(method, item.source, K, seed=3, structures=ls)
        assert len(got) == K == len(set(got))
        scores = sel.similarity(item.source)
        sims = [scores[i] for i in got]
        assert sims == sorted(sims), "most similar demonstration must come last"
        assert got == sel.select(method, item.source, K, seed=3, structures=ls)


def test_random_depends_on_seed():
    d, sel = geo()
    q = d.test[0].source
    assert sel.random(q, K, seed=0) != sel.random(q, K, seed=1)


@pytest.mark.parametrize("which", ["geo", "scan"])
def test_cover_ls_covers_every_structure_the_pool_has(which):
    d, sel = geo() if which == "geo" else scan_small()
    for item in d.test[:60:6]:
        want = local_structures(item.program_tree, 4)
        coverable = {s for s in want if s in sel.by_structure}
        got = sel.cover_ls(item.source, want, k=len(want), seed=0)
        covered = set().union(*(sel.structures[i] for i in got))
        assert coverable <= covered
        assert coverable != want or which == "geo"  # compositional test items hold unseen structures


def test_cover_ls_never_repeats_an_anonymized_program():
    d, sel = geo()
    for item in d.test[:80:4]:
        got = sel.cover_ls(item.source, local_structures(item.program_tree, 4), k=16, seed=1)
        templates = [sel.templates[i] for i in got]
        assert len(templates) == len(set(templates)) == 16


def test_cover_ls_first_pick_is_best_retrieved_example_with_a_largest_structure():
    d, sel = geo()
    item = d.test[11]
    want = local_structures(item.program_tree, 4)
    coverable = [s for s in want if s in sel.by_structure]
    largest = max(s.size for s in coverable)
    scores = sel.similarity(item.source)
    # With k = 1 the only pick is made for a largest coverable structure: the retriever's best
    # example among those containing it.
    got = sel.cover_ls(item.source, want, k=1, seed=0)
    assert len(got) == 1
    picked = got[0]
    firsts = {min(sel.by_structure[s], key=lambda i: (-scores[i], i)) for s in coverable if s.size == largest}
    assert picked in firsts


def test_cover_ls_starts_over_when_everything_is_covered():
    pool = [
        Item("walk around left", "x", scan_program("walk around left")),
        Item("walk", "x", scan_program("walk")),
        Item("walk left", "x", scan_program("walk left")),
        Item("jump", "x", scan_program("jump")),
        Item("look", "x", scan_program("look")),
    ]
    sel = DemonstrationSelector(pool, 3)
    want = local_structures(scan_program("walk around left"), 3)
    # Pool item 0 covers every structure of the query; the remaining picks come from later rounds.
    got = sel.cover_ls("walk around left", want, k=3, seed=0)
    assert 0 in got and len(got) == 3
    assert set(got) <= {0, 1, 2}, "later rounds still take examples holding query structures"
    # When no example holds an uncovered query structure, the retriever ranking fills the rest.
    got5 = sel.cover_ls("walk around left", want, k=5, seed=0)
    assert sorted(got5) == [0, 1, 2, 3, 4]


def test_cover_utt_covers_the_utterance_words():
    d, sel = geo()
    for item in d.test[:50:10]:
        words = set(tokenize(item.source))
        got = sel.cover_utt(item.source, K, seed=0)
        seen = set().union(*(sel.words[i] for i in got))
        assert {w for w in words if w in sel.by_word} <= seen


def test_cover_ls_beats_topk_on_structure_coverage_of_scan_template():
    # The paper's motivation: similar demonstrations repeat themselves, covering demonstrations
    # cover more of the program. Measured with oracle structures on the held-out compound.
    d, sel = scan_small()
    tot_cov, tot_top = 0.0, 0.0
    for item in d.test[::400]:
        want = local_structures(item.program_tree, 4)
        cov = set().union(*(sel.structures[i] for i in sel.cover_ls(item.source, want, K))) & want
        top = set().union(*(sel.structures[i] for i in sel.topk(item.source, K))) & want
        tot_cov += len(cov) / len(want)
        tot_top += len(top) / len(want)
    assert tot_cov > tot_top


def test_errors_name_the_problem():
    d, sel = geo()
    with pytest.raises(ValueError, match="allowed: random, topk, cover_utt, cover_ls"):
        sel.select("mmr", "x", 2)
    with pytest.raises(ValueError, match="needs the query's local structures"):
        sel.select("cover_ls", "x", 2)
    with pytest.raises(ValueError, match="empty"):
        DemonstrationSelector([])
    with pytest.raises(ValueError, match="max_structure_size: value 0"):
        DemonstrationSelector(d.train[:3], 0)


def test_tokenize_lowercases_words():
    assert tokenize("How many  Rivers") == ["how", "many", "rivers"]
