"""Artifacts: files an action's `outputs` globs match, stored under the home with size
and sha256, and restored into later actions' worktrees at the same relative paths.

A glob may not reach outside the worktree: no absolute pattern, no `..`, and no match
whose real path (symlinks resolved) lies outside. Restoring never writes outside the
target worktree either.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
from pathlib import Path

from gitpipe.errors import ActionError
from gitpipe.models import ArtifactRecord

MANIFEST = "MANIFEST.sha256"


def _inside(root: Path, path: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def match(tree: Path, name: str, patterns: tuple[str, ...]) -> list[str]:
    """Relative file paths the patterns match, checked to stay inside the tree."""
    root = tree.resolve()
    files: set[str] = set()
    for pattern in patterns:
        if os.path.isabs(pattern) or ".." in Path(pattern).parts:
            raise ActionError(f'artifact "{name}": glob "{pattern}" reaches outside the worktree')
        hits = glob.glob(pattern, root_dir=root, recursive=True, include_hidden=True)
        if not hits:
            raise ActionError(f'artifact "{name}": glob "{pattern}" matched no file',
                              hint="check the path the action writes to")
        for hit in hits:
            _collect(root, root / hit, name, pattern, files)
    return sorted(files)


def _collect(root: Path, path: Path, name: str, pattern: str, files: set[str]) -> None:
    real = path.resolve()
    if not _inside(root, real) or (real == root and path != root):
        raise ActionError(f'artifact "{name}": "{path.relative_to(root)}" (glob "{pattern}") '
                          "points outside the worktree")
    if path.is_dir():
        for sub in path.rglob("*"):
            if sub.is_file() or sub.is_symlink():
                _collect(root, sub, name, pattern, files)
    elif path.is_file():
        files.add(str(path.relative_to(root)))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def store(tree: Path, dest: Path, run_id: int, action: str, name: str,
          patterns: tuple[str, ...]) -> ArtifactRecord:
    """Copy the matched files to `dest` (the run's artifact dir / name); size and sha256.

    The sha256 of a one-file artifact is the file's; of several files, the sha256 of a
    `sha256sum`-style manifest (also stored, so `sha256sum -c` checks the files).
    """
    files = match(tree, name, patterns)
    if not files:
        raise ActionError(f'artifact "{name}": {", ".join(patterns)} matched only empty folders, no file')
    target = dest / name
    if target.exists():
        shutil.rmtree(target)
    size, lines = 0, []
    for rel in files:
        src, out = tree / rel, target / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out)
        shutil.copymode(src, out)
        size += out.stat().st_size
        lines.append(f"{_sha256(out)}  {rel}\n")
    manifest = "".join(lines)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"{name}.{MANIFEST}").write_text(manifest)
    digest = lines[0].split()[0] if len(lines) == 1 else hashlib.sha256(manifest.encode()).hexdigest()
    return ArtifactRecord(run_id=run_id, name=name, action=action, size=size, sha256=digest,
                          path=str(target), files=len(files))


def restore(art: ArtifactRecord, tree: Path) -> None:
    """Copy a stored artifact's files into a worktree at their relative paths."""
    src_root = Path(art.path)
    root = tree.resolve()
    if not src_root.is_dir():
        raise ActionError(f'artifact "{art.name}" of run #{art.run_id} is gone from {src_root}',
                          hint="it may have been pruned by keep_runs; retry the run")
    for src in sorted(src_root.rglob("*")):
        if not src.is_file():
            continue
        rel = src.relative_to(src_root)
        out = root / rel
        if not _inside(root, out.parent.resolve()):
            raise ActionError(f'artifact "{art.name}": restoring "{rel}" would write outside the worktree')
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.is_symlink() or out.exists():
            out.unlink()
        shutil.copyfile(src, out)
        shutil.copymode(src, out)
