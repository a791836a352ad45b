"""Durability (SPEC section 6): real daemons stopped with SIGTERM and killed with SIGKILL.

Each claim is proven with real processes: queued runs are never lost, interrupted
attempts start again from the first unfinished stage, leftover processes of a killed
daemon are ended, deadlines are absolute, the database stays intact.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from gitpipe.executor import processes_of
from tests.helpers import GITPIPE, Home, base_env, marker_processes, pipeline, wait_for

COUNTER = """
  [[stage.action]]
  name = "{name}"
  run = "echo x >> {dir}/{name}.count; {body}"
"""


def start(home: Home, log_name: str = "daemon.log") -> subprocess.Popen[bytes]:
    """`gitpipe serve` as a subprocess we may kill -9 (Home.daemon insists on a clean exit)."""
    with open(home.root / log_name, "ab") as log:
        return subprocess.Popen([GITPIPE, "serve", "--home", str(home.home)], env=base_env(),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)


def counts(directory: Path, name: str) -> int:
    path = directory / f"{name}.count"
    return len(path.read_text().split()) if path.exists() else 0


def action_row(home: Home, run_id: int, name: str) -> dict:
    return home.action(home.show(run_id), name)


def attempts(home: Home, run_id: int, name: str) -> list[tuple]:
    conn = sqlite3.connect(home.home / "gitpipe.db")
    try:
        return conn.execute(
            "SELECT t.number, t.status, t.deadline FROM attempts t JOIN actions a ON a.id = t.action_id "
            "WHERE a.run_id = ? AND a.name = ? ORDER BY t.number", (run_id, name)).fetchall()
    finally:
        conn.close()


@pytest.mark.timeout(180)
def test_sigterm_lets_actions_finish_in_grace_then_interrupts_and_resumes(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.init('stop_grace = "1s"\n')
    repo = home.add_repo("shop")
    marks = tmp_path / "marks"
    home.share(marks)
    text = pipeline(f"""
        [[stage]]
        name = "one"
        {COUNTER.format(name="first", dir=marks, body="true")}
        [[stage]]
        name = "two"
        {COUNTER.format(name="slow", dir=marks,
                        body=f"if [ $(wc -l < {marks}/slow.count) -eq 1 ]; then sleep 60; fi")}
        """)
    daemon = start(home)
    run_id = home.push_run(repo, {".pipeline.toml": text})
    wait_for(lambda: counts(marks, "slow") == 1, 30, what="the slow action to start")
    queued_id = home.push_run(repo, {"README": "queued while stopping"})
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=40) == 0
    assert action_row(home, run_id, "slow")["status"] == "interrupted"
    assert [a[1] for a in attempts(home, run_id, "slow")] == ["interrupted"]
    assert home.status(queued_id) in ("queued", "running")
    with home.daemon():
        run = home.expect(home.wait_run(run_id))
        home.expect(home.wait_run(queued_id))
    assert counts(marks, "first") == 2  # once per run: not run again when run 1 went on
    assert [a[1] for a in attempts(home, run_id, "slow")] == ["interrupted", "succeeded"]
    assert home.action(run, "slow")["attempts"] == 2


@pytest.mark.timeout(180)
def test_kill_9_leftovers_are_killed_and_deadlines_stay_absolute(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.init()
    repo = home.add_repo("shop")
    marker = f"orphan-{uuid.uuid4().hex}"
    text = pipeline(f"""
        [[stage]]
        name = "one"
          [[stage.action]]
          name = "orphans"
          timeout = "6s"
          run = "bash -c 'exec -a {marker} sleep 300' & setsid bash -c 'exec -a {marker} sleep 300' & sleep 300"
        """)
    daemon = start(home)
    run_id = home.push_run(repo, {".pipeline.toml": text})
    wait_for(lambda: len(marker_processes(marker)) >= 2, 30, what="the action's children")
    daemon.kill()
    daemon.wait()
    # The sandbox ends with the daemon (bwrap --die-with-parent; its cgroup is swept at the
    # next start): the restarted daemon must still find the attempt and carry its deadline.
    with home.daemon():
        wait_for(lambda: not marker_processes(marker), 20, what="leftover processes to be killed")
        run = home.wait_run(run_id)
    assert home.action(run, "orphans")["status"] == "timed-out"
    rows = attempts(home, run_id, "orphans")
    assert [r[1] for r in rows] == ["interrupted", "timed-out"]
    assert rows[0][2] == rows[1][2], "the restarted attempt must keep the first attempt's deadline"
    assert not marker_processes(marker)


def four_stages(marks: Path) -> str:
    stages = []
    for i in range(4):
        stages.append(f'[[stage]]\nname = "s{i}"\n' + COUNTER.format(
            name=f"a{i}", dir=marks, body=f"sleep 0.{random.randint(1, 4)}; echo $GITPIPE_RUN >> {marks}/done{i}"))
    return "\n".join(stages)


def no_orphans_and_intact(home: Home, run_ids: list[int]) -> None:
    conn = sqlite3.connect(home.home / "gitpipe.db")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finished = conn.execute(
            "SELECT run_id, COUNT(*) FROM events WHERE subject = 'run' AND status IN "
            "('succeeded', 'failed', 'cancelled') GROUP BY run_id").fetchall()
        assert all(n == 1 for _, n in finished), f"a run finished twice: {finished}"
        running = conn.execute("SELECT COUNT(*) FROM attempts WHERE status = 'running'").fetchone()[0]
        assert running == 0
    finally:
        conn.close()
    conn = sqlite3.connect(home.home / "gitpipe.db")
    try:  # this home's attempts only: another gitpipe may run beside the test
        tokens = [t for (t,) in conn.execute("SELECT token FROM attempts WHERE token != 'deploy'")]
    finally:
        conn.close()
    alive = [t for t in tokens if processes_of(-1, t)]
    assert not alive, f"processes of actions still alive: {alive}"
    locked = []
    for lock in (home.home / "work").rglob("*.lock"):
        fd = os.open(lock, os.O_RDWR)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            locked.append(lock)
        finally:
            os.close(fd)
    assert not locked, f"worktrees still held: {locked}"
    assert len(home.runs()) == len(run_ids)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_crash_timing_loop(tmp_path: Path) -> None:
    """30 times: a 4-stage run and kill -9 of the daemon at a random moment; then all finish once."""
    home = Home(tmp_path)
    home.init()
    repo = home.add_repo("shop")
    marks = tmp_path / "marks"
    home.share(marks)
    rng = random.Random(7)
    run_ids = []
    for i in range(30):
        daemon = start(home)
        run_ids.append(home.push_run(repo, {".pipeline.toml": four_stages(marks), "n": str(i)}))
        time.sleep(rng.uniform(0.0, 1.5))
        daemon.kill()
        daemon.wait()
    with home.daemon():
        home.wait_runs(run_ids, timeout=300)
    for run_id in run_ids:
        home.expect(home.show(run_id))
    for stage in range(4):  # every run's last attempt of every stage succeeded exactly once
        done = (marks / f"done{stage}").read_text().split()
        assert sorted(set(map(int, done))) == sorted(run_ids)
    no_orphans_and_intact(home, run_ids)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_200_pushes_to_10_repos_while_the_daemon_is_killed_5_times(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.init()
    repos = [home.add_repo(f"r{i}") for i in range(10)]
    text = pipeline("""
        [[stage]]
        name = "build"
          [[stage.action]]
          name = "a"
          run = "echo $GITPIPE_RUN"
        """)
    pushed: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()

    def pusher(repo: Path) -> None:
        for n in range(20):
            push = home.push(repo, {".pipeline.toml": text, "n": str(n)})
            if push.returncode != 0 or len(push.run_ids) != 1:
                errors.append(push.stderr)
            with lock:
                pushed.extend(push.run_ids)

    threads = [threading.Thread(target=pusher, args=(r,)) for r in repos]
    daemon = start(home)
    for t in threads:
        t.start()
    for _ in range(5):
        time.sleep(1.5)
        daemon.kill()
        daemon.wait()
        daemon = start(home)
    for t in threads:
        t.join()
    daemon.send_signal(signal.SIGTERM)
    daemon.wait(timeout=60)
    assert not errors, errors[:3]
    assert len(pushed) == 200 and len(set(pushed)) == 200
    with home.daemon():
        home.wait_runs(pushed, timeout=400)
    runs = home.runs()
    assert len(runs) == 200
    assert all(r["status"] == "succeeded" for r in runs), [r for r in runs if r["status"] != "succeeded"][:3]
    no_orphans_and_intact(home, pushed)


@pytest.mark.timeout(180)
def test_a_stage_that_failed_during_the_grace_period_stops_the_run_after_a_restart(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.init('stop_grace = "20s"\n')
    repo = home.add_repo("shop")
    marks = tmp_path / "marks"
    home.share(marks)
    text = pipeline(f"""
        [[stage]]
        name = "test"
          [[stage.action]]
          name = "flaky"
          retries = 2
          run = "touch {marks}/started; sleep 2; exit 1"
        [[stage]]
        name = "ship"
          [[stage.action]]
          name = "ship"
          run = "touch {marks}/shipped"
        """)
    daemon = start(home)
    run_id = home.push_run(repo, {".pipeline.toml": text})
    wait_for(lambda: (marks / "started").exists(), 30, what="the action to start")
    daemon.send_signal(signal.SIGTERM)  # the action fails inside the grace period
    assert daemon.wait(timeout=60) == 0
    with home.daemon():
        run = home.wait_run(run_id)
    assert run["status"] == "failed"
    assert not (marks / "shipped").exists(), "a stage after a failed one ran after the restart"
    assert home.stage(run, "test")["status"] == "failed"
    assert home.action(run, "ship")["status"] == "skipped"
    assert home.action(run, "flaky")["attempts"] == 3  # the retry the stop cut short happened after it


@pytest.mark.timeout(120)
def test_stopping_does_not_wait_for_a_pending_approval(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.init('stop_grace = "60s"\n')
    repo = home.add_repo("shop")
    text = pipeline('[[stage]]\nname = "gate"\n  [[stage.action]]\n  name = "ok"\n  type = "approval"\n')
    daemon = start(home)
    run_id = home.push_run(repo, {".pipeline.toml": text})
    home.wait_status(run_id, "waiting")
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0  # well inside the 60 s grace: nothing was running
    assert home.status(run_id) == "waiting"


QUICK = pipeline("""
    [[stage]]
    name = "s"
      [[stage.action]]
      name = "a"
      run = "echo once"
    """)


@pytest.mark.timeout(180)
def test_a_daemon_killed_between_recording_a_push_and_answering_it_makes_one_run(tmp_path: Path) -> None:
    """kill -9 at the worst moment of the hook's path: the daemon's synced commit of the push is
    on disk, its answer never left. The hook's fallback finds the push recorded under its key."""
    home = Home(tmp_path)
    home.init()
    repo = home.add_repo("shop")
    daemon = start(home)
    wait_for(lambda: (home.home / "intake.sock").exists(), 60, what="the daemon to listen for pushes")
    # strace turns the daemon's first sendto (its answer to the hook) into a SIGKILL: exactly
    # between the commit and the answer, every time
    tracer = subprocess.Popen(["strace", "-f", "-p", str(daemon.pid), "-o", os.devnull, "-e", "trace=sendto",
                               "-e", "inject=sendto:signal=SIGKILL"], stderr=subprocess.PIPE, text=True)
    try:
        assert "attached" in (tracer.stderr.readline() if tracer.stderr else ""), "strace did not attach"
        push = home.push(repo, {".pipeline.toml": QUICK})
        assert daemon.wait(timeout=60) == -signal.SIGKILL
    finally:
        tracer.kill()
        tracer.wait()
        daemon.kill()
    assert push.returncode == 0, push.stderr
    [run_id] = push.run_ids
    assert f"remote: gitpipe: run #{run_id} queued for main @ {push.sha[:7]}" in push.stderr
    assert "the daemon took the push but did not answer" in push.stderr
    assert [r["id"] for r in home.runs()] == [run_id]
    with home.daemon():
        home.expect(home.wait_run(run_id))
    assert [r["id"] for r in home.runs()] == [run_id]
    assert list((home.home / "spool" / "pending").iterdir()) == []


@pytest.mark.timeout(180)
def test_a_spooled_push_is_queued_once_when_the_daemon_died_before_removing_its_entry(tmp_path: Path) -> None:
    home = Home(tmp_path)
    home.init()
    repo = home.add_repo("shop")
    db = home.home / "gitpipe.db"
    aside = home.root / "db-aside"
    aside.mkdir()
    for f in home.home.glob("gitpipe.db*"):
        f.rename(aside / f.name)
    db.mkdir()  # sqlite cannot open a directory: the hook keeps the push in spool/
    push = home.push(repo, {".pipeline.toml": QUICK})
    assert push.returncode == 0 and "the daemon will queue it" in push.stderr, push.stderr
    [entry] = (home.home / "spool").glob("*.json")
    kept = entry.read_bytes()
    db.rmdir()
    for f in aside.iterdir():
        f.rename(home.home / f.name)
    assert home.gitpipe("serve", "--burst", timeout=120).returncode == 0
    [run] = home.runs()
    assert run["sha"] == push.sha and run["status"] == "succeeded" and not entry.exists()
    # What a daemon killed after recording the entry's runs but before removing it leaves: the entry
    entry.write_bytes(kept)
    assert home.gitpipe("serve", "--burst", timeout=120).returncode == 0
    assert [r["id"] for r in home.runs()] == [run["id"]]
    assert not entry.exists()
