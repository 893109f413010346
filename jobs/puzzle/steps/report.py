"""report: collect every unit's evaluation into ``<run>/report.json`` and a self-contained ``report.html``.

One unit (``{"id": "all"}``) after every evaluate unit. The content is :func:`puzzle.report.build_report`
(per model: block_configs, predicted and measured throughput with both tok/s figures of each paired
speedup, KL, perplexity, task accuracy and retention, ICL rows, GKD; the parent's own figures; the
baselines and what each is; the Pareto front; BLD loss curves; each solve target met or missed by
prediction and by measurement; the baselines at each solution's measured speed; the ICL sentences; the
legend of variant codes) and :func:`puzzle.report.render_html`. Both files are the step's declared
artifacts (``puzzle.pipeline``): with ``--outputs DIR`` (Argo) the context copies them there. The log
says, per solution, whether it met its targets; ``puzzle run`` prints :func:`puzzle.report.summary_table`
at its end.
"""

from __future__ import annotations

import logging

from puzzle.context import StepContext
from puzzle.layout import REPORT_HTML, REPORT_JSON
from puzzle.report import build_report, render_html, targets_status

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
    word = {True: "yes", False: "no", None: "not measured"}
    for s in report["solutions"]:
        met = targets_status(report["constraints"], s["id"])
        if met["predicted"] is not None:
            log.info("report: %s meets every target: predicted %s, measured %s", s["id"], word[met["predicted"]],
                     word[met["measured"]])
        if met["measured"] is not None:
            ctx.metrics.set("report_targets_met", float(met["measured"]), solution=s["id"],
                            help="1 when the solution's measurement meets every solve target, 0 when one is missed")

