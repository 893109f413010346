"""The ``file://`` backend: a run's artifacts as a directory tree on a local or mounted disk.

:class:`FileStore` makes a write visible only when complete (a temporary file in the same directory, then
``os.replace``) and records each object's sha256 in a hidden sidecar that it checks on every read. Open
one with :func:`puzzle.store.open_store` (``file://PATH``); the shared interface is in ``base.py``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from puzzle.store.base import (
    _CHUNK,
    _CONTROL,
    _SHA_PREFIX,
    _TMP_PREFIX,
    RESERVED_PREFIX,
    ArtifactNotFoundError,
    InvalidKeyError,
    Store,
    StoreError,
    _verify,
    join_uri,
    validate_key,
)


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


def open_file_store(uri: str) -> FileStore:
    """The :class:`FileStore` of a ``file://PATH`` URI (relative paths against the current directory, now)."""
    raw = uri[len("file://") :]
    if raw == "":
        raise InvalidKeyError(f"store uri {uri!r}: no path after file://; e.g. file://./runs")
    if _CONTROL.search(raw):
        raise InvalidKeyError(f"store uri {uri!r}: control characters are not allowed")
    return FileStore(uri.rstrip("/") if raw.strip("/") else uri, Path(raw).absolute())


__all__ = ["FileStore", "open_file_store"]
