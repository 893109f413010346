"""Faults a run survives (issue 10): killed processes, corrupted artifacts, a full disk, memory exhaustion.

Every fault is real, never mocked: processes die by SIGKILL (from outside, or injected inside the step
process right after a write, as a preempted pod dies), bytes are flipped in the store on disk, the disk
fills up (a 64 KiB tmpfs mounted for the test where the test runs as root, and everywhere the file-size
limit RLIMIT_FSIZE, which makes writes fail with EFBIG), memory runs out under RLIMIT_AS. The S3 faults
(server stopped, two runs in one bucket) live in tests/test_reliability_s3.py; RELIABILITY.md lists all.

The helpers here (``small_run``, ``cli``) are shared with the other reliability, bad-input and security
tests: a random 2-layer Llama parent (tests/tinymodels.py), SCAN text, and a prepared file:// run whose bld
plan is two units (attn_g4 and ffn_m0.5 over layers 0-1).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from puzzle.config import load_config_text
from puzzle.context import run_step
from puzzle.layout import done_key
from puzzle.library import Library
from puzzle.run import create_run
from puzzle.store import open_store
from tinymodels import make_parent, write_text

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
# one thread per process: the suite shares 2 cores with other sessions
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
             "PYTHONUNBUFFERED": "1"}
FFN_UNIT = "bld.l000-002"  # the one stage: attn_g4 and ffn_m0.5 over layers 0-1


def config_text(tmp: Path, parent: Path, store_uri: str, *, bld_steps: int = 40, extra: str = "",
                checkpoint_every: int = 5, batch_size: int = 8, seq_len: int = 32,
                groups: str = "[2, 4]") -> str:
    train, valid = tmp / "train.txt", tmp / "valid.txt"
    if not train.exists():
        write_text(train, 300, seed=1)
        write_text(valid, 100, seed=2)
    return f"""
name: t
seed: 0
parent: {{uri: {parent}}}
data: {{distillation_uri: {train}, validation_uri: {valid}, seq_len: {seq_len}, shard_tokens: 2048}}
search_space:
  attention: {{n_heads_in_group: {groups}, replace_with_linear: false, no_op: false}}
  ffn: {{ffn_mult: [0.5], replace_with_linear: false, no_op: false}}
bld: {{stage_layers: 2, tokens: {batch_size * seq_len * bld_steps}, batch_size: {batch_size},
       checkpoint_every: {checkpoint_every}, eval_tokens: 256, calibration_tokens: 256}}
profile: {{scenarios: [{{name: cpu, batch_size: 2, input_len: 8, output_len: 8}}]}}
store: {{uri: "{store_uri}"}}
{extra}
"""


def small_run(tmp: Path, parent: Path, store_uri: str | None = None, run_id: str = "run-a",
              prepare: bool = True, **kw) -> str:
    """A run (config.yaml written), prepared unless ``prepare=False``; returns its URI."""
    text = config_text(tmp, parent, store_uri or f"file://{tmp}/runs", **kw)
    uri = create_run(load_config_text(text), text, run_id=run_id)
    if prepare:
        assert run_step("prepare", uri, {"id": "all"})
    return uri


def bld_unit(uri: str, uid: str = FFN_UNIT) -> dict:
    return next(u for u in open_store(uri).get_json("plan/bld.json") if u["id"] == uid)


def cli(*args: str, env: dict | None = None, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """``puzzle ARGS`` in a fresh process, as a pod or a local worker runs it."""
    return subprocess.run([sys.executable, "-m", "puzzle.cli", *args], env={**os.environ, **CHILD_ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout, check=False, **kw)


def library_of(uri: str) -> Library:
    store = open_store(uri)
    cfg = load_config_text(store.get_text("config.yaml"))
    return Library.for_run(store, cfg)


def block_weights(uri: str, variant: str = "ffn_m0.5") -> dict[str, torch.Tensor]:
    lib = library_of(uri)
    return {f"{layer}/{k}": t for layer in (0, 1) for k, t in lib.load_block(layer, variant).items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for k, want in a.items():
        torch.testing.assert_close(b[k], want, rtol=0, atol=1e-6, msg=k)


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (the local runner's workers), from /proc."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for c in (task / "children").read_text().split():
                out += [int(c), *_children(int(c))]
    return out


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the process this test started and its descendants, each by its id."""
    pids = [proc.pid, *_children(proc.pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _wait_for(pred, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc.poll() is not None:
            pytest.fail(f"process ended (status {proc.returncode}) before the awaited state:\n"
                        f"{proc.stderr.read()[-3000:] if proc.stderr else ''}")
        time.sleep(0.02)
    _kill_tree(proc)
    pytest.fail("timed out waiting for the awaited state")


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory) -> Path:
    return make_parent(tmp_path_factory.mktemp("parent"))


def reference_run(tmp: Path, parent: Path, bld_steps: int, units: tuple[str, ...] | None = None) -> str:
    """An uninterrupted run of the bld units (all, or ``units``): what every resumed run must equal."""
    uri = small_run(tmp, parent, bld_steps=bld_steps)
    for u in open_store(uri).get_json("plan/bld.json"):
        if units is None or u["id"] in units:
            assert run_step("bld", uri, u)
    return uri


@pytest.fixture(scope="module")
def reference(tmp_path_factory, parent_dir) -> str:
    return reference_run(tmp_path_factory.mktemp("reference"), parent_dir, 300)


# ----- SIGKILL mid-step -----------------------------------------------------------------------------
def test_local_run_killed_mid_bld_resumes_to_the_uninterrupted_result(tmp_path, parent_dir, reference):
    """`puzzle run` (prepare+bld) is SIGKILLed from outside once a bld checkpoint exists; `puzzle run
    --resume` redoes nothing that completed, resumes the unit from its checkpoint, and ends with the
    weights an uninterrupted run produced."""
    text = config_text(tmp_path, parent_dir, f"file://{tmp_path}/runs", bld_steps=300)
    cfg_file = tmp_path / "puzzle.yaml"
    cfg_file.write_text(text)
    uri = f"file://{tmp_path}/runs/killed"
    proc = subprocess.Popen([sys.executable, "-m", "puzzle.cli", "run", str(cfg_file), "--run-id", "killed",
                             "--steps", "prepare,bld", "--workers", "1"],
                            env={**os.environ, **CHILD_ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    runs = tmp_path / "runs"
    _wait_for(lambda: any(runs.glob("library/*/checkpoints/*/state.json")), proc)
    _kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL
    store = open_store(uri)
    lib = library_of(uri)
    assert store.exists(done_key("prepare", "all"))
    killed = [p.parent.name for p in runs.glob("library/*/checkpoints/*/state.json")]
    assert len(killed) == 1
    state = lib.checkpoints(killed[0]).get_json("state.json")
    assert 0 < state["step"] < state["total_steps"] == 300
    assert not store.exists(done_key("bld", killed[0]))
    prepared_at = store.get_json(done_key("prepare", "all"))["finished_at"]

    r = cli("run", "--resume", uri, "--steps", "prepare,bld", "--workers", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == uri
    assert store.get_json(done_key("prepare", "all"))["finished_at"] == prepared_at  # not redone
    for u in store.get_json("plan/bld.json"):
        assert store.exists(done_key("bld", u["id"]))
    assert lib.store.list("checkpoints") == []
    for variant in ("attn_g4", "ffn_m0.5"):
        assert_same_weights(block_weights(reference, variant), block_weights(uri, variant))
        for layer in (0, 1):
            ref, got = library_of(reference).meta(layer, variant), lib.meta(layer, variant)
            assert got["steps"] == 300 and got["final_nmse"] == pytest.approx(ref["final_nmse"], abs=1e-6)


INJECT_KILL = """
import os, signal, sys
from puzzle import store as S
seen = []
real = S.FileStore.put_file
def put_file(self, key, path):
    real(self, key, path)
    seen.append(key)
    if key.startswith("child/") and len(seen) == int(os.environ["KILL_AFTER_FILES"]):
        os.kill(os.getpid(), signal.SIGKILL)  # as a preempted pod: mid-upload, no cleanup
S.FileStore.put_file = put_file
from puzzle.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_assemble_killed_mid_save_is_redone_to_the_same_child(tmp_path):
    """assemble uploads the child file by file and writes complete.json last; killed after the first file,
    the retried unit removes the half child and writes one identical to an uninterrupted run's."""
    from test_assemble import make_run, unit

    ref = make_run(tmp_path / "ref")
    assert run_step("assemble", ref, unit(ref, "sol-0"))
    uri = make_run(tmp_path / "killed")
    store = open_store(uri)
    u = json.dumps(unit(uri, "sol-0"))
    proc = subprocess.run([sys.executable, "-c", INJECT_KILL, "step", "assemble", "--run", uri, "--unit", u],
                          env={**os.environ, **CHILD_ENV, "KILL_AFTER_FILES": "1"}, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    half = store.list("child/sol-0")
    assert len(half) == 1 and not store.exists("child/sol-0/complete.json")
    assert not store.exists(done_key("assemble", "sol-0"))

    r = cli("step", "assemble", "--run", uri, "--unit", u)
    assert r.returncode == 0, r.stderr[-3000:]
    ref_store = open_store(ref)
    assert store.list("child/sol-0") == ref_store.list("child/sol-0")
    got, want = store.get_json("child/sol-0/complete.json"), ref_store.get_json("child/sol-0/complete.json")
    assert got["files"] == want["files"]  # every file byte-identical (sha256 and size)
    assert store.exists(done_key("assemble", "sol-0"))


# ----- corruption -----------------------------------------------------------------------------------
def test_corrupted_artifact_is_detected_by_checksum_and_named(tmp_path, parent_dir):
    uri = small_run(tmp_path, parent_dir)
    store = open_store(uri)
    shard = next(k for k in store.list("data/distillation") if not k.endswith("manifest.json"))
    path = store.root / shard
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit pattern, same length: only the checksum can tell
    path.write_bytes(bytes(data))
    r = cli("step", "bld", "--run", uri, "--unit", json.dumps(bld_unit(uri)))
    assert r.returncode == 1, r.stderr[-3000:]
    assert f"step bld, unit {FFN_UNIT}" in r.stderr
    assert f"sha256 mismatch for key '{shard}'" in r.stderr
    assert "Traceback" not in r.stderr
    assert not store.exists(done_key("bld", FFN_UNIT))
    assert not library_of(uri).has(0, "ffn_m0.5")


# ----- disk full ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _tiny_tmpfs(path: Path, size: str = "64k"):
    path.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}; "
                    "the RLIMIT_FSIZE case covers disk-full")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def _no_core_and_fsize(limit: int):
    def pre() -> None:
        # exceeding RLIMIT_FSIZE raises SIGXFSZ, which would kill the process; ignored, the write
        # fails with EFBIG instead, as a full disk fails it with ENOSPC
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return pre


@pytest.mark.parametrize("how", ["tmpfs", "rlimit_fsize"])
def test_disk_full_names_the_step_and_unit_and_writes_no_result(tmp_path, parent_dir, how):
    """prepare writes token shards (about 27 KiB each split) into a store that cannot hold them."""
    if how == "tmpfs":
        cm = _tiny_tmpfs(tmp_path / "full", "12k")
        store_root = tmp_path / "full"
        preexec = None
    else:
        cm = contextlib.nullcontext()
        store_root = tmp_path / "store"
        preexec = _no_core_and_fsize(4096)  # every file above 4 KiB fails; the shards are 8 KiB
    with cm:
        uri = small_run(tmp_path, parent_dir, store_uri=f"file://{store_root}", prepare=False)
        r = cli("step", "prepare", "--run", uri, preexec_fn=preexec)
        assert r.returncode == 1, r.stderr[-3000:]
        code = "ENOSPC" if how == "tmpfs" else "EFBIG"
        assert "error: step prepare, unit all: no space left on device" in r.stderr, r.stderr[-3000:]
        assert f"({code}: {uri}/data/distillation/" in r.stderr
        assert "Traceback" not in r.stderr
        store = open_store(uri)
        trusted = [k for k in store.list() if k.startswith(("plan/", "done/")) or k.endswith("manifest.json")]
        assert trusted == [], "no plan, manifest or done marker a later step could take for a result"
        leftovers = [p.name for p in store_root.rglob("*") if p.is_file() and p.name.startswith(".puzzle-tmp")]
        assert leftovers == [], "a failed write leaves no temporary file behind"


# ----- out of memory --------------------------------------------------------------------------------
OOM_WRAPPER = """
import gc, os, resource, sys
import torch
torch.set_num_threads(1)
import puzzle.cli, puzzle.steps.bld, puzzle.model, safetensors.torch  # imported before the limit
gc.collect()
vm_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize:"))
limit = vm_kb * 1024 + int(os.environ["HEADROOM_BYTES"])
resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
sys.exit(puzzle.cli.main(sys.argv[1:]))
"""


def test_out_of_memory_names_the_step_and_unit(tmp_path, parent_dir):
    """bld with batches of 512 x 128 tokens (attention scores alone: 512 x 8 x 128 x 128 fp32 = 256 MiB) in a
    process whose address space (RLIMIT_AS) has 96 MiB left after its imports."""
    uri = small_run(tmp_path, parent_dir, batch_size=512, seq_len=128, bld_steps=2)
    store = open_store(uri)
    u = bld_unit(uri)
    r = subprocess.run([sys.executable, "-c", OOM_WRAPPER, "step", "bld", "--run", uri, "--unit", json.dumps(u)],
                       env={**os.environ, **CHILD_ENV, "HEADROOM_BYTES": str(96 * 2**20)}, capture_output=True,
                       text=True, timeout=300, check=False)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "error: step bld, unit bld.l000-002: out of memory" in r.stderr, r.stderr[-3000:]
    assert "lower the step's batch_size in the config (bld.batch_size)" in r.stderr
    assert "Traceback" not in r.stderr
    assert not store.exists(done_key("bld", u["id"]))
    assert not library_of(uri).has(0, "attn_g4")
