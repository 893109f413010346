"""The pipeline DAG as data (jobs/puzzle/pipeline.py): the step table, its order and its validation.

Its rendering as the Argo WorkflowTemplate is tested in tests/test_argo.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from puzzle import pipeline

# ---------------------------------------------------------------- the DAG as data


def test_topological_order_puts_every_step_after_its_dependencies():
    order = [s.name for s in pipeline.topological_order()]
    assert sorted(order) == sorted(s.name for s in pipeline.STEPS)
    for s in pipeline.STEPS:
        for d in s.depends:
            assert order.index(d) < order.index(s.name), (d, s.name)
    assert order[0] == "prepare" and order[-1] == "report"


def test_step_contract_fan_out_and_kinds():
    by = pipeline.STEP_BY_NAME
    assert [s.name for s in pipeline.STEPS] == [
        "prepare", "bld", "profile", "score", "solve", "assemble", "evaluate", "report"]
    assert {n for n, s in by.items() if s.gpu} == {"bld", "profile", "score", "assemble", "evaluate"}
    assert {n: s.fan_out for n, s in by.items() if s.fan_out} == {
        "bld": "bld", "profile": "profile", "score": "score", "assemble": "assemble", "evaluate": "assemble"}
    assert by["prepare"].produces == ("bld", "profile", "score")
    assert by["solve"].produces == ("assemble",)
    assert set(by["solve"].depends) == {"score", "profile"}
    assert "bld" in by["score"].depends
    assert by["evaluate"].same_unit_as == "assemble"
    assert {n for n, s in by.items() if s.distributed} == {"score", "assemble", "evaluate"}
    assert pipeline.ancestors("report") == {s.name for s in pipeline.STEPS} - {"report"}


def _bad(**changes) -> tuple[pipeline.Step, ...]:
    steps = list(pipeline.STEPS)
    name = changes.pop("name")
    i = [s.name for s in steps].index(name)
    steps[i] = pipeline.Step(**{**steps[i].__dict__, **changes})
    return tuple(steps)


@pytest.mark.parametrize("name, changes, message", [
    ("prepare", {"depends": ("report",)}, "cycle"),
    ("solve", {"depends": ("score", "nonexistent")}, "unknown step 'nonexistent'"),
    ("bld", {"fan_out": "no-such-list"}, "needs exactly one producer"),
    ("evaluate", {"same_unit_as": "bld"}, "same_unit_as"),
    ("score", {"depends": ("bld",), "fan_out": "assemble"}, "must depend"),
    ("solve", {"distributed": True}, "distributed .one process per GPU. but gets no GPU"),
])
def test_malformed_pipelines_are_rejected(name, changes, message):
    with pytest.raises(ValueError, match=message):
        pipeline.validate_pipeline(_bad(name=name, **changes))


def test_the_dag_module_imports_nothing_of_hera_or_kubernetes():
    """pipeline.py is data: every pod imports it (through puzzle.context), and its rendering lives in argo.py."""
    code = ("import sys, puzzle.pipeline; mods = set(sys.modules); "
            "print(sorted({m.split('.')[0] for m in mods} & {'hera', 'kubernetes', 'yaml'} | {'puzzle.argo'} & mods))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_unit_seconds_sums_the_done_markers_per_step(tmp_path):
    """The end-of-run line "sum over units" reads every done marker's seconds; unreadable markers are skipped."""
    from puzzle.layout import done_key
    from puzzle.run import format_unit_seconds, unit_seconds
    from puzzle.store import open_store

    store = open_store(f"file://{tmp_path}")
    store.put_json(done_key("bld", "stage-0"), {"seconds": 10.25})
    store.put_json(done_key("bld", "stage-1"), {"seconds": 4.75})
    store.put_json(done_key("solve", "solve"), {"seconds": 0.5})
    store.put_bytes(done_key("solve", "torn"), b"{not json")
    per = unit_seconds(store, ["prepare", "bld", "solve"])
    assert per == {"prepare": [], "bld": [10.25, 4.75], "solve": [0.5]}
    line = format_unit_seconds(per)
    assert line == "unit time: bld 15.0 s (2), solve 0.5 s (1); sum over units 16 s"
