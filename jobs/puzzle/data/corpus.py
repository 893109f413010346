"""The tiny parent's training and validation text: in-context SCAN episodes plus English filler.

No model or corpus can be downloaded here, so the project generates its own text. An *episode* is
what the ICL benchmark later shows the model: k demonstrations (``source: ...`` / ``target: ...``
in :mod:`puzzle.data.prompts` format, blank line between) and then a query with its target. Some
demonstrations share a sub-phrase (a word bigram) with the query and are placed last, so the model
learns to copy structure from its prompt, as Cover-LS style selection will ask of it. In 30% of
the train SCAN episodes the action names are permuted (Lake 2019's meta seq2seq episodes), so the
model must read meanings from its demonstrations rather than only memorise them.

Where the commands come from (this is what keeps evaluation honest):

- Only the ``train`` part of SCAN's ``template`` split is ever used; its ``test`` part (every
  command with ``around right``) is held out for the compositional benchmark.
- That train part is partitioned once more (fixed ``HOLDOUT_SEED``): ``valid`` queries never appear
  in training text, neither as queries nor as demonstrations; they are the in-distribution
  evaluation set (:mod:`puzzle.data.tasks`) and the queries of ``valid.txt``.
- The train part of the FunQL-style language's compositional split (:mod:`puzzle.data.geo`) is mixed in
  the same way (same held-out rule).

Filler: docstrings of the Python 3.11 standard library (read with ``ast``, never imported),
licensed under the PSF License Agreement; they make perplexity about more than one task. They are
pinned in ``examples/tiny/data/filler.txt`` because every Python build has slightly different
ones. Documents in the written files are separated by ``DOCUMENT_SEPARATOR`` (two blank lines,
which never occur inside a document).

Run ``puzzle parent corpus --out examples/tiny/data`` to (re)write ``train.txt`` and ``valid.txt``.
"""

from __future__ import annotations

import ast
import functools
import itertools
import logging
import random
import re
import sysconfig
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from puzzle.data import geo, scan
from puzzle.data.prompts import SEPARATOR, format_example

log = logging.getLogger(__name__)

DOCUMENT_SEPARATOR = "\n\n\n"
# The held-out partition of a split's train part must be the same for the corpus, the task
# evaluation and every later run, whatever seed the corpus itself is generated with.
HOLDOUT_SEED = 1234
HOLDOUT_FRACTION = 0.05
MIN_DEMONSTRATIONS = 2
MAX_DEMONSTRATIONS = 8
# Share of documents that are filler rather than episodes (by count; filler documents are longer).
FILLER_FRACTION = 0.12
# Share of train SCAN episodes whose action names are permuted (see remapped_episode).
REMAP_FRACTION = 0.3
PARTS = ("train", "valid", "test")
FILLER_PATH = Path(__file__).resolve().parents[3] / "examples" / "tiny" / "data" / "filler.txt"


@dataclass(frozen=True)
class Pair:
    """One source/target pair of a task language (SCAN command/actions, FunQL question/program)."""

    source: str
    target: str


@dataclass(frozen=True)
class TaskPartition:
    """A compositional split's pairs: ``train`` (training text), ``valid`` (held-out queries of
    the train distribution) and ``test`` (the split's compositional test part)."""

    name: str
    train: tuple[Pair, ...]
    valid: tuple[Pair, ...]
    test: tuple[Pair, ...]

    def part(self, part: str) -> tuple[Pair, ...]:
        if part not in PARTS:
            raise ValueError(f"part {part!r} is not allowed; allowed: {', '.join(PARTS)}")
        return getattr(self, part)


def _holdout(name: str, train: Sequence[Pair], test: Sequence[Pair]) -> TaskPartition:
    idx = list(range(len(train)))
    random.Random(HOLDOUT_SEED).shuffle(idx)
    cut = max(1, int(HOLDOUT_FRACTION * len(idx)))
    held = set(idx[:cut])
    return TaskPartition(
        name=name,
        train=tuple(p for i, p in enumerate(train) if i not in held),
        valid=tuple(p for i, p in enumerate(train) if i in held),
        test=tuple(test),
    )


@functools.lru_cache(maxsize=8)
def scan_partition(split: str = "template") -> TaskPartition:
    """SCAN ``split`` partitioned into train / valid (held out from training) / test."""
    if split not in scan.SPLITS:
        raise ValueError(f"SCAN split {split!r} is unknown; allowed: {', '.join(scan.SPLITS)}")
    train, test = scan.split(split)
    return _holdout(
        f"scan:{split}",
        [Pair(e.command, e.actions) for e in train],
        [Pair(e.command, e.actions) for e in test],
    )


@functools.lru_cache(maxsize=1)
def funql_partition() -> TaskPartition:
    """The FunQL (geo) language's compound split (:mod:`puzzle.data.geo`), held out the same way."""
    train, test = geo.funql_split("compositional")
    return _holdout(
        "funql:compositional",
        [Pair(x.source, x.target) for x in train],
        [Pair(x.source, x.target) for x in test],
    )


class DemonstrationSampler:
    """Draws demonstrations for a query from a pool: some random, some sharing a word bigram
    with the query (found through an inverted index, so sampling stays O(k) per episode)."""

    def __init__(self, pool: Sequence[Pair]):
        if len(pool) < MAX_DEMONSTRATIONS + 1:
            raise ValueError(
                f"demonstration pool has {len(pool)} pairs; need at least {MAX_DEMONSTRATIONS + 1}"
            )
        self.pool = tuple(pool)
        index: dict[str, list[int]] = defaultdict(list)
        for i, p in enumerate(self.pool):
            for key in _keys(p.source):
                index[key].append(i)
        self.index = dict(index)

    def similar(self, query: str, rng: random.Random, n: int, exclude: set[str]) -> list[Pair]:
        """Up to n pairs sharing a bigram (else a word) with ``query``; most specific keys first."""
        keys = [k for k in _keys(query) if k in self.index]
        bigrams = [k for k in keys if " " in k]
        words = [k for k in keys if " " not in k]
        out: list[Pair] = []
        seen = set(exclude)
        for _ in range(4 * n):
            if len(out) >= n or not keys:
                break
            choices = bigrams if bigrams and rng.random() < 0.8 else (words or bigrams)
            bucket = self.index[rng.choice(choices)]
            p = self.pool[rng.choice(bucket)]
            if p.source not in seen:
                seen.add(p.source)
                out.append(p)
        return out

    def random(self, rng: random.Random, n: int, exclude: set[str]) -> list[Pair]:
        out: list[Pair] = []
        seen = set(exclude)
        while len(out) < n:
            p = self.pool[rng.randrange(len(self.pool))]
            if p.source not in seen:
                seen.add(p.source)
                out.append(p)
        return out

    def demonstrations(self, query: str, rng: random.Random, k: int | None = None) -> list[Pair]:
        """k demonstrations for ``query`` (k drawn from [MIN, MAX] when None), similar ones last."""
        if k is None:
            k = rng.randint(MIN_DEMONSTRATIONS, MAX_DEMONSTRATIONS)
        n_similar = rng.randint(0, k)
        sim = self.similar(query, rng, n_similar, {query})
        rest = self.random(rng, k - len(sim), {query} | {p.source for p in sim})
        rng.shuffle(sim)
        return rest + sim


def _keys(source: str) -> list[str]:
    w = source.split()
    return sorted(set(w) | {f"{a} {b}" for a, b in itertools.pairwise(w)})


def format_episode(demonstrations: Sequence[Pair], query: Pair) -> str:
    """The training text of one episode: exactly the prompt an evaluation shows, plus the answer."""
    return SEPARATOR.join(format_example(p.source, p.target) for p in (*demonstrations, query))


# --- filler text -------------------------------------------------------------------------------

_WS_LINES = re.compile(r"\n\s*\n(\s*\n)+")


@functools.lru_cache(maxsize=1)
def stdlib_docstrings(min_chars: int = 200, max_chars: int = 1500) -> tuple[str, ...]:
    """Docstrings of the installed Python standard library (PSF License), in a fixed order.

    Read with ``ast`` from the ``.py`` files (tests and private ``idlelib``/``lib2to3`` trees
    skipped), kept when ASCII and of moderate length, with runs of blank lines collapsed so that
    ``DOCUMENT_SEPARATOR`` never occurs inside one.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "site-packages",
        "dist-packages",
        "turtledemo",
        "__pycache__",
    }
    out: list[str] = []
    seen: set[str] = set()
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node, clean=True)
            if not doc or not doc.isascii() or not (min_chars <= len(doc) <= max_chars):
                continue
            doc = _WS_LINES.sub("\n\n", doc).strip()
            if doc not in seen:
                seen.add(doc)
                out.append(doc)
    return tuple(out)


def filler_documents() -> tuple[str, ...]:
    """The pinned filler: ``examples/tiny/data/filler.txt`` when this is a source checkout.

    Docstrings differ between Python builds, so the stream (and the parent trained on it) would
    differ between machines; the committed file pins the docstrings of the Python that wrote it.
    Without the file (an installed wheel), this machine's docstrings are used, with a warning.
    """
    if FILLER_PATH.is_file():
        return tuple(read_documents(FILLER_PATH))
    log.warning(
        "%s not found; filler comes from this Python's docstrings, so the corpus is not "
        "the one the committed parent saw",
        FILLER_PATH,
    )
    return stdlib_docstrings()


def write_filler(path: str | Path = FILLER_PATH) -> Path:
    """Pin this Python's standard-library docstrings as the filler (``puzzle parent corpus --pin-filler``)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(DOCUMENT_SEPARATOR.join(stdlib_docstrings()) + "\n", encoding="utf-8")
    return p


def _filler_parts() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(train, valid) filler, disjoint, split with the fixed held-out seed."""
    docs = list(filler_documents())
    random.Random(HOLDOUT_SEED).shuffle(docs)
    cut = max(1, int(0.1 * len(docs)))
    return tuple(docs[cut:]), tuple(docs[:cut])


# --- documents ---------------------------------------------------------------------------------


def task_partitions(split: str = "template") -> list[TaskPartition]:
    return [scan_partition(split), funql_partition()]


def iter_documents(
    seed: int,
    part: str = "train",
    split: str = "template",
    filler_fraction: float = FILLER_FRACTION,
    remap_fraction: float = REMAP_FRACTION,
) -> Iterator[str]:
    """An endless, deterministic (in ``seed``) stream of documents for ``part`` 'train' or 'valid'.

    Train episodes draw queries and demonstrations from the train partition only; valid episodes
    draw queries from the held-out valid partition and demonstrations from train (as the task
    evaluation does). Filler comes from the disjoint train/valid halves of the docstrings.
    A ``remap_fraction`` of train SCAN episodes has its actions renamed (:func:`remapped_episode`);
    valid text keeps SCAN's own meanings.
    """
    if part not in ("train", "valid"):
        raise ValueError(f"part {part!r} is not allowed for training text; allowed: train, valid")
    if not 0 <= filler_fraction < 1:
        raise ValueError(f"filler_fraction: {filler_fraction} is not allowed; must be in [0, 1)")
    if not 0 <= remap_fraction <= 1:
        raise ValueError(f"remap_fraction: {remap_fraction} is not allowed; must be in [0, 1]")
    rng = random.Random(f"{seed}:{part}:{split}")
    tasks = task_partitions(split)
    samplers = [DemonstrationSampler(t.train) for t in tasks]
    queries = [t.part(part) for t in tasks]
    filler = _filler_parts()[0 if part == "train" else 1]
    while True:
        if filler and rng.random() < filler_fraction:
            yield filler[rng.randrange(len(filler))]
            continue
        # SCAN carries most of the weight: it is the task the whole project measures.
        t = 0 if len(tasks) == 1 or rng.random() < 0.75 else rng.randrange(1, len(tasks))
        q = queries[t][rng.randrange(len(queries[t]))]
        demos = samplers[t].demonstrations(q.source, rng)
        if t == 0 and part == "train" and rng.random() < remap_fraction:
            demos, q = remapped_episode(samplers[t], demos, q, rng)
        yield format_episode(demos, q)


def remapped_episode(
    sampler: DemonstrationSampler, demos: list[Pair], query: Pair, rng: random.Random
) -> tuple[list[Pair], Pair]:
    """The episode with SCAN's actions renamed by a random permutation, consistently in every pair.

    Lake (2019, meta seq2seq) showed that episodes whose primitive meanings change make a model
    read them from its demonstrations instead of memorising one mapping: the skill the held-out
    ``around right`` queries need. Left/right swap with probability 1/2, so ``around`` is learnt
    for both turn actions while the *command* ``around right`` still never occurs. Every
    primitive or direction word of the query is shown in some demonstration (one is added where
    missing), so the renamed answer is always determined by the prompt.
    """
    actions = list(scan.ACTION.values())
    renamed = dict(zip(actions, rng.sample(actions, len(actions)), strict=True))
    turns = list(scan.TURN.values())
    renamed.update(zip(turns, turns[::-1] if rng.random() < 0.5 else turns, strict=True))
    shown = {w for d in demos for w in d.source.split()}
    needed = [w for w in query.source.split() if w in (*scan.PRIMITIVES, *scan.DIRECTIONS) and w not in shown]
    for w in dict.fromkeys(needed):
        if w in shown:
            continue
        bucket = [i for i in sampler.index.get(w, ()) if sampler.pool[i].source != query.source]
        extra = sampler.pool[rng.choice(bucket)]
        shown |= set(extra.source.split())
        demos = [extra, *demos]

    def rename(p: Pair) -> Pair:
        return Pair(p.source, " ".join(renamed[a] for a in p.target.split()))

    return [rename(d) for d in demos], rename(query)


def build_documents(seed: int, part: str, max_chars: int, split: str = "template") -> list[str]:
    """The first documents of :func:`iter_documents` totalling at most ``max_chars`` characters."""
    out: list[str] = []
    total = 0
    for doc in iter_documents(seed, part, split):
        total += len(doc) + len(DOCUMENT_SEPARATOR)
        if total > max_chars:
            break
        out.append(doc)
    return out


def write_corpus(
    out_dir: str | Path,
    seed: int = 0,
    train_chars: int = 2_000_000,
    valid_chars: int = 300_000,
    split: str = "template",
) -> dict[str, Path]:
    """Write ``train.txt`` and ``valid.txt`` (documents joined by ``DOCUMENT_SEPARATOR``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for part, chars in (("train", train_chars), ("valid", valid_chars)):
        p = out / f"{part}.txt"
        p.write_text(
            DOCUMENT_SEPARATOR.join(build_documents(seed, part, chars, split)) + "\n", encoding="utf-8"
        )
        paths[part] = p
    return paths


def read_documents(path: str | Path) -> list[str]:
    """The documents of a file written by :func:`write_corpus`."""
    text = Path(path).read_text(encoding="utf-8").strip("\n")
    return [d for d in text.split(DOCUMENT_SEPARATOR) if d.strip()]
