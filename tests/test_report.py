"""report: report.json carries every figure per solution, the parent's own and the baselines'; the
ratios are the parent's measurements divided out; report.html is self-contained with every plot
embedded; --outputs gets both files; ``puzzle report`` prints the table.

The run comes from ``test_assemble.make_run`` (real prepare, library from parent-initialized blocks),
then real assemble and evaluate units for the parent, a Puzzle child and both baselines; solve's
outputs (solutions.json, pareto.json) are written by hand in solve's format, since solve needs the
profile and score steps, which are tested on their own.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from puzzle.cli import main
from puzzle.context import run_step
from puzzle.report import build_report, render_html, summary_table
from puzzle.store import open_store
from test_assemble import DROP, PARENT, SOLUTION, UNIFORM, make_run, unit

torch.set_num_threads(1)


def _pred(tps: float, speedup: float) -> dict:
    return {"cpu": {"tokens_per_s": tps, "prefill_s": 0.01, "decode_s": 16 / tps - 0.01, "memory_bytes": int(1e5 / speedup),
                    "speedup": speedup, "estimate": False}}


UNITS = [
    {"id": "parent", "kind": "parent", "block_configs": PARENT, "predicted": _pred(100.0, 1.0)},
    {"id": "sol-0", "kind": "puzzle", "block_configs": SOLUTION, "predicted": _pred(210.0, 2.1)},
    {"id": "baseline-uniform-ffn", "kind": "uniform_ffn", "block_configs": UNIFORM, "predicted": _pred(205.0, 2.05)},
    {"id": "baseline-layer-drop", "kind": "layer_drop", "block_configs": DROP, "predicted": _pred(200.0, 2.0)},
]
ICL = ("eval: {tokens: 256, task_examples: 4, measure_throughput: true, icl: {enabled: true, "
       "methods: [random, cover_ls], structure_predictor: oracle, num_demonstrations: 2, num_test: 2}}")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    run = make_run(tmp, unit_list=UNITS, gkd=True, gkd_tokens=256)  # 2 GKD steps per child
    store = open_store(run)
    store.put_text("config.yaml", store.get_text("config.yaml").replace(
        "eval: {tokens: 256, task_examples: 4, measure_throughput: false}", ICL))
    store.put_json("solve/solutions.json", [{"id": "sol-0", "block_configs": SOLUTION, "predicted": _pred(210.0, 2.1),
                                             "objective": 0.42, "status": "optimal", "gap": 0.0, "seconds": 0.1}])
    store.put_json("solve/pareto.json", [
        {"target": t, "constraint": "speedup on cpu", "objective": o, "block_configs": SOLUTION,
         "predicted": _pred(100.0 * t, t)} for t, o in ((1.0, 0.0), (1.5, 0.2), (2.0, 0.4), (2.5, 0.9))])
    for u in UNITS:
        assert run_step("assemble", run, unit(run, u["id"]))
        assert run_step("evaluate", run, unit(run, u["id"]))
    return run


def test_report_json_has_every_figure(run, tmp_path):
    out = tmp_path / "outputs"
    assert run_step("report", run, {"id": "all"}, outputs_dir=out)
    store = open_store(run)
    rep = store.get_json("report.json")
    assert json.loads((out / "report.json").read_text()) == rep
    assert (out / "report.html").read_text() == store.get_text("report.html")
    assert rep["primary_scenario"] == "cpu" and rep["missing"] == []
    assert [s["id"] for s in rep["solutions"]] == ["sol-0"]
    assert {b["kind"] for b in rep["baselines"]} == {"uniform_ffn", "layer_drop"}
    parent = rep["parent"]
    p_eval = store.get_json("eval/parent/report.json")
    assert parent["quality"]["kl"] == 0.0 and parent["quality"]["retention"] in (None, 1.0)
    assert parent["measured"]["cpu"]["speedup"] == 1.0 and not parent["gkd"]["enabled"]
    for m in [*rep["solutions"], *rep["baselines"]]:
        ev = store.get_json(f"eval/{m['id']}/report.json")
        assert m["block_configs"] == unit(run, m["id"])["block_configs"]
        assert set(m["predicted"]["cpu"]) >= {"tokens_per_s", "memory_bytes", "speedup"}
        meas = m["measured"]["cpu"]
        want = ev["throughput"]["cpu"]["measured"]["tokens_per_s"] / p_eval["throughput"]["cpu"]["measured"]["tokens_per_s"]
        assert meas["tokens_per_s"] > 0 and math.isclose(meas["speedup_vs_parent_unit"], want)
        # the speedup shown is the paired one: the parent timed right after the child in its own unit
        paired = ev["throughput"]["cpu"]
        assert meas["speedup_method"] == "paired"
        assert math.isclose(meas["speedup"], paired["measured"]["tokens_per_s"]
                            / paired["reference_measured"]["tokens_per_s"])
        q = m["quality"]
        assert q["kl"] == ev["quality"]["kl"] > 0 and q["perplexity"] == ev["quality"]["perplexity"]
        assert q["task_accuracy"] == ev["task"]["accuracy"]
        pa = p_eval["task"]["accuracy"]
        assert q["retention"] == (q["task_accuracy"] / pa if pa else None)
        assert {(r["method"], r["split"]) for r in m["icl"]} == {("random", "scan:template"),
                                                                 ("cover_ls", "scan:template")}
        assert all(set(r) == {"selection", "method", "split", "parent", "child", "retention", "parent_ci95",
                              "child_ci95"} and r["selection"] == "paper" for r in m["icl"])
        assert m["gkd"]["enabled"] and m["gkd"]["steps"] == 2, "baselines get the same GKD budget"
    sol = rep["solutions"][0]
    assert sol["objective"] == 0.42 and sol["status"] == "optimal"
    assert [p["tokens_per_s"]["cpu"] for p in rep["pareto"]] == [100.0, 150.0, 200.0, 250.0]
    # BLD curves from the library metas: 2 layers x 4 trained variants
    assert len(rep["bld"]) == 8 and all(b["loss_curve"] for b in rep["bld"])
    assert "puzzle_report_models{" in store.get_text("metrics/report-all.prom")


def test_report_html_is_self_contained_with_every_plot(run):
    run_step("report", run, {"id": "all"}, force=True)
    page = open_store(run).get_text("report.html")
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 4, "Pareto, architecture, throughput and BLD plots"
    assert all(len(i) > 2000 for i in images)
    assert not re.search(r"(src|href)=['\"]?https?:", page), "no external resources"
    for text in ("sol-0", "baseline-layer-drop", "ICL: exact match per selection method", "cover_ls",
                 "Global distillation", "attn_linear / ffn_i160"):
        assert text in page


def test_missing_evaluations_are_listed_not_invented(run):
    store = open_store(run)
    from puzzle.config import load_config_text

    cfg = load_config_text(store.get_text("config.yaml"))
    units = store.get_json("plan/assemble.json")
    store.put_json("plan/assemble.json", [*units, {"id": "sol-1", "kind": "puzzle", "block_configs": SOLUTION,
                                                   "predicted": _pred(220.0, 2.2)}])
    try:
        rep = build_report(store, cfg, "r")
    finally:
        store.put_json("plan/assemble.json", units)
    assert rep["missing"] == ["sol-1"]
    s1 = next(s for s in rep["solutions"] if s["id"] == "sol-1")
    assert s1["quality"] == {} and s1["measured"] == {} and not s1["evaluated"]
    assert "not evaluated yet: sol-1" in summary_table(rep)
    assert "Not evaluated yet: sol-1" in render_html(rep)


def test_puzzle_report_prints_the_table(run, capsys):
    assert main(["report", run]) == 0
    out = capsys.readouterr().out
    for uid in ("parent", "sol-0", "baseline-uniform-ffn", "baseline-layer-drop"):
        assert re.search(rf"^{re.escape(uid)}\s", out, re.MULTILINE), uid
    assert "retention" in out
    assert main(["report", run, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["primary_scenario"] == "cpu"
