"""Typed run configuration: the only place defaults live.

A run is described by one YAML file (see ``examples/tiny/puzzle.yaml``). ``load_config`` parses
it into :class:`PuzzleConfig`; unknown or mistyped keys are rejected with the field path, the
value given and what is allowed. ``puzzle config validate FILE`` and ``puzzle config schema``
expose the same checks on the command line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from puzzle.errors import ConfigError
from puzzle.serving import messages as violation_messages
from puzzle.serving import parse_serving, search_space_violations

DType = Literal["float32", "bfloat16", "float16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ParentConfig(_Strict):
    uri: str = Field(
        description="The parent model: a local directory, an s3:// URI of a Hugging Face model "
        "directory, or a hub name (hf://org/name; needs network access at run time)."
    )
    dtype: DType = Field("float32", description="Dtype the parent is loaded in for bld/score/assemble.")


class DataConfig(_Strict):
    distillation_uri: str = Field(description="Text for BLD and GKD: UTF-8 .txt read as one stream, or .jsonl with one {\"text\": ...} document a line.")
    validation_uri: str = Field(description="Held-out text for scoring and evaluation.")
    seq_len: int = Field(256, ge=8, description="Tokens per training/validation sequence.")
    distillation_tokens: int = Field(200_000, ge=1, description="Upper bound of distillation tokens tokenized by prepare.")
    validation_tokens: int = Field(20_000, ge=1, description="Upper bound of validation tokens tokenized by prepare.")
    shard_tokens: int = Field(1_000_000, ge=1024, description="Tokens per shard file in the store.")


class AttentionSpace(_Strict):
    n_heads_in_group: list[int] = Field(
        default_factory=lambda: [1, 2, 4, 8],
        description="GQA variants: num_key_value_heads = num_attention_heads / n_heads_in_group. "
        "Values not dividing the parent's head count are an error.",
    )
    replace_with_linear: bool = Field(True, description="Offer one hidden-to-hidden linear map in place of attention.")
    no_op: bool = Field(True, description="Offer removing the attention sub-block.")

    @model_validator(mode="after")
    def _check(self) -> AttentionSpace:
        for v in self.n_heads_in_group:
            if v < 1:
                raise ValueError(f"n_heads_in_group: value {v} is not allowed; each must be an integer >= 1")
        if len(set(self.n_heads_in_group)) != len(self.n_heads_in_group):
            raise ValueError(f"n_heads_in_group: {self.n_heads_in_group} has duplicates")
        return self


class FFNSpace(_Strict):
    ffn_mult: list[float] = Field(
        default_factory=lambda: [0.5, 1.0, 1.5, 2.0],
        description="SwiGLU variants: intermediate = round_up(int(2*ffn_mult*hidden/3), 256) as vLLM's "
        "nemotron_nas loader computes it (written explicitly where that rounding is too coarse).",
    )
    replace_with_linear: bool = Field(True, description="Offer one hidden-to-hidden linear map in place of the FFN.")
    no_op: bool = Field(True, description="Offer removing the FFN sub-block.")

    @model_validator(mode="after")
    def _check(self) -> FFNSpace:
        for v in self.ffn_mult:
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"ffn_mult: value {v} is not allowed; each must be a finite number > 0")
        if len(set(self.ffn_mult)) != len(self.ffn_mult):
            raise ValueError(f"ffn_mult: {self.ffn_mult} has duplicates")
        return self


class SearchSpaceConfig(_Strict):
    attention: AttentionSpace = Field(
        default_factory=AttentionSpace,
        description="Attention variants offered at every layer (GQA groupings, a linear map, removal).",
    )
    ffn: FFNSpace = Field(
        default_factory=FFNSpace,
        description="FFN variants offered at every layer (SwiGLU widths, a linear map, removal).",
    )
    include_parent: bool = Field(True, description="Keep the parent's own attention/FFN as a candidate per layer.")
    serving: list[Literal["any", "vllm", "sglang", "trtllm", "llamacpp"]] = Field(
        default_factory=lambda: ["any"],
        description="Engines the child must load in (the union of their rules is enforced; see puzzle.serving): "
        "vllm and sglang (no replace_with_linear, FFN sizes on round_up(int(2*ffn_mult*hidden/3), 256), "
        "their head sizes), trtllm (linear blocks allowed, the same FFN grid), llamacpp (no linear FFN), "
        "or [any]. One name alone is read as a list of one.",
    )

    @field_validator("serving", mode="before")
    @classmethod
    def _serving_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _serving(self) -> SearchSpaceConfig:
        self.__dict__["serving"] = parse_serving(self.serving)  # dedupe; 'any' must stand alone
        bad = search_space_violations(self.serving, self.attention.replace_with_linear, self.ffn.replace_with_linear)
        if bad:
            raise ValueError(violation_messages(bad))
        return self


class BLDConfig(_Strict):
    mode: Literal["decoupled", "coupled"] = Field(
        "decoupled", description="decoupled: attention variants train with the parent FFN and vice versa; "
        "coupled: whole blocks '<attn>+<ffn>' train against the parent's whole layer."
    )
    tokens: int = Field(100_000, ge=1, description="Distillation tokens every block trains on (each unit runs "
                        "the parent once over them, feeding every block of its stage).")
    batch_size: int = Field(8, ge=1, description="Sequences per optimizer step.")
    lr: float = Field(1e-3, gt=0, description="AdamW peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_fraction: float = Field(0.05, ge=0, le=1, description="Fraction of steps with linear warm-up.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clipping threshold (per block).")
    checkpoint_every: int = Field(50, ge=1, description="Optimizer steps between checkpoints in the store.")
    eval_tokens: int = Field(8192, ge=1, description="Held-out tokens for initial/final normalized MSE.")
    calibration_tokens: int = Field(8192, ge=1, description="Tokens used to initialize variants from the parent.")
    seed: int = Field(0, description="Seeds the batch order (the same for every block, whichever unit trains it).")
    stage_layers: int | None = Field(
        None, ge=1, description="Layers per bld unit (a stage). None: planned from compute.gpu_pods and "
        "compute.gpu_memory_gib (about one unit per GPU pod, each fitting one GPU).")


class Scenario(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$", description="DNS-label name, used in artifact keys.")
    batch_size: int = Field(
        ge=1, description="Sequences served together (B): blocks are timed at this batch, and the memory "
        "limit counts the KV cache of B sequences.")
    input_len: int = Field(
        ge=1, description="Prompt tokens per sequence (T): prefill runs at this length, decoding after it.")
    output_len: int = Field(
        ge=1, description="Tokens generated per sequence (O); tokens/s = B * O / (prefill + decode seconds).")
    dtype: DType = Field(
        "float32", description="Dtype the model is served in: blocks are timed in it and weights + KV cache "
        "counted at its size (independent of parent.dtype).")
    device: str = Field("cpu", description="'cpu', 'cuda' or 'cuda:N': the target the profile measures.")


class ProfileConfig(_Strict):
    scenarios: list[Scenario] = Field(
        min_length=1, description="Serving targets (at least one, unique names): profile times every block "
        "variant on each; solve's throughput, memory and latency limits and evaluate's tokens/s use them.")
    warmup: int = Field(3, ge=0, description="Untimed repetitions before measuring.")
    repeats: int = Field(10, ge=1, description="Timed repetitions; the median is used. A CPU scenario's "
                         "unit: generations of every variant's whole model per round; evaluate: generations "
                         "of the model and of its parent, in turns.")
    rebuilds: int = Field(1, ge=1, description="Times profile builds each block afresh (new weights and buffers) "
                          "and measures it; the build of median total time is kept. A CPU scenario's unit takes "
                          "them as rounds: every variant's whole model (it in every layer) built and timed once "
                          "per round, in turns, the median over rounds kept. On a CPU a small block's time moves "
                          "between builds and over minutes by more than between repeats of one build (10-35% "
                          "measured on a 2-core VM), so CPU "
                          "targets want 3-5; 1 on a GPU.")
    decode_points: int = Field(5, ge=2, description="Context lengths sampled across the output range.")
    max_rel_spread: float = Field(
        0.75, gt=0, description="Largest (p90 - p10) / median a timing may have; above it the timing is taken "
        "again, and solve refuses a profile that never came within it (0.75 catches a median inflated 4x by "
        "a pause; a loaded shared CPU's own noise stays near 0.5).")
    attempts: int = Field(3, ge=1, description="Measurements of one timing at most before it is recorded as unstable.")
    cpu_clock: Literal["auto", "wall", "thread_cpu"] = Field(
        "auto", description="Host clock on CPU: thread_cpu (the thread's CPU time: deaf to time the OS gave to "
        "other processes), wall, or auto (thread_cpu with one torch thread, else wall).")
    reuse: bool = Field(True, description="Copy a stable profile an earlier run measured on the same device, "
                        "shapes and settings (profiles/<digest>/ beside the runs) instead of measuring again.")
    cuda_graphs: bool = Field(True, description="Capture decode steps in CUDA graphs on GPU.")
    estimate_peak_tflops: float = Field(989.0, gt=0, description="Peak dense FLOP/s (TFLOP/s) for the roofline estimate.")
    estimate_bandwidth_gbps: float = Field(3350.0, gt=0, description="Memory bandwidth (GB/s) for the roofline estimate.")

    @model_validator(mode="after")
    def _unique(self) -> ProfileConfig:
        names = [s.name for s in self.scenarios]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"scenarios: name(s) {dup} appear more than once; names must be unique")
        return self


class ScoreConfig(_Strict):
    metric: Literal["kl", "lm_loss", "cosine", "task_accuracy"] = Field(
        "kl", description="Replace-1-block degradation the solver minimizes."
    )
    tokens: int = Field(8192, ge=1, description="Held-out tokens scored per (layer, variant).")
    batch_size: int = Field(
        8, ge=1, description="Validation sequences (data.seq_len tokens each) per forward batch, dealt "
        "round-robin over the pod's GPUs; also the prompts generated together for task_examples.")
    layers_per_unit: int = Field(2, ge=1, description="Layers scored by one score unit.")
    task_examples: int = Field(0, ge=0, description="Tiny-task examples for exact-match scoring (0: off).")


class ThroughputConstraint(_Strict):
    scenario: str = Field(description="Name of a profile scenario.")
    min_speedup: float | None = Field(None, gt=0, description="Throughput at least this multiple of the parent's.")
    min_tokens_per_s: float | None = Field(None, gt=0, description="Absolute throughput floor.")

    @model_validator(mode="after")
    def _one(self) -> ThroughputConstraint:
        if (self.min_speedup is None) == (self.min_tokens_per_s is None):
            raise ValueError("give exactly one of min_speedup or min_tokens_per_s")
        return self


class SolveConfig(_Strict):
    throughput: list[ThroughputConstraint] = Field(
        default_factory=list, description="Throughput floors, each on one profile scenario; empty: none. The "
        "Pareto sweep varies the first (else speedup on the first scenario).")
    memory_gib: float | None = Field(None, gt=0, description="Weights + KV cache (at each scenario's batch and length) limit.")
    max_prefill_latency_s: float | None = Field(None, gt=0, description="Prefill latency limit for every scenario.")
    max_params: int | None = Field(None, gt=0, description="Parameter-count limit of the child.")
    num_solutions: int = Field(1, ge=1, description="Diverse solutions returned.")
    min_hamming_distance: int = Field(1, ge=1, description="Layer choices in which each solution differs from earlier ones.")
    time_limit_s: float = Field(60.0, gt=0, description="CBC time limit per solve; the gap is reported when hit.")
    pareto_points: int = Field(10, ge=0, description="Throughput targets in the Pareto sweep.")


class GKDConfig(_Strict):
    enabled: bool = Field(False, description="Distil every assembled child (and baseline) as a whole from the parent.")
    tokens: int = Field(50_000, ge=1, description="Distillation tokens of global knowledge distillation per child.")
    batch_size: int = Field(8, ge=1, description="Sequences per optimizer step.")
    lr: float = Field(1e-4, gt=0, description="AdamW peak learning rate.")
    warmup_fraction: float = Field(0.05, ge=0, le=1, description="Fraction of steps with linear warm-up, then cosine decay.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient-norm clipping threshold.")
    kl_weight: float = Field(1.0, ge=0, description="Weight of KL(parent || child) on next-token distributions.")
    cosine_weight: float = Field(1.0, ge=0, description="Weight of the mean per-layer cosine distance of hidden states.")
    checkpoint_every: int = Field(50, ge=1, description="Optimizer steps between checkpoints (a killed unit resumes there).")


class AssembleConfig(_Strict):
    gkd: GKDConfig = Field(
        default_factory=GKDConfig,
        description="Global knowledge distillation of every assembled child and baseline (off by default).",
    )
    max_shard_bytes: int = Field(5 * 2**30, ge=1024, description="Safetensors shard size when saving the child.")


class ICLEvalConfig(_Strict):
    """In-context compositional generalization with diverse demonstrations (Levy, Bogin & Berant, ACL 2023)."""

    enabled: bool = Field(False, description="Run the ICL benchmark in evaluate.")
    selection: Literal["paper", "fragments"] = Field(
        "paper",
        description="paper: the authors' definitions (ancestor/sibling local structures, BM25 over program atoms, "
        "k cut to the prompt budget); fragments: this project's earlier variant (branching fragments, utterance BM25).",
    )
    methods: list[Literal["random", "topk", "cover_utt", "cover_ls"]] = Field(
        default_factory=lambda: ["random", "topk", "cover_ls"], description="Demonstration selection methods to compare."
    )
    datasets: list[str] = Field(default_factory=lambda: ["scan:template"], description="dataset:split pairs.")
    num_demonstrations: int | None = Field(
        None, ge=1, description="k; default 24 (paper: least similar dropped until the prompt fits) or 8 (fragments)."
    )
    num_test: int = Field(50, ge=1, description="Test queries drawn (seeded) per dataset:split.")
    max_structure_size: int | None = Field(
        None, ge=1, description="Local-structure size limit n; default 30 (paper: ancestors + left siblings + node) "
        "or 4 (fragments: nodes of a fragment).",
    )
    structure_predictor: Literal["parent", "model", "oracle"] = Field(
        "parent",
        description="Who predicts the test programs whose structures Cover-LS covers: the parent (the same for every "
        "child), the model at predictor_uri, or the gold programs (oracle, for analysis).",
    )
    predictor_uri: str | None = Field(
        None, description="structure_predictor 'model': a Hugging Face model directory (Llama or nemotron-nas), local or s3://."
    )
    max_context_tokens: int | None = Field(
        None, ge=16, description="Tokens a prompt and its answer may take together; default (and at most) the "
        "model's max_position_embeddings. Set it to the length the parent was trained on if that is shorter.",
    )
    num_beams: int = Field(3, ge=1, description="Beams of the predictor whose programs give the structures (the authors use 1, 3 or 5).")
    seed: int = Field(0, description="Seed of the test sample and every random choice of the selection.")

    @model_validator(mode="after")
    def _predictor(self) -> ICLEvalConfig:
        if self.structure_predictor == "model" and not self.predictor_uri:
            raise ValueError("predictor_uri: required when structure_predictor is 'model' (a model directory)")
        if self.structure_predictor != "model" and self.predictor_uri:
            raise ValueError(
                f"predictor_uri: {self.predictor_uri!r} is not allowed with structure_predictor "
                f"{self.structure_predictor!r}; set structure_predictor: model"
            )
        return self

    @property
    def k(self) -> int:
        """Demonstrations the selection picks (before the prompt-budget cut)."""
        return self.num_demonstrations or (24 if self.selection == "paper" else 8)

    @property
    def structure_size(self) -> int:
        """The local-structure size limit n of the selection mode."""
        return self.max_structure_size or (30 if self.selection == "paper" else 4)


class EvalConfig(_Strict):
    tokens: int = Field(8192, ge=1, description="Held-out tokens for KL and perplexity.")
    task_examples: int = Field(100, ge=0, description="Tiny-task (SCAN) exact-match examples (0: off).")
    measure_throughput: bool = Field(True, description="Measure every model's tokens/s on each profile scenario "
                                     "whose device is present, next to the throughput model's prediction.")
    throughput_repeats: int = Field(
        20, ge=1, description="Timed generations of each model per scenario in an evaluate unit, the parent's "
        "taken in turns with the model's: the measured speedup is the median of the pairs' ratios, with its "
        "95% interval. On a CPU they are taken in profile.rebuilds rounds, each with fresh copies of both models "
        "(where a model's tensors land moves its speed). On this project's 2-core CPU one pair's ratio moves by "
        "about 10%, the median of 5 pairs by 6% (1 sd), of 20 by 2% (BENCHMARKS.md).")
    baselines: bool = Field(True, description="Also build and evaluate the uniform-FFN and layer-drop baselines "
                            "(two settings each, bracketing the first solution's throughput).")
    generation_batch_size: int = Field(16, ge=1, description="Prompts generated together (task exact match, ICL).")
    icl_models: list[Literal["parent", "puzzle", "uniform_ffn", "layer_drop"]] = Field(
        default_factory=lambda: ["parent", "puzzle", "uniform_ffn", "layer_drop"],
        description="Which models' in-context learning eval.icl measures (by kind): the parent is needed for "
        "retention; baselines can be left out to save time.")
    lm_eval_tasks: list[str] = Field(default_factory=list, description="lm-evaluation-harness task names or JSON files.")
    icl: ICLEvalConfig = Field(
        default_factory=ICLEvalConfig,
        description="In-context compositional generalization benchmark of the icl_models (off by default).",
    )


class StoreConfig(_Strict):
    uri: str = Field("file://./runs", description="Where runs live: file://PATH or s3://BUCKET/PREFIX.")
    endpoint_url: str | None = Field(None, description="S3 endpoint (else AWS_ENDPOINT_URL).")
    region: str | None = Field(None, description="S3 region (else AWS_REGION / AWS_DEFAULT_REGION).")
    path_style: bool = Field(True, description="Path-style addressing, as S3-compatible servers expect.")
    retry_attempts: int = Field(5, ge=1, description="Attempts per store operation on transient errors.")
    retry_base_delay_s: float = Field(0.5, gt=0, description="First backoff delay; doubles each attempt.")
    retry_max_delay_s: float = Field(20.0, gt=0, description="Backoff delay cap.")
    multipart_threshold_bytes: int = Field(64 * 2**20, ge=5 * 2**20, description="Objects above this go by multipart upload.")
    multipart_chunksize_bytes: int = Field(64 * 2**20, ge=5 * 2**20, description="Multipart part size (S3 minimum 5 MiB).")

    @model_validator(mode="after")
    def _scheme(self) -> StoreConfig:
        if not (self.uri.startswith("file://") or self.uri.startswith("s3://")):
            raise ValueError(f"uri: {self.uri!r} is not allowed; use file://PATH or s3://BUCKET[/PREFIX]")
        return self


class ComputeConfig(_Strict):
    """The machines the pipeline's pods run on (not the serving target: that is profile.scenarios)."""

    gpu_pods: int = Field(1, ge=1, description="GPU pods that run at once; bld is cut into about this many "
                          "units (stages), more when a stage would not fit compute.gpu_memory_gib.")
    gpu_memory_gib: float = Field(80.0, gt=0, description="Memory of one GPU (one pod's device; on a CPU-only "
                                  "machine, the memory a unit may use); every unit's plan fits it.")
    gpus_per_pod: int = Field(1, ge=1, description="GPUs of one pod for assemble (GKD), score and evaluate, which "
                              "then run as that many torchrun workers: GKD and evaluate shard the models over them "
                              "with FSDP2, score deals its batches out; the other steps use one GPU.")
    host_memory_gib: float = Field(64.0, ge=0, description="Host RAM of a pod the parent's streamed layers may "
                                   "be cached in (pinned), so later batches read no file.")
    peak_tflops: float = Field(989.0, gt=0, description="Dense bf16 TFLOP/s of one GPU, for the GPU-time estimates.")
    mfu: float = Field(0.45, gt=0, le=1, description="Fraction of peak_tflops training and scoring reach "
                       "(model FLOPs utilization), for the GPU-time estimates; BLD stages measured 52-56% of "
                       "an H200's measured matmul peak (BENCHMARKS.md).")
    host_to_device_gbps: float = Field(25.0, gt=0, description="Host-to-GPU copy bandwidth (GB/s) a streamed "
                                       "layer crosses, for the estimates.")


class MetricsConfig(_Strict):
    pushgateway_url: str | None = Field(None, description="Push metrics here (grouping key run/step/unit).")


class PuzzleConfig(_Strict):
    """One Puzzle run: parent, data, search space and the settings of every step."""

    name: str = Field("puzzle", pattern=r"^[a-z0-9][a-z0-9-]{0,39}$", description="Run name prefix (DNS label).")
    seed: int = Field(
        0, description="Seeds profile's random block weights and inputs, the random prompts evaluate times, "
        "GKD's batch order, the tiny-task examples of score and evaluate, and lm-eval (bld and eval.icl "
        "have their own seed).")
    parent: ParentConfig = Field(description="The model to compress: where it is, the dtype it is loaded in.")
    data: DataConfig = Field(
        description="Text prepare tokenizes into shards: distillation for bld and GKD, validation for score "
        "and evaluate.")
    search_space: SearchSpaceConfig = Field(
        default_factory=SearchSpaceConfig, description="Per-layer attention and FFN variants prepare expands "
        "into the candidates bld trains and solve chooses among, and the engines the child must load in.")
    bld: BLDConfig = Field(
        default_factory=BLDConfig,
        description="Blockwise local distillation (step bld) of every candidate block against the parent.",
    )
    profile: ProfileConfig = Field(
        description="Serving scenarios and how the profile step times every block variant on them.")
    score: ScoreConfig = Field(
        default_factory=ScoreConfig, description="Replace-1-block scoring (step score): the parent's "
        "degradation with one block swapped for a candidate, the cost solve minimizes.")
    solve: SolveConfig = Field(
        default_factory=SolveConfig,
        description="Constraints and options of the MIP (step solve) that picks one variant per layer.",
    )
    assemble: AssembleConfig = Field(
        default_factory=AssembleConfig,
        description="Building the models solve planned from the block library (step assemble), and GKD.",
    )
    eval: EvalConfig = Field(
        default_factory=EvalConfig,
        description="What evaluate measures on the parent, the children and the baselines.",
    )
    store: StoreConfig = Field(
        default_factory=StoreConfig,
        description="Where the run's artifacts live (file:// or s3://), how each step reads and writes them.",
    )
    metrics: MetricsConfig = Field(
        default_factory=MetricsConfig, description="Where every step pushes its Prometheus metrics (unset: "
        "$PUZZLE_PUSHGATEWAY_URL, else no push)."
    )
    compute: ComputeConfig = Field(
        default_factory=ComputeConfig, description="The machines the pipeline's pods run on: planning cuts "
        "bld into units that fit them and estimates GPU time.")

    @model_validator(mode="after")
    def _cross(self) -> PuzzleConfig:
        names = {s.name for s in self.profile.scenarios}
        for i, t in enumerate(self.solve.throughput):
            if t.scenario not in names:
                raise ValueError(
                    f"solve.throughput.{i}.scenario: {t.scenario!r} is not a profile scenario; "
                    f"allowed: {sorted(names)}"
                )
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """Walk the schema along ``loc`` (minus the last element) and return the fields allowed there."""
    cur: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)) or part not in cur.model_fields:
            return None
        ann = cur.model_fields[part].annotation
        cur = _inner_model(ann)
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return list(cur.model_fields)
    return None


def _inner_model(ann: Any) -> Any:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        m = _inner_model(arg)
        if m is not None:
            return m
    return None


def format_validation_error(err: ValidationError, model: type[BaseModel] = PuzzleConfig) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in loc) or "<root>"
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc) or []
            lines.append(f"{path}: unknown key; allowed keys here: {', '.join(allowed)}")
        elif e["type"] == "missing":
            lines.append(f"{path}: required field is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            ctx = e.get("ctx") or {}
            if "expected" in ctx:
                msg = f"{msg} (allowed: {ctx['expected']})"
            shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
            lines.append(f"{path}: value {shown} is not allowed: {msg}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<config>") -> PuzzleConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    try:
        return PuzzleConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: invalid configuration\n{format_validation_error(err)}") from None


def load_config_text(text: str, source: str = "<config>") -> PuzzleConfig:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    return parse_config(data, source)


def load_config(path: str | Path) -> PuzzleConfig:
    """Read and validate a run config. Relative local URIs stay relative to the current directory."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    return load_config_text(p.read_text(encoding="utf-8"), str(p))


def json_schema() -> dict[str, Any]:
    return PuzzleConfig.model_json_schema()

