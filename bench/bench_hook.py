"""What the hooks add to `git push`, and the floor of each part (issue 11's hook row).

    python bench/bench_hook.py [N]        # N rounds (default 30)
    GITPIPE_BEFORE=/work/main/.venv/bin python bench/bench_hook.py 30   # and another install beside

Pushes to a bare repo without hooks (and one with receive.autogc off, as `gitpipe repo add`
leaves a repo: the daemon runs `git gc --auto` after the push), to a gitpipe repo whose daemon
runs (the Perl hook hands the push to it), and to one whose daemon is down (the Python hook
records the push itself), interleaved; with GITPIPE_BEFORE (the bin folder of another gitpipe install), to a repo of that
install too, in the same rounds. Then each part of the hooks' path alone, so that the floor is
visible. Medians in ms; they move with the machine's load (printed): compare within one run.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BIN, clone_with, env_with_home, git, median, workdir  # noqa: E402

BEFORE = Path(os.environ["GITPIPE_BEFORE"]) if os.environ.get("GITPIPE_BEFORE") else None
PIPELINE = '[[stage]]\nname = "s"\n  [[stage.action]]\n  name = "a"\n  run = "true"\n'


def timed_ms(argv: list[str], n: int, pause: float = 0.0, **kw: object) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(argv, check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]
        times.append((time.perf_counter() - t) * 1000)
        time.sleep(pause)  # the run a post-receive queued runs meanwhile, not during the next one
    return median(times)


def synced_commit_ms(db: Path, n: int) -> float:
    """One small insert committed as the daemon commits (WAL, synchronous=FULL), on the home's disk."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS t (x TEXT)")
    times = []
    for i in range(n):
        t = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t VALUES (?)", (str(i),))
        conn.execute("COMMIT")
        times.append((time.perf_counter() - t) * 1000)
    conn.close()
    return median(times)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    root = workdir()
    bins = {"up": BIN, "down": BIN, **({"before": BEFORE} if BEFORE else {})}
    for name, bin_dir in bins.items():
        home = root / name
        subprocess.run([str(bin_dir / "gitpipe"), "init"], env=env_with_home(home), capture_output=True, check=True)
        subprocess.run([str(bin_dir / "gitpipe"), "repo", "add", str(root / f"{name}.git"), "--create"],
                       env=env_with_home(home), capture_output=True, check=True)
    # a second repo of the running daemon, with git's own `gc --auto` in the push as before
    subprocess.run([str(BIN / "gitpipe"), "repo", "add", str(root / "upgc.git"), "--create"],
                   env=env_with_home(root / "up"), capture_output=True, check=True)
    git("--git-dir", str(root / "upgc.git"), "config", "receive.autogc", "true")
    git("init", "-q", "--bare", "-b", "main", str(root / "plain.git"))
    git("init", "-q", "--bare", "-b", "main", str(root / "nogc.git"))  # as `repo add` leaves a repo
    git("--git-dir", str(root / "nogc.git"), "config", "receive.autogc", "false")
    daemons = [subprocess.Popen([str(bins[name] / "gitpipe"), "serve"], env=env_with_home(root / name),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name in bins if name != "down"]
    try:
        for name in bins:
            while name != "down" and not (root / name / "intake.sock").exists():
                time.sleep(0.05)
        src = clone_with(root, "src", {".pipeline.toml": PIPELINE})
        pushes: dict[str, list[float]] = {name: [] for name in ("plain", "nogc", "upgc", *bins)}
        for target in pushes:
            git("push", "-q", str(root / f"{target}.git"), "main", cwd=src)
        for i in range(n):
            for target in pushes:
                git("commit", "-q", "--allow-empty", "-m", f"{target}{i}", cwd=src)
                t = time.perf_counter()
                git("push", "-q", str(root / f"{target}.git"), "main", cwd=src)
                pushes[target].append((time.perf_counter() - t) * 1000)
                time.sleep(0.3)  # the run this push queued (`true`) runs now, not during the next push
        env = {**os.environ, "GIT_DIR": "."}
        parts = {
            "`sh -c :`": timed_ms(["sh", "-c", ":"], n * 4),
            "`perl -e 1` (the socket client's interpreter)": timed_ms(["perl", "-e", "1"], n * 4),
            "`python3 -IS -c pass` (what the hook no longer starts)": timed_ms([sys.executable, "-IS", "-c", "pass"], n * 4),
            "a synced SQLite commit (WAL, synchronous=FULL) on the home's disk": synced_commit_ms(root / "sync.db", n * 4),
        }
        for side in [name for name in bins if name != "down"]:
            repo = root / f"{side}.git"
            head = subprocess.run(["git", "--git-dir", str(repo), "rev-parse", "main"], capture_output=True,
                                  text=True, check=True).stdout.strip()
            line = f"{'0' * 40} {head} refs/heads/bench\n".encode()
            tag = f"{'0' * 40} {head} refs/tags/v1\n".encode()  # the trigger runs no tag: nothing recorded
            of = "" if side == "up" else f" ({BEFORE})"
            parts |= {
                f"pre-receive alone{of} (sh; the reject_invalid check; the 64 KiB reservation)":
                    timed_ms([str(repo / "hooks" / "pre-receive")], n * 2, input=line, cwd=repo, env=env),
                f"post-receive alone{of}, daemon up, a push that starts no run (the hook, the daemon's plan)":
                    timed_ms([str(repo / "hooks" / "post-receive")], n * 2, input=tag, cwd=repo, env=env),
                f"post-receive alone{of}, daemon up (the hook, the daemon's plan and synced commit)":
                    timed_ms([str(repo / "hooks" / "post-receive")], n, 0.3, input=line, cwd=repo, env=env),
            }
    finally:
        for daemon in daemons:
            daemon.terminate()
            daemon.wait(30)
    plain = median(pushes["plain"])
    print(f"N={n}, medians in ms (load {os.getloadavg()[0]:.1f})")
    print("| measure | ms |")
    print("| --- | --- |")
    print(f"| `git push`, no hooks | {plain:.1f} |")
    print(f"| `git push`, no hooks, receive.autogc = false (no `git gc --auto` after the push) | "
          f"{median(pushes['nogc']):.1f} |")
    print(f"| what gitpipe's hooks add, daemon up | +{median(pushes['up']) - plain:.1f} |")
    print(f"| the same, receive.autogc = true (git's `gc --auto` in the push, as before) | "
          f"+{median(pushes['upgc']) - plain:.1f} |")
    if BEFORE:
        print(f"| what the hooks of {BEFORE} add, daemon up | +{median(pushes['before']) - plain:.1f} |")
    print(f"| what gitpipe's hooks add, daemon down (the Python hook records the push) | "
          f"+{median(pushes['down']) - plain:.1f} |")
    for name, value in parts.items():
        print(f"| {name} | {value:.2f} |")


if __name__ == "__main__":
    main()
