"""Block variants of the Puzzle search space: typed configs, stable names and the nemotron-nas JSON form.

A child model is one (attention variant, FFN variant) pair per layer. Variants are small frozen
dataclasses so they can be dict keys, compared, and written to artifact keys by ``.name``:

- attention: ``attn_g{n_heads_in_group}`` (GQA), ``attn_linear`` (replace_with_linear), ``attn_noop``
- FFN: ``ffn_m{ffn_mult}`` (SwiGLU sized like DeciLM/vLLM from ffn_mult), ``ffn_i{intermediate}``
  (SwiGLU of an exact intermediate size: the parent's own FFN), ``ffn_linear``, ``ffn_noop``

``ffn_intermediate_size`` is the one rule that turns ffn_mult into an intermediate size; it follows
vLLM's ``round_up(int(2*ffn_mult*hidden/3), 256)`` unless that rounding inflates the size by more than
25% (small models), in which case it rounds up to a multiple of 8 and the JSON carries
``intermediate_size`` explicitly.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from puzzle.errors import BadInputError
from puzzle.serving import ffn_grid_size

# Rounding more coarse than this (relative growth) is replaced by an explicit, finer intermediate size.
_MAX_ROUNDING_GROWTH = 0.25
_FINE_MULTIPLE = 8


class BlockConfigError(BadInputError):
    """A malformed block config: names the layer, the field, the value and what is allowed."""


def _round_up(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def vllm_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """The intermediate size vLLM's nemotron_nas loader derives from ffn_mult (the engines' grid)."""
    return ffn_grid_size(ffn_mult, hidden_size)


def ffn_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """Intermediate size of an ``ffn_m{ffn_mult}`` variant (see the module docstring)."""
    raw = max(1, int(2 * ffn_mult * hidden_size / 3))
    coarse = vllm_intermediate_size(ffn_mult, hidden_size)
    if coarse - raw <= _MAX_ROUNDING_GROWTH * raw:
        return coarse
    return _round_up(raw, _FINE_MULTIPLE)


def _fmt_mult(m: float) -> str:
    # repr round-trips a float exactly and only uses [0-9.e+-], which is artifact-key safe.
    return repr(float(m))


@dataclass(frozen=True)
class AttentionVariant:
    """One attention choice. ``kind``: 'gqa' (needs n_heads_in_group), 'linear' or 'noop'."""

    kind: str
    n_heads_in_group: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("gqa", "linear", "noop"):
            raise ValueError(f"AttentionVariant.kind: {self.kind!r} is not allowed; use 'gqa', 'linear' or 'noop'")
        if (self.kind == "gqa") != (self.n_heads_in_group is not None):
            raise ValueError("AttentionVariant: n_heads_in_group is required for 'gqa' and only for 'gqa'")
        if self.n_heads_in_group is not None and self.n_heads_in_group < 1:
            raise ValueError(f"n_heads_in_group: {self.n_heads_in_group} is not allowed; must be >= 1")

    @property
    def name(self) -> str:
        if self.kind == "gqa":
            return f"attn_g{self.n_heads_in_group}"
        return f"attn_{self.kind}"

    @property
    def no_op(self) -> bool:
        return self.kind == "noop"

    @property
    def replace_with_linear(self) -> bool:
        return self.kind == "linear"

    def num_kv_heads(self, num_attention_heads: int) -> int:
        assert self.n_heads_in_group is not None
        return num_attention_heads // self.n_heads_in_group

    def to_json(self) -> dict[str, Any]:
        return {
            "n_heads_in_group": self.n_heads_in_group,
            "no_op": self.no_op,
            "replace_with_linear": self.replace_with_linear,
        }

    @staticmethod
    def gqa(n_heads_in_group: int) -> AttentionVariant:
        return AttentionVariant("gqa", int(n_heads_in_group))

    @staticmethod
    def linear() -> AttentionVariant:
        return AttentionVariant("linear")

    @staticmethod
    def noop() -> AttentionVariant:
        return AttentionVariant("noop")


@dataclass(frozen=True)
class FFNVariant:
    """One FFN choice. ``kind``: 'swiglu' (needs intermediate_size), 'linear' or 'noop'.

    ``ffn_mult`` is set when the variant came from the search space's ffn_mult list (name
    ``ffn_m{ffn_mult}``); it is None for an exact intermediate size (name ``ffn_i{size}``). It is a
    label only: equality and hashing use the module's shape (kind, intermediate_size), because
    config.json stores sizes, and a size reachable both ways may come back from disk under the other name.
    """

    kind: str
    intermediate_size: int | None = None
    ffn_mult: float | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in ("swiglu", "linear", "noop"):
            raise ValueError(f"FFNVariant.kind: {self.kind!r} is not allowed; use 'swiglu', 'linear' or 'noop'")
        if (self.kind == "swiglu") != (self.intermediate_size is not None):
            raise ValueError("FFNVariant: intermediate_size is required for 'swiglu' and only for 'swiglu'")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            raise ValueError(f"intermediate_size: {self.intermediate_size} is not allowed; must be >= 1")

    @property
    def name(self) -> str:
        if self.kind == "swiglu":
            if self.ffn_mult is not None:
                return f"ffn_m{_fmt_mult(self.ffn_mult)}"
            return f"ffn_i{self.intermediate_size}"
        return f"ffn_{self.kind}"

    @property
    def no_op(self) -> bool:
        return self.kind == "noop"

    @property
    def replace_with_linear(self) -> bool:
        return self.kind == "linear"

    def to_json(self, hidden_size: int) -> dict[str, Any]:
        out: dict[str, Any] = {"ffn_mult": None, "no_op": self.no_op, "replace_with_linear": self.replace_with_linear}
        if self.kind == "swiglu":
            assert self.intermediate_size is not None
            if self.ffn_mult is not None:
                out["ffn_mult"] = float(self.ffn_mult)
                if vllm_intermediate_size(self.ffn_mult, hidden_size) != self.intermediate_size:
                    out["intermediate_size"] = self.intermediate_size
            else:
                # An exact size: the nominal multiplier for readers that want one, the size for the loader.
                out["ffn_mult"] = 3 * self.intermediate_size / (2 * hidden_size)
                out["intermediate_size"] = self.intermediate_size
        return out

    @staticmethod
    def from_mult(ffn_mult: float, hidden_size: int) -> FFNVariant:
        return FFNVariant("swiglu", ffn_intermediate_size(ffn_mult, hidden_size), float(ffn_mult))

    @staticmethod
    def exact(intermediate_size: int) -> FFNVariant:
        return FFNVariant("swiglu", int(intermediate_size))

    @staticmethod
    def linear() -> FFNVariant:
        return FFNVariant("linear")

    @staticmethod
    def noop() -> FFNVariant:
        return FFNVariant("noop")


@dataclass(frozen=True)
class BlockConfig:
    """One layer of the child: its attention and FFN variant."""

    attention: AttentionVariant
    ffn: FFNVariant

    def to_json(self, hidden_size: int) -> dict[str, Any]:
        return {"attention": self.attention.to_json(), "ffn": self.ffn.to_json(hidden_size)}

    @property
    def name(self) -> str:
        return f"{self.attention.name}+{self.ffn.name}"


_ATTN_RE = re.compile(r"^attn_(?:g(\d+)|(linear)|(noop))$")
_FFN_RE = re.compile(r"^ffn_(?:m([0-9.e+-]+)|i(\d+)|(linear)|(noop))$")


def attention_variant_from_name(name: str) -> AttentionVariant:
    m = _ATTN_RE.match(name)
    if not m:
        raise ValueError(f"attention variant name {name!r} is not allowed; use attn_g<N>, attn_linear or attn_noop")
    if m.group(1):
        return AttentionVariant.gqa(int(m.group(1)))
    return AttentionVariant.linear() if m.group(2) else AttentionVariant.noop()


def ffn_variant_from_name(name: str, hidden_size: int) -> FFNVariant:
    m = _FFN_RE.match(name)
    if not m:
        raise ValueError(
            f"FFN variant name {name!r} is not allowed; use ffn_m<mult>, ffn_i<size>, ffn_linear or ffn_noop"
        )
    if m.group(1):
        try:
            mult = float(m.group(1))
        except ValueError:
            raise ValueError(f"FFN variant name {name!r}: {m.group(1)!r} is not a number") from None
        if not (mult > 0 and math.isfinite(mult)):
            raise ValueError(f"FFN variant name {name!r}: ffn_mult must be a finite number > 0")
        return FFNVariant.from_mult(mult, hidden_size)
    if m.group(2):
        return FFNVariant.exact(int(m.group(2)))
    return FFNVariant.linear() if m.group(3) else FFNVariant.noop()


def variant_from_name(name: str, hidden_size: int) -> AttentionVariant | FFNVariant:
    """Parse any variant name (``attn_*`` or ``ffn_*``)."""
    if name.startswith("attn_"):
        return attention_variant_from_name(name)
    return ffn_variant_from_name(name, hidden_size)


# ----- the vocabulary: names of sub-blocks and of coupled blocks, parsed and checked once ----------------
#: What a name may stand for: an attention sub-block, an FFN sub-block, or a coupled "<attn>+<ffn>" block.
KINDS = ("attention", "ffn", "block")
COUPLED_SEPARATOR = "+"


class VariantNameError(BadInputError):
    """A variant name that breaks the grammar or does not fit the parent: names the value and what is allowed."""


def head_divisors(num_attention_heads: int) -> list[int]:
    """The n_heads_in_group values a parent with this many heads allows."""
    return [g for g in range(1, num_attention_heads + 1) if num_attention_heads % g == 0]


def check_fits(variant: AttentionVariant | FFNVariant, num_attention_heads: int) -> None:
    """Raise VariantNameError unless ``variant`` can be built for a parent with this many heads."""
    if isinstance(variant, AttentionVariant) and variant.kind == "gqa":
        assert variant.n_heads_in_group is not None
        if num_attention_heads % variant.n_heads_in_group:
            raise VariantNameError(
                f"variant {variant.name!r}: n_heads_in_group {variant.n_heads_in_group} does not divide the "
                f"parent's {num_attention_heads} attention heads; allowed: {head_divisors(num_attention_heads)}")


def coupled_name(attention: AttentionVariant | str, ffn: FFNVariant | str) -> str:
    """The name of a coupled (whole-block) variant: ``attn_g4+ffn_m0.5``."""
    a = attention if isinstance(attention, str) else attention.name
    f = ffn if isinstance(ffn, str) else ffn.name
    return f"{a}{COUPLED_SEPARATOR}{f}"


def kind_of(name: str) -> str:
    """'attention', 'ffn' or 'block' (coupled) for a well-formed name; VariantNameError otherwise."""
    split_name(name)
    if COUPLED_SEPARATOR in name:
        return "block"
    return "attention" if name.startswith("attn_") else "ffn"


def split_name(name: str) -> tuple[str, ...]:
    """``"attn_g4"`` -> ("attn_g4",); coupled ``"attn_g4+ffn_m0.5"`` -> ("attn_g4", "ffn_m0.5")."""
    parts = tuple(name.split(COUPLED_SEPARATOR)) if isinstance(name, str) else ()
    ok = (len(parts) == 1 and (_ATTN_RE.match(name) or _FFN_RE.match(name))) or (
        len(parts) == 2 and _ATTN_RE.match(parts[0]) and _FFN_RE.match(parts[1]))
    if not ok:
        raise VariantNameError(
            f"variant {name!r} is not allowed; use an attention name (attn_g<N>, attn_linear, attn_noop), an FFN "
            "name (ffn_m<mult>, ffn_i<size>, ffn_linear, ffn_noop) or '<attn>+<ffn>' for a coupled block")
    return parts


def parse_name(name: str, hidden_size: int, num_attention_heads: int | None = None,
               kind: str | None = None) -> tuple[AttentionVariant | FFNVariant, ...]:
    """The typed sub-block variant(s) a name stands for (two for a coupled block), checked once: the grammar,
    the kind (when given: 'attention', 'ffn' or 'block') and, with ``num_attention_heads``, that it fits."""
    if kind is not None and kind not in KINDS:
        raise VariantNameError(f"kind: {kind!r} is not allowed; allowed: {', '.join(KINDS)}")
    parts = split_name(name)
    try:
        out = tuple(variant_from_name(p, hidden_size) for p in parts)
    except ValueError as err:
        raise VariantNameError(str(err)) from None
    if kind is not None and kind_of(name) != kind:
        raise VariantNameError(f"variant {name!r} is not a {kind} variant (it is a {kind_of(name)} variant)")
    if num_attention_heads is not None:
        for v in out:
            check_fits(v, num_attention_heads)
    return out


def _need(d: Any, key: str, where: str, kinds: tuple[type, ...], allowed: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise BlockConfigError(f"{where}.{key}: required field is missing; allowed: {allowed}")
    v = d[key]
    if not isinstance(v, kinds) or (bool in kinds) != isinstance(v, bool):
        raise BlockConfigError(f"{where}.{key}: value {v!r} is not allowed; allowed: {allowed}")
    return v


def block_config_from_json(
    d: Any, layer: int, hidden_size: int, num_attention_heads: int
) -> BlockConfig:
    """Parse ``block_configs[layer]``; every error names the layer and the field."""
    where = f"block_configs[{layer}]"
    if not isinstance(d, dict):
        raise BlockConfigError(f"{where}: value {d!r} is not allowed; expected a mapping with 'attention' and 'ffn'")
    for part in ("attention", "ffn"):
        if not isinstance(d.get(part), dict):
            raise BlockConfigError(f"{where}.{part}: required mapping is missing or not a mapping (got {d.get(part)!r})")
    a, f = d["attention"], d["ffn"]
    aw, fw = f"{where}.attention", f"{where}.ffn"
    a_noop = _need(a, "no_op", aw, (bool,), "true or false")
    a_lin = bool(a.get("replace_with_linear", False))
    if not isinstance(a.get("replace_with_linear", False), bool):
        raise BlockConfigError(f"{aw}.replace_with_linear: value {a['replace_with_linear']!r} is not allowed; allowed: true or false")
    if a_noop and a_lin:
        raise BlockConfigError(f"{aw}: no_op and replace_with_linear are both true; at most one is allowed")
    if a_noop:
        attn = AttentionVariant.noop()
    elif a_lin:
        attn = AttentionVariant.linear()
    else:
        divisors = [g for g in range(1, num_attention_heads + 1) if num_attention_heads % g == 0]
        g = a.get("n_heads_in_group")
        if isinstance(g, bool) or not isinstance(g, int) or g not in divisors:
            raise BlockConfigError(
                f"{aw}.n_heads_in_group: value {g!r} is not allowed; allowed: divisors of "
                f"num_attention_heads={num_attention_heads}: {divisors}"
            )
        attn = AttentionVariant.gqa(g)

    f_noop = _need(f, "no_op", fw, (bool,), "true or false")
    f_lin = f.get("replace_with_linear", False)
    if not isinstance(f_lin, bool):
        raise BlockConfigError(f"{fw}.replace_with_linear: value {f_lin!r} is not allowed; allowed: true or false")
    if f_noop and f_lin:
        raise BlockConfigError(f"{fw}: no_op and replace_with_linear are both true; at most one is allowed")
    if f_noop:
        ffn = FFNVariant.noop()
    elif f_lin:
        ffn = FFNVariant.linear()
    else:
        mult = f.get("ffn_mult")
        size = f.get("intermediate_size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise BlockConfigError(f"{fw}.intermediate_size: value {size!r} is not allowed; allowed: an integer >= 1")
        if mult is not None and (isinstance(mult, bool) or not isinstance(mult, (int, float)) or not mult > 0):
            raise BlockConfigError(f"{fw}.ffn_mult: value {mult!r} is not allowed; allowed: a number > 0")
        if size is None and mult is None:
            raise BlockConfigError(f"{fw}.ffn_mult: required (or intermediate_size) for a SwiGLU FFN; got neither")
        if size is None:
            ffn = FFNVariant("swiglu", vllm_intermediate_size(float(mult), hidden_size), float(mult))
        elif mult is not None and ffn_intermediate_size(float(mult), hidden_size) == size and not math.isclose(
            3 * size / (2 * hidden_size), float(mult), rel_tol=0, abs_tol=1e-12
        ):
            # Written explicitly only because vLLM's rounding is too coarse for this hidden size.
            ffn = FFNVariant("swiglu", size, float(mult))
        else:
            ffn = FFNVariant.exact(size)
    return BlockConfig(attn, ffn)
