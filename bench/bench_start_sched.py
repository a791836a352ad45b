"""Where the CPUs go between `git push` and the first command of its run: the scheduler's view.

    python bench/bench_start_sched.py [N]   # N pushes (default 10), as root, with `perf` installed

bench_start_trace.py times the daemon's own steps; this one asks the kernel (`perf sched record`)
which processes ran on which CPU from each push's start to its run's first command (`date`,
whose stamp ends the window), and adds their CPU time up by who they are: the push itself (git
and its hooks), the daemon (all its threads), the sandbox (bwrap, setpriv, the launcher, bash,
the command), git working on the worktree, and the rest. The daemon runs as installed (no spans,
nothing changed in it). Medians over the pushes; the last column is the share of the CPUs'
time in the window (written for the 2-core machine the issue's figures come from). Timings swing with the machine's load (printed at the end).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_start_trace import Traced  # noqa: E402
from common import median  # noqa: E402

SERVE = "import sys\nfrom gitpipe.cli import main\nsys.exit(main(['serve']))\n"
HOOKS = ("pre-receive", "post-receive", "grep")  # gitpipe's hooks (sh, the socket's perl client) and what they run
SANDBOX = ("bwrap", "setpriv", "perl", "bash", "date")
# timehist lines: "time [cpu] comm[tid/pid] wait sch run" (comm may hold spaces and brackets)
LINE = re.compile(r"^\s*(\d+\.\d+)\s+\[(\d+)\]\s+(.*)\[(\d+)(?:/(\d+))?\]\s+\S+\s+\S+\s+(\d+\.\d+)\s*$")


FORK = re.compile(r"\s(\d+)/(\d+)\s+sched:sched_process_fork:.* child_pid=(\d+)")


def who(comm: str, pid: int, daemon: int, spawned: set[int]) -> str:
    """The group a process's CPU time counts in (`spawned`: the daemon's descendants)."""
    if pid == daemon:
        return "the daemon (its threads)"
    if comm == "<idle>":
        return "idle"
    if pid in spawned and comm.startswith("git"):
        return "git on the worktree"
    if pid in spawned and comm.startswith(SANDBOX):
        return "the sandbox (bwrap, setpriv, launcher, bash, date)"
    if comm.startswith(HOOKS) and pid not in spawned:
        return "gitpipe's hooks (pre-receive, post-receive)"
    if comm.startswith("git") and pid not in spawned:
        return "the push's git (client, pack-objects, receive-pack)"
    return "the rest (the report's renderer, this script's polling, the kernel)"


def descendants(data: Path, root: int) -> set[int]:
    """Every process forked, at any depth, by `root` while perf recorded (its fork events)."""
    out = subprocess.run(["perf", "script", "-i", str(data), "-F", "pid,tid,event,trace"],
                         capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for m in FORK.finditer(out):
        children.setdefault(int(m.group(1)), []).append(int(m.group(3)))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def main() -> None:
    if os.geteuid() != 0 or shutil.which("perf") is None:
        raise SystemExit("needs root and perf (Debian: apt-get install linux-perf): perf sched records every CPU")
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    traced = Traced(lambda stamp: '[[stage]]\nname = "s"\n  [[stage.action]]\n  name = "a"\n'
                                  f'  run = "date +%s.%N > {stamp}/t"\n')
    stamp, data = traced.stamp / "t", traced.root / "sched.data"
    traced.start(SERVE)
    assert traced.daemon is not None
    pushes = []
    try:
        traced.run("git", "push", "-q", str(traced.root / "r.git"), "main", cwd=traced.src)
        time.sleep(1)
        record = subprocess.Popen(["perf", "sched", "record", "-a", "-o", str(data)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
        for i in range(n):
            t0, _, ran = traced.push_to_command(i, stamp)
            pushes.append(ran - t0)
            time.sleep(0.5)
        record.send_signal(2)
        record.wait(60)
    finally:
        traced.daemon.terminate()
        traced.daemon.wait(30)
    hist = subprocess.run(["perf", "sched", "timehist", "-i", str(data)], capture_output=True, text=True).stdout
    slices = []  # (end, cpu, comm, pid, tid, run ms)
    for line in hist.splitlines():
        m = LINE.match(line)
        if m:
            end, cpu, comm, tid, pid, run = m.groups()
            slices.append((float(end), int(cpu), comm, int(pid or tid), int(tid), float(run)))
    spawned = descendants(data, traced.daemon.pid)  # its git, its sandboxes (not the push's git)
    dates = sorted({(end, pid) for end, _, comm, pid, _, _ in slices if comm.startswith("date")})
    firsts: dict[int, float] = {}
    for end, pid in dates:
        firsts.setdefault(pid, end)
    table: dict[str, list[float]] = {}
    for end, window in zip(sorted(firsts.values()), pushes):
        start = end - window
        sums: dict[str, float] = {}
        for e, _, comm, p, _, run in slices:
            s = e - run / 1000
            overlap = min(e, end) - max(s, start)
            if overlap > 0:
                key = who(comm, p, traced.daemon.pid, spawned)
                sums[key] = sums.get(key, 0.0) + overlap * 1000
        for key, value in sums.items():
            table.setdefault(key, []).append(value)
        table.setdefault("window: push start -> `date`", []).append(window * 1000)
    print(f"push start -> first command, {len(pushes)} pushes: CPU time by who ran, medians in ms "
          f"(2 CPUs; load {os.getloadavg()[0]:.1f})")
    print("| who | CPU ms in the window | share of the CPUs' time |\n| --- | --- | --- |")
    wall = median(table.pop("window: push start -> `date`"))
    table.pop("idle", None)
    busy = 0.0
    for key, values in sorted(table.items(), key=lambda kv: -median(kv[1])):
        busy += median(values)
        print(f"| {key} | {median(values):.1f} | {median(values) / (2 * wall) * 100:.0f} % |")
    print(f"| idle | {max(0.0, 2 * wall - busy):.1f} | {max(0.0, 1 - busy / (2 * wall)) * 100:.0f} % |")
    print(f"| the window itself (wall; {os.cpu_count()} CPUs) | {wall:.1f} | |")


if __name__ == "__main__":
    main()
