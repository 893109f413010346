"""The artifact store, the same tests over file:// and s3:// (a real SeaweedFS server).

No mocks: S3 tests talk to the ``s3_server`` fixture (tests/services.py); failure cases use a
closed port, wrong credentials, bytes tampered with behind the store's back, and a writer
process killed with SIGKILL in the middle of a write.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, ConnectionClosedError, EndpointConnectionError
from puzzle.config import StoreConfig
from puzzle.store import (
    ArtifactNotFoundError,
    CorruptArtifactError,
    FileStore,
    InvalidKeyError,
    RetryPolicy,
    S3Store,
    Store,
    StoreError,
    TransferSettings,
    is_transient,
    join_uri,
    open_store,
    validate_key,
)
from services import S3Bucket, closed_port_url

MiB = 2**20


@pytest.fixture(params=["file", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(kind, root URI) of an empty store root for each backend."""
    if request.param == "file":
        return "file", f"file://{tmp_path}/artifacts/run-1"
    bucket: S3Bucket = request.getfixturevalue("s3_bucket")
    return "s3", f"{bucket.uri}/runs/run-1"


@pytest.fixture
def store(backend: tuple[str, str]) -> Store:
    return open_store(backend[1])


def _tamper(store: Store, key: str, data: bytes) -> None:
    """Replace the stored bytes of ``key`` without going through the store (checksum kept)."""
    if isinstance(store, FileStore):
        store.root.joinpath(*key.split("/")).write_bytes(data)
    else:
        assert isinstance(store, S3Store)
        full = store.uri.removeprefix(f"s3://{store.bucket}/") + "/" + key
        head = store.client.head_object(Bucket=store.bucket, Key=full)
        store.client.put_object(Bucket=store.bucket, Key=full, Body=data, Metadata=head["Metadata"])


def test_round_trips(store: Store, tmp_path: Path) -> None:
    payload = os.urandom(300_000)
    store.put_bytes("library/0/ffn_mult-0.5/model.safetensors", payload)
    assert store.get_bytes("library/0/ffn_mult-0.5/model.safetensors") == payload

    store.put_text("notes/readme.txt", "Grüße, 世界\n")
    assert store.get_text("notes/readme.txt") == "Grüße, 世界\n"

    obj = {"layer": 3, "variant": {"n_heads_in_group": 4}, "scores": [0.5, 1.25]}
    store.put_json("scores/3/attn.json", obj)
    assert store.get_json("scores/3/attn.json") == obj

    src = tmp_path / "in.bin"
    src.write_bytes(payload[::-1])
    store.put_file("child/a/weights.bin", src)
    out = store.get_file("child/a/weights.bin", tmp_path / "deep" / "out.bin")
    assert out == tmp_path / "deep" / "out.bin"
    assert out.read_bytes() == payload[::-1]
    assert not [p for p in out.parent.iterdir() if p.name != "out.bin"], "download left temp files"

    store.put_bytes("empty", b"")
    assert store.get_bytes("empty") == b""

    store.put_bytes("notes/readme.txt", b"overwritten")
    assert store.get_bytes("notes/readme.txt") == b"overwritten"


def test_missing_keys_and_delete(store: Store, tmp_path: Path) -> None:
    assert not store.exists("plan/bld.json")
    with pytest.raises(ArtifactNotFoundError, match="plan/bld.json") as err:
        store.get_bytes("plan/bld.json")
    assert isinstance(err.value, KeyError)
    with pytest.raises(KeyError):
        store.get_json("plan/bld.json")
    with pytest.raises(ArtifactNotFoundError, match="plan/bld.json"):
        store.get_file("plan/bld.json", tmp_path / "x")
    assert not (tmp_path / "x").exists()

    store.put_json("plan/bld.json", [1, 2])
    assert store.exists("plan/bld.json")
    store.delete("plan/bld.json")
    assert not store.exists("plan/bld.json")
    assert store.list() == []
    store.delete("plan/bld.json")  # deleting twice is fine: retried pods do it


def test_get_json_rejects_non_json(store: Store) -> None:
    store.put_bytes("x.json", b"{not json")
    with pytest.raises(StoreError, match="x.json.*not valid JSON"):
        store.get_json("x.json")


def test_list_is_recursive_sorted_and_segment_wise(store: Store) -> None:
    keys = ["b/2", "a/1", "a/b/c/d.json", "ab/x", "a", "z"]
    for k in keys:
        if k == "a":
            continue  # "a" cannot be both an object and a prefix on a filesystem
        store.put_bytes(k, k.encode())
    expected = sorted(k for k in keys if k != "a")
    assert store.list() == expected
    assert store.list("a") == ["a/1", "a/b/c/d.json"]  # not "ab/x"
    assert store.list("a/b") == ["a/b/c/d.json"]
    assert store.list("a/1") == ["a/1"]
    assert store.list("nothing/here") == []


def test_list_hides_bookkeeping(store: Store) -> None:
    store.put_bytes("d/obj", b"1")
    if isinstance(store, FileStore):
        names = sorted(p.name for p in (store.root / "d").iterdir())
        assert names == [".puzzle-sha256.obj", "obj"]  # the sidecar is really there ...
    assert store.list() == ["d/obj"]  # ... and never listed


def test_child_stores(store: Store, backend: tuple[str, str]) -> None:
    child = store.child("library/3")
    assert child.uri == backend[1] + "/library/3"
    child.put_json("attn/meta.json", {"ok": True})
    assert store.get_json("library/3/attn/meta.json") == {"ok": True}
    assert child.list() == ["attn/meta.json"]
    grandchild = child.child("attn")
    assert grandchild.get_json("meta.json") == {"ok": True}
    store.put_bytes("library/4/x", b"x")
    assert child.list() == ["attn/meta.json"]
    assert open_store(child.uri).get_json("attn/meta.json") == {"ok": True}
    with pytest.raises(InvalidKeyError):
        store.child("../escape")


def test_upload_and_download_dir(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "model"
    (src / "sub" / "deeper").mkdir(parents=True)
    files = {
        "config.json": b'{"model_type": "nemotron-nas"}',
        "model.safetensors": os.urandom(70_000),
        "sub/a.txt": b"a",
        "sub/deeper/b.bin": os.urandom(10),
    }
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    written = store.upload_dir("child/sol-0", src)
    assert written == sorted(f"child/sol-0/{rel}" for rel in files)
    assert store.list("child/sol-0") == written

    dst = tmp_path / "copy"
    paths = store.download_dir("child/sol-0", dst)
    assert sorted(p.relative_to(dst).as_posix() for p in paths) == sorted(files)
    for rel, data in files.items():
        assert (dst / rel).read_bytes() == data

    with pytest.raises(StoreError, match="not a directory"):
        store.upload_dir("x", tmp_path / "missing")


BAD_KEYS = [
    ("../etc/passwd", "'..'"),
    ("a/../../b", "'..'"),
    ("a/./b", "'.'"),
    ("/abs/key", "absolute"),
    ("a//b", "empty segments"),
    ("a/b/", "empty segments"),
    ("a\\b", "backslashes"),
    ("a\nb", "control characters"),
    ("a\x00b", "control characters"),
    ("", "must not be empty"),
    ("a/.puzzle-sha256.b", "reserved"),
]


@pytest.mark.parametrize(("key", "rule"), BAD_KEYS)
def test_invalid_keys_are_rejected(store: Store, key: str, rule: str, tmp_path: Path) -> None:
    for op in (
        lambda: store.put_bytes(key, b"x"),
        lambda: store.get_bytes(key),
        lambda: store.exists(key),
        lambda: store.delete(key),
        lambda: store.put_file(key, __file__),
    ):
        with pytest.raises(InvalidKeyError, match=rule) as err:
            op()
        assert repr(key) in str(err.value)
    assert store.list() == []
    assert not list(tmp_path.rglob("passwd"))


def test_validate_key_accepts_ordinary_keys() -> None:
    for key in ("a", "library/0/ffn_mult-0.5/model.safetensors", "x.y/z-1_2", ".hidden", "a b/c"):
        assert validate_key(key) == key


def test_corruption_is_detected(store: Store, tmp_path: Path) -> None:
    store.put_bytes("library/0/attn/model.safetensors", b"A" * 1000)
    _tamper(store, "library/0/attn/model.safetensors", b"A" * 999 + b"B")
    with pytest.raises(CorruptArtifactError, match="library/0/attn/model.safetensors.*sha256 mismatch"):
        store.get_bytes("library/0/attn/model.safetensors")
    with pytest.raises(CorruptArtifactError, match="library/0/attn/model.safetensors"):
        store.get_file("library/0/attn/model.safetensors", tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists(), "a corrupt download must not land at the destination"


def test_multipart_upload_with_small_threshold(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    # S3 parts are at least 5 MiB, so 11 MiB at a 5 MiB chunk size is three parts.
    settings = TransferSettings(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=2)
    store = open_store(f"{s3_bucket.uri}/mp", transfer=settings)
    data = os.urandom(11 * MiB)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    store.put_file("shard-00001.safetensors", src)
    store.put_bytes("shard-00002.safetensors", data)
    for key in ("shard-00001.safetensors", "shard-00002.safetensors"):
        head = store.client.head_object(Bucket=s3_bucket.name, Key=f"mp/{key}")
        assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # multipart ETags end in -<parts>
        assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
        out = store.get_file(key, tmp_path / key)
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert store.get_bytes("shard-00002.safetensors") == data


_SLOW_WRITER = textwrap.dedent(
    """
    import json, sys
    from puzzle.store import TransferSettings, open_store
    store = open_store(sys.argv[1], transfer=TransferSettings(**json.loads(sys.argv[3])))
    store.put_file("big/obj.bin", sys.argv[2])
    """
)


def test_killed_writer_leaves_nothing_visible(backend: tuple[str, str], tmp_path: Path) -> None:
    kind, uri = backend
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    if kind == "file":
        # The writer copies from a FIFO we feed by hand, so it is surely mid-write when killed.
        src = tmp_path / "feed.fifo"
        os.mkfifo(src)
        proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, uri, str(src), "{}"], env=env)
        try:
            fd = os.open(src, os.O_WRONLY)  # blocks until the writer opened it
            os.write(fd, os.urandom(2 * MiB))
            root = open_store(uri)
            assert isinstance(root, FileStore)
            _poll(lambda: any(p.stat().st_size > 0 for p in (root.root / "big").glob(".puzzle-tmp.*")))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            os.close(fd)
        finally:
            _reap(proc)
        leftovers = [p.name for p in (root.root / "big").iterdir()]
        assert leftovers and all(n.startswith(".puzzle-tmp.") for n in leftovers), leftovers
    else:
        # Throttled multipart upload; killed once the server holds an upload in progress.
        src = tmp_path / "big.bin"
        src.write_bytes(os.urandom(16 * MiB))
        settings = {
            "multipart_threshold": 5 * MiB,
            "multipart_chunksize": 5 * MiB,
            "max_concurrency": 1,
            "max_bandwidth": 2 * MiB,
        }
        root = open_store(uri)
        assert isinstance(root, S3Store)
        proc = subprocess.Popen(
            [sys.executable, "-c", _SLOW_WRITER, uri, str(src), json.dumps(settings)], env=env
        )
        try:
            _poll(lambda: bool(root.client.list_multipart_uploads(Bucket=root.bucket).get("Uploads")))
            time.sleep(0.5)  # let part bytes flow, so the kill lands inside a part upload
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            _reap(proc)
        assert proc.returncode == -signal.SIGKILL
    store = open_store(uri)
    assert not store.exists("big/obj.bin")
    assert store.list() == []
    with pytest.raises(ArtifactNotFoundError):
        store.get_bytes("big/obj.bin")
    # A retried writer then publishes normally over the debris.
    store.put_bytes("big/obj.bin", b"complete")
    assert store.list() == ["big/obj.bin"]
    assert store.get_bytes("big/obj.bin") == b"complete"


def _poll(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def _reap(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _count_requests(store: S3Store) -> list[str]:
    sent: list[str] = []
    store.client.meta.events.register("before-send.s3", lambda request, **_: sent.append(request.url))
    return sent


def test_retries_with_backoff_then_store_error(s3_bucket: S3Bucket) -> None:
    policy = RetryPolicy(attempts=3, base_delay_s=0.2)
    store = open_store(
        "s3://some-bucket/runs/r1",
        StoreConfig(uri="s3://some-bucket", endpoint_url=closed_port_url()),
        retry=policy,
    )
    assert isinstance(store, S3Store)
    sent = _count_requests(store)
    t0 = time.monotonic()
    with pytest.raises(StoreError, match=r"s3://some-bucket/runs/r1/plan/bld.json.*after 3 attempts") as err:
        store.get_bytes("plan/bld.json")
    elapsed = time.monotonic() - t0
    assert "Could not connect" in str(err.value)
    assert len(sent) == 3
    # Equal jitter waits at least half of base*2**(n-1) after attempts 1 and 2: 0.1 + 0.2 s.
    assert elapsed >= 0.3
    with pytest.raises(StoreError, match="after 3 attempts"):
        store.put_bytes("x", b"1")


def test_bad_credentials_fail_at_once(s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    open_store(s3_bucket.uri).put_bytes("k", b"v")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = open_store(s3_bucket.uri, retry=RetryPolicy(attempts=5, base_delay_s=1.0))
    assert isinstance(store, S3Store)
    sent = _count_requests(store)
    with pytest.raises(StoreError, match="credentials were refused.*SignatureDoesNotMatch") as err:
        store.get_bytes("k")
    assert f"{s3_bucket.uri}/k" in str(err.value)
    assert len(sent) == 1, "refused credentials must not be retried"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "no-such-key")
    with pytest.raises(StoreError, match="credentials were refused.*InvalidAccessKeyId"):
        open_store(s3_bucket.uri).put_bytes("k2", b"v")
    with pytest.raises(StoreError, match="credentials were refused or lack permission"):
        open_store(s3_bucket.uri).exists("k")  # HEAD: a bare 403 without an error code


def test_no_credentials_at_all(s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StoreError, match="no S3 credentials found.*AWS_ACCESS_KEY_ID"):
        open_store(s3_bucket.uri).get_bytes("k")


def test_missing_bucket_is_named(s3_bucket: S3Bucket) -> None:
    store = open_store("s3://no-such-bucket-here/run")
    with pytest.raises(StoreError, match="bucket 'no-such-bucket-here' does not exist"):
        store.put_bytes("k", b"v")


def test_is_transient_classifies_real_botocore_errors() -> None:
    def client_error(code: str, status: int) -> ClientError:
        return ClientError(
            {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
            "GetObject",
        )

    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient(ConnectionClosedError(endpoint_url="http://127.0.0.1:1"))
    assert is_transient(client_error("InternalError", 500))
    assert is_transient(client_error("ServiceUnavailable", 503))
    assert is_transient(client_error("SlowDown", 503))
    assert is_transient(client_error("Throttling", 400))
    assert not is_transient(client_error("NoSuchKey", 404))
    assert not is_transient(client_error("SignatureDoesNotMatch", 403))
    assert not is_transient(ValueError("bug"))


def test_retry_policy_delays_grow_and_cap() -> None:
    p = RetryPolicy(attempts=10, base_delay_s=1.0, max_delay_s=4.0)
    for attempt, full in ((1, 1.0), (2, 2.0), (3, 4.0), (6, 4.0)):
        d = p.delay(attempt)
        assert full / 2 <= d <= full
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy(attempts=0)


def test_open_store_uris(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rel = open_store("file://./runs/tiny-20261126-1a2b")
    rel.put_bytes("plan/x.json", b"{}")
    assert (tmp_path / "runs/tiny-20261126-1a2b/plan/x.json").read_bytes() == b"{}"
    assert rel.uri == "file://./runs/tiny-20261126-1a2b"
    monkeypatch.chdir("/")  # resolved at open time, not per call
    assert rel.get_bytes("plan/x.json") == b"{}"
    absolute = open_store(f"file://{tmp_path}/runs/tiny-20261126-1a2b/")
    assert absolute.get_bytes("plan/x.json") == b"{}"

    for bad, match in (
        ("gs://bucket/x", "unknown scheme"),
        ("runs/x", "unknown scheme"),
        ("file://", "no path"),
        ("s3://UPPER/x", "not a valid S3 bucket name"),
        ("s3://b/x", "not a valid S3 bucket name"),
        ("s3://bucket/a/../b", "'..'"),
    ):
        with pytest.raises(InvalidKeyError, match=match) as err:
            open_store(bad)
        assert repr(bad) in str(err.value) or "'..'" in match


def test_join_uri() -> None:
    assert join_uri("s3://b/runs", "tiny-1", "plan/bld.json") == "s3://b/runs/tiny-1/plan/bld.json"
    assert join_uri("file://./runs/", "r") == "file://./runs/r"
    assert join_uri("s3://b") == "s3://b"
    with pytest.raises(InvalidKeyError, match="'..'"):
        join_uri("s3://b", "../c")


# ----- symbolic links in a file store (issue #16) -------------------------------------------------------
# The file store follows no link below its root: a key whose path, or a directory above it, is a link is
# refused as bad input (exit 2) naming the key, the link and where it points, for reads and writes alike.
# A root given through a link works (it is resolved once, when the store is opened).
def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (not following links) with its bytes: what "nothing changed" compares."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _refused(op, key: str | None, link: Path, target: Path) -> InvalidKeyError:
    """``op()`` raises bad input naming ``key`` (unless None), the link and where it points."""
    with pytest.raises(InvalidKeyError) as err:
        op()
    msg = str(err.value)
    assert (key is None or repr(key) in msg) and str(link) in msg and str(target) in msg, msg
    assert "symbolic link" in msg and "outside the store root" in msg, msg
    from puzzle.errors import exit_code

    assert exit_code(err.value) == 2, "a link in the run folder is bad input: never retried"
    return err.value


@pytest.fixture
def linked(tmp_path: Path) -> tuple[FileStore, Path, Path]:
    """A run store whose ``data`` directory is a link to a folder outside it that holds a valid object
    (so that following the link would succeed), and whose ``plan`` directory is a link to an empty folder."""
    outside = tmp_path / "outside"
    open_store(f"file://{outside}").put_bytes("secret.bin", b"not the run's")
    empty = tmp_path / "outside-empty"
    empty.mkdir()
    store = open_store(f"file://{tmp_path}/runs/run-1")
    assert isinstance(store, FileStore)
    store.put_text("config.yaml", "name: t\n")
    (store.root / "data").symlink_to(outside, target_is_directory=True)
    (store.root / "plan").symlink_to(empty, target_is_directory=True)
    return store, outside, empty


LINKED_OPS = {
    "put_bytes": ("plan/bld.json", lambda s, t: s.put_bytes("plan/bld.json", b"[]")),
    "put_bytes_deep": ("plan/sub/bld.json", lambda s, t: s.put_json("plan/sub/bld.json", [])),
    "put_over_outside": ("data/secret.bin", lambda s, t: s.put_bytes("data/secret.bin", b"overwritten")),
    "put_file": ("plan/x.bin", lambda s, t: s.put_file("plan/x.bin", __file__)),
    "get_bytes": ("data/secret.bin", lambda s, t: s.get_bytes("data/secret.bin")),
    "get_file": ("data/secret.bin", lambda s, t: s.get_file("data/secret.bin", t / "dst" / "secret.bin")),
    "exists": ("data/secret.bin", lambda s, t: s.exists("data/secret.bin")),
    "list_prefix": ("data", lambda s, t: s.list("data")),
    "list_below": ("data/x", lambda s, t: s.list("data/x")),
    "delete": ("data/secret.bin", lambda s, t: s.delete("data/secret.bin")),
    "child": ("data", lambda s, t: s.child("data")),
    "child_below": ("plan/sub", lambda s, t: s.child("plan/sub")),
    "upload_dir": ("plan/model/a.txt", lambda s, t: s.upload_dir("plan/model", _local_dir(t))),
    "download_dir": ("data", lambda s, t: s.download_dir("data", t / "dst")),
}


def _local_dir(tmp: Path) -> Path:
    src = tmp / "local-model"
    src.mkdir(exist_ok=True)
    (src / "a.txt").write_text("a")
    return src


@pytest.mark.parametrize("op", list(LINKED_OPS))
def test_file_store_refuses_keys_through_a_linked_directory(linked, tmp_path: Path, op: str) -> None:
    store, outside, empty = linked
    key, call = LINKED_OPS[op]
    before = _snapshot(outside)
    link, target = (store.root / "data", outside) if key.startswith("data") else (store.root / "plan", empty)
    _refused(lambda: call(store, tmp_path), key, link, target)
    assert _snapshot(outside) == before and (outside / "secret.bin").read_bytes() == b"not the run's"
    assert list(empty.iterdir()) == [], "written outside the store through the link"
    assert not (tmp_path / "dst" / "secret.bin").exists(), "read from outside the store through the link"


def test_file_store_lists_refuse_a_link_anywhere_below(linked) -> None:
    store, outside, _ = linked
    _refused(store.list, "data", store.root / "data", outside)  # from the root: the walk meets the link
    store.put_bytes("library/0/x", b"x")
    assert store.child("library").list() == ["0/x"]  # parts of the tree without links still work


def test_file_store_child_opened_before_the_link_was_planted_is_refused_too(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    store = open_store(f"file://{tmp_path}/run")
    child = store.child("library/0")  # its folder does not exist yet
    store.put_bytes("library/keep", b"k")
    (store.root / "library" / "0").symlink_to(outside, target_is_directory=True)
    for key, op in (("attn/model.safetensors", lambda: child.put_bytes("attn/model.safetensors", b"w")),
                    ("attn/model.safetensors", lambda: child.exists("attn/model.safetensors")),
                    (None, child.list)):
        err = _refused(op, key, store.root / "library" / "0", outside)
        assert child.uri in str(err)
    assert list(outside.iterdir()) == []


def test_file_store_refuses_a_linked_file(tmp_path: Path) -> None:
    """An object whose data file is a link to a file outside, with a sidecar matching that file's bytes."""
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"secret")
    store = open_store(f"file://{tmp_path}/run")
    assert isinstance(store, FileStore)
    store.put_bytes("plan/bld.json", b"secret")  # a genuine sidecar for these bytes ...
    (store.root / "plan" / "bld.json").unlink()
    (store.root / "plan" / "bld.json").symlink_to(outside)  # ... and the data replaced by a link
    link = store.root / "plan" / "bld.json"
    for op in (lambda: store.get_bytes("plan/bld.json"), lambda: store.get_file("plan/bld.json", tmp_path / "o"),
               lambda: store.exists("plan/bld.json"), lambda: store.list("plan"),
               lambda: store.put_bytes("plan/bld.json", b"new"), lambda: store.delete("plan/bld.json")):
        _refused(op, "plan/bld.json", link, outside)
    assert outside.read_bytes() == b"secret" and not (tmp_path / "o").exists()


def test_file_store_refuses_a_planted_sidecar(tmp_path: Path) -> None:
    """The checksum sidecar is a link to a file outside that holds the sha256 of tampered bytes: following
    it would make the tampered object pass verification."""
    store = open_store(f"file://{tmp_path}/run")
    assert isinstance(store, FileStore)
    store.put_bytes("plan/bld.json", b"[1]")
    (store.root / "plan" / "bld.json").write_bytes(b"[2]")
    forged = tmp_path / "forged-sha"
    forged.write_text(hashlib.sha256(b"[2]").hexdigest() + "\n")
    sidecar = store.root / "plan" / ".puzzle-sha256.bld.json"
    sidecar.unlink()
    sidecar.symlink_to(forged)
    for op in (lambda: store.get_bytes("plan/bld.json"), lambda: store.get_file("plan/bld.json", tmp_path / "o"),
               lambda: store.exists("plan/bld.json"), lambda: store.list(), lambda: store.list("plan/bld.json"),
               lambda: store.put_bytes("plan/bld.json", b"[3]")):
        _refused(op, "plan/bld.json", sidecar, forged)
    assert forged.read_text().strip() == hashlib.sha256(b"[2]").hexdigest()


def test_file_store_refuses_links_that_stay_inside_the_root(tmp_path: Path) -> None:
    """Refusing every link (not only those leading out) is the documented choice: the store never creates one."""
    store = open_store(f"file://{tmp_path}/run")
    assert isinstance(store, FileStore)
    store.put_bytes("real/x", b"x")
    (store.root / "alias").symlink_to(store.root / "real", target_is_directory=True)
    with pytest.raises(InvalidKeyError, match=r"'alias/x'.*symbolic link.*inside the store root"):
        store.get_bytes("alias/x")
    with pytest.raises(InvalidKeyError, match="'alias'"):
        store.list()


@pytest.mark.parametrize("where", ["parent", "run"])
def test_file_store_root_given_through_a_link_works(tmp_path: Path, where: str) -> None:
    """``/tmp -> /private/tmp`` and mounted aliases: a root reached through a link is resolved once, at open."""
    real = tmp_path / "real"
    real.mkdir()
    if where == "parent":  # a directory above the root is a link
        (tmp_path / "alias").symlink_to(real, target_is_directory=True)
        uri, real_root = f"file://{tmp_path}/alias/run-1", real / "run-1"
    else:  # the run folder itself is a link
        (real / "run-1").mkdir()
        (tmp_path / "run-link").symlink_to(real / "run-1", target_is_directory=True)
        uri, real_root = f"file://{tmp_path}/run-link", real / "run-1"
    store = open_store(uri)
    assert isinstance(store, FileStore) and store.root == real_root.resolve() and store.uri == uri
    store.put_json("plan/bld.json", [1])
    store.put_file("library/0/attn/w.bin", __file__)
    assert store.get_json("plan/bld.json") == [1] and store.exists("library/0/attn/w.bin")
    assert store.list() == ["library/0/attn/w.bin", "plan/bld.json"]
    assert store.child("library/0").list() == ["attn/w.bin"]
    assert store.upload_dir("child/sol-0", _local_dir(tmp_path)) == ["child/sol-0/a.txt"]
    assert [p.name for p in store.download_dir("child", tmp_path / "dst")] == ["a.txt"]
    store.delete("plan/bld.json")
    assert not store.exists("plan/bld.json")
    assert (real_root / "library/0/attn/w.bin").read_bytes() == Path(__file__).read_bytes()


def test_file_store_rechecks_links_before_publishing(tmp_path: Path) -> None:
    """A link swapped in while a write is under way (the directory moved away, a link put in its place) is
    caught before the object is published, and nothing lands outside. The writer copies from a FIFO that
    this test feeds, so the swap surely happens mid-write."""
    import threading

    outside = tmp_path / "outside"
    outside.mkdir()
    store = open_store(f"file://{tmp_path}/run")
    assert isinstance(store, FileStore)
    store.put_bytes("data/old", b"o")
    fifo = tmp_path / "feed.fifo"
    os.mkfifo(fifo)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            store.put_file("data/shard.bin", fifo)
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            errors.append(err)

    writer = threading.Thread(target=write)
    writer.start()
    deadline = time.monotonic() + 30
    while True:  # the FIFO opens for writing once the writer opened it to read (its temp file exists then)
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as err:  # ENXIO: no reader yet
            assert writer.is_alive() and time.monotonic() < deadline, (errors, err)
            time.sleep(0.02)
    try:
        os.write(fd, b"first half ")
        (store.root / "data").rename(store.root / "data-moved")
        (store.root / "data").symlink_to(outside, target_is_directory=True)
        os.write(fd, b"second half")
    finally:
        os.close(fd)
        writer.join(timeout=30)
    assert len(errors) == 1 and isinstance(errors[0], InvalidKeyError), errors
    assert "'data/shard.bin'" in str(errors[0]) and str(store.root / "data") in str(errors[0])
    assert list(outside.iterdir()) == []
