"""Shared fixtures: a temporary gitpipe home (see tests/helpers.py)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import Home

# Tests stop what they start the way a user does, with Ctrl-C's SIGINT (`gitpipe edit`, a daemon
# in the foreground). A shell without job control starts a background command (`cmd &`, as a CI
# runner or nohup may) with SIGINT and SIGQUIT ignored, every process it starts inherits that,
# and gitpipe, like any well-behaved program, keeps a signal ignored that it was started with:
# the editor then never stopped, and its tests failed after 20 s. This world starts with both at
# their defaults, in pytest and in every xdist worker (each imports this file).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGQUIT) == signal.SIG_IGN:
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)

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
