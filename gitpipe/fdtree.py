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


def write_new(dir_fd: int, name: str, data: bytes, mode: int = 0o644) -> None:
    """`name` under the folder `dir_fd` made anew with `data` (`mode` less the umask): what was
    there (a hard link now, a link) is unlinked, never written through; one put back meanwhile
    makes it fail (EEXIST)."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
