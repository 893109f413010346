"""Run integrity (issue #16) and a newcomer's interruptions (issue #19): a run never trusts a stale, foreign or
tampered artifact, resume verifies instead of trusting markers, a corrected input can be taken up with
--redo (the change recorded in the run), bad input is refused before any run exists, and Ctrl-C says what
was saved and how to resume.

Everything runs through the real CLI on the small random parent of tests/tinymodels.py (no mocks); each
test fails on the code before these issues (which replaced a run's config, trusted every done marker,
offered no --redo, created runs for configs its parent could never serve, and exited 1 on Ctrl-C without
a word).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from puzzle.cli import main
from puzzle.config import load_config_text
from puzzle.errors import UnitError
from puzzle.layout import done_key
from puzzle.library import Library
from puzzle.run import download_child, publish_child
from puzzle.store import open_store
from test_reliability import CHILD_ENV, cli, config_text, small_run
from tinymodels import make_parent


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory) -> Path:
    return make_parent(tmp_path_factory.mktemp("parent"))


def puzzle(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


# ----- a run's identity ------------------------------------------------------------------------------
def test_another_config_under_an_existing_run_id_is_refused(tmp_path, parent_dir, capsys):
    a = tmp_path / "a.yaml"
    a.write_text(config_text(tmp_path, parent_dir, f"file://{tmp_path}/runs"))
    assert puzzle(capsys, "run", str(a), "--run-id", "bound", "--steps", "prepare", "--workers", "1")[0] == 0
    stored = open_store(f"file://{tmp_path}/runs/bound").get_text("config.yaml")
    b = tmp_path / "b.yaml"
    b.write_text(a.read_text().replace("checkpoint_every: 5", "checkpoint_every: 5, lr: 0.5"))
    code, err = puzzle(capsys, "run", str(b), "--run-id", "bound", "--steps", "prepare")
    assert code == 2 and "run 'bound' already exists" in err and "--redo" in err
    assert open_store(f"file://{tmp_path}/runs/bound").get_text("config.yaml") == stored
    # the same config again is a resume, not a conflict
    assert puzzle(capsys, "run", str(a), "--run-id", "bound", "--steps", "prepare")[0] == 0


def test_a_library_keyed_on_other_bld_settings_is_refused(tmp_path, parent_dir):
    uri = small_run(tmp_path, parent_dir)
    store = open_store(uri)
    cfg = load_config_text(store.get_text("config.yaml"))
    Library.for_run(store, cfg, parent_dir)  # records library.json for these settings
    other = cfg.model_copy(update={"bld": cfg.bld.model_copy(update={"lr": 0.5})})
    with pytest.raises(UnitError, match="keyed on other BLD settings"):
        Library.for_run(store, other, parent_dir)


# ----- resume verifies -------------------------------------------------------------------------------
def test_resume_redoes_a_done_unit_whose_artifact_is_missing_or_changed(tmp_path, parent_dir):
    cfg = tmp_path / "puzzle.yaml"
    cfg.write_text(config_text(tmp_path, parent_dir, f"file://{tmp_path}/runs", bld_steps=4))
    r = cli("run", str(cfg), "--run-id", "verify", "--steps", "prepare,bld", "--workers", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    uri = f"file://{tmp_path}/runs/verify"
    store = open_store(uri)
    marker = store.get_json(done_key("prepare", "all"))
    assert "verify/plan/bld.json" in marker["outputs"]
    shard = next(k for k in store.list("data/distillation") if k.endswith(".safetensors"))
    store.delete(shard)  # an operator cleaned up too much
    lib = Library.for_run(store, load_config_text(store.get_text("config.yaml")))
    lib.store.put_bytes("001/ffn_m0.5/meta.json", b'{"tampered": true}')  # rewritten behind the run's back
    r = cli("run", "--resume", uri, "--steps", "prepare,bld", "--workers", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"redoing prepare/all: its done marker cannot be trusted: verify/{shard} is missing" in r.stderr
    assert "redoing bld/bld.l000-002" in r.stderr and "001/ffn_m0.5/meta.json changed" in r.stderr
    assert store.exists(shard) and lib.meta(1, "ffn_m0.5").get("tampered") is None


# ----- --redo, with the config change recorded ------------------------------------------------------
def test_redo_takes_up_a_corrected_config_and_records_it(tmp_path, parent_dir, capsys):
    cfg = tmp_path / "puzzle.yaml"
    cfg.write_text(config_text(tmp_path, parent_dir, f"file://{tmp_path}/runs", bld_steps=4))
    assert puzzle(capsys, "run", str(cfg), "--run-id", "redo", "--steps", "prepare", "--workers", "1")[0] == 0
    uri = f"file://{tmp_path}/runs/redo"
    fixed = tmp_path / "fixed.yaml"
    # a change to what prepare read cannot be taken up by redoing only bld
    fixed.write_text(cfg.read_text().replace("seq_len: 32", "seq_len: 16"))
    code, err = puzzle(capsys, "run", "--resume", uri, "--config", str(fixed), "--redo", "bld", "--steps", "bld")
    assert code == 2 and "data changed" in err and "allowed: --redo prepare" in err
    code, err = puzzle(capsys, "run", "--resume", uri, "--config", str(fixed), "--redo", "prepare",
                       "--steps", "prepare", "--workers", "1")
    assert code == 0, err
    store = open_store(uri)
    assert "seq_len: 16" in store.get_text("config.yaml")
    hist = store.get_json("history/0000.json")
    assert hist["redo"] == "prepare" and "seq_len: 32" in hist["old_config"] and "data" in hist["reason"]
    assert store.get_json("done/prepare/all.json")["unit"] == {"id": "all"}
    # --config without --redo says what is missing
    code, err = puzzle(capsys, "run", "--resume", uri, "--config", str(fixed))
    assert code == 2 and "needs --redo STEP" in err


# ----- bad input before any run exists ----------------------------------------------------------------
@pytest.mark.parametrize(("edit", "message"), [
    # the parent's own attention (4 KV heads: groups of 2) and FFN (160 = ffn_mult 3.75 at hidden 64)
    (lambda t: t.replace("n_heads_in_group: [2, 4]", "n_heads_in_group: [2]").replace(
        "ffn_mult: [0.5]", "ffn_mult: [3.75]"), "search_space: offers nothing but the parent's own blocks"),
    (lambda t: t.replace("seq_len: 32", "seq_len: 4096"),
     "data.seq_len: 4096 is not allowed for this parent; allowed: at most its max_position_embeddings = 512"),
    (lambda t: t + "compute: {gpu_memory_gib: 1}\n", "compute.gpu_memory_gib: 1 is too small for bld unit"),
])
def test_impossible_configs_exit_2_and_leave_no_run(tmp_path, parent_dir, capsys, edit, message):
    cfg = tmp_path / "puzzle.yaml"
    cfg.write_text(edit(config_text(tmp_path, parent_dir, f"file://{tmp_path}/runs")))
    code, err = puzzle(capsys, "run", str(cfg))
    assert code == 2 and message in err, err
    assert not (tmp_path / "runs").exists()


def test_a_truncated_parent_config_exits_2_naming_the_file(tmp_path, capsys):
    parent = make_parent(tmp_path / "parent")
    text = (parent / "config.json").read_text()
    (parent / "config.json").write_text(text[: len(text) // 2])
    cfg = tmp_path / "puzzle.yaml"
    cfg.write_text(config_text(tmp_path, parent, f"file://{tmp_path}/runs"))
    code, err = puzzle(capsys, "run", str(cfg))
    assert code == 2 and f"{parent}/config.json: not valid JSON" in err and "truncated" in err
    (parent / "config.json").write_text(json.dumps({**json.loads(text), "hidden_size": "wide"}))
    code, err = puzzle(capsys, "run", str(cfg))
    assert code == 2 and "hidden_size: 'wide' is not allowed; allowed: an integer >= 1" in err
    assert not (tmp_path / "runs").exists()


def test_cli_numbers_are_checked(tmp_path, parent_dir, capsys):
    cfg = tmp_path / "puzzle.yaml"
    cfg.write_text(config_text(tmp_path, parent_dir, f"file://{tmp_path}/runs"))
    code, err = puzzle(capsys, "run", str(cfg), "--workers", "-1")
    assert code == 2 and "--workers: -1 is not allowed; allowed: an integer >= 1" in err
    assert not (tmp_path / "runs").exists()


def test_a_missing_bucket_is_bad_input(tmp_path, parent_dir, s3_bucket, capsys):
    cfg = tmp_path / "puzzle.yaml"
    cfg.write_text(config_text(tmp_path, parent_dir, "s3://no-such-bucket-here/runs"))
    code, err = puzzle(capsys, "run", str(cfg))
    assert code == 2 and "bucket 'no-such-bucket-here' does not exist" in err


# ----- children: published whole, read checked ---------------------------------------------------------
def test_a_child_without_a_tokenizer_is_never_published_and_a_tampered_one_never_read(tmp_path, parent_dir):
    from puzzle.model import load_parent, save_pretrained

    store = open_store(f"file://{tmp_path}/runs/kids")
    child = tmp_path / "child"
    save_pretrained(load_parent(parent_dir), child)  # no tokenizer_dir: config and weights only
    with pytest.raises(UnitError, match="not published, the child is incomplete: tokenizer.json is missing"):
        publish_child(store, "sol-0", child, {"kind": "puzzle"})
    assert store.list("child") == []
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (child / f).write_text((parent_dir / f).read_text())
    publish_child(store, "sol-0", child, {"kind": "puzzle"})
    store.put_bytes("child/sol-0/config.json", b"{}")  # changed after assembly, checksum sidecar and all
    with pytest.raises(UnitError, match="child/sol-0/config.json: its sha256 differs"):
        download_child(store, "sol-0", tmp_path / "read")


# ----- status shows failures; Ctrl-C says how to resume -----------------------------------------------
def test_status_shows_a_failed_unit_with_its_error(tmp_path, parent_dir, capsys):
    uri = small_run(tmp_path, parent_dir)
    bad = {"id": "broken", "layers": [0, 2], "blocks": ["attn_g3"]}
    assert main(["step", "bld", "--run", uri, "--unit", json.dumps(bad)]) == 2
    capsys.readouterr()
    assert main(["status", uri]) == 0
    out = capsys.readouterr().out
    assert "failed broken: UnitError: blocks: variant 'attn_g3'" in out and "(exit 2," in out
    # the run's folder as `ls` shows it names the same run; a path that is no run exits 2, saying so
    assert main(["status", uri.removeprefix("file://")]) == 0 and capsys.readouterr().out == out
    with pytest.raises(SystemExit) as e:
        main(["status", str(tmp_path / "no-such-run")])
    assert e.value.code == 2 and "is not a run: no run folder" in capsys.readouterr().err


def test_ctrl_c_prints_what_was_saved_and_the_resume_command(tmp_path, parent_dir):
    cfg = tmp_path / "puzzle.yaml"
    cfg.write_text(config_text(tmp_path, parent_dir, f"file://{tmp_path}/runs", bld_steps=400))
    proc = subprocess.Popen([sys.executable, "-m", "puzzle.cli", "run", str(cfg), "--run-id", "ctrlc",
                             "--steps", "prepare,bld", "--workers", "1"], env={**os.environ, **CHILD_ENV},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    uri = f"file://{tmp_path}/runs/ctrlc"
    deadline = time.monotonic() + 240
    while not list((tmp_path / "runs").glob("library/*/checkpoints/*/state.json")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert f"interrupted: completed units are saved in {uri} (prepare 1/1" in err
    assert f"resume with: puzzle run --resume {uri}" in err and "Traceback" not in err
    assert open_store(uri).exists(done_key("prepare", "all")) and not open_store(uri).exists(
        done_key("bld", "bld.l000-002"))
    # the checkpoint is still there for the resume
    assert list((tmp_path / "runs").glob("library/*/checkpoints/*/state.json"))


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent has not read its status yet


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_stopped_run_leaves_no_worker_behind(tmp_path, parent_dir, sig):
    """`kill` (SIGTERM) is handled as Ctrl-C is (workers stopped, resume command, exit 143); after SIGKILL,
    which nothing can handle, the workers die with the run (PR_SET_PDEATHSIG) instead of training on as
    orphans that write into a run nobody runs."""
    from test_reliability import _children

    cfg = tmp_path / "puzzle.yaml"
    cfg.write_text(config_text(tmp_path, parent_dir, f"file://{tmp_path}/runs", bld_steps=400))
    proc = subprocess.Popen([sys.executable, "-m", "puzzle.cli", "run", str(cfg), "--run-id", "stopped",
                             "--steps", "prepare,bld", "--workers", "1"], env={**os.environ, **CHILD_ENV},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list((tmp_path / "runs").glob("library/*/checkpoints/*/state.json")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.1)
    workers = _children(proc.pid)
    assert workers, "the run has no worker processes to check"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, err[-3000:]
        assert "resume with: puzzle run --resume" in err and "Traceback" not in err
    else:
        assert proc.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in workers if _alive(p)], "worker processes outlived the run"


def test_gkd_resumes_from_its_checkpoint_to_the_same_weights(tmp_path, parent_dir):
    """GKD checkpoints like BLD (issue #19): stopped after a checkpoint, a second call ends where an
    uninterrupted one does."""
    import torch
    from puzzle.config import GKDConfig
    from puzzle.distill.gkd import distill
    from puzzle.model import load_parent

    torch.manual_seed(0)
    seqs = torch.randint(0, 64, (16, 16))
    cfg = GKDConfig(enabled=True, tokens=16 * 4 * 6, batch_size=4, lr=1e-3, checkpoint_every=2)

    def child():
        c = load_parent(parent_dir)
        with torch.no_grad():
            c.model.layers[1].mlp.down_proj.weight.mul_(0.5)  # a child that differs from its parent
        return c

    teacher = load_parent(parent_dir)
    a = child()
    distill(a, teacher, seqs, cfg, seed=0)
    ckpt = open_store(f"file://{tmp_path}/ckpt")

    class Stop(Exception):
        pass

    def stop_at(step, _):
        if step == 3:
            raise Stop  # after the checkpoint of step 2
    b = child()
    with pytest.raises(Stop):
        distill(b, teacher, seqs, cfg, seed=0, on_step=stop_at, checkpoints=ckpt, resume_key="u")
    assert ckpt.exists("state.json")
    b = child()
    res = distill(b, teacher, seqs, cfg, seed=0, checkpoints=ckpt, resume_key="u")
    assert res.steps == 6 and not ckpt.list()
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(vb, va, rtol=0, atol=1e-6, msg=k)
