"""The plan of a run before any GPU time is spent: BLD's stages, and per step the units, the peak memory of
a unit and an estimate of the GPU time.

**Stages.** A bld unit trains every candidate block of a contiguous layer range (a *stage*) from one
parent pass per batch (:mod:`puzzle.distill.bld`). The parent runs over layers ``0 .. end-1`` of its stage
for every batch, so later stages cost more; :func:`plan_stages` cuts the layers into about
``compute.gpu_pods`` stages that minimise the slowest stage (a dynamic program over the cut points), then
cuts further until every stage fits ``compute.gpu_memory_gib``; when even one layer's blocks do not fit,
its variants are split into groups (units with the same layers and fewer blocks). The parent's layers a
unit needs stay resident when they fit beside the blocks, else they stream (``ParentLayers``).

**Estimates.** FLOPs follow :mod:`puzzle.model.counts` (2 per multiply-add; a training step of a block is
3x its forward), GPU time is FLOPs over ``compute.peak_tflops * compute.mfu`` (or the streamed bytes over
``compute.host_to_device_gbps`` when that is slower), profile units from the roofline model of
:mod:`puzzle.profiling.roofline`. Memory: a trained block holds fp32 weights and AdamW's two moments (12
bytes a parameter) and one block's gradients at a time; the parent's layers and the activations of one
layer come on top. Every figure is an estimate and says so; ``bench_bld.py --plan`` checks it against
measured step times.

**Several GPUs a pod** (``compute.gpus_per_pod`` = G > 1; :mod:`puzzle.distributed`). assemble's GKD and
evaluate's forwards shard the models with FSDP2: each GPU holds 1/G of the weights (and of the child's
gradients and AdamW moments), 1/G of the batch's activations, and the largest FSDP unit (one attention
or FFN module, the embedding or the head) gathered whole, twice (the one running and the next); time is
the FLOPs over G GPUs or, when slower, the all-gathers and reduce-scatters over
:data:`INTERCONNECT_GBPS` (FSDP overlaps the two). evaluate's generation, throughput and lm-eval run on
GPU 0 with whole models, so its peak is that when they are on. score deals its batches out: memory per
GPU as one GPU, time over G. GPU hours count every GPU of a pod (G x wall time).

``puzzle run --dry-run`` prints :func:`format_plan`; ``prepare`` writes the same dict to
``plan/cost.json``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from puzzle.config import PuzzleConfig
from puzzle.model import AttentionVariant, FFNVariant, ModelConfig, attention_counts, ffn_counts, parse_name
from puzzle.model.counts import dtype_bytes, non_block_counts

GiB = 2**30
#: CUDA context, allocator slack and fragmentation, kept free in every unit's plan.
OVERHEAD_BYTES = 2 * GiB
#: Fraction of the GPU a plan may fill (the rest absorbs what the model does not count).
FILL = 0.9
_TRAIN_STATE_BYTES = 12  # fp32 weights + AdamW exp_avg + exp_avg_sq
_GRAD_BYTES = 4
#: Per-GPU bandwidth (GB/s) FSDP2's all-gathers and reduce-scatters reach between the GPUs of one pod
#: (NVLink on H100/H200 nodes; PCIe-only nodes reach a tenth of it): an assumption of the estimates.
INTERCONNECT_GBPS = 200.0


# ----- counts ---------------------------------------------------------------------------------------------
def _variant_params(v: AttentionVariant | FFNVariant, cfg: ModelConfig) -> int:
    return (attention_counts(v, cfg) if isinstance(v, AttentionVariant) else ffn_counts(v, cfg)).params


def block_params(name: str, cfg: ModelConfig) -> int:
    """Parameters of a library block (both sub-blocks of a coupled one), norms included."""
    return sum(_variant_params(v, cfg) for v in parse_name(name, cfg.hidden_size))


def _variant_fwd_flops(v: AttentionVariant | FFNVariant, cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one sub-block at sequence length ``seq_len`` (causal attention)."""
    c = attention_counts(v, cfg) if isinstance(v, AttentionVariant) else ffn_counts(v, cfg)
    return 2.0 * c.matmul_params + 2.0 * c.attn_heads * c.head_dim * (seq_len + 1)


def block_fwd_flops(name: str, cfg: ModelConfig, seq_len: int) -> float:
    return sum(_variant_fwd_flops(v, cfg, seq_len) for v in parse_name(name, cfg.hidden_size))


def parent_layer_fwd_flops(cfg: ModelConfig, layer: int, seq_len: int) -> float:
    b = cfg.block_configs[layer]
    return _variant_fwd_flops(b.attention, cfg, seq_len) + _variant_fwd_flops(b.ffn, cfg, seq_len)


def parent_layer_bytes(cfg: ModelConfig, layer: int, dtype: str) -> int:
    b = cfg.block_configs[layer]
    return (_variant_params(b.attention, cfg) + _variant_params(b.ffn, cfg)) * dtype_bytes(dtype)


def non_block_bytes(cfg: ModelConfig, dtype: str) -> int:
    return non_block_counts(cfg).params * dtype_bytes(dtype)


def _max_intermediate(cfg: ModelConfig, names: Sequence[str]) -> int:
    sizes = [cfg.hidden_size]
    for b in cfg.block_configs:
        if b.ffn.intermediate_size:
            sizes.append(b.ffn.intermediate_size)
    for name in names:
        for v in parse_name(name, cfg.hidden_size):
            if isinstance(v, FFNVariant) and v.intermediate_size:
                sizes.append(v.intermediate_size)
    return max(sizes)


def activation_bytes(cfg: ModelConfig, names: Sequence[str], batch: int, seq_len: int, dtype: str) -> int:
    """One layer's parent activations (h, a, h' and the forward's temporaries) plus the forward and backward
    activations of the largest block, which run one block at a time."""
    tokens = batch * seq_len
    C, inter = cfg.hidden_size, _max_intermediate(cfg, names)
    act = dtype_bytes("bfloat16") if dtype != "float32" else 4
    parent = tokens * (6 * C + 3 * inter) * act
    block = tokens * (10 * C + 6 * inter) * act + 2 * tokens * C * 4  # + the fp32 copies the loss makes
    return parent + block


# ----- stages ---------------------------------------------------------------------------------------------
@dataclass
class StagePlan:
    """One bld unit: layers ``[start, end)``, the blocks it trains there, where the parent's layers live."""

    start: int
    end: int
    blocks: list[str]
    group: int = 0  # > 0 when one layer's variants were split over several units
    train_state_bytes: int = 0
    parent_bytes: int = 0
    activation_bytes: int = 0
    resident_layers: list[int] = field(default_factory=list)
    streamed_layers: int = 0
    flops_per_token: float = 0.0
    streamed_bytes_per_batch: int = 0

    @property
    def memory_bytes(self) -> int:
        return self.train_state_bytes + self.parent_bytes + self.activation_bytes + OVERHEAD_BYTES

    @property
    def id(self) -> str:
        g = f".g{self.group}" if self.group else ""
        return f"bld.l{self.start:03d}-{self.end:03d}{g}"

    def unit(self) -> dict[str, Any]:
        return {"id": self.id, "layers": [self.start, self.end], "blocks": list(self.blocks),
                "resident_layers": list(self.resident_layers),
                "planned_memory_gib": round(self.memory_bytes / GiB, 3)}


def trained_blocks(config: PuzzleConfig, cfg: ModelConfig, attention: Sequence[str], ffn: Sequence[str],
                   layer: int) -> list[str]:
    """The blocks a stage trains (or, for no_op, evaluates) at ``layer``: every variant but the parent's own."""
    own = cfg.block_configs[layer]
    if config.bld.mode == "coupled":
        return [f"{a}+{f}" for a in attention for f in ffn if not (a == own.attention.name and f == own.ffn.name)]
    return [a for a in attention if a != own.attention.name] + [f for f in ffn if f != own.ffn.name]


def _train_state(cfg: ModelConfig, names: Sequence[str], n_layers: int) -> int:
    params = [block_params(n, cfg) for n in names]
    return n_layers * sum(params) * _TRAIN_STATE_BYTES + max(params, default=0) * _GRAD_BYTES


def _stage_cost(cfg: ModelConfig, names_per_layer: list[list[str]], start: int, end: int, seq_len: int,
                prefix: list[float]) -> float:
    """Training FLOPs per token of the stage: the parent's forward up to ``end`` + 3x every block's forward."""
    trained = sum(3.0 * block_fwd_flops(n, cfg, seq_len) for i in range(start, end) for n in names_per_layer[i])
    return prefix[end] + trained


def plan_stages(config: PuzzleConfig, cfg: ModelConfig, attention: Sequence[str], ffn: Sequence[str]) -> list[StagePlan]:
    """The bld units of a run (see the module docstring)."""
    n = cfg.num_hidden_layers
    seq = config.data.seq_len
    budget = config.compute.gpu_memory_gib * GiB * FILL
    names = [trained_blocks(config, cfg, attention, ffn, i) for i in range(n)]
    prefix = [0.0]
    for i in range(n):
        prefix.append(prefix[-1] + parent_layer_fwd_flops(cfg, i, seq))

    def fits(a: int, b: int) -> bool:
        return _memory(a, b, names_of(a, b)).memory_bytes <= budget

    def names_of(a: int, b: int) -> list[str]:
        out: list[str] = []
        for i in range(a, b):
            out += [x for x in names[i] if x not in out]
        return out

    def _memory(a: int, b: int, blocks: list[str]) -> StagePlan:
        return _place(StagePlan(a, b, blocks), config, cfg, budget)

    if config.bld.stage_layers is not None:
        k = config.bld.stage_layers
        cuts = [(a, min(a + k, n)) for a in range(0, n, k)]
    else:
        cuts = _balanced_cuts(n, config.compute.gpu_pods, lambda a, b: _stage_cost(cfg, names, a, b, seq, prefix))
        # cut further where a stage does not fit one GPU
        out: list[tuple[int, int]] = []
        for a, b in cuts:
            while a < b:
                e = b
                while e - a > 1 and not fits(a, e):
                    e -= 1
                out.append((a, e))
                a = e
        cuts = out
    plans: list[StagePlan] = []
    for a, b in cuts:
        blocks = names_of(a, b)
        p = _memory(a, b, blocks)
        if p.memory_bytes <= budget or b - a > 1 or len(blocks) <= 1:
            plans.append(p)
            continue
        # one layer whose blocks do not fit together: groups of variants, largest first
        groups: list[list[str]] = [[]]
        for name in sorted(blocks, key=lambda x: -block_params(x, cfg)):
            if groups[-1] and _memory(a, b, [*groups[-1], name]).memory_bytes > budget:
                groups.append([])
            groups[-1].append(name)
        for g, grp in enumerate(groups, 1):
            q = _memory(a, b, grp)
            q.group = g
            plans.append(q)
    for p in plans:
        p.flops_per_token = _stage_cost(cfg, _only(names, p), p.start, p.end, seq, prefix)
    return plans


def _only(names: list[list[str]], p: StagePlan) -> list[list[str]]:
    return [[x for x in names[i] if x in p.blocks] if p.start <= i < p.end else [] for i in range(len(names))]


def _place(p: StagePlan, config: PuzzleConfig, cfg: ModelConfig, budget: float) -> StagePlan:
    """Memory of a stage and which parent layers stay resident (as many as fit; the rest stream)."""
    dtype = config.parent.dtype
    layers = p.end - p.start
    p.train_state_bytes = _train_state(cfg, p.blocks, layers)
    p.activation_bytes = activation_bytes(cfg, p.blocks, config.bld.batch_size, config.data.seq_len, dtype)
    fixed = p.train_state_bytes + p.activation_bytes + OVERHEAD_BYTES + non_block_bytes(cfg, dtype)
    sizes = [parent_layer_bytes(cfg, i, dtype) for i in range(p.end)]
    room = budget - fixed
    if sum(sizes) <= room:
        p.resident_layers = list(range(p.end))
    else:
        # the two largest streamed layers are on the device at once (the current one and the next)
        room -= 2 * max(sizes)
        resident: list[int] = []
        for i in reversed(range(p.end)):  # the stage's own layers first: every batch needs them too
            if sizes[i] <= room:
                resident.append(i)
                room -= sizes[i]
        p.resident_layers = sorted(resident)
    streamed = [i for i in range(p.end) if i not in p.resident_layers]
    p.streamed_layers = len(streamed)
    p.streamed_bytes_per_batch = sum(sizes[i] for i in streamed)
    p.parent_bytes = non_block_bytes(cfg, dtype) + sum(sizes[i] for i in p.resident_layers) + (
        2 * max(sizes[i] for i in streamed) if streamed else 0)
    return p


def _balanced_cuts(n: int, parts: int, cost) -> list[tuple[int, int]]:
    """Contiguous cuts of ``range(n)`` into at most ``parts`` pieces minimising the largest ``cost(a, b)``."""
    parts = max(1, min(parts, n))
    inf = math.inf
    best = [[inf] * (n + 1) for _ in range(parts + 1)]  # best[k][b]: max cost of cutting [0, b) into k pieces
    arg = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for b in range(1, n + 1):
            for a in range(k - 1, b):
                v = max(best[k - 1][a], cost(a, b))
                if v < best[k][b]:
                    best[k][b], arg[k][b] = v, a
    k = min(range(1, parts + 1), key=lambda k: (best[k][n], k))
    cuts = []
    b = n
    while k > 0:
        a = arg[k][b]
        cuts.append((a, b))
        b, k = a, k - 1
    return sorted(cuts)


# ----- the cost plan --------------------------------------------------------------------------------------
@dataclass
class StepCost:
    step: str
    units: int
    gpu: bool
    memory_gib_per_unit: float  # peak on each GPU of a unit
    gpu_hours: float  # summed over units and over the GPUs of each (0 for CPU steps)
    note: str = ""
    gpus_per_unit: int = 1
    hours_per_unit: float = 0.0  # wall-clock hours of one unit

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _seconds(flops: float, config: PuzzleConfig) -> float:
    return flops / (config.compute.peak_tflops * 1e12 * config.compute.mfu)


def bld_step_seconds(p: StagePlan, config: PuzzleConfig) -> float:
    """Estimated seconds of one training step of a stage: its FLOPs at compute.mfu, or the bytes of its
    streamed layers over compute.host_to_device_gbps when copying them is slower (the copy overlaps)."""
    tokens = config.bld.batch_size * config.data.seq_len
    compute = _seconds(p.flops_per_token * tokens, config)
    stream = p.streamed_bytes_per_batch / (config.compute.host_to_device_gbps * 1e9)
    return max(compute, stream)


def bld_seconds(p: StagePlan, config: PuzzleConfig) -> float:
    """Estimated seconds of one stage unit: every training step, plus the held-out and calibration passes."""
    steps = math.ceil(config.bld.tokens / (config.bld.batch_size * config.data.seq_len))
    # held-out (before and after) and calibration: forward passes only, a third of a training step's FLOPs
    extra = _seconds(p.flops_per_token / 3 * (2 * config.bld.eval_tokens + config.bld.calibration_tokens), config)
    return steps * bld_step_seconds(p, config) + extra


def largest_shard_unit_params(cfg: ModelConfig, names: Sequence[str] = ()) -> int:
    """Parameters of the largest FSDP2 unit (:func:`puzzle.distributed.decoder_units`): one attention or
    FFN module of the parent or of a library variant, the embedding or the head."""
    sizes = [cfg.vocab_size * cfg.hidden_size]
    for b in cfg.block_configs:
        sizes += [_variant_params(b.attention, cfg), _variant_params(b.ffn, cfg)]
    for name in names:
        sizes += [_variant_params(v, cfg) for v in parse_name(name, cfg.hidden_size)]
    return max(sizes)


def _comm_seconds(nbytes: float, gpus: int) -> float:
    """All-gather or reduce-scatter of ``nbytes`` over ``gpus`` ranks: each sends/receives (G-1)/G of it."""
    return nbytes * (gpus - 1) / gpus / (INTERCONNECT_GBPS * 1e9) if gpus > 1 else 0.0


def cost_plan(config: PuzzleConfig, cfg: ModelConfig, attention: Sequence[str], ffn: Sequence[str],
              stages: Sequence[StagePlan] | None = None) -> dict[str, Any]:
    """Per step: units, peak memory per unit and estimated GPU hours (see the module docstring)."""
    from puzzle.model.counts import model_counts

    stages = list(stages) if stages is not None else plan_stages(config, cfg, attention, ffn)
    seq = config.data.seq_len
    dtype = config.parent.dtype
    parent = model_counts(cfg)
    parent_bytes = parent.weight_bytes(dtype)
    n = cfg.num_hidden_layers
    fwd_per_token = sum(parent_layer_fwd_flops(cfg, i, seq) for i in range(n)) + 2.0 * non_block_counts(cfg).head_params
    rows: list[StepCost] = [StepCost("prepare", 1, False, 0.0, 0.0, "CPU: tokenize and plan")]

    bld_hours = sum(bld_seconds(p, config) for p in stages) / 3600
    rows.append(StepCost("bld", len(stages), True, max((p.memory_bytes for p in stages), default=0) / GiB,
                         bld_hours, f"{sum(p.streamed_layers > 0 for p in stages)} of {len(stages)} units stream "
                         "parent layers", 1, max((bld_seconds(p, config) for p in stages), default=0.0) / 3600))

    from puzzle.profiling.roofline import estimate_costs

    prof_s, prof_units = 0.0, 0
    reps = config.profile.warmup + config.profile.repeats
    for sc in config.profile.scenarios:
        cpu = sc.device.split(":")[0] == "cpu"
        for kind, names in (("attention", attention), ("ffn", ffn)):
            for name in names:
                v = parse_name(name, cfg.hidden_size)[0]
                est = estimate_costs(kind, v, cfg, sc.batch_size, sc.input_len, sc.output_len, sc.dtype,
                                     sc.device, config.profile.estimate_peak_tflops,
                                     config.profile.estimate_bandwidth_gbps)
                if cpu:  # a whole model of the variant's n layers: one untimed and `repeats` generations a round
                    prof_s += config.profile.rebuilds * (1 + config.profile.repeats) * n * (
                        est["prefill_s"] + est["decode_s"])
                else:  # prefill and decode_points steps, each repeated, on a stack of replicas as deep as
                    # the model, once per build
                    prof_s += config.profile.rebuilds * reps * n * (
                        est["prefill_s"] + config.profile.decode_points * est["decode_s"] / sc.output_len)
                prof_units += 0 if cpu else 1
        # non_block, or (CPU) the one unit of the scenario
        prof_units += 1
    rows.append(StepCost("profile", prof_units, True, 0.0, prof_s / 3600 + prof_units * 20 / 3600,
                         "roofline times x repetitions, plus ~20 s of start-up and graph capture per unit"))

    n_candidates = len(attention) + len(ffn) if config.bld.mode == "decoupled" else len(attention) * len(ffn)
    per = config.score.layers_per_unit
    units = math.ceil(n / per)
    # every candidate runs the suffix after its layer: on average half the model, plus the LM head
    score_flops = config.score.tokens * n * n_candidates * (fwd_per_token / 2)
    score_act = seq * config.score.batch_size * (n_candidates * per + 4) * cfg.hidden_size * 2 \
        + seq * config.score.batch_size * cfg.vocab_size * 4 * 2
    # the parent's layers stay resident as far as they fit beside the rest; the others stream, two at a time
    layer_sizes = [parent_layer_bytes(cfg, i, dtype) for i in range(n)]
    room = max(0.0, config.compute.gpu_memory_gib * GiB * FILL - OVERHEAD_BYTES - score_act - non_block_bytes(cfg, dtype))
    streamed = 0 if sum(layer_sizes) <= room else sum(layer_sizes) - max(0.0, room - 2 * max(layer_sizes))
    score_mem = non_block_bytes(cfg, dtype) + (sum(layer_sizes) if not streamed else room) + score_act + OVERHEAD_BYTES
    G = config.compute.gpus_per_pod
    batches = math.ceil(min(config.score.tokens, config.data.validation_tokens) / (config.score.batch_size * seq))
    stream_s = batches * streamed / (config.compute.host_to_device_gbps * 1e9)
    # one unit's batches dealt over its G GPUs, each streaming the parent for its own batches
    score_s = max(_seconds(score_flops, config) / units, stream_s) / G
    rows.append(StepCost("score", units, True, score_mem / GiB, units * G * score_s / 3600,
                         ", ".join(x for x in ((f"batches dealt over {G} GPUs a unit" if G > 1 else ""),
                                               ("streams parent layers" if streamed else "")) if x), G,
                         score_s / 3600))
    rows.append(StepCost("solve", 1, False, 0.0, 0.0,
                         f"CPU: at most {config.solve.time_limit_s:.0f} s per solve"))

    # the parent, every solution, and two settings of each of the two baseline families
    n_children = config.solve.num_solutions + 1 + (4 if config.eval.baselines else 0)
    gkd = config.assemble.gkd
    student = parent.params  # an upper bound: the child is never larger than the parent here
    db = dtype_bytes(dtype)
    # FSDP2 gathers bf16 copies of fp32 weights on CUDA (mixed precision) and reduces gradients in fp32
    gather_b = 2 if dtype == "float32" else db
    reduce_b = 4 if dtype == "float32" else db
    largest = largest_shard_unit_params(cfg) * (2 * gather_b + 4) if G > 1 else 0
    if gkd.enabled:
        gkd_flops = gkd.tokens * (fwd_per_token + 3 * fwd_per_token)
        # saved for backward, per token: fp32 logits, log-softmax and its gradient (x3), and per layer about
        # 10 hidden-wide tensors (norm inputs/outputs, q, attention out, o_proj in, residuals), k and v, and
        # 4 FFN-wide ones (gate, up, silu(gate), their product) in the compute dtype; the child sized as the
        # parent (its widest FFN). 10/4 was fitted from bench_gkd.py on an H200 (BENCHMARKS.md) to stay above it
        act_b = 2 if dtype != "float32" else 4
        kv_heads = [cfg.num_attention_heads // b.attention.n_heads_in_group
                    for b in cfg.block_configs if b.attention.n_heads_in_group]
        kv_dim = max(kv_heads, default=0) * cfg.head_dim
        per_layer = act_b * (10 * cfg.hidden_size + 2 * kv_dim + 4 * _max_intermediate(cfg, ()))
        per_seq = seq * (cfg.vocab_size * 4 * 3 + per_layer * n)
        # weights, gradients and AdamW's two moments in the child's dtype; the teacher's weights
        states = parent_bytes + student * 4 * db
        gkd_mem = states / G + math.ceil(gkd.batch_size / G) * per_seq + largest + OVERHEAD_BYTES
        steps = math.ceil(gkd.tokens / (gkd.batch_size * seq))
        # per step: the teacher gathered once, the child twice (forward, backward), its gradients reduced
        comm = steps * (_comm_seconds(parent.params * gather_b, G) + _comm_seconds(2 * student * gather_b, G)
                        + _comm_seconds(student * reduce_b, G))
        gkd_s = max(_seconds(gkd_flops, config) / G, comm)
        note = "GKD on" + (f", sharded over {G} GPUs (FSDP2); rank 0 holds the whole child on the host"
                           if G > 1 else "")
    else:
        gkd_mem, gkd_s, note = 2 * parent_bytes + OVERHEAD_BYTES, 0.0, "no GKD: stitching only"
    rows.append(StepCost("assemble", n_children, True, gkd_mem / GiB, n_children * G * gkd_s / 3600, note,
                         G if gkd.enabled else 1, gkd_s / 3600))
    ev_flops = config.eval.tokens * 2 * fwd_per_token
    ev = config.eval
    if G > 1:
        fwd_mem = 2 * parent_bytes / G + largest + OVERHEAD_BYTES
        # generation on GPU 0 with whole models: the child, and the parent for throughput and ICL
        whole = (2 if (ev.measure_throughput or ev.icl.enabled) else 1) * parent_bytes
        gen_mem = whole + OVERHEAD_BYTES if (ev.task_examples > 0 or ev.measure_throughput or ev.icl.enabled
                                            or ev.lm_eval_tasks) else 0
        ev_mem = max(fwd_mem, gen_mem)
        ev_s = max(_seconds(ev_flops, config) / G,
                   math.ceil(ev.tokens / (config.score.batch_size * seq)) * _comm_seconds(2 * parent.params * db, G))
        ev_note = (f"KL/perplexity sharded over {G} GPUs; generation (tasks, ICL) and throughput on GPU 0 with "
                   "whole models" + (f" ({gen_mem / GiB:.1f} GiB, the peak)" if gen_mem > fwd_mem else "")
                   + ", ~1 min a child")
    else:
        ev_mem, ev_s = 2 * parent_bytes + OVERHEAD_BYTES, _seconds(ev_flops, config)
        ev_note = "plus generation (tasks, ICL) and throughput measurement, ~1 min a child"
    ev_s += 60
    rows.append(StepCost("evaluate", n_children, True, ev_mem / GiB, n_children * G * ev_s / 3600, ev_note, G,
                         ev_s / 3600))
    rows.append(StepCost("report", 1, False, 0.0, 0.0, "CPU"))
    over = [r.step for r in rows if r.gpu and r.memory_gib_per_unit > config.compute.gpu_memory_gib]
    return {
        "estimate": True,
        "parent": {"layers": n, "params": parent.params, "bytes": parent_bytes, "dtype": dtype},
        "compute": config.compute.model_dump(mode="json"),
        "steps": [r.to_dict() for r in rows],
        "gpu_hours": sum(r.gpu_hours for r in rows),
        "bld_units": [{**p.unit(), "estimated_seconds": bld_seconds(p, config),
                       "flops_per_token": p.flops_per_token, "streamed_layers": p.streamed_layers}
                      for p in stages],
        "over_memory": over,
        "note": "" if not over else (f"{', '.join(over)}: a unit needs more than compute.gpu_memory_gib on a GPU; "
                                     "assemble, score and evaluate can use several GPUs a pod "
                                     "(compute.gpus_per_pod), any step a smaller batch"),
    }


def format_plan(plan: dict[str, Any]) -> str:
    """The table ``puzzle run --dry-run`` prints."""
    p = plan["parent"]
    c = plan["compute"]
    head = (f"plan (estimates): parent {p['layers']} layers, {p['params'] / 1e9:.3g}B parameters in {p['dtype']}; "
            f"{c['gpu_pods']} GPU pod(s) of {c.get('gpus_per_pod', 1)} x {c['gpu_memory_gib']:g} GiB at "
            f"{c['peak_tflops']:g} TFLOP/s x {c['mfu']:g} MFU")
    lines = [head, f"  {'step':<9} {'units':>5} {'GPUs':>4} {'GiB/GPU':>8} {'h/unit':>8} {'GPU hours':>10}  note"]
    for r in plan["steps"]:
        gpus = str(r.get("gpus_per_unit", 1)) if r["gpu"] else "-"
        mem = f"{r['memory_gib_per_unit']:.2f}" if r["gpu"] else "-"
        wall = f"{r.get('hours_per_unit', 0.0):.3g}" if r["gpu"] and r.get("hours_per_unit") else "-"
        hours = f"{r['gpu_hours']:.4g}" if r["gpu"] else "-"
        lines.append(f"  {r['step']:<9} {r['units']:>5} {gpus:>4} {mem:>8} {wall:>8} {hours:>10}  {r['note']}")
    lines.append(f"  total GPU hours: {plan['gpu_hours']:.4g}")
    if plan["note"]:
        lines.append(f"  warning: {plan['note']}")
    return "\n".join(lines)


__all__ = [
    "StagePlan",
    "StepCost",
    "bld_seconds",
    "block_params",
    "cost_plan",
    "format_plan",
    "plan_stages",
    "trained_blocks",
]


# ----- checks before a run is created -----------------------------------------------------------------
@dataclass
class Preflight:
    """What the checks before any work found: the parent's shape, the expanded search space, the plan."""

    parent: ModelConfig
    attention: list[str]
    ffn: list[str]
    stages: list[StagePlan]
    cost: dict[str, Any]


def read_parent_config(config: PuzzleConfig) -> ModelConfig | None:
    """The parent's config.json from ``parent.uri`` alone (a local folder, or one object of an s3:// one);
    None for a hub name (hf://), which only a step can resolve."""
    import tempfile
    from pathlib import Path

    from puzzle.errors import ConfigError
    from puzzle.model import ModelLoadError, parent_config

    uri = config.parent.uri
    if uri.startswith("hf://"):
        return None
    try:
        if uri.startswith("s3://"):
            from puzzle.store import ArtifactNotFoundError, open_store

            with tempfile.TemporaryDirectory(prefix="puzzle-parent-") as tmp:
                try:
                    open_store(uri, config.store).get_file("config.json", Path(tmp) / "config.json")
                except ArtifactNotFoundError:
                    raise ConfigError(f"parent.uri: {uri!r} holds no config.json (expected a Hugging Face "
                                      "model folder uploaded with `aws s3 sync`)") from None
                return parent_config(tmp)
        return parent_config(Path(uri.removeprefix("file://")))
    except ModelLoadError as err:
        raise ConfigError(f"parent.uri: {err}") from None


def check_against_parent(config: PuzzleConfig, parent: ModelConfig) -> tuple[list[str], list[str]]:
    """Bad input that only the parent's shape reveals, refused before any work (ConfigError, exit 2):
    an impossible or empty search space, a sequence longer than the parent's positions."""
    from puzzle.errors import ConfigError
    from puzzle.model import expand_search_space

    if config.data.seq_len > parent.max_position_embeddings:
        raise ConfigError(
            f"data.seq_len: {config.data.seq_len} is not allowed for this parent; allowed: at most its "
            f"max_position_embeddings = {parent.max_position_embeddings}")
    for sc in config.profile.scenarios:
        if sc.input_len + sc.output_len > parent.max_position_embeddings:
            raise ConfigError(
                f"profile.scenarios[{sc.name}]: input_len + output_len = {sc.input_len + sc.output_len} is not "
                f"allowed for this parent; allowed: at most max_position_embeddings = "
                f"{parent.max_position_embeddings}")
    attn, ffn = expand_search_space(config.search_space, parent)
    attention, ffns = [v.name for v in attn], [v.name for v in ffn]
    if not any(trained_blocks(config, parent, attention, ffns, i) for i in range(parent.num_hidden_layers)):
        raise ConfigError(
            "search_space: offers nothing but the parent's own blocks (attention "
            f"{attention}, FFN {ffns}); allowed: at least one other variant (n_heads_in_group values other "
            "than the parent's, ffn_mult values, replace_with_linear or no_op)")
    return attention, ffns


def preflight(config: PuzzleConfig, parent: ModelConfig | None = None) -> Preflight | None:
    """Every check that needs only the config and the parent's config.json, and the cost plan; None when
    the parent is a hub name (checked by prepare, where the hub is reachable)."""
    from puzzle.errors import ConfigError

    parent = parent or read_parent_config(config)
    if parent is None:
        return None
    attention, ffn = check_against_parent(config, parent)
    stages = plan_stages(config, parent, attention, ffn)
    budget = config.compute.gpu_memory_gib * GiB
    over = [p for p in stages if p.memory_bytes > budget]
    if over:
        p = max(over, key=lambda q: q.memory_bytes)
        raise ConfigError(
            f"compute.gpu_memory_gib: {config.compute.gpu_memory_gib:g} is too small for bld unit {p.id} "
            f"({', '.join(p.blocks[:4])}{' ...' if len(p.blocks) > 4 else ''}), which needs "
            f"{p.memory_bytes / GiB:.1f} GiB even alone at bld.batch_size={config.bld.batch_size}, "
            f"data.seq_len={config.data.seq_len}; allowed: a larger GPU, or a smaller bld.batch_size")
    return Preflight(parent, attention, ffn, stages, cost_plan(config, parent, attention, ffn, stages))
