"""Worker hosts through Celery on Redis (SPEC section 13), end to end: a private redis-server,
real `gitpipe worker` processes, real pushes to a real `gitpipe serve`."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from cluster import cluster
from helpers import Home, pipeline, wait_for


def test_without_a_cluster_table_the_daemon_never_imports_celery_or_redis(home: Home, tmp_path: Path) -> None:
    repo = home.add_repo("plain")
    run_id = home.push_run(repo, {".pipeline.toml": pipeline("""
        [[stage]]
        name = "s"
        [[stage.action]]
        name = "a"
        run = "true"
    """)})
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "gitpipe", "serve", "--burst",
                           "--home", str(home.home)], capture_output=True, text=True, timeout=120,
                          env=home.env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert "gitpipe" in imported  # the importtime listing is there at all
    assert not imported & {"celery", "kombu", "redis", "cryptography"}
    home.expect(home.show(run_id))


def test_labels_route_actions_artifacts_cross_hosts_and_logs_stream_back(home: Home, tmp_path: Path) -> None:
    workers = {"w-plain": "linux", "w-arm": "linux,arm64", "w-gpu": "linux,gpu"}
    with cluster(home, tmp_path, workers) as c, home.daemon():
        live = c.live()
        assert sorted(live) == sorted(workers)
        assert live["w-arm"]["labels"] == ["arm64", "linux"] and live["w-arm"]["slots"] == 1
        repo = home.add_repo("app")
        run_id = home.push_run(repo, {".pipeline.toml": pipeline("""
            [[stage]]
            name = "build"
            [[stage.action]]
            name = "make"
            runs_on = ["arm64", "linux"]
            run = "mkdir -p dist && uname -m > dist/arch && echo built-on-worker && echo 'v=7' >> $GITPIPE_OUTPUT"
            outputs = { dist = "dist/" }
            [[stage.action]]
            name = "here"
            run = "echo on the build host"
            [[stage]]
            name = "test"
            [[stage.action]]
            name = "gpu"
            runs_on = ["gpu"]
            inputs = ["dist"]
            run = "cat dist/arch && echo got=$GITPIPE_OUT_MAKE_V"
        """)})
        run = home.expect(home.wait_run(run_id, timeout=180))
        make_log = home.logs(run_id, "make")
        assert "running on worker w-arm" in make_log and "built-on-worker" in make_log
        assert "running on worker w-gpu" in home.logs(run_id, "gpu")
        assert "got=7" in home.logs(run_id, "gpu")
        assert "running on worker" not in home.logs(run_id, "here")  # local = true: stays on the coordinator
        arts = {a["name"]: a for a in run["artifacts"]}
        assert arts["dist"]["action"] == "make" and arts["dist"]["size"] > 0
        assert "checked" in make_log


def test_an_action_no_worker_can_take_waits_with_its_reason_then_times_out(home: Home, tmp_path: Path) -> None:
    with cluster(home, tmp_path, {"w1": "linux"}) as c, home.daemon():
        assert "w1" in c.live()
        repo = home.add_repo("app")
        run_id = home.push_run(repo, {".pipeline.toml": pipeline("""
            [[stage]]
            name = "s"
            [[stage.action]]
            name = "sparc"
            runs_on = ["sparc"]
            timeout = "6s"
            run = "true"
        """)})
        waiting = wait_for(lambda: "waiting for a worker" in (home.action(home.show(run_id), "sparc")["message"] or "")
                           and home.show(run_id), timeout=60, what="the waiting reason")
        action = home.action(waiting, "sparc")
        assert action["status"] == "running"
        assert action["message"] == "waiting for a worker with labels sparc"
        assert "waiting for a worker with labels sparc" in home.gitpipe("show", str(run_id)).stdout
        assert "(waiting for a worker with labels sparc)" in home.gitpipe("runs").stdout
        wait_for(lambda: any("waiting for a worker with labels sparc" in p.read_text()
                             for p in (home.home / "site").rglob("*.html")), timeout=30, what="the run page")
        run = home.expect(home.wait_run(run_id, timeout=60), "failed")
        action = home.action(run, "sparc")
        assert action["status"] == "timed-out"
        assert action["message"] == "timed out waiting for a worker with labels sparc"
        assert "waiting for a worker with labels sparc" in home.logs(run_id)


def test_a_secret_never_rests_in_redis_and_reaches_only_its_protected_run(home: Home, tmp_path: Path) -> None:
    secret = "s3cr3t-value-for-the-cluster-test"
    (home.home / "secrets.toml").write_text(f'[app]\nTOKEN = "{secret}"\n')
    (home.home / "secrets.toml").chmod(0o600)
    with cluster(home, tmp_path, {"w1": "linux"}, local=False) as c, home.daemon():
        repo = home.add_repo("app")
        seen: list[bytes] = []
        stop = threading.Event()

        def scan() -> None:
            while not stop.is_set():
                seen.append(c.redis.everything())
                stop.wait(0.2)

        scanner = threading.Thread(target=scan)
        scanner.start()
        try:
            run_id = home.push_run(repo, {".pipeline.toml": pipeline("""
                [[stage]]
                name = "s"
                [[stage.action]]
                name = "use"
                secrets = ["TOKEN"]
                run = "echo token=$TOKEN; sleep 2; echo \\"$TOKEN\\" | base64; echo k=$TOKEN >> $GITPIPE_OUTPUT"
            """)})
            run = home.expect(home.wait_run(run_id, timeout=120))
        finally:
            stop.set()
            scanner.join()
        log = home.logs(run_id, "use")
        assert "running on worker w1" in log and "token=***" in log and secret not in log
        assert len(seen) > 3 and any(b"gitpipe:log:" in s for s in seen)  # the scans saw the attempt
        assert not any(secret.encode() in s for s in seen)
        assert run["status"] == "succeeded"
        # another branch asks for it: refused before anything is sent
        other = home.push_run(repo, {"x": "1"}, branch="feature")
        run = home.expect(home.wait_run(other, timeout=60), "failed")
        assert "not protected" in (home.action(run, "use")["message"] or "")


def remote(name: str, script: str) -> str:
    """A pipeline of one action, for a worker with the label linux."""
    return pipeline(f"""
        [[stage]]
        name = "s"
        [[stage.action]]
        name = "{name}"
        runs_on = ["linux"]
        run = "{script}"
    """)


def _attempts(home: Home, action_id: int) -> list[tuple[int, str]]:
    import sqlite3

    conn = sqlite3.connect(f"file:{home.home / 'gitpipe.db'}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT number, status FROM attempts WHERE action_id = ? ORDER BY number",
                            (action_id,)).fetchall()
    finally:
        conn.close()


def _action_id(home: Home, run_id: int, name: str) -> int:
    import sqlite3

    conn = sqlite3.connect(f"file:{home.home / 'gitpipe.db'}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT id FROM actions WHERE run_id = ? AND name = ?", (run_id, name)).fetchone()[0]
    finally:
        conn.close()


def _busy(c) -> str:  # type: ignore[no-untyped-def]
    """The name of the one worker running an attempt now."""
    busy = [name for name, w in c.live().items() if w["running"]]
    return busy[0] if len(busy) == 1 else ""


SLOW_FIRST = remote("slow", "echo $GITPIPE_ATTEMPT >> {out}/starts; echo started; if [ $GITPIPE_ATTEMPT = 1 ]; then sleep 600; fi; echo finished")


def test_a_worker_killed_mid_action_interrupts_it_and_another_worker_runs_it_once(
        home: Home, tmp_path: Path, out: Path) -> None:
    with cluster(home, tmp_path, {"w1": "linux", "w2": "linux"}, share=out) as c, home.daemon():
        repo = home.add_repo("app")
        run_id = home.push_run(repo, {".pipeline.toml": SLOW_FIRST.format(out=out)})
        wait_for(lambda: (out / "starts").exists(), timeout=120, what="the first attempt to start")
        victim = wait_for(lambda: _busy(c), timeout=30, what="the busy worker")
        wait_for(lambda: "started" in home.logs(run_id, "slow"), timeout=30, what="its output, live")
        c.kill(victim)
        run = home.expect(home.wait_run(run_id, timeout=180))
        log = home.logs(run_id, "slow")
        assert f"worker {victim} lost" in log and "finished" in log
        survivor = ({"w1", "w2"} - {victim}).pop()
        assert f"running on worker {survivor}" in log
        assert _attempts(home, _action_id(home, run_id, "slow")) == [(1, "interrupted"), (2, "succeeded")]
        assert (out / "starts").read_text().split() == ["1", "2"]
        assert home.action(run, "slow")["attempts"] == 2


def test_a_result_without_the_attempts_key_is_not_recorded(home: Home, tmp_path: Path, out: Path) -> None:
    import redis as redis_py

    with cluster(home, tmp_path, {"w1": "linux"}, share=out) as c, home.daemon():
        repo = home.add_repo("app")
        run_id = home.push_run(repo, {".pipeline.toml": remote("fails", f"touch {out}/go; while [ ! -e {out}/forged ]; do sleep 0.1; done; exit 3")})
        wait_for(lambda: (out / "go").exists(), timeout=120, what="the attempt to start")
        r = redis_py.Redis(host="127.0.0.1", port=c.redis.port, password=c.redis.password)
        stream = next(k for k in r.scan_iter("gitpipe:log:*"))
        forged = '{"status": "succeeded", "exit_code": 0, "message": null, "outputs": [], "values": {}}'
        r.xadd(stream, {"k": "end", "b": forged, "mac": "00" * 32})
        r.xadd(stream, {"k": "claim", "w": "mallory"})
        wait_for(lambda: "without this attempt's signature" in home.logs(run_id, "fails"), timeout=30,
                 what="the forged result to be refused")
        (out / "forged").touch()
        run = home.expect(home.wait_run(run_id, timeout=60), "failed")
        assert home.action(run, "fails")["exit_code"] == 3
        assert _attempts(home, _action_id(home, run_id, "fails")) == [(1, "failed")]
        r.close()


def test_a_coordinator_killed_mid_run_finds_its_remote_attempts_again(home: Home, tmp_path: Path, out: Path) -> None:
    import signal as signal_mod

    with cluster(home, tmp_path, {"w1": "linux"}, share=out):
        repo = home.add_repo("app")
        run_id = home.push_run(repo, {".pipeline.toml": remote("long", f"echo run >> {out}/starts; echo before; while [ ! -e {out}/go ]; do sleep 0.1; done; echo after")})
        first = subprocess.Popen(home.argv("serve"), env=home.env(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, cwd=home.root)
        try:
            wait_for(lambda: (out / "starts").exists(), timeout=120, what="the attempt to start")
            wait_for(lambda: "before" in home.logs(run_id, "long"), timeout=30, what="its first line")
        finally:
            first.send_signal(signal_mod.SIGKILL)
            first.wait()
        (out / "go").touch()  # it ends while no coordinator listens
        with home.daemon():
            run = home.expect(home.wait_run(run_id, timeout=120))
        log = home.logs(run_id, "long")
        assert "taken up again" in log and "after" in log and log.count("before") == 1
        assert (out / "starts").read_text().split() == ["run"]  # never run twice
        assert _attempts(home, _action_id(home, run_id, "long")) == [(1, "succeeded")]
        assert home.action(run, "long")["attempts"] == 1


def test_cluster_configuration_errors_name_the_place(home: Home) -> None:
    home.configure('[cluster]\nbroker = "http://10.0.0.5:6379"\n')
    proc = home.gitpipe("workers")
    assert proc.returncode == 2
    assert "gitpipe.toml:" in proc.stderr and '"broker" must be a redis:// or rediss:// URL' in proc.stderr


def test_runs_on_is_validated_and_a_worker_refuses_bad_options(home: Home, tmp_path: Path) -> None:
    bad = tmp_path / "p.toml"
    bad.write_text(pipeline("""
        [pipeline]
        runs_on = "linux"
        [[stage]]
        name = "s"
        [[stage.action]]
        name = "a"
        runs_on = ["arm 64"]
        run = "true"
    """))
    proc = home.gitpipe("validate", str(bad))
    assert proc.returncode == 1
    assert '"runs_on" must be an array of strings' in proc.stderr
    assert 'label "arm 64" may hold only letters' in proc.stderr
    proc = home.gitpipe("worker", "--broker", "redis://127.0.0.1:1/0", "--slots", "0")
    assert proc.returncode == 2 and "--slots must be at least 1" in proc.stderr
    proc = home.gitpipe("worker", "--broker", "redis://:pw@127.0.0.1:1/0", "--dir", str(tmp_path / "w"))
    assert proc.returncode == 2 and "no build host key given" in proc.stderr
    assert "gitpipe workers --coordinator-key" in proc.stderr
    proc = home.gitpipe("worker", "--broker", "redis://:pw@127.0.0.1:1/0", "--coordinator-key", "bm90LWEta2V5",
                        "--dir", str(tmp_path / "w"))
    assert proc.returncode == 2 and "is not the build host's public key" in proc.stderr
    key = home.gitpipe("workers", "--coordinator-key", check=True).stdout.strip()
    assert (home.home / "coordinator.key").stat().st_mode & 0o777 == 0o600
    assert home.gitpipe("workers", "--coordinator-key", check=True).stdout.strip() == key  # made once, kept
    proc = home.gitpipe("worker", "--broker", "redis://:pw@127.0.0.1:1/0", "--dir", str(tmp_path / "w"),
                        env=home.env({"GITPIPE_COORDINATOR_KEY": key}))
    assert proc.returncode == 2 and "cannot be reached" in proc.stderr and "redis://***@127.0.0.1:1/0" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = home.gitpipe("workers")
    assert proc.returncode == 2 and "has no [cluster] table" in proc.stderr


def test_workers_lists_live_workers_and_drops_a_stopped_one(home: Home, tmp_path: Path) -> None:
    with cluster(home, tmp_path, {"w1": "linux,arm64", "w2": "gpu"}) as c:
        text = home.gitpipe("workers", check=True).stdout
        assert "w1" in text and "arm64,linux" in text and "w2" in text and "slots 1" in text
        live = c.live()
        assert live["w2"] == {**live["w2"], "labels": ["gpu"], "slots": 1, "running": 0, "attempts": []}
        c.stop_all()  # Celery's warm shutdown: the worker says goodbye
        assert "no live worker" in home.gitpipe("workers", check=True).stdout


def test_redis_stopped_mid_run_pushes_still_queue_local_actions_go_on_remote_ones_wait(
        home: Home, tmp_path: Path, out: Path) -> None:
    with cluster(home, tmp_path, {"w1": "linux"}, share=out) as c, home.daemon():
        repo = home.add_repo("app")
        text = pipeline(f"""
            [trigger]
            superseded = "parallel"   # the second run goes on beside the first, which waits for its worker
            [[stage]]
            name = "s"
            [[stage.action]]
            name = "remote"
            runs_on = ["linux"]
            run = "echo $GITPIPE_RUN >> {out}/remote; while [ ! -e {out}/go ]; do sleep 0.1; done; echo done"
            [[stage.action]]
            name = "here"
            run = "echo $GITPIPE_RUN >> {out}/here"
        """)
        first = home.push_run(repo, {".pipeline.toml": text})
        wait_for(lambda: (out / "remote").exists(), timeout=120, what="the remote attempt to start")
        c.redis.stop()
        second = home.push_run(repo, {"x": "1"})  # the hook never needs Redis
        wait_for(lambda: str(second) in (out / "here").read_text().split() if (out / "here").exists() else False,
                 timeout=60, what="the local action of the second run")
        wait_for(lambda: "waiting for the broker" in (home.action(home.show(second), "remote")["message"] or ""),
                 timeout=60, what="the broker's absence to be shown")
        (out / "go").touch()
        c.redis.start()
        for run_id in (first, second):
            run = home.expect(home.wait_run(run_id, timeout=180))
            assert home.action(run, "remote")["status"] == "succeeded"
        assert "waiting for the broker" in home.logs(second, "remote")
        assert (out / "remote").read_text().split() == [str(first), str(second)]  # each ran once


def test_a_daemon_stopped_and_started_again_takes_up_the_remote_attempt(home: Home, tmp_path: Path,
                                                                         out: Path) -> None:
    with cluster(home, tmp_path, {"w1": "linux"}, share=out):
        repo = home.add_repo("app")
        with home.daemon():
            run_id = home.push_run(repo, {".pipeline.toml": remote("long", f"echo run >> {out}/starts; while [ ! -e {out}/go ]; do sleep 0.1; done; echo after")})
            wait_for(lambda: (out / "starts").exists(), timeout=120, what="the attempt to start")
        assert home.status(run_id) == "running"
        with home.daemon():
            wait_for(lambda: "taken up again" in home.logs(run_id, "long"), timeout=60, what="the take-up")
            (out / "go").touch()
            run = home.expect(home.wait_run(run_id, timeout=120))
        assert (out / "starts").read_text().split() == ["run"]
        assert home.action(run, "long")["attempts"] == 1
        assert "goes on on worker w1" in home.logs(run_id, "long")


@pytest.mark.slow
def test_100_pushes_over_3_workers_with_2_kills_finish_100_runs_each_recorded_once(
        home: Home, tmp_path: Path, out: Path) -> None:
    import sqlite3

    with cluster(home, tmp_path, {"w1": "linux", "w2": "linux", "w3": "linux"}, share=out) as c, home.daemon():
        repo = home.add_repo("app")
        # Runs 30 and 60 hold their first attempt until their worker is killed under it.
        text = remote("work", f"echo $GITPIPE_RUN.$GITPIPE_ATTEMPT >> {out}/ran; "
                              f"if [ $GITPIPE_ATTEMPT = 1 ] && [ -e {out}/hold-$GITPIPE_RUN ]; then sleep 600; fi")
        run_ids: list[int] = []
        for kill_at in (30, 60):
            while len(run_ids) < kill_at:
                if len(run_ids) + 1 == kill_at:
                    (out / f"hold-{kill_at}").touch()
                files = {".pipeline.toml": text} if not run_ids else {}
                run_ids.append(home.push_run(repo, {**files, "n": str(len(run_ids))}))
            assert run_ids[-1] == kill_at
            action_id = wait_for(lambda k=kill_at: home.status(k) == "running" and _action_id(home, k, "work"),
                                 timeout=300, what=f"run {kill_at} to start")
            held = f"{action_id}.1."
            victim = wait_for(lambda h=held: next((n for n, w in c.live().items()
                                                   if any(a.startswith(h) for a in w["attempts"])), ""),
                              timeout=300, what=f"the worker holding run {kill_at}")
            c.kill(victim)
            c.start(victim)  # back with the same name and key; its old attempt is sent elsewhere
        while len(run_ids) < 100:
            run_ids.append(home.push_run(repo, {"n": str(len(run_ids))}))
        home.wait_runs(run_ids, timeout=900)
        runs = home.runs()
        assert len(runs) == 100 and all(r["status"] == "succeeded" for r in runs)
        conn = sqlite3.connect(f"file:{home.home / 'gitpipe.db'}?mode=ro", uri=True)
        rows = conn.execute("SELECT a.run_id, t.number, t.status FROM attempts t JOIN actions a "
                            "ON a.id = t.action_id").fetchall()
        conn.close()
        succeeded = [(run, n) for run, n, status in rows if status == "succeeded"]
        assert sorted(run for run, _ in succeeded) == sorted(run_ids)  # one success per run, never two
        assert {status for _, _, status in rows} <= {"succeeded", "interrupted"}
        interrupted = sorted(run for run, _, status in rows if status == "interrupted")
        assert {30, 60} <= set(interrupted)  # the kills hit attempts
        ran = (out / "ran").read_text().split()
        assert len(ran) == len(set(ran))  # no attempt ran twice
        assert {f"{run}.{n}" for run, n in succeeded} <= set(ran)


def test_logs_follow_shows_a_remote_action_live(home: Home, tmp_path: Path, out: Path) -> None:
    with cluster(home, tmp_path, {"w1": "linux"}, share=out), home.daemon():
        repo = home.add_repo("app")
        run_id = home.push_run(repo, {".pipeline.toml": remote("talk", f"echo first-line; while [ ! -e {out}/go ]; do sleep 0.1; done; echo last-line")})
        follow = subprocess.Popen(home.argv("logs", str(run_id), "talk", "--follow"), env=home.env(),
                                  stdout=subprocess.PIPE, text=True)
        assert follow.stdout is not None
        seen = []
        for line in follow.stdout:  # the first line arrives while the action still waits for "go"
            seen.append(line)
            if "first-line" in line:
                break
        assert home.status(run_id) == "running"
        (out / "go").touch()
        rest = follow.stdout.read()
        assert follow.wait(60) == 0
        assert "last-line" in rest and "running on worker w1" in "".join(seen)
        home.expect(home.wait_run(run_id))


def test_the_worker_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    import os
    import shutil

    from helpers import GITPIPE

    from gitpipe import resources

    unit = resources.folder("systemd") / "gitpipe-worker.service"
    text = unit.read_text()
    for line in ("ExecStart=/opt/gitpipe/bin/gitpipe worker", "EnvironmentFile=/etc/gitpipe/worker.env",
                 "KillSignal=SIGTERM", "Delegate=memory pids", "ProtectSystem=strict", "Restart=on-failure"):
        assert line in text, line
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        assert os.environ.get("CI") != "true", "systemd-analyze is missing"
        return
    copy = tmp_path / "gitpipe-worker.service"
    env = tmp_path / "worker.env"
    env.write_text("GITPIPE_BROKER=redis://127.0.0.1:6379/0\n")
    copy.write_text(text.replace("/opt/gitpipe/bin/gitpipe", GITPIPE).replace("/etc/gitpipe/worker.env", str(env)))
    proc = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "gitpipe-worker.service" not in proc.stderr, proc.stderr


def test_cancel_stops_a_remote_attempt_on_its_worker(home: Home, tmp_path: Path, out: Path) -> None:
    with cluster(home, tmp_path, {"w1": "linux"}, share=out) as c, home.daemon():
        repo = home.add_repo("app")
        run_id = home.push_run(repo, {".pipeline.toml": pipeline(f"""
            [[stage]]
            name = "s"
            [[stage.action]]
            name = "endless"
            runs_on = ["linux"]
            run = "trap 'echo got-term; exit 143' TERM; touch {out}/started; while true; do sleep 0.1 & wait $!; done"
        """)})
        wait_for(lambda: (out / "started").exists(), timeout=120, what="the attempt to start")
        home.gitpipe("cancel", str(run_id), "--reason", "enough", check=True)
        run = home.expect(home.wait_run(run_id, timeout=60), "cancelled")
        assert home.action(run, "endless")["status"] == "cancelled"
        assert "got-term" in home.logs(run_id, "endless")
        wait_for(lambda: c.live()["w1"]["running"] == 0, timeout=30, what="the worker to be free")


def test_a_worker_cut_off_mid_action_loses_it_to_another_and_its_late_result_is_ignored(
        home: Home, tmp_path: Path, out: Path) -> None:
    import os
    import signal as signal_mod

    with cluster(home, tmp_path, {"w1": "linux", "w2": "linux"}, share=out) as c, home.daemon():
        repo = home.add_repo("app")
        run_id = home.push_run(repo, {".pipeline.toml": remote("slow", f"echo $GITPIPE_ATTEMPT >> {out}/starts; while [ $GITPIPE_ATTEMPT = 1 ] && [ ! -e {out}/go ]; do sleep 0.1; done")})
        wait_for(lambda: (out / "starts").exists(), timeout=120, what="the first attempt to start")
        victim = wait_for(lambda: _busy(c), timeout=30, what="the busy worker")
        frozen = c.workers[victim].proc
        assert frozen is not None
        os.killpg(frozen.pid, signal_mod.SIGSTOP)  # no heartbeat, no result: as if its network went away
        try:
            run = home.expect(home.wait_run(run_id, timeout=180))
        finally:
            os.killpg(frozen.pid, signal_mod.SIGCONT)
        (out / "go").touch()  # attempt 1, if it still ran, would now end and report
        wait_for(lambda: victim in c.live() and c.live()[victim]["running"] == 0, timeout=60,
                 what="the worker back, its stale attempt ended")
        action_id = _action_id(home, run_id, "slow")
        assert _attempts(home, action_id) == [(1, "interrupted"), (2, "succeeded")]
        assert home.show(run_id)["status"] == "succeeded" and home.action(run, "slow")["attempts"] == 2
        assert f"worker {victim} lost" in home.logs(run_id, "slow")


def test_a_broker_with_tls_and_a_password(home: Home, tmp_path: Path) -> None:
    with cluster(home, tmp_path, {"w1": "linux"}, tls=True) as c, home.daemon():
        assert c.redis.url.startswith("rediss://:")
        repo = home.add_repo("app")
        run_id = home.push_run(repo, {".pipeline.toml": remote("tls", "echo over-tls")})
        home.expect(home.wait_run(run_id, timeout=120))
        log = home.logs(run_id, "tls")
        assert "running on worker w1" in log and "over-tls" in log
        wrong = c.redis.url.replace("rediss://:", "rediss://:wrong")
        proc = home.gitpipe("workers", "--broker", wrong)
        assert proc.returncode == 2 and "cannot be reached" in proc.stderr and "wrong" not in proc.stderr


# ---------------------------------------------------------------------------- the broker password alone
def _forge_attempt(c: Any, job: dict[str, Any], worker: str) -> Any:
    """What someone with the broker's password (and the worker's *public* key, which gitpipe.toml
    and the worker's log print) can do without the coordinator: queue a job of their own on the
    worker's queue and seal a bundle for it to that worker's key; the stream of the attempt."""
    import redis as redis_py

    from gitpipe.cluster import channel
    from gitpipe.cluster.worker import make_app

    public = channel.public_text(channel.load_private(c.workers[worker].dir / "worker.key"))
    r = redis_py.Redis(host="127.0.0.1", port=c.redis.port, password=c.redis.password)
    bundle = {"mac": "00" * 32, "env": {}, "mask": [], "digest": channel.digest(job)}
    r.rpush(channel.key("seal", job["aid"], worker), channel.seal(public, json.dumps(bundle).encode()))
    make_app(c.redis.url).send_task(channel.TASK, args=[job], queue=channel.queue_of(()))
    return r


def _forged_job(aid: str, git_url: str, script: str, sha: str = "0" * 40) -> dict[str, Any]:
    return {"aid": aid, "repo": "app", "sha": sha, "git_url": git_url, "script": script, "env": {},
            "inputs": [], "outputs": [], "timeout": 60.0, "network": False}


def test_a_forged_job_cannot_run_a_command_on_the_worker_host_through_git_url(
        home: Home, tmp_path: Path, out: Path) -> None:
    """A `git_url` that is an option (`--upload-pack=CMD`) must never reach `git fetch` as one:
    that runs CMD on the worker host, outside the sandbox, as the worker's user (its key)."""
    with cluster(home, tmp_path, {"w1": "linux"}) as c:
        job = _forged_job("9.1.feed", f"--upload-pack=touch {out}/pwned;", "true")
        r = _forge_attempt(c, job, "w1")
        wait_for(lambda: any(f.get(b"k") == b"end" for _, f in r.xrange(f"gitpipe:log:{job['aid']}")),
                 timeout=90, what="the worker to end the forged attempt")
        r.close()
    assert not (out / "pwned").exists()


def test_a_trusted_worker_runs_only_jobs_the_coordinator_sealed(home: Home, tmp_path: Path, out: Path) -> None:
    """The worker checks the job against the digest in the sealed bundle, but anyone can seal
    to a public key: a trusted worker runs a job nobody pushed (with the network its forger asks
    for, on the host that holds the worker's key and the secrets of the attempts it runs)."""
    with cluster(home, tmp_path, {"w1": "linux"}, share=out) as c:
        repo = home.add_repo("app")
        push = home.push(repo, {"README": "x"})
        job = _forged_job("9.1.cafe", str(repo), f"touch {out}/ran", sha=push.sha)
        r = _forge_attempt(c, job, "w1")
        wait_for(lambda: any(f.get(b"k") == b"end" for _, f in r.xrange(f"gitpipe:log:{job['aid']}")),
                 timeout=90, what="the worker to end the forged attempt")
        r.close()
    assert not (out / "ran").exists()


def test_the_broker_password_alone_cannot_write_into_a_remote_attempts_log(
        home: Home, tmp_path: Path, out: Path) -> None:
    import redis as redis_py

    with cluster(home, tmp_path, {"w1": "linux"}, share=out) as c, home.daemon():
        repo = home.add_repo("app")
        run_id = home.push_run(repo, {".pipeline.toml": remote("tests", f"touch {out}/go; while [ ! -e {out}/forged ]; do sleep 0.1; done; echo real-output")})
        wait_for(lambda: (out / "go").exists(), timeout=120, what="the attempt to start")
        r = redis_py.Redis(host="127.0.0.1", port=c.redis.port, password=c.redis.password)
        stream = next(k for k in r.scan_iter("gitpipe:log:*"))
        r.xadd(stream, {"k": "out", "d": b"FORGED: all 1204 tests passed\n"})
        (out / "forged").touch()
        home.expect(home.wait_run(run_id, timeout=60))
        r.close()
        log = home.logs(run_id, "tests")
    assert "real-output" in log
    assert "FORGED" not in log


def _granted(c: Any, job: dict[str, Any], worker: str, grant: dict[str, str]) -> None:
    """Queue `job` with a bundle sealed to `worker` that carries `grant` (as a captured one would)."""
    import redis as redis_py

    from gitpipe.cluster import channel
    from gitpipe.cluster.worker import make_app

    public = channel.public_text(channel.load_private(c.workers[worker].dir / "worker.key"))
    bundle = {"mac": "11" * 32, "env": {}, "mask": [], "digest": channel.digest(job), "grant": grant}
    r = redis_py.Redis(host="127.0.0.1", port=c.redis.port, password=c.redis.password)
    r.rpush(channel.key("seal", job["aid"], worker), channel.seal(public, json.dumps(bundle).encode()))
    r.close()
    make_app(c.redis.url).send_task(channel.TASK, args=[job], queue=channel.queue_of(()))


def _end_message(c: Any, aid: str) -> str | None:
    """The message of the attempt's last result on its stream (None: it has not ended)."""
    import redis as redis_py

    r = redis_py.Redis(host="127.0.0.1", port=c.redis.port, password=c.redis.password)
    try:
        ends = [f for _, f in r.xrange(f"gitpipe:log:{aid}") if f.get(b"k") == b"end"]
    finally:
        r.close()
    if not ends:
        return None
    return str(json.loads(ends[-1][b"b"])["message"] or "")


def test_a_worker_runs_a_signed_grant_once_only_for_itself_and_before_it_expires(
        home: Home, tmp_path: Path, out: Path) -> None:
    """A captured genuine bundle (signed by the build host) replayed on the broker, one sealed
    to another worker's key, or one past its expiry: none runs again."""
    import base64
    import time

    from gitpipe.cluster import channel

    with cluster(home, tmp_path, {"w1": "linux"}, share=out) as c:
        repo = home.add_repo("app")
        push = home.push(repo, {"README": "x"})
        signing = channel.load_signing(home.home / "coordinator.key")
        job = _forged_job("9.2.beef", str(repo), f"echo once >> {out}/count", sha=push.sha)
        genuine = channel.grant(signing, job["aid"], "w1", channel.digest(job))
        _granted(c, job, "w1", genuine)
        wait_for(lambda: _end_message(c, job["aid"]) is not None, timeout=90, what="the granted attempt to run")
        assert "not run" not in (_end_message(c, job["aid"]) or "")
        assert (out / "count").read_text() == "once\n"
        # the same bundle again, its stream emptied as the coordinator does after reading it
        c.redis.cli("DEL", f"gitpipe:log:{job['aid']}")
        _granted(c, job, "w1", genuine)
        wait_for(lambda: "a replay" in (_end_message(c, job["aid"]) or ""), timeout=90, what="the replay to be refused")
        other = _forged_job("9.3.beef", str(repo), f"echo other >> {out}/count", sha=push.sha)
        _granted(c, other, "w1", channel.grant(signing, other["aid"], "w2", channel.digest(other)))
        wait_for(lambda: "not 9.3.beef on w1" in (_end_message(c, other["aid"]) or ""), timeout=90,
                 what="a grant for another worker to be refused")
        late = _forged_job("9.4.beef", str(repo), f"echo late >> {out}/count", sha=push.sha)
        body = json.dumps({"aid": late["aid"], "worker": "w1", "digest": channel.digest(late),
                           "expires": int(time.time()) - 1}, sort_keys=True)
        expired = {"body": body, "sig": base64.b64encode(signing.sign(b"gitpipe-grant-v1\n" + body.encode())).decode()}
        _granted(c, late, "w1", expired)
        wait_for(lambda: "has expired" in (_end_message(c, late["aid"]) or ""), timeout=90, what="an expired grant refused")
    assert (out / "count").read_text() == "once\n"


CACHED = pipeline('''
    [[stage]]
    name = "build"
    [[stage.action]]
    name = "deps"
    runs_on = ["linux"]
    cache = [{ key = ["req.txt"], paths = [".venv", "~/.cache/tool"] }]
    run = """
    if [ -f .venv/from ]; then echo "found venv of $(cat .venv/from)"; else echo "cold venv"; fi
    mkdir -p .venv ~/.cache/tool && echo "$GITPIPE_REF" > .venv/from && echo x > ~/.cache/tool/f
    """
''')


def test_a_worker_keeps_its_own_caches_by_the_build_hosts_rules(home: Home, tmp_path: Path) -> None:
    """Restored exact on the second run on the same worker; a protected run never restores what a
    feature branch saved there; `show` says what was restored and saved; `cache list` says which
    host holds each entry (the worker's, listed through its heartbeat)."""
    home.configure('[repos.app]\nprotected = ["main"]\n')
    with cluster(home, tmp_path, {"w1": "linux"}, local=False) as c, home.daemon():
        repo = home.add_repo("app")

        ids: list[int] = []

        def run(files: dict[str, str | None], branch: str) -> tuple[dict[str, Any], str]:
            ids.append(home.push_run(repo, files, branch))
            done = home.expect(home.wait_run(ids[-1], timeout=180))
            return home.action(done, "deps"), home.logs(ids[-1], "deps")

        first, log = run({".pipeline.toml": CACHED, "req.txt": "1\n"}, "feature")
        assert "running on worker w1" in log and "cold venv" in log and "nothing to restore" in log
        [use] = first["caches"]
        assert use["match"] == "none" and use["restored"] is None and use["saved"]["size"] > 0
        second, log = run({"README": "again\n"}, "feature")
        assert "found venv of refs/heads/feature" in log, log
        [use] = second["caches"]
        assert use["match"] == "exact" and use["restored"]["entry"] == first["caches"][0]["saved"]["entry"]
        assert use["saved"] is None  # an exact match saves nothing
        assert "restored exact" in home.gitpipe("show", str(ids[-1])).stdout
        # The same key on a protected ref: the feature branch's entry is never restored there.
        protected, log = run({".pipeline.toml": CACHED, "req.txt": "1\n"}, "main")
        assert "cold venv" in log and "nothing to restore (no entry yet saved by a protected run)" in log
        [use] = protected["caches"]
        assert use["match"] == "none" and use["saved"] is not None

        def listed() -> list[dict[str, Any]]:
            out = home.gitpipe("cache", "list", "--json")
            assert out.returncode == 0, out.stderr
            rows = json.loads(out.stdout)
            return rows if len(rows) == 2 else []

        rows = wait_for(listed, timeout=30, what="the worker's entries in cache list")
        assert {(r["where"], r["host"], r["protected"]) for r in rows} == {("worker", "w1", False),
                                                                          ("worker", "w1", True)}
        assert {r["id"] for r in rows} == {first["caches"][0]["saved"]["entry"], protected["caches"][0]["saved"]["entry"]}
        text = home.gitpipe("cache", "list").stdout
        assert text.count("on worker w1") == 2
        # Their files are the worker's, in its --dir; the build host keeps none.
        held = sorted(p.name for p in (c.workers["w1"].dir / "build-cache" / "entries").iterdir())
        assert held == sorted(r["id"] for r in rows)
        assert not list((home.home / "build-cache").rglob("p0"))


def test_cache_errors_of_workers_say_what_and_where(home: Home, tmp_path: Path) -> None:
    """A bad --cache-max-size is refused at start; `cache list` with the broker away still lists
    the build host's entries and says the workers' are missing, and why."""
    proc = home.gitpipe("worker", "--broker", "redis://127.0.0.1:1/0", "--cache-max-size", "12Q",
                        "--coordinator-key", "x", "--dir", str(tmp_path / "w"))
    assert proc.returncode != 0
    assert '--cache-max-size: bad size "12Q"' in proc.stderr and "Traceback" not in proc.stderr
    home.configure('[cluster]\nbroker = "redis://127.0.0.1:1/0"\n')
    listed = home.gitpipe("cache", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []
    assert "warning: the workers' entries are not listed: the broker redis://127.0.0.1:1/0 cannot be reached" \
        in listed.stderr


def test_a_worker_evicts_its_least_recently_used_entries_beyond_its_cache_max_size(home: Home, tmp_path: Path) -> None:
    body = pipeline('''
        [[stage]]
        name = "build"
        [[stage.action]]
        name = "deps"
        runs_on = ["linux"]
        cache = [{ key = ["req.txt"], paths = [".venv"] }]
        run = "mkdir -p .venv && head -c 300000 /dev/zero > .venv/blob"
    ''')
    with cluster(home, tmp_path, {"w1": "linux"}, local=False, args=("--cache-max-size", "500K")) as c, \
            home.daemon():
        repo = home.add_repo("app")
        saved = []
        for n in range(2):
            run_id = home.push_run(repo, {".pipeline.toml": body, "req.txt": f"{n}\n"}, "feature")
            [use] = home.action(home.expect(home.wait_run(run_id, timeout=180)), "deps")["caches"]
            saved.append(use["saved"]["entry"])
        # The second run restored the first entry (warm), so it went when that attempt let it go.
        assert "restored warm" in home.logs(run_id, "deps")
        held = sorted(p.name for p in (c.workers["w1"].dir / "build-cache" / "entries").iterdir())
        assert held == [saved[1]]
        listed = wait_for(lambda: [r["id"] for r in json.loads(home.gitpipe("cache", "list", "--json").stdout)
                                   if r["where"] == "worker"] == [saved[1]], timeout=30, what="the eviction listed")
        assert listed
