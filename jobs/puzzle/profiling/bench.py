"""Measured throughput of a whole model on a scenario: the ground truth the throughput model predicts.

``measure_throughput(model, scenario)`` runs greedy generation of a batch of random prompts through
``puzzle.profiling.engine.InferenceEngine`` (per-block static KV cache, CUDA graphs on GPU, one graph
per 64-slot attended-length bucket, all captured before timing) and times the prefill and the decode
loop separately (CUDA events on GPU, the wall clock on CPU unless ``clock="thread_cpu"``), the median over
``repeats`` generations::

    tokens/s = batch * output_len / (prefill_s + decode_s)

It is what ``puzzle bench throughput`` prints and what evaluation reports as measured throughput.

Optional vLLM backend: where vLLM is installed (a cluster image may have it),
``measure_throughput_vllm(model_dir, scenario)`` serves the same directory with vLLM's offline
``LLM`` engine (nemotron-nas loads natively; ``replace_with_linear`` blocks do not) and times
``generate`` with ``ignore_eos`` and ``max_tokens=output_len``. It is a cross-check of the torch
numbers, not what the profiles measure; tests skip it here because vLLM is not installed.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from puzzle.config import Scenario
from puzzle.model import DeciLMForCausalLM, load_parent, model_counts
from puzzle.model.io import torch_dtype
from puzzle.profiling.engine import InferenceEngine, decode_contexts
from puzzle.profiling.profiler import device_name, target_device
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


@torch.no_grad()
def measure_throughput(model: DeciLMForCausalLM | str | Path, scenario: Scenario, warmup: int = 1,
                       repeats: int = 3, cuda_graphs: bool = True, seed: int = 0, clock: str = "wall") -> Measurement:
    """Measure greedy generation of ``scenario`` (batch x input_len prompts, output_len new tokens).

    ``model``: a loaded model (copied to the scenario's device and dtype when it differs) or a model
    directory (Llama-layout parent or nemotron-nas child). Raises DeviceAbsentError when the
    scenario's device is not here. ``clock`` (CPU): "wall" (what a user waits) or "thread_cpu" (the
    calling thread's CPU time, deaf to other processes; meaningful with one torch thread only).
    """
    device = target_device(scenario)
    if device is None:
        raise DeviceAbsentError(f"scenario {scenario.name!r}: device {scenario.device!r} is not present on this machine")
    if repeats < 1:
        raise ValueError(f"repeats: {repeats} is not allowed; must be >= 1")
    now = host_clock(clock)
    m = _prepare(model, scenario, device)
    B, T, O = scenario.batch_size, scenario.input_len, scenario.output_len
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, m.config.vocab_size, (B, T), generator=gen).to(device)
    eng = InferenceEngine(m, B, T + O, cuda_graphs=cuda_graphs)
    eng.set_prompt(ids)
    eng.capture(T, O)
    contexts = decode_contexts(T, O)

    def once() -> tuple[float, float]:
        if device.type == "cuda":
            e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            e0.record()
            eng.prefill()
            e1.record()
            for c in contexts:
                eng.decode(c)
            e2.record()
            e2.synchronize()
            return e0.elapsed_time(e1) / 1e3, e1.elapsed_time(e2) / 1e3
        t0 = now()
        eng.prefill()
        t1 = now()
        for c in contexts:
            eng.decode(c)
        return t1 - t0, now() - t1

    try:
        for _ in range(max(warmup, 0)):
            once()
        synchronize(device)
        runs = [once() for _ in range(repeats)]
    finally:
        eng.close()
    totals = [p + d for p, d in runs]
    mid = sorted(range(repeats), key=lambda i: totals[i])[repeats // 2]  # the median generation
    prefill_s, decode_s = runs[mid]
    counts = model_counts(m.config)
    weight = counts.weight_bytes(scenario.dtype)
    kv = counts.kv_cache_bytes(B, T + O, scenario.dtype)
    spread = spread_of(summarize(totals))
    return Measurement(
        tokens_per_s=B * O / (prefill_s + decode_s),
        prefill_s=prefill_s,
        decode_s=decode_s,
        decode_step_s=decode_s / max(len(contexts), 1),
        memory_bytes=weight + kv,
        weight_bytes=weight,
        kv_bytes=kv,
        device=device_name(device),
        torch_version=torch.__version__,
        repeats=repeats,
        cuda_graphs=eng.use_graphs,
        total_spread=spread,
        scenario=scenario.model_dump(mode="json"),
        threads=torch.get_num_threads(),
        clock="cuda_events" if device.type == "cuda" else clock,
    )


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
