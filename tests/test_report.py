"""report: report.json carries every figure per solution, the parent's own and the baselines'; the
targets of solve are stated with the predicted and measured values, met or missed; the baselines are
compared with each solution at its measured speed (linear interpolation between the settings that bracket
it, the nearest named where none do); ICL retention is said in a sentence; the variant codes are
explained with the parent's widths; report.html is self-contained with every plot, every point labelled
without overlap and units on every axis; ``puzzle report`` prints the summary in 110 columns.

Two kinds of run:

- the *real* one (module fixture ``run``) comes from ``test_assemble.make_run`` (real prepare, library
  from parent-initialized blocks), then real assemble and evaluate units for the parent, a Puzzle child
  and one setting of each baseline family; solve's outputs (solutions.json, pareto.json) are written by
  hand in solve's format, since solve needs the profile and score steps, which are tested on their own.
  Its figures are whatever the tiny models measure, so its tests check consistency, not values;
- *synthetic* runs (``synthetic_store``): plan/assemble.json, solutions.json and eval/<id>/report.json
  written by hand in the formats solve and evaluate write, with figures chosen so every expected number
  (interpolations, retention, met/missed) is computed by hand in the test. These stand in for evaluate's
  measurements, which cannot be made to land on chosen values; ``build_report`` reads them as it reads a
  real run's.
"""

from __future__ import annotations

import itertools
import json
import math
import re

import pytest
import torch
from puzzle.cli import main
from puzzle.config import load_config_text
from puzzle.context import run_step
from puzzle.report import (
    TEXT_WIDTH,
    build_report,
    constraint_targets,
    equal_speed,
    fig_architectures,
    fig_pareto,
    fig_quality_vs_speed,
    fig_throughput,
    icl_sentence,
    interpolate_at,
    render_html,
    summary_table,
    targets_verdict,
    variant_legend,
)
from puzzle.store import open_store
from test_assemble import DROP, PARENT, SOLUTION, UNIFORM, make_run, unit

torch.set_num_threads(1)


def _pred(tps: float, speedup: float) -> dict:
    return {"cpu": {"tokens_per_s": tps, "prefill_s": 0.01, "decode_s": 16 / tps - 0.01, "memory_bytes": int(1e5 / speedup),
                    "speedup": speedup, "estimate": False, "params": 20_000}}


UNITS = [
    {"id": "parent", "kind": "parent", "block_configs": PARENT, "predicted": _pred(100.0, 1.0)},
    {"id": "sol-0", "kind": "puzzle", "block_configs": SOLUTION, "predicted": _pred(210.0, 2.1)},
    {"id": "baseline-uniform-ffn-m0.5", "kind": "uniform_ffn", "block_configs": UNIFORM, "predicted": _pred(205.0, 2.05),
     "description": "uniform FFN: every FFN replaced by ffn_m0.5, the parent's attention kept"},
    {"id": "baseline-drop-1", "kind": "layer_drop", "block_configs": DROP, "predicted": _pred(200.0, 2.0),
     "description": "layer dropping: 1 of 2 layers removed ([1]), the most similar input/output first"},
]
ICL = ("eval: {tokens: 256, task_examples: 4, measure_throughput: true, throughput_repeats: 4, icl: {enabled: true, "
       "methods: [random, cover_ls], structure_predictor: oracle, num_demonstrations: 2, num_test: 2}}")
TARGETS = "solve: {throughput: [{scenario: cpu, min_speedup: 1.5}], memory_gib: 1.0, max_params: 1000000}"
ICL_ROW_KEYS = {"selection", "method", "split", "parent", "child", "retention", "parent_ci95", "child_ci95"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    run = make_run(tmp, unit_list=UNITS, gkd=True, gkd_tokens=256, extra=TARGETS)  # 2 GKD steps per child
    store = open_store(run)
    store.put_text("config.yaml", store.get_text("config.yaml").replace(
        "eval: {tokens: 256, task_examples: 4, measure_throughput: false}", ICL))
    # the solver's own values of its constraints, as solve writes them (a hair off the profile's prediction)
    store.put_json("solve/solutions.json", [{
        "id": "sol-0", "block_configs": SOLUTION, "predicted": _pred(210.0, 2.1), "objective": 0.42,
        "status": "optimal", "gap": 0.0, "seconds": 0.1,
        "constraints": {"speedup over the parent on cpu": 2.0999, "memory on cpu": 1e5 / 2.1 / 2**30,
                        "params": 20_000.0}}])
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
    assert {b["id"]: b["description"] for b in rep["baselines"]} == {
        u["id"]: u["description"] for u in UNITS if "description" in u}
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
        # the speedup shown is the paired one: the parent timed in turns with the child in its own unit,
        # and that parent's tok/s is kept beside the child's
        paired = ev["throughput"]["cpu"]
        assert meas["speedup_method"] == "paired"
        assert meas["parent_tokens_per_s"] == paired["reference_measured"]["tokens_per_s"]
        # the median over pairs of the parent's generation time over the child's, with its interval
        assert meas["speedup"] == paired["paired_speedup"] and meas["pairs"] == paired["pairs"] > 0
        assert meas["speedup_ci95"][0] <= meas["speedup"] <= meas["speedup_ci95"][1]
        q = m["quality"]
        assert q["kl"] == ev["quality"]["kl"] > 0 and q["perplexity"] == ev["quality"]["perplexity"]
        assert q["task_accuracy"] == ev["task"]["accuracy"]
        pa = p_eval["task"]["accuracy"]
        assert q["retention"] == (q["task_accuracy"] / pa if pa else None)
        assert {(r["method"], r["split"]) for r in m["icl"]} == {("random", "scan:template"),
                                                                 ("cover_ls", "scan:template")}
        assert all(set(r) == ICL_ROW_KEYS and r["selection"] == "paper" for r in m["icl"])
        assert m["gkd"]["enabled"] and m["gkd"]["steps"] == 2, "baselines get the same GKD budget"
    sol = rep["solutions"][0]
    assert sol["objective"] == 0.42 and sol["status"] == "optimal"
    assert [p["tokens_per_s"]["cpu"] for p in rep["pareto"]] == [100.0, 150.0, 200.0, 250.0]
    # BLD curves from the library metas: 2 layers x 4 trained variants
    assert len(rep["bld"]) == 8 and all(b["loss_curve"] for b in rep["bld"])
    prom = store.get_text("metrics/report-all.prom")
    assert "puzzle_report_models{" in prom
    met = all(r["measured_met"] for c in rep["constraints"] for r in c["models"])
    assert re.search(rf'^puzzle_report_targets_met{{[^}}]*solution="sol-0"[^}}]*}} {float(met)}$', prom, re.MULTILINE)

    # the targets: the solver's own predicted values, the measured ones, each met or missed
    cons = {c["name"]: c for c in rep["constraints"]}
    assert list(cons) == ["speedup over the parent on cpu", "memory on cpu", "params"]
    speed = cons["speedup over the parent on cpu"]
    assert speed["target"] == 1.5 and speed["label"] == "speedup over the parent on cpu >= 1.5x"
    (row,) = speed["models"]
    assert row["predicted"] == 2.0999 and row["predicted_met"] is True
    assert row["measured"] == sol["measured"]["cpu"]["speedup"]
    assert row["measured_met"] is (row["measured"] >= 1.5)
    (mem,) = cons["memory on cpu"]["models"]
    assert mem["measured"] == sol["measured"]["cpu"]["memory_bytes"] / 2**30 and mem["measured_met"] is True
    (par,) = cons["params"]["models"]
    assert par["predicted"] == 20_000.0 and par["measured"] == sol["params"] and par["measured_met"] is True

    # the equal-speed comparison: one setting per family, so the nearest is named, never extrapolated
    (eq,) = rep["equal_speed"]
    assert eq["id"] == "sol-0" and eq["measured_speedup"] == sol["measured"]["cpu"]["speedup"]
    for fam in eq["families"]:
        (setting,) = fam["settings"]
        r = fam["metrics"]["kl"]
        assert r["how"] in ("nearest", "interpolated") and r["value"] == setting["values"]["kl"]
        if r["how"] == "nearest":
            assert r["nearest"] == setting["id"] and f"nearest, not extrapolated: {setting['id']}" in eq["sentence"]
    assert eq["sentence"].startswith(f"At {eq['measured_speedup']:.2f}x measured speed on cpu, sol-0 ")

    # the legend covers exactly the codes the run's models use, with the tiny parent's widths
    codes = {b[p] for m in (PARENT, SOLUTION, UNIFORM, DROP) for b in m for p in ("attention", "ffn")}
    legend = {e["code"]: e for e in rep["legend"]}
    assert set(legend) == codes
    assert rep["parent_dims"]["hidden_size"] == 64 and rep["parent_dims"]["num_attention_heads"] == 8
    assert "num_kv = heads/4 = 8/4 = 2 KV heads" in legend["attn_g4"]["meaning"]
    assert legend["ffn_i160"]["parent"] and "the parent's own FFN" in legend["ffn_i160"]["meaning"]
    assert [s["id"] for s in rep["icl_sentences"]] == ["sol-0", *(b["id"] for b in rep["baselines"])]


def test_report_html_is_self_contained_with_every_plot(run):
    run_step("report", run, {"id": "all"}, force=True)
    page = open_store(run).get_text("report.html")
    images = re.findall(r"<img alt='([^']+)' src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert [alt for alt, _ in images] == ["Quality against measured speed", "Pareto front and built models",
                                          "Per-layer architecture", "Predicted vs measured throughput",
                                          "BLD loss curves"]
    assert all(len(i) > 2000 for _, i in images)
    assert not re.search(r"(src|href)=['\"]?https?:", page), "no external resources"
    for text in ("sol-0", "baseline-drop-1", "In-context learning: exact match per selection method", "Cover-LS",
                 "Global distillation", "attn_linear / ffn_i160", "Targets", "speedup over the parent on cpu",
                 "Quality at equal measured speed", "Variant codes", "predicted memory (GiB)",
                 "KL to parent (nats/token)", "parent measured tokens/s, same unit*",
                 "uniform FFN: every FFN replaced by ffn_m0.5"):
        assert text in page, text
    assert "(B)" not in page, "memory in GiB, never in bare bytes"


def test_missing_evaluations_are_listed_not_invented(run):
    store = open_store(run)
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
    (eq,) = [e for e in rep["equal_speed"] if e["id"] == "sol-1"]
    assert eq["measured_speedup"] is None
    assert eq["sentence"] == ("sol-1 has no measured throughput on cpu (not evaluated yet), so it is not compared "
                              "with the baselines.")
    (row,) = [r for r in rep["constraints"][0]["models"] if r["id"] == "sol-1"]
    assert row["measured"] is None and row["measured_met"] is None and row["predicted_met"] is True
    assert row["measured_reason"] == "not evaluated yet"


def test_puzzle_report_prints_the_table(run, capsys):
    assert main(["report", run]) == 0
    out = capsys.readouterr().out
    for uid in ("parent", "sol-0", "baseline-uniform-ffn-m0.5", "baseline-drop-1"):
        assert re.search(rf"^{re.escape(uid)}\s", out, re.MULTILINE), uid
    assert "speedup over the parent on cpu >= 1.5x" in out and "Variant codes" in out
    assert "Quality at equal measured speed" in out and "In-context learning" in out
    assert max(len(line) for line in out.splitlines()) <= TEXT_WIDTH
    assert main(["report", run, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["primary_scenario"] == "cpu"


# ----- synthetic runs: every expected figure computed by hand --------------------------------------
GiB = 2**30
SYNTH_CONFIG = """
name: synth
parent: {uri: /nonexistent/parent}
data: {distillation_uri: /nonexistent/a.txt, validation_uri: /nonexistent/b.txt}
profile:
  scenarios:
    - {name: cpu, batch_size: 2, input_len: 8, output_len: 8}
    - {name: gpu, batch_size: 64, input_len: 1024, output_len: 1024, device: cuda}
solve:
  throughput: [{scenario: cpu, min_speedup: 2.0}, {scenario: gpu, min_tokens_per_s: 500}]
  memory_gib: 1.0
  max_prefill_latency_s: 0.2
  max_params: 2000
eval: {task_examples: 100}
"""
P_ICL = {"cover_ls": (0.62, [0.48, 0.74]), "random": (0.40, [0.28, 0.54])}


def _icl(acc: dict[str, float], ci: bool = True, selection: str | None = "paper") -> dict:
    res = {m: {"accuracy": a, "n": 50, "correct": round(a * 50), **({"ci95": [a - 0.1, a + 0.1]} if ci else {})}
           for m, a in acc.items()}
    return {"results": {"scan:template": res}, **({"selection": selection} if selection else {})}


def _model(uid, kind, *, tps, paired_with, kl, acc, icl=None, pred=None, memory=0.5 * GiB, prefill=0.1, params=1500,
           gpu_pred=None, description=None, blocks=PARENT, ci=None):
    """(assemble unit, eval report) in the formats solve and evaluate write."""
    pred = pred or {"tokens_per_s": tps, "speedup": tps / 100.0}
    predicted = {"cpu": {"prefill_s": 0.1, "decode_s": 1.0, "memory_bytes": int(0.9 * GiB), "params": params,
                         "estimate": False, **pred},
                 "gpu": {"tokens_per_s": 520.0, "speedup": 2.6, "prefill_s": 0.15, "decode_s": 100.0,
                         "memory_bytes": int(0.95 * GiB), "params": params, "estimate": True, **(gpu_pred or {})}}
    measured = {"tokens_per_s": tps, "prefill_s": prefill, "decode_s": 1.0, "memory_bytes": int(memory),
                "device": "cpu"}
    cpu = {"predicted": predicted["cpu"], "measured": measured, "measured_over_predicted": tps / predicted["cpu"]["tokens_per_s"]}
    if kind != "parent":
        cpu |= {"reference_measured": {**measured, "tokens_per_s": paired_with}, "paired_speedup": tps / paired_with}
        if ci:  # as evaluate writes it now: the interval of the pairs' median (older reports have none)
            cpu |= {"paired_ci95": list(ci), "pairs": 20}
    unit = {"id": uid, "kind": kind, "block_configs": blocks, "predicted": predicted,
            **({"description": description} if description else {})}
    ev = {"id": uid, "kind": kind, "block_configs": blocks, "predicted": predicted, "params": params, "gkd": None,
          "quality": {"kl": kl, "perplexity": 2.0 + kl}, "task": {"accuracy": acc, "n": 100},
          "throughput": {"cpu": cpu, "gpu": {"predicted": predicted["gpu"], "measured": None,
                                             "reason": "device 'cuda' is absent on this machine"}},
          "icl": icl, "lm_eval": None}
    return unit, ev


def synthetic_models() -> list[tuple[dict, dict]]:
    """The parent measured at 120 tok/s in its own unit, but each child is paired with the parent timed
    in the child's unit (100, 93.75, ...): the equal-speed comparison must use those paired speedups."""
    return [
        _model("parent", "parent", tps=120.0, paired_with=None, kl=0.0, acc=0.8, pred={"tokens_per_s": 100.0, "speedup": 1.0},
               icl={"selection": "paper", "results": {"scan:template": {
                   m: {"accuracy": a, "n": 50, "correct": round(a * 50), "ci95": ci} for m, (a, ci) in P_ICL.items()}}}),
        # measured 200 / 100 = 2.00x (its predicted 2.30x, and 200 / 120 across units, must not be used)
        _model("sol-0", "puzzle", tps=200.0, paired_with=100.0, kl=0.05, acc=0.76,
               icl=_icl({"cover_ls": 0.60, "random": 0.10}), pred={"tokens_per_s": 230.0, "speedup": 2.3},
               memory=1.1 * GiB, blocks=SOLUTION),
        _model("sol-1", "puzzle", tps=190.0, paired_with=100.0, ci=(1.8, 2.05), kl=0.04, acc=0.78, params=2500,
               gpu_pred={"tokens_per_s": 480.0}, blocks=SOLUTION),
        # uniform FFN: measured 150 / 93.75 = 1.60x and 240 / 100 = 2.40x: they bracket sol-0's 2.00x
        _model("baseline-uniform-ffn-m1.0", "uniform_ffn", tps=150.0, paired_with=93.75, kl=0.2, acc=0.72,
               icl=_icl({"cover_ls": 0.5, "random": 0.3}), blocks=UNIFORM,
               description="uniform FFN: every FFN replaced by ffn_m1.0, the parent's attention kept"),
        _model("baseline-uniform-ffn-m0.5", "uniform_ffn", tps=240.0, paired_with=100.0, kl=0.6, acc=0.56,
               icl=_icl({"cover_ls": 0.3, "random": 0.1}), blocks=UNIFORM),
        # layer dropping: 2.50x and 3.00x, both faster than sol-0: not bracketed, the nearest is named
        _model("baseline-drop-2", "layer_drop", tps=250.0, paired_with=100.0, kl=0.9, acc=0.4,
               icl=_icl({"cover_ls": 0.1, "random": 0.05}, ci=False, selection=None), blocks=DROP),
        _model("baseline-drop-3", "layer_drop", tps=300.0, paired_with=100.0, kl=1.5, acc=0.2,
               icl=_icl({"cover_ls": 0.05, "random": 0.0}, ci=False, selection=None), blocks=DROP),
    ]


@pytest.fixture
def synthetic(tmp_path):
    store = open_store(f"file://{tmp_path}/synth")
    models = synthetic_models()
    store.put_json("plan/assemble.json", [u for u, _ in models])
    for u, ev in models:
        store.put_json(f"eval/{u['id']}/report.json", ev)
    store.put_json("child/parent/config.json", {"hidden_size": 64, "num_attention_heads": 8,
                                                "num_hidden_layers": 2})
    store.put_json("solve/solutions.json", [
        {"id": "sol-0", "objective": 0.3, "status": "optimal", "gap": 0.0,
         "constraints": {"speedup over the parent on cpu": 2.2999, "throughput on gpu": 520.0}},
        # held to the limit by the solver: a hair under it in floating point still counts as met
        {"id": "sol-1", "objective": 0.2, "status": "optimal", "gap": 0.0,
         "constraints": {"speedup over the parent on cpu": 1.9999999999}}])
    store.put_json("solve/pareto.json", [
        {"target": t, "constraint": "speedup over the parent on cpu", "objective": o,
         "predicted": {"cpu": {"tokens_per_s": 100.0 * t, "speedup": t}}} for t, o in ((1.0, 0.0), (2.3, 0.3))])
    cfg = load_config_text(SYNTH_CONFIG)
    return build_report(store, cfg, "synth-run"), cfg


def test_baselines_at_equal_measured_speed_interpolate_between_the_bracketing_settings(synthetic):
    rep, _ = synthetic
    eq = {e["id"]: e for e in rep["equal_speed"]}
    s0 = eq["sol-0"]
    assert s0["measured_speedup"] == 2.0, "the paired speedup (200/100), not the predicted 2.3 or 200/120"
    uni, drop = s0["families"]
    assert [uni["kind"], drop["kind"]] == ["uniform_ffn", "layer_drop"]
    # uniform FFN: t = (2.0 - 1.6) / (2.4 - 1.6) = 0.5 between m1.0 and m0.5
    assert math.isclose(uni["metrics"]["task_accuracy"]["value"], 0.72 + 0.5 * (0.56 - 0.72))  # 0.64
    assert math.isclose(uni["metrics"]["kl"]["value"], 0.2 + 0.5 * (0.6 - 0.2))  # 0.4
    assert math.isclose(uni["metrics"]["icl:scan:template:cover_ls"]["value"], 0.4)
    assert uni["metrics"]["kl"]["between"] == ["baseline-uniform-ffn-m1.0", "baseline-uniform-ffn-m0.5"]
    # layer dropping: 2.5x and 3.0x are both faster than 2.0x: no extrapolation, the nearest (2.5x)
    r = drop["metrics"]["task_accuracy"]
    assert r == {"value": 0.4, "how": "nearest", "nearest": "baseline-drop-2", "speedup": 2.5, "side": "above"}
    assert s0["sentence"] == (
        "At 2.00x measured speed on cpu, sol-0 keeps 95.0% of the parent's task accuracy (KL 0.05 nats/token); "
        "uniform FFN at the same speed 80.0% (KL 0.4; interpolated between baseline-uniform-ffn-m1.0 at 1.60x and "
        "baseline-uniform-ffn-m0.5 at 2.40x), layer dropping at the same speed 50.0% (KL 0.9; not bracketed: "
        "every setting is faster; nearest, not extrapolated: baseline-drop-2 at 2.50x).")
    # sol-1 at 1.90x: uniform t = 0.3/0.8 = 0.375
    s1 = next(f for f in eq["sol-1"]["families"] if f["kind"] == "uniform_ffn")
    assert math.isclose(s1["metrics"]["task_accuracy"]["value"], 0.72 + 0.375 * (0.56 - 0.72))
    assert "uniform FFN at the same speed 82.5%" in eq["sol-1"]["sentence"]  # 0.66 / 0.8
    # the same figures whichever order the settings come in
    rev = dict(rep, baselines=list(reversed(rep["baselines"])))
    assert [e["sentence"] for e in equal_speed(rev)] == [e["sentence"] for e in rep["equal_speed"]]


def test_interpolate_at_edges():
    pts = [(2.4, 0.56, "b"), (1.6, 0.72, "a")]
    assert math.isclose(interpolate_at(2.0, pts)["value"], 0.64)
    assert interpolate_at(1.6, pts)["value"] == 0.72 and interpolate_at(2.4, pts)["value"] == 0.56
    below = interpolate_at(1.2, pts)
    assert below["how"] == "nearest" and below["nearest"] == "a" and below["side"] == "above"
    above = interpolate_at(3.0, pts)
    assert above["how"] == "nearest" and above["nearest"] == "b" and above["side"] == "below"
    assert interpolate_at(2.0, [(2.0, 0.3, "x"), (2.0, 0.5, "y")])["value"] == pytest.approx(0.4)
    assert interpolate_at(2.0, [(2.0, 0.3, "x")])["how"] == "interpolated"
    assert interpolate_at(2.0, []) is None
    # three settings: only the adjacent pair around x counts
    assert math.isclose(interpolate_at(2.5, [(1.0, 1.0, "a"), (2.0, 0.8, "b"), (3.0, 0.2, "c")])["value"], 0.5)


def test_constraints_met_and_missed(synthetic):
    rep, _ = synthetic
    cons = {c["name"]: c for c in rep["constraints"]}
    assert list(cons) == ["speedup over the parent on cpu", "throughput on gpu", "memory on cpu",
                          "prefill latency on cpu", "memory on gpu", "prefill latency on gpu", "params"]

    def row(name, sid):
        return next(r for r in cons[name]["models"] if r["id"] == sid)

    sp0, sp1 = row("speedup over the parent on cpu", "sol-0"), row("speedup over the parent on cpu", "sol-1")
    assert (sp0["predicted"], sp0["predicted_met"], sp0["measured"], sp0["measured_met"]) == (2.2999, True, 2.0, True)
    assert sp0["speedup_method"] == "paired"
    assert (sp1["predicted_met"], sp1["measured"], sp1["measured_met"]) == (True, 1.9, False)
    gpu0, gpu1 = row("throughput on gpu", "sol-0"), row("throughput on gpu", "sol-1")
    assert (gpu0["predicted"], gpu0["predicted_met"], gpu0["measured"], gpu0["measured_met"]) == (520.0, True, None, None)
    assert (gpu1["predicted"], gpu1["predicted_met"]) == (480.0, False), "from the prediction where solve has none"
    mem0 = row("memory on cpu", "sol-0")
    assert mem0["predicted"] == int(0.9 * GiB) / GiB and mem0["predicted_met"]
    assert mem0["measured"] == int(1.1 * GiB) / GiB and mem0["measured_met"] is False
    assert row("prefill latency on cpu", "sol-0")["measured_met"] is True
    assert row("memory on gpu", "sol-0")["measured"] is None
    assert row("params", "sol-1")["predicted_met"] is False and row("params", "sol-0")["measured"] == 1500
    assert cons["params"]["label"] == "params <= 2,000 parameters"
    assert cons["memory on cpu"]["label"] == "memory on cpu <= 1 GiB"
    assert targets_verdict(rep["constraints"], "sol-0") == (
        "sol-0 meets every target by prediction; misses memory on cpu as measured (3 of 7 not measured).")
    assert targets_verdict(rep["constraints"], "sol-1") == (
        "sol-1 misses throughput on gpu, params by prediction; misses speedup over the parent on cpu, params as "
        "measured (3 of 7 not measured).")
    text = summary_table(rep)
    assert "sol-0 meets every target by prediction; misses memory on cpu as measured" in text
    assert "speedup over the parent on cpu >= 2x" in text and "throughput on gpu >= 500 tokens/s" in text
    assert "sol-0: predicted 2.3x met; measured 2x met (paired with the parent, timed in turns with it)" in text
    assert ("sol-1: predicted 2x met; measured 1.9x MISSED (95% interval 1.8-2.05x; the median of 20 pairs of "
            "generations, the parent's timed in turns with it)") in " ".join(text.split())
    assert "sol-0: predicted 520 tokens/s met; not measured (device 'cuda' is absent on this machine)" in text
    assert re.search(r"^sol-0\s.*met/miss$", text, re.MULTILINE), "memory measured over the limit"
    assert re.search(r"^sol-1\s.*miss/miss$", text, re.MULTILINE)
    page = render_html(rep)
    assert "<span class='miss'>missed</span>" in page and "throughput on gpu" in page


def test_constraint_names_are_the_solvers(synthetic):
    """The report reads solutions.json's ``constraints`` by name: the names must be the solver's own."""
    from puzzle.solver import Candidate, SearchProblem, constraints_from_config

    _, cfg = synthetic
    res = {f"{k}:{sc}": 1.0 for k in ("decode_s", "prefill_s", "memory_bytes") for sc in ("cpu", "gpu")}
    problem = SearchProblem(slots={(0, "ffn"): [Candidate("ffn_i1", 0.0, {**res, "params": 1.0})]},
                            parent={(0, "ffn"): "ffn_i1"})
    solver = constraints_from_config(cfg.solve, cfg.profile.scenarios, problem)
    ours = constraint_targets(cfg.solve, cfg.profile.scenarios)
    assert [c.name for c in solver] == [c["name"] for c in ours]
    assert [round(c.target, 9) for c in solver] == [round(c["target"], 9) for c in ours]
    assert [(">=" if c.inverse else "<=") for c in solver] == [c["op"] for c in ours]


def test_legend_explains_the_runs_variant_codes(synthetic):
    parent = [{"attention": "attn_g4", "ffn": "ffn_i14336"}]
    names = ["ffn_noop", "attn_g8", "ffn_m2.0", "attn_linear", "ffn_i14336", "attn_g4", "ffn_linear", "attn_noop",
             "ffn_m0.5"]
    legend = variant_legend(names, {"hidden_size": 4096, "num_attention_heads": 32}, parent)
    assert [e["code"] for e in legend] == ["attn_g4", "attn_g8", "attn_linear", "attn_noop", "ffn_i14336",
                                           "ffn_m2.0", "ffn_m0.5", "ffn_linear", "ffn_noop"]
    e = {x["code"]: x for x in legend}
    assert e["attn_g4"]["meaning"] == ("GQA attention with 4 query heads per KV head, i.e. num_kv = heads/4 = 32/4 = "
                                       "8 KV heads; the parent's own attention")
    assert e["attn_g8"]["short"] == "g8" and "32/8 = 4 KV heads" in e["attn_g8"]["meaning"]
    # round_up(int(2 * 2.0 * 4096 / 3), 256) = round_up(5461, 256) = 5632; 5632 / 14336 = 39%
    assert e["ffn_m2.0"]["meaning"] == ("SwiGLU FFN of intermediate round_up(int(2*2*hidden/3), 256) = "
                                        "round_up(int(2*2*4096/3), 256) = 5632 (39% of the parent's 14336)")
    assert "= 1536" in e["ffn_m0.5"]["meaning"]  # round_up(1365, 256)
    assert e["ffn_i14336"]["parent"] and "exactly 14336; the parent's own FFN" in e["ffn_i14336"]["meaning"]
    assert e["ffn_noop"]["meaning"].startswith("FFN removed") and e["attn_linear"]["brief"] == "linear map"
    # without the parent's sizes: the formulas, and the same order
    bare = variant_legend(names, None, parent)
    assert [x["code"] for x in bare] == [x["code"] for x in legend]
    assert bare[5]["meaning"] == "SwiGLU FFN of intermediate round_up(int(2*2*hidden/3), 256)"
    assert bare[0]["meaning"].endswith("i.e. num_kv = heads/4; the parent's own attention")
    # a small parent, where vLLM's 256-rounding would inflate the width: the finer rounding, said so
    small = {x["code"]: x for x in variant_legend(["ffn_m0.5"], {"hidden_size": 64, "num_attention_heads": 8})}
    assert "= 256; for this parent that rounding grows the width by more than 25%" in small["ffn_m0.5"]["meaning"]
    assert small["ffn_m0.5"]["meaning"].endswith("multiple of 8 instead: 24")
    # the run's report: exactly the codes its models use, with the parent's widths from its config.json
    rep, _ = synthetic
    assert [x["code"] for x in rep["legend"]] == ["attn_g2", "attn_g4", "attn_linear", "attn_noop", "ffn_i160",
                                                  "ffn_m0.5", "ffn_noop"]
    assert "8/2 = 4 KV heads" in rep["legend"][0]["meaning"] and rep["legend"][0]["parent"]
    assert rep["legend"][5]["meaning"].endswith("instead: 24 (15% of the parent's 160)")


def test_icl_sentence_states_retention_and_says_when_below_half(synthetic):
    rows = [{"selection": "paper", "method": "cover_ls", "split": "scan:template", "parent": 0.62, "child": 0.60,
             "retention": 0.60 / 0.62, "parent_ci95": [0.48, 0.74], "child_ci95": [0.46, 0.72]},
            {"method": "random", "split": "scan:template", "parent": 0.40, "child": 0.10, "retention": 0.25},
            {"method": "topk", "split": "geo:length", "parent": 0.0, "child": 0.05, "retention": None}]
    assert icl_sentence("sol-0", rows) == (
        "sol-0 keeps 97% of the parent's Cover-LS accuracy on scan:template (parent 0.62 [0.48, 0.74], child 0.60 "
        "[0.46, 0.72]); only 25% of the parent's Random accuracy on scan:template (parent 0.40, child 0.10); no "
        "retention figure for Top-K on geo:length: the parent scores 0 (child 0.05). Below half of the parent's "
        "in-context accuracy: Random on scan:template (25%); sol-0 has lost most of the parent's in-context "
        "learning there.")
    assert icl_sentence("sol-0", []) is None
    rep, _ = synthetic
    sentences = {s["id"]: s["sentence"] for s in rep["icl_sentences"]}
    assert set(sentences) == {"sol-0", "baseline-uniform-ffn-m1.0", "baseline-uniform-ffn-m0.5", "baseline-drop-2",
                              "baseline-drop-3"}, "sol-1 has no ICL results"
    assert sentences["sol-0"].startswith("sol-0 keeps 97% of the parent's Cover-LS accuracy on scan:template "
                                         "(parent 0.62 [0.48, 0.74], child 0.60 [0.50, 0.70])")
    assert "Below half" in sentences["baseline-drop-2"] and "only 16% of the parent's Cover-LS" in sentences["baseline-drop-2"]
    # both forms of evaluate's ICL results: with selection and ci95, and without (older runs)
    s0 = next(s for s in rep["solutions"] if s["id"] == "sol-0")
    d2 = next(b for b in rep["baselines"] if b["id"] == "baseline-drop-2")
    assert all(set(r) == ICL_ROW_KEYS for r in s0["icl"] + d2["icl"])
    assert {r["selection"] for r in s0["icl"]} == {"paper"} and {r["selection"] for r in d2["icl"]} == {None}
    assert s0["icl"][0]["child_ci95"] is not None and d2["icl"][0]["child_ci95"] is None
    assert d2["icl"][0]["parent_ci95"] == P_ICL[d2["icl"][0]["method"]][1]
    assert rep["icl_selection"] == "paper"
    assert "selection mode paper" in summary_table(rep)


def _text_boxes(fig) -> list[tuple[str, object]]:
    from matplotlib.text import Annotation, Text

    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    return [(t.get_text(), Text.get_window_extent(t, r)) for ax in fig.axes for t in ax.texts
            if isinstance(t, Annotation)]


def _legend_texts(fig) -> list[str]:
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()] + list(fig.legends)
    return [t.get_text() for lg in legends for t in lg.get_texts()]


def test_plot_labels_are_present_readable_and_do_not_overlap(synthetic):
    rep, _ = synthetic
    # sol-1 on top of sol-0 in every plot: the case where the labels used to overlap
    s0, s1 = rep["solutions"]
    s1.update(predicted=s0["predicted"], objective=s0["objective"], measured=s0["measured"], quality=s0["quality"])
    rep["equal_speed"] = equal_speed(rep)
    ids = [m["id"] for m in [rep["parent"], *rep["solutions"], *rep["baselines"]]]
    for make in (fig_pareto, fig_quality_vs_speed, fig_throughput):
        fig = make(rep)
        boxes = _text_boxes(fig)
        assert boxes, make.__name__
        for (ta, a), (tb, b) in itertools.combinations(boxes, 2):
            # display coordinates: an overlap anywhere on the page counts
            assert not a.overlaps(b), f"{make.__name__}: labels {ta!r} and {tb!r} overlap"
        legend = "\n".join(_legend_texts(fig))
        numbers = {t for t, _ in boxes}
        for i, uid in enumerate(ids, 1):
            if str(i) in numbers:
                assert f"{i}  {uid}" in legend, f"{make.__name__}: number {i} not in the legend"
        for ax in fig.axes:
            if ax.get_xlabel():
                assert re.search(r"\((tokens/s|x, paired timing)\)", ax.get_xlabel()), ax.get_xlabel()
            if ax.get_ylabel():
                assert re.search(r"(tokens/s|nats/token|fraction)", ax.get_ylabel()), ax.get_ylabel()
    fig = fig_quality_vs_speed(rep)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["KL(parent || model)", "task exact match", "ICL exact match, Cover-LS on scan:template",
                      "ICL exact match, Random on scan:template"]
    assert {t for t, _ in _text_boxes(fig)} == {str(i) for i in range(1, len(ids) + 1)}
    legend = _legend_texts(fig_architectures(rep))
    import matplotlib.pyplot as plt

    plt.close("all")
    assert "g2 = attn_g2: GQA, 4 KV heads (parent)" in legend and "i160 = ffn_i160: SwiGLU, width 160 (parent)" in legend


def test_summary_table_fits_110_columns_and_names_the_baselines(synthetic):
    rep, _ = synthetic
    text = summary_table(rep)
    lines = text.splitlines()
    flat = " ".join(text.split())
    assert max(len(line) for line in lines) <= TEXT_WIDTH, max(lines, key=len)
    head = next(i for i, line in enumerate(lines) if line.startswith("model "))
    assert lines[head - 1].split() == ["predicted", "measured", "on", "cpu", "quality", "targets"]
    assert lines[head].split() == ["model", "tok/s", "x", "tok/s", "parent*", "x", "KL", "nat/tok", "task", "acc",
                                   "kept", "pred/meas"]
    # each child's row carries both tok/s figures its measured speedup divides
    assert re.search(r"^sol-0\s+230\s+2\.30x\s+200\s+100\s+2\.00x\s+0\.0500\s+76\.0%\s+95\.0%\s+met/miss$", text,
                     re.MULTILINE)
    assert re.search(r"^baseline-uniform-ffn-m1\.0\s.*\s150\s+94\s+1\.60x\s", text, re.MULTILINE)
    assert "(the model's and the parent's, timed in turns in the same evaluate unit: paired, same load)" in flat
    assert "baseline-uniform-ffn-m1.0: uniform FFN: every FFN replaced by ffn_m1.0" in flat
    assert "baseline-drop-2: layer dropping: 1 of 2 layers removed ([1])" in flat, "described from its block configs"
    assert "At 2.00x measured speed on cpu, sol-0 keeps 95.0%" in flat
    assert "shrinking" not in text
    # the widest a real run gets: the longest baseline id, six-figure tok/s, an unpaired parent figure
    wide = json.loads(json.dumps(rep))
    b = wide["baselines"][0]
    b["id"] = "baseline-uniform-ffn-linear"
    b["measured"]["cpu"].update(tokens_per_s=123_456.0, parent_tokens_per_s=65_432.0, speedup_method="parent unit")
    b["predicted"]["cpu"].update(tokens_per_s=234_567.0, speedup=12.34)
    lines = summary_table(wide).splitlines()
    assert max(len(line) for line in lines) <= TEXT_WIDTH, max(lines, key=len)
    assert any(line.startswith("baseline-uniform-ffn-linear ") and "65,432†" in line for line in lines)
    # and a hopeless one: the id is cut, the figures are not
    b["id"] = "baseline-" + "x" * 80
    lines = summary_table(wide).splitlines()
    row = next(line for line in lines if line.startswith("baseline-xxx"))
    assert len(row) <= TEXT_WIDTH and "…" in row and "123,456" in row


def test_html_of_a_synthetic_run_has_every_section_and_plot(synthetic):
    rep, _ = synthetic
    page = render_html(rep)
    images = re.findall(r"<img alt='([^']+)' src='data:image/png;base64,[A-Za-z0-9+/=]{2000,}'", page)
    assert images == ["Quality against measured speed", "Pareto front and built models", "Per-layer architecture",
                      "Predicted vs measured throughput"]
    assert "<h2>BLD loss curves</h2>\n<p class='note'>No data for this plot in the run.</p>" in page, "no library here"
    for text in ("sol-1 misses throughput on gpu, params by prediction", "interpolated between baseline-uniform-ffn-m1.0 at 1.60x",
                 "Variant codes", "This parent: hidden size 64, 8 query heads", "[0.48, 0.74]", "Below half"):
        assert text in page, text


def test_a_report_json_from_before_these_fields_still_prints(synthetic):
    """``puzzle report`` reads a stored report.json as it is: one written before targets, equal-speed
    records, sentences and the legend existed still gives its table."""
    rep, _ = synthetic
    old = {k: v for k, v in json.loads(json.dumps(rep)).items()
           if k not in ("constraints", "equal_speed", "icl_sentences", "icl_selection", "legend", "parent_dims",
                        "score_metric", "task_examples")}
    for m in [old["parent"], *old["solutions"], *old["baselines"]]:
        m.pop("description", None)
        for me in m["measured"].values():
            me.pop("parent_tokens_per_s", None)
    text = summary_table(old)
    assert re.search(r"^sol-0\s+230\s+2\.30x\s+200\s+—\s+2\.00x\s", text, re.MULTILINE)
    assert "Targets" not in text and "Variant codes" not in text
