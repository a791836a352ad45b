"""Work counted, not timed (issue 11): what an idle daemon loads, and the store's row layer.

Timings swing with the machine's load; these counts do not (bench/bench_peers.py has the
timings beside laminar's).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import RUN_ID, Home, git

from gitpipe import git as gitpipe_git
from gitpipe import launcher
from gitpipe.sqlrows import Rows

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("pygit2", "jinja2", "paramiko", "sqlite_utils", "croniter", "urllib.request", "click", "watchdog",
         "_hashlib")  # watchdog: the daemon waits with `inotify`; _hashlib: OpenSSL (see `digest`)

# Serve one home in burst mode (the queue is empty: it recovers, looks at every repo's
# schedules, then returns), then say which heavy modules it loaded.
IDLE_DAEMON = f"""
import json, sys
from gitpipe import settings
from gitpipe.daemon import Daemon
Daemon(settings.load(sys.argv[1]), burst=True).serve()
print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
"""


def _idle_daemon_loads(home: Home) -> list[str]:
    out = subprocess.run([sys.executable, "-c", IDLE_DAEMON, str(home.home)], env=home.env(),
                         capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_an_idle_daemon_loads_no_heavy_library(home: Home) -> None:
    for i in range(3):
        home.add_repo(f"r{i}")
    assert _idle_daemon_loads(home) == []


def test_a_daemon_that_ran_a_pipeline_has_not_loaded_pygit2(home: Home) -> None:
    """Reading the pushed head, the pipeline and the commit goes through `git cat-file`; the
    worktree through `git checkout`: pygit2 (~20 MB resident) stays out of the daemon."""
    repo = home.add_repo("app")
    home.push(repo, {".pipeline.toml": '[[stage]]\nname = "s"\n  [[stage.action]]\n  name = "a"\n  run = "true"\n'})
    loaded = _idle_daemon_loads(home)
    assert home.runs()[0]["status"] == "succeeded"
    assert "pygit2" not in loaded and "paramiko" not in loaded and "sqlite_utils" not in loaded
    assert "watchdog" not in loaded  # (jinja2, which the report loads, brings OpenSSL's _hashlib)


def test_commit_of_agrees_with_pygit2(tmp_path: Path) -> None:
    work = tmp_path / "w"
    git(tmp_path, "init", "-q", str(work))
    git(work, "commit", "-q", "--allow-empty", "-m", "subject \u00e9\n\nbody line")
    sha = git(work, "rev-parse", "HEAD").stdout.strip()
    repo = gitpipe_git.open_repo(work / ".git")
    assert gitpipe_git.commit_of(work / ".git", sha) == gitpipe_git.commit_info(repo, sha)
    assert gitpipe_git.commit_of(work / ".git", "0" * 40) is None
    assert gitpipe_git.show(work / ".git", sha, "missing.txt") is None


@pytest.mark.parametrize("packed", [False, True])
def test_branch_head_agrees_with_pygit2(tmp_path: Path, packed: bool) -> None:
    bare = tmp_path / "r.git"
    git(tmp_path, "init", "-q", "--bare", str(bare))
    assert gitpipe_git.branch_head(bare) == ("refs/heads/main", None)  # no commit yet
    work = tmp_path / "w"
    git(tmp_path, "init", "-q", str(work))
    git(work, "commit", "-q", "--allow-empty", "-m", "one")
    git(work, "push", "-q", str(bare), "HEAD:refs/heads/main")
    if packed:
        git(bare, "pack-refs", "--all")
        assert not (bare / "refs/heads/main").exists()
    expected = gitpipe_git.resolve(gitpipe_git.open_repo(bare), "main")
    assert gitpipe_git.branch_head(bare) == expected
    (bare / "HEAD").write_text(expected[1] + "\n")  # detached: left to pygit2
    assert gitpipe_git.branch_head(bare) is None


def _rows(tmp_path: Path) -> Rows:
    conn = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    conn.executescript("CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT, note TEXT);"
                       "CREATE TABLE pair (a INTEGER NOT NULL, b INTEGER NOT NULL, v TEXT, PRIMARY KEY (a, b));"
                       "CREATE TABLE art (id INTEGER PRIMARY KEY, run INTEGER, name TEXT, size INTEGER,"
                       " UNIQUE (run, name));")
    return Rows(conn)


def test_rows_insert_update_and_upsert(tmp_path: Path) -> None:
    db = _rows(tmp_path)
    db.table("kv").upsert({"key": "k", "value": "1", "note": "kept"}, pk="key")
    db.table("kv").upsert({"key": "k", "value": "2"}, pk="key")  # an upsert changes only its columns
    assert list(db.query("SELECT * FROM kv")) == [{"key": "k", "value": "2", "note": "kept"}]
    db.table("pair").insert({"a": 1, "b": 2, "v": "x"})
    db.table("pair").update((1, 2), {"v": ["y"]})  # a compound key; a list is stored as JSON
    assert list(db.query("SELECT v FROM pair WHERE a = ? AND b = ?", (1, 2))) == [{"v": '["y"]'}]
    with pytest.raises(LookupError, match="pair: no row"):
        db.table("pair").update((9, 9), {"v": "z"})
    art = db.table("art")
    art.upsert({"run": 1, "name": "a", "size": 1}, pk=("run", "name"))
    art.upsert({"run": 1, "name": "a", "size": 5}, pk=("run", "name"))  # by the UNIQUE columns
    art.insert_all([{"run": 2, "name": "a", "size": 7}])
    assert list(db.query("SELECT run, name, size FROM art ORDER BY id")) == [
        {"run": 1, "name": "a", "size": 5}, {"run": 2, "name": "a", "size": 7}]
    db.table("kv").upsert({"key": "only"}, pk="key")
    db.table("kv").upsert({"key": "only"}, pk="key")  # nothing but the key: inserted once
    assert [r["key"] for r in db.query("SELECT key FROM kv ORDER BY key")] == ["k", "only"]


def test_the_store_no_longer_imports_sqlite_utils() -> None:
    code = "import sys, gitpipe.store, gitpipe.daemon; print([m for m in sys.modules if m.startswith('sqlite_utils')])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ), capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]"



def _serial(n: int) -> str:
    """A pipeline of n stages of one `true` each."""
    return "".join(f'\n[[stage]]\nname = "s{k}"\n  [[stage.action]]\n  name = "a{k}"\n  run = "true"\n'
                   for k in range(n))


BURST = "import sys; from gitpipe import settings; from gitpipe.daemon import Daemon; " \
        "Daemon(settings.load(sys.argv[1]), burst=True).serve()"


def _traced_run(home: Home, repo: Path, stages: int, tmp_path: Path, *trace: str) -> str:
    """Push a run of `stages` actions and run it with a burst daemon under strace -f; the trace."""
    home.push(repo, {".pipeline.toml": _serial(stages)})
    out = tmp_path / f"strace-{stages}.txt"
    subprocess.run(["strace", "-f", "-qq", "-o", str(out), *trace, sys.executable, "-c", BURST, str(home.home)],
                   env=home.env(), capture_output=True, timeout=300, check=True)
    assert home.runs()[0]["status"] == "succeeded"
    return out.read_text()


def test_an_action_costs_two_synced_commits(home: Home, tmp_path: Path) -> None:
    """One fsync when an action starts, one when it ends; its stage's changes ride on them.
    (Counted as the difference between a run of 10 actions and one of 1: the daemon's start
    and the run's own start and end cost the same in both.)"""
    repo = home.add_repo("app")
    syncs = [_traced_run(home, repo, n, tmp_path, "-e", "trace=fsync,fdatasync").count("sync(")
             for n in (1, 10)]
    assert syncs[1] - syncs[0] == 2 * 9, syncs


def test_an_action_starts_the_sandbox_and_no_git_process_on_an_unchanged_tree(home: Home, tmp_path: Path) -> None:
    """Per action: the sandbox (bwrap, the script's bash, setpriv unless made ahead); no `sh` joins the cgroup
    first. The run's first attempt starts from the launcher (perl) parked in its cgroup
    beforehand, and one launcher is parked again after it; each later one starts in the sandbox
    made for it while the action before ran, whose launcher (perl, inside) becomes its bash. The
    actions after a run's first reuse its worktree at the same commit: no git checkout when no
    tracked file changed, and a small tree is cleaned in the daemon, never by `git clean`."""
    repo = home.add_repo("app")
    programs = []
    for n in (1, 10):
        trace = _traced_run(home, repo, n, tmp_path, "-e", "trace=execve", "-e", "status=successful")
        programs.append([line.split('execve("', 1)[1].split('"', 1)[0] for line in trace.splitlines()
                         if 'execve("' in line])
    base, more = programs

    def more_of(suffix: str) -> int:
        return sum(p.endswith(suffix) for p in more) - sum(p.endswith(suffix) for p in base)

    assert more_of("/bash") == 9 and more_of("/bwrap") == 9
    # (a root daemon's: the launcher inside drops to the build user itself where it can)
    assert more_of("/setpriv") == (0 if launcher.become() else 9)
    assert more_of("/env") == 0  # only a pipeline that sets loader variables pays for `env` (UNSECURE_ENV)
    # One per slot at most: a reset whose files were written in the clock tick the slot was handed
    # out in cannot be sealed; the first action's slot, wanted at once, is not kept a tick for its seal.
    assert more_of("/git") <= 2
    # Each git of the daemon's runs in a mount namespace where the tree follows no link (git._no_links_in):
    # unshare, sh, mount, then git. No `sh` is a sandbox's: none joins an attempt's cgroup first.
    assert more_of("/unshare") == more_of("/sh") == more_of("/mount") == more_of("/git")
    # One launcher parked per run, whatever its length (gitpipe/launcher.py); one inside each sandbox
    # made ahead (Sandbox.ready), which becomes that action's bash: none is made and left unused.
    assert more_of("/perl") == 9
    per_action = 3 if launcher.become() else 4  # bwrap, perl, bash (and setpriv)
    assert len(more) - len(base) == 9 * per_action + 4 * more_of("/git"), (base, more)


def test_a_push_to_a_running_daemon_starts_no_python(home: Home, tmp_path: Path) -> None:
    """pre-receive is sh, post-receive the socket's Perl client; the daemon records the push and
    answers: git and the two hooks are all a push runs (a Python start alone costs 7-15 ms), and
    no `git gc --auto` after them."""
    repo = home.add_repo("app")
    trace = tmp_path / "push.strace"
    with home.daemon():
        sha = home.commit(repo, {".pipeline.toml": _serial(1)})
        push = subprocess.run(["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=execve", "-e", "status=successful",
                               "git", "push", str(repo), f"{sha}:refs/heads/main"], cwd=home.clone_of(repo),
                              env=home.env(), capture_output=True, text=True, timeout=120, check=True)
        [run_id] = RUN_ID.findall(push.stderr)
        assert home.wait_run(int(run_id))["status"] == "succeeded"
    programs = [line.split('execve("', 1)[1].split('"', 1)[0] for line in trace.read_text().splitlines()
                if 'execve("' in line]
    assert not [p for p in programs if "python" in Path(p).name], programs
    assert not [p for p in programs if Path(p).name == "perl"], programs  # the hook is perl, it starts none
    assert '"gc", "--auto"' not in trace.read_text()  # the daemon runs it after the push (receive.autogc off)
    assert sum(p.endswith(("/pre-receive", "/post-receive")) for p in programs) == 2, programs


def test_a_run_that_waits_after_its_push_gets_its_own_commits_tree(home: Home) -> None:
    """The intake resets a pushed run's first worktree at once; a run that cannot start then
    (the daemon is paused) lets that worktree go, and gets exactly its commit's files when it
    starts, as does the push after it, which moved the branch meanwhile."""
    repo = home.add_repo("app")
    pipe = '[[stage]]\nname = "s"\n  [[stage.action]]\n  name = "a"\n  run = "cat f"\n'
    with home.daemon():
        home.gitpipe("pause", check=True)
        first = home.push_run(repo, {".pipeline.toml": pipe, "f": "one\n"})
        second = home.push_run(repo, {"f": "two\n"})
        assert home.status(first) == "queued" and home.status(second) == "queued"
        home.gitpipe("resume", check=True)
        home.wait_runs([first, second])
    home.expect(home.show(first))
    home.expect(home.show(second))
    assert "one" in home.logs(first) and "two" not in home.logs(first)
    assert "two" in home.logs(second) and "one" not in home.logs(second)
