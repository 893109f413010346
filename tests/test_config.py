"""The run config: every shipped example validates; bad input fails naming the field.

Covers ``puzzle.config`` (load/parse and its error messages), the ``puzzle config`` CLI, and a
Hypothesis fuzz of the loader: whatever a user writes, the loader either returns a config or
raises ConfigError, never another exception.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from puzzle.cli import main
from puzzle.config import ConfigError, PuzzleConfig, StoreConfig, load_config, load_config_text, parse_config
from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[1]


def example_configs() -> list[Path]:
    """YAML files under examples/ that are run configs (a mapping with a ``parent`` key)."""
    found = []
    for path in sorted(REPO.glob("examples/**/*.yaml")):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            data = None
        if isinstance(data, dict) and "parent" in data:
            found.append(path)
    return found


EXAMPLES = example_configs()
TINY = REPO / "examples/tiny/puzzle.yaml"


def tiny() -> dict[str, Any]:
    return yaml.safe_load(TINY.read_text(encoding="utf-8"))


def test_examples_are_found() -> None:
    assert TINY in EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(REPO)))
def test_example_validates_and_round_trips(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, PuzzleConfig)
    assert load_config_text(cfg.to_yaml()) == cfg  # the effective config is itself a valid config


def _with(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(tiny())
    cur: Any = data
    for part in path[:-1]:
        cur = cur[part]
    cur[path[-1]] = value
    return data


def _without(path: tuple[Any, ...]) -> dict[str, Any]:
    data = copy.deepcopy(tiny())
    cur: Any = data
    for part in path[:-1]:
        cur = cur[part]
    del cur[path[-1]]
    return data


BAD = [
    (
        "unknown key",
        _with(("bld", "learning_rate"), 0.1),
        r"bld\.learning_rate: unknown key; allowed keys here: .*\blr\b",
    ),
    (
        "unknown top-level key",
        _with(("trainer",), {}),
        r"trainer: unknown key; allowed keys here: .*search_space",
    ),
    ("wrong type", _with(("bld", "batch_size"), "eight"), r'bld\.batch_size: value "eight" is not allowed'),
    ("wrong nested type", _with(("search_space", "ffn", "ffn_mult"), "big"), r"search_space\.ffn\.ffn_mult"),
    ("out of range", _with(("data", "seq_len"), 4), r"data\.seq_len: value 4 is not allowed.*8"),
    ("bad enum", _with(("score", "metric"), "accuracy"), r"score\.metric: value \"accuracy\".*'kl'"),
    (
        "bad list enum",
        _with(("eval", "icl", "methods"), ["random", "best"]),
        r"eval\.icl\.methods\.1:.*cover_ls",
    ),
    ("missing section", _without(("data",)), r"data: required field is missing"),
    (
        "missing field",
        _without(("profile", "scenarios", 0, "batch_size")),
        r"profile\.scenarios\.0\.batch_size: required",
    ),
    (
        "cross-field scenario name",
        _with(("solve", "throughput"), [{"scenario": "h100-b64", "min_speedup": 2.0}]),
        r"solve\.throughput\.0\.scenario: 'h100-b64' is not a profile scenario; allowed: \['cpu-b8'\]",
    ),
    (
        "cross-field serving",
        _with(("search_space", "attention", "replace_with_linear"), True),
        r"search_space: .*attention.replace_with_linear: value true breaks vllm's rule .*allowed: false",
    ),
    ("bad store scheme", _with(("store", "uri"), "gs://x"), r"store: .*uri: 'gs://x' is not allowed"),
    (
        "duplicate variants",
        _with(("search_space", "attention", "n_heads_in_group"), [2, 2]),
        r"n_heads_in_group",
    ),
]


@pytest.mark.parametrize(("data", "pattern"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_configs_name_the_field(tmp_path: Path, data: dict[str, Any], pattern: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(ConfigError, match=pattern) as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_malformed_yaml_and_non_mappings(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("parent:\n  uri: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"(?s)broken\.yaml: not valid YAML.*line 2"):
        load_config(path)
    with pytest.raises(ConfigError, match="top level must be a mapping.*list"):
        load_config_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_store_config_alone() -> None:
    assert StoreConfig().uri.startswith("file://")
    assert StoreConfig(uri="s3://bucket/runs").path_style is True


def test_cli_validate_bad_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_with(("score", "metric"), "accuracy")), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "puzzle.cli", "config", "validate", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "error:" in proc.stderr and "score.metric" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_validate_good_file_prints_effective_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "validate", str(TINY)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{TINY}: valid\n")
    effective = yaml.safe_load(out.split("\n", 1)[1])
    assert parse_config(effective) == load_config(TINY)
    assert (
        effective["bld"]["warmup_fraction"]
        == PuzzleConfig.model_fields["bld"].default_factory().warmup_fraction
    )
    assert main(["config", "validate", "--quiet", str(TINY)]) == 0
    assert capsys.readouterr().out == ""


def test_cli_schema_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert set(schema["required"]) >= {"parent", "data", "profile"}
    assert "search_space" in schema["properties"]
    assert "n_heads_in_group" in json.dumps(schema["$defs"]["AttentionSpace"])



def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The BaseModel types inside an annotation: itself, or nested in list[...], Optional, unions, dicts."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def _undescribed(model: type[BaseModel], prefix: str, seen: set[type[BaseModel]]) -> list[str]:
    """Dotted paths of the fields under ``model`` (recursively) whose description is missing or blank."""
    seen.add(model)
    missing = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        if not (field.description or "").strip():
            missing.append(path)
        for sub in _models_in(field.annotation):
            if sub not in seen:
                missing += _undescribed(sub, f"{path}.", seen)
    return missing


def test_every_config_field_has_a_description() -> None:
    """Issue #19: ``puzzle config schema`` is the reference of the YAML, so no field may be bare."""
    seen: set[type[BaseModel]] = set()
    missing = _undescribed(PuzzleConfig, "", seen)
    # the walk must reach the models nested in lists and sections, or it would check too little
    assert {"Scenario", "ThroughputConstraint", "GKDConfig", "ICLEvalConfig", "AttentionSpace"} <= {
        m.__name__ for m in seen
    }
    assert not missing, f"config fields without a description: {', '.join(missing)}"


def test_cli_schema_describes_every_property(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    models = {"PuzzleConfig": schema, **schema["$defs"]}
    missing = [
        f"{model}.{prop}"
        for model, definition in models.items()
        for prop, spec in definition.get("properties", {}).items()
        if not str(spec.get("description", "")).strip()
    ]
    assert len(models) > 10 and "Scenario" in models
    assert not missing, f"schema properties without a description: {', '.join(missing)}"

# --- fuzz -----------------------------------------------------------------------------------
_KEYS = sorted(
    {"name", "seed", "uri", "dtype", "scenarios", "batch_size", "ffn_mult", "n_heads_in_group", "metric"}
    | set(PuzzleConfig.model_fields)
)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.binary(max_size=8)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=6) | st.integers(), inner, max_size=4)
    ),
    max_leaves=20,
)


def _ok_or_config_error(fn, *args: Any) -> None:
    try:
        assert isinstance(fn(*args), PuzzleConfig)
    except ConfigError as err:
        assert str(err)


@given(_values)
def test_fuzz_random_documents(data: Any) -> None:
    _ok_or_config_error(parse_config, data)


@given(st.sampled_from(sorted(tiny())), st.data())
def test_fuzz_mutated_example(section: str, draw: st.DataObject) -> None:
    data = tiny()
    sub = data[section]
    if isinstance(sub, dict) and sub and draw.draw(st.booleans()):
        data[section][draw.draw(st.sampled_from(sorted(sub)))] = draw.draw(_values)
    else:
        data[section] = draw.draw(_values)
    _ok_or_config_error(parse_config, data)


@given(st.text(max_size=200))
def test_fuzz_yaml_text(text: str) -> None:
    _ok_or_config_error(load_config_text, text)
