"""The ``file://`` backend: a run's artifacts as a directory tree on a local or mounted disk.

:class:`FileStore` makes a write visible only when complete (a temporary file in the same directory, then
``os.replace``) and records each object's sha256 in a hidden sidecar that it checks on every read. It
follows no symbolic link below its root, so nothing planted in a run folder can make a step read or write
outside the store (issue #16; see :class:`FileStore`). Open one with :func:`puzzle.store.open_store`
(``file://PATH``); the shared interface is in ``base.py``.
"""

from __future__ import annotations

import errno
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
    SymlinkError,
    _join_keys,
    _note,
    _verify,
    join_uri,
    validate_key,
)

# absent on Windows, where only the realpath checks remain
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class FileStore(Store):
    """A directory tree. Each object ``a/b`` has a sidecar ``a/.puzzle-sha256.b`` holding its sha256.

    The sidecar is the commit marker: it is written last, so an object whose writer was killed
    between the data and the sidecar stays invisible (exists/list/get ignore it). Overwriting
    removes the old sidecar first, so a torn overwrite reads as "not found", never as old
    checksum with new bytes.

    No symbolic links below the root (issue #16). Every read, write, list, delete and child refuses a
    key whose path, or a directory above it up to the root, or its sidecar, is a link, with a
    :class:`SymlinkError` (bad input) naming the key, the link and where it points. Every link is refused,
    also one that stays inside the root: the store never creates links, so one is always planted or left
    by some other tool; following only the "inside" ones would need the same resolution for a weaker
    rule, and would let two keys name one object (a delete through one removing the other's). The root
    itself may be reached through links (``/tmp -> /private/tmp``, a volume's alias): it is resolved once,
    here, and :attr:`root` is the real directory.

    How the check works: ``os.path.realpath`` of the path must be the path itself (the root is real, so
    any difference is a link), checked before each read; for writes before ``mkdir`` (which would follow a
    linked directory), again before each temporary file is created and before ``os.replace`` publishes
    them. Every file opened inside the store is opened with ``O_NOFOLLOW`` (a link at the last component
    fails, and is reported as one). A link planted before a step runs, or while it writes, is never
    followed; one swapped in within the instant between a check and the next system call is not caught.
    Closing that gap too would need ``openat``-style directory descriptors for every operation, against
    a process that races the step with write access to the run folder: not worth it here.
    """

    def __init__(self, uri: str, root: Path, *, within: Path | None = None) -> None:
        """``root``: the store's directory; ``within``: the real root of the store this one is a child of
        (links are checked from there down), None for a store opened on its own (its root is resolved)."""
        super().__init__(uri)
        self._top = Path(os.path.realpath(root)) if within is None else within
        self._root = self._top if within is None else root

    @property
    def root(self) -> Path:
        """The local directory behind this store (for tools that need a real path)."""
        return self._root

    def _path(self, key: str) -> Path:
        return self._root.joinpath(*validate_key(key).split("/"))

    @staticmethod
    def _sidecar(path: Path) -> Path:
        return path.with_name(_SHA_PREFIX + path.name)

    def _refuse_links(self, key: str, *paths: Path) -> None:
        """Raise :class:`SymlinkError` if one of ``paths``, or a directory above it, is a symbolic link."""
        for path in paths:
            if os.path.realpath(path) != str(path):
                raise self._link_error(key, path)

    def _link_error(self, key: str, path: Path) -> SymlinkError:
        link = next((p for p in _chain(self._top, path) if p.is_symlink()), None)
        what = f"key {key!r}" if key else "the store's root"
        if link is None:  # gone again, or a directory above the root became a link after opening
            return SymlinkError(f"{self._where(key)}: {what}: {str(path)!r} now resolves to "
                                f"{os.path.realpath(path)!r} through a symbolic link; the file store follows "
                                "no links")
        try:
            target = os.readlink(link)
        except OSError:
            target = "?"
        real = Path(os.path.realpath(link))
        where = "inside" if real.is_relative_to(self._top) else "outside"
        return SymlinkError(
            f"{self._where(key)}: {what} goes through the symbolic link {str(link)!r} -> {target!r}, which "
            f"leads {where} the store root {str(self._top)!r}; the file store follows no links (it never "
            "creates any): replace the link with a real directory or file"
        )

    def _os_error(self, key: str, what: str, err: OSError) -> StoreError:
        name = Path(os.fsdecode(err.filename)) if err.filename is not None else None
        if err.errno == errno.ELOOP and name is not None and name.is_relative_to(self._top):
            return self._link_error(key, name)  # O_NOFOLLOW met a link that appeared after the check
        return StoreError(f"{self._where(key)}: {what} failed: {err}")

    def _publish(self, key: str, write: Callable[[Any], None]) -> None:
        """Write via ``write(fileobj)`` to a temp file in the target dir, then replace atomically."""
        path = self._path(key)
        sidecar = self._sidecar(path)
        try:
            self._refuse_links(key, path, sidecar)  # before mkdir, which would follow a linked directory
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                raise StoreError(f"{self._where(key)}: a directory of keys already exists here")
            tag = f"{os.getpid()}.{uuid.uuid4().hex[:12]}"
            tmp = path.with_name(f"{_TMP_PREFIX}{tag}.{path.name}")
            tmp_sha = path.with_name(f"{_TMP_PREFIX}{tag}.sha256.{path.name}")
            try:
                self._refuse_links(key, path.parent)  # a link swapped in while mkdir ran
                with open(tmp, "xb", opener=_no_follow) as f:
                    hashing = _HashingWriter(f)
                    write(hashing)
                    f.flush()
                    os.fsync(f.fileno())
                self._refuse_links(key, path, sidecar)  # ... or while the data was written
                with open(tmp_sha, "x", encoding="ascii", opener=_no_follow) as f:
                    f.write(hashing.hexdigest() + "\n")
                self._refuse_links(key, path, sidecar)  # last look before publishing
                sidecar.unlink(missing_ok=True)
                os.replace(tmp, path)
                os.replace(tmp_sha, sidecar)
                _note(self._where(key), hashing.hexdigest())
            finally:
                tmp.unlink(missing_ok=True)
                tmp_sha.unlink(missing_ok=True)
        except StoreError:
            raise
        except OSError as err:
            raise self._os_error(key, "write", err) from err

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
        sidecar = self._sidecar(path)
        self._refuse_links(key, path, sidecar)
        try:
            with open(sidecar, encoding="ascii", opener=_no_follow) as f:
                return f.read().strip()
        except FileNotFoundError:
            raise ArtifactNotFoundError(f"{self._where(key)}: no such artifact") from None
        except OSError as err:
            raise self._os_error(key, "read", err) from err

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        expected = self._expected_sha(key, path)
        try:
            with open(path, "rb", opener=_no_follow) as f:
                data = f.read()
        except (FileNotFoundError, IsADirectoryError):
            raise ArtifactNotFoundError(f"{self._where(key)}: no such artifact") from None
        except OSError as err:
            raise self._os_error(key, "read", err) from err
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
            with open(src, "rb", opener=_no_follow) as s, open(tmp, "wb") as d:
                while chunk := s.read(_CHUNK):
                    h.update(chunk)
                    d.write(chunk)
            _verify(self._where(key), key, expected, h.hexdigest())
            os.replace(tmp, dst)
        except FileNotFoundError:
            raise ArtifactNotFoundError(f"{self._where(key)}: no such artifact") from None
        except OSError as err:
            raise self._os_error(key, "read", err) from err
        finally:
            tmp.unlink(missing_ok=True)
        return dst

    def stored_sha256(self, key: str) -> str | None:
        try:
            return self._expected_sha(key, self._path(key)) if self.exists(key) else None
        except ArtifactNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        path = self._path(key)
        sidecar = self._sidecar(path)
        self._refuse_links(key, path, sidecar)
        return path.is_file() and sidecar.is_file()

    def list(self, prefix: str = "") -> list[str]:
        validate_key(prefix, allow_empty=True)
        base = self._root.joinpath(*prefix.split("/")) if prefix else self._root
        self._refuse_links(prefix, base)
        if base.is_file():
            return [prefix] if self.exists(prefix) else []
        keys = []
        todo = [(base, prefix)]  # (directory, its key); scandir, not os.walk, to see each entry's links
        while todo:
            folder, folder_key = todo.pop()
            try:
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)  # the same link is named on every run
            except OSError:  # gone or unreadable: skipped, as os.walk does
                continue
            names = {e.name for e in entries}
            for e in entries:
                key = _join_keys(folder_key, e.name)
                if e.is_symlink():  # named by its key; a sidecar by its object's, a temporary file by its folder's
                    obj = e.name.removeprefix(_SHA_PREFIX)
                    named = folder_key if obj.startswith(RESERVED_PREFIX) else _join_keys(folder_key, obj)
                    raise self._link_error(named, Path(e.path))
                if e.name.startswith(RESERVED_PREFIX):
                    continue
                if e.is_dir(follow_symlinks=False):
                    todo.append((Path(e.path), key))
                elif _SHA_PREFIX + e.name in names:
                    keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self._path(key)
        sidecar = self._sidecar(path)
        self._refuse_links(key, path, sidecar)
        try:
            sidecar.unlink(missing_ok=True)  # invisible first, then gone
            path.unlink(missing_ok=True)
            _note(self._where(key), None)
        except IsADirectoryError:
            raise StoreError(f"{self._where(key)}: is a prefix of other keys, not an object") from None
        except OSError as err:
            raise self._os_error(key, "delete", err) from err

    def child(self, prefix: str) -> FileStore:
        root = self._root.joinpath(*validate_key(prefix).split("/"))
        self._refuse_links(prefix, root)
        return FileStore(join_uri(self._uri, prefix), root, within=self._top)


def _chain(top: Path, path: Path) -> list[Path]:
    """``path`` and the directories above it, down from (not including) ``top``; [path] if not below it."""
    if not path.is_relative_to(top) or path == top:
        return [path]
    out, p = [], top
    for part in path.relative_to(top).parts:
        p = p / part
        out.append(p)
    return out


def _no_follow(path: str, flags: int) -> int:
    """``open(..., opener=_no_follow)``: refuse a link at the last component (0o666 is open()'s own mode)."""
    return os.open(path, flags | _NOFOLLOW, 0o666)


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
