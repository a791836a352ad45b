"""A plugin action type (entry point group gitpipe.actions), installed for real into this
Python's site-packages for the test, validated by the hook and run by the daemon."""

from __future__ import annotations

import fcntl
import shutil
import site
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Home, pipeline

PLUGIN = '''
from pathlib import Path

def greet(config, workdir, env, log):
    log(f"hello {config['who']} from run {env['GITPIPE_RUN']}")
    Path(workdir, "greeting.txt").write_text(config["who"])
    return 3 if config["who"] == "fail" else 0
'''


@pytest.fixture
def plugin() -> Iterator[str]:
    target = Path(site.getsitepackages()[0])
    module = target / "gitpipe_test_greet.py"
    dist = target / "gitpipe_test_greet-1.0.dist-info"
    # One site-packages is shared by the xdist workers: one plugin test at a time installs it.
    with open(target / ".gitpipe-test-greet.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield from _installed(module, dist)


def _installed(module: Path, dist: Path) -> Iterator[str]:
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: gitpipe-test-greet\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[gitpipe.actions]\ngreet = gitpipe_test_greet:greet\n")
    (dist / "RECORD").write_text("")
    module.write_text(PLUGIN)
    try:
        yield "greet"
    finally:
        module.unlink()
        shutil.rmtree(dist)


def test_plugin_action_type_runs_with_its_own_keys(tmp_path: Path, plugin: str) -> None:
    home = Home(tmp_path)
    home.init()
    repo = home.add_repo("shop")
    text = pipeline("""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "hi"
          type = "greet"
          who = "world"
          outputs = { greeting = "greeting.txt" }
          [[stage.action]]
          name = "bad"
          type = "greet"
          who = "fail"
        """)
    with home.daemon():
        push = home.push(repo, {".pipeline.toml": text})
        assert "invalid" not in push.stderr, push.stderr
        run = home.wait_run(push.run_ids[0])
    assert home.action(run, "hi")["status"] == "succeeded"
    assert home.action(run, "bad")["status"] == "failed" and home.action(run, "bad")["exit_code"] == 3
    assert f"hello world from run {run['id']}" in home.logs(run["id"], "hi")
    assert run["artifacts"][0]["name"] == "greeting"


def test_unknown_action_type_is_a_validation_error(tmp_path: Path) -> None:
    (tmp_path / ".pipeline.toml").write_text('[[stage]]\nname = "s"\n[[stage.action]]\nname = "a"\n'
                                             'type = "nosuchtype"\n')
    home = Home(tmp_path)
    proc = home.gitpipe("validate", str(tmp_path / ".pipeline.toml"))
    assert proc.returncode == 1
    assert ':5: stage "s", action "a": unknown action type "nosuchtype"' in proc.stderr


def test_a_pushed_module_never_stands_in_for_the_plugin_runner(tmp_path: Path, plugin: str) -> None:
    """The plugin process runs in the worktree: a pushed gitpipe/ or plugin module must not shadow ours."""
    home = Home(tmp_path)
    home.init()
    repo = home.add_repo("shop")
    text = pipeline("""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "hi"
          type = "greet"
          who = "world"
        """)
    evil = "print('PWNED by the pushed tree')\nraise SystemExit(0)\n"
    files = {".pipeline.toml": text, "gitpipe/__init__.py": evil, "gitpipe/plugins.py": evil,
             "gitpipe_test_greet.py": "def greet(**kw):\n    print('PWNED by the pushed tree')\n"}
    with home.daemon():
        run = home.wait_run(home.push(repo, files, branch="feature").run_ids[0])
    logs = home.logs(run["id"], "hi")
    assert home.action(run, "hi")["status"] == "succeeded", logs
    assert "hello world from run" in logs and "PWNED" not in logs
