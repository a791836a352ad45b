"""Room on the disk of the gitpipe home: when it counts as full, and which SQLite errors say it is.

Standard library only (the store and the scheduler use it; nothing here writes).
"""

from __future__ import annotations

import os
import sqlite3

FULL_BELOW = 1 << 20  # bytes free under which the home counts as full: a retry's log would not fit


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def full(path: str | os.PathLike[str]) -> str | None:
    """Why the disk holding `path` counts as full now ("the disk holding … is full (12 KiB free)"), or None."""
    try:
        room = free_bytes(path)
    except OSError:
        return None
    if room >= FULL_BELOW:
        return None
    return f"the disk holding {path} is full ({room >> 10} KiB free)"


def sqlite_full(exc: sqlite3.Error, path: str | os.PathLike[str]) -> bool:
    """Whether an SQLite error means the disk holding `path` has no room left.

    SQLITE_FULL, or an I/O error while that disk is full (SQLite says "disk I/O error" when
    it cannot grow its -shm file).
    """
    code = getattr(exc, "sqlite_errorcode", None)
    if code == sqlite3.SQLITE_FULL:
        return True
    return code is not None and code & 0xFF == sqlite3.SQLITE_IOERR and full(path) is not None
