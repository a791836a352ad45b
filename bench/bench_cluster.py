"""Worker hosts (issue 10), all in one run: a private redis-server on 127.0.0.1 and real
`gitpipe worker` processes on this machine (so "remote" is the protocol, not the network).

    python bench/bench_cluster.py        # about 2-3 minutes; needs redis-server

- throughput: 30 `sleep 1` actions (one stage, in parallel) on 1 worker vs 3 workers of
              one slot each; goal >= 2.7x.
- dispatch:   a run of 10 sequential `true` actions on a worker vs on the coordinator
              (`[cluster] local = true`, no runs_on); per action; goal <= +50 ms.
- latency:    `git push` returned -> the remote script's first command, median of 10;
              goal <= 200 ms.
- idle:       a worker's RSS idle, and the coordinator's RSS with [cluster] vs without.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_core import setup_home, wait_for, wait_run
from common import (
    BIN,
    clone_with,
    commit_change,
    env_with_home,
    git,
    gitpipe,
    median,
    ms,
    rss_kib,
    table,
    workdir,
)

from gitpipe.cluster import channel


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Bench:
    def __init__(self) -> None:
        self.root = workdir()
        self.port, self.password = free_port(), secrets.token_hex(8)
        self.url = f"redis://:{self.password}@127.0.0.1:{self.port}/0"
        (self.root / "redis").mkdir()
        self.redis = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                       "--dir", str(self.root / "redis"), "--save", "", "--requirepass",
                                       self.password], stdout=subprocess.DEVNULL)
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.home = setup_home(self.root)
        self.mark = self.root / "marks"
        self.mark.mkdir()
        self.mark.chmod(0o777)  # a root daemon's and root worker's actions run as the build user
        keys = {}
        for name in ("w1", "w2", "w3"):
            d = self.root / name
            d.mkdir()
            (d / "gitpipe.toml").write_text(f'[sandbox]\nread_write = ["{self.mark}"]\n')
            keys[name] = channel.public_text(channel.load_private(d / "worker.key"))
        self.cluster_conf = (f'[cluster]\nbroker = "{self.url}"\nlocal = true\n[cluster.workers]\n'
                             + "".join(f'{n} = "{k}"\n' for n, k in keys.items()))
        conf = self.home / "gitpipe.toml"
        self.plain_conf = conf.read_text() + f'\n[sandbox]\nread_write = ["{self.mark}"]\n'
        conf.write_text(self.plain_conf + self.cluster_conf)
        gitpipe(self.home, "repo", "add", str(self.root / "r.git"), "--create")

    def worker(self, name: str, labels: str) -> None:
        self.workers[name] = subprocess.Popen(
            [str(BIN / "gitpipe"), "worker", "--broker", self.url, "--labels", labels, "--name", name,
             "--dir", str(self.root / name)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=env_with_home(self.home))
        end = time.monotonic() + 60
        while time.monotonic() < end:
            live = json.loads(gitpipe(self.home, "workers", "--json").stdout)
            if any(w["name"] == name for w in live):
                return
            time.sleep(0.2)
        raise TimeoutError(f"worker {name} did not start")

    def stop_worker(self, name: str) -> None:
        proc = self.workers.pop(name)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)

    def daemon(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([str(BIN / "gitpipe"), "serve"], env=env_with_home(self.home),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.5)
        return proc

    def push_and_wait(self, src: Path, n: int) -> float:
        commit_change(src, n)
        git("push", "-q", str(self.root / "r.git"), "main", cwd=src)
        run_id = json.loads(gitpipe(self.home, "runs", "--json", "--limit", "1").stdout)[0]["id"]
        return wait_run(self.home, run_id)

    def close(self) -> None:
        for name in list(self.workers):
            self.stop_worker(name)
        self.redis.terminate()
        self.redis.wait()


def throughput(b: Bench) -> list[tuple[str, str, str, str]]:
    actions = "".join(f'  [[stage.action]]\n  name = "a{i}"\n  runs_on = ["bench"]\n  run = "sleep 1"\n'
                      for i in range(30))
    src = clone_with(b.root, "tp", {".pipeline.toml": f'[[stage]]\nname = "s"\n{actions}'})
    git("push", "-q", "-f", str(b.root / "r.git"), "main", cwd=src)
    b.worker("w1", "bench")
    daemon = b.daemon()
    try:
        wait_run(b.home, 1)  # warm: the worker's mirror and worktree
        one = b.push_and_wait(src, 1)
        b.worker("w2", "bench")
        b.worker("w3", "bench")
        three = b.push_and_wait(src, 2)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
    return [("30 x `sleep 1`, 1 worker / 3 workers", f"{three:.1f} s (3)", f"{one:.1f} s (1)",
             f"{one / three:.2f}x; goal >= 2.7x")]


def dispatch(b: Bench) -> list[tuple[str, str, str, str]]:
    def stages(labels: str) -> str:
        return "".join(f'[[stage]]\nname = "s{i}"\n  [[stage.action]]\n  name = "a{i}"\n{labels}  run = "true"\n'
                       for i in range(10))

    out = []
    per = {}
    for kind, labels in (("remote", '  runs_on = ["bench"]\n'), ("local", "")):
        src = clone_with(b.root, f"d-{kind}", {".pipeline.toml": stages(labels)})
        git("push", "-q", "-f", str(b.root / "r.git"), "main", cwd=src)
        daemon = b.daemon()
        try:
            per[kind] = median([b.push_and_wait(src, i) for i in range(3)]) / 10
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
    out.append(("a `true` action, per action (10 in a run)", ms(per["remote"]), ms(per["local"]) + " (local)",
                f"{(per['remote'] - per['local']) * 1000:+.1f} ms; goal <= +50 ms"))
    return out


def latency(b: Bench) -> list[tuple[str, str, str, str]]:
    mark = b.mark / "first"
    text = (f'[env]\nMARK = "{mark}"\n[[stage]]\nname = "s"\n  [[stage.action]]\n  name = "a"\n'
            '  runs_on = ["bench"]\n  run = "date +%s.%N >> \\"$MARK\\""\n')
    src = clone_with(b.root, "lat", {".pipeline.toml": text})
    daemon = b.daemon()
    lat = []
    try:
        git("push", "-q", "-f", str(b.root / "r.git"), "main", cwd=src)
        wait_for(mark, 1, timeout=60)
        for i in range(10):
            commit_change(src, i)
            git("push", "-q", str(b.root / "r.git"), "main", cwd=src)
            pushed = time.time()
            lat.append(float(wait_for(mark, i + 2, timeout=60)[-1]) - pushed)
            time.sleep(0.3)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
    return [("push returned -> first remote command, median of 10", ms(median(lat)), "-", "goal <= 200 ms")]


def idle(b: Bench) -> list[tuple[str, str, str, str]]:
    time.sleep(5)
    worker_rss = median([rss_kib(p.pid) for p in b.workers.values()])
    conf = b.home / "gitpipe.toml"
    with_cluster = b.daemon()
    time.sleep(3)
    on = rss_kib(with_cluster.pid)
    with_cluster.send_signal(signal.SIGTERM)
    with_cluster.wait(60)
    conf.write_text(b.plain_conf)
    plain = b.daemon()
    time.sleep(3)
    off = rss_kib(plain.pid)
    plain.send_signal(signal.SIGTERM)
    plain.wait(60)
    conf.write_text(b.plain_conf + b.cluster_conf)
    return [("idle worker RSS", f"{worker_rss / 1024:.1f} MB", "-", ""),
            ("coordinator RSS, [cluster] on / off", f"{on / 1024:.1f} MB", f"{off / 1024:.1f} MB",
             f"+{(on - off) / 1024:.1f} MB")]


def main() -> None:
    os.umask(0o022)
    b = Bench()
    rows: list[tuple[str, str, str, str]] = []
    try:
        for part in (throughput, dispatch, latency, idle):
            rows += part(b)
            print(rows[-1], flush=True)
    finally:
        b.close()
        table("worker hosts: Celery on Redis, workers on this machine", rows)


if __name__ == "__main__":
    main()
