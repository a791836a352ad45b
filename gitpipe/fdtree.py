"""Folders reached through descriptors, one step at a time, never through a link.

A worktree is writable by the build user, and a process of another sandbox holding one of its
folders open may swap a folder for a link at any moment; what the daemon (root) does in a tree
goes through these, so that a swap fails (ELOOP, ENOTDIR) instead of reaching the host.
"""

from __future__ import annotations

import os
import stat

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
COMPARED = 4096  # bytes up to which `rewrite` reads what a file holds before it writes (a larger one is written)


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


def rewrite(dir_fd: int, name: str, data: bytes, mode: int = 0o644) -> None:
    """`name` under the folder `dir_fd` holds `data`, as `write_new` leaves it, but a regular file
    with no other link is kept: written again in place, not at all when it holds `data` already
    (a small one).
    A new file is the costly part of a slot's reset (on ext4 without a journal, each new inode is
    found by a scan past every inode freed in the last seconds), and a slot's .git is the same
    four files every time. Anything else (a link, a folder, a FIFO, a device: none is opened; a
    file with another name, which the write would reach too) is replaced by `write_new`."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if st is None or not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        write_new(dir_fd, name, data, mode)
        return
    try:
        fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:  # swapped since (ELOOP...), or no access (a daemon not root, a chmod 0)
        write_new(dir_fd, name, data, mode)
        return
    try:
        now = os.fstat(fd)  # still the file looked at: else replaced below
        kept = (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev) and stat.S_ISREG(now.st_mode) and now.st_nlink == 1
        if kept and (now.st_size != len(data) or len(data) > COMPARED or os.pread(fd, len(data), 0) != data):
            os.ftruncate(fd, 0)
            write_all(fd, data)  # from offset 0: pread moved nothing
    finally:
        os.close(fd)
    if not kept:
        write_new(dir_fd, name, data, mode)
