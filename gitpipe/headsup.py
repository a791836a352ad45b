"""A push on its way: its first action's sandbox is made before git has finished the push.

hooks/pre-receive writes `<home>/ahead/<pid of git's receive-pack>`: the repo's name, the push's
quarantine (`$GIT_QUARANTINE_PATH`: its objects, until git keeps them), then git's ref lines,
with the shell's own printf (no process). That is 5-7 ms before post-receive hands the push to
the intake, while git moves the objects in, updates the refs and starts the next hook. The
daemon reads it (a thread of its own, which the inotify thread wakes: `heard`), takes the
worktree slot the run's first checkout will get and makes that action's sandbox in it from the
parked launcher (`WorktreePool.heads_up`). Made from the post-receive instead, bwrap's
namespaces and mounts (4-6 ms on a 2-core build host, the cgroup move already done) were the
longest branch of the way from push to exec.

It is made from the pushed commit's pipeline, read in the quarantine; where it is not there
(packed: a large push; an older hook, which names no quarantine) from a guess, the pipeline of
the last push of that ref the daemon recorded (else of that repo). The intake's early reset
(Daemon._prepare_early) takes the slot, and the run's first action keeps the sandbox only when
it is exactly the box the recorded pipeline asks for (scheduler._made_for); else it makes its
own, as without a heads-up. A push that never comes (refused by a later hook, or by git) lets
its slot go when it is answered, or after KEPT seconds.

Measured and left out: resetting the slot's tree at the heads-up too, from the quarantine's
objects. On a 2-core host the push's own git is busy then: the reset's ~1.6 ms of CPU added
~1.5 ms to the push (the hook's row of bench_peers.py) and took nothing off push to exec.

Trust: a heads-up is taken only from a file of the daemon's user (or root), the users whose
hooks the intake takes pushes from; it names a registered repo and a ref, which picks the slots
(protected refs have their own) as the push's own run does. It runs nothing: the sandbox waits
for the order that only the run's start writes. The quarantine it names is read only when it
is a folder git makes for a push (`tmp_objdir-incoming-*`) right in that repo's objects/, and
every object read there is checked against its name.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from gitpipe import git
from gitpipe.intake import PIPELINE_FILE
from gitpipe.pipeline import KEPT_MAX_BYTES

if TYPE_CHECKING:
    from gitpipe.scheduler import Host

log = logging.getLogger("gitpipe")

KEPT = 30.0  # seconds a heads-up's slot waits for its push
AT_ONCE = 4  # heads-ups held at once: a burst of pushes holds no more slots than this
TEXTS_KEPT = 256  # (repo, ref) pipelines remembered for the guess
MAX_BYTES = 16384  # of a heads-up file read: a ref line is at most a few hundred bytes
# the quarantine folders git makes in objects/ for a push (tmp-objdir.c; "incoming-" before git 2.19)
QUARANTINE_PREFIXES = ("tmp_objdir-incoming-", "incoming-")


@dataclass
class _Pending:
    made: threading.Event = field(default_factory=threading.Event)
    pool: git.WorktreePool | None = None
    at: float = field(default_factory=time.monotonic)
    given_up: bool = False  # the push came while it was being made and did not wait for it
    push: int = 0  # the pid of git's receive-pack that wrote it (its name)


class HeadsUp:
    """The heads-ups of one daemon: `heard` reads them, `take` hands their pools to the pushes."""

    def __init__(self, folder: Path, host: Callable[[], Host | None], busy: Callable[[], bool]) -> None:
        self.folder = folder
        # the folder is removed when a daemon stops: here, the last one was killed
        self.unclean = folder.is_dir()
        self.host, self.busy = host, busy
        self.lock = threading.Lock()
        self.pending: dict[tuple[str, str], _Pending] = {}
        self.texts: OrderedDict[tuple[str, str], str] = OrderedDict()  # (repo, ref or "") -> pipeline
        self.closed = False
        self.due = threading.Event()  # heads-up files to read (see `heard`)
        self.thread: threading.Thread | None = None

    def learned(self, repo: str, ref: str, text: str) -> None:
        """The pipeline a push of `ref` brought: the guess for the next push of it (and of the repo).
        One longer than pipeline.KEPT_MAX_BYTES is no guess: it is not kept."""
        if len(text) > KEPT_MAX_BYTES:
            return
        with self.lock:
            for key in ((repo, ref), (repo, "")):
                self.texts[key] = text
                self.texts.move_to_end(key)
            while len(self.texts) > TEXTS_KEPT:
                self.texts.popitem(last=False)

    def heard(self) -> None:
        """A heads-up file was written (the watch's thread): the heads-up thread reads it. Making
        one can take long (a large HOME its slot's last run left, removed first), and the watch's
        thread is the one that hears wake files (cancels, approvals, retries): they must not wait."""
        with self.lock:
            if self.closed:
                return
            if self.thread is None:
                self.thread = threading.Thread(target=self._serve, name="heads-up", daemon=True)
                self.thread.start()
        self.due.set()

    def _serve(self) -> None:
        """The heads-up thread: reads the files it is woken for, and lets go of the heads-ups
        whose push did not come within KEPT (nothing else may wake the loop meanwhile: a push
        git refused, on an idle daemon)."""
        timeout = None
        while True:
            self.due.wait(timeout)
            self.due.clear()
            if self.closed:
                return
            self._read_all()
            timeout = self.expire()

    def _read_all(self) -> None:
        """Read and remove the heads-up files; make what each announces."""
        try:
            entries = list(os.scandir(self.folder))
        except OSError:
            return
        for entry in entries:
            announced = _read(entry.path)
            if announced is not None:
                try:
                    self._make(announced, push=int(entry.name) if entry.name.isdigit() else 0)
                except Exception as exc:  # a heads-up only ever saves time: never a reason to stop
                    log.warning("heads-up of a push to %s: %s (its run starts as usual)", announced.repo, exc)

    def take(self, repo: str, ref: str) -> git.WorktreePool | None:
        """The pool whose slot a heads-up of this push took (its sandbox made in it), if any."""
        with self.lock:
            pending = self.pending.pop((repo, ref), None)
        if pending is None:
            return None
        if not pending.made.wait(1.0):  # slow (a large HOME left to remove): not waited for longer
            with self.lock:
                pending.given_up = not pending.made.is_set()
            if pending.given_up:
                return None
        return pending.pool

    def answered(self, push: int) -> None:
        """The intake answered the push of git's receive-pack `push`: a heads-up of it that its
        run did not take (it recorded no run, or its first run is of another ref) goes now."""
        with self.lock:
            mine = [k for k, p in self.pending.items() if p.push == push and p.made.is_set()]
            pools = [self.pending.pop(k).pool for k in mine]
        for pool in pools:
            if pool is not None:
                pool.close()

    def expire(self) -> float | None:
        """Let the slots of heads-ups whose push did not come go; seconds until the next one is due
        (the heads-up thread's timer: see `_serve`)."""
        now = time.monotonic()
        with self.lock:
            stale = [k for k, p in self.pending.items() if p.made.is_set() and now - p.at >= KEPT]
            pools = [self.pending.pop(k).pool for k in stale]
            # one still being made is not due (0 s would have its thread look without pause): the
            # heads-up thread, its maker, looks again once it is made (`_serve`)
            due = [p.at + KEPT - now for p in self.pending.values() if p.made.is_set()]
        for pool in pools:
            if pool is not None:
                pool.close()
        return max(0.0, min(due)) if due else None

    def close(self) -> None:
        """The daemon stops: every slot taken goes, and pushes from now on write no heads-up."""
        with self.lock:
            self.closed = True
            pending, self.pending = list(self.pending.values()), {}
        self.due.set()  # the heads-up thread ends
        for p in pending:
            p.made.wait(5.0)
            if p.pool is not None:
                p.pool.close()
        for name in _names(self.folder):
            _unlink(self.folder / name)
        try:
            self.folder.rmdir()  # the hook writes only where it exists
        except OSError:
            pass

    def _make(self, announced: _Announced, push: int) -> None:
        repo, ref = announced.repo, announced.ref
        host = self.host()
        key = (repo, ref)
        with self.lock:
            guess = self.texts.get(key) or self.texts.get((repo, ""))
            if (host is None or (guess is None and announced.incoming is None) or self.closed
                    or key in self.pending or len(self.pending) >= AT_ONCE or self.busy()):
                return
            pending = self.pending[key] = _Pending(push=push)
        from gitpipe.scheduler import first_ahead

        pool = None
        try:
            pool = host.pool(repo, ref)  # an unregistered repo: UsageError
            incoming = _quarantine(pool.objects, announced.incoming)
            text = guess
            if incoming is not None:
                text = git.show_in_push(pool.objects.parent, incoming, announced.sha, PIPELINE_FILE) or guess
            make = None if text is None else first_ahead(host, pool, repo, ref, text)
            if make is None or not pool.heads_up(make):
                pool.close()
                pool = None
        finally:
            with self.lock:
                pending.pool = pool
                pending.made.set()
                drop = pool is not None and (pending.given_up or self.closed)
                if pool is None and self.pending.get(key) is pending:
                    del self.pending[key]
            if drop and pool is not None:
                pool.close()


@dataclass(frozen=True)
class _Announced:
    """What a heads-up file says: the repo, the first ref the push writes and its new commit, and
    the push's quarantine as the hook saw it ("" from a hook of before it was written)."""

    repo: str
    ref: str
    sha: str
    incoming: str


def _quarantine(objects: Path, named: str) -> Path | None:
    """The quarantine a heads-up names, when it is one git made for a push to this repo: a folder
    (not a link) named as git names them, right in the repo's `objects` folder."""
    if not named.startswith("/"):
        return None
    path = Path(named)
    if not path.name.startswith(QUARANTINE_PREFIXES):
        return None
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return None
        if os.path.realpath(path.parent) != os.path.realpath(objects):
            return None
    except OSError:
        return None
    return path


def _read(path: str) -> _Announced | None:
    """What the heads-up file at `path` announces, the file removed; None for a file that is not
    one (not the daemon's user's or root's, not a regular file, no ref)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        fd = -1
    _unlink(Path(path))  # whatever it is (a link: the link)
    if fd < 0:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid not in (os.geteuid(), 0) or time.time() - st.st_mtime > KEPT:
            return None
        data = os.read(fd, MAX_BYTES).decode("utf-8", "replace")
    finally:
        os.close(fd)
    repo, _, rest = data.partition("\n")
    lines = rest.split("\n")
    incoming = lines.pop(0) if lines and lines[0].startswith("/") else ""  # a ref line starts with its sha
    for line in lines:
        fields = line.split(" ")
        if len(fields) == 3 and fields[1].strip("0") and repo:  # a deletion makes no run
            return _Announced(repo, fields[2], fields[1], incoming)
    return None


def _names(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
