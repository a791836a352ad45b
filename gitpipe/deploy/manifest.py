"""What a release holds, file by file, and what an upload must send given the previous release.

Each release carries `.gitpipe-manifest`: one JSON object per line (a header line, then one
entry per path, sorted), with path, type (f/d/l), mode, size and sha256 (files) or the link
target (symlinks). A redeploy hard-links every file whose size, sha256 and mode match the
previous release's entry and sends only the rest, like `rsync --link-dest`.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from gitpipe.cachefs import MAX_DEPTH
from gitpipe.errors import DeployError

MANIFEST = ".gitpipe-manifest"
COMPLETE = ".gitpipe-complete"
RESERVED = frozenset({MANIFEST, COMPLETE, COMPLETE + ".tmp"})
_VERSION = 1


@dataclass(frozen=True)
class Entry:
    """One path of a release: a file, a directory or a symlink."""

    path: str  # relative, "/"-separated
    kind: str  # "f", "d" or "l"
    mode: int = 0
    size: int = 0
    sha256: str = ""
    target: str = ""  # symlinks only

    def same_file(self, other: Entry | None) -> bool:
        """True if `other` is this very file content and mode, so it can be hard-linked."""
        return (
            other is not None and self.kind == other.kind == "f" and self.size == other.size
            and self.sha256 == other.sha256 and self.mode == other.mode
        )


@dataclass(frozen=True)
class UploadPlan:
    """What one target needs: files to hard-link from `base`, entries to send, the manifest."""

    base: str | None
    linked: tuple[str, ...]
    sent: tuple[Entry, ...]
    manifest: bytes

    @property
    def bytes_to_send(self) -> int:
        return sum(e.size for e in self.sent if e.kind == "f")


def under(path: str, prefixes: tuple[str, ...]) -> bool:
    """True if `path` is one of `prefixes` or inside one of them."""
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def scan(source: Path, skip: tuple[str, ...], log: Callable[[str], None]) -> list[Entry]:
    """Every entry below `source` except `skip` paths (shared links replace them) and special files."""
    found: list[tuple[str, os.stat_result]] = []
    try:
        for dirpath, dirnames, filenames in os.walk(source, onerror=_raise):
            base = Path(dirpath)
            if dirnames and len(base.relative_to(source).parts) + 1 > MAX_DEPTH:  # os.walk recurses per folder
                raise DeployError(f"the release source {source} holds folders more than {MAX_DEPTH} deep "
                                  f"(below {base.relative_to(source).as_posix()[:80]}...)",
                                  hint="a release is a tree to serve: make it shallower, or pack that folder")
            for name in dirnames + filenames:
                rel = (base / name).relative_to(source).as_posix()
                if rel in RESERVED:
                    log(f"skipping {rel} from the source: gitpipe writes that name itself")
                elif not under(rel, skip):
                    found.append((rel, (base / name).lstat()))
            # Symlinked directories are not descended into (os.walk's default); skipped ones neither.
            rels = {d: (base / d).relative_to(source).as_posix() for d in dirnames}
            dirnames[:] = [d for d in dirnames if not under(rels[d], skip) and rels[d] not in RESERVED]
        # hashlib releases the GIL while it hashes: a few threads hash files side by side.
        files = [rel for rel, st in found if stat.S_ISREG(st.st_mode)]
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            digests = dict(zip(files, pool.map(lambda rel: _sha256(source / rel), files), strict=True))
        return sorted(_entries(source, found, digests, log), key=lambda e: e.path)
    except OSError as e:
        raise DeployError(f"cannot read the release source: {e}") from e


def _raise(e: OSError) -> None:
    raise e


def _entries(source: Path, found: list[tuple[str, os.stat_result]], digests: dict[str, str],
             log: Callable[[str], None]) -> Iterator[Entry]:
    for rel, st in found:
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            yield Entry(rel, "l", target=os.readlink(source / rel))
        elif stat.S_ISDIR(st.st_mode):
            yield Entry(rel, "d", mode=mode)
        elif stat.S_ISREG(st.st_mode):
            yield Entry(rel, "f", mode, st.st_size, digests[rel])
        else:
            log(f"skipping {rel}: not a regular file, directory or symlink")


def dumps(entries: list[Entry]) -> bytes:
    """The manifest file's bytes; deterministic, so equal trees give equal manifests."""
    lines = [json.dumps({"gitpipe-manifest": _VERSION})]
    for e in entries:
        item: dict[str, object] = {"path": e.path, "type": e.kind}
        if e.kind == "l":
            item["target"] = e.target
        else:
            item["mode"] = e.mode
        if e.kind == "f":
            item.update(size=e.size, sha256=e.sha256)
        lines.append(json.dumps(item, sort_keys=True))
    return ("\n".join(lines) + "\n").encode()


def loads(data: bytes) -> dict[str, Entry]:
    """Parse a manifest; an unreadable one counts as empty (the upload then sends everything)."""
    entries: dict[str, Entry] = {}
    try:
        for line in data.decode().splitlines()[1:]:
            item = json.loads(line)
            entries[item["path"]] = Entry(
                item["path"], item["type"], item.get("mode", 0), item.get("size", 0),
                item.get("sha256", ""), item.get("target", ""),
            )
    except (ValueError, KeyError, TypeError):
        return {}
    return entries


def plan(entries: list[Entry], base: str | None, previous: dict[str, Entry]) -> UploadPlan:
    """Split `entries` into hard-links from `base` and entries to send."""
    linked = tuple(e.path for e in entries if base and e.same_file(previous.get(e.path)))
    keep = set(linked)
    sent = tuple(e for e in entries if e.path not in keep)
    return UploadPlan(base if linked else None, linked, sent, dumps(entries))


def check_shared(shared: tuple[str, ...]) -> tuple[str, ...]:
    """Normalise `shared` paths; each must stay inside the release."""
    out = []
    for p in shared:
        norm = os.path.normpath(p).replace(os.sep, "/")
        if not p or p.startswith("/") or norm == "." or norm.startswith("../") or norm == "..":
            raise DeployError(f'shared path "{p}" must be a relative path inside the release')
        if norm in RESERVED:
            raise DeployError(f'shared path "{p}" is a name gitpipe reserves for itself')
        out.append(norm)
    return tuple(out)
