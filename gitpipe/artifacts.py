"""Artifacts: files an action's `outputs` globs match, stored under the home with size
and sha256, and restored into later actions' worktrees at the same relative paths.

A glob may not reach outside the worktree: no absolute pattern, no `..`, and no match
whose real path (symlinks resolved) lies outside. Restoring never writes outside the
target worktree either.
"""

from __future__ import annotations

import filecmp
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from gitpipe.cachefs import MAX_DEPTH
from gitpipe.digest import hashlib  # OpenSSL's, loaded on first use (see digest)
from gitpipe.errors import ActionError, ArtifactError, UsageError
from gitpipe.matching import path_regex
from gitpipe.models import ArtifactRecord
from gitpipe.settings import format_size

MANIFEST = "MANIFEST.sha256"


def _inside(root: Path, path: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


WALK_LIMIT = 200_000  # entries one glob may look at: a tree is job data, never trusted to be small


def match(tree: Path, name: str, patterns: tuple[str, ...]) -> list[str]:
    """Relative file paths the patterns match, checked to stay inside the tree.

    The tree is walked without following a symlinked directory (`ln -s / x` or a link
    loop with `**` made the daemon walk the host), from the pattern's literal prefix, and
    at most WALK_LIMIT entries. A symlink that matches counts as the file it points to,
    which must be inside the tree. A matched directory brings every file under it.
    """
    root = tree.resolve()
    files: set[str] = set()
    for pattern in patterns:
        if os.path.isabs(pattern) or ".." in Path(pattern).parts:
            raise ActionError(f'artifact "{name}": glob "{pattern}" reaches outside the worktree')
        hits = _walk(root, pattern, name)
        if not hits:
            raise ActionError(f'artifact "{name}": glob "{pattern}" matched no file',
                              hint="check the path the action writes to")
        files |= hits
    return sorted(files)


def _walk(root: Path, pattern: str, name: str) -> set[str]:
    regex = path_regex(pattern)
    literal = []
    for part in Path(pattern).parts:
        if any(c in part for c in "*?["):
            break
        literal.append(part)
    start = root.joinpath(*literal)
    found: set[str] = set()
    seen = 0
    if start.is_symlink() or start.is_file():
        _take(root, start, name, pattern, found)
        return found
    real = start.resolve()
    if not _inside(root, real):
        raise ActionError(f'artifact "{name}": "{"/".join(literal)}" (glob "{pattern}") points outside the worktree')
    if real != start:  # a symlinked directory on the way: never walked through
        return found
    matched_dirs: set[str] = set()
    # the deepest a match can be (a glob with ** or ending in / reaches any depth)
    reach = None if "**" in pattern or pattern.endswith("/") else len(Path(pattern).parts)
    for top, dirs, names in os.walk(start):  # followlinks=False: a symlinked dir is not entered
        rel_top = os.path.relpath(top, root)
        level = 0 if rel_top == "." else rel_top.count(os.sep) + 1
        links = [d for d in dirs if os.path.islink(os.path.join(top, d))]
        inside_match = rel_top in matched_dirs or (rel_top != "." and regex.fullmatch(rel_top) is not None)
        if inside_match:
            matched_dirs.update(os.path.join(rel_top, d) if rel_top != "." else d for d in dirs)
        elif reach is not None and level >= reach:
            dirs[:] = []  # nothing below can match: a deep tree beside `*.txt` is never walked
        if dirs and level + 1 > MAX_DEPTH:
            raise ActionError(f'artifact "{name}": glob "{pattern}" reached folders more than {MAX_DEPTH} deep '
                              f'(below {rel_top[:80]}...)', hint="narrow the glob, or pack that tree (tar) into one file")
        for entry in names + links:
            seen += 1
            if seen > WALK_LIMIT:
                raise ActionError(f'artifact "{name}": glob "{pattern}" looked at more than {WALK_LIMIT:,} '
                                  "entries of the worktree", hint="narrow the glob to the files to keep")
            rel = os.path.join(rel_top, entry) if rel_top != "." else entry
            if inside_match or regex.fullmatch(rel):
                _take(root, Path(top) / entry, name, pattern, found)
    return found


def _take(root: Path, path: Path, name: str, pattern: str, files: set[str]) -> None:
    """Add a matched path: a regular file, or a symlink to one inside the tree; else skip or refuse."""
    if path.is_symlink():
        real = path.resolve()
        if not _inside(root, real):
            raise ActionError(f'artifact "{name}": "{path.relative_to(root)}" (glob "{pattern}") '
                              "points outside the worktree")
        if not real.is_file():
            return
    elif not path.is_file():  # a directory reached as a literal path, a fifo, a socket, a device
        return
    files.add(str(path.relative_to(root)))


def manifest_line(digest: str, rel: str) -> str:
    """One line of a `sha256sum` manifest; a name with a newline or backslash is escaped the
    way GNU sha256sum writes it (a leading backslash), so `sha256sum -c` still reads it."""
    if "\\" in rel or "\n" in rel or "\r" in rel:
        escaped = rel.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
        return f"\\{digest}  {escaped}\n"
    return f"{digest}  {rel}\n"


def plain_mode(path: Path) -> int:
    """0755 or 0644 by the file's execute bit: never a setuid bit from job data (a stored
    artifact is the daemon's, and the site may publish it)."""
    return 0o755 if os.stat(path).st_mode & 0o111 else 0o644


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Budget:
    """What one action's outputs may add up to (max_artifact_size), counted before copying."""

    limit: int
    used: int = 0

    def take(self, name: str, size: int) -> None:
        self.used += size
        if self.used > self.limit:
            raise ActionError(f'artifact "{name}": the outputs add up to more than {format_size(self.limit)} '
                              "(max_artifact_size in gitpipe.toml)",
                              hint="keep fewer or smaller files, or raise max_artifact_size")


def store(tree: Path, dest: Path, run_id: int, action: str, name: str,
          patterns: tuple[str, ...], budget: Budget | None = None) -> ArtifactRecord:
    """Copy the matched files to `dest` (the run's artifact dir / name); size and sha256.

    The sha256 of a one-file artifact is the file's; of several files, the sha256 of a
    `sha256sum`-style manifest (also stored, so `sha256sum -c` checks the files). Sizes
    are counted before anything is copied (a sparse file counts at its full size), and a
    copy that fails (a full disk) leaves no partial artifact behind.
    """
    files = match(tree, name, patterns)
    if not files:
        raise ActionError(f'artifact "{name}": {", ".join(patterns)} matched only empty folders, no file')
    if budget is not None:
        budget.take(name, sum((tree / rel).stat().st_size for rel in files))
    target = dest / name
    if target.exists():
        shutil.rmtree(target)
    size, lines = 0, []
    try:
        for rel in files:
            src, out = tree / rel, target / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out)
            os.chmod(out, plain_mode(src))
            size += out.stat().st_size
            lines.append(manifest_line(_sha256(out), rel))
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    manifest = "".join(lines)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"{name}.{MANIFEST}").write_text(manifest)
    digest = lines[0].lstrip("\\").split()[0] if len(lines) == 1 else hashlib.sha256(manifest.encode()).hexdigest()
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
        os.chmod(out, plain_mode(src))


def restore_inputs(stored: list[ArtifactRecord], inputs: tuple[str, ...], tree: Path) -> None:
    """Restore an action's inputs (in their order); two that hold one path with different
    contents fail it.

    The copies of a matrix action often write the same path (a report, a coverage file):
    restored one over the other, the consumer would silently see one copy's. Identical
    files (a shared config) are fine.
    """
    by_name = {a.name: a for a in stored}
    arts = [by_name[name] for name in inputs if name in by_name]
    seen: dict[str, ArtifactRecord] = {}
    for art in arts:
        root = Path(art.path)
        for src in sorted(root.rglob("*")) if root.is_dir() else ():
            rel = str(src.relative_to(root))
            other = seen.get(rel)
            if other is None:
                seen[rel] = art
            elif src.is_file() and not filecmp.cmp(src, Path(other.path) / rel, shallow=False):
                raise ActionError(
                    f'inputs "{other.name}" and "{art.name}" both hold "{rel}", with different contents',
                    hint="let each copy write under a path of its own, e.g. reports/$MATRIX_PYTHON/")
    for art in arts:
        restore(art, tree)


# ---------------------------------------------------------------------------- handing out (`gitpipe artifacts`)
def manifest_entries(art: ArtifactRecord) -> list[tuple[str, str]]:
    """(sha256, relative path) of each file of a stored artifact, from its manifest, after checking
    the manifest against the sha256 recorded for the artifact; ArtifactError when they differ."""
    path = Path(art.path).parent / f"{art.name}.{MANIFEST}"
    try:
        text = path.read_text()
    except OSError:
        raise ArtifactError(f'artifact "{art.name}" of run #{art.run_id} is gone ({path} is missing)',
                            hint="keep_runs may have pruned it; retry the run to make it again") from None
    entries = [_manifest_entry(line) for line in text.splitlines(keepends=True)]
    recorded = entries[0][0] if len(entries) == 1 else hashlib.sha256(text.encode()).hexdigest()
    if recorded != art.sha256:
        raise ArtifactError(f'artifact "{art.name}" of run #{art.run_id}: its manifest {path} does not match '
                            f"the recorded sha256 {art.sha256}: the stored artifact was changed")
    for _, rel in entries:
        if os.path.isabs(rel) or ".." in Path(rel).parts:
            raise ArtifactError(f'artifact "{art.name}" of run #{art.run_id}: its manifest names "{rel}", '
                                "outside the artifact")
    return entries


def _manifest_entry(line: str) -> tuple[str, str]:
    """The inverse of `manifest_line`."""
    line = line.rstrip("\n")
    escaped = line.startswith("\\")
    digest, _, rel = line.lstrip("\\").partition("  ")
    if escaped:
        rel = rel.replace("\\\\", "\0").replace("\\n", "\n").replace("\\r", "\r").replace("\0", "\\")
    return digest, rel


def fetch(art: ArtifactRecord, staging: Path) -> list[str]:
    """Copy a stored artifact's files into `staging`, each checked against its sha256 as it is
    copied; the relative paths. ArtifactError on the first file that differs (or is gone)."""
    src_root = Path(art.path)
    names = []
    for digest, rel in manifest_entries(art):
        src, out = src_root / rel, staging / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        try:
            with open(src, "rb") as fin, open(out, "wb") as fout:
                while chunk := fin.read(1 << 20):
                    h.update(chunk)
                    fout.write(chunk)
        except FileNotFoundError:
            raise ArtifactError(f'artifact "{art.name}" of run #{art.run_id}: its file "{rel}" is gone',
                                hint="keep_runs may have pruned it; retry the run to make it again") from None
        if h.hexdigest() != digest:
            raise ArtifactError(f'artifact "{art.name}" of run #{art.run_id}: "{rel}" does not match its '
                                f"sha256 (stored {h.hexdigest()[:16]}…, recorded {digest[:16]}…): "
                                "the stored file is corrupted, so it is not handed out",
                                hint="retry the run to make the artifact again")
        os.chmod(out, plain_mode(src))
        names.append(rel)
    return names


def download(arts: list[tuple[ArtifactRecord, str]], out: Path) -> list[Path]:
    """Put artifacts under `out`, each at `out/<prefix>/<its relative paths>`; every file is checked
    against its sha256 before anything reaches `out`, and nothing is overwritten. On an error
    nothing is left at the destination; the paths written otherwise."""
    import tempfile

    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".gitpipe-artifacts-", dir=out))
    try:
        placed: list[tuple[Path, Path]] = []
        for art, prefix in arts:
            for rel in fetch(art, staging / prefix):
                placed.append((staging / prefix / rel, out / prefix / rel))
        linked = next((link for _, dest in placed if (link := _link_on_the_way(out, dest)) is not None), None)
        if linked is not None:
            raise UsageError(f"{linked} is a symbolic link; nothing was written (files are never written through "
                             "a link in the destination)", hint="remove it, or download into another --out DIR")
        taken = [dest for _, dest in placed if dest.exists() or dest.is_symlink()]
        if taken:
            raise UsageError(f"{taken[0]} already exists" + (f" (and {len(taken) - 1} more)" if len(taken) > 1 else "")
                             + "; nothing was written", hint="remove it, or download into another --out DIR")
        for src, dest in placed:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.rename(src, dest)
        return [dest for _, dest in placed]
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _link_on_the_way(out: Path, dest: Path) -> Path | None:
    """The first folder between `out` and `dest` that is a symlink (another account may have put it
    in a shared --out), or None."""
    here = out
    for part in dest.parent.relative_to(out).parts:
        here = here / part
        if here.is_symlink():
            return here
    return None
