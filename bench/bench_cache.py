"""Build caches (issue 12): a real project's pipeline with and without `cache`, and the cost of
restoring a large entry by each method gitpipe could use.

1. pipeline: six 1.17.0 (its sdist, bench/data/cache/) pushed to real daemons; its pipeline
   makes a venv, installs pytest/setuptools/wheel from a PEP 503 index served on 127.0.0.1
   from bench/data/cache/, builds the wheel ("wheel"), then installs it and runs its tests
   ("unit"). Three runs without `cache` and three with `cache` on the venv and pip's cache
   (the first of those is cold: nothing to restore), interleaved, in two homes. Per action
   and per run: cold and warm (median of runs 2-3) wall times, restore and save times,
   entry sizes.
2. restore: an entry of 300 MB in 20,000 files, restored by copy (gitpipe's descriptor walk,
   where overlays cannot be mounted), by hard links (`cp -al`, rejected: unsafe), by an
   overlay mounted on the host (a root daemon) and by one mounted in a user namespace (what
   an unprivileged daemon's attempt does before it execs bwrap), three times each; and a
   save of it by hard links (gitpipe's descriptor walk).

Run: sudo .venv/bin/python bench/bench_cache.py [pipeline|restore]   (both by default)
Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BIN, env_with_home, git, gitpipe, median, table, workdir  # noqa: E402

DATA = Path(__file__).resolve().parent / "data" / "cache"
SDIST = DATA / "six-1.17.0.tar.gz"
RUNS = 3
REQUIREMENTS = "pytest==8.3.4\nsetuptools==75.6.0\nwheel==0.45.1\n"
CACHE = 'cache = [{ key = ["requirements.txt"], paths = [".venv", "~/.cache/pip"] }]'
PIPELINE = """\
[env]
PIP_CONFIG_FILE = "/dev/null"
PIP_DISABLE_PIP_VERSION_CHECK = "1"
INDEX = "{index}"

[[stage]]
name = "build"
  [[stage.action]]
  name = "wheel"
  {cache}
  outputs = {{ wheel = "dist/*.whl" }}
  run = '''
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q --index-url "$INDEX" -r requirements.txt
  .venv/bin/pip wheel -q --no-build-isolation --no-deps --no-index -w dist .
  '''

[[stage]]
name = "test"
  [[stage.action]]
  name = "unit"
  inputs = ["wheel"]
  {cache}
  run = '''
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q --index-url "$INDEX" -r requirements.txt
  .venv/bin/pip install -q --no-index --force-reinstall --no-deps dist/*.whl
  .venv/bin/python -m pytest -q -p no:cacheprovider test_six.py
  '''
"""


# ---------------------------------------------------------------------------- a local index
def serve_index(root: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A PEP 503 simple index of the wheels in bench/data/cache on 127.0.0.1; (server, URL)."""
    simple = root / "index" / "simple"
    for wheel in DATA.glob("*.whl"):
        project = wheel.name.split("-")[0].lower().replace("_", "-")
        (simple / project).mkdir(parents=True, exist_ok=True)
        shutil.copy(wheel, simple / project / wheel.name)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                             "--directory", str(root / "index")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}/simple/"


# ---------------------------------------------------------------------------- the pipeline
class Project:
    """The six project in a fresh home of its own, with its daemon running."""

    def __init__(self, root: Path, cached: bool, index: str) -> None:
        self.home = root / ("home-cache" if cached else "home-plain")
        gitpipe(self.home, "init")
        with open(self.home / "gitpipe.toml", "a") as f:
            f.write('\n[repos.six]\nprotected = ["main"]\n')
        self.bare = root / f"six-{cached}.git"
        gitpipe(self.home, "repo", "add", str(self.bare), "--create", "--name", "six")
        self.src = root / f"src-{cached}"
        with tarfile.open(SDIST) as tar:
            tar.extractall(root / f"unpacked-{cached}", filter="data")
        shutil.copytree(root / f"unpacked-{cached}" / "six-1.17.0", self.src)
        (self.src / "requirements.txt").write_text(REQUIREMENTS)
        (self.src / ".pipeline.toml").write_text(PIPELINE.format(index=index, cache=CACHE if cached else ""))
        git("init", "-q", "-b", "main", str(self.src))
        self.daemon = subprocess.Popen([str(BIN / "gitpipe"), "serve"], env=env_with_home(self.home),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.shows: list[dict[str, Any]] = []

    def run(self, n: int) -> None:
        (self.src / "nonce").write_text(uuid.uuid4().hex)
        git("add", "-A", cwd=self.src)
        git("-c", "user.email=bench@localhost", "-c", "user.name=bench", "commit", "-qm", f"run {n}", cwd=self.src)
        git("push", "-q", str(self.bare), "main", cwd=self.src)
        self.shows.append(_wait(self.home, _newest(self.home, n + 1)))

    def stop(self) -> None:
        self.daemon.terminate()
        self.daemon.wait(timeout=120)


def _newest(home: Path, count: int) -> int:
    for _ in range(600):
        runs = json.loads(gitpipe(home, "runs", "--json", "--limit", "1").stdout)
        if runs and int(runs[0]["id"]) >= count:
            return int(runs[0]["id"])
        time.sleep(0.1)
    raise SystemExit("no run was queued")


def _wait(home: Path, run_id: int) -> dict[str, Any]:
    while True:
        show = json.loads(gitpipe(home, "show", str(run_id), "--json", check=False).stdout)
        if show["status"] in ("succeeded", "failed", "cancelled"):
            if show["status"] != "succeeded":
                logs = gitpipe(home, "logs", str(run_id), check=False).stdout
                raise SystemExit(f"run #{run_id} {show['status']}:\n{logs[-4000:]}")
            return show
        time.sleep(0.2)


def _seconds(start: str | None, end: str | None) -> float:
    from datetime import datetime

    if not start or not end:
        return 0.0
    return (datetime.fromisoformat(end.replace("Z", "+00:00"))
            - datetime.fromisoformat(start.replace("Z", "+00:00"))).total_seconds()


def _action(show: dict[str, Any], name: str) -> dict[str, Any]:
    return next(a for s in show["stages"] for a in s["actions"] if a["name"] == name)


def bench_pipeline() -> None:
    root = workdir()
    server, index = serve_index(root)
    projects = [Project(root, False, index), Project(root, True, index)]
    try:
        for n in range(RUNS):  # interleaved: the machine's load moves both alike
            for p in projects:
                p.run(n)
    finally:
        for p in projects:
            p.stop()
        server.terminate()
        server.wait()
    plain, cached = projects[0].shows, projects[1].shows
    rows = []
    for what in ("wheel", "unit", "run"):
        def t(shows: list[dict[str, Any]], i: int, what: str = what) -> float:
            if what == "run":
                return _seconds(shows[i]["started_at"], shows[i]["finished_at"])
            a = _action(shows[i], what)
            return _seconds(a["started_at"], a["finished_at"])
        label = {"wheel": "build/wheel (venv, install, build)", "unit": "test/unit (install, pytest)",
                 "run": "whole run"}[what]
        cold_p, cold_c = t(plain, 0), t(cached, 0)
        warm_p = median([t(plain, i) for i in range(1, RUNS)])
        warm_c = median([t(cached, i) for i in range(1, RUNS)])
        rows.append((f"{label}, cold", f"{cold_c:.2f} s", f"{cold_p:.2f} s", f"{cold_p / cold_c:.2f}x"))
        rows.append((f"{label}, warm", f"{warm_c:.2f} s", f"{warm_p:.2f} s", f"{warm_p / warm_c:.2f}x"))
    table("six 1.17.0 pipeline: with cache (gitpipe) vs without (baseline); ratio = baseline / gitpipe", rows)
    rows = []
    for name in ("wheel", "unit"):
        saved = _action(cached[0], name)["caches"][0]["saved"]
        restores = [_action(cached[i], name)["caches"][0]["restored"] for i in range(1, RUNS)]
        rows.append((f"{name}: entry saved by the cold run", f"{saved['size'] / 1e6:.1f} MB",
                     f"save {saved['seconds']:.2f} s", ""))
        rows.append((f"{name}: restore, warm runs (match)", f"{median([r['seconds'] for r in restores]):.2f} s",
                     ", ".join(r["match"] for r in restores), ""))
    table("cache entries of the runs above", rows)


# ---------------------------------------------------------------------------- restoring 300 MB
def make_entry(path: Path, files: int = 20_000, size: int = 300_000_000) -> None:
    blob = os.urandom(1 << 20)
    each = size // files
    for n in range(files):
        d = path / f"d{n // 100:03}"
        if n % 100 == 0:
            d.mkdir(parents=True)
        off = (n * 7919) % ((1 << 20) - each)
        (d / f"f{n % 100:03}.py").write_bytes(blob[off:off + each])


def bench_restore() -> None:
    from gitpipe import cachefs

    root = workdir()
    entry = root / "entry"
    make_entry(entry)
    subprocess.run(["sync"], check=True)
    copy = "copy (descriptor walk, cachefs.copy_at: where no overlay mounts)"
    save = "save by hard links (descriptor walk, cachefs.save_copy: what a save does)"
    methods: dict[str, list[float]] = {copy: [], "hard links (cp -al)": [], save: [],
                                       "overlay mount (a root daemon)": [],
                                       "overlay in a user namespace (unprivileged daemon)": []}
    for n in range(3):
        dst = root / f"copy{n}"
        t = time.perf_counter()
        cachefs.copy(entry, dst)
        methods[copy].append(time.perf_counter() - t)
        dst = root / f"links{n}"
        t = time.perf_counter()
        subprocess.run(["cp", "-al", str(entry), str(dst)], check=True)
        methods["hard links (cp -al)"].append(time.perf_counter() - t)
        t = time.perf_counter()
        cachefs.save_copy(root, entry, root / f"saved{n}", link=True)
        methods[save].append(time.perf_counter() - t)
        if os.geteuid() == 0:
            up, work, mnt = (root / f"{x}{n}" for x in ("up", "work", "mnt"))
            for d in (up, work, mnt):
                d.mkdir()
            t = time.perf_counter()
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                            f"lowerdir={entry},upperdir={up},workdir={work}", str(mnt)], check=True)
            methods["overlay mount (a root daemon)"].append(time.perf_counter() - t)
            subprocess.run(["umount", str(mnt)], check=True)
        up, work, mnt = (root / f"u{x}{n}" for x in ("up", "work", "mnt"))
        for d in (up, work, mnt):
            d.mkdir()
        t = time.perf_counter()  # what an attempt adds before bwrap: unshare, mount, exec
        subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "--", "/bin/sh", "-c",
                        f"mount -t overlay overlay -o lowerdir={entry},upperdir={up},workdir={work} {mnt} && "
                        f"exec true"], check=True)
        methods["overlay in a user namespace (unprivileged daemon)"].append(time.perf_counter() - t)
        subprocess.run(["sync"], check=True)
    bwrap = subprocess.run(["bwrap", "--version"], capture_output=True, text=True, check=False).stdout.strip()
    overlay = subprocess.run(["bwrap", "--overlay-src", "/", "--tmp-overlay", "/mnt", "true"], capture_output=True,
                             text=True, check=False).stderr.strip()
    rows = [(m, f"{median(xs):.3f} s" if xs else "n/a", f"{min(xs):.3f}-{max(xs):.3f} s" if xs else "",
             f"{median(xs) / 0.5:.2f}x the 0.5 s goal" if xs else "") for m, xs in methods.items()]
    rows.append((f"bwrap overlay ({bwrap})", "n/a", overlay or "works", ""))
    table("restoring a 300 MB / 20,000-file entry (median of 3; range)", rows)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    which = sys.argv[1:] or ["pipeline", "restore"]
    if "pipeline" in which:
        bench_pipeline()
    if "restore" in which:
        bench_restore()
