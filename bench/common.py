"""Shared pieces of the benchmarks: a temporary gitpipe home, repos, pushes, a table."""

from __future__ import annotations

import atexit
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

BIN = Path(sys.executable).parent


def gitpipe(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the gitpipe command with this home."""
    return subprocess.run([str(BIN / "gitpipe"), *args], env=env_with_home(home),
                          capture_output=True, text=True, check=check)


def git(*args: str, cwd: Path | None = None) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def workdir() -> Path:
    """A scratch folder, removed when the benchmark ends (BENCH_KEEP=1 keeps it, to look into).
    Left behind, thousands of worktrees and homes slowed this filesystem's file creates by 25x
    for later runs (ext4, 10 us -> 245 us), which is the hot path of a worktree's reset."""
    root = Path(tempfile.mkdtemp(prefix="gitpipe-bench-"))
    if not os.environ.get("BENCH_KEEP"):
        atexit.register(shutil.rmtree, root, ignore_errors=True)  # after main's own cleanup (its daemons)
    return root


def clone_with(root: Path, name: str, files: dict[str, str]) -> Path:
    """A work repo with one commit holding `files`."""
    src = root / name
    git("init", "-q", "-b", "main", str(src))
    git("config", "user.email", "bench@localhost", cwd=src)
    git("config", "user.name", "bench", cwd=src)
    for rel, text in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    git("add", "-A", cwd=src)
    git("commit", "-qm", "init", cwd=src)
    return src


def commit_change(src: Path, n: int) -> None:
    (src / "counter.txt").write_text(f"{n}\n")
    git("add", "-A", cwd=src)
    git("commit", "-qm", f"change {n}", cwd=src)


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def p95(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))]


def table(title: str, rows: list[tuple[str, str, str, str]]) -> None:
    """Print rows of (measure, gitpipe, baseline, ratio)."""
    head = ("measure", "gitpipe", "baseline", "ratio")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(4)]
    print(f"\n{title}")
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


def ms(x: float) -> str:
    return f"{x * 1000:.1f} ms"


def env_with_home(home: Path) -> dict[str, str]:
    return {**os.environ, "GITPIPE_HOME": str(home)}


TICK = os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    """A process's resident memory, KiB (0 when gone)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK
