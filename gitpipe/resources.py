"""Where the shipped hooks/, templates/ and systemd/ folders are: inside the installed
package (`gitpipe/data/...`, mapped in pyproject.toml) or, in a checkout, beside it."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def folder(name: str) -> Path:
    """The shipped folder `name` ("hooks", "templates" or "systemd")."""
    for candidate in (_PACKAGE / "data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"gitpipe is installed without its {name}/ folder (looked in {_PACKAGE})")
