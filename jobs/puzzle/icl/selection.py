"""Demonstration selection for in-context learning: Random, Top-K (BM25), Cover-Utt and Cover-LS.

Levy, Bogin & Berant (ACL 2023) show that, on compositional splits, demonstrations chosen to
*cover* the local structures of the test program beat demonstrations chosen only for their
similarity to the input. :class:`DemonstrationSelector` holds the training pool (the candidate
demonstrations) with a BM25 index over utterance words and an index from local structure to
the examples that contain it, and implements the four methods of the paper's comparison:

* ``random``: k examples drawn uniformly (seeded).
* ``topk``: the k examples with the highest BM25 score to the input utterance.
* ``cover_utt``: coverage of the input's words (Gupta et al. 2022): the same covering loop as
  Cover-LS with utterance words in place of program structures.
* ``cover_ls``: go through structure sizes from largest to smallest, take an uncovered structure,
  add the retriever's best training example that contains it, mark every structure that example
  covers; never two examples with the same anonymized program; when everything is covered and
  fewer than k are chosen, start over.

Every method returns pool indices ordered by ascending BM25 similarity, so the most similar
demonstration sits right before the query; ordering every method the same way leaves the choice
of demonstrations as the only difference between methods.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

from puzzle.icl.datasets import Item
from puzzle.icl.structures import Structure, anonymize, local_structures

METHODS = ("random", "topk", "cover_utt", "cover_ls")


def tokenize(text: str) -> list[str]:
    """Utterance words for BM25 and Cover-Utt: lower-cased, whitespace-separated."""
    return text.lower().split()


class BM25:
    """Okapi BM25 with Lucene's non-negative idf.

    score(q, d) = sum over query tokens t (repeats count) of
    idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl)),
    idf(t) = ln(1 + (N - n_t + 0.5) / (n_t + 0.5)).
    """

    def __init__(self, docs: Sequence[Sequence[str]], k1: float = 1.5, b: float = 0.75) -> None:
        if not docs:
            raise ValueError("BM25: the document collection is empty; at least one document is needed")
        self.k1, self.b = k1, b
        self.n_docs = len(docs)
        self.doc_len = [len(d) for d in docs]
        self.avgdl = sum(self.doc_len) / self.n_docs
        # term -> [(doc index, term frequency)]
        self.postings: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for i, d in enumerate(docs):
            for t, tf in Counter(d).items():
                self.postings[t].append((i, tf))

    def idf(self, term: str) -> float:
        n = len(self.postings.get(term, ()))
        return math.log(1.0 + (self.n_docs - n + 0.5) / (n + 0.5))

    def scores(self, query: Sequence[str]) -> list[float]:
        out = [0.0] * self.n_docs
        for t in query:
            post = self.postings.get(t)
            if not post:
                continue
            idf = self.idf(t)
            for i, tf in post:
                norm = self.k1 * (1.0 - self.b + self.b * self.doc_len[i] / self.avgdl)
                out[i] += idf * tf * (self.k1 + 1.0) / (tf + norm)
        return out


class DemonstrationSelector:
    """The demonstration pool with its BM25 and local-structure indexes."""

    def __init__(self, pool: Sequence[Item], max_structure_size: int = 4) -> None:
        if not pool:
            raise ValueError("demonstration pool is empty; the dataset's train part must have examples")
        if max_structure_size < 1:
            raise ValueError(f"max_structure_size: value {max_structure_size} is not allowed; must be >= 1")
        self.pool = list(pool)
        self.max_structure_size = max_structure_size
        self.bm25 = BM25([tokenize(it.source) for it in self.pool])
        self.words = [frozenset(tokenize(it.source)) for it in self.pool]
        # Cover-Utt treats each word as a size-1 unit to cover.
        self.word_units = [frozenset(Structure(1, w) for w in ws) for ws in self.words]
        self.templates = [str(anonymize(it.program_tree)) for it in self.pool]
        self.structures = [local_structures(it.program_tree, max_structure_size) for it in self.pool]
        self.by_structure: dict[Structure, list[int]] = defaultdict(list)
        for i, ss in enumerate(self.structures):
            for s in ss:
                self.by_structure[s].append(i)
        self.by_word: dict[str, list[int]] = defaultdict(list)
        for i, ws in enumerate(self.words):
            for w in ws:
                self.by_word[w].append(i)

    # --------------------------------------------------------------------------- helpers

    def similarity(self, query: str) -> list[float]:
        return self.bm25.scores(tokenize(query))

    def _ranking(self, scores: list[float]) -> list[int]:
        """Pool indices best first; ties go to the lower index so the ranking is fixed."""
        return sorted(range(len(scores)), key=lambda i: (-scores[i], i))

    @staticmethod
    def _ascending(chosen: list[int], scores: list[float]) -> list[int]:
        # Stable sort: equally similar demonstrations keep the order they were chosen in.
        return sorted(chosen, key=lambda i: scores[i])

    # --------------------------------------------------------------------------- methods

    def random(self, query: str, k: int, seed: int = 0) -> list[int]:
        rng = random.Random(f"{seed}:{query}")
        chosen = rng.sample(range(len(self.pool)), min(k, len(self.pool)))
        return self._ascending(chosen, self.similarity(query))

    def topk(self, query: str, k: int) -> list[int]:
        scores = self.similarity(query)
        return self._ascending(self._ranking(scores)[:k], scores)

    def cover_utt(self, query: str, k: int, seed: int = 0) -> list[int]:
        units = [Structure(1, w) for w in sorted(set(tokenize(query)))]
        index = {u: self.by_word.get(u.text, []) for u in units}
        return self._cover(query, units, index, self.word_units, k, seed, distinct_templates=False)

    def cover_ls(self, query: str, structures: Iterable[Structure], k: int, seed: int = 0) -> list[int]:
        """Cover-LS for ``query`` given its (predicted or oracle) local structures."""
        units = sorted(set(structures))
        index = {u: self.by_structure.get(u, []) for u in units}
        return self._cover(query, units, index, self.structures, k, seed, distinct_templates=True)

    def select(
        self, method: str, query: str, k: int, seed: int = 0, structures: Iterable[Structure] | None = None
    ) -> list[int]:
        if method == "random":
            return self.random(query, k, seed)
        if method == "topk":
            return self.topk(query, k)
        if method == "cover_utt":
            return self.cover_utt(query, k, seed)
        if method == "cover_ls":
            if structures is None:
                raise ValueError("method 'cover_ls' needs the query's local structures (predicted or oracle)")
            return self.cover_ls(query, structures, k, seed)
        raise ValueError(f"selection method {method!r} is unknown; allowed: {', '.join(METHODS)}")

    # --------------------------------------------------------------------------- covering

    def _cover(
        self,
        query: str,
        units: list[Structure],
        index: dict[Structure, list[int]],
        item_units: Sequence[frozenset[Structure]],
        k: int,
        seed: int,
        distinct_templates: bool,
    ) -> list[int]:
        scores = self.similarity(query)
        rank = {i: r for r, i in enumerate(self._ranking(scores))}
        rng = random.Random(f"{seed}:{query}")
        # Largest structures first (they say most about the program); the order within a size is
        # a seeded shuffle because the paper picks "an" uncovered structure, not a fixed one.
        by_size: dict[int, list[Structure]] = defaultdict(list)
        for u in units:
            by_size[u.size].append(u)
        order: list[Structure] = []
        for size in sorted(by_size, reverse=True):
            group = sorted(by_size[size])
            rng.shuffle(group)
            order.extend(group)
        query_units = frozenset(units)

        chosen: list[int] = []
        taken: set[int] = set()
        used_templates: set[str] = set()

        def usable(i: int) -> bool:
            return i not in taken and not (distinct_templates and self.templates[i] in used_templates)

        def take(i: int) -> None:
            chosen.append(i)
            taken.add(i)
            used_templates.add(self.templates[i])

        while len(chosen) < k:
            covered: set[Structure] = set()
            added = False
            for u in order:
                if len(chosen) >= k:
                    break
                if u in covered:
                    continue
                cands = [i for i in index[u] if usable(i)]
                if not cands:
                    continue
                best = min(cands, key=rank.__getitem__)
                take(best)
                added = True
                covered |= item_units[best] & query_units
            if not added:
                break
        # Nothing left that contains a query unit: fill with the retriever's ranking.
        if len(chosen) < k:
            for i in self._ranking(scores):
                if len(chosen) >= k:
                    break
                if usable(i):
                    take(i)
        return self._ascending(chosen, scores)
