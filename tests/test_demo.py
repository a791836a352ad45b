"""`gitpipe demo` as a newcomer runs it: it must succeed, leave a report, and leave nothing running."""

from __future__ import annotations

import re
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from gitpipe.executor import processes_of
from tests.helpers import GITPIPE, base_env


@pytest.mark.timeout(180)
def test_demo_runs_the_whole_tour_and_leaves_nothing_running() -> None:
    proc = subprocess.run([GITPIPE, "demo"], env=base_env(), capture_output=True, text=True, timeout=170,
                          check=False)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    root = Path(re.search(r"gitpipe demo in (\S+)", out).group(1))
    try:
        for expected in ("remote: gitpipe: run #1 queued for main", "waits for approval",
                         "the demo approves it itself", "run #1 succeeded", "artifact site",
                         "healthcheck failed", "run #2 failed", "daemon stopped",
                         "environment production: current release 1-", "environment staging: current release 1-"):
            assert expected in out, f"{expected!r} missing from:\n{out}"
        assert "daemon is not running" not in out, out  # the demo pushes once its daemon listens
        daemon_pid = int(re.search(r"daemon started \(pid (\d+)\)", out).group(1))
        assert not Path(f"/proc/{daemon_pid}").exists() or "zombie" in Path(f"/proc/{daemon_pid}/status").read_text()
        leftovers = [t for t in _tokens(root / "home" / "gitpipe.db") if processes_of(-1, t)]
        assert not leftovers, f"processes of the demo's actions still run: {leftovers}"
        index = Path(re.search(r"report: (\S+)", out).group(1))
        assert index.is_file() and index.is_relative_to(root)
        assert "demo-shop" in index.read_text()
        run_pages = sorted((index.parent / "shop" / "runs").glob("*.html"))
        assert [p.name for p in run_pages] == ["1.html", "2.html"]
        assert (index.parent / "shop" / "environments.html").is_file()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _tokens(db: Path) -> list[str]:
    """The demo's own attempts (another gitpipe may run beside the test: never scan them all)."""
    conn = sqlite3.connect(db)
    try:
        tokens = [t for (t,) in conn.execute("SELECT token FROM attempts WHERE token != 'deploy'")]
    finally:
        conn.close()
    assert tokens, "the demo ran no action?"
    return tokens
