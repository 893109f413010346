"""Profile one block variant (or the non-block parts) on one scenario: what a ``profile`` unit does.

Measured on the scenario's device when it is present (GPU: CUDA events around CUDA-graph replays;
CPU: the thread's CPU time with one torch thread, else the wall clock; ``profile.cpu_clock``), with the exact blocks of ``puzzle.profiling.engine`` that a whole-model measurement
runs, so per-variant costs add up to the model:

- prefill: the batch at input_len through the block (GQA fills its KV cache);
- decode: one step of the batch at ``decode_points`` contexts spread over the generation; a GQA step's
  time is fitted as ``a + b * attended_length`` and summed over every step of the generation;
- weights and KV cache bytes exactly from ``puzzle.model.counts``.

The block is timed as a stack of ``replicas`` copies with their own weights and caches, so that the
working set is as large as in the whole model (a lone block would be served from the GPU's L2 or the
CPU's caches and look faster than it is in the model). ``no_op`` costs exactly zero and is not timed.
When the target device is absent (scenario device ``cuda`` on a CPU-only machine) the record is the
roofline estimate of ``puzzle.profiling.roofline``, with ``"estimate": true``.

``profile_unit`` measures one variant (a GPU unit); ``profile_scenario`` measures a scenario's variants
in turns in one process (a CPU unit), and on a CPU times each variant as a whole model instead of a
part: the variant in every layer, less a model of no-op layers (see its docstring for why).

Every timing is held to ``profile.max_rel_spread`` (taken again up to ``profile.attempts`` times, see
``puzzle.profiling.timing``); the record's ``stability`` says whether all of them came within it, the
worst spread and which timing it was. Solve refuses a record that never did.
"""

from __future__ import annotations

import logging
import statistics
import uuid
from typing import Any

import torch
from torch import nn

from puzzle.config import ProfileConfig, Scenario
from puzzle.model import (
    AttentionVariant,
    BlockConfig,
    DeciLMForCausalLM,
    FFNVariant,
    ModelConfig,
    attention_counts,
    build_attention,
    build_ffn,
    ffn_counts,
    model_counts,
    non_block_counts,
    variant_from_name,
)
from puzzle.model.counts import Counts
from puzzle.model.io import torch_dtype
from puzzle.model.modeling import RMSNorm, rope_inv_freq
from puzzle.profiling.bench import measure_interleaved
from puzzle.profiling.device import device_name, target_device
from puzzle.profiling.engine import (
    AttnBlock,
    FFNBlock,
    Graphed,
    NonBlock,
    attended_length,
    decode_bias,
    decode_bucket,
    decode_contexts,
    rope_tables,
)
from puzzle.profiling.roofline import estimate_costs
from puzzle.profiling.timing import cpu_clock, time_callable

log = logging.getLogger(__name__)

# Replicas stop when their weights and caches exceed this (bytes), or at the parent's layer count.
_REPLICA_BYTES = 2 * 2**30


def decode_points(input_len: int, output_len: int, points: int) -> list[int]:
    """``points`` contexts evenly spread over the generation's decode steps (fewer if there are fewer steps)."""
    ctx = decode_contexts(input_len, output_len)
    n = len(ctx)
    if n == 0:
        return []
    if n <= points:
        return list(ctx)
    return sorted({ctx[round(i * (n - 1) / (points - 1))] for i in range(points)})


def fit_decode(points: list[tuple[int, float]], linear: bool) -> tuple[float, float]:
    """(a, b) of step seconds = a + b * attended_length, least squares; b = 0 unless ``linear``."""
    if not points:
        return 0.0, 0.0
    ys = [t for _, t in points]
    xs = [float(x) for x, _ in points]
    if not linear or len(set(xs)) < 2:
        return sum(ys) / len(ys), 0.0
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def generation_decode_s(a: float, b: float, input_len: int, output_len: int, max_len: int, bucket: int) -> float:
    """Sum of a + b * attended_length over every decode step of one generation."""
    ctx = decode_contexts(input_len, output_len)
    return a * len(ctx) + b * sum(attended_length(c, max_len, bucket) for c in ctx)


def _counts(kind: str, variant: Any, cfg: ModelConfig) -> Counts:
    if kind == "attention":
        return attention_counts(variant, cfg)
    if kind == "ffn":
        return ffn_counts(variant, cfg)
    return non_block_counts(cfg)


def _init_(module: nn.Module) -> nn.Module:
    # Random weights at a Llama-like scale: timings do not depend on values, but overflow would be noisy.
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight") or isinstance(module, RMSNorm):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    return module


def _make(factory, device: torch.device, dtype: torch.dtype) -> nn.Module:
    with torch.device("meta"):
        m = factory()
    m = m.to_empty(device=device).to(dtype)
    return _init_(m).eval()


def _record_base(kind: str, name: str, cfg: ModelConfig, scenario: Scenario, counts: Counts) -> dict[str, Any]:
    B, T, O = scenario.batch_size, scenario.input_len, scenario.output_len
    weight = counts.weight_bytes(scenario.dtype)
    kv = counts.kv_cache_bytes(B, T + O, scenario.dtype)
    return {
        "scenario": scenario.model_dump(mode="json"),
        "kind": kind,
        "variant": name,
        "model": {"hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_attention_heads,
                  "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size, "num_hidden_layers": cfg.num_hidden_layers},
        "torch_version": torch.__version__,
        "weight_bytes": weight,
        "kv_bytes": kv,
        "memory_bytes": weight + kv,
        "params": counts.params,
        "decode_steps": len(decode_contexts(T, O)),
    }


NOT_MEASURED = {"measured": False, "stable": True}


def stability(measured: dict[str, Any], settings: ProfileConfig) -> dict[str, Any]:
    """Whether every timing of a measured record came within ``profile.max_rel_spread``: the worst final
    spread, which timing it was, and how many timings had to be taken again."""
    timings = [("prefill", measured["prefill"])] + [
        (f"decode at context {p['context']}", p["spread"]) for p in measured["decode_points"]]
    worst_name, worst = max(timings, key=lambda t: t[1]["rel_spread"])
    return {
        "measured": True,
        "stable": all(t["stable"] for _, t in timings),
        "rel_spread": worst["rel_spread"],
        "worst": worst_name,
        "max_rel_spread": settings.max_rel_spread,
        "attempts": settings.attempts,
        "remeasured": sum(len(t["attempt_spreads"]) > 1 for _, t in timings),
    }


def parse_variant(kind: str, name: str, cfg: ModelConfig) -> AttentionVariant | FFNVariant | None:
    """The variant object of a unit (None for non_block); ValueError names what is wrong."""
    if kind == "non_block":
        if name != "non_block":
            raise ValueError(f"variant: {name!r} is not allowed for kind 'non_block'; use 'non_block'")
        return None
    if kind not in ("attention", "ffn"):
        raise ValueError(f"kind: {kind!r} is not allowed; allowed: 'attention', 'ffn', 'non_block'")
    prefix = "attn_" if kind == "attention" else "ffn_"
    if not name.startswith(prefix):
        raise ValueError(f"variant: {name!r} is not a {kind} variant (names start with {prefix!r})")
    v = variant_from_name(name, cfg.hidden_size)
    if isinstance(v, AttentionVariant) and v.kind == "gqa" and cfg.num_attention_heads % v.n_heads_in_group:
        raise ValueError(
            f"variant: {name!r}: n_heads_in_group {v.n_heads_in_group} does not divide the parent's "
            f"num_attention_heads={cfg.num_attention_heads}"
        )
    return v


def _unmeasured(cfg: ModelConfig, kind: str, name: str, variant: Any, scenario: Scenario,
                settings: ProfileConfig) -> tuple[dict[str, Any], torch.device | None, bool]:
    """(record base, device, done): ``done`` when nothing is timed (a no_op, or an estimate when the
    scenario's device is absent), and then the record is complete."""
    counts = _counts(kind, variant, cfg)
    rec = _record_base(kind, name, cfg, scenario, counts)
    B, T, O = scenario.batch_size, scenario.input_len, scenario.output_len
    device = target_device(scenario)
    bucket = decode_bucket(scenario.device)
    pts = decode_points(T, O, settings.decode_points)
    if variant is not None and variant.no_op:
        rec.update({"device": device_name(device) if device is not None else "none", "estimate": False,
                    "method": {"kind": "identity: a no_op sub-block runs no kernels"},
                    "prefill_s": 0.0, "prefill": None,
                    "decode_points": [{"context": c, "attended": attended_length(c, T + O, bucket), "step_s": 0.0}
                                      for c in pts],
                    "decode_fit": {"intercept_s": 0.0, "per_attended_slot_s": 0.0},
                    "decode_s": 0.0, "decode_step_s": 0.0, "stability": dict(NOT_MEASURED)})
        return rec, device, True
    if device is None:
        est = estimate_costs(kind, variant, cfg, B, T, O, scenario.dtype, scenario.device,
                             settings.estimate_peak_tflops, settings.estimate_bandwidth_gbps)
        dp = [{"context": c, "attended": attended_length(c, T + O, bucket), "step_s": est["step"](c)} for c in pts]
        rec.update({"device": f"estimate for {scenario.device} (absent here)", "estimate": True,
                    "method": {"kind": "roofline", "peak_tflops": settings.estimate_peak_tflops,
                               "bandwidth_gbps": settings.estimate_bandwidth_gbps},
                    "prefill_s": est["prefill_s"], "prefill": None, "decode_points": dp,
                    "decode_fit": None, "decode_s": est["decode_s"], "decode_step_s": est["decode_s"] / O,
                    "prefill_flops": est["prefill_flops"], "stability": dict(NOT_MEASURED)})
        return rec, device, True
    return rec, device, False


# One build's measurement: (prefill + decode total, build index, measure_unit's dict, fit a, fit b, decode_s)
_Build = tuple[float, int, dict[str, Any], float, float, float]


def _measure_build(cfg: ModelConfig, kind: str, variant: Any, scenario: Scenario, settings: ProfileConfig,
                   device: torch.device, r: int, seed: int) -> _Build:
    T, O = scenario.input_len, scenario.output_len
    m = measure_unit(cfg, kind, variant, scenario, settings, device,
                     decode_points(T, O, settings.decode_points), seed + r)
    fa, fb = fit_decode([(p["attended"], p["step_s"]) for p in m["decode_points"]],
                        linear=kind == "attention" and _counts(kind, variant, cfg).kv_heads > 0)
    d = generation_decode_s(fa, fb, T, O, T + O, decode_bucket(device))
    return (m["prefill"]["median_s"] + d, r, m, fa, fb, d)


def _finish(rec: dict[str, Any], builds: list[_Build], settings: ProfileConfig, device: torch.device) -> dict[str, Any]:
    """Complete a measured record from its builds: the build of median total time is kept."""
    builds = sorted(builds, key=lambda t: (t[0], t[1]))
    _, _, measured, a, b, decode_s = builds[len(builds) // 2]
    if len(builds) > 1:
        rec["rebuilds"] = {"count": len(builds), "totals_s": [t[0] for t in builds], "kept": "median"}
    O = rec["scenario"]["output_len"]
    rec.update({"device": device_name(device), "estimate": False, "method": measured["method"],
                "prefill_s": measured["prefill"]["median_s"], "prefill": measured["prefill"],
                "decode_points": measured["decode_points"],
                "decode_fit": {"intercept_s": a, "per_attended_slot_s": b},
                "decode_s": decode_s, "decode_step_s": decode_s / O, "stability": stability(measured, settings)})
    return rec


def profile_unit(cfg: ModelConfig, kind: str, name: str, scenario: Scenario, settings: ProfileConfig,
                 seed: int = 0) -> dict[str, Any]:
    """The profile record of one (variant, scenario): measured where the device is present, else estimated."""
    variant = parse_variant(kind, name, cfg)
    rec, device, done = _unmeasured(cfg, kind, name, variant, scenario, settings)
    if done:
        return rec
    assert device is not None
    # profile.rebuilds: the block built afresh (new weights, new buffers) and measured again; the build
    # of median total time is kept. On a CPU a small block's time moves between builds (where its
    # tensors land in memory) by more than between the repeats of one build.
    builds = [_measure_build(cfg, kind, variant, scenario, settings, device, r, seed) for r in range(settings.rebuilds)]
    return _finish(rec, builds, settings, device)


def profile_scenario(cfg: ModelConfig, units: list[tuple[str, str]], scenario: Scenario, settings: ProfileConfig,
                     seed: int = 0, whole_models: bool | None = None) -> list[dict[str, Any]]:
    """The profile records of every (kind, variant) in ``units`` on one scenario, measured in one process
    with the variants taken in turns over ``profile.rebuilds`` rounds.

    On a shared CPU the machine's speed drifts within minutes by more than two variants differ (one
    block's time moved by up to 35% between separate processes on a 2-core VM): variants measured one
    unit at a time would each carry a different draw of it, and the solver would rank noise. Taken in
    turns, every variant sees the same spread of machine states.

    ``whole_models`` (default: on a CPU, where the parent fits in :data:`_WHOLE_BYTES`): each variant is
    timed as a whole model, not as a part (:func:`whole_model_costs`). On a CPU a part timed alone does
    not cost what it costs inside a model: the tiny parent's whole generations fit ``0.143 s + 0.164 s x
    layers`` where its non-block part alone takes 0.033 s, and no fit of the parts to a few whole
    models (scaled to the parent, fitted through the parent and its half, or per kind through five
    shapes) kept a run's children within 10% (``benchmarks/bench_cpu_fit.py``; BENCHMARKS.md). Otherwise
    (a GPU, or a parent too large to time whole on a CPU) every variant's part is timed on its own, the
    median of ``profile.rebuilds`` builds kept.
    """
    keys = [(kind, parse_variant(kind, name, cfg)) for kind, name in units]
    records: list[dict[str, Any] | None] = []
    todo: dict[tuple[str, Any], dict[str, Any]] = {}  # (kind, variant) to measure -> its record base
    device: torch.device | None = None
    for (kind, name), key in zip(units, keys):
        rec, dev, done = _unmeasured(cfg, kind, name, key[1], scenario, settings)
        records.append(rec if done else None)
        if not done:
            device = dev
            todo.setdefault(key, rec)
    if device is None:
        return [r for r in records if r is not None]
    if whole_models is None:
        whole_models = device.type == "cpu" and _whole_bytes(cfg, scenario) <= _WHOLE_BYTES
    session = uuid.uuid4().hex[:12]
    if whole_models:
        done_recs = _measure_whole_models(cfg, todo, scenario, settings, device, seed)
    else:
        builds: dict[tuple[str, Any], list[_Build]] = {k: [] for k in todo}
        for r in range(settings.rebuilds):
            for kind, v in todo:
                builds[(kind, v)].append(_measure_build(cfg, kind, v, scenario, settings, device, r, seed))
        done_recs = {key: _finish(rec, builds[key], settings, device) for key, rec in todo.items()}
    for rec in done_recs.values():
        rec["method"]["interleaved"] = {"session": session, "rounds": settings.rebuilds, "variants": len(todo)}
    return [rec if rec is not None else dict(done_recs[key], variant=name)
            for (_, name), key, rec in zip(units, keys, records)]


# Whole-model profiles: parents up to this size (weights + KV cache) are timed whole on a CPU.
_WHOLE_BYTES = 8 * 2**30


def variant_model(cfg: ModelConfig, kind: str, variant: Any) -> ModelConfig:
    """The whole model a variant is timed as: the variant in every one of the parent's layers, the other
    kind of sub-block removed (no_op); ``kind="non_block"``: every layer a no_op (embedding, final norm,
    LM head and the engine's per-step work only)."""
    blocks = [BlockConfig(variant if kind == "attention" else AttentionVariant.noop(),
                          variant if kind == "ffn" else FFNVariant.noop())] * cfg.num_hidden_layers
    return cfg.with_blocks(blocks)


def whole_model_costs(times: dict[tuple[str, Any], tuple[float, float]], layers: int
                      ) -> dict[tuple[str, Any], tuple[float, float]]:
    """Per-layer (prefill s, decode s) of every variant from the times of the whole models it was timed
    as (:func:`variant_model`; ``times`` holds ("non_block", None) too): a variant costs its model's time
    less the no-op model's, over the layers, and the non-block parts cost the no-op model. A child is
    then the no-op model plus the costs of its layers, so a model of one variant throughout is predicted
    exactly as it was timed. Noise can put a very cheap variant below the no-op model: it costs 0."""
    base = times[("non_block", None)]
    return {key: base if key[0] == "non_block" else
            tuple(max(0.0, (t - b) / layers) for t, b in zip(ts, base))  # type: ignore[misc]
            for key, ts in times.items()}


def _measure_whole_models(cfg: ModelConfig, todo: dict[tuple[str, Any], dict[str, Any]], scenario: Scenario,
                          settings: ProfileConfig, device: torch.device, seed: int
                          ) -> dict[tuple[str, Any], dict[str, Any]]:
    """The records of ``todo`` from whole models (:func:`variant_model`), the no-op model always among
    them: every round builds each afresh (random weights) and times ``profile.repeats`` generations of
    each in turns, after ``profile.warmup`` untimed ones (one from the second round on); each model's
    time is the median over the rounds' medians.

    A round in which some model's generations spread by more than ``profile.max_rel_spread`` is taken
    again, up to ``profile.attempts`` times, and the attempt whose worst spread is smallest is kept, as
    a part's timing is (:mod:`puzzle.profiling.timing`): the no-op model's generation is short (5-40 ms)
    and a neighbour's burst moves it most."""
    keys = list(todo) + ([("non_block", None)] if ("non_block", None) not in todo else [])
    base = keys.index(("non_block", None))
    clock = cpu_clock(settings.cpu_clock)  # as evaluation passes it: a CUDA measurement reads events anyway
    dtype = torch_dtype(scenario.dtype)
    rounds: list[list[Any]] = []
    retaken = [0] * len(keys)  # per model: rounds it made retake
    for r in range(settings.rebuilds):
        torch.manual_seed(seed + r)
        models = [_init_(DeciLMForCausalLM(variant_model(cfg, k, v)).to(device=device, dtype=dtype)).eval()
                  for k, v in keys]
        best: list[Any] | None = None
        for attempt in range(settings.attempts):
            got = measure_interleaved(models, scenario, warmup=max(1, settings.warmup) if r == 0 else 1,
                                      repeats=settings.repeats, cuda_graphs=False, seed=seed + r, clock=clock)
            if best is None or max(m.rel_spread for m in got) < max(m.rel_spread for m in best):
                best = got
            over = [i for i, m in enumerate(got) if m.rel_spread > settings.max_rel_spread]
            if not over:
                break
            if attempt + 1 < settings.attempts:
                log.info("profile %s: whole-model round %d spread above %.2f (%s); taking it again", scenario.name,
                         r + 1, settings.max_rel_spread,
                         ", ".join("non_block" if keys[i][1] is None else keys[i][1].name for i in over))
                for i in over:
                    retaken[i] += 1
        assert best is not None
        rounds.append(best)
        del models
    times = {key: (statistics.median(rnd[i].prefill_s for rnd in rounds),
                   statistics.median(rnd[i].decode_s for rnd in rounds)) for i, key in enumerate(keys)}
    costs = whole_model_costs(times, cfg.num_hidden_layers)
    O = scenario.output_len
    no_op = {"no_op_prefill_s": [rnd[base].prefill_s for rnd in rounds],
             "no_op_decode_s": [rnd[base].decode_s for rnd in rounds]}
    out: dict[tuple[str, Any], dict[str, Any]] = {}
    for i, key in enumerate(keys):
        if key not in todo:
            continue
        spreads = [rnd[i].rel_spread for rnd in rounds]
        worst = max(range(len(rounds)), key=lambda r: spreads[r])
        rec = todo[key]
        rec.update({
            "device": device_name(device), "estimate": False,
            "method": {"kind": "whole_model", "clock": clock, "layers": cfg.num_hidden_layers,
                       "rounds": settings.rebuilds, "generations": settings.repeats,
                       "model": "non-block parts and no-op layers" if key[0] == "non_block" else
                       f"this {key[0]} in every layer, the other kind removed; cost = (its time - the no-op "
                       f"model's) / {cfg.num_hidden_layers}"},
            "prefill_s": costs[key][0], "prefill": None, "decode_points": None, "decode_fit": None,
            "decode_s": costs[key][1], "decode_step_s": costs[key][1] / O,
            "whole_model": {"prefill_s": [rnd[i].prefill_s for rnd in rounds],
                            "decode_s": [rnd[i].decode_s for rnd in rounds], **no_op},
            "stability": {"measured": True, "stable": spreads[worst] <= settings.max_rel_spread,
                          "rel_spread": spreads[worst], "worst": f"whole-model generations, round {worst + 1}",
                          "max_rel_spread": settings.max_rel_spread, "attempts": settings.attempts,
                          "remeasured": retaken[i]}})
        out[key] = rec
    return out


def _whole_bytes(cfg: ModelConfig, scenario: Scenario) -> int:
    c = model_counts(cfg)
    return c.weight_bytes(scenario.dtype) + c.kv_cache_bytes(
        scenario.batch_size, scenario.input_len + scenario.output_len, scenario.dtype)


@torch.no_grad()
def measure_unit(cfg: ModelConfig, kind: str, variant: Any, scenario: Scenario, settings: ProfileConfig,
                 device: torch.device, points: list[int], seed: int = 0) -> dict[str, Any]:
    """Time prefill and the decode steps at ``points`` of one variant on ``device``."""
    torch.manual_seed(seed)
    dtype = torch_dtype(scenario.dtype)
    B, T, O = scenario.batch_size, scenario.input_len, scenario.output_len
    max_len = T + O
    C = cfg.hidden_size
    bucket = decode_bucket(device)
    inv_freq = rope_inv_freq(cfg)
    counts = _counts(kind, variant, cfg)
    if kind == "non_block":
        replicas = 1  # once per model, and the embedding/head tables are large already
    else:
        per = counts.weight_bytes(scenario.dtype) + counts.kv_cache_bytes(B, max_len, scenario.dtype)
        replicas = max(1, min(cfg.num_hidden_layers, _REPLICA_BYTES // max(per, 1)))
    use_graphs = settings.cuda_graphs and device.type == "cuda"
    clock = "cuda_events" if device.type == "cuda" else cpu_clock(settings.cpu_clock)
    timed = {"max_rel_spread": settings.max_rel_spread, "attempts": settings.attempts, "clock": clock}
    pool = None  # each graph its own pool: it is dropped after timing, which a shared pool does not allow

    def norm() -> RMSNorm:
        return _make(lambda: RMSNorm(C, cfg.rms_norm_eps), device, dtype)

    if kind == "attention":
        blocks = [AttnBlock(norm(), _make(lambda: build_attention(variant, cfg), device, dtype), B, max_len)
                  for _ in range(replicas)]
    elif kind == "ffn":
        blocks = [FFNBlock(norm(), _make(lambda: build_ffn(variant, cfg), device, dtype)) for _ in range(replicas)]
    else:
        emb = _make(lambda: nn.Embedding(cfg.vocab_size, C), device, dtype)
        if cfg.tie_word_embeddings:
            head = nn.Linear(C, cfg.vocab_size, bias=False, device="meta")
            head.weight = emb.weight
        else:
            head = _make(lambda: nn.Linear(C, cfg.vocab_size, bias=False), device, dtype)
        nb = NonBlock(emb, norm(), head, inv_freq)

    # Inputs the non-block parts would hand over (their cost is the non_block unit's, not timed here).
    ids = torch.randint(0, cfg.vocab_size, (B, T), device=device)
    tok = ids[:, -1:].clone()
    pos = torch.zeros(1, dtype=torch.long, device=device)
    h_pre = torch.randn(B, T, C, device=device, dtype=dtype)
    h_dec = torch.randn(B, 1, C, device=device, dtype=dtype)
    inv_freq = inv_freq.to(device)
    rope = rope_tables(inv_freq, torch.arange(T, device=device).expand(B, T), dtype)  # (B, 1, T, d) each

    if kind == "attention":
        def prefill() -> None:
            for blk in blocks:
                blk.prefill(h_pre, rope)
    elif kind == "ffn":
        def prefill() -> None:
            for blk in blocks:
                blk(h_pre)
    else:
        def prefill() -> None:
            h, _ = nb.prefill_in(ids)
            nb.out(h, tok)

    g = Graphed(prefill, device, use_graphs, pool)
    pre = time_callable(g, device, settings.warmup, settings.repeats, **timed)
    del g

    dpoints = []
    for c in points:
        L = attended_length(c, max_len, bucket)
        pos.fill_(c)
        drope = rope_tables(inv_freq, pos.expand(B, 1), dtype)  # (B, 1, 1, d) each
        bias = decode_bias(pos, L, dtype)  # (L,)
        if kind == "attention":
            def step(drope=drope, bias=bias) -> None:
                for blk in blocks:
                    blk.decode(h_dec, drope, pos, bias)
        elif kind == "ffn":
            def step() -> None:
                for blk in blocks:
                    blk(h_dec)
        else:
            def step(L=L) -> None:
                h, _, _ = nb.decode_in(tok, pos, L)
                nb.out(h, tok)
        g = Graphed(step, device, use_graphs, pool)
        t = time_callable(g, device, settings.warmup, settings.repeats, **timed)
        del g
        dpoints.append({"context": c, "attended": L, "step_s": t.median_s / replicas,
                        "spread": {k: v / replicas if k.endswith("_s") else v for k, v in t.to_dict().items()}})
    return {
        "prefill": {k: v / replicas if k.endswith("_s") else v for k, v in pre.to_dict().items()},
        "decode_points": dpoints,
        "method": {"kind": clock, "cuda_graphs": use_graphs, "warmup": settings.warmup,
                   "repeats": settings.repeats, "statistic": "median", "replicas": replicas, "decode_bucket": bucket,
                   "threads": torch.get_num_threads(), "max_rel_spread": settings.max_rel_spread,
                   "attempts": settings.attempts},
    }

