"""report: collect every unit's evaluation into ``<run>/report.json`` and a self-contained ``report.html``.

One unit (``{"id": "all"}``) after every evaluate unit. The content is :func:`puzzle.report.build_report`
(per solution: block_configs, predicted and measured throughput and speedup, KL, perplexity, task
accuracy and retention, ICL rows, GKD; the parent's own figures; the baselines; the Pareto front;
BLD loss curves) and :func:`puzzle.report.render_html`. With ``--outputs DIR`` (Argo) both files are
also written there, where the workflow picks them up as output artifacts.
"""

from __future__ import annotations

import json
import logging

from puzzle.context import StepContext
from puzzle.report import REPORT_HTML, REPORT_JSON, build_report, render_html

log = logging.getLogger(__name__)


def run(ctx: StepContext) -> None:
    report = build_report(ctx.store, ctx.config, ctx.run_id)
    page = render_html(report)
    ctx.store.put_json(REPORT_JSON, report)
    ctx.store.put_text(REPORT_HTML, page)
    outputs(ctx)
    n = len(report["solutions"]) + len(report["baselines"])
    ctx.metrics.set("report_models", n, help="Children and baselines in the report")
    if report["missing"]:
        log.warning("report: no evaluation for %s", ", ".join(report["missing"]))


def outputs(ctx: StepContext) -> None:
    """Copy report.json and report.html into --outputs DIR (a retried pod owes Argo its artifacts too)."""
    if ctx.outputs_dir is None:
        return
    ctx.outputs_dir.mkdir(parents=True, exist_ok=True)
    (ctx.outputs_dir / REPORT_JSON).write_text(json.dumps(ctx.store.get_json(REPORT_JSON), indent=2) + "\n",
                                               encoding="utf-8")
    (ctx.outputs_dir / REPORT_HTML).write_text(ctx.store.get_text(REPORT_HTML), encoding="utf-8")
