"""Core benchmarks (issue: the core). Prints tables of gitpipe vs the plain baseline.

    python bench/bench_core.py            # everything (about 2-3 minutes)
    python bench/bench_core.py push       # one part: push | latency | actions | worktree

- push:     `git push` to a registered repo (hooks queue a run) vs the same push to a
            bare repo without hooks; median of 30.
- latency:  push returned -> first action's script started, with the daemon running;
            median and p95 of 30.
- actions:  a run of 20 sequential `true` actions vs 20 `bash -c true`; per action.
- worktree: a 20,000-file repo: preparing a worktree for a one-file change (pool
            reuse) vs `git worktree add` of the same commit; median of 5.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (
    BIN,
    clone_with,
    commit_change,
    env_with_home,
    git,
    gitpipe,
    median,
    ms,
    p95,
    table,
    timed,
    workdir,
)

N = 30


def setup_home(root: Path) -> Path:
    home = root / "home"
    gitpipe(home, "init")
    return home


def bench_push() -> None:
    root = workdir()
    home = setup_home(root)
    gitpipe(home, "repo", "add", str(root / "hooked.git"), "--create")
    git("init", "-q", "--bare", "-b", "main", str(root / "plain.git"))
    pipeline = '[[stage]]\nname = "s"\n  [[stage.action]]\n  name = "a"\n  run = "true"\n'
    src = clone_with(root, "src", {".pipeline.toml": pipeline})
    for target in ("hooked.git", "plain.git"):  # first pushes (create main) untimed
        git("push", "-q", str(root / target), "main", cwd=src)
    hooked, plain = [], []
    for i in range(N):
        commit_change(src, i)
        plain.append(timed(lambda: git("push", "-q", str(root / "plain.git"), "main", cwd=src)))
        hooked.append(timed(lambda: git("push", "-q", str(root / "hooked.git"), "main", cwd=src)))
    runs = json.loads(gitpipe(home, "runs", "--limit", "100", "--json").stdout)
    assert len(runs) == N + 1, f"expected {N + 1} queued runs, got {len(runs)}"
    h, p = median(hooked), median(plain)
    table(f"git push, median of {N}", [
        ("push (hooks queue a run)", ms(h), ms(p), f"{h / p:.2f}x"),
        ("added by gitpipe", ms(h - p), "-", "goal: <= +20 ms, < 2.5x"),
    ])


def start_daemon(home: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([str(BIN / "gitpipe"), "serve"], env=env_with_home(home),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # let it start watching
    return proc


def stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


def wait_for(path: Path, lines: int, timeout: float = 30) -> list[str]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists():
            got = path.read_text().split()
            if len(got) >= lines:
                return got
        time.sleep(0.002)
    raise TimeoutError(f"{path} did not get {lines} lines")


def bench_latency() -> None:
    root = workdir()
    home = setup_home(root)
    gitpipe(home, "repo", "add", str(root / "r.git"), "--create")
    mark = root / "marks.txt"
    pipeline = (f'[env]\nMARK = "{mark}"\n[[stage]]\nname = "s"\n  [[stage.action]]\n  name = "a"\n'
                '  run = "date +%s.%N >> \\"$MARK\\""\n')
    src = clone_with(root, "src", {".pipeline.toml": pipeline})
    daemon = start_daemon(home)
    try:
        git("push", "-q", str(root / "r.git"), "main", cwd=src)
        wait_for(mark, 1)
        lat, whole = [], []
        for i in range(N):
            commit_change(src, i)
            t_start = time.time()
            git("push", "-q", str(root / "r.git"), "main", cwd=src)
            t_pushed = time.time()
            started = float(wait_for(mark, i + 2)[-1])
            lat.append(started - t_pushed)
            whole.append(started - t_start)
            time.sleep(0.05)
    finally:
        stop_daemon(daemon)
    table(f"push -> first action's script started ({N} pushes, daemon running)", [
        ("from `git push` start, median", ms(median(whole)), "-", "goal: < 150 ms"),
        ("from `git push` start, p95", ms(p95(whole)), "-", ""),
        ("from `git push` returned, median", ms(median(lat)), "-", "(the hook wakes the daemon"),
        ("from `git push` returned, p95", ms(p95(lat)), "-", " before git returns)"),
    ])


def bench_actions() -> None:
    root = workdir()
    home = setup_home(root)
    gitpipe(home, "repo", "add", str(root / "r.git"), "--create")
    stages = "".join(f'[[stage]]\nname = "s{i}"\n  [[stage.action]]\n  name = "a{i}"\n  run = "true"\n'
                     for i in range(20))
    src = clone_with(root, "src", {".pipeline.toml": stages})
    daemon = start_daemon(home)
    try:
        git("push", "-q", str(root / "r.git"), "main", cwd=src)  # warm the worktree pool
        durations = []
        for i in range(3):
            commit_change(src, i)
            git("push", "-q", str(root / "r.git"), "main", cwd=src)
            run_id = len(json.loads(gitpipe(home, "runs", "--json").stdout))
            durations.append(wait_run(home, run_id))
    finally:
        stop_daemon(daemon)
    base = median([timed(lambda: [subprocess.run(["bash", "-c", "true"]) for _ in range(20)])
                   for _ in range(3)])
    per, per_base = median(durations) / 20, base / 20
    table("20 sequential `true` actions (one run) vs 20 x `bash -c true`", [
        ("per action", ms(per), ms(per_base), f"{per / per_base:.1f}x"),
        ("overhead per action", ms(per - per_base), "-", "goal: < 60 ms"),
    ])


def wait_run(home: Path, run_id: int) -> float:
    """Seconds between the run's started_at and finished_at, once it finished."""
    from datetime import datetime

    end = time.monotonic() + 120
    while time.monotonic() < end:
        data = json.loads(gitpipe(home, "show", str(run_id), "--json", check=False).stdout or "{}")
        if data.get("finished_at"):
            assert data["status"] == "succeeded", data
            fmt = "%Y-%m-%dT%H:%M:%S.%fZ"
            return (datetime.strptime(data["finished_at"], fmt)
                    - datetime.strptime(data["started_at"], fmt)).total_seconds()
        time.sleep(0.2)
    raise TimeoutError(f"run {run_id} did not finish")


def bench_worktree() -> None:
    from gitpipe.git import WorktreePool

    root = workdir()
    src = root / "big"
    git("init", "-q", "-b", "main", str(src))
    git("config", "user.email", "bench@localhost", cwd=src)
    git("config", "user.name", "bench", cwd=src)
    for i in range(20_000):
        d = src / f"d{i % 200}" / f"e{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.txt").write_text(f"file {i}\n" * 5)
    git("add", "-A", cwd=src)
    git("commit", "-qm", "init", cwd=src)
    bare = root / "big.git"
    git("clone", "-q", "--bare", str(src), str(bare))
    pool = WorktreePool(root / "work", "big", bare)
    with pool.checkout(_head(src)):
        pass  # the first checkout of a slot is a full one, like any CI's first job
    ours, theirs = [], []
    for i in range(5):
        commit_change(src, i)
        git("push", "-q", str(bare), "main", cwd=src)
        sha = _head(src)

        def prepare(sha: str = sha) -> None:
            with pool.checkout(sha):
                pass

        ours.append(timed(prepare))
        wt = root / f"wt{i}"
        theirs.append(timed(lambda wt=wt, sha=sha: git("--git-dir", str(bare), "worktree", "add", "-q",
                                                       "--detach", str(wt), sha)))
        git("--git-dir", str(bare), "worktree", "remove", "--force", str(wt))
    o, t = median(ours), median(theirs)
    table("20,000-file repo, worktree for a one-file change, median of 5", [
        ("prepare worktree", ms(o), ms(t) + " (git worktree add)", f"{t / o:.0f}x faster (goal >= 20x)"),
    ])


def _head(src: Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True,
                          check=True).stdout.strip()


PARTS = {"push": bench_push, "latency": bench_latency, "actions": bench_actions, "worktree": bench_worktree}

if __name__ == "__main__":
    os.environ.setdefault("GIT_AUTHOR_NAME", "bench")
    for name in sys.argv[1:] or list(PARTS):
        PARTS[name]()
