"""Folders reached through descriptors, one step at a time, never through a link.

A worktree is writable by the build user, and a process of another sandbox holding one of its
folders open may swap a folder for a link at any moment; what the daemon (root) does in a tree
goes through these, so that a swap fails (ELOOP, ENOTDIR) instead of reaching the host.
"""

from __future__ import annotations

import os

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_under(dir_fd: int, rel: str, make: bool = False) -> int:
    """A folder under the folder `dir_fd` ("a/b"; "" is `dir_fd` itself), each step opened
    without following a link (`make`: made when missing; else FileNotFoundError)."""
    fd = os.dup(dir_fd)
    try:
        for part in rel.split("/") if rel else []:
            if make:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
            child = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
