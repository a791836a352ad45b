"""The daemon's end of the post-receive hook: a push's runs recorded and started without a Python start.

hooks/post-receive is a Perl script of builtins only (perl-base is Essential on Debian; ~1.5 ms):
a Python start alone costs a push 7-15 ms, more than all the rest of its work. The hook sends
git's ref lines to `intake.sock` in the home. Here the daemon plans the push exactly as the
Python hook does (hookmain.plan: the same rules, reading the pushed objects in this process),
records its runs through its store in one synced commit, answers the lines the pusher reads,
and wakes its loop, which starts them at once. A second later (at most once a minute a repo)
it runs the `git gc --auto` that receive-pack no longer runs in the push (repos._gc_by_daemon).

Protocol, one push per connection (the client writes, shuts its side down, reads to the end):
    request  "gitpipe-push 1 REPO RECEIVE_PACK_PID HOOK_PID PUSHER_HEX\\n", then git's ref lines
             (PUSHER_HEX empty: the pusher is the Unix user of the peer, named here from SO_PEERCRED)
    answer   "recorded\\n" or "refused\\n", then the lines for the pusher
"refused" (or no answer at all) sends the hook to the Python hook, which records the push
itself: a push is never lost to this path. Both ends record under one key (intake.push_key)
in the transaction that writes the runs, so a daemon killed between its commit and its answer,
or an answer later than the client waits, never makes a second run of a push.

Trust: the socket is in the home (mode 0700, the daemon's), and only a peer running as the
daemon's user or root is heard (SO_PEERCRED). Everything in a request is checked: the repo
must be registered and is read at its registered path (not where the hook says it runs),
pids are numbers, every ref line is `old new ref` with hex object ids and a ref name without
controls; a request that fails a check is refused whole (and the Python hook deals with it).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gitpipe import git, hookmain, intake, queue, rejectmark
from gitpipe.control import peer_uid
from gitpipe.errors import IntakeRefused, UsageError
from gitpipe.pipeline import KEPT_MAX_BYTES
from gitpipe.settings import Settings
from gitpipe.store import Store

log = logging.getLogger("gitpipe")
SOCKET = "intake.sock"  # in the home; named in hooks/post-receive too
MAGIC = b"gitpipe-push 1 "
MAX_REQUEST = 8 << 20  # bytes: a mirror push of ~50,000 refs
READ_TIMEOUT = 5.0  # seconds the client has to send its request (it sends it at once)
CONNECTIONS = 4  # pushes planned at once (threads waiting in accept); more wait in the listen backlog
KEYS_KEPT = 86400.0  # seconds a push's key is kept (its hook ended long before)
PRUNE_EVERY = 1000  # pushes
PIPELINES_KEPT = 64  # validated pipeline texts kept in memory
HEX = frozenset("0123456789abcdef")
GC_DELAY = 1.0  # seconds from a push to its repo's `git gc --auto` (repos._gc_by_daemon): after the push's end
GC_EVERY = 60.0  # seconds: at most one `git gc --auto` a repo in that time, however often it is pushed to


@dataclass(frozen=True)
class Answer:
    """What the daemon says to one push, and what it does once it said it."""

    recorded: bool  # False: the hook records the push itself
    lines: list[str]  # for the pusher
    receive_pack: int | None = None  # the push's git process: its disk reservation is given back
    queued: bool = False  # runs to start
    first: tuple[int, str, str, str, str] | None = None  # (run id, repo, ref, sha, pipeline) of the first run recorded
    git_dir: str | None = None  # the repo pushed to: its `git gc --auto` is due

    def text(self) -> bytes:
        return ("recorded\n" if self.recorded else "refused\n").encode() + "".join(f"{x}\n" for x in self.lines).encode()


class IntakeServer:
    """Listens on <home>/intake.sock; each connection is one push (see the module's docstring)."""

    def __init__(self, settings: Settings, store: Store, on_recorded: Callable[[], None],
                 on_first: Callable[[int, str, str, str, str], None] | None = None,
                 on_answered: Callable[[int], None] | None = None) -> None:
        """`on_recorded`: wakes the daemon's loop; `on_first(run id, repo, ref, sha, pipeline text)`: called with
        the push's first run once the pusher has its answer, before the wake (its worktree);
        `on_answered(pid of git's receive-pack)`: then, for every push answered."""
        self.settings = settings
        self.store = store
        self.on_recorded = on_recorded
        self.on_first = on_first
        self.on_answered = on_answered
        self.sock: socket.socket | None = None
        self.threads: list[threading.Thread] = []
        self.pipelines: dict[tuple[str, str], dict[str, Any]] = {}
        self.gc_due: set[str] = set()  # repos whose `git gc --auto` is waited for
        self.gc_last: dict[str, float] = {}  # repo -> when its last `git gc --auto` started (monotonic)
        self.lock = threading.Lock()  # of the four above, shared by the connections' threads
        self.recorded = 0
        self.closing = False
        # pre-receive's answer (rejectmark) is written by one thread at a time, and by none once
        # `closing` is set under it: close() then removes it for good
        self.mark_lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self.settings.home / SOCKET

    def start(self) -> str | None:
        """Listen; None when listening, else why not (pushes then go through the Python hook)."""
        try:
            self.sock = _listen(self.settings.home, SOCKET)
        except OSError as exc:
            return f"no intake socket at {self.path} ({exc}): each push starts Python to record its runs"
        self._prune()
        self.keep_answer()  # from now on pre-receive reads it rather than grep
        # Threads started now, each taking the next connection itself: a push waits for no
        # thread to start nor for a hand-over between two of them (~0.1-0.2 ms on a busy host).
        self.threads = [threading.Thread(target=self._accept, name=f"intake-{i}", daemon=True)
                        for i in range(CONNECTIONS)]
        for thread in self.threads:
            thread.start()
        return None

    def close(self) -> None:
        """Stop listening: from now on pushes are recorded by the Python hook (it says the daemon is down)."""
        with self.mark_lock:
            self.closing = True  # the connections being served write no answer for the hooks any more
        if self.sock is not None:
            try:
                os.unlink(self.path)  # first: a push connecting now is refused at once, not left waiting
            except OSError:
                pass
            try:
                self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() of every intake thread
            except OSError:
                pass
            self.sock.close()
            deadline = time.monotonic() + 5
            for thread in self.threads:  # each ends once the push it serves has its answer
                thread.join(max(0.0, deadline - time.monotonic()))
            self.threads = []
            self.sock = None
        rejectmark.remove(self.settings.home)  # no daemon to keep it: pre-receive greps again

    def _accept(self) -> None:
        sock = self.sock
        assert sock is not None
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:  # closed: the daemon stops
                return
            try:
                self._serve(conn)
            except Exception:  # a bug after the answer: this thread keeps taking pushes
                log.exception("intake: after answering a push")

    def _serve(self, conn: socket.socket) -> None:
        answer = Answer(False, [])
        try:
            with conn:
                answer = self._answer(conn)
                conn.settimeout(READ_TIMEOUT)
                conn.sendall(answer.text())
        except OSError:
            pass  # the hook went away (its own timeout): it records the push itself, under the same key
        # After the answer, whatever can wait: the push waits for nothing that is not its record,
        # and its run's start for nothing that is not its own (the chores come after on_recorded).
        if answer.first is not None and self.on_first is not None:
            try:
                self.on_first(*answer.first)
            except Exception as exc:  # only a head start lost: the run resets its worktree itself
                log.warning("intake: could not prepare run #%s's worktree ahead: %s", answer.first[0], exc)
        if answer.receive_pack is not None and self.on_answered is not None:
            self.on_answered(answer.receive_pack)  # what its heads-up made and no run took goes
        if answer.queued:  # claimed now: no wake file, no inotify round trip
            self.on_recorded()
        if answer.receive_pack is not None:  # the room hooks/pre-receive reserved (hookmain._reservation)
            try:
                os.unlink(self.settings.spool_dir / "pending" / str(answer.receive_pack))
            except OSError:
                pass
        if answer.git_dir is not None:
            self._gc_later(answer.git_dir)
        self.keep_answer()  # gitpipe.toml edited: the next push reads it anew

    def keep_answer(self) -> None:
        """Write pre-receive's answer anew if gitpipe.toml changed (see rejectmark): after each
        push, and as soon as the daemon hears gitpipe.toml change (a file moved in with an older
        mtime looks older than the answer to the hook: it must not wait for the next push)."""
        with self.mark_lock:
            if not self.closing and self.sock is not None:
                rejectmark.refresh(self.settings.home)

    def _gc_later(self, git_dir: str) -> None:
        """`git gc --auto` in the repo GC_DELAY from now, or GC_EVERY after its last one: what
        receive-pack would have run after each push's hooks, had repos._gc_by_daemon not turned
        it off. Later, the push's own end and its run's start are not kept waiting for it, and
        a burst of pushes is collected once."""
        with self.lock:
            if git_dir in self.gc_due:
                return
            self.gc_due.add(git_dir)
            last = self.gc_last.get(git_dir)
        delay = GC_DELAY if last is None else max(GC_DELAY, last + GC_EVERY - time.monotonic())
        timer = threading.Timer(delay, self._gc, (git_dir,))
        timer.name, timer.daemon = "intake-gc", True
        timer.start()

    def _gc(self, git_dir: str) -> None:
        with self.lock:
            self.gc_due.discard(git_dir)
            self.gc_last[git_dir] = time.monotonic()
        try:  # git decides whether there is anything to do (gc.auto), and collects in the background
            done = subprocess.run(["git", f"--git-dir={git_dir}", "gc", "--auto", "--quiet"], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
        except OSError as exc:
            log.warning("intake: could not start `git gc --auto` in %s: %s", git_dir, exc)
            return
        if done.returncode != 0:  # receive-pack no longer collects there: say so, or it grows unseen
            why = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit {done.returncode}"]
            log.warning("intake: `git gc --auto` failed in %s (%s): its loose objects are not packed; "
                        "make the repo writable by the daemon's user, or run `git config receive.autogc "
                        "true` there to let each push collect", git_dir, why[0])

    def _answer(self, conn: socket.socket) -> Answer:
        try:
            uid = peer_uid(conn)
            if uid not in (os.geteuid(), 0):
                raise IntakeRefused(f"a process of uid {uid} is not the daemon's user")
            repo, receive_pack, hook, who, text = parse(_read_all(conn))
            return self.take(repo, receive_pack, hook, who or user_name(uid), text)
        except IntakeRefused as exc:
            log.warning("intake: refused a push: %s", exc)
            return Answer(False, [f"gitpipe: the daemon refused the push ({exc}); recording it here"])
        except Exception as exc:  # the database (a full disk), a bug: the Python hook records it
            log.warning("intake: could not record a push: %s", exc, exc_info=not isinstance(exc, OSError))
            return Answer(False, [f"gitpipe: the daemon could not record the push ({exc}); recording it here"])

    def take(self, repo: str, receive_pack: int, hook: int, who: str, text: str) -> Answer:
        """Plan and record one push: the lines the pusher reads."""
        git_dir = self._repo_path(repo)
        runs, notes = hookmain.plan(DaemonReader(self, repo, git_dir), repo, who, text)
        lines: list[str] = []
        first = None
        if runs:
            key = intake.push_key(repo, receive_pack, hook, text)
            ids = record_once(self.store, key, [queue.NewRun(**run) for run in runs])
            site_url, problem = hookmain.site_url_of(str(self.settings.home))  # as the Python hook: as it is now
            for run_id, run in zip(ids, runs):
                lines += hookmain.describe(run_id, run, site_url)
            first = (ids[0], repo, runs[0]["ref"], runs[0]["sha"], runs[0].get("pipeline_text") or "")
            notes += problem
            with self.lock:
                self.recorded += 1
                prune = self.recorded % PRUNE_EVERY == 0
            if prune:
                self._prune()
        return Answer(True, lines + notes, receive_pack, bool(runs), first, git_dir)

    def _repo_path(self, repo: str) -> str:
        try:
            return self.store.repo_path(repo)
        except UsageError:
            raise IntakeRefused(f'repo "{repo}" is not registered') from None

    def _prune(self) -> None:
        try:
            with self.store.lock:  # the store's connection, between its transactions
                intake.prune_keys(self.store.conn, time.time() - KEYS_KEPT)
        except Exception as exc:  # kept for the next time: a few rows more
            log.warning("intake: could not forget old push keys: %s", exc)

    def validated(self, repo: str, text: str) -> dict[str, Any]:
        """hookmain.validate, kept in memory for a text that validated (an error may go away: a
        plugin) and is no longer than pipeline.KEPT_MAX_BYTES."""
        with self.lock:
            info = self.pipelines.get((repo, text))
        if info is None:
            info = hookmain.validate(text, repo)
            if info["error"] is None and len(text) <= KEPT_MAX_BYTES:
                with self.lock:
                    if len(self.pipelines) >= PIPELINES_KEPT:
                        self.pipelines.pop(next(iter(self.pipelines)))
                    self.pipelines[(repo, text)] = info
        return info


def user_name(uid: int) -> str:
    """The name of a Unix user (as hookmain.pusher names it when no front end does), else its uid."""
    name = _USER_NAMES.get(uid)
    if name is None:
        import pwd

        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        _USER_NAMES[uid] = name  # the daemon's user or root: asked once, not on each push
    return name


_USER_NAMES: dict[int, str] = {}


def older_hooks(store: Store) -> list[str]:
    """The repos whose post-receive is gitpipe's from before this socket (each push starts Python)."""
    older = []
    for repo in store.repos():
        try:
            text = Path(repo.path, "hooks", "post-receive").read_text(errors="replace")
        except OSError:
            continue
        if "gitpipe post-receive hook" in text and SOCKET not in text:
            older.append(repo.name)
    return older


def record_once(store: Store, key: str, runs: list[queue.NewRun]) -> list[int]:
    """Record runs under `key` (see intake.record_on), through the daemon's store: their events
    reach its listeners (the report) at once, as its own, with nothing to catch up on later."""
    with store.tx():
        known = store.get_state(key)
        if known is not None:
            return intake.recorded_ids(known)
        ids = store.create_runs(runs)
        store.set_state(key, intake.key_value(ids))
    return ids


class DaemonReader(hookmain.Reader):
    """The planner's reads in the daemon: the pipeline file and commit from the pushed loose
    objects, in this process (git.show; `git cat-file` for packed ones), validated once per text."""

    def __init__(self, server: IntakeServer, repo: str, git_dir: str) -> None:
        super().__init__(str(server.settings.home), repo, git_dir)
        self.server = server

    def pipeline(self, sha: str) -> dict[str, Any] | None:
        text = git.show(self.git_dir, sha, hookmain.PIPELINE_FILE)
        return None if text is None else self.server.validated(self.repo, text)

    def commit_info(self, sha: str) -> tuple[str | None, str | None]:
        found = git.commit_of(self.git_dir, sha)
        return found if found is not None else (None, None)


def parse(data: bytes) -> tuple[str, int, int, str, str]:
    """(repo, receive-pack pid, hook pid, pusher, ref lines) of a request; IntakeRefused when it is not one."""
    head, newline, body = data.partition(b"\n")
    if not newline or not head.startswith(MAGIC):
        raise IntakeRefused("not a gitpipe-push request")
    fields = head[len(MAGIC):].split(b" ")
    if len(fields) != 4 or not fields[1].isdigit() or not fields[2].isdigit():
        raise IntakeRefused("a malformed request line")
    try:
        repo = fields[0].decode("ascii")
        who = bytes.fromhex(fields[3].decode("ascii")).decode("utf-8", "replace")[:200]
    except ValueError:
        raise IntakeRefused("a malformed request line") from None
    text = body.decode("utf-8", "replace")
    for line in text.split("\n"):
        if line:
            _check_update(line)
    return repo, int(fields[1]), int(fields[2]), who, text


def _check_update(line: str) -> None:
    parts = line.split(" ")
    if len(parts) != 3:
        raise IntakeRefused(f"not an `old new ref` line: {line[:100]!r}")
    old, new, ref = parts
    for sha in (old, new):
        if len(sha) not in (40, 64) or not set(sha) <= HEX:
            raise IntakeRefused(f"not an object id: {sha[:70]!r}")
    if not ref.startswith("refs/") or any(ord(c) < 0x20 or c == "\x7f" for c in ref):
        raise IntakeRefused(f"not a ref name: {ref[:100]!r}")


def _read_all(conn: socket.socket) -> bytes:
    deadline = time.monotonic() + READ_TIMEOUT
    chunks: list[bytes] = []
    size = 0
    while True:
        left = deadline - time.monotonic()
        try:
            if left <= 0:
                raise TimeoutError
            conn.settimeout(left)
            chunk = conn.recv(65536)
        except TimeoutError:  # a client that connects and says nothing (or dribbles) loses its place
            raise IntakeRefused(f"no whole request within {READ_TIMEOUT:g} s") from None
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_REQUEST:
            raise IntakeRefused(f"a request longer than {MAX_REQUEST} bytes")


def _listen(home: Path, name: str) -> socket.socket:
    """Bind `name` in the home. The daemon holds the home's lock, so a socket file already there
    is a dead daemon's: replaced. Bound through /proc/self/fd when the home's path is longer than
    a socket address may be (108 bytes); the client connects from inside the home."""
    path = home / name
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    dir_fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path) if len(os.fsencode(path)) < 100 else f"/proc/self/fd/{dir_fd}/{name}")
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    finally:
        os.close(dir_fd)
    return sock
