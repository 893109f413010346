"""The throughput model: a child's scenario throughput predicted from per-variant profiles.

A scenario batch of B prompts of input_len tokens, generating output_len tokens each, takes
``prefill + sum of decode steps`` seconds; each term is a sum over layers of the chosen attention and
FFN variants' costs plus the non-block cost (embedding, rotary tables, final norm, lm_head, greedy
pick), all read from ``profile/<scenario>/<variant>.json``::

    tokens/s = B * output_len / (prefill_s + decode_s)

``decode_s`` is the whole generation: the profile fits each variant's step time as
``a + b * attended_length`` over its sampled contexts and sums it over every step
(see ``puzzle.profiling.profiler``). Memory is weights plus the KV cache at B x (input_len + output_len).

A measured record whose timings never came within the allowed spread (``stability.stable`` false, or
its spread above the ``max_rel_spread`` the loader is given) is refused with
:class:`UnstableProfileError` (bad input, exit 2), which names the scenario, the variant, the spread,
the bound and the command that measures it again.

Use::

    prof = load_scenario_profile(store, "cpu-b8", max_rel_spread=0.75)
    pred = predict(prof, child_config.block_configs)   # Prediction(tokens_per_s, ...)
    variant_costs(prof, "ffn", "ffn_m0.5")             # the MIP's per-variant linear costs

For the MIP (``puzzle.solver``): its resource ``decode_s:<scenario>`` is the *mean step time*
(``output_len * decode_s`` = the generation), which is ``variant_costs(...)["decode_step_s"]``;
``prefill_s`` and ``memory_bytes`` map one to one; add the ``non_block`` costs as the constant term.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from puzzle.errors import BadInputError
from puzzle.layout import profile_key, profile_prefix
from puzzle.model import AttentionVariant, BlockConfig, FFNVariant, variant_from_name
from puzzle.store import Store

KINDS = ("attention", "ffn", "non_block")
NON_BLOCK = "non_block"


class ProfileError(BadInputError):
    """Profiles missing or inconsistent for what is asked (names the scenario, kind and variant): exit 2."""


class UnstableProfileError(ProfileError):
    """A measured profile whose timings never came within the allowed spread: its numbers are noise."""


@dataclass(frozen=True)
class VariantCost:
    """Costs of one variant (or the non-block parts) on one scenario."""

    kind: str
    name: str
    prefill_s: float  # prefill of the whole batch at input_len
    decode_s: float  # every decode step of one generation, summed
    decode_step_s: float  # decode_s / output_len: the solver's per-step resource
    weight_bytes: int
    kv_bytes: int  # KV cache at batch x (input_len + output_len)
    memory_bytes: int  # weight_bytes + kv_bytes
    params: int
    estimate: bool  # True: analytic roofline, not measured

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Prediction:
    """The throughput model's answer for one child on one scenario."""

    tokens_per_s: float
    prefill_s: float
    decode_s: float
    memory_bytes: int
    estimate: bool  # True when any cost involved is an estimate
    weight_bytes: int = 0
    kv_bytes: int = 0
    params: int = 0

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_s"] = self.total_s
        return d


def _cost(rec: dict[str, Any]) -> VariantCost:
    return VariantCost(
        kind=rec["kind"], name=rec["variant"], prefill_s=float(rec["prefill_s"]), decode_s=float(rec["decode_s"]),
        decode_step_s=float(rec["decode_step_s"]), weight_bytes=int(rec["weight_bytes"]),
        kv_bytes=int(rec["kv_bytes"]), memory_bytes=int(rec["memory_bytes"]), params=int(rec["params"]),
        estimate=bool(rec["estimate"]),
    )


class ScenarioProfile:
    """Every profile record of one scenario, looked up by variant (by shape: ``ffn_m1.0`` and the
    ``ffn_i<size>`` of the same intermediate size are the same module, so they share one cost)."""

    def __init__(self, records: Sequence[dict[str, Any]]) -> None:
        if not records:
            raise ProfileError("no profile records given")
        first = records[0]
        self.scenario: dict[str, Any] = dict(first["scenario"])
        self.hidden_size = int(first["model"]["hidden_size"])
        self.records = list(records)
        self._by_variant: dict[tuple[str, Any], VariantCost] = {}
        self.non_block: VariantCost | None = None
        for rec in records:
            if rec["scenario"] != self.scenario:
                raise ProfileError(
                    f"profile {rec['kind']}/{rec['variant']}: scenario {rec['scenario']} differs from "
                    f"{self.scenario} of the other records; one scenario per ScenarioProfile"
                )
            if rec["kind"] not in KINDS:
                raise ProfileError(f"profile record kind {rec['kind']!r} is not allowed; allowed: {list(KINDS)}")
            cost = _cost(rec)
            if rec["kind"] == NON_BLOCK:
                self.non_block = cost
            else:
                self._by_variant[(rec["kind"], variant_from_name(rec["variant"], self.hidden_size))] = cost

    @property
    def name(self) -> str:
        return str(self.scenario["name"])

    @property
    def estimate(self) -> bool:
        return any(bool(r["estimate"]) for r in self.records)

    def variants(self, kind: str) -> list[str]:
        return sorted(c.name for (k, _), c in self._by_variant.items() if k == kind)

    def cost(self, kind: str, variant: str | AttentionVariant | FFNVariant) -> VariantCost:
        """The cost of a variant (object or name) of ``kind``; ``kind="non_block"`` ignores ``variant``."""
        if kind == NON_BLOCK:
            if self.non_block is None:
                raise ProfileError(f"scenario {self.name!r}: no non_block profile ({profile_key(self.name, NON_BLOCK)})")
            return self.non_block
        if kind not in ("attention", "ffn"):
            raise ProfileError(f"kind: {kind!r} is not allowed; allowed: {list(KINDS)}")
        v = variant_from_name(variant, self.hidden_size) if isinstance(variant, str) else variant
        got = self._by_variant.get((kind, v))
        if got is None and v.no_op:
            # a no_op runs no kernels and holds nothing: its cost is zero whether or not it was profiled
            # (the layer-drop baseline uses no_op blocks even when the search space offers none)
            return VariantCost(kind, v.name, 0.0, 0.0, 0.0, 0, 0, 0, 0, False)
        if got is None:
            raise ProfileError(
                f"scenario {self.name!r}: no {kind} profile for variant {v.name!r}; profiled: {self.variants(kind)}"
            )
        return got


def unstable(rec: dict[str, Any], max_rel_spread: float | None = None) -> bool:
    """True for a measured record whose worst timing spread is above ``max_rel_spread`` (default: the
    bound it was measured under, i.e. its own ``stable`` flag). Estimates, no_op records and records
    from before the check have nothing to judge."""
    st = rec.get("stability")
    if not st or not st.get("measured"):
        return False
    if max_rel_spread is None:
        return not st["stable"]
    return float(st["rel_spread"]) > max_rel_spread


def _unit_of(rec: dict[str, Any]) -> str:
    sc = rec["scenario"]["name"]
    return json.dumps({"id": f"{sc}.{rec['variant']}", "scenario": sc, "kind": rec["kind"], "variant": rec["variant"]})


def check_stable(records: Sequence[dict[str, Any]], max_rel_spread: float | None, run_uri: str) -> None:
    """Refuse (UnstableProfileError, exit 2) any measured record that never came within the bound; the
    message names each one (scenario, variant, measured spread, bound) and the way out."""
    bad = [r for r in records if unstable(r, max_rel_spread)]
    if not bad:
        return
    lines = []
    for r in bad:
        st = r["stability"]
        bound = max_rel_spread if max_rel_spread is not None else float(st["max_rel_spread"])
        if (r.get("method") or {}).get("interleaved"):
            # measured with the scenario's other variants: only together are they comparable
            again = (f"re-run the scenario's profile (all its variants, together) on a quieter machine: "
                     f"puzzle run --resume {run_uri} --redo profile")
        else:
            again = (f"re-run it on a quieter machine: puzzle step profile --run {run_uri} --unit "
                     f"'{_unit_of(r)}' --force")
        lines.append(
            f"scenario {r['scenario']['name']!r}, variant {r['variant']!r}: its {st['worst']} timing has spread "
            f"(p90 - p10) / median = {float(st['rel_spread']):.3g} after {st['attempts']} attempt(s), above "
            f"profile.max_rel_spread = {bound:.3g}; {again}"
        )
    raise UnstableProfileError(
        f"{len(bad)} profile(s) were never stable, so their timings cannot be trusted: " + "; ".join(lines)
        + ". Or, if this machine is never quieter, raise profile.max_rel_spread (puzzle run --resume --redo)"
    )


def load_scenario_profile(store: Store, scenario: str, max_rel_spread: float | None = None,
                          check: bool = True) -> ScenarioProfile:
    """Read every ``profile/<scenario>/*.json`` of a run's store.

    With ``check`` (default) a measured record that never came within the allowed spread is refused
    (:class:`UnstableProfileError`): ``max_rel_spread`` (the run's ``profile.max_rel_spread``) or, when
    None, the bound each record was measured under.
    """
    keys = [k for k in store.list(profile_prefix(scenario)) if k.endswith(".json")]
    if not keys:
        raise ProfileError(f"scenario {scenario!r}: no profiles under {profile_prefix(scenario)}/; run the profile "
                           "step first")
    records = [store.get_json(k) for k in sorted(keys)]
    if check:
        check_stable(records, max_rel_spread, store.uri)
    return ScenarioProfile(records)


def variant_costs(profile: ScenarioProfile, kind: str, name: str) -> dict[str, Any]:
    """Per-variant linear costs the MIP uses: prefill_s, decode_s (whole generation), decode_step_s,
    weight_bytes, kv_bytes, memory_bytes, params, estimate."""
    return profile.cost(kind, name).to_dict()


def predict(profile: ScenarioProfile, block_configs: Sequence[BlockConfig]) -> Prediction:
    """Tokens/s, prefill and decode seconds and memory of a child with these per-layer blocks."""
    if not block_configs:
        raise ProfileError("block_configs: an empty list is not allowed; a child has at least one layer")
    costs = [profile.cost(NON_BLOCK, NON_BLOCK)]
    for b in block_configs:
        costs.append(profile.cost("attention", b.attention))
        costs.append(profile.cost("ffn", b.ffn))
    prefill = sum(c.prefill_s for c in costs)
    decode = sum(c.decode_s for c in costs)
    sc = profile.scenario
    total = prefill + decode
    tokens = sc["batch_size"] * sc["output_len"]
    return Prediction(
        tokens_per_s=tokens / total if total > 0 else float("inf"),
        prefill_s=prefill,
        decode_s=decode,
        memory_bytes=sum(c.memory_bytes for c in costs),
        estimate=any(c.estimate for c in costs),
        weight_bytes=sum(c.weight_bytes for c in costs),
        kv_bytes=sum(c.kv_bytes for c in costs),
        params=sum(c.params for c in costs),
    )
