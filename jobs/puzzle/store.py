"""The artifact store: one interface over ``file://`` and ``s3://`` roots.

Every step reads and writes its artifacts through a :class:`Store` rooted at the run
(``<store>/<run-id>``); keys are ``/``-separated paths relative to that root. Both backends give
the same guarantees, so a retried pod never reads half an artifact:

* a write becomes visible only when complete (file: a temporary file in the same directory, then
  ``os.replace``; S3: see :class:`S3Store` for why no temporary key is needed);
* the sha256 of every object is recorded with it (file: a hidden sidecar; S3: object metadata)
  and verified on every read: a mismatch raises :class:`CorruptArtifactError` naming the key;
* transient S3 errors (connection refused/reset, 5xx, throttling) are retried with exponential
  backoff, then raise :class:`StoreError` naming the URI, the key and the last error; refused
  credentials fail at once with a message saying so.

Open a store with :func:`open_store`; S3 endpoint and credentials come from the standard AWS
variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``,
profiles, IRSA) or, for endpoint and region, from :class:`puzzle.config.StoreConfig`.
"""

from __future__ import annotations

import abc
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from puzzle.config import StoreConfig
from puzzle.errors import BadInputError, TransientError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Segments starting with this are the store's own bookkeeping (temporary files, checksum
# sidecars) and never user keys, so list() can hide them without ambiguity.
RESERVED_PREFIX = ".puzzle-"
_TMP_PREFIX = RESERVED_PREFIX + "tmp."
_SHA_PREFIX = RESERVED_PREFIX + "sha256."
_CHUNK = 1 << 20  # bytes per read when hashing or copying files
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SHA_META = "sha256"  # S3 user metadata key (sent as x-amz-meta-sha256)


class StoreError(TransientError):
    """Any artifact-store failure; the message names the store URI and the key. Exit 1 (retried)
    unless it is also bad input (an invalid key, refused credentials)."""


class InvalidKeyError(StoreError, BadInputError):
    """A key (or URI) breaks a naming rule; the message names the key and the rule (bad input)."""


class CredentialsError(StoreError, BadInputError):
    """The S3 credentials are missing, refused or lack permission: retrying cannot help (bad input)."""


class CorruptArtifactError(StoreError):
    """The bytes read do not match the sha256 recorded when the object was written."""


class ArtifactNotFoundError(StoreError, KeyError):
    """No (complete) object under this key. A KeyError, so ``except KeyError`` also works."""

    def __str__(self) -> str:  # KeyError would show the repr of the message
        return str(self.args[0]) if self.args else ""


# config.py holds the defaults; these dataclasses only carry them.
_DEFAULTS = StoreConfig()


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for transient errors: attempt n waits about base*2**(n-1), capped."""

    attempts: int = _DEFAULTS.retry_attempts
    base_delay_s: float = _DEFAULTS.retry_base_delay_s
    max_delay_s: float = _DEFAULTS.retry_max_delay_s

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts: value {self.attempts} is not allowed; must be >= 1")
        if self.base_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError("base_delay_s and max_delay_s must be >= 0")

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based): equal jitter, so at least half."""
        d = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        return d / 2 + random.uniform(0, d / 2)


@dataclass(frozen=True)
class TransferSettings:
    """S3 transfer tuning. Objects above ``multipart_threshold`` bytes go by multipart upload."""

    multipart_threshold: int = _DEFAULTS.multipart_threshold_bytes
    multipart_chunksize: int = _DEFAULTS.multipart_chunksize_bytes  # S3 clamps parts to >= 5 MiB (except the last)
    max_concurrency: int = 8
    max_bandwidth: int | None = None  # bytes/s per transfer; None: unlimited


def validate_key(key: str, *, allow_empty: bool = False) -> str:
    """Return ``key`` if it is a safe relative key, else raise :class:`InvalidKeyError`."""
    if not isinstance(key, str):
        raise InvalidKeyError(f"key {key!r}: must be a string, got {type(key).__name__}")
    if key == "":
        if allow_empty:
            return key
        raise InvalidKeyError("key '': must not be empty")
    rules = (
        (_CONTROL.search(key) is not None, "control characters are not allowed"),
        ("\\" in key, "backslashes are not allowed; use '/' between segments"),
        (key.startswith("/"), "absolute keys are not allowed; keys are relative to the store root"),
    )
    for broken, rule in rules:
        if broken:
            raise InvalidKeyError(f"key {key!r}: {rule}")
    for seg in key.split("/"):
        if seg == "":
            raise InvalidKeyError(f"key {key!r}: empty segments ('//' or a trailing '/') are not allowed")
        if seg in (".", ".."):
            raise InvalidKeyError(f"key {key!r}: '.' and '..' segments are not allowed")
        if seg.startswith(RESERVED_PREFIX):
            raise InvalidKeyError(
                f"key {key!r}: segments starting with {RESERVED_PREFIX!r} are reserved for the store's "
                "temporary and checksum files"
            )
    return key


def _join_keys(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def join_uri(base: str, *parts: str) -> str:
    """``join_uri("s3://b/runs", "tiny-1", "plan/bld.json") == "s3://b/runs/tiny-1/plan/bld.json"``."""
    for p in parts:
        validate_key(p)
    return "/".join([base.rstrip("/"), *parts]) if parts else base


def file_sha256(path: Path) -> str:
    """sha256 of a local file, read in chunks (the digest the store records with every object)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class Store(abc.ABC):
    """A store rooted at ``uri``. Keys are relative to the root; see the module docstring."""

    def __init__(self, uri: str) -> None:
        self._uri = uri

    @property
    def uri(self) -> str:
        return self._uri

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._uri!r})"

    # --- backend primitives -------------------------------------------------------------
    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Write ``data`` under ``key``; visible only once complete."""

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Read ``key``, verified against its recorded sha256."""

    @abc.abstractmethod
    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        """Write the local file ``path`` under ``key``; visible only once complete."""

    @abc.abstractmethod
    def get_file(self, key: str, path: str | os.PathLike[str]) -> Path:
        """Read ``key`` into the local file ``path`` (replaced atomically, verified); returns it."""

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """True if a complete object exists under ``key``."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys under ``prefix`` (whole segments: "a/b" matches "a/b" and "a/b/...", not "a/bc")."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; deleting a missing key is not an error (retried pods delete twice)."""

    @abc.abstractmethod
    def child(self, prefix: str) -> Store:
        """The store rooted at ``<uri>/<prefix>``; keys of the child are relative to it."""

    # --- conveniences shared by both backends ---------------------------------------------
    def put_text(self, key: str, text: str) -> None:
        self.put_bytes(key, text.encode("utf-8"))

    def get_text(self, key: str) -> str:
        return self.get_bytes(key).decode("utf-8")

    def put_json(self, key: str, obj: Any) -> None:
        self.put_text(key, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")

    def get_json(self, key: str) -> Any:
        try:
            return json.loads(self.get_text(key))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StoreError(f"{self._where(key)}: not valid JSON: {err}") from None

    def upload_dir(self, prefix: str, local_dir: str | os.PathLike[str]) -> list[str]:
        """Put every file under ``local_dir`` at ``prefix/<relative path>``; returns the keys written."""
        validate_key(prefix, allow_empty=True)
        root = Path(local_dir)
        if not root.is_dir():
            raise StoreError(f"upload_dir: {str(root)!r} is not a directory")
        keys = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            key = _join_keys(prefix, path.relative_to(root).as_posix())
            self.put_file(key, path)
            keys.append(key)
        return keys

    def download_dir(self, prefix: str, local_dir: str | os.PathLike[str]) -> list[Path]:
        """Get every key under ``prefix`` into ``local_dir/<key minus prefix>``; returns the paths."""
        validate_key(prefix, allow_empty=True)
        root = Path(local_dir)
        root.mkdir(parents=True, exist_ok=True)
        out = []
        for key in self.list(prefix):
            rel = key[len(prefix) :].lstrip("/") if prefix else key
            if not rel:  # prefix named a single object: keep its file name
                rel = key.rsplit("/", 1)[-1]
            out.append(self.get_file(key, root / rel))
        return out

    def _where(self, key: str) -> str:
        return f"{join_uri(self._uri, key) if key else self._uri}"


# ------------------------------------------------------------------------------------------
# file://
# ------------------------------------------------------------------------------------------
class FileStore(Store):
    """A directory tree. Each object ``a/b`` has a sidecar ``a/.puzzle-sha256.b`` holding its sha256.

    The sidecar is the commit marker: it is written last, so an object whose writer was killed
    between the data and the sidecar stays invisible (exists/list/get ignore it). Overwriting
    removes the old sidecar first, so a torn overwrite reads as "not found", never as old
    checksum with new bytes.
    """

    def __init__(self, uri: str, root: Path) -> None:
        super().__init__(uri)
        self._root = root

    @property
    def root(self) -> Path:
        """The local directory behind this store (for tools that need a real path)."""
        return self._root

    def _path(self, key: str) -> Path:
        return self._root.joinpath(*validate_key(key).split("/"))

    @staticmethod
    def _sidecar(path: Path) -> Path:
        return path.with_name(_SHA_PREFIX + path.name)

    def _publish(self, key: str, write: Callable[[Any], None]) -> None:
        """Write via ``write(fileobj)`` to a temp file in the target dir, then replace atomically."""
        path = self._path(key)
        sidecar = self._sidecar(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                raise StoreError(f"{self._where(key)}: a directory of keys already exists here")
            tag = f"{os.getpid()}.{uuid.uuid4().hex[:12]}"
            tmp = path.with_name(f"{_TMP_PREFIX}{tag}.{path.name}")
            tmp_sha = path.with_name(f"{_TMP_PREFIX}{tag}.sha256.{path.name}")
            try:
                with open(tmp, "wb") as f:
                    hashing = _HashingWriter(f)
                    write(hashing)
                    f.flush()
                    os.fsync(f.fileno())
                tmp_sha.write_text(hashing.hexdigest() + "\n", encoding="ascii")
                sidecar.unlink(missing_ok=True)
                os.replace(tmp, path)
                os.replace(tmp_sha, sidecar)
            finally:
                tmp.unlink(missing_ok=True)
                tmp_sha.unlink(missing_ok=True)
        except StoreError:
            raise
        except OSError as err:
            raise StoreError(f"{self._where(key)}: write failed: {err}") from err

    def put_bytes(self, key: str, data: bytes) -> None:
        self._publish(key, lambda f: f.write(data))

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        src = Path(path)

        def copy(f: Any) -> None:
            with open(src, "rb") as s:
                shutil.copyfileobj(s, f, _CHUNK)

        if not src.exists():
            raise StoreError(f"{self._where(key)}: local file {str(src)!r} does not exist")
        self._publish(key, copy)

    def _expected_sha(self, key: str, path: Path) -> str:
        try:
            return self._sidecar(path).read_text(encoding="ascii").strip()
        except FileNotFoundError:
            raise ArtifactNotFoundError(f"{self._where(key)}: no such artifact") from None

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        expected = self._expected_sha(key, path)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise ArtifactNotFoundError(f"{self._where(key)}: no such artifact") from None
        except OSError as err:
            raise StoreError(f"{self._where(key)}: read failed: {err}") from err
        _verify(self._where(key), key, expected, hashlib.sha256(data).hexdigest())
        return data

    def get_file(self, key: str, path: str | os.PathLike[str]) -> Path:
        src = self._path(key)
        expected = self._expected_sha(key, src)
        dst = Path(path)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f"{_TMP_PREFIX}{uuid.uuid4().hex[:12]}.{dst.name}")
        try:
            h = hashlib.sha256()
            with open(src, "rb") as s, open(tmp, "wb") as d:
                while chunk := s.read(_CHUNK):
                    h.update(chunk)
                    d.write(chunk)
            _verify(self._where(key), key, expected, h.hexdigest())
            os.replace(tmp, dst)
        except FileNotFoundError:
            raise ArtifactNotFoundError(f"{self._where(key)}: no such artifact") from None
        except OSError as err:
            raise StoreError(f"{self._where(key)}: read failed: {err}") from err
        finally:
            tmp.unlink(missing_ok=True)
        return dst

    def exists(self, key: str) -> bool:
        path = self._path(key)
        return path.is_file() and self._sidecar(path).is_file()

    def list(self, prefix: str = "") -> list[str]:
        validate_key(prefix, allow_empty=True)
        base = self._root.joinpath(*prefix.split("/")) if prefix else self._root
        if base.is_file():
            return [prefix] if self.exists(prefix) else []
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(RESERVED_PREFIX)]
            names = set(filenames)
            for name in filenames:
                if name.startswith(RESERVED_PREFIX) or _SHA_PREFIX + name not in names:
                    continue
                keys.append(Path(dirpath, name).relative_to(self._root).as_posix())
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            self._sidecar(path).unlink(missing_ok=True)  # invisible first, then gone
            path.unlink(missing_ok=True)
        except IsADirectoryError:
            raise StoreError(f"{self._where(key)}: is a prefix of other keys, not an object") from None
        except OSError as err:
            raise StoreError(f"{self._where(key)}: delete failed: {err}") from err

    def child(self, prefix: str) -> FileStore:
        return FileStore(join_uri(self._uri, validate_key(prefix)), self._root.joinpath(*prefix.split("/")))


class _HashingWriter:
    """File-like wrapper that hashes what passes through, so the data is read only once."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self._h = hashlib.sha256()

    def write(self, b: bytes) -> int:
        self._h.update(b)
        return self._f.write(b)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _verify(where: str, key: str, expected: str | None, actual: str) -> None:
    if expected is None:
        raise CorruptArtifactError(
            f"{where}: no sha256 recorded for key {key!r}; it was not written by this store"
        )
    if expected != actual:
        raise CorruptArtifactError(
            f"{where}: sha256 mismatch for key {key!r}: recorded {expected}, read {actual}"
        )


# ------------------------------------------------------------------------------------------
# s3://
# ------------------------------------------------------------------------------------------
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidClientTokenId",
    "AuthorizationHeaderMalformed",
}
_THROTTLE_CODES = {
    "Throttling",
    "ThrottlingException",
    "SlowDown",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
}


def _error_code(err: BaseException) -> tuple[str, int]:
    from botocore.exceptions import ClientError

    if isinstance(err, ClientError):
        e = err.response.get("Error", {})
        status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return str(e.get("Code", "")), status
    return "", 0


def is_transient(err: BaseException) -> bool:
    """True for errors worth retrying: connection failures, timeouts, 5xx and throttling."""
    from botocore.exceptions import (
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
        ResponseStreamingError,
    )
    from urllib3.exceptions import HTTPError as Urllib3Error

    transport = (
        EndpointConnectionError,
        ConnectionClosedError,
        ConnectTimeoutError,
        ReadTimeoutError,
        ResponseStreamingError,
        Urllib3Error,
        ConnectionError,
        TimeoutError,
    )
    if isinstance(err, transport):
        return True
    code, status = _error_code(err)
    return status >= 500 or status == 429 or code in _THROTTLE_CODES


class S3Store(Store):
    """Objects in one bucket under a prefix, through boto3.

    Atomic visibility without a temporary key: S3 has no rename, and it needs none, because
    PutObject and CompleteMultipartUpload publish an object in one step; until then nothing
    exists under the key (an interrupted multipart upload stays an invisible "upload in
    progress", aborted here on errors and by a bucket lifecycle rule otherwise). Writing to a
    temporary key and copying would double the server-side I/O of every multi-GB shard for no
    gain. The sha256 is computed before the upload starts (one extra local read for files) so
    that it travels in the same request as user metadata ``x-amz-meta-sha256``.
    """

    def __init__(
        self,
        uri: str,
        bucket: str,
        prefix: str,
        client: Any,
        retry: RetryPolicy,
        transfer: TransferSettings,
    ) -> None:
        super().__init__(uri)
        self._bucket = bucket
        self._prefix = prefix
        self._client = client
        self._retry = retry
        self._transfer = transfer

    @property
    def client(self) -> Any:
        """The boto3 S3 client (e.g. for presigned URLs)."""
        return self._client

    @property
    def bucket(self) -> str:
        return self._bucket

    def _k(self, key: str) -> str:
        return _join_keys(self._prefix, validate_key(key))

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        t = self._transfer
        return TransferConfig(
            multipart_threshold=t.multipart_threshold,
            multipart_chunksize=t.multipart_chunksize,
            max_concurrency=t.max_concurrency,
            max_bandwidth=t.max_bandwidth,
            use_threads=t.max_concurrency > 1,
        )

    def _call(self, key: str, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` with retries on transient errors; translate errors into the store's."""
        from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

        last: BaseException | None = None
        for attempt in range(1, self._retry.attempts + 1):
            try:
                return fn()
            except (NoCredentialsError, PartialCredentialsError) as err:
                raise CredentialsError(
                    f"{self._where(key)}: {what} failed: no S3 credentials found ({err}); set "
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile / service-account role)"
                ) from None
            except (StoreError, FileNotFoundError):
                raise
            except Exception as err:  # classified below; unknown errors are re-raised
                code, status = _error_code(err)
                if code in _CREDENTIAL_CODES:
                    raise CredentialsError(
                        f"{self._where(key)}: {what} failed: the S3 credentials were refused by "
                        f"{self._client.meta.endpoint_url} ({code or status}); check AWS_ACCESS_KEY_ID / "
                        "AWS_SECRET_ACCESS_KEY"
                    ) from None
                if code == "AccessDenied" or status in (401, 403):  # HEAD answers carry no code
                    raise CredentialsError(
                        f"{self._where(key)}: {what} failed: access denied; the credentials were refused "
                        "or lack permission for this bucket/prefix"
                    ) from None
                if code in ("NoSuchKey", "404", "NotFound"):
                    raise ArtifactNotFoundError(f"{self._where(key)}: no such artifact") from None
                if code == "NoSuchBucket":
                    raise StoreError(
                        f"{self._where(key)}: {what} failed: bucket {self._bucket!r} does not exist"
                    ) from None
                if not is_transient(err):
                    if isinstance(err, ClientError):
                        raise StoreError(f"{self._where(key)}: {what} failed: {err}") from err
                    raise
                last = err
                if attempt < self._retry.attempts:
                    delay = self._retry.delay(attempt)
                    log.warning(
                        "%s: %s failed (attempt %d/%d: %s); retrying in %.2fs",
                        self._where(key),
                        what,
                        attempt,
                        self._retry.attempts,
                        err,
                        delay,
                    )
                    time.sleep(delay)
        raise StoreError(
            f"{self._where(key)}: {what} failed after {self._retry.attempts} attempts; last error: {last}"
        ) from last

    # --- writes -------------------------------------------------------------------------
    def _upload(self, key: str, fileobj_factory: Callable[[], Any], sha: str) -> None:
        from boto3.s3.transfer import create_transfer_manager

        full = self._k(key)

        def go() -> None:
            with (
                create_transfer_manager(self._client, self._transfer_config()) as mgr,
                fileobj_factory() as f,
            ):
                # s3transfer aborts its multipart upload when a part fails.
                mgr.upload(f, self._bucket, full, extra_args={"Metadata": {_SHA_META: sha}}).result()

        self._call(key, "put", go)

    def put_bytes(self, key: str, data: bytes) -> None:
        data = bytes(data)
        self._upload(key, lambda: io.BytesIO(data), hashlib.sha256(data).hexdigest())

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        src = Path(path)
        self._k(key)
        if not src.is_file():
            raise StoreError(f"{self._where(key)}: local file {str(src)!r} does not exist")
        self._upload(key, lambda: open(src, "rb"), file_sha256(src))  # noqa: SIM115 - _upload closes it

    # --- reads --------------------------------------------------------------------------
    def _head(self, key: str) -> dict[str, Any]:
        full = self._k(key)
        return self._call(key, "head", lambda: self._client.head_object(Bucket=self._bucket, Key=full))

    def get_bytes(self, key: str) -> bytes:
        full = self._k(key)

        def go() -> tuple[str | None, bytes]:
            r = self._client.get_object(Bucket=self._bucket, Key=full)
            return r.get("Metadata", {}).get(_SHA_META), r["Body"].read()

        expected, data = self._call(key, "get", go)
        _verify(self._where(key), key, expected, hashlib.sha256(data).hexdigest())
        return data

    def get_file(self, key: str, path: str | os.PathLike[str]) -> Path:
        from boto3.s3.transfer import create_transfer_manager

        full = self._k(key)
        dst = Path(path)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f"{_TMP_PREFIX}{uuid.uuid4().hex[:12]}.{dst.name}")
        try:
            for _ in range(2):  # a second pass only if the object changed while we read it
                head = self._head(key)
                expected = head.get("Metadata", {}).get(_SHA_META)

                def go() -> None:
                    with create_transfer_manager(self._client, self._transfer_config()) as mgr:
                        mgr.download(self._bucket, full, str(tmp)).result()

                self._call(key, "get", go)
                actual = file_sha256(tmp)
                if expected == actual or self._head(key).get("ETag") == head.get("ETag"):
                    break
            _verify(self._where(key), key, expected, actual)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
        return dst

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
            return True
        except ArtifactNotFoundError:
            return False

    def _iter_keys(self, full_prefix: str) -> Iterator[str]:
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self._bucket, Prefix=full_prefix):
            for obj in page.get("Contents", []):
                yield obj["Key"]

    def list(self, prefix: str = "") -> list[str]:
        validate_key(prefix, allow_empty=True)
        root = self._prefix + "/" if self._prefix else ""
        full = root + prefix

        def go() -> list[str]:
            return list(self._iter_keys(full))

        keys = []
        for k in self._call(prefix, "list", go):
            rel = k[len(root) :]
            if prefix and not (rel == prefix or rel.startswith(prefix + "/")):
                continue
            if any(seg.startswith(RESERVED_PREFIX) or seg == "" for seg in rel.split("/")):
                continue
            keys.append(rel)
        return sorted(keys)

    def delete(self, key: str) -> None:
        full = self._k(key)
        self._call(key, "delete", lambda: self._client.delete_object(Bucket=self._bucket, Key=full))

    def child(self, prefix: str) -> S3Store:
        validate_key(prefix)
        return S3Store(
            join_uri(self._uri, prefix),
            self._bucket,
            _join_keys(self._prefix, prefix),
            self._client,
            self._retry,
            self._transfer,
        )


def _s3_client(config: StoreConfig | None) -> Any:
    import boto3
    from botocore.config import Config

    region = (
        (config.region if config else None)
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
    )
    path_style = config.path_style if config else True
    options: dict[str, Any] = {
        "s3": {"addressing_style": "path" if path_style else "auto"},
        # Retries are ours (RetryPolicy), so that the final error can name the key and attempts.
        "retries": {"total_max_attempts": 1},
        "connect_timeout": 10,
        "read_timeout": 120,
    }
    try:
        # S3-compatible servers differ in trailing-checksum support; we verify sha256 ourselves.
        bcfg = Config(
            **options,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
    except TypeError:  # botocore < 1.36 has neither option and sends no trailing checksums anyway
        bcfg = Config(**options)
    return boto3.session.Session().client(
        "s3",
        endpoint_url=(config.endpoint_url if config else None) or None,  # None: AWS_ENDPOINT_URL or AWS
        region_name=region or "us-east-1",
        config=bcfg,
    )


def open_store(
    uri: str,
    config: StoreConfig | None = None,
    *,
    retry: RetryPolicy | None = None,
    transfer: TransferSettings | None = None,
) -> Store:
    """Open the store rooted at ``uri`` (``file://PATH`` or ``s3://BUCKET[/PREFIX]``).

    ``file://`` paths are taken literally after the scheme; relative ones are resolved against
    the current directory now (``file://./runs/x``), absolute ones look like ``file:///data/runs``.
    ``config`` supplies the S3 endpoint, region and addressing style (else the AWS variables).
    """
    if not isinstance(uri, str):
        raise InvalidKeyError(f"store uri {uri!r}: must be a string")
    if uri.startswith("file://"):
        raw = uri[len("file://") :]
        if raw == "":
            raise InvalidKeyError(f"store uri {uri!r}: no path after file://; e.g. file://./runs")
        if _CONTROL.search(raw):
            raise InvalidKeyError(f"store uri {uri!r}: control characters are not allowed")
        return FileStore(uri.rstrip("/") if raw.strip("/") else uri, Path(raw).absolute())
    if uri.startswith("s3://"):
        rest = uri[len("s3://") :].strip("/")
        bucket, _, prefix = rest.partition("/")
        if not _BUCKET.match(bucket):
            raise InvalidKeyError(
                f"store uri {uri!r}: bucket {bucket!r} is not a valid S3 bucket name "
                "(3-63 characters: lowercase letters, digits, '.', '-')"
            )
        if prefix:
            validate_key(prefix)
        if transfer is None and config is not None:
            transfer = TransferSettings(config.multipart_threshold_bytes, config.multipart_chunksize_bytes)
        if retry is None and config is not None:
            retry = RetryPolicy(config.retry_attempts, config.retry_base_delay_s, config.retry_max_delay_s)
        t = transfer or TransferSettings()
        if t.multipart_chunksize < 1 or t.multipart_threshold < 1 or t.max_concurrency < 1:
            raise ValueError(f"transfer: {t} has a value < 1; sizes and concurrency must be >= 1")
        return S3Store(
            f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}",
            bucket,
            prefix,
            _s3_client(config),
            retry or RetryPolicy(),
            t,
        )
    raise InvalidKeyError(f"store uri {uri!r}: unknown scheme; allowed: file://PATH, s3://BUCKET[/PREFIX]")


__all__ = [
    "ArtifactNotFoundError",
    "CorruptArtifactError",
    "FileStore",
    "InvalidKeyError",
    "RetryPolicy",
    "S3Store",
    "Store",
    "StoreError",
    "TransferSettings",
    "is_transient",
    "join_uri",
    "open_store",
    "validate_key",
]
