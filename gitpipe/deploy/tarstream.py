"""A tar stream of chosen release entries, in large chunks, for one SSH channel into `tar -x`.

Written by hand around `TarInfo.tobuf` rather than `tarfile.open(mode="w|")`: the stream mode
writes 10 KB blocks, and every block would become its own SSH packet.
"""

from __future__ import annotations

import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

from gitpipe.deploy.manifest import Entry
from gitpipe.errors import DeployError

CHUNK = 1 << 20
_BLOCK = tarfile.BLOCKSIZE


def _header(name: str, kind: bytes, mode: int, mtime: float, size: int = 0, linkname: str = "") -> bytes:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = int(mtime)
    info.size = size
    info.linkname = linkname
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def tar_chunks(source: Path, entries: tuple[Entry, ...], extra: list[tuple[str, bytes]]) -> Iterator[bytes]:
    """Yield the tar archive of `entries` (read from `source`) plus `extra` (name, bytes) files."""
    buf = bytearray()
    for e in entries:
        mtime = _mtime(source / e.path)
        if e.kind == "d":
            buf += _header(e.path, tarfile.DIRTYPE, e.mode, mtime)
        elif e.kind == "l":
            buf += _header(e.path, tarfile.SYMTYPE, 0o777, mtime, linkname=e.target)
        else:
            buf += _header(e.path, tarfile.REGTYPE, e.mode, mtime, e.size)
            yield from _file_data(source / e.path, e.size, buf)
        if len(buf) >= CHUNK:
            yield bytes(buf)
            buf.clear()
    for name, data in extra:
        buf += _header(name, tarfile.REGTYPE, 0o644, time.time(), len(data)) + data + _padding(len(data))
    buf += b"\0" * (2 * _BLOCK)
    yield bytes(buf)


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError as e:
        raise DeployError(f"cannot read {path}: {e.strerror}") from e


def _file_data(path: Path, size: int, buf: bytearray) -> Iterator[bytes]:
    """Append `size` bytes of `path` to `buf`, yielding whenever it holds a chunk."""
    left = size
    try:
        with path.open("rb") as f:
            while left:
                data = f.read(min(CHUNK, left))
                if not data:
                    break
                buf += data
                left -= len(data)
                if len(buf) >= CHUNK:
                    yield bytes(buf)
                    buf.clear()
    except OSError as e:
        raise DeployError(f"cannot read {path}: {e.strerror}") from e
    if left:
        raise DeployError(f"{path} shrank while it was being uploaded",
                          hint="do not change the source while a deploy runs")
    buf += _padding(size)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % _BLOCK)
