"""report: collect every unit's evaluation into ``<run>/report.json`` and a self-contained ``report.html``.

One unit (``{"id": "all"}``) after every evaluate unit. The content is :func:`puzzle.report.build_report`
(per solution: block_configs, predicted and measured throughput and speedup, KL, perplexity, task
accuracy and retention, ICL rows, GKD; the parent's own figures; the baselines; the Pareto front;
BLD loss curves) and :func:`puzzle.report.render_html`. Both files are the step's declared
artifacts (``puzzle.pipeline``): with ``--outputs DIR`` (Argo) the context copies them there.
"""

from __future__ import annotations

import logging

from puzzle.context import StepContext
from puzzle.layout import REPORT_HTML, REPORT_JSON
from puzzle.report import build_report, render_html

log = logging.getLogger(__name__)


def run(ctx: StepContext) -> None:
    report = build_report(ctx.store, ctx.config, ctx.run_id)
    page = render_html(report)
    ctx.store.put_json(REPORT_JSON, report)
    ctx.store.put_text(REPORT_HTML, page)
    n = len(report["solutions"]) + len(report["baselines"])
    ctx.metrics.set("report_models", n, help="Children and baselines in the report")
    if report["missing"]:
        log.warning("report: no evaluation for %s", ", ".join(report["missing"]))

