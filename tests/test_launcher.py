"""Parked launchers (gitpipe/launcher.py): an attempt's first process waits in its cgroup before
the attempt is known, so that starting it moves nothing into a cgroup. Real perl, real bwrap,
real cgroups (root's on this host), real daemons killed for real."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import Home, children, descendants, pipeline, wait_for
from helpers import git as run_git

from gitpipe import cgroup, executor, launcher, seccomp, settings
from gitpipe import git as gitmod
from gitpipe.launcher import Parked
from gitpipe.sandbox import Confine, Sandbox
from gitpipe.scheduler import _Made, _made_for

pytestmark = pytest.mark.timeout(120)
IS_ROOT = os.geteuid() == 0


def _needs_root() -> None:
    if not IS_ROOT:
        pytest.skip("cgroup hierarchies are root's on this host (see test_sandbox's docstring)")


def _sandbox(tmp_path: Path) -> tuple[Sandbox, Path]:
    home = Home(tmp_path / "w")
    home.gitpipe("init", check=True)
    sandbox = Sandbox.for_host(settings.load(home.home))
    assert sandbox.tree is not None, "a root daemon gets a cgroup per attempt"
    slot = tmp_path / "slot"
    (slot / "tree").mkdir(parents=True)
    return sandbox, slot


def _parked(sandbox: Sandbox) -> None:
    sandbox.park()
    assert sandbox.launchers is not None
    wait_for(lambda: sandbox.launchers.waiting, what="a parked launcher")


def _is_perl(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/exe").resolve().name.startswith("perl")
    except OSError:
        return False


def test_an_attempt_from_a_parked_launcher_runs_in_its_group_with_exactly_its_environment(tmp_path: Path) -> None:
    """The launcher is in the group before the attempt exists; it becomes bwrap there: the
    script is a member from its first instruction, its output comes down the launcher's pipe,
    its environment is what the daemon gave (nothing of Perl's), and its exit status is kept."""
    _needs_root()
    sandbox, slot = _sandbox(tmp_path)
    try:
        _parked(sandbox)
        parked = sandbox.launchers.ready
        assert parked is not None and parked.proc.pid in parked.group.members()
        box = Confine(key="a1.1", home=slot / "home", tree=slot / "tree", name="r", output=slot / "output")
        script = "cat /proc/self/cgroup > own; env | sort > env; echo out; echo err >&2; sleep 0.3; exit 3"
        launch = sandbox.launch(["bash", "-c", script], {"ONE": "1", "SPACED": "a b\tc"}, box, parked=True)
        assert launch.parked is parked and launch.group is parked.group
        assert sandbox.groups["a1.1"] is parked.group  # what Sandbox.ended finds it by
        proc = launch.popen(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
        assert proc.pid == parked.proc.pid  # the launcher became bwrap: the same process
        time.sleep(0.15)
        members = launch.group.members()
        assert proc.stdout is not None
        out = proc.stdout.read()
        assert proc.wait() == 3
        assert out.split() == [b"out", b"err"]
        assert proc.pid in members and len(members) >= 3, members  # bwrap, the sandbox's init, bash
        env = (slot / "tree" / "env").read_text().splitlines()
        assert "ONE=1" in env and "SPACED=a b\tc" in env
        assert not [line for line in env if line.startswith("PERL")]
        # It started inside the group and made its cgroup namespace there: the group is its root.
        assert all(line.endswith(":/") for line in (slot / "tree" / "own").read_text().splitlines()
                   if ":pids:" in line or ":memory:" in line)
        launch.group.remove()
        _parked(sandbox)  # another one was parked meanwhile
        assert sandbox.launchers.ready is not parked
    finally:
        sandbox.close()
    assert sandbox.launchers.ready is None


def test_without_a_parked_launcher_an_attempt_starts_held_as_before(tmp_path: Path) -> None:
    """A launcher killed from outside is not used (nor is its group left behind): the attempt
    starts bwrap held, in a group named by its key, and a new launcher is parked."""
    _needs_root()
    sandbox, slot = _sandbox(tmp_path)
    try:
        _parked(sandbox)
        dead = sandbox.launchers.ready
        assert dead is not None
        os.kill(dead.proc.pid, signal.SIGKILL)
        dead.proc.wait()
        box = Confine(key="a2.1", home=slot / "home", tree=slot / "tree", name="r", output=slot / "output")
        launch = sandbox.launch(["bash", "-c", "echo held"], {}, box, parked=True)
        assert launch.parked is None and launch.group is not None
        assert launch.group.dirs[0].name == "a2.1"
        assert not any(d.exists() for d in dead.group.dirs)
        proc = launch.popen(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
        assert proc.stdout is not None and proc.stdout.read() == b"held\n" and proc.wait() == 0
        launch.group.remove()
        _parked(sandbox)
    finally:
        sandbox.close()


def test_a_daemon_killed_with_a_launcher_parked_leaves_nothing_running(tmp_path: Path) -> None:
    """The daemon parks a launcher once it is up. Killed with -9, it closes the order pipe by
    dying: the launcher reads an empty order and exits, having run nothing. The next daemon's
    sweep removes its group; a stopped daemon takes its launcher along."""
    _needs_root()
    home = Home(tmp_path / "w")
    home.gitpipe("init", check=True)
    sandbox = Sandbox.for_host(settings.load(home.home))
    assert sandbox.tree is not None
    bases = sandbox.tree.bases
    log = tmp_path / "killed.log"
    with open(log, "wb") as out:
        killed = subprocess.Popen(home.argv("serve"), env=home.env(), stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        launcher = wait_for(lambda: next((p for p in children(killed.pid) if _is_perl(p)), None),
                            what="a launcher parked by the daemon")
        wait_for(lambda: any(str(launcher) in (d / "cgroup.procs").read_text().split()
                             for base in bases for d in base.iterdir() if d.name.startswith("parked-")),
                 what="the launcher in its group")
    finally:
        killed.kill()
        killed.wait()
    wait_for(lambda: not Path(f"/proc/{launcher}").exists() or _zombie(launcher),
             what="the launcher to end with its daemon")
    left = [d for base in bases if base.exists() for d in base.iterdir() if d.is_dir()]
    with home.daemon() as daemon:
        wait_for(lambda: not any(d.exists() for d in left), what="the sweep of the dead daemon's groups")
        repo = home.add_repo("app")
        run = home.push_run(repo, {".pipeline.toml": pipeline("""
            [[stage]]
            name = "build"
              [[stage.action]]
              name = "build"
              run = "echo built"
            """)})
        assert home.wait_run(run)["status"] == "succeeded"
        launcher = wait_for(lambda: next((p for p in children(daemon.pid) if _is_perl(p)), None),
                            what="the next launcher parked")
    assert not Path(f"/proc/{launcher}").exists() or _zombie(launcher), "a stopped daemon left its launcher"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def test_a_launcher_whose_order_ends_early_runs_nothing(tmp_path: Path) -> None:
    """A daemon killed in the middle of writing an order (one larger than the pipe holds goes in
    several writes) closes the pipe by dying: the launcher then holds the first part of an order.
    It must run nothing of it: not a bwrap without the last variables, nor a script cut short."""
    _needs_root()
    sandbox, slot = _sandbox(tmp_path)
    try:
        _parked(sandbox)
        box = Confine(key="a3.1", home=slot / "home", tree=slot / "tree", name="r", output=slot / "output")
        launch = sandbox.launch(["bash", "-c", "touch ran"], {"ONE": "1", "LAST": "x" * 100}, box, parked=True)
        assert launch.parked is not None
        read, write = os.pipe()  # the order, exactly as the daemon writes it
        Parked(launch.parked.proc, write, launch.parked.group).exec(launch.argv, launch.env, launch.cwd)
        with os.fdopen(read, "rb") as whole:
            order = whole.read()
        os.write(launch.parked.orders, order[:-50])  # the daemon dies here: its pipe closes
        os.close(launch.parked.orders)
        proc = launch.parked.proc
        proc.wait(30)
        assert proc.stdout is not None
        said = proc.stdout.read()
        proc.stdout.close()
        assert not (slot / "tree" / "ran").exists(), f"a cut order was run: {said!r}"
        launch.group.remove()
    finally:
        sandbox.close()


KILLED_AFTER_ORDER = """
import os, signal, subprocess, sys
from pathlib import Path
from gitpipe import settings
from gitpipe.sandbox import Confine, Sandbox
home, slot = Path(sys.argv[1]), Path(sys.argv[2])
sandbox = Sandbox.for_host(settings.load(home))
sandbox.park()
while not sandbox.launchers.waiting:
    pass
box = Confine(key="a4.1", home=slot / "home", tree=slot / "tree", name="r", output=slot / "output")
launch = sandbox.launch(["bash", "-c", "touch ran"], {}, box, parked=True)
(slot / "group").write_text("\\n".join(str(d) for d in launch.group.dirs))
(slot / "launcher").write_text(str(launch.parked.proc.pid))
os.kill(launch.parked.proc.pid, signal.SIGSTOP)  # not scheduled yet when its daemon dies
launch.popen(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
os.kill(os.getpid(), signal.SIGKILL)  # the order is written
"""


def test_a_daemon_killed_right_after_an_order_leaves_no_script_running(tmp_path: Path) -> None:
    """kill -9 of the daemon the moment it has written an attempt's order, before the launcher
    ran again (it is stopped meanwhile, as an unscheduled process is): the launcher must die
    with its daemon, not become a bwrap whose --die-with-parent binds it to nobody and run the
    script to its end unsupervised (no deadline, no log) until a next daemon's sweep."""
    _needs_root()
    home = Home(tmp_path / "w")
    home.gitpipe("init", check=True)
    slot = tmp_path / "slot"
    (slot / "tree").mkdir(parents=True)
    daemon = subprocess.run([sys.executable, "-c", KILLED_AFTER_ORDER, str(home.home), str(slot)],
                            env=home.env(), capture_output=True, timeout=60, check=False)
    assert daemon.returncode == -signal.SIGKILL, daemon.stderr.decode()
    group = cgroup.Group(tuple(Path(d) for d in (slot / "group").read_text().split()), None, None)
    try:
        try:
            os.kill(int((slot / "launcher").read_text()), signal.SIGCONT)
        except ProcessLookupError:
            pass
        wait_for(lambda: not group.members(), what="the launcher to end")
        assert not (slot / "tree" / "ran").exists(), "the script ran on after its daemon was killed"
    finally:
        group.remove()
        Sandbox.for_host(settings.load(home.home)).close()


def test_an_attempt_outlives_the_thread_that_parked_its_launcher(tmp_path: Path) -> None:
    """bwrap's --die-with-parent binds the sandbox to the thread that forked its first process
    (prctl(2): the parent is a thread). A launcher parked by a thread that ends a moment after
    (a busy daemon's GIL can make that moment last for milliseconds) must not take the attempt
    with it: the thread's end is held back here, as such a daemon does, until the script runs."""
    _needs_root()
    sandbox, slot = _sandbox(tmp_path)
    try:
        sandbox.park()
        assert sandbox.launchers is not None
        threading._active_limbo_lock.acquire()  # type: ignore[attr-defined]  # a thread's end waits for it
        try:
            wait_for(lambda: sandbox.launchers.waiting, what="a parked launcher")
            box = Confine(key="a5.1", home=slot / "home", tree=slot / "tree", name="r", output=slot / "output")
            launch = sandbox.launch(["bash", "-c", "touch started; sleep 0.5; echo done"], {}, box, parked=True)
            proc = launch.popen(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
            wait_for(lambda: (slot / "tree" / "started").exists(), what="the script")
        finally:
            threading._active_limbo_lock.release()  # type: ignore[attr-defined]
        assert proc.stdout is not None
        out = proc.stdout.read()
        proc.stdout.close()
        assert (proc.wait(), out) == (0, b"done\n")
        launch.group.remove()
    finally:
        sandbox.close()


def test_an_attempt_whose_log_cannot_be_opened_lets_its_launcher_go(tmp_path: Path) -> None:
    """A log that cannot be opened (a full disk) stops the attempt before it starts: the launcher
    it took ends with its group, and the daemon keeps neither its order pipe nor its process
    (one descriptor leaked per such attempt, for as long as the daemon runs)."""
    _needs_root()
    sandbox, slot = _sandbox(tmp_path)
    try:
        _parked(sandbox)
        box = Confine(key="a6.1", home=slot / "home", tree=slot / "tree", name="r", output=slot / "output")
        launch = sandbox.launch(["bash", "-c", "touch ran"], {}, box, parked=True)
        parked = launch.parked
        assert parked is not None
        pipe = os.fstat(parked.orders).st_ino
        (tmp_path / "file").write_text("")
        writer = executor.LogWriter(tmp_path / "file" / "log")  # under a file: it cannot be opened
        with pytest.raises(OSError, match="its log could not be opened"):
            executor.start(launch, writer, "token")
        try:
            still = os.fstat(parked.orders).st_ino == pipe
        except OSError:
            still = False
        assert not still, "the launcher's order pipe stayed open in the daemon"
        assert parked.proc.returncode is not None, "the launcher was never waited for"
        assert not (slot / "tree" / "ran").exists()
    finally:
        sandbox.close()


# ---------------------------------------------------------------- sandboxes made ahead (Sandbox.ready)
def _status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def _waiting_inside(pids: set[int], uid: int) -> list[int]:
    """The launchers among `pids` that wait inside a sandbox: perl, as the build user, no_new_privs."""
    return [p for p in pids if _is_perl(p) and _status(p).get("Uid", "").split()[:1] == [str(uid)]
            and _status(p).get("NoNewPrivs", "").strip() == "1"]


def test_a_sandbox_made_ahead_runs_its_script_as_the_build_user_with_exactly_its_environment(tmp_path: Path) -> None:
    """The next action's sandbox is made while the action before runs: bwrap in the attempt's
    group, mounts made, the user dropped, a launcher waiting inside. Nothing of the script runs
    before its order; then it runs in /build/<repo> as the build user with exactly the environment
    given at that moment (a loader variable too, which reaches only the script), its output down
    the pipe and its exit status kept."""
    _needs_root()
    sandbox, slot = _sandbox(tmp_path)
    try:
        box = Confine(key="a3.1", home=slot / "home", tree=slot / "tree", name="r", output=slot / "output")
        ready = sandbox.ready(box)
        assert ready is not None
        uid = sandbox.uid if sandbox.uid is not None else os.getuid()
        waiting = wait_for(lambda: _waiting_inside(ready.group.members(), uid), what="the launcher inside")
        # bwrap's monitor stays out of the group (see sandbox.Launch.popen); its init and the launcher are in
        assert len(waiting) == 1 and ready.proc.pid not in ready.group.members()
        assert list((slot / "tree").iterdir()) == [], "something ran before the order"
        script = ('id -u > uid; pwd > pwd; env | sort > env; echo k=v >> "$GITPIPE_OUTPUT"; echo out; '
                  "echo err >&2; exit 3")
        launch = sandbox.launch(["bash", "-c", script], {"ONE": "1", "LD_BIND_NOW": "1"}, box, prepared=True,
                                ready=ready)
        assert launch.parked is ready and sandbox.groups["a3.1"] is ready.group
        proc = launch.popen(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
        assert proc.pid == ready.proc.pid  # bwrap's monitor, started ahead
        assert proc.stdout is not None
        out = proc.stdout.read()
        proc.stdout.close()
        assert (proc.wait(), out.split()) == (3, [b"out", b"err"])
        tree = slot / "tree"
        assert (tree / "uid").read_text().strip() == str(uid) and (tree / "pwd").read_text().strip() == "/build/r"
        env = (tree / "env").read_text().splitlines()
        assert {"ONE=1", "LD_BIND_NOW=1", "HOME=/home/build", "GITPIPE_OUTPUT=/run/gitpipe/output"} <= set(env)
        assert not [line for line in env if line.startswith("PERL")]
        assert (slot / "output").read_text() == "k=v\n"
        launch.group.remove()
    finally:
        sandbox.close()


CREDENTIALS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp")


def test_a_sandbox_made_ahead_gives_its_script_exactly_the_credentials_setpriv_gives(tmp_path: Path) -> None:
    """In a root daemon's sandbox made ahead, the launcher inside drops to the build user itself
    (launcher.become) rather than after setpriv: the script must find exactly what a sandbox
    started at once (setpriv) gives, line by line of /proc/self/status: the build user's uid and
    gid (real, effective, saved, fs), no supplementary group, no capability left (inheritable and
    ambient too), no_new_privs."""
    _needs_root()
    sandbox, slot = _sandbox(tmp_path)
    seen = []
    try:
        for key, ahead in (("a5.1", True), ("a6.1", False)):
            box = Confine(key=key, home=slot / "home", tree=slot / "tree", name="r", output=slot / "output")
            ready = sandbox.ready(box) if ahead else None
            assert ready is not None or not ahead
            launch = sandbox.launch(["bash", "-c", "cat /proc/self/status"], {}, box, prepared=ahead, ready=ready)
            proc = launch.popen(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
            out = proc.communicate()[0].decode()
            assert proc.returncode == 0, out
            assert launch.group is not None
            launch.group.remove()
            fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
            seen.append({name: fields[name].split() for name in CREDENTIALS})
    finally:
        sandbox.close()
    assert seen[0] == seen[1]
    assert seen[0]["Uid"] == [str(sandbox.uid)] * 4 and seen[0]["Gid"] == [str(sandbox.gid)] * 4
    assert seen[0]["Groups"] == [] and seen[0]["NoNewPrivs"] == ["1"]
    assert {seen[0][c][0] for c in ("CapInh", "CapPrm", "CapEff", "CapAmb")} == {"0000000000000000"}


def _launched(prefix: list[str], perl: str, argv: list[str], bound: bool,
              user: tuple[int, int] | None = None) -> subprocess.CompletedProcess[str]:
    """A launcher (after `prefix`, say a bwrap) given the order to become `argv` in /, run to its end."""
    read, write = os.pipe()
    os.write(write, launcher.order(argv, {}, Path("/"), keep=False))
    os.close(write)
    try:
        return subprocess.run([*prefix, *launcher.command(perl, read, bound=bound, user=user)], pass_fds=(read,),
                              capture_output=True, text=True, timeout=60)
    finally:
        os.close(read)


def test_only_the_launcher_that_becomes_bwrap_gives_it_the_seccomp_program() -> None:
    """The parked launcher (bound to the daemon) puts bwrap's seccomp program in a pipe and names
    it after `--seccomp`, once; a launcher inside a sandbox runs the user's command line as it is,
    whatever it holds (found by an outside review: every such pair was rewritten)."""
    perl = launcher.find_perl()
    assert perl is not None
    placeholder = seccomp.options()[1]
    argv = ["/usr/bin/echo", "--seccomp", placeholder, "--", "--seccomp", placeholder]
    said = []
    for bound in (True, False):
        done = _launched([], perl, argv, bound=bound)
        assert done.returncode == 0, done.stderr
        said.append(done.stdout.split())
    assert said[0][0] == "--seccomp" and said[0][1].isdigit() and said[0][2:] == ["--", "--seccomp", placeholder]
    assert said[1] == argv[1:]


def test_a_launcher_that_cannot_become_the_build_user_runs_nothing_of_its_order() -> None:
    """Without the capabilities to change its user (bwrap gave none), the launcher inside says so
    and ends (126) before it reads its order: nothing of the script ever runs as root."""
    _needs_root()
    if not launcher.become():
        pytest.fail(f"no syscall numbers for {os.uname().machine}: setpriv drops there")
    perl = launcher.find_perl()
    assert perl is not None
    bwrap = ["bwrap", "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
             "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev", "--unshare-pid",
             "--cap-drop", "CAP_SETUID", "--"]
    done = _launched(bwrap, perl, ["/usr/bin/touch", "/dev/shm/ran"], bound=False, user=(65534, 65534))
    assert (done.returncode, done.stdout) == (126, "")
    assert "gitpipe: could not become the build user: Operation not permitted" in done.stderr


def test_a_sandbox_made_ahead_and_not_taken_runs_nothing_and_leaves_nothing(tmp_path: Path) -> None:
    """Discarded (the action before failed, the run was cancelled, its slot was reset again): its
    launcher reads an empty order and ends, bwrap with it, and its group goes."""
    _needs_root()
    sandbox, slot = _sandbox(tmp_path)
    try:
        box = Confine(key="a4.1", home=slot / "home", tree=slot / "tree", name="r", output=slot / "output")
        uid = sandbox.uid if sandbox.uid is not None else os.getuid()
        ready = sandbox.ready(box)
        assert ready is not None
        members = wait_for(lambda: _waiting_inside(ready.group.members(), uid) and ready.group.members(),
                           what="the sandbox's init and its launcher")
        ready.discard()
        assert ready.proc.returncode == 0
        assert not any(d.exists() for d in ready.group.dirs)
        assert not any(Path(f"/proc/{p}").exists() and not _zombie(p) for p in {*members, ready.proc.pid})
        assert list((slot / "tree").iterdir()) == []
    finally:
        sandbox.close()


AHEAD = """
[[stage]]
name = "one"
  [[stage.action]]
  name = "a"
  run = '''echo v=from-a >> "$GITPIPE_OUTPUT"; cat /proc/[0-9]*/cmdline | tr '\\0' ' ' > seen; sleep 2'''
[[stage]]
name = "two"
  [[stage.action]]
  name = "b"
  run = '''test "$GITPIPE_OUT_A_V" = from-a; test "$GITPIPE_ATTEMPT" = 1; test ! -e seen; echo b-ran; sleep 2; exit 1'''
[[stage]]
name = "three"
  [[stage.action]]
  name = "c"
  run = "echo c-ran"
"""


def test_the_next_action_waits_in_a_sandbox_made_ahead_that_the_one_before_cannot_see(home: Home) -> None:
    """While an action runs, the next one's sandbox waits for it, made in the other worktree: the
    running script cannot see it (its /proc is its own), and the next one still gets what the
    first left for it (its outputs, read when it starts), in a fresh tree. When that one fails,
    the sandbox made for the action after it is let go: nothing of it is left."""
    _needs_root()
    sandbox = Sandbox.for_host(settings.load(home.home))
    assert sandbox.tree is not None
    uid = sandbox.uid if sandbox.uid is not None else os.getuid()
    repo = home.add_repo("app")
    with home.daemon() as daemon:
        run = home.push_run(repo, {".pipeline.toml": AHEAD})
        waiting = wait_for(lambda: _waiting_inside(descendants(daemon.pid), uid), timeout=30,
                           what="the next action's sandbox, made while the first runs")
        ahead = wait_for(lambda: [p for p in _waiting_inside(descendants(daemon.pid), uid) if p not in waiting],
                         timeout=30, what="the third action's sandbox, made while the second runs")
        # the second action's script is the launcher that waited for it (it became its bash)
        assert [Path(f"/proc/{p}/exe").resolve().name for p in waiting] == ["bash"]
        result = home.wait_run(run)
        assert result["status"] == "failed"
        wait_for(lambda: not any(Path(f"/proc/{p}").exists() and not _zombie(p) for p in ahead),
                 what="the unused sandbox to end")
        assert not _waiting_inside(descendants(daemon.pid), uid)
        groups = [d.name for base in sandbox.tree.bases if base.exists() for d in base.iterdir() if d.is_dir()]
        assert not [g for g in groups if g.startswith("a")], groups
    logs = home.logs(run)
    assert "b-ran" in logs and "c-ran" not in logs
    seen = (home.home / "work").glob("app/*/tree/seen")
    assert all("perl" not in p.read_text() for p in seen)
    statuses = {a["name"]: a["status"] for s in result["stages"] for a in s["actions"]}
    assert statuses == {"a": "succeeded", "b": "failed", "c": "skipped"}, statuses


def test_a_daemon_killed_while_a_sandbox_waits_ahead_takes_it_along(home: Home, tmp_path: Path) -> None:
    """kill -9 of the daemon while the next action's sandbox waits: bwrap dies with the daemon
    (--die-with-parent, forked by a thread that lives as long as the daemon), the launcher inside
    with it, having run nothing; the next daemon's sweep removes its group."""
    _needs_root()
    sandbox = Sandbox.for_host(settings.load(home.home))
    assert sandbox.tree is not None
    uid = sandbox.uid if sandbox.uid is not None else os.getuid()
    repo = home.add_repo("app")
    with open(tmp_path / "killed.log", "wb") as out:
        killed = subprocess.Popen(home.argv("serve"), env=home.env(), stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        home.push_run(repo, {".pipeline.toml": pipeline("""
            [[stage]]
            name = "one"
              [[stage.action]]
              name = "a"
              run = "sleep 60"
            [[stage]]
            name = "two"
              [[stage.action]]
              name = "b"
              run = "echo b-ran"
            """)})
        waiting = wait_for(lambda: _waiting_inside(descendants(killed.pid), uid), timeout=30,
                           what="the second action's sandbox, made ahead")
        inside = {p for p in descendants(killed.pid)}
    finally:
        killed.kill()
        killed.wait()
    wait_for(lambda: not any(Path(f"/proc/{p}").exists() and not _zombie(p) for p in inside),
             what="every process of the killed daemon's sandboxes to end")
    assert waiting
    left = [d for base in sandbox.tree.bases if base.exists() for d in base.iterdir() if d.is_dir()]
    with home.daemon():
        wait_for(lambda: not any(d.exists() for d in left), what="the sweep of the dead daemon's groups")


KILLED_MAKING_AHEAD = r"""
import json, os, signal, sys
from pathlib import Path
from gitpipe import sandbox as sandbox_module, settings

home, slot = Path(sys.argv[1]), Path(sys.argv[2])


def crash(group, pid):  # the daemon dies between bwrap's start and the cgroup move
    ppid = [line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("PPid:")]
    (slot / "pids").write_text(json.dumps([pid, int(ppid[0])]))
    os.kill(os.getpid(), signal.SIGKILL)


sandbox_module._admit = crash
(home / "ahead").mkdir()  # as a serving daemon has it (headsup.py): removed only by a clean stop
sandbox = sandbox_module.Sandbox.for_host(settings.load(home))
box = sandbox_module.Confine(key="a7.1", home=slot / "home", tree=slot / "tree", name="r", output=slot / "output")
sandbox.ready(box)
"""


def _lingering(pids: list[int]) -> str:
    """What `pids` and their descendants are doing: state, wait channel, command line, and for
    each pipe they hold, which other processes hold it too (what an EOF would wait for)."""
    def read(path: Path) -> str:
        try:
            return path.read_text(errors="replace").replace("\0", " ").strip()
        except OSError as exc:
            return f"<{exc.strerror}>"

    procs = [d for d in Path("/proc").iterdir() if d.name.isdigit()]
    children: dict[str, list[str]] = {}
    holders: dict[str, list[str]] = {}
    for d in procs:
        stat = read(d / "stat").rsplit(")", 1)[-1].split()
        if len(stat) > 1:
            children.setdefault(stat[1], []).append(d.name)
        try:
            for fd in (d / "fd").iterdir():
                holders.setdefault(os.readlink(fd), []).append(f"{d.name}:{fd.name}")
        except OSError:
            pass
    todo, seen, lines = [str(p) for p in pids], set(), []
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        todo += children.get(pid, [])
        d = Path("/proc") / pid
        lines.append(f"{pid}: {read(d / 'stat')[:60]} wchan={read(d / 'wchan')} cmd={read(d / 'cmdline')[:200]}")
        try:
            for fd in d.joinpath("fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("pipe:"):
                    lines.append(f"  fd {fd.name} {link} held by {holders.get(link)}")
        except OSError:
            pass
    return "\n".join(lines)


def test_a_daemon_killed_while_making_a_sandbox_ahead_leaves_nothing_behind(tmp_path: Path) -> None:
    """kill -9 of the daemon between the start of a sandbox made ahead and its cgroup move. A
    held start's bwrap then stays blocked until the next daemon kills it by its attempt's token;
    one made ahead has no attempt yet. It runs nothing but its launcher, which runs nothing
    without an order from the (dead) daemon: mostly its EOF ends it at once. But bwrap lets its
    sandbox's first process go on only after writing its info, and a daemon killed in between
    takes bwrap's monitor along before it does: that process then waits forever (3 full-suite
    runs in 7 here, outside every group). The next daemon ends it by this home's token."""
    _needs_root()
    home = Home(tmp_path / "w")
    home.gitpipe("init", check=True)
    slot = tmp_path / "slot"
    (slot / "tree").mkdir(parents=True)
    daemon = subprocess.run([sys.executable, "-c", KILLED_MAKING_AHEAD, str(home.home), str(slot)],
                            env=home.env(), capture_output=True, timeout=60, check=False)
    assert daemon.returncode == -signal.SIGKILL, daemon.stderr.decode()
    pids = [int(p) for p in json.loads((slot / "pids").read_text())]

    def left() -> list[int]:
        return [p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)]

    token = f"{executor.TOKEN_VAR}=ahead-{Sandbox.for_host(settings.load(home.home)).tag}".encode()
    try:
        end = time.monotonic() + 3
        while left() and time.monotonic() < end:
            time.sleep(0.05)
        for pid in left():  # one that waits: what the next daemon finds it by
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert token in environ, _lingering(pids)
        with home.daemon():
            try:
                wait_for(lambda: not left(), timeout=20, what="the next daemon to end the sandbox made ahead")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{_lingering(pids)}") from None
        assert list((slot / "tree").iterdir()) == []
    finally:
        for pid in left():
            os.kill(pid, signal.SIGKILL)


def test_an_order_that_cannot_be_written_closes_the_order_pipe_once(tmp_path: Path) -> None:
    """A variable execve cannot take (a NUL in an output value of the action before, which its
    script chose) ends the launcher made ahead unused. Its order pipe is closed where that is
    found, and must not be closed again when the attempt is let go (executor.start's abandon):
    by then the number may be another file's of the daemon (a log, the database), opened by
    another thread meanwhile, which that second close would take from under it."""
    _needs_root()
    sandbox, slot = _sandbox(tmp_path)
    try:
        box = Confine(key="a8.1", home=slot / "home", tree=slot / "tree", name="r", output=slot / "output")
        ready = sandbox.ready(box)
        assert ready is not None
        launch = sandbox.launch(["bash", "-c", "touch ran"], {"GITPIPE_OUT_A_V": "a\0b"}, box, prepared=True,
                                ready=ready)
        number = ready.orders
        with pytest.raises(ValueError, match="execve cannot take"):
            launch.popen(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True)
        other = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if other != number:  # the number is free again: the lowest one, unless another was
                os.dup2(other, number)
                os.close(other)
            launch.abandon()  # what executor.start does with an attempt whose start failed
            assert os.fstat(number).st_ino == (tmp_path / "other").stat().st_ino, "another file's fd was closed"
        finally:
            try:
                os.close(number)
            except OSError:
                pass
        assert ready.proc.returncode is not None and not any(d.exists() for d in ready.group.dirs)
        assert not (slot / "tree" / "ran").exists()
    finally:
        sandbox.close()


def test_a_script_its_launcher_cannot_start_says_why(tmp_path: Path) -> None:
    """An environment the kernel refuses (one value over 128 KiB: an output of the action before,
    as long as its script chose) fails the attempt; a held start says so ("Argument list too
    long", from Popen), and so must the launcher made ahead, which alone sees the exec fail:
    not a bare exit status 127, which reads as a command not found."""
    _needs_root()
    sandbox, slot = _sandbox(tmp_path)
    ready = None
    try:
        box = Confine(key="a9.1", home=slot / "home", tree=slot / "tree", name="r", output=slot / "output")
        ready = sandbox.ready(box)
        assert ready is not None
        launch = sandbox.launch(["bash", "-c", "touch ran"], {"GITPIPE_OUT_A_V": "x" * 200_000}, box, prepared=True,
                                ready=ready)
        proc = launch.popen(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
        assert proc.stdout is not None
        out = proc.stdout.read()
        proc.stdout.close()
        assert proc.wait() == 127
        assert b"could not start bash: Argument list too long" in out, out
        assert not (slot / "tree" / "ran").exists()
    finally:
        if ready is not None:
            ready.group.remove()
        sandbox.close()


def test_a_sandbox_made_ahead_that_died_before_its_order_is_not_used(home: Home) -> None:
    """A sandbox made ahead that ended before its action came (the OOM killer's pick, an admin's
    kill -9) is let go, and the action starts held, as one whose parked launcher was killed
    does (Launchers.take): its order is not written into a dead pipe, failing the action with
    "Broken pipe" for a sandbox that no pushed script could even see."""
    _needs_root()
    sandbox = Sandbox.for_host(settings.load(home.home))
    uid = sandbox.uid if sandbox.uid is not None else os.getuid()
    repo = home.add_repo("app")
    with home.daemon() as daemon:
        run = home.push_run(repo, {".pipeline.toml": pipeline("""
            [[stage]]
            name = "one"
              [[stage.action]]
              name = "a"
              run = "sleep 3"
            [[stage]]
            name = "two"
              [[stage.action]]
              name = "b"
              run = "echo b-ran"
            """)})
        waiting = wait_for(lambda: _waiting_inside(descendants(daemon.pid), uid), timeout=30,
                           what="the second action's sandbox, made ahead")
        for pid in waiting:
            os.kill(pid, signal.SIGKILL)
        result = home.wait_run(run)
    statuses = {a["name"]: (a["status"], a.get("message")) for s in result["stages"] for a in s["actions"]}
    assert statuses["b"] == ("succeeded", None), statuses
    assert "b-ran" in home.logs(run)
    # said in the daemon's log, with how it ended (a launcher that could not drop says why there)
    assert re.search(r"a sandbox made ahead for \S+ ended before its order \(exit -?\d+", daemon.log), daemon.log


def test_a_pushed_runs_first_action_starts_in_a_sandbox_made_while_its_worktree_was_reset(
        home: Home, tmp_path: Path) -> None:
    """The intake resets a pushed run's first worktree in the background; meanwhile the parked
    launcher becomes that action's bwrap (in its own group: no cgroup move), whose launcher
    inside waits for the order. Traced from the daemon's start (strace -f): the sandbox's process
    runs the launcher inside (perl), which becomes the build user itself (setpriv first where
    launcher.become cannot), then the script's bash; a sandbox started at the attempt (the repo's
    first push, whose slot has no tree yet to bind) runs bash right after setpriv. The script gets
    its own environment and the tree as pushed."""
    _needs_root()
    repo = home.add_repo("app")
    trace = tmp_path / "trace.txt"
    with open(tmp_path / "traced.log", "wb") as out:
        traced = subprocess.Popen(["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=execve", "-e",
                                   "status=successful", *home.argv("serve")], env=home.env(),
                                  stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: any(_is_perl(p) for p in descendants(traced.pid)), timeout=60,
                 what="a launcher parked by the traced daemon")
        for n in (1, 2):  # the repo's first push makes the slot; the second finds its tree there
            run = home.push_run(repo, {".pipeline.toml": pipeline("""
                [[stage]]
                name = "one"
                  [[stage.action]]
                  name = "first"
                  run = 'test "$GITPIPE_ACTION" = first; test -f .pipeline.toml; cat n; echo first-ran'
                """), "n": f"push {n}\n"})
            result = home.wait_run(run, timeout=120)
            assert result["status"] == "succeeded", result
    finally:
        for pid in children(traced.pid):  # the daemon (strace holds off signals sent to itself)
            os.kill(pid, signal.SIGTERM)
        traced.wait(60)
    assert "push 2\nfirst-ran" in home.logs(run)  # the tree as pushed, reset while the sandbox was made
    programs: dict[str, list[str]] = {}
    for line in trace.read_text().splitlines():
        pid, _, rest = line.partition(" ")
        if 'execve("' in rest:
            programs.setdefault(pid, []).append(rest.split('execve("', 1)[1].split('"', 1)[0].rsplit("/", 1)[-1])
    chains = sorted(p for p in programs.values() if p[-1] == "bash")  # the sandboxes' processes
    inside = ["perl", "bash"] if launcher.become() else ["setpriv", "perl", "bash"]
    assert chains == sorted([["setpriv", "bash"], inside]), programs


RETRIED_WITH_CACHE = """
[[stage]]
name = "one"
  [[stage.action]]
  name = "a"
  retries = 1
  cache = [{ paths = ["deps"] }]
  run = '''if [ "$(cat n)" = 1 ]; then mkdir -p deps && echo from-cache > deps/m; exit 0; fi
           test "$GITPIPE_ATTEMPT" = 2 || exit 1; cat deps/m'''
[[stage]]
name = "two"
  [[stage.action]]
  name = "b"
  run = "true"
"""


def test_a_retry_never_takes_the_sandbox_made_ahead_for_another_action(home: Home) -> None:
    """While `a`'s first attempt runs, the sandbox of `b` (the next action) is made in the other
    worktree; `a` fails and its retry checks that worktree out. That sandbox has none of `a`'s
    cache mounts (made before they were known): the retry runs in a sandbox of its own, with its
    cache restored."""
    _needs_root()
    repo = home.add_repo("app")
    with home.daemon():
        first = home.push_run(repo, {".pipeline.toml": RETRIED_WITH_CACHE, "n": "1\n"})
        assert home.wait_run(first)["status"] == "succeeded"
        run = home.push_run(repo, {".pipeline.toml": RETRIED_WITH_CACHE, "n": "2\n"})
        result = home.wait_run(run)
    logs = home.logs(run)
    assert "as an overlay" in logs, logs
    assert result["status"] == "succeeded", logs
    assert logs.split("attempt 2")[1].count("from-cache") == 1, logs


def test_a_first_sandbox_made_before_its_slot_was_started_afresh_is_not_used(tmp_path: Path) -> None:
    """The first action's sandbox is made as soon as what was beside the slot's tree is removed,
    before git works in the tree. When that reset gives up (here: its git finds the index lock a
    daemon killed in the middle of a checkout leaves) and the whole slot is made again, that sandbox binds the deleted tree, HOME and
    output file: it is let go then, whatever inode the new tree got (ext4 may hand the old one
    out again, and the action would run in a deleted folder).
    The action then runs in the new tree with a HOME and output file of its own."""
    _needs_root()
    sandbox, _ = _sandbox(tmp_path)
    bare = tmp_path / "app.git"
    gitmod.create_bare(bare)
    work = tmp_path / "clone"
    run_git(tmp_path, "clone", "--quiet", str(bare), str(work))
    (work / "src").mkdir()
    (work / "src" / "a.txt").write_text("tracked\n")
    run_git(work, "add", ".")
    run_git(work, "commit", "--quiet", "-m", "one")
    run_git(work, "push", "--quiet", "origin", "HEAD:refs/heads/main")
    sha = run_git(work, "rev-parse", "HEAD").stdout.strip()
    uid = sandbox.uid if sandbox.uid is not None else os.getuid()
    try:
        _parked(sandbox)
        with gitmod.WorktreePool(tmp_path / "wt", "app", bare, settle=sandbox.settle).checkout(sha) as slot:
            # its next reset runs git (a tracked file changed), which finds the lock a daemon killed
            # in the middle of a checkout leaves: the slot is started afresh
            (slot.tree / "src" / "a.txt").write_text("changed\n")
            (slot.git_dir / "index.lock").write_text("")
        made: list[_Made] = []

        def during(slot: gitmod.Slot) -> _Made | None:
            box = Confine(key="first", home=slot.root / "home", tree=slot.tree, name="app", output=slot.root / "output")
            ready = _Made.of(box, sandbox.ready(box, parked=True))
            assert ready is not None
            made.append(ready)
            wait_for(lambda: _waiting_inside(descendants(ready.ready.proc.pid), uid), what="its mounts made")
            return ready

        pool = gitmod.WorktreePool(tmp_path / "wt", "app", bare, settle=sandbox.settle, ahead=1)
        pool.prepare_next(sha, during=during)
        with pool.checkout(sha) as slot:
            assert made, "no sandbox was made during the reset"
            box = replace(made[0].box, key="a1.1")
            # let go with the slot's old tree: never left to a check by inode, which ext4 reuses
            assert slot.ahead is None and made[0].ready.proc.poll() is not None
            taken = _made_for(slot, box)
            if taken is None:
                sandbox.prepare(box)
            else:
                sandbox.settle(slot.tree)
            script = 'cat src/a.txt && touch "$HOME/h" && echo k=v > "$GITPIPE_OUTPUT"'
            launch = sandbox.launch(["bash", "-c", script], {}, box, prepared=True,
                                    ready=taken.ready if taken is not None else None)
            proc = launch.popen(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
            out = proc.communicate()[0]
            launch.group.remove()
            assert (proc.returncode, out) == (0, b"tracked\n"), out
            assert (slot.root / "output").read_text() == "k=v\n" and (slot.root / "home" / "h").exists()
        pool.close()
    finally:
        sandbox.close()


QUEUED = """
[trigger]
superseded = "queue"
[[stage]]
name = "one"
  [[stage.action]]
  name = "a"
  run = "sleep 60"
"""
TWO = """
[[stage]]
name = "one"
  [[stage.action]]
  name = "a"
  run = "true"
[[stage]]
name = "two"
  [[stage.action]]
  name = "b"
  run = "true"
"""


def test_a_first_sandbox_let_go_unused_parks_its_launcher_again(home: Home) -> None:
    """A push's first sandbox takes the parked launcher without parking another (that waits for
    its attempt's start). When its run does not start (here it waits for the run before it of the
    same branch), the sandbox is let go and a launcher parked again: the next push does not lose
    it until some attempt starts."""
    _needs_root()
    repo = home.add_repo("app")
    with home.daemon() as daemon:
        assert home.wait_run(home.push_run(repo, {".pipeline.toml": TWO}))["status"] == "succeeded"  # two slots
        home.push_run(repo, {".pipeline.toml": QUEUED})

        def parked() -> list[int]:
            return [p for p in children(daemon.pid) if _is_perl(p)]

        wait_for(lambda: [p for p in descendants(daemon.pid) if Path(f"/proc/{p}/cmdline").read_bytes()
                          == b"sleep\x0060\x00"], timeout=30, what="the first run's attempt")
        before = wait_for(parked, timeout=30, what="a launcher parked once that attempt started")
        second = home.push_run(repo, {".pipeline.toml": QUEUED, "n": "2\n"})
        wait_for(lambda: f"run #{second}: waits for" in daemon.log, timeout=30, what="the second run to wait")
        wait_for(lambda: not set(before) & set(parked()), timeout=30,
                 what="the second push's sandbox to take the parked launcher")
        again = wait_for(parked, timeout=30, what="a launcher parked again")
        assert not set(again) & set(before)
        home.gitpipe("cancel", str(second), check=True)
