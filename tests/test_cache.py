"""Build caches (SPEC section 14, issue 12), end to end: real pushes to a real daemon.

What must hold: an exact entry is restored, else the newest of the action (warm), else none,
and the log, `show` and the run page say which; a success without an exact entry saves one; a
failure saves nothing; what an action does to restored files never reaches the stored entry; a
protected run never restores what an unprotected one saved (a poisoned entry); no cache path
reads or writes through a symlink or `..`; a daemon killed mid-save leaves nothing a restore
could pick; max_size evicts the least recently used; keep_runs and a full disk leave the
caches consistent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import Home, git, pipeline, wait_for
from test_full_disk import query

DEPS = pipeline('''
    [[stage]]
    name = "build"
      [[stage.action]]
      name = "deps"
      cache = [{ key = ["requirements.txt"], paths = [".venv", "~/.cache/tool"] }]
      run = """
      if [ -f .venv/marker ]; then echo "found venv of run $(cat .venv/marker)"; else echo "cold venv"; fi
      if [ -f ~/.cache/tool/f ]; then echo "found home cache $(cat ~/.cache/tool/f)"; fi
      if [ -f .venv/lib/old.py ]; then echo "old.py present"; rm .venv/lib/old.py; fi
      mkdir -p .venv/lib ~/.cache/tool
      [ -f .venv/marker ] || touch .venv/lib/old.py
      echo "$GITPIPE_RUN" > .venv/marker
      echo "$GITPIPE_RUN" > ~/.cache/tool/f
      echo "data of $GITPIPE_RUN" > .venv/lib/mod.py
      """
    ''')


def entries(home: Home, *repo: str) -> list[dict[str, Any]]:
    return json.loads(home.gitpipe("cache", "list", *repo, "--json", check=True).stdout)


def caches_of(home: Home, run_id: int, action: str = "deps") -> list[dict[str, Any]]:
    run = home.expect(home.wait_run(run_id))
    return home.action(run, action)["caches"]


def run_of(home: Home, repo: Path, files: dict[str, str | None], branch: str = "main",
           status: str = "succeeded") -> tuple[int, str]:
    """Push, wait, check the status; (run id, its log)."""
    run_id = home.push_run(repo, files, branch)
    home.expect(home.wait_run(run_id, timeout=120), status)
    return run_id, home.logs(run_id)


@pytest.fixture
def shop(home: Home) -> Path:
    home.configure('[repos.shop]\nprotected = ["main"]\n')
    return home.add_repo("shop")


# ---------------------------------------------------------------------------- restore and save
@pytest.mark.parametrize("kind", ["root", "user"])
def test_exact_warm_and_none_are_restored_saved_and_shown(kind: str, tmp_path: Path) -> None:
    """In both daemon setups (root with a build user; an unprivileged user with a user namespace)."""
    from test_sandbox import make_world

    with make_world(kind, tmp_path) as world:
        home, repo = world.home, world.repo
        with home.daemon():
            first, log1 = run_of(home, repo, {".pipeline.toml": DEPS, "requirements.txt": "a==1\n"})
            assert "cold venv" in log1 and "found" not in log1
            assert "cache 1 (.venv, ~/.cache/tool): nothing to restore" in log1
            [c1] = caches_of(home, first)
            assert c1["match"] == "none" and c1["restored"] is None and c1["saved"]["size"] > 0

            second, log2 = run_of(home, repo, {"README": "another commit, same key"})
            assert f"found venv of run {first}" in log2 and f"found home cache {first}" in log2
            # Each restored directory is an overlay: mounted on the host by a root daemon, in the
            # attempt's own user namespace by an unprivileged one.
            assert "as an overlay in" in log2 and "old.py present" in log2
            [c2] = caches_of(home, second)
            assert c2["match"] == "exact" and c2["restored"]["entry"] == c1["saved"]["entry"]
            assert c2["saved"] is None  # an exact entry is never saved again

            # The second run rewrote every restored file: the stored entry did not change.
            third, log3 = run_of(home, repo, {"README": "a third"})
            assert f"found venv of run {first}" in log3 and f"found home cache {first}" in log3
            assert "old.py present" in log3  # the second run deleted it from its view only

            # A new key: the newest entry of the action is restored warm, and a new one saved.
            fourth, log4 = run_of(home, repo, {"requirements.txt": "a==2\n"})
            [c4] = caches_of(home, fourth)
            assert c4["match"] == "warm" and c4["restored"]["entry"] == c1["saved"]["entry"]
            assert f"found venv of run {first}" in log4 and "restored warm entry" in log4
            assert c4["saved"] and c4["saved"]["entry"] != c1["saved"]["entry"]
            assert len(entries(home)) == 2
            # The warm run deleted a restored file before it saved: the new entry has it no more.
            fifth, log5 = run_of(home, repo, {"README": "same key as the fourth"})
            assert caches_of(home, fifth)[0]["restored"]["entry"] == c4["saved"]["entry"]
            assert f"found venv of run {fourth}" in log5 and "old.py present" not in log5

            shown = home.gitpipe("show", str(fourth), check=True).stdout
            assert "cache .venv, ~/.cache/tool: restored warm" in shown and "saved" in shown
            page = (home.home / "site" / "shop" / "runs" / f"{fourth}.html")
            wait_for(lambda: page.exists() and "restored warm" in page.read_text(), 30, 0.2, "the run page")


def test_a_failed_action_saves_nothing(home: Home, shop: Path) -> None:
    failing = DEPS.replace('echo "data of $GITPIPE_RUN" > .venv/lib/mod.py',
                           'echo "data of $GITPIPE_RUN" > .venv/lib/mod.py; exit 3')
    with home.daemon():
        run_id, log = run_of(home, shop, {".pipeline.toml": failing, "requirements.txt": "x"}, status="failed")
        [c] = caches_of_failed(home, run_id)
        assert c["saved"] is None and c["match"] == "none"
        assert entries(home) == [] and "saved entry" not in log


def caches_of_failed(home: Home, run_id: int) -> list[dict[str, Any]]:
    return home.action(home.wait_run(run_id), "deps")["caches"]


# ---------------------------------------------------------------------------- trust
POISON_CHECK = pipeline('''
    [[stage]]
    name = "build"
      [[stage.action]]
      name = "deps"
      cache = [{ key = ["requirements.txt"], paths = [".venv"] }]
      run = """
      if [ -f .venv/bin/tool ]; then .venv/bin/tool; fi
      if [ "$GITPIPE_BRANCH" = evil ]; then
        mkdir -p .venv/bin && printf '#!/bin/sh\\necho POISONED by a feature branch\\n' > .venv/bin/tool
      else
        mkdir -p .venv/bin && printf '#!/bin/sh\\necho clean tool of main\\n' > .venv/bin/tool
      fi
      chmod +x .venv/bin/tool
      """
    ''')


def test_a_poisoned_entry_from_a_feature_branch_never_reaches_a_protected_run(home: Home, shop: Path) -> None:
    files = {".pipeline.toml": POISON_CHECK, "requirements.txt": "same key on every branch\n"}
    assert home.push(shop, {"README": "start"}).returncode == 0  # main exists (no pipeline yet: no run)
    with home.daemon():
        # The feature branch runs first and saves its poisoned venv under the very key main will use.
        evil, _ = run_of(home, shop, files, branch="evil")
        assert [e["protected"] for e in entries(home)] == [False]
        assert "POISONED" in home.logs(run_of(home, shop, {"README": "again"}, branch="evil")[0])

        main, log = run_of(home, shop, files, branch="main")
        assert "POISONED" not in log
        assert "nothing to restore (no entry yet saved by a protected run)" in log
        [c] = caches_of(home, main)
        assert c["match"] == "none" and c["saved"]  # main saves an entry of its own
        protected = [e for e in entries(home) if e["protected"]]
        assert len(protected) == 1 and protected[0]["run"] == main

        again, log = run_of(home, shop, {"README": "main again"}, branch="main")
        assert "clean tool of main" in log and "POISONED" not in log
        assert caches_of(home, again)[0]["restored"]["entry"] == protected[0]["id"]
        assert evil != main


SECRET = "s3cr3t-value-of-the-cache-test"
WITH_SECRET = pipeline('''
    [[stage]]
    name = "build"
      [[stage.action]]
      name = "deps"
      secrets = ["TOKEN"]
      cache = [{ paths = [".venv"] }]
      run = "mkdir -p .venv && echo \\"$TOKEN\\" > .venv/token"
    ''')


def test_an_entry_saved_with_secrets_is_not_restored_by_an_unprotected_run(home: Home, shop: Path) -> None:
    secrets = home.home / "secrets.toml"
    secrets.write_text(f'[shop]\nTOKEN = "{SECRET}"\n')
    secrets.chmod(0o600)
    reader = WITH_SECRET.replace('secrets = ["TOKEN"]\n', "").replace(
        'run = "mkdir -p .venv && echo \\"$TOKEN\\" > .venv/token"', 'run = "cat .venv/token || echo no token here"')
    with home.daemon():
        main, _ = run_of(home, shop, {".pipeline.toml": WITH_SECRET})
        assert caches_of(home, main)[0]["saved"]
        feature, log = run_of(home, shop, {".pipeline.toml": reader}, branch="feature")
        assert "no token here" in log and "nothing to restore" in log
        assert SECRET not in log


# ---------------------------------------------------------------------------- escapes
def test_validation_rejects_paths_outside_the_worktree_and_home(home: Home, tmp_path: Path) -> None:
    bad = pipeline('''
        [[stage]]
        name = "build"
          [[stage.action]]
          name = "deps"
          run = "true"
          cache = [{ key = ["../secrets.toml"], paths = ["../other", "/etc", "~root/.ssh", "sub/../../x"] }]
        ''')
    path = tmp_path / "bad.toml"
    path.write_text(bad)
    proc = home.gitpipe("validate", str(path))
    assert proc.returncode == 1
    lines = proc.stdout.splitlines() + proc.stderr.splitlines()
    for needle in ('key glob "../secrets.toml" must not contain ".."', 'path "../other" must not contain ".."',
                   'path "/etc" must be inside the worktree', 'path "~root/.ssh"', 'path "sub/../../x"'):
        assert any(needle in line and line.startswith(f"{path}:6:") for line in lines), (needle, lines)


def test_a_committed_symlink_is_never_restored_through(home: Home, shop: Path, out: Path) -> None:
    """The commit makes a cached path, or a directory on its way, a symlink to a host directory."""
    body = pipeline('''
        [[stage]]
        name = "build"
          [[stage.action]]
          name = "deps"
          cache = [{ paths = [".venv", "build/cache"] }]
          run = "[ -L .venv ] || { mkdir -p .venv build/cache && echo saved > .venv/f && echo saved > build/cache/f; }"
        ''')
    with home.daemon():
        first, _ = run_of(home, shop, {".pipeline.toml": body})
        assert caches_of(home, first)[0]["saved"]
        clone = home.clone_of(shop)
        (clone / ".venv").symlink_to(out)
        (clone / "build").symlink_to(out)
        git(clone, "add", ".venv", "build")
        git(clone, "commit", "-q", "-m", "links")
        push = home.git_push(shop, "HEAD:refs/heads/main")
        [second] = push.run_ids
        log = home.logs(home.expect(home.wait_run(second))["id"])
    assert ".venv not restored: it already exists in the worktree" in log
    assert "build/cache not restored: build is a symlink in the worktree" in log
    assert list(out.iterdir()) == []  # nothing was written through the links
    assert "not saved: .venv is a symlink" in log


def test_a_script_that_turns_a_cached_path_into_a_symlink_saves_nothing(home: Home, shop: Path) -> None:
    body = pipeline('''
        [[stage]]
        name = "build"
          [[stage.action]]
          name = "deps"
          cache = [{ paths = ["~/.cache/x", ".venv"] }]
          run = "mkdir -p ~/.cache && ln -s /etc ~/.cache/x && ln -s / .venv"
        ''')
    with home.daemon():
        run_id, log = run_of(home, shop, {".pipeline.toml": body})
    assert "not saved: ~/.cache/x is a symlink" in log
    [c] = caches_of(home, run_id)
    assert c["saved"] is None and "symlink" in c["note"]
    assert entries(home) == []
    assert not list((home.home / "build-cache").rglob("passwd"))


# ---------------------------------------------------------------------------- crash, size, housekeeping
BIG = pipeline('''
    [[stage]]
    name = "build"
      [[stage.action]]
      name = "deps"
      cache = [{ key = ["requirements.txt"], paths = [".venv"] }]
      run = """
      if [ -f .venv/done ]; then echo "restored $(find .venv -type f | wc -l) files"; exit 0; fi
      mkdir -p .venv
      for d in $(seq 1 40); do mkdir .venv/$d; for f in $(seq 1 500); do echo "$d $f" > .venv/$d/$f; done; done
      echo yes > .venv/done
      """
    ''')


def test_a_daemon_killed_mid_save_leaves_nothing_a_restore_could_pick(home: Home, shop: Path) -> None:
    tmp = home.home / "build-cache" / "tmp"
    with home.daemon() as daemon:
        run_id = home.push_run(shop, {".pipeline.toml": BIG, "requirements.txt": "big"})
        wait_for(lambda: tmp.is_dir() and any(tmp.iterdir()), 120, 0.005, "a save to start")
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.proc.wait()
        half = next(tmp.iterdir())
        assert query(home, "SELECT count(*) FROM cache_entries") == [(0,)]
        daemon.proc.returncode = 0  # killed on purpose: the fixture expects a clean exit
    with home.daemon():
        run = home.expect(home.wait_run(run_id, timeout=180))
        # A cp forked in the very instant of the kill may outlive the daemon: whatever it still
        # writes is under a name set aside (.trash-*) that no entry row names and the next start removes.
        assert not half.exists() and [p for p in tmp.iterdir() if not p.name.startswith(".trash-")] == []
        [entry] = entries(home)
        assert entry["files"] == 40 * 500 + 1
        assert sorted(os.listdir(home.home / "build-cache" / "entries")) == [entry["id"]]
        again, log = run_of(home, shop, {"README": "again"})
        assert f"restored {40 * 500 + 1} files" in log
        assert home.action(run, "deps")["caches"][0]["saved"]["entry"] == entry["id"]


def test_overlays_a_killed_daemon_left_mounted_are_unmounted_at_start(home: Home, shop: Path, out: Path) -> None:
    """Root daemon: a restored directory is an overlay mounted on the host until the attempt ends."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("overlay restores need a root daemon (run the tests as root)")
        pytest.skip("overlay restores need a root daemon")
    slow = DEPS.replace('echo "data of $GITPIPE_RUN" > .venv/lib/mod.py',
                        f'echo "data of $GITPIPE_RUN" > .venv/lib/mod.py; [ -f .venv/slow ] && touch {out}/up '
                        f'&& sleep 600; touch .venv/slow')
    work = str((home.home / "work").resolve())

    def mounts() -> list[str]:
        return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
                if line.split()[4].startswith(work)]

    with home.daemon() as daemon:
        run_of(home, shop, {".pipeline.toml": slow, "requirements.txt": "m"})
        assert mounts() == []  # released with its attempt
        second = home.push_run(shop, {"README": "slow"})
        wait_for(lambda: (out / "up").exists(), 60, 0.05, "the restored action to run")
        # mounted beside the worktree, out of every attempt's reach; bwrap binds them in
        assert sorted(m.split("/0/", 1)[1] for m in mounts()) == ["overlay/0.0/merged", "overlay/0.1/merged"]
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.proc.wait()
        daemon.proc.returncode = 0
    assert len(mounts()) == 2  # what the killed daemon left
    (out / "up").unlink()
    with home.daemon():
        wait_for(lambda: (out / "up").exists(), 60, 0.05, "the interrupted action to run again")
        assert len(mounts()) == 2  # its own two: the leftovers were unmounted, not stacked under them
        home.gitpipe("cancel", str(second), check=True)
        home.wait_run(second)
    assert mounts() == []


SIZED = pipeline('''
    [[stage]]
    name = "build"
      [[stage.action]]
      name = "deps"
      cache = [{ key = ["requirements.txt"], paths = [".venv"] }]
      run = "mkdir -p .venv && head -c 400000 /dev/urandom > .venv/blob"
    ''')


def test_max_size_evicts_the_least_recently_used_entries(home: Home, shop: Path) -> None:
    home.configure('[cache]\nmax_size = "1M"\n')
    with home.daemon():
        a, _ = run_of(home, shop, {".pipeline.toml": SIZED, "requirements.txt": "a"})
        b, _ = run_of(home, shop, {"requirements.txt": "b"})
        entry_a, entry_b = (caches_of(home, r)[0]["saved"]["entry"] for r in (a, b))
        assert [e["id"] for e in entries(home)] == [entry_a, entry_b]  # least recently used first
        _, log = run_of(home, shop, {"requirements.txt": "a"})  # uses A: B is now the least recent
        assert "restored exact" in log
        assert [e["id"] for e in entries(home)] == [entry_b, entry_a]
        # Other paths: another cache of the action, so no warm start refreshes B.
        c, log = run_of(home, shop, {".pipeline.toml": SIZED.replace('".venv"]', '".venv", "more"]')})
        assert f"evicted entry {entry_b[:12]}" in log
        left = {e["id"] for e in entries(home)}
        assert left == {entry_a, caches_of(home, c)[0]["saved"]["entry"]}
        assert not (home.home / "build-cache" / "entries" / entry_b).exists()
        assert (home.home / "build-cache" / "entries" / entry_a).is_dir()


def test_cache_list_and_clear(home: Home, shop: Path) -> None:
    other = home.add_repo("other")
    with home.daemon():
        run_of(home, shop, {".pipeline.toml": SIZED, "requirements.txt": "a"})
        run_of(home, other, {".pipeline.toml": SIZED, "requirements.txt": "a"})
    listed = entries(home)
    assert {e["repo"] for e in listed} == {"shop", "other"}
    e = listed[0]
    assert set(e) == {"id", "repo", "action", "key", "paths", "protected", "host", "size", "files", "created_at",
                      "last_used_at", "run", "where"}
    assert e["action"] == "build/deps" and e["paths"] == [".venv"] and e["size"] == 400000 and e["host"]
    assert e["where"] == "build host"
    text = home.gitpipe("cache", "list", check=True).stdout
    assert "build/deps" in text and "0.4 MB" in text and "protected" in text
    assert f"on build host ({e['host']})" in text

    proc = home.gitpipe("cache", "clear", "nosuch")
    assert proc.returncode == 2 and 'no repo named "nosuch"' in proc.stderr
    proc = home.gitpipe("cache", "clear", "shop", check=True)
    assert "removed 1 cache entry (0.4 MB) of shop" in proc.stdout
    assert [x["repo"] for x in entries(home)] == ["other"]
    home.gitpipe("cache", "clear", check=True)
    assert entries(home) == [] and os.listdir(home.home / "build-cache" / "entries") == []


def test_keep_runs_pruning_leaves_the_caches_whole(home: Home, shop: Path) -> None:
    home.configure("keep_runs = 1\n")
    with home.daemon():
        first, _ = run_of(home, shop, {".pipeline.toml": DEPS, "requirements.txt": "k"})
        for n in range(2):
            run_of(home, shop, {"README": f"{n}"})
        wait_for(lambda: query(home, "SELECT pruned_at FROM runs WHERE id = ?", (first,))[0][0], 30, 0.2,
                 "the first run to be pruned")
        _, log = run_of(home, shop, {"README": "after pruning"})
    assert f"found venv of run {first}" in log
    [entry] = entries(home)
    assert entry["run"] == first and (home.home / "build-cache" / "entries" / entry["id"]).is_dir()


def test_cache_settings_errors_name_the_line(home: Home) -> None:
    home.configure('[cache]\nmax_size = "lots"\n')
    proc = home.gitpipe("cache", "list")
    assert proc.returncode == 2
    assert '[cache] "max_size": bad size "lots"' in proc.stderr and "gitpipe.toml:" in proc.stderr


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Home]:
    from test_full_disk import tmpfs

    h = Home(tmp_path)
    with tmpfs(h.home, "40m"):
        h.init('max_parallel = 2\nstop_grace = "3s"\n')
        yield h


def test_a_save_on_a_full_disk_leaves_nothing_and_the_action_succeeds(small_disk: Home) -> None:
    from test_full_disk import fill

    home = small_disk
    repo = home.add_repo("shop")
    big = SIZED.replace("head -c 400000", "head -c 6000000")
    with home.daemon():
        filler = fill(home.home, leave=14 << 20)
        run_id, log = run_of(home, repo, {".pipeline.toml": big, "requirements.txt": "a"})
        assert "not saved: not enough free space" in log
        assert entries(home) == [] and list((home.home / "build-cache" / "tmp").glob("*")) == []
        filler.unlink()
        _, log = run_of(home, repo, {"README": "room again"})
        assert "saved entry" in log and len(entries(home)) == 1


def test_a_key_hashes_contents_and_never_follows_a_symlink(tmp_path: Path) -> None:
    from gitpipe.cache import plans
    from gitpipe.models import CacheSpec

    tree, home = tmp_path / "tree", tmp_path / "home"
    (tree / "sub").mkdir(parents=True)
    (tree / "requirements.txt").write_text("a==1\n")
    (tree / "sub" / "requirements-dev.txt").write_text("b==1\n")
    spec = CacheSpec(key=("requirements*.txt", "**/requirements*.txt"), paths=(".venv", "~/.cache/pip"))

    def key() -> str:
        [plan] = plans((spec,), "shop", "build/deps", tree, home)
        assert plan.targets == (tree / ".venv", home / ".cache/pip")
        return plan.key

    first = key()
    assert key() == first
    (tree / "sub" / "requirements-dev.txt").write_text("b==2\n")
    second = key()
    assert second != first
    # A link to a host file counts as its text: the host file's content never reaches the key.
    secret = tmp_path / "secret"
    secret.write_text("one")
    (tree / "requirements-link.txt").symlink_to(secret)
    third = key()
    secret.write_text("two")
    assert key() == third != second
    [other] = plans((spec,), "shop", "build/other", tree, home)
    assert other.key != third and other.slot != plans((spec,), "shop", "build/deps", tree, home)[0].slot


# An attempt hands an open descriptor of its worktree's folder to a running attempt of its own
# (an abstract unix socket: the network namespace is the host's by default). That folder is the
# slot's, kept from run to run, so the holder can swap what the next run's restore made in it:
# the folder a cache is mounted on, replaced by a link between the daemon's check and its mount.
DIR_GRAB = r'''
import os, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
for _ in range(600):
    try:
        s.connect("\0" + sys.argv[1])
        break
    except OSError:
        time.sleep(0.1)
socket.send_fds(s, [b"x"], [os.open(".", os.O_RDONLY | os.O_DIRECTORY)])
s.recv(1)
'''
DIR_HOLD = r'''
import ctypes, os, select, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind("\0" + sys.argv[1])
s.listen(1)
c, _ = s.accept()
_msg, (tree,), _flags, _addr = socket.recv_fds(c, 1, 1)
c.send(b"k")
libc = ctypes.CDLL(None, use_errno=True)
watch = libc.inotify_init()
libc.inotify_add_watch(watch, f"/proc/self/fd/{tree}".encode(), 0x100)  # IN_CREATE
end = time.monotonic() + 40
while time.monotonic() < end:
    if not select.select([watch], [], [], 1)[0]:
        continue
    os.read(watch, 65536)
    try:
        os.rename(".venv", "moved", src_dir_fd=tree, dst_dir_fd=tree)
        os.symlink(sys.argv[2], ".venv", dir_fd=tree)
    except OSError:
        pass
'''


def holding_pipeline(name: str, host_dir: Path) -> str:
    """A feature branch's pipeline: "grab" hands its worktree's folder to "hold" (running on)."""
    return pipeline(f'''
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "grab"
          run = "python3 grab.py {name}"
          [[stage.action]]
          name = "hold"
          timeout = "60s"
          run = "python3 hold.py {name} {host_dir}"
        ''')


def test_a_held_worktree_folder_cannot_turn_a_cache_mount_onto_a_host_path(tmp_path: Path) -> None:
    """The root daemon mounts restored overlays on the host: a mount point swapped for a link put
    a branch's cache entry over any host directory (as root: /etc, say)."""
    from test_sandbox import make_world

    with make_world("root", tmp_path) as world:
        home, repo = world.home, world.repo
        host_dir = home.root / "host-dir"
        host_dir.mkdir()
        (host_dir / "host.txt").write_text("host\n")
        name = f"gp-attack-{os.getpid()}-{tmp_path.name[-6:]}"
        venv = pipeline('''
            [[stage]]
            name = "c"
              [[stage.action]]
              name = "venv"
              cache = [{ key = ["k.txt"], paths = [".venv"] }]
              run = "mkdir -p .venv && echo entry > .venv/marker; sleep 4"
            ''')
        attack = holding_pipeline(name, host_dir)
        files = {"k.txt": "1\n", "grab.py": DIR_GRAB, "hold.py": DIR_HOLD}
        seen: list[str] = []
        try:
            with home.daemon():
                run_of(home, repo, {".pipeline.toml": venv, **files}, "feature")
                holder = home.push_run(repo, {".pipeline.toml": attack}, "feature")
                wait_for(lambda: home.action(home.show(holder), "grab")["status"] in ("succeeded", "failed"),
                         60, 0.5, "the grab action to end")
                victim = home.push_run(repo, {".pipeline.toml": venv}, "other")  # a new push would cancel the holder

                def over() -> bool:
                    if (host_dir / "marker").exists():
                        seen.append((host_dir / "marker").read_text())
                    return home.status(victim) in ("succeeded", "failed", "cancelled")

                wait_for(over, 90, 0.02, "the victim run")
                log = home.logs(victim)
                home.wait_run(holder, timeout=90)
        finally:
            subprocess.run(["umount", "-l", str(host_dir)], capture_output=True, check=False)
        # Restored, or refused: the mount point is made and opened through descriptors, so one
        # swapped for a link in that instant fails the restore (the run goes on without it).
        assert "restored" in log or "could not restore entry" in log, log
        assert seen == [], "a feature branch's cache entry was mounted over a host directory"
        assert sorted(p.name for p in host_dir.iterdir()) == ["host.txt"]


# ---------------------------------------------------------------------------- copies under attack
# A real process swaps folders of the tree for links (to a host folder) as fast as it can while
# the daemon's copies run: what a process of another attempt holding a folder of the slot open
# can do at any moment. Every copy must walk only what is the tree's, never what a link reaches.
SWAPPER = r'''
import os, sys, time
root, outside, stop = sys.argv[1], sys.argv[2], sys.argv[3]
fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
names = sys.argv[4:]
while not os.path.exists(stop):
    for name in names:
        try:
            os.rename(name, name + ".x", src_dir_fd=fd, dst_dir_fd=fd)
            os.symlink(outside, name, dir_fd=fd)
            os.unlink(name, dir_fd=fd)
            os.rename(name + ".x", name, src_dir_fd=fd, dst_dir_fd=fd)
        except OSError:
            pass
'''


def _files(top: Path) -> list[str]:
    found = []
    for d, dirs, names in os.walk(top):  # links not followed
        found += [os.path.join(d, n) for n in names + dirs]
    return found


def test_a_cached_path_whose_folder_is_missing_is_nothing_to_save_and_a_link_on_the_way_refuses(
        tmp_path: Path) -> None:
    from gitpipe import cachefs

    home = tmp_path / "home"
    home.mkdir()
    assert cachefs.size_under(home, home / ".cache" / "pip") is None  # ~/.cache never made: not an error
    (home / "outside").mkdir()
    (home / "outside" / "f").write_text("x")
    (home / ".cache").symlink_to(home / "outside")
    with pytest.raises(OSError):
        cachefs.size_under(home, home / ".cache" / "f")


def test_copies_never_follow_a_folder_swapped_for_a_link_while_they_run(tmp_path: Path) -> None:
    from gitpipe import cachefs

    tree, host, stop = tmp_path / "tree", tmp_path / "host", tmp_path / "stop"
    host.mkdir()
    (host / "host-secret.txt").write_text("secret\n")
    venv = tree / ".venv"
    names = [f"d{i}" for i in range(20)]
    for name in names:
        (venv / name / "sub").mkdir(parents=True)
        for j in range(20):
            (venv / name / "sub" / f"f{j}").write_text(f"{name} {j}\n")
    entry = tmp_path / "entry"
    entry.mkdir()
    (entry / "p0").mkdir()
    for name in names:
        (entry / "p0" / name).mkdir()
        (entry / "p0" / name / "f").write_text("from the entry\n")
    racer = subprocess.Popen([sys.executable, "-c", SWAPPER, str(venv), str(host), str(stop), *names])
    restore_racer = subprocess.Popen([sys.executable, "-c", SWAPPER, str(tree), str(host), str(stop), "a"])
    copies, failed = tmp_path / "copies", 0
    copies.mkdir()
    try:
        for n in range(30):
            try:  # a save of the tree's .venv (linked and copied), and its size
                cachefs.save_copy(tree, venv, copies / f"s{n}", link=n % 2 == 0)
                cachefs.size_under(tree, venv)
            except OSError:
                failed += 1  # a swap caught mid-walk fails the save: nothing was followed
            try:  # a restore into a folder another process swaps for a link to the host
                (tree / "a").mkdir(exist_ok=True)  # (FileExistsError when it is mid-swap)
                cachefs.restore_copy(entry / "p0", tree, tree / "a" / "b" / f"r{n}")
            except OSError:
                failed += 1
    finally:
        stop.touch()
        racer.wait(30)
        restore_racer.wait(30)
    copied = _files(copies)
    assert copied, "nothing was copied at all"
    assert not [f for f in copied if "host-secret" in f], "a save read a host folder through a swapped link"
    assert sorted(os.listdir(host)) == ["host-secret.txt"], "a restore wrote into a host folder through a link"
    assert (host / "host-secret.txt").read_text() == "secret\n"
    assert failed < 60  # some copies got through whole while the swaps ran


def test_a_backgrounded_swapper_never_gets_a_host_folder_into_an_entry(home: Home, shop: Path) -> None:
    """The script leaves a process behind that swaps a cached folder for a link to /etc (or to
    another repo's entries) in a loop: it must be gone before the save, and whatever state it
    left, no file of /etc or of another entry is copied into this one."""
    other = home.home / "build-cache" / "entries"
    body = pipeline(f'''
        [[stage]]
        name = "build"
          [[stage.action]]
          name = "deps"
          cache = [{{ key = ["n"], paths = [".venv"] }}]
          run = """
          rm -rf .venv/lib .venv/lib.x && mkdir -p .venv/lib && echo mine > .venv/lib/own.txt
          python3 - <<'PY' &
        import os
        fd = os.open(".venv", os.O_RDONLY | os.O_DIRECTORY)
        while True:
            for where in ("/etc", "{other}"):
                try:
                    os.rename("lib", "lib.x", src_dir_fd=fd, dst_dir_fd=fd)
                    os.symlink(where, "lib", dir_fd=fd)
                    os.unlink("lib", dir_fd=fd)
                    os.rename("lib.x", "lib", src_dir_fd=fd, dst_dir_fd=fd)
                except OSError:
                    pass
        PY
          sleep 0.5
          """
        ''')
    with home.daemon():
        for n in range(3):
            run_id, log = run_of(home, shop, {".pipeline.toml": body, "n": str(n)}, "feature")
            assert "saved entry" in log or "not saved" in log, log
            assert n == 0 or "restored warm" in log, log
    top = home.home / "build-cache" / "entries"
    ids = set(os.listdir(top))
    saved = list(top.rglob("*"))  # never follows a link
    assert saved, "nothing was saved at all"
    assert not [p for p in saved if p.name in ("passwd", "shadow", "hostname", "os-release")], saved
    assert not [p for p in saved if ids & set(p.relative_to(top).parts[1:])], "another entry was copied into one"
    for p in saved:  # every file is the action's own, or a link copied as a link
        if p.is_file() and not p.is_symlink():
            assert p.read_text() == "mine\n", p


# The holder of a slot's folder (see DIR_GRAB) waits until the next run's script has made its
# .venv (d0..d29, with "go" last), then watches each folder: the moment the daemon's save
# opens a file in one, or opens it a second time (the first: the size walk), it swaps that
# folder for a link to a host folder
# holding files of the same names, so the rest of that folder's files come from the host to
# a copy that goes by path (as `cp -a` and `cp -al` did).
SWAP_HOLD = r'''
import ctypes, os, select, socket, struct, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind("\0" + sys.argv[1])
s.listen(1)
c, _ = s.accept()
_msg, (tree,), _flags, _addr = socket.recv_fds(c, 1, 1)
c.send(b"k")
libc = ctypes.CDLL(None, use_errno=True)
end = time.monotonic() + 45
while time.monotonic() < end:
    if not os.path.exists(f"/proc/self/fd/{tree}/.venv/go"):
        time.sleep(0.005)
        continue
    venv = os.open(".venv", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=tree)
    watch = libc.inotify_init()
    wds = {}
    for i in range(30):
        wd = libc.inotify_add_watch(watch, f"/proc/self/fd/{venv}/d{i}".encode(), 0x20 | 0x4)  # IN_OPEN, IN_ATTRIB
        if wd >= 0:
            wds[wd] = f"d{i}"
    swapped, opened = set(), {}
    while time.monotonic() < end and os.path.exists(f"/proc/self/fd/{venv}/go"):
        if not select.select([watch], [], [], 0.2)[0]:
            continue
        data = os.read(watch, 65536)
        while data:
            wd, _mask, _cookie, size = struct.unpack_from("iIII", data)
            name, data = data[16:16 + size].rstrip(b"\0"), data[16 + size:]
            if wd not in wds or wds[wd] in swapped:
                continue
            opened[wd] = opened.get(wd, 0) + (0 if name else 1)
            if name or opened[wd] >= 2:  # a file in it opened, or the folder opened by a second walk
                swapped.add(wds[wd])
                try:
                    os.rename(wds[wd], wds[wd] + ".x", src_dir_fd=venv, dst_dir_fd=venv)
                    os.symlink(sys.argv[2], wds[wd], dir_fd=venv)
                except OSError:
                    pass
    os.close(watch)
    os.close(venv)
'''


def test_a_held_worktree_folder_swapping_links_during_a_save_never_copies_the_host(tmp_path: Path) -> None:
    """A feature branch's attempt holds the folder of a slot the next run takes, and swaps the
    folders of its .venv for links to a host folder while the daemon (root) saves them."""
    from test_sandbox import make_world

    with make_world("root", tmp_path) as world:
        home, repo = world.home, world.repo
        host_dir = home.root / "host-dir"
        host_dir.mkdir()
        (host_dir / "host-secret.txt").write_text("host\n")
        for j in range(1, 41):  # the names the venv's folders hold: a copy through a link finds them all
            (host_dir / f"f{j}").write_text("host\n")
        name = f"gp-swap-{os.getpid()}-{tmp_path.name[-6:]}"
        venv = pipeline('''
            [[stage]]
            name = "c"
              [[stage.action]]
              name = "venv"
              cache = [{ key = ["k.txt"], paths = [".venv"] }]
              run = "for i in $(seq 0 29); do mkdir -p .venv/d$i; for j in $(seq 1 40); do echo $i > .venv/d$i/f$j; done; done; touch .venv/go; sleep 1"
            ''')
        attack = holding_pipeline(name, host_dir)
        with home.daemon():
            holder = home.push_run(repo, {".pipeline.toml": attack, "grab.py": DIR_GRAB, "hold.py": SWAP_HOLD},
                                   "feature")
            wait_for(lambda: home.action(home.show(holder), "grab")["status"] in ("succeeded", "failed"),
                     60, 0.5, "the grab action to end")
            victim = home.push_run(repo, {".pipeline.toml": venv, "k.txt": "1\n"}, "other")
            home.wait_run(victim, timeout=120)
            logs = [home.logs(victim)]
            home.wait_run(holder, timeout=90)
        top = home.home / "build-cache" / "entries"
        copied = [p for p in top.rglob("*")] if top.is_dir() else []  # never follows a link
        assert not [p for p in copied if p.name == "host-secret.txt"], "a save copied a host folder"
        assert not [p for p in copied if p.is_file() and not p.is_symlink() and p.read_text() == "host\n"], \
            "a save copied host files"
        assert sorted(os.listdir(host_dir)) == sorted(["host-secret.txt", *(f"f{j}" for j in range(1, 41))])
        # The walk held each folder it entered: the save went through whole, with the run's own files.
        assert "saved entry" in logs[0] and "1201 files" in logs[0], logs[0]
        assert sorted({p.read_text() for p in copied if p.is_file() and p.name != "go"}) == [f"{i}\n" for i in
                                                                                           sorted(range(30), key=str)]
