"""``LocalObjectStore``: a directory as an object store (the embedded default).

Each key is a file under the root. Writes go to a temporary file in the destination directory, are
fsynced and then ``os.replace``d over the target, so readers see the old bytes or the new ones and a
crash leaves at most an ignored temporary file. Unlike S3, a key cannot be both an object and a
"directory" (``a`` and ``a/b``); such a write raises ``ValueError``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from services.storage.base import TEMP_PREFIX, ObjectInfo, ObjectNotFound, StrPath, check_key, check_prefix

_COPY_CHUNK = 1024 * 1024
# mkstemp creates 0600 files; objects should be readable like any file the service writes.
_FILE_MODE = 0o644


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every platform/filesystem allows it, so best effort.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(target: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``target`` through ``write(fileobj)`` into a sibling temp file, fsync, then rename."""
    for attempt in range(3):
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=target.parent)
            break
        except FileNotFoundError:
            # A concurrent delete pruned the (then empty) parent directory; recreate it.
            if attempt == 2:
                raise
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fchmod(fh.fileno(), _FILE_MODE)
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


class LocalObjectStore:
    """Objects as files under ``root`` (created if missing)."""

    def __init__(self, root: StrPath) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.as_uri()

    def __repr__(self) -> str:
        return f"LocalObjectStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def _write(self, key: str, write: Callable[[BinaryIO], object]) -> None:
        target = self._path(key)
        try:
            atomic_write(target, write)
        except (NotADirectoryError, IsADirectoryError, FileExistsError) as exc:
            raise ValueError(
                f"cannot write key {key!r}: the local store cannot hold both 'a' and 'a/...' keys ({exc})"
            ) from exc

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self._write(key, lambda fh: fh.write(data))

    def put_file(self, key: str, path: StrPath, content_type: str = "application/octet-stream") -> None:
        # Open the source first so a missing file fails before any temp file exists.
        with open(path, "rb") as src:
            self._write(key, lambda fh: shutil.copyfileobj(src, fh, _COPY_CHUNK))

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None

    def get_file(self, key: str, path: StrPath) -> None:
        source = self._path(key)
        try:
            src = open(source, "rb")  # noqa: SIM115 - closed below; must fail before the target is touched
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(key) from None
        with src:
            atomic_write(Path(path), lambda fh: shutil.copyfileobj(src, fh, _COPY_CHUNK))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(key) from None
        if not path.is_file():
            raise ObjectNotFound(key)
        return ObjectInfo(key=key, size=st.st_size, modified=datetime.fromtimestamp(st.st_mtime, UTC))

    def _walk(self, prefix: str) -> Iterator[tuple[str, os.DirEntry[str]]]:
        """Yield (key, entry) for every file whose key starts with ``prefix``, in no particular order."""
        # Start in the deepest directory the prefix names fully; prune directories that cannot match.
        base_key = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
        stack = [(self.root.joinpath(*base_key.split("/")[:-1]), base_key)]
        while stack:
            directory, dir_key = stack.pop()
            try:
                entries = list(os.scandir(directory))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                if entry.name.startswith(TEMP_PREFIX):
                    continue
                key = dir_key + entry.name
                if entry.is_dir(follow_symlinks=False):
                    sub = key + "/"
                    if sub.startswith(prefix) or prefix.startswith(sub):
                        stack.append((Path(entry.path), sub))
                elif entry.is_file() and key.startswith(prefix):
                    yield key, entry

    def list(self, prefix: str = "", recursive: bool = True) -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        # Sorting str keys by code point equals S3's UTF-8 byte order; it needs the full set first
        # because directory order differs from key order ("a-b" < "a/b" but "a" is walked as a unit).
        found = sorted(self._walk(prefix), key=lambda item: item[0])
        seen_dirs: set[str] = set()
        for key, entry in found:
            if not recursive:
                slash = key.find("/", len(prefix))
                if slash >= 0:
                    common = key[: slash + 1]
                    if common not in seen_dirs:
                        seen_dirs.add(common)
                        yield ObjectInfo(key=common, size=0)
                    continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue  # deleted while listing
            yield ObjectInfo(key=key, size=st.st_size, modified=datetime.fromtimestamp(st.st_mtime, UTC))

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return
        self._prune_empty_dirs(path.parent)

    def _prune_empty_dirs(self, directory: Path) -> None:
        # S3 has no directories; removing empty ones keeps non-recursive listings identical.
        while directory != self.root and self.root in directory.parents:
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent

    def delete_prefix(self, prefix: str) -> int:
        if not check_prefix(prefix):
            raise ValueError("refusing to delete_prefix(''): pass the prefix to delete")
        deleted = 0
        for info in [*self.list(prefix)]:  # snapshot: we delete while iterating
            path = self._path(info.key)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                deleted += 1
                self._prune_empty_dirs(path.parent)
        return deleted

    def scan_target(self, key: str) -> tuple[str, dict[str, str] | None]:
        check_prefix(key)
        return str(self.root / key), None
