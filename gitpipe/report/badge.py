"""Status badges: an SVG per pipeline and branch with the status of its newest finished run.

    <repo>/badge.svg             the repo's default branch
    <repo>/badge/<branch>.svg    any branch; "release/1.x" is badge/release/1.x.svg

A branch name's path segments are kept as they are when they hold only [A-Za-z0-9_.-] and do
not start with "." (nor, for a folder, end in ".svg"); any other segment is percent-encoded,
dots too (so ".." or "a b" can never name another file, and two branches never share a
badge: an encoded segment holds a "%", a kept one never does). Git itself keeps "a" and
"a/b" from both being branches. In a URL, write each "%" as "%25".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote

from gitpipe.report import files

COLOURS = {"succeeded": "#1a7f37", "failed": "#cf222e", "cancelled": "#6e7781"}
NO_RUNS = "#9a6700"
_SAFE = re.compile(r"[A-Za-z0-9_.-]+")
_NARROW, _WIDE = set("fijlrtI.,:;!|'() "), set("mwMW@%")
LABEL_LIMIT = 40  # characters of a pipeline name shown on a badge


def branch_path(branch: str) -> str:
    """A branch name as a path under <repo>/badge/ (without the .svg)."""
    parts = branch.split("/")
    out = []
    for i, part in enumerate(parts):
        # A folder named "x.svg" would collide with the badge file of the branch "x".
        folder_like_file = i < len(parts) - 1 and part.endswith(".svg")
        if _SAFE.fullmatch(part) and not part.startswith(".") and not folder_like_file:
            out.append(part)
        else:
            out.append(quote(part, safe="").replace(".", "%2E") or "%")
    return "/".join(out)


def href(repo: str, branch: str | None) -> str:
    """A badge's path relative to the site root; `branch` None: the default branch's badge."""
    if branch is None:
        return f"{files.segment(repo)}/badge.svg"
    return f"{files.segment(repo)}/badge/{branch_path(branch)}.svg"


def _width(text: str) -> int:
    """Roughly the width of `text` in Verdana 11px (what badges are drawn in)."""
    return round(sum(4.0 if c in _NARROW else 9.0 if c in _WIDE else 6.8 for c in text))


@dataclass(frozen=True)
class Badge:
    """What templates/badge.svg draws."""

    label: str
    status: str
    colour: str
    label_width: int
    status_width: int

    @property
    def width(self) -> int:
        return self.label_width + self.status_width


def badge(pipeline: str, status: str | None) -> Badge:
    """The badge of a pipeline whose newest finished run has `status` (None: none finished yet)."""
    label = pipeline if len(pipeline) <= LABEL_LIMIT else pipeline[:LABEL_LIMIT - 1] + "…"
    shown = status or "no runs"
    return Badge(label, shown, COLOURS.get(status or "", NO_RUNS), _width(label) + 12, _width(shown) + 12)
