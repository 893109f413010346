"""Demonstration selection for in-context learning: Random, Top-K (BM25), Cover-Utt and Cover-LS, in two modes.

Levy, Bogin & Berant (ACL 2023) show that, on compositional splits, demonstrations chosen to *cover*
the local structures of the test program beat demonstrations chosen only for their similarity to the
input. Both selectors hold the training pool (the candidate demonstrations) with a BM25 retriever and
an index from local structure to the examples holding it.

:class:`PaperSelector` (``selection: paper``, the default) follows the authors' definitions:

* retriever: BM25 (Okapi idf, :class:`BM25`) over the *atoms* (:func:`~puzzle.icl.structures.program_atoms`)
  of each example's anonymized program, a document being its set of distinct atoms; the query is the set
  of atoms of its predicted programs. Ties go to a seeded random order of the pool, fixed per query.
* ``random``: k examples drawn uniformly (seeded), in random order.
* ``topk``: the k best by the retriever, query = the atoms of the top predicted program.
* ``cover_utt``: the covering loop below over the query's utterance words (the examples' words as units),
  retriever as for Top-K.
* ``cover_ls``: rounds of a greedy cover of the query's local structures (those of all its predicted
  programs, atoms included). A round starts with every structure uncovered and goes through the sizes
  from largest to smallest; at each size it repeatedly takes, uniformly at random (seeded), an uncovered
  structure of that size that some usable example holds, adds the retriever's best usable example holding
  it, and marks every structure of that example covered; when no uncovered structure of the size is held
  by a usable example it moves to the next smaller size. Using an example makes every example with the
  same anonymized program (template) unusable. Rounds repeat until k examples are chosen, or until no
  usable example holds any of the query's smallest structures, and then fewer than k are returned.

Every paper-mode method returns pool indices in *prompt order*: Random in its random order, the others
from the least to the most similar under the method's retriever, so the most similar demonstration sits
right before the query. The benchmark cuts a prompt that does not fit the model by dropping demonstrations
from the front (the least similar first).

:class:`DemonstrationSelector` (``selection: fragments``) is this project's earlier variant: BM25 (Lucene
idf) over utterance words, fragment local structures, a round-robin cover that fills with the retriever's
ranking; every method's picks ordered by ascending utterance similarity.
"""

from __future__ import annotations

import functools
import math
import random
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import numpy as np

from puzzle.data.programs import Item
from puzzle.icl.structures import Structure, anonymize, fragment_structures, local_structures, program_atoms

METHODS = ("random", "topk", "cover_utt", "cover_ls")


def tokenize(text: str) -> list[str]:
    """Utterance words for BM25 and Cover-Utt: lower-cased, whitespace-separated."""
    return text.lower().split()



def inverted(keys_per_item: Iterable[Iterable[Hashable]]) -> dict[Any, list[int]]:
    """key -> the indices of the items holding it, in item order (a missing key reads as no items)."""
    out: dict[Any, list[int]] = defaultdict(list)
    for i, keys in enumerate(keys_per_item):
        for k in keys:
            out[k].append(i)
    return out

class BM25:
    """Okapi BM25 over token lists (repeats count, in the documents and in the query).

    score(q, d) = sum over query tokens t of idf(t) * tf(t, d) * (k1 + 1) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl)).

    ``idf="lucene"`` (fragments mode): idf(t) = ln(1 + (N - n_t + 0.5) / (n_t + 0.5)), never negative.
    ``idf="okapi"`` (paper mode, the retriever of the authors' code, rank_bm25's BM25Okapi):
    idf(t) = ln((N - n_t + 0.5) / (n_t + 0.5)), and a term in more than half the documents, whose idf
    would be negative, gets epsilon * (mean idf over the vocabulary) instead, epsilon = 0.25.
    """

    def __init__(
        self, docs: Sequence[Sequence[str]], k1: float = 1.5, b: float = 0.75, idf: str = "lucene", epsilon: float = 0.25
    ) -> None:
        if not docs:
            raise ValueError("BM25: the document collection is empty; at least one document is needed")
        if idf not in ("lucene", "okapi"):
            raise ValueError(f"BM25 idf: value {idf!r} is not allowed; allowed: lucene, okapi")
        self.k1, self.b = k1, b
        self.n_docs = len(docs)
        self.doc_len = [len(d) for d in docs]
        self.avgdl = sum(self.doc_len) / self.n_docs
        # term -> [(doc index, term frequency)]
        self.postings: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for i, d in enumerate(docs):
            for t, tf in Counter(d).items():
                self.postings[t].append((i, tf))
        n, big = self.n_docs, {t: len(p) for t, p in self.postings.items()}
        if idf == "lucene":
            self._idf = {t: math.log(1.0 + (n - c + 0.5) / (c + 0.5)) for t, c in big.items()}
        else:
            raw = {t: math.log((n - c + 0.5) / (c + 0.5)) for t, c in big.items()}
            floor = epsilon * sum(raw.values()) / len(raw) if raw else 0.0
            self._idf = {t: (floor if v < 0 else v) for t, v in raw.items()}
        # Per term: the documents holding it and their term weights, so scoring is one gather per query term.
        dl = np.asarray(self.doc_len, dtype=np.float64)
        self._weights: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for t, post in self.postings.items():
            ids = np.fromiter((i for i, _ in post), dtype=np.int64, count=len(post))
            tf = np.fromiter((f for _, f in post), dtype=np.float64, count=len(post))
            norm = k1 * (1.0 - b + b * dl[ids] / self.avgdl)
            self._weights[t] = (ids, self._idf[t] * tf * (k1 + 1.0) / (tf + norm))

    def idf(self, term: str) -> float:
        """idf of a term of the collection; 0 for one it never holds (it adds nothing to any score)."""
        return self._idf.get(term, 0.0)

    def scores(self, query: Sequence[str]) -> list[float]:
        return self.score_array(query).tolist()

    def score_array(self, query: Sequence[str]) -> np.ndarray:
        """Scores of every document, (N,) float64."""
        out = np.zeros(self.n_docs)
        for t in query:
            hit = self._weights.get(t)
            if hit is not None:
                out[hit[0]] += hit[1]  # a document holds a term once in its postings: no index repeats
        return out


class DemonstrationSelector:
    """Fragments mode: the demonstration pool with its utterance-BM25 and fragment-structure indexes."""

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
        self.structures = [fragment_structures(it.program_tree, max_structure_size) for it in self.pool]
        self.by_structure: dict[Structure, list[int]] = inverted(self.structures)
        self.by_word: dict[str, list[int]] = inverted(self.words)

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


# ------------------------------------------------------------------------------------------ paper


class PaperSelector:
    """Paper mode: the pool with its program-atom BM25, local-structure, word and template indexes.

    Methods take the query utterance (it seeds the per-query random choices) and what the method needs of
    the query's predicted programs: ``top_atoms`` (atoms of the top one) or ``atoms`` and ``structures``
    (of all of them). They return pool indices in prompt order.
    """

    def __init__(self, pool: Sequence[Item], n: int = 30) -> None:
        if not pool:
            raise ValueError("demonstration pool is empty; the dataset's train part must have examples")
        if n < 1:
            raise ValueError(f"max_structure_size: value {n} is not allowed; must be >= 1")
        self.pool = list(pool)
        self.n = n
        templates = [anonymize(it.program_tree) for it in self.pool]
        self.templates = [str(t) for t in templates]
        self.atoms = [program_atoms(t) for t in self.templates]
        self.bm25 = BM25(self.atoms, idf="okapi")
        self.structures = [local_structures(t, n) for t in templates]
        self.words = [frozenset(tokenize(it.source)) for it in self.pool]
        self.word_units = [frozenset(Structure(1, w) for w in ws) for ws in self.words]
        self.by_structure: dict[Structure, list[int]] = inverted(self.structures)
        self.by_word: dict[Structure, list[int]] = inverted(self.word_units)
        self.same_template: dict[str, list[int]] = inverted([t] for t in self.templates)
        # Utterance BM25 for the structure predictor's prompts, before any program is predicted.
        self.utterance_bm25 = BM25([tokenize(it.source) for it in self.pool])

    # --------------------------------------------------------------------------- retriever

    def ranking(self, query: str, atoms: Iterable[str], seed: int = 0) -> list[int]:
        """Pool indices, most similar first: BM25 over distinct atoms, ties in a seeded random order of the
        pool fixed per query (as the authors' retriever shuffles its candidates before sorting)."""
        return list(self._ranking(query, tuple(sorted(set(atoms))), seed))

    @functools.lru_cache(maxsize=8)  # noqa: B019 - a handful of (query, atoms) per query, reused across methods
    def _ranking(self, query: str, atoms: tuple[str, ...], seed: int) -> tuple[int, ...]:
        scores = self.bm25.score_array(atoms)
        tie = np.arange(len(self.pool))
        random.Random(f"{seed}:{query}:ties").shuffle(tie)  # tie[r] = pool index at tie-break rank r
        pos = np.empty_like(tie)
        pos[tie] = np.arange(len(tie))
        return tuple(np.lexsort((pos, -scores)).tolist())

    @staticmethod
    def _most_similar_last(chosen: Iterable[int], ranking: list[int]) -> list[int]:
        rank = {i: r for r, i in enumerate(ranking)}
        return sorted(chosen, key=rank.__getitem__, reverse=True)

    def utterance_topk(self, query: str, k: int) -> list[int]:
        """The k best examples by utterance BM25, least similar first (the structure predictor's prompt)."""
        scores = self.utterance_bm25.scores(tokenize(query))
        best = sorted(range(len(self.pool)), key=lambda i: (-scores[i], i))[:k]
        return best[::-1]

    # --------------------------------------------------------------------------- methods

    def random(self, query: str, k: int, seed: int = 0) -> list[int]:
        return random.Random(f"{seed}:{query}:random").sample(range(len(self.pool)), min(k, len(self.pool)))

    def topk(self, query: str, top_atoms: Iterable[str], k: int, seed: int = 0) -> list[int]:
        ranking = self.ranking(query, top_atoms, seed)
        return ranking[:k][::-1]

    def cover_utt(self, query: str, top_atoms: Iterable[str], k: int, seed: int = 0) -> list[int]:
        ranking = self.ranking(query, top_atoms, seed)
        return self._most_similar_last(self.cover_utt_picks(query, top_atoms, k, seed), ranking)

    def cover_utt_picks(self, query: str, top_atoms: Iterable[str], k: int, seed: int = 0) -> list[int]:
        """Cover-Utt's picks in the order the greedy makes them."""
        units = sorted({Structure(1, w) for w in tokenize(query)})
        return self._cover(query, units, self.by_word, self.word_units, self.ranking(query, top_atoms, seed), k, seed)

    def cover_ls(
        self, query: str, atoms: Iterable[str], structures: Iterable[Structure], k: int, seed: int = 0
    ) -> list[int]:
        """Cover-LS given the atoms and local structures of the query's predicted (or oracle) programs."""
        atoms = list(atoms)
        ranking = self.ranking(query, atoms, seed)
        return self._most_similar_last(self.cover_ls_picks(query, atoms, structures, k, seed), ranking)

    def cover_ls_picks(
        self, query: str, atoms: Iterable[str], structures: Iterable[Structure], k: int, seed: int = 0
    ) -> list[int]:
        """Cover-LS's picks in the order the greedy makes them."""
        atoms = list(atoms)
        units = sorted(set(structures) | {Structure(1, a) for a in atoms})
        return self._cover(query, [u for u in units if u.size <= self.n], self.by_structure, self.structures,
                           self.ranking(query, atoms, seed), k, seed)

    # --------------------------------------------------------------------------- covering

    def _cover(
        self,
        query: str,
        units: list[Structure],
        index: dict[Structure, list[int]],
        item_units: Sequence[frozenset[Structure]],
        ranking: list[int],
        k: int,
        seed: int,
    ) -> list[int]:
        """The greedy of the module docstring; ``units`` sorted, so the seeded choices are reproducible."""
        rank = [0] * len(ranking)
        for r, i in enumerate(ranking):
            rank[i] = r
        rng = random.Random(f"{seed}:{query}:cover")
        by_size: dict[int, list[Structure]] = defaultdict(list)
        for u in units:
            by_size[u.size].append(u)
        sizes = sorted(by_size, reverse=True)
        chosen: list[int] = []
        unusable: set[int] = set()
        all_units = frozenset(units)
        while len(chosen) < k and sizes:
            uncovered = set(all_units)
            exhausted = False
            for size in sizes:
                exhausted = False
                while len(chosen) < k:
                    held = [u for u in by_size[size] if any(i not in unusable for i in index.get(u, ()))]
                    if not held:
                        exhausted = True
                        break
                    open_units = [u for u in held if u in uncovered]
                    if not open_units:
                        break
                    u = rng.choice(open_units)
                    best = min((i for i in index[u] if i not in unusable), key=rank.__getitem__)
                    chosen.append(best)
                    unusable.update(self.same_template[self.templates[best]])
                    uncovered -= item_units[best]
            if exhausted:  # the smallest size: no usable example holds any query unit any more
                break
        return chosen

    def select(
        self,
        method: str,
        query: str,
        k: int,
        seed: int = 0,
        top_atoms: Iterable[str] = (),
        atoms: Iterable[str] = (),
        structures: Iterable[Structure] = (),
    ) -> list[int]:
        if method == "random":
            return self.random(query, k, seed)
        if method == "topk":
            return self.topk(query, top_atoms, k, seed)
        if method == "cover_utt":
            return self.cover_utt(query, top_atoms, k, seed)
        if method == "cover_ls":
            return self.cover_ls(query, atoms, structures, k, seed)
        raise ValueError(f"selection method {method!r} is unknown; allowed: {', '.join(METHODS)}")
