"""Daemon benchmarks (issue: run it for real). Prints a table with the plain baseline.

    python bench/bench_daemon.py            # all three (about 2 minutes)
    python bench/bench_daemon.py idle | recovery | flood

- idle:     RSS and CPU of `gitpipe serve` over 60 s with 20 registered repos, idle
            (baseline: a bare `python -c "import time; time.sleep(60)"`).
- recovery: restart with 100 queued runs and 10 interrupted actions (kill -9 mid-run):
            time from start to READY=1 (sd_notify) vs the same daemon starting empty.
- flood:    an action printing 1 GB: the daemon's RSS growth while it streams
            (baseline: the same action run with output to /dev/null, time ratio).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BIN, clone_with, cpu_seconds, env_with_home, git, gitpipe, ms, rss_kib, table, workdir  # noqa: E402


def serve(home: Path) -> tuple[subprocess.Popen[bytes], float]:
    """Start the daemon; (process, seconds until it said READY=1)."""
    address = f"gitpipe-bench-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + address)
    sock.settimeout(120)
    t = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "gitpipe"), "serve"], env={**env_with_home(home),
                            "NOTIFY_SOCKET": "@" + address}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while sock.recv(100) != b"READY=1":
        pass
    ready = time.perf_counter() - t
    sock.close()
    return proc, ready


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)


def bench_idle() -> None:
    root = workdir()
    home = root / "home"
    gitpipe(home, "init")
    for i in range(20):
        gitpipe(home, "repo", "add", str(root / f"r{i}.git"), "--create")
    proc, _ = serve(home)
    base = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(70)"])
    time.sleep(2)
    c0, b0 = cpu_seconds(proc.pid), cpu_seconds(base.pid)
    time.sleep(60)
    c1, b1 = cpu_seconds(proc.pid), cpu_seconds(base.pid)
    rss, brss = rss_kib(proc.pid), rss_kib(base.pid)
    stop(proc)
    base.kill()
    table("idle daemon, 20 repos, 60 s", [
        ("RSS", f"{rss / 1024:.1f} MB", f"{brss / 1024:.1f} MB (python sleeping)", f"{rss / brss:.1f}x; goal < 60 MB"),
        ("CPU", f"{(c1 - c0) / 60 * 100:.2f} %", f"{(b1 - b0) / 60 * 100:.2f} %", "goal < 0.5 %"),
    ])


def bench_recovery() -> None:
    root = workdir()
    home = root / "home"
    gitpipe(home, "init", "--home", str(home))
    (home / "gitpipe.toml").write_text((home / "gitpipe.toml").read_text().replace("# max_parallel = 2",
                                                                                      "max_parallel = 10"))
    gitpipe(home, "repo", "add", str(root / "r.git"), "--create")
    slow = '[[stage]]\nname = "s"\n  [[stage.action]]\n  name = "a"\n  run = "sleep 600"\n'
    src = clone_with(root, "src", {".pipeline.toml": slow})
    git("push", "-q", str(root / "r.git"), "main", cwd=src)
    gitpipe(root / "empty-home", "init")
    empty_proc, empty = serve(root / "empty-home")
    stop(empty_proc)
    for i in range(9):  # 10 runs with an action running, then kill -9
        git("commit", "-q", "--allow-empty", "-m", f"c{i}", cwd=src)
        git("push", "-q", str(root / "r.git"), "main", cwd=src)
    proc, _ = serve(home)
    deadline = time.time() + 60
    while time.time() < deadline and len(list((home / "logs").rglob("*.log"))) < 10:
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    for i in range(100):  # 100 queued while the daemon is down
        git("commit", "-q", "--allow-empty", "-m", f"q{i}", cwd=src)
        git("push", "-q", str(root / "r.git"), "main", cwd=src)
    proc, ready = serve(home)
    stop(proc)
    table("restart with 100 queued runs and 10 interrupted actions", [
        ("start -> READY=1", ms(ready), ms(empty) + " (empty home)", f"{ready / empty:.1f}x; goal < 2 s"),
    ])
    subprocess.run(["pkill", "-f", "sleep 600"], check=False)


def bench_flood() -> None:
    root = workdir()
    home = root / "home"
    gitpipe(home, "init")
    gitpipe(home, "repo", "add", str(root / "r.git"), "--create")
    script = "head -c 1000000000 /dev/zero | tr '\\\\0' 'x' | fold -w 100"
    text = f'[[stage]]\nname = "s"\n  [[stage.action]]\n  name = "flood"\n  run = "{script}"\n'
    src = clone_with(root, "src", {".pipeline.toml": text})
    proc, _ = serve(home)
    time.sleep(1)
    before = rss_kib(proc.pid)
    t = time.perf_counter()
    git("push", "-q", str(root / "r.git"), "main", cwd=src)
    peak = before
    while True:
        peak = max(peak, rss_kib(proc.pid))
        out = gitpipe(home, "runs", "--json").stdout
        if '"finished_at": "' in out:
            break
        time.sleep(0.5)
    took = time.perf_counter() - t
    stop(proc)
    t = time.perf_counter()
    subprocess.run(["bash", "-c", f"{script} > /dev/null"], check=True)
    plain = time.perf_counter() - t
    size = sum(p.stat().st_size for p in (home / "logs").rglob("*.log"))
    table("an action printing 1 GB (10 M lines of 100 bytes)", [
        ("daemon RSS growth", f"{(peak - before) / 1024:.1f} MB", "-", "goal < 20 MB"),
        ("time (with timestamped log)", f"{took:.1f} s", f"{plain:.1f} s (to /dev/null)", f"{took / plain:.1f}x"),
        ("log file", f"{size / 1e9:.2f} GB", "1.01 GB of output", ""),
    ])


PARTS = {"idle": bench_idle, "recovery": bench_recovery, "flood": bench_flood}

if __name__ == "__main__":
    for name in sys.argv[1:] or list(PARTS):
        PARTS[name]()
