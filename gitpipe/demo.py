"""`gitpipe demo`: a self-contained tour on this machine (a throw-away home, a bare repo,
the daemon, a real `git push`), shown live in the terminal."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gitpipe import api, progress, releases, repos
from gitpipe import settings as settings_mod
from gitpipe.store import Store

PIPELINE = """\
[pipeline]
name = "demo-shop"

[[stage]]
name = "build"

  [[stage.action]]
  name = "site"
  run = "./build.sh"
  outputs = { site = "build/site/**" }

[[stage]]
name = "test"

  [[stage.action]]
  name = "unit-{matrix.locale}" # one copy per locale; the copies and lint run in parallel
  matrix = { locale = ["C", "C.UTF-8"] }
  inputs = ["site"]
  run = "LC_ALL=$MATRIX_LOCALE ./test.sh"

  [[stage.action]]
  name = "lint"
  run = "bash -n build.sh test.sh && echo 'scripts parse'; sleep 1"
  allow_failure = true          # a lint failure would be a warning, not a stop

[[stage]]
name = "staging"

  [[stage.action]]
  name = "deploy"
  type = "deploy"
  environment = "staging"
  inputs = ["site"]
  target = "file://@TARGETS@/staging"
  source = "build/site"
  healthcheck = "grep -q '^ok' health.txt"
  healthcheck_retries = 2

[[stage]]
name = "production"

  [[stage.action]]
  name = "sign-off"
  type = "approval"
  message = "Ship {short_sha} to production?"

  [[stage.action]]
  name = "deploy"
  type = "deploy"
  run_order = 2
  environment = "production"
  inputs = ["site"]
  target = "file://@TARGETS@/production"
  source = "build/site"
  healthcheck = "grep -q '^ok' health.txt"
"""

BUILD = """#!/bin/bash
set -eo pipefail
echo "building $GITPIPE_REPO @ ${GITPIPE_SHA:0:7} (run #$GITPIPE_RUN)"
mkdir -p build/site
printf '<h1>shop</h1><p>version %s</p>\\n' "${GITPIPE_SHA:0:7}" > build/site/index.html
echo "@HEALTH@" > build/site/health.txt
sleep 1
echo -e "\\e[32mbuilt\\e[0m build/site"
"""

TEST = """#!/bin/bash
set -eo pipefail
for t in index health; do
  echo "test $t ... ok"; sleep 0.3
done
grep -q shop build/site/index.html
"""


def run_demo() -> int:
    """The tour of SPEC section 10; returns the exit status."""
    root = Path(tempfile.mkdtemp(prefix="gitpipe-demo-"))
    home = root / "home"
    say(f"gitpipe demo in {root}")
    api.init_home(str(home))
    conf = settings_mod.load(home)
    store = Store(conf)
    _, bare = repos.add(conf, store, str(root / "shop.git"), "shop", create=True)
    say(f"registered the bare repo {bare}; its hooks queue a run on every push")
    ready = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # sd_notify, as systemd waits for it
    address = f"gitpipe-demo-{os.getpid()}-{time.monotonic_ns()}"
    ready.bind("\0" + address)
    with open(root / "daemon.log", "wb") as daemon_log:
        daemon = subprocess.Popen([sys.executable, "-m", "gitpipe", "serve", "--home", str(home)],
                                  env={**os.environ, "NOTIFY_SOCKET": "@" + address},
                                  stdout=subprocess.DEVNULL, stderr=daemon_log, start_new_session=True)
    try:
        if not _ready(ready, daemon):  # a push before it listens would be told "the daemon is not running"
            say(f"the daemon did not get ready: see {root / 'daemon.log'}")
            return 1
        say(f"daemon started (pid {daemon.pid})")
        ok = first_push(root, bare, conf, store) and second_push(root, bare, conf, store)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    say("daemon stopped")
    for env in releases.environments(store, "shop"):
        say(f"environment {env.environment}: current release {env.current.release if env.current else 'none'}")
    index = render_report(conf, store)
    store.close()
    if index:
        say(f"report: {index}")
    say(f"everything is in {root} (delete it when done)")
    return 0 if ok else 1


def _ready(sock: socket.socket, daemon: subprocess.Popen[bytes], timeout: float = 30.0) -> bool:
    """Wait for the daemon's READY=1 (it then listens for pushes); False if it exits or is silent."""
    deadline = time.monotonic() + timeout
    try:
        while daemon.poll() is None and time.monotonic() < deadline:
            sock.settimeout(0.5)
            try:
                if b"READY=1" in sock.recv(4096).split(b"\n"):
                    return True
            except TimeoutError:
                continue
        return False
    finally:
        sock.close()


def first_push(root: Path, bare: Path, conf: settings_mod.Settings, store: Store) -> bool:
    say("pushing the sample project with `git push` (build, parallel tests, staging, approval, production):")
    run_id = push(root, bare, "ok", "First version of the shop")
    run = progress.watch_run(conf, store, run_id,
                             until=lambda r: r.status.finished or r.status.value == "waiting")
    if run.status.value == "waiting":
        waiting = [a for a in store.approvals(run_id) if a.decision is None][0]
        say(f'run #{run_id} waits for approval: "{waiting.message}"')
        say(f"the demo approves it itself, as `gitpipe approve {run_id} --comment ...` would")
        api.decide(conf, store, run_id, True, "approved by gitpipe demo")
        run = progress.watch_run(conf, store, run_id)
    say(f"run #{run_id} {run.status.value}")
    for art in store.artifacts(run_id):
        say(f"artifact {art.name}: {art.files} file(s), {art.size} bytes, sha256 {art.sha256[:16]}…")
    return run.status.value == "succeeded"


def second_push(root: Path, bare: Path, conf: settings_mod.Settings, store: Store) -> bool:
    say("pushing a second version whose healthcheck fails on staging:")
    run_id = push(root, bare, "broken", "Second version (its health page is broken)")
    run = progress.watch_run(conf, store, run_id)
    say(f"run #{run_id} {run.status.value}: staging was switched back to the release it had")
    return run.status.value == "failed" and bool(
        [r for r in store.releases("shop", "staging") if r.status == "rolled-back"])


def push(root: Path, bare: Path, health: str, message: str) -> int:
    """Write the sample project, commit and push it for real; the run id the hook printed."""
    src = root / "src"
    env = {**os.environ, "GIT_AUTHOR_NAME": "gitpipe demo", "GIT_AUTHOR_EMAIL": "demo@localhost",
           "GIT_COMMITTER_NAME": "gitpipe demo", "GIT_COMMITTER_EMAIL": "demo@localhost"}
    if not src.exists():
        src.mkdir()
        subprocess.run(["git", "init", "-q", "-b", "main"], cwd=src, env=env, check=True)
    files = {".pipeline.toml": PIPELINE.replace("@TARGETS@", str(root / "targets")),
             "build.sh": BUILD.replace("@HEALTH@", health), "test.sh": TEST}
    for rel, text in files.items():
        (src / rel).write_text(text)
        if rel.endswith(".sh"):
            os.chmod(src / rel, 0o755)
    for args in (["add", "-A"], ["commit", "-qm", message], ["push", str(bare), "main"]):
        proc = subprocess.run(["git", *args], cwd=src, env=env, capture_output=True, text=True, check=True)
    remote = [line.rstrip() for line in proc.stderr.splitlines() if line.startswith("remote:")]
    for line in remote:
        print(f"    {line}", flush=True)
    found = re.search(r"run #(\d+)", "\n".join(remote))
    if not found:
        raise RuntimeError("the push queued no run:\n" + proc.stderr)
    return int(found.group(1))


def render_report(conf: settings_mod.Settings, store: Store) -> Path | None:
    try:
        from gitpipe.report import Reporter  # type: ignore[attr-defined]
    except ImportError:
        return None
    Reporter(conf, store).render_all()
    return conf.site_dir / "index.html"


def say(text: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {text}", flush=True)
