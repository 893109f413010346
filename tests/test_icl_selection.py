"""Demonstration selection in both modes. Paper mode: Okapi BM25 over program atoms against a hand computation,
the Cover-LS greedy's picks on a hand-worked pool, Top-K, Cover-Utt and Random, the prompt order. Fragments
mode: BM25 over utterances and the properties of its four methods (coverage, distinct templates, ascending
similarity, seeded determinism)."""

from __future__ import annotations

import functools
import math

import pytest
from puzzle.icl.datasets import Item, load_dataset, scan_program
from puzzle.icl.selection import BM25, METHODS, DemonstrationSelector, PaperSelector, tokenize
from puzzle.icl.structures import (
    Structure,
    anonymize,
    fragment_structures,
    local_structures,
    parse_program,
    program_atoms,
)

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
        ls = fragment_structures(item.program_tree, 4)
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
        want = fragment_structures(item.program_tree, 4)
        coverable = {s for s in want if s in sel.by_structure}
        got = sel.cover_ls(item.source, want, k=len(want), seed=0)
        covered = set().union(*(sel.structures[i] for i in got))
        assert coverable <= covered
        assert coverable != want or which == "geo"  # compositional test items hold unseen structures


def test_cover_ls_never_repeats_an_anonymized_program():
    d, sel = geo()
    for item in d.test[:80:4]:
        got = sel.cover_ls(item.source, fragment_structures(item.program_tree, 4), k=16, seed=1)
        templates = [sel.templates[i] for i in got]
        assert len(templates) == len(set(templates)) == 16


def test_cover_ls_first_pick_is_best_retrieved_example_with_a_largest_structure():
    d, sel = geo()
    item = d.test[11]
    want = fragment_structures(item.program_tree, 4)
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
    want = fragment_structures(scan_program("walk around left"), 3)
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
        want = fragment_structures(item.program_tree, 4)
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


# ------------------------------------------------------------------------------------------ paper mode

# A hand-worked pool: (utterance, program). 1 and 2 share a template; 6 holds the same atoms as 1 plus one.
POOL = [
    ("rivers", "answer(river(all))"),
    ("rivers in texas", "answer(river(loc_2(stateid('texas'))))"),
    ("rivers in ohio", "answer(river(loc_2(stateid('ohio'))))"),
    ("count states", "answer(count(state(all)))"),
    ("count rivers", "answer(count(river(all)))"),
    ("states bordering texas", "answer(state(next_to_2(stateid('texas'))))"),
    ("largest river in ohio", "answer(largest(river(loc_2(stateid('ohio')))))"),
]
QUERY = "how many rivers in texas"
QUERY_PROGRAM = "answer(count(river(loc_2(stateid('texas')))))"  # the predictor's beam, raw


@functools.cache
def paper_pool() -> PaperSelector:
    return PaperSelector([Item(s, t, parse_program(t)) for s, t in POOL])


def okapi(docs: list[list[str]], query: list[str], k1: float = 1.5, b: float = 0.75, eps: float = 0.25) -> list[float]:
    """BM25 with the Okapi idf and its floor, written out from the definition for the tests."""
    n, avgdl = len(docs), sum(map(len, docs)) / len(docs)
    vocab = sorted({t for d in docs for t in d})
    raw = {t: math.log((n - sum(t in d for d in docs) + 0.5) / (sum(t in d for d in docs) + 0.5)) for t in vocab}
    floor = eps * sum(raw.values()) / len(raw)
    idf = {t: floor if v < 0 else v for t, v in raw.items()}
    return [sum(idf[t] * d.count(t) * (k1 + 1) / (d.count(t) + k1 * (1 - b + b * len(d) / avgdl))
                for t in query if t in idf) for d in docs]


def test_okapi_bm25_hand_computed():
    docs = [["a", "b"], ["a", "c"], ["a", "d"], ["e"]]
    # N = 4, avgdl = 7/4; idf(a) = ln(1.5/3.5) < 0 is floored to 0.25 * mean idf = 0.25 * (4 - 1) ln(7/3) / 5
    idf_a, idf_b = 0.25 * 3 * math.log(3.5 / 1.5) / 5, math.log(3.5 / 1.5)
    norm2 = 1.5 * (0.25 + 0.75 * 2 / 1.75)
    want = [idf_a * 2.5 / (1 + norm2) + idf_b * 2.5 / (1 + norm2), idf_a * 2.5 / (1 + norm2),
            idf_a * 2.5 / (1 + norm2), 0.0]
    got = BM25(docs, idf="okapi").scores(["a", "b"])
    assert got == pytest.approx(want, rel=1e-12) == okapi(docs, ["a", "b"])
    with pytest.raises(ValueError, match="idf: value 'x' is not allowed"):
        BM25(docs, idf="x")


def test_paper_retriever_is_bm25_over_anonymized_program_atoms():
    sel = paper_pool()
    docs = [program_atoms(str(anonymize(parse_program(t)))) for _, t in POOL]
    assert sel.atoms == docs and docs[1] == ["'<v>'", "answer", "loc_2", "river", "stateid"]
    assert sel.atoms[1] == sel.atoms[2], "one template, one atom set"
    q = program_atoms(QUERY_PROGRAM)  # raw: 'texas' matches no anonymized program
    assert sel.bm25.scores(q) == pytest.approx(okapi(docs, q))
    scores = okapi(docs, q)
    ranking = sel.ranking(QUERY, q, seed=0)
    assert [scores[i] for i in ranking] == sorted(scores, reverse=True)
    # 1 and 2 tie; which comes first is a seeded random order, fixed per query
    firsts = {tuple(sel.ranking(QUERY, q, seed=s)[2:4]) for s in range(20)}
    assert firsts == {(1, 2), (2, 1)}
    assert sel.ranking(QUERY, q, 3) == sel.ranking(QUERY, q, 3)


def test_cover_ls_greedy_picks_on_the_hand_worked_pool():
    """The query program is the chain <s> answer count river loc_2 stateid 'texas'; its structures held in the
    pool are the chain's windows that some training program also has.

    round 1, size 4: only 4 holds "p:<s> p:answer p:count c:river" -> 4. Size 3: the only uncovered held one is
    "p:river p:loc_2 c:stateid" (1, 2, 6): the retriever prefers 1 or 2 (same atoms, 6 is longer) -> 1 or 2,
    and its template twin becomes unusable. Nothing uncovered is held at sizes 2 and 1.
    round 2 (all uncovered again), size 3: "p:river p:loc_2 c:stateid" now only in 6 and "p:<s> p:answer
    c:count" only in 3: both taken, in a seeded random order. Sizes 2 and 1: covered.
    round 3, size 2: "p:<s> c:answer" held by 0 and 5; 0 is shorter with as many floored-idf matches -> 0.
    Size 1: "stateid" still held by 5 -> 5.
    round 4: no usable example holds any atom: stop with 6 < k demonstrations.
    """
    sel = paper_pool()
    atoms = program_atoms(QUERY_PROGRAM)
    structures = local_structures(parse_program(QUERY_PROGRAM))
    orders = set()
    for seed in range(12):
        picks = sel.cover_ls_picks(QUERY, atoms, structures, k=24, seed=seed)
        assert picks[0] == 4 and picks[1] in (1, 2) and set(picks[2:4]) == {3, 6} and picks[4:] == [0, 5]
        assert sel.cover_ls_picks(QUERY, atoms, structures, k=24, seed=seed) == picks, "seeded"
        orders.add((picks[1], tuple(picks[2:4])))
    assert {o[0] for o in orders} == {1, 2} and {o[1] for o in orders} == {(3, 6), (6, 3)}
    # k stops the greedy wherever it is
    assert sel.cover_ls_picks(QUERY, atoms, structures, k=2, seed=0) == sel.cover_ls_picks(
        QUERY, atoms, structures, k=24, seed=0)[:2]


def test_cover_ls_prompt_order_puts_the_most_similar_last():
    sel = paper_pool()
    atoms = program_atoms(QUERY_PROGRAM)
    structures = local_structures(parse_program(QUERY_PROGRAM))
    scores = okapi(sel.atoms, atoms)
    for seed in range(4):
        picks = sel.cover_ls_picks(QUERY, atoms, structures, 24, seed)
        got = sel.cover_ls(QUERY, atoms, structures, 24, seed)
        assert sorted(got) == sorted(picks)
        assert [scores[i] for i in got] == sorted(scores[i] for i in picks)
        assert got[-1] == 4 and got[0] == 5  # count rivers is the most similar, states bordering texas the least


def test_cover_ls_without_structures_only_covers_atoms():
    # A beam that does not parse still has atoms; Cover-LS then covers those (size 1) alone.
    sel = paper_pool()
    picks = sel.cover_ls_picks(QUERY, ["count"], [], k=24, seed=0)
    assert picks == [4, 3], "4 is the best holder of count; 3 the only other; then nothing holds it"
    assert sel.cover_ls_picks(QUERY, [], [], k=24, seed=0) == []


def test_paper_topk_and_cover_utt():
    sel = paper_pool()
    top = program_atoms(QUERY_PROGRAM)
    scores = okapi(sel.atoms, top)
    assert sel.topk(QUERY, top, 2, seed=0) == [3, 4], "the two best, least similar first"
    got = sel.topk(QUERY, top, 3, seed=0)
    assert got[1:] == [3, 4] and got[0] in (1, 2)
    assert [scores[i] for i in sel.topk(QUERY, top, 7)] == sorted(scores)
    # Cover-Utt covers the query's words that some example holds: rivers (0, 1, 2, 4), in (1, 2, 6), texas
    # (1, 5). Round 1 starts from a random one of them: rivers -> 4 (the retriever's best holder), then in or
    # texas -> 1 or 2, which covers all three; in or texas first -> 1 or 2 at once. Later rounds take the
    # other holders, one per template; 3 (count states) holds none.
    firsts = set()
    for seed in range(12):
        picks = sel.cover_utt_picks(QUERY, top, 24, seed)
        assert picks[0] in (1, 2, 4) and (picks[0] != 4 or picks[1] in (1, 2))
        assert len(set(picks) & {1, 2}) == 1 and set(picks) - {1, 2} == {0, 4, 5, 6}
        firsts.add(picks[0])
        got = sel.cover_utt(QUERY, top, 24, seed)
        assert [scores[i] for i in got] == sorted(scores[i] for i in picks)
    assert 4 in firsts and firsts & {1, 2}


def test_paper_random_is_a_seeded_uniform_sample_in_random_order():
    d = load_dataset("geo:compound")
    sel = PaperSelector(d.train)
    q = d.test[0].source
    a = sel.random(q, 24, seed=0)
    assert len(a) == len(set(a)) == 24 and a == sel.random(q, 24, seed=0) != sel.random(q, 24, seed=1)
    scores = sel.bm25.scores(program_atoms(d.test[0].target))
    orders = [[scores[i] for i in sel.random(it.source, 8, 0)] for it in d.test[:20]]
    assert sum(o == sorted(o) for o in orders) < 5, "random order, not sorted by similarity"
    counts = [0] * len(sel.pool)
    for it in d.test[:200]:
        for i in sel.random(it.source, 24, 0):
            counts[i] += 1
    assert max(counts) <= 12, "no example is favoured (expected 200 * 24 / 1786 = 2.7 each)"


def test_paper_select_dispatches_and_names_unknown_methods():
    sel = paper_pool()
    atoms = program_atoms(QUERY_PROGRAM)
    st = local_structures(parse_program(QUERY_PROGRAM))
    assert sel.select("cover_ls", QUERY, 24, 0, top_atoms=atoms, atoms=atoms, structures=st) == sel.cover_ls(
        QUERY, atoms, st, 24, 0)
    assert sel.select("topk", QUERY, 2, 0, top_atoms=atoms) == [3, 4]
    with pytest.raises(ValueError, match="allowed: random, topk, cover_utt, cover_ls"):
        sel.select("mmr", QUERY, 2)
    with pytest.raises(ValueError, match="empty"):
        PaperSelector([])
    assert Structure(1, "count") in sel.structures[3]
