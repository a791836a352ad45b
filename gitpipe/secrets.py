"""secrets.toml and protected refs; masking their values is gitpipe.masking's (`Masker`).

`load_secrets` reads and checks `$GITPIPE_HOME/secrets.toml`; `secrets_for` picks the secrets an
action asks for; `ref_protected` says whether a ref may receive secrets. No error raised here
ever contains a secret value.
"""

from __future__ import annotations

import json
import re
import shlex
import stat
import tomllib
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from gitpipe.errors import ConfigError
from gitpipe.masking import MASK, Masker, MaskStream, masked_forms
from gitpipe.refs import short_ref
from gitpipe.tomllines import Problems

__all__ = ["MASK", "Masker", "MaskStream", "load_secrets", "masked_forms", "ref_protected", "secrets_for"]
MIN_LENGTH = 8
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")
_TOML_WHERE = re.compile(r" \(at (?:line (\d+), column \d+|end of document)\)\Z")


# --- secrets.toml -----------------------------------------------------------------------------


def load_secrets(path: Path) -> dict[str, dict[str, str]]:
    """Read secrets.toml as {repo: {NAME: value}}; {} when the file does not exist."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return {}
    _check_mode(path, mode)
    text = _read_text(path)
    problems = Problems(str(path), text)  # every bad secret at once, each at its line
    found = {repo: _repo_secrets(problems, repo, table) for repo, table in _parse(path, text).items()}
    problems.check()
    return found


def _check_mode(path: Path, mode: int) -> None:
    """Refuse anything but a regular file that only its owner may read or write."""
    if not stat.S_ISREG(mode):
        raise ConfigError("secrets file is not a regular file", file=str(path))
    if mode & 0o077:
        raise ConfigError(
            f"secrets file has mode {stat.S_IMODE(mode):04o}; group and others must have no access",
            file=str(path),
            hint=f"chmod 600 {shlex.quote(str(path))}",
        )


def _read_text(path: Path) -> str:
    """The file's text; an undecodable byte is reported by line only."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError("not valid UTF-8", file=str(path), line=line) from None


def _parse(path: Path, text: str) -> dict[str, Any]:
    """tomllib.loads, with its error turned into a ConfigError carrying the line."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message, line = str(e), None
        if where := _TOML_WHERE.search(message):
            message = message[: where.start()]
            line = int(where[1]) if where[1] else text.count("\n") + 1
        # tomllib quotes the offending character, which may be part of a secret.
        message = re.sub(r"(character) .*", r"\1", message)
        raise ConfigError(f"invalid TOML: {message}", file=str(path), line=line) from None


def _repo_secrets(problems: Problems, repo: str, table: object) -> dict[str, str]:
    """Check one repo's table: valid names, string values, none too short (each problem added)."""
    if not isinstance(table, dict):
        problems.add(f'"{repo}" must be a table: [{repo}] followed by NAME = "value"', repo)
        return {}
    for name, value in table.items():
        where = f'repo "{repo}", secret "{name}"'
        if not _ENV_NAME.match(name):
            problems.add(f"{where}: not an environment variable name", repo, name,
                         hint="letters, digits and _, not starting with a digit")
        elif not isinstance(value, str):
            problems.add(f"{where}: the value must be a string", repo, name)
        elif len(value) < MIN_LENGTH:
            problems.add(f"{where}: shorter than {MIN_LENGTH} characters", repo, name,
                         hint="a short value cannot be told apart from ordinary log text to mask it")
    return dict(table)


def secrets_for(
    all_secrets: dict[str, dict[str, str]],
    repo: str,
    names: tuple[str, ...],
    *,
    path: Path | str = "secrets.toml",
) -> dict[str, str]:
    """The secrets `names` of `repo`; a missing one is a ConfigError saying where to add it."""
    have = all_secrets.get(repo, {})
    missing = [name for name in names if name not in have]
    if missing:
        noun = "secret" if len(missing) == 1 else "secrets"
        listed = ", ".join(f'"{name}"' for name in missing)
        table = f"[{repo}]" if _BARE_KEY.match(repo) else f"[{json.dumps(repo)}]"
        hint = f'add {missing[0]} = "..." under {table} in {path}'
        raise ConfigError(f'repo "{repo}" has no {noun} {listed}', file=str(path), hint=hint)
    return {name: have[name] for name in names}


def ref_protected(patterns: tuple[str, ...], ref: str) -> bool:
    """Whether a full ref (refs/heads/main, refs/tags/v1.2) matches a pattern on its short name."""
    short = short_ref(ref)
    return any(fnmatchcase(short, pattern) for pattern in patterns)
