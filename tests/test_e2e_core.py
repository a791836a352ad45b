"""End-to-end tests of the core: real `git push` into real bare repos, a real `gitpipe serve`.

Every test gets its own home (tests/conftest.py) and talks to gitpipe only through its
command line, git and the files its actions write. No timing assertions: order is
checked on the times gitpipe records, or with marker files the scripts write.
"""

from __future__ import annotations

import getpass
import hashlib
import itertools
import os
import queue
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    GITPIPE,
    ISO_UTC,
    RUN_ID,
    STAMP,
    Home,
    Push,
    base_env,
    git,
    kill_marker_processes,
    marker_processes,
    pipeline,
    vm_kib,
    wait_for,
)

RUN_KEYS = {"id", "repo", "pipeline", "ref", "sha", "status", "trigger", "created_at", "started_at",
            "finished_at", "error"}
STAGE_KEYS = {"name", "status", "actions"}
ACTION_KEYS = {"name", "type", "status", "exit_code", "started_at", "finished_at", "attempts"}
ARTIFACT_KEYS = {"name", "action", "size", "sha256"}
SPEC_VARS = ("GITPIPE_RUN", "GITPIPE_REPO", "GITPIPE_PIPELINE", "GITPIPE_REF", "GITPIPE_BRANCH",
             "GITPIPE_TAG", "GITPIPE_SHA", "GITPIPE_STAGE", "GITPIPE_ACTION", "GITPIPE_ATTEMPT")


def fill(text: str, **values: object) -> str:
    """A pipeline text with @NAME@ tokens replaced (shell scripts keep their own ${...})."""
    text = pipeline(text)
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    assert not re.search(r"@[A-Z]+@", text), f"unfilled token in:\n{text}"
    return text


def at(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


def environ_file(path: Path) -> dict[str, str]:
    """A copy of /proc/PID/environ as a dict."""
    pairs = [item.split("=", 1) for item in path.read_bytes().decode().split("\0") if item]
    return {k: v for k, v in pairs}


# ---------------------------------------------------------------------------- parallelism and order

RENDEZVOUS = r"""
[[stage]]
name = "test"

  [[stage.action]]
  name = "left"
  run = '''
  pwd > "@OUT@/left.pwd"
  touch mine-left
  touch "@OUT@/left.started"
  for i in $(seq 400); do [ -e "@OUT@/right.started" ] && break; sleep 0.05; done
  [ -e "@OUT@/right.started" ]
  ls -A > "@OUT@/left.files"
  '''

  [[stage.action]]
  name = "right"
  run = '''
  pwd > "@OUT@/right.pwd"
  touch mine-right
  touch "@OUT@/right.started"
  for i in $(seq 400); do [ -e "@OUT@/left.started" ] && break; sleep 0.05; done
  [ -e "@OUT@/left.started" ]
  ls -A > "@OUT@/right.files"
  '''
"""


@pytest.mark.timeout(90)
def test_parallel_actions_of_one_run_order_overlap_in_separate_worktrees(home: Home, out: Path) -> None:
    repo = home.add_repo("par")
    with home.daemon():
        run_id = home.push_run(repo, {".pipeline.toml": fill(RENDEZVOUS, OUT=out)})
        run = home.wait_run(run_id)
    home.expect(run)
    left, right = home.action(run, "left"), home.action(run, "right")
    # Each waited for the other to have started: they ran at the same time, which the
    # recorded times show too.
    assert at(left["started_at"]) < at(right["finished_at"])
    assert at(right["started_at"]) < at(left["finished_at"])
    # Each sandbox shows its own worktree at the same place: /build/<repo>.
    assert (out / "left.pwd").read_text() == (out / "right.pwd").read_text() == "/build/par\n"
    assert "mine-right" not in (out / "left.files").read_text().split()
    assert "mine-left" not in (out / "right.files").read_text().split()


@pytest.mark.timeout(90)
def test_max_parallel_bounds_the_actions_running_at_once(home: Home, out: Path) -> None:
    home.configure("max_parallel = 1\n")
    repo = home.add_repo("serial")
    text = fill(r"""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "a"
          run = "sleep 0.3"
          [[stage.action]]
          name = "b"
          run = "sleep 0.3"
          [[stage.action]]
          name = "c"
          run = "sleep 0.3"
        """)
    with home.daemon():
        run = home.wait_run(home.push_run(repo, {".pipeline.toml": text}))
    home.expect(run)
    acts = sorted(run["stages"][0]["actions"], key=lambda a: a["started_at"])
    for first, second in itertools.pairwise(acts):
        assert at(first["finished_at"]) <= at(second["started_at"]), acts


@pytest.mark.timeout(90)
def test_run_order_two_starts_after_every_run_order_one_action_succeeded(home: Home, out: Path) -> None:
    repo = home.add_repo("order")
    text = fill(r"""
        [[stage]]
        name = "build"

          [[stage.action]]
          name = "slow"
          run = 'sleep 0.5; touch "@OUT@/slow.done"'

          [[stage.action]]
          name = "quick"
          run = 'touch "@OUT@/quick.done"'

          [[stage.action]]
          name = "package"
          run_order = 2
          run = '[ -e "@OUT@/slow.done" ] && [ -e "@OUT@/quick.done" ] && touch "@OUT@/package.done"'
        """, OUT=out)
    with home.daemon():
        run = home.wait_run(home.push_run(repo, {".pipeline.toml": text}))
    home.expect(run)
    package = home.action(run, "package")
    for name in ("slow", "quick"):
        assert at(package["started_at"]) >= at(home.action(run, name)["finished_at"])
    assert (out / "package.done").exists()


# ---------------------------------------------------------------------------- artifacts and isolation

ISOLATION = r"""
[[stage]]
name = "build"

  [[stage.action]]
  name = "make"
  outputs = { app = "dist/app.txt", docs = ["docs-out/**"] }
  run = '''
  @DUMP@
  mkdir -p dist ignored docs-out/sub
  echo "app of run $GITPIPE_RUN" > dist/app.txt
  echo one > docs-out/a.md
  echo two > docs-out/sub/b.md
  echo junk > ignored/junk.txt
  echo stray > stray.txt
  echo changed > README.md
  rm .gitignore
  echo beside > ../beside-the-tree || true  # the sandbox shows nothing beside the tree
  git config gitpipe.leftover yes
  mkdir -p .git/hooks
  printf '#!/bin/sh\ntouch "@OUT@/hook-ran"\n' > .git/hooks/post-checkout
  cp .git/hooks/post-checkout .git/hooks/pre-commit
  chmod +x .git/hooks/*
  mkdir nested && git -C nested init -q && echo n > nested/file
  '''

[[stage]]
name = "check"

  [[stage.action]]
  name = "use"
  inputs = ["app"]
  run = '''
  touch mine-use
  touch "@OUT@/$GITPIPE_RUN-use.started"
  for i in $(seq 400); do [ -e "@OUT@/$GITPIPE_RUN-other.started" ] && break; sleep 0.05; done
  @DUMP@
  cp dist/app.txt "@OUT@/$GITPIPE_RUN-use.app"
  '''

  [[stage.action]]
  name = "other"
  run = '''
  touch mine-other
  touch "@OUT@/$GITPIPE_RUN-other.started"
  for i in $(seq 400); do [ -e "@OUT@/$GITPIPE_RUN-use.started" ] && break; sleep 0.05; done
  @DUMP@
  '''
"""

# What every action records of the directory it got, before it changes anything.
DUMP = r"""d="@OUT@/$GITPIPE_RUN-$GITPIPE_ACTION"
  stat -c %d:%i . > "$d.pwd"
  find . -path ./.git -prune -o -print | LC_ALL=C sort > "$d.files"
  git config --local --list > "$d.config"
  ls -A .git/hooks > "$d.hooks" 2>/dev/null || true
  ls -A .. > "$d.parent"
  cat README.md > "$d.readme"
  git status --porcelain --ignored --untracked-files=all > "$d.status"
"""


@pytest.mark.timeout(120)
def test_artifacts_flow_between_stages_and_nothing_else_survives(home: Home, out: Path) -> None:
    repo = home.add_repo("iso")
    text = fill(ISOLATION.replace("@DUMP@", DUMP), OUT=out)
    files = {".pipeline.toml": text, ".gitignore": "ignored/\n", "README.md": "original\n"}
    with home.daemon() as daemon:
        first = home.wait_run(home.push_run(repo, files))
        second = home.wait_run(home.push_run(repo, {"other.txt": "x\n"}))
    for run in (first, second):
        home.expect(run)
        rid = run["id"]
        tracked = {".", "./.gitignore", "./.pipeline.toml", "./README.md"}
        if rid == second["id"]:
            tracked.add("./other.txt")
        for action in ("make", "use", "other"):
            d = f"{rid}-{action}"
            listing = set((out / f"{d}.files").read_text().split())
            listing -= {f"./mine-{action}"}
            expected = tracked | ({"./dist", "./dist/app.txt"} if action == "use" else set())
            assert listing == expected, (d, listing)
            assert "gitpipe.leftover" not in (out / f"{d}.config").read_text()
            assert (out / f"{d}.hooks").read_text() == ""
            assert (out / f"{d}.readme").read_text() == "original\n"
            assert set((out / f"{d}.parent").read_text().split()) == {"iso"}  # /build holds the tree only
            status = (out / f"{d}.status").read_text().splitlines()
            assert set(status) <= {"?? dist/app.txt", f"?? mine-{action}"}, (d, status)
        assert (out / f"{rid}-use.app").read_text() == f"app of run {rid}\n"
        # The two parallel actions of "check" had directories of their own (by device and
        # inode: inside, every tree is /build/iso) ...
        assert (out / f"{rid}-use.pwd").read_text() != (out / f"{rid}-other.pwd").read_text()
    # ... and the one the first "make" left dirty was used again, so the checks above are about
    # reuse. Which action got it is the daemon's choice: a slot is the lowest free one, and a
    # push's first worktree may be reset by the loop rather than its intake (see _prepare_early).
    pwd = {(r["id"], a): (out / f"{r['id']}-{a}.pwd").read_text()
           for r in (first, second) for a in ("make", "use", "other")}
    dirty = pwd.pop((first["id"], "make"))
    assert dirty in pwd.values(), (dirty, pwd, daemon.log)
    assert not (out / "hook-ran").exists()
    arts = {a["name"]: a for a in first["artifacts"]}
    assert set(arts) == {"app", "docs"}
    content = f"app of run {first['id']}\n".encode()
    assert arts["app"]["size"] == len(content)
    assert arts["app"]["sha256"] == hashlib.sha256(content).hexdigest()
    assert arts["docs"]["size"] == len(b"one\ntwo\n")
    assert arts["app"]["action"] == arts["docs"]["action"] == "make"


def bare_state(repo: Path) -> dict[str, Any]:
    hooks = {p.name: p.read_bytes() for p in sorted((repo / "hooks").iterdir())}
    return {
        "refs": git(repo, "for-each-ref", "--format=%(refname) %(objectname)").stdout,
        "config": (repo / "config").read_bytes(),
        "HEAD": (repo / "HEAD").read_bytes(),
        "hooks": hooks,
        "packed": (repo / "packed-refs").read_bytes() if (repo / "packed-refs").exists() else None,
    }


@pytest.mark.timeout(90)
def test_an_action_cannot_change_the_bare_repo_through_its_worktree(home: Home, out: Path) -> None:
    repo = home.add_repo("guarded")
    text = fill(r"""
        [[stage]]
        name = "attack"
          [[stage.action]]
          name = "meddle"
          run = '''
          git update-ref refs/heads/hacked HEAD
          git tag evil
          git branch evil2
          git -c user.name=x -c user.email=x@x commit -q --allow-empty -m evil
          git update-ref refs/heads/main HEAD
          git config receive.denyDeletes false
          git config core.hooksPath /nonexistent
          mkdir -p .git/hooks
          printf '#!/bin/sh\nexit 1\n' > .git/hooks/pre-receive
          printf '#!/bin/sh\nexit 1\n' > .git/hooks/post-receive
          chmod +x .git/hooks/*
          git pack-refs --all
          git remote add origin "@REPO@" || true
          echo "ref: refs/heads/evil2" > .git/HEAD
          '''
        """, OUT=out, REPO="/nonexistent/not-used")
    first = home.push(repo, {".pipeline.toml": text})
    before = bare_state(repo)
    with home.daemon():
        run = home.wait_run(first.run_ids[0])
        assert run["status"] == "succeeded", home.logs(run["id"])
        assert bare_state(repo) == before
        # The hooks still work: the next push queues a run.
        again = home.push(repo, {"x.txt": "x"})
        assert again.returncode == 0 and len(again.run_ids) == 1, again.stderr
        home.wait_run(again.run_ids[0])
    assert git(repo, "fsck", "--no-progress").returncode == 0


# ---------------------------------------------------------------------------- timeouts and killing


@pytest.mark.timeout(120)
def test_timeout_kills_a_process_tree_that_ignores_sigterm(home: Home, out: Path) -> None:
    marker = f"gp-{uuid.uuid4().hex}"
    repo = home.add_repo("stubborn")
    text = fill(r"""
        [[stage]]
        name = "hang"
          [[stage.action]]
          name = "stubborn"
          timeout = "2s"
          run = '''
          trap '' TERM
          (exec -a @M@-child sleep 1000) &
          bash -c 'trap "" TERM; exec -a @M@-grandchild sleep 1000' &
          setsid bash -c '(exec -a @M@-escaped sleep 1000 &); exit 0' &
          echo started
          touch "@OUT@/started"
          exec -a @M@-main sleep 1000
          '''
        """, OUT=out, M=marker)
    try:
        with home.daemon():
            run_id = home.push_run(repo, {".pipeline.toml": text})
            wait_for(lambda: len(marker_processes(marker, argv0=True)) == 4, 30, what="the processes to start")
            run = home.wait_run(run_id)
            act = home.action(run, "stubborn")
            assert act["status"] == "timed-out", act
            home.expect(run, "failed")
            # SIGKILL is asynchronous: allow the kernel a moment to finish what was killed.
            wait_for(lambda: not marker_processes(marker), 5, what=f"no process with {marker}")
        assert "timed out" in home.logs(run_id)
    finally:
        kill_marker_processes(marker)


@pytest.mark.timeout(90)
def test_cancel_stops_a_running_run_and_records_who_and_why(home: Home, out: Path) -> None:
    marker = f"gp-{uuid.uuid4().hex}"
    repo = home.add_repo("cancelme")
    text = fill(r"""
        [[stage]]
        name = "long"
          [[stage.action]]
          name = "wait"
          run = '''
          (exec -a @M@-background sleep 1000) &
          touch "@OUT@/started"
          exec -a @M@-main sleep 1000
          '''
        [[stage]]
        name = "after"
          [[stage.action]]
          name = "never"
          run = 'touch "@OUT@/never"'
        """, OUT=out, M=marker)
    try:
        with home.daemon():
            run_id = home.push_run(repo, {".pipeline.toml": text})
            wait_for(lambda: (out / "started").exists(), 30, what="the action to start")
            proc = home.gitpipe("cancel", str(run_id), "--reason", "wrong commit", check=True)
            assert f"run #{run_id}" in proc.stdout
            run = home.wait_run(run_id)
            wait_for(lambda: not marker_processes(marker), 5, what=f"no process with {marker}")
        assert run["status"] == "cancelled", run
        assert run["cancelled_by"] == getpass.getuser()
        assert run["cancel_reason"] == "wrong commit"
        assert home.action(run, "wait")["status"] == "cancelled"
        never = home.action(run, "never")
        assert never["status"] in ("cancelled", "skipped") and never["started_at"] is None
        assert not (out / "never").exists()
        shown = home.gitpipe("show", str(run_id)).stdout
        assert "wrong commit" in shown and getpass.getuser() in shown
    finally:
        kill_marker_processes(marker)


def test_cancel_of_a_queued_run_means_it_never_starts(home: Home, out: Path) -> None:
    repo = home.add_repo("queued")
    text = fill("""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "a"
          run = 'touch "@OUT@/ran-$GITPIPE_RUN"'
        """, OUT=out)
    first = home.push_run(repo, {".pipeline.toml": text})
    second = home.push_run(repo, {"b.txt": "b"})
    proc = home.gitpipe("cancel", str(first), "--reason", "superseded by hand", check=True)
    assert "cancelled" in proc.stdout
    with home.daemon():
        assert home.wait_run(second)["status"] == "succeeded"
    run = home.show(first)
    assert run["status"] == "cancelled" and run["started_at"] is None
    assert run["cancel_reason"] == "superseded by hand"
    assert not (out / f"ran-{first}").exists() and (out / f"ran-{second}").exists()


# ---------------------------------------------------------------------------- pushes


@pytest.mark.timeout(60)
def test_a_branch_name_reaches_scripts_only_as_data(home: Home, out: Path) -> None:
    pwned = Path(f"/tmp/pwned-{uuid.uuid4().hex}")
    branch = f"feature/x$(touch${{IFS}}{pwned})"
    assert git(home.root, "check-ref-format", "--branch", branch).returncode == 0
    repo = home.add_repo("names")
    text = fill(r"""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "echo"
          when = { branches = ["feature/*"] }
          run = '''
          printf '%s' "$GITPIPE_BRANCH" > "@OUT@/branch"
          printf '%s' "$GITPIPE_REF" > "@OUT@/ref"
          echo "building $GITPIPE_BRANCH"
          '''
        """, OUT=out)
    try:
        with home.daemon():
            push = home.push(repo, {".pipeline.toml": text}, branch=branch)
            assert push.returncode == 0, push.stderr
            assert f"queued for {branch} @ {push.sha[:7]}" in push.stderr
            run = home.wait_run(push.run_ids[0])
        home.expect(run)
        assert run["ref"] == f"refs/heads/{branch}"
        assert (out / "branch").read_text() == branch
        assert (out / "ref").read_text() == f"refs/heads/{branch}"
        assert f"building {branch}" in home.logs(run["id"])
        assert branch in home.gitpipe("runs").stdout
        assert not pwned.exists()
    finally:
        pwned.unlink(missing_ok=True)


SIMPLE = """
[[stage]]
name = "build"
  [[stage.action]]
  name = "hello"
  run = 'echo "hello from $GITPIPE_RUN"'
"""


def test_a_push_while_the_daemon_is_down_runs_when_it_starts(home: Home) -> None:
    repo = home.add_repo("later")
    push = home.push(repo, {".pipeline.toml": pipeline(SIMPLE)})
    assert push.returncode == 0
    # The hook records it itself (the daemon's socket is not there), names it, and says why it waits
    assert push.gitpipe_lines == [f"remote: gitpipe: run #{push.run_ids[0]} queued for main @ {push.sha[:7]}",
                                  "remote: gitpipe: the daemon is not running: the run starts when it does "
                                  "(gitpipe serve)"]
    run_id = push.run_ids[0]
    queued = home.show(run_id)
    assert queued["status"] == "queued"
    assert queued["started_at"] is None and queued["finished_at"] is None and queued["error"] is None
    with home.daemon():
        run = home.wait_run(run_id)
    home.expect(run)
    assert at(run["created_at"]) <= at(run["started_at"]) <= at(run["finished_at"])
    assert f"hello from {run_id}" in home.logs(run_id)


@pytest.mark.timeout(150)
def test_thirty_concurrent_pushes_to_three_repos_give_thirty_runs(home: Home, out: Path) -> None:
    repos = [home.add_repo(f"many{i}") for i in range(3)]
    text = fill("""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "a"
          run = 'echo "$GITPIPE_SHA" > "@OUT@/$GITPIPE_REPO-$GITPIPE_BRANCH"'
        """, OUT=out)

    def push(repo: Path, n: int) -> tuple[tuple[str, str], Push]:
        branch = f"b{n}"
        result = home.push(repo, {".pipeline.toml": text, f"f{n}.txt": str(n)}, branch=branch)
        return (repo.name.removesuffix(".git"), branch), result

    with home.daemon():
        with ThreadPoolExecutor(max_workers=30) as pool:
            futures = [pool.submit(push, repo, n) for repo in repos for n in range(10)]
            pushes = dict(f.result() for f in futures)
        ids = []
        for key, p in pushes.items():
            assert p.returncode == 0, (key, p.stderr)
            assert len(p.run_ids) == 1, (key, p.stderr)
            ids += p.run_ids
        assert len(set(ids)) == 30
        home.wait_runs(ids, timeout=120)
    runs = home.runs()
    assert len(runs) == 30
    assert all(r["status"] == "succeeded" for r in runs), [(r["id"], r["status"]) for r in runs]
    assert {(r["repo"], r["ref"]) for r in runs} == {(repo, f"refs/heads/{b}") for repo, b in pushes}
    for (repo_name, branch), p in pushes.items():
        assert (out / f"{repo_name}-{branch}").read_text().strip() == p.sha


def test_ref_deletion_and_a_commit_without_pipeline_start_nothing(home: Home) -> None:
    repo = home.add_repo("quiet")
    first = home.push(repo, {".pipeline.toml": pipeline(SIMPLE)}, branch="tmp")
    assert len(first.run_ids) == 1
    deleted = home.delete_ref(repo, "refs/heads/tmp")
    assert deleted.returncode == 0, deleted.stderr
    assert "[deleted]" in deleted.stderr
    assert deleted.gitpipe_lines == []
    without = home.push(repo, {".pipeline.toml": None, "a.txt": "a"}, branch="tmp")
    assert without.returncode == 0 and len(without.gitpipe_lines) == 1  # says why (test_rough_edges)
    assert "no .pipeline.toml in tmp @" in without.gitpipe_lines[0]
    tag = home.push_tag(repo, "v1.0", branch="tmp")  # no pipeline in that commit either
    assert tag.returncode == 0 and "no .pipeline.toml in v1.0 @" in tag.gitpipe_lines[0]
    assert [r["id"] for r in home.runs()] == first.run_ids


def test_trigger_branches_tags_and_paths(home: Home) -> None:
    repo = home.add_repo("filters")
    text = pipeline("""
        [trigger]
        branches = ["main", "release/*"]
        tags = ["v*"]
        paths = ["src/**", "pyproject.toml"]
        """ + SIMPLE)

    def runs_of(push: Any) -> int:
        assert push.returncode == 0, push.stderr
        return len(push.run_ids)

    assert runs_of(home.push(repo, {".pipeline.toml": text, "src/a.py": "a"})) == 1  # a new branch
    assert runs_of(home.push(repo, {"docs/readme.md": "docs"})) == 0
    assert runs_of(home.push(repo, {"src/deep/b.py": "b"})) == 1
    assert runs_of(home.push(repo, {"pyproject.toml": "[project]"})) == 1
    assert runs_of(home.push(repo, {"srcx/c.py": "c"})) == 0
    assert runs_of(home.push(repo, {"src/d.py": "d"}, branch="feature")) == 0
    assert runs_of(home.push(repo, {"src/e.py": "e"}, branch="release/1.0")) == 1
    assert runs_of(home.push(repo, {"docs/f.md": "f"}, branch="release/1.0")) == 0
    assert runs_of(home.push_tag(repo, "v1.0")) == 1
    assert runs_of(home.push_tag(repo, "nightly")) == 0
    refs = [r["ref"] for r in reversed(home.runs())]
    assert refs == ["refs/heads/main"] * 3 + ["refs/heads/release/1.0", "refs/tags/v1.0"]


@pytest.mark.timeout(60)
def test_an_annotated_tag_runs_its_commit(home: Home, out: Path) -> None:
    repo = home.add_repo("tags")
    text = fill(r"""
        [trigger]
        tags = ["v*"]
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "a"
          run = '''
          printf '%s|%s|%s|%s' "$GITPIPE_TAG" "$GITPIPE_BRANCH" "$GITPIPE_SHA" "$(git rev-parse HEAD)" \
            > "@OUT@/$GITPIPE_RUN"
          '''
        """, OUT=out)
    branch_push = home.push(repo, {".pipeline.toml": text})
    tag_push = home.push_tag(repo, "v2.0", annotated=True)
    assert tag_push.sha == branch_push.sha
    assert f"queued for v2.0 @ {branch_push.sha[:7]}" in tag_push.stderr
    with home.daemon():
        run = home.wait_run(tag_push.run_ids[0])
    home.expect(run)
    assert run["sha"] == branch_push.sha and run["ref"] == "refs/tags/v2.0"
    sha = branch_push.sha
    assert (out / str(run["id"])).read_text() == f"v2.0||{sha}|{sha}"


# ---------------------------------------------------------------------------- retries, when, failure


@pytest.mark.timeout(90)
def test_retries_run_a_failed_action_again(home: Home, out: Path) -> None:
    repo = home.add_repo("flaky")
    text = fill(r"""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "flaky"
          retries = 1
          run = '''
          n=$(( $(cat "@OUT@/count" 2>/dev/null || echo 0) + 1 ))
          echo "$n" > "@OUT@/count"
          echo "$GITPIPE_ATTEMPT" >> "@OUT@/attempts"
          echo "attempt $GITPIPE_ATTEMPT here"
          [ "$n" -ge 2 ]
          '''
          [[stage.action]]
          name = "broken"
          retries = 2
          run = 'echo "broken $GITPIPE_ATTEMPT" >> "@OUT@/broken"; exit 7'
        """, OUT=out)
    with home.daemon():
        run = home.wait_run(home.push_run(repo, {".pipeline.toml": text}))
    flaky, broken = home.action(run, "flaky"), home.action(run, "broken")
    assert flaky["status"] == "succeeded" and flaky["attempts"] == 2 and flaky["exit_code"] == 0
    assert (out / "attempts").read_text() == "1\n2\n"
    assert broken["status"] == "failed" and broken["attempts"] == 3 and broken["exit_code"] == 7
    assert (out / "broken").read_text() == "broken 1\nbroken 2\nbroken 3\n"
    home.expect(run, "failed")
    logs = home.logs(run["id"], "flaky")
    assert "attempt 1 here" in logs and "attempt 2 here" in logs


def test_when_skips_actions_on_other_refs(home: Home, out: Path) -> None:
    repo = home.add_repo("when")
    text = fill("""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "always"
          run = 'touch "@OUT@/always-$GITPIPE_BRANCH"'
          [[stage.action]]
          name = "main-only"
          when = { branches = ["main"] }
          run = 'touch "@OUT@/main-only-$GITPIPE_BRANCH"'
          [[stage.action]]
          name = "tags-only"
          when = { tags = ["v*"] }
          run = 'touch "@OUT@/tags-only-$GITPIPE_BRANCH"'
        """, OUT=out)
    with home.daemon():
        dev = home.wait_run(home.push_run(repo, {".pipeline.toml": text}, branch="dev"))
        main = home.wait_run(home.push_run(repo, {"x": "x"}, branch="main"))
    assert dev["status"] == main["status"] == "succeeded"
    skipped = home.action(dev, "main-only")
    assert skipped["status"] == "skipped" and skipped["started_at"] is None and skipped["attempts"] == 0
    assert home.action(main, "main-only")["status"] == "succeeded"
    assert home.action(main, "tags-only")["status"] == "skipped"
    assert sorted(p.name for p in out.iterdir()) == ["always-dev", "always-main", "main-only-main"]


@pytest.mark.timeout(90)
def test_a_failed_action_fails_its_stage_and_run_and_lets_its_sibling_finish(home: Home, out: Path) -> None:
    repo = home.add_repo("failing")
    text = fill(r"""
        [[stage]]
        name = "first"
          [[stage.action]]
          name = "slow"
          run = 'touch "@OUT@/slow.started"; sleep 2; touch "@OUT@/slow.done"'
          [[stage.action]]
          name = "bad"
          run = '''
          for i in $(seq 400); do [ -e "@OUT@/slow.started" ] && break; sleep 0.05; done
          exit 3
          '''
          [[stage.action]]
          name = "after"
          run_order = 2
          run = 'touch "@OUT@/after"'
        [[stage]]
        name = "second"
          [[stage.action]]
          name = "later"
          run = 'touch "@OUT@/later"'
        """, OUT=out)
    with home.daemon():
        run = home.wait_run(home.push_run(repo, {".pipeline.toml": text}))
    home.expect(run, "failed")
    bad, slow = home.action(run, "bad"), home.action(run, "slow")
    assert bad["status"] == "failed" and bad["exit_code"] == 3
    # The sibling was running when "bad" failed, and was let finish, not killed.
    assert slow["status"] == "succeeded" and (out / "slow.done").exists()
    assert at(slow["finished_at"]) > at(bad["finished_at"])
    assert home.stage(run, "first")["status"] == "failed"
    for name in ("after", "later"):
        act = home.action(run, name)
        assert act["status"] == "skipped" and act["started_at"] is None and act["attempts"] == 0, act
        assert not (out / name).exists()
    assert home.stage(run, "second")["status"] == "skipped"


# ---------------------------------------------------------------------------- invalid pipelines

INVALID = """\
[[stage]]
name = "build"
  [[stage.action]]
  name = "a"
  shell = "echo hi"
  timeout = "ten minutes"
"""


def test_an_invalid_pipeline_fails_its_run_at_once_with_every_error(home: Home, tmp_path: Path) -> None:
    (tmp_path / ".pipeline.toml").write_text(INVALID)
    validate = home.gitpipe("validate", ".pipeline.toml", cwd=tmp_path)
    assert validate.returncode == 1
    problems = validate.stderr.strip().splitlines()
    assert any(p.startswith(".pipeline.toml:5:") for p in problems), problems
    assert any(p.startswith(".pipeline.toml:6:") for p in problems), problems
    repo = home.add_repo("broken")
    push = home.push(repo, {".pipeline.toml": INVALID})
    assert push.returncode == 0  # accepted: reject_invalid is off by default
    run_id = push.run_ids[0]
    assert f"remote: gitpipe: run #{run_id} for main @ {push.sha[:7]} failed" in push.stderr
    for problem in problems:
        assert f"remote: gitpipe:   {problem}" in push.stderr
    run = home.show(run_id)
    assert run["status"] == "failed" and run["started_at"] is None and run["finished_at"]
    for problem in problems:
        assert problem in run["error"]
    assert home.gitpipe("show", str(run_id)).returncode == 1
    with home.daemon():  # the daemon leaves it as it is
        assert home.wait_run(run_id)["stages"] == []


def test_reject_invalid_makes_the_pre_receive_hook_refuse_the_push(home: Home) -> None:
    home.configure("""
        [repos.strict]
        reject_invalid = true
        """)
    strict = home.add_repo("strict")
    lenient = home.add_repo("lenient")
    refused = home.push(strict, {".pipeline.toml": INVALID})
    assert refused.returncode != 0
    assert "remote: gitpipe: rejecting main: .pipeline.toml is invalid" in refused.stderr
    assert "remote: gitpipe:   .pipeline.toml:5:" in refused.stderr
    assert "pre-receive hook declined" in refused.stderr
    assert git(strict, "for-each-ref").stdout == ""
    assert home.runs() == []
    accepted = home.push(lenient, {".pipeline.toml": INVALID})
    assert accepted.returncode == 0 and len(accepted.run_ids) == 1
    fixed = home.push(strict, {".pipeline.toml": pipeline(SIMPLE)})
    assert fixed.returncode == 0 and len(fixed.run_ids) == 1, fixed.stderr


def test_with_the_daemon_up_pre_receive_knows_reject_invalid_without_grep_and_sees_each_edit(
        home: Home, tmp_path: Path) -> None:
    """The running daemon keeps pre-receive's answer from gitpipe.toml (gitpipe/rejectmark.py): a
    push starts no grep. An edit makes pushes grep until the daemon heard it and answered anew,
    and a gitpipe.toml put back with an older mtime (rsync -a) is heard too; a stopped daemon
    leaves no answer."""
    spy = tmp_path / "bin"
    spy.mkdir()
    calls = tmp_path / "grep.calls"
    (spy / "grep").write_text(f'#!/bin/sh\necho "$*" >>{calls}\nexec {shutil.which("grep")} "$@"\n')
    (spy / "grep").chmod(0o755)
    env = {**base_env(), "PATH": f"{spy}:{base_env()['PATH']}"}
    mark = home.home / "reject-invalid"
    config = home.home / "gitpipe.toml"
    lenient = config.read_text()
    strict = home.add_repo("strict")

    def grepped(push: Push) -> int:
        count = len(calls.read_text().splitlines()) if calls.exists() else 0
        calls.unlink(missing_ok=True)
        return count

    with home.daemon():
        assert mark.read_text().split()[0] == "false"
        accepted = home.push(strict, {".pipeline.toml": INVALID}, env=env)
        assert accepted.returncode == 0 and grepped(accepted) == 0, accepted.stderr

        home.configure("[repos.strict]\nreject_invalid = true\n")  # newer than the answer: grep...
        refused = home.push(strict, {".pipeline.toml": INVALID}, env=env)
        assert refused.returncode != 0 and grepped(refused) <= 1, refused.stderr  # ...until the daemon heard it
        assert "rejecting main: .pipeline.toml is invalid" in refused.stderr
        wait_for(lambda: mark.read_text().split()[0] == "true", what="the daemon keeps the new answer")
        valid = home.push(strict, {".pipeline.toml": pipeline(SIMPLE)}, env=env)
        assert valid.returncode == 0 and grepped(valid) == 0, valid.stderr
        refused = home.push(strict, {".pipeline.toml": INVALID}, env=env)
        assert refused.returncode != 0 and grepped(refused) == 0, refused.stderr

        before = config.stat().st_mtime_ns - 10**10
        config.write_text(lenient)  # put back as it was, with an mtime older than the answer
        os.utime(config, ns=(before, before))
        wait_for(lambda: mark.read_text().split()[0] == "false", what="the answer of the file put back")  # its ctime
        valid = home.push(strict, {".pipeline.toml": pipeline(SIMPLE)}, env=env)
        assert valid.returncode == 0 and grepped(valid) == 0, valid.stderr
        accepted = home.push(strict, {".pipeline.toml": INVALID}, env=env)
        assert accepted.returncode == 0 and grepped(accepted) == 0, accepted.stderr
    assert not mark.exists()
    accepted = home.push(strict, {".pipeline.toml": INVALID}, env=env)
    assert accepted.returncode == 0 and grepped(accepted) == 1, accepted.stderr


def test_with_the_daemon_up_a_stricter_gitpipe_toml_moved_in_with_an_older_mtime_refuses_the_next_push(
        home: Home) -> None:
    """A gitpipe.toml that sets reject_invalid = true, put in place with an mtime older than the
    daemon's answer (written beside it earlier, then `mv`, `rsync -a`, `cp -p`): the next push is
    refused as grep would have refused it, not let through on the answer of the file it replaced."""
    mark = home.home / "reject-invalid"
    config = home.home / "gitpipe.toml"
    strict = home.add_repo("strict")
    prepared = home.home / "gitpipe.toml.new"  # written now, moved in later: it keeps its mtime
    prepared.write_text(config.read_text() + "\n[repos.strict]\nreject_invalid = true\n")
    earlier = prepared.stat().st_mtime_ns - 10**10
    os.utime(prepared, ns=(earlier, earlier))
    with home.daemon():
        assert mark.read_text().split()[0] == "false"  # written at its start
        assert mark.stat().st_mtime_ns > earlier
        os.replace(prepared, config)
        wait_for(lambda: mark.exists() and mark.read_text().split()[0] == "true", timeout=5,
                 what="the answer of the file moved in")
        refused = home.push(strict, {".pipeline.toml": INVALID})
        assert refused.returncode != 0, refused.stderr
        assert "rejecting main: .pipeline.toml is invalid" in refused.stderr
    assert not mark.exists()


@pytest.mark.parametrize("link", ["symbolic", "hard"])
def test_a_gitpipe_toml_that_is_a_link_gets_no_kept_answer_and_each_push_reads_the_file_it_names(
        home: Home, tmp_path: Path, link: str) -> None:
    """The daemon's watch of the home cannot hear a file written through another name. Made a
    link while the daemon runs, gitpipe.toml loses its kept answer (pre-receive greps it), so a
    stricter file written there with an older mtime refuses the very next push."""
    mark = home.home / "reject-invalid"
    config = home.home / "gitpipe.toml"
    strict = home.add_repo("strict")
    elsewhere = tmp_path / "etc-gitpipe.toml"  # where a configuration tool keeps it
    elsewhere.write_text(config.read_text())
    with home.daemon():
        assert mark.read_text().split()[0] == "false"
        config.unlink()  # `rm`, then `ln`: the watch hears the link made (`ln -sf` renames one in)
        if link == "symbolic":
            config.symlink_to(elsewhere)
        else:
            os.link(elsewhere, config)
        wait_for(lambda: not mark.exists(), timeout=5, what="the answer gone once gitpipe.toml is a link")
        accepted = home.push(strict, {".pipeline.toml": INVALID})
        assert accepted.returncode == 0, accepted.stderr
        assert not mark.exists()  # the push's own look keeps none either
        text = elsewhere.read_text() + "\n[repos.strict]\nreject_invalid = true\n"
        earlier = elsewhere.stat().st_mtime_ns - 10**10
        if link == "symbolic":  # put in place there, as `mv` or `rsync -a` does
            prepared = tmp_path / "etc-gitpipe.toml.new"
            prepared.write_text(text)
            os.utime(prepared, ns=(earlier, earlier))
            os.replace(prepared, elsewhere)
        else:  # written through the other name, its mtime set back (`cp -p` onto it)
            elsewhere.write_text(text)
            os.utime(elsewhere, ns=(earlier, earlier))
        refused = home.push(strict, {".pipeline.toml": INVALID})
        assert refused.returncode != 0, refused.stderr
        assert "rejecting main: .pipeline.toml is invalid" in refused.stderr


def test_a_pipeline_nested_too_deeply_for_the_toml_parser_is_an_invalid_pipeline(home: Home) -> None:
    """tomllib recurses once per nested array or inline table: a pushed .pipeline.toml nested
    thousands deep raised RecursionError, not PipelineError. The intake failed to record the
    push ("runs not queued"), and the loop's read of the pushed head's cron lines a second
    later let it out of the loop: the daemon stopped, and again after each restart. It is an
    invalid pipeline: its run is recorded, failed, saying why, and the daemon goes on."""
    repo = home.add_repo("deep")
    deep = "a = " + "[" * 5000 + "]" * 5000 + "\n"
    with home.daemon() as daemon:
        pushed = home.push(repo, {".pipeline.toml": deep})
        assert pushed.returncode == 0, pushed.stderr
        assert "not queued" not in pushed.stderr and len(pushed.run_ids) == 1, pushed.stderr
        run = home.wait_run(pushed.run_ids[0])
        assert run["status"] == "failed" and "nested too deeply" in run["error"], run
        assert "RecursionError" not in daemon.log
        time.sleep(1.5)  # the loop reads the pushed head's cron lines 1 s after it (SCHEDULES_AFTER_PUSH)
        assert daemon.proc.poll() is None, daemon.log[-3000:]
        later = home.push(repo, {".pipeline.toml": pipeline(SIMPLE)})
        assert home.wait_run(later.run_ids[0])["status"] == "succeeded"


def test_a_pushed_tree_deeper_than_pythons_stack_builds(home: Home) -> None:
    """A tracked file 1,500 folders down (git takes it; Python recurses 1,000 deep at most): the
    reset's hand-over of the worktree recursed once per folder, and the run failed with "internal
    error: RecursionError". Its action runs now, sees the file, and the next push builds too."""
    repo = home.add_repo("deep")
    deep = "/".join(["d"] * 1500)
    clone = home.clone_of(repo)
    try:
        subprocess.run(["mkdir", "-p", deep], cwd=clone, check=True)  # pathlib's mkdir recurses per folder
        spec = '[[stage]]\nname = "s"\n  [[stage.action]]\n  name = "a"\n  run = "echo found $(find . -name f | wc -l)"\n'
        with home.daemon() as daemon:
            run = home.wait_run(home.push_run(repo, {".pipeline.toml": spec, f"{deep}/f": "x\n"}))
            assert run["status"] == "succeeded", (run, daemon.log[-3000:])
            assert "found 1" in home.logs(run["id"]), home.logs(run["id"])
            later = home.wait_run(home.push_run(repo, {"n": "2\n"}))
            assert later["status"] == "succeeded", (later, daemon.log[-3000:])
            assert "RecursionError" not in daemon.log
    finally:  # pytest's own removal of old temporary folders recurses: it must never meet this depth
        subprocess.run(["rm", "-rf", "--", str(clone), str(home.home / "work")], check=False)


def test_an_artifact_tree_deeper_than_the_walk_takes_fails_its_action_saying_so(home: Home) -> None:
    """An action whose outputs glob walks a tree 1,400 folders deep: os.walk recursed once per
    folder and the action failed with "internal error: RecursionError". It fails saying which
    glob went how deep and what to do, and the next run of the repo builds."""
    repo = home.add_repo("deeper")
    make = "mkdir -p out/$(printf 'd/%.0s' $(seq 1 1400)) && echo x > out/$(printf 'd/%.0s' $(seq 1 1400))f"
    spec = ('[[stage]]\nname = "b"\n  [[stage.action]]\n  name = "job"\n'
            f'  run = "{make}"\n  outputs = {{ tree = "out/**" }}\n')
    try:
        with home.daemon() as daemon:
            run = home.wait_run(home.push_run(repo, {".pipeline.toml": spec}))
            job = home.action(run, "job")
            assert job["status"] == "failed", job
            assert 'artifact "tree": glob "out/**" reached folders more than 256 deep' in job["message"], job
            assert "RecursionError" not in daemon.log and "internal error" not in job["message"]
            later = home.wait_run(home.push_run(repo, {".pipeline.toml": pipeline(SIMPLE)}))
            assert later["status"] == "succeeded", (later, daemon.log[-3000:])
    finally:  # pytest's own removal of old temporary folders recurses: it must never meet this depth
        subprocess.run(["rm", "-rf", "--", str(home.home / "work")], check=False)


def test_an_output_glob_walks_256_folders_deep_and_only_where_it_can_match(tmp_path: Path) -> None:
    """artifacts.match: a tree whose deepest folder is 256 down is taken whole by `out/**`, one
    folder deeper fails saying so; and a glob without `**` never walks below its own depth, so a
    tracked tree 300 deep beside `top.txt` does not fail `*.txt` (an outside review's find)."""
    from gitpipe.artifacts import match
    from gitpipe.cachefs import MAX_DEPTH
    from gitpipe.errors import ActionError

    assert MAX_DEPTH == 256
    (tmp_path / "top.txt").write_text("x\n")
    deepest = "out/" + "/".join(["d"] * (MAX_DEPTH - 1))
    subprocess.run(["mkdir", "-p", deepest, "/".join(["t"] * 300)], cwd=tmp_path, check=True)
    (tmp_path / deepest / "f").write_text("y\n")
    (tmp_path / "out" / "g.txt").write_text("z\n")
    assert match(tmp_path, "top", ("*.txt",)) == ["top.txt"]
    assert match(tmp_path, "out", ("out/g.txt", "*/*.txt")) == ["out/g.txt"]
    assert match(tmp_path, "tree", ("out/**",)) == sorted(["out/g.txt", f"{deepest}/f"])
    (tmp_path / deepest / "e").mkdir()
    with pytest.raises(ActionError, match=r'glob "out/" reached folders more than 256 deep'):
        match(tmp_path, "tree", ("out/",))


# ---------------------------------------------------------------------------- retry, logs, env, outputs


@pytest.mark.timeout(90)
def test_retry_starts_a_new_run_of_the_same_commit(home: Home, out: Path) -> None:
    repo = home.add_repo("again")
    text = fill("""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "needs-file"
          run = 'test -e "@OUT@/allow"'
        """, OUT=out)
    with home.daemon():
        first = home.wait_run(home.push_run(repo, {".pipeline.toml": text}))
        home.expect(first, "failed")
        (out / "allow").touch()
        proc = home.gitpipe("retry", str(first["id"]), check=True)
        new_id = int(proc.stdout.split("#")[1].split()[0])
        assert new_id != first["id"]
        second = home.wait_run(new_id)
    home.expect(second)
    assert second["trigger"] == "retry" and second["retry_of"] == first["id"]
    assert (second["sha"], second["ref"], second["repo"]) == (first["sha"], first["ref"], first["repo"])


def _reader(proc: subprocess.Popen[str]) -> queue.Queue[str | None]:
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _expect(lines: queue.Queue[str | None], wanted: str, timeout: float = 30) -> list[str]:
    seen = []
    while True:
        line = lines.get(timeout=timeout)
        assert line is not None, f"output ended before {wanted!r}; got {seen}"
        seen.append(line)
        if wanted in line:
            return seen


@pytest.mark.timeout(90)
def test_logs_follow_prints_lines_while_the_action_runs_and_exits_when_it_ends(home: Home, out: Path) -> None:
    repo = home.add_repo("follow")
    text = fill(r"""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "talk"
          timeout = "60s"
          run = '''
          echo first-line
          touch "@OUT@/started"
          while [ ! -e "@OUT@/go" ]; do sleep 0.05; done
          echo second-line
          '''
        """, OUT=out)
    follower = None
    try:
        with home.daemon():
            run_id = home.push_run(repo, {".pipeline.toml": text})
            wait_for(lambda: (out / "started").exists(), 30, what="the action to start")
            follower = subprocess.Popen([GITPIPE, "logs", str(run_id), "talk", "--follow", "--home",
                                         str(home.home)], env=base_env(), stdout=subprocess.PIPE, text=True)
            lines = _reader(follower)
            _expect(lines, "first-line")
            assert follower.poll() is None  # still following: the action cannot end before "go"
            (out / "go").touch()
            _expect(lines, "second-line")
            assert follower.wait(timeout=30) == 0
            run = home.wait_run(run_id)
        home.expect(run)
        plain = [line for line in home.logs(run_id).splitlines() if not line.startswith("==> ")]
        assert plain == ["first-line", "second-line"]
        stamped = [line for line in home.logs(run_id, "--timestamps").splitlines() if not line.startswith("==> ")]
        assert len(stamped) == 2 and all(STAMP.match(line.encode()) for line in stamped)
    finally:
        (out / "go").touch()
        if follower and follower.poll() is None:
            follower.kill()
            follower.wait()


@pytest.mark.timeout(60)
def test_actions_get_a_clean_environment_with_every_gitpipe_variable(home: Home, out: Path) -> None:
    repo = home.add_repo("envs")
    text = fill("""
        [pipeline]
        name = "env-check"
        [env]
        GLOBAL_SETTING = "g"
        [[stage]]
        name = "inspect"
          [[stage.action]]
          name = "dump"
          env = { LOCAL_SETTING = "l" }
          run = 'cp /proc/$$/environ "@OUT@/environ"'
        """, OUT=out)
    daemon_env = {"LEAKME": "1", "GITPIPE_LEAKME": "1", "PYTHONPATH": "/leak"}
    with home.daemon(env=daemon_env):
        push = home.push(repo, {".pipeline.toml": text})
        run = home.wait_run(push.run_ids[0])
    home.expect(run)
    env = environ_file(out / "environ")
    for leak in daemon_env:
        assert leak not in env
    allowed = {"PWD", "SHLVL", "_", "OLDPWD"}  # what bash itself sets
    allowed |= {"PATH", "HOME", "LANG", "TZ", "CI", "GLOBAL_SETTING", "LOCAL_SETTING", "GITPIPE_OUTPUT",
               "GITPIPE_ATTEMPT_TOKEN", *SPEC_VARS}
    assert set(env) - allowed == set()
    ours = base_env()
    assert {k: env[k] for k in ("LANG", "TZ")} == {k: ours[k] for k in ("LANG", "TZ")}
    # Never the daemon's PATH (its virtualenv) or HOME: the system's PATH, the attempt's own HOME.
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin" and env["HOME"] == "/home/build"
    assert {k: env[k] for k in SPEC_VARS} == {
        "GITPIPE_RUN": str(run["id"]), "GITPIPE_REPO": "envs", "GITPIPE_PIPELINE": "env-check",
        "GITPIPE_REF": "refs/heads/main", "GITPIPE_BRANCH": "main", "GITPIPE_TAG": "",
        "GITPIPE_SHA": push.sha, "GITPIPE_STAGE": "inspect", "GITPIPE_ACTION": "dump", "GITPIPE_ATTEMPT": "1",
    }
    assert env["CI"] == "true" and env["GLOBAL_SETTING"] == "g" and env["LOCAL_SETTING"] == "l"
    assert env["GITPIPE_OUTPUT"]


def test_output_values_reach_later_actions_and_show(home: Home, out: Path) -> None:
    repo = home.add_repo("values")
    text = fill(r"""
        [[stage]]
        name = "one"
          [[stage.action]]
          name = "make-it"
          run = '''
          echo "version=1.2.3" >> "$GITPIPE_OUTPUT"
          echo "build-id=b 42" >> "$GITPIPE_OUTPUT"
          '''
        [[stage]]
        name = "two"
          [[stage.action]]
          name = "use"
          run = 'printf "%s|%s" "$GITPIPE_OUT_MAKE_IT_VERSION" "$GITPIPE_OUT_MAKE_IT_BUILD_ID" > "@OUT@/got"'
        """, OUT=out)
    with home.daemon():
        run = home.wait_run(home.push_run(repo, {".pipeline.toml": text}))
    home.expect(run)
    assert (out / "got").read_text() == "1.2.3|b 42"
    values = {(o["action"], o["key"]): o["value"] for o in run["outputs"]}
    assert values == {("make-it", "version"): "1.2.3", ("make-it", "build-id"): "b 42"}
    shown = home.gitpipe("show", str(run["id"])).stdout
    assert "make-it.version = 1.2.3" in shown


def test_an_output_value_with_a_nul_byte_is_left_out_saying_why(home: Home, out: Path) -> None:
    """No environment variable can carry a NUL byte: the value is not kept (the action's log says
    so and how to write it), and the later actions run with the other values, as usual."""
    repo = home.add_repo("nul")
    text = fill(r"""
        [[stage]]
        name = "one"
          [[stage.action]]
          name = "make"
          run = '''printf 'bad=a\0b\ngood=yes\n' >> "$GITPIPE_OUTPUT"'''
        [[stage]]
        name = "two"
          [[stage.action]]
          name = "use"
          run = 'printf "%s|%s" "${GITPIPE_OUT_MAKE_BAD-unset}" "$GITPIPE_OUT_MAKE_GOOD" > "@OUT@/got"'
        """, OUT=out)
    with home.daemon():
        run = home.wait_run(home.push_run(repo, {".pipeline.toml": text}))
    home.expect(run)
    assert (out / "got").read_text() == "unset|yes"
    assert {(o["action"], o["key"]) for o in run["outputs"]} == {("make", "good")}
    assert "gitpipe: output bad is not kept: its value holds a NUL byte" in home.logs(run["id"])


def test_an_output_glob_matching_nothing_fails_naming_the_glob(home: Home) -> None:
    repo = home.add_repo("noglob")
    text = pipeline("""
        [[stage]]
        name = "build"
          [[stage.action]]
          name = "wheel"
          run = "mkdir -p dist"
          outputs = { wheel = "dist/*.whl" }
        [[stage]]
        name = "test"
          [[stage.action]]
          name = "unit"
          inputs = ["wheel"]
          run = "true"
        """)
    with home.daemon():
        run = home.wait_run(home.push_run(repo, {".pipeline.toml": text}))
    wheel = home.action(run, "wheel")
    assert run["status"] == "failed" and wheel["status"] == "failed"
    assert 'glob "dist/*.whl"' in wheel["message"]
    assert 'glob "dist/*.whl"' in home.logs(run["id"], "wheel")
    assert home.action(run, "unit")["status"] == "skipped"
    assert run["artifacts"] == []


def test_outputs_through_a_symlink_pointing_outside_the_worktree_fail(home: Home, out: Path) -> None:
    secret_dir = out / "secret"
    secret_dir.mkdir()
    (secret_dir / "secret.txt").write_text("TOPSECRET\n")
    repo = home.add_repo("links")
    text = fill("""
        [[stage]]
        name = "build"
          [[stage.action]]
          name = "file-link"
          run = 'ln -s "@SECRET@/secret.txt" leak.txt'
          outputs = { leak = "leak.txt" }
          [[stage.action]]
          name = "dir-link"
          run = 'ln -s "@SECRET@" linked'
          outputs = { leakdir = "linked/**" }
          [[stage.action]]
          name = "dir-itself"
          run = 'mkdir -p out && ln -s "@SECRET@" out/linked'
          outputs = { leakout = "out" }
        """, SECRET=secret_dir)
    with home.daemon():
        run = home.wait_run(home.push_run(repo, {".pipeline.toml": text}))
    home.expect(run, "failed")
    for name in ("file-link", "dir-link", "dir-itself"):
        act = home.action(run, name)
        assert act["status"] == "failed", act
        assert "outside the worktree" in act["message"], act
    assert run["artifacts"] == []
    for path in (home.home / "artifacts").rglob("*"):
        assert not path.is_file() or b"TOPSECRET" not in path.read_bytes(), path


# ---------------------------------------------------------------------------- hooks


def test_an_existing_post_receive_hook_is_kept_and_chained(home: Home, tmp_path: Path) -> None:
    path = tmp_path / "legacy.git"
    git(tmp_path, "init", "--quiet", "--bare", "-b", "main", str(path))
    legacy_post = '#!/bin/sh\necho "legacy post-receive saw: $(cat)"\n'
    legacy_pre = '#!/bin/sh\ncat >/dev/null\necho "legacy pre-receive ran"\n'
    for name, text in (("post-receive", legacy_post), ("pre-receive", legacy_pre)):
        (path / "hooks" / name).write_text(text)
        (path / "hooks" / name).chmod(0o755)
    home.gitpipe("repo", "add", str(path), check=True)
    home.gitpipe("repo", "add", str(path), check=True)  # again: must not chain our own hook
    assert (path / "hooks" / "post-receive.chained").read_text() == legacy_post
    assert (path / "hooks" / "pre-receive.chained").read_text() == legacy_pre
    push = home.push(path, {".pipeline.toml": pipeline(SIMPLE)})
    assert push.returncode == 0, push.stderr
    assert push.stderr.count("remote: legacy pre-receive ran") == 1
    assert push.stderr.count(f"remote: legacy post-receive saw: {'0' * 40} {push.sha} refs/heads/main") == 1
    assert len(push.run_ids) == 1
    with home.daemon():  # the daemon answers for gitpipe's hook (which then runs the chained one)
        up = home.push(path, {"a.txt": "a"})
        assert up.returncode == 0 and len(up.run_ids) == 1, up.stderr
        assert up.stderr.count(f"remote: legacy post-receive saw: {push.sha} {up.sha} refs/heads/main") == 1
        home.wait_run(up.run_ids[0])
    home.gitpipe("repo", "remove", "legacy", check=True)
    assert (path / "hooks" / "post-receive").read_text() == legacy_post
    again = home.push(path, {"b.txt": "b"})
    assert "legacy post-receive saw" in again.stderr and again.run_ids == []


def without_python_fallback(repo: Path) -> None:
    """Make the installed post-receive's Python fallback fail loudly: what the push prints can
    only come from the daemon's answer then."""
    hook = repo / "hooks" / "post-receive"
    text = hook.read_text()
    assert sys.executable in text
    hook.write_text(text.replace(sys.executable, "/nonexistent/python"))


def test_the_daemon_answers_the_push_in_the_hook_s_own_words(home: Home, tmp_path: Path) -> None:
    """With the daemon up the push is recorded and answered by it (no Python in the hook): the
    run named, an invalid pipeline's every error, a ref without a pipeline, an odd ref name."""
    (tmp_path / ".pipeline.toml").write_text(INVALID)
    problems = home.gitpipe("validate", ".pipeline.toml", cwd=tmp_path).stderr.strip().splitlines()
    repo = home.add_repo("answered")
    without_python_fallback(repo)
    odd = "feature/a\u00a0b\u2028c"  # a no-break space and a line separator: git takes both
    with home.daemon() as daemon:
        push = home.push(repo, {".pipeline.toml": pipeline(SIMPLE)})
        assert push.gitpipe_lines == [f"remote: gitpipe: run #{push.run_ids[0]} queued for main @ {push.sha[:7]}"]
        home.configure('site_url = "https://ci.example.com"\n')  # read at each push, as the Python hook does
        linked = home.push(repo, {"z": "z"})
        [linked_id] = linked.run_ids
        assert linked.gitpipe_lines == [f"remote: gitpipe: run #{linked_id} queued for main @ {linked.sha[:7]} "
                                        f"https://ci.example.com/answered/runs/{linked_id}.html"]
        invalid = home.push(repo, {".pipeline.toml": INVALID}, branch="broken")
        [failed] = invalid.run_ids
        assert f"remote: gitpipe: run #{failed} for broken @ {invalid.sha[:7]} failed" in invalid.stderr
        for problem in problems:
            assert f"remote: gitpipe:   {problem}" in invalid.stderr
        bare = home.push(repo, {".pipeline.toml": None, "x": "x"}, branch="bare")
        assert len(bare.gitpipe_lines) == 1 and "no .pipeline.toml in bare @" in bare.gitpipe_lines[0], bare.stderr
        named = home.push(repo, {".pipeline.toml": pipeline(SIMPLE)}, branch=odd)
        assert named.returncode == 0 and len(named.run_ids) == 1, named.stderr
        for run_id in (push.run_ids[0], linked_id, named.run_ids[0]):
            home.expect(home.wait_run(run_id))
        assert "python" not in daemon.log.lower()  # the fallback never ran (it would have failed)
    run = home.show(failed)
    assert run["status"] == "failed" and run["started_at"] is None
    assert run["commit"]["author"] == "Test Author <author@example.com>" and run["commit"]["message"]
    assert all(p in run["error"] for p in problems)
    assert home.show(named.run_ids[0])["ref"] == f"refs/heads/{odd}"
    assert sorted(r["id"] for r in home.runs()) == sorted([push.run_ids[0], linked_id, failed, named.run_ids[0]])
    assert list((home.home / "spool" / "pending").iterdir()) == []  # the daemon gave the room back


# The post-receive `gitpipe repo add` installed before the hook went through the daemon.
PYTHON_HOOK = """#!{python} -IS
# gitpipe post-receive hook, installed by `gitpipe repo add`. It only queues runs;
# the daemon runs them.
import sys
sys.path[:0] = {libdir!r}.split(':')
from gitpipe.hookmain import main
code = main("post-receive", home={home!r}, repo={repo!r})
sys.stdout.flush()
import os
os._exit(code)
"""


def test_a_repo_with_an_older_hook_keeps_working_and_repo_add_upgrades_it(home: Home) -> None:
    repo = home.add_repo("old")
    hook = repo / "hooks" / "post-receive"
    import site

    import gitpipe

    libdir = ":".join([str(Path(gitpipe.__file__).resolve().parent.parent), *site.getsitepackages()])
    hook.write_text(PYTHON_HOOK.format(python=sys.executable, libdir=libdir, home=str(home.home), repo="old"))
    with home.daemon() as daemon:
        wait_for(lambda: "hook of an older gitpipe" in daemon.log, 30, what="the daemon to name the older hook")
        assert "old;" in daemon.log.split("hook of an older gitpipe")[1].splitlines()[0]
        before = home.push(repo, {".pipeline.toml": pipeline(SIMPLE)})  # through the Python hook
        assert before.returncode == 0 and len(before.run_ids) == 1, before.stderr
        home.gitpipe("repo", "add", str(repo), check=True)  # the upgrade
        assert "intake.sock" in hook.read_text() and hook.read_text().startswith(f"#!{shutil.which('perl')} -t\n")
        assert not (repo / "hooks" / "post-receive.chained").exists()  # ours is replaced, not chained
        after = home.push(repo, {"a.txt": "a"})
        assert after.gitpipe_lines == [f"remote: gitpipe: run #{after.run_ids[0]} queued for main @ {after.sha[:7]}"]
        home.wait_runs([before.run_ids[0], after.run_ids[0]])
    assert sorted(r["id"] for r in home.runs()) == sorted([before.run_ids[0], after.run_ids[0]])


def test_the_perl_hook_loads_no_module_the_environment_names(home: Home, tmp_path: Path) -> None:
    """PERL5OPT and PERL5LIB in a pusher's environment (a local::lib in a profile, a module that
    is not there, one that would print): the hook runs with -t, which ignores both, and the
    daemon still answers the push (its Python fallback is broken here: only the daemon speaks)."""
    repo = home.add_repo("perlenv")
    without_python_fallback(repo)
    lib = tmp_path / "perl5"
    (lib / "Loud.pm").parent.mkdir()
    (lib / "Loud.pm").write_text('print "LOUD WAS LOADED\\n"; 1;\n')
    with home.daemon():
        sha = home.commit(repo, {".pipeline.toml": pipeline(SIMPLE)})
        for extra in ({"PERL5OPT": "-MNo::Such::Module"}, {"PERL5OPT": "-MLoud", "PERL5LIB": str(lib)}):
            proc = subprocess.run(["git", "push", "--force", str(repo), f"{sha}:refs/heads/{len(extra)}"],
                                  cwd=home.clone_of(repo), env={**home.env(), **extra}, capture_output=True,
                                  text=True, timeout=120, check=False)
            assert proc.returncode == 0, proc.stderr
            assert "LOUD" not in proc.stderr and "Can't locate" not in proc.stderr, proc.stderr
            [run_id] = RUN_ID.findall(proc.stderr)
            home.expect(home.wait_run(int(run_id)))


def test_without_perl_the_python_hook_records_every_push(home: Home, tmp_path: Path) -> None:
    """A host without perl when `gitpipe repo add` runs: post-receive is an sh hook that starts
    the Python hook, which records the push with the daemon up or down, and runs a chained hook."""
    bin_dir = tmp_path / "bin"  # git, and no perl
    bin_dir.mkdir()
    (bin_dir / "git").symlink_to(shutil.which("git"))
    path = tmp_path / "noperl.git"
    git(tmp_path, "init", "--quiet", "--bare", "-b", "main", str(path))
    chained = path / "hooks" / "post-receive"
    chained.write_text('#!/bin/sh\necho "chained saw: $(cat)"\n')
    chained.chmod(0o755)
    home.gitpipe("repo", "add", str(path), check=True, env=home.env({"PATH": str(bin_dir)}))
    hook = (path / "hooks" / "post-receive").read_text()
    assert hook.startswith("#!/bin/sh\n") and "perl" not in hook.split("\n", 1)[0], hook
    down = home.push(path, {".pipeline.toml": pipeline(SIMPLE)})
    assert down.returncode == 0 and len(down.run_ids) == 1, down.stderr
    assert f"remote: chained saw: {'0' * 40} {down.sha} refs/heads/main" in down.stderr
    with home.daemon():
        up = home.push(path, {"a.txt": "a"})
        assert up.returncode == 0 and len(up.run_ids) == 1, up.stderr
        assert f"remote: chained saw: {down.sha} {up.sha} refs/heads/main" in up.stderr
        home.wait_runs([down.run_ids[0], up.run_ids[0]])
    assert sorted(r["id"] for r in home.runs()) == sorted([down.run_ids[0], up.run_ids[0]])
    assert all(r["status"] == "succeeded" for r in home.runs())


def test_a_push_is_refused_when_the_perl_of_its_hook_is_gone(home: Home, tmp_path: Path) -> None:
    """perl removed after `gitpipe repo add`: post-receive could not run, so pre-receive refuses
    the push (git keeps nothing) and says how to fix it; `repo add` again, without perl, installs
    the sh hook, and the push goes through."""
    repo = home.add_repo("perlgone")
    gone = str(tmp_path / "perl")  # where perl was: a copy, then removed
    shutil.copy(shutil.which("perl"), gone)
    for name in ("pre-receive", "post-receive"):
        hook = repo / "hooks" / name
        hook.write_text(hook.read_text().replace(shutil.which("perl"), gone))
    first = home.push(repo, {".pipeline.toml": pipeline(SIMPLE)})
    assert first.returncode == 0 and len(first.run_ids) == 1, first.stderr  # through the copy
    os.unlink(gone)
    refused = home.push(repo, {"a.txt": "a"})
    assert refused.returncode != 0 and refused.run_ids == []
    assert f"remote: gitpipe: push refused: {gone}, which runs this repo's post-receive hook, is gone" in refused.stderr
    assert f"run `gitpipe repo add {repo}`" in refused.stderr
    assert git(repo, "rev-parse", "refs/heads/main").stdout.strip() == first.sha  # git kept nothing
    assert list((home.home / "spool" / "pending").iterdir()) == []
    bin_dir = tmp_path / "bin"  # the host as it is now: git, and no perl
    bin_dir.mkdir()
    (bin_dir / "git").symlink_to(shutil.which("git"))
    home.gitpipe("repo", "add", str(repo), check=True, env=home.env({"PATH": str(bin_dir)}))
    again = home.push(repo, {"a.txt": "a"})
    assert again.returncode == 0 and len(again.run_ids) == 1, again.stderr
    assert sorted(r["id"] for r in home.runs()) == sorted([first.run_ids[0], again.run_ids[0]])


def test_the_daemon_runs_git_gc_auto_after_a_push_not_the_push(home: Home, tmp_path: Path) -> None:
    """`repo add` turns receive.autogc off (receive-pack's `git gc --auto` made every push wait
    for it); the daemon runs it a moment after each push it takes. `repo remove` turns it back;
    a value set by hand is left as it is."""
    repo = home.add_repo("gc")

    def config(path: Path, key: str) -> str | None:
        got = git(path, "config", "--local", "--get", key, check=False)
        return got.stdout.strip() if got.returncode == 0 else None

    def packs() -> int:
        return len(list((repo / "objects" / "pack").glob("*.pack")))

    assert config(repo, "receive.autogc") == "false" and config(repo, "gitpipe.autogc") == "daemon"
    # each push's objects kept as a pack; more than one pack is work for `git gc --auto`
    for key, value in (("receive.unpackLimit", "1"), ("gc.autoPackLimit", "1"), ("gc.autoDetach", "false")):
        git(repo, "config", key, value)
    home.push(repo, {".pipeline.toml": pipeline(SIMPLE)})
    home.push(repo, {"a.txt": "a"})
    assert packs() == 2  # the daemon is down, and the push itself collects nothing
    with home.daemon():
        up = home.push(repo, {"b.txt": "b"})
        assert up.returncode == 0 and len(up.run_ids) == 1, up.stderr
        wait_for(lambda: packs() == 1, 60, what="the daemon's `git gc --auto` to pack the repo's packs into one")
        home.wait_runs([r["id"] for r in home.runs()])
    home.gitpipe("repo", "remove", "gc", check=True)
    assert config(repo, "receive.autogc") is None and config(repo, "gitpipe.autogc") is None
    mine = tmp_path / "mine.git"
    git(tmp_path, "init", "--quiet", "--bare", "-b", "main", str(mine))
    git(mine, "config", "receive.autogc", "true")
    home.gitpipe("repo", "add", str(mine), check=True)
    assert config(mine, "receive.autogc") == "true" and config(mine, "gitpipe.autogc") is None
    home.gitpipe("repo", "remove", "mine", check=True)
    assert config(mine, "receive.autogc") == "true"


def test_a_git_gc_that_fails_in_the_daemon_is_said_with_how_to_fix_it(home: Home) -> None:
    """Pushes no longer collect the repo themselves: a `git gc --auto` of the daemon's that fails
    (here a bad gc setting; a repo the daemon's user cannot write does the same) is logged with
    the repo and what to do, rather than leaving its loose objects to grow unseen."""
    repo = home.add_repo("badgc")
    git(repo, "config", "gc.auto", "lots")  # not a number: `git gc --auto` exits 128 at once
    with home.daemon() as daemon:
        push = home.push(repo, {".pipeline.toml": pipeline(SIMPLE)})
        assert push.returncode == 0 and len(push.run_ids) == 1, push.stderr
        line = wait_for(lambda: next((x for x in daemon.log.splitlines() if "git gc --auto` failed" in x), None),
                        30, what="the daemon to say its gc failed")
        home.wait_runs(push.run_ids)
    assert str(repo) in line and "gc.auto" in line and "receive.autogc true" in line, line


def test_a_rejecting_pre_receive_hook_still_rejects(home: Home, tmp_path: Path) -> None:
    path = tmp_path / "guarded.git"
    git(tmp_path, "init", "--quiet", "--bare", "-b", "main", str(path))
    (path / "hooks" / "pre-receive").write_text("#!/bin/sh\necho 'no pushes today'\nexit 1\n")
    (path / "hooks" / "pre-receive").chmod(0o755)
    home.gitpipe("repo", "add", str(path), check=True)
    push = home.push(path, {".pipeline.toml": pipeline(SIMPLE)})
    assert push.returncode != 0
    assert "remote: no pushes today" in push.stderr
    assert push.run_ids == [] and home.runs() == []
    assert list((home.home / "spool" / "pending").iterdir()) == []  # gitpipe's hook gave its room back


# ---------------------------------------------------------------------------- JSON shapes


def _check_run_shape(run: dict[str, Any]) -> None:
    assert RUN_KEYS <= set(run), RUN_KEYS - set(run)
    assert isinstance(run["id"], int) and isinstance(run["repo"], str) and isinstance(run["pipeline"], str)
    assert run["ref"].startswith("refs/") and len(run["sha"]) == 40
    assert ISO_UTC.match(run["created_at"])
    for key in ("started_at", "finished_at"):
        assert run[key] is None or ISO_UTC.match(run[key]), (key, run[key])
    assert run["error"] is None or isinstance(run["error"], str)


def test_json_of_runs_and_show_has_the_documented_shape(home: Home) -> None:
    repo = home.add_repo("shapes")
    text = pipeline("""
        [pipeline]
        name = "shaped"
        [[stage]]
        name = "build"
          [[stage.action]]
          name = "make"
          run = "mkdir -p dist && printf 'artifact' > dist/a.bin"
          outputs = { bin = "dist/a.bin" }
          [[stage.action]]
          name = "never"
          when = { tags = ["v*"] }
          run = "true"
        [[stage]]
        name = "test"
          [[stage.action]]
          name = "check"
          inputs = ["bin"]
          run = "test -s dist/a.bin"
        """)
    run_id = home.push_run(repo, {".pipeline.toml": text})
    queued = home.runs()
    assert isinstance(queued, list) and len(queued) == 1
    _check_run_shape(queued[0])
    assert queued[0]["status"] == "queued" and queued[0]["trigger"] == "push"
    assert queued[0]["started_at"] is None and queued[0]["finished_at"] is None and queued[0]["error"] is None
    with home.daemon():
        run = home.wait_run(run_id)
        second = home.wait_run(home.push_run(repo, {"x": "x"}))
    _check_run_shape(run)
    assert (run["id"], run["repo"], run["pipeline"], run["status"]) == (run_id, "shapes", "shaped", "succeeded")
    assert isinstance(run["stages"], list) and [s["name"] for s in run["stages"]] == ["build", "test"]
    for stage in run["stages"]:
        assert STAGE_KEYS <= set(stage) and isinstance(stage["actions"], list)
        for act in stage["actions"]:
            assert ACTION_KEYS <= set(act), ACTION_KEYS - set(act)
            assert isinstance(act["attempts"], int)
            for key in ("started_at", "finished_at"):
                assert act[key] is None or ISO_UTC.match(act[key])
    never = home.action(run, "never")
    assert never["status"] == "skipped" and never["started_at"] is None and never["exit_code"] is None
    make = home.action(run, "make")
    assert make["type"] == "run" and make["exit_code"] == 0 and make["attempts"] == 1
    assert at(run["started_at"]) <= at(make["started_at"]) <= at(make["finished_at"]) <= at(run["finished_at"])
    [art] = run["artifacts"]
    assert ARTIFACT_KEYS <= set(art)
    assert (art["name"], art["action"], art["size"]) == ("bin", "make", 8)
    assert art["sha256"] == hashlib.sha256(b"artifact").hexdigest()
    listed = home.runs()
    assert [r["id"] for r in listed] == [second["id"], run_id]  # newest first
    for r in listed:
        _check_run_shape(r)
    assert [r["id"] for r in home.runs("shapes", "--limit", "1")] == [second["id"]]


# ---------------------------------------------------------------------------- big logs


@pytest.mark.timeout(150)
def test_a_50_mb_log_streams_to_disk_in_bounded_memory_with_a_timestamp_per_line(home: Home) -> None:
    repo = home.add_repo("chatty")
    lines = 500_000
    text = pipeline(f"""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "spam"
          run = '''awk 'BEGIN {{ l = sprintf("%100s", ""); gsub(/ /, "x", l); for (i = 0; i < {lines}; i++) print i, l }}' '''
        """)
    with home.daemon() as daemon:
        before = vm_kib(daemon.pid, "VmRSS")
        run = home.wait_run(home.push_run(repo, {".pipeline.toml": text}), timeout=120)
        peak = vm_kib(daemon.pid, "VmHWM")
    home.expect(run)
    assert peak - before < 60 * 1024, f"daemon RSS grew from {before} KiB to a peak of {peak} KiB"
    [log] = home.log_files(run["id"])
    assert log.stat().st_size > 50_000_000
    pad = b"x" * 100
    count = 0
    with open(log, "rb") as f:
        for n, line in enumerate(f):
            m = STAMP.match(line)
            assert m, (n, line[:80])
            assert line[m.end():] == b"%d %s\n" % (n, pad), (n, line[:80])
            count += 1
    assert count == lines


def test_a_second_daemon_on_the_same_home_is_refused(home: Home) -> None:
    with home.daemon():
        proc = home.gitpipe("serve")
    assert proc.returncode == 2
    assert "another gitpipe daemon" in proc.stderr and "Traceback" not in proc.stderr



# ---------------------------------------------------------------------------- bounds on job data


@pytest.mark.timeout(120)
def test_a_log_past_max_log_size_is_cut_with_a_line_that_says_so(home: Home) -> None:
    home.configure('max_log_size = "1M"\n')
    repo = home.add_repo("flood")
    text = fill("""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "flood"
          run = 'head -c 5000000 /dev/zero | tr "\\\\0" x | fold -w 100; echo after-the-flood > done.txt'
          outputs = { done = "done.txt" }
        """)
    with home.daemon():
        run = home.expect(home.wait_run(home.push_run(repo, {".pipeline.toml": text})))
    (log,) = home.log_files(run["id"])
    data = log.read_bytes()
    assert 1 << 20 < len(data) < (1 << 20) * 1.3, len(data)  # the kept megabyte of output, plus timestamps
    assert b"gitpipe: log cut at 1M (max_log_size in gitpipe.toml)" in data
    assert home.action(run, "flood")["status"] == "succeeded"  # cut, not failed: the script went on


@pytest.mark.timeout(120)
def test_outputs_past_max_artifact_size_fail_naming_it_and_leave_nothing(home: Home) -> None:
    repo = home.add_repo("bomb")
    text = fill("""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "sparse"
          run = 'mkdir o && truncate -s 3G o/big && echo small > o/small'
          outputs = { o = "o/**" }
        """)
    with home.daemon():
        run = home.expect(home.wait_run(home.push_run(repo, {".pipeline.toml": text})), "failed")
    message = home.action(run, "sparse")["message"]
    assert "more than 2G (max_artifact_size in gitpipe.toml)" in message, message
    assert run["artifacts"] == []
    stored = home.home / "artifacts" / str(run["id"])
    assert not stored.exists() or not any(p.is_file() for p in stored.rglob("*"))


def test_a_file_name_with_a_newline_keeps_the_manifest_checkable(home: Home) -> None:
    repo = home.add_repo("names")
    text = fill("""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "odd"
          run = 'mkdir o && printf one > "o/a$(printf "\\\\n")b" && printf two > "o/back\\\\slash" && printf 3 > o/plain'
          outputs = { o = "o/**" }
        """)
    with home.daemon():
        run = home.expect(home.wait_run(home.push_run(repo, {".pipeline.toml": text})))
    folder = home.home / "artifacts" / str(run["id"])
    manifest = folder / "o.MANIFEST.sha256"
    check = subprocess.run(["sha256sum", "-c", str(manifest)], cwd=folder / "o", capture_output=True, text=True,
                           check=False)
    assert check.returncode == 0, (manifest.read_text(), check.stdout, check.stderr)
    assert len(manifest.read_text().splitlines()) == 3


STAGES = r"""
[[stage]]
name = "build"
  [[stage.action]]
  name = "compile"
  run = "true"
[[stage]]
name = "check"
  [[stage.action]]
  name = "lint"
  run = "true"
  [[stage.action]]
  name = "flaky"
  run = "exit 2"
  allow_failure = true
[[stage]]
name = "warn"
  [[stage.action]]
  name = "soft"
  run = "exit 3"
  allow_failure = true
[[stage]]
name = "ship"
  [[stage.action]]
  name = "last"
  run = "true"
"""


def stored_events(home: Home, run_id: int) -> list[tuple[str, str]]:
    """(subject, status) of a run's events, in the order they were recorded; an action's subject
    is action:<its name>."""
    conn = sqlite3.connect(f"file:{home.home / 'gitpipe.db'}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT subject, status FROM events WHERE run_id = ? ORDER BY id", (run_id,)).fetchall()
        names = dict(conn.execute("SELECT 'action:' || id, 'action:' || name FROM actions WHERE run_id = ?",
                                  (run_id,)).fetchall())
    finally:
        conn.close()
    return [(names.get(s, s), st) for s, st in rows]


def test_stage_changes_are_recorded_in_order_with_the_actions_ends(home: Home) -> None:
    """A stage's last action ends it, and starts the next, in one transaction: the events and
    the stages' statuses are those of one step after the other, whatever their group's shape."""
    repo = home.add_repo("stages")
    with home.daemon():
        good = home.push_run(repo, {".pipeline.toml": STAGES})
        home.expect(home.wait_run(good))
        bad = home.push_run(repo, {".pipeline.toml": STAGES.replace('run = "exit 3"\n  allow_failure = true',
                                                                    'run = "exit 3"')})
        failed = home.expect(home.wait_run(bad), "failed")
    run = home.show(good)
    assert [(s["name"], s["status"]) for s in run["stages"]] == [
        ("build", "succeeded"), ("check", "succeeded"), ("warn", "succeeded"), ("ship", "succeeded")]
    for before, after in itertools.pairwise(run["stages"]):
        assert at(before["finished_at"]) <= at(after["started_at"])
    events = [e for e in stored_events(home, good) if e[0] != "run"]
    assert events[:5] == [("stage:0", "running"), ("action:compile", "running"), ("action:compile", "succeeded"),
                          ("stage:0", "succeeded"), ("stage:1", "running")]
    assert events[-9:] == [("stage:1", "succeeded"), ("stage:2", "running"), ("action:soft", "running"),
                           ("action:soft", "failed"), ("stage:2", "succeeded"), ("stage:3", "running"),
                           ("action:last", "running"), ("action:last", "succeeded"), ("stage:3", "succeeded")]
    # A stage's last action failing (not allowed): the stage fails, the next is skipped.
    assert [(s["name"], s["status"]) for s in failed["stages"]] == [
        ("build", "succeeded"), ("check", "succeeded"), ("warn", "failed"), ("ship", "skipped")]
    assert home.action(failed, "last")["status"] == "skipped"
