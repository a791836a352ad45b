"""A push's heads-up (hooks/pre-receive, gitpipe/headsup.py): the first action's sandbox is made
while git finishes the push, from the pipeline read in git's quarantine, and used only when it is
exactly what the recorded run asks for."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import Daemon, Home, children, pipeline, wait_for

from gitpipe import daemon as daemon_mod
from gitpipe import headsup

pytestmark = pytest.mark.timeout(180)

# What the first action says: whether its HOME holds the marker the chained pre-receive put there
# once the heads-up's sandbox was made (its HOME is made fresh whenever a sandbox is made anew).
FIRST = """
[[stage]]
name = "one"
  [[stage.action]]
  name = "first"
  {network}
  run = 'if test -e "$HOME/marker"; then echo sandbox-of-the-heads-up; else echo sandbox-made-anew; fi; cat n'
"""

# Runs after gitpipe's pre-receive (which wrote the heads-up), before git updates the ref. When
# the test asks it to ($root/wait), it waits for the daemon's child that became the sandbox's
# bwrap (the parked launcher), then marks the HOME of every slot of the repo; `refuse` in
# $root/answer makes it refuse the push.
CHAINED = """#!/bin/sh
cat >/dev/null
root={root}
if [ -e "$root/wait" ]; then
  daemon=$(cat "$root/daemon")
  i=0
  while [ $i -lt 400 ]; do
    for c in $(cat /proc/$daemon/task/*/children 2>/dev/null); do
      if [ "$(cat /proc/$c/comm 2>/dev/null)" = bwrap ]; then
        for h in {work}/*/home {work}/protected/*/home; do [ ! -d "$h" ] || : > "$h/marker"; done
        echo made > "$root/seen"
        i=400
      fi
    done
    i=$((i + 1))
    sleep 0.05
  done
fi
[ "$(cat "$root/answer" 2>/dev/null)" != refuse ]
"""


def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the sandbox made ahead needs a cgroup per attempt: root's on this host")


def _chained(home: Home, repo: Path, root: Path) -> None:
    """CHAINED as the repo's pre-receive.chained, its folder `root`."""
    hook = repo / "hooks" / "pre-receive.chained"
    hook.write_text(CHAINED.format(root=root, work=home.home / "work" / "app"))
    hook.chmod(0o755)


@contextmanager
def _served(home: Home, tmp_path: Path) -> Iterator[tuple[Path, Path, Daemon]]:
    """The repo `app` with the CHAINED hook (its folder: the second item) and a daemon, which
    ran the repo's first push: the pipeline a heads-up of the next one guesses from."""
    _needs_root()
    repo = home.add_repo("app")
    root = tmp_path / "hook"
    root.mkdir()
    _chained(home, repo, root)
    with home.daemon() as daemon:
        (root / "daemon").write_text(str(daemon.pid))
        first = home.push_run(repo, {".pipeline.toml": pipeline(FIRST.format(network="")), "n": "push 1\n"})
        assert home.wait_run(first, timeout=120)["status"] == "succeeded"
        assert "sandbox-made-anew" in home.logs(first)  # no pipeline known yet for a heads-up
        assert list((home.home / "ahead").iterdir()) == []
        (root / "wait").touch()
        yield repo, root, daemon


def _bwraps(pid: int) -> list[int]:
    return [c for c in children(pid) if Path(f"/proc/{c}/comm").read_text().strip() == "bwrap"]


def test_the_first_action_runs_in_the_sandbox_made_at_its_pushs_heads_up(home: Home, tmp_path: Path) -> None:
    """The second push of a ref: its sandbox is made before git updated the ref (the chained
    hook sees it), and the action runs in it. A third push whose first action asks for another
    sandbox (no network) has it made at its heads-up too: from the pipeline it pushed, read in
    git's quarantine, not from a guess (the last push's pipeline)."""
    with _served(home, tmp_path) as (repo, root, daemon):
        second = home.push_run(repo, {"n": "push 2\n"})
        assert (root / "seen").read_text() == "made\n", "no sandbox was made before git updated the ref"
        assert home.wait_run(second, timeout=120)["status"] == "succeeded"
        assert "sandbox-of-the-heads-up\npush 2" in home.logs(second)  # and the tree as pushed

        (root / "seen").unlink()
        third = home.push_run(repo, {".pipeline.toml": pipeline(FIRST.format(network="network = false")),
                                     "n": "push 3\n"})
        assert (root / "seen").read_text() == "made\n"
        assert home.wait_run(third, timeout=120)["status"] == "succeeded"
        assert "sandbox-of-the-heads-up\npush 3" in home.logs(third)
        wait_for(lambda: not _bwraps(daemon.pid), what="no sandbox left waiting")
        assert list((home.home / "ahead").iterdir()) == []


def test_a_push_whose_objects_git_packs_gets_a_sandbox_from_the_guess(home: Home, tmp_path: Path) -> None:
    """A push large enough for git to keep its objects packed (here: receive.unpackLimit = 1):
    the heads-up cannot read its pipeline, so the sandbox is made from the last one recorded.
    Its first action asks for another sandbox than the guess: it runs in one made anew."""
    with _served(home, tmp_path) as (repo, root, daemon):
        subprocess.run(["git", "--git-dir", str(repo), "config", "receive.unpackLimit", "1"], check=True)
        second = home.push_run(repo, {".pipeline.toml": pipeline(FIRST.format(network="network = false")),
                                      "n": "push 2\n"})
        assert (root / "seen").read_text() == "made\n"  # from the guess...
        assert home.wait_run(second, timeout=120)["status"] == "succeeded"
        assert "sandbox-made-anew\npush 2" in home.logs(second)  # ...not used: not this action's box
        wait_for(lambda: not _bwraps(daemon.pid), what="no sandbox left waiting")


def test_a_heads_up_of_a_push_git_refused_holds_nothing_past_the_daemon(home: Home, tmp_path: Path) -> None:
    """A later hook refuses the push after its heads-up: its sandbox waits for a push that never
    comes (taken by the ref's next push, or let go after headsup.KEPT); a daemon stopping ends
    it and removes the folder, so that pushes meanwhile write no heads-up."""
    with _served(home, tmp_path) as (repo, root, daemon):
        (root / "answer").write_text("refuse")
        refused = home.push(repo, {"n": "push 2\n"})
        assert refused.returncode != 0 and not refused.run_ids, refused.stderr
        assert (root / "seen").read_text() == "made\n"
        assert _bwraps(daemon.pid), "the heads-up's sandbox waits for its push"
        pid = daemon.pid
    assert not Path(f"/proc/{pid}").exists() or not _bwraps(pid)
    assert not (home.home / "ahead").exists()
    (root / "wait").unlink()
    (root / "answer").unlink()
    late = home.push(repo, {"n": "push 3\n"})  # no daemon: the Python hook records it, no heads-up left
    assert late.returncode == 0 and len(late.run_ids) == 1, late.stderr
    assert not (home.home / "ahead").exists()


def test_only_a_regular_recent_file_of_the_daemons_user_is_a_heads_up(tmp_path: Path) -> None:
    """What headsup reads from its folder, which hooks of the daemon's user write: every file is
    removed; a link, a FIFO, another user's file, a stale one or one naming no written ref is no
    heads-up (it only ever names a repo and a ref, as the push's own record would)."""
    folder = tmp_path / "ahead"
    folder.mkdir()
    zeros, sha = "0" * 40, "1" * 40

    def make(name: str, text: str) -> str:
        (folder / name).write_text(text)
        return str(folder / name)

    quarantine = "/srv/app.git/objects/tmp_objdir-incoming-x1"
    assert headsup._read(make("1", f"app\n{quarantine}\n{zeros} {sha} refs/heads/main\n")) == headsup._Announced(
        "app", "refs/heads/main", sha, quarantine)
    assert headsup._read(make("2", f"app\n\n{sha} {zeros} refs/heads/gone\n{zeros} {sha} refs/heads/b\n")) == (
        headsup._Announced("app", "refs/heads/b", sha, ""))  # a deletion makes no run: the next ref
    assert headsup._read(make("2b", f"app\n{zeros} {sha} refs/heads/main\n")) == headsup._Announced(
        "app", "refs/heads/main", sha, "")  # a hook from before the quarantine was written
    assert headsup._read(make("3", f"app\n{sha} {zeros} refs/heads/gone\n")) is None
    assert headsup._read(make("4", "app")) is None
    target = make("target", f"app\n{zeros} {sha} refs/heads/main\n")
    (folder / "5").symlink_to(target)
    assert headsup._read(str(folder / "5")) is None
    os.mkfifo(folder / "6")
    assert headsup._read(str(folder / "6")) is None
    old = make("7", f"app\n{zeros} {sha} refs/heads/main\n")
    os.utime(old, (time.time() - headsup.KEPT - 5,) * 2)
    assert headsup._read(old) is None
    if os.geteuid() == 0:
        other = make("8", f"app\n{zeros} {sha} refs/heads/main\n")
        os.chown(other, 65534, 65534)
        assert headsup._read(other) is None
    assert sorted(p.name for p in folder.iterdir()) == ["target"]
    assert stat.S_ISREG(os.lstat(target).st_mode)  # the link's target is untouched


def test_only_a_quarantine_git_makes_in_the_repos_objects_is_read(tmp_path: Path) -> None:
    """The quarantine a heads-up names is read only when it is a folder, not a link, named as git
    names them, right in the repo's objects/: a hook can name no other folder to read from."""
    objects = tmp_path / "app.git" / "objects"
    good = objects / "tmp_objdir-incoming-a1b2"
    good.mkdir(parents=True)
    (objects / "incoming-c3d4").mkdir()  # git before 2.19
    elsewhere = tmp_path / "other.git" / "objects" / "tmp_objdir-incoming-a1b2"
    elsewhere.mkdir(parents=True)
    (objects / "tmp_objdir-incoming-link").symlink_to(elsewhere)
    (objects / "pack").mkdir()
    (good / "tmp_objdir-incoming-deeper").mkdir()
    assert headsup._quarantine(objects, str(good)) == good
    assert headsup._quarantine(objects, str(objects / "incoming-c3d4")) == objects / "incoming-c3d4"
    for named in ("", "tmp_objdir-incoming-a1b2", str(elsewhere), str(objects / "tmp_objdir-incoming-link"),
                  str(objects / "pack"), str(good / "tmp_objdir-incoming-deeper"),
                  str(objects / "tmp_objdir-incoming-gone"), str(objects / ".." / "objects" / "pack")):
        assert headsup._quarantine(objects, named) is None, named


def test_a_pipeline_too_long_to_keep_is_no_guess(tmp_path: Path) -> None:
    """What a push brought is kept as the next push's guess, but not a text longer than
    pipeline.KEPT_MAX_BYTES: 256 guesses of a pusher's 4 MB files would hold a gigabyte."""
    from gitpipe.pipeline import KEPT_MAX_BYTES

    heads = headsup.HeadsUp(tmp_path / "ahead", lambda: None, lambda: False)
    heads.learned("app", "refs/heads/main", "small")
    heads.learned("app", "refs/heads/big", "x" * (KEPT_MAX_BYTES + 1))
    assert heads.texts == {("app", "refs/heads/main"): "small", ("app", ""): "small"}


def test_a_refused_pushs_heads_up_is_let_go_after_kept_while_the_daemon_is_idle(home: Home, tmp_path: Path) -> None:
    """Nothing else happens after a push git refused: its heads-up's slot, sandbox (and the parked
    launcher it took) still go after headsup.KEPT, not at the next push or wake-up."""
    with _served(home, tmp_path) as (repo, root, daemon):
        # past the loop's last timer (the cron lines read SCHEDULES_AFTER_PUSH after a run's end):
        # from now on nothing wakes it
        time.sleep(daemon_mod.SCHEDULES_AFTER_PUSH + 2)
        (root / "answer").write_text("refuse")
        refused = home.push(repo, {"n": "push 2\n"})
        assert refused.returncode != 0 and not refused.run_ids, refused.stderr
        assert (root / "seen").read_text() == "made\n"
        made = set(_bwraps(daemon.pid))
        assert made, "the heads-up's sandbox waits for its push"
        wait_for(lambda: not made & set(_bwraps(daemon.pid)), timeout=headsup.KEPT + 20,
                 what="the sandbox of a heads-up whose push never came let go")


def test_a_heads_up_still_being_made_past_kept_sets_no_timer_already_due(tmp_path: Path) -> None:
    """One made slowly (a large HOME to remove beside its slot's tree) is not yet to be let go:
    expire() must not say 0 s for it, or the heads-up thread looks again without pause until
    it is made."""
    heads = headsup.HeadsUp(tmp_path / "ahead", lambda: None, lambda: False)
    pending = headsup._Pending(push=1)
    pending.at -= headsup.KEPT + 1
    heads.pending[("app", "refs/heads/main")] = pending
    due = heads.expire()
    assert due is None or due > 0, due
    assert ("app", "refs/heads/main") in heads.pending  # being made: not let go under its maker


FILL = """
[[stage]]
name = "one"
  [[stage.action]]
  name = "fill"
  run = 'if test -e fill; then mkdir "$HOME/many" && (cd "$HOME/many" && seq 300000 | xargs touch); fi; cat n'
"""

SLOW = """
[[stage]]
name = "one"
  [[stage.action]]
  name = "slow"
  run = 'sleep 300'
"""


def test_a_heads_up_slow_to_make_keeps_no_wake_file_waiting(home: Home, tmp_path: Path) -> None:
    """Making a heads-up first removes what the slot's last run left beside its tree (a HOME of
    many files here, as a package cache leaves it): a cancel (a wake file) meanwhile is heard at
    once, not once that removal is done (the watch's thread that hears wake files is not the
    one that makes heads-ups). The push is refused after its heads-up: nothing else wakes the loop."""
    _needs_root()
    repo = home.add_repo("app")
    other = home.add_repo("other")
    root = tmp_path / "hook"
    root.mkdir()
    _chained(home, repo, root)
    with home.daemon():
        first = home.push_run(repo, {".pipeline.toml": pipeline(FILL), "fill": "", "n": "push 1\n"})
        assert home.wait_run(first, timeout=150)["status"] == "succeeded", home.logs(first)
        many = [h / "many" for h in (home.home / "work" / "app").glob("**/home") if (h / "many").is_dir()]
        assert len(many) == 1, many
        slow = home.push_run(other, {".pipeline.toml": pipeline(SLOW)})
        home.wait_status(slow, "running")
        time.sleep(daemon_mod.SCHEDULES_AFTER_PUSH + 2)  # past the loop's last timer: nothing wakes it
        (root / "answer").write_text("refuse")
        refused = home.push(repo, {"fill": None, "n": "push 2\n"})  # its heads-up removes `many`
        assert refused.returncode != 0 and not refused.run_ids, refused.stderr
        assert home.gitpipe("cancel", str(slow)).returncode == 0
        home.wait_status(slow, "cancelled")
        assert many[0].is_dir(), "the cancel waited for the heads-up's removal of the last run's HOME"
        wait_for(lambda: not many[0].exists(), timeout=150, what="the heads-up's slot cleared")
