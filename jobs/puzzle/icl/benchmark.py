"""The ICL compositional-generalization benchmark: exact match per dataset:split x selection method.

For each dataset of ``ICLEvalConfig.datasets``, ``num_test`` test queries are drawn (seeded); for
each method of ``ICLEvalConfig.methods`` the prompt is ``num_demonstrations`` training examples in
the shared prompt format (:mod:`puzzle.data.prompts`) and the model's greedy answer is compared
with the gold target. Cover-LS needs the query's local structures: ``structures: oracle`` takes
them from the gold program (analysis only); ``predicted`` prompts an auxiliary model with Top-K
demonstrations, decodes ``num_beams`` beams, parses each into a program (beams that do not parse
are skipped) and takes the union of their local structures, as Levy et al. (2023) do with
their fine-tuned auxiliary parser. Without an auxiliary model the evaluated model predicts its
own structures.

:func:`retention_table` turns a parent's and a child's results into rows method x split x
(parent, child, retention), the form the evaluate step reports.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from puzzle.config import ICLEvalConfig
from puzzle.data.prompts import exact_match, format_prompt, parse_answer
from puzzle.icl.datasets import ICLDataset, Item, load_dataset
from puzzle.icl.generation import TextGenerator
from puzzle.icl.selection import DemonstrationSelector
from puzzle.icl.structures import Structure, local_structures

# Generous answer budget: a target never needs more tokens than characters (plus line end and
# slack), and decoding stops at the newline anyway.
_ANSWER_SLACK = 8


def answer_budget(dataset: ICLDataset) -> int:
    """max_new_tokens for one answer: the longest training target in characters plus slack."""
    return max(len(it.target) for it in dataset.train) + _ANSWER_SLACK


def sample_test(dataset: ICLDataset, n: int, seed: int) -> list[int]:
    """Indices of ``n`` test items drawn without replacement, in dataset order (seeded)."""
    rng = random.Random(f"{seed}:{dataset.name}")
    return sorted(rng.sample(range(len(dataset.test)), min(n, len(dataset.test))))


def predict_structures(
    aux: TextGenerator,
    dataset: ICLDataset,
    selector: DemonstrationSelector,
    queries: list[str],
    k: int,
    num_beams: int,
    max_structure_size: int,
    max_new_tokens: int,
) -> list[frozenset[Structure]]:
    """Union of the local structures of the auxiliary model's parsed beams, per query."""
    prompts = []
    for q in queries:
        demos = [selector.pool[i] for i in selector.topk(q, k)]
        prompts.append(format_prompt([(d.source, d.target) for d in demos], q))
    beams = aux.generate(prompts, max_new_tokens, num_beams=num_beams, num_return_sequences=num_beams)
    out = []
    for bs in beams:
        acc: set[Structure] = set()
        for b in bs:
            tree = dataset.parse_target(parse_answer(b))
            if tree is not None:
                acc |= local_structures(tree, max_structure_size)
        out.append(frozenset(acc))
    return out


def structure_coverage(item: Item, demos: list[Item], max_structure_size: int) -> float:
    """Share of the gold program's local structures found in at least one demonstration."""
    gold = local_structures(item.program_tree, max_structure_size)
    seen: set[Structure] = set()
    for d in demos:
        seen |= local_structures(d.program_tree, max_structure_size) & gold
    return len(seen) / len(gold)


def run_icl_benchmark(
    generator: TextGenerator,
    cfg: ICLEvalConfig,
    aux_generator: TextGenerator | None = None,
    *,
    max_new_tokens: int | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Exact match of ``generator`` per dataset:split x method.

    Returns ``{"config": ..., "results": {dataset: {method: {"accuracy", "n", "correct",
    "mean_structure_coverage", "records": [...]}}}}``; each record holds the test index, source,
    gold, prediction, correctness, the chosen demonstrations (train indices, prompt order) and
    their coverage of the gold program's local structures.
    """
    aux = aux_generator or generator
    results: dict[str, Any] = {}
    for name in cfg.datasets:
        t0 = time.perf_counter()
        dataset = load_dataset(name, cfg.seed)
        selector = DemonstrationSelector(dataset.train, cfg.max_structure_size)
        budget = max_new_tokens or answer_budget(dataset)
        test_idx = sample_test(dataset, cfg.num_test, cfg.seed)
        items = [dataset.test[i] for i in test_idx]
        queries = [it.source for it in items]
        structures: list[frozenset[Structure]] | None = None
        if "cover_ls" in cfg.methods:
            if cfg.structures == "oracle":
                structures = [local_structures(it.program_tree, cfg.max_structure_size) for it in items]
            else:
                structures = predict_structures(
                    aux,
                    dataset,
                    selector,
                    queries,
                    cfg.num_demonstrations,
                    cfg.num_beams,
                    cfg.max_structure_size,
                    budget,
                )
        per_method: dict[str, Any] = {}
        for method in cfg.methods:
            chosen = [
                selector.select(
                    method,
                    q,
                    cfg.num_demonstrations,
                    cfg.seed,
                    structures[j] if structures is not None else None,
                )
                for j, q in enumerate(queries)
            ]
            prompts = [
                format_prompt([(dataset.train[i].source, dataset.train[i].target) for i in c], q)
                for c, q in zip(chosen, queries)
            ]
            answers = generator.generate(prompts, budget, num_beams=1, num_return_sequences=1)
            records = []
            for j, (it, c, a) in enumerate(zip(items, chosen, answers)):
                pred = parse_answer(a[0])
                records.append(
                    {
                        "test_index": test_idx[j],
                        "source": it.source,
                        "gold": it.target,
                        "prediction": pred,
                        "correct": exact_match(pred, it.target),
                        "demonstrations": c,
                        "structure_coverage": structure_coverage(
                            it, [dataset.train[i] for i in c], cfg.max_structure_size
                        ),
                        **(
                            {"predicted_structures": len(structures[j])}
                            if method == "cover_ls" and structures
                            else {}
                        ),
                    }
                )
            correct = sum(r["correct"] for r in records)
            per_method[method] = {
                "accuracy": correct / len(records) if records else 0.0,
                "n": len(records),
                "correct": correct,
                "mean_structure_coverage": sum(r["structure_coverage"] for r in records)
                / max(len(records), 1),
                "records": records,
            }
            if log:
                log(f"{name} {method}: {correct}/{len(records)} exact match")
        results[name] = per_method
        if log:
            log(f"{name}: {time.perf_counter() - t0:.1f}s")
    return {"config": cfg.model_dump(mode="json"), "results": results}


def retention_table(parent: dict[str, Any], child: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows {method, split, parent, child, retention} for every dataset x method in both results.

    retention = child accuracy / parent accuracy (None where the parent scores 0).
    """
    rows = []
    p_res, c_res = parent["results"], child["results"]
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
                    "method": method,
                    "split": split,
                    "parent": pa,
                    "child": ca,
                    "retention": ca / pa if pa > 0 else None,
                }
            )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`retention_table` rows."""
    lines = ["| method | split | parent | child | retention |", "|---|---|---|---|---|"]
    for r in rows:
        ret = "n/a" if r["retention"] is None else f"{r['retention']:.1%}"
        lines.append(f"| {r['method']} | {r['split']} | {r['parent']:.3f} | {r['child']:.3f} | {ret} |")
    return "\n".join(lines)
