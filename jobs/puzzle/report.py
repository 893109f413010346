"""The run report: every model's figures in one ``report.json``, a self-contained ``report.html`` and the
plain-text summary ``puzzle run`` and ``puzzle report`` print.

:func:`build_report` joins what the steps wrote: ``plan/assemble.json`` (which models were built, what
solve predicted for them, the baselines' descriptions), ``solve/solutions.json`` and ``solve/pareto.json``,
each unit's ``eval/<id>/report.json``, ``child/<id>/complete.json`` (GKD), the parent's ``config.json``
(for the widths in the legend of variant codes) and the BLD library's metas (loss curves). On top of the
raw figures it states, with every number computed from those files:

- ``constraints``: each target of ``solve`` (throughput or speedup per scenario, memory, prefill
  latency, parameters) and, per solution, the predicted value (the solver's own where solutions.json
  has it) and the measured one, each met or missed;
- measured speedup = the model's measured tokens/s / the parent's measured tokens/s in the *same*
  evaluate unit, their generations taken in turns (``paired``: both under the same load); where evaluate
  did not pair them, the ``parent`` unit's own measurement (``parent unit``). Both tok/s figures are kept;
- ``equal_speed``: per solution, each baseline family's quality (KL, task accuracy, ICL) interpolated
  linearly at the solution's *measured* speedup between the two settings whose measured speedups
  bracket it; where they do not, no extrapolation: the nearest setting is named and marked;
- ``icl_sentences``: per model, the share of the parent's in-context accuracy it keeps per method and
  split, with the 95% intervals and the selection mode where evaluate recorded them, and a plain
  statement where that share is below half;
- ``legend``: what every variant code of the run's models means, with this parent's widths.

:func:`render_html` draws the plots with matplotlib (Agg) and embeds them as base64 PNGs, so the file
opens anywhere with no network and no side files: the solver's Pareto front, quality against measured
speedup for the parent, every solution and every baseline setting, the per-layer architecture, predicted
against measured throughput and the BLD loss curves. Every point carries a number (the same number in
every plot and in the summary table), placed where it overlaps no other label, and each figure's legend
maps the numbers to model ids. :func:`summary_table` is the text ``puzzle run`` prints at its end and
``puzzle report RUN`` prints: the targets and whether they were met, one row per model, the equal-speed
and ICL sentences and the legend of codes, in at most :data:`TEXT_WIDTH` columns.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import itertools
import logging
import math
import textwrap
from collections.abc import Iterable, Sequence
from typing import Any

from puzzle import layout
from puzzle.config import PuzzleConfig, Scenario, SolveConfig
from puzzle.layout import REPORT_HTML, REPORT_JSON
from puzzle.store import Store

log = logging.getLogger(__name__)

PARENT_ID = "parent"
BASELINE_KINDS = ("uniform_ffn", "layer_drop")
FAMILY_LABELS = {"uniform_ffn": "uniform FFN", "layer_drop": "layer dropping"}
KIND_LABELS = {"parent": "parent", "puzzle": "Puzzle", **FAMILY_LABELS}
ICL_METHODS = {"random": "Random", "topk": "Top-K", "cover_utt": "Cover-Utt", "cover_ls": "Cover-LS"}
GIB = 2**30
TEXT_WIDTH = 110
# A predicted value the solver held to its limit can land a hair on the wrong side of it in floating point
# (CBC's feasibility tolerance); a relative slack this small never turns a real miss into "met".
MET_TOLERANCE = 1e-6
SCORE_METRIC_AXIS = {
    "kl": "summed replace-1-block KL (nats/token)",
    "lm_loss": "summed replace-1-block LM-loss increase (nats/token)",
    "cosine": "summed replace-1-block cosine distance (1 - cos)",
    "task_accuracy": "summed replace-1-block task-accuracy drop (fraction)",
}


def _get(store: Store, key: str) -> Any:
    return store.get_json(key) if store.exists(key) else None


def primary_scenario(config: PuzzleConfig) -> str:
    """The scenario the solve targets first (the Pareto sweep's), else the first profiled one."""
    if config.solve.throughput:
        return config.solve.throughput[0].scenario
    return config.profile.scenarios[0].name


# ----- per-model figures ---------------------------------------------------------------------------
def _predicted(unit: dict[str, Any]) -> dict[str, Any]:
    keep = ("tokens_per_s", "prefill_s", "decode_s", "memory_bytes", "speedup", "estimate", "params")
    return {sc: {k: p.get(k) for k in keep if k in p} for sc, p in (unit.get("predicted") or {}).items()}


def _measured(ev: dict[str, Any] | None, parent_ev: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for sc, t in ((ev or {}).get("throughput") or {}).items():
        m = t.get("measured")
        if m is None:
            out[sc] = {"tokens_per_s": None, "speedup": None, "reason": t.get("reason")}
            continue
        base = (((parent_ev or {}).get("throughput") or {}).get(sc) or {}).get("measured")
        across = m["tokens_per_s"] / base["tokens_per_s"] if base else None
        paired = t.get("paired_speedup")
        ref = t.get("reference_measured") or {}
        out[sc] = {
            "tokens_per_s": m["tokens_per_s"],
            # the parent measured in the same unit, in turns with the model, when evaluate did that
            "speedup": paired if paired is not None else across,
            "speedup_method": "paired" if paired is not None else "parent unit",
            "speedup_ci95": t.get("paired_ci95") if paired is not None else None,
            "pairs": t.get("pairs") if paired is not None else None,
            "parent_tokens_per_s": ref.get("tokens_per_s") if paired is not None else
            (base or {}).get("tokens_per_s"),
            "speedup_vs_parent_unit": across,
            "memory_bytes": m.get("memory_bytes"),
            "prefill_s": m.get("prefill_s"),
            "decode_s": m.get("decode_s"),
            "device": m.get("device"),
            "measured_over_predicted": t.get("measured_over_predicted"),
        }
    return out


def _quality(ev: dict[str, Any] | None, parent_ev: dict[str, Any] | None) -> dict[str, Any]:
    if ev is None:
        return {}
    q = ev.get("quality") or {}
    acc = (ev.get("task") or {}).get("accuracy")
    p_acc = ((parent_ev or {}).get("task") or {}).get("accuracy")
    return {
        "kl": q.get("kl"),
        "perplexity": q.get("perplexity"),
        "parent_perplexity": q.get("parent_perplexity"),
        "lm_loss": q.get("lm_loss"),
        "task_accuracy": acc,
        "parent_task_accuracy": p_acc,
        "retention": acc / p_acc if acc is not None and p_acc else None,
        "task_examples": (ev.get("task") or {}).get("n"),
    }


def _icl_selection(icl: dict[str, Any]) -> str | None:
    """The demonstration-selection mode the ICL results were made with, where they record one."""
    return icl.get("selection") or (icl.get("config") or {}).get("selection")


def _icl_rows(ev: dict[str, Any] | None, parent_ev: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Rows {selection, method, split, parent, child, retention, parent_ci95, child_ci95}.

    Tolerant of both forms of evaluate's ICL results: with ``ci95`` per accuracy and a ``selection``
    mode, or without (then those fields are None)."""
    if not ev or not ev.get("icl") or not parent_ev or not parent_ev.get("icl"):
        return []
    from puzzle.icl.benchmark import retention_table

    p_res, c_res = parent_ev["icl"]["results"], ev["icl"]["results"]
    selection = _icl_selection(ev["icl"])
    rows = []
    for r in retention_table(parent_ev["icl"], ev["icl"]):
        r = dict(r)
        r.setdefault("selection", selection)
        r.setdefault("parent_ci95", p_res[r["split"]][r["method"]].get("ci95"))
        r.setdefault("child_ci95", c_res[r["split"]][r["method"]].get("ci95"))
        rows.append(r)
    return rows


def _gkd(ev: dict[str, Any] | None, complete: dict[str, Any] | None) -> dict[str, Any] | None:
    g = (complete or {}).get("gkd") or (ev or {}).get("gkd")
    if not g:
        return None
    return {k: g.get(k) for k in ("enabled", "steps", "tokens", "initial_kl", "final_kl", "seconds")} | {
        "curve": [[p["step"], p["loss"]] for p in g.get("curve", [])]}


def _bld_curves(store: Store, config: PuzzleConfig) -> list[dict[str, Any]]:
    from puzzle.library import RUN_RECORD_KEY, Library

    if not store.exists(RUN_RECORD_KEY):
        return []
    lib = Library.for_run(store, config)
    out = []
    for layer, variant in lib.entries():
        meta = lib.meta(layer, variant)
        out.append({"layer": layer, "variant": variant, "initial_nmse": meta.get("initial_nmse"),
                    "final_nmse": meta.get("final_nmse"), "loss_curve": meta.get("loss_curve") or []})
    return out


def describe_baseline(kind: str, blocks: list[dict[str, str]] | None, parent_blocks: list[dict[str, str]] | None) -> str:
    """What a baseline is, in words, from its block configs (for runs whose plan carries no description)."""
    blocks = blocks or []
    if kind == "uniform_ffn":
        ffns = sorted({b["ffn"] for b in blocks})
        if ffns == ["ffn_noop"]:
            return "uniform FFN: every FFN removed (ffn_noop on every layer), the parent's attention kept"
        return f"uniform FFN: every FFN replaced by {', '.join(ffns)}, the parent's attention kept"
    if kind == "layer_drop":
        dropped = [i for i, b in enumerate(blocks) if b["attention"] == "attn_noop" and b["ffn"] == "ffn_noop"
                   and (not parent_blocks or parent_blocks[i] != b)]
        return f"layer dropping: {len(dropped)} of {len(blocks)} layers removed ({dropped})"
    return kind


def _parent_dims(store: Store, units: list[dict[str, Any]]) -> dict[str, Any] | None:
    """hidden_size, heads, layers of the parent from an assembled model's config.json (the parent's own
    first: every child shares these global fields)."""
    for u in sorted(units, key=lambda u: u["id"] != PARENT_ID):
        cfg = _get(store, f"{layout.child_prefix(u['id'])}/config.json")
        if cfg and cfg.get("hidden_size") and cfg.get("num_attention_heads"):
            return {"hidden_size": int(cfg["hidden_size"]), "num_attention_heads": int(cfg["num_attention_heads"]),
                    "num_hidden_layers": cfg.get("num_hidden_layers")}
    return None


# ----- the legend of variant codes -----------------------------------------------------------------
_STAND_IN_HIDDEN = 2**20  # large, so that any ffn_mult a config allows maps to a width >= 1


def _parse_variant(name: str, hidden: int | None):
    """The typed variant of a code (the grammar of :mod:`puzzle.model.variants`), None if it is not one.
    Without the parent's hidden size an ``ffn_m`` code parses with a stand-in, and only its ffn_mult counts."""
    from puzzle.model.variants import attention_variant_from_name, ffn_variant_from_name

    try:
        if name.startswith("attn_"):
            return attention_variant_from_name(name)
        return ffn_variant_from_name(name, hidden or _STAND_IN_HIDDEN)
    except ValueError:
        return None


_KIND_ORDER = {"gqa": 0, "swiglu": 0, "linear": 1, "noop": 2}


def _code_order(name: str, hidden: int | None = None) -> tuple:
    """Attention before FFN; GQA by group size, SwiGLU widest first (the parent's own width leads), then
    linear, then no-op."""
    v = _parse_variant(name, hidden)
    if v is None:
        return (2, 0, 0.0, name)
    part = 0 if name.startswith("attn_") else 1
    if v.kind == "gqa":
        size = float(v.n_heads_in_group)
    elif v.kind == "swiglu" and hidden:
        size = -float(v.intermediate_size)
    elif v.kind == "swiglu":  # widths unknown: exact sizes (the parent's own) first, then ffn_mult descending
        size = -math.inf if v.ffn_mult is None else -v.ffn_mult
    else:
        size = 0.0
    return (part, _KIND_ORDER[v.kind], size, name)


def variant_legend(names: Iterable[str], dims: dict[str, Any] | None,
                   parent_blocks: list[dict[str, str]] | None = None) -> list[dict[str, Any]]:
    """One entry {code, short, sub_block, meaning, brief, parent} per variant code in ``names``.

    ``short`` is the code as the architecture plot prints it (``g4``, ``m0.5``, ``i160``); ``meaning``
    spells it out with this parent's sizes where ``dims`` (hidden_size, num_attention_heads) is known;
    ``brief`` is the few words the plot's legend shows; ``parent`` marks the parent's own variants."""
    from puzzle.model.variants import vllm_intermediate_size

    hidden = (dims or {}).get("hidden_size")
    heads = (dims or {}).get("num_attention_heads")
    parent_names = {b[p] for b in parent_blocks or [] for p in ("attention", "ffn")}
    parent_ffn = [v for v in (_parse_variant(n, hidden) for n in parent_names if n.startswith("ffn_"))
                  if v is not None and v.kind == "swiglu" and v.ffn_mult is None]
    parent_width = parent_ffn[0].intermediate_size if len(parent_ffn) == 1 else None
    out = []
    for name in sorted(set(names), key=lambda n: _code_order(n, hidden)):
        v = _parse_variant(name, hidden)
        short = name.removeprefix("attn_").removeprefix("ffn_")
        sub = "attention" if name.startswith("attn_") else "FFN"
        own = name in parent_names
        if v is None:
            meaning, brief = "not a variant code of this project's grammar", name
        elif v.kind == "gqa":
            g = v.n_heads_in_group
            meaning = (f"GQA attention with {g} query head{'s' if g > 1 else ''} per KV head, i.e. num_kv = "
                       f"heads/{g}" + (f" = {heads}/{g} = {heads // g} KV heads" if heads else ""))
            brief = f"GQA, {heads // g} KV heads" if heads else f"GQA, heads/{g} KV"
        elif v.kind == "swiglu" and v.ffn_mult is not None:
            mult = v.ffn_mult
            if hidden:
                coarse, width = vllm_intermediate_size(mult, hidden), v.intermediate_size
                meaning = (f"SwiGLU FFN of intermediate round_up(int(2*{mult:g}*hidden/3), 256) = "
                           f"round_up(int(2*{mult:g}*{hidden}/3), 256) = {coarse}")
                if width != coarse:
                    meaning += (f"; for this parent that rounding grows the width by more than 25%, so it is "
                                f"rounded up to a multiple of 8 instead: {width}")
                if parent_width:
                    meaning += f" ({width / parent_width:.0%} of the parent's {parent_width})"
                brief = f"SwiGLU, width {width}"
            else:
                meaning = f"SwiGLU FFN of intermediate round_up(int(2*{mult:g}*hidden/3), 256)"
                brief = f"SwiGLU, ffn_mult {mult:g}"
        elif v.kind == "swiglu":
            meaning = f"SwiGLU FFN of intermediate exactly {v.intermediate_size}"
            brief = f"SwiGLU, width {v.intermediate_size}"
        elif v.kind == "linear":
            meaning = f"{sub} replaced by one hidden-to-hidden linear map" + (
                " (no mixing across positions)" if sub == "attention" else "")
            brief = "linear map"
        else:
            meaning = f"{sub} removed (the residual stream passes the layer unchanged there)"
            brief = "removed"
        if own:
            meaning += f"; the parent's own {sub}"
            brief += " (parent)"
        out.append({"code": name, "short": short, "sub_block": sub, "meaning": meaning, "brief": brief,
                    "parent": own})
    return out


# ----- constraints ---------------------------------------------------------------------------------
def constraint_targets(solve: SolveConfig, scenarios: Sequence[Scenario]) -> list[dict[str, Any]]:
    """The targets of a ``solve:`` section, named as :func:`puzzle.solver.constraints_from_config` names
    them (the keys of each solution's ``constraints`` in solutions.json), with the value in user units."""
    out = []
    for t in solve.throughput:
        if t.min_tokens_per_s is not None:
            out.append({"name": f"throughput on {t.scenario}", "what": "throughput", "scenario": t.scenario,
                        "op": ">=", "target": t.min_tokens_per_s, "unit": "tokens/s"})
        else:
            out.append({"name": f"speedup over the parent on {t.scenario}", "what": "speedup",
                        "scenario": t.scenario, "op": ">=", "target": t.min_speedup, "unit": "x"})
    for sc in scenarios:
        if solve.memory_gib is not None:
            out.append({"name": f"memory on {sc.name}", "what": "memory", "scenario": sc.name, "op": "<=",
                        "target": solve.memory_gib, "unit": "GiB"})
        if solve.max_prefill_latency_s is not None:
            out.append({"name": f"prefill latency on {sc.name}", "what": "prefill_latency", "scenario": sc.name,
                        "op": "<=", "target": solve.max_prefill_latency_s, "unit": "s"})
    if solve.max_params is not None:
        out.append({"name": "params", "what": "params", "scenario": None, "op": "<=",
                    "target": float(solve.max_params), "unit": "parameters"})
    for c in out:
        c["label"] = f"{c['name']} {c['op']} {_with_unit(c['target'], c['unit'])}"
    return out


def _with_unit(v: float | None, unit: str) -> str:
    if v is None:
        return "—"
    if unit == "x":  # three decimals at most: a 2.048x that misses 2.05 must not print as 2.05x
        return f"{v:.3f}".rstrip("0").rstrip(".") + "x"
    if unit == "parameters":
        return f"{v:,.0f} parameters"
    if unit == "tokens/s":
        return f"{v:,.4g} tokens/s"
    return f"{v:.4g} {unit}"


def _met(value: float | None, op: str, target: float) -> bool | None:
    if value is None:
        return None
    if op == ">=":
        return value >= target * (1 - MET_TOLERANCE)
    return value <= target * (1 + MET_TOLERANCE)


def _constraint_value(c: dict[str, Any], m: dict[str, Any], source: str) -> float | None:
    """The quantity ``c`` limits, for model entry ``m``: from its prediction or from its measurement."""
    what, sc = c["what"], c["scenario"]
    if what == "params":
        if source == "predicted":
            return next((p["params"] for p in m["predicted"].values() if p.get("params")), None)
        return m.get("params")
    fig = (m["predicted"] if source == "predicted" else m.get("measured") or {}).get(sc) or {}
    key = {"throughput": "tokens_per_s", "speedup": "speedup", "memory": "memory_bytes",
           "prefill_latency": "prefill_s"}[what]
    v = fig.get(key)
    return v / GIB if v is not None and what == "memory" else v


def _unmeasured_reason(m: dict[str, Any], sc: str | None) -> str:
    if not m.get("evaluated"):
        return "not evaluated yet"
    reason = ((m.get("measured") or {}).get(sc) or {}).get("reason") if sc else None
    return reason or "evaluate measured no throughput (eval.measure_throughput is off)"


def check_constraints(targets: list[dict[str, Any]], models: list[dict[str, Any]],
                      solver_values: dict[str, dict[str, float]] | None = None) -> list[dict[str, Any]]:
    """Each target with, per model, the predicted value (the solver's own where ``solver_values`` has it)
    and the measured one, each met (True), missed (False) or unknown (None: not measured)."""
    out = []
    for c in targets:
        rows = []
        for m in models:
            pred = (solver_values or {}).get(m["id"], {}).get(c["name"])
            if pred is None:
                pred = _constraint_value(c, m, "predicted")
            meas = _constraint_value(c, m, "measured")
            how = ci = pairs = None
            if c["what"] in ("throughput", "speedup") and meas is not None:
                got = (m.get("measured") or {}).get(c["scenario"]) or {}
                how, ci, pairs = got.get("speedup_method"), got.get("speedup_ci95"), got.get("pairs")
            reason = _unmeasured_reason(m, c["scenario"]) if meas is None else None
            rows.append({"id": m["id"], "predicted": pred, "predicted_met": _met(pred, c["op"], c["target"]),
                         "measured": meas, "measured_met": _met(meas, c["op"], c["target"]),
                         **({"measured_reason": reason} if reason else {}),
                         **({"speedup_method": how} if how and c["what"] == "speedup" else {}),
                         **({"ci95": ci, "pairs": pairs} if ci and c["what"] == "speedup" else {})})
        out.append({**c, "models": rows})
    return out


def targets_status(constraints: list[dict[str, Any]], model_id: str) -> dict[str, bool | None]:
    """Whether ``model_id`` meets every target by prediction and by measurement (None: nothing to say)."""
    rows = [r for c in constraints for r in c["models"] if r["id"] == model_id]
    if not rows:
        return {"predicted": None, "measured": None}

    def all_of(vals: list[bool | None]) -> bool | None:
        if any(v is False for v in vals):
            return False
        return None if any(v is None for v in vals) else True

    return {"predicted": all_of([r["predicted_met"] for r in rows]),
            "measured": all_of([r["measured_met"] for r in rows])}


def targets_verdict(constraints: list[dict[str, Any]], model_id: str) -> str | None:
    """'sol-0 meets every target by prediction; misses memory on cpu as measured (3 of 7 not measured).'"""
    rows = [(c, r) for c in constraints for r in c["models"] if r["id"] == model_id]
    if not rows:
        return None
    p_miss = [c["name"] for c, r in rows if r["predicted_met"] is False]
    m_miss = [c["name"] for c, r in rows if r["measured_met"] is False]
    unmeasured = sum(1 for _, r in rows if r["measured_met"] is None)
    pred = f"misses {', '.join(p_miss)} by prediction" if p_miss else "meets every target by prediction"
    if m_miss:
        meas = f"misses {', '.join(m_miss)} as measured"
    elif unmeasured == len(rows):
        meas = "none was measured"
    else:
        meas = "meets every measured one"
    if 0 < unmeasured < len(rows):
        meas += f" ({unmeasured} of {len(rows)} not measured)"
    return f"{model_id} {pred}; {meas}."


# ----- quality at equal measured speed ---------------------------------------------------------------
def quality_values(m: dict[str, Any], parent: bool = False) -> dict[str, float]:
    """The quality figures compared at equal speed: ``kl``, ``task_accuracy``, ``icl:<split>:<method>``."""
    q = m.get("quality") or {}
    out = {k: q[k] for k in ("kl", "task_accuracy") if q.get(k) is not None}
    if parent:
        for split, per in (m.get("icl_accuracy") or {}).items():
            for method, acc in per.items():
                out[f"icl:{split}:{method}"] = acc
    else:
        for r in m.get("icl") or []:
            out[f"icl:{r['split']}:{r['method']}"] = r["child"]
    return out


def metric_label(key: str) -> tuple[str, str]:
    """(what, unit) of a quality key, for axes, tables and sentences."""
    if key == "kl":
        return "KL(parent || model)", "nats/token"
    if key == "task_accuracy":
        return "task exact match", "fraction"
    split, method = key.removeprefix("icl:").rsplit(":", 1)  # a split may hold ':' (scan:template)
    return f"ICL exact match, {ICL_METHODS.get(method, method)} on {split}", "fraction"


def interpolate_at(x: float, points: Sequence[tuple[float, float, str]]) -> dict[str, Any] | None:
    """The value at speedup ``x`` on the line through ``points`` (speedup, value, model id).

    Linear between the two adjacent points whose speedups bracket ``x`` (``how: interpolated``); where
    none do, no extrapolation: the nearest point's value, named (``how: nearest``). None without points."""
    pts = sorted(points)
    if not pts:
        return None
    for (x0, y0, i0), (x1, y1, i1) in itertools.pairwise(pts):
        if x0 <= x <= x1:
            v = (y0 + y1) / 2 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
            return {"value": v, "how": "interpolated", "between": [i0, i1], "speedups": [x0, x1]}
    if len(pts) == 1 and pts[0][0] == x:
        return {"value": pts[0][1], "how": "interpolated", "between": [pts[0][2]] * 2, "speedups": [x, x]}
    near = min(pts, key=lambda p: (abs(p[0] - x), p[2]))
    return {"value": near[1], "how": "nearest", "nearest": near[2], "speedup": near[0],
            "side": "above" if near[0] > x else "below"}


def _measured_speedup(m: dict[str, Any], sc: str) -> float | None:
    if m.get("kind") == "parent":
        return 1.0 if m.get("evaluated") else None
    return ((m.get("measured") or {}).get(sc) or {}).get("speedup")


def equal_speed(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per solution: its measured speedup and quality, and each baseline family's quality at that speedup
    (see :func:`interpolate_at`), with the sentence that says it."""
    sc = report["primary_scenario"]
    parent = report.get("parent") or {}
    p_vals = quality_values(parent, parent=True)
    out = []
    for s in report["solutions"]:
        x = _measured_speedup(s, sc)
        rec: dict[str, Any] = {"id": s["id"], "scenario": sc, "measured_speedup": x, "values": quality_values(s),
                               "parent_values": p_vals, "families": []}
        if x is not None:
            for kind in BASELINE_KINDS:
                settings = [b for b in report["baselines"] if b["kind"] == kind and _measured_speedup(b, sc) is not None]
                if not settings:
                    continue
                fam = {"kind": kind, "label": FAMILY_LABELS[kind],
                       "settings": [{"id": b["id"], "measured_speedup": _measured_speedup(b, sc),
                                     "values": quality_values(b)} for b in settings], "metrics": {}}
                for key in rec["values"]:
                    pts = [(st["measured_speedup"], st["values"][key], st["id"]) for st in fam["settings"]
                           if key in st["values"]]
                    got = interpolate_at(x, pts)
                    if got is not None:
                        fam["metrics"][key] = got
                rec["families"].append(fam)
        rec["sentence"] = equal_speed_sentence(rec, report)
        out.append(rec)
    return out


def _how(r: dict[str, Any]) -> str:
    if r["how"] == "interpolated":
        a, b = r["between"]
        if a == b:
            return f"{a} at exactly that speed"
        return f"interpolated between {a} at {r['speedups'][0]:.2f}x and {b} at {r['speedups'][1]:.2f}x"
    every = "faster" if r["side"] == "above" else "slower"
    return f"not bracketed: every setting is {every}; nearest, not extrapolated: {r['nearest']} at {r['speedup']:.2f}x"


def equal_speed_sentence(rec: dict[str, Any], report: dict[str, Any]) -> str:
    """'At 2.03x measured speed on cpu, sol-0 keeps 99.5% of the parent's task accuracy (KL 0.012
    nats/token); uniform FFN at the same speed 88.0% (KL 0.31; interpolated between ...), ...'."""
    sid, x, sc = rec["id"], rec["measured_speedup"], rec["scenario"]
    if x is None:
        sol = next((s for s in report["solutions"] if s["id"] == sid), {})
        reason = _unmeasured_reason(sol, sc)
        return f"{sid} has no measured throughput on {sc} ({reason}), so it is not compared with the baselines."
    vals, p_acc = rec["values"], rec["parent_values"].get("task_accuracy")
    if "task_accuracy" in vals and p_acc:
        lead, head = "task_accuracy", "keeps {} of the parent's task accuracy"

        def fmt(v: float) -> str:
            return f"{v / p_acc:.1%}"
    elif "kl" in vals:  # no task figure, or the parent scores 0 on it: no share of it to keep
        lead, head = "kl", "has {}"

        def fmt(v: float) -> str:
            return f"KL {v:.3g} nats/token"
    else:
        return f"{sid} has no quality figures to compare at {x:.2f}x measured speed."
    text = f"At {x:.2f}x measured speed on {sc}, {sid} {head.format(fmt(vals[lead]))}"
    if lead != "kl" and "kl" in vals:
        text += f" (KL {vals['kl']:.3g} nats/token)"
    parts = []
    for fam in rec["families"]:
        r = fam["metrics"].get(lead)
        if r is None:
            continue
        extra = [f"KL {fam['metrics']['kl']['value']:.3g}"] if lead != "kl" and "kl" in fam["metrics"] else []
        parts.append(f"{fam['label']} at the same speed {fmt(r['value'])} ({'; '.join([*extra, _how(r)])})")
    if parts:
        text += "; " + ", ".join(parts)
    elif not report["baselines"]:
        text += "; no baseline was evaluated (eval.baselines is off)"
    else:
        text += "; no baseline has a measured speedup to compare with"
    return text + "."


# ----- ICL sentences -------------------------------------------------------------------------------
def _acc_ci(a: float, ci: Sequence[float] | None) -> str:
    return f"{a:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def icl_sentence(model_id: str, rows: list[dict[str, Any]]) -> str | None:
    """'sol-0 keeps 96% of the parent's Cover-LS accuracy on scan:template (parent 0.62, child 0.60); ...',
    and a plain statement where a share is below half. None without ICL rows."""
    if not rows:
        return None
    parts, low = [], []
    for i, r in enumerate(rows):
        name = ICL_METHODS.get(r["method"], r["method"])
        p, c = _acc_ci(r["parent"], r.get("parent_ci95")), _acc_ci(r["child"], r.get("child_ci95"))
        if r["retention"] is None:
            parts.append(f"{'' if i else 'has '}no retention figure for {name} on {r['split']}: the parent "
                         f"scores 0 (child {c})")
            continue
        keep = "keeps " if i == 0 else ""
        parts.append(f"{keep}{'only ' if r['retention'] < 0.5 else ''}{r['retention']:.0%} of the parent's "
                     f"{name} accuracy on {r['split']} (parent {p}, child {c})")
        if r["retention"] < 0.5:
            low.append(f"{name} on {r['split']} ({r['retention']:.0%})")
    text = f"{model_id} " + "; ".join(parts) + "."
    if low:
        text += (f" Below half of the parent's in-context accuracy: {', '.join(low)}; {model_id} has lost "
                 "most of the parent's in-context learning there.")
    return text


# ----- the report ----------------------------------------------------------------------------------
def build_report(store: Store, config: PuzzleConfig, run_id: str | None = None) -> dict[str, Any]:
    """The run's report.json as a dict (see the module docstring)."""
    units = _get(store, layout.plan_key("assemble")) or []
    solutions = {s["id"]: s for s in (_get(store, layout.SOLUTIONS) or [])}
    pareto = _get(store, layout.PARETO) or []
    evals = {u["id"]: _get(store, layout.eval_report_key(u["id"])) for u in units}
    parent_ev = evals.get(PARENT_ID)
    parent_blocks = next((u.get("block_configs") for u in units if u["id"] == PARENT_ID), None)
    entries: dict[str, dict[str, Any]] = {}
    missing = []
    for u in units:
        uid = u["id"]
        ev = evals.get(uid)
        if ev is None:
            missing.append(uid)
        sol = solutions.get(uid, {})
        entries[uid] = {
            "id": uid,
            "kind": u.get("kind"),
            "description": u.get("description") or (describe_baseline(u["kind"], u.get("block_configs"), parent_blocks)
                                                    if u.get("kind") in BASELINE_KINDS else None),
            "block_configs": u.get("block_configs"),
            "predicted": _predicted(u),
            "measured": _measured(ev, parent_ev),
            "quality": _quality(ev, parent_ev),
            "icl": _icl_rows(ev, parent_ev) if uid != PARENT_ID else [],
            "gkd": _gkd(ev, _get(store, layout.child_complete_key(uid))),
            "lm_eval": (ev or {}).get("lm_eval"),
            "params": (ev or {}).get("params"),
            "evaluated": ev is not None,
            **({"objective": sol.get("objective"), "status": sol.get("status"), "gap": sol.get("gap")}
               if sol else {}),
        }
    parent_icl = None
    if parent_ev and parent_ev.get("icl"):
        parent_icl = {split: {m: r["accuracy"] for m, r in per.items()}
                      for split, per in parent_ev["icl"]["results"].items()}
    sc = primary_scenario(config)
    dims = _parent_dims(store, units)
    models = list(entries.values())
    report: dict[str, Any] = {
        "run": run_id,
        "name": config.name,
        "generated_at": _dt.datetime.now(_dt.UTC).isoformat(),
        "scenarios": [s.model_dump(mode="json") for s in config.profile.scenarios],
        "primary_scenario": sc,
        "score_metric": config.score.metric,
        "task_examples": config.eval.task_examples,
        "parent_dims": dims,
        "parent": entries.get(PARENT_ID, {}) | ({"icl_accuracy": parent_icl} if parent_icl else {}),
        "solutions": [e for e in models if e["kind"] == "puzzle"],
        "baselines": [e for e in models if e["kind"] in BASELINE_KINDS],
        "pareto": [
            {"target": p.get("target"), "constraint": p.get("constraint"), "objective": p.get("objective"),
             "tokens_per_s": {k: v.get("tokens_per_s") for k, v in (p.get("predicted") or {}).items()},
             "speedup": {k: v.get("speedup") for k, v in (p.get("predicted") or {}).items()},
             "block_configs": p.get("block_configs")}
            for p in pareto
        ],
        "bld": _bld_curves(store, config),
        "missing": missing,
    }
    report["constraints"] = check_constraints(
        constraint_targets(config.solve, config.profile.scenarios), report["solutions"],
        {sid: s.get("constraints") or {} for sid, s in solutions.items()})
    report["equal_speed"] = equal_speed(report)
    report["icl_selection"] = _icl_selection(parent_ev["icl"]) if parent_ev and parent_ev.get("icl") else None
    report["icl_sentences"] = [{"id": m["id"], "sentence": icl_sentence(m["id"], m["icl"])}
                               for m in [*report["solutions"], *report["baselines"]] if m["icl"]]
    names = {b[p] for m in models for b in m.get("block_configs") or [] for p in ("attention", "ffn")}
    report["legend"] = variant_legend(names, dims, parent_blocks)
    return report


# ----- plots ---------------------------------------------------------------------------------------
def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on pods or CI
    import matplotlib.pyplot as plt

    return plt


_MARKERS = {"parent": ("k", "*"), "puzzle": ("tab:blue", "o"), "uniform_ffn": ("tab:orange", "s"),
            "layer_drop": ("tab:red", "^")}


def _style(kind: str) -> tuple[str, str]:
    return _MARKERS.get(kind, ("0.3", "x"))


def _models(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in [report.get("parent") or {}, *report["solutions"], *report["baselines"]] if m.get("id")]


def model_numbers(report: dict[str, Any]) -> dict[str, int]:
    """The number each model carries in every plot and in the HTML summary table (parent first)."""
    return {m["id"]: i for i, m in enumerate(_models(report), 1)}


def _model_label(m: dict[str, Any], n: int) -> str:
    if m["kind"] == "parent":
        return f"{n}  {m['id']}"
    return f"{n}  {m['id']} ({KIND_LABELS.get(m['kind'], m['kind'])})"


_MARKER_RADIUS_PT = 4.0  # half the width of a scatter marker of size s=60 (points^2)
# Offsets (points) tried in turn for a label: nearest first, then further out in eight directions.
_OFFSETS = [(dx * r, dy * r) for r in (5, 12, 20, 30, 42)
            for dx, dy in ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (0, 1), (-1, 0), (0, -1))]


def place_labels(ax, points: Sequence[tuple[float, float, str]], fontsize: int = 8) -> list:
    """Annotate each (x, y, text) next to its point at the first offset whose box overlaps no label placed
    before it (points that coincide get labels side by side, not on top of each other). Returns the
    annotations. The axes' limits are fixed first, so the boxes measured are the ones drawn."""
    fig = ax.figure
    ax.margins(0.12)  # room for the labels of the outermost points inside the axes
    ax.autoscale_view()
    ax.set_xlim(ax.get_xlim())
    ax.set_ylim(ax.get_ylim())
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    from matplotlib.transforms import Bbox

    # every marker is an obstacle too, so no label covers another model's point
    r = renderer.points_to_pixels(_MARKER_RADIUS_PT)
    centres = ax.transData.transform([(x, y) for x, y, _ in points]) if points else []
    placed = [Bbox.from_extents(cx - r, cy - r, cx + r, cy + r) for cx, cy in centres]
    anns = []
    for x, y, text in points:
        ann = None
        # first pass: inside the axes (clear of titles and neighbouring panels); second: anywhere free
        for inside, (dx, dy) in itertools.product((True, False), _OFFSETS):
            far = abs(dx) > 5 or abs(dy) > 5
            ann = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                              ha="left" if dx > 0 else "right" if dx < 0 else "center",
                              va="bottom" if dy > 0 else "top" if dy < 0 else "center",
                              arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5"} if far else None)
            box = _text_box(ann, renderer)
            fits = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if (fits or not inside) and not any(box.overlaps(b) for b in placed):
                placed.append(box)
                break
            ann.remove()
            ann = None
        if ann is None:  # every place taken: the last one tried, still legible next to its point
            ann = ax.annotate(text, (x, y), xytext=_OFFSETS[-1], textcoords="offset points", fontsize=fontsize)
            placed.append(_text_box(ann, renderer))
        anns.append(ann)
    return anns


def _text_box(ann, renderer):
    """The display box of an annotation's text alone (its own leader line may cross its own marker)."""
    from matplotlib.text import Text

    ann.update_positions(renderer)
    return Text.get_window_extent(ann, renderer)


def _legend_right(ax_or_fig, handles, labels, title: str | None = None) -> None:
    kw = {"fontsize": 8, "title": title, "title_fontsize": 8, "frameon": False}
    if hasattr(ax_or_fig, "transAxes"):
        ax_or_fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0, **kw)
    else:
        ax_or_fig.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 0.95), **kw)


def fig_pareto(report: dict[str, Any]):
    """Left: the solver's front (summed replace-1-block degradation vs predicted throughput) with the
    solutions on it. Right: measured KL to the parent of every built model vs its predicted throughput."""
    sc = report["primary_scenario"]
    nums = model_numbers(report)
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"wspace": 0.3})
    pts = sorted((p["tokens_per_s"].get(sc), p["objective"]) for p in report["pareto"]
                 if p["tokens_per_s"].get(sc) is not None and p["objective"] is not None)
    handles, labels = [], []
    if pts:
        (h,) = a.plot([x for x, _ in pts], [y for _, y in pts], "-", color="0.6", marker=".")
        handles.append(h)
        labels.append("Pareto front (solver)")
    marks = []
    for s in report["solutions"]:
        tps = (s["predicted"].get(sc) or {}).get("tokens_per_s")
        if tps is not None and s.get("objective") is not None:
            h = a.scatter([tps], [s["objective"]], color=_style("puzzle")[0], zorder=3)
            marks.append((tps, s["objective"], str(nums[s["id"]])))
            handles.append(h)
            labels.append(_model_label(s, nums[s["id"]]))
    place_labels(a, marks)
    if not pts and not marks:
        a.text(0.5, 0.5, "no Pareto front or solution in this run (solve/)", ha="center", va="center",
               transform=a.transAxes, fontsize=9, color="0.4")
    a.set_xlabel(f"predicted throughput on {sc} (tokens/s)")
    a.set_ylabel(SCORE_METRIC_AXIS.get(report.get("score_metric") or "kl", "summed replace-1-block degradation"))
    a.set_title("Solver: degradation vs predicted throughput", fontsize=10)
    if handles:
        a.legend(handles, labels, fontsize=7, loc="upper left")
    marks, handles, labels = [], [], []
    for m in _models(report):
        tps = (m["predicted"].get(sc) or {}).get("tokens_per_s")
        kl = (m.get("quality") or {}).get("kl")
        if tps is None or kl is None:
            continue
        color, marker = _style(m["kind"])
        handles.append(b.scatter([tps], [kl], color=color, marker=marker, s=60, zorder=3))
        labels.append(_model_label(m, nums[m["id"]]))
        marks.append((tps, kl, str(nums[m["id"]])))
    place_labels(b, marks)
    b.set_xlabel(f"predicted throughput on {sc} (tokens/s)")
    b.set_ylabel("held-out KL(parent || model) (nats/token)")
    b.set_title("Built models: measured KL vs predicted throughput", fontsize=10)
    if handles:
        _legend_right(b, handles, labels, "models")
    return fig


def plot_pareto(report: dict[str, Any]) -> str | None:
    return _png(fig_pareto(report))


def _quality_keys(report: dict[str, Any]) -> list[str]:
    keys: list[str] = []
    for m in _models(report):
        for k in quality_values(m, parent=m["kind"] == "parent"):
            if k not in keys:
                keys.append(k)
    return sorted(keys, key=lambda k: (k != "kl", k != "task_accuracy", k))


def fig_quality_vs_speed(report: dict[str, Any]):
    """One panel per quality figure (KL, task accuracy, each ICL method x split) against the MEASURED
    speedup over the parent (paired timing), for the parent, every solution and every baseline setting;
    each baseline family's settings joined by a dashed line, and its value at each solution's measured
    speedup (what :func:`equal_speed` reports) drawn hollow on that line. None without measured speedups."""
    sc = report["primary_scenario"]
    nums = model_numbers(report)
    models = [m for m in _models(report) if _measured_speedup(m, sc) is not None]
    keys = _quality_keys(report)
    if not models or not keys:
        return None
    plt = _plt()
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.5 * rows), squeeze=False,
                             gridspec_kw={"wspace": 0.35, "hspace": 0.5})
    handles: dict[str, Any] = {}
    is_parent = {m["id"]: m["kind"] == "parent" for m in models}
    for ax, key in zip(axes.flat, keys, strict=False):
        what, unit = metric_label(key)
        marks = []
        for kind in BASELINE_KINDS:
            line = sorted((_measured_speedup(m, sc), quality_values(m)[key]) for m in models
                          if m["kind"] == kind and key in quality_values(m))
            if len(line) > 1:
                ax.plot([p[0] for p in line], [p[1] for p in line], "--", color=_style(kind)[0], lw=1, zorder=1)
        for m in models:
            v = quality_values(m, parent=is_parent[m["id"]]).get(key)
            if v is None:
                continue
            x = _measured_speedup(m, sc)
            color, marker = _style(m["kind"])
            h = ax.scatter([x], [v], color=color, marker=marker, s=60, zorder=3)
            handles.setdefault(_model_label(m, nums[m["id"]]), h)
            marks.append((x, v, str(nums[m["id"]])))
        for rec in report.get("equal_speed") or []:
            for fam in rec["families"]:
                r = fam["metrics"].get(key)
                if r is None or rec["measured_speedup"] is None:
                    continue
                color, marker = _style(fam["kind"])
                h = ax.scatter([rec["measured_speedup"]], [r["value"]], facecolors="none", edgecolors=color,
                               marker=marker, s=80, zorder=2, linestyle=":" if r["how"] == "nearest" else "-")
                handles.setdefault(f"{fam['label']} at a solution's measured speed (hollow; dotted: nearest "
                                   "setting, not bracketed)", h)
        place_labels(ax, marks)
        ax.set_xlabel(f"measured speedup over the parent on {sc} (x, paired timing)", fontsize=8)
        ax.set_ylabel(f"{unit}", fontsize=8)
        ax.set_title(what, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    _legend_right(fig, list(handles.values()), list(handles), "models (number on each point)")
    fig.suptitle("Quality against measured speed: parent, solutions and every baseline setting", fontsize=11)
    return fig


def plot_quality_vs_speed(report: dict[str, Any]) -> str | None:
    fig = fig_quality_vs_speed(report)
    return None if fig is None else _png(fig)


def fig_architectures(report: dict[str, Any]):
    """One row per model and sub-block (attention, FFN), one column per layer, colored by variant, with a
    legend of the codes printed in the cells."""
    models = [m for m in _models(report) if m.get("block_configs")]
    if not models:
        return None
    plt = _plt()
    import numpy as np
    from matplotlib.patches import Patch

    nums = model_numbers(report)
    hidden = (report.get("parent_dims") or {}).get("hidden_size")
    names = sorted({b[p] for m in models for b in m["block_configs"] for p in ("attention", "ffn")},
                   key=lambda n: _code_order(n, hidden))
    index = {n: i for i, n in enumerate(names)}
    rows, labels = [], []
    for m in models:
        for part in ("attention", "ffn"):
            rows.append([index[b[part]] for b in m["block_configs"]])
            labels.append(f"{nums[m['id']]} {m['id']} {'attn' if part == 'attention' else 'FFN'}")
    grid = np.array(rows)
    n_layers = grid.shape[1]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * n_layers + 3), 0.38 * len(rows) + 1.2))
    cmap = plt.get_cmap("tab20", max(len(names), 2))
    ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=len(names) - 0.5, aspect="auto")
    for r in range(grid.shape[0]):
        for c in range(n_layers):
            ax.text(c, r, names[grid[r, c]].removeprefix("attn_").removeprefix("ffn_"), ha="center",
                    va="center", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xticks(range(n_layers), [str(i) for i in range(n_layers)])
    ax.set_xlabel("layer index")
    ax.set_title("Per-layer architecture (attention / FFN variant per layer)")
    brief = {e["code"]: e for e in report.get("legend") or []}
    patches = [Patch(color=cmap(index[n]), label=f"{n.removeprefix('attn_').removeprefix('ffn_')} = {n}"
                     + (f": {brief[n]['brief']}" if n in brief else "")) for n in names]
    _legend_right(ax, patches, [p.get_label() for p in patches], "codes in the cells")
    return fig


def plot_architectures(report: dict[str, Any]) -> str | None:
    fig = fig_architectures(report)
    return None if fig is None else _png(fig)


def fig_bld(report: dict[str, Any]):
    """Normalized-MSE training curves of the library blocks: one panel per variant, one line per layer."""
    bld = [b for b in report["bld"] if b["loss_curve"]]
    if not bld:
        return None
    plt = _plt()
    hidden = (report.get("parent_dims") or {}).get("hidden_size")
    variants = sorted({b["variant"] for b in bld}, key=lambda n: _code_order(n, hidden))
    cols = min(4, len(variants))
    rows = -(-len(variants) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False)
    for ax, v in zip(axes.flat, variants, strict=False):
        for b in (b for b in bld if b["variant"] == v):
            xs = [p[0] for p in b["loss_curve"]]
            ys = [p[1] for p in b["loss_curve"]]
            ax.plot(xs, ys, label=f"layer {b['layer']}", lw=1)
        ax.set_title(v, fontsize=9)
        ax.set_yscale("log")
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(variants):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.supxlabel("optimizer step")
    fig.supylabel("normalized MSE, sum (y-t)^2 / sum t^2 (log scale)")
    fig.suptitle("BLD loss curves (one line per layer)")
    fig.tight_layout()
    return fig


def plot_bld(report: dict[str, Any]) -> str | None:
    fig = fig_bld(report)
    return None if fig is None else _png(fig)


def fig_throughput(report: dict[str, Any]):
    """Measured vs predicted tokens/s for every model and scenario, with the y = x line."""
    nums = model_numbers(report)
    pts = []
    for m in _models(report):
        for sc, meas in (m.get("measured") or {}).items():
            pred = (m["predicted"].get(sc) or {}).get("tokens_per_s")
            if meas.get("tokens_per_s") is not None and pred is not None:
                pts.append((pred, meas["tokens_per_s"], m, sc))
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    many = len({p[3] for p in pts}) > 1
    handles: dict[str, Any] = {}
    marks = []
    for pred, meas, m, sc in pts:
        color, marker = _style(m["kind"])
        h = ax.scatter([pred], [meas], color=color, marker=marker, s=60, zorder=3)
        handles.setdefault(_model_label(m, nums[m["id"]]), h)
        marks.append((pred, meas, f"{nums[m['id']]}" + (f" {sc}" if many else "")))
    lo = min(min(p[0], p[1]) for p in pts) * 0.9
    hi = max(max(p[0], p[1]) for p in pts) * 1.1
    (line,) = ax.plot([lo, hi], [lo, hi], "--", color="0.5", lw=1)
    handles["measured = predicted"] = line
    place_labels(ax, marks)
    ax.set_xlabel("predicted throughput (tokens/s)")
    ax.set_ylabel("measured throughput (tokens/s)")
    ax.set_title("Throughput: predicted vs measured" + ("" if many else f" on {pts[0][3]}"))
    _legend_right(ax, list(handles.values()), list(handles), "models")
    return fig


def plot_throughput(report: dict[str, Any]) -> str | None:
    fig = fig_throughput(report)
    return None if fig is None else _png(fig)


# ----- text ----------------------------------------------------------------------------------------
def _fmt(v: Any, spec: str = ".3g") -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        return format(v, spec)
    return html.escape(str(v))


def _pct(v: Any) -> str:
    return "—" if v is None else f"{v:.1%}"


def _x(v: Any) -> str:
    return "—" if v is None else f"{v:.2f}x"


def _gib(v: Any) -> str:
    return "—" if v is None else f"{v / GIB:.3g}"


def _metword(v: bool | None) -> str:
    return {True: "met", False: "MISSED", None: "not measured"}[v]


def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per built model: the figures the summary table and the HTML's first table show."""
    sc = report["primary_scenario"]
    rows = []
    for m in _models(report):
        p = m["predicted"].get(sc) or {}
        me = (m.get("measured") or {}).get(sc) or {}
        q = m.get("quality") or {}
        rows.append({
            "id": m["id"], "kind": m["kind"], "description": m.get("description"),
            "predicted_tokens_per_s": p.get("tokens_per_s"),
            "predicted_speedup": p.get("speedup"), "measured_tokens_per_s": me.get("tokens_per_s"),
            "measured_parent_tokens_per_s": me.get("parent_tokens_per_s"),
            "speedup_method": me.get("speedup_method"), "measured_reason": me.get("reason"),
            "measured_speedup": me.get("speedup"), "kl": q.get("kl"), "perplexity": q.get("perplexity"),
            "task_accuracy": q.get("task_accuracy"), "retention": q.get("retention"),
            "memory_bytes": p.get("memory_bytes"), "measured_memory_bytes": me.get("memory_bytes"),
            "params": m.get("params"),
            "targets": targets_status(report.get("constraints") or [], m["id"]) if m["kind"] == "puzzle" else None,
        })
    return rows


def _targets_cell(t: dict[str, bool | None] | None) -> str:
    if not t or t["predicted"] is None:
        return "—"
    word = {True: "met", False: "miss", None: "—"}
    return f"{word[t['predicted']]}/{word[t['measured']]}"


def _wrap(text: str, indent: str = "  ", hang: str = "    ") -> list[str]:
    return textwrap.wrap(text, TEXT_WIDTH, initial_indent=indent, subsequent_indent=hang,
                         break_on_hyphens=False, break_long_words=True)


def _scenario_text(report: dict[str, Any]) -> str:
    sc = report["primary_scenario"]
    s = next((s for s in report["scenarios"] if s["name"] == sc), None)
    if s is None:
        return sc
    return (f"{sc} (batch {s['batch_size']}, {s['input_len']} tokens in / {s['output_len']} out, {s['dtype']} "
            f"on {s['device']})")


def constraint_lines(report: dict[str, Any]) -> list[str]:
    """The targets of solve and, per solution, predicted and measured values with met / MISSED."""
    cons = report.get("constraints")
    if cons is None:
        return []
    if not cons:
        return _wrap("Targets: none set (solve.throughput, memory_gib, max_prefill_latency_s and max_params are "
                     "all empty): the solver minimised degradation alone.", indent="")
    out = ["Targets (solve) and whether each solution meets them, by prediction and by measurement:"]
    for s in report["solutions"]:
        verdict = targets_verdict(cons, s["id"])
        if verdict:
            out += _wrap(verdict)
    for c in cons:
        out.append(f"  {c['label']}")
        for r in c["models"]:
            if r["measured"] is None:
                meas = f"not measured ({r.get('measured_reason') or 'no figure'})"
            else:
                meas = f"measured {_with_unit(r['measured'], c['unit'])} {_metword(r['measured_met'])}"
            if r.get("speedup_method") == "paired":
                ci = r.get("ci95")
                meas += (f" (95% interval {ci[0]:.3g}-{ci[1]:.3g}x; the median of {r.get('pairs')} pairs of "
                         "generations, the parent's timed in turns with it)" if ci else
                         " (paired with the parent, timed in turns with it)")
            out += _wrap(f"{r['id']}: predicted {_with_unit(r['predicted'], c['unit'])} "
                         f"{_metword(r['predicted_met'])}; {meas}", indent="    ", hang="      ")
    return out


def _text_table(groups: list[tuple[str, int]], heads: list[str], rows: list[list[str]], right: set[int],
                width: int = TEXT_WIDTH) -> list[str]:
    """Columns under group labels, two spaces apart; one space where two would pass ``width``, and the first
    column (the model id) cut with '…' where even that does not fit."""
    for gap in (2, 1):
        widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(heads)]
        col = 0
        for label, n in groups:  # widen a group's last column when its label is longer than the group
            span = sum(widths[col:col + n]) + gap * (n - 1)
            if len(label) > span:
                widths[col + n - 1] += len(label) - span
            col += n
        if sum(widths) + gap * (len(widths) - 1) <= width:
            break
    over = sum(widths) + gap * (len(widths) - 1) - width
    if over > 0:
        widths[0] = max(len(heads[0]), widths[0] - over)
        rows = [[r[0] if len(r[0]) <= widths[0] else r[0][: widths[0] - 1] + "…", *r[1:]] for r in rows]
    sep = " " * gap
    top, col = [], 0
    for label, n in groups:
        span = sum(widths[col:col + n]) + gap * (n - 1)
        top.append(label.ljust(span))
        col += n

    def line(cells: list[str]) -> str:
        return sep.join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                                 strict=True)))

    return [sep.join(top).rstrip(), line(heads).rstrip(), sep.join("-" * w for w in widths),
            *[line(r).rstrip() for r in rows]]


def summary_table(report: dict[str, Any]) -> str:
    """The text ``puzzle run`` prints at its end (and ``puzzle report RUN``): the targets, one row per
    model, the equal-speed and ICL sentences and the legend of variant codes, at most TEXT_WIDTH wide."""
    sc = report["primary_scenario"]
    out = _wrap(f"Puzzle run {report.get('run') or report.get('name')}: scenario {_scenario_text(report)}", indent="")
    out += constraint_lines(report)
    rows, unpaired = [], False
    for r in summary_rows(report):
        parent_tps = _fmt(r["measured_parent_tokens_per_s"], ",.0f")
        if r["kind"] != "parent" and r["speedup_method"] == "parent unit":
            parent_tps += "†"
            unpaired = True
        rows.append([r["id"], _fmt(r["predicted_tokens_per_s"], ",.0f"), _x(r["predicted_speedup"]),
                     _fmt(r["measured_tokens_per_s"], ",.0f"), parent_tps if r["kind"] != "parent" else "—",
                     _x(r["measured_speedup"]), _fmt(r["kl"], ".4f"), _pct(r["task_accuracy"]), _pct(r["retention"]),
                     _targets_cell(r["targets"])])
    out.append("")
    out += _text_table([("", 1), ("predicted", 2), (f"measured on {sc}", 3), ("quality", 3), ("targets", 1)],
                       ["model", "tok/s", "x", "tok/s", "parent*", "x", "KL nat/tok", "task acc", "kept", "pred/meas"],
                       rows, right={1, 2, 3, 4, 5, 6, 7, 8})
    n_task = report.get("task_examples")
    notes = ("tok/s = tokens/s; x = speedup over the parent. Measured x = the median over pairs of generations "
             "(the model's and the parent's, timed in turns in the same evaluate unit: paired, same load) of the "
             "parent's time over the model's; parent* = that parent's median tok/s, so each row has its own parent "
             "figure and x is near, not exactly, tok/s / parent*; predicted x = predicted model / predicted "
             "parent. KL = KL(parent || "
             "model) in nats/token on held-out text; task acc = exact match on "
             f"{n_task if n_task else 'the'} tiny-task (SCAN) examples; kept = task acc / the parent's. "
             "targets = every solve target met by the prediction / by the measurement (— not measured).")
    if unpaired:
        notes += " † not paired: the parent unit's own measurement."
    out += _wrap(notes, indent="", hang="")
    if report.get("missing"):
        out.append(f"not evaluated yet: {', '.join(report['missing'])}")
    baselines = [m for m in report["baselines"] if m.get("description")]
    if baselines:
        out.append("Baselines:")
        for m in baselines:
            out += _wrap(f"{m['id']}: {m['description']}", hang="      ")
    if report.get("equal_speed"):
        out.append("Quality at equal measured speed (baselines interpolated linearly in measured speedup):")
        for rec in report["equal_speed"]:
            out += _wrap(rec["sentence"])
    if report.get("icl_sentences"):
        sel = report.get("icl_selection")
        out.append("In-context learning (exact match" + (f", selection mode {sel}" if sel else "")
                   + "; 95% intervals in brackets where evaluated):")
        for s in report["icl_sentences"]:
            out += _wrap(s["sentence"])
    if report.get("legend"):
        d = report.get("parent_dims") or {}
        parent_desc = (f" (parent: hidden {d['hidden_size']}, {d['num_attention_heads']} query heads)"
                       if d else "")
        out.append(f"Variant codes{parent_desc}:")
        width = max(len(e["code"]) for e in report["legend"])
        for e in report["legend"]:
            out += _wrap(f"{e['code'].ljust(width)}  {e['meaning']}", hang=" " * (width + 4))
    return "\n".join(out)


# ----- HTML ----------------------------------------------------------------------------------------
def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1150px;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}
.note{color:#666;font-size:.9em}code{background:#f5f5f5;padding:0 .2em}.miss{color:#b00;font-weight:bold}
td.text{text-align:left}
"""


def _met_html(v: bool | None) -> str:
    return {True: "met", False: "<span class='miss'>missed</span>", None: "not measured"}[v]


def _targets_html(report: dict[str, Any]) -> list[str]:
    if "constraints" not in report:  # a report.json written before targets were reported
        return []
    cons = report["constraints"]
    parts = ["<h2>Targets</h2>"]
    if not cons:
        parts.append("<p>No target was set (<code>solve.throughput</code>, <code>memory_gib</code>, "
                     "<code>max_prefill_latency_s</code> and <code>max_params</code> are all empty): the solver "
                     "minimised degradation alone.</p>")
        return parts
    parts += [f"<p>{html.escape(v)}</p>" for v in (targets_verdict(cons, s["id"]) for s in report["solutions"]) if v]
    rows = []
    for c in cons:
        for r in c["models"]:
            rows.append([html.escape(c["name"]), html.escape(f"{c['op']} {_with_unit(c['target'], c['unit'])}"),
                         html.escape(r["id"]), html.escape(_with_unit(r["predicted"], c["unit"])),
                         _met_html(r["predicted_met"]), html.escape(_with_unit(r["measured"], c["unit"])),
                         _met_html(r["measured_met"]),
                         html.escape(f"{r['ci95'][0]:.3g}-{r['ci95'][1]:.3g}x ({r.get('pairs')} pairs)")
                         if r.get("ci95") else "—"])
    parts.append(_table(["constraint", "target", "solution", "predicted", "", "measured", "",
                         "measured 95% interval"], rows))
    parts.append("<p class='note'>Predicted: the solver's own value (solutions.json) from the profiled costs. "
                 "Measured: tokens/s and prefill seconds timed by evaluate on this scenario's device; speedup = "
                 "the median over pairs of generations (the model's and the parent's, timed in turns in the same "
                 "unit) of the parent's time over the model's, with the distribution-free 95% interval of that "
                 "median; memory = "
                 "weights + KV cache at batch x (input + output) tokens, in GiB (2^30 bytes); parameters counted "
                 "in the loaded model.</p>")
    return parts


def _summary_html(report: dict[str, Any]) -> list[str]:
    nums = model_numbers(report)
    rows = []
    for r in summary_rows(report):
        method = "" if r["kind"] == "parent" or r["speedup_method"] != "parent unit" else "†"
        rows.append([str(nums[r["id"]]), html.escape(r["id"]), html.escape(KIND_LABELS.get(r["kind"], str(r["kind"]))),
                     _fmt(r["predicted_tokens_per_s"], ",.0f"), _x(r["predicted_speedup"]),
                     _fmt(r["measured_tokens_per_s"], ",.0f"),
                     ("—" if r["kind"] == "parent" else _fmt(r["measured_parent_tokens_per_s"], ",.0f") + method),
                     _x(r["measured_speedup"]), _fmt(r["kl"], ".4f"), _fmt(r["perplexity"], ".3f"),
                     _pct(r["task_accuracy"]), _pct(r["retention"]), _gib(r["memory_bytes"]),
                     _gib(r["measured_memory_bytes"]), _fmt(r["params"], ",.0f"), _targets_cell(r["targets"])])
    return ["<h2>Summary</h2>",
            _table(["#", "model", "kind", "predicted tokens/s", "predicted speedup (x)", "measured tokens/s",
                    "parent measured tokens/s, same unit*", "measured speedup (x)*", "KL to parent (nats/token)",
                    "perplexity", "task accuracy", "task accuracy kept", "predicted memory (GiB)",
                    "measured memory (GiB)", "parameters", "targets (predicted/measured)"], rows),
            (f"<p class='note'>Scenario {html.escape(_scenario_text(report))}. * Each measured speedup is the median, over pairs of "
            "generations of the model and the parent timed in turns in the same evaluate unit (paired: both under "
            "the same load), of the parent's time over the model's, so each row has its own parent figure (its "
            "median tokens/s in the column before); † marks a row without a paired timing (the model's tokens/s "
            "divided by the parent unit's own measurement). Predicted speedup = predicted model / "
            "predicted parent. KL(parent || model) per held-out token. Task accuracy kept = model task accuracy / "
            "the parent's. Memory = weights + KV cache at the scenario's batch and length, GiB = 2^30 bytes. "
            "# is the number the plots carry.</p>")]


def _equal_speed_html(report: dict[str, Any]) -> list[str]:
    parts = ["<h2>Quality at equal measured speed</h2>"]
    recs = report.get("equal_speed") or []
    if not recs:
        return [*parts, "<p class='note'>No solution to compare.</p>"]
    parts.append("<p class='note'>Each baseline family's quality at the solution's measured speedup, "
                 "interpolated linearly between the two settings whose measured speedups bracket it; where none "
                 "do, nothing is extrapolated: the nearest setting is named.</p>")
    for rec in recs:
        parts.append(f"<p>{html.escape(rec['sentence'])}</p>")
        if not rec["families"]:
            continue
        rows = []
        for key, v in rec["values"].items():
            what, unit = metric_label(key)
            cells = [html.escape(f"{what} ({unit})"), _fmt(rec["parent_values"].get(key), ".4g"), _fmt(v, ".4g")]
            for fam in rec["families"]:
                r = fam["metrics"].get(key)
                cells.append("—" if r is None else f"{_fmt(r['value'], '.4g')}<br><span class='note'>"
                             f"{html.escape(_how(r))}</span>")
            rows.append(cells)
        parts.append(_table(["figure", "parent", f"{rec['id']} at {_x(rec['measured_speedup'])}",
                             *[f"{f['label']} at the same speed" for f in rec["families"]]], rows))
    return parts


def _baselines_html(report: dict[str, Any]) -> list[str]:
    if not report["baselines"]:
        return []
    sc = report["primary_scenario"]
    rows = [[html.escape(m["id"]), html.escape(FAMILY_LABELS.get(m["kind"], m["kind"])),
             f"<span class='text'>{html.escape(m.get('description') or '')}</span>",
             _x((m["predicted"].get(sc) or {}).get("speedup")), _x(_measured_speedup(m, sc))]
            for m in report["baselines"]]
    return ["<h2>Baselines</h2>",
            _table(["model", "family", "what it is", "predicted speedup", "measured speedup (paired)"], rows),
            ("<p class='note'>Each family comes in up to two settings whose predicted throughput brackets the "
             "first solution's, so the comparison below is read at the same speed.</p>")]


def _icl_html(report: dict[str, Any]) -> list[str]:
    parts = ["<h2>In-context learning: exact match per selection method</h2>"]
    rows = [[html.escape(m["id"]), html.escape(str(r.get("selection") or "—")),
             html.escape(ICL_METHODS.get(r["method"], r["method"])), html.escape(r["split"]),
             _acc_ci(r["parent"], r.get("parent_ci95")), _acc_ci(r["child"], r.get("child_ci95")),
             (_pct(r["retention"]) if r["retention"] is None or r["retention"] >= 0.5
              else f"<span class='miss'>{_pct(r['retention'])}</span>")]
            for m in [*report["solutions"], *report["baselines"]] for r in m.get("icl") or []]
    if not rows:
        return [*parts, "<p class='note'>ICL evaluation was not enabled (eval.icl.enabled).</p>"]
    parts += [f"<p>{html.escape(s['sentence'])}</p>" for s in report.get("icl_sentences") or []]
    parts.append(_table(["model", "selection", "method", "split", "parent accuracy", "model accuracy",
                         "accuracy kept"], rows))
    parts.append("<p class='note'>Accuracy = exact match (fraction); brackets: 95% interval where evaluate "
                 "recorded one; kept = model / parent, in red below half.</p>")
    return parts


def _legend_html(report: dict[str, Any]) -> list[str]:
    if not report.get("legend"):
        return []
    d = report.get("parent_dims") or {}
    rows = [[f"<code>{html.escape(e['code'])}</code>", f"<code>{html.escape(e['short'])}</code>",
             f"<span class='text'>{html.escape(e['meaning'])}</span>"] for e in report["legend"]]
    note = (f"This parent: hidden size {d['hidden_size']}, {d['num_attention_heads']} query heads. " if d else "")
    return ["<h2>Variant codes</h2>", _table(["code", "in the plots", "meaning"], rows),
            f"<p class='note'>{html.escape(note)}Widths as vLLM's nemotron_nas loader computes them.</p>"]


def render_html(report: dict[str, Any]) -> str:
    """A self-contained HTML page (inline CSS, base64 PNG plots) of ``report``."""
    title = html.escape(str(report.get("run") or report.get("name")))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Puzzle report {title}</title>"
             + f"<style>{_CSS}</style></head><body>",
             f"<h1>Puzzle run <code>{title}</code></h1>",
             f"<p class='note'>Generated {html.escape(report['generated_at'])}. Primary scenario "
             f"<code>{html.escape(report['primary_scenario'])}</code>; scenarios: " + ", ".join(
                 f"{html.escape(s['name'])} (batch {s['batch_size']}, {s['input_len']} tokens in / "
                 f"{s['output_len']} out, {html.escape(s['dtype'])} on {html.escape(s['device'])})"
                 for s in report["scenarios"]) + ".</p>"]
    if report.get("missing"):
        parts.append(f"<p class='note'>Not evaluated yet: {html.escape(', '.join(report['missing']))}.</p>")
    parts += _targets_html(report)
    parts += _summary_html(report)
    parts += _baselines_html(report)
    parts += _equal_speed_html(report)
    plots = [("Quality against measured speed", plot_quality_vs_speed(report)),
             ("Pareto front and built models", plot_pareto(report)),
             ("Per-layer architecture", plot_architectures(report)),
             ("Predicted vs measured throughput", plot_throughput(report)),
             ("BLD loss curves", plot_bld(report))]
    for name, png in plots:
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append(f"<img alt='{html.escape(name)}' src='data:image/png;base64,{png}'>" if png
                     else "<p class='note'>No data for this plot in the run.</p>")
    parts += _icl_html(report)
    parts += _legend_html(report)
    gkd_rows = [[html.escape(m["id"]), _fmt(m["gkd"].get("steps")), _fmt(m["gkd"].get("tokens"), ",.0f"),
                 _fmt(m["gkd"].get("initial_kl"), ".4f"), _fmt(m["gkd"].get("final_kl"), ".4f")]
                for m in [*report["solutions"], *report["baselines"]] if m.get("gkd") and m["gkd"].get("enabled")]
    if gkd_rows:
        parts.append("<h2>Global distillation (GKD)</h2>")
        parts.append(_table(["model", "steps", "tokens", "held-out KL before (nats/token)", "after (nats/token)"],
                            gkd_rows))
    arch = [[html.escape(m["id"])] + [html.escape(f"{b['attention']} / {b['ffn']}") for b in m["block_configs"]]
            for m in _models(report) if m.get("block_configs")]
    if arch:
        n = max(len(r) for r in arch) - 1
        parts.append("<h2>Block configs</h2>")
        parts.append(_table(["model", *[f"layer {i}" for i in range(n)]], arch))
    parts.append("</body></html>")
    return "\n".join(parts)


__all__ = [
    "REPORT_HTML",
    "REPORT_JSON",
    "TEXT_WIDTH",
    "build_report",
    "check_constraints",
    "constraint_targets",
    "equal_speed",
    "fig_architectures",
    "fig_bld",
    "fig_pareto",
    "fig_quality_vs_speed",
    "fig_throughput",
    "icl_sentence",
    "interpolate_at",
    "model_numbers",
    "place_labels",
    "plot_architectures",
    "plot_bld",
    "plot_pareto",
    "plot_quality_vs_speed",
    "plot_throughput",
    "primary_scenario",
    "render_html",
    "summary_rows",
    "summary_table",
    "targets_status",
    "targets_verdict",
    "variant_legend",
]
