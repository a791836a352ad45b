"""The file side of build caches: copying without following links, overlay mounts, and the
checks that keep a cached path from reaching outside its worktree or HOME.

Standard library and coreutils/util-linux commands only (cp, mount, umount, setpriv).
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

log = logging.getLogger("gitpipe")


def unsafe_target(base: Path, target: Path) -> str | None:
    """Why restoring to `target` could write outside `base` or over the commit's files (None: safe)."""
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
    """Why saving `target` could read outside `base` (None: safe)."""
    p = base
    for part in target.relative_to(base).parts:
        p = p / part
        if p.is_symlink():
            return f"is a symlink or lies under one ({p.relative_to(base)}); symlinks are never followed"
    if os.path.lexists(target) and not (target.is_dir() or target.is_file()):
        return "is neither a directory nor a file"
    return None


def tree_size(path: Path) -> tuple[int, int]:
    """(bytes, files) under `path`, links not followed."""
    if not path.is_dir():
        return path.lstat().st_size, 1
    size = files = 0
    for top, dirs, names in os.walk(path):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
            try:
                size += os.lstat(os.path.join(top, name)).st_size
                files += 1
            except OSError:
                pass
    return size, files


def copy(src: Path, dst: Path, link: bool = False) -> None:
    """A copy keeping modes, times, owners and links as links (never following one); with `link`,
    files are hard links to the source's (a copy where that fails: another filesystem)."""
    if link:
        try:
            return copy(src, dst, link=False) if not same_fs(src, dst.parent) else _run_cp(src, dst, ["-al"])
        except OSError:
            remove(dst)
    return _run_cp(src, dst, ["-a"])


def same_fs(a: Path, b: Path) -> bool:
    return a.lstat().st_dev == b.stat().st_dev


def _run_cp(src: Path, dst: Path, how: list[str]) -> None:
    # --pdeathsig: a copy never outlives a killed daemon (the next one sweeps what it copied).
    proc = subprocess.run(["setpriv", "--pdeathsig", "KILL", "--", "cp", *how, "--no-target-directory", "--",
                           str(src), str(dst)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise OSError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"cp exited {proc.returncode}")


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
    daemon): the same layers mounted again, read-only, in a new namespace, and copied from there."""
    view = dst.with_name(dst.name + ".view")
    view.mkdir()
    try:
        mount = (f"mount -t overlay overlay -o ro,lowerdir={mount_option(upper)}:{mount_option(lower)} "
                 f"{shlex.quote(str(view))}")
        run(["setpriv", "--pdeathsig", "KILL", "--", "unshare", "--user", "--map-root-user", "--mount", "--",
             "/bin/sh", "-c", f"{mount} && exec cp -a --no-target-directory -- {shlex.quote(str(view))} "
                              f"{shlex.quote(str(dst))}"])
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
