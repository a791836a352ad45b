"""The systemd unit and the sd_notify protocol (READY=1, WATCHDOG=1, STOPPING=1)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from gitpipe import resources
from tests.helpers import GITPIPE, Home, base_env

UNIT = resources.folder("systemd") / "gitpipe.service"


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{tool} is missing; .ci/run installs it")
        pytest.skip(f"{tool} is not installed here")
    return path


def test_unit_has_what_the_service_needs() -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "Restart=on-failure", "KillMode=mixed", "TimeoutStopSec=", "WatchdogSec=",
                 "User=gitpipe", "StateDirectory=gitpipe", "ProtectSystem=strict", "ReadWritePaths=",
                 "PrivateTmp=true", "NoNewPrivileges=true", "ExecStart=/opt/gitpipe/bin/gitpipe serve"):
        assert line in text, line


def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    analyze = _need("systemd-analyze")
    # verify checks that ExecStart exists: point it at this installation's gitpipe.
    unit = tmp_path / "gitpipe.service"
    unit.write_text(UNIT.read_text().replace("/opt/gitpipe/bin/gitpipe", GITPIPE))
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "gitpipe.service" not in proc.stderr, proc.stderr


def test_notify_protocol_ready_watchdog_stopping(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.init()
    address = f"gitpipe-notify-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + address)
    sock.settimeout(20)
    env = base_env(NOTIFY_SOCKET="@" + address, WATCHDOG_USEC="400000")  # a ping every 0.2 s
    proc = subprocess.Popen([GITPIPE, "serve", "--home", str(home.home)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        got = [sock.recv(4096)]
        assert got[0] == b"READY=1"
        for _ in range(3):
            assert sock.recv(4096) == b"WATCHDOG=1"
        proc.send_signal(signal.SIGTERM)
        rest = []
        while b"STOPPING=1" not in rest:
            rest.append(sock.recv(4096))
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
