"""SshTarget: a target directory on an SSH server, reached with paramiko only.

Small steps (mkdir, lock, symlink switch) use SFTP: no remote shell is started for them.
Bigger ones are one `exec` channel each, running a POSIX `sh -c` script in which every value
went through shlex.quote: one reads the state, one builds a release (hard-links of unchanged
files with `cp -l --parents`, then one tar stream into `tar -x`, shared links, syncfs, marker).

Connecting and host keys: see sshconn.py.

Dead links, three ways, so a deploy fails within a minute instead of hanging: a killed sshd
resets the connection (noticed at once); keepalives every KEEPALIVE s with TCP_USER_TIMEOUT make
the kernel drop a link whose packets go unacknowledged; and a peer that still ACKs but no longer
answers (frozen) is caught by a watchdog on uploads (no chunk through in IO_TIMEOUT) and by a
ping (opening a channel needs the server's answer) after PING_EVERY s of silence in a wait.

Weak spots: needs GNU coreutils and GNU tar on the target (cp --parents, sync -f). A remote
script keeps running if the connection dies under it (there is no tty to hang up). The SFTP
symlink argument order is OpenSSH's; another server is detected (readlink check), not supported.
"""

from __future__ import annotations

import os
import shlex
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from gitpipe.deploy.context import DeployContext
from gitpipe.deploy.manifest import COMPLETE, MANIFEST, UploadPlan
from gitpipe.deploy.sshconn import Channel, Peer, SFTPClient, SSHException, connect
from gitpipe.deploy.targets import (
    OUTPUT_GRACE,
    RELEASE_NAME,
    SLOTS,
    Log,
    Target,
    TargetState,
    release_key,
    shared_link,
)
from gitpipe.deploy.tarstream import tar_chunks
from gitpipe.errors import DeployError

KEEPALIVE = 5  # seconds of silence before paramiko sends a keepalive
IO_TIMEOUT = 30.0  # a channel making no progress this long counts as a dead link
POLL = 0.5  # how often waits look at the connection's health
PING_EVERY = 15.0  # seconds of silence in a wait before checking that the server still answers
WINDOW = 32 << 20  # our receive window per channel (large: script output never stalls)
PACKET = 1 << 15
_SEPARATOR = b"--gitpipe-manifest--"
LOCK_CREATE_TRIES = 5  # a lock released between the failed create and the look: created again

q = shlex.quote


class SshTarget(Target):
    """A target directory on an SSH server."""

    def __init__(self, url: str, user: str, host: str, port: int, root: str, ctx: DeployContext,
                 log: Log) -> None:
        self.url, self.user, self.host, self.port, self.root = url, user, host, port, root
        self.ctx = ctx
        self.log = log
        self._sftp: SFTPClient | None = None
        self._manifests: dict[str, bytes] = {}  # read in passing by read_state
        self._dead: str | None = None  # why we closed the transport ourselves
        self._client = connect(Peer(url, user, host, port), ctx, log)
        transport = self._client.get_transport()
        assert transport is not None
        self._transport = transport
        transport.set_keepalive(KEEPALIVE)

    # ------------------------------------------------------------------ connection

    def where(self) -> str:
        return f"{self.host}:{self.root}"

    def close(self) -> None:
        self._client.close()

    def _alive(self) -> bool:
        return bool(self._transport.is_active())

    def _give_up(self, why: str) -> None:
        """Close the connection under a blocked call (paramiko's writes retry for ever otherwise)."""
        self._dead = why
        self._transport.close()

    def _ping(self, what: str) -> None:
        """Check that the server still answers: opening a channel needs its reply."""
        try:
            self._transport.open_session(timeout=IO_TIMEOUT).close()
        except (SSHException, OSError, EOFError) as e:
            self._give_up(f"no answer from {self.host} for {IO_TIMEOUT:.0f}s while {what}: the link looks dead")
            raise EOFError(self._dead) from e

    @contextmanager
    def _io(self, what: str) -> Iterator[None]:
        """Turn a transport failure into a DeployError naming the target and the step."""
        try:
            yield
        except DeployError:
            raise
        except (OSError, EOFError, SSHException) as e:
            if self._dead:
                raise DeployError(f"{self.url}: {self._dead}",
                                  hint=f"check the network to {self.host} and its sshd, then deploy again") from e
            raise DeployError(
                f"{self.url}: lost the connection to {self.host}:{self.port} while {what} "
                f"({str(e) or type(e).__name__})",
                hint=f"check that {self.host} is up and sshd runs there, then deploy again",
            ) from e

    # ------------------------------------------------------------------ commands

    def _open(self, script: str, combine: bool = False) -> Channel:
        # exec_command waits for the server's reply without a timeout: hence the watchdog.
        with _Watchdog(self, f"no answer from {self.host} for {IO_TIMEOUT:.0f}s when starting a command"):
            ch = self._transport.open_session(window_size=WINDOW, max_packet_size=PACKET, timeout=IO_TIMEOUT)
            ch.set_combine_stderr(combine)
            ch.settimeout(IO_TIMEOUT)
            # The login shell only ever sees `sh -c '<quoted script>'`: no bashisms, any login shell.
            ch.exec_command("sh -c " + q(script))
        return ch

    def _collect(self, ch: Channel, on_data: Callable[[bytes], None], what: str,
                 timeout: float | None = None) -> tuple[int, bytes]:
        """Read output until the command exits; return (exit status, stderr). 124 on `timeout`."""
        ch.settimeout(POLL)
        err = bytearray()
        deadline = None if timeout is None else time.monotonic() + timeout
        exited: float | None = None
        heard = time.monotonic()
        while True:
            while ch.recv_stderr_ready():
                err += ch.recv_stderr(1 << 16)
            try:
                data = ch.recv(1 << 16)
                if not data:
                    break
                on_data(data)
                heard = time.monotonic()
                continue
            except TimeoutError:
                pass
            now = time.monotonic()
            if not self._alive():
                raise EOFError("connection closed")
            if now - heard > PING_EVERY:  # a silent script, or a frozen server? ask.
                self._ping(what)
                heard = time.monotonic()
            if ch.exit_status_ready():
                # A background process may hold the output open for ever: stop after a grace.
                exited = exited or now
                if now - exited > OUTPUT_GRACE:
                    break
            if deadline is not None and now > deadline:
                return 124, bytes(err)
        while not ch.status_event.wait(POLL):
            if not self._alive() or (deadline is not None and time.monotonic() > deadline):
                break
        while ch.recv_stderr_ready():
            err += ch.recv_stderr(1 << 16)
        if ch.exit_status == -1 and not self._alive():
            raise EOFError("connection closed")
        return ch.exit_status, bytes(err)

    def _sh(self, script: str, what: str, check: bool = True) -> tuple[int, bytes]:
        """Run a sh script there; return (status, stdout); with `check`, non-zero is a DeployError."""
        out = bytearray()
        with self._io(what):
            ch = self._open(script)
            try:
                ch.shutdown_write()
                status, err = self._collect(ch, out.extend, what)
            finally:
                ch.close()
        if check and status != 0:
            raise self._remote_error(what, status, err)
        return status, bytes(out)

    def _remote_error(self, what: str, status: int, err: bytes) -> DeployError:
        text = err.decode(errors="replace").strip()
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return DeployError(f"{self.url}: no space left on device while {what}", hint=self.space_hint())
        detail = " / ".join(text.splitlines()[-3:]) or f"exit status {status}"
        return DeployError(f"{self.url}: {what} failed: {detail}")

    # ------------------------------------------------------------------ Target

    def prepare(self) -> None:
        # Over SFTP, like every small step: an exec starts the user's login shell, which costs
        # from a few ms to a few hundred (a .bashrc that sets up pyenv, nvm or conda).
        with self._io(f"creating {self.root}"):
            sftp = self._sftp_client()
            parts = self.root.strip("/").split("/")
            paths = ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]
            for path in [*paths, self.path("releases"), self.path("shared")]:
                try:
                    sftp.stat(path)
                except FileNotFoundError:
                    self._mkdir(sftp, path)

    def _mkdir(self, sftp: SFTPClient, path: str) -> None:
        try:
            sftp.mkdir(path)
        except OSError as e:
            try:  # another deploy may just have made it (SFTP reports EEXIST as a bare failure)
                if stat.S_ISDIR(sftp.stat(path).st_mode or 0):
                    return
            except FileNotFoundError:
                pass
            raise DeployError(f"{self.url}: cannot create {path}: {e}",
                              hint=f"create it on {self.host} and let {self.user} write there") from e

    def read_state(self) -> TargetState:
        # One exec reads the links, the releases and, in passing, the manifest of the current
        # release (the usual base of the next upload), after a separator line.
        script = (
            f"cd -- {q(self.root)} 2>/dev/null || exit 0\n"
            f"for n in current {' '.join(SLOTS)}; do\n"
            '  if [ -L "$n" ]; then printf "link %s %s\\n" "$n" "$(readlink -- "$n")"; fi\n'
            "done\n"
            "for d in releases/*/; do\n"
            '  [ -d "$d" ] || continue; n=${d#releases/}; n=${n%/}\n'
            f'  if [ -f "$d{COMPLETE}" ]; then echo "complete $n"; else echo "incomplete $n"; fi\n'
            "done\n"
            'c=$(readlink current 2>/dev/null) || exit 0\n'
            'case "$c" in releases/*) ;; *) c=$(readlink -- "$c" 2>/dev/null) || exit 0 ;; esac\n'
            f'if [ -f "$c/{COMPLETE}" ]; then echo "{_SEPARATOR.decode()} ${{c#releases/}}"; '
            f'cat -- "$c/{MANIFEST}" 2>/dev/null; fi\n'
        )
        _, out = self._sh(script, "reading the releases")
        head, sep, rest = out.partition(b"\n" + _SEPARATOR + b" ")
        if sep:
            name, _, manifest_bytes = rest.partition(b"\n")
            self._manifests[name.decode(errors="replace")] = manifest_bytes
        return _parse_state(head.decode(errors="replace"))

    def read_manifest(self, release: str) -> bytes | None:
        if release in self._manifests:
            return self._manifests[release]
        status, out = self._sh(f"cat -- {q(self.path('releases', release, MANIFEST))}",
                               f"reading the manifest of {release}", check=False)
        return out if status == 0 else None

    def upload(self, release: str, source: Path, plan: UploadPlan, shared: tuple[str, ...], log: Log) -> None:
        dest = self.release_dir(release)
        links = self.path("releases", f".{release}.links")  # not a release name: never listed
        if plan.base:
            with self._io(f"uploading release {release}"), self._sftp_client().open(links, "w") as f:
                f.write(b"\0".join(os.fsencode(p) for p in plan.linked))
        # One exec does it all: hard-links, then the tar stream, then shared links, flush, marker.
        lines = ["set -e", f"rm -rf -- {q(dest)}", f"mkdir -p -- {q(dest)}"]
        if plan.base:
            base = q(self.release_dir(plan.base))
            lines += [f"trap 'rm -f -- {q(links)}' EXIT",
                      f"(cd -- {base} && xargs -0 -r cp -l --parents -t {q(dest)} --) < {q(links)}"]
        lines.append(f"tar -x -p --no-same-owner -f - -C {q(dest)}")
        lines += self._finish_lines(release, dest, shared)
        self._send_tar("\n".join(lines), release, source, plan, log)

    def _finish_lines(self, release: str, dest: str, shared: tuple[str, ...]) -> list[str]:
        lines = [f"cd -- {q(dest)}"]
        for p in shared:
            entry, link, text = shared_link(self.root, dest, p)
            note = f'{self.url}: created empty directory {entry} (shared "{p}" was missing)'
            lines.append(f"if [ ! -e {q(entry)} ] && [ ! -L {q(entry)} ]; then "
                         f"mkdir -p -- {q(entry)}; echo {q(note)}; fi")
            lines.append(f"mkdir -p -- {q(os.path.dirname(link))}; rm -rf -- {q(link)}; "
                         f"ln -s -- {q(text)} {q(link)}")
        sync = "sync -f . 2>/dev/null || sync"  # one syncfs, not an fsync per file
        return [*lines, sync, f"printf '%s\\n' {q(release)} > {COMPLETE}.tmp",
                f"mv -f -- {COMPLETE}.tmp {COMPLETE}", sync]

    def _send_tar(self, script: str, release: str, source: Path, plan: UploadPlan, log: Log) -> None:
        what = f"uploading release {release}"
        out = bytearray()
        with self._io(what):
            ch = self._open(script)
            ch.settimeout(None)  # blocking sends: the watchdog, not a socket timeout, decides the link is dead
            try:
                try:
                    with _Watchdog(self, f"no progress for {IO_TIMEOUT:.0f}s while {what}: the link looks dead") \
                            as watchdog:
                        for chunk in tar_chunks(source, plan.sent, [(MANIFEST, plan.manifest)]):
                            if ch.exit_status_ready():
                                break  # the script gave up (disk full...): its status and stderr say why
                            ch.sendall(chunk)
                            watchdog.progress()
                        ch.shutdown_write()
                except OSError:
                    if not (self._alive() and ch.exit_status_ready()):
                        raise
                status, err = self._collect(ch, out.extend, what)
            finally:
                ch.close()
        if status != 0:
            raise self._remote_error(f"uploading release {release}", status, err)
        for line in out.decode(errors="replace").splitlines():
            log(line)

    def remove_releases(self, releases: list[str]) -> None:
        if releases:
            paths = " ".join(q(self.release_dir(r)) for r in releases)
            self._sh(f"rm -rf -- {paths}", "removing old releases")

    def set_link(self, name: str, text: str | None) -> None:
        link = self.path(name)
        with self._io(f"switching {name} to {text or 'nothing'}"):
            sftp = self._sftp_client()
            if text is None:
                try:
                    sftp.remove(link)
                except FileNotFoundError:
                    pass
                return
            tmp = self.path(f"{name}.tmp-{os.urandom(6).hex()}")
            sftp.symlink(text, tmp)
            # SFTP servers disagree on the order of symlink's arguments: check before renaming.
            if sftp.readlink(tmp) != text:
                sftp.remove(tmp)
                raise DeployError(f"{self.url}: the SFTP server made a wrong symlink for {name}",
                                  hint="gitpipe expects OpenSSH's sftp-server or internal-sftp")
            sftp.posix_rename(tmp, link)  # rename(2) over the old link: never a moment without one

    def run_script(self, script: str, cwd: str, env: dict[str, str], log: Log,
                   timeout: float | None = None) -> int:
        # SHLVL=1: the login shell already sourced ~/.bashrc (and exported its PATH); without it the
        # inner bash, seeing SSH_CLIENT at level 1, would source it a second time (pyenv, nvm: slow).
        assigns = " ".join(q(f"{k}={v}") for k, v in {"SHLVL": "1", **env}.items())
        command = f"cd -- {q(cwd)} && exec env {assigns} bash -eo pipefail -c {q(script)} </dev/null"
        pending = bytearray()

        def lines(data: bytes) -> None:
            pending.extend(data)
            *done, rest = pending.split(b"\n")
            for raw in done:
                log(f"[{self.url}] " + raw.decode(errors="replace").rstrip("\r"))
            pending[:] = rest

        with self._io("running a script"):
            ch = self._open(command, combine=True)
            try:
                ch.shutdown_write()
                status, _ = self._collect(ch, lines, "running a script", timeout)
            finally:
                ch.close()
        if pending:
            log(f"[{self.url}] " + pending.decode(errors="replace"))
        if status == 124 and timeout is not None:
            log(f"{self.url}: script timed out after {timeout:.0f}s")
        return status

    # ------------------------------------------------------------------ lock primitives

    def _sftp_client(self) -> SFTPClient:
        if self._sftp is None:
            self._sftp = self._client.open_sftp()
            self._sftp.get_channel().settimeout(IO_TIMEOUT)
        return self._sftp

    def lock_create(self, name: str, text: str) -> bool:
        path = self.path(name)
        with self._io("creating the deploy lock"):
            sftp = self._sftp_client()
            for _ in range(LOCK_CREATE_TRIES):
                try:
                    with sftp.open(path, "wx") as f:  # SFTP's CREATE|EXCL: O_EXCL on the server
                        f.write(text.encode())
                    return True
                except FileNotFoundError as e:
                    raise DeployError(f"{self.url}: cannot create the lock {path}: {self.root} does not exist") from e
                except PermissionError as e:
                    raise DeployError(f"{self.url}: cannot create the lock {path}: permission denied",
                                      hint=f"let {self.user} write to {self.root}") from e
                except OSError:
                    # OpenSSH reports EEXIST as a generic failure: look whether the lock is there.
                    # Gone by then: its holder released it between the two calls, try again.
                    try:
                        sftp.lstat(path)
                        return False
                    except FileNotFoundError:
                        continue
            raise DeployError(f"{self.url}: cannot create the lock {path} (the server refuses, and no lock is there)",
                              hint=f"look at {self.root} on {self.host}: free space, and whether {self.user} may write there")

    def lock_read(self, name: str) -> str | None:
        with self._io("reading the deploy lock"):
            try:
                with self._sftp_client().open(self.path(name), "r") as f:
                    return bytes(f.read()).decode(errors="replace")
            except FileNotFoundError:
                return None

    def lock_rename(self, name: str, new: str) -> bool:
        with self._io("taking over the deploy lock"):
            try:
                self._sftp_client().posix_rename(self.path(name), self.path(new))
                return True
            except FileNotFoundError:
                return False

    def lock_remove(self, name: str) -> None:
        with self._io("removing the deploy lock"):
            try:
                self._sftp_client().remove(self.path(name))
            except FileNotFoundError:
                pass


class _Watchdog:
    """Gives up on the connection when `progress` is not called for IO_TIMEOUT seconds."""

    def __init__(self, target: SshTarget, why: str) -> None:
        self.target, self.why = target, why
        self.last = time.monotonic()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> _Watchdog:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()

    def progress(self) -> None:
        self.last = time.monotonic()

    def _watch(self) -> None:
        while not self.done.wait(POLL):
            if time.monotonic() - self.last > IO_TIMEOUT:
                self.target._give_up(self.why)
                return


def _parse_state(text: str) -> TargetState:
    links: dict[str, str] = {}
    found: dict[str, list[str]] = {"complete": [], "incomplete": []}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "link":
            name, _, link = rest.partition(" ")
            links[name] = link
        elif kind in found and RELEASE_NAME.match(rest):
            found[kind].append(rest)
    complete, incomplete = (tuple(sorted(found[k], key=release_key)) for k in ("complete", "incomplete"))
    return TargetState(links, complete, incomplete)
