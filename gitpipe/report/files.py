"""Where pages live in the site, and writing into it: atomically, linking rather than copying.

A reader (nginx, a browser on file://) never sees half a file: everything is written
to a temporary name in the same directory and renamed over the old one. No fsync: the
site is derived data, `gitpipe report` rebuilds it after a crash.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import zipfile
from pathlib import Path

from gitpipe.models import ArtifactRecord

PAGE_SIZE = 50  # runs per page of a repo's history


def segment(name: str) -> str:
    """A name made safe as one path segment (repo names are already; this is a second fence)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"
    return "_" + safe[1:] if safe.startswith(".") else safe


def run_href(repo: str, run_id: int) -> str:
    """A run page's path relative to the site root."""
    return f"{segment(repo)}/runs/{run_id}.html"


def repo_href(repo: str) -> str:
    """A repo's index page, relative to the site root."""
    return f"{segment(repo)}/index.html"


def block_href(repo: str, block: int) -> str:
    """An archived page of a repo's history (block 1 holds its oldest PAGE_SIZE runs)."""
    return f"{segment(repo)}/page-{block}.html"


def environments_href(repo: str) -> str:
    """A repo's environments page, relative to the site root."""
    return f"{segment(repo)}/environments.html"


def run_files(repo: str, run_id: int) -> str:
    """The folder of a run's published logs and artifacts, relative to the site root."""
    return f"{segment(repo)}/runs/{run_id}"


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def write_atomic(path: Path, text: str) -> None:
    """Write a page so that readers see the old one or the new one, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_if_changed(path: Path, text: str) -> bool:
    """Write unless the file already holds exactly this text (for the shared assets)."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except OSError:
        pass
    write_atomic(path, text)
    return True


def link_file(src: Path, dest: Path) -> None:
    """A hard link of `src` at `dest` (a copy across file systems), put in place atomically."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(dest)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def publish_artifact(art: ArtifactRecord, folder: Path) -> str | None:
    """Put an artifact into a run's site folder once; its path relative to that folder.

    One file is linked as itself; several are zipped (once, when the artifact is first
    published: the daemon's thread pays for it, a weak spot for very large artifacts).
    None when the stored artifact is gone (pruned by keep_runs).
    """
    src = Path(art.path)
    if not src.is_dir():
        return None
    files = sorted(p for p in src.rglob("*") if p.is_file())
    name = segment(art.name)
    if len(files) == 1:
        rel = f"artifacts/{name}/{files[0].relative_to(src)}"
        if not (folder / rel).exists():
            link_file(files[0], folder / rel)
        return rel
    rel = f"artifacts/{name}.zip"
    if not (folder / rel).exists():
        _zip(src, files, folder / rel)
    return rel


def _zip(root: Path, files: list[Path], dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(dest)
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for f in files:
            z.write(f, str(f.relative_to(root)))
    os.replace(tmp, dest)
