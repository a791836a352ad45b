"""Tests of gitpipe.cgroup with real cgroups on this host: membership, limits, kill, sweep.

The tests run as root (as CI does); each uses a tag of its own, so two test processes
(or a gitpipe daemon beside them) never touch each other's groups.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gitpipe import cgroup


def need_root() -> None:
    if os.geteuid() != 0 and not os.environ.get("CI"):
        pytest.skip("cgroups are created by root here")


@pytest.fixture
def tree() -> Iterator[cgroup.Tree]:
    need_root()
    found, why = cgroup.Tree.find(f"test-{uuid.uuid4().hex[:8]}")
    assert found is not None, f"this host must allow cgroups for the tests: {why}"
    yield found
    found.sweep()
    for base in found.bases:
        base.rmdir()


def join(group: cgroup.Group, script: str) -> subprocess.Popen[bytes]:
    """A shell that moves itself into the group (as sandbox.launch does), then runs `script`."""
    writes = " && ".join(f"echo 0 > {d / 'cgroup.procs'}" for d in group.dirs)
    return subprocess.Popen(["/bin/sh", "-c", f"{writes} && exec /bin/sh -c '{script}'"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_nothing_escapes_the_kill_however_it_detaches(tree: cgroup.Tree) -> None:
    group = tree.group("a1.1", None, None)
    proc = join(group, "setsid sleep 300 & nohup sleep 300 >/dev/null 2>&1 & (sleep 300 &) ; sleep 300")
    members = wait_members(group, 5)
    assert proc.pid in members and len(members) >= 5
    group.kill()
    proc.wait(10)
    assert group.members() == set()
    group.remove()
    assert not any(d.exists() for d in group.dirs)


def test_the_pids_limit_stops_a_fork_bomb_and_is_named(tree: cgroup.Tree) -> None:
    group = tree.group("a2.1", None, 16)
    proc = join(group, "for i in $(seq 60); do sleep 30 & done; wait")
    deadline = time.monotonic() + 20
    while group.limit_hit() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert group.limit_hit() == "too many processes (limit pids = 16)"
    assert len(group.members()) <= 16
    group.remove()
    proc.wait(10)
    fresh = tree.group("a2.2", None, 16)
    assert fresh.limit_hit() is None  # a new group starts clean
    fresh.remove()


def test_the_memory_limit_kills_and_is_named(tree: cgroup.Tree) -> None:
    group = tree.group("a3.1", 32 << 20, None)
    proc = join(group, "head -c 200000000 /dev/zero | tail > /dev/null")
    proc.wait(30)
    assert proc.returncode != 0
    assert group.limit_hit() == "out of memory (limit 32M)"
    group.remove()


def test_sweep_kills_what_a_crashed_daemon_left(tree: cgroup.Tree) -> None:
    group = tree.group("a4.1", None, None)
    proc = join(group, "sleep 300")
    wait_members(group, 1)
    assert tree.sweep() == len(tree.bases)
    proc.wait(10)
    assert not any(d.exists() for d in group.dirs)


def test_the_next_attempts_group_is_made_ahead_with_its_limits(tree: cgroup.Tree) -> None:
    first = tree.group("a6.1", None, 16)  # the limits the next one is made ahead with
    first.remove()
    tree.warm()
    spares = wait_spares(tree)
    group = tree.group("a6.2", None, 16)
    assert [d.name for d in group.dirs] == ["a6.2"] * len(tree.bases)
    assert not any(d.exists() for d in spares)  # the one made ahead, renamed (cgroup v1)
    if tree.limits:
        pids = [d / "pids.max" for d in group.dirs if (d / "pids.max").exists()]
        assert pids and all(f.read_text().strip() == "16" for f in pids)
    proc = join(group, "sleep 300")
    assert proc.pid in wait_members(group, 1)
    group.remove()
    proc.wait(10)
    other = tree.group("a6.3", None, 32)  # other limits than the group made ahead: made now
    assert [d.name for d in other.dirs] == ["a6.3"] * len(tree.bases)
    other.remove()


def test_a_group_made_ahead_goes_when_the_daemon_stops() -> None:
    need_root()
    tree, why = cgroup.Tree.find(f"test-{uuid.uuid4().hex[:8]}")
    assert tree is not None, why
    tree.group("a7.1", None, None).remove()
    tree.warm()
    wait_spares(tree)
    tree.close()
    assert not any(base.exists() for base in tree.bases)


def test_an_ended_attempts_group_is_removed_later_with_what_is_left_in_it(tree: cgroup.Tree) -> None:
    group = tree.group("a8.1", None, None)
    proc = join(group, "sleep 300")
    wait_members(group, 1)
    group.remove_later()  # what the executor does once a sandbox's script ended
    cgroup.wait_removed(20)
    proc.wait(10)
    assert not any(d.exists() for d in group.dirs)


def wait_spares(tree: cgroup.Tree) -> list[Path]:
    """The group the tree made ahead (named spare-<n> until an attempt takes it)."""
    deadline = time.monotonic() + 10
    while True:
        spares = [d for base in tree.bases for d in base.glob("spare-*")]
        if len(spares) == len(tree.bases) and tree.helper is not None and tree.helper.spare is not None:
            return spares
        assert time.monotonic() < deadline, "no group was made ahead"
        time.sleep(0.01)


def test_the_unified_hierarchy_without_controllers_still_tracks_and_kills() -> None:
    """cgroup v2 as found here (no controllers delegated): kill works, limits are said to be off."""
    need_root()
    mount = cgroup._unified_mount()
    if mount is None:
        assert not os.environ.get("CI"), "CI's host must have a cgroup2 mount"
        pytest.skip("no cgroup2 mount on this host")
    own = cgroup.own_groups().get("", "/")
    tag = f"test-{uuid.uuid4().hex[:8]}"
    found, why = cgroup._v2_tree(mount / own.lstrip("/"), tag)
    assert found is not None
    try:
        if not found.limits:
            assert why  # serve says why limits are off
        group = found.group("a5.1", 64 << 20, 64)
        proc = join(group, "setsid sleep 300 & sleep 300")
        wait_members(group, 3)
        group.remove()
        proc.wait(10)
        assert not group.dirs[0].exists()
    finally:
        found.sweep()
        for base in found.bases:
            base.rmdir()


def wait_members(group: cgroup.Group, at_least: int) -> set[int]:
    deadline = time.monotonic() + 10
    while True:
        members = group.members()
        if len(members) >= at_least:
            return members
        assert time.monotonic() < deadline, f"only {members} joined"
        time.sleep(0.02)


def testown_groups_reads_proc_self_cgroup() -> None:
    own = cgroup.own_groups()
    assert own, Path("/proc/self/cgroup").read_text()
