"""What every artifact store shares: the errors, the key rules, the :class:`Store` interface, retry and
transfer settings, and the sha256 helpers.

The backends live beside it (``file.py``: :class:`~puzzle.store.file.FileStore`; ``s3.py``:
:class:`~puzzle.store.s3.S3Store`); callers import everything from :mod:`puzzle.store`, never from here.
This module imports no S3 library, so ``file://`` runs never load boto3.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import hashlib
import json
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from puzzle.config import StoreConfig
from puzzle.errors import BadInputError, TransientError

# Segments starting with this are the store's own bookkeeping (temporary files, checksum
# sidecars) and never user keys, so list() can hide them without ambiguity.
RESERVED_PREFIX = ".puzzle-"
_TMP_PREFIX = RESERVED_PREFIX + "tmp."
_SHA_PREFIX = RESERVED_PREFIX + "sha256."
_CHUNK = 1 << 20  # bytes per read when hashing or copying files
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class StoreError(TransientError):
    """Any artifact-store failure; the message names the store URI and the key. Exit 1 (retried)
    unless it is also bad input (an invalid key, a symbolic link in a file store, refused
    credentials)."""


class InvalidKeyError(StoreError, BadInputError):
    """A key (or URI) breaks a naming rule; the message names the key and the rule (bad input)."""


class SymlinkError(InvalidKeyError):
    """A ``file://`` key whose path, or a directory above it inside the store, is a symbolic link.

    Bad input (exit 2, never retried): the run folder must be repaired, a retry meets the same link. The
    message names the key, the link and where it points. An :class:`InvalidKeyError`, because the key
    cannot be used in this store, so code that refuses bad keys refuses these too.
    """


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


def _verify(where: str, key: str, expected: str | None, actual: str) -> None:
    """Raise :class:`CorruptArtifactError` unless ``actual`` is the sha256 recorded at write time."""
    if expected is None:
        raise CorruptArtifactError(
            f"{where}: no sha256 recorded for key {key!r}; it was not written by this store"
        )
    if expected != actual:
        raise CorruptArtifactError(
            f"{where}: sha256 mismatch for key {key!r}: recorded {expected}, read {actual}"
        )


class BucketNotFoundError(StoreError, BadInputError):
    """The S3 bucket named by a URI does not exist: a config problem, not an outage (exit 2)."""


# ----- what a unit wrote: recorded while it runs, so its done marker can list (and resume verify) it -----
_RECORDING: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("puzzle_store_recording",
                                                                                      default=None)


@contextlib.contextmanager
def recording() -> Iterator[dict[str, str]]:
    """Record every object written in this context (in this thread) as ``{full URI: sha256}``."""
    written: dict[str, str] = {}
    token = _RECORDING.set(written)
    try:
        yield written
    finally:
        _RECORDING.reset(token)


def _note(uri: str, sha: str | None) -> None:
    """An object was written (``sha``) or deleted (None) at ``uri``: what the unit leaves is what counts."""
    written = _RECORDING.get()
    if written is not None:
        if sha is None:
            written.pop(uri, None)
        else:
            written[uri] = sha


class Store(abc.ABC):
    """A store rooted at ``uri``. Keys are relative to the root; see :mod:`puzzle.store`."""

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
    def stored_sha256(self, key: str) -> str | None:
        """The sha256 recorded with ``key`` when it was written (None when there is no object), without
        reading the object itself: what resume compares a done unit's outputs with."""

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


__all__ = [
    "RESERVED_PREFIX",
    "ArtifactNotFoundError",
    "CorruptArtifactError",
    "CredentialsError",
    "InvalidKeyError",
    "RetryPolicy",
    "Store",
    "StoreError",
    "SymlinkError",
    "TransferSettings",
    "file_sha256",
    "join_uri",
    "validate_key",
]
