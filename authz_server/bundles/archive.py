"""Bundle files in and out of a gzip tarball, the format of OPA's bundle service API.

Reading is defensive, since the bytes come from the network: only regular files are taken
(a symbolic or hard link, a device, ``..`` or an absolute path beyond the leading ``/`` OPA
writes is refused, not skipped), each file and the whole bundle are capped at
``size_limit`` bytes after decompression (a gzip bomb stops at the cap), and a truncated
or corrupt stream is an error, never a partial bundle. Writing is deterministic (sorted
entries, zero times and owners), so the same files always give the same bytes and ETag.
"""

from __future__ import annotations

import gzip
import io
import posixpath
import tarfile
import zlib
from typing import Iterable

from .errors import BundleError

DEFAULT_SIZE_LIMIT = 64 * 1024 * 1024


def normalize(name: str) -> str:
    """``/a/b.rego`` or ``./a/b.rego`` → ``a/b.rego``; refuses anything that leaves the bundle."""
    path = name.replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    path = path.lstrip("/")
    parts = path.split("/")
    if not path or any(part in ("", ".", "..") for part in parts):
        raise BundleError(f"bundle file name {name!r} is not a plain relative path", code="bundle_unreadable")
    return posixpath.join(*parts)


def read_tarball(raw: bytes, *, size_limit: int = DEFAULT_SIZE_LIMIT) -> list[tuple[str, bytes]]:
    """The regular files of a ``.tar.gz`` bundle as (path without leading ``/``, bytes), in
    archive order; ``BundleError(code="bundle_unreadable")`` for anything else."""
    files: list[tuple[str, bytes]] = []
    seen: set[str] = set()
    total = 0
    stream = _CappedGzip(raw, size_limit)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                if member.isdir():
                    continue
                if not member.isreg():
                    raise BundleError(f"bundle entry {member.name!r} is not a regular file", code="bundle_unreadable")
                path = normalize(member.name)
                if path in seen:
                    raise BundleError(f"bundle has {path!r} twice", code="bundle_unreadable")
                if member.size > size_limit:
                    raise BundleError(f"bundle file {path!r} size ({member.size} bytes) exceeds the limit "
                                      f"({size_limit} bytes)", code="bundle_unreadable")
                handle = archive.extractfile(member)
                data = handle.read() if handle is not None else b""
                if len(data) != member.size:
                    raise BundleError(f"bundle file {path!r} is truncated", code="bundle_unreadable")
                total += len(data)
                seen.add(path)
                files.append((path, data))
    except BundleError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise BundleError(f"not a readable gzip tar bundle: {exc}", code="bundle_unreadable") from None
    if not files:
        raise BundleError("the bundle is empty", code="bundle_unreadable")
    return files


def write_tarball(files: Iterable[tuple[str, bytes]]) -> bytes:
    """A gzip tarball of ``files`` with OPA's ``/``-prefixed names, byte-for-byte reproducible."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as compressed, \
            tarfile.open(fileobj=compressed, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for path, data in sorted(files):
            info = tarfile.TarInfo("/" + normalize(path))
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class _CappedGzip(io.RawIOBase):
    """Decompresses lazily and stops with an error past ``limit`` bytes (+ tar overhead)."""

    def __init__(self, raw: bytes, limit: int) -> None:
        self._source = gzip.GzipFile(fileobj=io.BytesIO(raw))
        self._limit = limit + 1024 * 1024  # headers and padding beside the file contents
        self._read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._source.read(len(buffer))
        self._read += len(data)
        if self._read > self._limit:
            raise BundleError(f"the bundle decompresses to more than {self._limit} bytes", code="bundle_unreadable")
        buffer[:len(data)] = data
        return len(data)
