"""gitpipe beside laminar 1.4 (the leanest CI daemon, C++) and plain git, in one run, interleaved.

    python bench/bench_peers.py [N] [ROWS]  # N pushes per system (default 20); ROWS: a comma list
                                            # of push,start,action,idle (default all)
    GITPIPE_BEFORE=/work/main/.venv/bin python bench/bench_peers.py 20 action,idle

GITPIPE_BEFORE names the bin folder of another gitpipe install ("before"), measured beside
this one in the action and idle rows, interleaved. The action row also times the sandbox
alone, in the same rounds: this checkout's `Sandbox.launch` argument list for a `true` action
(bwrap, setpriv for a root daemon, bash) and the same bwrap without setpriv, the floor a
sandboxed action cannot go below. This checkout's daemon runs with the Environment= settings
of systemd/gitpipe.service (MALLOC_ARENA_MAX), as installed. laminar is used when built: `../shared/peers/build-laminar.sh /tmp/laminar-build`, or set
$LAMINAR_BUILD to the directory holding laminard and laminarc; without it only gitpipe and
plain git are measured. Timings are medians in ms and swing with the machine's load: read
the ratios, measured in the same run. The counts at the end (processes started and fsyncs
per action, seen by strace on the daemon) do not depend on the load.

Rows (adapted from ../shared/peers/peer_bench.py, which produced issue 11's table):
  push      what the post-receive hook adds to `git push` (gitpipe's hook vs `laminarc queue`);
            also gitpipe's with its daemon down (the Python hook records the push itself)
  start     push start -> the first command of the job/action runs (a `date` it writes)
  action    per action: 20 sequential actions in one gitpipe run; 20 laminar jobs, 1 executor
  idle      daemon RSS with 20 repos (laminar: 20 jobs), after 5 s idle (after the rows above;
            with only `idle`, a daemon that has run nothing)

What stands between gitpipe and the goals, measured in the same rounds:
  floor     a repo whose post-receive runs the action's command itself (bash, unsandboxed,
            nothing recorded): the earliest any CI can start a pushed command (push, start)
  hooks     a repo with an empty sh pre-receive and post-receive: what git's running of
            gitpipe's two hooks costs before they do anything (push)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BIN, cpu_seconds, env_with_home, median, rss_kib, workdir  # noqa: E402

LAM = Path(os.environ.get("LAMINAR_BUILD", "/tmp/laminar-build"))
BEFORE = Path(os.environ["GITPIPE_BEFORE"]) if os.environ.get("GITPIPE_BEFORE") else None
ROWS = ("push", "start", "action", "idle")
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
        self.home = root / "gp"  # this checkout's home; "gp0" (GITPIPE_BEFORE) has root / "gp0"
        self.genv = {**GENV, **env_with_home(self.home)}
        self.laminar = (LAM / "laminard").exists()
        self.systems = (["plain", "hooks", "floor", "gp", "gpdown"] + (["gp0"] if BEFORE else [])
                        + (["lam"] if self.laminar else []))
        self.down = root / "gp-down"  # a home whose daemon is not running
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.bins = {"gp": BIN, **({"gp0": BEFORE} if BEFORE else {})}  # gp0: the "before" install

    def gitpipe(self, *args: str, system: str = "gp") -> str:
        env = {**GENV, **env_with_home(self.root / system)} if system != "gp" else self.genv
        return sh(str(self.bins[system] / "gitpipe"), *args, env=env).stdout

    def setup(self) -> None:
        self.stamp.parent.mkdir(mode=0o1777)
        self.stamp.parent.chmod(0o1777)  # the build user writes the stamp
        for s in self.bins:
            self.gitpipe("init", system=s)
            with open(self.root / s / "gitpipe.toml", "a") as f:
                f.write(f'\n[sandbox]\nread_write = ["{self.stamp.parent}"]\n')
            self.gitpipe("repo", "add", str(self.root / f"{s}.git"), "--create", system=s)
            for i in range(ACTIONS - 1):
                self.gitpipe("repo", "add", str(self.root / f"{s}-idle{i}.git"), "--create", system=s)
            env = {**GENV, **env_with_home(self.root / s), **(unit_env() if s == "gp" else {})}
            self.procs[s] = subprocess.Popen([str(self.bins[s] / "gitpipe"), "serve"], env=env,
                                             stdout=open(self.root / f"{s}.log", "w"), stderr=subprocess.STDOUT)
        denv = {**GENV, **env_with_home(self.down)}
        sh(str(BIN / "gitpipe"), "init", env=denv)
        sh(str(BIN / "gitpipe"), "repo", "add", str(self.root / "gpdown.git"), "--create", env=denv)
        sh("git", "init", "-q", "--bare", "-b", "main", str(self.root / "plain.git"))
        hooks = {"hooks": {"pre-receive": ":", "post-receive": ":"},
                 "floor": {"post-receive": f"exec bash -eo pipefail -c 'date +%s.%N > {self.stamp}'"}}
        for s, scripts in hooks.items():
            sh("git", "init", "-q", "--bare", "-b", "main", str(self.root / f"{s}.git"))
            for name, body in scripts.items():
                hook = self.root / f"{s}.git" / "hooks" / name
                hook.write_text(f"#!/bin/sh\n{body}\n")
                hook.chmod(0o755)
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

    def wait_run(self, run_id: int, system: str = "gp") -> dict:
        """The run once it ended. Its status is read from the database until then (a `gitpipe show`
        every 50 ms was a CLI start competing with the run on 2 cores; laminarc just blocks)."""
        db = sqlite3.connect(f"file:{self.root / system / 'gitpipe.db'}?mode=ro", uri=True, timeout=10)
        try:
            while True:
                row = db.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
                if row is not None and row[0] not in ("queued", "running"):
                    break
                time.sleep(0.05)
        finally:
            db.close()
        return json.loads(self.gitpipe("show", str(run_id), "--json", system=system))

    # ------------------------------------------------------------------ measures
    def push_and_start(self, src: Path, n: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
        push: dict[str, list[float]] = {s: [] for s in self.systems}
        start: dict[str, list[float]] = {s: [] for s in self.systems if s not in ("plain", "hooks", "gpdown")}
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

    def actions(self, src: Path, rounds: int) -> dict[str, list[float]]:
        """Per action, ms, each system once per round: gitpipe (and the "before" one), laminar,
        `bash -c true`, and the sandbox alone (`box`: gitpipe's argv; `bwrap`: without setpriv)."""
        per: dict[str, list[float]] = {k: [] for k in [*self.bins, "lam", "bash", "box", "bwrap", "nocg"]}
        self.cpu: dict[str, list[float]] = {s: [] for s in self.procs}  # daemon CPU ms per action
        floor = Floor(self.root, self.stamp.parent)
        try:
            for i in range(rounds):
                for s in self.bins:
                    c0 = cpu_seconds(self.procs[s].pid)
                    run = self.gp_actions(src, f"acts{i}", s)
                    self.cpu[s].append((cpu_seconds(self.procs[s].pid) - c0) * 1000 / ACTIONS)
                    ts = [a for st in run["stages"] for a in st["actions"]]
                    a0, a1 = iso(ts[0]["started_at"]), iso(ts[-1]["finished_at"])
                    per[s].append((a1 - a0) * 1000 / ACTIONS)
                if self.laminar:
                    t0, c0 = time.time(), cpu_seconds(self.procs["lam"].pid)
                    sh(str(LAM / "laminarc"), "run", *(["t"] * ACTIONS), env=self.lenv)
                    per["lam"].append((time.time() - t0) * 1000 / ACTIONS)
                    self.cpu["lam"].append((cpu_seconds(self.procs["lam"].pid) - c0) * 1000 / ACTIONS)
                t0 = time.time()
                for _ in range(ACTIONS):
                    subprocess.run(["bash", "-c", "true"], check=True)
                per["bash"].append((time.time() - t0) * 1000 / ACTIONS)
                per["box"].append(floor.time(ACTIONS, setpriv=True))
                per["bwrap"].append(floor.time(ACTIONS, setpriv=False))
                per["nocg"].append(floor.time(ACTIONS, setpriv=True, cgroup=False))
        finally:
            floor.close()
        return per

    def gp_actions(self, src: Path, msg: str, system: str = "gp") -> dict:
        sh("git", "commit", "-q", "--allow-empty", "-m", msg, cwd=src)
        out = sh("git", "push", str(self.root / f"{system}.git"), "main", cwd=src).stderr
        match = re.search(r"run #(\d+)", out)
        if not match:
            raise SystemExit(f"the push named no run: {out}")
        run = self.wait_run(int(match.group(1)), system)
        if run["status"] != "succeeded":
            raise SystemExit(f"run {match.group(1)}: {run['status']}")
        return run

    def counts(self, src: Path) -> dict[str, dict[str, float]]:
        """Processes started and fsyncs per action, strace attached to each daemon (load-independent)."""
        out: dict[str, dict[str, float]] = {}
        if not shutil.which("strace"):
            return out
        jobs = {s: (lambda s=s: self.gp_actions(src, "counted", s)) for s in self.bins}
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


def unit_env() -> dict[str, str]:
    """The Environment= settings of this checkout's systemd unit but the home (MALLOC_ARENA_MAX):
    gitpipe's daemon as installed; the "before" one runs as its own unit had it (without)."""
    unit = Path(__file__).resolve().parent.parent / "systemd" / "gitpipe.service"
    found = dict(line[len("Environment="):].split("=", 1) for line in unit.read_text().splitlines()
                 if line.startswith("Environment="))
    found.pop("GITPIPE_HOME", None)
    return found


class Floor:
    """The sandbox alone: this checkout's `Sandbox.launch` for a `true` action, started and
    waited for as the executor does (its cgroup made and removed), in a home of its own."""

    def __init__(self, root: Path, shared: Path) -> None:
        from gitpipe import settings
        from gitpipe.sandbox import Confine, Sandbox

        home = root / "floor"
        sh(str(BIN / "gitpipe"), "init", env={**GENV, **env_with_home(home)})
        with open(home / "gitpipe.toml", "a") as f:
            f.write(f'\n[sandbox]\nread_write = ["{shared}"]\n')
        self.sandbox = Sandbox.for_host(settings.load(home))
        slot = root / "floor-slot"
        (slot / "tree").mkdir(parents=True)
        self.confine = lambda key: Confine(key=key, home=slot / "home", tree=slot / "tree", name="gp",
                                           output=slot / "output", readonly=(root / "gp.git" / "objects",))
        self.n = 0

    def time(self, count: int, setpriv: bool, cgroup: bool = True) -> float:
        """ms from start to exit of `bash -eo pipefail -c true` in the sandbox, mean of `count`;
        `cgroup=False`: without the attempt's cgroup (what moving into it costs)."""
        total = 0.0
        for _ in range(count):
            self.n += 1
            launch = self.sandbox.launch(["bash", "-eo", "pipefail", "-c", "true"], {"CI": "true"},
                                         self.confine(f"f{self.n}" if cgroup else ""))
            if not setpriv and "--no-new-privs" in launch.argv:  # bwrap alone: setpriv's words cut
                at = launch.argv.index("--no-new-privs")
                del launch.argv[at - 5:at + 1]
            t0 = time.perf_counter()
            proc = launch.popen(stdin=subprocess.DEVNULL, start_new_session=True, close_fds=True)
            code = proc.wait()
            total += time.perf_counter() - t0
            if launch.group is not None:
                launch.group.remove()
            if code != 0:
                raise SystemExit(f"the sandbox alone failed: exit {code}")
        return total * 1000 / count

    def close(self) -> None:
        self.sandbox.close()


def children_rss(pid: int) -> tuple[float, float]:
    """(RSS, anonymous RSS) in KiB of a daemon's live child processes, summed (its own world only)."""
    rss = anon = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for kid in kids:
            try:
                fields = dict(line.split(":", 1) for line in Path(f"/proc/{kid}/status").read_text().splitlines()
                              if ":" in line)
            except OSError:
                continue
            rss += float(fields.get("VmRSS", "0 kB").split()[0])
            anon += float(fields.get("RssAnon", "0 kB").split()[0])
    return rss, anon


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
    rows = sys.argv[2].split(",") if len(sys.argv) > 2 else list(ROWS)
    if set(rows) - set(ROWS):
        raise SystemExit(f"rows are {','.join(ROWS)}; not {','.join(sorted(set(rows) - set(ROWS)))}")
    peers = Peers(workdir())
    peers.setup()
    out = Results(n, peers.laminar)
    try:
        time.sleep(2)
        if "idle" in rows:
            out.fresh = {s: rss_kib(p.pid) / 1024 for s, p in peers.procs.items()}
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
        if "push" in rows or "start" in rows:
            out.push, out.start = peers.push_and_start(src, n)
        if "action" in rows:
            (src / ".pipeline.toml").write_text("".join(
                f'\n[[stage]]\nname = "s{k}"\n  [[stage.action]]\n  name = "a{k}"\n  run = "true"\n'
                for k in range(ACTIONS)))
            sh("git", "commit", "-qam", "20 actions", cwd=src)
            out.actions = peers.actions(src, max(3, n // 4))
            out.counts = peers.counts(src)
            for s, v in peers.cpu.items():
                if v:
                    out.counts.setdefault(s, {})["daemon CPU ms (its own threads, not children)"] = median(v)
        if "idle" in rows:
            time.sleep(5)
            cpu0 = {s: cpu_seconds(p.pid) for s, p in peers.procs.items()}
            time.sleep(5)
            out.cpu = {s: (cpu_seconds(p.pid) - cpu0[s]) / 5 * 100 for s, p in peers.procs.items()}
            out.rss = {s: rss_kib(p.pid) / 1024 for s, p in peers.procs.items()}
            out.children = {s: tuple(x / 1024 for x in children_rss(p.pid)) for s, p in peers.procs.items()}
    finally:
        peers.close()
    out.report()


class Results:
    """What was measured; prints one table (columns: gitpipe, the "before" one, laminar)."""

    def __init__(self, n: int, laminar: bool) -> None:
        self.n, self.laminar = n, laminar
        self.push: dict[str, list[float]] = {}
        self.start: dict[str, list[float]] = {}
        self.actions: dict[str, list[float]] = {}
        self.counts: dict[str, dict[str, float]] = {}
        self.rss: dict[str, float] = {}
        self.fresh: dict[str, float] = {}
        self.children: dict[str, tuple[float, float]] = {}
        self.cpu: dict[str, float] = {}

    def report(self) -> None:
        before = BEFORE is not None
        print(f"N={self.n}, medians in ms, measured interleaved in one run "
              f"(load {os.getloadavg()[0]:.1f} at the end; read the ratios)")
        print("| measure | gitpipe |" + (" before |" if before else "") + " laminar 1.4 | gitpipe / laminar | goal |")
        print("| --- | --- |" + (" --- |" if before else "") + " --- | --- | --- |")

        def row(name: str, values: dict[str, float], fmt: str, goal: str) -> None:
            g, lam = values.get("gp"), values.get("lam")
            cells = [fmt.format(g) if g is not None else "-"]
            if before:
                cells.append(fmt.format(values["gp0"]) if "gp0" in values else "-")
            cells.append(fmt.format(lam) if lam is not None else ("(not built)" if not self.laminar else "-"))
            cells.append(f"{g / lam:.2f}x" if g is not None and lam else "-")
            print(f"| {name} | " + " | ".join(cells) + f" | {goal} |")

        if self.push:
            plain = median(self.push["plain"])
            added = {s: median(v) - plain for s, v in self.push.items() if s != "plain"}
            row(f"what the hook adds to `git push` (plain push {plain:.1f} ms)", added, "+{:.1f} ms", "<= +8 ms")
            if "gpdown" in added:
                row("the same, gitpipe's daemon down (the Python hook records the push)",
                    {"gp": added["gpdown"]}, "+{:.1f} ms", "-")
            row("floor: an empty sh pre-receive and post-receive", {"gp": added["hooks"]}, "+{:.1f} ms", "-")
        if self.start:
            started = {s: median(v) for s, v in self.start.items()}
            row("push start -> the first command runs", started, "{:.1f} ms", "<= 30 ms")
            row("floor: post-receive runs the command itself (unsandboxed, nothing recorded)",
                {"gp": started["floor"]}, "{:.1f} ms", "-")
            row("push start -> first command, less that floor", {s: v - started["floor"] for s, v in started.items()},
                "+{:.1f} ms", "-")
        if self.actions:
            a = {s: median(v) for s, v in self.actions.items() if v}
            row(f"per action, {ACTIONS} sequential `true` (`bash -c true` alone: {a['bash']:.1f} ms)",
                {s: a[s] for s in ("gp", "gp0", "lam") if s in a}, "{:.1f} ms", "<= 8 ms")
            empty = " |" * (3 if before else 2)
            print(f"| the sandbox alone, same rounds: bwrap + setpriv + bash (bwrap + bash: {a['bwrap']:.1f} ms; "
                  f"no cgroup: {a['nocg']:.1f} ms) | {a['box']:.1f} ms |" + empty + " floor |")
            row("per action less its command's own start (gitpipe: the sandbox alone; laminar: `bash -c true`)",
                {s: a[s] - (a["bash"] if s == "lam" else a["box"]) for s in ("gp", "gp0", "lam") if s in a},
                "+{:.1f} ms", "-")
            print(f"| per action / the sandbox alone | {a['gp'] / a['box']:.2f}x |"
                  + (f" {a['gp0'] / a['box']:.2f}x |" if "gp0" in a else "") + " | | |")
        if self.fresh:
            row("daemon RSS, 20 repos, before any run", self.fresh, "{:.1f} MB", "<= 25 MB")
        if self.rss:
            row("idle daemon RSS, 20 repos, after the rows above", self.rss, "{:.1f} MB", "<= 25 MB")
            row("idle daemon CPU over 5 s", self.cpu, "{:.2f} %", "0 %")
            kids = {s: rss for s, (rss, _) in self.children.items()}
            own = {s: anon for s, (_, anon) in self.children.items()}
            row("its idle child processes (gitpipe: the parked launcher), RSS", kids, "{:.1f} MB", "-")
            row("the same, private (anonymous) memory only", own, "{:.1f} MB", "-")
        for key in ("processes and threads started", "execve", "fsync + fdatasync",
                    "daemon CPU ms (its own threads, not children)"):
            values = {s: c[key] for s, c in self.counts.items() if key in c}
            if values:
                row(f"{key} per action", values, "{:.1f}", "-")


if __name__ == "__main__":
    main()
