"""Build caches (SPEC section 14): keyed entries restored before an attempt's script and
saved after its success, kept under `build-cache/entries/<id>/` of the home, one `p<N>` per path.

How an entry is kept safe:
- Restored so that the action can never change it (the file side is in `cachefs`): each
  cached directory becomes an overlay, the entry read-only below, an upper directory beside
  the worktree taking the action's writes, dropped when the attempt ends. A root daemon
  mounts it on the host; an unprivileged one cannot, so its attempt mounts it in a user
  namespace of its own before bwrap starts (`sandbox.Confine.overlays`). Where overlays do
  not mount, and for cached files, entries are copied. Hard links were measured too (fast)
  and rejected for restores: a script could write through them. A save does link the
  finished attempt's files into the entry (`Sandbox.ended` first waits until none of its
  processes is left, and the slot's reset unlinks them before the slot is used again).
- Saved atomically: copied into `build-cache/tmp/<id>`, flushed (syncfs), renamed into
  `build-cache/entries/<id>`, and only then recorded; a restore picks entries from the
  database, so a crash at any point leaves nothing it could pick. `sweep` removes the
  leftovers (and the overlays of a killed daemon) at start.
- Never through a symlink: a pushed commit or script controls every file, so a cached path
  (or a directory on its way) that is a symlink is neither restored into nor saved from, and
  links inside a cached tree are copied as links. Every copy, link, mkdir and size walks
  folder descriptors (`cachefs.copy_at`, `open_under`), never a path: a process of another
  attempt holding a folder of the slot open can swap a folder for a link at any moment.
- Trust: a protected run restores only entries saved by protected runs; other runs also
  restore those, unless the attempt that saved them had secrets (`Store.cache_candidates`).

Worker hosts (`cluster.worker`) keep caches of their own with this same class, in their
--dir, their entries named by the worker's name.

Known weak spots: where overlays do not mount, copying costs seconds per 300 MB; a copier
forked in the instant the daemon is killed can outlive it (its files are set aside and
removed at the next start); `gitpipe cache clear` while an attempt has an entry mounted
removes files from under its overlay (that attempt may then fail); a holder of a slot's
folder can change an unprotected entry's linked files after its save (that run's own files).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gitpipe import cachefs, space
from gitpipe.digest import hashlib  # OpenSSL's, loaded on first use (see digest)
from gitpipe.errors import GitpipeError, UsageError
from gitpipe.intake import now_iso
from gitpipe.matching import path_regex
from gitpipe.models import CacheEntry, CacheSpec, CacheUse
from gitpipe.settings import Settings
from gitpipe.store import Store

log = logging.getLogger("gitpipe")
WALK_LIMIT = 200_000  # files a key's globs may look at: the tree is job data
SAVE_MARGIN = 8 << 20  # bytes left free after a save: logs and the database still have room


@dataclass(frozen=True)
class Plan:
    """One `cache` item of an attempt: where its paths are on the host, and its key."""

    idx: int
    spec: CacheSpec
    repo: str
    action: str  # "stage/action"
    slot: str
    key: str
    targets: tuple[Path, ...]  # the paths on the host, in the worktree or the attempt's HOME
    bases: tuple[Path, ...]  # the worktree or the HOME each target must stay inside


@dataclass
class Held:
    """What one attempt's restores hold until `Caches.release`: overlay mounts and entries in use."""

    scratch: Path  # beside the worktree: the overlays' upper and work directories
    # (merged, target): mounted on the host by a root daemon at `merged`, a path beside the
    # worktree that no attempt can reach; bwrap binds it at `target`'s place in the sandbox.
    # Never mounted at `target` itself: a descriptor of the worktree's folder held by another
    # attempt could swap it for a link between the check and the mount (onto a host path).
    mounts: list[tuple[Path, Path]] = field(default_factory=list)
    # (lower, upper, work, mount point): mounted by the attempt itself (an unprivileged daemon)
    overlays: list[tuple[Path, Path, Path, Path]] = field(default_factory=list)
    entries: list[str] = field(default_factory=list)


def plans(specs: tuple[CacheSpec, ...], repo: str, action: str, tree: Path, home: Path) -> list[Plan]:
    """The caches of an attempt, their keys computed from the worktree (the commit and its inputs)."""
    out = []
    for idx, spec in enumerate(specs):
        slot = _hash(json.dumps([repo, action, spec.paths]).encode())
        digest = hashlib.sha256(slot.encode())
        for glob in spec.key:
            for rel, file_digest in key_files(tree, glob):
                digest.update(b"\0" + rel.encode() + b"\0" + file_digest)
        targets, bases = [], []
        for path in spec.paths:
            inside = Path(path[2:] if path.startswith("~/") else path)
            if inside.is_absolute() or ".." in inside.parts or not inside.parts:  # pipeline.py refuses these;
                raise GitpipeError(f'cache path "{path}" is not inside the worktree or ~')  # a worker's job too
            base = home if path.startswith("~/") else tree
            targets.append(base / inside)
            bases.append(base)
        out.append(Plan(idx, spec, repo, action, slot, digest.hexdigest(), tuple(targets), tuple(bases)))
    return out


def key_files(tree: Path, glob: str) -> list[tuple[str, bytes]]:
    """(relative path, sha256 of the content) of the files `glob` matches, sorted; a symlink counts
    as its target's text, never what it points to (a key must not read the host through a link).
    Walked by folder descriptors (`os.fwalk`), each file opened O_NOFOLLOW under its folder's: a
    folder swapped for a link meanwhile is never followed, a fifo swapped in never blocks."""
    regex = path_regex(glob)
    found: list[tuple[str, bytes]] = []
    seen = 0
    for top, dirs, names, dir_fd in os.fwalk(tree):  # follow_symlinks=False
        rel_top = os.path.relpath(top, tree)
        if rel_top == ".":
            dirs[:] = [d for d in dirs if d != ".git"]
        links = [d for d in dirs if _is_link(dir_fd, d)]  # fwalk lists links to folders as folders
        for name in names + links:
            seen += 1
            if seen > WALK_LIMIT:
                return sorted(found)
            rel = name if rel_top == "." else f"{rel_top}/{name}"
            if regex.fullmatch(rel):
                digest = _file_digest(dir_fd, name)
                if digest is not None:
                    found.append((rel, digest))
    return sorted(found)


def _is_link(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _file_digest(dir_fd: int, name: str) -> bytes | None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            return hashlib.sha256(b"link:" + os.readlink(name, dir_fd=dir_fd).encode()).digest()
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None  # gone, or swapped for a link since it was listed
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return hashlib.file_digest(f, "sha256").digest()


def _hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Caches:
    """The build caches of this host, shared by the daemon's actions."""

    def __init__(self, settings: Settings, store: Store, uid: int | None = None, gid: int | None = None,
                 userns: bool = False, host: str | None = None) -> None:
        self.settings, self.store = settings, store
        self.uid, self.gid = uid, gid  # the build user's, when the daemon is root
        self.userns = userns  # unprivileged, in bwrap: an attempt may mount overlays in a namespace of its own
        self.dir = settings.cache_dir
        self.host = host or socket.gethostname()  # a worker host: its name under [cluster.workers]
        self.lock = threading.Lock()
        self.in_use: Counter[str] = Counter()  # entries restored by a running attempt: never evicted
        self.overlay: bool | None = None  # restore directories as overlays (a root daemon); probed once

    def entry_dir(self, entry_id: str) -> Path:
        return self.dir / "entries" / entry_id

    # ------------------------------------------------------------------ restore
    def restore(self, plan: Plan, protected: bool, held: Held, say: Callable[[str], None]) -> CacheUse:
        """Restore the exact entry, else the newest of the slot (warm), else nothing; never fails the action."""
        use = CacheUse(0, 0, plan.idx, plan.spec.paths, "none")
        label = _label(plan)
        candidates = [e for e in self.store.cache_candidates(plan.repo, plan.action, plan.slot, protected)
                      if e.host == self.host]  # another host's entries have no files here
        entry = next((e for e in candidates if e.key == plan.key), None)
        match = "exact" if entry else "warm"
        entry = entry or next(iter(candidates), None)
        if entry is None:
            say(f"gitpipe: {label}: nothing to restore (no entry yet"
                f"{' saved by a protected run' if protected else ''})")
            return use
        with self.lock:
            self.in_use[entry.id] += 1
        held.entries.append(entry.id)
        start = time.monotonic()
        made: list[Path] = []
        refused: list[str] = []
        how: set[str] = set()
        try:
            for i, target in enumerate(plan.targets):
                src = self.entry_dir(entry.id) / f"p{i}"
                if not os.path.lexists(src):
                    continue  # the path was not there when the entry was saved
                why = cachefs.unsafe_target(plan.bases[i], target)
                if why:
                    say(f"gitpipe: {label}: {plan.spec.paths[i]} not restored: {why}")
                    refused.append(f"{plan.spec.paths[i]} not restored: {why}")
                    continue
                made.append(target)
                if src.is_dir() and self.use_overlay():
                    self._mount(src, plan.bases[i], target, held, f"{plan.idx}.{i}")
                    how.add("as an overlay")
                else:
                    cachefs.restore_copy(src, plan.bases[i], target, self.uid, self.gid)
                    how.add("by copy")
        except (OSError, subprocess.CalledProcessError, GitpipeError) as exc:
            self._unmount(held, made)
            for i, target in enumerate(plan.targets):
                if target in made:
                    cachefs.remove_under(plan.bases[i], target)
            say(f"gitpipe: {label}: could not restore entry {entry.id[:12]} ({_why(exc)}); going on without it")
            return replace(use, note=f"restore failed: {_why(exc)}")
        took = time.monotonic() - start
        if refused and not made:
            return replace(use, note="; ".join(refused))
        try:
            self.store.touch_cache_entry(entry.id)
        except GitpipeError:  # a full disk: the entry's age is only a hint for eviction
            pass
        say(f"gitpipe: {label}: restored {match} entry {entry.id[:12]} ({_mb(entry.size)}, {entry.files} files) "
            f"{' and '.join(sorted(how))} in {took:.2f}s")
        return replace(use, match=match, entry=entry.id, restored_size=entry.size, restore_seconds=round(took, 3))

    def use_overlay(self) -> bool:
        """Whether directories are restored as overlays: mounted on the host by a root daemon, or
        by the attempt in a user namespace of its own (an unprivileged daemon in bwrap); where
        overlays cannot be mounted (some filesystems and containers), entries are copied."""
        if self.overlay is None:
            wanted = self.uid is not None or self.userns
            self.overlay = wanted and cachefs.probe_overlay(self.dir / "probe", userns=self.uid is None)
            if wanted and not self.overlay:
                log.warning("cache: overlay mounts do not work under %s: entries are restored by copy (slower)",
                            self.dir)
        return self.overlay

    def _mount(self, src: Path, base: Path, target: Path, held: Held, name: str) -> None:
        """`target` becomes an overlay: `src` (the entry) below, read-only, never changed; what the
        action writes goes to an upper directory beside the worktree, dropped at `release`."""
        upper, work = held.scratch / name / "upper", held.scratch / name / "work"
        for d in (upper, work):
            d.mkdir(parents=True, mode=0o700)
        st = src.stat()
        os.chmod(upper, st.st_mode & 0o7777)
        cachefs.make_dir_under(base, target, self.uid, self.gid)  # by descriptors: never through a link
        if self.uid is None:  # the attempt mounts it, in its own namespace (sandbox.Confine.overlays)
            held.overlays.append((src, upper, work, target))
            return
        merged = held.scratch / name / "merged"
        merged.mkdir(mode=0o700)
        if self.gid is not None:
            os.lchown(upper, self.uid, self.gid)
        cachefs.run(["mount", "-t", "overlay", "overlay", "-o",
                     f"lowerdir={cachefs.mount_option(src)},upperdir={cachefs.mount_option(upper)},"
                     f"workdir={cachefs.mount_option(work)}", str(merged)])
        held.mounts.append((merged, target))

    def _unmount(self, held: Held, only: list[Path] | None = None) -> None:
        for merged, target in list(reversed(held.mounts)):
            if only is None or target in only:
                subprocess.run(["umount", "-l", str(merged)], capture_output=True, check=False)
                held.mounts.remove((merged, target))
        held.overlays[:] = [o for o in held.overlays if only is not None and o[3] not in only]

    def release(self, held: Held) -> None:
        """The attempt is over (saved or not): unmount its overlays, free its entries for eviction."""
        self._unmount(held)
        cachefs.remove(held.scratch)
        with self.lock:
            for entry_id in held.entries:
                self.in_use[entry_id] -= 1
        freed, held.entries[:] = bool(held.entries), []
        if freed:  # an entry in use was skipped by a save's eviction: it may go now
            try:
                for e in self.evict():
                    log.info("cache: evicted entry %s of %s %s (%s) to stay within [cache] max_size",
                             e.id[:12], e.repo, e.action, _mb(e.size))
            except GitpipeError as exc:  # a full disk: the next save evicts again
                log.warning("cache: eviction failed: %s", exc)

    # ------------------------------------------------------------------ save
    def save(self, plan: Plan, use: CacheUse, run_id: int, protected: bool, secrets: bool, held: Held,
             say: Callable[[str], None]) -> CacheUse:
        """After a success without an exact entry: save the paths as a new entry, atomically."""
        label = _label(plan)
        if use.match == "exact":
            return use
        start = time.monotonic()
        present: list[tuple[int, Path]] = []
        size = files = 0
        for i, target in enumerate(plan.targets):
            why = cachefs.unsafe_source(plan.bases[i], target)
            if why:
                say(f"gitpipe: {label}: not saved: {plan.spec.paths[i]} {why}")
                return replace(use, note=f"not saved: {plan.spec.paths[i]} {why}")
            view = next((m for m, at in held.mounts if at == target), None)
            try:
                found = cachefs.tree_size(view) if view is not None else cachefs.size_under(plan.bases[i], target)
            except OSError as exc:  # a link or a swap on the way: never followed
                say(f"gitpipe: {label}: not saved: {plan.spec.paths[i]}: {_why(exc)}")
                return replace(use, note=f"not saved: {plan.spec.paths[i]}: {_why(exc)}")
            if found is not None:
                size, files = size + found[0], files + found[1]
                present.append((i, target))
        if not present:
            say(f"gitpipe: {label}: not saved: none of {', '.join(plan.spec.paths)} exists after the script")
            return replace(use, note="not saved: no path exists")
        if size > self.settings.cache_max_size:
            say(f"gitpipe: {label}: not saved: {_mb(size)} is more than [cache] max_size")
            return replace(use, note="not saved: larger than [cache] max_size")
        if space.free_bytes(self.settings.home) < size + SAVE_MARGIN:
            say(f"gitpipe: {label}: not saved: not enough free space for {_mb(size)} on {self.settings.home}")
            return replace(use, note="not saved: disk full")
        entry_id = uuid.uuid4().hex
        tmp = self.dir / "tmp" / entry_id
        final = self.entry_dir(entry_id)
        try:
            tmp.mkdir(parents=True, mode=0o700)
            for i, target in present:
                # The attempt's processes are all gone (its PID namespace ended with its
                # script) and its worktree is reset (its files unlinked) before anyone uses the
                # slot again: its files can become the entry's by hard links. Every copy walks
                # folder descriptors (`cachefs.copy_at`): a descriptor another attempt holds
                # may still swap a folder for a link while it runs, and nothing is followed.
                # An overlay's merged view cannot be linked: copied.
                merged = next(((lo, up) for lo, up, _wk, at in held.overlays if at == target), None)
                view = next((m for m, at in held.mounts if at == target), None)
                if merged:  # mounted only in the attempt's namespace: its view is made again to copy it
                    cachefs.copy_merged(merged[1], merged[0], tmp / f"p{i}")
                elif view is not None:  # still mounted on the host, beside the worktree
                    cachefs.copy(view, tmp / f"p{i}")
                else:
                    cachefs.save_copy(plan.bases[i], target, tmp / f"p{i}", link=True)
            cachefs.syncfs(tmp)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, final)
            now = now_iso()
            self.store.add_cache_entry(CacheEntry(
                entry_id, plan.repo, plan.action, plan.slot, plan.key, plan.spec.paths, protected, secrets,
                self.host, size, files, now, now, run_id))
        except (OSError, subprocess.CalledProcessError, GitpipeError) as exc:
            cachefs.remove(tmp)
            cachefs.remove(final)
            say(f"gitpipe: {label}: not saved: {_why(exc)}")
            return replace(use, note=f"not saved: {_why(exc)}")
        took = time.monotonic() - start
        say(f"gitpipe: {label}: saved entry {entry_id[:12]} ({_mb(size)}, {files} files) in {took:.2f}s")
        self.evict(say, keep=entry_id)
        return replace(use, saved_entry=entry_id, saved_size=size, save_seconds=round(took, 3))

    # ------------------------------------------------------------------ housekeeping
    def evict(self, say: Callable[[str], None] | None = None, keep: str | None = None) -> list[CacheEntry]:
        """Remove least recently used entries of this host until they fit in [cache] max_size; never
        `keep` (the entry just saved) nor one in use (removed when its attempt releases it)."""
        every = [e for e in self.store.cache_entries() if e.host == self.host]
        entries = [e for e in every if e.id != keep]
        total = sum(e.size for e in every)
        gone = []
        for e in entries:
            if total <= self.settings.cache_max_size:
                break
            with self.lock:
                if self.in_use[e.id]:
                    continue
                self.store.remove_cache_entries([e.id])
            cachefs.remove(self.entry_dir(e.id))
            total -= e.size
            gone.append(e)
            if say:
                say(f"gitpipe: cache: evicted entry {e.id[:12]} of {e.repo} {e.action} ({_mb(e.size)}, "
                    f"last used {e.last_used_at}) to stay within [cache] max_size")
        return gone

    def sweep(self) -> int:
        """At daemon start: remove half-saved entries and files no entry row names; forget rows
        whose files are gone. Returns how many things it removed."""
        removed = cachefs.unmount_under(self.settings.work_dir)
        tmp = self.dir / "tmp"
        if tmp.is_dir():
            for d in tmp.iterdir():
                # Renamed first: a cp forked in the instant the last daemon was killed (before its
                # --pdeathsig took hold) may still be writing there; its writes then fail.
                aside = d if d.name.startswith(".trash-") else d.with_name(f".trash-{d.name}")
                if aside != d:
                    os.rename(d, aside)
                cachefs.remove(aside)
                removed += 1
        mine = {e.id: e for e in self.store.cache_entries() if e.host == self.host}
        entries = self.dir / "entries"
        on_disk = set(os.listdir(entries)) if entries.is_dir() else set()
        for name in on_disk - set(mine):
            cachefs.remove(entries / name)
            removed += 1
        lost = [i for i in mine if i not in on_disk]
        if lost:
            self.store.remove_cache_entries(lost)
        return removed + len(lost)


def clear(settings: Settings, store: Store, repo: str | None) -> tuple[int, int]:
    """`gitpipe cache clear [REPO]`: forget and remove the entries (of one repo); (count, bytes)."""
    if repo and not any(r.name == repo for r in store.repos()) and not store.cache_entries(repo):
        raise UsageError(f'no repo named "{repo}" and no cache entries of it',
                         hint="see `gitpipe cache list` for the repos that have entries")
    entries = store.cache_entries(repo)
    store.remove_cache_entries([e.id for e in entries])
    for e in entries:
        cachefs.remove(settings.cache_dir / "entries" / e.id)
    return len(entries), sum(e.size for e in entries)


def entry_json(e: CacheEntry) -> dict[str, Any]:
    """The stable shape of `gitpipe cache list --json`."""
    return {"id": e.id, "repo": e.repo, "action": e.action, "key": e.key, "paths": list(e.paths),
            "protected": e.protected, "host": e.host, "size": e.size, "files": e.files,
            "created_at": e.created_at, "last_used_at": e.last_used_at, "run": e.run_id}


def use_fields(u: CacheUse) -> dict[str, Any]:
    """A worker's cache use as its result carries it (the build host records it with `use_from`)."""
    return {k: (list(v) if k == "paths" else v) for k, v in u.__dict__.items() if k not in ("action_id", "attempt")}


def use_from(d: dict[str, Any], action_id: int, attempt: int) -> CacheUse:
    """A cache use a worker reported, its values checked for their types (None where one is wrong)."""
    def num(key: str) -> float | None:
        v = d.get(key)
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    def text(key: str) -> str | None:
        v = d.get(key)
        return v[:500] if isinstance(v, str) else None

    size, saved = num("restored_size"), num("saved_size")
    paths = tuple(str(p)[:500] for p in d.get("paths", []) if isinstance(p, str))
    match = d.get("match") if d.get("match") in ("exact", "warm", "none") else "none"
    return CacheUse(action_id, attempt, int(num("idx") or 0), paths, str(match), text("entry"),
                    None if size is None else int(size), num("restore_seconds"), text("saved_entry"),
                    None if saved is None else int(saved), num("save_seconds"), text("note"))


def use_json(u: CacheUse) -> dict[str, Any]:
    """One cache of an action in `show --json`: `restored` and `saved` (null when nothing)."""
    restored = None if u.entry is None else {"match": u.match, "entry": u.entry, "size": u.restored_size,
                                             "seconds": u.restore_seconds}
    saved = None if u.saved_entry is None else {"entry": u.saved_entry, "size": u.saved_size,
                                                "seconds": u.save_seconds}
    return {"paths": list(u.paths), "match": u.match, "restored": restored, "saved": saved, "note": u.note}


def describe(c: dict[str, Any]) -> str:
    """A `use_json` as one line: `restored exact 1a2b3c4d5e6f (12.3 MB, 0.21s); saved ... `."""
    r, s = c["restored"], c["saved"]
    parts = [f"restored {r['match']} {r['entry'][:12]} ({_mb(r['size'])} in {r['seconds']:.2f}s)" if r
             else "restored none"]
    if s:
        parts.append(f"saved {s['entry'][:12]} ({_mb(s['size'])} in {s['seconds']:.2f}s)")
    if c["note"]:
        parts.append(c["note"])
    return "; ".join(parts)


def _label(plan: Plan) -> str:
    return f"cache {plan.idx + 1} ({', '.join(plan.spec.paths)})"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f": {exc.filename}" if exc.filename else "")
    return str(exc)
