"""A real OpenSSH server on 127.0.0.1 for deploy tests and the deploy benchmark.

`start_sshd(dir)` runs `/usr/sbin/sshd -D -e -f CONFIG` on a free port with its own host
key, an authorized key for the current user and a known_hosts file naming it; the
`sshd` fixture wraps it for pytest. Nothing here touches the system's ssh configuration.
"""

from __future__ import annotations

import getpass
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from helpers import descendants

SSHD = Path("/usr/sbin/sshd")


class SshServer(NamedTuple):
    """What a test needs to reach the server: unpacks as (host, port, user, identity, known_hosts)."""

    host: str
    port: int
    user: str
    identity: Path
    known_hosts: Path

    def url(self, path: Path | str) -> str:
        """The ssh:// target URL of `path` on this server."""
        return f"ssh://{self.user}@{self.host}:{self.port}{path}"

    @property
    def pid_file(self) -> Path:
        return self.known_hosts.parent / "sshd.pid"

    def kill(self) -> None:
        """SIGKILL the listener and every per-connection sshd: to the client, the link drops."""
        self.signal_all(signal.SIGKILL)

    def freeze(self) -> None:
        """SIGSTOP them all: the kernel still ACKs, but nothing answers (a hung server or a black hole)."""
        self.signal_all(signal.SIGSTOP)

    def signal_all(self, sig: int) -> None:
        try:
            master = int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return
        # Connection processes call setsid(), so a process-group kill misses them: walk /proc.
        for pid in [master, *descendants(master)]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def _free_port() -> int:
    # Weak spot: another process could take the port before sshd binds it; start_sshd retries.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _keygen(path: Path) -> str:
    """Create an ed25519 key pair without passphrase; return the public key line."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "gitpipe-test", "-f", str(path)],
        check=True, stdin=subprocess.DEVNULL,
    )
    return path.with_name(path.name + ".pub").read_text().strip()


def _config(directory: Path, port: int) -> Path:
    config = directory / "sshd_config"
    config.write_text(
        "\n".join([
            f"Port {port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {directory / 'host_ed25519'}",
            f"PidFile {directory / 'sshd.pid'}",
            f"AuthorizedKeysFile {directory / 'authorized_keys'}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "StrictModes no",
            "UsePAM no",
            "MaxStartups 100",
            "MaxSessions 100",
            "Subsystem sftp internal-sftp",
            "LogLevel ERROR",
            "",
        ])
    )
    return config


def _wait_ready(proc: subprocess.Popen[bytes], port: int, timeout: float = 10.0) -> bool:
    """True once the server answers with an SSH banner; False if it died first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(4).startswith(b"SSH-"):
                    return True
        except OSError:
            time.sleep(0.02)
    return False


def start_sshd(directory: Path) -> tuple[SshServer, subprocess.Popen[bytes]]:
    """Start sshd with everything it needs under `directory`; raise RuntimeError if it will not start."""
    directory.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation directory
    host_pub = _keygen(directory / "host_ed25519")
    (directory / "authorized_keys").write_text(_keygen(directory / "id_ed25519") + "\n")
    stderr = (directory / "sshd.log").open("ab")
    for _attempt in range(5):
        port = _free_port()
        proc = subprocess.Popen(
            [str(SSHD), "-D", "-e", "-f", str(_config(directory, port))],
            stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
        )
        if _wait_ready(proc, port):
            known = directory / "known_hosts"
            known.write_text(f"[127.0.0.1]:{port} {host_pub}\n")
            server = SshServer("127.0.0.1", port, getpass.getuser(), directory / "id_ed25519", known)
            return server, proc
        stop_sshd(proc)
    raise RuntimeError(f"sshd did not start; see {directory / 'sshd.log'}")


def stop_sshd(proc: subprocess.Popen[bytes]) -> None:
    """Stop the listener and any connection process it left behind."""
    for pid in descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.kill()
    proc.wait()


def require_sshd() -> None:
    """Skip (or fail on CI) when OpenSSH's server is not installed."""
    if SSHD.exists():
        return
    message = f"{SSHD} not found: install openssh-server to run the ssh:// deploy tests"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(name="sshd")
def sshd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    """A running sshd for this test, killed afterwards (import `sshd_server` to get the `sshd` fixture)."""
    require_sshd()
    server, proc = start_sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        stop_sshd(proc)
