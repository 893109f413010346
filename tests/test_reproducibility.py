"""The same config, seed and profiles give the same child bit for bit (issue #19).

Two local runs of one config in two separate stores: the second gets nothing from the first but its
measured profiles (the profile cache, ``profiles/<digest>/`` beside the runs, which `profile` copies
instead of measuring again), so BLD, score, solve and assemble with GKD all run again. The solutions
and every byte of the child must be equal; a third run with another seed must not be (so the check
can fail).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from puzzle.cli import main
from puzzle.store import open_store
from tinymodels import make_parent, write_text

torch.set_num_threads(1)

STEPS = "prepare,bld,profile,score,solve,assemble"


def _config(tmp: Path, parent: Path, store: Path, seed: int) -> Path:
    train, valid = tmp / "train.txt", tmp / "valid.txt"
    if not train.exists():
        write_text(train, 200, seed=1)
        write_text(valid, 60, seed=2)
    path = tmp / f"run-{store.name}-{seed}.yaml"
    path.write_text(f"""
name: repro
seed: {seed}
parent: {{uri: {parent}}}
data: {{distillation_uri: {train}, validation_uri: {valid}, seq_len: 32, shard_tokens: 2048}}
search_space:
  attention: {{n_heads_in_group: [4], replace_with_linear: false, no_op: true}}
  ffn: {{ffn_mult: [0.5], replace_with_linear: false, no_op: true}}
bld: {{tokens: 2560, batch_size: 8, seed: {seed}, checkpoint_every: 4, eval_tokens: 256, calibration_tokens: 256}}
profile: {{scenarios: [{{name: cpu, batch_size: 2, input_len: 8, output_len: 8}}], warmup: 1, repeats: 3}}
score: {{tokens: 256, batch_size: 4}}
solve: {{throughput: [{{scenario: cpu, min_speedup: 1.3}}], pareto_points: 0}}
assemble: {{gkd: {{enabled: true, tokens: 2560, batch_size: 8, checkpoint_every: 4}}}}
eval: {{baselines: false}}
store: {{uri: "file://{store}"}}
""")
    return path


def _child_bytes(store: Path, run_id: str) -> dict[str, bytes]:
    child = store / run_id / "child" / "sol-0"
    # the store's checksum sidecars (.puzzle-sha256.*) follow from the files; complete.json's is the one that
    # differs, with complete.json's assembly seconds
    files = {p.relative_to(child).as_posix(): p.read_bytes() for p in sorted(child.rglob("*"))
             if p.is_file() and not p.name.startswith(".puzzle-sha256.")}
    assert "model.safetensors" in files, sorted(files)
    return files


@pytest.mark.slow
def test_same_config_seed_and_profiles_give_the_same_child_bit_for_bit(tmp_path, capsys):
    parent = make_parent(tmp_path / "parent")
    first, second, third = tmp_path / "runs-a", tmp_path / "runs-b", tmp_path / "runs-c"
    assert main(["run", str(_config(tmp_path, parent, first, 0)), "--run-id", "a", "--steps", STEPS,
                 "--workers", "1"]) == 0
    assert list((first / "profiles").iterdir()), "the first run left no profile cache"
    for store in (second, third):
        shutil.copytree(first / "profiles", store / "profiles")
    assert main(["run", str(_config(tmp_path, parent, second, 0)), "--run-id", "a", "--steps", STEPS,
                 "--workers", "1"]) == 0
    assert main(["run", str(_config(tmp_path, parent, third, 1)), "--run-id", "a", "--steps", STEPS,
                 "--workers", "1"]) == 0
    capsys.readouterr()

    a, b = open_store(f"file://{first}/a"), open_store(f"file://{second}/a")
    # the solutions, all but how long the solver took
    sols = [[{k: v for k, v in sol.items() if k != "seconds"} for sol in st.get_json("solve/solutions.json")]
            for st in (a, b)]
    assert sols[0] == sols[1] and sols[0]
    # the second run measured nothing: every profile is the cached one, provenance aside
    keys = a.list("profile")
    assert keys and keys == b.list("profile")
    assert any(a.get_json(k).get("cache") for k in keys), "the first run cached no profile"
    for key in keys:
        pa, pb = a.get_json(key), b.get_json(key)
        if pa.get("cache"):  # measured and cached by the first run (no-op blocks cost zero, untimed)
            assert pb.get("reused"), f"{key} was measured again, not reused"
        drop = {"reused", "cache"}
        assert {k: v for k, v in pa.items() if k not in drop} == {k: v for k, v in pb.items() if k not in drop}, key
    want, got = _child_bytes(first, "a"), _child_bytes(second, "a")
    assert want.keys() == got.keys()
    # complete.json records how long assembly took (it must differ); every file it lists must not
    completes = [json.loads(d.pop("complete.json")) for d in (want, got)]
    assert completes[0]["files"] == completes[1]["files"] and completes[0]["files"]
    for name in want:
        assert want[name] == got[name], f"child file {name} differs between two runs of one config and seed"
    other = _child_bytes(third, "a")
    assert other["model.safetensors"] != want["model.safetensors"], "another seed gave the same weights"
