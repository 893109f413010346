"""Evaluation of a model (a child, a baseline or the parent itself) against the parent: what ``evaluate`` measures.

- :func:`compare_to_parent`: KL(parent || model) of next-token distributions and both perplexities on
  the same held-out sequences;
- :func:`task_accuracy`: exact match on the tiny SCAN task (:mod:`puzzle.data.tasks`) through any
  :class:`puzzle.generation.TextGenerator` (the evaluate step's: :class:`puzzle.generation.DeciTextGenerator`);
- :func:`icl_results`: the ICL benchmark (:mod:`puzzle.icl`) for each selection method;
- :func:`throughput_figures`: measured tokens/s per scenario next to the profile's prediction;
- :func:`lm_eval_results`: lm-evaluation-harness tasks through its Python API with
  :class:`DeciLMEval` as the model (tasks by name, or local task files: ``.yaml``/``.json`` configs).
"""

from __future__ import annotations

import copy
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from puzzle import distributed as dist
from puzzle.config import ConfigError, ICLEvalConfig, ProfileConfig, Scenario
from puzzle.data.tasks import evaluate_exact_match, scan_task_examples
from puzzle.generation import DeciTextGenerator, TextGenerator
from puzzle.model import DeciLMForCausalLM


# ----- KL and perplexity ---------------------------------------------------------------------------
@torch.no_grad()
def compare_to_parent(
    model: DeciLMForCausalLM,
    parent: DeciLMForCausalLM | None,
    seqs: torch.Tensor,  # (N, T) held-out sequences
    batch_size: int = 8,
) -> dict[str, Any]:
    """KL(parent || model) per token and perplexities of both on ``seqs``.

    ``parent=None`` evaluates the parent itself: kl is 0 by definition and only one forward runs.
    Sharded over the ranks of a torchrun step (FSDP2 models, :mod:`puzzle.distributed`), each rank runs
    its round-robin share of the one-process batches and the sums are added over ranks, so the figures
    equal one process's (the same batches, summed in another order); every rank gets them.
    """
    if len(seqs) == 0:
        raise ValueError("seqs: no held-out sequences to evaluate on")
    dev = next(model.parameters()).device
    kl = nll = parent_nll = 0.0
    tokens = predicted = 0
    for span, counted in dist.rank_batches(len(seqs), batch_size):
        ids = seqs[span].to(dev)  # (B, T)
        targets = ids[:, 1:].flatten()
        lm = F.log_softmax(model(ids).float(), dim=-1)  # (B, T, V)
        # a sharded forward is a collective: a rank short of a batch runs one uncounted
        nll_b = F.nll_loss(lm[:, :-1].flatten(0, 1), targets, reduction="sum").item()
        kl_b = parent_nll_b = 0.0
        if parent is not None:
            lp = F.log_softmax(parent(ids).float(), dim=-1)
            kl_b = F.kl_div(lm, lp, log_target=True, reduction="sum").item()
            parent_nll_b = F.nll_loss(lp[:, :-1].flatten(0, 1), targets, reduction="sum").item()
        if counted:
            nll, kl, parent_nll = nll + nll_b, kl + kl_b, parent_nll + parent_nll_b
            tokens += ids.numel()
            predicted += targets.numel()
    kl, nll, parent_nll, tokens_f, predicted_f = dist.all_reduce_sum([kl, nll, parent_nll, tokens, predicted])
    tokens, predicted = round(tokens_f), round(predicted_f)
    lm_loss = nll / predicted
    parent_loss = parent_nll / predicted if parent is not None else lm_loss
    return {
        "kl": kl / tokens if parent is not None else 0.0,
        "lm_loss": lm_loss,
        "perplexity": math.exp(lm_loss),
        "parent_lm_loss": parent_loss,
        "parent_perplexity": math.exp(parent_loss),
        "tokens": tokens,
        "sequences": len(seqs),
    }


# ----- tasks ---------------------------------------------------------------------------------------
def task_accuracy(generator: TextGenerator, n: int, seed: int = 0, split: str = "template",
                  part: str = "valid") -> dict[str, Any]:
    """Exact match on ``n`` held-out tiny-task (SCAN) episodes; deterministic in ``seed`` (the generator
    batches the prompts itself)."""
    items = scan_task_examples(n, seed=seed, split=split, part=part)
    res = evaluate_exact_match(generator, items, batch_size=len(items))
    return {**res, "task": f"scan:{split}", "part": part}


def icl_results(generator: TextGenerator, cfg: ICLEvalConfig, predictor: TextGenerator | None = None,
                measure: TextGenerator | None = None, beams_cache=None) -> dict[str, Any]:
    """The ICL benchmark per dataset:split x method (per-item records dropped: the report needs the
    figures; ``records`` of thousands of prompts would dominate every report.json).

    ``predictor`` predicts the query programs and ``measure`` sets the prompt budget; the evaluate step
    passes the parent for both, so every unit (parent, children, baselines) sees the same prompts, and a
    ``beams_cache`` (:data:`puzzle.icl.benchmark.BeamsCache`) so the predictor runs once for all of them."""
    from puzzle.icl.benchmark import run_icl_benchmark

    out = run_icl_benchmark(generator, cfg, predictor, measure=measure, beams_cache=beams_cache)
    for per_method in out["results"].values():
        for r in per_method.values():
            r.pop("records", None)
    return out


# ----- throughput ----------------------------------------------------------------------------------
def throughput_figures(
    model: DeciLMForCausalLM,
    scenarios: Sequence[Scenario],
    settings: ProfileConfig,
    predicted: dict[str, Any] | None = None,
    seed: int = 0,
    reference: DeciLMForCausalLM | None = None,
    repeats: int | None = None,
) -> dict[str, Any]:
    """Per scenario: the measured whole-model throughput (``puzzle.profiling.bench``) and the
    prediction of the throughput model, side by side. A scenario whose device is absent here is
    reported with ``measured: null`` and the reason, never with a guess.

    ``reference`` (the parent) is measured with the model, their generations taken in turns
    (:func:`puzzle.profiling.bench.measure_interleaved`): ``paired_speedup`` is the median over the
    pairs (one generation of each, back to back) of the parent's time over the model's, with its
    distribution-free 95% interval (``paired_ci95``). On a shared CPU the speed drifts between units
    and within one unit by more than a child differs from its neighbour: a ratio of models timed apart
    would carry that drift, and one of medians taken minutes apart part of it. ``repeats``: timed
    generations of each model in all (default ``settings.repeats``; the evaluate step passes
    ``eval.throughput_repeats``), on a CPU spread over ``settings.rebuilds`` rounds of fresh copies."""
    from puzzle.profiling.bench import measure_interleaved, pooled
    from puzzle.profiling.device import target_device
    from puzzle.profiling.timing import cpu_clock, median_interval

    # on a CPU, the clock the profiles were taken with: measured and predicted compare like with like
    clock = cpu_clock(settings.cpu_clock)
    out: dict[str, Any] = {}
    for sc in scenarios:
        pred = (predicted or {}).get(sc.name)
        if target_device(sc) is None:
            out[sc.name] = {"predicted": pred, "measured": None,
                            "reason": f"device {sc.device!r} is absent on this machine"}
            continue
        models = [model] if reference is None else [model, reference]
        # On a CPU the pairs are taken in profile.rebuilds rounds, from the second on with fresh copies of
        # the models: where a model's tensors land moves its speed between processes and builds by more
        # than between its generations (the median of 10 pairs of one child: 1.85-2.03x over four builds in
        # one process), as the profile's rounds build every variant afresh for the same reason.
        total = repeats or settings.repeats
        rounds = min(settings.rebuilds, total) if target_device(sc).type == "cpu" else 1
        got: list[list[Any]] = [[] for _ in models]
        for r in range(rounds):
            ms = models if r == 0 else [copy.deepcopy(x) for x in models]
            n = total // rounds + (r < total % rounds)
            for i, one in enumerate(measure_interleaved(ms, sc, warmup=settings.warmup if r == 0 else 1, repeats=n,
                                                        cuda_graphs=settings.cuda_graphs, seed=seed, clock=clock)):
                got[i].append(one)
            del ms
        mine = pooled(got[0])
        m = mine.to_dict()
        ratio = m["tokens_per_s"] / pred["tokens_per_s"] if pred and pred.get("tokens_per_s") else None
        out[sc.name] = {"predicted": pred, "measured": m, "measured_over_predicted": ratio,
                        "rounds": len(got[0])}
        if reference is not None:
            theirs = pooled(got[1])
            ref = theirs.to_dict()
            pairs = [r / t for t, r in zip(mine.totals_s, theirs.totals_s)]
            lo, hi, coverage = median_interval(pairs)
            out[sc.name] |= {"reference_measured": ref, "paired_speedup": statistics.median(pairs),
                             "paired_ci95": [lo, hi], "paired_ci_coverage": coverage, "pairs": len(pairs)}
    return out


# ----- lm-evaluation-harness -----------------------------------------------------------------------
def _lm_eval():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.api.model import LM
    except ImportError:
        raise ConfigError(
            "eval.lm_eval_tasks: lm-evaluation-harness is not installed; `pip install lm-eval` (it installs from "
            "PyPI), or set eval.lm_eval_tasks: [] to skip it"
        ) from None
    return LM


def lm_eval_model(model: DeciLMForCausalLM, tokenizer_dir: str | Path, batch_size: int = 8):
    """An lm-evaluation-harness ``LM`` over ``model`` (loglikelihood, rolling loglikelihood, generate_until)."""
    LM = _lm_eval()
    gen = DeciTextGenerator(model, tokenizer_dir, batch_size)
    tok = gen.tokenizer
    max_len = int(model.config.max_position_embeddings)
    dev = next(model.parameters()).device

    class DeciLMEval(LM):
        """lm-eval's model interface over the project's DeciLMForCausalLM (no transformers loading)."""

        @torch.no_grad()
        def _continuation_logprob(self, ctx_ids: list[int], cont_ids: list[int]) -> tuple[float, bool]:
            ids = (ctx_ids + cont_ids)[-(max_len + 1):]
            inp = torch.tensor([ids[:-1]], device=dev)  # (1, T)
            logp = F.log_softmax(model(inp).float(), dim=-1)[0]  # (T, V)
            n = len(cont_ids)
            tail = logp[-n:]  # (n, V) predictions of the continuation's tokens
            target = torch.tensor(ids[-n:], device=dev)
            lp = tail.gather(-1, target[:, None]).sum().item()
            greedy = bool((tail.argmax(-1) == target).all())
            return lp, greedy

        def loglikelihood(self, requests):
            out = []
            for req in requests:
                context, continuation = req.args
                ctx = tok.encode(context).ids
                whole = tok.encode(context + continuation).ids
                # tokenize the pair together (BPE merges across the boundary), then split at the context
                cont = whole[len(ctx):] if whole[: len(ctx)] == ctx else tok.encode(continuation, add_special_tokens=False).ids
                out.append(self._continuation_logprob(ctx, cont) if cont else (0.0, True))
            return out

        def loglikelihood_rolling(self, requests):
            out = []
            for req in requests:
                ids = tok.encode(req.args[0]).ids
                total = 0.0
                # non-overlapping windows of max_len predictions, each conditioned on its own prefix
                for s in range(1, len(ids), max_len):
                    total += self._continuation_logprob(ids[max(0, s - max_len):s], ids[s : s + max_len])[0]
                out.append(total)
            return out

        def generate_until(self, requests):
            out = []
            for req in requests:
                context, kwargs = req.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                n = int(kwargs.get("max_gen_toks", 64))
                ids, mask = gen.encode([context])
                seq = model.generate(ids.to(dev), n, eos_token_id=model.config.eos_token_id,
                                     attention_mask=mask.to(dev), pad_token_id=gen.pad_id)
                text = tok.decode(seq[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
                for u in until:
                    if u and u in text:
                        text = text[: text.index(u)]
                out.append(text)
            return out

    return DeciLMEval()


def load_task_spec(spec: str) -> str | dict[str, Any]:
    """A task name as is, or the config dict of a local ``.json`` / ``.yaml`` task file.

    A local file's relative ``data_files`` resolve against the file's folder, so a task and its data
    can ship together.
    """
    p = Path(spec)
    if p.suffix not in (".json", ".yaml", ".yml"):
        return spec
    if not p.is_file():
        raise ConfigError(f"eval.lm_eval_tasks: task file {spec!r} does not exist")
    try:
        if p.suffix == ".json":
            cfg = json.loads(p.read_text(encoding="utf-8"))
        else:
            import yaml

            cfg = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, ValueError) as err:
        raise ConfigError(f"eval.lm_eval_tasks: task file {spec!r} is not valid: {err}") from None
    if not isinstance(cfg, dict) or "task" not in cfg:
        raise ConfigError(f"eval.lm_eval_tasks: task file {spec!r} must be a mapping with a 'task' name")
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if files is not None:
        def fix(f: str) -> str:
            return f if Path(f).is_absolute() else str((p.parent / f).resolve())

        cfg["dataset_kwargs"]["data_files"] = (
            fix(files) if isinstance(files, str)
            else {k: fix(v) for k, v in files.items()} if isinstance(files, dict) else [fix(f) for f in files]
        )
    return cfg


def lm_eval_results(model: DeciLMForCausalLM, tokenizer_dir: str | Path, tasks: Sequence[str],
                    limit: int | None = None, seed: int = 0) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on ``tasks``; returns ``{task: {metric: value}}`` (JSON-safe)."""
    _lm_eval()
    import lm_eval

    specs = [load_task_spec(t) for t in tasks]
    try:
        res = lm_eval.simple_evaluate(
            model=lm_eval_model(model, tokenizer_dir), tasks=specs, limit=limit, log_samples=False,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            bootstrap_iters=0,
        )
    except (KeyError, ValueError, FileNotFoundError, ConnectionError, OSError) as err:
        raise ConfigError(
            f"eval.lm_eval_tasks: {list(tasks)} could not be evaluated ({type(err).__name__}: {err}); allowed: "
            "names lm-evaluation-harness registers (their data comes from the Hugging Face hub, so they need "
            "network access) or local task files (.yaml/.json with dataset_path: json and "
            "dataset_kwargs.data_files), which work offline"
        ) from None
    out: dict[str, Any] = {}
    for name, metrics in (res or {}).get("results", {}).items():
        out[name] = {k: v for k, v in metrics.items()
                     if isinstance(v, (int, float)) and not (isinstance(v, float) and not math.isfinite(v))}
    return out


__all__ = [
    "compare_to_parent",
    "icl_results",
    "lm_eval_model",
    "lm_eval_results",
    "load_task_spec",
    "task_accuracy",
    "throughput_figures",
]
