"""Operating gitpipe: schedules, superseded runs, pause/resume, keep_runs, gitpipe exec."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from gitpipe import settings
from gitpipe.schedules import CronTrigger
from gitpipe.store import Store
from tests.helpers import GITPIPE, Home, base_env, git, one_line_error, pipeline, wait_for, working_copy
from tests.webhook import webhook_server  # noqa: F401  (the `webhook` fixture)


def test_a_missed_schedule_slot_runs_once_not_once_per_slot(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.init()
    repo = home.add_repo("shop")
    text = pipeline("""
        [trigger]
        schedule = ["0 3 * * *"]
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "nightly"
          run = "true"
        """)
    home.push(repo, {".pipeline.toml": text})
    store = Store(settings.load(home.home))
    try:
        start = time.time()
        sched = CronTrigger(store)
        before = {r.id for r in store.runs(limit=100)}
        fired, due = sched.fire_due(start)
        assert fired == [] and due is not None and due > start  # a new schedule starts from now
        fired, _ = sched.fire_due(start + 3 * 86400)  # the daemon was down for three nights
        assert len(fired) == 1
        assert store.run(fired[0]).trigger == "schedule" and store.run(fired[0]).ref == "refs/heads/main"
        assert sched.fire_due(start + 3 * 86400 + 60)[0] == []
        assert {r.id for r in store.runs(limit=100)} - before == set(fired)
    finally:
        store.close()


def test_a_schedule_entry_can_name_the_branch_it_runs(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.init()
    repo = home.add_repo("shop")
    text = pipeline("""
        [trigger]
        schedule = ["0 3 * * *", { cron = "0 4 * * *", branch = "release" }, { cron = "0 5 * * *", branch = "gone" }]
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "nightly"
          run = "true"
        """)
    main = home.push(repo, {".pipeline.toml": text}).sha
    release = home.push(repo, {".pipeline.toml": text.replace("nightly", "nightly-release")}, branch="release").sha
    store = Store(settings.load(home.home))
    try:
        start = time.time()
        sched = CronTrigger(store)
        assert sched.fire_due(start)[0] == []
        fired, _ = sched.fire_due(start + 86400)
        runs = {store.run(i).ref: store.run(i) for i in fired}
        assert set(runs) == {"refs/heads/main", "refs/heads/release"}  # "gone" has no branch: skipped
        assert runs["refs/heads/main"].sha == main and runs["refs/heads/release"].sha == release
        assert "nightly-release" in (store.pipeline_text(runs["refs/heads/release"].id) or "")
        assert all(r.trigger == "schedule" for r in runs.values())
    finally:
        store.close()


def test_superseded_cancel_cancels_the_older_run_but_lets_a_deploy_finish(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.init()
    repo = home.add_repo("shop")
    target = tmp_path / "target"
    text = pipeline(f"""
        [trigger]
        superseded = "cancel"
        [[stage]]
        name = "deploy"
          [[stage.action]]
          name = "ship"
          type = "deploy"
          environment = "staging"
          target = "file://{target}"
          before_switch = "touch {tmp_path}/deploying; sleep 2"
        [[stage]]
        name = "after"
          [[stage.action]]
          name = "later"
          run = "sleep 30"
        """)
    with home.daemon():
        first = home.push_run(repo, {".pipeline.toml": text})
        wait_for(lambda: (tmp_path / "deploying").exists(), 30, what="the first deploy")
        second = home.push_run(repo, {"README": "newer"})
        old = home.wait_run(first)
        new = home.wait_run(second, timeout=90)
    assert old["status"] == "cancelled" and old["cancel_reason"] == f"superseded by #{second}"
    assert home.action(old, "ship")["status"] == "succeeded"  # the deploy in flight finished first
    assert home.action(old, "later")["status"] in ("cancelled", "skipped")
    assert new["status"] == "succeeded"


@pytest.mark.parametrize("mode", ["queue", "parallel"])
def test_superseded_queue_runs_a_branch_one_at_a_time_and_parallel_does_not_wait(tmp_path: Path, mode: str) -> None:
    home = Home(tmp_path)
    home.init()
    out = tmp_path / "out"
    home.share(out)
    repo = home.add_repo("shop")
    journal = out / "journal"
    gate = f"while [ ! -e {out}/go-$GITPIPE_RUN ]; do sleep 0.1; done"
    text = pipeline(f"""
        [trigger]
        superseded = "{mode}"
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "a"
          run = "echo start $GITPIPE_RUN >> {journal}; {gate}; echo end $GITPIPE_RUN >> {journal}"
        """)

    def said(line: str) -> bool:
        return journal.exists() and line in journal.read_text().splitlines()

    with home.daemon() as daemon:
        first = home.push_run(repo, {".pipeline.toml": text})
        wait_for(lambda: said(f"start {first}"), 30, what="the first run")
        second = home.push_run(repo, {"README": "newer"})
        if mode == "queue":
            wait_for(lambda: f"run #{second}: waits for #{first}" in daemon.log, 30, what="the queue")
            assert home.status(second) == "queued"
            (out / f"go-{first}").touch()
            (out / f"go-{second}").touch()
        else:  # the second starts and ends while the first still runs
            wait_for(lambda: said(f"start {second}"), 30, what="the second run")
            (out / f"go-{second}").touch()
            home.wait_run(second)
            (out / f"go-{first}").touch()
        home.wait_runs([first, second])
    expected = {"queue": [f"start {first}", f"end {first}", f"start {second}", f"end {second}"],
                "parallel": [f"start {first}", f"start {second}", f"end {second}", f"end {first}"]}
    assert journal.read_text().splitlines() == expected[mode]
    assert home.show(first)["status"] == home.show(second)["status"] == "succeeded"


def test_pause_keeps_pushes_queued_and_resume_runs_them(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.init()
    repo = home.add_repo("shop")
    text = pipeline('[[stage]]\nname = "s"\n  [[stage.action]]\n  name = "a"\n  run = "true"\n')
    with home.daemon():
        assert "paused" in home.gitpipe("pause", check=True).stdout
        run_id = home.push_run(repo, {".pipeline.toml": text})
        time.sleep(1.5)
        assert home.status(run_id) == "queued"
        assert "paused by" in home.gitpipe("runs", check=True).stdout
        assert "resumed" in home.gitpipe("resume", check=True).stdout
        home.expect(home.wait_run(run_id))


def test_keep_runs_prunes_old_files_but_keeps_summaries(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.init("keep_runs = 2\n")
    repo = home.add_repo("shop")
    text = pipeline("""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "a"
          run = "mkdir -p out && head -c 100000 /dev/urandom > out/blob && echo hello"
          outputs = { blob = "out/blob" }
        """)
    with home.daemon() as daemon:
        ids = [home.expect(home.wait_run(home.push_run(repo, {".pipeline.toml": text, "n": str(i)})))["id"]
               for i in range(4)]
        wait_for(lambda: not (home.home / "logs" / str(ids[1])).exists(), 30, what="pruning")
        log = daemon.log
    assert "freed" in log and "keep_runs=2" in log
    for run_id in ids[:2]:
        assert not (home.home / "logs" / str(run_id)).exists()
        assert not (home.home / "artifacts" / str(run_id)).exists()
        assert home.show(run_id)["status"] == "succeeded"  # the summary row stays
    for run_id in ids[2:]:
        assert (home.home / "artifacts" / str(run_id)).exists()
    assert len(home.runs()) == 4


def test_exec_runs_the_working_copy_and_records_nothing(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.init()
    work = tmp_path / "work"
    work.mkdir()
    git(work, "init", "-q")
    (work / ".pipeline.toml").write_text(pipeline("""
        [[stage]]
        name = "build"
          [[stage.action]]
          name = "make"
          run = "cat message.txt; mkdir -p dist && cp message.txt dist/"
          outputs = { dist = "dist/*" }
        [[stage]]
        name = "test"
          [[stage.action]]
          name = "check"
          inputs = ["dist"]
          run = "grep -q uncommitted dist/message.txt && echo checked"
          [[stage.action]]
          name = "ship"
          type = "deploy"
          environment = "prod"
          target = "file:///nonexistent/never"
        """))
    git(work, "add", "-A")
    git(work, "commit", "-qm", "init")
    (work / "message.txt").write_text("uncommitted change\n")  # untracked, not committed
    proc = subprocess.run([GITPIPE, "exec"], cwd=work, env=base_env(GITPIPE_HOME=str(home.home)),
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[build/make] uncommitted change" in proc.stdout
    assert "[test/check] checked" in proc.stdout
    assert "deploy actions run in exec only when named" in proc.stdout
    assert home.runs() == []
    assert git(work, "status", "--porcelain").stdout.strip() == "?? message.txt"  # the user's index untouched
    only = subprocess.run([GITPIPE, "exec", "--action", "check"], cwd=work, env=base_env(), capture_output=True,
                          text=True, timeout=120, check=False)
    assert only.returncode == 0 and "[build/make]" in only.stdout  # its input's producer ran too


def test_exec_notifies_nobody_unless_asked(tmp_path: Path, webhook: tuple[str, list[dict]]) -> None:
    url, received = webhook
    work = tmp_path / "work"
    work.mkdir()
    git(work, "init", "-q")
    (work / ".pipeline.toml").write_text(pipeline(f"""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "a"
          run = "true"
        [[notify]]
        on = ["succeeded", "failed"]
        webhook = "{url}"
        """))
    env = base_env(GITPIPE_HOME=str(tmp_path / "nohome"))
    quiet = subprocess.run([GITPIPE, "exec"], cwd=work, env=env, capture_output=True, text=True, timeout=120,
                           check=False)
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    assert received == []  # the notifier is closed (its queue drained) before exec returns
    loud = subprocess.run([GITPIPE, "exec", "--notify"], cwd=work, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert loud.returncode == 0, loud.stdout + loud.stderr
    assert [e["event"] for e in received] == ["succeeded"]


@pytest.mark.parametrize(("args", "known"), [(["--stage", "nope"], "(stages: s, t)"),
                                             (["--action", "nope"], "(actions: s/a, s/b, t/c)")])
def test_exec_names_an_unknown_stage_or_action_and_those_that_exist(tmp_path: Path, args: list[str],
                                                                    known: str) -> None:
    work = working_copy(tmp_path / "w", '[[stage]]\nname = "s"\n[[stage.action]]\nname = "a"\nrun = "true"\n'
                                        '[[stage.action]]\nname = "b"\nrun = "true"\n'
                                        '[[stage]]\nname = "t"\n[[stage.action]]\nname = "c"\nrun = "true"\n')
    proc = subprocess.run([GITPIPE, "exec", *args], cwd=work, env=base_env(), capture_output=True, text=True,
                          timeout=60, check=False)
    one_line_error(proc, '"nope"', known)


def test_exec_confines_the_working_copys_pipeline_as_the_host_would(tmp_path: Path) -> None:
    """`gitpipe exec` runs pushed-to-be code: the same sandbox, the host's [sandbox] settings."""
    home = Home(tmp_path)
    home.init()
    home.configure('[sandbox]\nnetwork = false\n')
    private = tmp_path / "private.txt"
    private.write_text("not for scripts\n")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    work = tmp_path / "work"
    work.mkdir()
    git(work, "init", "-q")
    (work / ".pipeline.toml").write_text(pipeline(f"""
        [[stage]]
        name = "s"
          [[stage.action]]
          name = "peek"
          run = '''
            cat {private} && echo LEAKED || echo "private: not there"
            echo "home=$HOME path=$PATH pwd=$PWD"
            (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null && echo NET || echo "network: off"
            id -u
          '''
        """))
    git(work, "add", "-A")
    git(work, "commit", "-qm", "init")
    proc = subprocess.run([GITPIPE, "exec"], cwd=work, env=base_env(GITPIPE_HOME=str(home.home)),
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "LEAKED" not in proc.stdout and "private: not there" in proc.stdout
    assert "home=/home/build path=/usr/local/bin:/usr/bin:/bin pwd=/build/work" in proc.stdout
    assert "network: off" in proc.stdout and "NET" not in proc.stdout.replace("network", "")
    with pytest.raises(BlockingIOError):  # nobody reached the host's loopback listener
        listener.accept()
    listener.close()
    if os.geteuid() == 0:
        assert "[s/peek] 0\n" not in proc.stdout
