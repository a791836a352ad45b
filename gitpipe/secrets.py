"""secrets.toml, masking secret values out of everything stored or shown, and protected refs.

`load_secrets` reads and checks `$GITPIPE_HOME/secrets.toml`; `secrets_for` picks the secrets an
action asks for; `Masker` replaces every known form of every value by `***`, in whole strings
(`mask`) and in byte streams cut at arbitrary points (`stream`); `ref_protected` says whether a
ref may receive secrets. No error raised here ever contains a secret value.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import stat
import tomllib
from collections.abc import Iterable, Iterator
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

from gitpipe.errors import ConfigError

MASK = "***"
MIN_LENGTH = 8
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")
_KEY_PART = re.compile(r"""\s*(?:"((?:[^"\\]|\\.)*)"|'([^']*)'|([A-Za-z0-9_-]+))\s*""")
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
    return {repo: _repo_secrets(path, text, repo, table) for repo, table in _parse(path, text).items()}


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


def _repo_secrets(path: Path, text: str, repo: str, table: object) -> dict[str, str]:
    """Check one repo's table: valid names, string values, none too short."""
    if not isinstance(table, dict):
        raise _error(path, text, f'"{repo}" must be a table: [{repo}] followed by NAME = "value"', repo)
    for name, value in table.items():
        where = f'repo "{repo}", secret "{name}"'
        if not _ENV_NAME.match(name):
            hint = "letters, digits and _, not starting with a digit"
            raise _error(path, text, f"{where}: not an environment variable name", repo, name, hint=hint)
        if not isinstance(value, str):
            raise _error(path, text, f"{where}: the value must be a string", repo, name)
        if len(value) < MIN_LENGTH:
            hint = "a short value cannot be told apart from ordinary log text to mask it"
            message = f"{where}: shorter than {MIN_LENGTH} characters"
            raise _error(path, text, message, repo, name, hint=hint)
    return dict(table)


def _error(path: Path, text: str, message: str, *keys: str, hint: str | None = None) -> ConfigError:
    """A ConfigError at the line where `keys` is defined."""
    return ConfigError(message, file=str(path), line=_line_of(text, *keys), hint=hint)


def _line_of(text: str, *keys: str) -> int | None:
    """Line of the first header or key at or below `keys`, else of their parent (inline tables)."""
    while keys:
        for number, path in _key_lines(text):
            if path[: len(keys)] == keys:
                return number
        keys = keys[:-1]
    return None


def _key_lines(text: str) -> Iterator[tuple[int, tuple[str, ...]]]:
    """(line number, full key path) of each table header and key line of a TOML text.

    A line scanner, not a parser: escapes in quoted keys are not decoded (such a key falls back to
    its table's line) and multi-line strings are skipped by counting their delimiters.
    """
    table: tuple[str, ...] = ()
    in_string: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if in_string:
            if line.count(in_string) % 2:
                in_string = None
            continue
        stripped = line.lstrip()
        if stripped.startswith("["):
            table, _ = _key_path(stripped, len(stripped) - len(stripped.lstrip("[")))
            yield number, table
        else:
            keys, end = _key_path(line, 0)
            if keys and line.startswith("=", end):
                yield number, table + keys
        in_string = next((d for d in ('"""', "'''") if line.count(d) % 2), None)


def _key_path(line: str, pos: int) -> tuple[tuple[str, ...], int]:
    """The dotted TOML key starting at `pos`, and the position after it."""
    parts: list[str] = []
    while match := _KEY_PART.match(line, pos):
        parts.append(next(g for g in match.groups() if g is not None))
        pos = match.end()
        if not line.startswith(".", pos):
            break
        pos += 1
    return tuple(parts), pos


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
    short = ref
    for prefix in ("refs/heads/", "refs/tags/"):
        if ref.startswith(prefix):
            short = ref[len(prefix) :]
            break
    return any(fnmatchcase(short, pattern) for pattern in patterns)


# --- masking ----------------------------------------------------------------------------------


def masked_forms(value: str) -> list[str]:
    """The forms of `value` that are masked: itself, base64, URL-encoded, hex; longest first."""
    if not value:
        return []
    raw = value.encode()
    derived = {raw.hex(), raw.hex().upper()} | _url_forms(value) | _base64_forms(raw)
    # A derived form shorter than the value would mask ordinary text (only tiny values have one).
    forms = {value} | {form for form in derived if len(form) >= len(value)}
    return sorted(forms, key=lambda form: (-len(form), form))


def _url_forms(value: str) -> set[str]:
    """URL-encodings of `value`: quote and quote_plus, '/' kept or not, upper- or lower-case hex."""
    encoded = {quote(value, safe=""), quote(value), quote_plus(value), quote_plus(value, safe="/")}
    return encoded | {re.sub(r"%[0-9A-F]{2}", lambda m: m[0].lower(), form) for form in encoded}


def _base64_forms(raw: bytes) -> set[str]:
    """base64 of `raw` (standard and urlsafe, padded or not), also as part of a longer stream."""
    forms: set[str] = set()
    for shift in range(3):
        # After `shift` other bytes, keep only the characters made of raw's bits alone: the
        # first and last ones also hold bits of the neighbouring bytes.
        first, end = (8 * shift + 5) // 6, 8 * (shift + len(raw)) // 6
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            encoded = encode(bytes(shift) + raw).decode()
            forms.add(encoded[first:end])
            if not shift:
                forms |= {encoded, encoded.rstrip("=")}
    forms.discard("")
    return forms


def _trie_pattern(forms: list[str]) -> str:
    """A regex matching any of `forms`, the longest one at a given position.

    The alternation is factored by common prefixes: a flat `a|b|c` makes `re` try every form at
    every position, which is about 5x slower with 20 secrets. Siblings start with different
    characters and a form ending early is an optional group tried last, so the longest wins.
    """
    groups: dict[str, list[str]] = {}
    for form in sorted(form for form in forms if form):
        groups.setdefault(form[0], []).append(form)
    branches = []
    for group in groups.values():
        prefix = os.path.commonprefix(group)
        branches.append(re.escape(prefix) + _trie_pattern([form[len(prefix) :] for form in group]))
    if len(branches) < 2:
        body = "".join(branches)
    else:
        body = "(?:" + "|".join(branches) + ")"
    return f"(?:{body})?" if "" in forms and body else body


class Masker:
    """Replaces every form (see `masked_forms`) of every secret value by `***`."""

    masked_forms = staticmethod(masked_forms)

    def __init__(self, values: Iterable[str]) -> None:
        self.forms = sorted({f for value in values for f in masked_forms(value)}, key=lambda f: (-len(f), f))
        pattern = _trie_pattern(self.forms)
        self._text = re.compile(pattern) if self.forms else None
        # UTF-8 keeps the pattern's meaning: groups and `?` only ever wrap whole characters.
        self._bytes = re.compile(pattern.encode()) if self.forms else None
        self._raw = [f.encode() for f in self.forms]
        self.longest = max(map(len, self._raw), default=0)
        self._heads: dict[int, list[bytes]] = {}  # first byte -> forms of two bytes or more
        for raw in self._raw:
            if len(raw) > 1:
                self._heads.setdefault(raw[0], []).append(raw)
        heads = b"".join(re.escape(bytes([byte])) for byte in self._heads)
        self._head = re.compile(b"[" + heads + b"]") if heads else None

    def mask(self, text: str) -> str:
        """`text` with every secret form replaced by `***`."""
        return self._text.sub(MASK, text) if self._text else text

    def stream(self) -> MaskStream:
        """A new stream masker for one log."""
        return MaskStream(self)

    def _split(self, buf: bytes) -> tuple[bytes, bytes]:
        """Mask `buf` up to the first position whose decision needs more bytes: (masked, held back).

        Equals re.sub over the whole stream: a position is decided only when no longer form could
        still match there, and positions skipped by a match are never considered.
        """
        assert self._bytes is not None
        cut = self._pending(buf, 0)
        # Most chunks hold no secret: one substring test per form (C fast search) is 3-4x faster
        # than running the regex over text it cannot match.
        if not any(form in buf for form in self._raw):
            return buf[:cut], buf[cut:]
        out: list[bytes] = []
        done = 0
        for match in self._bytes.finditer(buf):
            if match.start() >= cut:
                break
            out += (buf[done : match.start()], MASK.encode())
            done = match.end()
            if done > cut:
                cut = self._pending(buf, done)
        out.append(buf[done:cut])
        return b"".join(out), buf[cut:]

    def _pending(self, buf: bytes, start: int) -> int:
        """First position >= start from which `buf` is a proper prefix of some form; else len(buf)."""
        if self._head is None:
            return len(buf)
        for match in self._head.finditer(buf, max(start, len(buf) - self.longest + 1)):
            tail = buf[match.start() :]
            if any(len(f) > len(tail) and f.startswith(tail) for f in self._heads[tail[0]]):
                return match.start()
        return len(buf)


class MaskStream:
    """Masks a byte stream written in pieces; holds back only a tail that may begin a secret form."""

    def __init__(self, masker: Masker) -> None:
        self._masker = masker
        self._held = b""

    @property
    def held(self) -> int:
        """Number of bytes held back (always less than the longest form)."""
        return len(self._held)

    def feed(self, data: bytes) -> bytes:
        """Take the next piece of the stream; return what is safe to emit now, masked."""
        if not self._masker.forms:
            return data
        out, self._held = self._masker._split(self._held + data)
        return out

    def flush(self) -> bytes:
        """End of the stream: return the held-back tail, masked."""
        held, self._held = self._held, b""
        regex = self._masker._bytes
        return regex.sub(MASK.encode(), held) if regex else held
