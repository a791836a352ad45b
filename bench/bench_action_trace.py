"""Where the time goes between one action's command and the next one's, in a run of 20: a timeline.

    python bench/bench_action_trace.py [R]   # R runs of 20 one-action stages (default 6)

The daemon runs with the perf_counter spans of bench_start_trace.py and a few more on the
per-action path (nothing else changes in it). Each action runs `date +%s.%N` into a file of
its own; every span that starts or ends between action k-1's `date` and action k's is lined
up against the first, and the rows print the medians in ms. Rows that show in fewer than
80% of the gaps (a `git checkout` that an unchanged tree does not need, say) are left out.
The per-action figure beside laminar is bench_peers.py's (`true`, without the spans, which
add about 1 ms here); this one says where it goes. Timings swing with the machine's load.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_start_trace import SPANS, Traced  # noqa: E402
from common import median  # noqa: E402

ACTIONS = 20
MORE = r"""
from gitpipe import attempts, launcher
wrap(executor, "wait", "wait")
wrap(scheduler.RunWorker, "_collect", "collect")
wrap(attempts, "end", "end")
wrap(scheduler.RunWorker, "_env", "env")
wrap(attempts, "begin", "begin")
wrap(git._Ahead, "wait", "ahead_wait")
wrap(sandbox.Sandbox, "prepare", "prepare")
wrap(sandbox.Sandbox, "ready", "ready")
wrap(sandbox.Launch, "popen", "popen")
wrap(launcher.Parked, "exec", "order")
wrap(git.WorktreePool, "prepare_next", "prepare_next")
"""
# (label, which end, what the row says)
ROWS = {
    ("wait", 1): "the action before is seen to exit",
    ("collect", 1): "its outputs read",
    ("end", 1): "its end recorded (synced; the stage change with it)",
    ("env", 1): "the next action's environment (outputs, secrets)",
    ("begin", 1): "its attempt recorded (synced), its log open",
    ("ahead_wait", 1): "its worktree, reset ahead, is ready",
    ("slot taken", 1): "its worktree checked and handed over",
    ("prepare", 1): "HOME and output made (not when its sandbox was made ahead)",
    ("launch", 1): "its command line",
    ("order", 1): "its order written to the sandbox made ahead",
    ("popen", 1): "bwrap started held and let go (not when made ahead)",
    ("exec handed", 1): "the attempt started (log reader running)",
    ("prepare_next", 1): "the action after it: its reset (and sandbox) begun in the background",
    ("reset", 1): "[background] that worktree reset",
    ("ready", 1): "[background] that sandbox made",
}


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    traced = Traced(lambda stamp: "".join(
        f'\n[[stage]]\nname = "s{k}"\n  [[stage.action]]\n  name = "a{k}"\n  run = "date +%s.%N > {stamp}/{k}"\n'
        for k in range(ACTIONS)))
    commands: list[list[float]] = []
    traced.start(SPANS.replace("def dump():", MORE + "\ndef dump():"))
    try:
        for i in range(rounds + 1):  # the first run warms the slots up
            for p in traced.stamp.iterdir():
                p.unlink()
            traced.push(i)
            last = traced.stamp / str(ACTIONS - 1)
            while not last.exists() or not last.read_text().strip():
                time.sleep(0.002)
            time.sleep(0.3)
            if i:
                commands.append([float((traced.stamp / str(k)).read_text()) for k in range(ACTIONS)])
    finally:
        found = traced.stop()
    gaps: list[float] = []
    table: dict[tuple[str, int], list[float]] = {}
    for ts in commands:
        for k in range(1, ACTIONS):
            t0, t1 = ts[k - 1], ts[k]
            gaps.append((t1 - t0) * 1000)
            for key in ROWS:
                label, end = key
                hit = next(((b if end else a) for a, b, lab in found if lab == label and t0 <= (b if end else a) <= t1), None)
                if hit is not None:
                    table.setdefault(key, []).append((hit - t0) * 1000)
    print(f"one action's command -> the next one's, {len(gaps)} gaps in {rounds} runs of {ACTIONS}, "
          f"medians in ms from the first command (load {os.getloadavg()[0]:.1f})")
    print("| step | ms |\n| --- | --- |")
    rows = [(median(v), ROWS[key]) for key, v in table.items() if len(v) >= 0.8 * len(gaps)]
    for ms, what in sorted(rows):
        print(f"| {what} | {ms:.2f} |")
    print(f"| the next action's command runs (`date` inside its sandbox) | {median(gaps):.2f} |")


if __name__ == "__main__":
    main()
