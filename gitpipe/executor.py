"""Runs one script attempt: confined as `sandbox.Launch` says, its own session, a
deadline, output streamed (with a timestamp, secrets masked) to a log file.

An attempt's processes are found through its *cage*: its cgroup (`cgroup.Group`), from
which nothing escapes however it detaches, or, where no cgroup can be made, a
`TokenCage`: the process group and every process whose environment holds the attempt's
GITPIPE_ATTEMPT_TOKEN (also used by a new daemon after a crash, see `kill_tokens`). Weak
spot of the token cage alone: a process that scrubs its environment and leaves the group
escapes it; under bwrap the PID namespace still ends it with the attempt.
"""

from __future__ import annotations

import io
import os
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from gitpipe.intake import now_iso
from gitpipe.launcher import TOKEN_VAR
from gitpipe.models import ActionStatus
from gitpipe.settings import format_size

if TYPE_CHECKING:
    from gitpipe.sandbox import Launch

KILL_GRACE = 10.0  # seconds between SIGTERM and SIGKILL (SPEC section 6)
LEFTOVER_GRACE = 2.0  # background children still alive when the script ended
CHUNK = 65536


class StreamFilter(Protocol):
    def feed(self, data: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


class Cage(Protocol):
    """The processes of one attempt."""

    def members(self) -> set[int]: ...
    def signal(self, sig: signal.Signals, spare: int | None = None) -> None: ...
    def kill(self) -> None: ...
    def limit_hit(self) -> str | None: ...
    def remove(self) -> None: ...
    def remove_later(self) -> None: ...


class TokenCage:
    """Where no cgroup can be made: the process group and every holder of the token."""

    def __init__(self, pgid: int, token: str) -> None:
        self.pgid, self.token = pgid, token

    def members(self) -> set[int]:
        return processes_of(self.pgid, self.token)

    def signal(self, sig: signal.Signals, spare: int | None = None) -> None:
        if spare is None:
            try:
                os.killpg(self.pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in self.members() - {spare}:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def limit_hit(self) -> str | None:
        return None

    def remove(self) -> None:
        self.kill()

    def remove_later(self) -> None:
        threading.Thread(target=self.remove, name="token-remove", daemon=True).start()


class _PassThrough:
    def feed(self, data: bytes) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


def stamp() -> bytes:
    """The line prefix: the time in the format of every stored time, and a space."""
    return (now_iso() + " ").encode()


class LogWriter:
    """Appends output to a log file as it comes, a timestamp at the start of every line."""

    def __init__(self, path: Path, mask: StreamFilter | None = None, limit: int | None = None) -> None:
        # A write that fails (a full disk) never raises: it is kept in `error`, the rest of the
        # log is dropped, and the attempt is stopped (see `start`). Raising here once skipped the
        # recording of an attempt's end and left its action "running".
        self.error: OSError | None = None
        self.file: io.FileIO | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "ab", buffering=0)  # noqa: SIM115 - closed in close()
        except OSError as exc:
            self.error = exc
        self.mask = mask or _PassThrough()
        self.at_line_start = True
        self.lock = threading.Lock()
        self.limit = limit  # bytes of the script's output kept (max_log_size); None: all
        self.kept = 0

    def write(self, data: bytes) -> None:
        """The script's output. Past the limit it is dropped (and still read, so the script
        never blocks on a full pipe), after one line that says so."""
        self._keep(self.mask.feed(data))

    def _keep(self, out: bytes) -> None:
        if self.limit is None:
            return self._emit(out)
        if self.kept > self.limit:  # cut already, and said so
            return None
        room = self.limit - self.kept
        if len(out) <= room:
            self.kept += len(out)
            return self._emit(out)
        self._emit(out[:room])
        self.kept = self.limit + 1  # the first byte dropped: say so once
        self.line(f"gitpipe: log cut at {format_size(self.limit)} (max_log_size in gitpipe.toml); "
                  "the rest of this attempt's output was dropped")
        return None

    def line(self, text: str) -> None:
        """A line of gitpipe's own (not the script's), e.g. "retrying after exit 1"; never cut."""
        with self.lock:
            if not self.at_line_start:
                self._write(b"\n")
                self.at_line_start = True
        self._emit(self.mask.feed(text.encode() + b"\n"))

    def _emit(self, data: bytes) -> None:
        """Write a chunk; every line starting in it gets the chunk's arrival time.

        One timestamp per chunk (not per line) and one bytes.replace: a chunk arrives at
        one moment, and a per-line strftime made a 1 GB log 15x slower than its producer.
        """
        if not data:
            return
        ts = stamp()
        with self.lock:
            body = data.replace(b"\n", b"\n" + ts)
            if self.at_line_start:
                body = ts + body
            self.at_line_start = data.endswith(b"\n")
            if self.at_line_start:
                body = body[: -len(ts)]
            self._write(body)

    def _write(self, data: bytes) -> None:
        """Append all of `data`, unless a write failed before; the caller holds the lock."""
        if self.file is None or self.error is not None:
            return
        view = memoryview(data)
        try:
            while view:
                view = view[self.file.write(view):]
        except OSError as exc:
            self.error = exc

    def close(self) -> None:
        self._keep(self.mask.flush())
        if not self.at_line_start:
            self._emit(b"\n")
        if self.file is not None:
            try:
                self.file.close()
            except OSError as exc:
                self.error = self.error or exc


@dataclass
class Outcome:
    status: ActionStatus
    exit_code: int | None
    message: str | None = None


@dataclass
class Attempt:
    """A running script; `stop()` may be called from any thread (cancel, timeout, daemon stop)."""

    proc: subprocess.Popen[bytes]
    cage: Cage
    spare: int | None  # bwrap's monitor: SIGTERM would end the sandbox at once, without grace
    reader: threading.Thread
    stopped_as: ActionStatus | None = None
    reason: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def stop(self, status: ActionStatus, reason: str, grace: float = KILL_GRACE) -> None:
        """SIGTERM the attempt's processes, SIGKILL what is left after `grace` seconds."""
        with self._lock:
            if self.stopped_as is None:
                self.stopped_as, self.reason = status, reason
        terminate(self.cage, grace, self.spare)


def bash(script: str) -> list[str]:
    """The argument list that runs a user's script."""
    return ["bash", "-eo", "pipefail", "-c", script]


def start(launch: Launch, log: LogWriter, token: str) -> Attempt:
    """Start a confined command (see `sandbox.Sandbox.launch`) in a new session, stdin on /dev/null."""
    if log.error is not None:  # its log could not even be opened (a full disk): do not start
        launch.abandon()
        raise OSError(log.error.errno, f"its log could not be opened: {log.error.strerror or log.error}")
    try:
        proc = replace(launch, env={**launch.env, TOKEN_VAR: token}).popen(
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True,
        )
    except BaseException:
        launch.abandon()
        raise
    assert proc.stdout is not None
    fd = proc.stdout.fileno()

    def pump() -> None:
        stopping = False
        while chunk := os.read(fd, CHUNK):
            log.write(chunk)
            if log.error is not None and not stopping:  # a full disk: nothing it prints can be kept
                stopping = True
                reason = f"its log could not be written: {log.error.strerror or log.error}"
                threading.Thread(target=attempt.stop, args=(ActionStatus.FAILED, reason), daemon=True).start()

    reader = threading.Thread(target=pump, name=f"log-{proc.pid}", daemon=True)
    cage: Cage = launch.group if launch.group is not None else TokenCage(proc.pid, token)
    attempt = Attempt(proc, cage, proc.pid if launch.spare else None, reader)
    reader.start()
    return attempt


def wait(attempt: Attempt, deadline: float | None, on_start: Callable[[], None] | None = None) -> Outcome:
    """Wait for the script until `deadline` (epoch seconds); kill it all when it passes."""
    if on_start:
        on_start()
    timeout = None if deadline is None else max(0.0, deadline - time.time())
    if not exited_within(attempt.proc, timeout):
        attempt.stop(ActionStatus.TIMED_OUT, "timed out")
    code = attempt.proc.wait()
    if attempt.spare is not None:
        # A sandbox: its PID namespace ended with its init, and the kernel is killing what
        # was left; nothing can run any more. Removing the emptied cgroup waits for the
        # exits (a mount namespace takes a few ms to tear down): not on the action's time.
        attempt.cage.signal(signal.SIGKILL)
        attempt.reader.join()
        limit = attempt.cage.limit_hit()
        attempt.cage.remove_later()
    else:
        # Background children still holding the log pipe: the action is over, end them.
        if attempt.cage.members():
            terminate(attempt.cage, LEFTOVER_GRACE, None)
        attempt.reader.join()
        limit = attempt.cage.limit_hit()
        attempt.cage.remove()
    assert attempt.proc.stdout is not None
    attempt.proc.stdout.close()
    if attempt.stopped_as is not None:
        return Outcome(attempt.stopped_as, code, attempt.reason)
    if limit is not None:
        return Outcome(ActionStatus.FAILED, code, limit)
    if code == 0:
        return Outcome(ActionStatus.SUCCEEDED, 0)
    return Outcome(ActionStatus.FAILED, code, f"exit status {code}" if code > 0 else f"killed by signal {-code}")


def exited_within(proc: subprocess.Popen[bytes], timeout: float | None) -> bool:
    """Whether the process exits within `timeout` seconds (None: wait for it).

    Waits on a pidfd, which wakes at the exit: Popen.wait(timeout) polls with sleeps
    that grow to 50 ms, and every action has a deadline, so each one paid up to that.
    """
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # an old kernel: the polling wait
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(fd)


def processes_of(pgid: int, token: str) -> set[int]:
    """Live processes in the group `pgid` or carrying the attempt token in their environment."""
    return set(_carriers(pgid, [token]))


def _carriers(pgid: int, tokens: list[str]) -> dict[int, str | None]:
    """Live processes in the group `pgid` (-> None) or carrying one of the attempt `tokens` in
    their environment (-> that token): one look at each process, whatever the number of tokens."""
    found: dict[int, str | None] = {}
    needles = [(f"{TOKEN_VAR}={token}".encode(), token) for token in tokens]
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if os.getpgid(pid) == pgid:
                found[pid] = None
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read()
        except (OSError, ProcessLookupError):
            continue
        for needle, token in needles:
            if needle in environ:
                found[pid] = token
                break
    return {p: t for p, t in found.items() if not _zombie(p)}


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return True


def terminate(cage: Cage, grace: float, spare: int | None) -> None:
    """SIGTERM the attempt's processes (but `spare`); SIGKILL them all after `grace` seconds."""
    cage.signal(signal.SIGTERM, spare)
    end = time.monotonic() + grace
    pause = 0.001  # short at first: most are gone at once (a sandbox's init is just exiting)
    while time.monotonic() < end:
        if not cage.members():
            return
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
    cage.kill()


def kill_tokens(tokens: list[str]) -> dict[str, int]:
    """After a crash: kill every leftover process of these attempts (their tokens), with one scan
    of the processes for them all (a restart with many running). Token -> how many it had.

    A process in the middle of an execve shows an empty environment for a moment, so one scan
    can miss it: the scans go on, 10 ms apart, until two in a row find nothing new.
    """
    killed: dict[int, str] = {}
    quiet = 0
    while quiet < 2 and tokens:
        new = {pid: token for pid, token in _carriers(-1, tokens).items() if pid not in killed and token}
        for pid in new:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        killed |= new
        quiet = 0 if new else quiet + 1
        if quiet < 2:
            time.sleep(0.01)
    return {token: sum(1 for t in killed.values() if t == token) for token in tokens}
