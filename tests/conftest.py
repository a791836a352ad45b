"""Shared fixtures: a temporary gitpipe home (see tests/helpers.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import Home

# Enough slots that parallel actions really run in parallel on a 2-core machine; a short
# grace so a daemon stopped under a running action does not hold a test for 30 s.
TEST_CONFIG = """\
max_parallel = 8
stop_grace = "3s"
"""


@pytest.fixture
def home(tmp_path: Path) -> Home:
    """An initialised gitpipe home in tmp_path (`gitpipe init`), no repo yet, no daemon."""
    h = Home(tmp_path)
    h.init(TEST_CONFIG)
    return h


@pytest.fixture
def out(home: Home, tmp_path: Path) -> Path:
    """A directory outside every worktree where scripts leave evidence.

    The sandbox shows actions nothing of the host but their worktree, so the host opens
    this one to them by its own setting (`[sandbox] read_write`), as an admin would.
    """
    d = tmp_path / "out"
    home.share(d)
    return d
