"""Git ref names: a full ref (`refs/heads/main`, `refs/tags/v1`) and its short name.

The one place that strips `refs/heads/` and `refs/tags/`. No imports: the git hook uses it,
and every millisecond of its import time is added to each `git push`.
"""

from __future__ import annotations

BRANCH_PREFIX = "refs/heads/"
TAG_PREFIX = "refs/tags/"


def branch_of(ref: str) -> str | None:
    """`main` for refs/heads/main; None for any other ref."""
    return ref[len(BRANCH_PREFIX):] if ref.startswith(BRANCH_PREFIX) else None


def tag_of(ref: str) -> str | None:
    """`v1` for refs/tags/v1; None for any other ref."""
    return ref[len(TAG_PREFIX):] if ref.startswith(TAG_PREFIX) else None


def kind_of(ref: str) -> tuple[str, str]:
    """("branch", "main") for refs/heads/main, ("tag", "v1") for refs/tags/v1, else ("ref", ref)."""
    branch = branch_of(ref)
    if branch is not None:
        return "branch", branch
    tag = tag_of(ref)
    return ("tag", tag) if tag is not None else ("ref", ref)


def short_ref(ref: str) -> str:
    """A branch or tag's name without refs/heads/ or refs/tags/; any other ref as it is."""
    return kind_of(ref)[1]
