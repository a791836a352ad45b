"""gitpipe beside laminar 1.4 (the leanest CI daemon, C++) and plain git, in one run, interleaved.

    python bench/bench_peers.py [N]        # N pushes per system (default 20)

laminar is used when built: `../shared/peers/build-laminar.sh /tmp/laminar-build`, or set
$LAMINAR_BUILD to the directory holding laminard and laminarc; without it only gitpipe and
plain git are measured. Timings are medians in ms and swing with the machine's load: read
the ratios, measured in the same run. The counts at the end (processes started and fsyncs
per action, seen by strace on the daemon) do not depend on the load.

Rows (adapted from ../shared/peers/peer_bench.py, which produced issue 11's table):
  push      what the post-receive hook adds to `git push` (gitpipe's hook vs `laminarc queue`);
            also gitpipe's with its daemon down (the Python hook records the push itself)
  start     push start -> the first command of the job/action runs (a `date` it writes)
  action    per action: 20 sequential actions in one gitpipe run; 20 laminar jobs, 1 executor
  idle      daemon RSS with 20 repos (laminar: 20 jobs), after 5 s idle
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BIN, cpu_seconds, env_with_home, median, rss_kib, workdir  # noqa: E402

LAM = Path(os.environ.get("LAMINAR_BUILD", "/tmp/laminar-build"))
GENV = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@x", "GIT_COMMITTER_NAME": "b",
        "GIT_COMMITTER_EMAIL": "b@x"}
ACTIONS = 20


def sh(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(list(args), cwd=cwd, env=env or GENV, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{args} -> {r.returncode}: {r.stderr[-400:]}")
    return r


def wait_stamp(p: Path, timeout: float = 30.0) -> float:
    end = time.time() + timeout
    while time.time() < end:
        try:
            if text := p.read_text().strip():
                return float(text)
        except FileNotFoundError:
            pass
        time.sleep(0.0005)
    raise SystemExit(f"timeout waiting for {p}")


class Peers:
    """The three systems side by side: plain git, gitpipe (this checkout), laminar if built."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.stamp = root / "shared" / "stamp"  # a dir every action may write: [sandbox] read_write
        self.home = root / "gp"
        self.genv = {**GENV, **env_with_home(self.home)}
        self.laminar = (LAM / "laminard").exists()
        self.systems = ["plain", "gp", "gpdown"] + (["lam"] if self.laminar else [])
        self.down = root / "gp-down"  # a home whose daemon is not running
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def gitpipe(self, *args: str) -> str:
        return sh(str(BIN / "gitpipe"), *args, env=self.genv).stdout

    def setup(self) -> None:
        self.gitpipe("init")
        self.stamp.parent.mkdir(mode=0o1777)
        self.stamp.parent.chmod(0o1777)  # the build user writes the stamp
        with open(self.home / "gitpipe.toml", "a") as f:
            f.write(f'\n[sandbox]\nread_write = ["{self.stamp.parent}"]\n')
        self.gitpipe("repo", "add", str(self.root / "gp.git"), "--create")
        for i in range(ACTIONS - 1):
            self.gitpipe("repo", "add", str(self.root / f"idle{i}.git"), "--create")
        denv = {**GENV, **env_with_home(self.down)}
        sh(str(BIN / "gitpipe"), "init", env=denv)
        sh(str(BIN / "gitpipe"), "repo", "add", str(self.root / "gpdown.git"), "--create", env=denv)
        sh("git", "init", "-q", "--bare", "-b", "main", str(self.root / "plain.git"))
        self.procs["gp"] = subprocess.Popen([str(BIN / "gitpipe"), "serve"], env=self.genv,
                                            stdout=open(self.root / "gp.log", "w"), stderr=subprocess.STDOUT)
        if self.laminar:
            self._setup_laminar()

    def _setup_laminar(self) -> None:
        lh = self.root / "lam"
        for d in ("cfg/jobs", "cfg/contexts"):
            (lh / d).mkdir(parents=True)
        (lh / "cfg/contexts/default.conf").write_text("EXECUTORS=1\n")
        jobs = {"j": f"date +%s.%N > {self.stamp}", "t": "true", **{f"idle{i}": "true" for i in range(ACTIONS - 2)}}
        for name, body in jobs.items():
            p = lh / f"cfg/jobs/{name}.run"
            p.write_text(f"#!/bin/sh\n{body}\n")
            p.chmod(0o755)
        sock = f"unix-abstract:gitpipe-bench-peers-{os.getpid()}"
        self.lenv = {**GENV, "LAMINAR_HOME": str(lh), "LAMINAR_BIND_RPC": sock, "LAMINAR_HOST": sock,
                     "LAMINAR_BIND_HTTP": f"unix-abstract:gitpipe-bench-peers-http-{os.getpid()}"}
        sh("git", "init", "-q", "--bare", "-b", "main", str(self.root / "lam.git"))
        hook = self.root / "lam.git/hooks/post-receive"
        hook.write_text(f"#!/bin/sh\nLAMINAR_HOST={sock} exec {LAM}/laminarc queue j\n")
        hook.chmod(0o755)
        self.procs["lam"] = subprocess.Popen([str(LAM / "laminard")], env=self.lenv, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL)

    def close(self) -> None:
        for p in self.procs.values():
            p.terminate()
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()

    def wait_run(self, run_id: int) -> dict:
        while True:
            run = json.loads(self.gitpipe("show", str(run_id), "--json"))
            if run["status"] not in ("queued", "running"):
                return run
            time.sleep(0.05)

    # ------------------------------------------------------------------ measures
    def push_and_start(self, src: Path, n: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
        push: dict[str, list[float]] = {s: [] for s in self.systems}
        start: dict[str, list[float]] = {s: [] for s in self.systems if s not in ("plain", "gpdown")}
        for i in range(n):
            for s in self.systems:  # interleaved: each round measures every system once
                (src / "n").write_text(f"{s}{i}\n")
                sh("git", "commit", "-qam", f"{s}{i}", cwd=src)
                self.stamp.unlink(missing_ok=True)
                t0 = time.time()
                sh("git", "push", "-q", str(self.root / f"{s}.git"), "main", cwd=src)
                push[s].append((time.time() - t0) * 1000)
                if s in start:
                    start[s].append((wait_stamp(self.stamp) - t0) * 1000)
                    time.sleep(0.3)  # let the job finish
        return push, start

    def actions(self, src: Path, rounds: int) -> tuple[list[float], list[float], list[float]]:
        per_gp: list[float] = []
        per_lam: list[float] = []
        base: list[float] = []
        self.cpu: dict[str, list[float]] = {s: [] for s in self.procs}  # daemon CPU ms per action
        for i in range(rounds):
            c0 = cpu_seconds(self.procs["gp"].pid)
            run = self.gp_actions(src, f"acts{i}")
            self.cpu["gp"].append((cpu_seconds(self.procs["gp"].pid) - c0) * 1000 / ACTIONS)
            ts = [a for s in run["stages"] for a in s["actions"]]
            a0, a1 = iso(ts[0]["started_at"]), iso(ts[-1]["finished_at"])
            per_gp.append((a1 - a0) * 1000 / ACTIONS)
            if self.laminar:
                t0, c0 = time.time(), cpu_seconds(self.procs["lam"].pid)
                sh(str(LAM / "laminarc"), "run", *(["t"] * ACTIONS), env=self.lenv)
                per_lam.append((time.time() - t0) * 1000 / ACTIONS)
                self.cpu["lam"].append((cpu_seconds(self.procs["lam"].pid) - c0) * 1000 / ACTIONS)
            t0 = time.time()
            for _ in range(ACTIONS):
                subprocess.run(["bash", "-c", "true"], check=True)
            base.append((time.time() - t0) * 1000 / ACTIONS)
        return per_gp, per_lam, base

    def gp_actions(self, src: Path, msg: str) -> dict:
        sh("git", "commit", "-q", "--allow-empty", "-m", msg, cwd=src)
        out = sh("git", "push", str(self.root / "gp.git"), "main", cwd=src).stderr
        match = re.search(r"run #(\d+)", out)
        if not match:
            raise SystemExit(f"the push named no run: {out}")
        run = self.wait_run(int(match.group(1)))
        if run["status"] != "succeeded":
            raise SystemExit(f"run {match.group(1)}: {run['status']}")
        return run

    def counts(self, src: Path) -> dict[str, dict[str, float]]:
        """Processes started and fsyncs per action, strace attached to each daemon (load-independent)."""
        out: dict[str, dict[str, float]] = {}
        if not shutil.which("strace"):
            return out
        jobs = {"gp": lambda: self.gp_actions(src, "counted")}
        if self.laminar:
            jobs["lam"] = lambda: sh(str(LAM / "laminarc"), "run", *(["t"] * ACTIONS), env=self.lenv)
        for s, job in jobs.items():
            log = self.root / f"strace-{s}.txt"
            tracer = subprocess.Popen(["strace", "-f", "-c", "-o", str(log), "-e",
                                       "trace=execve,clone,clone3,fork,vfork,fsync,fdatasync",
                                       "-p", str(self.procs[s].pid)], stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # strace attaches to every thread
            job()
            time.sleep(0.5)
            tracer.send_signal(signal.SIGINT)
            tracer.wait(30)
            calls = strace_counts(log.read_text())
            out[s] = {k: v / ACTIONS for k, v in calls.items()}
        return out


def strace_counts(text: str) -> dict[str, int]:
    calls: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit():
            calls[parts[-1]] = int(parts[3])
    spawn = sum(calls.get(k, 0) for k in ("clone", "clone3", "fork", "vfork"))
    return {"processes and threads started": spawn, "execve": calls.get("execve", 0),
            "fsync + fdatasync": calls.get("fsync", 0) + calls.get("fdatasync", 0)}


def iso(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    peers = Peers(workdir())
    peers.setup()
    try:
        time.sleep(2)
        src = peers.root / "src"
        sh("git", "init", "-q", "-b", "main", str(src))
        (src / ".pipeline.toml").write_text('[[stage]]\nname = "s"\n  [[stage.action]]\n  name = "a"\n'
                                            f'  run = "date +%s.%N > {peers.stamp}"\n')
        (src / "n").write_text("0\n")
        sh("git", "add", "-A", cwd=src)
        sh("git", "commit", "-qm", "0", cwd=src)
        for s in peers.systems:
            sh("git", "push", "-q", str(peers.root / f"{s}.git"), "main", cwd=src)
        time.sleep(2)
        push, start = peers.push_and_start(src, n)
        (src / ".pipeline.toml").write_text("".join(
            f'\n[[stage]]\nname = "s{k}"\n  [[stage.action]]\n  name = "a{k}"\n  run = "true"\n'
            for k in range(ACTIONS)))
        sh("git", "commit", "-qam", "20 actions", cwd=src)
        per_gp, per_lam, base = peers.actions(src, max(3, n // 4))
        counts = peers.counts(src)
        time.sleep(5)
        cpu0 = {s: cpu_seconds(p.pid) for s, p in peers.procs.items()}
        time.sleep(5)
        cpu = {s: (cpu_seconds(p.pid) - cpu0[s]) / 5 * 100 for s, p in peers.procs.items()}
        rss = {s: rss_kib(p.pid) / 1024 for s, p in peers.procs.items()}
    finally:
        peers.close()
    counts = {s: {**counts.get(s, {}), "daemon CPU ms (its own threads, not children)": median(v)}
              for s, v in peers.cpu.items() if v}
    report(n, peers.laminar, push, start, (per_gp, per_lam, base), rss, cpu, counts)


def report(n: int, laminar: bool, push: dict[str, list[float]], start: dict[str, list[float]],
           actions: tuple[list[float], list[float], list[float]], rss: dict[str, float],
           cpu: dict[str, float], counts: dict[str, dict[str, float]]) -> None:
    def lam(x: str) -> str:
        return x if laminar else "(not built)"

    def ratio(g: float, ref: float) -> str:
        return f"{g / ref:.2f}x" if laminar and ref > 0 else "-"

    pp, pg = median(push["plain"]), median(push["gp"])
    pl = median(push["lam"]) if laminar else 0.0
    sg = median(start["gp"])
    sl = median(start["lam"]) if laminar else 0.0
    ag, ab = median(actions[0]), median(actions[2])
    al = median(actions[1]) if laminar else 0.0
    print(f"N={n}, medians in ms, measured interleaved in one run (load {os.getloadavg()[0]:.1f}; read the ratios)")
    print("| measure | gitpipe | laminar 1.4 | gitpipe / laminar | goal |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| what the hook adds to `git push` (plain push {pp:.1f} ms) | +{pg - pp:.1f} ms | "
          f"{lam(f'+{pl - pp:.1f} ms')} | {ratio(pg - pp, pl - pp)} | <= +8 ms |")
    pd = median(push["gpdown"])
    print(f"| the same, gitpipe's daemon down (the Python hook records the push) | +{pd - pp:.1f} ms | - | - | - |")
    print(f"| push start -> the first command runs | {sg:.1f} ms | {lam(f'{sl:.1f} ms')} | {ratio(sg, sl)} | <= 30 ms |")
    print(f"| per action, {ACTIONS} sequential `true` (`bash -c true` alone: {ab:.1f} ms) | {ag:.1f} ms | "
          f"{lam(f'{al:.1f} ms')} | {ratio(ag, al)} | <= 8 ms |")
    rl, cl = rss.get("lam", 0.0), cpu.get("lam", 0.0)
    print(f"| idle daemon RSS, 20 repos | {rss['gp']:.1f} MB | {lam(f'{rl:.1f} MB')} | {ratio(rss['gp'], rl)} | <= 25 MB |")
    print(f"| idle daemon CPU over 5 s | {cpu['gp']:.2f} % | {lam(f'{cl:.2f} %')} | - | 0 % |")
    for key in ("processes and threads started", "execve", "fsync + fdatasync",
                "daemon CPU ms (its own threads, not children)"):
        if key in counts.get("gp", {}):
            lc = f"{counts['lam'][key]:.1f}" if key in counts.get("lam", {}) else lam("-")
            print(f"| {key} per action | {counts['gp'][key]:.1f} | {lc} | - | - |")


if __name__ == "__main__":
    main()
