"""Faults a pushed job can cause, on a real daemon: each is bounded, recorded, and leaves the
daemon as it was (its memory, its CPU, its database).

The bounds asserted are resources, not times: the daemon's RSS growth and the CPU seconds it
spent (read from its own /proc entry), which a shared machine's load does not inflate.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from helpers import Home, cpu_seconds, pipeline, vm_kib


@dataclass
class Cost:
    rss_growth_kib: int = 0
    cpu: float = 0.0


@contextmanager
def measured(pid: int) -> Iterator[Cost]:
    """What the daemon `pid` spent inside the block: RSS growth and CPU seconds."""
    cost = Cost()
    rss, cpu = vm_kib(pid, "VmRSS"), cpu_seconds(pid)
    yield cost
    cost.rss_growth_kib = vm_kib(pid, "VmRSS") - rss
    cost.cpu = cpu_seconds(pid) - cpu


def intact(home: Home) -> None:
    conn = sqlite3.connect(home.home / "gitpipe.db")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT COUNT(*) FROM attempts WHERE status = 'running'").fetchone()[0] == 0
    finally:
        conn.close()


FAULTS = {
    # Symlink loops and a link to / under `**`: the daemon once walked 2^40 paths, or the host.
    "glob bomb": ("""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "job"
          outputs = { o = "o/**", r = "**" }
          run = 'mkdir o && for i in 1 2 3 4; do ln -s . o/l$i; done && echo x > o/f && ln -s / rootlink'
        """, "failed", "points outside the worktree"),
    # 200 MB of output against max_log_size = 1M.
    "log flood": ("""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "job"
          run = 'head -c 200000000 /dev/zero | tr "\\\\0" y | fold -w 200'
        """, "succeeded", None),
    # A 50 GB sparse file as an output (2G allowed).
    "artifact bomb": ("""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "job"
          outputs = { o = "o/big" }
          run = 'mkdir o && truncate -s 50G o/big'
        """, "failed", "max_artifact_size"),
}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_fault_of_job_data_is_bounded_and_leaves_the_daemon_as_it_was(home: Home, fault: str) -> None:
    text, status, words = FAULTS[fault]
    home.configure('max_log_size = "1M"\n')
    repo = home.add_repo("shop")
    with home.daemon() as daemon:
        with measured(daemon.pid) as cost:
            run = home.wait_run(home.push_run(repo, {".pipeline.toml": pipeline(text)}, branch="feature"), 120)
        after = home.wait_run(home.push_run(repo, {".pipeline.toml": pipeline(
            '[[stage]]\nname = "s"\n  [[stage.action]]\n  name = "ok"\n  run = "true"\n')}))
    print(f"\n{fault}: daemon RSS {cost.rss_growth_kib:+d} KiB, CPU {cost.cpu:.2f} s")  # for the notes (-s)
    assert home.action(run, "job")["status"] == status, home.action(run, "job")
    if words:
        assert words in home.action(run, "job")["message"]
    home.expect(after)  # the next run of the repo (in the same slot) is unharmed
    assert cost.rss_growth_kib < 30 * 1024, f"{fault}: the daemon grew by {cost.rss_growth_kib} KiB"
    assert cost.cpu < 10, f"{fault}: the daemon spent {cost.cpu:.1f} s of CPU"
    stored = sum(p.stat().st_size for p in (home.home / "artifacts").rglob("*") if p.is_file())
    logs = sum(p.stat().st_size for p in (home.home / "logs").rglob("*") if p.is_file())
    assert stored < 1 << 20 and logs < 2 << 20, (stored, logs)
    intact(home)
