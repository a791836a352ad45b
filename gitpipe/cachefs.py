"""The file side of build caches: copying through folder descriptors (never a path, never a
link), overlay mounts, and the checks that keep a cached path inside its worktree or HOME.

Standard library and util-linux commands only (mount, umount, unshare, setpriv).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

log = logging.getLogger("gitpipe")


def unsafe_target(base: Path, target: Path) -> str | None:
    """Why restoring to `target` could write outside `base` or over the commit's files (None: safe).
    A first look for a clear message; the restore itself goes through `open_under` (no link followed)."""
    p = base
    for part in target.relative_to(base).parts[:-1]:
        p = p / part
        if p.is_symlink():
            return f"{p.relative_to(base)} is a symlink in the worktree (never followed)"
        if p.exists() and not p.is_dir():
            return f"{p.relative_to(base)} is not a directory"
    if os.path.lexists(target):
        return "it already exists in the worktree (the commit has it)"
    return None


def unsafe_source(base: Path, target: Path) -> str | None:
    """Why saving `target` could read outside `base` (None: safe). A first look for a clear
    message; the save itself goes through `open_under` and `copy_at` (no link followed)."""
    p = base
    for part in target.relative_to(base).parts:
        p = p / part
        if p.is_symlink():
            return f"is a symlink or lies under one ({p.relative_to(base)}); symlinks are never followed"
    if os.path.lexists(target) and not (target.is_dir() or target.is_file()):
        return "is neither a directory nor a file"
    return None


# ---------------------------------------------------------------------- walking by descriptors
# A cached path lies in a worktree or HOME that pushed code controls, and not only while its
# script runs: a process of another attempt may hold a folder of the slot open and swap any
# folder for a link to the host at any moment (see `sandbox.hand_over`). So no path under
# `base` is ever resolved by name: each step is one name opened with O_NOFOLLOW under the
# descriptor of the step before. A swap then fails the copy (ELOOP, ENOTDIR) or moves a folder
# the walk still holds, which is the attempt's own data wherever it now is.
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Folders deep a tree of job data may be where gitpipe walks it: a cache (a descriptor per level is
# held), an output glob's walk (artifacts) and a release source (deploy.manifest), whose os.walk
# recurses once per folder in Python 3.11 (a tree 1,000 deep raised RecursionError there).
MAX_DEPTH = 256


def open_under(base: Path, parts: tuple[str, ...], make: bool = False, uid: int | None = None,
               gid: int | None = None) -> int:
    """A descriptor of the folder `base/parts...`, never through a link; `make`: missing folders
    are made (0755, the build user's when `uid` is given). The caller closes it."""
    fd = os.open(base, _DIR)
    try:
        for part in parts:
            made = False
            if make:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                    made = True
                except FileExistsError:
                    pass
            child = os.open(part, _DIR, dir_fd=fd)
            os.close(fd)
            fd = child
            if made and uid is not None and gid is not None:
                os.fchown(fd, uid, gid)
    except BaseException:
        os.close(fd)
        raise
    return fd


def size_at(dir_fd: int, name: str) -> tuple[int, int]:
    """(bytes, files) of `name` under `dir_fd` and everything below it, links not followed."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size, 1
    return _size_dir(os.open(name, _DIR, dir_fd=dir_fd), 0)


def _size_dir(fd: int, depth: int) -> tuple[int, int]:
    if depth > MAX_DEPTH:
        os.close(fd)
        raise OSError(f"more than {MAX_DEPTH} folders deep")
    size = files = 0
    try:
        with os.scandir(fd) as entries:
            listed = [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
        for name, is_dir in listed:
            try:
                if is_dir:
                    s, n = _size_dir(os.open(name, _DIR, dir_fd=fd), depth + 1)
                else:
                    s, n = os.stat(name, dir_fd=fd, follow_symlinks=False).st_size, 1
            except (FileNotFoundError, NotADirectoryError):
                continue  # gone or swapped since it was listed
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                continue
            size, files = size + s, files + n
    finally:
        os.close(fd)
    return size, files


def tree_size(path: Path) -> tuple[int, int]:
    """(bytes, files) under `path` (a folder of the daemon's own), links not followed."""
    fd = os.open(path.parent, _DIR)
    try:
        return size_at(fd, path.name)
    finally:
        os.close(fd)


def copy_at(src_fd: int, name: str, dst_fd: int, dst_name: str, link: bool = False,
            owner: bool | None = None) -> None:
    """Copy `name` under `src_fd` to `dst_name` under `dst_fd` (which must not exist): folders,
    files and links as links, with modes and times (`owner`: owners too, by default when root),
    never following a link and never resolving a path; fifos, sockets and devices are left out.
    With `link`, files become hard links to the source's (copied where a link cannot be made)."""
    keep = os.geteuid() == 0 if owner is None else owner
    _copy(src_fd, name, dst_fd, dst_name, link, keep, 0)


def _copy(src_fd: int, name: str, dst_fd: int, dst_name: str, link: bool, keep: bool, depth: int) -> None:
    st = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
    if stat.S_ISDIR(st.st_mode):
        if depth > MAX_DEPTH:
            raise OSError(f"more than {MAX_DEPTH} folders deep")
        sfd = os.open(name, _DIR, dir_fd=src_fd)
        try:
            os.mkdir(dst_name, 0o700, dir_fd=dst_fd)
            dfd = os.open(dst_name, _DIR, dir_fd=dst_fd)
            try:
                with os.scandir(sfd) as entries:
                    names = [e.name for e in entries]
                for child in names:
                    try:
                        _copy(sfd, child, dfd, child, link, keep, depth + 1)
                    except FileNotFoundError:
                        continue  # removed since it was listed
                _finish(dfd, os.fstat(sfd), keep)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)
    elif stat.S_ISREG(st.st_mode):
        if link:
            try:
                os.link(name, dst_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd, follow_symlinks=False)
                return
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
        _copy_file(src_fd, name, dst_fd, dst_name, keep)
    elif stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(name, dir_fd=src_fd), dst_name, dir_fd=dst_fd)
        if keep:
            os.chown(dst_name, st.st_uid, st.st_gid, dir_fd=dst_fd, follow_symlinks=False)
        os.utime(dst_name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_fd, follow_symlinks=False)


def _copy_file(src_fd: int, name: str, dst_fd: int, dst_name: str, keep: bool) -> None:
    # O_NONBLOCK: a fifo swapped in after the stat must not hang the open.
    sfd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=src_fd)
    try:
        st = os.fstat(sfd)
        if not stat.S_ISREG(st.st_mode):
            return  # swapped since it was listed: no longer a file of the tree
        dfd = os.open(dst_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                      dir_fd=dst_fd)
        try:
            left = st.st_size
            while left > 0:
                try:
                    n = os.copy_file_range(sfd, dfd, min(left, 1 << 30))
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    n = os.sendfile(dfd, sfd, None, min(left, 1 << 30))
                if n == 0:
                    break  # the file shrank meanwhile
                left -= n
            _finish(dfd, st, keep)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)


def _finish(fd: int, st: os.stat_result, keep: bool) -> None:
    if keep:
        os.fchown(fd, st.st_uid, st.st_gid)
    os.fchmod(fd, stat.S_IMODE(st.st_mode))
    os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def save_copy(base: Path, target: Path, dst: Path, link: bool = False) -> None:
    """Copy `target` (a path under `base`, the worktree or HOME) to `dst` (a new path of the daemon's)."""
    src_fd = open_under(base, target.relative_to(base).parts[:-1])
    try:
        dst_fd = os.open(dst.parent, _DIR)
        try:
            if link and os.fstat(src_fd).st_dev != os.fstat(dst_fd).st_dev:
                link = False
            copy_at(src_fd, target.name, dst_fd, dst.name, link=link)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)


def restore_copy(src: Path, base: Path, target: Path, uid: int | None = None, gid: int | None = None) -> None:
    """Copy `src` (an entry's, the daemon's) to `target` under `base`, its missing folders made."""
    dst_fd = open_under(base, target.relative_to(base).parts[:-1], make=True, uid=uid, gid=gid)
    try:
        src_fd = os.open(src.parent, _DIR)
        try:
            copy_at(src_fd, src.name, dst_fd, target.name)
        finally:
            os.close(src_fd)
    finally:
        os.close(dst_fd)


def size_under(base: Path, target: Path) -> tuple[int, int] | None:
    """(bytes, files) of `target` under `base` (None: there is nothing there), never through a link."""
    try:
        fd = open_under(base, target.relative_to(base).parts[:-1])
    except FileNotFoundError:
        return None  # a folder on its way is missing: nothing to save
    try:
        return size_at(fd, target.name)
    except FileNotFoundError:
        return None
    finally:
        os.close(fd)


def remove_under(base: Path, target: Path) -> None:
    """Remove `target` under `base` (what a failed restore made), never through a link."""
    try:
        fd = open_under(base, target.relative_to(base).parts[:-1])
    except OSError:
        return  # its folder is gone or swapped: the slot's reset removes what is left
    try:
        if stat.S_ISDIR(os.stat(target.name, dir_fd=fd, follow_symlinks=False).st_mode):
            shutil.rmtree(target.name, dir_fd=fd)
        else:
            os.unlink(target.name, dir_fd=fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_dir_under(base: Path, target: Path, uid: int | None = None, gid: int | None = None) -> None:
    """Make the folder `target` under `base` (and its missing parents), never through a link."""
    fd = open_under(base, target.relative_to(base).parts, make=True, uid=uid, gid=gid)
    os.close(fd)


def copy(src: Path, dst: Path) -> None:
    """Copy `src` to `dst`, both paths of the daemon's own (no pushed code can reach their folders)."""
    src_fd, dst_fd = os.open(src.parent, _DIR), os.open(dst.parent, _DIR)
    try:
        copy_at(src_fd, src.name, dst_fd, dst.name)
    finally:
        os.close(src_fd)
        os.close(dst_fd)


def run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise OSError(proc.stderr.strip() or f"{argv[0]} exited {proc.returncode}")


def mount_option(path: Path) -> str:
    """A path as a mount option value: its commas and colons escaped (they separate options)."""
    return str(path).replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")


def probe_overlay(where: Path, userns: bool = False) -> bool:
    """Whether an overlay can be mounted under `where` (not on every filesystem, nor in every
    container); `userns`: in a user namespace of our own, as an unprivileged daemon's attempts do."""
    remove(where)
    dirs = [where / d for d in ("lower", "upper", "work", "merged")]
    try:
        for d in dirs:
            d.mkdir(parents=True)
        (dirs[0] / "f").write_text("lower")
        mount = (f"mount -t overlay overlay -o lowerdir={mount_option(dirs[0])},upperdir={mount_option(dirs[1])},"
                 f"workdir={mount_option(dirs[2])} {shlex.quote(str(dirs[3]))}")
        if userns:  # and the attempt writes to the lower file: the copy-up must work too
            run(["unshare", "--user", "--map-root-user", "--mount", "--", "/bin/sh", "-c",
                 f"{mount} && echo upper > {shlex.quote(str(dirs[3] / 'f'))}"])
        else:
            run(["/bin/sh", "-c", mount])
            subprocess.run(["umount", str(dirs[3])], capture_output=True, check=False)
        return (dirs[0] / "f").read_text() == "lower"
    except OSError as exc:
        log.debug("overlay probe: %s", exc)
        return False
    finally:
        remove(where)


def copy_merged(upper: Path, lower: Path, dst: Path) -> None:
    """Copy what an attempt saw at an overlay it mounted in its own namespace (an unprivileged
    daemon): the same layers mounted again, read-only, in a new namespace, and copied from there
    by `copy_at` (this module run as a program: a held descriptor may still change the upper layer)."""
    view = dst.with_name(dst.name + ".view")
    view.mkdir()
    try:
        mount = (f"mount -t overlay overlay -o ro,lowerdir={mount_option(upper)}:{mount_option(lower)} "
                 f"{shlex.quote(str(view))}")
        copier = shlex.join([sys.executable, "-I", "-m", "gitpipe.cachefs", str(view), str(dst)])
        run(["setpriv", "--pdeathsig", "KILL", "--", "unshare", "--user", "--map-root-user", "--mount", "--",
             "/bin/sh", "-c", f"{mount} && exec {copier}"])
    finally:
        view.rmdir()


def unmount_under(top: Path) -> int:
    """Unmount what a killed daemon left mounted under `top` (its attempts' overlays); how many."""
    prefix = str(top.resolve()) + "/"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return 0
    points = []
    for line in lines:
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4])  # \040: a space
        if point.startswith(prefix):
            points.append(point)
    for point in sorted(points, reverse=True):  # the deepest first
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    return len(points)


def remove(path: Path) -> None:
    from gitpipe.git import remove_tree

    try:
        remove_tree(path)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


def syncfs(path: Path) -> None:
    """Flush the filesystem holding `path`, so an entry recorded after a power loss is whole."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ctypes.CDLL(None, use_errno=True).syncfs(fd)
    finally:
        os.close(fd)


if __name__ == "__main__":  # `copy_merged`'s copier, inside its namespace: owners are not mapped there
    _src, _dst = Path(sys.argv[1]), Path(sys.argv[2])
    _s, _d = os.open(_src.parent, _DIR), os.open(_dst.parent, _DIR)
    copy_at(_s, _src.name, _d, _dst.name, owner=False)
