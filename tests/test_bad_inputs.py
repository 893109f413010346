"""Bad input is refused (issue 10): each case a clear message naming the field, the value and what is
allowed, a non-zero exit through the real CLI, and nothing written that a later step could take for a
result (no plan, no shards' manifest, no done marker, no run created where the input was wrong from the
start).

Related tests elsewhere: property-based fuzzing of the config loader (tests/test_config.py, test_fuzz_*),
every config field's error (test_config.py::test_bad_configs_name_the_field), infeasible solve targets
(test_score_solve.py::test_infeasible_throughput_names_the_best_achievable), bad bld units
(test_bld.py::test_bad_units_fail_at_once_with_exit_2), keys the store refuses
(test_store.py::test_invalid_keys_are_rejected), symbolic links in a file store (test_store.py::test_file_store_*).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from puzzle.cli import main
from puzzle.layout import done_key
from puzzle.store import open_store
from test_reliability import FFN_UNIT, bld_unit, cli, config_text, small_run
from tinymodels import make_parent


def puzzle(capsys, *argv: str) -> tuple[int, str]:
    """The CLI in this process (fast); returns (exit status, stderr)."""
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory) -> Path:
    return make_parent(tmp_path_factory.mktemp("parent"))


def trusted_keys(uri: str) -> list[str]:
    """What a later step would take for a result: plans, token manifests, done markers, children."""
    return [k for k in open_store(uri).list()
            if k.startswith(("plan/", "done/", "child/", "scores/", "solve/")) or k.endswith("manifest.json")]


@pytest.fixture
def cfg_file(tmp_path, parent_dir) -> Path:
    path = tmp_path / "puzzle.yaml"
    path.write_text(config_text(tmp_path, parent_dir, f"file://{tmp_path}/runs"))
    return path


# ----- the config file ------------------------------------------------------------------------------
def test_malformed_yaml_exits_2_and_creates_no_run(tmp_path, cfg_file, capsys):
    cfg_file.write_text(cfg_file.read_text().replace("seed: 0", "seed: [0"))
    code, err = puzzle(capsys, "run", str(cfg_file))
    assert code == 2 and f"error: {cfg_file}: not valid YAML" in err and "line" in err
    assert not (tmp_path / "runs").exists()


def test_unknown_key_exits_2_naming_it_and_the_allowed_keys(tmp_path, cfg_file, capsys):
    cfg_file.write_text(cfg_file.read_text().replace("bld: {", "bld: {lerning_rate: 0.1, "))
    code, err = puzzle(capsys, "run", str(cfg_file))
    assert code == 2
    assert "bld.lerning_rate: unknown key; allowed keys here: mode, tokens, batch_size" in err
    assert not (tmp_path / "runs").exists()


def test_impossible_search_space_exits_2_before_any_plan(tmp_path, parent_dir, capsys):
    uri = small_run(tmp_path, parent_dir, prepare=False, groups="[2, 3]")
    code, err = puzzle(capsys, "step", "prepare", "--run", uri)
    assert code == 2
    assert ("error: step prepare, unit all: search_space.attention.n_heads_in_group: value(s) [3] are not "
            "allowed for this parent (num_attention_heads=8); allowed: [1, 2, 4, 8]") in err
    assert trusted_keys(uri) == []


def test_impossible_search_space_through_the_local_runner_exits_2(tmp_path, parent_dir):
    cfg = tmp_path / "puzzle.yaml"
    cfg.write_text(config_text(tmp_path, parent_dir, f"file://{tmp_path}/runs", groups="[3]"))
    r = cli("run", str(cfg), "--run-id", "bad-space", "--steps", "prepare", "--workers", "1")
    assert r.returncode == 2, r.stderr[-3000:]
    # refused before the run exists: checked against the parent's config.json, no run folder left behind
    assert "error: " in r.stderr and "n_heads_in_group: value(s) [3] are not allowed" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "runs" / "bad-space").exists()


# ----- the parent -----------------------------------------------------------------------------------
@pytest.fixture
def own_parent(tmp_path) -> Path:
    return make_parent(tmp_path / "parent")


def test_parent_without_weights_exits_2_before_any_plan(tmp_path, own_parent, capsys):
    (own_parent / "model.safetensors").unlink()
    uri = small_run(tmp_path, own_parent, prepare=False)
    code, err = puzzle(capsys, "step", "prepare", "--run", uri)
    assert code == 2 and "error: step prepare, unit all: parent.uri:" in err
    assert "no weights found (expected model.safetensors" in err
    assert trusted_keys(uri) == []


def test_weights_removed_after_prepare_stop_bld_with_exit_2(tmp_path, own_parent, capsys):
    uri = small_run(tmp_path, own_parent)
    (own_parent / "model.safetensors").unlink()
    code, err = puzzle(capsys, "step", "bld", "--run", uri, "--unit", json.dumps(bld_unit(uri)))
    assert code == 2 and f"error: step bld, unit {FFN_UNIT}:" in err and "no weights found" in err
    assert not open_store(uri).exists(done_key("bld", FFN_UNIT))


class _RunsCode:
    """Unpickling this writes a file: the proof that a loader executed code from the checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pickle code ran"))


def test_pickle_only_parent_is_refused_and_never_unpickled(tmp_path, own_parent, capsys):
    import torch
    from safetensors.torch import load_file

    marker = tmp_path / "pwned"
    state = load_file(own_parent / "model.safetensors")
    torch.save({**state, "payload": _RunsCode(marker)}, own_parent / "pytorch_model.bin")
    (own_parent / "model.safetensors").unlink()
    uri = small_run(tmp_path, own_parent, prepare=False)
    code, err = puzzle(capsys, "step", "prepare", "--run", uri)
    assert code == 2
    assert "only pickle weights ['pytorch_model.bin'] found; pickle checkpoints are not loaded" in err
    assert "Convert them to safetensors first" in err
    assert not marker.exists(), "the pickle was executed"
    assert trusted_keys(uri) == []


def test_tokenizer_of_another_model_exits_2(tmp_path, own_parent, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(500)}  # 500 tokens for a parent with 64 embeddings
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(own_parent / "tokenizer.json"))
    uri = small_run(tmp_path, own_parent, prepare=False)
    code, err = puzzle(capsys, "step", "prepare", "--run", uri)
    assert code == 2
    assert "the tokenizer has 500 tokens but the model's vocab_size is 64; they do not belong together" in err
    assert trusted_keys(uri) == []


def test_parent_that_is_not_a_directory_exits_2(tmp_path, parent_dir, capsys):
    missing = tmp_path / "no-such-parent"
    uri = small_run(tmp_path, missing, prepare=False)
    code, err = puzzle(capsys, "step", "prepare", "--run", uri)
    assert code == 2 and f"parent.uri: '{missing}' is not a directory" in err
    assert trusted_keys(uri) == []


# ----- storage --------------------------------------------------------------------------------------
def test_s3_with_bad_credentials_exits_2_and_writes_nothing(tmp_path, parent_dir, s3_bucket, monkeypatch):
    cfg = tmp_path / "puzzle.yaml"
    cfg.write_text(config_text(tmp_path, parent_dir, f"s3://{s3_bucket.name}/runs"))
    r = cli("run", str(cfg), "--steps", "prepare", env={"AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    assert r.returncode == 2, r.stderr[-3000:]  # refused credentials: bad input, never retried
    # the first request is the HEAD that checks the run id is free; HEAD answers carry no error code
    assert "credentials were refused" in r.stderr
    assert f"s3://{s3_bucket.name}/runs/t-" in r.stderr and "/config.yaml" in r.stderr
    assert "Traceback" not in r.stderr
    assert s3_bucket.server.client().list_objects_v2(Bucket=s3_bucket.name).get("KeyCount") == 0


@pytest.mark.parametrize("linked", ["data", "plan"])
def test_run_folder_with_a_symlink_to_outside_exits_2_and_writes_nothing_there(tmp_path, parent_dir, capsys,
                                                                                 linked):
    """Issue #16: a directory of the run folder replaced by a link to a folder outside the store. prepare
    refuses the first key under it (bad input, exit 2, naming the key and the link) and writes nothing
    through it; no plan and no done marker appear."""
    uri = small_run(tmp_path, parent_dir, prepare=False)
    run = tmp_path / "runs" / "run-a"
    outside = tmp_path / "outside"
    outside.mkdir()
    (run / linked).symlink_to(outside, target_is_directory=True)
    code, err = puzzle(capsys, "step", "prepare", "--run", uri)
    assert code == 2, err
    assert f"error: step prepare, unit all: {uri}/{linked}/" in err, err
    assert f"key '{linked}/" in err and f"symbolic link '{run / linked}' -> '{outside}'" in err, err
    assert "Traceback" not in err
    assert list(outside.iterdir()) == [], "written outside the store through the link"
    assert not (run / "done").exists() and (linked == "plan" or not (run / "plan").exists())


def test_s3_bad_bucket_name_exits_2(tmp_path, parent_dir, capsys):
    code, err = puzzle(capsys, "step", "prepare", "--run", "s3://Bad_Bucket/runs/run-a")
    assert code == 2 and "bucket 'Bad_Bucket' is not a valid S3 bucket name" in err


# ----- units, keys and run ids ----------------------------------------------------------------------
@pytest.mark.parametrize(("unit", "message"), [
    ('{"id": "../../etc/passwd"}', "id '../../etc/passwd' is not allowed"),
    ('{"id": "a/b"}', "id 'a/b' is not allowed"),
    ('{"id": ".hidden"}', "id '.hidden' is not allowed"),
    ('{"kind": "ffn"}', "must be a JSON object with an 'id' key"),
    ("not json", "--unit: not valid JSON"),
])
def test_bad_unit_ids_exit_2(tmp_path, parent_dir, capsys, unit, message):
    uri = small_run(tmp_path, parent_dir, prepare=False)
    code, err = puzzle(capsys, "step", "bld", "--run", uri, "--unit", unit)
    assert code == 2 and message in err
    assert open_store(uri).list() == ["config.yaml"]


def test_unit_fields_cannot_reach_outside_the_run(tmp_path, parent_dir, capsys):
    uri = small_run(tmp_path, parent_dir)
    before = open_store(uri).list()
    bad = {**bld_unit(uri), "id": "evil", "blocks": ["../../../../tmp/evil"]}
    code, err = puzzle(capsys, "step", "bld", "--run", uri, "--unit", json.dumps(bad))
    assert code == 2 and "unit evil: blocks:" in err
    # only the unit's failure record (for `puzzle status`) was added, at its own key
    added = sorted(set(open_store(uri).list()) - set(before))
    assert added == ["failed/bld/evil.json"]
    assert "blocks:" in open_store(uri).get_json("failed/bld/evil.json")["error"]
    assert not [p for p in (tmp_path / "runs").rglob("*evil*") if "failed" not in p.relative_to(tmp_path).parts]


@pytest.mark.parametrize("run_id", ["../evil", "Evil", "a/b", "-x", "x" * 64])
def test_run_ids_with_traversal_or_bad_characters_exit_2(tmp_path, cfg_file, capsys, run_id):
    code, err = puzzle(capsys, "run", str(cfg_file), f"--run-id={run_id}")
    assert code == 2 and f"run id {run_id!r} is not a run id" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "evil").exists()


@pytest.mark.parametrize("uri", ["file://{tmp}/runs/../run-a", "file://{tmp}/runs/..", "file://{tmp}/runs/RUN"])
def test_run_uris_with_traversal_exit_2(tmp_path, parent_dir, capsys, uri):
    small_run(tmp_path, parent_dir, prepare=False)
    uri = uri.format(tmp=tmp_path)
    for argv in (("step", "prepare", "--run", uri), ("run", "--resume", uri)):
        code, err = puzzle(capsys, *argv)
        assert code == 2, (argv, err)
        assert "'..' path segments are not allowed" in err or "is not a run id" in err, (argv, err)
    assert open_store(f"file://{tmp_path}/runs/run-a").list() == ["config.yaml"]


def test_bad_steps_option_exits_2(tmp_path, cfg_file, capsys):
    code, err = puzzle(capsys, "run", str(cfg_file), "--steps", "prepare,bldd")
    assert code == 2 and "--steps: 'prepare,bldd' is not allowed; allowed: a comma-separated subset of" in err
    assert not (tmp_path / "runs").exists()


def test_config_name_cannot_carry_a_path(tmp_path, cfg_file, capsys):
    cfg_file.write_text(cfg_file.read_text().replace("name: t", "name: ../../etc"))
    code, err = puzzle(capsys, "run", str(cfg_file))
    assert code == 2 and 'name: value "../../etc" is not allowed' in err
    assert not (tmp_path / "runs").exists()
