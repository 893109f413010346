"""The run report: every solution's figures in one ``report.json`` and a self-contained ``report.html``.

:func:`build_report` joins what the steps wrote: ``plan/assemble.json`` (which models were built and
what solve predicted for them), ``solve/solutions.json`` and ``solve/pareto.json``, each unit's
``eval/<id>/report.json``, ``child/<id>/complete.json`` (GKD) and the BLD library's metas (loss
curves). Ratios are taken against the ``parent`` unit, which evaluate measured with the same code:

- measured speedup = child's measured tokens/s / parent's measured tokens/s (same scenario): the
  parent measured in the child's own evaluate unit right after it (same load) when present, else the
  parent unit's measurement;
- retention = child task accuracy / parent task accuracy (None where the parent scores 0);
- ICL rows: method x split x (parent, child, retention).

:func:`render_html` draws the plots with matplotlib (Agg) and embeds them as base64 PNGs, so the file
opens anywhere with no network and no side files: Pareto front of degradation vs throughput with
the chosen children and baselines marked, measured quality vs throughput, per-layer architecture of
each child, BLD loss curves, predicted vs measured throughput, and the retention and ICL tables.
:func:`summary_table` is the plain-text table ``puzzle report RUN`` prints.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import logging
from typing import Any

from puzzle import layout
from puzzle.config import PuzzleConfig
from puzzle.layout import REPORT_HTML, REPORT_JSON
from puzzle.store import Store

log = logging.getLogger(__name__)

__all__ = ["REPORT_HTML", "REPORT_JSON", "build_report", "render_html", "summary_table"]
PARENT_ID = "parent"
BASELINE_KINDS = ("uniform_ffn", "layer_drop")


def _get(store: Store, key: str) -> Any:
    return store.get_json(key) if store.exists(key) else None


def primary_scenario(config: PuzzleConfig) -> str:
    """The scenario the solve targets first (the Pareto sweep's), else the first profiled one."""
    if config.solve.throughput:
        return config.solve.throughput[0].scenario
    return config.profile.scenarios[0].name


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
        out[sc] = {
            "tokens_per_s": m["tokens_per_s"],
            # the parent measured in the same unit, right after the child, when evaluate did that
            "speedup": paired if paired is not None else across,
            "speedup_method": "paired" if paired is not None else "parent unit",
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


def _icl_rows(ev: dict[str, Any] | None, parent_ev: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not ev or not ev.get("icl") or not parent_ev or not parent_ev.get("icl"):
        return []
    from puzzle.icl.benchmark import retention_table

    return retention_table(parent_ev["icl"], ev["icl"])


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


def build_report(store: Store, config: PuzzleConfig, run_id: str | None = None) -> dict[str, Any]:
    """The run's report.json as a dict (see the module docstring)."""
    units = _get(store, layout.plan_key("assemble")) or []
    solutions = {s["id"]: s for s in (_get(store, layout.SOLUTIONS) or [])}
    pareto = _get(store, layout.PARETO) or []
    evals = {u["id"]: _get(store, layout.eval_report_key(u["id"])) for u in units}
    parent_ev = evals.get(PARENT_ID)
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
    return {
        "run": run_id,
        "name": config.name,
        "generated_at": _dt.datetime.now(_dt.UTC).isoformat(),
        "scenarios": [s.model_dump(mode="json") for s in config.profile.scenarios],
        "primary_scenario": sc,
        "parent": entries.get(PARENT_ID, {}) | ({"icl_accuracy": parent_icl} if parent_icl else {}),
        "solutions": [e for e in entries.values() if e["kind"] == "puzzle"],
        "baselines": [e for e in entries.values() if e["kind"] in BASELINE_KINDS],
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


_MARKERS = {"parent": ("k", "*", "parent"), "puzzle": ("tab:blue", "o", "Puzzle child"),
            "uniform_ffn": ("tab:orange", "s", "uniform FFN baseline"),
            "layer_drop": ("tab:red", "^", "layer-drop baseline")}


def _models(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in [report.get("parent") or {}, *report["solutions"], *report["baselines"]] if m.get("id")]


def plot_pareto(report: dict[str, Any]) -> str | None:
    """Left: the solver's front (summed replace-1-block degradation vs predicted throughput) with the
    children on it. Right: measured KL to the parent of every built model vs its predicted throughput."""
    sc = report["primary_scenario"]
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    pts = sorted((p["tokens_per_s"].get(sc), p["objective"]) for p in report["pareto"]
                 if p["tokens_per_s"].get(sc) is not None and p["objective"] is not None)
    if pts:
        a.plot([x for x, _ in pts], [y for _, y in pts], "-", color="0.6", marker=".", label="Pareto front")
    for s in report["solutions"]:
        tps = (s["predicted"].get(sc) or {}).get("tokens_per_s")
        if tps is not None and s.get("objective") is not None:
            a.scatter([tps], [s["objective"]], color="tab:blue", zorder=3)
            a.annotate(s["id"], (tps, s["objective"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    a.set_xlabel(f"predicted tokens/s ({sc})")
    a.set_ylabel("summed replace-1-block degradation")
    a.set_title("Solver: degradation vs throughput")
    if pts:
        a.legend(fontsize=8)
    seen = set()
    for m in _models(report):
        tps = (m["predicted"].get(sc) or {}).get("tokens_per_s")
        kl = (m.get("quality") or {}).get("kl")
        if tps is None or kl is None:
            continue
        color, marker, label = _MARKERS.get(m["kind"], ("0.3", "x", m["kind"]))
        b.scatter([tps], [kl], color=color, marker=marker, s=70, zorder=3,
                  label=None if label in seen else label)
        seen.add(label)
        b.annotate(m["id"], (tps, kl), textcoords="offset points", xytext=(4, 4), fontsize=8)
    b.set_xlabel(f"predicted tokens/s ({sc})")
    b.set_ylabel("held-out KL(parent || model), nats/token")
    b.set_title("Built models: quality vs throughput")
    if seen:
        b.legend(fontsize=8)
    return _png(fig)


def plot_architectures(report: dict[str, Any]) -> str | None:
    """One row per model and sub-block (attention, FFN), one column per layer, colored by variant."""
    models = [m for m in _models(report) if m.get("block_configs")]
    if not models:
        return None
    plt = _plt()
    import numpy as np

    names = sorted({b[p] for m in models for b in m["block_configs"] for p in ("attention", "ffn")})
    index = {n: i for i, n in enumerate(names)}
    rows, labels = [], []
    for m in models:
        for part in ("attention", "ffn"):
            rows.append([index[b[part]] for b in m["block_configs"]])
            labels.append(f"{m['id']} {part}")
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
    ax.set_xlabel("layer")
    ax.set_title("Per-layer architecture (attention / FFN variant)")
    return _png(fig)


def plot_bld(report: dict[str, Any]) -> str | None:
    """Normalized-MSE training curves of the library blocks: one panel per variant, one line per layer."""
    bld = [b for b in report["bld"] if b["loss_curve"]]
    if not bld:
        return None
    plt = _plt()
    variants = sorted({b["variant"] for b in bld})
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
    fig.supylabel("normalized MSE")
    fig.suptitle("BLD loss curves")
    fig.tight_layout()
    return _png(fig)


def plot_throughput(report: dict[str, Any]) -> str | None:
    """Measured vs predicted tokens/s for every model and scenario, with the y = x line."""
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
    seen = set()
    for pred, meas, m, sc in pts:
        color, marker, label = _MARKERS.get(m["kind"], ("0.3", "x", m["kind"]))
        ax.scatter([pred], [meas], color=color, marker=marker, s=60, label=None if label in seen else label)
        seen.add(label)
        ax.annotate(f"{m['id']} ({sc})", (pred, meas), textcoords="offset points", xytext=(4, 4), fontsize=7)
    lo = min(min(p[0], p[1]) for p in pts) * 0.9
    hi = max(max(p[0], p[1]) for p in pts) * 1.1
    ax.plot([lo, hi], [lo, hi], "--", color="0.5", lw=1, label="measured = predicted")
    ax.set_xlabel("predicted tokens/s")
    ax.set_ylabel("measured tokens/s")
    ax.set_title("Throughput: predicted vs measured")
    ax.legend(fontsize=8)
    return _png(fig)


# ----- HTML ----------------------------------------------------------------------------------------
def _fmt(v: Any, spec: str = ".3g") -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, float)):
        return format(v, spec)
    return html.escape(str(v))


def _pct(v: Any) -> str:
    return "—" if v is None else f"{v:.1%}"


def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per built model: the figures the summary table and the HTML's first table show."""
    sc = report["primary_scenario"]
    rows = []
    for m in _models(report):
        p = m["predicted"].get(sc) or {}
        me = (m.get("measured") or {}).get(sc) or {}
        q = m.get("quality") or {}
        rows.append({
            "id": m["id"], "kind": m["kind"], "predicted_tokens_per_s": p.get("tokens_per_s"),
            "predicted_speedup": p.get("speedup"), "measured_tokens_per_s": me.get("tokens_per_s"),
            "measured_speedup": me.get("speedup"), "kl": q.get("kl"), "perplexity": q.get("perplexity"),
            "task_accuracy": q.get("task_accuracy"), "retention": q.get("retention"),
            "memory_bytes": p.get("memory_bytes"), "params": m.get("params"),
        })
    return rows


def summary_table(report: dict[str, Any]) -> str:
    """A fixed-width text table of :func:`summary_rows` for the terminal."""
    head = ("model", "kind", "pred tok/s", "pred x", "meas tok/s", "meas x", "KL", "ppl", "task acc", "retention")
    lines = []
    for r in summary_rows(report):
        lines.append((r["id"], r["kind"], _fmt(r["predicted_tokens_per_s"], ",.0f"), _fmt(r["predicted_speedup"], ".2f"),
                      _fmt(r["measured_tokens_per_s"], ",.0f"), _fmt(r["measured_speedup"], ".2f"), _fmt(r["kl"], ".4f"),
                      _fmt(r["perplexity"], ".3f"), _pct(r["task_accuracy"]), _pct(r["retention"])))
    widths = [max(len(h), *(len(x[i]) for x in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = [f"run {report.get('run') or report.get('name')}, scenario {report['primary_scenario']}",
           "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    if report.get("missing"):
        out.append(f"not evaluated yet: {', '.join(report['missing'])}")
    return "\n".join(out)


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1150px;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}
.note{color:#666;font-size:.9em}code{background:#f5f5f5;padding:0 .2em}
"""


def render_html(report: dict[str, Any]) -> str:
    """A self-contained HTML page (inline CSS, base64 PNG plots) of ``report``."""
    sc = report["primary_scenario"]
    title = html.escape(str(report.get("run") or report.get("name")))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Puzzle report {title}</title>"
             + f"<style>{_CSS}</style></head><body>",
             f"<h1>Puzzle run <code>{html.escape(str(report.get('run') or report.get('name')))}</code></h1>",
             f"<p class='note'>Generated {html.escape(report['generated_at'])}. Primary scenario "
             f"<code>{html.escape(sc)}</code>: " + ", ".join(
                 f"{html.escape(s['name'])} (batch {s['batch_size']}, {s['input_len']} in / {s['output_len']} out, "
                 f"{html.escape(s['dtype'])} on {html.escape(s['device'])})" for s in report["scenarios"]) + ".</p>"]
    if report.get("missing"):
        parts.append(f"<p class='note'>Not evaluated yet: {html.escape(', '.join(report['missing']))}.</p>")
    rows = [[html.escape(r["id"]), html.escape(str(r["kind"])), _fmt(r["predicted_tokens_per_s"], ",.0f"),
             _fmt(r["predicted_speedup"], ".2f"), _fmt(r["measured_tokens_per_s"], ",.0f"),
             _fmt(r["measured_speedup"], ".2f"), _fmt(r["kl"], ".4f"), _fmt(r["perplexity"], ".3f"),
             _pct(r["task_accuracy"]), _pct(r["retention"]), _fmt(r["memory_bytes"], ",.0f"),
             _fmt(r["params"], ",.0f")] for r in summary_rows(report)]
    parts.append("<h2>Summary</h2>")
    parts.append(_table(["model", "kind", "predicted tok/s", "predicted speedup", "measured tok/s", "measured speedup",
                         "KL to parent", "perplexity", "task accuracy", "retention", "predicted memory (B)", "params"],
                        rows))
    parts.append("<p class='note'>Speedups are against the parent measured/predicted with the same code on the "
                 "same scenario (measured: the parent timed right after the model in the same evaluate unit); "
                 "retention = model task accuracy / parent task accuracy.</p>")
    plots = [("Pareto front and built models", plot_pareto(report)),
             ("Per-layer architecture", plot_architectures(report)),
             ("Predicted vs measured throughput", plot_throughput(report)),
             ("BLD loss curves", plot_bld(report))]
    for title, png in plots:
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(f"<img alt='{html.escape(title)}' src='data:image/png;base64,{png}'>" if png
                     else "<p class='note'>No data for this plot in the run.</p>")
    def _acc(a, ci) -> str:
        return _fmt(a, ".3f") + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")

    icl_rows = [[html.escape(m["id"]), html.escape(str(r.get("selection"))), html.escape(r["method"]),
                 html.escape(r["split"]), _acc(r["parent"], r.get("parent_ci95")), _acc(r["child"], r.get("child_ci95")),
                 _pct(r["retention"])]
                for m in [*report["solutions"], *report["baselines"]] for r in m.get("icl") or []]
    parts.append("<h2>ICL: exact match per selection method (Wilson 95% interval)</h2>")
    parts.append(_table(["model", "selection", "method", "split", "parent", "child", "retention"], icl_rows) if icl_rows
                 else "<p class='note'>ICL evaluation was not enabled (eval.icl.enabled).</p>")
    gkd_rows = [[html.escape(m["id"]), _fmt(m["gkd"].get("steps")), _fmt(m["gkd"].get("tokens"), ",.0f"),
                 _fmt(m["gkd"].get("initial_kl"), ".4f"), _fmt(m["gkd"].get("final_kl"), ".4f")]
                for m in [*report["solutions"], *report["baselines"]] if m.get("gkd") and m["gkd"].get("enabled")]
    if gkd_rows:
        parts.append("<h2>Global distillation (GKD)</h2>")
        parts.append(_table(["model", "steps", "tokens", "held-out KL before", "after"], gkd_rows))
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
    "build_report",
    "plot_architectures",
    "plot_bld",
    "plot_pareto",
    "plot_throughput",
    "primary_scenario",
    "render_html",
    "summary_rows",
    "summary_table",
]
