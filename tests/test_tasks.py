"""The tiny task's text and evaluation: held-out parts stay out of training text, items are built
like training episodes, and exact match scores what a generator returns."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from puzzle.data import corpus, scan
from puzzle.data.prompts import SEPARATOR
from puzzle.data.tasks import MAX_NEW_TOKENS, TaskItem, evaluate_exact_match, scan_task_examples
from puzzle.generation import TextGenerator

DATA = Path(__file__).resolve().parents[1] / "examples" / "tiny" / "data"
SOURCE = re.compile(r"^source: (.*)$", re.MULTILINE)


def _sources(text: str) -> set[str]:
    return set(SOURCE.findall(text))


@pytest.fixture(scope="module")
def committed_train() -> str:
    return (DATA / "train.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def committed_valid() -> str:
    return (DATA / "valid.txt").read_text(encoding="utf-8")


def test_partition_is_disjoint_and_covers_the_template_split():
    p = corpus.scan_partition("template")
    train, test = scan.split("template")
    assert {x.source for x in p.test} == {e.command for e in test}
    assert not {x.source for x in p.train} & {x.source for x in p.valid}
    assert {x.source for x in p.train} | {x.source for x in p.valid} == {e.command for e in train}
    assert len(p.valid) > 100


def test_committed_corpus_never_contains_a_template_test_command(committed_train, committed_valid):
    test_commands = {x.source for x in corpus.scan_partition("template").test}
    for text in (committed_train, committed_valid):
        assert "around right" not in text
        assert not _sources(text) & test_commands


def test_committed_train_text_holds_no_held_out_query(committed_train):
    held = {x.source for x in corpus.scan_partition("template").valid}
    seen = _sources(committed_train)
    assert len(seen) > 1000  # it really is SCAN episodes
    assert not seen & held


def test_generated_stream_keeps_test_and_valid_out_of_train():
    bad = {x.source for x in corpus.scan_partition("template").test}
    bad |= {x.source for x in corpus.scan_partition("template").valid}
    funql = corpus.funql_partition()
    if funql is not None:
        bad |= {x.source for x in funql.test} | {x.source for x in funql.valid}
    docs = corpus.build_documents(seed=7, part="train", max_chars=400_000)
    sources = set().union(*(_sources(d) for d in docs))
    assert sources and not sources & bad


def test_committed_files_are_the_seed_0_stream(committed_train):
    docs = corpus.read_documents(DATA / "train.txt")
    assert docs[:50] == corpus.build_documents(seed=0, part="train", max_chars=200_000)[:50]
    assert all(corpus.DOCUMENT_SEPARATOR not in d for d in docs)


def test_valid_episodes_query_held_out_commands(committed_valid):
    held = {x.source for x in corpus.scan_partition("template").valid}
    queries = []
    for doc in corpus.read_documents(DATA / "valid.txt"):
        if doc.startswith("source: "):
            last = doc.split(SEPARATOR)[-1]
            queries.append(SOURCE.match(last).group(1))
    scan_queries = [q for q in queries if q.split()[0] in (*scan.PRIMITIVES, "turn")]
    assert len(scan_queries) > 100
    assert all(q in held for q in scan_queries)


def _scan_pairs(doc: str) -> list[tuple[str, str]]:
    pairs = []
    for ex in doc.split(SEPARATOR):
        src, tgt = ex.split("\n")
        pairs.append((src.removeprefix("source: "), tgt.removeprefix("target: ")))
    return pairs if pairs[0][0].split()[0] in (*scan.PRIMITIVES, "turn") else []


def test_episodes_are_sized_as_specified_and_true_or_consistently_renamed():
    docs = [d for d in corpus.build_documents(3, "train", 300_000) if d.startswith("source: ")]
    renamed = checked = 0
    for d in docs:
        pairs = _scan_pairs(d)
        if not pairs:
            continue
        checked += 1
        # A renamed episode may gain demonstrations so that every query word is shown.
        assert corpus.MIN_DEMONSTRATIONS + 1 <= len(pairs) <= corpus.MAX_DEMONSTRATIONS + 1 + 6
        mapping: dict[str, str] = {}
        for src, tgt in pairs:
            true = scan.interpret(src).split()
            assert len(true) == len(tgt.split())
            for a, b in zip(true, tgt.split(), strict=True):
                assert mapping.setdefault(a, b) == b  # one renaming for the whole episode
        assert len(set(mapping.values())) == len(mapping)  # a permutation, not a collapse
        if any(a != b for a, b in mapping.items()):
            renamed += 1
            shown = {w for src, _ in pairs[:-1] for w in src.split()}
            query_words = set(pairs[-1][0].split()) & {*scan.PRIMITIVES, *scan.DIRECTIONS}
            assert query_words <= shown  # the renamed answer is determined by the prompt
    assert checked > 200
    assert 0.15 < renamed / checked < 0.45  # REMAP_FRACTION = 0.3 of SCAN episodes


def test_valid_text_keeps_scan_meanings(committed_valid):
    for d in corpus.read_documents(DATA / "valid.txt"):
        for src, tgt in _scan_pairs(d) if d.startswith("source: ") else []:
            assert scan.interpret(src) == tgt


def test_stream_is_deterministic_in_seed():
    a = corpus.build_documents(1, "train", 50_000)
    assert a == corpus.build_documents(1, "train", 50_000)
    assert a != corpus.build_documents(2, "train", 50_000)


def test_task_items_are_held_out_and_deterministic():
    items = scan_task_examples(30, seed=5, part="valid")
    p = corpus.scan_partition("template")
    train_sources = {x.source for x in p.train}
    assert items == scan_task_examples(30, seed=5, part="valid")
    assert len({it.query for it in items}) == 30
    assert all(it.query in {x.source for x in p.valid} for it in items)
    for it in items:
        assert it.gold == scan.interpret(it.query)
        assert all(s in train_sources and scan.interpret(s) == t for s, t in it.demonstrations)
        assert it.prompt.endswith(f"source: {it.query}\ntarget:")
    test_items = scan_task_examples(10, seed=5, part="test", num_demonstrations=8)
    assert all("around right" in it.query and len(it.demonstrations) == 8 for it in test_items)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"part": "train"}, "part 'train'"),
        ({"n": 0}, "n: value 0"),
        ({"split": "nope"}, "'nope'"),
        ({"n": 10**6}, "has only"),
        ({"num_demonstrations": 0}, "num_demonstrations: value 0"),
    ],
)
def test_task_examples_reject_bad_input(kwargs, needle):
    args = {"n": 5, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=re.escape(needle)):
        scan_task_examples(**args)


class Continuations:
    """Test double for :class:`puzzle.generation.TextGenerator`: continues each prompt with ``answer(prompt)``,
    so the exact-match bookkeeping is checked against known outputs (a model's are not controllable)."""

    context_length = 1024

    def __init__(self, answer):
        self.answer = answer
        self.calls = []

    def generate(self, prompts, max_new_tokens, num_beams=1, num_return_sequences=1):
        self.calls.append((len(prompts), max_new_tokens, num_beams))
        return [[self.answer(p)] for p in prompts][: self.keep(len(prompts))]

    def keep(self, n):
        return n

    def count_tokens(self, texts):
        return [len(t.split()) for t in texts]


def test_exact_match_scores_parsed_continuations():
    items = scan_task_examples(12, seed=1, part="test")
    # A continuation runs on past the answer line, as greedy generation may.
    oracle = Continuations(lambda p: " " + scan.interpret(p.rsplit("source: ", 1)[1].split("\n")[0]) + "\n\nsource: x")
    assert isinstance(oracle, TextGenerator)
    r = evaluate_exact_match(oracle, items, batch_size=5)
    assert r == {"accuracy": 1.0, "n": 12, "correct": 12, "errors": []}
    assert oracle.calls == [(5, MAX_NEW_TOKENS, 1), (5, MAX_NEW_TOKENS, 1), (2, MAX_NEW_TOKENS, 1)], "greedy, batched"

    r = evaluate_exact_match(Continuations(lambda p: " I_WALK"), items)
    assert r["correct"] == sum(it.gold == "I_WALK" for it in items)
    assert r["errors"] and r["errors"][0]["prediction"] == "I_WALK"


def test_exact_match_rejects_a_generator_that_drops_prompts():
    items = [TaskItem((("walk", "I_WALK"),), "run", "I_RUN")] * 3
    short = Continuations(lambda p: " I_RUN")
    short.keep = lambda n: n - 1
    with pytest.raises(ValueError, match="2 continuations for 3 prompts"):
        evaluate_exact_match(short, items)
    with pytest.raises(ValueError, match="empty"):
        evaluate_exact_match(Continuations(lambda p: ""), [])
