"""The daemon's own CPU per action, and the wall time of a 20-action run, beside another install.

    GITPIPE_BEFORE=<other venv>/bin python bench/bench_action_cpu.py [PAIRS] [ROUNDS]
    python bench/bench_action_cpu.py [PAIRS] [ROUNDS]        # this checkout alone

Each measurement starts a daemon of its own (a fresh home, one repo) and pushes ROUNDS
commits (default 8) whose pipeline is 20 one-action stages (19 `true`, then `date` into a
file); it reads the daemon's user and system CPU from /proc around the rounds, and times each
push to its 20th command. This checkout and the other install ("before") are measured one
after the other, PAIRS times (default 3), never side by side: on ext4 without a journal a new
file's inode is found by a scan past the inodes freed in the last seconds, so one daemon's
churn of files slows the other's (bench_peers.py interleaves, which shares that cost out).
Timings swing with the machine's load: read the pairs.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ACTIONS = 20
SERVE = "import sys\nfrom gitpipe.cli import main\nsys.exit(main(['serve']))\n"


def one(rounds: int) -> dict[str, float]:
    """Measure the gitpipe of this interpreter: CPU ms per action (user, sys), push to the last
    command (ms, median over the rounds after the first)."""
    from bench_start_trace import Traced

    def pipeline(stamp: Path) -> str:
        stages = [f'[[stage]]\nname = "s{k}"\n  [[stage.action]]\n  name = "a{k}"\n  run = "true"\n'
                  for k in range(ACTIONS - 1)]
        last = f'run = "date +%s.%N > {stamp}/last"'
        return "\n".join(stages) + f'\n[[stage]]\nname = "z"\n  [[stage.action]]\n  name = "z"\n  {last}\n'

    traced = Traced(pipeline)
    traced.start(SERVE)
    assert traced.daemon is not None
    last = traced.stamp / "last"
    tick = os.sysconf("SC_CLK_TCK")

    def cpu() -> tuple[float, float]:
        fields = Path(f"/proc/{traced.daemon.pid}/stat").read_text().rsplit(")", 1)[1].split()  # type: ignore[union-attr]
        return int(fields[11]) / tick, int(fields[12]) / tick

    def push(i: int) -> float:
        last.unlink(missing_ok=True)
        t0, _ = traced.push(i)
        while not last.exists() or not last.read_text().strip():
            time.sleep(0.001)
        took = float(last.read_text()) - t0
        time.sleep(0.3)
        return took

    try:
        push(0)  # the slots made, the first pages rendered
        user0, sys0 = cpu()
        walls = [push(i) for i in range(1, rounds + 1)]
        user1, sys1 = cpu()
    finally:
        traced.daemon.terminate()
        traced.daemon.wait(30)
    n = rounds * ACTIONS
    return {"user": (user1 - user0) / n * 1000, "sys": (sys1 - sys0) / n * 1000,
            "wall": statistics.median(walls) * 1000}


def main() -> None:
    pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    if os.environ.get("BENCH_ONE"):
        print(json.dumps(one(rounds)))
        return
    before = Path(os.environ["GITPIPE_BEFORE"]) if os.environ.get("GITPIPE_BEFORE") else None
    systems = [("gitpipe", Path(sys.executable))] + ([("before", before / "python")] if before else [])
    found: dict[str, list[dict[str, float]]] = {name: [] for name, _ in systems}
    for _ in range(pairs):
        for name, python in systems:
            out = subprocess.run([str(python), __file__, str(pairs), str(rounds)], env={**os.environ, "BENCH_ONE": "1"},
                                 capture_output=True, text=True, check=True)
            found[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"the daemon's CPU per action and push -> 20th command, {rounds} runs of {ACTIONS} actions each, "
          f"{pairs} pair(s) one after the other (load {os.getloadavg()[0]:.1f} at the end)")
    print("| measure | " + " | ".join(name for name, _ in systems) + (" | gitpipe / before |" if before else " |"))
    print("| --- " * (len(systems) + 1 + bool(before)) + "|")
    for key, what in (("cpu", "daemon CPU per action, user + sys (ms)"), ("sys", "  of which the kernel's (ms)"),
                      ("wall", "push -> the 20th action's command (ms)")):
        cells, medians = [], []
        for name, _ in systems:
            values = [r["user"] + r["sys"] if key == "cpu" else r[key] for r in found[name]]
            medians.append(statistics.median(values))
            cells.append(" / ".join(f"{v:.1f}" for v in values))
        ratio = f" | {medians[0] / medians[1]:.2f}x" if before else ""
        print(f"| {what} | " + " | ".join(cells) + ratio + " |")


if __name__ == "__main__":
    main()
