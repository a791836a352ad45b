"""Sandbox benchmarks (issue: the sandbox). Prints Markdown tables of gitpipe vs a baseline.

    python bench/bench_sandbox.py            # both parts (about 3 minutes); run as root
    python bench/bench_sandbox.py actions    # one part: actions | bomb

Three daemons run side by side, each on a home of its own, and get their pushes in turn
(round-robin), so a slow minute of the host hits all three alike:

- none:        `[sandbox] mode = "none"`, daemon run as the unprivileged user gitpipe-bench
               (a root daemon refuses "none").
- bwrap:       `mode = "bwrap"`, the same unprivileged user.
- bwrap, root: `mode = "bwrap"`, daemon run as root; actions run as gitpipe-build (setpriv).

Each daemon starts inside a cgroup this script makes (pids and memory, under its own):
handed to gitpipe-bench for the unprivileged daemons, as systemd's `Delegate=yes` would,
so every daemon gets a cgroup per attempt and `[sandbox] pids` is enforced for all
three. The group also caps the daemon's whole tree at SAFETY_PIDS processes, and it is
how this script finds and ends everything the daemon left when it is done.

- actions: a run of 30 sequential `true` actions (30 stages of one action); per action
           = the median gap between consecutive actions' started_at (`gitpipe show
           --json`), over ROUNDS runs; baseline: `bash -c true`, median of single calls.
- bomb:    one stage, two parallel actions: a fork bomb (`[sandbox] pids = 256`) and a
           timer printing `date` 20 times 0.1 s apart; vs the same run with `sleep 6` in
           place of the bomb. Measured: the timer's span and wall time, the daemon's
           VmRSS (sampled every 20 ms) and CPU, the bomb attempt's process count.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_seconds, median, ms, rss_kib, timed, workdir  # noqa: E402

from gitpipe.cgroup import own_groups  # noqa: E402

USER = "gitpipe-bench"
REPO = Path(__file__).resolve().parent.parent
# The venv's interpreter lives under /root (mode 0700 here), which gitpipe-bench cannot
# enter: it could not start the daemon's hooks. Every daemon (root's too, so all three
# run the same interpreter) uses a venv made here from the system's python of the same
# minor version, its site-packages linked to the venv's.
RUNTIME = Path("/opt/gitpipe-bench/venv")
PYTHON = RUNTIME / "bin" / "python"
USER_HOME = Path("/var/lib/gitpipe-bench")
CGROUP = Path("/sys/fs/cgroup")
N_ACTIONS = 30
ROUNDS = 5  # timed runs of the 30-action pipeline per daemon
BOMB_ROUNDS = 3  # runs with and without the bomb per daemon
PIDS = 256  # [sandbox] pids
SAFETY_PIDS = 2000  # the bench's cap on a daemon's whole cgroup (the bomb must never reach the host)
RUN_TIMEOUT = 120.0  # seconds a run may take before the bench gives up on it
TIME_FMT = "%Y-%m-%dT%H:%M:%S.%fZ"

ACTIONS_PIPELINE = "".join(
    f'[[stage]]\nname = "s{i}"\n  [[stage.action]]\n  name = "a{i}"\n  run = "true"\n'
    for i in range(N_ACTIONS))
TIMER = "sleep 0.5; for i in $(seq 20); do date +%s.%N; sleep 0.1; done"
BOMB = """sleep 6 & keep=$!
bomb() { bomb | bomb & }
bomb
wait "$keep"
"""
QUIET = "sleep 6"


def bomb_pipeline(first: str) -> str:
    return (f'[pipeline]\ntimeout = "2m"\n[[stage]]\nname = "s"\n'
            f'  [[stage.action]]\n  name = "first"\n  timeout = "60s"\n  run = \'\'\'{first}\'\'\'\n'
            f'  [[stage.action]]\n  name = "timer"\n  timeout = "60s"\n  run = "{TIMER}"\n')


# ---------------------------------------------------------------------- who runs what
def ensure_runtime() -> None:
    """A venv every user may run (idempotent): system python, this venv's packages linked in."""
    want = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = Path("/usr/bin") / want
    if not system.exists():
        raise RuntimeError(f"{system} is missing: the bench needs a system {want} that every user may run")
    if not PYTHON.exists():
        RUNTIME.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        subprocess.run([str(system), "-m", "venv", "--without-pip", str(RUNTIME)], check=True,
                       capture_output=True)
    ours = Path(sysconfig.get_paths()["purelib"])
    theirs = RUNTIME / "lib" / want / "site-packages"
    for entry in ours.iterdir():
        link = theirs / entry.name
        if not link.exists() and not link.is_symlink():
            link.symlink_to(entry)
    (theirs / "gitpipe-bench-src.pth").write_text(f"{REPO}\n")
    probe = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", str(PYTHON),
                            "-c", "import gitpipe.cli, pygit2, watchdog, tomli_w"],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        raise RuntimeError(f"the bench venv {RUNTIME} does not work for other users: {probe.stderr.strip()}")


def ensure_user() -> pwd.struct_passwd:
    """The unprivileged account the non-root daemons run as, with a home it owns (idempotent)."""
    try:
        pwd.getpwnam(USER)
    except KeyError:
        proc = subprocess.run(["useradd", "--system", "--user-group", "--home-dir", str(USER_HOME),
                               "--create-home", "--shell", "/usr/sbin/nologin", USER],
                              capture_output=True, text=True, check=False)
        if proc.returncode not in (0, 9):  # 9: made meanwhile
            raise RuntimeError(f"useradd {USER}: {proc.stderr.strip()}") from None
    entry = pwd.getpwnam(USER)
    USER_HOME.mkdir(mode=0o750, exist_ok=True)
    os.chown(USER_HOME, entry.pw_uid, entry.pw_gid)
    return entry


@dataclass
class BenchGroup:
    """The daemon's own cgroup (pids + memory), made by the bench, handed to the daemon's user."""

    dirs: list[Path]

    @classmethod
    def make(cls, name: str, owner: pwd.struct_passwd | None) -> BenchGroup:
        own = own_groups()
        dirs = []
        for c in ("pids", "memory"):
            if c not in own or not (CGROUP / c).is_dir():
                raise RuntimeError(f"this bench needs the cgroup v1 {c} hierarchy (not found)")
            d = CGROUP / c / own[c].lstrip("/") / name
            d.mkdir()
            dirs.append(d)
            if owner is not None:  # delegation, as systemd's Delegate=yes does it on v1
                for p in (d, d / "cgroup.procs", d / "tasks"):
                    os.chown(p, owner.pw_uid, owner.pw_gid)
        (dirs[0] / "pids.max").write_text(str(SAFETY_PIDS))
        return cls(dirs)

    def wrap(self, argv: list[str]) -> list[str]:
        """argv started inside the group (the shell joins it, then execs: same pid)."""
        joins = " && ".join(f"echo $$ > {d / 'cgroup.procs'}" for d in self.dirs)
        return ["/bin/sh", "-c", f'{joins} && exec "$@"', "bench-join", *argv]

    def members(self) -> set[int]:
        """Every process in the group or below it."""
        found: set[int] = set()
        for d in self.dirs:
            for procs in d.rglob("cgroup.procs"):
                try:
                    found.update(int(p) for p in procs.read_text().split())
                except OSError:
                    continue
        return found

    def kill_all(self) -> int:
        """SIGKILL every member, pid by pid, until none is left (bounded); how many were left."""
        left = len(self.members())
        for _ in range(400):
            pids = self.members()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.01)
        return left

    def remove(self) -> None:
        self.kill_all()
        for d in self.dirs:
            for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                _rmdir(sub)
            _rmdir(d)


def _rmdir(d: Path) -> None:
    for _ in range(100):
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.02)
    print(f"warning: could not remove cgroup {d}", file=sys.stderr)


# ---------------------------------------------------------------------- one daemon
@dataclass
class Side:
    """One gitpipe home, its repo, its source clone and its daemon, run as one user."""

    label: str
    mode: str
    user: pwd.struct_passwd | None  # None: root
    root: Path = Path()
    pushes: int = 0
    proc: subprocess.Popen[bytes] | None = None
    group: BenchGroup | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def src(self) -> Path:
        return self.root / "src"

    @property
    def bare(self) -> Path:
        return self.root / "r.git"

    def prefix(self) -> list[str]:
        if self.user is None:
            return []
        return ["setpriv", f"--reuid={self.user.pw_uid}", f"--regid={self.user.pw_gid}", "--init-groups", "--"]

    def env(self) -> dict[str, str]:
        home = self.user.pw_dir if self.user else "/root"
        return {"PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"), "HOME": home,
                "LANG": "C.UTF-8", "GITPIPE_HOME": str(self.home)}

    def run(self, argv: list[str], cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.prefix() + argv, cwd=cwd, env=self.env(), capture_output=True, text=True,
                              timeout=120, check=False)
        if check and proc.returncode != 0:
            raise RuntimeError(f"[{self.label}] {' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def gitpipe(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run([str(PYTHON), "-m", "gitpipe", *args])

    def git(self, *args: str) -> None:
        self.run(["git", *args], cwd=self.src)

    def setup(self) -> None:
        if self.user is None:
            self.root = workdir()
        else:
            self.root = Path(tempfile.mkdtemp(prefix="bench-", dir=USER_HOME))
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
        self.gitpipe("init")
        config = self.home / "gitpipe.toml"
        text = config.read_text().replace("# max_parallel = 2", "max_parallel = 4")
        config.write_text(text + f'\n[sandbox]\nmode = "{self.mode}"\npids = {PIDS}\n')  # keeps its owner
        self.gitpipe("repo", "add", str(self.bare), "--create")
        self.run(["git", "init", "-q", "-b", "main", str(self.src)])
        self.git("config", "user.email", "bench@localhost")
        self.git("config", "user.name", "bench")

    def start(self) -> None:
        """`gitpipe serve` in a bench cgroup; returns once it said READY=1 (sd_notify)."""
        address = f"gitpipe-bench-{uuid.uuid4().hex}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind("\0" + address)  # abstract: any uid may send to it
        sock.settimeout(0.5)
        self.group = BenchGroup.make(f"bench-{self.root.name}", self.user)
        log = open(self.root / "daemon.log", "wb")  # noqa: SIM115 - the daemon holds it
        argv = self.group.wrap(self.prefix() + [str(PYTHON), "-m", "gitpipe", "serve"])
        self.proc = subprocess.Popen(argv, env={**self.env(), "NOTIFY_SOCKET": "@" + address},
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        end = time.monotonic() + 60
        try:
            while time.monotonic() < end:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"[{self.label}] daemon exited {self.proc.returncode}: "
                                       f"{(self.root / 'daemon.log').read_text()[-2000:]}")
                try:
                    if sock.recv(100) == b"READY=1":
                        break
                except TimeoutError:
                    continue
            else:
                raise RuntimeError(f"[{self.label}] daemon not ready after 60 s")
        finally:
            sock.close()
        self.notes = [line for line in (self.root / "daemon.log").read_text().splitlines() if "sandbox" in line]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.group is not None:
            left = self.group.kill_all()
            if left:
                print(f"warning: [{self.label}] {left} process(es) were left in the daemon's cgroup "
                      "after it stopped", file=sys.stderr)
            self.group.remove()
            self.group = None

    def push(self, pipeline: str) -> tuple[int, str]:
        """Commit `pipeline` (and a new counter) and push it; (run id, sha)."""
        (self.src / ".pipeline.toml").write_text(pipeline)
        (self.src / "counter.txt").write_text(f"{self.pushes}\n")
        os.chown(self.src / ".pipeline.toml", *self._ids())
        os.chown(self.src / "counter.txt", *self._ids())
        self.git("add", "-A")
        self.git("commit", "-qm", f"change {self.pushes}")
        pushed = self.run(["git", "push", "-q", str(self.bare), "main"], cwd=self.src)
        queued = re.search(r"run #(\d+) queued", pushed.stdout + pushed.stderr)
        if queued is None:  # a hook that could not run only prints why: the push itself succeeds
            raise RuntimeError(f"[{self.label}] the push queued no run: {pushed.stdout}{pushed.stderr}")
        self.pushes += 1
        sha = self.run(["git", "rev-parse", "HEAD"], cwd=self.src).stdout.strip()
        return int(queued.group(1)), sha

    def _ids(self) -> tuple[int, int]:
        return (self.user.pw_uid, self.user.pw_gid) if self.user else (0, 0)

    def logs(self, run_id: int) -> Path:
        return self.home / "logs" / str(run_id)

    def wait(self, run_id: int, sha: str, ready: Callable[[], bool]) -> dict:
        """The run's `show --json` once it finished. `ready` (cheap, no process) says when it
        is nearly done, so that few `gitpipe show` processes run beside the measured actions."""
        end = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < end and not ready():
            time.sleep(0.02)
        while time.monotonic() < end:
            data = json.loads(self.gitpipe("show", str(run_id), "--json").stdout)
            if data.get("finished_at"):
                if data["sha"] != sha:
                    raise RuntimeError(f"[{self.label}] run {run_id} is for {data['sha']}, not {sha}")
                return data
            time.sleep(0.1)
        raise TimeoutError(f"[{self.label}] run {run_id} did not finish in {RUN_TIMEOUT:.0f} s")


def parse_time(text: str) -> float:
    return datetime.strptime(text, TIME_FMT).timestamp()


def actions_of(data: dict) -> list[dict]:
    return [a for stage in data["stages"] for a in stage["actions"]]


def check_succeeded(side: Side, data: dict) -> None:
    if data["status"] != "succeeded":
        bad = [f"{a['name']}: {a['status']} {a['message'] or ''}" for a in actions_of(data) if a["status"] != "succeeded"]
        log = side.logs(data["id"])
        tail = ""
        for f in sorted(log.glob("*.log"))[:3]:
            tail += f"\n--- {f.name}\n" + f.read_text(errors="replace")[-1500:]
        raise RuntimeError(f"[{side.label}] run {data['id']} {data['status']}: {data.get('error')}; {bad}{tail}")


# ---------------------------------------------------------------------- Markdown
def md_table(title: str, head: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    print(f"\n**{title}**\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows:
        print("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")


def plus_ms(x: float) -> str:
    return f"{x * 1000:+.1f} ms"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


# ---------------------------------------------------------------------- part 1: per action
BWRAP_ALONE = """
import os, pwd, shutil, statistics, subprocess, sys, tempfile, time
from pathlib import Path
from gitpipe.executor import bash
from gitpipe.sandbox import Confine, Sandbox
from gitpipe.settings import SandboxSettings
box = Sandbox(SandboxSettings(), "bench", bwrap=shutil.which("bwrap"))
d = Path(tempfile.mkdtemp(prefix="gitpipe-bench-bwrap-"))
os.chmod(d, 0o755)
(d / "home").mkdir()
(d / "tree").mkdir()
if os.geteuid() == 0:  # as the daemon does: the build user's dirs, setpriv to it inside
    e = pwd.getpwnam(box.conf.user)
    box.uid, box.gid = e.pw_uid, e.pw_gid
    for p in (d / "home", d / "tree"):
        os.chown(p, e.pw_uid, e.pw_gid)
argv = box._bwrap(bash("true"), Confine(key="", home=d / "home", tree=d / "tree", name="r"), {})
times = []
for _ in range(int(sys.argv[1])):
    t = time.perf_counter()
    subprocess.run(argv, cwd="/", env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/home/build"},
                   check=True, stdin=subprocess.DEVNULL)
    times.append(time.perf_counter() - t)
shutil.rmtree(d)
print(" ".join(map(str, times)))
"""


def bwrap_alone(side: Side, n: int) -> list[float]:
    """`n` runs of the bwrap command line gitpipe builds for `true` (no daemon, no cgroup), as `side`'s user."""
    return [float(x) for x in side.run([str(PYTHON), "-c", BWRAP_ALONE, str(n)]).stdout.split()]


def bench_actions(sides: list[Side]) -> None:
    def ready(side: Side, run_id: int) -> Callable[[], bool]:
        return lambda: len(list(side.logs(run_id).glob("*.log"))) >= N_ACTIONS

    for side in sides:  # warm: the first checkout of the worktree slot is a full one
        run_id, sha = side.push(ACTIONS_PIPELINE)
        check_succeeded(side, side.wait(run_id, sha, ready(side, run_id)))
    start_gaps: dict[str, list[float]] = {s.label: [] for s in sides}
    finish_gaps: dict[str, list[float]] = {s.label: [] for s in sides}
    inside: dict[str, list[float]] = {s.label: [] for s in sides}
    between: dict[str, list[float]] = {s.label: [] for s in sides}
    bash: list[float] = []
    alone: dict[str, list[float]] = {s.label: [] for s in sides if s.mode == "bwrap"}
    for _ in range(ROUNDS):
        for side in sides:
            run_id, sha = side.push(ACTIONS_PIPELINE)
            data = side.wait(run_id, sha, ready(side, run_id))
            check_succeeded(side, data)
            acts = actions_of(data)
            assert len(acts) == N_ACTIONS, len(acts)
            started = [parse_time(a["started_at"]) for a in acts]
            finished = [parse_time(a["finished_at"]) for a in acts]
            start_gaps[side.label] += [b - a for a, b in zip(started, started[1:])]
            finish_gaps[side.label] += [b - a for a, b in zip(finished, finished[1:])]
            inside[side.label] += [f - s for s, f in zip(started, finished)]
            between[side.label] += [s - f for f, s in zip(finished, started[1:])]
        bash += [timed(lambda: subprocess.run(["bash", "-c", "true"], check=True)) for _ in range(N_ACTIONS)]
        for side in sides:
            if side.label in alone:
                alone[side.label] += bwrap_alone(side, N_ACTIONS)

    per = {label: median(gaps) for label, gaps in start_gaps.items()}
    base = median(bash)
    none, bw_user, bw_root = (per[s.label] for s in sides)
    gaps_n = ROUNDS * (N_ACTIONS - 1)
    md_table(f"{N_ACTIONS} sequential `true` actions: per action = median gap between consecutive "
             f"actions' started_at ({ROUNDS} runs x {N_ACTIONS - 1} gaps = {gaps_n} per row)",
             ("measure", "gitpipe", "baseline", "ratio"), [
                 (f"per action, {sides[0].label}", ms(none), f"{ms(base)} (`bash -c true`)", ratio(none, base)),
                 (f"per action, {sides[1].label}", ms(bw_user), f"{ms(none)} (none)", ratio(bw_user, none)),
                 (f"per action, {sides[2].label}", ms(bw_root), f"{ms(none)} (none)", ratio(bw_root, none)),
                 (f"bwrap - none, daemon {USER}", plus_ms(bw_user - none), "-",
                  "goal: <= +5 ms " + ("(met)" if bw_user - none <= 0.005 else "(NOT met)")),
                 ("bwrap (root daemon) - none", plus_ms(bw_root - none), "-",
                  "goal: <= +5 ms " + ("(met)" if bw_root - none <= 0.005 else "(NOT met)")),
                 (f"`bash -c true`, median of {len(bash)} single calls", ms(base), "-", ""),
                 *[(f"gitpipe's bwrap command line for `true` run alone (no daemon, no cgroup), as "
                    f"{'root' if s.user is None else USER}", ms(median(alone[s.label])), f"{ms(base)} (`bash -c true`)",
                    ratio(median(alone[s.label]), base)) for s in sides if s.label in alone],
             ])
    md_table("where the time per action goes (same runs; medians unless said)",
             ("daemon", "start-to-start", "finish-to-finish", "started -> finished",
              "finished -> next started", "actions taking >= 50 ms (started -> finished)"),
             [(s.label, ms(per[s.label]), ms(median(finish_gaps[s.label])), ms(median(inside[s.label])),
               ms(median(between[s.label])),
               f"{sum(x >= 0.05 for x in inside[s.label])} of {len(inside[s.label])}") for s in sides])


# ---------------------------------------------------------------------- part 2: fork bomb


class Sampler:
    """Samples the daemon's VmRSS and the largest attempt cgroup's pids.current every 20 ms."""

    def __init__(self, side: Side) -> None:
        assert side.proc is not None and side.group is not None
        self.pid, self.pids_dir = side.proc.pid, side.group.dirs[0]
        self.rss: list[int] = []
        self.peak_pids = 0
        self.stop_flag = threading.Event()
        self.cpu0 = cpu_seconds(self.pid)
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        end = time.monotonic() + RUN_TIMEOUT + 30
        while not self.stop_flag.is_set() and time.monotonic() < end:
            self.rss.append(rss_kib(self.pid))
            for f in self.pids_dir.glob("gitpipe-*/*/pids.current"):
                try:
                    self.peak_pids = max(self.peak_pids, int(f.read_text()))
                except (OSError, ValueError):
                    pass
            self.stop_flag.wait(0.02)

    def stop(self) -> float:
        self.stop_flag.set()
        self.thread.join()
        return cpu_seconds(self.pid) - self.cpu0


@dataclass
class BombRun:
    span: float  # the timer's first to last `date`
    wall: float  # the timer action's started_at -> finished_at
    rss_peak: int  # KiB
    rss_start: int
    cpu: float
    peak_pids: int
    first: str  # how the first action (bomb or sleep) ended
    first_wall: float  # its started_at -> finished_at
    leftover: int  # processes still in the daemon's cgroup, the daemon aside, after the run
    log_bytes: int  # the first action's log size


def timer_dates(side: Side, run_id: int) -> list[float]:
    dates = []
    for f in side.logs(run_id).glob("*-timer.*.log"):
        for line in f.read_text(errors="replace").splitlines():
            m = re.search(r"(\d{10}\.\d+)\s*$", line)
            if m:
                dates.append(float(m.group(1)))
    return dates


def bomb_once(side: Side, first: str) -> BombRun:
    assert side.proc is not None and side.group is not None
    sampler = Sampler(side)
    rss_start = rss_kib(side.proc.pid)
    run_id, sha = side.push(bomb_pipeline(first))
    data = side.wait(run_id, sha, lambda: len(timer_dates(side, run_id)) >= 20)
    cpu = sampler.stop()
    time.sleep(0.2)
    leftover = len(side.group.members() - {side.proc.pid})
    acts = {a["name"]: a for a in actions_of(data)}
    timer = acts["timer"]
    if timer["status"] != "succeeded":
        raise RuntimeError(f"[{side.label}] run {run_id}: the timer action {timer['status']}: {timer['message']}")
    dates = timer_dates(side, run_id)
    if len(dates) != 20:
        raise RuntimeError(f"[{side.label}] run {run_id}: the timer printed {len(dates)} dates, not 20")
    bomb = acts["first"]
    first_log = sum(f.stat().st_size for f in side.logs(run_id).glob("*-first.*.log"))
    return BombRun(span=dates[-1] - dates[0],
                   wall=parse_time(timer["finished_at"]) - parse_time(timer["started_at"]),
                   rss_peak=max(sampler.rss), rss_start=rss_start, cpu=cpu, peak_pids=sampler.peak_pids,
                   first=f"{bomb['status']}" + (f": {bomb['message']}" if bomb["message"] else ""),
                   first_wall=parse_time(bomb["finished_at"]) - parse_time(bomb["started_at"]),
                   leftover=leftover, log_bytes=first_log)


def bench_bomb(sides: list[Side]) -> None:
    for side in sides:  # warm (also the first checkout when `actions` did not run)
        run_id, sha = side.push(bomb_pipeline(QUIET))
        check_succeeded(side, side.wait(run_id, sha, lambda s=side, r=run_id: len(timer_dates(s, r)) >= 20))
    runs: dict[tuple[str, str], list[BombRun]] = {}
    for _ in range(BOMB_ROUNDS):
        for kind, script in (("quiet", QUIET), ("bomb", BOMB)):
            for side in sides:
                runs.setdefault((side.label, kind), []).append(bomb_once(side, script))
    for side in sides:
        b, q = runs[(side.label, "bomb")], runs[(side.label, "quiet")]

        def med(xs: list[BombRun], f: Callable[[BombRun], float]) -> float:
            return median([f(x) for x in xs])

        span_b, span_q = med(b, lambda r: r.span), med(q, lambda r: r.span)
        wall_b, wall_q = med(b, lambda r: r.wall), med(q, lambda r: r.wall)
        rss_b, rss_q = max(r.rss_peak for r in b), max(r.rss_peak for r in q)
        grow_b, grow_q = (max(r.rss_peak - r.rss_start for r in xs) for xs in (b, q))
        cpu_b, cpu_q = med(b, lambda r: r.cpu), med(q, lambda r: r.cpu)
        endings = sorted({r.first for r in b})
        md_table(f"fork bomb (`[sandbox] pids = {PIDS}`) beside a timer action, {side.label}; "
                 f"median of {BOMB_ROUNDS} runs each", ("measure", "with bomb", "without (sleep 6)", "ratio"), [
                     ("timer: first -> last `date` (20 x sleep 0.1)", ms(span_b), ms(span_q), ratio(span_b, span_q)),
                     ("timer action: started_at -> finished_at", ms(wall_b), ms(wall_q), ratio(wall_b, wall_q)),
                     ("daemon VmRSS, peak (sampled every 20 ms)", f"{rss_b / 1024:.1f} MiB", f"{rss_q / 1024:.1f} MiB",
                      ratio(rss_b, rss_q)),
                     ("daemon VmRSS, largest growth during a run", f"{grow_b / 1024:+.1f} MiB",
                      f"{grow_q / 1024:+.1f} MiB", "-"),
                     ("daemon CPU during the run", f"{cpu_b:.2f} s", f"{cpu_q:.2f} s", ratio(cpu_b, cpu_q)),
                     ("largest attempt cgroup, pids.current peak", str(max(r.peak_pids for r in b)),
                      str(max(r.peak_pids for r in q)), f"limit {PIDS}"),
                     ("first action's log size, median", f"{med(b, lambda r: r.log_bytes) / 1024:.0f} KiB",
                      f"{med(q, lambda r: r.log_bytes) / 1024:.0f} KiB", "-"),
                     ("processes left in the daemon's cgroup after the run", str(max(r.leftover for r in b)),
                      str(max(r.leftover for r in q)), "goal: 0"),
                     ("first action (bomb / sleep 6): started_at -> finished_at",
                      ms(med(b, lambda r: r.first_wall)), ms(med(q, lambda r: r.first_wall)),
                      ratio(med(b, lambda r: r.first_wall), med(q, lambda r: r.first_wall))),
                     ("how the first action ended", "; ".join(endings), "; ".join(sorted({r.first for r in q})), ""),
                 ])


# ---------------------------------------------------------------------- main
PARTS = {"actions": bench_actions, "bomb": bench_bomb}


def main(parts: list[str]) -> None:
    if os.geteuid() != 0:
        sys.exit("run as root: the bench makes a user, cgroups, and a root daemon")
    for p in parts:
        if p not in PARTS:
            sys.exit(f"unknown part {p!r}; parts: {', '.join(PARTS)}")
    user = ensure_user()
    ensure_runtime()
    sides = [Side(f'mode "none", daemon {USER}', "none", user),
             Side(f'mode "bwrap", daemon {USER}', "bwrap", user),
             Side('mode "bwrap", daemon root (actions as gitpipe-build)', "bwrap", None)]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "gitpipe"],
                           capture_output=True, text=True, check=False).stdout.strip()
    print(f"gitpipe at {head or '?'}{' with uncommitted changes in gitpipe/' if dirty else ''}; "
          f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} at start")
    ok = False
    try:
        for side in sides:
            side.setup()
            side.start()
        for p in parts:
            PARTS[p](sides)
        ok = True
    finally:
        for side in sides:
            side.stop()
            log = side.root / "daemon.log"
            if not ok and log.exists():
                print(f"--- [{side.label}] daemon log, last lines:\n{log.read_text()[-3000:]}", file=sys.stderr)
            if side.root != Path():
                shutil.rmtree(side.root, ignore_errors=True)
    print("\nDaemon log lines naming the sandbox:")
    for side in sides:
        for note in side.notes or ["(none)"]:
            print(f"- {side.label}: {note}")


if __name__ == "__main__":
    main(sys.argv[1:] or list(PARTS))
