"""`keep_runs`: the files of older runs (logs, artifacts, report assets) are pruned; their
summary rows stay, so history and statistics are kept."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from gitpipe.settings import Settings
from gitpipe.store import Store

log = logging.getLogger("gitpipe")


def _size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def prune(settings: Settings, store: Store) -> tuple[int, int]:
    """Prune the files of finished runs older than the newest `keep_runs`; (runs, bytes freed)."""
    rows = store.prunable(settings.keep_runs)
    freed = 0
    for run_id in rows:
        for d in (settings.logs_dir / str(run_id), settings.artifacts_dir / str(run_id)):
            if d.exists():
                freed += _size(d)
                shutil.rmtree(d, ignore_errors=True)
        store.mark_pruned(run_id)
    if rows:
        log.info("keep_runs=%d: pruned the files of %d run(s), freed %.1f MB",
                 settings.keep_runs, len(rows), freed / 1e6)
    return len(rows), freed
