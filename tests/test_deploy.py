"""Tests of gitpipe.deploy against real targets: directories on this host and a real sshd.

Nothing is mocked: file:// targets are temporary directories, ssh:// targets are paths on an
OpenSSH server started for the test (tests/sshd.py), the full-disk test mounts a real tmpfs.
Only the waiting constants (healthcheck pause, lock polling) are shortened.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sshd import (
    SshServer,
    sshd_server,  # noqa: F401  (registers the `sshd` fixture)
)

from gitpipe.deploy import (
    DEPLOYED,
    FAILED,
    ROLLED_BACK,
    DeployContext,
    DeployResult,
    deploy,
    list_releases,
    lock,
    read_current,
    rollback,
    rollback_goal,
    ssh,
    strategies,
)
from gitpipe.deploy.session import open_target
from gitpipe.errors import DeployError, GitpipeError
from gitpipe.models import ActionSpec

SHA = "ab12cd3" + "0" * 33


def q(path: Path) -> str:
    """A path quoted for the test scripts."""
    return shlex.quote(str(path))


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shorter waits; everything else as in production."""
    monkeypatch.setattr(strategies, "HEALTHCHECK_PAUSE", 0.01)
    monkeypatch.setattr(lock, "LOCK_POLL", 0.05)


class Log(list[str]):
    """ctx.log that keeps the lines (and prints them: pytest shows them for a failing test)."""

    def __call__(self, line: str) -> None:
        print(line)
        self.append(line)

    def text(self) -> str:
        return "\n".join(self)


def make_ctx(run: int, log: Log, server: SshServer | None = None, known_hosts: Path | None = None,
             holder: str = "") -> DeployContext:
    kh = known_hosts or (server.known_hosts if server else Path("/nonexistent"))
    return DeployContext(run, SHA, f"ab{run:05d}", "staging", kh, server.identity if server else None, log,
                         connect_timeout=10, holder=holder or f"run #{run} in the tests")


def release(run: int) -> str:
    return f"{run}-ab{run:05d}"


def spec(*targets: str, **kw: object) -> ActionSpec:
    return ActionSpec(name="deploy", line=1, type="deploy", environment="staging", targets=targets, **kw)  # type: ignore[arg-type]


def write_tree(root: Path, files: dict[str, str | bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return root


def current(target: Path) -> str:
    return os.readlink(target / "current")


def ok(result: DeployResult) -> DeployResult:
    assert result.status == DEPLOYED, result.message
    return result


def rolled_back(result: DeployResult) -> DeployResult:
    assert result.status == ROLLED_BACK, result.message
    return result


def url(path: Path) -> str:
    return f"file://{path}"


def roll(urls: list[str], ctx: DeployContext, to: str | None = None) -> DeployResult:
    """What `gitpipe rollback` does without a history: choose the goal, then switch to it."""
    try:
        goal = rollback_goal(urls, ctx, to)
    except GitpipeError as e:
        return DeployResult(FAILED, to or "", (), str(e))
    return rollback(urls, ctx, goal)


# ---------------------------------------------------------------------- file:// layout


def test_file_deploy_layout_marker_shared_and_keep(tmp_path: Path) -> None:
    target, log = tmp_path / "site", Log()
    src = write_tree(tmp_path / "src", {"index.html": "one", "static/app.js": "js", "uploads/seed.txt": "x"})
    (target / "shared").mkdir(parents=True)
    (target / "shared" / ".env").write_text("SECRET=1\n")
    s = spec(url(target), shared=("uploads", ".env", "var/cache"), keep=1)

    result = ok(deploy(s, src, make_ctx(1, log)))
    rel = target / "releases" / release(1)
    assert result.release == release(1)
    assert [(t.previous, t.current) for t in result.targets] == [(None, release(1))]
    assert current(target) == f"releases/{release(1)}"  # relative, into releases/
    assert (rel / ".gitpipe-complete").read_text().strip() == release(1)
    assert '"path": "static/app.js"' in (rel / ".gitpipe-manifest").read_text()
    assert (target / "current" / "index.html").read_text() == "one"
    # shared: linked in (relative), replacing what the source had; missing entries created
    assert os.readlink(rel / "uploads") == "../../shared/uploads"
    assert os.readlink(rel / "var" / "cache") == "../../../shared/var/cache"
    assert (target / "current" / ".env").read_text() == "SECRET=1\n"
    assert (target / "shared" / "var" / "cache").is_dir()
    assert "created empty directory" in log.text() and "shared/var/cache" in log.text()
    assert not (target / "shared" / "uploads" / "seed.txt").exists()
    assert not (target / ".gitpipe.lock").exists()

    for run in (2, 3):
        ok(deploy(s, src, make_ctx(run, log)))
    # keep = 1, but the one before current is never removed
    assert sorted(os.listdir(target / "releases")) == [release(2), release(3)]

    rolled_back(roll([url(target)], make_ctx(9, log)))  # current: 2; newest: 3
    (target / "releases" / "0-dead").mkdir()  # an incomplete leftover older than current
    ok(deploy(s, src, make_ctx(4, log)))
    # 4 is current, 3 the one before it, 2 was current when the deploy began: all kept
    assert sorted(os.listdir(target / "releases")) == [release(2), release(3), release(4)]
    ok(deploy(s, src, make_ctx(5, log)))
    assert sorted(os.listdir(target / "releases")) == [release(4), release(5)]


def test_bad_input_fails_clearly_and_misuse_raises(tmp_path: Path) -> None:
    log, src = Log(), write_tree(tmp_path / "src", {"a": "a"})
    bad = deploy(spec("ftp://example.com/x"), src, make_ctx(1, log))
    assert bad.status == FAILED and 'unknown scheme "ftp"' in bad.message
    relative = deploy(spec(url(tmp_path / "t"), shared=("../etc",)), src, make_ctx(1, log))
    assert relative.status == FAILED and "relative path inside the release" in relative.message
    missing = deploy(spec(url(tmp_path / "t")), tmp_path / "nope", make_ctx(1, log))
    assert missing.status == FAILED and "not a directory" in missing.message
    with pytest.raises(DeployError, match="no targets"):
        deploy(spec(), src, make_ctx(1, log))
    with pytest.raises(DeployError, match='unknown strategy "canary"'):
        deploy(spec(url(tmp_path / "t"), strategy="canary"), src, make_ctx(1, log))


def test_a_release_source_deeper_than_the_walk_takes_fails_saying_so(tmp_path: Path) -> None:
    """A source with folders 1,400 deep (a tracked path can be): the manifest's os.walk recursed
    once per folder and the deploy failed with an internal RecursionError. It fails naming the
    source and how deep, and switches nothing; one 256 deep deploys."""
    src = tmp_path / "src"
    try:
        src.mkdir()
        subprocess.run(["mkdir", "-p", "/".join(["d"] * 256)], cwd=src, check=True)
        (src / "index.html").write_text("one")
        ok(deploy(spec(url(tmp_path / "site")), src, make_ctx(1, Log())))  # 256 deep: taken whole
        subprocess.run(["mkdir", "-p", "/".join(["d"] * 1400)], cwd=src, check=True)
        result = deploy(spec(url(tmp_path / "site")), src, make_ctx(2, Log()))
        assert result.status == FAILED, result.message
        assert f"the release source {src} holds folders more than 256 deep" in result.message, result.message
        assert current(tmp_path / "site") == f"releases/{release(1)}"
    finally:  # pytest's own removal of old temporary folders recurses: it must never meet this depth
        subprocess.run(["rm", "-rf", "--", str(src)], check=False)


# ---------------------------------------------------------------------- atomic switch


def read_forever(path: Path, stop: threading.Event, seen: list[str], errors: list[str]) -> None:
    while not stop.is_set():
        try:
            seen.append(path.read_text())
        except OSError as e:
            errors.append(repr(e))


def test_reader_never_sees_a_missing_file_during_200_switches(tmp_path: Path) -> None:
    target, log = tmp_path / "site", Log()
    for run in (1, 2):
        src = write_tree(tmp_path / f"src{run}", {"index.html": f"release {run}"})
        ok(deploy(spec(url(target)), src, make_ctx(run, log)))
    stop, seen, errors = threading.Event(), list[str](), list[str]()
    reader = threading.Thread(target=read_forever, args=(target / "current" / "index.html", stop, seen, errors))
    reader.start()
    try:
        for i in range(200):
            result = roll([url(target)], make_ctx(9, log), to=release(1 + i % 2))
            assert result.status == ROLLED_BACK, result.message
    finally:
        stop.set()
        reader.join()
    assert errors == []
    assert {"release 1", "release 2"} <= set(seen)


def test_ssh_switch_is_a_rename_the_reader_never_misses(sshd: SshServer, tmp_path: Path) -> None:
    target, log = tmp_path / "site", Log()
    for run in (1, 2):
        src = write_tree(tmp_path / f"src{run}", {"index.html": f"release {run}"})
        ok(deploy(spec(sshd.url(target)), src, make_ctx(run, log, sshd)))
    stop, seen, errors = threading.Event(), list[str](), list[str]()
    reader = threading.Thread(target=read_forever, args=(target / "current" / "index.html", stop, seen, errors))
    t = open_target(sshd.url(target), make_ctx(9, log, sshd), log)
    reader.start()
    try:
        for i in range(200):
            t.set_link("current", f"releases/{release(1 + i % 2)}")
    finally:
        stop.set()
        reader.join()
        t.close()
    assert errors == []
    assert {"release 1", "release 2"} <= set(seen)
    assert sorted(os.listdir(target)) == ["current", "releases", "shared"]  # no current.tmp-* left


# ---------------------------------------------------------------------- rolling over ssh


def test_ssh_rolling_to_two_targets(sshd: SshServer, tmp_path: Path) -> None:
    a, b, log = tmp_path / "a", tmp_path / "b", Log()
    src = write_tree(tmp_path / "src", {"index.html": "v1", "lib/x.py": "print(1)\n"})
    (src / "run.sh").write_text("#!/bin/sh\n")
    (src / "run.sh").chmod(0o755)
    (src / "link").symlink_to("index.html")
    record = tmp_path / "scripts.log"
    s = spec(sshd.url(a), sshd.url(b),
             before_switch=f'echo "before $GITPIPE_RUN $PWD prev=$GITPIPE_PREVIOUS_RELEASE" >> {q(record)}; echo hi',
             after_switch=f'echo "after $(readlink "$(dirname "$(dirname "$PWD")")/current")" >> {q(record)}',
             healthcheck="test -f index.html")
    first = ok(deploy(s, src, make_ctx(1, log, sshd)))
    assert [t.url for t in first.targets] == [sshd.url(a), sshd.url(b)]
    for t in (a, b):
        assert current(t) == f"releases/{release(1)}"
        rel = t / "releases" / release(1)
        assert (rel / "index.html").read_text() == "v1"
        assert os.stat(rel / "run.sh").st_mode & 0o777 == 0o755
        assert os.readlink(rel / "link") == "index.html"
    # every upload finished before the first before_switch ran
    lines = log.text().splitlines()
    done = [i for i, line in enumerate(lines) if f"release {release(1)} complete" in line]
    first_script = next(i for i, line in enumerate(lines) if "running before_switch" in line)
    assert len(done) == 2 and max(done) < first_script
    assert f"[{sshd.url(a)}] hi" in lines  # script output, line by line, prefixed with the target

    (src / "index.html").write_text("v2")
    second = ok(deploy(s, src, make_ctx(2, log, sshd)))
    assert [(t.previous, t.current) for t in second.targets] == [(release(1), release(2))] * 2
    runs = record.read_text().splitlines()
    assert runs[0] == f"before 1 {a}/releases/{release(1)} prev="
    assert f"before 2 {b}/releases/{release(2)} prev={b}/releases/{release(1)}" in runs
    assert f"after releases/{release(2)}" in runs  # after_switch runs once current points at it

    assert read_current([sshd.url(a), sshd.url(b)], make_ctx(9, log, sshd)) == list(second.targets)
    assert list_releases(sshd.url(b), make_ctx(9, log, sshd)) == [release(1), release(2)]


def test_healthcheck_failure_rolls_back_every_target(sshd: SshServer, tmp_path: Path) -> None:
    a, b, log = tmp_path / "a", tmp_path / "b", Log()
    src = write_tree(tmp_path / "src", {"index.html": "v1"})
    after = tmp_path / "after.log"
    s = spec(sshd.url(a), sshd.url(b), healthcheck_retries=2,
             after_switch=f'echo "$(basename "$(dirname "$(dirname "$GITPIPE_RELEASE")")") '
                          f'$(basename "$GITPIPE_RELEASE")" >> {q(after)}',
             healthcheck='echo checking; test ! -e "$(dirname "$(dirname "$GITPIPE_RELEASE")")/unhealthy"')
    ok(deploy(s, src, make_ctx(1, log, sshd)))
    (b / "unhealthy").touch()
    result = deploy(s, src, make_ctx(2, log, sshd))

    assert result.status == ROLLED_BACK, result.message
    assert f"healthcheck failed on {sshd.url(b)} after 3 attempt(s)" in result.message
    assert f"switched back to {release(1)}" in result.message
    assert [(t.previous, t.current) for t in result.targets] == [(release(1), release(1))] * 2
    assert current(a) == current(b) == f"releases/{release(1)}"
    # after_switch: first deploy on both, the new release on both, then again for the restored one
    assert after.read_text().splitlines() == [
        f"a {release(1)}", f"b {release(1)}", f"a {release(2)}", f"b {release(2)}",
        f"b {release(1)}", f"a {release(1)}",
    ]
    assert log.text().count(f"[{sshd.url(b)}] checking") == 1 + 3
    assert (a / "releases" / release(2) / ".gitpipe-complete").exists()  # kept, for a look


def test_first_deploy_rolled_back_leaves_no_current(tmp_path: Path) -> None:
    target, log = tmp_path / "site", Log()
    src = write_tree(tmp_path / "src", {"a": "a"})
    result = deploy(spec(url(target), healthcheck="exit 3", healthcheck_retries=0), src, make_ctx(1, log))
    assert result.status == ROLLED_BACK
    assert "exit status 3" in result.message
    assert not os.path.lexists(target / "current")
    assert result.targets[0].current is None


def test_before_switch_failure_on_first_target_switches_nothing(tmp_path: Path) -> None:
    a, b, log = tmp_path / "a", tmp_path / "b", Log()
    src = write_tree(tmp_path / "src", {"a": "a"})
    ok(deploy(spec(url(a), url(b)), src, make_ctx(1, log)))
    result = deploy(spec(url(a), url(b), before_switch="echo migrating; exit 7"), src, make_ctx(2, log))
    assert result.status == FAILED
    assert f"before_switch failed on {url(a)} (exit status 7)" in result.message
    assert "current untouched on every target" in result.message
    assert current(a) == current(b) == f"releases/{release(1)}"
    assert [(t.previous, t.current) for t in result.targets] == [(release(1), release(1))] * 2
    assert (b / "releases" / release(2) / ".gitpipe-complete").exists()  # uploaded, not switched to


def test_monitor_failure_rolls_back(tmp_path: Path) -> None:
    target, log = tmp_path / "site", Log()
    src = write_tree(tmp_path / "src", {"a": "a"})
    ok(deploy(spec(url(target)), src, make_ctx(1, log)))
    count = tmp_path / "count"
    check = f'n=$(cat {q(count)} 2>/dev/null || echo 0); echo $((n + 1)) > {q(count)}; [ "$n" -lt 3 ]'
    # monitor_interval is a key: checked every 0.05 s, the 4th check fails well inside the 5 s window
    result = deploy(spec(url(target), healthcheck=check, monitor=5.0, monitor_interval=0.05), src, make_ctx(2, log))
    assert result.status == ROLLED_BACK, result.message
    assert "during the monitor window" in result.message
    assert current(target) == f"releases/{release(1)}"
    assert count.read_text().strip() == "4"  # passed after the switch and twice while watched


# ---------------------------------------------------------------------- blue-green


def test_blue_green_slots(sshd: SshServer, tmp_path: Path) -> None:
    target, log = tmp_path / "site", Log()
    seen, link = tmp_path / "seen.log", target / "current"
    note = f'echo "$GITPIPE_SLOT $PWD $(readlink {q(link)} || echo none)" >> {q(seen)}'
    s = spec(sshd.url(target), strategy="blue-green", before_switch=note, healthcheck='test -n "$GITPIPE_SLOT"')
    srcs = [write_tree(tmp_path / f"src{run}", {"index.html": f"v{run}"}) for run in range(5)]

    ok(deploy(s, srcs[1], make_ctx(1, log, sshd)))
    assert current(target) == "blue"
    assert os.readlink(target / "blue") == f"releases/{release(1)}"
    blue_inode = os.stat(target / "blue" / "index.html").st_ino

    second = ok(deploy(s, srcs[2], make_ctx(2, log, sshd)))
    assert [(t.previous, t.current) for t in second.targets] == [(release(1), release(2))]
    assert current(target) == "green"
    assert os.readlink(target / "green") == f"releases/{release(2)}"
    # the old slot stays as it was
    assert os.readlink(target / "blue") == f"releases/{release(1)}"
    assert os.stat(target / "blue" / "index.html").st_ino == blue_inode
    assert (target / "blue" / "index.html").read_text() == "v1"
    # the new release was started in the idle slot while current still pointed at the old one
    assert seen.read_text().splitlines() == [f"blue {target}/blue none", f"green {target}/green blue"]

    back = roll([sshd.url(target)], make_ctx(9, log, sshd))  # one switch back to blue
    assert back.status == ROLLED_BACK and back.release == release(1)
    assert current(target) == "blue"
    assert os.readlink(target / "green") == f"releases/{release(2)}"

    ok(deploy(s, srcs[3], make_ctx(3, log, sshd)))  # goes into the idle slot: green again
    assert (current(target), os.readlink(target / "green")) == ("green", f"releases/{release(3)}")
    assert list_releases(sshd.url(target), make_ctx(9, log, sshd)) == [release(1), release(2), release(3)]
    # the previous live release is blue's 1, not 2 (which no slot holds any more): one switch back
    assert read_current([sshd.url(target)], make_ctx(9, log, sshd))[0].previous == release(1)
    assert roll([sshd.url(target)], make_ctx(9, log, sshd)).release == release(1)
    assert current(target) == "blue"
    rolled_back(roll([sshd.url(target)], make_ctx(9, log, sshd)))  # and forward again
    assert current(target) == "green"

    failing = spec(sshd.url(target), strategy="blue-green", healthcheck="false", healthcheck_retries=0)
    result = deploy(failing, srcs[4], make_ctx(4, log, sshd))
    assert result.status == FAILED  # checked in the idle slot: current never switched
    assert current(target) == "green"
    assert os.readlink(target / "blue") == f"releases/{release(1)}"  # idle slot restored


# ---------------------------------------------------------------------- broken links and keys


def test_sshd_killed_mid_upload_fails_within_a_minute(sshd: SshServer, tmp_path: Path) -> None:
    target, log = tmp_path / "site", Log()
    small = write_tree(tmp_path / "small", {"index.html": "v1"})
    ok(deploy(spec(sshd.url(target)), small, make_ctx(1, log, sshd)))
    big = write_tree(tmp_path / "big", {"index.html": "v2"})
    for i in range(3):  # 300 MB of holes: quick to read and hash here, seconds to send
        with (big / f"blob{i}").open("wb") as f:
            f.truncate(100 * 2**20)
    uploading = threading.Event()

    def watch(line: str) -> None:
        log(line)
        if f"uploading release {release(2)}" in line:
            uploading.set()

    def killer() -> None:
        if uploading.wait(30):
            time.sleep(0.5)
            sshd.kill()

    threading.Thread(target=killer, daemon=True).start()
    ctx = make_ctx(2, log, sshd)
    started = time.monotonic()
    result = deploy(spec(sshd.url(target)), big, dataclasses.replace(ctx, log=watch))
    took = time.monotonic() - started

    assert uploading.is_set()
    assert result.status == FAILED, result.message
    assert took < 60
    assert f"{sshd.url(target)}: lost the connection to 127.0.0.1:{sshd.port} while uploading" in result.message
    assert "current untouched on every target" in result.message
    assert current(target) == f"releases/{release(1)}"
    assert not (target / "releases" / release(2) / ".gitpipe-complete").exists()


@pytest.mark.parametrize("when", ["uploading release", "running before_switch"])
def test_frozen_server_fails_the_deploy_instead_of_hanging(sshd: SshServer, tmp_path: Path, when: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # A server that still ACKs but never answers: no reset ever comes, only our own timers help.
    monkeypatch.setattr(ssh, "IO_TIMEOUT", 2.0)
    monkeypatch.setattr(ssh, "PING_EVERY", 0.5)
    target, log = tmp_path / "site", Log()
    ok(deploy(spec(sshd.url(target)), write_tree(tmp_path / "v1", {"index.html": "v1"}), make_ctx(1, log, sshd)))
    src = write_tree(tmp_path / "v2", {"index.html": "v2"})
    if when == "uploading release":
        with (src / "blob").open("wb") as f:
            f.truncate(200 * 2**20)
    reached = threading.Event()

    def watch(line: str) -> None:
        log(line)
        if when in line:
            reached.set()

    def freezer() -> None:
        if reached.wait(30):
            time.sleep(0.3)
            sshd.freeze()

    threading.Thread(target=freezer, daemon=True).start()
    started = time.monotonic()
    result = deploy(spec(sshd.url(target), before_switch="sleep 20"), src,
                    dataclasses.replace(make_ctx(2, log, sshd), log=watch))
    assert reached.is_set()
    assert result.status == FAILED, result.message
    assert time.monotonic() - started < 20
    assert "the link looks dead" in result.message and sshd.url(target) in result.message
    assert current(target) == f"releases/{release(1)}"


def other_key_line(tmp_path: Path, host: str, port: int) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    return f"[{host}]:{port} " + (tmp_path / "other.pub").read_text().strip() + "\n"


def test_changed_host_key_fails_before_auth_saying_how_to_fix(sshd: SshServer, tmp_path: Path) -> None:
    log, known = Log(), tmp_path / "known_hosts"
    known.write_text(other_key_line(tmp_path, sshd.host, sshd.port))
    src = write_tree(tmp_path / "src", {"a": "a"})
    result = deploy(spec(sshd.url(tmp_path / "site")), src, make_ctx(1, log, sshd, known))
    assert result.status == FAILED
    name = f"[127.0.0.1]:{sshd.port}"
    assert f"host key of {name} changed" in result.message
    assert f"ssh-keygen -R '{name}' -f {known}" in result.message
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> {known}" in result.message
    assert "WARNING" in log.text() and "HAS CHANGED" in log.text()
    assert not (tmp_path / "site").exists()  # nothing happened on the target


@pytest.mark.parametrize("content", ["", None], ids=["empty", "missing"])
def test_unknown_host_fails_saying_how_to_add_it(sshd: SshServer, tmp_path: Path, content: str | None) -> None:
    log, known = Log(), tmp_path / "known_hosts"
    if content is not None:
        known.write_text(content)
    src = write_tree(tmp_path / "src", {"a": "a"})
    result = deploy(spec(sshd.url(tmp_path / "site")), src, make_ctx(1, log, sshd, known))
    assert result.status == FAILED
    assert f"host key of [127.0.0.1]:{sshd.port} is not in {known}" in result.message
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> {known}" in result.message
    assert "SHA256:" in result.message and "fingerprint" in result.message
    assert ("does not exist" in result.message) == (content is None)
    assert not (tmp_path / "site").exists()


# ---------------------------------------------------------------------- the lock


def test_a_lock_released_while_another_deploy_tries_to_take_it_is_taken_not_an_error(
        sshd: SshServer, tmp_path: Path) -> None:
    """OpenSSH answers an exclusive create of an existing file with a generic failure, so the
    target looks whether the lock is there; released in between (its deploy ended), that look
    found nothing and the waiting deploy failed with "cannot create the lock" (seen in CI). A
    holder here takes the lock on the server for a millisecond, again and again, meanwhile."""
    target_dir = tmp_path / "site"
    target_dir.mkdir()
    lock = target_dir / ".gitpipe.lock"
    stop = threading.Event()

    def holder() -> None:
        while not stop.is_set():
            try:
                os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            except FileExistsError:  # ours, taken by the deploy below
                time.sleep(0.001)
                continue
            time.sleep(0.001)
            lock.unlink(missing_ok=True)
            time.sleep(0.001)

    from gitpipe.deploy.ssh import SshTarget

    target = SshTarget(sshd.url(target_dir), sshd.user, sshd.host, sshd.port, str(target_dir),
                       make_ctx(1, Log(), sshd), Log())
    churn = threading.Thread(target=holder, daemon=True)
    churn.start()
    taken = 0
    try:
        for _ in range(400):
            if target.lock_create(".gitpipe.lock", "ours"):
                taken += 1
                lock.unlink(missing_ok=True)
    finally:
        stop.set()
        churn.join()
        target.close()
    assert taken  # (each call returned: taken, or held by the other; none raised)


def test_concurrent_deploys_to_one_target_take_turns(sshd: SshServer, tmp_path: Path) -> None:
    target, log, marks = tmp_path / "site", Log(), tmp_path / "marks"
    src = write_tree(tmp_path / "src", {"a": "a"})
    s = spec(sshd.url(target), before_switch=f"echo start $GITPIPE_RUN >> {q(marks)}; sleep 0.5; "
                                             f"echo end $GITPIPE_RUN >> {q(marks)}")
    results: dict[int, DeployResult] = {}

    def run(n: int) -> None:
        results[n] = deploy(s, src, make_ctx(n, log, sshd))

    threads = [threading.Thread(target=run, args=(n,)) for n in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status for r in results.values()] == [DEPLOYED, DEPLOYED], [r.message for r in results.values()]
    lines = marks.read_text().split()
    first, second = lines[1], lines[5]
    assert lines == ["start", first, "end", first, "start", second, "end", second]
    assert f"waiting for the deploy lock held by run #{first} in the tests" in log.text()
    assert not (target / ".gitpipe.lock").exists()


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def lock_file(holder: str, host: str, pid: int, since: float) -> str:
    return f"{holder}\nhost={host}\npid={pid}\nsince={since}\ntoken=feed\n"


@pytest.mark.parametrize("where", ["file", "ssh"])
def test_stale_lock_of_a_dead_process_is_taken_over(request: pytest.FixtureRequest, tmp_path: Path,
                                                    where: str) -> None:
    target, log = tmp_path / "site", Log()
    server: SshServer | None = request.getfixturevalue("sshd") if where == "ssh" else None
    target.mkdir()
    (target / ".gitpipe.lock").write_text(lock_file("run #7 on crashed", socket.gethostname(), dead_pid(),
                                                    time.time()))
    src = write_tree(tmp_path / "src", {"a": "a"})
    ok(deploy(spec(server.url(target) if server else url(target)), src, make_ctx(8, log, server)))
    assert "took over a stale lock held by run #7 on crashed: its process" in log.text()
    assert "is gone" in log.text()
    assert not (target / ".gitpipe.lock").exists()
    assert [p.name for p in target.iterdir() if p.name.startswith(".gitpipe.lock")] == []


def test_old_lock_is_taken_over_and_a_live_one_waited_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target, log = tmp_path / "site", Log()
    target.mkdir()
    src = write_tree(tmp_path / "src", {"a": "a"})
    (target / ".gitpipe.lock").write_text(lock_file("run #3 on otherhost", "otherhost", 1, time.time() - 7 * 3600))
    ok(deploy(spec(url(target)), src, make_ctx(4, log)))
    assert "took over a stale lock held by run #3 on otherhost: it is 7.0 hours old" in log.text()

    (target / ".gitpipe.lock").write_text(lock_file("run #5 on otherhost", "otherhost", 1, time.time()))
    monkeypatch.setattr(lock, "LOCK_WAIT", 0.3)
    result = deploy(spec(url(target)), src, make_ctx(6, log))
    assert result.status == FAILED
    assert "still locked by run #5 on otherhost" in result.message
    assert f"remove {target}/.gitpipe.lock" in result.message
    assert "waiting for the deploy lock held by run #5 on otherhost" in log.text()
    assert current(target) == f"releases/{release(4)}"


# ---------------------------------------------------------------------- redeploy, disk, rollback


def test_redeploy_sends_only_what_changed(sshd: SshServer, tmp_path: Path) -> None:
    target, log = tmp_path / "site", Log()
    files: dict[str, str | bytes] = {f"d{i % 5}/f{i}.txt": f"file {i}\n" * 100 for i in range(50)}
    src = write_tree(tmp_path / "src", files)
    ok(deploy(spec(sshd.url(target)), src, make_ctx(1, log, sshd)))
    (src / "d0" / "f0.txt").write_text("changed\n")
    (src / "d1" / "f1.txt").chmod(0o755)  # a mode change is a change too
    (src / "new.txt").write_text("new\n")
    ok(deploy(spec(sshd.url(target)), src, make_ctx(2, log, sshd)))

    r1, r2 = target / "releases" / release(1), target / "releases" / release(2)
    assert f"uploading release {release(2)}: 3 files (0.7 kB) to send, 48 unchanged files linked from " \
           f"{release(1)}" in log.text()
    assert os.stat(r1 / "d2" / "f2.txt").st_ino == os.stat(r2 / "d2" / "f2.txt").st_ino
    assert os.stat(r1 / "d0" / "f0.txt").st_ino != os.stat(r2 / "d0" / "f0.txt").st_ino
    assert (r2 / "d0" / "f0.txt").read_text() == "changed\n"
    assert (r1 / "d0" / "f0.txt").read_text() == "file 0\n" * 100  # never written through the link
    assert os.stat(r2 / "d1" / "f1.txt").st_mode & 0o777 == 0o755
    assert os.stat(r1 / "d1" / "f1.txt").st_mode & 0o777 == 0o644
    assert (r2 / "new.txt").read_text() == "new\n"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs (needs root); skipped where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_full_disk_mid_upload_fails_and_keeps_current(sshd: SshServer, small_disk: Path, tmp_path: Path) -> None:
    local, remote, log = small_disk / "local", small_disk / "remote", Log()
    s = spec(url(local), sshd.url(remote))
    ok(deploy(s, write_tree(tmp_path / "small", {"index.html": "v1"}), make_ctx(1, log, sshd)))
    big = write_tree(tmp_path / "big", {"index.html": "v2", "blob": os.urandom(3 * 2**20)})
    result = deploy(s, big, make_ctx(2, log, sshd))

    assert result.status == FAILED, result.message
    assert "no space left on device" in result.message
    assert "free space on" in result.message
    assert url(local) in result.message or sshd.url(remote) in result.message
    for t in (local, remote):
        assert current(t) == f"releases/{release(1)}"
        assert sorted(os.listdir(t / "releases")) == [release(1)]  # the partial release removed


def test_rollback_to_previous_and_to_a_named_release(tmp_path: Path) -> None:
    a, b, log = tmp_path / "a", tmp_path / "b", Log()
    src = write_tree(tmp_path / "src", {"a": "a"})
    for run in (1, 2, 3):
        ok(deploy(spec(url(a), url(b)), src, make_ctx(run, log)))

    back = roll([url(a), url(b)], make_ctx(9, log))
    assert (back.status, back.release) == (ROLLED_BACK, release(2))
    assert [(t.previous, t.current) for t in back.targets] == [(release(3), release(2))] * 2
    named = roll([url(a), url(b)], make_ctx(9, log), to=release(1))
    assert (named.status, named.release) == (ROLLED_BACK, release(1))
    assert current(a) == current(b) == f"releases/{release(1)}"

    nothing = roll([url(a)], make_ctx(9, log))
    assert nothing.status == FAILED and f"no complete release before {release(1)}" in nothing.message
    unknown = roll([url(a)], make_ctx(9, log), to="42-deadbee")
    assert unknown.status == FAILED
    assert 'no complete release "42-deadbee" on every target' in unknown.message and release(3) in unknown.message

    ok(deploy(spec(url(a)), src, make_ctx(4, log)))
    rolled_back(roll([url(b)], make_ctx(9, log), to=release(2)))  # a: 4 current (3 before), b: 2 (1 before)
    disagree = roll([url(a), url(b)], make_ctx(9, log))
    assert disagree.status == FAILED and "disagree" in disagree.message and "--to" in disagree.message
    assert current(a) == f"releases/{release(4)}"


def test_incomplete_release_is_never_used(tmp_path: Path) -> None:
    target, log = tmp_path / "site", Log()
    src = write_tree(tmp_path / "src", {"index.html": "ok"})
    for run in (1, 2):
        ok(deploy(spec(url(target), keep=3), src, make_ctx(run, log)))
    broken = target / "releases" / release(3)  # as a dropped connection leaves it: no marker
    write_tree(broken, {"index.html": "half"})

    assert list_releases(url(target), make_ctx(9, log)) == [release(1), release(2)]
    refused = roll([url(target)], make_ctx(9, log), to=release(3))
    assert refused.status == FAILED and f'no complete release "{release(3)}"' in refused.message

    ok(deploy(spec(url(target), keep=3), src, make_ctx(4, log)))
    # keep = 3 counts 1, 2 and 4 only; the incomplete 3 is removed as a leftover
    assert sorted(os.listdir(target / "releases")) == [release(1), release(2), release(4)]
    back = roll([url(target)], make_ctx(9, log))
    assert back.release == release(2)

    write_tree(broken, {"index.html": "half"})
    ok(deploy(spec(url(target)), src, make_ctx(3, log)))  # the same release again: rebuilt, complete
    assert (broken / ".gitpipe-complete").exists() and (broken / "index.html").read_text() == "ok"


def test_read_current_after_a_crash_reports_the_truth(tmp_path: Path) -> None:
    a, b, log = tmp_path / "a", tmp_path / "b", Log()
    src = write_tree(tmp_path / "src", {"a": "a"})
    for run in (1, 2):
        ok(deploy(spec(url(a), url(b)), src, make_ctx(run, log)))
    os.symlink(f"releases/{release(1)}", b / "current.tmp-x")
    os.replace(b / "current.tmp-x", b / "current")  # as if a crash hit between two targets
    outcomes = read_current([url(a), url(b)], make_ctx(9, log))
    assert [(o.url, o.previous, o.current) for o in outcomes] == [
        (url(a), release(1), release(2)), (url(b), None, release(1))]
    with pytest.raises(DeployError, match="cannot connect"):
        read_current([f"ssh://nobody@127.0.0.1:1{tmp_path}"], make_ctx(9, log))




def test_rollback_runs_after_switch_and_the_healthcheck_and_keeps_the_switch_when_they_fail(tmp_path: Path) -> None:
    target, log, ran = tmp_path / "site", Log(), tmp_path / "ran"
    src = write_tree(tmp_path / "src", {"a": "a"})
    for run in (1, 2):
        ok(deploy(spec(url(target)), src, make_ctx(run, log)))
    scripts = spec(url(target), after_switch=f'echo "after $GITPIPE_RUN $PWD" >> {q(ran)}',
                   healthcheck=f"echo check >> {q(ran)}; test ! -e {q(tmp_path / 'sick')}", healthcheck_retries=1)
    back = rolled_back(rollback([url(target)], make_ctx(1, log), release(1), scripts))
    assert back.warning == "" and f"rolled back from {release(2)} to {release(1)}" in back.message
    assert ran.read_text().splitlines() == [f"after 1 {target}/releases/{release(1)}", "check"]
    (tmp_path / "sick").write_text("")
    sick = rollback([url(target)], make_ctx(2, log), release(2), scripts)
    assert sick.status == ROLLED_BACK and current(target) == f"releases/{release(2)}"  # the switch stays
    assert sick.warning.startswith(f"HEALTHCHECK FAILED: healthcheck failed on {url(target)} after 2 attempt(s)")
    failing = dataclasses.replace(scripts, after_switch="exit 4")
    broken = rollback([url(target)], make_ctx(1, log), release(1), failing)
    assert broken.warning.startswith(f"AFTER_SWITCH FAILED: after_switch failed on {url(target)} (exit status 4)")
    assert current(target) == f"releases/{release(1)}"
