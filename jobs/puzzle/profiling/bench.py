"""Measured throughput of a whole model on a scenario: the ground truth the throughput model predicts.

``measure_throughput(model, scenario)`` runs greedy generation of a batch of random prompts through
``puzzle.profiling.engine.InferenceEngine`` (per-block static KV cache, CUDA graphs on GPU, one graph
per 64-slot attended-length bucket, all captured before timing) and times the prefill and the decode
loop separately (CUDA events on GPU, the wall clock on CPU unless ``clock="thread_cpu"``), the median over
``repeats`` generations::

    tokens/s = batch * output_len / (prefill_s + decode_s)

It is what ``puzzle bench throughput`` prints and what evaluation reports as measured throughput.
``measure_interleaved(models, scenario)`` times several models with their generations taken in turns
(a child and its parent, in evaluation), so their ratio carries no drift of the machine's speed.

Optional vLLM backend: where vLLM is installed (a cluster image may have it),
``measure_throughput_vllm(model_dir, scenario)`` serves the same directory with vLLM's offline
``LLM`` engine (nemotron-nas loads natively; ``replace_with_linear`` blocks do not) and times
``generate`` with ``ignore_eos`` and ``max_tokens=output_len``. It is a cross-check of the torch
numbers, not what the profiles measure; tests skip it here because vLLM is not installed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from puzzle.config import Scenario
from puzzle.model import DeciLMForCausalLM, load_parent, model_counts
from puzzle.model.io import torch_dtype
from puzzle.profiling.device import device_name, target_device
from puzzle.profiling.engine import InferenceEngine, decode_contexts
from puzzle.profiling.timing import Timing, host_clock, summarize, synchronize


class DeviceAbsentError(RuntimeError):
    """The scenario's device is not present on this machine, so nothing can be measured."""


@dataclass(frozen=True)
class Measurement:
    """One model's measured generation on one scenario (medians over ``repeats`` generations)."""

    tokens_per_s: float
    prefill_s: float
    decode_s: float
    decode_step_s: float  # decode_s / number of decode steps
    memory_bytes: int  # weights + KV cache at batch x (input_len + output_len), exact
    weight_bytes: int
    kv_bytes: int
    device: str
    torch_version: str
    repeats: int
    cuda_graphs: bool
    total_spread: dict[str, float]  # median_s, min_s, max_s, p10_s, p90_s, rel_spread of the generations' totals
    scenario: dict[str, Any]
    backend: str = "torch"
    threads: int = 0  # torch intra-op threads while measuring (CPU)
    clock: str = "wall"  # "cuda_events", "wall" or "thread_cpu"
    generations_s: list[list[float]] = field(default_factory=list)  # [prefill s, decode s] of every timed
    # generation, in the order taken (paired speedups divide two models' generations taken back to back)

    @property
    def totals_s(self) -> list[float]:
        return [p + d for p, d in self.generations_s]

    @property
    def rel_spread(self) -> float:
        return float(self.total_spread["rel_spread"])

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_s"] = self.total_s
        return d


def pooled(ms: Sequence[Measurement]) -> Measurement:
    """One model's measurements (rounds of one scenario, each with its own build) as one: the median
    generation over all of them, their spread, and every generation in the order taken."""
    gens = [list(g) for m in ms for g in m.generations_s]
    if not gens:
        raise ValueError("ms: no generations to pool; give measurements taken by measure_interleaved")
    return _median_of(replace(ms[0], generations_s=gens))


def _median_of(m: Measurement) -> Measurement:
    """``m`` with its figures taken from its generations: the median one's prefill and decode, their
    tokens/s, and the spread of every generation's total."""
    gens, sc = m.generations_s, m.scenario
    totals = m.totals_s
    prefill_s, decode_s = gens[sorted(range(len(gens)), key=totals.__getitem__)[len(gens) // 2]]
    steps = max(len(decode_contexts(sc["input_len"], sc["output_len"])), 1)
    return replace(m, tokens_per_s=sc["batch_size"] * sc["output_len"] / (prefill_s + decode_s),
                   prefill_s=prefill_s, decode_s=decode_s, decode_step_s=decode_s / steps, repeats=len(gens),
                   total_spread=spread_of(summarize(totals)))


def spread_of(t: Timing) -> dict[str, float]:
    return {"median_s": t.median_s, "min_s": t.min_s, "max_s": t.max_s, "p10_s": t.p10_s, "p90_s": t.p90_s,
            "rel_spread": t.rel_spread, "repeats": float(t.repeats)}


def _prepare(model: DeciLMForCausalLM | str | Path, scenario: Scenario, device: torch.device) -> DeciLMForCausalLM:
    dtype = torch_dtype(scenario.dtype)
    if isinstance(model, (str, Path)):
        return load_parent(model, dtype=dtype, device=device)
    p = next(model.parameters())
    if p.device != device or p.dtype != dtype:
        # The caller's model stays as it is: evaluation keeps using it on its own device and dtype.
        import copy

        model = copy.deepcopy(model).to(device=device, dtype=dtype)
        if model.config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


class GenerationTimer:
    """One model's engine, ready to time greedy generations of ``scenario`` (CUDA graphs captured):
    ``once()`` is one generation's (prefill s, decode s); ``runs`` collects what the caller keeps."""

    def __init__(self, model: DeciLMForCausalLM | str | Path, scenario: Scenario, device: torch.device,
                 cuda_graphs: bool, seed: int, clock: str) -> None:
        self.scenario, self.device, self.now = scenario, device, host_clock(clock)
        self.clock = "cuda_events" if device.type == "cuda" else clock
        self.model = _prepare(model, scenario, device)
        B, T, O = scenario.batch_size, scenario.input_len, scenario.output_len
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, self.model.config.vocab_size, (B, T), generator=gen).to(device)
        self.engine = InferenceEngine(self.model, B, T + O, cuda_graphs=cuda_graphs)
        self.engine.set_prompt(ids)
        self.engine.capture(T, O)
        self.contexts = decode_contexts(T, O)
        self.runs: list[tuple[float, float]] = []

    def once(self) -> tuple[float, float]:
        """(prefill seconds, decode seconds) of one generation."""
        eng = self.engine
        if self.device.type == "cuda":
            e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            e0.record()
            eng.prefill()
            e1.record()
            for c in self.contexts:
                eng.decode(c)
            e2.record()
            e2.synchronize()
            return e0.elapsed_time(e1) / 1e3, e1.elapsed_time(e2) / 1e3
        t0 = self.now()
        eng.prefill()
        t1 = self.now()
        for c in self.contexts:
            eng.decode(c)
        return t1 - t0, self.now() - t1

    def close(self) -> None:
        self.engine.close()

    def measurement(self) -> Measurement:
        """The median of the timed generations (``self.runs``)."""
        sc = self.scenario
        counts = model_counts(self.model.config)
        weight = counts.weight_bytes(sc.dtype)
        kv = counts.kv_cache_bytes(sc.batch_size, sc.input_len + sc.output_len, sc.dtype)
        # the figures of the median generation are filled in from generations_s
        return _median_of(Measurement(
            tokens_per_s=0.0, prefill_s=0.0, decode_s=0.0, decode_step_s=0.0, repeats=0, total_spread={},
            memory_bytes=weight + kv,
            weight_bytes=weight,
            kv_bytes=kv,
            device=device_name(self.device),
            torch_version=torch.__version__,
            cuda_graphs=self.engine.use_graphs,
            scenario=sc.model_dump(mode="json"),
            threads=torch.get_num_threads(),
            clock=self.clock,
            generations_s=[list(r) for r in self.runs],
        ))


@torch.no_grad()
def measure_interleaved(models: Sequence[DeciLMForCausalLM | str | Path], scenario: Scenario, warmup: int = 1,
                        repeats: int = 3, cuda_graphs: bool = True, seed: int = 0, clock: str = "wall"
                        ) -> list[Measurement]:
    """Measure several models on ``scenario`` with their generations interleaved (A B C A B C ...).

    Each model gets ``repeats`` timed generations (after ``warmup``), taken in turns, so every model sees
    the same spread of machine states: on a shared CPU the speed drifts within seconds by more than two
    children differ, and models timed one after the other would carry that drift into their ratio.
    Returns one :class:`Measurement` per model, in order. Raises DeviceAbsentError when the scenario's
    device is not here. ``clock`` (CPU): "wall" (what a user waits) or "thread_cpu" (the calling
    thread's CPU time, deaf to other processes; meaningful with one torch thread only).
    """
    device = target_device(scenario)
    if device is None:
        raise DeviceAbsentError(f"scenario {scenario.name!r}: device {scenario.device!r} is not present on this machine")
    if repeats < 1:
        raise ValueError(f"repeats: {repeats} is not allowed; must be >= 1")
    if not models:
        raise ValueError("models: an empty list is not allowed; give at least one model")
    host_clock(clock)  # refuse an unknown clock before any work
    gens: list[GenerationTimer] = []
    try:
        for m in models:
            gens.append(GenerationTimer(m, scenario, device, cuda_graphs, seed, clock))
        for _ in range(max(warmup, 0)):
            for g in gens:
                g.once()
        synchronize(device)
        for _ in range(repeats):
            for g in gens:
                g.runs.append(g.once())
    finally:
        for g in gens:
            g.close()
    return [g.measurement() for g in gens]


def measure_throughput(model: DeciLMForCausalLM | str | Path, scenario: Scenario, warmup: int = 1,
                       repeats: int = 3, cuda_graphs: bool = True, seed: int = 0, clock: str = "wall") -> Measurement:
    """Measure greedy generation of ``scenario`` (batch x input_len prompts, output_len new tokens).

    ``model``: a loaded model (copied to the scenario's device and dtype when it differs) or a model
    directory (Llama-layout parent or nemotron-nas child). Raises DeviceAbsentError when the
    scenario's device is not here. ``clock``: as in :func:`measure_interleaved`.
    """
    return measure_interleaved([model], scenario, warmup, repeats, cuda_graphs, seed, clock)[0]


def measure_throughput_vllm(model_dir: str | Path, scenario: Scenario, repeats: int = 3, seed: int = 0) -> Measurement:
    """The same scenario served by vLLM (optional backend; needs ``pip install vllm`` and a GPU)."""
    try:
        from vllm import LLM, SamplingParams  # optional dependency, present only in some images
        from vllm.inputs import TokensPrompt
    except ImportError as err:
        raise RuntimeError(f"the vllm backend needs vLLM installed ({err}); use the default torch backend") from None
    B, T, O = scenario.batch_size, scenario.input_len, scenario.output_len
    llm = LLM(model=str(model_dir), dtype=scenario.dtype, max_model_len=T + O, seed=seed,
              trust_remote_code=False, max_num_seqs=B)
    vocab = llm.get_tokenizer().vocab_size
    gen = torch.Generator().manual_seed(seed)
    prompts = [TokensPrompt(prompt_token_ids=torch.randint(0, vocab, (T,), generator=gen).tolist()) for _ in range(B)]
    params = SamplingParams(max_tokens=O, min_tokens=O, ignore_eos=True, temperature=0.0)
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    totals = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        totals.append(time.perf_counter() - t0)
    total = statistics.median(totals)
    return Measurement(
        tokens_per_s=B * O / total, prefill_s=float("nan"), decode_s=float("nan"), decode_step_s=float("nan"),
        memory_bytes=0, weight_bytes=0, kv_bytes=0, device=device_name(torch.device("cuda")),
        torch_version=torch.__version__, repeats=repeats, cuda_graphs=True,
        total_spread=spread_of(summarize(totals)),
        scenario=scenario.model_dump(mode="json"), backend="vllm", threads=torch.get_num_threads(),
    )
