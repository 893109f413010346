"""The ICL compositional-generalization benchmark: exact match per dataset:split x selection method.

For each dataset of ``ICLEvalConfig.datasets``, ``num_test`` test queries are drawn (seeded). The run has
two phases, and only the second involves the evaluated model:

1. :func:`plan_icl` picks every prompt. The *structure predictor* (the parent, a separately trained model,
   or the gold programs: ``structure_predictor``) predicts each query's program once per dataset:
   ``num_beams`` beams of a prompt of utterance-BM25 Top-K demonstrations (the authors' auxiliary model is
   a finetuned parser that needs none; a causal LM does, and before any program is predicted the utterance
   is all a retriever has). The selection mode (``selection``, :mod:`puzzle.icl.selection`) then chooses
   ``k`` demonstrations per method and orders them, and a prompt longer than the budget loses
   demonstrations from the front (the least similar) until it fits. The budget is the measuring model's
   context length (the parent's ``max_position_embeddings``, or ``max_context_tokens`` if shorter) minus
   the answer budget, counted in its own tokens (:meth:`puzzle.generation.TextGenerator.count_tokens`).
2. :func:`run_icl_benchmark` shows every prompt to the evaluated model and scores its greedy answer by
   exact match, with a Wilson 95% interval (:func:`wilson_interval`).

Nothing of phase 1 depends on the evaluated model, so a parent and all its children are evaluated on the
very same prompts (pass one ``plan`` to several runs, or let each recompute it: it is deterministic).

Paper mode reads a predicted program off each beam: its atoms from the text even when it does not parse,
its local structures from the text repaired (:func:`puzzle.icl.structures.repair_parentheses`) where it
then parses; training programs are anonymized, query beams are taken raw, as in the authors' code. Oracle
structures are those of the anonymized gold program. Fragments mode keeps this project's earlier rules:
parsed beams only, both sides anonymized, utterance BM25.

:func:`retention_table` turns a parent's and a child's results into rows method x split x (parent, child,
retention), the form the evaluate step reports.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from puzzle.config import ICLEvalConfig
from puzzle.data.prompts import exact_match, format_prompt, parse_answer
from puzzle.generation import TextGenerator
from puzzle.icl.datasets import ICLDataset, Item, load_dataset
from puzzle.icl.selection import DemonstrationSelector, PaperSelector
from puzzle.icl.structures import (
    Structure,
    anonymize,
    fragment_structures,
    local_structures,
    parse_program,
    program_atoms,
    repair_parentheses,
)

# Tokens past the longest target: the answer's newline, a BOS the count includes, and slack.
ANSWER_SLACK = 8
# Methods that read the predictor's programs, per mode (fragments' Top-K and Cover-Utt use utterances).
NEEDS_PREDICTION = {"paper": ("topk", "cover_utt", "cover_ls"), "fragments": ("cover_ls",)}
_Z95 = 1.959963984540054


def wilson_interval(correct: int, n: int, z: float = _Z95) -> list[float]:
    """Wilson score interval [lo, hi] of a binomial proportion (95% by default); [0, 1] when n = 0."""
    if n == 0:
        return [0.0, 1.0]
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]


def answer_budget(dataset: ICLDataset, measure: TextGenerator) -> int:
    """max_new_tokens for one answer: the longest target of the dataset in the model's tokens, plus slack.

    Test targets count too: a length split's answers are longer than any demonstration's, and this is only
    a cap (decoding stops at the answer's newline)."""
    targets = sorted({" " + it.target for it in (*dataset.train, *dataset.test)})
    return max(measure.count_tokens(targets)) + ANSWER_SLACK


def context_tokens(cfg: ICLEvalConfig, model: TextGenerator) -> int:
    """Tokens a prompt and its answer may take: the model's context, or ``max_context_tokens`` if shorter."""
    return min(model.context_length, cfg.max_context_tokens or model.context_length)


def sample_test(dataset: ICLDataset, n: int, seed: int) -> list[int]:
    """Indices of ``n`` test items drawn without replacement, in dataset order (seeded)."""
    rng = random.Random(f"{seed}:{dataset.name}")
    return sorted(rng.sample(range(len(dataset.test)), min(n, len(dataset.test))))


def _prompt(dataset: ICLDataset, demos: Sequence[int], query: str) -> str:
    return format_prompt([(dataset.train[i].source, dataset.train[i].target) for i in demos], query)


def fit_to_budget(
    dataset: ICLDataset, demos: Sequence[int], query: str, measure: TextGenerator, budget: int
) -> tuple[list[int], str]:
    """Drop demonstrations from the front (the least similar) until the prompt takes at most ``budget`` tokens.

    Returns the kept demonstrations and the prompt. A query that does not fit even alone is an error.
    """
    demos = list(demos)
    full = _prompt(dataset, demos, query)
    if measure.count_tokens([full])[0] <= budget:
        return demos, full
    # Every suffix at once: one batched tokenization instead of one per dropped demonstration.
    prompts = [_prompt(dataset, demos[c:], query) for c in range(1, len(demos) + 1)]
    for c, (p, n) in enumerate(zip(prompts, measure.count_tokens(prompts)), start=1):
        if n <= budget:
            return demos[c:], p
    raise ValueError(
        f"query {query!r}: its prompt does not fit the context even without demonstrations ({budget} tokens "
        "left after the answer budget); the model's max_position_embeddings is too small for this dataset"
    )


# ----------------------------------------------------------------------------------------- planning


@dataclass
class Prediction:
    """The predictor's view of one query: program texts of its beams (None: the beam is no program)."""

    programs: list[str | None]
    atoms: list[str] = field(default_factory=list)  # of every beam, parsable or not
    top_atoms: list[str] = field(default_factory=list)  # of the top beam
    structures: frozenset[Structure] = frozenset()  # paper: of the repaired beams that parse, atoms included


@dataclass
class DatasetPlan:
    """Everything one dataset's evaluation shows a model: the queries and, per method, the prompts."""

    name: str
    dataset: ICLDataset
    test_index: list[int]
    budget: int  # prompt tokens allowed
    max_new_tokens: int
    predictions: list[Prediction] | None
    selected: dict[str, list[list[int]]]  # method -> per query, the selection's picks in prompt order
    demonstrations: dict[str, list[list[int]]]  # the same after the budget cut
    prompts: dict[str, list[str]]

    @property
    def items(self) -> list[Item]:
        return [self.dataset.test[i] for i in self.test_index]


def _read_programs(dataset: ICLDataset, beams: list[str], n: int) -> Prediction:
    """Paper mode: atoms of every beam (parsable or not), structures of the programs that parse once repaired."""
    targets = [parse_answer(b) for b in beams]
    programs = [dataset.program_text(t) for t in targets]
    atoms: set[str] = set()
    structures: set[Structure] = set()
    for target, text in zip(targets, programs):
        atoms |= set(dataset.target_atoms(target))
        if text is None:
            continue
        try:
            tree = parse_program(repair_parentheses(text))
        except ValueError:
            continue  # its atoms stay: the authors keep the atoms of beams that do not parse
        structures |= local_structures(tree, n)
    top = dataset.target_atoms(targets[0]) if targets else []
    return Prediction(programs, sorted(atoms), top, frozenset(structures | {Structure(1, a) for a in atoms}))


def _fragments_structures(dataset: ICLDataset, beams: list[str], n: int) -> Prediction:
    """Fragments mode: the union of the fragment structures of the beams that parse."""
    acc: set[Structure] = set()
    programs: list[str | None] = []
    for b in beams:
        tree = dataset.parse_target(parse_answer(b))
        programs.append(None if tree is None else str(tree))
        if tree is not None:
            acc |= fragment_structures(tree, n)
    return Prediction(programs, structures=frozenset(acc))


def predict_programs(
    predictor: TextGenerator,
    dataset: ICLDataset,
    queries: list[str],
    cfg: ICLEvalConfig,
    demonstrations: Callable[[str, int], list[int]],
) -> list[list[str]]:
    """The predictor's ``num_beams`` beams per query, prompted with ``demonstrations(query, k)`` cut to its
    own context (raw continuations, best first)."""
    budget = answer_budget(dataset, predictor)
    room = context_tokens(cfg, predictor) - budget
    prompts = [fit_to_budget(dataset, demonstrations(q, cfg.k), q, predictor, room)[1] for q in queries]
    return predictor.generate(prompts, budget, num_beams=cfg.num_beams, num_return_sequences=cfg.num_beams)


#: ``cache(dataset name, compute)`` -> the predictor's beams per query: compute() once, then reuse (evaluate
#: keeps them in the run, so the parent predicts each query's programs once for every model evaluated)
BeamsCache = Callable[[str, Callable[[], list[list[str]]]], list[list[str]]]


def plan_dataset(
    name: str,
    cfg: ICLEvalConfig,
    measure: TextGenerator,
    predictor: TextGenerator | None,
    *,
    max_new_tokens: int | None = None,
    beams_cache: BeamsCache | None = None,
) -> DatasetPlan:
    """Phase 1 for one dataset: queries, the predictor's programs, every method's demonstrations and prompts."""
    dataset = load_dataset(name, cfg.seed)
    test_idx = sample_test(dataset, cfg.num_test, cfg.seed)
    items = [dataset.test[i] for i in test_idx]
    queries = [it.source for it in items]
    new_tokens = max_new_tokens or answer_budget(dataset, measure)
    budget = context_tokens(cfg, measure) - new_tokens
    paper = cfg.selection == "paper"
    n, k, seed = cfg.structure_size, cfg.k, cfg.seed
    sel: PaperSelector | DemonstrationSelector = PaperSelector(dataset.train, n) if paper else (
        DemonstrationSelector(dataset.train, n))

    predictions: list[Prediction] | None = None
    if any(m in NEEDS_PREDICTION[cfg.selection] for m in cfg.methods):
        if cfg.structure_predictor == "oracle":
            # The authors' oracle: the gold program, anonymized like the training programs.
            beams = [[str(anonymize(it.program_tree))] for it in items]
            gold = True
        else:
            if predictor is None:
                raise ValueError(f"structure_predictor {cfg.structure_predictor!r}: no predictor model was given")
            demos = sel.utterance_topk if isinstance(sel, PaperSelector) else sel.topk
            def compute() -> list[list[str]]:
                return predict_programs(predictor, dataset, queries, cfg, demos)

            beams = beams_cache(name, compute) if beams_cache is not None else compute()
            gold = False
        if paper:
            # A gold beam is a program text already; predicted beams are targets (SCAN: action sequences).
            ds = dataset if not gold else _as_program_dataset(dataset)
            predictions = [_read_programs(ds, b, n) for b in beams]
        elif gold:
            predictions = [Prediction([str(it.program_tree)], structures=fragment_structures(it.program_tree, n))
                           for it in items]
        else:
            predictions = [_fragments_structures(dataset, b, n) for b in beams]

    selected: dict[str, list[list[int]]] = {}
    for method in cfg.methods:
        picks = []
        for j, q in enumerate(queries):
            p = predictions[j] if predictions is not None else None
            if isinstance(sel, PaperSelector):
                picks.append(sel.select(method, q, k, seed, top_atoms=p.top_atoms if p else (),
                                        atoms=p.atoms if p else (), structures=p.structures if p else ()))
            else:
                picks.append(sel.select(method, q, k, seed, p.structures if p else None))
        selected[method] = picks
    demonstrations: dict[str, list[list[int]]] = {}
    prompts: dict[str, list[str]] = {}
    for method, picks in selected.items():
        fitted = [fit_to_budget(dataset, c, q, measure, budget) for c, q in zip(picks, queries)]
        demonstrations[method] = [d for d, _ in fitted]
        prompts[method] = [p for _, p in fitted]
    return DatasetPlan(name, dataset, test_idx, budget, new_tokens, predictions, selected, demonstrations, prompts)


def _as_program_dataset(dataset: ICLDataset) -> ICLDataset:
    """The dataset seen with program texts as targets (gold beams are programs, whatever the targets are)."""
    return ICLDataset(dataset.train, dataset.test, dataset.name, parse_target=dataset.parse_target,
                      program_text=lambda t: t, target_atoms=program_atoms)


def plan_icl(
    cfg: ICLEvalConfig,
    measure: TextGenerator,
    predictor: TextGenerator | None = None,
    *,
    max_new_tokens: int | None = None,
    log: Callable[[str], None] | None = None,
    beams_cache: BeamsCache | None = None,
) -> dict[str, DatasetPlan]:
    """Phase 1 for every dataset of ``cfg``; ``measure`` sets the prompt budget (the parent's tokenizer and
    context), ``predictor`` predicts the programs (not used with ``structure_predictor: oracle``)."""
    plans = {}
    for name in cfg.datasets:
        t0 = time.perf_counter()
        plans[name] = plan_dataset(name, cfg, measure, predictor, max_new_tokens=max_new_tokens,
                                   beams_cache=beams_cache)
        if log:
            log(f"{name}: prompts planned in {time.perf_counter() - t0:.1f}s (budget {plans[name].budget} tokens)")
    return plans


# ---------------------------------------------------------------------------------------- evaluating


def structure_coverage(item: Item, demos: list[Item], cfg: ICLEvalConfig) -> float:
    """Share of the gold program's local structures (of the mode, anonymized) found in some demonstration."""
    def of(it: Item) -> frozenset[Structure]:
        if cfg.selection == "paper":
            return local_structures(anonymize(it.program_tree), cfg.structure_size)
        return fragment_structures(it.program_tree, cfg.structure_size)

    gold = of(item)
    seen: set[Structure] = set()
    for d in demos:
        seen |= of(d) & gold
    return len(seen) / len(gold)


def run_icl_benchmark(
    generator: TextGenerator,
    cfg: ICLEvalConfig,
    predictor: TextGenerator | None = None,
    *,
    measure: TextGenerator | None = None,
    plan: dict[str, DatasetPlan] | None = None,
    max_new_tokens: int | None = None,
    log: Callable[[str], None] | None = None,
    beams_cache: BeamsCache | None = None,
) -> dict[str, Any]:
    """Exact match of ``generator`` per dataset:split x method.

    ``predictor`` predicts the query programs (default: ``generator`` itself, the parent evaluating itself);
    ``measure`` sets the prompt budget (default: ``generator``); ``plan`` reuses the prompts of an earlier
    :func:`plan_icl`, so several models see exactly the same ones.

    Returns ``{"config", "selection", "structure_predictor", "results": {dataset: {method: {"accuracy",
    "ci95", "n", "correct", "mean_structure_coverage", "mean_demonstrations", "records": [...]}}},
    "prompt_budget": {dataset: tokens}}``; each record holds the test index, source, gold, prediction,
    correctness, the demonstrations (train indices, prompt order, after the budget cut), how many the
    selection picked, and their coverage of the gold program's local structures.
    """
    measure = measure or generator
    if plan is None:
        needs = cfg.structure_predictor != "oracle"
        plan = plan_icl(cfg, measure, (predictor or generator) if needs else None, max_new_tokens=max_new_tokens,
                        log=log, beams_cache=beams_cache)
    results: dict[str, Any] = {}
    for name, dp in plan.items():
        t0 = time.perf_counter()
        items, train = dp.items, dp.dataset.train
        per_method: dict[str, Any] = {}
        for method, prompts in dp.prompts.items():
            answers = generator.generate(prompts, dp.max_new_tokens, num_beams=1, num_return_sequences=1)
            records = []
            for j, (it, a) in enumerate(zip(items, answers, strict=True)):
                demos = dp.demonstrations[method][j]
                pred = parse_answer(a[0])
                rec = {
                    "test_index": dp.test_index[j],
                    "source": it.source,
                    "gold": it.target,
                    "prediction": pred,
                    "correct": exact_match(pred, it.target),
                    "demonstrations": demos,
                    "selected": len(dp.selected[method][j]),
                    "structure_coverage": structure_coverage(it, [train[i] for i in demos], cfg),
                }
                if dp.predictions is not None and method == "cover_ls":
                    rec["predicted_programs"] = dp.predictions[j].programs
                    rec["predicted_structures"] = len(dp.predictions[j].structures)
                records.append(rec)
            correct = sum(r["correct"] for r in records)
            n = len(records)
            per_method[method] = {
                "accuracy": correct / n if n else 0.0,
                "ci95": wilson_interval(correct, n),
                "n": n,
                "correct": correct,
                "mean_structure_coverage": sum(r["structure_coverage"] for r in records) / max(n, 1),
                "mean_demonstrations": sum(len(r["demonstrations"]) for r in records) / max(n, 1),
                "records": records,
            }
            if log:
                log(f"{name} {method}: {correct}/{n} exact match")
        results[name] = per_method
        if log:
            log(f"{name}: evaluated in {time.perf_counter() - t0:.1f}s")
    return {
        "config": cfg.model_dump(mode="json"),
        "selection": cfg.selection,
        "structure_predictor": cfg.structure_predictor,
        "prompt_budget": {name: dp.budget for name, dp in plan.items()},
        "results": results,
    }


def retention_table(parent: dict[str, Any], child: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows {selection, method, split, parent, child, retention, parent_ci95, child_ci95} for every dataset x
    method in both results; retention = child accuracy / parent accuracy (None where the parent scores 0)."""
    rows = []
    p_res, c_res = parent["results"], child["results"]
    selection = child.get("selection") or (child.get("config") or {}).get("selection")
    for split in p_res:
        if split not in c_res:
            continue
        for method, p in p_res[split].items():
            c = c_res[split].get(method)
            if c is None:
                continue
            pa, ca = p["accuracy"], c["accuracy"]
            rows.append(
                {
                    "selection": selection,
                    "method": method,
                    "split": split,
                    "parent": pa,
                    "child": ca,
                    "retention": ca / pa if pa > 0 else None,
                    "parent_ci95": p.get("ci95"),
                    "child_ci95": c.get("ci95"),
                }
            )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`retention_table` rows."""
    lines = ["| selection | method | split | parent | child | retention |", "|---|---|---|---|---|---|"]
    for r in rows:
        ret = "n/a" if r["retention"] is None else f"{r['retention']:.1%}"
        lines.append(
            f"| {r.get('selection') or '?'} | {r['method']} | {r['split']} | {r['parent']:.3f} | {r['child']:.3f} "
            f"| {ret} |"
        )
    return "\n".join(lines)
