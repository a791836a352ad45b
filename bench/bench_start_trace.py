"""Where the time goes between `git push` and the first command of its run: a timeline.

    python bench/bench_start_trace.py [N]   # N pushes (default 15); medians in ms from the push's start
    BENCH_PAUSE=1.5 BENCH_IDLE_REPOS=19 python bench/bench_start_trace.py   # seconds between pushes
                                            # (default 0.5); idle repos registered beside (default 0)

The daemon runs in a Python of its own with perf_counter spans wrapped around the functions on
the way (nothing else changes in it); each push writes a commit whose one action runs
`date +%s.%N`, and the spans of that push are lined up against the push's start. The first
rows are the push's own work (with pre-receive's heads-up, see gitpipe/headsup.py) and the intake; the two columns after it run side by side (the
worktree reset, in the background since the intake, and the run's bookkeeping); the last rows
are the sandbox's start. Read it with bench_peers.py, which measures the same path without
the spans: they add about 1 ms. Timings swing with the machine's load (printed at the end).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BIN, env_with_home, median, workdir  # noqa: E402

# Run in the daemon's process: wraps the functions below, writes the spans at exit.
SPANS = r"""
import atexit, functools, os, sys, threading, time
OUT = []
OFF = time.time() - time.perf_counter()
def wrap(owner, name, label):
    fn = getattr(owner, name)
    @functools.wraps(fn)
    def timed(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            OUT.append((t + OFF, time.perf_counter() + OFF, label))
    setattr(owner, name, timed)
from gitpipe import daemon, executor, git, headsup, intakeserver, sandbox, scheduler, store
wrap(headsup.HeadsUp, "heard", "heads-up")
wrap(intakeserver.IntakeServer, "_answer", "intake")
wrap(intakeserver, "record_once", "record")
wrap(daemon.Daemon, "_prepare_early", "prepare_early")
wrap(daemon.Daemon, "_step", "loop step")
wrap(git.WorktreePool, "_ready", "reset")
wrap(git.WorktreePool, "_git", "git checkout")
wrap(git.WorktreePool, "_prepared", "slot taken")
wrap(scheduler.RunWorker, "_main", "run thread")
wrap(store.Store, "start_run", "start_run")
wrap(store.Store, "start_attempt", "start_attempt")
wrap(sandbox.Sandbox, "launch", "launch")
wrap(executor, "start", "exec handed")
def dump():
    with open(os.environ["SPANS_OUT"], "w") as f:
        for a, b, label in OUT:
            f.write(f"{a:.6f} {b:.6f} {label}\n")
atexit.register(dump)
from gitpipe.cli import main
sys.exit(main(["serve"]))
"""

# (label, which end, what the row says), in the order of the path
ROWS = [
    ("heads-up", 0, "[heads-up] the daemon reads pre-receive's heads-up"),
    ("heads-up", 1, "[heads-up] the first action's sandbox is on its way (bwrap started)"),
    ("intake", 0, "the daemon hears of the push (hook's client connected)"),
    ("record", 1, "its run recorded (synced commit)"),
    ("intake", 1, "answered"),
    ("reset", 0, "[background] the first worktree's reset begins"),
    ("git checkout", 0, "[background]   git checkout begins"),
    ("git checkout", 1, "[background]   git checkout ends"),
    ("reset", 1, "[background] the worktree is ready"),
    ("loop step", 0, "[run] the loop wakes"),
    ("run thread", 0, "[run] the run's thread starts"),
    ("start_run", 1, "[run] run started (pipeline read, commit read, recorded)"),
    ("start_attempt", 1, "[run] attempt recorded (synced)"),
    ("slot taken", 1, "the action has its worktree"),
    ("launch", 0, "sandbox: command line and cgroup"),
    ("exec handed", 1, "sandbox: handed to the launcher (or bwrap released)"),
]


class Traced:
    """One home with one repo, `r.git` (and `idle` more beside it), whose actions may write in
    `stamp`; a work repo `src` whose commits hold `pipeline`; and the daemon, started by `start`
    in a Python of its own running `code` (SPANS, with more wraps), its spans read by `stop`."""

    def __init__(self, pipeline: Callable[[Path], str], idle: int = 0) -> None:
        self.root = workdir()
        home, self.stamp = self.root / "home", self.root / "stamp"
        self.stamp.mkdir(mode=0o1777)
        self.stamp.chmod(0o1777)  # the build user writes it
        self.env = {**env_with_home(home), "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@x",
                    "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@x"}
        self.run(str(BIN / "gitpipe"), "init")
        with open(home / "gitpipe.toml", "a") as f:
            f.write(f'\n[sandbox]\nread_write = ["{self.stamp}"]\n')
        for name in ["r", *(f"idle{i}" for i in range(idle))]:
            self.run(str(BIN / "gitpipe"), "repo", "add", str(self.root / f"{name}.git"), "--create")
        self.src = self.root / "src"
        self.run("git", "init", "-q", "-b", "main", str(self.src))
        (self.src / ".pipeline.toml").write_text(pipeline(self.stamp))
        self.run("git", "add", "-A", cwd=self.src)
        self.run("git", "commit", "-qm", "0", cwd=self.src)
        self.spans = self.root / "spans.txt"
        self.daemon: subprocess.Popen[bytes] | None = None

    def run(self, *args: str, cwd: Path | None = None) -> None:
        subprocess.run(list(args), cwd=cwd, env=self.env, check=True, capture_output=True)

    def push(self, i: int) -> tuple[float, float]:
        """Commit a change to `src` and push it: when the push started and ended (epoch seconds)."""
        (self.src / "n").write_text(f"{i}\n")
        self.run("git", "add", "n", cwd=self.src)
        self.run("git", "commit", "-qm", str(i), cwd=self.src)
        t0 = time.time()
        self.run("git", "push", "-q", str(self.root / "r.git"), "main", cwd=self.src)
        return t0, time.time()

    def push_to_command(self, i: int, stamp: Path) -> tuple[float, float, float]:
        """`push`, then wait for the run's command to write the time into `stamp`: when the push
        started and ended, and that time (epoch seconds)."""
        stamp.unlink(missing_ok=True)
        t0, t1 = self.push(i)
        while not stamp.exists() or not stamp.read_text().strip():
            time.sleep(0.0005)
        return t0, t1, float(stamp.read_text())

    def start(self, code: str = SPANS) -> None:
        self.daemon = subprocess.Popen([sys.executable, "-c", code],
                                       env={**self.env, "SPANS_OUT": str(self.spans), "MALLOC_ARENA_MAX": "2"},
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2)

    def stop(self) -> list[tuple[float, float, str]]:
        """Stop the daemon; its spans: (start, end, label)."""
        assert self.daemon is not None
        self.daemon.terminate()
        self.daemon.wait(30)
        return [(float(a), float(b), label.strip())
                for a, b, label in (line.split(" ", 2) for line in self.spans.read_text().splitlines())]


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    traced = Traced(lambda stamp: '[[stage]]\nname = "s"\n  [[stage.action]]\n  name = "a"\n'
                                  f'  run = "date +%s.%N > {stamp}/t"\n',
                    idle=int(os.environ.get("BENCH_IDLE_REPOS", "0")))
    stamp = traced.stamp / "t"
    pushes = []
    traced.start()
    try:
        traced.run("git", "push", "-q", str(traced.root / "r.git"), "main", cwd=traced.src)
        time.sleep(1)
        for i in range(n):
            pushes.append(traced.push_to_command(i, stamp))
            time.sleep(float(os.environ.get("BENCH_PAUSE", "0.5")))
    finally:
        found = traced.stop()
    table: dict[str, list[float]] = {}
    for t0, t1, ts in pushes:
        for label, end, what in ROWS:
            hit = next(((b if end else a) for a, b, lab in found if lab == label and t0 <= a <= ts), None)
            if hit is not None:
                table.setdefault(what, []).append((hit - t0) * 1000)
        table.setdefault("the push returns (git push exits)", []).append((t1 - t0) * 1000)
        table.setdefault("the first command runs (`date` inside the sandbox)", []).append((ts - t0) * 1000)
    print(f"push start -> first command, {n} pushes, medians in ms from the push's start "
          f"(load {os.getloadavg()[0]:.1f})")
    print("| step | ms |\n| --- | --- |")
    for what, values in sorted(table.items(), key=lambda kv: median(kv[1])):
        print(f"| {what} | {median(values):.1f} |")


if __name__ == "__main__":
    main()
