"""Worker hosts through Celery on Redis (SPEC section 13), end to end: a private redis-server,
real `gitpipe worker` processes, real pushes to a real `gitpipe serve`."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

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
