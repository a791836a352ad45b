"""A cgroup per action attempt: every process of the attempt in it, limits on memory and
process count, and a kill that nothing escapes however it detaches.

Works on the unified hierarchy (cgroup v2, what systemd's `Delegate=` hands a service)
and on the legacy one (cgroup v1: one mount per controller, as in many containers). The
attempts' groups live under the daemon's own group, in `gitpipe-<tag>/` (the tag is made
from the home, so two daemons on one host never touch each other's groups).

A process joins its group before it runs anything of the user's: a `sh` prefix, still
the daemon's user, writes `0` into the group's `cgroup.procs` and execs the rest (see
`sandbox._join`).

Used by `sandbox` alone.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from gitpipe.settings import format_size

log = logging.getLogger("gitpipe")
ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("pids", "memory")
_HELPER_LOCK = threading.Lock()
KILL_ROUNDS = 200  # v1 has no cgroup.kill: SIGKILL what is listed until nothing is (bounded)


@dataclass
class Group:
    """One attempt's cgroup (one directory per v1 hierarchy, or one on v2)."""

    dirs: tuple[Path, ...]  # the first one lists the members (pids on v1 when mounted)
    memory: int | None
    pids: int | None

    def admit(self, pid: int) -> None:
        """Move the process `pid` into every hierarchy of the group (ProcessLookupError: it ended)."""
        for d in self.dirs:
            fd = os.open(d / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, str(pid).encode())
            finally:
                os.close(fd)

    def members(self) -> set[int]:
        found: set[int] = set()
        for d in self.dirs:
            try:
                found.update(int(p) for p in (d / "cgroup.procs").read_text().split())
            except OSError:
                continue
        return found

    def signal(self, sig: signal.Signals, spare: int | None = None) -> None:
        for pid in self.members():
            if pid != spare:
                _kill(pid, sig)

    def kill(self) -> None:
        """SIGKILL every member, until none is left (v2: cgroup.kill; v1: rounds of kill)."""
        kill_file = self.dirs[0] / "cgroup.kill"
        if kill_file.exists():
            try:
                kill_file.write_text("1")
            except OSError:
                pass
        for _ in range(KILL_ROUNDS):
            pids = self.members()
            if not pids:
                return
            for pid in pids:
                _kill(pid, signal.SIGKILL)
            time.sleep(0.005)

    def limit_hit(self) -> str | None:
        """Why the kernel stopped the attempt, naming the limit; None when no limit was reached."""
        if self.memory is not None and self._count(("memory.events", "memory.oom_control"), "oom_kill"):
            return f"out of memory (limit {format_size(self.memory)})"
        if self.pids is not None and self._count(("pids.events",), "max"):
            return f"too many processes (limit pids = {self.pids})"
        return None

    def _count(self, names: tuple[str, ...], key: str) -> int:
        for d in self.dirs:
            for name in names:
                try:
                    text = (d / name).read_text()
                except OSError:
                    continue
                for line in text.splitlines():
                    k, _, v = line.partition(" ")
                    if k == key and v.strip().isdigit():
                        return int(v)
        return 0

    def remove(self) -> None:
        """Kill what is left and remove the group."""
        self.kill()
        for d in self.dirs:
            for _ in range(50):  # a killed process leaves its group a moment after SIGKILL
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)


    def remove_later(self) -> None:
        """`remove` on the one lasting thread that removes the groups of ended attempts, in order:
        a thread started per attempt cost the action's thread ~0.1 ms (Thread.start waits for it)."""
        global _janitor
        global _queued
        with _HELPER_LOCK:
            if _janitor is None:
                _janitor = threading.Thread(target=_remove_queued, name="cgroup-remove", daemon=True)
                _janitor.start()
            _queued += 1
        _removals.put(self)


_removals: queue.SimpleQueue[Group] = queue.SimpleQueue()
_janitor: threading.Thread | None = None
_queued = 0  # groups given to remove_later and not removed yet
_removed = threading.Condition(_HELPER_LOCK)


def _remove_queued() -> None:
    global _queued
    while True:
        group = _removals.get()
        try:
            group.remove()
        except Exception:  # never ends the thread: the next start sweeps what is left
            log.exception("cgroup: could not remove %s", group.dirs[0])
        with _removed:
            _queued -= 1
            _removed.notify_all()


def wait_removed(timeout: float) -> None:
    """Wait (at most `timeout` seconds) until the groups given to `remove_later` are gone."""
    with _removed:
        _removed.wait_for(lambda: _queued == 0, timeout)


def _kill(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Tree:
    """Where this daemon's attempt groups live: one base per hierarchy."""

    bases: tuple[Path, ...]
    limits: bool  # whether memory and pids limits can be set there
    helper: _Helper | None = field(default=None, repr=False, compare=False)  # see warm

    @classmethod
    def find(cls, tag: str) -> tuple[Tree | None, str]:
        """The attempts' parent group(s) under our own group; (None, why) when none can be made."""
        own = own_groups()
        v1 = [(ROOT / c, own.get(c)) for c in V1_CONTROLLERS if own.get(c) is not None and (ROOT / c).is_dir()]
        if v1:
            return _make(tuple(mount / rel.lstrip("/") / f"gitpipe-{tag}" for mount, rel in v1 if rel), True)
        unified = own.get("")
        mount = _unified_mount()
        if unified is None or mount is None:
            return None, "this host has no cgroup hierarchy gitpipe can use"
        return _v2_tree(mount / unified.lstrip("/"), tag)

    def group(self, key: str, memory: int | None, pids: int | None) -> Group:
        """A new, empty group for one attempt, with its limits set: the one made ahead (see
        `warm`), renamed, when there is one, else made now."""
        memory, pids = (memory, pids) if self.limits else (None, None)
        group = self._helper().take_spare(key, memory, pids)
        return group if group is not None else self.make(key, memory, pids)

    def make(self, key: str, memory: int | None, pids: int | None) -> Group:
        """A new, empty group made now, with its limits set (`group` without the one made ahead:
        for a caller already in the background, as the launcher that parks in it)."""
        dirs = []
        for base in self.bases:
            d = base / key
            if d.exists():  # a leftover of a crash with the same key: empty it first
                Group((d,), None, None).remove()
            d.mkdir()
            dirs.append(d)
        group = Group(tuple(dirs), memory, pids)
        for d in dirs:
            _write_limits(d, memory, pids)
        return group

    def warm(self) -> None:
        """Begin, in the background, the wait the next move into a group will have, and make
        the next attempt's group ahead (with the limits `group` was last asked for).

        The kernel's first cgroup migration after a quiet spell waits for an RCU grace period
        (cgroup_threadgroup_rwsem's rcu_sync: ~5-9 ms on a loaded 2-core VM, measured), and
        the moves after it, within about one more period, do not. Called a few ms before an
        attempt's process is moved, this overlaps that wait with the work in between. It
        writes the daemon's pid into the group it is in already: a move to where it is.
        One already under way serves every caller (the scheduler and the sandbox both ask, a
        few ms apart, for the same attempt). It runs on one lasting thread of the tree: a
        thread started per call cost the action ~0.1 ms each time.

        The group made ahead (mkdir and its limits, ~0.25 ms with a migration's lock held
        elsewhere) is taken by `group` with a rename (cgroup v1; v2 cannot rename a group,
        and there each group is made when asked for)."""
        self._helper().request()

    def _helper(self) -> _Helper:
        with _HELPER_LOCK:  # the actions of a group ask at once: one helper
            if self.helper is None:
                self.helper = _Helper(self.bases)
            return self.helper

    def sweep(self) -> int:
        """Kill and remove the groups a previous daemon left (after a crash); how many."""
        found = 0
        for base in self.bases:
            for d in base.iterdir():
                if d.is_dir():
                    found += 1
                    Group((d,), None, None).remove()
        return found

    def close(self) -> None:
        """The daemon stops: remove its (empty) bases, so a host keeps no stale groups."""
        if self.helper is not None:
            self.helper.stop()
        wait_removed(5.0)  # the groups of the last attempts, being removed
        for base in self.bases:
            try:
                base.rmdir()
            except OSError:  # still holds an attempt's group: the next start sweeps it
                pass


class _Helper:
    """The tree's lasting background thread: the warm-up migration, then the next group ahead."""

    def __init__(self, bases: tuple[Path, ...]) -> None:
        self.bases = bases
        self.cond = threading.Condition()
        self.asked = False
        self.limits: tuple[int | None, int | None] | None = None  # what `group` was last asked for
        self.busy = False
        self.stopped = False
        self.spare: Group | None = None  # made ahead, named spare-<n>, not yet given out
        self.renames = True  # False once a rename failed (cgroup v2): no more groups made ahead
        self.made = 0
        self.thread = threading.Thread(target=self._loop, name="cgroup-warm", daemon=True)
        self.thread.start()

    def request(self) -> None:
        with self.cond:
            if self.busy or self.stopped:
                return
            self.asked = True
            self.cond.notify()

    def take_spare(self, key: str, memory: int | None, pids: int | None) -> Group | None:
        """The group made ahead, renamed to `key`, when it has these limits; else None."""
        with self.cond:
            spare, self.spare = self.spare, None
            self.limits = (memory, pids)
        if spare is None:
            return None
        if (spare.memory, spare.pids) == (memory, pids) and self.renames:
            done: list[tuple[Path, Path]] = []
            try:
                for d in spare.dirs:
                    if (d.parent / key).exists():  # a leftover of a crash with the same key
                        Group((d.parent / key,), None, None).remove()
                    d.rename(d.parent / key)
                    done.append((d, d.parent / key))
                return Group(tuple(new for _, new in done), memory, pids)
            except OSError as exc:
                self.renames = False
                log.debug("cgroup: a group cannot be renamed here (%s): each is made when asked for", exc)
                spare = Group(tuple(new for _, new in done) + spare.dirs[len(done):], None, None)
        threading.Thread(target=spare.remove, name="cgroup-remove", daemon=True).start()
        return None

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify()
        self.thread.join(5)
        with self.cond:
            spare, self.spare = self.spare, None
        if spare is not None:
            spare.remove()

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.asked and not self.stopped:
                    self.cond.wait()
                if self.stopped:
                    return
                self.asked, self.busy, limits = False, True, self.limits
            try:
                _rewrite_own()
                if self.spare is None and self.renames and limits is not None:
                    self._make_spare(*limits)
            finally:
                with self.cond:
                    self.busy = False

    def _make_spare(self, memory: int | None, pids: int | None) -> None:
        self.made += 1
        dirs: list[Path] = []
        try:
            for base in self.bases:
                d = base / f"spare-{self.made}"
                d.mkdir()
                dirs.append(d)
                _write_limits(d, memory, pids)
        except OSError as exc:  # the next attempt makes its own
            log.debug("cgroup: could not make a group ahead: %s", exc)
            Group(tuple(dirs), None, None).remove()
            return
        with self.cond:
            if self.stopped:
                spare = Group(tuple(dirs), None, None)
            else:
                self.spare, spare = Group(tuple(dirs), memory, pids), None
        if spare is not None:
            spare.remove()


def _write_limits(d: Path, memory: int | None, pids: int | None) -> None:
    writes: list[tuple[str, str]] = []
    if memory is not None:
        writes += [("memory.max", str(memory)), ("memory.swap.max", "0"),
                   ("memory.limit_in_bytes", str(memory)), ("memory.memsw.limit_in_bytes", str(memory))]
    if pids is not None:
        writes.append(("pids.max", str(pids)))
    for name, value in writes:
        path = d / name
        if path.exists():
            try:
                path.write_text(value)
            except OSError as exc:  # memsw without swap accounting, ...
                log.debug("cgroup: could not set %s: %s", path, exc)


def _make(bases: tuple[Path, ...], limits: bool) -> tuple[Tree | None, str]:
    try:
        for base in bases:
            base.mkdir(exist_ok=True)
            probe = base / "probe"
            probe.mkdir(exist_ok=True)
            probe.rmdir()
    except OSError as exc:
        return None, f"cannot create cgroups under {bases[0].parent} ({exc.strerror})"
    return Tree(bases, limits), ""


def _v2_tree(own: Path, tag: str) -> tuple[Tree | None, str]:
    """cgroup v2: controllers reach a child only through a parent without processes of its own.

    Under systemd (Delegate=yes) the service's group holds the daemon itself; it moves
    into `<own>/daemon` when it is the only process there, so `<own>` can pass the memory
    and pids controllers on to `<own>/gitpipe-<tag>/<attempt>`.
    """
    base = own / f"gitpipe-{tag}"
    tree, why = _make((base,), False)
    if tree is None:
        return None, why
    wanted = {"memory", "pids"}
    try:
        available = set((own / "cgroup.controllers").read_text().split())
        if not wanted <= available:
            return tree, f"the memory and pids controllers are not delegated to {own}"
        members = (own / "cgroup.procs").read_text().split()
        if members and members != [str(os.getpid())]:
            return tree, f"{own} holds other processes, so its controllers cannot be passed on"
        if members:
            leaf = own / "daemon"
            leaf.mkdir(exist_ok=True)
            (leaf / "cgroup.procs").write_text("0")
        (own / "cgroup.subtree_control").write_text("+memory +pids")
        (base / "cgroup.subtree_control").write_text("+memory +pids")
    except OSError as exc:
        return tree, f"cannot enable the memory and pids controllers under {own} ({exc.strerror})"
    tree.limits = True
    return tree, ""


def _rewrite_own() -> None:
    own = own_groups()  # read now: the daemon's group as it is, never an attempt's
    path = None
    for c in V1_CONTROLLERS:  # one hierarchy is enough: the lock is the kernel's, global
        if own.get(c) is not None and (ROOT / c).is_dir():
            path = ROOT / c / own[c].lstrip("/")
            break
    else:
        mount = _unified_mount()
        if mount is not None and "" in own:
            path = mount / own[""].lstrip("/")
    if path is None:
        return
    try:
        (path / "cgroup.procs").write_text(str(os.getpid()))
    except OSError:
        pass


def own_groups() -> dict[str, str]:
    """controller -> our group's path, from /proc/self/cgroup ("" is the unified hierarchy)."""
    found: dict[str, str] = {}
    try:
        text = Path("/proc/self/cgroup").read_text()
    except OSError:
        return found
    for line in text.splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            found[c] = path
    return found


def _unified_mount() -> Path | None:
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        left, _, right = line.partition(" - ")
        if right.split(" ", 1)[0] == "cgroup2":
            return Path(left.split()[4])
    return None
