"""gitpipe.switch: a slot moved from one commit to the next in the daemon's process leaves what
`git checkout` leaves, leaves to git what it does not take on, and follows no link."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import git

from gitpipe import git as gitmod
from gitpipe import switch as switch_mod
from gitpipe.switch import same_content, switch


def commit(work: Path, files: dict[str, str | None], modes: dict[str, int] | None = None,
           links: dict[str, str] | None = None) -> str:
    """Commit `files` (None removes one), executables and links in the clone `work`; its id."""
    for rel, text in files.items():
        path = work / rel
        if text is None:
            git(work, "rm", "-rq", rel)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            path.unlink()
        path.write_text(text)
    for rel, mode in (modes or {}).items():
        (work / rel).chmod(mode)
    for rel, target in (links or {}).items():
        if os.path.lexists(work / rel):
            (work / rel).unlink()
        (work / rel).symlink_to(target)
    git(work, "add", "-A")
    git(work, "-c", "user.name=t", "-c", "user.email=t@x", "commit", "-qm", "c")
    git(work, "push", "-q", "origin", "HEAD:refs/heads/main")
    return git(work, "rev-parse", "HEAD").stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Path, Path]:
    bare = tmp_path / "app.git"
    gitmod.create_bare(bare)
    work = tmp_path / "work"
    git(tmp_path, "clone", "-q", str(bare), str(work))
    return bare, work


def state(tree: Path) -> dict[str, tuple[str, str]]:
    """Every path under `tree` but .git: its kind and mode, and its content or link target."""
    found = {}
    for path in sorted(tree.rglob("*")):
        rel = str(path.relative_to(tree))
        if rel == ".git" or rel.startswith(".git/"):
            continue
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            found[rel] = ("link", os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            found[rel] = ("dir", "")
        else:
            found[rel] = (f"file {'x' if st.st_mode & 0o100 else '-'}", path.read_text())
    return found


def daemon_git(slot: gitmod.Slot, *args: str) -> str:
    env = gitmod._git_env(slot.git_dir, slot.tree)
    return subprocess.run(["git", "-c", "safe.directory=*", *args], cwd=slot.tree, env=env, check=True,
                          capture_output=True, text=True).stdout


def test_a_pushed_change_is_written_in_process_as_git_checkout_writes_it(repo: tuple[Path, Path], tmp_path: Path) -> None:
    bare, work = repo
    first = commit(work, {"a.txt": "a\n", "dir/b.txt": "b\n", "dir/sub/c.txt": "c\n", "run.sh": "echo\n",
                          "gone/x.txt": "x\n", "gone/deeper/y.txt": "y\n", "keep/z.txt": "z\n"},
                   modes={"run.sh": 0o755}, links={"link": "a.txt"})
    second = commit(work, {"a.txt": "a, changed\n", "dir/b.txt": None, "gone/x.txt": None, "gone/deeper/y.txt": None,
                           "new/deep/n.txt": "n\n", "tool": "#!/bin/sh\n", "keep/z.txt": "z\n"},
                    modes={"run.sh": 0o644, "tool": 0o755}, links={"link": "dir", "new/up": "../a.txt"})
    pool = gitmod.WorktreePool(tmp_path / "wt", "app", bare)
    with pool.checkout(first) as slot:
        pass
    assert switch(slot.tree, slot.index, bare, first, second)
    fresh = tmp_path / "fresh"
    git(tmp_path, "clone", "-q", str(bare), str(fresh))
    git(fresh, "checkout", "-q", second)
    assert state(slot.tree) == state(fresh)
    assert not (slot.tree / "gone").exists(), "a folder whose files all went goes too, as with git"
    listed = daemon_git(slot, "ls-files", "-s")
    assert listed == git(fresh, "ls-files", "-s").stdout  # modes, blobs and paths of the index
    (slot.git_dir / "HEAD").write_text(second + "\n")
    assert daemon_git(slot, "status", "--porcelain", "--untracked-files=all") == ""


def test_the_pool_moves_a_sealed_slot_to_the_next_commit_in_process(repo: tuple[Path, Path], tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The reset of a slot sealed at the commit before: its files moved in process (no git on the
    daemon's PATH while it runs), and the next action gets exactly the pushed commit's files, its
    git telling the same."""
    bare, work = repo
    first = commit(work, {"a.txt": "a\n", "src/app.py": "v1\n"})
    second = commit(work, {"src/app.py": "v2\n", "src/new.py": "new\n"})
    pool = gitmod.WorktreePool(tmp_path / "wt", "app", bare)
    with pool.checkout(first) as slot:
        pass
    monkeypatch.setenv("PATH", str(tmp_path / "no-git-here"))
    with pool.checkout(second) as slot:
        monkeypatch.undo()
        assert (slot.tree / "src" / "app.py").read_text() == "v2\n"
        assert (slot.tree / "src" / "new.py").read_text() == "new\n"
        assert git(slot.tree, "rev-parse", "HEAD").stdout.strip() == second
        assert git(slot.tree, "status", "--porcelain", "--untracked-files=all").stdout == ""
        assert daemon_git(slot, "rev-parse", "HEAD").strip() == second


@pytest.mark.parametrize("case", ["gitattributes", "submodule", "packed", "file-to-folder"])
def test_what_it_does_not_take_on_is_left_to_git_untouched(repo: tuple[Path, Path], tmp_path: Path, case: str) -> None:
    bare, work = repo
    first = commit(work, {"a.txt": "a\n", "d": "a file\n"})
    if case == "gitattributes":
        second = commit(work, {".gitattributes": "*.txt eol=crlf\n", "a.txt": "b\n"})
    elif case == "submodule":
        git(work, "update-index", "--add", "--cacheinfo", f"160000,{first},lib")
        git(work, "-c", "user.name=t", "-c", "user.email=t@x", "commit", "-qm", "sub")
        git(work, "push", "-q", "origin", "HEAD:refs/heads/main")
        second = git(work, "rev-parse", "HEAD").stdout.strip()
    elif case == "packed":
        second = commit(work, {"a.txt": "b\n"})
        git(bare, "gc", "-q")
    else:
        second = commit(work, {"d": None, "d/inside.txt": "now a folder\n"})
    pool = gitmod.WorktreePool(tmp_path / "wt", "app", bare)
    with pool.checkout(first) as slot:
        before = state(slot.tree)
        index = slot.index.read_bytes()
    assert not switch(slot.tree, slot.index, bare, first, second)
    assert state(slot.tree) == before and slot.index.read_bytes() == index
    with pool.checkout(second) as slot:  # git does it
        assert daemon_git(slot, "status", "--porcelain") == ""
        assert daemon_git(slot, "rev-parse", "HEAD").strip() == second


def test_a_folder_swapped_for_a_link_is_never_written_through(repo: tuple[Path, Path], tmp_path: Path) -> None:
    """What a process of another sandbox holding a folder of the tree open can do at any moment:
    the move writes nothing through the link, and fails (the reset then starts the slot afresh)."""
    bare, work = repo
    first = commit(work, {"dir/b.txt": "b\n", "top.txt": "t\n"})
    second = commit(work, {"dir/b.txt": "root would write this\n", "dir/new.txt": "n\n"})
    outside = tmp_path / "host"
    outside.mkdir()
    (outside / "b.txt").write_text("the host's\n")
    pool = gitmod.WorktreePool(tmp_path / "wt", "app", bare)
    with pool.checkout(first) as slot:
        pass
    subprocess.run(["rm", "-rf", str(slot.tree / "dir")], check=True)
    (slot.tree / "dir").symlink_to(outside)
    with pytest.raises(OSError):
        switch(slot.tree, slot.index, bare, first, second)
    assert (outside / "b.txt").read_text() == "the host's\n" and sorted(p.name for p in outside.iterdir()) == ["b.txt"]


def racy_seal(pool: gitmod.WorktreePool, slot: gitmod.Slot, sha: str) -> None:
    """Seal `slot` as a push's first action takes it: its files written in this clock tick (one
    touched now), the action already waiting (no tick waited for). The kernel's time is read as
    one with coarse file times gives it (no multigrain timestamps: before Linux 6.13, or another
    filesystem): the touched file's own ctime. A finer one (the stamp's on 6.13) tells the touch
    apart from a later change, and the seal is not racy then."""
    wanted = threading.Event()
    wanted.set()
    os.utime(slot.tree / "a.txt")
    touched = (slot.tree / "a.txt").stat().st_ctime_ns
    real = gitmod._kernel_now
    gitmod._kernel_now = lambda root: touched
    try:
        assert pool._seal(slot, sha, wanted), "the seal did not give way"
    finally:
        gitmod._kernel_now = real
    assert pool._sealed[str(slot.root)][2] is not None


def test_a_pushed_runs_first_slot_moves_in_process_at_the_next_push(repo: tuple[Path, Path], tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A push's first action takes its slot at once, without the clock tick a seal waits for
    (WorktreePool._seal): the slot is sealed racy, and its files written in that tick are checked
    by their content at its next reset. Unchanged, the next push's commit is moved into it in
    process; a file changed in that tick, keeping its size and times, is told by its content."""
    bare, work = repo
    first = commit(work, {"a.txt": "a\n", "src/app.py": "v1\n"})
    second = commit(work, {"src/app.py": "v2\n"})
    pool = gitmod.WorktreePool(tmp_path / "wt", "app", bare)
    with pool.checkout(first) as slot:
        pass
    racy_seal(pool, slot, first)
    assert same_content(slot.tree, slot.index, ["a.txt", "src/app.py"])
    st = (slot.tree / "a.txt").stat()
    (slot.tree / "a.txt").write_text("b\n")  # as long as "a\n", its times set back
    os.utime(slot.tree / "a.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert not same_content(slot.tree, slot.index, ["a.txt"])
    (slot.tree / "a.txt").write_text("a\n")
    racy_seal(pool, slot, first)
    monkeypatch.setenv("PATH", str(tmp_path / "no-git-here"))
    with pool.checkout(second) as again:
        monkeypatch.undo()
        assert again.root == slot.root and (again.tree / "src" / "app.py").read_text() == "v2\n"
        assert git(again.tree, "status", "--porcelain", "--untracked-files=all").stdout == ""


def test_a_link_target_holding_a_nul_is_left_to_git(repo: tuple[Path, Path], tmp_path: Path) -> None:
    """A pushed link whose blob holds a NUL (no fsck on receive lets it in): git makes the link
    to the target cut there; the move in process must not raise from the reset (a ValueError
    is no OSError: the run failed, its slot half moved), it leaves it to git."""
    bare, work = repo
    first = commit(work, {"a.txt": "a\n"})
    blob = subprocess.run(["git", "hash-object", "-w", "--stdin"], cwd=work, input=b"x\0y", capture_output=True,
                          check=True).stdout.decode().strip()
    git(work, "update-index", "--add", "--cacheinfo", f"120000,{blob},l")
    git(work, "-c", "user.name=t", "-c", "user.email=t@x", "commit", "-qm", "nul")
    git(work, "push", "-q", "origin", "HEAD:refs/heads/main")
    second = git(work, "rev-parse", "HEAD").stdout.strip()
    pool = gitmod.WorktreePool(tmp_path / "wt", "app", bare)
    with pool.checkout(first) as slot:
        before = state(slot.tree)
    assert not switch(slot.tree, slot.index, bare, first, second)
    assert state(slot.tree) == before
    with pool.checkout(second) as slot:
        moved = state(slot.tree)
    with gitmod.WorktreePool(tmp_path / "fresh", "app", bare).checkout(second) as fresh:
        assert moved == state(fresh.tree) == {"a.txt": ("file -", "a\n"), "l": ("link", "x")}


def test_a_huge_file_put_where_a_racy_file_was_is_never_read_whole(repo: tuple[Path, Path], tmp_path: Path) -> None:
    """A process of another sandbox may swap a file written in the seal's tick for a huge
    (sparse) one after the reset looked at its stat: the content check (as root, in the
    daemon) reads no more than the index's size of it. Run in a process whose memory is
    bounded below the file's size: reading it whole fails there."""
    bare, work = repo
    first = commit(work, {"a.txt": "a\n"})
    pool = gitmod.WorktreePool(tmp_path / "wt", "app", bare)
    with pool.checkout(first) as slot:
        pass
    (slot.tree / "a.txt").unlink()
    with open(slot.tree / "a.txt", "wb") as f:
        f.truncate(3 << 30)
    code = ("import resource, sys; from pathlib import Path; from gitpipe.switch import same_content; "
            "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30)); "
            "print(same_content(Path(sys.argv[1]), Path(sys.argv[2]), ['a.txt']))")
    done = subprocess.run([sys.executable, "-c", code, str(slot.tree), str(slot.index)], capture_output=True,
                          text=True)
    assert (done.returncode, done.stdout) == (0, "False\n"), done.stderr


def test_a_push_of_many_big_files_is_left_to_git(repo: tuple[Path, Path], tmp_path: Path) -> None:
    """Each loose object read in process is bounded (4 MB), their sum was not: a push of files of
    zeros (a few KB each, compressed) had the daemon hold them all at once. Past MAX_BYTES,
    git writes them."""
    bare, work = repo
    first = commit(work, {"a.txt": "a\n"})
    big = (4 << 20) - 4096
    count = 9  # past MAX_BYTES (32 MB)
    second = commit(work, {f"zeros/{n}.bin": f"{n}".ljust(big, "0") for n in range(count)})
    pool = gitmod.WorktreePool(tmp_path / "wt", "app", bare)
    with pool.checkout(first) as slot:
        before = state(slot.tree)
    assert not switch(slot.tree, slot.index, bare, first, second)
    assert state(slot.tree) == before and count * big > switch_mod.MAX_BYTES
    with pool.checkout(second) as slot:
        assert len(list((slot.tree / "zeros").iterdir())) == count
        assert daemon_git(slot, "status", "--porcelain") == ""


def raw_commit(work: Path, parent: str, entries: list[tuple[bytes, bytes, bytes]]) -> str:
    """Push a commit of one tree written byte by byte (mode, name, content: what no `git add`
    makes, and no fsck on receive refuses); its id."""
    def write(kind: str, body: bytes) -> str:
        return subprocess.run(["git", "hash-object", "-t", kind, "-w", "--literally", "--stdin"], cwd=work,
                              input=body, capture_output=True, check=True).stdout.decode().strip()
    tree = write("tree", b"".join(mode + b" " + name + b"\0" + bytes.fromhex(write("blob", data))
                                  for mode, name, data in entries))
    sha = git(work, "-c", "user.name=t", "-c", "user.email=t@x", "commit-tree", tree, "-p", parent,
              "-m", "raw").stdout.strip()
    git(work, "push", "-q", "origin", f"{sha}:refs/heads/main")
    return sha


@pytest.mark.parametrize("mode, name", [(b"100644", b".git::$INDEX_ALLOCATION"), (b"120000", b".gitmodules"),
                                        (b"100644", b"GIT~1")])
def test_a_name_git_refuses_to_check_out_is_left_to_git(repo: tuple[Path, Path], tmp_path: Path, mode: bytes,
                                                        name: bytes) -> None:
    """git's checkout refuses these (core.protectNTFS, a `.gitmodules` link): the move in process
    must not write them either (the run would get files no fresh slot gets), it leaves them to git."""
    bare, work = repo
    first = commit(work, {"a.txt": "a\n"})
    second = raw_commit(work, first, [(b"100644", b"a.txt", b"a\n"), (mode, name, b"/etc/passwd")])
    pool = gitmod.WorktreePool(tmp_path / "wt", "app", bare)
    with pool.checkout(first) as slot:
        before = state(slot.tree)
    assert not switch(slot.tree, slot.index, bare, first, second)
    assert state(slot.tree) == before
    with pytest.raises(subprocess.CalledProcessError, match="git"):
        with gitmod.WorktreePool(tmp_path / "fresh", "app", bare).checkout(second):
            pass
