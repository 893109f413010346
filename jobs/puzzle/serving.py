"""What each serving engine can load: the rules a child must obey to run in vLLM, SGLang, TensorRT-LLM or
llama.cpp, in one place.

``search_space.serving`` names the engines a child must load in (``[vllm]``, ``[vllm, llamacpp]``,
``[any]``...). The union of their rules is enforced three times, each as early as the facts allow:

- ``puzzle config validate`` / :class:`puzzle.config.SearchSpaceConfig` (no parent needed): linear
  blocks the engines cannot build (:func:`search_space_violations`);
- ``prepare`` (and ``puzzle config validate --parent``), once the parent's config.json is read:
  head size, FFN sizes on the engines' grid (:func:`parent_violations`), through
  ``puzzle.model.expand_search_space``; the solver then only sees variants that obey them, and
  :func:`slot_allowed` drops the few that break a rule at one layer only;
- ``save_pretrained(..., serving=...)`` and ``assemble``, on the config.json the engines will read
  (:func:`block_violations`).

Every violation names the field, its value, the engine whose rule it breaks and what is allowed.

The rules, read from each engine's own nemotron-nas loader (``DeciLMForCausalLM``):

- **vLLM** (``vllm/model_executor/models/nemotron_nas.py``, 0.32) and **SGLang**
  (``sglang/srt/models/nemotron_nas.py``, a copy of it): no ``replace_with_linear`` attention or FFN;
  every FFN is sized ``round_up(int(2 * ffn_mult * hidden / 3), 256)`` from ``ffn_mult``, whatever
  ``intermediate_size`` says; the residual stream starts in the first attention that is not a no-op
  (``residual`` is None until then and the FFN's fused add-norm needs it), so no FFN may run before the
  first attention; head sizes of vLLM's CPU attention backend (``CPUAttentionBackend``:
  32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512; its GPU backends take all of these).
- **TensorRT-LLM** (``tensorrt_llm/_torch/models/modeling_nemotron_nas.py``): linear attention and
  linear FFN are built; FFNs sized from ``ffn_mult`` like vLLM; head sizes of its masked MHA kernel
  (``MMHA_SUPPORTED_HEAD_SIZES``: 32, 48, 64, 80, 96, 104, 112, 128, 144, 160, 192, 224, 256).
- **llama.cpp** (``LLM_ARCH_DECI``, through ``puzzle export gguf``): per-layer FFN sizes and head counts
  are written explicitly, so any size loads; linear attention is its "linear attention" layer
  (``wo`` only); there is no linear FFN. A no-op FFN is exported as a zero FFN (its graph drops a
  layer's attention output when the layer has no FFN).

This module imports nothing from the project but :mod:`puzzle.errors`, so the config (a lower floor
than the model) can use it; blocks are read in their config.json form (``block_configs`` entries).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

ANY = "any"

# vLLM's CPU attention backend (v1/attention/backends/cpu_attn.py, get_supported_head_sizes).
VLLM_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
# TensorRT-LLM's masked multi-head attention kernels (MMHA_SUPPORTED_HEAD_SIZES).
TRTLLM_HEAD_DIMS = (32, 48, 64, 80, 96, 104, 112, 128, 144, 160, 192, 224, 256)
FFN_GRID = 256


@dataclass(frozen=True)
class EngineRules:
    """What one engine's nemotron-nas loader supports."""

    name: str
    title: str
    linear_attention: bool
    """Builds ``attention.replace_with_linear`` (one hidden->hidden linear)."""
    linear_ffn: bool
    """Builds ``ffn.replace_with_linear``."""
    ffn_grid: bool
    """Sizes every FFN ``round_up(int(2*ffn_mult*hidden/3), 256)`` from ffn_mult, ignoring intermediate_size."""
    head_dims: tuple[int, ...] | None
    """Head sizes its attention kernels support (None: any)."""
    attention_first: bool
    """No FFN may run before the first attention that is not a no-op (vLLM's residual stream)."""


ENGINES: dict[str, EngineRules] = {
    "vllm": EngineRules("vllm", "vLLM", linear_attention=False, linear_ffn=False, ffn_grid=True,
                        head_dims=VLLM_HEAD_DIMS, attention_first=True),
    # SGLang's nemotron_nas model is vLLM's, adapted: the same rules (its head sizes are taken as vLLM's).
    "sglang": EngineRules("sglang", "SGLang", linear_attention=False, linear_ffn=False, ffn_grid=True,
                          head_dims=VLLM_HEAD_DIMS, attention_first=True),
    "trtllm": EngineRules("trtllm", "TensorRT-LLM", linear_attention=True, linear_ffn=True, ffn_grid=True,
                          head_dims=TRTLLM_HEAD_DIMS, attention_first=False),
    "llamacpp": EngineRules("llamacpp", "llama.cpp", linear_attention=True, linear_ffn=False, ffn_grid=False,
                            head_dims=None, attention_first=False),
}
NAMES = (ANY, *ENGINES)


def parse_serving(value: Any) -> list[str]:
    """``search_space.serving`` as a list of engine names: a single string is one engine; ``any`` stands alone."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise ValueError(f"serving: value {value!r} is not allowed; allowed: a list of {list(NAMES)} (or one name)")
    out: list[str] = []
    for v in items:
        if v not in NAMES:
            raise ValueError(f"serving: value {v!r} is not allowed; allowed: {list(NAMES)}")
        if v not in out:
            out.append(v)
    if ANY in out and len(out) > 1:
        raise ValueError(f"serving: {out} names 'any' beside engines; allowed: [any] alone, or engines only")
    return out


def engines_of(serving: str | Iterable[str]) -> list[EngineRules]:
    """The rules of the engines named (``any``: none)."""
    return [ENGINES[n] for n in parse_serving(list(serving) if not isinstance(serving, str) else serving)
            if n != ANY]


def ffn_grid_size(ffn_mult: float, hidden_size: int) -> int:
    """The intermediate size vLLM, SGLang and TensorRT-LLM build for ``ffn_mult`` at ``hidden_size``."""
    n = int(2 * ffn_mult * hidden_size / 3)
    return n if n % FFN_GRID == 0 else n + FFN_GRID - n % FFN_GRID


def grid_mult(intermediate_size: int, hidden_size: int) -> float:
    """The nominal ffn_mult of an intermediate size (what a config.json writes for an exact size)."""
    return 3 * intermediate_size / (2 * hidden_size)


def _titles(rules: Sequence[EngineRules]) -> str:
    return ", ".join(r.name for r in rules)


@dataclass(frozen=True)
class Violation:
    """One field that breaks one engine's rule."""

    field: str
    value: Any
    engine: str
    rule: str
    allowed: str

    @property
    def message(self) -> str:
        return f"{self.field}: value {self.value} breaks {self.engine}'s rule ({self.rule}); allowed: {self.allowed}"


def messages(violations: Iterable[Violation]) -> str:
    return "; ".join(v.message for v in violations)


def _json(v: Any) -> str:
    return "true" if v is True else "false" if v is False else repr(v)


def search_space_violations(serving: Sequence[str], attention_linear: bool, ffn_linear: bool) -> list[Violation]:
    """Rules a search space breaks whatever the parent (fields relative to ``search_space``)."""
    out = []
    for r in engines_of(serving):
        if attention_linear and not r.linear_attention:
            out.append(Violation("attention.replace_with_linear", _json(True), r.name,
                                 f"{r.title} has no replace_with_linear attention",
                                 "false, or serving without " + r.name))
        if ffn_linear and not r.linear_ffn:
            out.append(Violation("ffn.replace_with_linear", _json(True), r.name,
                                 f"{r.title} has no replace_with_linear FFN",
                                 "false, or serving without " + r.name))
    return out


def grid_table(hidden_size: int, around: Iterable[int], most: int = 6) -> str:
    """Which ffn_mult values give which grid size at ``hidden_size``, for error messages: every size up
    to the largest of ``around`` when there are at most ``most``, else the sizes next to ``around``."""
    around = [a for a in around if a > 0] or [FFN_GRID]
    top = -(-max(around) // FFN_GRID) * FFN_GRID
    if top // FFN_GRID <= most:
        sizes = list(range(FFN_GRID, top + 1, FFN_GRID))
    else:
        near = {-(-a // FFN_GRID) * FFN_GRID + d for a in around for d in (-FFN_GRID, 0, FFN_GRID)}
        sizes = sorted(x for x in near if x > 0)
    parts = [f"{size} up to ffn_mult {grid_mult(size, hidden_size):g}" for size in sizes]
    if top // FFN_GRID > most:
        parts.append(f"every multiple of {FFN_GRID}: size S for ffn_mult up to 3*S/(2*{hidden_size})")
    return ", ".join(parts)


def parent_violations(
    serving: Sequence[str],
    *,
    hidden_size: int,
    head_dim: int,
    ffn_mults: Sequence[float],
    parent_ffn_sizes: Sequence[int],
    include_parent: bool,
) -> list[Violation]:
    """Rules the search space breaks for this parent (full field paths).

    ``parent_ffn_sizes``: the intermediate sizes of the parent's SwiGLU FFNs (its own variants).
    """
    out: list[Violation] = []
    rules = engines_of(serving)
    for r in rules:
        if r.head_dims is not None and head_dim not in r.head_dims:
            out.append(Violation("parent.uri", f"head_dim {head_dim}", r.name,
                                 f"{r.title}'s attention kernels support head sizes {list(r.head_dims)}",
                                 "a parent with one of those head sizes, or search_space.serving without " + r.name))
    grid = [r for r in rules if r.ffn_grid]
    if grid:
        names = _titles(grid)
        sizes = [*parent_ffn_sizes, *(ffn_grid_size(m, hidden_size) for m in ffn_mults)]
        table = f"at hidden_size {hidden_size}: {grid_table(hidden_size, sizes)}"
        seen: dict[int, float] = {}
        for m in ffn_mults:
            size = ffn_grid_size(m, hidden_size)
            rule = f"FFN sizes are round_up(int(2*ffn_mult*hidden/3), 256), so ffn_mult {m:g} gives {size}"
            if size < 1:
                out.append(Violation("search_space.ffn.ffn_mult", f"{m:g}", names,
                                     rule + ", an empty FFN", f"values giving a size >= 256 ({table})"))
            elif size in seen:
                out.append(Violation("search_space.ffn.ffn_mult", f"{m:g}", names,
                                     rule + f", the same as ffn_mult {seen[size]:g}",
                                     f"one value per size ({table})"))
            else:
                seen[size] = m
        if include_parent:
            for s in sorted(set(parent_ffn_sizes)):
                if ffn_grid_size(grid_mult(s, hidden_size), hidden_size) != s:
                    out.append(Violation(
                        "search_space.include_parent", _json(True), names,
                        f"the parent's own FFN has intermediate_size {s}, which is not a multiple of {FFN_GRID}, "
                        f"so these engines would build {ffn_grid_size(grid_mult(s, hidden_size), hidden_size)}",
                        "false (the child then uses only the ffn_mult variants)"))
    return out


def _kind(part: dict[str, Any]) -> str:
    if part.get("no_op"):
        return "noop"
    return "linear" if part.get("replace_with_linear") else "full"


def block_violations(serving: Sequence[str], block_configs: Sequence[dict[str, Any]], hidden_size: int,
                     head_dim: int) -> list[Violation]:
    """Rules a child breaks, read from its config.json ``block_configs`` (what the engines read)."""
    out: list[Violation] = []
    for r in engines_of(serving):
        if r.head_dims is not None and head_dim not in r.head_dims:
            out.append(Violation("head_dim", head_dim, r.name,
                                 f"{r.title}'s attention kernels support head sizes {list(r.head_dims)}",
                                 f"one of {list(r.head_dims)}"))
        for i, b in enumerate(block_configs):
            a, f = b["attention"], b["ffn"]
            if _kind(a) == "linear" and not r.linear_attention:
                out.append(Violation(f"block_configs[{i}].attention.replace_with_linear", "true", r.name,
                                     f"{r.title} has no replace_with_linear attention",
                                     "a GQA or no-op attention at this layer"))
            if _kind(f) == "linear" and not r.linear_ffn:
                out.append(Violation(f"block_configs[{i}].ffn.replace_with_linear", "true", r.name,
                                     f"{r.title} has no replace_with_linear FFN", "a SwiGLU or no-op FFN at this layer"))
            if r.ffn_grid and _kind(f) == "full":
                size = f.get("intermediate_size")
                built = ffn_grid_size(f["ffn_mult"], hidden_size)
                if size is not None and size != built:
                    out.append(Violation(
                        f"block_configs[{i}].ffn.intermediate_size", size, r.name,
                        f"{r.title} sizes FFNs as round_up(int(2*ffn_mult*hidden/3), 256) and ignores "
                        f"intermediate_size, so ffn_mult {f['ffn_mult']:g} loads as {built}",
                        f"sizes on that grid ({grid_table(hidden_size, (size, built))})"))
        if r.attention_first:
            for i, b in enumerate(block_configs):
                if _kind(b["attention"]) != "noop":
                    break
                if _kind(b["ffn"]) != "noop":
                    out.append(Violation(
                        f"block_configs[{i}].attention.no_op", "true", r.name,
                        f"{r.title}'s residual stream starts at the first attention, so the FFN of layer {i} "
                        "cannot run before any attention",
                        f"an attention at layer {i} or before it, or a no-op FFN at layer {i}"))
                    break
            else:
                out.append(Violation("block_configs[*].attention.no_op", "true at every layer", r.name,
                                     f"{r.title} needs at least one attention", "an attention in some layer"))
    return out


def slot_allowed(serving: Sequence[str], layer: int, slot: str, name: str) -> bool:
    """Whether the solver may pick variant ``name`` for ``(layer, slot)`` (slot: attention, ffn or block).

    The search space already holds only variants every engine builds; this is the one rule that depends
    on the position: where an engine needs an attention before any FFN, layer 0 keeps its attention.
    (Stricter than :func:`block_violations`, which also takes a layer 0 dropped whole, but a per-slot
    rule the MIP can obey without cross-layer constraints.)
    """
    if layer != 0 or not any(r.attention_first for r in engines_of(serving)):
        return True
    if slot == "attention":
        return name != "attn_noop"
    if slot == "block":
        return name.partition("+")[0] != "attn_noop"
    return True
