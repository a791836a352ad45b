"""`gitpipe demo`: a self-contained tour on this machine (a throw-away home, a bare repo,
the daemon, a real `git push`), shown live in the terminal."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gitpipe import api, progress, repos
from gitpipe import settings as settings_mod
from gitpipe.store import Store

PIPELINE = """\
[pipeline]
name = "demo-shop"

[env]
PYTHONUNBUFFERED = "1"

[[stage]]
name = "build"

  [[stage.action]]
  name = "site"
  run = "./build.sh"
  outputs = { site = "build/site/**" }

[[stage]]
name = "test"

  [[stage.action]]
  name = "unit"                 # unit and lint run in parallel
  inputs = ["site"]
  run = "./test.sh"

  [[stage.action]]
  name = "lint"
  run = "bash -n build.sh test.sh && echo 'scripts parse'; sleep 1"

  [[stage.action]]
  name = "package"
  run_order = 2                 # after unit and lint
  inputs = ["site"]
  run = "tar -czf shop.tar.gz -C build site && ls -l shop.tar.gz"
  outputs = { tarball = "shop.tar.gz" }
"""

FILES = {
    ".pipeline.toml": PIPELINE,
    "build.sh": """#!/bin/bash
set -eo pipefail
echo "building $GITPIPE_REPO @ ${GITPIPE_SHA:0:7} (run #$GITPIPE_RUN)"
mkdir -p build/site
printf '<h1>shop</h1><p>version %s</p>\\n' "${GITPIPE_SHA:0:7}" > build/site/index.html
echo "health ok" > build/site/health.txt
sleep 1
echo -e "\\e[32mbuilt\\e[0m build/site"
""",
    "test.sh": """#!/bin/bash
set -eo pipefail
for t in index health; do
  echo "test $t ... ok"; sleep 0.3
done
grep -q shop build/site/index.html
""",
}


def run_demo(keep: bool = True) -> int:
    """The tour; returns the exit status."""
    root = Path(tempfile.mkdtemp(prefix="gitpipe-demo-"))
    home = root / "home"
    say(f"gitpipe demo in {root}")
    api.init_home(str(home))
    conf = settings_mod.load(home)
    store = Store(conf)
    name, bare = repos.add(conf, store, str(root / "shop.git"), "shop", create=True)
    say(f"registered bare repo {bare} (hooks installed)")
    daemon = subprocess.Popen([sys.executable, "-m", "gitpipe", "serve", "--home", str(home)],
                              stdout=subprocess.DEVNULL, stderr=open(root / "daemon.log", "wb"),
                              start_new_session=True)
    try:
        say(f"daemon started (pid {daemon.pid}); pushing a sample project with `git push`:")
        run_id = push_sample(root, bare)
        run = progress.watch_run(conf, store, run_id)
        say(f"run #{run_id} {run.status.value}")
        for art in store.artifacts(run_id):
            say(f"artifact {art.name}: {art.files} file(s), {art.size} bytes, sha256 {art.sha256[:16]}…")
        status = 0 if run.status.value == "succeeded" else 1
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    say("daemon stopped")
    index = render_report(conf, store)
    store.close()
    if index:
        say(f"report: {index}")
    say(f"everything is in {root} (delete it when done)")
    return status


def push_sample(root: Path, bare: Path) -> int:
    """Commit the sample project and push it for real; the run id the hook printed."""
    src = root / "src"
    src.mkdir()
    for rel, text in FILES.items():
        (src / rel).write_text(text)
        if rel.endswith(".sh"):
            os.chmod(src / rel, 0o755)
    env = {**os.environ, "GIT_AUTHOR_NAME": "gitpipe demo", "GIT_AUTHOR_EMAIL": "demo@localhost",
           "GIT_COMMITTER_NAME": "gitpipe demo", "GIT_COMMITTER_EMAIL": "demo@localhost"}
    for args in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "First version of the shop"],
                 ["push", str(bare), "main"]):
        proc = subprocess.run(["git", *args], cwd=src, env=env, capture_output=True, text=True, check=True)
    remote = [line for line in proc.stderr.splitlines() if line.startswith("remote:")]
    for line in remote:
        print(f"    {line.rstrip()}", flush=True)
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
