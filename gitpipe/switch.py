"""Move a worktree slot from one commit to the next without a git process.

A pushed run's first action needs its slot at the pushed commit, and the slot holds the one
before, exactly (its seal: `git.WorktreePool._seal`): the change between the two is a few
files. `git checkout` for it is a process (in a mount namespace of its own, see
`git._no_links_in`: 5-7 ms on the way from push to exec); here it is the files that changed,
written in this process.

What it takes on: regular files, executables and links, added, changed or removed, in folders
added or removed, when every object it reads is loose (a push leaves its objects loose) and
the index is of version 2. Anything else (a submodule, a `.gitattributes` on the way, whose
conversions only git knows, a file becoming a folder, a packed object, many changes) returns
False, having written nothing: git does it then.

Safety: the tree is writable by the build user, and a process of another sandbox holding one
of its folders open may swap a folder for a link at any moment. Every folder is opened from
the one above it with O_NOFOLLOW, every file is made anew (O_EXCL | O_NOFOLLOW) after the old
one is unlinked: nothing is written, made or removed through a link. A swap met makes it raise
OSError (the reset then starts the slot afresh).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gitpipe.digest import sha1
from gitpipe.fdtree import DIR_FLAGS, open_under, write_all, write_new
from gitpipe.objects import loose

MAX_CHANGES = 256  # more: git is as fast, and does it
MAX_BYTES = 32 << 20  # the changed files' bytes held at once: more (a push of 4 MB bombs) is git's
REGULAR, EXECUTABLE, LINK, TREE = 0o100644, 0o100755, 0o120000, 0o040000


@dataclass(frozen=True)
class Change:
    path: str  # "/"-separated, from the top of the tree
    mode: int | None  # the new mode (REGULAR, EXECUTABLE, LINK); None: removed
    blob: str | None  # the new blob's id


def switch(tree: Path, index: Path, repo: Path, old: str, new: str) -> bool:
    """Make `tree`, which holds exactly the files of commit `old` (and nothing untracked), hold
    those of `new`, and `index` (the daemon's, of version 2) track them; `repo`: where the
    objects are. False, having changed nothing, when git must do it."""
    def read(sha: str, kind: str) -> bytes:
        found = loose(repo, sha)
        if found is None or found[0] != kind:
            raise ValueError(f"{sha} is not a loose {kind}")
        return found[1]

    if len(old) != 40 or len(new) != 40:
        return False  # a SHA-256 repository: its trees hold longer ids
    try:
        entries = _index_entries(index.read_bytes())
        changes = _diff(read, _tree_of(read(old, "commit")), _tree_of(read(new, "commit")), "")
        blobs = _blobs(read, changes)
    except ValueError:
        return False
    if not changes:
        return True
    if any(c.mode == LINK and (not blobs[c.blob or ""] or b"\0" in blobs[c.blob or ""]) for c in changes):
        return False  # a link target git cuts at its NUL (or cannot make): git's, as it makes it
    if any(c.path not in entries for c in changes if c.mode is None):
        return False  # the index does not say what it should: git knows
    stats = _apply(tree, changes, blobs)
    for change in changes:
        if change.mode is None:
            entries.pop(change.path)
        else:
            entries[change.path] = _entry(change, stats[change.path])
    _write_index(index, entries)
    return True


def _blobs(read, changes: list[Change]) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    """The new files' contents by blob id; ValueError past MAX_BYTES in all (each loose object
    is bounded, not their sum: 256 pushed bombs of zeros would be a GB in the daemon)."""
    found: dict[str, bytes] = {}
    total = 0
    for change in changes:
        if change.blob is not None and change.blob not in found:
            found[change.blob] = read(change.blob, "blob")
            total += len(found[change.blob])
            if total > MAX_BYTES:
                raise ValueError("many bytes")
    return found


def _tree_of(commit: bytes) -> str:
    if not commit.startswith(b"tree "):
        raise ValueError("not a commit")
    return commit[5:commit.index(b"\n")].decode("ascii")


def _tree(body: bytes) -> dict[bytes, tuple[int, str]]:
    """A tree object's entries: name -> (mode, id)."""
    found, at = {}, 0
    while at < len(body):
        space = body.index(b" ", at)
        nul = body.index(b"\0", space)
        found[body[space + 1:nul]] = (int(body[at:space], 8), body[nul + 1:nul + 21].hex())
        at = nul + 21
    return found


def _diff(read, old: str | None, new: str | None, prefix: str) -> list[Change]:  # type: ignore[no-untyped-def]
    """What changes from tree `old` to tree `new` (either None: nothing there), as file changes."""
    if old == new:
        return []
    before = _tree(read(old, "tree")) if old else {}
    after = _tree(read(new, "tree")) if new else {}
    if b".gitattributes" in before or b".gitattributes" in after:
        raise ValueError("a .gitattributes on the way")
    changes: list[Change] = []
    for name in sorted(set(before) | set(after)):
        was, now = before.get(name), after.get(name)
        if b"/" in name or b"\0" in name or name in (b"", b".", b"..") or _dot_git(name, now):
            raise ValueError("a name git refuses")
        path = prefix + os.fsdecode(name)
        if was == now:
            continue
        kinds = {entry[0] for entry in (was, now) if entry is not None}
        if kinds & {0o160000}:
            raise ValueError("a submodule")
        if TREE in kinds:
            if kinds != {TREE}:
                raise ValueError("a file becoming a folder, or the other way")
            changes += _diff(read, was[1] if was else None, now[1] if now else None, path + "/")
        elif now is None:
            changes.append(Change(path, None, None))
        elif now[0] in (REGULAR, EXECUTABLE, LINK):
            changes.append(Change(path, now[0], now[1]))
        else:
            raise ValueError(f"mode {now[0]:o}")
        if len(changes) > MAX_CHANGES:
            raise ValueError("many changes")
    return changes


def _dot_git(name: bytes, now: tuple[int, str] | None) -> bool:
    """A name git may take for its own on some file system, which its checkout refuses
    (core.protectNTFS, on by default everywhere: `.git`, `.GIT.`, `git~1`, `.git::$INDEX_ALLOCATION`,
    `.git\\x`), or a `.gitmodules` link (refused as one): left to git, which fails the
    checkout as it would without the seal. Any name with `~`, `:` or a backslash is git's (its
    NTFS rules on short names and streams are many)."""
    low = name.lower()
    if any(c in low for c in (b"~", b":", b"\\")) or low.rstrip(b". ") == b".git":
        return True
    return now is not None and now[0] == LINK and low.rstrip(b". ") == b".gitmodules"


def _apply(tree: Path, changes: list[Change], blobs: dict[str, bytes]) -> dict[str, os.stat_result]:
    """Write the changes under `tree` through folder descriptors; the stat of each file written."""
    stats: dict[str, os.stat_result] = {}
    top = os.open(tree, DIR_FLAGS)
    try:
        for change in changes:
            folder, _, name = change.path.rpartition("/")
            fd = _open_folder(top, folder, make=change.mode is not None)
            if fd is None:
                continue  # its folder is gone, and it with it
            try:
                if change.mode in (None, LINK):  # write_new unlinks a file's old one itself
                    try:
                        os.unlink(name, dir_fd=fd)
                    except FileNotFoundError:
                        pass
                if change.mode is None:
                    continue
                data = blobs[change.blob or ""]
                if change.mode == LINK:
                    os.symlink(os.fsdecode(data), name, dir_fd=fd)
                else:  # less the umask, as git makes them
                    write_new(fd, name, data, 0o777 if change.mode == EXECUTABLE else 0o666)
                stats[change.path] = os.stat(name, dir_fd=fd, follow_symlinks=False)
            finally:
                os.close(fd)
        for folder in sorted({c.path.rpartition("/")[0] for c in changes if c.mode is None}, reverse=True):
            _prune(top, folder)
    finally:
        os.close(top)
    return stats


def _open_folder(top: int, rel: str, make: bool) -> int | None:
    """`open_under`, None when the folder is not there (and not `make`)."""
    try:
        return open_under(top, rel, make)
    except FileNotFoundError:
        return None


def _prune(top: int, rel: str) -> None:
    """Remove `rel` and the folders above it that its removed files left empty, as git does."""
    while rel:
        parent, _, name = rel.rpartition("/")
        fd = _open_folder(top, parent, make=False)
        if fd is None:
            return
        try:
            os.rmdir(name, dir_fd=fd)
        except OSError:  # not empty (or gone): the folders above are not either
            return
        finally:
            os.close(fd)
        rel = parent


def same_content(tree: Path, index: Path, paths: list[str]) -> bool:
    """Whether each of `paths` under `tree` holds the blob `index` names for it (as git hashes a
    file): for files whose stat data cannot tell, written in the clock tick they were looked at
    in. Read through folder descriptors, never through a link, a fifo or a device."""
    try:
        entries = _index_entries(index.read_bytes())
    except (OSError, ValueError):
        return False
    top = os.open(tree, DIR_FLAGS)
    try:
        for path in paths:
            entry = entries.get(path)
            if entry is None:
                return False
            folder, _, name = path.rpartition("/")
            try:
                fd = _open_folder(top, folder, make=False)
                if fd is None:
                    return False
                try:
                    data = _content(fd, name, int.from_bytes(entry[24:28], "big"), int.from_bytes(entry[36:40], "big"))
                finally:
                    os.close(fd)
            except OSError:
                return False
            if data is None or sha1(b"blob %d\0" % len(data) + data).digest() != entry[40:60]:
                return False
    finally:
        os.close(top)
    return True


def _content(fd: int, name: str, mode: int, size: int) -> bytes | None:
    """What git hashes of `name` under the folder `fd`: a link's target, a file's bytes; None for
    anything else there, or a file not of the index's `size` (a process of another sandbox may
    have put a huge one there since its stat was looked at: never read whole)."""
    if mode == LINK:
        return os.fsencode(os.readlink(name, dir_fd=fd))
    handle = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
    with os.fdopen(handle, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size & 0xFFFFFFFF != size:
            return None
        return f.read(size + 1)  # grown since: more than the index's, which fails its hash


# ------------------------------------------------------------------------------ the index
def index_walk(data: bytes) -> Iterator[tuple[str, int, int, int]]:
    """The entries of a git index of version 2 or 3 (SHA-1; the header checked by the caller),
    in order: each one's path, where its bytes start, their length (NUL padding included) and
    its flags. ValueError for an entry cut short."""
    at = 12
    for _ in range(int.from_bytes(data[8:12], "big")):
        flags = int.from_bytes(data[at + 60:at + 62], "big")
        start = at + 62 + (2 if flags & 0x4000 else 0)  # version 3: extended flags
        end = data.index(b"\0", start)
        size = (end - at + 8) // 8 * 8  # entries are NUL-padded to a multiple of 8 bytes
        yield os.fsdecode(data[start:end]), at, size, flags
        at += size


def _index_entries(data: bytes) -> dict[str, bytes]:
    """The entries of an index of version 2 (path -> its bytes, padding included); ValueError for
    another version, a conflict, or flags this does not keep."""
    if len(data) < 32 or data[:4] != b"DIRC" or int.from_bytes(data[4:8], "big") != 2:
        raise ValueError("not an index of version 2")
    if sha1(data[:-20]).digest() != data[-20:]:
        raise ValueError("the index does not match its checksum")
    found = {}
    for path, at, size, flags in index_walk(data):
        if flags & 0x3000 or flags & 0x4000:  # a stage (a conflict), or extended flags
            raise ValueError("an index entry this does not keep")
        found[path] = data[at:at + size]
    return found


def _entry(change: Change, st: os.stat_result) -> bytes:
    """An index entry of version 2 for a file just written."""
    path = os.fsencode(change.path)
    head = b"".join(n.to_bytes(4, "big") for n in (
        st.st_ctime_ns // 1_000_000_000, st.st_ctime_ns % 1_000_000_000, st.st_mtime_ns // 1_000_000_000,
        st.st_mtime_ns % 1_000_000_000,
        st.st_dev & 0xFFFFFFFF, st.st_ino & 0xFFFFFFFF, change.mode or 0, st.st_uid, st.st_gid,
        st.st_size & 0xFFFFFFFF))
    body = head + bytes.fromhex(change.blob or "") + min(len(path), 0xFFF).to_bytes(2, "big") + path
    return body + b"\0" * (8 - len(body) % 8)


def _write_index(index: Path, entries: dict[str, bytes]) -> None:
    """The index with `entries` (sorted as git sorts them: by the bytes of their paths), no
    extension (a cache of git's that it makes again), through a new file renamed over it."""
    body = b"DIRC" + (2).to_bytes(4, "big") + len(entries).to_bytes(4, "big")
    body += b"".join(entries[p] for p in sorted(entries, key=os.fsencode))
    body += sha1(body).digest()
    fresh = index.with_name("index.switch")
    fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        write_all(fd, body)
    finally:
        os.close(fd)
    os.replace(fresh, index)
