"""Tests of gitpipe.git: reading bare repos, and the worktree pool's reset and isolation."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import git

from gitpipe import git as gitmod
from gitpipe.errors import UsageError
from gitpipe.objects import loose


@pytest.fixture
def bare(tmp_path: Path) -> Path:
    """A bare repo (HEAD on main) with two commits on main and a tag; returned path."""
    path = tmp_path / "shop.git"
    gitmod.create_bare(path)
    work = tmp_path / "clone"
    git(tmp_path, "clone", "--quiet", str(path), str(work))
    (work / ".gitignore").write_text("ignored/\n*.log\n")
    (work / "README.md").write_text("original\n")
    (work / "src").mkdir()
    (work / "src" / "app.py").write_text("print('v1')\n")
    (work / "only-in-first.txt").write_text("first\n")
    git(work, "add", ".")
    git(work, "commit", "--quiet", "-m", "first")
    git(work, "tag", "v1")
    git(work, "rm", "--quiet", "only-in-first.txt")
    (work / "src" / "app.py").write_text("print('v2')\n")
    git(work, "commit", "--quiet", "-am", "second\n\nwith a body")
    git(work, "push", "--quiet", "origin", "HEAD:refs/heads/main", "refs/tags/v1")
    return path


def sha_of(repo: Path, rev: str) -> str:
    return git(repo, "rev-parse", rev).stdout.strip()


def snapshot_of_bare(repo: Path) -> tuple[str, bytes, dict[str, bytes], list[str]]:
    hooks = {p.name: p.read_bytes() for p in sorted((repo / "hooks").iterdir())}
    objects = sorted(str(p.relative_to(repo)) for p in (repo / "objects").rglob("*"))
    return git(repo, "for-each-ref").stdout, (repo / "config").read_bytes(), hooks, objects


def tree_state(tree: Path) -> tuple[list[str], str]:
    """Every path in a worktree (outside .git) and `git status` with ignored files."""
    paths = sorted(str(p.relative_to(tree)) for p in tree.rglob("*") if ".git" not in p.relative_to(tree).parts)
    status = git(tree, "status", "--porcelain", "--ignored", "--untracked-files=all").stdout
    return paths, status


# ---------------------------------------------------------------------------- reading


def test_create_bare_names_main_and_reads_commits(bare: Path) -> None:
    repo = gitmod.open_bare(bare)
    assert gitmod.default_branch(repo) == "main"
    main, v1 = sha_of(bare, "main"), sha_of(bare, "v1")
    assert gitmod.resolve(repo, "main") == ("refs/heads/main", main)
    assert gitmod.resolve(repo, "refs/heads/main") == ("refs/heads/main", main)
    assert gitmod.resolve(repo, "v1") == ("refs/tags/v1", v1)
    with pytest.raises(UsageError, match='no branch or tag "nope"'):
        gitmod.resolve(repo, "nope")
    assert gitmod.read_file(repo, main, "src/app.py") == "print('v2')\n"
    assert gitmod.read_file(repo, main, "only-in-first.txt") is None
    assert gitmod.read_file(repo, v1, "only-in-first.txt") == "first\n"
    assert gitmod.read_file(repo, "0" * 40, "README.md") is None
    author, message = gitmod.commit_info(repo, main)
    assert author == "Test Author <author@example.com>" and message == "second\n\nwith a body\n"
    assert gitmod.has_commit(repo, main) and not gitmod.has_commit(repo, "0" * 40)


def test_empty_new_bare_repo_has_main_as_default_branch(tmp_path: Path) -> None:
    repo = gitmod.create_bare(tmp_path / "new.git")
    assert gitmod.default_branch(repo) == "main"
    with pytest.raises(UsageError, match="already exists and is not empty"):
        gitmod.create_bare(tmp_path / "new.git")


def test_open_bare_says_why_a_path_is_not_a_bare_repo(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        gitmod.open_bare(tmp_path / "missing.git")
    (tmp_path / "plain").mkdir()
    with pytest.raises(UsageError, match="is not a git repository"):
        gitmod.open_bare(tmp_path / "plain")
    git(tmp_path, "init", "--quiet", "work")
    with pytest.raises(UsageError, match="is not a bare repository"):
        gitmod.open_bare(tmp_path / "work")


# ---------------------------------------------------------------------------- the worktree pool


def test_a_checkout_is_exactly_the_commit(bare: Path, tmp_path: Path) -> None:
    pool = gitmod.WorktreePool(tmp_path / "work", "shop", bare)
    main = sha_of(bare, "main")
    with pool.checkout(main) as slot:
        paths, status = tree_state(slot.tree)
        assert paths == [".gitignore", "README.md", "src", "src/app.py"]
        assert status == ""
        assert git(slot.tree, "rev-parse", "HEAD").stdout.strip() == main
        assert (slot.tree / "src" / "app.py").read_text() == "print('v2')\n"


def test_a_reused_slot_is_reset_to_exactly_the_commit(bare: Path, tmp_path: Path) -> None:
    pool = gitmod.WorktreePool(tmp_path / "work", "shop", bare)
    main, v1 = sha_of(bare, "main"), sha_of(bare, "v1")
    with pool.checkout(main) as slot:
        clean = tree_state(slot.tree)
        first_root = slot.root
        t = slot.tree
        (t / "README.md").write_text("changed\n")
        (t / "src" / "app.py").unlink()
        (t / "untracked.txt").write_text("x")
        (t / "ignored").mkdir()
        (t / "ignored" / "junk").write_text("x")
        (t / "build.log").write_text("x")
        (t / "locked").mkdir()
        (t / "locked" / "f").write_text("x")
        os.chmod(t / "locked", 0o000)
        subprocess.run(["git", "init", "--quiet", "nested"], cwd=t, check=True)
        (t / "nested" / "inner.txt").write_text("x")
        git(t, "config", "gitpipe.leftover", "yes")
        hooks = t / ".git" / "hooks"
        hooks.mkdir(exist_ok=True)
        (hooks / "post-checkout").write_text("#!/bin/sh\ntouch \"$PWD/../hook-ran\"\n")
        (hooks / "post-checkout").chmod(0o755)
        (t / ".git" / "info").mkdir(exist_ok=True)
        (t / ".git" / "info" / "exclude").write_text("*\n")
        git(t, "update-index", "--skip-worktree", ".gitignore")
        (t / ".gitignore").write_text("changed but hidden by skip-worktree\n")
        (t.parent / "beside").write_text("x")
    with pool.checkout(main) as slot:
        assert slot.root == first_root  # the same slot, reused
        assert tree_state(slot.tree) == clean
        assert (slot.tree / "README.md").read_text() == "original\n"
        assert (slot.tree / ".gitignore").read_text() == "ignored/\n*.log\n"
        assert git(slot.tree, "config", "--local", "--list").stdout.find("gitpipe.leftover") < 0
        assert not (slot.tree / ".git" / "hooks" / "post-checkout").exists()
        assert not (slot.root / "hook-ran").exists()
        assert sorted(p.name for p in slot.root.iterdir()) == [gitmod.STAMP, "git", "tree"]  # the daemon's alone
    with pool.checkout(v1) as slot:  # another commit in the same slot
        paths, status = tree_state(slot.tree)
        assert "only-in-first.txt" in paths and status == ""
        assert (slot.tree / "src" / "app.py").read_text() == "print('v1')\n"


def test_a_replaced_git_dir_is_rebuilt(bare: Path, tmp_path: Path) -> None:
    pool = gitmod.WorktreePool(tmp_path / "work", "shop", bare)
    main = sha_of(bare, "main")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pool.checkout(main) as slot:
        clean = tree_state(slot.tree)
        subprocess.run(["rm", "-rf", str(slot.tree / ".git")], check=True)
        (slot.tree / ".git").symlink_to(elsewhere)
    with pool.checkout(main) as slot:
        assert tree_state(slot.tree) == clean
        assert not (slot.tree / ".git").is_symlink()
    assert list(elsewhere.iterdir()) == []


def test_a_removed_tracked_folder_is_a_change_not_a_tree_to_start_afresh(bare: Path, tmp_path: Path) -> None:
    """A tracked folder an action removed is a change like any other: the slot's seal no longer
    holds, and its next reset to the same commit runs git there. Before, looking at the seal
    raised, and the reset fell back to removing the whole slot and making it again (what only a
    tree git cannot clean needs), which any pushed script could make every such reset pay."""
    pool = gitmod.WorktreePool(tmp_path / "work", "shop", bare)
    main = sha_of(bare, "main")
    with pool.checkout(main) as slot:
        clean = tree_state(slot.tree)
        subprocess.run(["rm", "-rf", str(slot.tree / "src")], check=True)
        assert gitmod.tree_stat(slot.tree, slot.index) is None
        (slot.tree / "src").write_text("a file where a folder was\n")
        assert gitmod.tree_stat(slot.tree, slot.index) is None
        (slot.tree / "src").unlink()  # the slot is reset with the folder missing
    held = os.open(slot.tree, os.O_RDONLY | os.O_DIRECTORY)  # its inode cannot go to a new tree
    try:
        with pool.checkout(main) as again:
            assert again.root == slot.root and tree_state(again.tree) == clean
            assert os.stat(again.tree).st_ino == os.fstat(held).st_ino, "the slot was started afresh"
    finally:
        os.close(held)


def test_a_slot_started_afresh_says_why_in_the_log(bare: Path, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A reset that gives up and checks the slot out afresh costs the tree's reuse: the log says
    which slot and what stood in the way (here the index lock a killed checkout leaves)."""
    pool = gitmod.WorktreePool(tmp_path / "work", "shop", bare)
    main = sha_of(bare, "main")
    with pool.checkout(main) as slot:
        (slot.tree / "README.md").write_text("changed\n")  # its next reset runs git
        (slot.git_dir / "index.lock").write_text("")
    with caplog.at_level(logging.INFO, logger="gitpipe"), pool.checkout(main) as again:
        assert (again.tree / "README.md").read_text() != "changed\n"
    said = [r.getMessage() for r in caplog.records if "afresh" in r.getMessage()]
    assert len(said) == 1 and str(slot.root) in said[0] and "index.lock" in said[0], said


def test_concurrent_checkouts_get_distinct_slots(bare: Path, tmp_path: Path) -> None:
    pool = gitmod.WorktreePool(tmp_path / "work", "shop", bare)
    main = sha_of(bare, "main")
    with pool.checkout(main) as a, pool.checkout(main) as b:
        assert a.root != b.root
        (a.tree / "mine").write_text("a")
        assert not (b.tree / "mine").exists()
    roots: list[Path] = []
    barrier = threading.Barrier(4)
    lock = threading.Lock()

    def hold() -> None:
        with pool.checkout(main) as slot:
            with lock:
                roots.append(slot.root)
            barrier.wait(timeout=30)  # all four hold a slot at the same time

    threads = [threading.Thread(target=hold) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(roots)) == 4
    with pool.checkout(main) as slot:  # all free again: the first slot is taken
        assert slot.root == pool.dir / "0"


def test_a_worktree_cannot_change_the_bare_repo(bare: Path, tmp_path: Path) -> None:
    pool = gitmod.WorktreePool(tmp_path / "work", "shop", bare)
    main = sha_of(bare, "main")
    before = snapshot_of_bare(bare)
    with pool.checkout(main) as slot:
        t = slot.tree
        git(t, "update-ref", "refs/heads/main", "HEAD~1")
        git(t, "update-ref", "refs/heads/evil", "HEAD")
        git(t, "tag", "evil")
        (t / "new.txt").write_text("new")
        git(t, "add", "new.txt")
        git(t, "commit", "--quiet", "-m", "evil")
        git(t, "config", "core.bare", "true")
        git(t, "config", "receive.denyCurrentBranch", "ignore")
        git(t, "gc", "--quiet")
    assert snapshot_of_bare(bare) == before
    assert git(bare, "fsck", "--no-progress").returncode == 0


def test_remove_tree_removes_what_an_action_made_read_only(tmp_path: Path) -> None:
    root = tmp_path / "t"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_text("x")
    os.chmod(root / "a" / "b", 0o500)
    os.chmod(root / "a", 0o000)
    gitmod.remove_tree(root)
    assert not root.exists()


def test_a_tampered_index_in_the_tree_does_not_keep_a_modified_file(bare: Path, tmp_path: Path) -> None:
    pool = gitmod.WorktreePool(tmp_path / "work", "shop", bare)
    main = sha_of(bare, "main")
    with pool.checkout(main) as slot:
        git(slot.tree, "update-index", "--skip-worktree", "README.md")
        (slot.tree / "README.md").write_text("changed by an earlier action\n")
    with pool.checkout(main) as slot:
        assert (slot.tree / "README.md").read_text() == "original\n"
        assert git(slot.tree, "status", "--porcelain").stdout == ""


def test_the_daemons_git_never_reads_the_trees_git_dir(bare: Path, tmp_path: Path) -> None:
    """What an action writes in its tree's .git, even after the reset rewrote it (a process of
    another sandbox holding a folder of this tree open can), never steers the daemon's git: a
    config with `core.fsmonitor` would run its command as the daemon's user, `core.worktree`
    would check files out elsewhere, a `commondir` would bring another config."""
    pool = gitmod.WorktreePool(tmp_path / "work", "shop", bare)
    main, first = sha_of(bare, "main"), sha_of(bare, "main~1")
    ran, elsewhere = tmp_path / "fsmonitor-ran", tmp_path / "elsewhere"
    hook = tmp_path / "hook.sh"
    hook.write_text(f"#!/bin/sh\ntouch {ran}\n")
    hook.chmod(0o755)
    evil = tmp_path / "evil-common"
    evil.mkdir()
    (evil / "config").write_text(f"[core]\n\tfsmonitor = {hook}\n")
    tampered = {
        "fsmonitor": {"config": f"[core]\n\tfsmonitor = {hook}\n"},
        "worktree": {"config": f"[core]\n\tworktree = {elsewhere}\n"},
        "commondir": {"commondir": f"{evil}\n"},
    }
    for what, files in tampered.items():
        with pool.checkout(first) as slot:
            pass
        for name, text in files.items():  # as between the daemon's rewrite and its git
            (slot.tree / ".git" / name).unlink(missing_ok=True)
            (slot.tree / ".git" / name).write_text(text)
        pool._git(slot, "checkout", "--quiet", "--force", "--detach", main)
        assert not ran.exists() and not elsewhere.exists(), what
        with pool.checkout(main) as again:
            assert tree_state(again.tree)[1] == ""
            assert git(again.tree, "rev-parse", "HEAD").stdout.strip() == main
            assert not (again.tree / ".git" / "commondir").exists()
    assert os.stat(slot.git_dir).st_mode & 0o077 == 0, "the daemon's git dir is its user's alone"


def _untracked_mess(t: Path) -> None:
    """What an action may leave in its tree: files, ignored ones, empty and nested dirs, a nested
    repo, links out of the tree, a link where a tracked folder's sibling was."""
    (t / "untracked.txt").write_text("x")
    (t / "ignored").mkdir()
    (t / "ignored" / "junk").write_text("x")
    (t / "src" / "build.log").write_text("x")
    (t / "src" / "deep" / "er").mkdir(parents=True)
    (t / "empty").mkdir()
    subprocess.run(["git", "init", "--quiet", "nested"], cwd=t, check=True)
    (t / "nested" / "inner.txt").write_text("x")
    (t / "out").symlink_to("/etc")
    (t / "src" / "passwd").symlink_to("/etc/passwd")


def test_the_in_process_clean_leaves_what_git_clean_leaves(bare: Path, tmp_path: Path) -> None:
    trees = []
    for name in ("by-git", "in-process"):
        t = tmp_path / name
        git(tmp_path, "clone", "--quiet", str(bare), str(t))
        git(t, "update-index", "--skip-worktree", "README.md")  # an index of version 3
        _untracked_mess(t)
        trees.append(t)
    git(trees[0], "clean", "-qffdx")
    assert gitmod.clean_untracked(trees[1], trees[1] / ".git" / "index")
    assert (trees[1] / ".git" / "index").read_bytes()[4:8] == (3).to_bytes(4, "big")
    listing = [sorted(str(p.relative_to(t)) for p in t.rglob("*") if ".git" not in p.parts) for t in trees]
    assert listing[0] == listing[1] == [".gitignore", "README.md", "src", "src/app.py"]
    assert os.path.exists("/etc/passwd")  # a link was removed, never followed


def test_a_large_index_is_left_to_git_clean(bare: Path, tmp_path: Path) -> None:
    t = tmp_path / "w"
    git(tmp_path, "clone", "--quiet", str(bare), str(t))
    (t / "untracked.txt").write_text("x")
    assert not gitmod.clean_untracked(t, t / ".git" / "index", limit=2)  # 3 tracked files: nothing done
    assert (t / "untracked.txt").exists()
    assert gitmod.index_paths(t / ".git" / "index", 3) == {".gitignore": 0o100644, "README.md": 0o100644,
                                                           "src/app.py": 0o100644}


def test_a_reset_keeps_an_untouched_git_dir_and_rebuilds_a_touched_one(bare: Path, tmp_path: Path) -> None:
    pool = gitmod.WorktreePool(tmp_path / "work", "shop", bare)
    main = sha_of(bare, "main")
    with pool.checkout(main) as slot:
        objects = (slot.tree / ".git" / "objects").stat().st_ino
        assert sorted(p.name for p in (slot.tree / ".git").iterdir()) == ["HEAD", "config", "index", "objects", "refs"]
    with pool.checkout(main) as slot:  # nothing touched: the folders stay, three files are rewritten
        assert (slot.tree / ".git" / "objects").stat().st_ino == objects
        outside = tmp_path / "host-file"
        outside.write_text("host\n")
        (slot.tree / ".git" / "config").unlink()
        os.link(outside, slot.tree / ".git" / "config")  # written through, it would change the host file
    with pool.checkout(main) as slot:  # the same layout: kept, but the link is replaced, not written
        assert (slot.tree / ".git" / "objects").stat().st_ino == objects
        assert outside.read_text() == "host\n"
        (slot.tree / ".git" / "refs" / "heads" / "evil").write_text(main + "\n")
    with pool.checkout(main) as slot:  # another layout: rebuilt
        assert not (slot.tree / ".git" / "refs" / "heads" / "evil").exists()
        assert "logallrefupdates = false" in (slot.tree / ".git" / "config").read_text().lower()
        assert tree_state(slot.tree)[1] == ""


RESETS = """
import sys
from gitpipe import git
pool = git.WorktreePool(git.Path(sys.argv[1]), "shop", sys.argv[2])
for sha in sys.argv[3:]:
    with pool.checkout(sha) as slot:
        (slot.tree / "build-output.o").write_text("x")  # what a build leaves: untracked
"""


def test_a_slot_reset_to_the_same_commit_starts_no_git_process(bare: Path, tmp_path: Path) -> None:
    """The files of the commit are still there (their stat data says so): no checkout, no clean."""
    main, v1 = sha_of(bare, "main"), sha_of(bare, "v1")
    out = tmp_path / "trace"
    subprocess.run(["strace", "-f", "-qq", "-o", str(out), "-e", "trace=execve", "-e", "status=successful",
                    sys.executable, "-c", RESETS, str(tmp_path / "work"), str(bare), *[main] * 5, v1],
                   check=True, capture_output=True)
    gits = [line for line in out.read_text().splitlines() if "/git\"" in line]
    # The first reset checks out; of the four resets to main after it, at most one does: files
    # git wrote in the same clock tick as the slot was handed out are not trusted to their stat
    # data ("racy"), so that reset checks them out once more. v1's is moved in process from the
    # sealed main (gitpipe.switch: its objects are loose).
    assert 1 <= sum("checkout" in line for line in gits) <= 2, len(gits)
    assert not any('"clean"' in line for line in gits)


def test_a_tracked_file_changed_behind_its_stat_data_is_restored(bare: Path, tmp_path: Path) -> None:
    """Same size, modification time set back: the change time still gives it away."""
    pool = gitmod.WorktreePool(tmp_path / "work", "shop", bare)
    main = sha_of(bare, "main")
    with pool.checkout(main) as slot:
        app = slot.tree / "src" / "app.py"
        st = app.stat()
        app.write_text("print('EV')\n")  # as long as print('v2')
        os.utime(app, ns=(st.st_atime_ns, st.st_mtime_ns))
        (slot.tree / "README.md").chmod(0o755)
    with pool.checkout(main) as slot:
        assert (slot.tree / "src" / "app.py").read_text() == "print('v2')\n"
        assert not os.access(slot.tree / "README.md", os.X_OK) or os.getuid() == 0
        assert (slot.tree / "README.md").stat().st_mode & 0o111 == 0
        src = slot.tree / "src"
        os.rename(src, slot.tree / "elsewhere")
        src.symlink_to("elsewhere")  # the same file, reached through a link
    with pool.checkout(main) as slot:
        assert (slot.tree / "src").is_dir() and not (slot.tree / "src").is_symlink()
        assert tree_state(slot.tree)[1] == ""
        assert not (slot.tree / "elsewhere").exists()


def test_objects_read_from_loose_files_match_git_cat_file(tmp_path: Path) -> None:
    """The daemon reads a pushed commit and its pipeline file from the loose objects a push
    leaves; packed objects, missing paths and tampered loose files go through (or match) git."""
    bare = tmp_path / "r.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(bare))
    work = tmp_path / "w"
    git(tmp_path, "init", "-q", "-b", "main", str(work))
    (work / "ci").mkdir()
    (work / ".pipeline.toml").write_text('[[stage]]\nname = "s"\n')
    (work / "ci" / "deep.txt").write_text("deep\n")
    git(work, "add", ".")
    git(work, "commit", "-qm", "first\n\nbody")
    git(work, "push", "-q", str(bare), "main")
    sha = subprocess.run(["git", "-C", str(work), "rev-parse", "HEAD"], capture_output=True, text=True,
                         check=True).stdout.strip()

    def cat(kind: str, name: str) -> bytes | None:
        proc = subprocess.run(["git", f"--git-dir={bare}", "cat-file", kind, name], capture_output=True, check=False)
        return proc.stdout if proc.returncode == 0 else None

    cases = [("commit", sha), ("blob", f"{sha}:.pipeline.toml"), ("blob", f"{sha}:ci/deep.txt"),
             ("blob", f"{sha}:nope.toml"), ("blob", f"{sha}:ci/nope"), ("commit", "0" * 40)]
    assert gitmod._loose_path(bare, sha) is not None  # the push left them loose: no process needed
    for kind, name in cases:
        assert gitmod._cat_file(bare, kind, name) == cat(kind, name), name
    author, message = gitmod.commit_of(bare, sha) or ("", "")
    assert message == "first\n\nbody\n" and author.endswith("@example.com>")
    # A loose file whose content does not match its name is never believed by the fast path.
    stored = bare / "objects" / sha[:2] / sha[2:]
    stored.chmod(0o644)
    good = stored.read_bytes()
    import zlib

    stored.write_bytes(zlib.compress(b"commit 5\0evil!"))
    with pytest.raises(ValueError, match="does not match its name"):
        loose(bare, sha)
    stored.write_bytes(good)
    # Packed objects: git reads them.
    git(bare, "gc", "-q")
    assert not stored.exists()
    for kind, name in cases:
        assert gitmod._cat_file(bare, kind, name) == cat(kind, name), name


def test_files_left_in_a_submodules_folder_do_not_survive_the_reset(tmp_path: Path) -> None:
    """A gitlink (submodule) is tracked as a folder that the daemon never fills: neither `git clean`
    nor the in-process clean looked inside it, so what an action left there (a conftest.py, a
    script) was in the slot for the next action and the next run."""
    bare = tmp_path / "sub.git"
    gitmod.create_bare(bare)
    work = tmp_path / "clone"
    git(tmp_path, "clone", "--quiet", str(bare), str(work))
    (work / "a.txt").write_text("a\n")
    git(work, "add", "a.txt")
    git(work, "commit", "--quiet", "-m", "a")
    head = sha_of(work, "HEAD")
    git(work, "update-index", "--add", "--cacheinfo", f"160000,{head},vendor/lib")  # a submodule
    git(work, "commit", "--quiet", "-m", "submodule")
    git(work, "push", "--quiet", "origin", "HEAD:main")
    sha = sha_of(work, "HEAD")
    pool = gitmod.WorktreePool(tmp_path / "work", "sub", bare)
    for _ in range(2):  # the second time through the pool's own clean and its unchanged-tree path
        with pool.checkout(sha) as slot:
            assert sorted(p.name for p in (slot.tree / "vendor" / "lib").iterdir()) == []
            (slot.tree / "vendor" / "lib" / "conftest.py").write_text("planted\n")
            (slot.tree / "vendor" / "lib" / "deep").mkdir()
    with pool.checkout(sha) as slot:
        assert list((slot.tree / "vendor" / "lib").iterdir()) == []


def test_a_large_trees_submodule_folder_is_emptied_too(tmp_path: Path) -> None:
    """The same for a tree cleaned by `git clean` (more tracked files than the pool cleans itself)."""
    bare = tmp_path / "sub.git"
    gitmod.create_bare(bare)
    work = tmp_path / "clone"
    git(tmp_path, "clone", "--quiet", str(bare), str(work))
    (work / "a.txt").write_text("a\n")
    git(work, "add", "a.txt")
    git(work, "commit", "--quiet", "-m", "a")
    git(work, "update-index", "--add", "--cacheinfo", f"160000,{sha_of(work, 'HEAD')},lib")
    git(work, "commit", "--quiet", "-m", "submodule")
    (work / "lib").mkdir()
    (work / "lib" / "left.txt").write_text("x")
    (work / "untracked.txt").write_text("x")
    git(work, "clean", "-qffdx")
    assert (work / "lib" / "left.txt").exists()  # what git itself leaves
    gitmod.empty_gitlinks(work, work / ".git")
    assert list((work / "lib").iterdir()) == [] and (work / "a.txt").exists()


# ---------------------------------------------------------------------------- preparing ahead


def test_a_run_alternates_between_two_slots_each_reset_while_the_other_is_used(bare: Path, tmp_path: Path) -> None:
    """prepare_next resets another slot while an action runs; the next checkout gets it, exact."""
    pool = gitmod.WorktreePool(tmp_path / "work", "shop", bare, ahead=3)
    main = sha_of(bare, "main")
    roots = []
    for _ in range(4):
        with pool.checkout(main) as slot:
            roots.append(slot.root)
            assert tree_state(slot.tree) == ([".gitignore", "README.md", "src", "src/app.py"], "")
            pool.prepare_next(main)  # what the scheduler does once the script runs
            (slot.tree / "README.md").write_text("changed by the action\n")
            (slot.tree / "left.txt").write_text("x")
    pool.close()
    assert roots[0] == roots[2] and roots[1] == roots[3] and roots[0] != roots[1]
    assert pool._next is None and pool.ahead == 0
    with pool.checkout(main) as slot:  # nothing stays held: slot 0 is free again
        assert slot.root == roots[0]


def test_a_prepared_slot_changed_before_its_use_is_reset_again(bare: Path, tmp_path: Path) -> None:
    """Between its reset and its use the prepared slot is checked once more: a tracked file
    changed meanwhile (through an open file a leftover process kept) and a new file are gone."""
    pool = gitmod.WorktreePool(tmp_path / "work", "shop", bare, ahead=1)
    main, v1 = sha_of(bare, "main"), sha_of(bare, "v1")
    with pool.checkout(main) as first:
        pool.prepare_next(main)
        ahead = pool._next
        assert ahead is not None
        ahead.wait()
        assert ahead.slot is not None and ahead.slot.root != first.root
        (ahead.slot.tree / "src" / "app.py").write_text("print('planted')\n")
        (ahead.slot.tree / "planted.txt").write_text("x")
    with pool.checkout(main) as slot:
        assert slot.root == ahead.slot.root
        assert (slot.tree / "src" / "app.py").read_text() == "print('v2')\n"
        assert tree_state(slot.tree) == ([".gitignore", "README.md", "src", "src/app.py"], "")
    pool = gitmod.WorktreePool(tmp_path / "work", "shop", bare, ahead=1)
    with pool.checkout(main) as first:
        pool.prepare_next(main)
    with pool.checkout(v1) as slot:  # prepared for another commit: reset to the one asked for
        assert (slot.tree / "src" / "app.py").read_text() == "print('v1')\n"
        assert tree_state(slot.tree)[1] == ""


# ---------------------------------------------------------------------------- what a reset must not keep


def make_big_bare(tmp_path: Path, more: Callable[[Path], object]) -> tuple[Path, str]:
    """A bare repo whose one commit tracks more files than the pool cleans itself (`git clean`
    cleans its slots), what `more` adds to the work tree, and no .gitattributes; (path, sha).
    Its clone is tmp_path / "big-clone"."""
    path = tmp_path / "big.git"
    gitmod.create_bare(path)
    work = tmp_path / "big-clone"
    git(tmp_path, "clone", "--quiet", str(path), str(work))
    (work / "src").mkdir()
    for i in range(gitmod.CLEAN_IN_PROCESS + 1):
        (work / "src" / f"f{i}.txt").write_text("line\n")
    more(work)
    git(work, "add", ".")
    git(work, "commit", "--quiet", "-m", "big")
    git(work, "push", "--quiet", "origin", "HEAD:main")
    return path, sha_of(work, "HEAD")


@pytest.fixture
def big_bare(tmp_path: Path) -> tuple[Path, str]:
    """make_big_bare with an app.py beside."""
    return make_big_bare(tmp_path, lambda work: (work / "app.py").write_text("print('v1')\n"))


def test_a_git_dir_left_in_a_large_trees_folder_does_not_reach_the_next_action(big_bare: tuple[Path, str],
                                                                               tmp_path: Path) -> None:
    """`git clean` never removes an entry named .git: one an action left in a tracked folder stayed
    in the slot, and the next action's (another run's) `git` in that folder took it for its
    repository, running the last action's `core.fsmonitor` command."""
    bare, sha = big_bare
    pool = gitmod.WorktreePool(tmp_path / "work", "big", bare)
    ran = tmp_path / "fsmonitor-ran"
    with pool.checkout(sha) as slot:
        git(slot.tree / "src", "init", "--quiet", ".")
        git(slot.tree / "src", "config", "core.fsmonitor", f"touch {ran}")
        (slot.tree / "app.py").write_text("print('v1')\n")  # a change: the reset runs git
    with pool.checkout(sha) as slot:
        assert not (slot.tree / "src" / ".git").exists()
        git(slot.tree / "src", "status", "--porcelain")  # what the next action may run there
        assert not ran.exists()
        assert git(slot.tree, "rev-parse", "--show-toplevel").stdout.strip() == str(slot.tree)


def test_a_gitattributes_left_in_a_large_tree_does_not_steer_the_checkout(big_bare: tuple[Path, str],
                                                                          tmp_path: Path) -> None:
    """`git checkout` reads a .gitattributes the commit lacks from the tree: one an action left
    (a large tree was cleaned only after the checkout) turned the next action's files into what
    the commit does not hold (CRLF line ends here; an encoding, `ident`)."""
    bare, sha = big_bare
    pool = gitmod.WorktreePool(tmp_path / "work", "big", bare)
    with pool.checkout(sha) as slot:
        (slot.tree / ".gitattributes").write_text("* eol=crlf\n")
        (slot.tree / "src" / ".gitattributes").write_text("* working-tree-encoding=UTF-16\n")
        for name in ("app.py", "src/f0.txt"):
            os.utime(slot.tree / name, (1, 1))  # a stat change: the checkout writes it again
    with pool.checkout(sha) as slot:
        assert (slot.tree / "app.py").read_bytes() == b"print('v1')\n"
        assert (slot.tree / "src" / "f0.txt").read_bytes() == b"line\n"
        assert git(slot.tree, "status", "--porcelain", "--ignored").stdout == ""


def test_a_slot_of_the_earlier_layout_is_emptied_before_its_first_checkout(bare: Path, tmp_path: Path) -> None:
    """A slot made before the daemon's git dir was beside its tree (its index in tree/.git and in
    <slot>/index) has no index the daemon trusts: its tree is emptied before the checkout, so
    nothing the last action left there (a .gitattributes the checkout would read) stays."""
    pool = gitmod.WorktreePool(tmp_path / "work", "shop", bare)
    main = sha_of(bare, "main")
    with pool.checkout(main) as slot:
        pass
    gitmod.remove_tree(slot.git_dir)  # the earlier layout: the index was the tree's
    shutil.copyfile(slot.tree / ".git" / "index", slot.root / "index")
    (slot.tree / ".gitattributes").write_text("* eol=crlf\n")
    (slot.tree / "src" / "left.txt").write_text("x")
    with pool.checkout(main) as slot:
        assert (slot.tree / "src" / "app.py").read_bytes() == b"print('v2')\n"
        assert tree_state(slot.tree) == ([".gitignore", "README.md", "src", "src/app.py"], "")
        assert sorted(p.name for p in slot.root.iterdir()) == [gitmod.STAMP, "git", "tree"]  # the daemon's alone


RACER = """
import os, sys
tree, target = int(sys.argv[1]), sys.argv[2]
while True:  # a link wherever the reset has just removed a name of the tree's .git
    for name in (".git/index", ".git/config", ".git/HEAD", ".git/objects/info/alternates"):
        try:
            os.symlink(target, name, dir_fd=tree)
        except OSError:
            pass
"""


def test_the_trees_git_dir_is_never_written_through_a_link_a_racing_process_puts_there(bare: Path,
                                                                                        tmp_path: Path) -> None:
    """The reset rewrites the tree's .git (for the action) as the daemon's user. A process of another
    sandbox holding the tree open can put a link where the reset has just removed a file: writing by
    path followed it, and the daemon wrote the index (file names of the pusher's choosing) to any
    file on the host. Here that process holds the tree's folder and races each reset; the file it
    points at is never written (the reset that meets a link starts the slot afresh)."""
    pool = gitmod.WorktreePool(tmp_path / "work", "shop", bare)
    main = sha_of(bare, "main")
    target = tmp_path / "outside"
    with pool.checkout(main) as slot:
        pass
    held = os.open(slot.tree, os.O_RDONLY | os.O_DIRECTORY)
    racer = subprocess.Popen([sys.executable, "-c", RACER, str(held), str(target)], pass_fds=(held,))
    try:
        for _ in range(300):
            with pool.checkout(main):
                pass
            if target.exists():
                break
    finally:
        racer.kill()
        racer.wait()
        os.close(held)
    assert not target.exists(), "the reset wrote through a link to a file outside the slot"
    with pool.checkout(main) as slot:
        assert tree_state(slot.tree) == ([".gitignore", "README.md", "src", "src/app.py"], "")


SWAPPER = """
import ctypes, os, shutil, stat, sys
tree, name, victim = int(sys.argv[1]), sys.argv[2].encode(), sys.argv[3]
libc = ctypes.CDLL(None, use_errno=True)

def kind(n):
    try:
        return stat.S_IFMT(os.lstat(n, dir_fd=tree).st_mode)
    except OSError:
        return None

while True:  # the folder `name` and a link to the victim's folder trade places, again and again
    if libc.renameat2(tree, name, tree, b"b.txt", 2) == 0:  # RENAME_EXCHANGE
        continue
    try:  # the clean removed one of them: put them back
        if kind(name) is None and kind("b.txt") == stat.S_IFDIR:
            os.rename("b.txt", name, src_dir_fd=tree, dst_dir_fd=tree)
        elif kind(name) == stat.S_IFDIR and kind("b.txt") == stat.S_IFDIR:
            shutil.rmtree("b.txt", dir_fd=tree)
        if kind("b.txt") is None:
            os.symlink(victim, "b.txt", dir_fd=tree)
    except OSError:
        pass
"""


@pytest.mark.parametrize("folder", ["src", "lib"])
def test_the_clean_never_follows_a_folder_swapped_for_a_link(tmp_path: Path, folder: str) -> None:
    """The in-process clean (and the emptying of a submodule's folder) ran by path as the daemon's
    user: a process of another sandbox holding the tree open swaps a tracked folder (`src`) or a
    submodule's (`lib`) for a link to a host folder between the clean's looks, and the clean
    removed that folder's files. Here it races the clean until it would have; the host folder
    keeps its file (a clean that meets the swap may fail: the reset then starts the slot afresh)."""
    tree = tmp_path / "tree"
    git(tmp_path, "init", "--quiet", "tree")
    (tree / "src").mkdir()
    (tree / "src" / "a.txt").write_text("a\n")
    (tree / "b.txt").write_text("b\n")
    git(tree, "add", ".")
    git(tree, "update-index", "--add", "--cacheinfo", f"160000,{'1' * 40},lib")
    (tree / "lib").mkdir()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("x")
    (tree / "b.txt").unlink()
    (tree / "b.txt").symlink_to(victim)
    held = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    swapper = subprocess.Popen([sys.executable, "-c", SWAPPER, str(held), folder, str(victim)], pass_fds=(held,))
    try:
        for _ in range(10_000):
            try:
                gitmod.clean_untracked(tree, tree / ".git" / "index")
            except OSError:
                pass
            if not (victim / "keep").exists():
                break
    finally:
        swapper.kill()
        swapper.wait()
        os.close(held)
    assert (victim / "keep").exists(), "the clean removed a file outside the tree"


def test_the_daemons_git_never_follows_a_folder_swapped_for_a_link(tmp_path: Path) -> None:
    """git checks the folders on a file's way with lstat, then opens the file by path: a process of
    another sandbox holding the tree open swaps a tracked folder for a link to a host folder in
    between, and the checkout (the daemon's, as root) wrote the pushed file there (a cron job,
    say). The daemon's git sees the tree mounted nosymfollow: the checkout fails instead."""
    bare = tmp_path / "b.git"
    gitmod.create_bare(bare)
    work = tmp_path / "clone"
    git(tmp_path, "clone", "--quiet", str(bare), str(work))
    (work / "src").mkdir()
    (work / "src" / "a.txt").write_text("* * * * * root pushed-command\n")
    (work / "b.txt").write_text("b\n")
    git(work, "add", ".")
    git(work, "commit", "--quiet", "-m", "a")
    git(work, "push", "--quiet", "origin", "HEAD:main")
    sha = sha_of(work, "HEAD")
    pool = gitmod.WorktreePool(tmp_path / "work", "b", bare)
    with pool.checkout(sha) as slot:
        pass
    victim = tmp_path / "victim"
    victim.mkdir()
    held = os.open(slot.tree, os.O_RDONLY | os.O_DIRECTORY)
    swapper = subprocess.Popen([sys.executable, "-c", SWAPPER, str(held), "src", str(victim)], pass_fds=(held,))
    try:
        for _ in range(300):
            try:
                os.utime(slot.tree / "src" / "a.txt", (1, 1))  # a stat change: the checkout writes it again
            except OSError:
                pass
            try:
                pool._git(slot, "checkout", "--quiet", "--force", "--detach", sha)
            except subprocess.CalledProcessError:
                pass  # it met the swap
            if list(victim.iterdir()):
                break
    finally:
        swapper.kill()
        swapper.wait()
        os.close(held)
    assert list(victim.iterdir()) == [], "the daemon's git wrote into a folder outside the tree"
    with pool.checkout(sha) as slot:
        assert (slot.tree / "src" / "a.txt").read_text() == "* * * * * root pushed-command\n"


class _Made:
    """What `prepare_next` makes for a slot (a sandbox, in the daemon): records its discard."""

    def __init__(self) -> None:
        self.discarded = False

    def discard(self) -> None:
        self.discarded = True


def test_a_next_slot_whose_hand_over_fails_in_the_background_is_still_let_go(tmp_path: Path) -> None:
    """A large tree (no hand-over in the reset) whose hand-over in the background fails: a tree
    deeper than Python's stack raised RecursionError there once (it is walked at any depth now),
    and a folder moved while the walk had let it go still ends it with an error (sandbox.hand_over;
    the settle below raises that error in the background job). The slot's lock and the sandbox
    made for it were never let go (one of each per such push, for the daemon's life): the job
    keeps the slot (its action hands the tree over at launch) and the pool lets both go."""
    import errno
    import threading

    from gitpipe.sandbox import hand_over

    path, sha = make_big_bare(tmp_path, lambda work: (work / "app.py").write_text("print('v1')\n"))
    made: list[_Made] = []

    def make(slot: gitmod.Slot) -> _Made:
        made.append(_Made())
        return made[-1]

    def settle(tree: Path) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise OSError(errno.ESTALE, "a folder of the worktree was moved while it was handed over")
        hand_over(tree, None, None)

    pool = gitmod.WorktreePool(tmp_path / "w", "big", path, settle=settle, ahead=1)
    with pool.checkout(sha):
        pool.prepare_next(sha, make, during=make)
        ahead = pool._next
        assert ahead is not None and ahead.job is not None
        ahead.wait()
        assert ahead.job.exception() is None and ahead.slot is not None and not ahead.slot.settled
    pool.close()
    assert made and all(m.discarded for m in made)
    for lock in (tmp_path / "w" / "big").glob("*.lock"):
        fd = os.open(lock, os.O_RDWR)
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises while a slot's lock is still held
        finally:
            os.close(fd)


def test_a_next_slot_of_a_tree_deeper_than_pythons_stack_is_handed_over_in_the_background(
        tmp_path: Path) -> None:
    """A large tree with a tracked path 1,200 folders deep: its hand-over in the background
    raised RecursionError (the walk recursed per folder); it is handed over there now, and the
    folder at the bottom has its plain mode."""
    from gitpipe.sandbox import hand_over

    deep = "/".join(["d"] * 1200)  # relative: the whole path is longer than one call takes
    work = tmp_path / "big-clone"
    path, sha = make_big_bare(tmp_path, lambda work: subprocess.run(
        ["sh", "-c", f"mkdir -p {deep} && echo x > {deep}/f"], cwd=work, check=True))
    pool = gitmod.WorktreePool(tmp_path / "w", "big", path, settle=lambda t: hand_over(t, None, None), ahead=1)
    try:
        with pool.checkout(sha):
            pool.prepare_next(sha, lambda slot: _Made(), during=lambda slot: _Made())
            ahead = pool._next
            assert ahead is not None and ahead.job is not None
            ahead.wait()
            assert ahead.job.exception() is None and ahead.slot is not None and ahead.slot.settled
            bottom = subprocess.run(["stat", "-c", "%a", deep], cwd=ahead.slot.tree, capture_output=True, text=True)
            assert bottom.stdout.strip() == "755", bottom.stderr
        pool.close()
    finally:  # pytest's own removal of old temporary folders recurses: it must never meet this depth
        subprocess.run(["rm", "-rf", "--", str(work), str(tmp_path / "w")], check=False)


def test_rewrite_keeps_a_plain_file_and_replaces_anything_a_write_could_go_through(tmp_path: Path) -> None:
    """fdtree.rewrite (a slot's .git files): a regular file with one name keeps its inode (no new
    one per reset); a hard link, a symlink, a FIFO are replaced, their targets untouched, and
    nothing hangs on the FIFO."""
    from gitpipe.fdtree import DIR_FLAGS, rewrite

    d = tmp_path / "git"
    d.mkdir()
    fd = os.open(d, DIR_FLAGS)
    try:
        (d / "HEAD").write_text("old-and-longer\n")
        before = (d / "HEAD").stat()
        rewrite(fd, "HEAD", b"new\n")
        assert (d / "HEAD").read_text() == "new\n" and (d / "HEAD").stat().st_ino == before.st_ino
        os.utime(d / "HEAD", ns=(1, 1))
        rewrite(fd, "HEAD", b"new\n")  # the same bytes: not written at all
        assert (d / "HEAD").stat().st_mtime_ns == 1

        host = tmp_path / "host-file"
        host.write_text("host\n")
        os.link(host, d / "config")
        os.symlink(host, d / "index")
        os.mkfifo(d / "alternates")
        for name in ("config", "index", "alternates"):
            rewrite(fd, name, b"ours\n")
            assert not (d / name).is_symlink() and (d / name).read_text() == "ours\n"
            assert (d / name).stat().st_nlink == 1
        assert host.read_text() == "host\n" and host.stat().st_nlink == 1
    finally:
        os.close(fd)


def test_a_slots_git_files_and_clock_stamp_are_kept_across_resets(bare: Path, tmp_path: Path) -> None:
    """A reset writes no new inode for what it writes every time (each one costs a scan on ext4
    without a journal): the tree's .git files and the stamp it reads the kernel's time from."""
    pool = gitmod.WorktreePool(tmp_path / "work", "shop", bare)
    main = sha_of(bare, "main")
    with pool.checkout(main) as slot:
        inodes = {p: (slot.tree / ".git" / p).stat().st_ino for p in ("HEAD", "config", "index", "objects/info/alternates")}
        (slot.tree / "build.o").write_text("untracked")  # the next reset has work to do
    stamp = (slot.root / gitmod.STAMP).stat().st_ino
    with pool.checkout(main) as slot:
        assert {p: (slot.tree / ".git" / p).stat().st_ino for p in inodes} == inodes
        assert (slot.root / gitmod.STAMP).stat().st_ino == stamp
        assert not (slot.tree / "build.o").exists()
        assert (slot.tree / ".git" / "HEAD").read_text() == main + "\n"


def test_a_runs_first_checkout_takes_the_slot_sealed_while_it_waited_without_a_second_look(
        bare: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pushed run's first action waits for the slot its push's reset prepares. Sealed while it
    waited, racy or not, nothing ran in the slot since the reset: it is handed over as it is,
    with no second walk of its files on the way from push to exec (WorktreePool._seal). Here
    not racy: the kernel's time read after every file's (as a fine-grained one is)."""
    monkeypatch.setattr(gitmod, "_kernel_now", lambda root: time.time_ns() + 10**9)
    main = sha_of(bare, "main")
    with gitmod.WorktreePool(tmp_path / "work", "shop", bare).checkout(main) as slot:
        (slot.tree / "build.o").write_text("left by the last run")
    pool = gitmod.WorktreePool(tmp_path / "work", "shop", bare, ahead=2)  # the next run's: two actions
    looked: list[str] = []
    still = pool._still
    pool._still = lambda slot, sha: looked.append(sha) or still(slot, sha)  # type: ignore[method-assign]

    def during(slot: gitmod.Slot) -> None:  # the reset goes on once the run's first action waits
        assert pool._next is not None and pool._next.wanted.wait(10)

    pool.prepare_next(main, during=during)
    assert pool._next is not None
    with pool.checkout(main) as slot:
        assert tree_state(slot.tree) == ([".gitignore", "README.md", "src", "src/app.py"], "")
    assert looked == [] and pool._sealed[str(slot.root)][2] is None  # not racy
    pool.prepare_next(main)  # a later action's: sealed before anyone waits, looked at again when taken
    assert pool._next is not None
    pool._next.wait()
    with pool.checkout(main):
        pass
    assert looked == [main]


def test_a_new_run_gets_a_new_home_and_output_file_a_process_of_an_earlier_one_cannot_reach(
        bare: Path, tmp_path: Path) -> None:
    """HOME and the output file are emptied in place between the attempts of one run (no new
    inode each time), but a run's first reset of a slot removes them: a process of an earlier
    run may hold them open (a descriptor passed to a sandbox still running) and must reach
    neither what the new run writes there nor what it reads from there."""
    from gitpipe.sandbox import fresh_dir, fresh_file

    def made(slot: gitmod.Slot) -> None:  # as the attempt's sandbox makes them
        fresh_dir(slot.home, None, None)
        fresh_file(slot.output, None, None)

    def held(slot: gitmod.Slot) -> tuple[int, int]:  # what a process of that run keeps open
        return os.open(slot.home, os.O_RDONLY | os.O_DIRECTORY), os.open(slot.output, os.O_RDWR)

    def unreached(slot: gitmod.Slot, home: int, output: int) -> None:
        assert slot.root == tmp_path / "work" / "shop" / "0"
        made(slot)
        os.write(output, b"DEPLOY_URL=https://evil.example\n")
        with pytest.raises(FileNotFoundError):
            os.open(".bashrc", os.O_WRONLY | os.O_CREAT, dir_fd=home)
        assert slot.output.read_bytes() == b"" and list(slot.home.iterdir()) == []

    main = sha_of(bare, "main")
    run = gitmod.WorktreePool(tmp_path / "work", "shop", bare)
    with run.checkout(main) as slot:
        made(slot)
        held_home, held_output = held(slot)
        inodes = slot.home.stat().st_ino, slot.output.stat().st_ino
    try:
        with run.checkout(main) as slot:  # the same run's next attempt: the same ones, emptied
            made(slot)
            assert (slot.home.stat().st_ino, slot.output.stat().st_ino) == inodes
        with gitmod.WorktreePool(tmp_path / "work", "shop", bare).checkout(main) as slot:  # the next run's
            unreached(slot, held_home, held_output)
            os.close(held_home)
            os.close(held_output)
            held_home, held_output = held(slot)  # now the other run's, held by a process of it
        with run.checkout(main) as slot:  # the first run again, after the other took the slot meanwhile
            unreached(slot, held_home, held_output)
    finally:
        os.close(held_home)
        os.close(held_output)
