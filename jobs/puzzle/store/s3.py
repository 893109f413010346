"""The ``s3://`` backend: a run's artifacts as objects in one bucket under a prefix, through boto3.

:class:`S3Store` publishes each object in one request (PutObject or CompleteMultipartUpload) with its sha256
in user metadata, checked on every read; transient errors (:func:`is_transient`: connection failures,
timeouts, 5xx, throttling) are retried with :class:`~puzzle.store.base.RetryPolicy`'s backoff, refused
credentials fail at once. The client is built from the standard AWS variables and
:class:`puzzle.config.StoreConfig` (:func:`_s3_client`). Open one with :func:`puzzle.store.open_store`
(``s3://BUCKET[/PREFIX]``). boto3 and botocore are imported only when an S3 store is used.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from puzzle.config import StoreConfig
from puzzle.store.base import (
    _TMP_PREFIX,
    RESERVED_PREFIX,
    ArtifactNotFoundError,
    BucketNotFoundError,
    CredentialsError,
    InvalidKeyError,
    RetryPolicy,
    Store,
    StoreError,
    TransferSettings,
    _join_keys,
    _note,
    _verify,
    file_sha256,
    join_uri,
    validate_key,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SHA_META = "sha256"  # S3 user metadata key (sent as x-amz-meta-sha256)


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
                    raise BucketNotFoundError(
                        f"{self._where(key)}: {what} failed: bucket {self._bucket!r} does not exist; allowed: "
                        "an existing bucket (create it, or fix store.uri / parent.uri / data.*_uri)"
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
        _note(self._where(key), sha)

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

    def stored_sha256(self, key: str) -> str | None:
        try:
            return self._head(key).get("Metadata", {}).get(_SHA_META)
        except ArtifactNotFoundError:
            return None

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
        _note(self._where(key), None)

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


def open_s3_store(
    uri: str, config: StoreConfig | None, retry: RetryPolicy | None, transfer: TransferSettings | None
) -> S3Store:
    """The :class:`S3Store` of an ``s3://BUCKET[/PREFIX]`` URI; settings from ``config`` unless given."""
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


__all__ = ["S3Store", "is_transient", "open_s3_store"]
