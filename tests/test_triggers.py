"""Tests of gitpipe.triggers: the one table of trigger kinds, and matching a push."""

from __future__ import annotations

import marshal
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gitpipe import keys, triggers
from gitpipe.models import TriggerSpec
from gitpipe.pipeline import parse

ROOT = Path(__file__).resolve().parent.parent
STAGE = '[[stage]]\nname = "s"\n  [[stage.action]]\n  name = "a"\n  run = "true"\n'


def test_every_trigger_key_belongs_to_exactly_one_kind() -> None:
    """keys.py describes [trigger]; KINDS says which kind each key declares, and nothing more."""
    declared = [key for kind in triggers.KINDS.values() for key in kind.keys]
    assert sorted(declared) == sorted(keys.names("trigger"))
    assert len(declared) == len(set(declared))


def test_each_kind_is_validated_from_its_own_keys() -> None:
    trigger = parse('[trigger]\nbranches = ["main"]\ntags = ["v*"]\npaths = ["src/**"]\n'
                    'schedule = ["0 3 * * *"]\nsuperseded = "cancel"\n' + STAGE).trigger
    assert trigger.branches == ("main",) and trigger.tags == ("v*",) and trigger.paths == ("src/**",)
    assert [s.cron for s in trigger.schedule] == ["0 3 * * *"] and trigger.superseded == "cancel"
    assert parse(STAGE).trigger == TriggerSpec()


def test_only_a_push_supersedes_older_runs_of_its_ref() -> None:
    assert [name for name in triggers.KINDS if triggers.supersedes(name)] == [triggers.PUSH]
    assert not triggers.supersedes("nonsense")


@pytest.mark.parametrize(("ref", "expected"), [
    ("refs/heads/main", True), ("refs/heads/release/1.2", True), ("refs/heads/feature", False),
    ("refs/tags/v1.0", True), ("refs/tags/1.0", False), ("refs/notes/x", False), ("main", False),
])
def test_the_hook_matches_what_it_cached_as_the_daemon_matches_the_pipeline(ref: str, expected: bool) -> None:
    """The hook's cache goes through marshal; what comes back matches a ref as the TriggerSpec does."""
    trigger = TriggerSpec(branches=("main", "release/*"), tags=("v*",), paths=("src/**",))
    cached = marshal.loads(marshal.dumps(triggers.hook_fields(trigger)))
    assert triggers.push_starts(cached, ref) is expected
    assert triggers.ref_triggers(trigger, ref) is expected


def test_no_trigger_kind_is_written_as_a_literal_outside_its_home() -> None:
    """Adding a kind has one home: nothing else compares or records a kind by its string."""
    literal = re.compile(r"""trigger\s*(?:==|!=|=)\s*["'](?:push|schedule|manual|retry)["']""")
    found = [f"{path.relative_to(ROOT)}:{n}" for path in sorted((ROOT / "gitpipe").rglob("*.py"))
             if path.name != "triggers.py"
             for n, line in enumerate(path.read_text().splitlines(), 1) if literal.search(line)]
    assert found == []


def test_the_hook_imports_nothing_more_to_match_a_push() -> None:
    """triggers.py is on every push's path: importing it must not pull in re, typing or the models."""
    code = ("import sys; before = set(sys.modules); import gitpipe.triggers; "
            "print(sorted(m for m in set(sys.modules) - before if not m.startswith(('gitpipe', '__future__'))))")
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]", out.stdout
