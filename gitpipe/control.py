"""The daemon's control socket: how accounts that cannot open the gitpipe home approve or reject.

The home is mode 0700, the daemon's alone, so an approver (`alice`) cannot open gitpipe.db.
The daemon listens on a Unix socket (`control_socket` in gitpipe.toml, default
/run/gitpipe/gitpipe.sock; systemd's RuntimeDirectory makes /run/gitpipe) that anyone on the
host may connect to. Who connected is what the kernel says (SO_PEERCRED: the uid of the
connecting process, which the client cannot choose); approvals.py decides whether that
account may. One request per connection: a JSON line in, a JSON line out.

Actions never see the socket: the sandbox shows them no /run and a private /tmp, and
settings refuse `[sandbox]` paths that would show it.

Weak spot: a client cannot tell a squatter's socket from the daemon's when the daemon is not
listening; it checks that the peer runs as the home's owner when it can see the home.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gitpipe import approvals
from gitpipe.errors import GitpipeError, UsageError
from gitpipe.settings import Settings
from gitpipe.store import Store

log = logging.getLogger("gitpipe")
MAX_REQUEST = 16 * 1024  # bytes of one request line
TIMEOUT = 10.0  # seconds a connection may take to send its request
CONNECTIONS = 8  # handled at once; more are told to try again
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket, from the kernel."""
    _, uid, _ = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    return uid


class ControlServer:
    """Listens on `settings.control_socket`; each request is decided by approvals.decide."""

    def __init__(self, settings: Settings, store: Store, on_change: Callable[[], None]) -> None:
        self.settings = settings
        self.store = store
        self.on_change = on_change
        self.sock: socket.socket | None = None
        self.slots = threading.BoundedSemaphore(CONNECTIONS)
        self.thread: threading.Thread | None = None

    def start(self) -> str | None:
        """Listen; None when listening, else why not (the daemon logs it and goes on)."""
        path = self.settings.control_socket
        if path is None:
            return 'no control socket (control_socket = ""): only accounts that can open the home approve'
        try:
            self.sock = _listen(path)
        except (OSError, UsageError) as exc:
            return (f"no control socket at {path}: {exc}; only accounts that can open the home approve "
                    "(make that directory, mode 0755, or set control_socket in gitpipe.toml)")
        self.thread = threading.Thread(target=self._accept, name="control", daemon=True)
        self.thread.start()
        return None

    def close(self) -> None:
        if self.sock is None:
            return
        path = self.settings.control_socket
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() of the control thread
        except OSError:
            pass
        self.sock.close()
        if self.thread is not None:
            self.thread.join(5)
        if path is not None:
            try:
                os.unlink(path)
            except OSError:
                pass
        self.sock = None

    def _accept(self) -> None:
        assert self.sock is not None
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed: the daemon stops
                return
            if not self.slots.acquire(blocking=False):
                _reply(conn, {"error": "the daemon is busy with other requests; try again", "exit": 1})
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="control-request", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                answer = self._answer(conn)
                conn.settimeout(TIMEOUT)  # reading may have left it at what remained of its deadline
                _reply(conn, answer)
        except OSError:
            pass  # the client went away
        finally:
            self.slots.release()

    def _answer(self, conn: socket.socket) -> dict[str, Any]:
        try:
            uid = peer_uid(conn)
            request = _read_request(conn)
        except (OSError, ValueError) as exc:
            return {"error": f"bad request: {exc}", "exit": 2}
        who = approvals.person(uid)
        try:
            row = approvals.decide(self.settings, self.store, request["run"], request["op"] == "approve",
                                   request["comment"], who, via_socket=True)
        except GitpipeError as exc:
            return {"error": str(exc), "exit": exc.exit_code}
        except Exception:  # a bug: logged, the client gets a line, the daemon goes on
            log.exception("control socket: request of %s failed", who.name)
            return {"error": "internal error in the daemon (see its log)", "exit": 1}
        finally:
            self.on_change()
        log.info("run #%s: %s %s by %s (control socket)", request["run"], row.action, row.decision, who.name)
        return {"ok": True, "action": row.action, "by": who.name}


def _listen(path: Path) -> socket.socket:
    """Bind the socket (mode 0666: who may do what is decided per request) in a directory only its
    owner (the daemon, or root) may change."""
    parent = path.parent
    if not parent.is_dir():  # not made here: systemd's RuntimeDirectory (or the admin) makes it
        raise UsageError(f"{parent} does not exist")
    st = parent.stat()
    if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
        raise UsageError(f"{parent} may be changed by others (owner uid {st.st_uid}, mode "
                         f"{stat.S_IMODE(st.st_mode):o}); the socket needs a directory only the daemon "
                         "or root may write")
    if path.is_symlink() or path.exists():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise UsageError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            raise UsageError("another daemon listens there")
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink()  # left by a daemon that died
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o666)
        sock.listen(16)
    except OSError:
        sock.close()
        raise
    return sock


def _read_line(conn: socket.socket, limit: float | None = None) -> bytes:
    """One line (without its newline) of at most MAX_REQUEST bytes; ValueError when longer.
    `limit`: seconds for the whole line (a byte at a time must not hold a slot for hours)."""
    deadline = None if limit is None else time.monotonic() + limit
    data = b""
    while b"\n" not in data:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no whole request line within {limit:g} s")
            conn.settimeout(left)
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            raise ValueError(f"longer than {MAX_REQUEST} bytes")
    return data.split(b"\n", 1)[0]


def _read_request(conn: socket.socket) -> dict[str, Any]:
    request = json.loads(_read_line(conn, TIMEOUT) or b"null")
    if not isinstance(request, dict) or request.get("op") not in ("approve", "reject"):
        raise ValueError('expected {"op": "approve" | "reject", "run": N, "comment": TEXT}')
    run, comment = request.get("run"), request.get("comment")
    if not isinstance(run, int) or isinstance(run, bool) or not (comment is None or isinstance(comment, str)):
        raise ValueError('"run" must be a run id and "comment" a string or null')
    return {"op": request["op"], "run": run, "comment": comment}


def _reply(conn: socket.socket, answer: dict[str, Any]) -> None:
    try:
        conn.sendall(json.dumps(answer).encode() + b"\n")
    except OSError:
        pass


# ---------------------------------------------------------------------------- the client
def request(path: Path, op: str, run_id: int, comment: str | None, home: Path | None = None) -> dict[str, Any]:
    """Ask the daemon listening at `path` to approve/reject; its answer. UsageError when it
    cannot be reached; the daemon's own error (refused, not waiting) as a GitpipeError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT * 3)
    try:
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise UsageError(f"cannot reach the gitpipe daemon at {path}: {exc.strerror or exc}",
                             hint="is `gitpipe serve` running? Accounts that cannot open the home decide "
                                  "approvals through it (control_socket in gitpipe.toml; --socket PATH)") from None
        _check_peer(sock, path, home)
        sock.sendall(json.dumps({"op": op, "run": run_id, "comment": comment}).encode() + b"\n")
        try:
            answer = json.loads(_read_line(sock))
        except ValueError:
            answer = None
    finally:
        sock.close()
    if not isinstance(answer, dict):
        raise UsageError(f"the daemon at {path} gave no answer", hint="see the daemon's log")
    if not answer.get("ok"):
        err = GitpipeError(str(answer.get("error") or "refused"))
        err.exit_code = int(answer.get("exit") or 1)
        raise err
    return dict(answer)


def _check_peer(sock: socket.socket, path: Path, home: Path | None) -> None:
    """When the home is visible, the peer must run as its owner (or root): not a squatter."""
    if home is None:
        return
    try:
        owner = home.stat().st_uid
    except OSError:
        return
    uid = peer_uid(sock)
    if uid not in (0, owner):
        raise UsageError(f"{path} is served by uid {uid}, not by the owner of {home} (uid {owner}); "
                         "not this gitpipe's daemon")
