"""Step metrics: pushed to a real Pushgateway (tests/services.py) and written into a file:// store."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from puzzle.metrics import StepMetrics
from puzzle.store import open_store
from services import Pushgateway, closed_port_url

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample line in a Prometheus text exposition."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m["labels"] or ""))
        out.append((m["name"], labels, float(m["value"])))
    return out


def value(text: str, name: str, **labels: str) -> float:
    found = [v for n, ls, v in samples(text) if n == name and all(ls.get(k) == w for k, w in labels.items())]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples in\n{text}"
    return found[0]


def test_push_and_read_back(pushgateway: Pushgateway) -> None:
    m = StepMetrics("tiny-20261126-1a2b", "bld", "layers-0-1/ffn_mult-0.5", pushgateway.url)
    m.set("bld_normalized_mse", 0.125, help="final normalized MSE", phase="final")
    m.inc("bld_tokens", 4096)
    m.inc("bld_tokens", 4096)
    m.observe("bld_step_seconds", 0.5)
    m.observe("bld_step_seconds", 1.5)
    assert m.push() is True

    text = pushgateway.metrics_text()
    key = {"run": "tiny-20261126-1a2b", "step": "bld", "unit": "layers-0-1/ffn_mult-0.5", "job": "puzzle"}
    assert value(text, "puzzle_bld_normalized_mse", phase="final", **key) == 0.125
    assert value(text, "puzzle_bld_tokens_total", **key) == 8192
    assert value(text, "puzzle_bld_step_seconds_count", **key) == 2
    assert value(text, "puzzle_bld_step_seconds_sum", **key) == 2.0

    # A second unit is its own group; re-pushing a unit replaces only that unit's values.
    other = StepMetrics("tiny-20261126-1a2b", "bld", "layers-2-3/ffn_mult-0.5", pushgateway.url)
    other.set("bld_normalized_mse", 0.5, phase="final")
    assert other.push()
    m.set("bld_normalized_mse", 0.0625, phase="final")
    assert m.push()
    text = pushgateway.metrics_text()
    assert value(text, "puzzle_bld_normalized_mse", phase="final", **key) == 0.0625
    assert value(text, "puzzle_bld_normalized_mse", unit="layers-2-3/ffn_mult-0.5") == 0.5


def test_push_failure_is_only_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    url = closed_port_url()
    m = StepMetrics("r", "score", "0", url)
    m.set("score_kl", 0.1)
    with caplog.at_level(logging.WARNING, logger="puzzle.metrics"):
        assert m.push() is False
    assert any(url in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert StepMetrics("r", "score", "0").push() is False  # no URL: nothing to do


def test_text_written_into_file_store(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}/runs/r1")
    m = StepMetrics("r1", "profile", "cpu-b8/attn n_heads_in_group=2")
    m.set("profile_decode_seconds", 0.002, variant="attn_g2")
    m.set("profile_decode_seconds", 0.004, variant="attn_g4")
    m.inc("profile_runs", help="timed repetitions")
    key = m.write(store)
    assert key == "metrics/profile-cpu-b8_attn_n_heads_in_group=2.prom"
    assert store.list("metrics") == [key]
    text = store.get_text(key)
    assert text == m.text()
    assert "# TYPE puzzle_profile_decode_seconds gauge" in text
    assert "# HELP puzzle_profile_runs_total timed repetitions" in text
    labels = {"run": "r1", "step": "profile", "unit": "cpu-b8/attn n_heads_in_group=2"}
    assert value(text, "puzzle_profile_decode_seconds", variant="attn_g4", **labels) == 0.004
    assert value(text, "puzzle_profile_runs_total", **labels) == 1
    # Units write separate files, so a step's fan-out never overwrites itself.
    StepMetrics("r1", "profile", "other").write(store)
    assert len(store.list("metrics")) == 2


def test_registries_are_per_instance() -> None:
    a = StepMetrics("r", "bld", "a")
    b = StepMetrics("r", "bld", "b")
    a.set("x", 1)
    b.set("x", 2)  # same name in another instance: no "duplicated timeseries" error
    assert value(a.text(), "puzzle_x") == 1
    assert value(b.text(), "puzzle_x") == 2
    a.set("puzzle_y", 3)  # the prefix is not doubled
    assert value(a.text(), "puzzle_y") == 3


def test_bad_use_is_rejected_with_the_name() -> None:
    m = StepMetrics("r", "bld", "u")
    m.set("loss", 1.0, layer="0")
    with pytest.raises(ValueError, match="puzzle_loss is a gauge"):
        m.inc("loss")
    with pytest.raises(ValueError, match=r"puzzle_loss has labels \['layer'\]"):
        m.set("loss", 1.0, variant="x")
    with pytest.raises(ValueError, match="'bad-name'"):
        m.set("bad-name", 1.0)
    with pytest.raises(ValueError, match=r"\['unit'\]"):
        m.set("z", 1.0, unit="x")
    with pytest.raises(ValueError, match="only go up"):
        m.inc("c", -1)
    with pytest.raises(ValueError, match="run_id"):
        StepMetrics("", "bld", "u")


def test_only_metrics_module_imports_prometheus_client() -> None:
    package = Path(__file__).resolve().parents[1] / "jobs" / "puzzle"
    importers = sorted(
        p.relative_to(package).as_posix()
        for p in package.rglob("*.py")
        if re.search(r"^\s*(import|from)\s+prometheus_client\b", p.read_text(encoding="utf-8"), re.MULTILINE)
    )
    assert importers == ["metrics.py"]
