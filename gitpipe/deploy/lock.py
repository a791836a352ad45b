"""The per-target deploy lock: `<path>/.gitpipe.lock`, created with O_EXCL, naming its holder.

A second deploy polls until the lock is free (logging who holds it) up to LOCK_WAIT. A lock is
stale, and taken over with a log line saying so, when it is older than LOCK_STALE, or was written
on this host by a process that is gone, or by this very process under a token it no longer holds
(a deploy whose connection died before it could unlock).

Weak spots: waiters are not served oldest first (whoever polls first after the release wins;
the scheduler queues deploys of one environment in order). Taking over moves the stale file
aside and checks it is the one judged stale; a third deploy creating a fresh lock in the
microseconds between could still be displaced, in which case both would run.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime

from gitpipe.deploy.context import DeployContext
from gitpipe.deploy.targets import LOCK, Log, Target
from gitpipe.errors import DeployError

LOCK_POLL = 1.0  # seconds between attempts while another deploy holds the lock
LOCK_WAIT = 15 * 60.0  # give up waiting after this long
LOCK_STALE = 6 * 3600.0  # a lock this old is taken over whoever wrote it
LOCK_LOG_EVERY = 30.0  # repeat the "waiting for" line this often

# Tokens of the locks this process holds right now (see the module docstring).
_held: set[str] = set()
_held_guard = threading.Lock()


def lock_text(ctx: DeployContext) -> str:
    """The lock file's content: the holder line, then key=value lines the takeover logic reads."""
    now = time.time()
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    holder = ctx.holder or f"run #{ctx.run_id} on {socket.gethostname()} pid {os.getpid()} at {stamp}"
    fields = {"host": socket.gethostname(), "pid": str(os.getpid()), "since": f"{now:.3f}",
              "token": uuid.uuid4().hex}
    return holder + "\n" + "".join(f"{k}={v}\n" for k, v in fields.items())


def _fields(text: str) -> dict[str, str]:
    lines = text.splitlines()
    out = dict(line.split("=", 1) for line in lines[1:] if "=" in line)
    out["holder"] = lines[0] if lines else "(empty lock file)"
    return out


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def stale_reason(text: str) -> str | None:
    """Why the lock holding `text` may be taken over, or None if its holder may still be working."""
    f = _fields(text)
    try:
        age = time.time() - float(f["since"])
        pid = int(f["pid"])
    except (KeyError, ValueError):
        return None  # not written by gitpipe (or truncated): never guess, wait and then say so
    if age > LOCK_STALE:
        return f"it is {age / 3600:.1f} hours old"
    if f.get("host") == socket.gethostname():
        if _pid_gone(pid):
            return f"its process {pid} on this host is gone"
        if pid == os.getpid():
            with _held_guard:
                if f.get("token") not in _held:
                    return "this gitpipe process left it behind when a deploy ended without unlocking"
    return None


def acquire(target: Target, ctx: DeployContext, log: Log) -> str:
    """Take the lock of `target`, waiting or taking over a stale one; return the text written."""
    text = lock_text(ctx)
    deadline = time.monotonic() + LOCK_WAIT
    next_note = 0.0
    while True:
        if target.lock_create(LOCK, text):
            break
        seen = target.lock_read(LOCK)
        if seen is None:
            continue  # released between our two calls
        holder = _fields(seen)["holder"]
        why = stale_reason(seen)
        if why and _take_over(target, seen, text):
            log(f"{target.url}: took over a stale lock held by {holder}: {why}")
            break
        now = time.monotonic()
        if now > deadline:
            raise DeployError(
                f"{target.url}: still locked by {holder} after waiting {LOCK_WAIT:.0f}s",
                hint=f"if that deploy is no longer running, remove {target.path(LOCK)}",
            )
        if now >= next_note:
            log(f"{target.url}: waiting for the deploy lock held by {holder}")
            next_note = now + LOCK_LOG_EVERY
        time.sleep(LOCK_POLL)
    with _held_guard:
        _held.add(_fields(text)["token"])
    return text


def _take_over(target: Target, seen: str, text: str) -> bool:
    """Move the stale lock aside, check it is the one judged, then create ours."""
    aside = f"{LOCK}.stale-{uuid.uuid4().hex[:12]}"
    if not target.lock_rename(LOCK, aside):
        return False
    moved = target.lock_read(aside)
    target.lock_remove(aside)
    if moved != seen:
        # Someone replaced it in between: put theirs back (only if the name is still free).
        target.lock_create(LOCK, moved or "")
        return False
    return target.lock_create(LOCK, text)


def release(target: Target, text: str, log: Log) -> None:
    """Remove our lock; never someone else's. Failures are logged: the next deploy takes it over."""
    with _held_guard:
        _held.discard(_fields(text)["token"])
    try:
        if target.lock_read(LOCK) == text:
            target.lock_remove(LOCK)
    except (DeployError, OSError) as e:
        log(f"{target.url}: could not remove the deploy lock ({e}); the next deploy will take it over")
