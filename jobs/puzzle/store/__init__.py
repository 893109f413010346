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
  credentials fail at once with a message saying so;
* a ``file://`` store follows no symbolic link below its root (:class:`SymlinkError`, bad input): a
  link planted in a run folder cannot make a step read or write outside the store.

Open a store with :func:`open_store`; S3 endpoint and credentials come from the standard AWS
variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``,
profiles, IRSA) or, for endpoint and region, from :class:`puzzle.config.StoreConfig`.

The package: ``base.py`` (errors, key rules, the :class:`Store` interface, retry and transfer
settings), ``file.py`` (:class:`FileStore`), ``s3.py`` (:class:`S3Store`, the boto3 client, which
errors are transient). Import from here (``from puzzle.store import open_store``), not from the
modules, which may move.
"""

from __future__ import annotations

from puzzle.config import StoreConfig
from puzzle.store.base import (
    RESERVED_PREFIX,
    ArtifactNotFoundError,
    BucketNotFoundError,
    CorruptArtifactError,
    CredentialsError,
    InvalidKeyError,
    RetryPolicy,
    Store,
    StoreError,
    SymlinkError,
    TransferSettings,
    file_sha256,
    join_uri,
    recording,
    validate_key,
)
from puzzle.store.file import FileStore, open_file_store
from puzzle.store.s3 import S3Store, is_transient, open_s3_store


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
        return open_file_store(uri)
    if uri.startswith("s3://"):
        return open_s3_store(uri, config, retry, transfer)
    raise InvalidKeyError(f"store uri {uri!r}: unknown scheme; allowed: file://PATH, s3://BUCKET[/PREFIX]")


__all__ = [
    "RESERVED_PREFIX",
    "ArtifactNotFoundError",
    "BucketNotFoundError",
    "CorruptArtifactError",
    "CredentialsError",
    "FileStore",
    "InvalidKeyError",
    "RetryPolicy",
    "S3Store",
    "Store",
    "StoreError",
    "SymlinkError",
    "TransferSettings",
    "file_sha256",
    "is_transient",
    "join_uri",
    "open_store",
    "recording",
    "validate_key",
]
