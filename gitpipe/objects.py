"""A repository's loose objects, read in this process (no git process, no pygit2): a push
leaves its few objects loose, and the daemon reads them on every run's start.

A push's objects are in git's quarantine (`$GIT_QUARANTINE_PATH`, a folder in the repo's
objects/) while its pre-receive hooks run, and are moved into objects/ before its refs
change: `in_push` reads through both, for the daemon's work at a push's heads-up."""

from __future__ import annotations

import zlib
from pathlib import Path

from gitpipe.digest import sha1, sha256

LOOSE_MAX = 4 << 20  # a bigger object (a pushed bomb, or just big) is git's to read


def loose(git_dir: Path, sha: str) -> tuple[str, bytes] | None:
    """(kind, body) of a loose object, checked against its name; None when it is not loose."""
    return loose_in(git_dir / "objects", sha)


def in_push(git_dir: Path, incoming: Path | None, sha: str) -> tuple[str, bytes] | None:
    """`loose`, the objects of a push still in quarantine (`incoming`) included. git moves them
    into objects/ once the pre-receive hooks pass, one by one, while this reads: looked for
    there, then in quarantine, then there again, none is missed on its way."""
    found = loose(git_dir, sha)
    if found is None and incoming is not None:
        found = loose_in(incoming, sha) or loose(git_dir, sha)
    return found


def loose_in(objects: Path, sha: str) -> tuple[str, bytes] | None:
    """`loose` in an objects folder."""
    if len(sha) not in (40, 64) or not all(c in "0123456789abcdef" for c in sha):
        return None
    try:
        packed = (objects / sha[:2] / sha[2:]).read_bytes()
    except FileNotFoundError:
        return None
    inflate = zlib.decompressobj()
    raw = inflate.decompress(packed, LOOSE_MAX + 64)
    if inflate.unconsumed_tail:
        return None
    digest = sha1(raw) if len(sha) == 40 else sha256(raw)
    if digest.hexdigest() != sha:
        raise ValueError(f"loose object {sha} does not match its name")
    header, _, body = raw.partition(b"\0")
    kind, _, size = header.decode("ascii").partition(" ")
    if int(size) != len(body):
        raise ValueError(f"loose object {sha} has the wrong size")
    return kind, body
