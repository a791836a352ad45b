"""Tests of gitpipe.executor with real processes: logs, process groups, environment, killing."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import STAMP, kill_marker_processes, marker_processes, wait_for

from gitpipe import executor
from gitpipe.models import ActionStatus
from gitpipe.sandbox import Launch
from gitpipe.secrets import Masker

ENV = {"PATH": os.environ["PATH"], "HOME": "/nonexistent-home", "LANG": "C.UTF-8", "ONLY_THIS": "1"}


@pytest.fixture
def marker() -> Iterator[str]:
    """A unique string to put in the command lines of the processes a test starts."""
    m = f"gp-{uuid.uuid4().hex}"
    yield m
    kill_marker_processes(m)


def log_lines(path: Path) -> list[bytes]:
    """The lines of a log (ended by \\n only: a \\r inside a line is a progress bar's), unstamped."""
    data = path.read_bytes()
    assert data.endswith(b"\n") or not data
    lines = [line + b"\n" for line in data.split(b"\n")[:-1]]
    for line in lines:
        assert STAMP.match(line), line
    return [STAMP.sub(b"", line) for line in lines]


def run(script: str, tmp_path: Path, deadline: float | None = None,
        env: dict[str, str] | None = None) -> tuple[executor.Outcome, list[bytes]]:
    log = tmp_path / f"{uuid.uuid4().hex}.log"
    writer = executor.LogWriter(log)
    attempt = executor.start(Launch(executor.bash(script), env or ENV, tmp_path), writer, uuid.uuid4().hex)
    outcome = executor.wait(attempt, deadline)
    writer.close()
    return outcome, log_lines(log)


# ---------------------------------------------------------------------------- LogWriter


def test_every_line_gets_a_timestamp_also_when_written_in_pieces(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    w = executor.LogWriter(log)
    for piece in (b"hel", b"lo\nwor", b"ld\n", b"\n", b"a\rb\n", b"x" * 70000 + b"\ny\n", b"no newline"):
        w.write(piece)
    w.line("gitpipe: a line of our own")
    w.write(b"tail")
    w.close()
    assert log_lines(log) == [b"hello\n", b"world\n", b"\n", b"a\rb\n", b"x" * 70000 + b"\n", b"y\n",
                              b"no newline\n", b"gitpipe: a line of our own\n", b"tail\n"]
    stamps = [STAMP.match(line).group(0) for line in log.read_bytes().split(b"\n")[:-1]]  # type: ignore[union-attr]
    assert stamps == sorted(stamps)


def test_a_log_is_appended_to_not_replaced(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "deep" / "a.log"
    for text in (b"first\n", b"second\n"):
        w = executor.LogWriter(log)
        w.write(text)
        w.close()
    assert log_lines(log) == [b"first\n", b"second\n"]


def test_a_mask_sees_the_stream_before_it_is_split_into_lines(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    w = executor.LogWriter(log, Masker(["correct-horse-battery"]).stream())
    for piece in (b"token: correct-hor", b"se-batt", b"ery\nnext correct-horse-battery", b"\n"):
        w.write(piece)
    w.close()
    assert log_lines(log) == [b"token: ***\n", b"next ***\n"]


# ---------------------------------------------------------------------------- running scripts


def test_exit_status_and_output_of_a_script(tmp_path: Path) -> None:
    ok, lines = run("echo out; echo err >&2", tmp_path)
    assert (ok.status, ok.exit_code) == (ActionStatus.SUCCEEDED, 0)
    assert lines == [b"out\n", b"err\n"]
    bad, _ = run("exit 3", tmp_path)
    assert (bad.status, bad.exit_code, bad.message) == (ActionStatus.FAILED, 3, "exit status 3")
    piped, lines = run("false | true; echo after", tmp_path)  # bash -eo pipefail
    assert piped.status is ActionStatus.FAILED and lines == []
    killed, _ = run("kill -KILL $$", tmp_path)
    assert killed.status is ActionStatus.FAILED and killed.message == "killed by signal 9"


def test_a_script_gets_its_own_process_group_and_stdin_from_dev_null(tmp_path: Path) -> None:
    out = tmp_path / "out"
    outcome, _ = run(f"cat; readlink /proc/self/fd/0 > {out}.stdin; cut -d' ' -f5,6 /proc/$$/stat > {out}.ids; "
                     f"echo $$ > {out}.pid", tmp_path)
    assert outcome.status is ActionStatus.SUCCEEDED
    assert (tmp_path / "out.stdin").read_text().strip() == "/dev/null"
    pid = int((tmp_path / "out.pid").read_text())
    pgid, sid = map(int, (tmp_path / "out.ids").read_text().split())
    assert pgid == sid == pid
    assert pgid != os.getpgid(0)


def test_a_script_gets_exactly_the_environment_it_is_given(tmp_path: Path) -> None:
    out = tmp_path / "env"
    os.environ["GITPIPE_TEST_LEAK"] = "1"
    try:
        outcome, _ = run(f"env -0 > {out}", tmp_path)
    finally:
        del os.environ["GITPIPE_TEST_LEAK"]
    assert outcome.status is ActionStatus.SUCCEEDED
    env = dict(item.split("=", 1) for item in out.read_text().split("\0") if item)
    assert set(env) - {"PWD", "SHLVL", "_", "OLDPWD"} == set(ENV) | {executor.TOKEN_VAR}
    assert {k: env[k] for k in ENV} == ENV


def test_a_deadline_stops_the_script_as_timed_out(tmp_path: Path, marker: str) -> None:
    outcome, lines = run(f"echo before; exec -a {marker} sleep 30", tmp_path, deadline=time.time() + 0.5)
    assert (outcome.status, outcome.message) == (ActionStatus.TIMED_OUT, "timed out")
    assert lines == [b"before\n"]
    assert marker_processes(marker) == []


def test_a_deadline_already_past_stops_it_at_once(tmp_path: Path, marker: str) -> None:
    outcome, _ = run(f"exec -a {marker} sleep 30", tmp_path, deadline=time.time() - 5)
    assert outcome.status is ActionStatus.TIMED_OUT
    assert marker_processes(marker) == []


@pytest.mark.timeout(60)
def test_stop_kills_a_tree_that_ignores_sigterm_and_left_the_group(tmp_path: Path, marker: str) -> None:
    script = f"""
    trap '' TERM
    (exec -a {marker}-child sleep 1000) &
    setsid bash -c '(exec -a {marker}-escaped sleep 1000 &); exit 0'
    exec -a {marker}-main sleep 1000
    """
    writer = executor.LogWriter(tmp_path / "a.log")
    attempt = executor.start(Launch(executor.bash(script), ENV, tmp_path), writer, uuid.uuid4().hex)
    wait_for(lambda: len(marker_processes(marker, argv0=True)) == 3, 20, what="three processes")
    escaped = [p for p in marker_processes(marker, argv0=True) if os.getsid(p) != attempt.proc.pid]
    assert len(escaped) == 1  # it really left the session
    stopper = threading.Thread(target=attempt.stop, args=(ActionStatus.CANCELLED, "cancelled", 0.5))
    stopper.start()
    outcome = executor.wait(attempt, None)
    stopper.join()
    writer.close()
    assert (outcome.status, outcome.message) == (ActionStatus.CANCELLED, "cancelled")
    wait_for(lambda: not marker_processes(marker), 5, what="every process to be gone")


@pytest.mark.timeout(60)
def test_background_children_left_by_a_finished_script_are_ended(tmp_path: Path, marker: str) -> None:
    script = f"""
    (exec -a {marker}-polite sleep 1000) &
    (trap '' TERM; exec -a {marker}-stubborn sleep 1000) &
    for i in $(seq 400); do grep -qa "^{marker}-stubborn" /proc/$!/cmdline && break; sleep 0.05; done
    echo done
    """
    outcome, lines = run(script, tmp_path)
    assert outcome.status is ActionStatus.SUCCEEDED and lines == [b"done\n"]
    wait_for(lambda: not marker_processes(marker), 5, what="every process to be gone")


def test_kill_token_ends_the_orphans_of_a_crashed_daemon(tmp_path: Path, marker: str) -> None:
    token = uuid.uuid4().hex
    orphan = subprocess.Popen(["bash", "-c", f"trap '' TERM; exec -a {marker} sleep 1000"],
                              env={**ENV, executor.TOKEN_VAR: token}, start_new_session=True)
    try:
        wait_for(lambda: marker_processes(marker, argv0=True), 10, what="the orphan")  # after its exec
        assert executor.processes_of(-1, token) == {orphan.pid}
        assert executor.kill_tokens([token]) == {token: 1}
        assert orphan.wait(timeout=10) == -signal.SIGKILL
        assert executor.kill_tokens([token]) == {token: 0}
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()


def test_kill_tokens_ends_the_orphans_of_several_attempts_in_one_pass(tmp_path: Path, marker: str) -> None:
    """A restart after a crash with several attempts running: their leftovers are found by the
    same scans (not two scans and 20 ms per attempt), each counted under its own attempt, and a
    process of an attempt not asked for is left alone."""
    first, second, other = (uuid.uuid4().hex for _ in range(3))
    orphans = [subprocess.Popen(["bash", "-c", f"trap '' TERM; exec -a {marker} sleep 1000"],
                                env={**ENV, executor.TOKEN_VAR: token}, start_new_session=True)
               for token in (first, first, second, other)]
    try:
        wait_for(lambda: len(marker_processes(marker, argv0=True)) == 4, 10, what="the orphans")  # after their exec
        assert executor.kill_tokens([first, second]) == {first: 2, second: 1}
        assert [o.wait(timeout=10) for o in orphans[:3]] == [-signal.SIGKILL] * 3
        assert orphans[3].poll() is None, "another attempt's process was killed"
        assert executor.kill_tokens([first, second]) == {first: 0, second: 0}
        assert executor.kill_tokens([]) == {}
    finally:
        for orphan in orphans:
            if orphan.poll() is None:
                orphan.kill()
                orphan.wait()


def test_processes_of_ignores_zombies(tmp_path: Path) -> None:
    token = uuid.uuid4().hex
    child = subprocess.Popen(["true"], env={**ENV, executor.TOKEN_VAR: token})

    def zombie() -> bool:
        try:
            return Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return False

    wait_for(zombie, 10, what="the child to exit")
    assert executor.processes_of(-1, token) == set()
    child.wait()


def test_lots_of_output_reaches_the_log_whole(tmp_path: Path) -> None:
    outcome, lines = run("seq 1 200000", tmp_path)
    assert outcome.status is ActionStatus.SUCCEEDED
    assert lines == [b"%d\n" % n for n in range(1, 200001)]


def test_a_log_cut_at_a_chunk_boundary_still_says_so(tmp_path: Path) -> None:
    """max_log_size: the line saying the log was cut comes with the first byte dropped, also when
    the kept bytes end exactly where a chunk did."""
    log = tmp_path / "cut.log"
    w = executor.LogWriter(log, limit=8)
    w.write(b"1234\n")
    w.write(b"567\n")  # exactly 8 bytes kept
    w.write(b"dropped\n")
    w.write(b"dropped too\n")
    w.close()
    lines = log_lines(log)
    assert lines[:2] == [b"1234\n", b"567\n"]
    assert lines[2].startswith(b"gitpipe: log cut at 8 bytes") and len(lines) == 3


def test_kill_token_ends_an_orphan_caught_in_the_middle_of_its_exec(tmp_path: Path, marker: str) -> None:
    """A process mid-execve shows an empty environment for a moment; one scan of /proc could
    miss it (seen on a quiet machine, every time: the shell that mentions the marker is found,
    then it execs). kill_tokens scans again until two scans in a row find nothing new."""
    for _ in range(5):
        token = uuid.uuid4().hex
        orphan = subprocess.Popen(["bash", "-c", f"trap '' TERM; exec -a {marker} sleep 1000"],
                                  env={**ENV, executor.TOKEN_VAR: token}, start_new_session=True)
        try:
            wait_for(lambda: marker_processes(marker), 10, what="the shell")  # maybe still exec'ing sleep
            assert executor.kill_tokens([token]) == {token: 1}
            assert orphan.wait(timeout=10) == -signal.SIGKILL
        finally:
            if orphan.poll() is None:
                orphan.kill()
                orphan.wait()
